"""The moment recursion (MODEL.md section 3) against Theorem 1, closed forms, and a plain-Python loop
written from the equations with scipy's truncated-normal moments."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats

from qtm.params import PARAM_NAMES, TraitParams
from qtm.recursion import asymptotes, theorem1_asymptotes, trajectory


def _truncnorm(r1: float, r2: float) -> tuple[float, float]:
    a = scipy.special.ndtri(r1) if r1 > 0 else -np.inf
    b = -scipy.special.ndtri(r2) if r2 > 0 else np.inf
    m, v = scipy.stats.truncnorm.stats(a, b, moments="mv")
    return float(m), float(v)


def _naive_trajectory(p: TraitParams, k: int) -> dict[str, np.ndarray]:
    """MODEL.md section 3, one line per equation, hard truncation via scipy."""
    m_sel, v_sel = _truncnorm(p.r1, p.r2)
    ve, vm = p.sigma_env**2, p.sigma_mut**2
    mu, vg = p.mu0, p.sigma_g0**2
    rows = []
    for _ in range(k + 1):
        vp = vg + ve
        s = math.sqrt(vp) * m_sel
        h2 = vg / (vp + vm) if p.mutation_mode == "paper" else vg / vp
        rows.append((mu, vg, vp, h2, s, h2 * s))
        mu = mu + h2 * s
        vg = vp * v_sel + (vm if p.mutation_mode == "additive" else 0.0)
    cols = np.array(rows).T
    return dict(zip(("mean", "var_genetic", "var_phenotype", "heritability", "selection_differential",
                     "response"), cols))


@pytest.mark.parametrize("mode", ["paper", "additive"])
@pytest.mark.parametrize("params", [
    dict(), dict(r1=0.95, r2=0.0002), dict(r1=0.5, r2=0.09, sigma_mut=0.1), dict(r1=0.0, r2=0.3, mu0=-1.0),
    dict(r1=0.2, r2=0.0, sigma_g0=0.5, sigma_env=0.1, sigma_mut=0.05),
])
def test_matches_naive_loop(mode, params):
    p = TraitParams(mutation_mode=mode, **params)
    ref = _naive_trajectory(p, 12)
    got = trajectory(p, 12)
    for name, values in ref.items():
        np.testing.assert_allclose(np.asarray(getattr(got, name)), values, rtol=1e-11, atol=1e-14,
                                   err_msg=name)


def test_theorem1_check_numbers():
    """MODEL.md section 3: r1 = 0.95, r2 = 0.0002, sigma_E = 0.25 -> drift 0.069496, V_P -> 0.071542."""
    tr = trajectory(TraitParams(r1=0.95, r2=0.0002, sigma_env=0.25), 80)
    assert abs(float(tr.mean[-1] - tr.mean[-2]) - 0.069496) < 5e-7
    assert abs(float(tr.var_phenotype[-1]) - 0.071542) < 5e-7
    asym = theorem1_asymptotes(0.95, 0.0002, 0.25)
    assert abs(asym["drift_per_iteration"] - 0.069496) < 5e-7
    assert abs(asym["var_phenotype_limit"] - 0.071542) < 5e-7


@pytest.mark.parametrize(("r1", "r2", "sigma_env"), [(0.025, 0.675, 0.25), (0.5, 0.09, 1.0), (0.3, 0.3, 0.5),
                                                     (0.0, 0.2, 2.0)])
def test_theorem1_asymptotes(r1, r2, sigma_env):
    m_sel, c2 = _truncnorm(r1, r2)
    c1 = abs(m_sel)
    drift = math.copysign(c1 * c2 * sigma_env / math.sqrt(1 - c2), m_sel)
    limit = sigma_env**2 / (1 - c2)
    tr = trajectory(TraitParams(r1=r1, r2=r2, sigma_env=sigma_env, sigma_g0=0.3), 150)
    np.testing.assert_allclose(float(tr.mean[-1] - tr.mean[-2]), drift, rtol=1e-9)
    np.testing.assert_allclose(float(tr.var_phenotype[-1]), limit, rtol=1e-10)
    np.testing.assert_allclose(float(tr.response[-1]), drift, rtol=1e-9)
    assert (drift > 0) == (r1 > r2)


@pytest.mark.parametrize(("r1", "r2"), [(0.025, 0.675), (0.95, 0.0002), (0.1, 0.0)])
def test_full_heritability_geometric_decay(r1, r2):
    """sigma_E = 0: h2 = 1, V_G,t = V_G,0 v_sel^t and mu_t = mu_0 + m_sel sigma_G,0 sum_{s<t} v_sel^(s/2)."""
    m_sel, v_sel = _truncnorm(r1, r2)
    k = 20
    tr = trajectory(TraitParams(r1=r1, r2=r2, sigma_env=0.0, sigma_g0=0.5, mu0=1.0), k)
    t = np.arange(k + 1)
    np.testing.assert_allclose(np.asarray(tr.heritability), 1.0, rtol=1e-15)
    np.testing.assert_allclose(np.asarray(tr.var_genetic), 0.25 * v_sel**t, rtol=1e-12)
    mean_ref = 1.0 + m_sel * 0.5 * np.concatenate([[0.0], np.cumsum(v_sel ** (t[:-1] / 2))])
    np.testing.assert_allclose(np.asarray(tr.mean), mean_ref, rtol=1e-12)


@pytest.mark.parametrize(("r1", "r2", "sigma_mut"), [(0.025, 0.675, 0.1), (0.95, 0.0002, 0.3), (0.0, 0.0, 0.2)])
def test_additive_mutation_fixed_point(r1, r2, sigma_mut):
    """V_G* = V_P* v_sel + V_M with V_P* = V_G* + V_E  =>  V_G* = (V_E v_sel + V_M) / (1 - v_sel)."""
    m_sel, v_sel = _truncnorm(r1, r2)
    ve, vm = 0.25**2, sigma_mut**2
    vg_star = (ve * v_sel + vm) / (1 - v_sel) if v_sel < 1 else None
    tr = trajectory(TraitParams(r1=r1, r2=r2, sigma_mut=sigma_mut, mutation_mode="additive"), 200)
    if vg_star is None:  # no selection: the whole V_P is passed on, V_G grows by V_E + V_M per iteration
        np.testing.assert_allclose(np.asarray(tr.var_genetic), 0.056**2 + (ve + vm) * np.arange(201),
                                   rtol=1e-12)
        return
    np.testing.assert_allclose(float(tr.var_genetic[-1]), vg_star, rtol=1e-10)
    vp_star = vg_star + ve
    np.testing.assert_allclose(float(tr.response[-1]), vg_star / vp_star * math.sqrt(vp_star) * m_sel,
                               rtol=1e-9)


@pytest.mark.parametrize("params", [
    TraitParams(r1=0.95, r2=0.0002), TraitParams(tail_rate=0.5), TraitParams(sigma_mut=0.2),
    TraitParams(r1=0.3, r2=0.1, sigma_mut=0.2, tail_rate=3.0, mutation_mode="additive"),
    TraitParams(sigma_env=0.0, sigma_g0=0.3),
])
def test_asymptotes_are_the_limit_of_the_recursion(params):
    """Closed-form limits (V_G*, V_P*, h2*, drift) against 400 iterations of the recursion."""
    lim = asymptotes(params)
    tr = trajectory(params, 400)
    np.testing.assert_allclose(float(tr.var_genetic[-1]), lim["var_genetic_limit"], rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(float(tr.var_phenotype[-1]), lim["var_phenotype_limit"], rtol=1e-9)
    np.testing.assert_allclose(float(tr.mean[-1] - tr.mean[-2]), lim["drift_per_iteration"], rtol=1e-8,
                               atol=1e-15)
    expected_kind = "Theorem 1" if math.isinf(params.tail_rate) and params.sigma_mut == 0 else "fixed point"
    assert lim["kind"].startswith(expected_kind)
    assert asymptotes(TraitParams(r1=0.0, r2=0.0)) is None


def test_soft_tails_match_naive_quadrature_loop():
    """Soft tails: the recursion uses the moments of phi(z) w(z), here taken by quadrature."""
    import scipy.integrate

    p = TraitParams(r1=0.5, r2=0.09, tail_rate=0.7)
    a, b = scipy.special.ndtri(0.5), -scipy.special.ndtri(0.09)

    def w(z):
        return math.exp(-0.7 * (a - z)) if z < a else (math.exp(-0.7 * (z - b)) if z > b else 1.0)

    raw = [sum(scipy.integrate.quad(lambda z: z**k * w(z) * scipy.stats.norm.pdf(z), lo, hi, epsrel=1e-13)[0]
               for lo, hi in ((-np.inf, a), (a, b), (b, np.inf))) for k in range(3)]
    m_sel = raw[1] / raw[0]
    v_sel = raw[2] / raw[0] - m_sel**2
    mu, vg, ve = 0.027, 0.056**2, 0.0625
    means = []
    for _ in range(8):
        means.append(mu)
        vp = vg + ve
        mu += vg / vp * math.sqrt(vp) * m_sel
        vg = vp * v_sel
    np.testing.assert_allclose(np.asarray(trajectory(p, 7).mean), means, rtol=1e-9)


VMAP_VALUES = {
    "r1": [0.0, 0.3, 0.95], "r2": [0.0, 0.2, 0.5], "tail_rate": [0.1, 5.0, math.inf],
    "sigma_mut": [0.0, 0.1, 0.3], "mu0": [-1.0, 0.0, 2.0], "sigma_g0": [0.0, 0.1, 1.0],
    "sigma_env": [0.0, 0.25, 1.0],
}


@pytest.mark.parametrize("name", PARAM_NAMES)
def test_vmap_over_every_leaf(name):
    base = TraitParams(r1=0.02, r2=0.03, sigma_mut=0.05)
    values = VMAP_VALUES[name]
    batched = jax.jit(jax.vmap(lambda x: trajectory(dataclasses.replace(base, **{name: x}), 5)))(
        jnp.asarray(values))
    for i, value in enumerate(values):
        p = dataclasses.replace(base, **{name: value})
        if math.isinf(p.tail_rate):
            ref = _naive_trajectory(p, 5)["mean"]
        else:  # soft: the unbatched call is the reference for the batched one
            ref = np.asarray(trajectory(p, 5).mean)
        np.testing.assert_allclose(np.asarray(batched.mean[i]), ref, rtol=1e-12, atol=1e-15)
    assert batched.var_genetic.shape == (len(values), 6)


def test_broadcast_leading_batch_dimensions():
    r1 = jnp.linspace(0.0, 0.4, 4)[:, None]
    r2 = jnp.linspace(0.0, 0.4, 3)[None, :]
    tr = trajectory(TraitParams(r1=r1, r2=r2), 4)
    assert tr.mean.shape == (4, 3, 5)
    ref = _naive_trajectory(TraitParams(r1=float(r1[2, 0]), r2=float(r2[0, 1])), 4)["var_genetic"]
    np.testing.assert_allclose(np.asarray(tr.var_genetic[2, 1]), ref, rtol=1e-12)


@pytest.mark.parametrize("mode", ["paper", "additive"])
def test_gradients_match_finite_differences(mode):
    base = TraitParams(r1=0.3, r2=0.2, tail_rate=2.0, sigma_mut=0.1, mu0=0.1, sigma_g0=0.2, sigma_env=0.3,
                       mutation_mode=mode)

    def loss(p):
        tr = trajectory(p, 6)
        return tr.mean[-1] + 3.0 * tr.var_genetic[-1]

    grads = jax.grad(loss)(base)
    for name in PARAM_NAMES:
        x = getattr(base, name)
        h = 1e-6 * max(abs(x), 1.0)
        fd = (float(loss(dataclasses.replace(base, **{name: x + h})))
              - float(loss(dataclasses.replace(base, **{name: x - h})))) / (2 * h)
        np.testing.assert_allclose(float(getattr(grads, name)), fd, rtol=1e-6, atol=1e-9, err_msg=name)


def test_validate_names_the_field():
    TraitParams().validate()
    for bad, field in [(dict(r1=0.6, r2=0.4), "r1 \\+ r2"), (dict(r1=-0.1), "r1"), (dict(r2=1.0), "r2"),
                       (dict(sigma_env=-1.0), "sigma_env"), (dict(sigma_mut=-0.1), "sigma_mut"),
                       (dict(sigma_g0=-1.0), "sigma_g0"), (dict(tail_rate=0.0), "tail_rate"),
                       (dict(mutation_mode="both"), "mutation_mode"), (dict(mu0=math.nan), "mu0")]:
        with pytest.raises(ValueError, match=field):
            TraitParams(**bad).validate()


def test_mutation_law_by_hand():
    """The two mutation modes (MODEL.md section 3) on hand-computed numbers: V_G = 0.04, V_P = 0.05,
    V_M = 0.01, V_sel = 0.03."""
    from qtm import mutation

    assert float(mutation.heritability(0.04, 0.05, 0.01, "paper")) == pytest.approx(0.04 / 0.06, rel=1e-15)
    assert float(mutation.heritability(0.04, 0.05, 0.01, "additive")) == pytest.approx(0.8, rel=1e-15)
    assert float(mutation.next_var_genetic(0.03, 0.01, "paper")) == pytest.approx(0.03, rel=1e-15)
    assert float(mutation.next_var_genetic(0.03, 0.01, "additive")) == pytest.approx(0.04, rel=1e-15)
    assert float(mutation.heritability(0.0, 0.0, 0.0, "paper")) == 1.0      # V_E = V_M = 0 limit
    with pytest.raises(ValueError, match="mutation_mode"):
        mutation.heritability(0.04, 0.05, 0.0, "other")
