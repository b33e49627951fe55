"""The chain's finite-population covariance when conditions share one D_0 (qtm/finite_population.py) and the
Monte Carlo of such chains (qtm.montecarlo.simulate_shared_origin), against independent references:

- the cross-condition noise covariance of iteration 0 against numerical integration (scipy.integrate.quad)
  of the influence functions of two windows applied to the same z;
- the joint covariance of all conditions' per-iteration means and variances against the empirical
  covariance of the Monte Carlo over many replicates of chains that share D_0.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.stats

from qtm.finite_population import (
    noise_covariance,
    residual_covariance,
    shared_origin_covariance,
    shared_origin_noise_covariance,
)
from qtm.montecarlo import simulate_shared_origin
from qtm.params import PARAM_NAMES, TraitParams

SHARED = {"mu0": 0.4, "sigma_g0": 0.05, "sigma_env": 0.1}


def _edges(r1, r2):
    return (scipy.stats.norm.ppf(r1) if r1 > 0 else -np.inf, scipy.stats.norm.isf(r2) if r2 > 0 else np.inf)


def _expect(f, points):
    edges = [-12.0] + sorted(p for p in points if np.isfinite(p)) + [12.0]
    pdf = scipy.stats.norm.pdf
    return sum(scipy.integrate.quad(lambda z: f(z) * pdf(z), x0, x1, epsabs=1e-13, epsrel=1e-12)[0]
               for x0, x1 in zip(edges[:-1], edges[1:]))


@pytest.mark.parametrize("first, second", [((0.5, 0.02), (0.05, 0.4)), ((0.3, 0.1), (0.0, 0.2)),
                                           ((0.2, 0.0), (0.6, 0.3))])
def test_shared_origin_noise_covariance_against_quadrature(first, second):
    """Cov(xi_c, xi_d) / (1/N) = E[f_c f_d] with f_A = z, f_B = (W - E W) / Z, f_C = ((W - m)^2 - E (W - m)^2) / Z
    of each window on the same z (quadrature), and the measured D, E shared."""
    rho, big, n = 0.2, 1000.0, 1000.0
    funcs = []
    for r1, r2 in (first, second):
        a, b = _edges(r1, r2)
        zmass = 1.0 - r1 - r2
        m = _expect(lambda z, a=a, b=b: z * (a <= z <= b), (a, b)) / zmass
        w = lambda z, a=a, b=b: min(max(z, a), b)  # noqa: E731
        ew = _expect(w, (a, b))
        ep = _expect(lambda z, w=w, m=m: (w(z) - m) ** 2, (a, b))
        funcs.append(([lambda z: z, lambda z, w=w, ew=ew, zm=zmass: (w(z) - ew) / zm,
                       lambda z, w=w, m=m, ep=ep, zm=zmass: ((w(z) - m) ** 2 - ep) / zm], (a, b)))
    q = np.asarray(shared_origin_noise_covariance(*first, *second, rho, big, n))
    (f_c, e_c), (f_d, e_d) = funcs
    for i in range(3):
        for j in range(3):
            ref = _expect(lambda z: f_c[i](z) * f_d[j](z), e_c + e_d) / big
            assert q[i, j] == pytest.approx(ref, rel=1e-6, abs=1e-12), (i, j)
    for j in range(3):   # measured values of the shared D_0 against each condition's population statistics
        assert q[3, j] == pytest.approx(np.sqrt(rho) * _expect(lambda z: z * f_d[j](z), e_d) / big, rel=1e-6,
                                        abs=1e-12)
        assert q[j, 4] == pytest.approx(rho * _expect(lambda z: (z * z - 1) * f_c[j](z), e_c) / big, rel=1e-6,
                                        abs=1e-12)
    assert q[3, 3] == pytest.approx(1 / n) and q[4, 4] == pytest.approx(2 / (n - 1))
    # the same window twice is the single-condition noise covariance
    same = shared_origin_noise_covariance(*first, *first, rho, big, n)
    np.testing.assert_allclose(same, noise_covariance(*first, rho, big, n), rtol=1e-10, atol=1e-15)


def _table(windows):
    return jnp.array([[{"r1": r1, "r2": r2, "tail_rate": np.inf, "sigma_mut": 0.0, **SHARED}[n]
                       for n in PARAM_NAMES] for r1, r2 in windows])


def test_shared_origin_covariance_blocks_are_the_single_condition_covariance():
    windows = [(0.5, 0.02), (0.05, 0.4)]
    k, big = 2, jnp.full((2, 3), 800.0)
    sigma, _, _ = shared_origin_covariance(_table(windows), k, big, big)
    sigma = np.asarray(sigma)
    assert np.all(np.linalg.eigvalsh(sigma) > 0)
    for c in range(2):
        own, _, _ = residual_covariance(_table(windows)[c], k, big[c], big[c])
        rows = np.r_[0, 1, 2 + 2 * k * c + np.arange(2 * k)]
        np.testing.assert_allclose(sigma[np.ix_(rows, rows)], np.asarray(own), rtol=1e-10, atol=1e-18)


@pytest.mark.slow
def test_shared_origin_covariance_matches_monte_carlo():
    """Sigma of (xbar_0, s2_0, then xbar_ck, s2_ck for k >= 1 per condition) against the empirical covariance
    over Monte Carlo replicates of chains that share D_0 (N = 1000 all measured, 2 conditions, K = 3): the
    cross-condition correlations the shared D_0 makes are the point."""
    windows = [(0.5, 0.02), (0.05, 0.4)]
    k, big, reps = 3, 1000, 2000
    sigma, mu, v = shared_origin_covariance(_table(windows), k, jnp.full((2, k + 1), float(big)),
                                            jnp.full((2, k + 1), float(big)))
    sigma, mu, v = np.asarray(sigma), np.asarray(mu), np.asarray(v)
    params = TraitParams(r1=jnp.array([w[0] for w in windows]), r2=jnp.array([w[1] for w in windows]), **SHARED)
    sim = jax.vmap(lambda key: simulate_shared_origin(params, k, population=big, key=key,
                                                      return_individuals=True).genetic_values)(
        jax.random.split(jax.random.key(11), reps))
    g = np.asarray(sim)                                                   # (reps, C, K+1, N)
    stats = np.stack([g.mean(-1), g.var(-1, ddof=1)], -1)                 # (reps, C, K+1, 2)
    assert np.all(stats[:, 0, 0] == stats[:, 1, 0])
    flat = np.concatenate([stats[:, 0, 0], stats[:, :, 1:].reshape(reps, -1)], axis=1)
    emp = np.cov(flat.T)
    sd_model, sd_emp = np.sqrt(np.diag(sigma)), np.sqrt(np.diag(emp))
    np.testing.assert_allclose(sd_emp / sd_model, 1.0, atol=0.07)        # se sqrt(2 / 2000) = 0.032
    corr_model = sigma / np.outer(sd_model, sd_model)
    corr_emp = emp / np.outer(sd_emp, sd_emp)
    assert np.max(np.abs(corr_emp - corr_model)) < 0.09                    # se <= 1 / sqrt(2000) = 0.022
    # the shared D_0 correlates the two conditions: iteration 1's means move together with iteration 0's
    first_a, first_b = 2, 2 + 2 * k
    assert corr_model[0, first_a] > 0.3 and corr_model[0, first_b] > 0.3
    assert abs(corr_emp[first_a, first_b] - corr_model[first_a, first_b]) < 0.09
    bias = (flat.mean(0) - np.concatenate([[mu[0, 0], v[0, 0]], np.stack([mu[:, 1:], v[:, 1:]], -1).ravel()]))
    assert np.max(np.abs(bias / sd_model)) < 0.2


def test_simulate_shared_origin_shares_d0_only():
    params = TraitParams(r1=jnp.array([0.5, 0.05]), r2=jnp.array([0.02, 0.4]), **SHARED)
    sim = simulate_shared_origin(params, 2, population=300, key=jax.random.key(0), return_individuals=True)
    g = np.asarray(sim.genetic_values)
    assert g.shape == (2, 3, 300)
    np.testing.assert_array_equal(g[0, 0], g[1, 0])
    assert not np.any(g[0, 1] == g[1, 1])
    # each condition's first selection acts on that D_0: iteration 1's state is what selecting D_0 gives
    x0 = np.asarray(sim.phenotypes)[0, 0]
    for c, (r1, r2) in enumerate([(0.5, 0.02), (0.05, 0.4)]):
        xs = np.sort(x0)
        kept = xs[round(r1 * 300): 300 - round(r2 * 300)]
        h2 = SHARED["sigma_g0"] ** 2 / (SHARED["sigma_g0"] ** 2 + SHARED["sigma_env"] ** 2)
        assert float(sim.mean[c, 1]) == pytest.approx(x0.mean() + h2 * (kept.mean() - x0.mean()), rel=1e-10)
    with pytest.raises(ValueError, match="shared D_0"):
        simulate_shared_origin(TraitParams(r1=jnp.array([0.1]), r2=jnp.array([0.1]), mu0=jnp.array([0.1])), 1,
                               population=10, key=jax.random.key(0))
