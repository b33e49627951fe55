"""Interval options (profile, bootstrap), least squares, soft selection, model comparison, float64 guard."""

import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.fitting.testdata import TRUTH_SHARED, recursion_phenotypes
from fitting.compare import compare_variants
from fitting.driver import FitConfig, fit_observations
from fitting.model import ModelSpec, reduce_vector, report_scale
from fitting.observations import from_phenotypes
from fitting.uncertainty import CHI2_HALF, _profile_point
from qtm.params import PARAM_NAMES

IDX = {n: i for i, n in enumerate(PARAM_NAMES)}
CONDITIONS = {"up": (0.8, 0.05), "down": (0.1, 0.5)}


@pytest.fixture(scope="module")
def obs():
    x = recursion_phenotypes(CONDITIONS, TRUTH_SHARED, num_iterations=4, num_images=500, seed=0)
    return from_phenotypes(list(CONDITIONS), np.arange(5), x)


@pytest.fixture(scope="module")
def laplace_fit(obs):
    return fit_observations(obs, FitConfig(num_starts=2, num_draws=100, interval="laplace"), key=jax.random.key(0))


def test_auto_interval_takes_the_profile_at_a_boundary_and_laplace_where_quadratic():
    """`auto` (the default): a window with r2 = 0 puts the estimate on the boundary (r2 indistinguishable
    from 0), where the Laplace intervals of the others are conditional on r2 = 0: the profile is used. With
    20000 images per iteration and interior windows the objective is quadratic to within the tolerance:
    Laplace is used for mu0, sigma_g0 and sigma_env, and the window fractions r1, r2 take their profiles
    (`fitting.driver.window_entries`)."""
    from fitting.uncertainty import R_FLOOR, profile_start

    boundary = {"a": (0.3, 0.0), "b": (0.1, 0.4)}
    x = recursion_phenotypes(boundary, TRUTH_SHARED, num_iterations=4, num_images=500, seed=1)
    result = fit_observations(from_phenotypes(list(boundary), np.arange(5), x), FitConfig(num_starts=2, num_draws=16),
                              key=jax.random.key(0))
    assert result.uncertainty.method == "profile"
    assert result.lower[0, IDX["r2"]] == 0.0 and result.upper[0, IDX["r2"]] < 0.1
    # the profile starts with that r moved off the boundary, everything else as estimated
    start = profile_start(result.problem, result.optimization.best.u)
    moved = result.problem.natural(start)
    assert moved[0, IDX["r2"]] == pytest.approx(R_FLOOR) or result.estimate[0, IDX["r2"]] >= R_FLOOR
    np.testing.assert_allclose(moved[:, [IDX["mu0"], IDX["sigma_g0"], IDX["sigma_env"]]],
                               result.estimate[:, [IDX["mu0"], IDX["sigma_g0"], IDX["sigma_env"]]], rtol=1e-9)

    x = recursion_phenotypes(CONDITIONS, TRUTH_SHARED, num_iterations=4, num_images=20000, seed=2)
    big = from_phenotypes(list(CONDITIONS), np.arange(5), x)
    auto = fit_observations(big, FitConfig(num_starts=2, num_draws=16), key=jax.random.key(0))
    plain = fit_observations(big, FitConfig(num_starts=2, num_draws=16, interval="laplace"), key=jax.random.key(0))
    profiled = fit_observations(big, FitConfig(num_starts=2, num_draws=16, interval="profile"), key=jax.random.key(0))
    assert auto.uncertainty.method == "laplace; profile for r1, r2"
    window = [IDX["r1"], IDX["r2"]]
    rest = [IDX["mu0"], IDX["sigma_g0"], IDX["sigma_env"]]
    np.testing.assert_allclose(auto.lower[:, rest], plain.lower[:, rest], rtol=1e-9)
    np.testing.assert_allclose(auto.upper[:, rest], plain.upper[:, rest], rtol=1e-9)
    np.testing.assert_allclose(auto.lower[:, window], profiled.lower[:, window], rtol=1e-6)
    np.testing.assert_allclose(auto.upper[:, window], profiled.upper[:, window], rtol=1e-6)


def test_profile_interval_ends_where_the_likelihood_drops_by_1_92(obs, laplace_fit):
    result = fit_observations(obs, FitConfig(num_starts=2, num_draws=100, interval="profile"),
                              key=jax.random.key(0))
    problem, u_hat = result.problem, result.optimization.best.u
    nll_hat = result.optimization.best.nll
    for index in (problem.layout.free.index(("r1", 0)), problem.layout.free.index(("sigma_env", -1))):
        name = problem.layout.free[index][0]
        for end in (result.uncertainty.lower[index], result.uncertainty.upper[index]):
            # Reference: re-optimize the others with the entry pinned at the reported end.
            value, _ = _profile_point(problem, reduce_vector(u_hat, index), float(report_scale(name, end)), index)
            assert value - nll_hat == pytest.approx(CHI2_HALF, abs=0.05)
        # For a well-determined parameter the profile and Laplace intervals nearly agree.
        lap = laplace_fit.uncertainty
        width = lap.upper[index] - lap.lower[index]
        assert abs(result.uncertainty.lower[index] - lap.lower[index]) < 0.25 * width
        assert abs(result.uncertainty.upper[index] - lap.upper[index]) < 0.25 * width


def test_paired_bootstrap_agrees_with_laplace_in_scale(obs, laplace_fit):
    result = fit_observations(obs, FitConfig(num_starts=2, num_draws=100, interval="bootstrap",
                                             num_bootstrap=40), key=jax.random.key(0))
    unc, lap = result.uncertainty, laplace_fit.uncertainty
    assert unc.method == "bootstrap" and unc.samples.shape[0] == 40
    ratio = (unc.upper - unc.lower) / (lap.upper - lap.lower)
    assert np.all((ratio > 0.4) & (ratio < 2.5)), ratio
    assert np.all((unc.lower <= unc.estimate) & (unc.estimate <= unc.upper))


def test_least_squares_recovers_the_window_and_reports_gaussian_aic(obs):
    result = fit_observations(obs, FitConfig(spec=ModelSpec(objective="least-squares", fixed=(
        ("sigma_g0", TRUTH_SHARED["sigma_g0"]), ("sigma_env", TRUTH_SHARED["sigma_env"]))), num_starts=3,
        num_draws=100), key=jax.random.key(0))
    for c, (r1, r2) in enumerate(CONDITIONS.values()):
        assert abs(result.estimate[c, IDX["r1"]] - r1) < 0.1 and abs(result.estimate[c, IDX["r2"]] - r2) < 0.1
    # Reference: SSE recomputed from the observed and fitted means of the cells used (iteration 0 once).
    obs_mean, fit_mean = result.observed["mean"], result.prediction.mean
    sse = (obs_mean[0, 0] - fit_mean[0, 0]) ** 2 + np.sum((obs_mean[:, 1:] - fit_mean[:, 1:]) ** 2)
    m, p = 1 + 2 * 4, result.problem.layout.size
    assert result.information["sse"] == pytest.approx(sse, rel=1e-9)
    assert result.information["aic"] == pytest.approx(m * np.log(sse / m) + 2 * p, rel=1e-9)
    assert np.all(np.isfinite(result.lower[result.free])) and np.all(np.isfinite(result.upper[result.free]))


def test_free_tail_rate_is_reported_unidentified(obs):
    # (r1, r2, tail_rate) act only through (m_sel, v_sel): one flat direction per condition.
    spec = ModelSpec(selection="soft", free=("r1", "r2", "tail_rate", "mu0", "sigma_g0", "sigma_env"),
                     shared=("mu0", "sigma_g0", "sigma_env", "tail_rate"))
    result = fit_observations(obs, FitConfig(spec=spec, num_starts=2, num_draws=50, interval="laplace"),
                              key=jax.random.key(0))
    assert not result.identified[0, IDX["tail_rate"]]
    assert any("not identified" in w for w in result.warnings)
    # Laplace for the rest, profiles for the selection window: the reported method says both
    assert result.uncertainty.method == "laplace; profile for r1, r2, tail_rate"


def test_model_comparison_of_nested_variants(obs):
    rows = compare_variants(obs, ModelSpec(), num_starts=2, key=jax.random.key(0),
                            variants=(("hard", "none"), ("hard", "additive")))
    by = {(r["model"], r["mutation"]): r for r in rows}
    none, additive = by["hard", "none"], by["hard", "additive"]
    assert additive["num_free"] == none["num_free"] + 2
    # Nested: the larger model fits at least as well (sigma_mut -> 0 recovers the smaller one).
    assert additive["objective"] <= none["objective"] + 1e-6
    for r in rows:
        assert r["aic"] == pytest.approx(2 * r["num_free"] - 2 * r["log_likelihood"])
        assert r["bic"] == pytest.approx(r["num_free"] * np.log(r["num_observations"]) - 2 * r["log_likelihood"])
    assert min(r["delta_aic"] for r in rows) == 0.0
    # Data from the model without mutation: it is not beaten by more than the 2 x 2 parameter penalty.
    assert none["aic"] <= additive["aic"] + 4.0


def test_float64_is_required():
    code = ("import jax, numpy as np\n"
            "from fitting.observations import from_phenotypes\n"
            "from fitting.driver import fit_observations\n"
            "obs = from_phenotypes(['a'], np.arange(3), 0.3 + 0.01 * np.random.default_rng(0).standard_normal((1, 3, 20)))\n"
            "try:\n    fit_observations(obs, key=jax.random.key(0))\n"
            "except RuntimeError as e:\n    print('x64' in str(e) or 'float64' in str(e))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"JAX_ENABLE_X64": "0", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.stdout.strip() == "True", proc.stderr
