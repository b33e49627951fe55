"""The drift-aware observation model (fitting/drift.py) against independent references.

- the per-iteration noise covariance Q against numerical integration (scipy.integrate.quad) of the
  influence functions written from their definition;
- the residual covariance Sigma of the observed per-iteration means and variances against the empirical
  covariance of qtm's finite-population Monte Carlo (many replicates), all images measured and a subset;
- the N -> infinity limit: the drift likelihood becomes independent normal cells (scipy.stats.norm), i.e.
  the default likelihood with its chi2(n - 1) variance terms replaced by their normal approximation;
- the CLI flags --drift/--no-drift and --population, and their errors;
- the chain objective (generalized least squares with the shared-D_0 covariance at a pilot) against numpy,
  and the fit's end at a fixed point of its pilot;
- (slow) the coverage of the default 95 % intervals on Monte Carlo chains of N = 1000 with every image
  measured, with and without the drift model (the full study at the paper's scale is studies/verification).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.stats
from typer.testing import CliRunner

from tests.fitting.testdata import TRUTH_CONDITIONS, TRUTH_SHARED, montecarlo_phenotypes, recursion_phenotypes, results_dataset
from qtm.finite_population import noise_covariance, residual_covariance
from fitting.model import ModelError, ModelSpec, build_problem
from fitting.observations import from_phenotypes
from qtm.params import PARAM_NAMES, TraitParams

IDX = {n: i for i, n in enumerate(PARAM_NAMES)}


def _row(params: TraitParams) -> jnp.ndarray:
    return jnp.array([float(getattr(params, n)) for n in PARAM_NAMES])


@pytest.mark.parametrize("r1, r2", [(0.5, 0.09), (0.9, 0.02), (0.0, 0.3), (0.2, 0.0)])
def test_noise_covariance_against_quadrature(r1, r2):
    """Q = E[f f^T] / N (population statistics) from the influence functions written out directly:
    f_A = z, f_B = (W - E W) / Z, f_C = ((W - m)^2 - E (W - m)^2) / Z, W = clamp(z, a, b) with the
    truncated-normal moments computed by quadrature, and f_D = u, f_E = u^2 - 1 of the measured values."""
    a = scipy.stats.norm.ppf(r1) if r1 > 0 else -np.inf
    b = scipy.stats.norm.isf(r2) if r2 > 0 else np.inf
    zmass = 1.0 - r1 - r2
    pdf = scipy.stats.norm.pdf

    def expect(f):
        points = [p for p in (a, b) if np.isfinite(p)]
        lo, hi = -12.0, 12.0
        edges = [lo] + sorted(points) + [hi]
        return sum(scipy.integrate.quad(lambda z: f(z) * pdf(z), x0, x1, epsabs=1e-13, epsrel=1e-12)[0]
                   for x0, x1 in zip(edges[:-1], edges[1:]))

    m = expect(lambda z: z * (a <= z <= b)) / zmass
    w = lambda z: min(max(z, a), b)  # noqa: E731
    ew = expect(w)
    ep = expect(lambda z: (w(z) - m) ** 2)
    f = [lambda z: z, lambda z: (w(z) - ew) / zmass, lambda z: ((w(z) - m) ** 2 - ep) / zmass]
    rho, big, n = 0.6, 1000.0, 400.0
    q = np.asarray(noise_covariance(r1, r2, rho, big, n))
    for i in range(3):
        for j in range(3):
            assert q[i, j] == pytest.approx(expect(lambda z: f[i](z) * f[j](z)) / big, rel=1e-6, abs=1e-12)
    # measured values u = sqrt(rho) z + sqrt(1 - rho) w' (w' independent): E[u f] = sqrt(rho) E[z f],
    # E[(u^2 - 1) f] = rho E[(z^2 - 1) f] for the population statistics f.
    for j in range(3):
        assert q[3, j] == pytest.approx(np.sqrt(rho) * expect(lambda z: z * f[j](z)) / big, rel=1e-6, abs=1e-12)
        assert q[4, j] == pytest.approx(rho * expect(lambda z: (z * z - 1) * f[j](z)) / big, rel=1e-6,
                                        abs=1e-12)
    assert q[3, 3] == pytest.approx(1 / n) and q[4, 4] == pytest.approx(2 / (n - 1)) and q[3, 4] == 0.0
    np.testing.assert_allclose(q, q.T, rtol=1e-12)
    assert np.all(np.linalg.eigvalsh(q) > -1e-15)


@pytest.mark.parametrize("r1, r2, measured, mode, variance", [
    (0.5, 0.09, 1000, "paper", "genetic"), (0.9, 0.02, 300, "paper", "genetic"),
    (0.5, 0.09, 1000, "additive", "phenotype")])
def test_residual_covariance_matches_monte_carlo(r1, r2, measured, mode, variance):
    """Sigma of (xbar_k, s2_k), k = 0..K, against the empirical covariance over Monte Carlo replicates of a
    population of N = 1000 (MODEL.md section 5) of which `measured` genetic values (or phenotypes) are
    observed."""
    from qtm.montecarlo import simulate_population

    params = TraitParams(r1=r1, r2=r2, **TRUTH_SHARED, sigma_mut=0.03 if mode == "additive" else 0.0,
                         mutation_mode=mode)
    k, big, reps = 4, 1000, 3000
    sigma, mu, v = residual_covariance(_row(params), k, jnp.full(k + 1, float(big)),
                                       jnp.full(k + 1, float(measured)), mutation_mode=mode, variance=variance)
    sigma, mu, v = np.asarray(sigma), np.asarray(mu), np.asarray(v)
    sim = simulate_population(params, k, population=big, replicates=reps, key=jax.random.key(7),
                              return_individuals=True)
    g = np.asarray(sim.genetic_values if variance == "genetic" else sim.phenotypes)[:, :, :measured]
    stats = np.stack([g.mean(-1), g.var(-1, ddof=1)], -1).reshape(reps, -1)
    emp = np.cov(stats.T)
    sd_model, sd_emp = np.sqrt(np.diag(sigma)), np.sqrt(np.diag(emp))
    # variances: the sample variance's relative standard error is sqrt(2 / reps) = 0.026; allow ~4 of them
    np.testing.assert_allclose(sd_emp / sd_model, 1.0, atol=0.06)
    # correlations: standard error <= 1 / sqrt(reps) = 0.018
    corr_model = sigma / np.outer(sd_model, sd_model)
    corr_emp = emp / np.outer(sd_emp, sd_emp)
    assert np.max(np.abs(corr_emp - corr_model)) < 0.075
    # the mean of the statistics is the recursion to first order: bias well inside a tenth of Sigma's sd
    # plus the replicate error (the O(1 / N_sel) bias of the selected ML variance shows with N_sel = 80)
    bias = (stats.mean(0) - np.stack([mu, v], -1).reshape(-1)) / sd_model
    assert np.max(np.abs(bias)) < 0.2
    # the drift is not the sampling noise alone: the later means wander far more than V / n allows
    sampling = v / measured
    assert sigma[2 * k, 2 * k] > 3 * sampling[k]
    assert abs(corr_emp[2 * (k - 1), 2 * k]) > 0.5   # successive means strongly correlated


def test_large_population_gives_independent_normal_cells():
    """N -> infinity: the drift objective at its own pilot is the sum over cells (iteration 0 once) of normal
    densities of the mean (V / n) and of the sample variance (2 V^2 / (n - 1)) (scipy reference); the
    cross-condition terms of the shared D_0 vanish with 1 / N."""
    x = recursion_phenotypes(TRUTH_CONDITIONS, TRUTH_SHARED, num_iterations=3, num_images=200, seed=3)
    obs = from_phenotypes(list(TRUTH_CONDITIONS), np.arange(4), x)
    default = build_problem(obs, ModelSpec())
    limit = build_problem(obs, ModelSpec(drift=True, population=10**17))
    rng = np.random.default_rng(0)
    for _ in range(3):
        u = rng.normal(0.0, 0.3, default.layout.size)
        mean, var = default.moments(u[None])
        d = default.data
        ci, it = np.asarray(d.condition_index), np.asarray(d.iteration)
        n, xbar, s2 = np.asarray(d.num_images), np.asarray(d.mean), np.asarray(d.var)
        mu, v = mean[0][ci, it], var[0][ci, it]
        reference = -np.sum(scipy.stats.norm.logpdf(xbar, mu, np.sqrt(v / n))
                            + scipy.stats.norm.logpdf(s2, v, v * np.sqrt(2 / (n - 1))))
        assert limit.with_pilot(u).nll(u) == pytest.approx(reference, rel=1e-9)
        assert abs(default.nll(u) - reference) > 1e-3   # the chi2 and normal variance terms do differ


def test_gls_objective_against_numpy():
    """The chain objective (fitting.drift.chain_gls_nll) against a direct numpy implementation on a small
    problem (3 conditions, K = 3, N = 400): residuals from qtm's recursion, Sigma from
    shared_origin_covariance at the pilot, 0.5 e^T Sigma^-1 e + 0.5 log det(2 pi Sigma) by numpy.linalg;
    the covariance is held at the pilot (the value at other parameters moves only through e)."""
    from qtm.finite_population import shared_origin_covariance
    from qtm.recursion import trajectory

    k, size = 3, 400
    x = montecarlo_phenotypes(TRUTH_CONDITIONS, TRUTH_SHARED, num_iterations=k, num_images=size, population=size,
                              seed=2)
    obs = from_phenotypes(list(TRUTH_CONDITIONS), np.arange(k + 1), x)
    problem = build_problem(obs, ModelSpec(drift=True))
    rng = np.random.default_rng(1)
    u_pilot = rng.normal(0.0, 0.2, problem.layout.size)
    pilot = problem.natural(u_pilot)
    grid = jnp.full((3, k + 1), float(size))
    sigma, _, _ = shared_origin_covariance(jnp.asarray(pilot), k, grid, grid)
    sigma = np.asarray(sigma)
    fixed = problem.with_pilot(u_pilot)
    recursion = jax.jit(trajectory, static_argnums=1)     # one compilation for the nine trajectories
    for _ in range(3):
        u = u_pilot + rng.normal(0.0, 0.1, u_pilot.size)
        table = problem.natural(u)
        resid = []
        for c in range(3):
            traj = recursion(TraitParams(*table[c]), k)
            m, v = np.asarray(traj.mean), np.asarray(traj.var_genetic)
            if c == 0:
                resid += [x[0, 0].mean() - m[0], x[0, 0].var(ddof=1) - v[0]]
            resid += [val for j in range(1, k + 1) for val in (x[c, j].mean() - m[j], x[c, j].var(ddof=1) - v[j])]
        e = np.array(resid)
        _, logdet = np.linalg.slogdet(2 * np.pi * sigma)
        reference = 0.5 * e @ np.linalg.solve(sigma, e) + 0.5 * logdet
        assert fixed.nll(u) == pytest.approx(reference, rel=1e-9)


def test_chain_fit_ends_at_a_fixed_point_of_its_pilot():
    """The drift fit iterates generalized least squares with the covariance at the previous estimate: at the
    end, re-optimizing with the covariance at the final estimate moves it by less than the tolerance (and
    the objective's gradient there is ~0)."""
    from fitting.driver import PILOT_TOLERANCE, FitConfig, fit_observations
    from fitting.optimize import local_minimize

    x = montecarlo_phenotypes(TRUTH_CONDITIONS, TRUTH_SHARED, num_iterations=3, num_images=400, population=400,
                              seed=4)
    obs = from_phenotypes(list(TRUTH_CONDITIONS), np.arange(4), x)
    result = fit_observations(obs, FitConfig(spec=ModelSpec(drift=True), num_starts=2, num_draws=16,
                                             interval="laplace"), key=jax.random.key(0))
    u_hat = result.optimization.best.u
    again = local_minimize(result.problem.with_pilot(u_hat), u_hat)
    assert np.max(np.abs(again.u - u_hat)) < 5 * PILOT_TOLERANCE
    assert abs(again.nll - result.problem.with_pilot(u_hat).nll(u_hat)) < 1e-2


def test_too_few_selected_individuals_is_outside_the_domain():
    """A chain keeping under 10 of its N individuals (here 1000 (1 - r1 - r2) = 5) has no drift expansion:
    the objective is +inf there (finite for the default model), with no NaN in the gradient."""
    x = recursion_phenotypes({"a": (0.5, 0.09)}, TRUTH_SHARED, num_iterations=2, num_images=1000, seed=0)
    obs = from_phenotypes(["a"], np.arange(3), x)
    drift = build_problem(obs, ModelSpec(drift=True))
    table = drift.natural(np.zeros(drift.layout.size))
    table[0, IDX["r1"]], table[0, IDX["r2"]] = 0.990, 0.005
    from fitting.model import to_unconstrained

    u = to_unconstrained(table, drift)
    value, grad = drift.with_pilot(u).value_and_grad(u)
    assert value == np.inf and np.all(np.isfinite(grad))
    assert np.isfinite(build_problem(obs, ModelSpec()).nll(u))
    table[0, IDX["r1"]] = 0.980   # 15 selected: inside
    inside = to_unconstrained(table, drift)
    assert np.isfinite(drift.with_pilot(inside).nll(inside))
    # outside at the parameters with the pilot inside: +inf too, gradient finite
    value, grad = drift.with_pilot(inside).value_and_grad(u)
    assert value == np.inf and np.all(np.isfinite(grad))


def test_spec_errors_name_the_field():
    obs = from_phenotypes(["a"], np.arange(3), 0.3 + 0.05 * np.random.default_rng(0).standard_normal((1, 3, 50)))
    flags = {"drift": "--drift", "selection": "--model", "objective": "--objective", "population": "--population"}
    for spec, text, cli in ((ModelSpec(drift=True, selection="soft"), "drift supports selection hard",
                             "--drift supports --model hard"),
                            (ModelSpec(drift=True, objective="least-squares"), "objective likelihood",
                             "--objective likelihood"),
                            (ModelSpec(population=100), "add drift", "add --drift"),
                            (ModelSpec(drift=True, population=20), "population 20 is smaller",
                             "--population 20 is smaller")):
        with pytest.raises(ModelError, match=text) as info:
            build_problem(obs, spec)
        assert cli in info.value.message(flags)


runner = CliRunner()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    x = montecarlo_phenotypes(TRUTH_CONDITIONS, TRUTH_SHARED, num_iterations=4, num_images=300, population=300,
                              seed=5)
    root = tmp_path_factory.mktemp("results") / "chain"
    root.mkdir()
    ds = results_dataset(x, TRUTH_CONDITIONS)
    ds.attrs["data_kind"] = "chain"                  # as `qtm chain run` writes it
    ds.to_netcdf(root / "metrics.nc", engine="h5netcdf")
    return root


def test_cli_drift_flags(run_dir, tmp_path):
    from qtm.cli import app

    out = tmp_path / "fit.nc"
    # no flag: the folder says it is a chain, so the drift model is the default
    result = runner.invoke(app, ["fit", str(run_dir), "--json", "--starts", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    diag = json.loads(result.stdout)["diagnostics"]
    assert diag["drift"] is True and diag["population"] is None
    assert any("holds a chain" in w for w in diag["warnings"]), diag["warnings"]
    # goodness of fit under the drift model's joint normal: a chain drawn from the model is not rejected
    for row in diag["goodness_of_fit"].values():
        assert row["num_iterations"] == 4 and row["mean_chi2_pvalue"] > 0.001
        assert row["variance_deviance_pvalue"] > 0.001
    import xarray as xr

    ds = xr.open_dataset(out, engine="h5netcdf").load()
    assert ds.attrs["drift"] == 1 and ds.attrs["population"] == -1
    # the prediction band of a mean includes the drift: wider than the sampling-only band V / n
    width = ds["predict_upper"].values[:, -1] - ds["predict_lower"].values[:, -1]
    sampling = 2 * 1.96 * np.sqrt(ds["fitted_var"].values[:, -1] / 300)
    assert np.all(width > 1.5 * sampling)
    plain = runner.invoke(app, ["fit", str(run_dir), "--no-drift", "--json", "--starts", "2"])
    assert plain.exit_code == 0 and json.loads(plain.stdout)["diagnostics"]["drift"] is False
    bad = runner.invoke(app, ["fit", str(run_dir), "--drift", "--population", "100"])
    assert bad.exit_code == 2 and "--population 100 is smaller" in bad.output
    soft = runner.invoke(app, ["fit", str(run_dir), "--drift", "--model", "soft"])
    assert soft.exit_code == 2 and "--drift supports --model hard" in soft.output


def test_data_kind_rule():
    """A chain is recognized by the data_kind attribute, or by the layout only `qtm chain run` writes."""
    import xarray as xr

    from fitting.observations import data_kind

    base = xr.Dataset({"hf_power": (("condition", "iteration", "image"), np.zeros((1, 2, 3)))})
    assert data_kind(base) == "unknown"
    assert data_kind(base.assign_attrs(data_kind="chain")) == "chain"
    assert data_kind(base.assign_attrs(data_kind="independent", base_model="x")) == "independent"
    older = base.assign(completed=(("condition", "iteration"), np.ones((1, 2), np.int8)))
    assert data_kind(older) == "unknown"
    assert data_kind(older.assign_attrs(base_model="tiny-sd")) == "chain"


def coverage(num_seeds: int, *, drift: bool, population: int = 1000, num_images: int = 1000,
             num_iterations: int = 5):
    """Pooled and per-entry rates of the truth inside the 95 % Laplace intervals (as test_fit_coverage)."""
    from fitting.driver import FitConfig, fit_observations

    truth = np.array([[r1, r2, np.inf, 0.0, TRUTH_SHARED["mu0"], TRUTH_SHARED["sigma_g0"],
                       TRUTH_SHARED["sigma_env"]] for r1, r2 in TRUTH_CONDITIONS.values()])
    spec = ModelSpec(drift=drift, population=population if drift and population != num_images else None)
    hits = []
    for seed in range(num_seeds):
        x = montecarlo_phenotypes(TRUTH_CONDITIONS, TRUTH_SHARED, num_iterations=num_iterations,
                                  num_images=num_images, population=population, seed=1000 + seed)
        obs = from_phenotypes(list(TRUTH_CONDITIONS), np.arange(num_iterations + 1), x)
        result = fit_observations(obs, FitConfig(spec=spec, num_starts=2, num_draws=16), key=jax.random.key(seed))
        inside = (result.lower <= truth) & (truth <= result.upper)
        hits.append(np.concatenate([inside[:, :2].ravel(), inside[0, 4:]]))
    hits = np.array(hits)
    return hits.mean(axis=0), float(hits.mean())


@pytest.mark.slow
def test_drift_model_restores_coverage_on_finite_chains():
    """Monte Carlo chains of N = 1000 with every image measured, 60 seeds x 9 free entries: the default
    model covers far below 95 % (the chain's drift is not in its likelihood), the drift model near 95 %."""
    per_plain, plain = coverage(60, drift=False)
    per_drift, drift = coverage(60, drift=True)
    print(f"N = 1000, all measured: coverage without drift {plain:.3f} "
          f"{np.round(per_plain, 2).tolist()}; with drift {drift:.3f} {np.round(per_drift, 2).tolist()}")
    assert plain < 0.7
    # 540 outcomes (correlated within a seed): binomial sd at 0.95 is ~0.01
    assert 0.9 <= drift <= 0.98
    assert np.all(per_drift >= 0.8)
