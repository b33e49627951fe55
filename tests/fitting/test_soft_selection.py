"""Soft selection with the tail rate estimated per condition (docs/model.md section 2): profile intervals,
"not identified" when unbounded."""

import math

import jax
import numpy as np
import pytest

from fitting.driver import FitConfig, fit_observations
from fitting.model import ModelSpec
from fitting.observations import from_phenotypes
from qtm.params import PARAM_NAMES
from tests.fitting.testdata import TRUTH_SHARED, montecarlo_phenotypes, recursion_phenotypes

IDX = {n: i for i, n in enumerate(PARAM_NAMES)}


def test_soft_selection_frees_the_tail_rate_unless_fixed():
    assert "tail_rate" in ModelSpec(selection="soft").free_names()
    assert "tail_rate" not in ModelSpec(selection="soft", fixed=(("tail_rate", 0.1),)).free_names()
    assert "tail_rate" not in ModelSpec().free_names()


def _covers(fit, c, name, truth):
    i = IDX[name]
    return fit.lower[c, i] <= truth <= fit.upper[c, i]


@pytest.mark.slow
def test_tail_rate_recovered_on_monte_carlo_soft_selection():
    # qtm's Monte Carlo with soft selection (each individual kept with probability w(z)): 1000 images
    # measured per iteration from a population of 100 000, K = 6, tail_rate 1. Condition a keeps the top
    # 10 % with a soft lower tail: moments no hard window has (mean up by 0.74 sd, variance still 0.73).
    conditions = {"a": (0.9, 0.0), "b": (0.1, 0.5)}
    x = montecarlo_phenotypes(conditions, TRUTH_SHARED, num_iterations=6, num_images=1000, population=100_000,
                              seed=0, extra={"tail_rate": 1.0})
    obs = from_phenotypes(list(conditions), np.arange(7), x)
    fit = fit_observations(obs, FitConfig(spec=ModelSpec(selection="soft"), num_starts=4), key=jax.random.key(0))
    i = IDX["tail_rate"]
    # a: bounded on both sides and holding the truth (measured: 0.91 [0.75, 1.13])
    assert fit.identified[0, i] and _covers(fit, 0, "tail_rate", 1.0)
    assert fit.upper[0, i] < 2.0 and fit.lower[0, i] > 0.5
    # b: the same moments come from sharper windows too: open upwards, flagged
    assert fit.upper[1, i] == math.inf and not fit.identified[1, i] and _covers(fit, 1, "tail_rate", 1.0)
    assert any("tail_rate[b] is not identified" in w for w in fit.warnings)
    for c, (r1, r2) in enumerate(conditions.values()):
        assert _covers(fit, c, "r1", r1) and _covers(fit, c, "r2", r2)
    for name, truth in TRUTH_SHARED.items():
        assert _covers(fit, 0, name, truth)


@pytest.mark.slow
def test_soft_model_on_strong_hard_truncation_keeps_the_window():
    # Strong hard truncation (top 8 %, lambda = inf). With the tail rate held at the paper's 0.1 the window
    # runs to its bounds and sigma_env to ~0; estimated, the tail rate is open upwards (hard fits as well)
    # and the window and sigma_env are recovered.
    conditions = {"a": (0.9, 0.02), "b": (0.1, 0.5)}
    x = recursion_phenotypes(conditions, TRUTH_SHARED, num_iterations=6, num_images=1000, seed=0)
    obs = from_phenotypes(list(conditions), np.arange(7), x)
    fit = fit_observations(obs, FitConfig(spec=ModelSpec(selection="soft"), num_starts=4), key=jax.random.key(0))
    i = IDX["tail_rate"]
    assert np.all(fit.upper[:, i] == math.inf) and not fit.identified[:, i].any()
    for c, (r1, r2) in enumerate(conditions.values()):
        assert _covers(fit, c, "r1", r1) and _covers(fit, c, "r2", r2)
    assert _covers(fit, 0, "sigma_env", TRUTH_SHARED["sigma_env"])
