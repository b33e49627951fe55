"""Reading and validating results datasets for the fit (DESIGN.md, the results contract)."""

import numpy as np
import pytest
import xarray as xr

from tests.fitting.testdata import results_dataset, summary_dataset
from fitting.observations import (
    ObservationError,
    cell_statistics,
    from_phenotypes,
    load_observations,
)

CONDITIONS = ["a", "b"]


def _phenotypes(seed=0, shape=(2, 4, 50)):
    rng = np.random.default_rng(seed)
    x = 0.3 + 0.05 * rng.standard_normal(shape)
    x[:, 0] = x[0, 0]
    return x


def _write(ds, tmp_path, name="metrics.nc"):
    path = tmp_path / name
    ds.to_netcdf(path, engine="h5netcdf")
    return path


def test_per_image_statistics_match_numpy_and_drop_nan(tmp_path):
    x = _phenotypes()
    x[1, 2, :7] = np.nan          # images not produced yet
    path = _write(results_dataset(x, CONDITIONS), tmp_path)
    obs = load_observations(tmp_path)          # a run directory works as well as the file
    assert obs.source == str(path)
    assert obs.conditions == ("a", "b")
    np.testing.assert_array_equal(obs.num_images[1], [50, 50, 43, 50])
    np.testing.assert_allclose(obs.mean, np.nanmean(x, -1), rtol=1e-14)
    np.testing.assert_allclose(obs.var, np.nanvar(x, -1, ddof=1), rtol=1e-12)


def test_iteration_coordinate_is_sorted_and_dims_may_be_permuted(tmp_path):
    x = _phenotypes()
    ds = results_dataset(x, CONDITIONS).isel(iteration=[2, 0, 3, 1]).transpose("image", "iteration", "condition")
    obs = load_observations(_write(ds, tmp_path, "perm.nc"))
    np.testing.assert_array_equal(obs.iterations, [0, 1, 2, 3])
    np.testing.assert_allclose(obs.mean, x.mean(-1), rtol=1e-14)


def test_summary_form_matches_per_image_form(tmp_path):
    x = _phenotypes(1)
    per_image = load_observations(_write(results_dataset(x, CONDITIONS), tmp_path, "p.nc"))
    summary = load_observations(_write(summary_dataset(x, CONDITIONS), tmp_path, "s.nc"))
    assert summary.phenotypes is None
    for field in ("num_images", "mean", "var"):
        np.testing.assert_allclose(getattr(summary, field), getattr(per_image, field), rtol=1e-12)


def test_summary_std_with_ddof_zero_attribute(tmp_path):
    x = _phenotypes(2)
    ds = summary_dataset(x, CONDITIONS)
    ds["hf_power_std"] = (("condition", "iteration"), x.std(-1, ddof=0), {"ddof": 0})
    obs = load_observations(_write(ds, tmp_path, "s0.nc"))
    np.testing.assert_allclose(obs.var, x.var(-1, ddof=1), rtol=1e-12)


def test_iteration_zero_counts_once_and_distinct_samples_are_pooled():
    x = _phenotypes(3)
    cells = cell_statistics(from_phenotypes(CONDITIONS, np.arange(4), x))
    assert (cells.iteration == 0).sum() == 1
    assert cells.num_images[cells.iteration == 0][0] == 50
    # Different iteration-0 samples: pooled as one sample of D_0 (reference: numpy on the concatenation).
    y = x.copy()
    y[1, 0] = 0.31 + 0.04 * np.random.default_rng(9).standard_normal(50)
    cells = cell_statistics(from_phenotypes(CONDITIONS, np.arange(4), y))
    zero = cells.iteration == 0
    both = np.concatenate([y[0, 0], y[1, 0]])
    assert cells.num_images[zero][0] == 100
    np.testing.assert_allclose(cells.mean[zero][0], both.mean(), rtol=1e-13)
    np.testing.assert_allclose(cells.var[zero][0], both.var(ddof=1), rtol=1e-12)
    assert len(cells.mean) == 1 + 2 * 3


def test_restrict_keeps_early_iterations():
    obs = from_phenotypes(CONDITIONS, np.arange(4), _phenotypes())
    train = obs.restrict(2)
    np.testing.assert_array_equal(train.iterations, [0, 1, 2])
    assert train.phenotypes.shape == (2, 3, 50)
    with pytest.raises(ObservationError, match="need at least 2"):
        obs.restrict(0)


def _error(tmp_path, ds, *needles, name="bad.nc"):
    path = _write(ds, tmp_path, name)
    with pytest.raises(ObservationError) as info:
        load_observations(path)
    message = str(info.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message
    return message


def test_error_missing_schema_version(tmp_path):
    _error(tmp_path, results_dataset(_phenotypes(), CONDITIONS, schema_version=None), "schema_version",
           "missing")


def test_error_wrong_schema_version(tmp_path):
    _error(tmp_path, results_dataset(_phenotypes(), CONDITIONS, schema_version=2), "schema_version", "2")


def test_error_missing_variable(tmp_path):
    ds = results_dataset(_phenotypes(), CONDITIONS).rename({"hf_power": "other"})
    _error(tmp_path, ds, "'hf_power'", "missing")


def test_error_incomplete_summary_trio(tmp_path):
    ds = summary_dataset(_phenotypes(), CONDITIONS).drop_vars("num_images")
    _error(tmp_path, ds, "'num_images'", "missing")


def test_error_fewer_than_two_iterations(tmp_path):
    ds = results_dataset(_phenotypes(shape=(2, 1, 20)), CONDITIONS)
    _error(tmp_path, ds, "'hf_power'", "at least 2 iterations")


def test_error_nan_only(tmp_path):
    ds = results_dataset(np.full((2, 3, 10), np.nan), CONDITIONS)
    _error(tmp_path, ds, "'hf_power'", "only NaN")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # nanmean of the empty cells in summary_dataset
def test_condition_without_later_iterations_is_left_out_with_a_note(tmp_path):
    # A run in progress: condition b has only the shared iteration 0 so far.
    x = _phenotypes()
    x[1, 1:] = np.nan
    obs = load_observations(_write(results_dataset(x, CONDITIONS), tmp_path))
    assert obs.conditions == ("a",)
    np.testing.assert_allclose(obs.mean, np.nanmean(x[:1], -1), rtol=1e-14)
    np.testing.assert_array_equal(obs.num_images, [[50, 50, 50, 50]])
    assert obs.phenotypes.shape == (1, 4, 50)
    assert "condition b has no finished iteration yet; left out" in obs.notes
    # the same through the summary-only form (num_images 0 where not produced)
    summary = load_observations(_write(summary_dataset(x, CONDITIONS), tmp_path, "s.nc"))
    assert summary.conditions == ("a",)
    assert "condition b has no finished iteration yet; left out" in summary.notes


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_condition_stopping_short_is_fitted_up_to_its_last_iteration_with_a_note(tmp_path):
    # Shards: condition b has finished iterations 0 and 1 of 0..3 while a has all of them.
    x = _phenotypes()
    x[1, 2:] = np.nan
    obs = load_observations(_write(results_dataset(x, CONDITIONS), tmp_path))
    assert obs.conditions == ("a", "b")
    np.testing.assert_array_equal(obs.num_images, [[50, 50, 50, 50], [50, 50, 0, 0]])
    assert [n for n in obs.notes if "finished iterations" in n] == [
        "condition b has finished iterations up to 1 of 3 (still running, or stopped); fitted up to there"]
    complete = load_observations(_write(results_dataset(_phenotypes(), CONDITIONS), tmp_path, "c.nc"))
    assert not [n for n in complete.notes if "finished iterations" in n]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_error_when_no_condition_has_a_later_iteration(tmp_path):
    x = _phenotypes()
    x[:, 1:] = np.nan
    _error(tmp_path, results_dataset(x, CONDITIONS), "'hf_power'", "only at iteration 0",
           "at least 2 iterations")
    _error(tmp_path, summary_dataset(x, CONDITIONS), "'hf_power_mean'", "only at iteration 0", name="s.nc")


def test_error_negative_phenotype(tmp_path):
    x = _phenotypes()
    x[0, 2, 5] = -0.1
    message = _error(tmp_path, results_dataset(x, CONDITIONS), "'hf_power'", "negative")
    assert "iteration 2" in message and "image 5" in message


def test_error_missing_coordinate(tmp_path):
    ds = xr.Dataset({"hf_power": (("iteration", "image"), _phenotypes()[0])}, attrs={"schema_version": 1})
    _error(tmp_path, ds, "'condition'")


def test_error_paths_that_are_not_datasets(tmp_path):
    with pytest.raises(ObservationError, match="no such file"):
        load_observations(tmp_path / "absent.nc")
    (tmp_path / "run").mkdir()
    with pytest.raises(ObservationError, match="no metrics.nc"):
        load_observations(tmp_path / "run")
    junk = tmp_path / "junk.nc"
    junk.write_text("not netcdf")
    with pytest.raises(ObservationError, match="cannot read"):
        load_observations(junk)


def test_distinct_samples_by_hand():
    """Rows 0 and 2 hold the same sample (n, mean, variance equal), row 1 another (same n and mean, other
    variance), row 3 none, rows 4 and 5 one image each with the same value (variance 0 whatever is stored)."""
    from fitting.observations import distinct_samples

    n = np.array([10, 10, 10, 0, 1, 1])
    mean = np.array([0.5, 0.5, 0.5, 0.0, 0.2, 0.2])
    var = np.array([0.01, 0.02, 0.01, np.nan, np.nan, 3.0])
    assert distinct_samples(n, mean, var) == [0, 1, 4]
