"""Finite-population covariance of a chain: the first-order law of its random drift (docs/model.md section 5).

This is the analytic counterpart of `qtm.montecarlo` (tests/test_fit_drift.py checks it against the
Monte Carlo's replicates); `fitting.drift` turns it into a likelihood.

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

Propagation. The chain's next state (qtm.montecarlo, docs/model.md section 5) is
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
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from qtm.params import PARAM_NAMES, TraitParams
from qtm.recursion import TraitState, step, trajectory
from qtm.selection import finite_edges, selection_moments, selection_window


def clamp_expectations(r1, r2):
    """E[W^k z^j] for k = 0..4, j = 0..2 (array (5, 3)) with W = clamp(z, a, b), z ~ N(0, 1) (module
    docstring), and (a, b, Z). Finite at r1 = 0 or r2 = 0 (a = -inf, b = +inf: the tail terms vanish)."""
    r1 = jnp.asarray(r1, jnp.float64)
    r2 = jnp.asarray(r2, jnp.float64)
    a, b, phi_a, phi_b = finite_edges(r1, r2)     # an infinite edge: placeholder 0 with phi = 0
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
    """TraitParams of a natural row (7,) with hard truncation (tail_rate = inf as a constant, whatever the
    row holds: the expansion is derived for hard truncation only)."""
    values = [row[i] for i in range(len(PARAM_NAMES))]
    values[PARAM_NAMES.index("tail_rate")] = math.inf
    return TraitParams(*values, mutation_mode=mutation_mode)


def residual_sensitivities(row, num_iterations: int, population, num_images, *, mutation_mode: str = "paper",
                           variance: str = "genetic"):
    """The pieces of Sigma of one condition (module docstring): rows (K+1, 2, K+1, 5) = d e_t / d xi_j,
    the per-iteration noise covariances q (K+1, 5, 5), the trajectory's mean and V_obs (K+1,) each, and
    rho (K+1,). Arguments as `residual_covariance`."""
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
    return rows, q, traj.mean, var_obs, rho


@functools.partial(jax.jit, static_argnames=("num_iterations", "mutation_mode", "variance"))
def residual_covariance(row, num_iterations: int, population, num_images, *, mutation_mode: str = "paper",
                        variance: str = "genetic"):
    """Sigma (2(K+1), 2(K+1)) of the residuals (xbar_0 - mu_0, s2_0 - V_0, xbar_1 - mu_1, ...) of one
    condition (module docstring), its trajectory's (mean, V_obs) (K+1,) each.

    row: natural parameters (7,) in PARAM_NAMES order (hard truncation: tail_rate is not used);
    population, num_images: (K+1,) N_k and n_k (n_k >= 2 where the variance is used)."""
    rows, q, mean, var_obs, _ = residual_sensitivities(row, num_iterations, population, num_images,
                                                       mutation_mode=mutation_mode, variance=variance)
    k1 = num_iterations + 1
    sigma = jnp.einsum("tajk,jkl,ubjl->taub", rows, q, rows).reshape(2 * k1, 2 * k1)
    return sigma, mean, var_obs


@functools.partial(jax.jit, static_argnames=("num_iterations", "mutation_mode", "variance"))
def shared_origin_covariance(table, num_iterations: int, population, num_images, *,
                             mutation_mode: str = "paper", variance: str = "genetic"):
    """Sigma of the residuals of ALL conditions that start from one D_0 (docs/model.md section 5), in the
    order (iteration 0's mean and variance residual, once), then per condition c its iterations 1..K
    (xbar - mu, s^2 - V_obs): a (2 + 2 C K) square matrix, with the trajectories' means and V_obs (C, K+1).

    Every condition's iteration 0 is the same sample, so its noise xi_0 is shared: A (the sample mean of z),
    D and E (the measured values) are the same numbers for all conditions, and B_c, C_c are means of the same
    z clamped to each condition's window (`shared_origin_noise_covariance`). The noise of iterations >= 1 is
    each condition's own. With e_{c,t} = sum_j R_{c,t,j} xi_{c,j} (`residual_sensitivities`),

        Cov(e_{c,t}, e_{d,s}) = R_{c,t,0} Cov(xi_{c,0}, xi_{d,0}) R_{d,s,0}^T
                                + [c = d] sum_{j >= 1} R_{c,t,j} Q_{c,j} R_{c,s,j}^T.

    Iteration 0's residual e_0 = L_0 xi_0 involves only D and E; condition 0's row supplies its trajectory
    (iteration 0's parameters are shared: mu0, sigma_g0 and sigma_env of one D_0).
    table: (C, 7) natural parameters; population, num_images: (C, K+1)."""
    num_c = table.shape[0]
    k = num_iterations
    rows, q, mean, var_obs, rho = jax.vmap(lambda row, big, small: residual_sensitivities(
        row, k, big, small, mutation_mode=mutation_mode, variance=variance))(table, population, num_images)
    # rows (C, K+1, 2, K+1, 5); q (C, K+1, 5, 5)
    pair = jax.vmap(lambda c: jax.vmap(lambda d: shared_origin_noise_covariance(
        table[c, 0], table[c, 1], table[d, 0], table[d, 1], rho[0, 0], population[0, 0],
        num_images[0, 0]))(jnp.arange(num_c)))(jnp.arange(num_c))                     # (C, C, 5, 5)
    first = rows[:, :, :, 0, :]                                                          # (C, K+1, 2, 5)
    own = jnp.einsum("ctajk,cjkl,csbjl->ctasb", rows[:, :, :, 1:, :], q[:, 1:], rows[:, :, :, 1:, :])
    shared = jnp.einsum("ctak,cdkl,dsbl->ctadsb", first, pair, first)                    # (C,K+1,2,C,K+1,2)
    eye = jnp.eye(num_c)
    full = shared + own[:, :, :, None, :, :] * eye[:, None, None, :, None, None]
    later = full[:, 1:, :, :, 1:, :].reshape(num_c * 2 * k, num_c * 2 * k)
    zero_zero = full[0, 0, :, 0, 0, :]                                                   # (2, 2)
    zero_later = full[0, 0, :, :, 1:, :].reshape(2, num_c * 2 * k)
    sigma = jnp.block([[zero_zero, zero_later], [zero_later.T, later]])
    return sigma, mean, var_obs


# ------------------------------------------------------------------------------ conditions sharing one D_0

def _segment_moments(lo, hi, degree: int = 4):
    """M_k(lo, hi) = int_lo^hi z^k phi(z) dz for k = 0..degree (module docstring's recursion), finite at
    infinite ends (z^k phi(z) -> 0 there)."""
    from jax.scipy.special import ndtr

    def ends(t):
        finite = jnp.isfinite(t)
        safe = jnp.where(finite, t, 0.0)
        return safe, jnp.where(finite, jnp.exp(-0.5 * safe * safe) / jnp.sqrt(2.0 * jnp.pi), 0.0)

    lo_s, phi_lo = ends(lo)
    hi_s, phi_hi = ends(hi)
    m = [ndtr(hi) - ndtr(lo), phi_lo - phi_hi]
    for k in range(2, degree + 1):
        m.append((k - 1) * m[k - 2] + lo_s ** (k - 1) * phi_lo - hi_s ** (k - 1) * phi_hi)
    return jnp.stack(m)


def clamp_pair_expectations(r1_c, r2_c, shift_c, r1_d, r2_d, shift_d):
    """E[(W_c - shift_c)^i (W_d - shift_d)^j] for i, j = 0..2 (array (3, 3)), where W_c = clamp(z, a_c, b_c)
    and W_d = clamp(z, a_d, b_d) clamp the SAME z ~ N(0, 1) to two windows (two conditions selecting from
    one D_0). On each segment between the sorted edges every clamp is a constant or z itself, so the
    product is a polynomial of degree <= 4 in z, integrated with the partial moments M_k."""
    a_c, b_c = selection_window(jnp.asarray(r1_c, jnp.float64), jnp.asarray(r2_c, jnp.float64))
    a_d, b_d = selection_window(jnp.asarray(r1_d, jnp.float64), jnp.asarray(r2_d, jnp.float64))
    edges = jnp.sort(jnp.stack([a_c, b_c, a_d, b_d]))
    lows = jnp.concatenate([jnp.array([-jnp.inf]), edges])
    highs = jnp.concatenate([edges, jnp.array([jnp.inf])])

    def linear(t, a, b, shift):
        # W - shift = alpha + beta z on the segment containing t
        a_s = jnp.where(jnp.isfinite(a), a, 0.0)
        b_s = jnp.where(jnp.isfinite(b), b, 0.0)
        below, above = t < a, t > b
        alpha = jnp.where(below, a_s, jnp.where(above, b_s, 0.0)) - shift
        beta = jnp.where(below | above, 0.0, 1.0)
        return jnp.stack([alpha, beta])

    def powers(p):
        # coefficients (3, 3) of (alpha + beta z)^i in 1, z, z^2, for i = 0, 1, 2
        alpha, beta = p[0], p[1]
        one, zero = jnp.ones_like(alpha), jnp.zeros_like(alpha)
        return jnp.stack([jnp.stack([one, zero, zero]), jnp.stack([alpha, beta, zero]),
                          jnp.stack([alpha * alpha, 2.0 * alpha * beta, beta * beta])])

    def segment(lo, hi):
        finite_lo, finite_hi = jnp.isfinite(lo), jnp.isfinite(hi)
        lo_s, hi_s = jnp.where(finite_lo, lo, 0.0), jnp.where(finite_hi, hi, 0.0)
        t = jnp.where(finite_lo & finite_hi, 0.5 * (lo_s + hi_s),
                      jnp.where(finite_hi, hi_s - 1.0, jnp.where(finite_lo, lo_s + 1.0, 0.0)))
        pc = powers(linear(t, a_c, b_c, shift_c))
        pd = powers(linear(t, a_d, b_d, shift_d))
        moments = _segment_moments(lo, jnp.maximum(hi, lo))
        hankel = moments[jnp.arange(3)[:, None] + jnp.arange(3)[None, :]]     # M_{m+n}
        return pc @ hankel @ pd.T       # sum_{m,n} pc[i, m] pd[j, n] M_{m+n}

    return jnp.sum(jax.vmap(segment)(lows, highs), axis=0)


def _shift_matrix(m):
    """S (3, 3) with (W - m)^i = sum_k S_ik W^k for i = 0, 1, 2."""
    one, zero = jnp.ones_like(m), jnp.zeros_like(m)
    return jnp.stack([jnp.stack([one, zero, zero]), jnp.stack([-m, one, zero]),
                      jnp.stack([m * m, -2.0 * m, one])])


def shared_origin_noise_covariance(r1_c, r2_c, r1_d, r2_d, rho, population, num_images):
    """Cov(xi_c, xi_d) (5, 5) of iteration 0's noise xi = (A, B, C, D, E) (module docstring) of two
    conditions c, d that select from the same D_0 of `population` individuals, `num_images` of them
    measured: A, D and E are the same numbers for both (one sample), B and C are means over the same z
    clamped to two windows. Equals `noise_covariance` when the two windows are equal."""
    m_c, _ = selection_moments(r1_c, r2_c, jnp.inf)
    m_d, _ = selection_moments(r1_d, r2_d, jnp.inf)
    z_c = 1.0 - r1_c - r2_c
    z_d = 1.0 - r1_d - r2_d
    e_cd = clamp_pair_expectations(r1_c, r2_c, 0.0, r1_d, r2_d, 0.0)         # E[W_c^i W_d^j]
    # (W - m)^i = sum_k binom(i, k) (-m)^(i-k) W^k, i <= 2: the shifted moments from the raw ones
    to_c, to_d = _shift_matrix(m_c), _shift_matrix(m_d)
    p_cd = to_c @ e_cd @ to_d.T                                               # E[(W_c-m_c)^i (W_d-m_d)^j]
    w_cp = e_cd @ to_d.T                                                      # E[W_c^i (W_d-m_d)^j]
    p_cw = to_c @ e_cd                                                        # E[(W_c-m_c)^i W_d^j]
    e_c, _, _, _ = clamp_expectations(r1_c, r2_c)                             # E[W_c^k z^j]
    e_d, _, _, _ = clamp_expectations(r1_d, r2_d)
    big, small = 1.0 / population, 1.0 / num_images
    sr = jnp.sqrt(rho)

    def side(e, m, z):
        # E[z W], E[z (W - m)^2], Cov(z^2, W), Cov(z^2, (W - m)^2) of one condition
        ep = e[2, 0] - 2 * m * e[1, 0] + m * m
        return (e[1, 1] / z, (e[2, 1] - 2 * m * e[1, 1]) / z, (e[1, 2] - e[1, 0]) / z,
                (e[2, 2] - 2 * m * e[1, 2] + m * m - ep) / z)

    zw_c, zp_c, z2w_c, z2p_c = side(e_c, m_c, z_c)
    zw_d, zp_d, z2w_d, z2p_d = side(e_d, m_d, z_d)
    bb = (e_cd[1, 1] - e_cd[1, 0] * e_cd[0, 1]) / (z_c * z_d)
    bc = (w_cp[1, 2] - w_cp[1, 0] * w_cp[0, 2]) / (z_c * z_d)
    cb = (p_cw[2, 1] - p_cw[2, 0] * p_cw[0, 1]) / (z_c * z_d)
    cc = (p_cd[2, 2] - p_cd[2, 0] * p_cd[0, 2]) / (z_c * z_d)
    zero = 0.0 * big
    rows = [[big, zw_d * big, zp_d * big, sr * big, zero],
            [zw_c * big, bb * big, bc * big, sr * zw_c * big, rho * z2w_c * big],
            [zp_c * big, cb * big, cc * big, sr * zp_c * big, rho * z2p_c * big],
            [sr * big, sr * zw_d * big, sr * zp_d * big, small, zero],
            [zero, rho * z2w_d * big, rho * z2p_d * big, zero, 2.0 / (num_images - 1.0)]]
    return jnp.stack([jnp.stack([jnp.asarray(x, jnp.float64) for x in row]) for row in rows])
