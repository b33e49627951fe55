"""fitting.results on its own: the fit dataset, the JSON object and the markdown table, checked against the
FitResult they come from and against values computed by hand (the CLI tests only see the files)."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest
import xarray as xr

from fitting.driver import FitConfig, fit_observations
from fitting.model import ModelSpec
from fitting.observations import from_phenotypes
from fitting.results import markdown_table, to_dataset, to_json, write_fit
from qtm.params import PARAM_NAMES
from qtmio.contract import FIT_SCHEMA_VERSION
from qtmio.netcdf import read_netcdf
from tests.fitting.testdata import TRUTH_SHARED, recursion_phenotypes

CONDITIONS = {"up": (0.8, 0.05), "down": (0.1, 0.5)}
IDX = {n: i for i, n in enumerate(PARAM_NAMES)}


@pytest.fixture(scope="module")
def phenotypes():
    x = recursion_phenotypes(CONDITIONS, TRUTH_SHARED, num_iterations=3, num_images=60, seed=2)
    x[1, 2, :7] = np.nan  # seven images of one cell not produced
    return x


@pytest.fixture(scope="module")
def result(phenotypes):
    obs = from_phenotypes(list(CONDITIONS), np.arange(4), phenotypes, source="mem.nc")
    config = FitConfig(spec=ModelSpec(fixed=(("sigma_env", 0.05),)), num_starts=1, num_draws=50,
                       train_iterations=2)
    return fit_observations(obs, config, key=jax.random.key(1))


def test_dataset_holds_the_result_and_the_observations(result, phenotypes):
    ds = to_dataset(result, seed=5, command="qtm fit mem.nc")
    assert list(ds["condition"].values) == list(CONDITIONS) and list(ds["parameter"].values) == list(PARAM_NAMES)
    np.testing.assert_array_equal(ds["estimate"].values, result.estimate)
    np.testing.assert_array_equal(ds["lower"].values, result.lower)
    # the fixed sigma_env: not free, lower = upper = estimate = 0.05; tail_rate fixed at inf (hard selection)
    env = ds.sel(parameter="sigma_env")
    assert not env["free"].any() and np.all(env["estimate"] == 0.05) and np.all(env["lower"] == env["upper"])
    assert np.all(np.isinf(ds["estimate"].sel(parameter="tail_rate")))
    assert list(ds["shared"].values) == [p in ("mu0", "sigma_g0", "sigma_env") for p in PARAM_NAMES]
    # observed statistics by hand: n, mean and sample sd of the finite phenotypes of every cell
    for c in range(2):
        for k in range(4):
            x = phenotypes[c, k][np.isfinite(phenotypes[c, k])]
            assert int(ds["observed_num_images"][c, k]) == x.size
            assert float(ds["observed_mean"][c, k]) == pytest.approx(x.mean(), rel=1e-13)
            assert float(ds["observed_sd"][c, k]) == pytest.approx(x.std(ddof=1), rel=1e-12)
    np.testing.assert_array_equal(ds["train"].values, [True, True, True, False])  # train_iterations = 2
    labels = list(ds["free_parameter"].values)
    assert labels == ["mu0", "sigma_g0", "r1[up]", "r2[up]", "r1[down]", "r2[down]"]
    np.testing.assert_array_equal(ds["covariance"].values, result.uncertainty.covariance)
    assert ds.attrs["fit_schema_version"] == FIT_SCHEMA_VERSION and ds.attrs["source"] == "mem.nc"
    assert ds.attrs["seed"] == 5 and ds.attrs["command"] == "qtm fit mem.nc" and "git_revision" in ds.attrs
    assert ds.attrs["train_iterations"] == 2 and ds.attrs["fixed"] == "sigma_env=0.05"
    info = result.information
    assert ds.attrs["information_aic"] == pytest.approx(2 * info["num_free"] - 2 * info["log_likelihood"])
    assert ds.attrs["information_bic"] == pytest.approx(info["num_free"] * math.log(info["num_observations"])
                                                        - 2 * info["log_likelihood"])
    assert ds.attrs["transform"] == "none" and info["log_jacobian"] == 0.0
    assert ds["gof_shape_pvalue"].dims == ("condition", "iteration")
    assert ds["observed_quantile"].dims == ("condition", "iteration", "quantile_level")
    # BIC's n: the phenotypes the fit used, D_0 once plus 2 conditions x iterations 1-2, less the 7 missing
    assert info["num_free"] == 6 and info["num_observations"] == 60 + 2 * 2 * 60 - 7
    assert json.loads(ds.attrs["forecast"]) == result.forecast


def test_written_fit_reads_back(result, tmp_path):
    path = write_fit(result, tmp_path / "fit.nc", seed=5)
    back = read_netcdf(path)
    expected = to_dataset(result, seed=5)
    for name in ("estimate", "lower", "upper", "fitted_mean", "predict_lower", "observed_sd"):
        np.testing.assert_array_equal(back[name].values, expected[name].values)
    assert list(back["start_status"].values) == [s.status for s in result.optimization.starts]


def test_json_mirrors_the_parameter_table(result):
    out = to_json(result)
    assert set(out["shared"]) == {"mu0", "sigma_g0", "sigma_env"}
    for c, name in enumerate(CONDITIONS):
        for p in ("r1", "r2", "tail_rate", "sigma_mut"):
            entry = out["conditions"][name][p]
            assert entry["estimate"] == float(result.estimate[c, IDX[p]])
            assert entry["free"] == (p in ("r1", "r2"))
    diag = out["diagnostics"]
    assert diag["iterations_used"] == [0, 1, 2] and diag["forecast"] == result.forecast
    assert diag["correlation"]["labels"][2:] == ["r1[up]", "r2[up]", "r1[down]", "r2[down]"]
    json.dumps(out, allow_nan=True)  # plain Python values only


def test_markdown_table_by_hand():
    fit = xr.Dataset(
        {"estimate": (("condition", "parameter"), [[0.5, 2.0], [0.25, 2.0]]),
         "lower": (("condition", "parameter"), [[0.4, 2.0], [-np.inf, 2.0]]),
         "upper": (("condition", "parameter"), [[0.6, 2.0], [0.3, 2.0]]),
         "free": (("condition", "parameter"), [[True, False], [True, False]]),
         "identified": (("condition", "parameter"), [[True, True], [False, True]])},
        coords={"condition": ["a", "b"], "parameter": ["r1", "mu0"]},
        attrs={"model": "hard", "mutation": "none", "interval": "laplace",
               "warnings": json.dumps(["r1[b] is not identified"])})
    assert markdown_table(fit, "fit.nc") == (
        "## Fitted selection per condition (`fit.nc`: hard selection, mutation none, laplace 95 % intervals)\n"
        "\n"
        "| condition | parameter | estimate | lower | upper | identified |\n"
        "|---|---|---:|---:|---:|---|\n"
        "| a | r1 | 0.5 | 0.4 | 0.6 | yes |\n"
        "| b | r1 | 0.25 | -inf | 0.3 | **no** |\n"
        "\n"
        "Warnings of the fit:\n"
        "\n"
        "- r1[b] is not identified\n")


def test_dataset_attributes_are_strict_json_with_an_infinite_aic(result):
    """A comparison row of a transform outside the data's domain has aic = inf and weight NaN: the fit.nc
    attribute holds strict JSON ("inf", null), as every command's output does."""
    rows = [{"model": "hard", "transform": "logit", "status": "outside domain", "aic": math.inf,
             "weight": math.nan}]
    ds = to_dataset(result, comparison=rows)

    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")

    for key in ("model_comparison", "warnings", "goodness_of_fit", "cell_goodness_of_fit", "forecast"):
        json.loads(ds.attrs[key], parse_constant=refuse)
    row = json.loads(ds.attrs["model_comparison"])[0]
    assert row["aic"] == "inf" and row["weight"] is None
