"""Trajectory datasets (dims, variables, attrs) written and read back."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
import xarray as xr

from qtm.dataset import params_from_attrs, population_dataset, provenance, trajectory_dataset
from qtm.montecarlo import simulate_population
from qtm.params import TraitParams
from qtm.recursion import trajectory
from qtmio.netcdf import write_netcdf

NAMES = ("mean", "var_genetic", "var_phenotype", "heritability", "selection_differential", "response")


def test_trajectory_dataset_roundtrip(tmp_path):
    p = TraitParams(r1=0.3, r2=0.1, tail_rate=2.0, sigma_mut=0.1, mutation_mode="additive")
    ds = trajectory_dataset(p, trajectory(p, 5), attrs=provenance(seed=None, command="qtm simulate x"))
    assert dict(ds.sizes) == {"iteration": 6} and set(NAMES) <= set(ds.data_vars)
    np.testing.assert_array_equal(ds["iteration"].values, np.arange(6))
    path = write_netcdf(ds, tmp_path / "a" / "t.nc")
    back = xr.open_dataset(path, engine="h5netcdf")
    xr.testing.assert_identical(back.load(), ds)
    assert params_from_attrs(back.attrs) == p
    for key in ("created_at", "git_revision", "version_jax", "version_xarray", "command", "schema_version"):
        assert key in back.attrs
    assert all(back[name].attrs["long_name"] for name in NAMES)
    back.close()
    assert [f.name for f in (tmp_path / "a").iterdir()] == ["t.nc"]
    with pytest.raises(ValueError, match="one trajectory"):
        trajectory_dataset(p, trajectory(TraitParams(r1=np.array([0.1, 0.2])), 3))


def test_population_dataset_heritability_and_nan_tail():
    p = TraitParams(sigma_mut=0.2)  # paper mode: h2 = V_G / (V_G + V_E + V_M)
    pop = simulate_population(p, 3, population=200, replicates=4, key=jax.random.key(0))
    ds = population_dataset(p, pop, attrs=provenance(seed=0, population=200, flag=True))
    assert dict(ds.sizes) == {"replicate": 4, "iteration": 4}
    vg = ds["var_genetic"].values
    np.testing.assert_allclose(ds["heritability"].values, vg / (vg + 0.0625 + 0.04), rtol=1e-14)
    assert np.all(np.isnan(ds["response"].values[:, -1]))
    np.testing.assert_allclose(ds["response"].values[:, :-1], np.diff(ds["mean"].values, axis=1), rtol=1e-12)
    assert ds.attrs["seed"] == 0 and ds.attrs["flag"] == 1 and math.isinf(ds.attrs["tail_rate"])
