"""Phenotype transforms (fitting.transforms): domain, Jacobian, the measured-scale likelihood, recovery of
log-normal data and the comparison of transforms by AIC."""

import jax
import numpy as np
import pytest
from scipy import stats

from fitting.compare import compare_variants
from fitting.driver import FitConfig, fit_observations
from fitting.errors import ObservationError
from fitting.model import ModelSpec
from fitting.observations import from_phenotypes, from_summary
from fitting.transforms import TRANSFORMS, log_jacobian, transform_observations
from qtm.params import PARAM_NAMES
from tests.fitting.testdata import montecarlo_phenotypes, recursion_phenotypes

IDX = {n: i for i, n in enumerate(PARAM_NAMES)}
# the conditions, on the log scale of a positive phenotype (hf_power-like: exp(-1.5) = 0.22)
CONDITIONS = {"c0": (0.5, 0.02), "c1": (0.3, 0.1), "c2": (0.05, 0.4)}
SHARED_LOG = {"mu0": -1.5, "sigma_g0": 0.3, "sigma_env": 0.3}


@pytest.fixture(scope="module")
def lognormal():
    """exp of qtm's Monte Carlo (1000 images measured from a population of 100 000, K = 6): the measured
    images are close to independent draws, and normal on the log scale."""
    y = montecarlo_phenotypes(CONDITIONS, SHARED_LOG, num_iterations=6, num_images=1000, population=100_000,
                              seed=0)
    return from_phenotypes(list(CONDITIONS), np.arange(7), np.exp(y))


@pytest.fixture(scope="module")
def fits(lognormal):
    return {name: fit_observations(lognormal, FitConfig(num_starts=3, num_draws=200, transform=name),
                                   key=jax.random.key(0)) for name in ("none", "log")}


def _entering_values(obs):
    """The measured values the likelihood uses, by hand: every image of iterations >= 1, iteration 0 once
    (all conditions share it here)."""
    x = obs.phenotypes
    assert np.array_equal(x[0, 0], x[1, 0], equal_nan=True)
    return [(0, 0, x[0, 0])] + [(c, k, x[c, k]) for c in range(x.shape[0]) for k in range(1, x.shape[1])]


def test_jacobian_is_the_sum_of_log_derivatives_over_the_images_fitted(lognormal):
    values = np.concatenate([v for _, _, v in _entering_values(lognormal)])
    assert log_jacobian(lognormal, "log") == pytest.approx(np.sum(-np.log(values)), rel=1e-12)
    assert log_jacobian(lognormal, "none") == 0.0
    # logit on values in (0, 1): d/dx log(x / (1 - x)) = 1 / (x (1 - x)), by hand
    assert log_jacobian(lognormal, "logit") == pytest.approx(np.sum(-np.log(values * (1 - values))), rel=1e-12)


def test_transforms_map_and_differentiate_as_written():
    x = np.array([0.05, 0.3, 0.9])
    for name, forward in (("log", np.log), ("logit", lambda v: np.log(v / (1 - v)))):
        t = TRANSFORMS[name]
        np.testing.assert_allclose(t.forward(x), forward(x), rtol=1e-13)
        h = 1e-6   # derivative by central differences of the map itself
        deriv = (forward(x + h) - forward(x - h)) / (2 * h)
        np.testing.assert_allclose(t.log_abs_jacobian(x), np.log(deriv), rtol=1e-7)


def test_log_likelihood_is_that_of_the_measured_values(lognormal, fits):
    # Reference: the fitted normal law on the log scale is a log-normal law of the measured values;
    # scipy's lognorm density summed over the images the fit used.
    for name, fit in fits.items():
        total = 0.0
        for c, k, x in _entering_values(lognormal):
            mu, var = fit.prediction.mean[c, k], fit.prediction.var[c, k]
            if name == "log":
                total += stats.lognorm.logpdf(x, s=np.sqrt(var), scale=np.exp(mu)).sum()
            else:
                total += stats.norm.logpdf(x, mu, np.sqrt(var)).sum()
        info = fit.information
        assert info["log_likelihood"] == pytest.approx(total, rel=1e-9)
        assert info["aic"] == pytest.approx(2 * info["num_free"] - 2 * total, rel=1e-9)


def test_log_transform_recovers_lognormal_truth_within_its_intervals(fits):
    fit = fits["log"]
    for c, (r1, r2) in enumerate(CONDITIONS.values()):
        for name, truth in (("r1", r1), ("r2", r2)):
            i = IDX[name]
            assert fit.lower[c, i] <= truth <= fit.upper[c, i], (name, c, fit.lower[c, i], fit.upper[c, i])
    for name, truth in SHARED_LOG.items():
        i = IDX[name]
        assert fit.lower[0, i] <= truth <= fit.upper[0, i], (name, fit.lower[0, i], fit.upper[0, i])
    assert fit.cells.warning is None
    # On the measured scale the same data fail the per-cell normal shape everywhere, and the fit says so.
    assert fits["none"].cells.summary["shape"]["num_failing"] == fits["none"].cells.summary["shape"]["num_cells"]
    assert any("per-cell goodness of fit" in w for w in fits["none"].warnings)


def test_compare_prefers_log_over_none_and_weights_sum_to_one(lognormal, fits):
    rows = compare_variants(lognormal, ModelSpec(), num_starts=2, key=jax.random.key(1),
                            variants=(("hard", "none"),), transforms=("none", "log", "logit"))
    by = {r["transform"]: r for r in rows}
    assert rows[0]["transform"] == "log" and by["log"]["delta_aic"] == 0.0
    assert by["none"]["delta_aic"] > 100
    assert sum(r["weight"] for r in rows) == pytest.approx(1.0)
    # the same AIC as the full fit on that scale (the comparison uses the same likelihood)
    assert by["log"]["aic"] == pytest.approx(fits["log"].information["aic"], abs=1e-3)


def test_logit_outside_its_domain_names_the_cells():
    x = recursion_phenotypes({"a": (0.3, 0.1), "b": (0.1, 0.3)}, {"mu0": 0.5, "sigma_g0": 0.1, "sigma_env": 0.1},
                             num_iterations=3, num_images=50, seed=0)
    x[1, 2, 7] = 1.02
    x[0, 3, 0] = 0.0
    obs = from_phenotypes(["a", "b"], np.arange(4), x, source="m.nc")
    with pytest.raises(ObservationError) as err:
        transform_observations(obs, "logit")
    text = err.value.message({"transform": "--transform"})
    assert "m.nc" in text and "--transform logit" in text and "0 < x < 1" in text
    assert "b/iteration 2: 1 of 50 values outside" in text and "a/iteration 3: 1 of 50" in text
    # the comparison lists the transform as outside its domain instead of failing
    rows = compare_variants(obs, ModelSpec(), num_starts=1, key=jax.random.key(0), variants=(("hard", "none"),),
                            transforms=("none", "logit"))
    by = {r["transform"]: r for r in rows}
    assert by["logit"]["status"] == "outside domain" and by["logit"]["weight"] == 0.0
    assert by["none"]["weight"] == pytest.approx(1.0)


def test_transform_of_summary_only_data_is_refused():
    obs = from_summary(["a"], np.arange(3), np.full((1, 3), 0.3), np.full((1, 3), 0.05), np.full((1, 3), 100))
    with pytest.raises(ObservationError, match="per-image variable"):
        transform_observations(obs, "log")
    assert transform_observations(obs, "none") is obs
