"""qtmio.netcdf: the one writer and reader of datasets."""

from __future__ import annotations

import os

import numpy as np
import pytest
import xarray as xr

from qtmio.netcdf import netcdf_attrs, read_netcdf, write_netcdf


def _dataset() -> xr.Dataset:
    return xr.Dataset(
        {"hf_power": (("condition", "image"), np.array([[0.1, np.nan], [0.3, 0.4]])),
         "schedule": (("condition",), np.array(["constant", "exponential"], dtype=object))},
        coords={"condition": np.array(["a", "b"], dtype=object), "image": [0, 1]},
        attrs={"schema_version": 1, "config": "[run]\nseed = 3\n"},
    )


def test_round_trip_is_identical_and_the_file_is_closed(tmp_path):
    ds = _dataset()
    path = write_netcdf(ds, tmp_path / "sub" / "m.nc")
    back = read_netcdf(path)
    xr.testing.assert_identical(back, ds)
    # read_netcdf loaded everything and closed the file: it can be replaced while `back` is in use
    write_netcdf(ds.assign_attrs(schema_version=2), path)
    assert read_netcdf(path).attrs["schema_version"] == 2 and back.attrs["schema_version"] == 1
    assert float(back["hf_power"].sel(condition="b", image=1)) == 0.4


def test_failed_write_keeps_the_old_file(tmp_path):
    good = _dataset()
    path = write_netcdf(good, tmp_path / "t.nc")
    before = path.read_bytes()
    bad = good.assign_attrs(unstorable={"a": 1})  # netCDF cannot store a dict attribute
    with pytest.raises(Exception):
        write_netcdf(bad, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["t.nc"]


def test_netcdf_attrs_keeps_strings_and_numbers_only():
    out = netcdf_attrs({"flag": True, "none": None, "x": np.float64(0.5), "n": np.int64(3), "t": (1, 2),
                        "s": "text", "k": 7})
    assert out == {"flag": 1, "none": "", "x": 0.5, "n": 3, "t": "(1, 2)", "s": "text", "k": 7}
    assert type(out["x"]) is float and type(out["n"]) is int and type(out["flag"]) is int
