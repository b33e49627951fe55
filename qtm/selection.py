"""Moments of the selected phenotypes, standardized (docs/model.md section 2; Eq. 7-8, Appendix D.2.3).

With z = (x - mu_t) / sqrt(V_P,t) ~ N(0, 1), selection keeps z with weight w(z): 1 inside the window
[a, b], a = Phi^-1(r1), b = Phi^-1(1 - r2), and exp(-lambda * distance) outside it (lambda = `tail_rate`;
lambda = inf is hard truncation). `selection_moments` returns the mean m_sel and variance v_sel of the
selected z.

Numerics (float64). a = ndtri(r1) and b = -ndtri(r2) (not ndtri(1 - r2), which loses digits at tiny r2);
Z = Phi(b) - Phi(a) is taken as 1 - r1 - r2 exactly. A soft tail is written through the Mills ratio
R(x) = (1 - Phi(x)) / phi(x): the identity phi(z) e^{lambda z} = e^{lambda^2 / 2} phi(z - lambda) of docs/model.md
turns the left tail's mass e^{-lambda a + lambda^2/2} Phi(a - lambda) into phi(a) R(lambda - a), so no
e^{lambda^2/2} is ever formed. R is evaluated as exp(log_ndtr(-x) - log phi(x)) for x < 0 and through
erfcx for 0 <= x < 30 (both exact in float64), and by its asymptotic series in u = 1/x for x >= 30, where
the series converges to rounding and, unlike any difference of large terms, keeps the lambda -> inf limit
and the derivatives in lambda accurate up to lambda = 1e6 and beyond. Every branch that is not taken is
evaluated at a harmless input ("double where"), so gradients are finite at r1 = 0, r2 = 0 and
tail_rate = inf. At r1 = 0 exactly the true derivative in r1 diverges (like sqrt(2 log(1 / r1))); there the
gradient returned is that of the formula with the tail removed, which is finite.

Hard truncation known at trace time (`tail_rate` a Python number or a concrete array, +inf everywhere, as
in `hard_moments` and every caller that fixes lambda = inf) skips the soft tails altogether: the result is
the same to rounding (the tails' terms are exactly 0 there) and the compiled program is about half the size.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import erfcx, log_ndtr, ndtri

from qtm.params import require_x64

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
_SQRT_HALF_PI = math.sqrt(0.5 * math.pi)
_SERIES_FROM = 30.0
# R(x) ~ (1/x) sum_k (-1)^k (2k-1)!! / x^(2k): at x >= 30 the k = 11 term is below 1e-20 of the sum.
_MILLS_SERIES = tuple((-1.0) ** k * math.prod(range(1, 2 * k, 2)) for k in range(12))


def _phi(z: jax.Array) -> jax.Array:
    return jnp.exp(-0.5 * z * z - _LOG_SQRT_2PI)


def normal_pdf(z: jax.Array) -> jax.Array:
    """phi(z), the standard normal density (0 at z = +-inf)."""
    return _phi(z)


def selection_window(r1, r2) -> tuple[jax.Array, jax.Array]:
    """The edges (a, b) of the selection window in standardized units (docs/model.md section 2), float64:

        a = Phi^-1(r1)   (-inf when r1 = 0),      b = Phi^-1(1 - r2) = -Phi^-1(r2)   (+inf when r2 = 0).

    b is computed as -ndtri(r2), not ndtri(1 - r2), which loses digits at tiny r2. Every caller (the
    recursion's moments, the Monte Carlo's soft weights, the finite-population covariance) takes the edges
    from here. Broadcasts; under grad the derivative is finite and the untaken branch is evaluated at a
    harmless 0.5 ("double where")."""
    require_x64()
    r1 = jnp.asarray(r1, jnp.float64)
    r2 = jnp.asarray(r2, jnp.float64)
    a = jnp.where(r1 > 0.0, ndtri(jnp.where(r1 > 0.0, r1, 0.5)), -jnp.inf)
    b = jnp.where(r2 > 0.0, -ndtri(jnp.where(r2 > 0.0, r2, 0.5)), jnp.inf)
    return a, b


def finite_edges(r1, r2) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(a, b, phi(a), phi(b)) of `selection_window` with an infinite edge replaced by the placeholder 0 and
    its density by 0, so that products such as a phi(a) (which vanish at an infinite edge) stay finite."""
    a, b = selection_window(r1, r2)
    has_left, has_right = jnp.isfinite(a), jnp.isfinite(b)
    a = jnp.where(has_left, a, 0.0)
    b = jnp.where(has_right, b, 0.0)
    return a, b, jnp.where(has_left, _phi(a), 0.0), jnp.where(has_right, _phi(b), 0.0)


def _mills_and_g(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mills ratio R(x) = (1 - Phi(x)) / phi(x) and g(x) = x R(x) - 1, accurate for every real x.

    g is formed directly (not as a difference) in the asymptotic branch, where x R(x) -> 1.
    """
    small = x < _SERIES_FROM
    x_lo = jnp.where(small, x, 0.0)
    x_hi = jnp.where(small, _SERIES_FROM, x)
    # x < 0: log-space from log_ndtr; 0 <= x < 30: erfcx (scaled complementary error function).
    neg = x_lo < 0.0
    x_neg = jnp.where(neg, x_lo, -1.0)
    x_pos = jnp.where(neg, 0.0, x_lo)
    r_neg = jnp.exp(log_ndtr(-x_neg) + 0.5 * x_neg * x_neg + _LOG_SQRT_2PI)
    r_pos = _SQRT_HALF_PI * erfcx(x_pos / math.sqrt(2.0))
    r_lo = jnp.where(neg, r_neg, r_pos)
    g_lo = x_lo * r_lo - 1.0
    # x >= 30: R = u (1 + s), g = s with s = sum_{k>=1} c_k u^(2k), u = 1 / x.
    u2 = 1.0 / (x_hi * x_hi)
    s = jnp.zeros_like(u2)
    for c in reversed(_MILLS_SERIES[1:]):
        s = (s + c) * u2
    r_hi = (1.0 + s) / x_hi
    return jnp.where(small, r_lo, r_hi), jnp.where(small, g_lo, s)


def _left_tail(a: jax.Array, phi_a: jax.Array, lam: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Raw moments (mass, first, second) of phi(z) exp(-lam (a - z)) over z < a (docs/model.md section 2).

    mass = e^{-lam a + lam^2/2} Phi(c), c = a - lam, = phi(a) R(x) with x = lam - a;
    first = e^{..} (lam Phi(c) - phi(c)) = phi(a) (g(x) + a R(x));
    second = e^{..} ((1 + lam^2) Phi(c) - (a + lam) phi(c)) = phi(a) ((1 + a^2) R(x) + (lam + a) g(x)).
    """
    r, g = _mills_and_g(lam - a)
    return phi_a * r, phi_a * (g + a * r), phi_a * ((1.0 + a * a) * r + (lam + a) * g)


def is_hard_truncation(tail_rate) -> bool:
    """Whether `tail_rate` is known at trace time to be +inf everywhere (a Python number or a concrete
    array, not a traced value): hard truncation that the compiled program need not decide at run time."""
    if isinstance(tail_rate, jax.core.Tracer):
        return False
    return bool(np.all(np.isposinf(np.asarray(tail_rate))))


def _window_moments(r1, r2, a, b, phi_a, phi_b) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Raw moments (mass, first, second) of the standard normal over the window [a, b], given its
    `finite_edges` (a phi(a) = 0 when a = -inf): Z = 1 - r1 - r2, phi(a) - phi(b), Z + a phi(a) - b phi(b)."""
    z = 1.0 - r1 - r2
    return z, phi_a - phi_b, z + a * phi_a - b * phi_b


def hard_moments(r1, r2) -> tuple[jax.Array, jax.Array]:
    """Mean and variance of N(0, 1) truncated to [Phi^-1(r1), Phi^-1(1 - r2)] (Eq. 7 and Eq. 8).

    m_sel = (phi(a) - phi(b)) / Z,  v_sel = 1 + (a phi(a) - b phi(b)) / Z - m_sel^2,  Z = 1 - r1 - r2.
    """
    return selection_moments(r1, r2, jnp.inf)


def selection_moments(r1, r2, tail_rate) -> tuple[jax.Array, jax.Array]:
    """Standardized mean and variance (m_sel, v_sel) of the selected phenotypes (docs/model.md section 2).

    tail_rate = inf gives the truncated normal of Eq. 7-8 exactly; a finite tail_rate > 0 gives the soft
    exponential tails of Appendix D.2.3 in closed form (window moments plus the two tails' moments, over
    the total mass). Broadcasts over its arguments; works under jit, vmap and grad with finite gradients
    (see the module docstring for the numerics and the r = 0 boundary).
    """
    require_x64()
    if is_hard_truncation(tail_rate):
        r1, r2 = jnp.broadcast_arrays(jnp.asarray(r1, jnp.float64), jnp.asarray(r2, jnp.float64),
                                      jnp.zeros(np.shape(tail_rate)))[:2]
        m0, m1, m2 = _window_moments(r1, r2, *finite_edges(r1, r2))
        m_sel = m1 / m0
        return m_sel, m2 / m0 - m_sel * m_sel
    r1, r2, lam = jnp.broadcast_arrays(jnp.asarray(r1, jnp.float64), jnp.asarray(r2, jnp.float64),
                                       jnp.asarray(tail_rate, jnp.float64))
    a, b, phi_a, phi_b = finite_edges(r1, r2)   # an infinite edge is the placeholder 0 with phi = 0
    m0, m1, m2 = _window_moments(r1, r2, a, b, phi_a, phi_b)

    soft = jnp.isfinite(lam)
    lam_s = jnp.where(soft, lam, 1.0)
    l0, l1, l2 = _left_tail(a, phi_a, lam_s)
    q0, q1, q2 = _left_tail(-b, phi_b, lam_s)   # the right tail is the mirror image z -> -z, a -> -b
    t0 = jnp.where(soft, l0 + q0, 0.0)
    t1 = jnp.where(soft, l1 - q1, 0.0)
    t2 = jnp.where(soft, l2 + q2, 0.0)

    total = m0 + t0
    m_sel = (m1 + t1) / total
    v_sel = (m2 + t2) / total - m_sel * m_sel
    return m_sel, v_sel
