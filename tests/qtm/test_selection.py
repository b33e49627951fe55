"""Selection moments (MODEL.md section 2) against scipy.stats.truncnorm, numerical quadrature, the
lambda -> inf asymptotics, and finite differences."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.special
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from qtm.selection import hard_moments, selection_moments


def _window(r1: float, r2: float) -> tuple[float, float]:
    a = scipy.special.ndtri(r1) if r1 > 0 else -np.inf
    b = -scipy.special.ndtri(r2) if r2 > 0 else np.inf
    return a, b


def _truncnorm_moments(r1: float, r2: float) -> tuple[float, float]:
    a, b = _window(r1, r2)
    m, v = scipy.stats.truncnorm.stats(a, b, moments="mv")
    return float(m), float(v)


def _quad_moments(r1: float, r2: float, lam: float) -> tuple[float, float]:
    """Moments of phi(z) w(z) by adaptive quadrature, straight from the definition of w."""
    a, b = _window(r1, r2)

    def weight(z: float) -> float:
        if z < a:
            return math.exp(-lam * (a - z))
        if z > b:
            return math.exp(-lam * (z - b))
        return 1.0

    edges = [-np.inf] + [e for e in (a, b) if np.isfinite(e)] + [np.inf]
    raw = []
    for k in range(3):
        raw.append(sum(
            scipy.integrate.quad(lambda z: z**k * weight(z) * scipy.stats.norm.pdf(z), lo, hi,
                                 epsabs=1e-14, epsrel=1e-12, limit=400)[0]
            for lo, hi in zip(edges[:-1], edges[1:])))
    m = raw[1] / raw[0]
    return m, raw[2] / raw[0] - m * m


HARD_CASES = [
    (0.025, 0.675), (0.5, 0.09), (0.95, 0.0002),      # the paper's three windows
    (0.0, 0.3), (0.3, 0.0), (0.0, 0.0),                # one-sided and no selection
    (1e-9, 0.0), (0.0, 1e-9), (1e-9, 1e-9),            # tiny tails
    (0.0, 1 - 1e-6), (1 - 1e-6, 0.0), (0.999, 0.0005),  # keep only a far tail / a narrow far window
    (0.2, 0.2), (0.45, 0.45),
]


@pytest.mark.parametrize(("r1", "r2"), HARD_CASES)
def test_hard_moments_match_truncnorm(r1, r2):
    m_ref, v_ref = _truncnorm_moments(r1, r2)
    m, v = hard_moments(r1, r2)
    np.testing.assert_allclose(float(m), m_ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(float(v), v_ref, rtol=1e-10, atol=1e-10)
    # tail_rate = inf is the same thing
    m_inf, v_inf = selection_moments(r1, r2, math.inf)
    assert float(m_inf) == float(m) and float(v_inf) == float(v)


@settings(max_examples=60, deadline=None)
@given(st.floats(0.0, 0.99), st.floats(0.0, 1.0))
def test_hard_moments_match_truncnorm_property(r1, frac):
    r2 = frac * (0.99 - r1)            # keeps Z = 1 - r1 - r2 >= 0.01
    m_ref, v_ref = _truncnorm_moments(r1, r2)
    m, v = hard_moments(r1, r2)
    np.testing.assert_allclose(float(m), m_ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(float(v), v_ref, rtol=1e-10, atol=1e-10)


SOFT_CASES = [
    (r1, r2, lam)
    for r1, r2 in [(0.025, 0.675), (0.95, 0.0002), (0.5, 0.09), (0.0, 0.3), (0.3, 0.0), (0.0, 0.0),
                   (1e-9, 0.2)]
    for lam in (1e-3, 0.1, 1.0, 10.0, 100.0)
]


@pytest.mark.parametrize(("r1", "r2", "lam"), SOFT_CASES)
def test_soft_moments_match_quadrature(r1, r2, lam):
    m_ref, v_ref = _quad_moments(r1, r2, lam)
    m, v = selection_moments(r1, r2, lam)
    np.testing.assert_allclose(float(m), m_ref, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(float(v), v_ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize(("r1", "r2"), [(0.025, 0.675), (0.95, 0.0002), (0.0, 0.3), (1e-9, 1e-9)])
def test_large_tail_rate_limit(r1, r2):
    """As lambda -> inf each soft tail becomes a point mass phi(edge) / lambda at its edge, so
    soft(lambda) = moments of (truncated normal + those point masses) + O(1 / lambda^2)."""
    a, b = _window(r1, r2)
    m_hard, v_hard = _truncnorm_moments(r1, r2)
    z = 1.0 - r1 - r2
    pa = scipy.stats.norm.pdf(a) if np.isfinite(a) else 0.0
    pb = scipy.stats.norm.pdf(b) if np.isfinite(b) else 0.0
    ea = a if np.isfinite(a) else 0.0
    eb = b if np.isfinite(b) else 0.0
    for lam in (1e3, 1e4, 1e5, 1e6):
        mass = z + (pa + pb) / lam
        m1 = z * m_hard + (pa * ea + pb * eb) / lam
        m2 = z * (v_hard + m_hard**2) + (pa * ea**2 + pb * eb**2) / lam
        m_ref = m1 / mass
        v_ref = m2 / mass - m_ref**2
        m, v = selection_moments(r1, r2, lam)
        tol = 20.0 / lam**2 + 1e-13
        assert abs(float(m) - m_ref) < tol, (lam, float(m), m_ref)
        assert abs(float(v) - v_ref) < tol, (lam, float(v), v_ref)
    for lam in (1e12, 1e15, 1e300):  # far past the supported range: still the hard limit, no overflow
        m, v = selection_moments(r1, r2, lam)
        np.testing.assert_allclose([float(m), float(v)], [m_hard, v_hard], rtol=1e-10, atol=1e-10)


def test_stable_over_the_whole_range():
    rs = [0.0, 1e-9, 1e-4, 0.025, 0.3, 0.675]
    lams = [1e-3, 1e-1, 1.0, 10.0, 1e3, 1e6, math.inf]
    grid = np.array([(r1, r2, lam) for r1 in rs for r2 in rs for lam in lams if r1 + r2 < 1])
    m, v = jax.jit(selection_moments)(grid[:, 0], grid[:, 1], grid[:, 2])
    assert np.all(np.isfinite(m)) and np.all(np.isfinite(v))
    # log-concave selection of a normal can only shrink the variance (Brascamp-Lieb): 0 < v <= 1
    assert np.all(np.asarray(v) > 0) and np.all(np.asarray(v) <= 1 + 1e-12)
    grads = jax.vmap(jax.jacfwd(lambda x: jnp.stack(selection_moments(x[0], x[1], x[2]))))(jnp.asarray(grid))
    assert np.all(np.isfinite(grads))
    grads_rev = jax.vmap(jax.grad(lambda x: selection_moments(x[0], x[1], x[2])[1]))(jnp.asarray(grid))
    assert np.all(np.isfinite(grads_rev))


def _central_difference(fn, x: np.ndarray, i: int, h: float) -> np.ndarray:
    up, down = x.copy(), x.copy()
    up[i] += h
    down[i] -= h
    return (np.asarray(fn(up)) - np.asarray(fn(down))) / (2 * h)


GRAD_CASES = [
    (0.025, 0.675, math.inf), (0.95, 0.0002, math.inf), (0.3, 0.0, math.inf), (1e-6, 0.2, math.inf),
    (0.025, 0.675, 0.1), (0.95, 0.0002, 1.0), (0.5, 0.09, 10.0), (0.0, 0.3, 0.5), (0.2, 0.1, 1e3),
]


@pytest.mark.parametrize(("r1", "r2", "lam"), GRAD_CASES)
def test_gradients_match_finite_differences(r1, r2, lam):
    def moments(x):
        return jnp.stack(selection_moments(x[0], x[1], x[2]))

    x = np.array([r1, r2, lam])
    jac = np.asarray(jax.jacrev(moments)(jnp.asarray(x)))
    wrt = [i for i, val in enumerate(x) if val > 0 and np.isfinite(val)]
    for i in wrt:
        h = 1e-5 * x[i]
        fd = _central_difference(lambda y: moments(jnp.asarray(y)), x, i, h)
        np.testing.assert_allclose(jac[:, i], fd, rtol=2e-6, atol=1e-7 * max(1.0, abs(fd).max()))


def test_gradients_finite_at_boundaries_and_mixed_batches():
    r1 = jnp.array([0.0, 0.0, 0.025, 0.95])
    r2 = jnp.array([0.0, 0.3, 0.0, 0.0002])
    lam = jnp.array([math.inf, 0.1, math.inf, 1e6])

    def total(r1, r2, lam):
        m, v = selection_moments(r1, r2, lam)
        return jnp.sum(m) + jnp.sum(v)

    grads = jax.grad(total, argnums=(0, 1, 2))(r1, r2, lam)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
    # d/d lambda at lambda = inf is zero (hard truncation does not depend on lambda)
    assert float(grads[2][0]) == 0.0 and float(grads[2][2]) == 0.0


def test_tail_rate_gradient_at_large_lambda():
    """d m_sel / d lambda at large lambda, against the point-mass asymptotics' derivative
    -(pa (a - m) + pb (b - m)) / (Z lambda^2) (+ O(1 / lambda^3))."""
    r1, r2 = 0.95, 0.0002
    a, b = _window(r1, r2)
    m_hard, _ = _truncnorm_moments(r1, r2)
    z = 1.0 - r1 - r2
    pa, pb = scipy.stats.norm.pdf(a), scipy.stats.norm.pdf(b)
    for lam in (1e4, 1e6):
        g = float(jax.grad(lambda t: selection_moments(r1, r2, t)[0])(lam))
        ref = -(pa * (a - m_hard) + pb * (b - m_hard)) / (z * lam**2)
        np.testing.assert_allclose(g, ref, rtol=100.0 / lam)


def test_requires_float64():
    jax.config.update("jax_enable_x64", False)
    try:
        with pytest.raises(RuntimeError, match="jax_enable_x64"):
            selection_moments(0.1, 0.1, math.inf)
    finally:
        jax.config.update("jax_enable_x64", True)


def test_selection_window_edges_against_scipy():
    """a = Phi^-1(r1), b = Phi^-1(1 - r2) (MODEL.md section 2) against scipy, with the infinite edges."""
    import scipy.stats

    from qtm.selection import finite_edges, selection_window

    r1 = np.array([0.0, 0.025, 0.5, 0.95, 1e-12])
    r2 = np.array([0.3, 0.0, 0.09, 0.0002, 1e-12])
    a, b = (np.asarray(x) for x in selection_window(r1, r2))
    assert a[0] == -np.inf and b[1] == np.inf
    np.testing.assert_allclose(a[1:], scipy.stats.norm.ppf(r1[1:]), rtol=1e-13)
    np.testing.assert_allclose(b[[0, 2, 3, 4]], scipy.stats.norm.isf(r2[[0, 2, 3, 4]]), rtol=1e-13)
    fa, fb, pa, pb = (np.asarray(x) for x in finite_edges(r1, r2))
    assert fa[0] == 0.0 and pa[0] == 0.0 and fb[1] == 0.0 and pb[1] == 0.0
    np.testing.assert_allclose(pa[1:], scipy.stats.norm.pdf(a[1:]), rtol=1e-13)


def test_hard_truncation_known_at_trace_time_matches_the_traced_formula():
    """A tail_rate that is +inf when the program is traced takes the hard-truncation shortcut
    (`is_hard_truncation`); a traced inf goes through the general formula with its soft tails masked. Both
    must give the same moments and gradients to rounding (the two programs fuse differently), including at
    the r = 0 boundaries, and the recursion must follow whichever it is given."""
    from qtm.params import TraitParams
    from qtm.recursion import trajectory
    from qtm.selection import is_hard_truncation

    assert is_hard_truncation(math.inf) and is_hard_truncation(np.full(3, np.inf))
    assert not is_hard_truncation(0.1) and not is_hard_truncation(np.array([np.inf, 0.1]))
    r1 = jnp.array([0.025, 0.5, 0.0, 0.3, 0.95])
    r2 = jnp.array([0.675, 0.09, 0.2, 0.0, 0.0002])

    def total(r1, r2, lam):
        m, v = selection_moments(r1, r2, lam)
        return jnp.sum(m + 2.0 * v), (m, v)

    static = jax.jit(jax.grad(lambda a, b: total(a, b, math.inf), argnums=(0, 1), has_aux=True))
    traced = jax.jit(jax.grad(total, argnums=(0, 1), has_aux=True))
    (g1s, g2s), (ms, vs) = static(r1, r2)
    (g1t, g2t), (mt, vt) = traced(r1, r2, jnp.inf)
    for x, y in ((ms, mt), (vs, vt), (g1s, g1t), (g2s, g2t)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(np.asarray(ms[:2]), [_truncnorm_moments(0.025, 0.675)[0],
                                                    _truncnorm_moments(0.5, 0.09)[0]], rtol=1e-12)

    params = TraitParams(r1=r1, r2=r2, sigma_env=0.2, sigma_g0=0.1, mu0=0.3)
    hard = trajectory(params, 4)
    soft_path = jax.jit(lambda lam: trajectory(TraitParams(r1=r1, r2=r2, tail_rate=lam, sigma_env=0.2,
                                                           sigma_g0=0.1, mu0=0.3), 4))(jnp.inf)
    np.testing.assert_allclose(np.asarray(hard.mean), np.asarray(soft_path.mean), rtol=1e-13)
    finite = jax.jit(lambda lam: trajectory(TraitParams(r1=r1, r2=r2, tail_rate=lam, sigma_env=0.2,
                                                        sigma_g0=0.1, mu0=0.3), 4))(1.0)
    assert np.all(np.abs(np.asarray(finite.mean) - np.asarray(hard.mean))[:, 1:] > 1e-6)
