"""Chain-aware observation model: the finite chain's own random drift in the likelihood (docs/model.md section 5).

The covariance of the per-iteration statistics of one condition, Sigma, is `qtm.finite_population`
(its docstring derives it; it sits next to the Monte Carlo it must match). This module turns it into the
likelihood of the fit.

Likelihood. Per condition, the residuals of its observed iterations k >= 1 are jointly N(0, Sigma) (the
marginal of the observed rows); iteration 0 keeps its exact term (fitting.model.cell_nll, once):

    NLL_drift = cell_nll(iteration-0 cell) + sum_c [-log N(e_c; 0, Sigma_c)].

As N -> infinity, Sigma -> Sigma_inf = diag(V_obs / n, 2 V_obs^2 / (n - 1)): the mean terms become those of
the default likelihood exactly and the variance terms the normal approximation of its chi2(n - 1) law
(relative skewness sqrt(8 / (n - 1)); 0.09 at n = 1000). The chi-square law itself is not kept under drift:
a ratio correction N(e; Sigma) / N(e; Sigma_inf) on top of the chi-square terms would reward large
variance residuals through the chi-square's heavier right tail, which broke fits far from the truth.

Approximations: first order in 1/N (a selected sample of a few dozen individuals makes the higher orders,
e.g. the O(1/N_sel) bias of the ML variance, visible); iteration 0 (the same real data for every condition,
entering once through cell_nll) is not correlated with the conditions' later iterations, and the conditions'
drifts are independent (in a chain they share the iteration-0 sample). Hard truncation only (soft selection
draws its survivors at random: another influence function, not derived here).

Domain: the expansion needs many selected individuals, and the closed-form central moments of a very
narrow window lose their digits (relative error 2e-6 at 1 - r1 - r2 = 1e-3, garbage at 1e-4); the drift
NLL is +inf where N_k (1 - r1 - r2) < MIN_SELECTED = 10 or 1 - r1 - r2 < MIN_SELECTED_FRACTION = 1e-3
(such a chain keeps almost nobody; the optimizer steps back from it).

Elsewhere in the fit (fitting.driver, with drift): the default model's optimum is always among the
starts (far from the optimum the drift likelihood has spurious stalls, where a huge drift explains any
trajectory at the price of its log-determinant); the prediction band of a mean uses its marginal variance
Sigma_kk; goodness of fit uses the Mahalanobis forms of `goodness_of_fit` below.

The population N of iteration k is `population` when given (only a subset of n <= N images measured), else
the number of measured images of that cell (all images measured); an unobserved iteration takes the
largest n of its condition (iteration 0: the pooled iteration-0 count).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from qtm.finite_population import clamp_expectations, noise_covariance, residual_covariance  # noqa: F401

MIN_SELECTED = 10.0             # selected individuals per iteration below which the expansion is not used
MIN_SELECTED_FRACTION = 1e-3    # 1 - r1 - r2 below which the closed-form moments lose their digits


def _grid(data, num_conditions, k1, values):
    return jnp.zeros((num_conditions, k1)).at[data.condition_index, data.iteration].set(values)


def population_grid(data, num_conditions: int, num_iterations: int, population: int | None):
    """N_k per condition and iteration (C, K+1) (module docstring)."""
    k1 = num_iterations + 1
    if population is not None:
        return jnp.full((num_conditions, k1), float(population))
    n = _grid(data, num_conditions, k1, data.num_images)
    fill = jnp.maximum(jnp.max(n, axis=1, keepdims=True), 2.0)
    grid = jnp.where(n > 0, n, fill)
    n0 = n[0, 0]
    return grid.at[:, 0].set(jnp.where(n0 > 0, n0, fill[:, 0]))


def drift_nll(table, data, *, num_iterations: int, mutation_mode: str, variance: str,
              population: int | None):
    """-log N(e; 0, Sigma) of every condition's observed iterations k >= 1, summed over conditions (module
    docstring; the density of the cells' (xbar, s^2), so comparable with `fitting.model.cell_nll`).
    table: natural parameters (C, 7); data: the cells (`fitting.model.Data`)."""
    num_c = table.shape[0]
    k1 = num_iterations + 1
    n = _grid(data, num_c, k1, data.num_images)
    xbar = _grid(data, num_c, k1, data.mean)
    s2 = _grid(data, num_c, k1, data.var)
    big = population_grid(data, num_c, num_iterations, population)
    small = jnp.where(n >= 2, n, 2.0)
    later = jnp.arange(k1)[None, :] >= 1
    mask = jnp.stack([(n > 0) & later, (n >= 2) & later], -1).reshape(num_c, 2 * k1)

    def one(row, big_c, small_c, xbar_c, s2_c, mask_c):
        selected = 1.0 - row[0] - row[1]
        valid = (selected >= MIN_SELECTED_FRACTION) & jnp.all(big_c * selected >= MIN_SELECTED)
        # outside the model's domain: +inf, computed at harmless (r1, r2) so that no NaN reaches the gradient
        row = jnp.where(valid, row, row.at[0].set(0.25).at[1].set(0.25))
        sigma, mu, v = residual_covariance(row, num_iterations, big_c, small_c, mutation_mode=mutation_mode,
                                           variance=variance)
        resid = jnp.stack([xbar_c - mu, s2_c - v], -1).reshape(-1)
        # standardize by the sampling-only sds (Sigma_inf) for a well-conditioned Cholesky
        scale = jnp.sqrt(jnp.stack([v / small_c, 2 * v * v / (small_c - 1.0)], -1).reshape(-1))
        keep = mask_c.astype(jnp.float64)
        r = jnp.where(mask_c, resid / scale, 0.0)
        s = sigma / jnp.outer(scale, scale) * jnp.outer(keep, keep) + jnp.diag(1.0 - keep)
        chol = jnp.linalg.cholesky(s)
        y = jax.scipy.linalg.solve_triangular(chol, r, lower=True)
        logdet = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol))) + 2.0 * jnp.sum(jnp.where(mask_c, jnp.log(scale), 0.0))
        return jnp.where(valid, 0.5 * (jnp.sum(y * y) + logdet + jnp.sum(keep) * jnp.log(2.0 * jnp.pi)),
                         jnp.inf)

    return jnp.sum(jax.vmap(one)(table, big, small, xbar, s2, mask))


@functools.partial(jax.jit, static_argnames=("num_iterations", "mutation_mode", "variance"))
def _mean_variances(table, population, num_images, *, num_iterations, mutation_mode, variance):
    def one(row, big, small):
        sigma, _, v = residual_covariance(row, num_iterations, big, small, mutation_mode=mutation_mode,
                                          variance=variance)
        return jnp.diagonal(sigma)[0::2], v
    return jax.vmap(one)(table, population, num_images)


def observed_mean_variance(problem, u, num_images) -> tuple[np.ndarray, np.ndarray]:
    """Marginal variance of the observed mean of each cell under drift, Sigma_kk (C, K+1), and the
    predicted V_obs (C, K+1), at the unconstrained vector u of `problem` (a `fitting.model.Problem`).

    num_images (C, K+1): n per cell (0 = unobserved: the condition's largest n is used there)."""
    layout = problem.layout
    n = np.asarray(num_images, dtype=np.float64)
    fill = np.maximum(n.max(axis=1, keepdims=True), 2.0)
    small = np.where(n >= 2, n, fill)
    big = np.asarray(population_grid(problem.data, layout.num_conditions, layout.num_iterations,
                                     layout.population))
    big = np.maximum(big, small) if layout.population is None else big
    table = problem.natural(u)
    var_mean, v = _mean_variances(jnp.asarray(table), jnp.asarray(big), jnp.asarray(small),
                                  num_iterations=layout.num_iterations, mutation_mode=layout.mutation_mode,
                                  variance=layout.variance)
    return np.asarray(var_mean), np.asarray(v)


@functools.partial(jax.jit, static_argnames=("num_iterations", "mutation_mode", "variance"))
def _covariances(table, population, num_images, *, num_iterations, mutation_mode, variance):
    return jax.vmap(lambda row, big, small: residual_covariance(
        row, num_iterations, big, small, mutation_mode=mutation_mode, variance=variance))(
        table, population, num_images)


def goodness_of_fit(problem, u, observed: dict[str, np.ndarray], iterations) -> dict[str, dict[str, float]]:
    """Per condition over the given iterations (>= 1), the drift-aware counterparts of
    `fitting.forecast.goodness_of_fit`: with e the residuals and Sigma their covariance (module docstring),
    mean_chi2 = e_m^T Sigma_mm^-1 e_m over the observed means (chi2 with one df per mean under the model),
    variance_deviance = e_v^T Sigma_vv^-1 e_v over the sample variances (chi2, one df per variance; the
    normal law of the drift model), max_abs_z = the largest |e_k| / sqrt(Sigma_kk) of the means, and
    rmse_mean. observed: aligned (C, K+1) num_images, mean, var (`fitting.forecast.align`)."""
    import scipy.stats

    layout = problem.layout
    n = np.asarray(observed["num_images"], dtype=np.float64)
    fill = np.maximum(n.max(axis=1, keepdims=True), 2.0)
    small = np.where(n >= 2, n, fill)
    big = np.asarray(population_grid(problem.data, layout.num_conditions, layout.num_iterations,
                                     layout.population))
    big = np.maximum(big, small) if layout.population is None else big
    sigma, mu, v = (np.asarray(x) for x in _covariances(
        jnp.asarray(problem.natural(u)), jnp.asarray(big), jnp.asarray(small), num_iterations=layout.num_iterations,
        mutation_mode=layout.mutation_mode, variance=layout.variance))
    out = {}
    for c, name in enumerate(problem.conditions):
        ks = np.array([k for k in np.asarray(iterations).tolist() if k >= 1 and n[c, k] > 0], dtype=int)
        kv = np.array([k for k in ks.tolist() if n[c, k] >= 2 and np.isfinite(observed["var"][c, k])], dtype=int)
        em = observed["mean"][c, ks] - mu[c, ks]
        ev = observed["var"][c, kv] - v[c, kv]
        s_mm = sigma[c][np.ix_(2 * ks, 2 * ks)]
        s_vv = sigma[c][np.ix_(2 * kv + 1, 2 * kv + 1)]
        chi2 = float(em @ np.linalg.solve(s_mm, em)) if ks.size else 0.0
        dev = float(ev @ np.linalg.solve(s_vv, ev)) if kv.size else 0.0
        out[name] = {
            "num_iterations": int(ks.size),
            "mean_chi2": chi2,
            "mean_chi2_pvalue": float(scipy.stats.chi2.sf(chi2, ks.size)) if ks.size else float("nan"),
            "max_abs_z": float(np.max(np.abs(em) / np.sqrt(np.diag(s_mm)))) if ks.size else float("nan"),
            "variance_deviance": dev,
            "variance_deviance_pvalue": float(scipy.stats.chi2.sf(dev, kv.size)) if kv.size else float("nan"),
            "rmse_mean": float(np.sqrt(np.mean(em ** 2))) if ks.size else float("nan"),
        }
    return out
