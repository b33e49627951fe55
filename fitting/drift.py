"""Chain-aware observation model: the finite chain's own random drift in the fit (docs/model.md section 5).

The covariance of the per-iteration statistics, Sigma, is `qtm.finite_population` (its docstring derives it;
it sits next to the Monte Carlo it must match). This module turns it into the fit's objective.

Residuals. e = (xbar_0 - mu_0, s^2_0 - V_0; then per condition c and iteration k >= 1: xbar_ck - mu_ck,
s^2_ck - V_ck), with (mu, V) the recursion's trajectory. In a chain every condition starts from ONE
original sample D_0: its sampling noise moves iteration 0's statistics and, through each condition's first
selection, every condition's whole trajectory, so e is jointly normal with the covariance
`qtm.finite_population.shared_origin_covariance` (cross-condition blocks included; iteration 0 enters once).

Estimator: generalized least squares with the covariance at a pilot, iterated to a fixed point,

    NLL_GLS(theta; theta~) = 0.5 e(theta)^T Sigma(theta~)^-1 e(theta) + 0.5 log det 2 pi Sigma(theta~),

minimized over theta with theta~ held (the pilot), then theta~ <- theta^ and again (`fitting.driver`: the
independent-draws fit is the first pilot; 2-4 rounds reach |delta u| < 1e-3). Why not the full Gaussian
likelihood -log N(e; 0, Sigma(theta)) (the previous drift model)? Its score has, besides the GLS term
J^T Sigma^-1 e, the terms 0.5 tr(Sigma^-1 dSigma) - 0.5 e^T Sigma^-1 dSigma Sigma^-1 e. They have mean zero
only when Sigma is exactly right; here Sigma is a first-order expansion whose size depends strongly on the
parameters (the drift of a chain grows with the selection intensity, through the recursion's Jacobian),
so log det Sigma(theta) rewards parameters that predict little drift (weak selection, small sigma_env): the
measured shrinkage of r1, r2 and sigma_env towards such values (median bias -0.33 to -0.43 half-widths on
chains, sigma_env 0.063 for 0.1 on independent draws). With Sigma fixed at the pilot, the estimating
equation J(theta)^T Sigma~^-1 e(theta) = 0 has mean zero at the truth for ANY fixed positive-definite
Sigma~, so the estimate is consistent whatever the accuracy of Sigma; Sigma only sets its efficiency and
its intervals, and at the fixed point Sigma~ = Sigma(theta^) is the covariance the intervals need (the GLS
Hessian J^T Sigma^-1 J is then the inverse covariance of theta^, as for the exact likelihood). A REML
correction would remove the first-order bias of the variance parameters only; GLS removes the
log-determinant's pull on all of them and costs one more local optimization per round.

As N -> infinity, Sigma -> diag(V/n, 2 V^2/(n - 1)) and the objective is the default likelihood with its
chi2(n - 1) variance terms replaced by their normal approximation (relative skewness sqrt(8 / (n - 1));
0.09 at n = 1000), the variance in their denominators held at the pilot.

Approximations: first order in 1/N (a selected sample of a few dozen individuals makes the higher orders,
e.g. the O(1/N_sel) bias of the ML variance, visible); hard truncation only (soft selection draws its
survivors at random: another influence function, not derived here); iteration 0's parameters (mu0,
sigma_g0, sigma_env) are taken as condition 0's.

Domain: the expansion needs many selected individuals, and the closed-form central moments of a very
narrow window lose their digits (relative error 2e-6 at 1 - r1 - r2 = 1e-3, garbage at 1e-4); the
objective is +inf where N_k (1 - r1 - r2) < MIN_SELECTED = 10 or 1 - r1 - r2 < MIN_SELECTED_FRACTION = 1e-3
(such a chain keeps almost nobody; the optimizer steps back from it), at the parameters or the pilot.

Elsewhere in the fit: the prediction band of a mean uses its marginal variance Sigma_kk; goodness of fit
uses the Mahalanobis forms of `goodness_of_fit` below (per condition).

The population N of iteration k is `population` when given (only a subset of n <= N images measured), else
the number of measured images of that cell (all images measured); an unobserved iteration takes the
largest n of its condition (iteration 0: the pooled iteration-0 count).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qtm.finite_population import (  # noqa: F401
    clamp_expectations,
    noise_covariance,
    residual_covariance,
    shared_origin_covariance,
)

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


def _in_domain(table, big):
    selected = 1.0 - table[:, 0] - table[:, 1]
    return jnp.all(selected >= MIN_SELECTED_FRACTION) & jnp.all(big * selected[:, None] >= MIN_SELECTED)


class GlsWeights(NamedTuple):
    """Sigma(theta~) of `chain_gls_nll` as used: whitening W = chol(Sigma_std)^-1 diag(1 / scale) over the
    observed rows (identity rows elsewhere) and the constant 0.5 log det(2 pi Sigma) of those rows."""

    whitening: jax.Array
    constant: jax.Array


@functools.partial(jax.jit, static_argnames=("layout",))
def _gls_weights(pilot, data, layout):
    num_c = pilot.shape[0]
    k1 = layout.num_iterations + 1
    n, _, _, mask, big, small = _cells(data, num_c, layout)
    valid = _in_domain(pilot, big)
    pilot = jnp.where(valid, pilot, pilot.at[:, 0].set(0.25).at[:, 1].set(0.25))
    sigma, _, _ = shared_origin_covariance(pilot, k1 - 1, big, small, mutation_mode=layout.mutation_mode,
                                           variance=layout.variance)
    keep = mask.astype(jnp.float64)
    scale = jnp.sqrt(jnp.diagonal(sigma))          # standardized for a well-conditioned Cholesky
    std = sigma / jnp.outer(scale, scale) * jnp.outer(keep, keep) + jnp.diag(1.0 - keep)
    chol = jnp.linalg.cholesky(std)
    whitening = jax.scipy.linalg.solve_triangular(chol, jnp.diag(jnp.where(mask, 1.0 / scale, 0.0)), lower=True)
    logdet = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol))) + 2.0 * jnp.sum(jnp.where(mask, jnp.log(scale), 0.0))
    constant = 0.5 * (logdet + jnp.sum(keep) * jnp.log(2.0 * jnp.pi))
    return GlsWeights(whitening, jnp.where(valid & jnp.isfinite(constant), constant, jnp.inf))


def gls_weights(pilot_table, data, layout) -> GlsWeights:
    """Sigma at the pilot (C, 7) natural parameters, whitened for `chain_gls_nll` (computed once per round)."""
    return _gls_weights(jnp.asarray(pilot_table, jnp.float64), data, layout=layout)


def _cells(data, num_c, layout):
    """Grids (C, K+1) of n, xbar, s^2; the observed-row mask in residual order; N and n as Sigma uses them."""
    k1 = layout.num_iterations + 1
    n = _grid(data, num_c, k1, data.num_images)
    xbar = _grid(data, num_c, k1, data.mean)
    s2 = _grid(data, num_c, k1, data.var)
    big = population_grid(data, num_c, layout.num_iterations, layout.population)
    small = jnp.where(n >= 2, n, 2.0)
    small = small.at[:, 0].set(small[0, 0])
    mask = _order(jnp.stack([n > 0, n >= 2], -1))
    return n, xbar, s2, mask, big, small


def _order(x):
    """(C, K+1, 2) -> the residual order: iteration 0 (condition 0's row), then every condition's k >= 1."""
    return jnp.concatenate([x[0, 0], x[:, 1:].reshape(-1)])


def chain_gls_nll(table, weights: GlsWeights, data, layout):
    """NLL_GLS(theta; theta~) of the module docstring over every observed cell (iteration 0 once):
    0.5 |W e(theta)|^2 + the constant, with W and the constant from `gls_weights` at the pilot theta~.

    table: natural parameters theta (C, 7); data: the cells (`fitting.model.Data`)."""
    num_c = table.shape[0]
    _, xbar, s2, mask, big, _ = _cells(data, num_c, layout)
    valid = _in_domain(table, big)
    table = jnp.where(valid, table, table.at[:, 0].set(0.25).at[:, 1].set(0.25))
    mean, var = _trajectory_moments(table, layout.num_iterations, layout.mutation_mode, layout.variance)
    resid = jnp.where(mask, _order(jnp.stack([xbar - mean, s2 - var], -1)), 0.0)
    y = weights.whitening @ resid
    return jnp.where(valid, 0.5 * jnp.sum(y * y) + weights.constant, jnp.inf)


def _trajectory_moments(table, num_iterations, mutation_mode, variance):
    from qtm.params import PARAM_NAMES, TraitParams
    from qtm.recursion import trajectory

    columns = [table[:, i] for i in range(len(PARAM_NAMES))]
    columns[PARAM_NAMES.index("tail_rate")] = math.inf     # hard truncation only (module docstring)
    traj = trajectory(TraitParams(*columns, mutation_mode=mutation_mode), num_iterations)
    return traj.mean, (traj.var_genetic if variance == "genetic" else traj.var_phenotype)


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
    sigma, _, v = _covariances(jnp.asarray(table), jnp.asarray(big), jnp.asarray(small),
                               num_iterations=layout.num_iterations, mutation_mode=layout.mutation_mode,
                               variance=layout.variance)
    return np.diagonal(np.asarray(sigma), axis1=1, axis2=2)[:, 0::2], np.asarray(v)


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
