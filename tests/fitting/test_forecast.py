"""fitting.forecast on its own, against values computed by hand: bands over parameter draws, the observed
grid, goodness of fit and the forecast report (the CLI tests only see them through a whole fit)."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest

from fitting.forecast import Prediction, align, forecast_report, goodness_of_fit, predict
from fitting.observations import from_summary


class _Problem:
    """A stand-in problem: C = 1 condition, iterations 0..2; u = (a, v) gives mean a * (1, 2, 3), var v."""

    layout = types.SimpleNamespace(num_iterations=2)

    @staticmethod
    def moments(u):
        u = np.asarray(u, dtype=float)
        return u[:, 0][:, None, None] * np.array([1.0, 2.0, 3.0]), u[:, 1][:, None, None] * np.ones((1, 3))


def test_predict_bands_by_hand():
    draws = np.array([[1.0, 0.04], [3.0, 0.16], [5.0, -1.0]])  # the third draw has no valid variance: dropped
    noise = np.array([[[1.0, 1.0, 1.0]], [[-1.0, -1.0, -1.0]], [[0.0, 0.0, 0.0]]])
    num_images = np.array([[4.0, 0.0, 16.0]])  # iteration 1 unobserved: the condition's median, 10
    p = predict(_Problem(), np.array([1.0, 0.04]), draws, num_images, noise=noise)
    np.testing.assert_array_equal(p.iterations, [0, 1, 2])
    np.testing.assert_allclose(p.mean, [[1.0, 2.0, 3.0]])
    np.testing.assert_allclose(p.var, [[0.04, 0.04, 0.04]])
    lo = lambda a, b: a + 0.025 * (b - a)  # noqa: E731  linear percentiles of two values
    hi = lambda a, b: a + 0.975 * (b - a)  # noqa: E731
    np.testing.assert_allclose(p.mean_lower, [[lo(1, 3), lo(2, 6), lo(3, 9)]])
    np.testing.assert_allclose(p.mean_upper, [[hi(1, 3), hi(2, 6), hi(3, 9)]])
    np.testing.assert_allclose(p.var_lower, [[lo(0.04, 0.16)] * 3])
    # the mean of n new images: mean + sqrt(var / n) * noise, n = 4, 10, 16
    first = [1 + 0.1, 2 + math.sqrt(0.004), 3 + 0.05]
    second = [3 - 0.2, 6 - math.sqrt(0.016), 9 - 0.1]
    np.testing.assert_allclose(p.predict_lower, [[lo(a, b) for a, b in zip(first, second)]])
    np.testing.assert_allclose(p.predict_upper, [[hi(a, b) for a, b in zip(first, second)]])
    assert p.num_draws == 3


def test_align_puts_observations_on_the_full_grid():
    obs = from_summary(["a", "b"], [0, 2], mean=[[0.1, 0.2], [0.1, 0.3]], std=[[0.01, 0.02], [0.01, 0.03]],
                       num_images=[[10, 20], [10, 0]])
    grid = align(obs, 3)
    np.testing.assert_array_equal(grid["num_images"], [[10, 0, 20, 0], [10, 0, 0, 0]])
    np.testing.assert_array_equal(grid["mean"][0], [0.1, np.nan, 0.2, np.nan])
    np.testing.assert_allclose(grid["var"][0], [1e-4, np.nan, 4e-4, np.nan])
    assert np.isnan(grid["mean"][1, 2]) and np.isnan(grid["var"][1, 2])  # no images there


def _prediction(mean, var, lower=None, upper=None):
    mean, var = np.asarray(mean, float), np.asarray(var, float)
    lower = mean - 1 if lower is None else np.asarray(lower, float)
    upper = mean + 1 if upper is None else np.asarray(upper, float)
    return Prediction(iterations=np.arange(mean.shape[1]), mean=mean, var=var, mean_lower=lower,
                      mean_upper=upper, predict_lower=lower, predict_upper=upper, var_lower=var / 2,
                      var_upper=var * 2, num_draws=10)


def test_goodness_of_fit_by_hand():
    observed = {"num_images": np.array([[50.0, 10.0, 40.0, 0.0]]), "mean": np.array([[0.5, 1.2, 0.7, np.nan]]),
                "var": np.array([[1.0, 2.0, 0.5, np.nan]])}
    pred = _prediction([[0.5, 1.0, 1.0, 1.0]], [[1.0, 1.0, 1.0, 1.0]])
    row = goodness_of_fit(observed, pred, np.array([0, 1, 2, 3]), ("a",))["a"]
    z = np.array([(1.2 - 1.0) / math.sqrt(1 / 10), (0.7 - 1.0) / math.sqrt(1 / 40)])
    chi2 = float(np.sum(z**2))
    assert row["num_iterations"] == 2  # iteration 0 is not a test of the model; iteration 3 has no images
    assert row["mean_chi2"] == pytest.approx(chi2)
    assert row["mean_chi2_pvalue"] == pytest.approx(math.exp(-chi2 / 2))  # chi2 with 2 df
    assert row["max_abs_z"] == pytest.approx(np.abs(z).max())
    assert row["rmse_mean"] == pytest.approx(math.sqrt((0.2**2 + 0.3**2) / 2))
    # variance deviance of a cell, r = s^2 / V: 2 [l(s^2) - l(V)] = (n - 1)(r - 1) - n log r
    deviance = sum((n - 1) * (r - 1) - n * math.log(r) for n, r in ((10, 2.0), (40, 0.5)))
    assert row["variance_deviance"] == pytest.approx(deviance, rel=1e-10)
    assert row["variance_deviance_pvalue"] == pytest.approx(math.exp(-deviance / 2))


def test_forecast_report_by_hand():
    observed = {"num_images": np.array([[20.0, 20.0, 20.0, 20.0, 20.0]]),
                "mean": np.array([[1.0, 1.5, 2.0, 2.9, 4.5]]), "var": np.array([[0.5, 0.4, 0.3, 0.2, 0.1]])}
    mean = np.array([[1.1, 1.6, 2.1, 2.6, 3.1]])
    var = np.array([[0.4, 0.35, 0.3, 0.25, 0.2]])
    pred = _prediction(mean, var, lower=mean - 0.5, upper=mean + 0.5)
    row = forecast_report(observed, pred, 2, ("a",))["a"]
    assert row["num_held_out"] == 2 and row["held_out_iterations"] == [3, 4] and row["last_iteration"] == 4
    assert row["fraction_inside_band"] == 0.5  # 2.9 in [2.1, 3.1]; 4.5 outside [2.6, 3.6]
    assert row["observed_mean_change"] == pytest.approx(4.5 - 1.0)
    assert row["predicted_mean_change"] == pytest.approx(3.1 - 1.1)
    assert row["predicted_mean_change_lower"] == pytest.approx(2.6 - 1.1)
    assert row["predicted_mean_change_upper"] == pytest.approx(3.6 - 1.1)
    assert row["observed_var_ratio"] == pytest.approx(0.1 / 0.5)
    assert row["predicted_var_ratio"] == pytest.approx(0.2 / 0.4)
    assert row["predicted_var_ratio_lower"] == pytest.approx(0.1 / 0.4)
    assert row["predicted_var_ratio_upper"] == pytest.approx(0.4 / 0.4)
    assert row["predicted_mean_last_lower"] == pytest.approx(2.6)
    nothing_held = dict(observed, num_images=np.array([[20.0, 20.0, 20.0, 0.0, 0.0]]))
    assert forecast_report(nothing_held, pred, 2, ("a",)) == {"a": {"num_held_out": 0}}
