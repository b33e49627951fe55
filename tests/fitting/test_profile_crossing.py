"""Where a profile crosses its threshold (`fitting.uncertainty._refine_crossing`), against closed forms."""

import math

import numpy as np
import pytest

from fitting.uncertainty import CHI2_HALF, _refine_crossing


def _profile(curve):
    """A profile d(g) as `_refine_crossing` sees it: point(g, w) -> (nll_hat + d(g), w), counting calls."""
    calls = []

    def point(g, w):
        calls.append(g)
        return curve(g), w

    return point, calls


@pytest.mark.parametrize("outside", [1.2, 2.0, 5.0])
def test_crossing_of_a_strongly_curved_profile_from_a_far_outside_point(outside):
    """d(g) = (e^g - 1)^2 / 2, as a window fraction's profile near its bound looks on the logit scale: the
    signed root r(g) = e^g - 1 is convex, so interpolation from a far outside point (d = 1.1e4 at g = 5)
    creeps towards the crossing. Closed form: r = sqrt(2 * 1.92) at g* = log(1 + sqrt(2 * 1.92))."""
    exact = math.log(1.0 + math.sqrt(2.0 * CHI2_HALF))
    curve = lambda g: 0.5 * math.expm1(g) ** 2
    point, calls = _profile(curve)
    g = _refine_crossing(point, 0.0, CHI2_HALF, (0.0, 0.0), (outside, curve(outside)), np.zeros(2))
    # within the tolerance on the profile (0.01), i.e. |g - g*| < 0.01 / d'(g*)
    slope = math.expm1(exact) * math.exp(exact)
    assert abs(g - exact) < 0.01 / slope
    assert abs(curve(g) - CHI2_HALF) < 0.011
    assert len(calls) <= 20


def test_quadratic_profile_is_found_in_one_step():
    """A quadratic profile d = (g / s)^2 / 2 has a linear signed root: the first interpolation is exact."""
    s = 0.3
    curve = lambda g: 0.5 * (g / s) ** 2
    point, calls = _profile(curve)
    g = _refine_crossing(point, 0.0, CHI2_HALF, (0.1, curve(0.1)), (1.5, curve(1.5)), np.zeros(2))
    assert g == pytest.approx(s * math.sqrt(2.0 * CHI2_HALF), abs=1e-9)
    assert len(calls) == 1


def test_a_point_without_a_finite_objective_counts_as_outside():
    """Beyond g = 1 the objective is not finite (e.g. no image survives the window): the crossing of
    d = g^2 (at sqrt(1.92) > 1) is not reached, and the answer stays inside the finite region."""
    curve = lambda g: g * g if g < 1.0 else math.inf
    point, _ = _profile(curve)
    g = _refine_crossing(point, 0.0, CHI2_HALF, (0.5, 0.25), (2.0, math.inf), np.zeros(2))
    assert 0.5 <= g <= 1.0 + 1e-6


def test_the_warm_start_is_the_last_point_inside():
    """Each evaluation starts from the other coordinates of the last point found inside the threshold."""
    curve = lambda g: 0.5 * math.expm1(g) ** 2
    starts, seen = [], []

    def curved(g, w):
        starts.append(float(w[0]))
        seen.append(g)
        return curve(g), np.array([g])

    _refine_crossing(curved, 0.0, CHI2_HALF, (0.0, 0.0), (5.0, curve(5.0)), np.array([-1.0]))
    inside_so_far = -1.0
    for g, w0 in zip(seen, starts):
        assert w0 == inside_so_far
        if curve(g) < CHI2_HALF:
            inside_so_far = g


@pytest.mark.slow
def test_restarts_keep_a_chain_profile_from_stalling_on_the_ridge():
    """A simulated chain (N = 1000, K = 6, data seed 10029 of the verification study) where the profile of
    r1[c1] walked by continuation alone stalls on the (r1, r2, sigma_E) ridge: at its upper end a
    minimization from 9 other starts (the optimum's values and random ones, a seed of its own) finds the
    profile far below the threshold. With the restarts the reported end passes the same check."""
    import jax

    from fitting.driver import optimize
    from fitting.model import ModelSpec, build_problem, reduce_vector, report_scale
    from fitting.observations import from_phenotypes
    from fitting.uncertainty import _profile_point, laplace, profile, profile_start
    from verification.simulate import Truth, shared_origin_chains

    truth = Truth()
    x = shared_origin_chains(truth, num_images=1000, num_iterations=6, seed=10_029)
    obs = from_phenotypes(list(truth.names), np.arange(7), x)
    problem = build_problem(obs, ModelSpec(drift=True), num_iterations=6)
    opt, problem = optimize(problem, obs, num_starts=2, key=jax.random.split(jax.random.key(29), 4)[0])
    u_hat, nll_hat = opt.best.u, opt.best.nll
    index = problem.layout.labels(problem.conditions).index("r1[c1]")
    base = laplace(problem, u_hat, nll_hat)
    anchor = reduce_vector(profile_start(problem, u_hat), index)
    rng = np.random.default_rng(12345)
    others = [anchor] + [anchor + 0.7 * rng.standard_normal(anchor.shape) for _ in range(8)]

    def lowest_profile(end):
        g = float(report_scale("r1", end))
        return min(_profile_point(problem, w, g, index)[0] for w in others) - nll_hat

    stalled = profile(problem, u_hat, nll_hat, base, indices=[index], restarts=0).upper[index]
    restarted = profile(problem, u_hat, nll_hat, base, indices=[index]).upper[index]
    assert lowest_profile(stalled) < CHI2_HALF - 0.5
    assert lowest_profile(restarted) > CHI2_HALF - 0.1
    assert restarted > stalled
