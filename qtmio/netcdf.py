"""Datasets to and from netCDF4/HDF5 files (the h5netcdf engine): the one format of every result.

`write_netcdf` is the only netCDF writer of the project and `read_netcdf` the only reader of whole files.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from qtmio.atomic import atomic_write_path


def netcdf_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """netCDF attrs hold strings and numbers only: bools become 0/1, None becomes '', numpy scalars Python
    numbers, anything else its str()."""
    out: dict[str, Any] = {}
    for key, value in attrs.items():
        if isinstance(value, bool):
            value = int(value)
        elif value is None:
            value = ""
        elif isinstance(value, np.generic):
            value = value.item()
        elif not isinstance(value, (str, int, float)):
            value = str(value)
        out[key] = value
    return out


def write_netcdf(ds: xr.Dataset, path: str | os.PathLike) -> Path:
    """Write `ds` atomically: readers never see a half-written file, and a failed write (e.g. an attribute
    netCDF cannot hold: build attrs with `netcdf_attrs`) leaves the old file. Missing parent folders are
    created."""
    path = Path(path)
    with atomic_write_path(path) as tmp:
        ds.to_netcdf(tmp, engine="h5netcdf")
    return path


def read_netcdf(path: str | os.PathLike) -> xr.Dataset:
    """Load a netCDF file fully into memory and close it again (so that it can be replaced while in use)."""
    with xr.open_dataset(path, engine="h5netcdf") as ds:
        return ds.load()
