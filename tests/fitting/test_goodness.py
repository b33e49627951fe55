"""Per-cell goodness of fit (fitting.goodness) against scipy and against data of known law."""

import jax
import numpy as np
import pytest
from scipy import stats

from fitting.driver import FitConfig, fit_observations
from fitting.goodness import anderson_darling_normal, cell_goodness_of_fit
from fitting.observations import from_phenotypes
from tests.fitting.testdata import TRUTH_CONDITIONS, TRUTH_SHARED, recursion_phenotypes


def test_anderson_darling_statistic_is_scipys():
    x = np.random.default_rng(3).gamma(20.0, size=150)
    a2, _ = anderson_darling_normal(x)
    assert a2 == pytest.approx(stats.anderson(x, "norm", method="interpolate").statistic, rel=1e-10)


@pytest.mark.parametrize("seed, shape", [(0, 30.0), (1, 8.0)])
def test_anderson_darling_pvalue_agrees_with_a_monte_carlo_null(seed, shape):
    # Reference: scipy's Monte Carlo null law of A^2 with the normal's mean and sd fitted to each draw
    # (scipy.stats.goodness_of_fit); 4000 draws give a p-value to about +-0.008.
    x = np.random.default_rng(seed).gamma(shape, size=60)
    _, p = anderson_darling_normal(x)
    ref = stats.goodness_of_fit(stats.norm, x, statistic="ad", n_mc_samples=4000,
                                rng=np.random.default_rng(seed + 10)).pvalue
    assert abs(p - ref) < 0.03, (p, ref)


def test_the_shape_test_rejects_the_wrong_law_and_keeps_its_level_on_the_right_one():
    rng = np.random.default_rng(0)
    right = [anderson_darling_normal(rng.normal(0.3, 0.05, 200))[1] for _ in range(500)]
    wrong = [anderson_darling_normal(np.exp(rng.normal(-1.5, 0.4, n)))[1] for n in (200,) * 50 + (1000,) * 20]
    # A log-normal with sigma 0.4 (skewness 1.3) is told from normal in most cells of 200 images and in
    # every cell of 1000 (the paper's scale).
    assert np.mean(np.array(wrong[:50]) < 0.01) >= 0.9
    assert np.all(np.array(wrong[50:]) < 1e-6)
    # Normal cells fail at about the nominal 1 %: Binomial(500, 0.01) stays <= 12 with probability 0.999.
    assert np.sum(np.array(right) < 0.01) <= 12
    assert 0.4 < np.mean(right) < 0.6   # p-values roughly uniform


def test_mean_residual_and_counting_by_hand():
    values = np.random.default_rng(1).normal(0.0, 1.0, (2, 3, 40))
    values[1, 0] = values[0, 0]          # a shared iteration 0
    n = np.full((2, 3), 40.0)
    observed = {"num_images": n, "mean": values.mean(-1), "var": values.var(-1, ddof=1)}
    mean = np.zeros((2, 3))
    var = np.full((2, 3), 1.0)
    cells = cell_goodness_of_fit(values, observed, mean, var, n, np.array([0, 1, 2]), ("a", "b"))
    z = values.mean(-1) / np.sqrt(1.0 / 40)
    np.testing.assert_allclose(cells.mean_z, z, rtol=1e-12)
    np.testing.assert_allclose(cells.mean_pvalue, 2 * stats.norm.sf(np.abs(z)), rtol=1e-12)
    assert cells.counted.sum() == 5 and cells.counted[0, 0] and not cells.counted[1, 0]
    np.testing.assert_allclose(cells.quantiles[0, 1, 12], np.quantile(values[0, 1], 0.5))


def test_fit_on_its_own_model_passes_and_stores_the_tests():
    x = recursion_phenotypes(TRUTH_CONDITIONS, TRUTH_SHARED, num_iterations=4, num_images=300, seed=0)
    obs = from_phenotypes(list(TRUTH_CONDITIONS), np.arange(5), x)
    fit = fit_observations(obs, FitConfig(num_starts=2, num_draws=100), key=jax.random.key(0))
    cells = fit.cells
    # normal draws: 2 of these 13 cells fail the shape test at p < 0.01 by chance (scipy's Shapiro-Wilk
    # gives them 0.013 and 0.006 too); a Binomial(13, 0.01) count of 2 is not "well above 1 %"
    assert cells.summary["shape"]["num_cells"] == 1 + 3 * 4
    assert cells.summary["shape"]["num_failing"] <= 2 and cells.summary["mean"]["num_failing"] == 0
    assert cells.warning is None
    # the cell's test is the cell's own data against scipy
    a2 = stats.anderson(x[1, 2], "norm", method="interpolate").statistic
    assert cells.shape_statistic[1, 2] == pytest.approx(a2, rel=1e-10)
    # the mean residual uses the fitted trajectory and V / n (independent draws)
    mu, v = fit.prediction.mean[1, 2], fit.prediction.var[1, 2]
    assert cells.mean_z[1, 2] == pytest.approx((x[1, 2].mean() - mu) / np.sqrt(v / 300), rel=1e-9)
