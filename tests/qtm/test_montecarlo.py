"""The finite-population Monte Carlo (MODEL.md section 5) against the recursion (N -> inf), the
Gaussian refitting law E[V_t] = ((N - 1) / N)^t V_0, and a sort-based implementation of one iteration
written from the definition."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtm.montecarlo import _hard_cutoffs, simulate_population
from qtm.params import TraitParams
from qtm.recursion import trajectory


@pytest.mark.parametrize(("n", "seed", "r1", "r2"), [
    (1001, 0, 0.025, 0.675), (4001, 1, 0.95, 0.0002), (1001, 2, 0.0, 0.3), (1001, 3, 0.3, 0.0),
    (1001, 4, 0.0, 0.0), (1001, 5, 0.0004, 0.9991), (1001, 6, 0.5, 0.4995), (1001, 7, 0.001, 0.001)])
def test_hard_cutoffs_are_exact_empirical_quantiles(n, seed, r1, r2):
    x = np.asarray(jax.random.normal(jax.random.key(seed), (n,), jnp.float64)) * 2.0 + 1.0
    k1, k2 = round(r1 * n), round(r2 * n)
    c_low, c_high = jax.jit(_hard_cutoffs)(jnp.asarray(x), jnp.asarray(1.0), jnp.asarray(2.0),
                                  jnp.asarray(float(k1)), jnp.asarray(float(k2)))
    xs = np.sort(x)
    kept = x[(x >= float(c_low)) & (x < float(c_high))]
    np.testing.assert_array_equal(np.sort(kept), xs[k1:n - k2])


def _naive_next_state(x: np.ndarray, mu: float, vg: float, p: TraitParams) -> tuple[float, float, float]:
    """Section 5 step 3 from the definition: sort, drop round(r1 N) / round(r2 N), ML variance."""
    n = x.size
    k1, k2 = round(p.r1 * n), round(p.r2 * n)
    sel = np.sort(x)[k1:n - k2]
    ve, vm = p.sigma_env**2, p.sigma_mut**2
    h2 = vg / (vg + ve + vm) if p.mutation_mode == "paper" else vg / (vg + ve)
    next_mean = x.mean() + h2 * (sel.mean() - x.mean())
    next_vg = sel.var() + (vm if p.mutation_mode == "additive" else 0.0)
    return next_mean, next_vg, sel.mean() - x.mean()


@pytest.mark.parametrize("mode", ["paper", "additive"])
def test_one_iteration_matches_sort_based_definition(mode):
    p = TraitParams(r1=0.1, r2=0.3, sigma_mut=0.05, mutation_mode=mode)
    out = simulate_population(p, 3, population=1000, replicates=2, key=jax.random.key(3),
                              return_individuals=True)
    assert out.phenotypes.shape == (2, 4, 1000) and out.genetic_values.shape == (2, 4, 1000)
    phen, mean, var_genetic = (np.asarray(a) for a in (out.phenotypes, out.mean, out.var_genetic))
    diff, resp = np.asarray(out.selection_differential), np.asarray(out.response)
    for r in range(2):
        for t in range(3):
            x = phen[r, t]
            ref = _naive_next_state(x, mean[r, t], var_genetic[r, t], p)
            np.testing.assert_allclose([mean[r, t + 1], var_genetic[r, t + 1]], ref[:2], rtol=1e-11)
            np.testing.assert_allclose(diff[r, t], ref[2], rtol=1e-10)
            np.testing.assert_allclose(resp[r, t], mean[r, t + 1] - mean[r, t], rtol=1e-12)
    assert np.all(np.isnan(diff[:, -1])) and np.all(np.isnan(resp[:, -1]))
    # asking for the individuals does not change the trajectory
    plain = simulate_population(p, 3, population=1000, replicates=2, key=jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(plain.mean), np.asarray(out.mean))
    assert plain.phenotypes is None and plain.genetic_values is None


def test_individuals_have_the_model_law():
    """g ~ N(mu_t, V_G,t), x - g ~ N(0, V_E) independent of g (MODEL.md section 5)."""
    p = TraitParams(r1=0.0, r2=0.0, mu0=1.0, sigma_g0=0.3, sigma_env=0.5)
    out = simulate_population(p, 0, population=200_000, replicates=1, key=jax.random.key(5),
                              return_individuals=True)
    g = np.asarray(out.genetic_values[0, 0])
    e = np.asarray(out.phenotypes[0, 0]) - g
    n = g.size
    assert abs(g.mean() - 1.0) < 4 * 0.3 / math.sqrt(n)
    assert abs(g.var() - 0.09) < 4 * 0.09 * math.sqrt(2 / n)
    assert abs(e.mean()) < 4 * 0.5 / math.sqrt(n)
    assert abs(e.var() - 0.25) < 4 * 0.25 * math.sqrt(2 / n)
    assert abs(np.corrcoef(g, e)[0, 1]) < 4 / math.sqrt(n)


@pytest.mark.parametrize("params", [
    TraitParams(),                                         # paper defaults, hard
    TraitParams(r1=0.95, r2=0.0002, sigma_g0=0.2),         # far upper tail, hard
    TraitParams(r1=0.5, r2=0.09, tail_rate=0.5),           # soft tails
    TraitParams(r1=0.2, r2=0.1, sigma_mut=0.1, mutation_mode="additive"),
])
@pytest.mark.parametrize(("population", "replicates"),
                         [(5000, 64), pytest.param(50_000, 16, marks=pytest.mark.slow)])
def test_converges_to_recursion(params, population, replicates):
    k = 4
    out = simulate_population(params, k, population=population, replicates=replicates,
                              key=jax.random.key(population))
    ref = trajectory(params, k)
    for name in ("mean", "var_genetic"):
        mc = np.asarray(getattr(out, name))[:, 1:]
        se = mc.std(axis=0, ddof=1) / math.sqrt(replicates)
        z = (mc.mean(axis=0) - np.asarray(getattr(ref, name))[1:]) / se
        assert np.all(np.abs(z) < 4.5), (name, z)
    # and the error is small in absolute terms: a few parts in a thousand of the phenotypic sd
    sd_p = math.sqrt(float(ref.var_phenotype[0]))
    assert np.max(np.abs(np.asarray(out.mean).mean(0) - np.asarray(ref.mean))) < 0.05 * sd_p


def test_error_shrinks_with_population():
    p = TraitParams(r1=0.95, r2=0.0002, sigma_g0=0.2)
    ref = np.asarray(trajectory(p, 3).var_genetic)[1:]
    errs = []
    for n in (300, 30_000):
        out = simulate_population(p, 3, population=n, replicates=32, key=jax.random.key(11))
        errs.append(np.sqrt(np.mean((np.asarray(out.var_genetic)[:, 1:] - ref) ** 2)))
    assert errs[0] > 5 * errs[1]  # RMS error ~ 1/sqrt(N): a factor ~10 over two decades


@pytest.mark.parametrize(("ddof", "factor"), [(0, 0.9), (1, 1.0)])
def test_neutral_gaussian_refit_law(ddof, factor):
    """r1 = r2 = 0, V_E = 0 (h2 = 1): refitting N = 10 samples, E[V_t] = ((N-1)/N)^t V_0 with the ML
    variance (ddof = 0) and E[V_t] = V_0 with the unbiased one; E[mu_t] = mu_0 and
    Var(mu_t) = sum_{s<t} E[V_s] / N."""
    n, k, reps = 10, 8, 6000
    p = TraitParams(r1=0.0, r2=0.0, sigma_env=0.0, sigma_g0=1.0, mu0=0.5)
    out = simulate_population(p, k, population=n, replicates=reps, key=jax.random.key(2024), ddof=ddof)
    v = np.asarray(out.var_genetic)
    expected = factor ** np.arange(k + 1)
    se = v.std(axis=0, ddof=1) / math.sqrt(reps)
    z = (v.mean(axis=0)[1:] - expected[1:]) / se[1:]
    assert np.all(np.abs(z) < 4.0), z
    mu = np.asarray(out.mean)
    var_mu = np.concatenate([[0.0], np.cumsum(expected[:-1]) / n])
    np.testing.assert_allclose(mu.var(axis=0)[1:], var_mu[1:], rtol=4 * math.sqrt(2 / reps))
    z_mu = (mu.mean(axis=0)[1:] - 0.5) / np.sqrt(var_mu[1:] / reps)
    assert np.all(np.abs(z_mu) < 4.0), z_mu
    if ddof == 0:  # and the unbiased law is rejected for the ML estimator (the test can fail)
        assert abs(v.mean(axis=0)[-1] - 1.0) / se[-1] > 8


def test_replicates_are_independent_and_key_explicit():
    p = TraitParams(tail_rate=1.0)
    a = simulate_population(p, 2, population=300, replicates=3, key=jax.random.key(0))
    b = simulate_population(p, 2, population=300, replicates=3, key=jax.random.key(0))
    c = simulate_population(p, 2, population=300, replicates=3, key=jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(a.mean), np.asarray(b.mean))
    assert not np.array_equal(np.asarray(a.mean), np.asarray(c.mean))
    assert len({float(m) for m in a.mean[:, 1]}) == 3
    assert a.mean.shape == a.var_genetic.shape == a.var_phenotype.shape == (3, 3)
    np.testing.assert_allclose(np.asarray(a.var_phenotype - a.var_genetic), 0.0625, rtol=1e-12)


def test_vmap_over_parameters():
    r1 = jnp.array([0.1, 0.4])
    out = jax.vmap(lambda r: simulate_population(TraitParams(r1=r, r2=0.1), 2, population=400, replicates=2,
                                                 key=jax.random.key(9)).mean)(r1)
    for i in range(2):
        single = simulate_population(TraitParams(r1=float(r1[i]), r2=0.1), 2, population=400, replicates=2,
                                     key=jax.random.key(9)).mean
        np.testing.assert_allclose(np.asarray(out[i]), np.asarray(single), rtol=1e-12)


def test_bad_sizes_are_rejected():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="population"):
        simulate_population(TraitParams(), 2, population=1, replicates=1, key=key)
    with pytest.raises(ValueError, match="replicates"):
        simulate_population(TraitParams(), 2, population=10, replicates=0, key=key)
    with pytest.raises(ValueError, match="num_iterations"):
        simulate_population(TraitParams(), -1, population=10, replicates=1, key=key)
    with pytest.raises(ValueError, match="too small"):
        simulate_population(TraitParams(r1=0.5, r2=0.45), 2, population=4, replicates=1, key=key)
