"""Drift-aware observation model: the finite chain's own random drift in the likelihood (MODEL.md section 5).

The default likelihood (`fitting.model`) treats the recursion as the realized trajectory and the measured
images of iteration k as independent draws around it. In a chain the N images of an iteration ARE the
population: the next iteration's mean and variance are set by the finite selected sample, so the realized
state (mu_k, V_k) (V = V_G) wanders around the recursion (random genetic drift) and the per-iteration
statistics are correlated across iterations. This module propagates that wandering to first order
(a linear-Gaussian / delta-method state-space model) and gives the joint normal law of the observed
per-iteration means and variances.

Noise of one iteration (hard truncation). Given the realized state (mu, V), V_P = V + V_E, s = sqrt(V_P),
the N individuals are x_i = mu + s z_i, z_i ~ N(0, 1), and the measured values (n of the N) are the genetic
values g_i = mu + sqrt(V) u_i with u_i = sqrt(rho) z_i + sqrt(1 - rho) w_i, w_i ~ N(0, 1) independent,
rho = V / V_P (`variance="phenotype"` observes x itself: u = z, rho = 1). With a = Phi^-1(r1),
b = Phi^-1(1 - r2), Z = 1 - r1 - r2, (m, v) = (m_sel, v_sel) of Eq. 7-8 and W = clamp(z, a, b), every
statistic is, to first order in 1/N, a mean of an influence function (the empirical r1 and 1 - r2 quantiles
move with the sample, which is what the clamp accounts for):

    xbar            = mu + s A,            A = mean_N z
    mean(selected)  = mu + s (m + B),      B = mean_N (W - E W) / Z
    var(selected)   = V_P (v + C),         C = mean_N ((W - m)^2 - E (W - m)^2) / Z       (ML variance)
    mean(measured)  = mu + sqrt(V_obs) D,  D = mean_n u
    s^2(measured)   = V_obs (1 + E),       E = mean_n (u^2 - 1)   (Var E = 2 / (n - 1) exactly)

so xi = (A, B, C, D, E) has covariance Q with Cov(f, g) = E[f g] / N for a pair involving a population
statistic (the n measured are among the N) and E[f g] / n for D, E. The needed E[W^k z^j] are closed
forms: E[W^k z^j] = M_{k+j}(a, b) + a^k T^-_j(a) + b^k T^+_j(b) with the partial normal moments
M_k(a, b) = int_a^b z^k phi = (k - 1) M_{k-2} + a^{k-1} phi(a) - b^{k-1} phi(b) (M_0 = Z, M_1 = phi(a) - phi(b)),
T^-_0 = r1, T^-_1 = -phi(a), T^-_2 = r1 - a phi(a), T^+_0 = r2, T^+_1 = phi(b), T^+_2 = r2 + b phi(b).
(Q_AB = 1 / N since E[z W] = Z.)

Propagation. The chain's next state (qtm.montecarlo, MODEL.md section 5) is
mu' = xbar + h2 (mean(selected) - xbar), V' = var(selected) [+ V_M], i.e.

    mu_{k+1} = f_mu(mu_k, V_k) + s (1 - h2) A_k + h2 s B_k,      V_{k+1} = f_V(mu_k, V_k) + V_P C_k,

with f the recursion step (qtm.recursion.step). Linearized around the recursion's trajectory, the deviation
delta_k = (mu_k, V_k) - trajectory_k obeys delta_0 = 0 (iteration 0's distribution is the parameters) and

    delta_{k+1} = J_k delta_k + G_k xi_k,    J_k = d step / d state (jax.jacfwd), G_k = [[s(1-h2), h2 s, 0, 0, 0],
                                                                                     [0, 0, V_P, 0, 0]],

and the observed residuals e_k = (xbar_k - mu_k, s^2_k - V_obs,k) = delta_k + L_k xi_k, L_k = [[0, 0, 0,
sqrt(V_obs), 0], [0, 0, 0, 0, V_obs]], all evaluated on the recursion's trajectory. Unrolled, e = M xi with M
block lower-triangular, so

    Sigma = Cov(e) = sum_j M_{., j} Q_j M_{., j}^T      (2(K+1) x 2(K+1); not diagonal: the drift is a
                                                          random walk and e_k shares xi_k with delta_{k+1}).

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
from jax.scipy.special import ndtri

from qtm.params import PARAM_NAMES, TraitParams
from qtm.recursion import TraitState, step
from qtm.selection import selection_moments

_LOG_SQRT_2PI = 0.9189385332046727


MIN_SELECTED = 10.0             # selected individuals per iteration below which the expansion is not used
MIN_SELECTED_FRACTION = 1e-3    # 1 - r1 - r2 below which the closed-form moments lose their digits


def _phi(z):
    return jnp.exp(-0.5 * z * z - _LOG_SQRT_2PI)


def clamp_expectations(r1, r2):
    """E[W^k z^j] for k = 0..4, j = 0..2 (array (5, 3)) with W = clamp(z, a, b), z ~ N(0, 1) (module
    docstring), and (a, b, Z). Finite at r1 = 0 or r2 = 0 (a = -inf, b = +inf: the tail terms vanish)."""
    r1 = jnp.asarray(r1, jnp.float64)
    r2 = jnp.asarray(r2, jnp.float64)
    has_left, has_right = r1 > 0, r2 > 0
    a = jnp.where(has_left, ndtri(jnp.where(has_left, r1, 0.5)), 0.0)
    b = jnp.where(has_right, -ndtri(jnp.where(has_right, r2, 0.5)), 0.0)
    phi_a = jnp.where(has_left, _phi(a), 0.0)
    phi_b = jnp.where(has_right, _phi(b), 0.0)
    z = 1.0 - r1 - r2
    m = [z, phi_a - phi_b]
    for k in range(2, 7):
        m.append((k - 1) * m[k - 2] + a ** (k - 1) * phi_a - b ** (k - 1) * phi_b)
    t_lo = [r1, -phi_a, r1 - a * phi_a]
    t_hi = [r2, phi_b, r2 + b * phi_b]
    table = jnp.stack([jnp.stack([m[k + j] + a ** k * t_lo[j] + b ** k * t_hi[j] for j in range(3)])
                       for k in range(5)])
    return table, a, b, z


def noise_covariance(r1, r2, rho, population, num_images):
    """Covariance Q (5, 5) of xi = (A, B, C, D, E) of one iteration (module docstring).

    rho: V_G / V_P (genetic values observed) or 1 (phenotypes observed); population N; num_images n >= 2."""
    e, _, _, z = clamp_expectations(r1, r2)
    m, _ = selection_moments(r1, r2, jnp.inf)
    ew = e[1, 0]
    ep = e[2, 0] - 2 * m * e[1, 0] + m * m                           # E (W - m)^2
    var_w = e[2, 0] - ew * ew
    cov_wp = e[3, 0] - 2 * m * e[2, 0] + m * m * e[1, 0] - ew * ep
    ep2 = e[4, 0] - 4 * m * e[3, 0] + 6 * m * m * e[2, 0] - 4 * m ** 3 * e[1, 0] + m ** 4
    var_p = ep2 - ep * ep
    ez_w = e[1, 1]                                                   # = Z
    ez_p = e[2, 1] - 2 * m * e[1, 1]
    cov_z2_w = e[1, 2] - ew
    cov_z2_p = e[2, 2] - 2 * m * e[1, 2] + m * m - ep
    sr = jnp.sqrt(rho)
    big, small = 1.0 / population, 1.0 / num_images
    aa, ab, ac = big, ez_w / z * big, ez_p / z * big
    bb, bc, cc = var_w / z ** 2 * big, cov_wp / z ** 2 * big, var_p / z ** 2 * big
    da, db, dc, dd = sr * aa, sr * ab, sr * ac, small
    ea, eb, ec, ee = 0.0 * big, rho * cov_z2_w / z * big, rho * cov_z2_p / z * big, 2.0 / (num_images - 1.0)
    rows = [[aa, ab, ac, da, ea], [ab, bb, bc, db, eb], [ac, bc, cc, dc, ec], [da, db, dc, dd, 0.0 * big],
            [ea, eb, ec, 0.0 * big, ee]]
    return jnp.stack([jnp.stack([jnp.asarray(x, jnp.float64) for x in row]) for row in rows])


def _params_row(row, mutation_mode: str) -> TraitParams:
    return TraitParams(*[row[i] for i in range(len(PARAM_NAMES))], mutation_mode=mutation_mode)


def residual_covariance(row, num_iterations: int, population, num_images, *, mutation_mode: str = "paper",
                        variance: str = "genetic"):
    """Sigma (2(K+1), 2(K+1)) of the residuals (xbar_0 - mu_0, s2_0 - V_0, xbar_1 - mu_1, ...) of one
    condition (module docstring), its trajectory's (mean, V_obs) (K+1,) each.

    row: natural parameters (7,) in PARAM_NAMES order (hard truncation: tail_rate is not used);
    population, num_images: (K+1,) N_k and n_k (n_k >= 2 where the variance is used)."""
    from qtm.recursion import trajectory

    params = _params_row(row, mutation_mode)
    traj = trajectory(params, num_iterations)
    moments = selection_moments(params.r1, params.r2, jnp.inf)
    var_obs = traj.var_genetic if variance == "genetic" else traj.var_phenotype
    rho = traj.var_genetic / traj.var_phenotype if variance == "genetic" else jnp.ones_like(traj.mean)
    q = jax.vmap(lambda r, big, small: noise_covariance(params.r1, params.r2, r, big, small))(
        rho, population, num_images)                                   # (K+1, 5, 5)

    def next_state(s):
        new, _ = step(TraitState(s[0], s[1]), params, moments)
        return jnp.stack([new.mean, new.var_genetic])

    states = jnp.stack([traj.mean, traj.var_genetic], axis=-1)
    jac = jax.vmap(jax.jacfwd(next_state))(states)                     # (K+1, 2, 2)
    sd = jnp.sqrt(traj.var_phenotype)
    h2 = traj.heritability
    zero = jnp.zeros_like(sd)
    g = jnp.stack([jnp.stack([sd * (1 - h2), h2 * sd, zero, zero, zero], -1),
                   jnp.stack([zero, zero, traj.var_phenotype, zero, zero], -1)], -2)   # (K+1, 2, 5)
    l_obs = jnp.stack([jnp.stack([zero, zero, zero, jnp.sqrt(var_obs), zero], -1),
                       jnp.stack([zero, zero, zero, zero, var_obs], -1)], -2)          # (K+1, 2, 5)
    k1 = num_iterations + 1
    eye = jnp.eye(k1)

    def body(sens, t):
        # sens (2, K+1, 5): d delta_t / d xi_j; row of e_t adds L_t at block t
        rows = sens + l_obs[t][:, None, :] * eye[t][None, :, None]
        sens = jnp.einsum("ab,bjk->ajk", jac[t], sens) + g[t][:, None, :] * eye[t][None, :, None]
        return sens, rows

    _, rows = jax.lax.scan(body, jnp.zeros((2, k1, 5)), jnp.arange(k1))   # (K+1, 2, K+1, 5)
    sigma = jnp.einsum("tajk,jkl,ubjl->taub", rows, q, rows).reshape(2 * k1, 2 * k1)
    return sigma, traj.mean, var_obs


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
