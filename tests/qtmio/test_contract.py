"""qtmio.contract: the results contract, checked directly and through a round trip from the chain's writer
(chain.store) to the fit's reader (fitting.observations) with nothing else in between."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from chain import store
from fitting.observations import load_observations
from qtmio.contract import (CONDITION_VARIABLES, METRIC_NAMES, METRICS_FILE, PHENOTYPE, REFERENCE_PHENOTYPE,
                            SCHEMA_VERSION, read_phenotypes, read_reference, results_file)
from qtmio.errors import ContractError
from qtmio.netcdf import write_netcdf

CONDITIONS = ["cfg1", "cfg7.5", "redifine"]


def _empty(num_iterations=3, num_images=6):
    return store.empty_dataset(
        conditions=CONDITIONS, cfg_scale=[1.0, 7.5, 7.5], cfg_schedule=["constant", "constant", "exponential"],
        condition_drop=[0.0, 0.0, 0.2], num_iterations=num_iterations, num_images=num_images, images_per_prompt=1,
        frequencies=np.linspace(0.0, 0.5, 5), angles=np.arange(16) * np.pi / 16, num_steps=4,
        latent_bin_edges=np.linspace(-1.0, 1.0, 5), attrs={"seed": 3})


def _record(ds, condition, iteration, values):
    return store.record(ds, condition=condition, iteration=iteration, hf_power=values,
                        radial_psd=np.full(5, 0.2), angular_psd=np.full(16, 1 / 16))


def test_chain_store_to_fitting_observations_round_trip(tmp_path):
    """A run in progress: D_0 shared, cfg1 finished (iterations 1-3, one constant image with NaN phenotype),
    cfg7.5 at iteration 2, redifine not started. The fit reads exactly what the chain recorded."""
    rng = np.random.default_rng(4)
    ds = _empty()
    recorded = {}
    x0 = rng.uniform(0.05, 0.3, 6)
    ds = _record(ds, None, 0, x0)
    for condition, last in (("cfg1", 3), ("cfg7.5", 2)):
        recorded[condition] = [x0]
        for k in range(1, last + 1):
            x = rng.uniform(0.05, 0.3, 6)
            if (condition, k) == ("cfg1", 2):
                x[4] = np.nan  # a constant image: phenotype undefined
            ds = _record(ds, condition, k, x)
            recorded[condition].append(x)
    run = tmp_path / "run"
    write_netcdf(ds, run / METRICS_FILE)

    obs = load_observations(run)
    assert obs.conditions == ("cfg1", "cfg7.5") and obs.source == str(run / METRICS_FILE)
    assert any("redifine has no finished iteration yet" in note for note in obs.notes)
    np.testing.assert_array_equal(obs.iterations, [0, 1, 2, 3])
    np.testing.assert_array_equal(obs.num_images, [[6, 6, 5, 6], [6, 6, 6, 0]])
    for c, condition in enumerate(("cfg1", "cfg7.5")):
        for k, x in enumerate(recorded[condition]):
            finite = x[np.isfinite(x)]
            assert obs.mean[c, k] == pytest.approx(finite.mean(), rel=1e-14)
            assert obs.var[c, k] == pytest.approx(finite.var(ddof=1), rel=1e-12)
            np.testing.assert_array_equal(obs.phenotypes[c, k], x)
    assert np.isnan(obs.mean[1, 3]) and np.all(np.isnan(obs.phenotypes[1, 3]))


def test_the_chain_writes_the_contract_and_its_extras():
    ds = _empty()
    assert ds.attrs["schema_version"] == SCHEMA_VERSION
    assert ds[PHENOTYPE].dims == ("condition", "iteration", "image")
    for name in CONDITION_VARIABLES:
        assert ds[name].dims == ("condition",)
    for name in METRIC_NAMES:
        assert ds[name].dims == ("condition", "iteration") and bool(ds[name].isnull().all())


def test_iterations_come_back_in_order_with_their_rows():
    values = np.arange(2 * 3 * 2, dtype=float).reshape(2, 3, 2) / 100
    ds = xr.Dataset({PHENOTYPE: (("condition", "iteration", "image"), values)},
                    coords={"condition": ["a", "b"], "iteration": [2, 0, 1], "image": [0, 1]},
                    attrs={"schema_version": 1})
    data = read_phenotypes(ds, source="mem")
    assert data.conditions == ("a", "b") and data.mean is None
    np.testing.assert_array_equal(data.iterations, [0, 1, 2])
    np.testing.assert_array_equal(data.values, values[:, [1, 2, 0]])


def test_summary_form_with_its_ddof():
    mean = np.array([[0.2, 0.3]])
    std = np.array([[0.05, 0.04]])
    ds = xr.Dataset({"hf_power_mean": (("condition", "iteration"), mean),
                     "hf_power_std": (("condition", "iteration"), std, {"ddof": 0}),
                     "num_images": (("condition", "iteration"), np.array([[10.0, np.nan]]))},
                    coords={"condition": ["a"], "iteration": [0, 1]}, attrs={"schema_version": 1})
    data = read_phenotypes(ds)
    assert data.values is None and data.ddof == 0
    np.testing.assert_array_equal(data.num_images, [[10.0, 0.0]])  # NaN count: no data there
    np.testing.assert_array_equal(data.std, std)


@pytest.mark.parametrize(("change", "needle"), [
    (lambda ds: ds.drop_attrs(), "schema_version"),
    (lambda ds: ds.assign_attrs(schema_version=2), "schema_version"),
    (lambda ds: ds.assign_coords(iteration=[0, 0, 1]), "repeated values"),
    (lambda ds: ds.assign_coords(iteration=[0, -1, 1]), "non-negative"),
    (lambda ds: ds.assign_coords(condition=["a", "a"]), "repeated names"),
    (lambda ds: ds.assign({PHENOTYPE: ds[PHENOTYPE] * np.inf}), "infinite"),
    (lambda ds: ds.assign({PHENOTYPE: ds[PHENOTYPE].mean("image")}), "no 'image' dimension"),
    (lambda ds: ds.rename({PHENOTYPE: "other"}), "is missing"),
])
def test_violations_name_the_file_and_the_variable(change, needle):
    ds = xr.Dataset({PHENOTYPE: (("condition", "iteration", "image"), np.full((2, 3, 2), 0.2))},
                    coords={"condition": ["a", "b"], "iteration": [0, 1, 2], "image": [0, 1]},
                    attrs={"schema_version": 1})
    with pytest.raises(ContractError, match=needle) as info:
        read_phenotypes(change(ds), source="run/metrics.nc")
    assert str(info.value).startswith("run/metrics.nc: ")


def test_results_file_of_a_run_folder(tmp_path):
    with pytest.raises(ContractError, match="no such file"):
        results_file(tmp_path / "absent")
    with pytest.raises(ContractError, match="holds no metrics.nc"):
        results_file(tmp_path)
    (tmp_path / METRICS_FILE).write_bytes(b"")
    assert results_file(tmp_path) == tmp_path / METRICS_FILE
    assert results_file(tmp_path / METRICS_FILE) == tmp_path / METRICS_FILE


def test_reference_phenotypes_are_optional_and_read_in_iteration_order():
    """hf_power_reference: absent -> None; recorded values come back at their (condition, iteration, image),
    the images after the reference set NaN; iterations stored out of order are read in increasing order."""
    ds = _empty(num_iterations=2, num_images=4)
    assert read_reference(ds.drop_vars(REFERENCE_PHENOTYPE)) is None
    ds = _record(ds, None, 0, np.full(4, 0.1))
    ds = store.record(ds, condition="cfg7.5", iteration=2, hf_power=np.full(4, 0.2), radial_psd=np.full(5, 0.2),
                      angular_psd=np.full(16, 1 / 16), hf_power_reference=np.array([0.3, 0.4]))
    x = read_reference(ds.isel(iteration=[2, 0, 1]))
    assert x.shape == (3, 3, 4)
    np.testing.assert_array_equal(x[1, 2], [0.3, 0.4, np.nan, np.nan])
    assert np.isnan(np.delete(x.reshape(-1), [1 * 12 + 2 * 4, 1 * 12 + 2 * 4 + 1])).all()
    bad = ds.copy(deep=True)
    bad[REFERENCE_PHENOTYPE][0, 1, 0] = -1.0
    with pytest.raises(ContractError, match=REFERENCE_PHENOTYPE):
        read_reference(bad, source="m.nc")
