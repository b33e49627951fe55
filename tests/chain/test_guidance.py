"""Guidance schedules against their formulas, written out here independently."""

import math

import numpy as np
import pytest

from chain.guidance import SCHEDULES, Constant, Exponential, Interval, Linear, guidance_scales


def test_constant_is_constant():
    assert np.all(guidance_scales(Constant(2.5), np.linspace(14.6, 0.03, 30)) == 2.5)


@pytest.mark.parametrize("origin", [0, 1])
def test_redifine_exponential_matches_formula(origin):
    s0, alpha, T = 7.5, 2.0, 30
    got = guidance_scales(Exponential(s0, alpha, origin), np.ones(T))
    want = np.array([s0 * math.exp(-alpha * (t + origin) / T) for t in range(T)])
    np.testing.assert_allclose(got, want, rtol=1e-15)
    # origin 0 starts at s0; origin 1 ends at s0 exp(-alpha)
    assert got[0] == pytest.approx(s0 if origin == 0 else s0 * math.exp(-alpha / T))
    if origin == 1:
        assert got[-1] == pytest.approx(s0 * math.exp(-alpha))


def test_interval_applies_scale_only_inside():
    sched = Interval(scale_value=5.0, sigma_low=1.0, sigma_high=3.0)
    sigmas = np.array([4.0, 3.0, 2.0, 1.0, 0.5])
    np.testing.assert_array_equal(guidance_scales(sched, sigmas), [1.0, 5.0, 5.0, 1.0, 1.0])


def test_linear_endpoints_and_slope():
    got = guidance_scales(Linear(start=1.0, end=7.0), np.ones(4))
    np.testing.assert_allclose(got, [1.0, 3.0, 5.0, 7.0])


def test_registry_names():
    assert {"constant", "exponential", "redifine", "interval", "linear"} <= set(SCHEDULES)
    assert SCHEDULES["redifine"] is Exponential
