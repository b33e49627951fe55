"""The results contract between the chain and the fit (docs/results-contract.md).

A run folder holds `metrics.nc` (METRICS_FILE): one dataset with

- the coordinates `condition` (unique names) and `iteration` (non-negative integers; 0 = the original
  images D_0, k = the images of M_k),
- the attribute `schema_version` = SCHEMA_VERSION,
- optionally the attribute `data_kind` (DATA_KIND_ATTR): "chain" when the images of an iteration are a
  chain's population (each trained on the previous one; `qtm chain run` writes it), "independent" when each
  cell holds independent draws from a model; `data_kind(ds)` reads it,
- either the per-image phenotype `hf_power` (condition, iteration, image; a power fraction >= 0, NaN = not
  produced), or the summary trio `hf_power_mean`, `hf_power_std`, `num_images` (condition, iteration;
  `hf_power_std` is the sample sd, ddof 1, unless the variable carries the attribute ddof = 0).

Optional: `hf_power_reference` (REFERENCE_PHENOTYPE; condition, iteration, image), the phenotypes of the
selection assay's reference set (images of the same model, prompts and seeds at the constant guidance scale
given by its attribute `reference_scale`, never trained on; NaN = not produced). `read_reference` checks it.

That is all a reader may rely on, so a dataset written by hand with plain xarray qualifies. The chain
writes more (chain.store: the CFG settings per condition, spectra, feature metrics, diagnostics), and
trajectories carry the same schema version; a fit (fit.nc beside metrics.nc) has its own,
FIT_SCHEMA_VERSION. `read_phenotypes` checks a dataset against the contract and returns its content; every
violation is a ContractError naming the file, the variable and the fix.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

from qtmio.errors import ContractError

SCHEMA_VERSION = 1
"""`schema_version` of metrics.nc and of trajectory datasets."""
FIT_SCHEMA_VERSION = 1
"""`fit_schema_version` of a fit dataset (fitting.results: fit.nc, read by `qtm report`)."""
METRICS_FILE = "metrics.nc"
FIT_FILE = "fit.nc"
PHENOTYPE = "hf_power"
REFERENCE_PHENOTYPE = "hf_power_reference"
"""Optional per-image phenotype of the selection assay's reference set (module docstring)."""
SUMMARY_VARIABLES = ("hf_power_mean", "hf_power_std", "num_images")
CONDITION_VARIABLES = ("cfg_scale", "cfg_schedule", "condition_drop")
"""Per condition (written by the chain, not required): the CFG scale, the schedule's name, the condition drop."""
METRIC_NAMES = ("fd_dinov2", "recall", "sfd", "clip_score")
"""Per (condition, iteration) (written by the chain, NaN when not configured): feature metrics against D_0."""
DATA_KIND_ATTR = "data_kind"
"""Attribute saying what the images of a cell are: one of DATA_KINDS[:2]."""
DATA_KINDS = ("chain", "independent", "unknown")


def data_kind(ds: Any) -> str:
    """Whether a results dataset holds a chain's images (each iteration trained on the previous one) or
    independent draws.

    Rule, in order: the attribute `data_kind` ("chain" or "independent") when present (`qtm chain run`
    writes "chain"); else "chain" when the dataset has the layout only `qtm chain run` writes (the
    per-cell variable `completed` and the attribute `base_model`, as in run folders written before the
    attribute existed); else "unknown"."""
    kind = str(ds.attrs.get(DATA_KIND_ATTR, "")).strip().lower()
    if kind in DATA_KINDS[:2]:
        return kind
    if "completed" in ds.data_vars and "base_model" in ds.attrs:
        return "chain"
    return "unknown"


@dataclasses.dataclass(frozen=True)
class Phenotypes:
    """The content of a results dataset, checked, with iterations in increasing order.

    `values` (C, I, N) are the per-image phenotypes (NaN = not produced), or None for the summary form,
    which fills `mean`, `std` and `num_images` (C, I) instead (`std` with `ddof`; num_images 0 where NaN).
    """

    conditions: tuple[str, ...]
    iterations: np.ndarray
    values: np.ndarray | None = None
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    num_images: np.ndarray | None = None
    ddof: int = 1


def results_file(path: str | os.PathLike) -> Path:
    """The dataset of a run folder (results/NAME, holding metrics.nc) or a .nc file itself."""
    p = Path(path)
    if p.is_dir():
        candidate = p / METRICS_FILE
        if not candidate.is_file():
            raise ContractError(f"{p}: directory holds no {METRICS_FILE}; pass a run directory (results/NAME) "
                                "or a .nc file")
        return candidate
    if not p.exists():
        raise ContractError(f"{p}: no such file or directory; pass a run directory (results/NAME) or a .nc file")
    return p


def read_results(path: str | os.PathLike) -> Any:
    """The dataset of `results_file(path)`, loaded into memory (any reader failure is a ContractError)."""
    from qtmio.netcdf import read_netcdf

    file = results_file(path)
    try:
        return read_netcdf(file)
    except Exception as exc:  # noqa: BLE001 - any reader failure becomes one clear message
        raise ContractError(f"{file}: cannot read as a netCDF4/HDF5 dataset ({type(exc).__name__}: {exc}); "
                            "write it with xarray's to_netcdf(engine='h5netcdf')") from exc


def read_phenotypes(ds: Any, *, source: str = "<dataset>") -> Phenotypes:
    """Check an xarray Dataset against the contract and return its phenotypes (module docstring)."""
    check_schema(ds, source)
    conditions, iterations, order = read_coordinates(ds, source)
    if PHENOTYPE in ds.data_vars:
        return Phenotypes(conditions, iterations, values=_phenotype_values(ds, conditions, iterations, order,
                                                                           source))
    present = [v for v in SUMMARY_VARIABLES if v in ds.data_vars]
    if not present:
        raise ContractError(
            f"{source}: variable '{PHENOTYPE}' is missing (and so is the summary trio "
            f"{', '.join(SUMMARY_VARIABLES)}); the contract needs per-image phenotypes '{PHENOTYPE}' "
            "(condition, iteration, image) or the summary trio (condition, iteration)")
    missing = [v for v in SUMMARY_VARIABLES if v not in ds.data_vars]
    if missing:
        raise ContractError(f"{source}: variable '{missing[0]}' is missing; the summary-only form needs all of "
                            f"{', '.join(SUMMARY_VARIABLES)} over (condition, iteration)")
    return _summary(ds, conditions, iterations, order, source)


def read_coordinates(ds: Any, source: str) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """The checked coordinates of a results dataset: (conditions, iterations in increasing order, the order
    that sorts the dataset's iteration axis so). ContractError names what is wrong."""
    for coord in ("condition", "iteration"):
        if coord not in ds.coords and coord not in ds.dims:
            raise ContractError(f"{source}: coordinate '{coord}' is missing; the dimensions 'condition' and "
                                "'iteration' are required (docs/results-contract.md)")
    conditions = [str(c) for c in np.asarray(ds["condition"].values).tolist()]
    if len(set(conditions)) != len(conditions):
        raise ContractError(f"{source}: coordinate 'condition' has repeated names {conditions}")
    iterations = np.asarray(ds["iteration"].values)
    if not np.issubdtype(iterations.dtype, np.number) or np.any(iterations < 0) \
            or np.any(iterations != np.round(iterations)):
        raise ContractError(f"{source}: coordinate 'iteration' must hold non-negative integers, "
                            f"got {iterations.tolist()}")
    iterations = iterations.astype(np.int64)
    if len(np.unique(iterations)) != len(iterations):
        raise ContractError(f"{source}: coordinate 'iteration' has repeated values {iterations.tolist()}")
    order = np.argsort(iterations, kind="stable")
    conditions, iterations = tuple(conditions), iterations[order]
    return conditions, iterations, order


def read_reference(ds: Any, *, source: str = "<dataset>") -> np.ndarray | None:
    """The optional reference phenotypes `hf_power_reference` (C, I, N) in the dataset's condition order and
    increasing iteration order (as read_phenotypes), or None when the dataset has none. Values must be NaN or
    finite and >= 0 (all NaN is allowed: a run without the assay)."""
    if REFERENCE_PHENOTYPE not in ds.data_vars:
        return None
    order = np.argsort(np.asarray(ds["iteration"].values), kind="stable")
    x = _ordered(ds[REFERENCE_PHENOTYPE], ("condition", "iteration", "image"), source, REFERENCE_PHENOTYPE)[:, order]
    if np.any(np.isinf(x)) or np.any(x < 0):
        raise ContractError(f"{source}: variable '{REFERENCE_PHENOTYPE}' holds infinite or negative values; the "
                            "phenotype is a power fraction >= 0, NaN for images not produced")
    return x


def check_schema(ds: Any, source: str) -> None:
    """Raise ContractError unless ds.attrs['schema_version'] is SCHEMA_VERSION."""
    version = ds.attrs.get("schema_version")
    if version is None:
        raise ContractError(f"{source}: attribute 'schema_version' is missing; set "
                            f"ds.attrs['schema_version'] = {SCHEMA_VERSION} (docs/results-contract.md)")
    try:
        ok = float(np.asarray(version).item()) == SCHEMA_VERSION
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ContractError(f"{source}: attribute 'schema_version' is {version!r}; this version of qtm reads "
                            f"schema_version {SCHEMA_VERSION}")


def _ordered(da, dims: tuple[str, ...], source: str, name: str) -> np.ndarray:
    missing = [d for d in dims if d not in da.dims]
    extra = [d for d in da.dims if d not in dims]
    if missing or extra:
        raise ContractError(f"{source}: variable '{name}' has dimensions {tuple(da.dims)}; expected {dims}")
    try:
        return np.asarray(da.transpose(*dims).values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ContractError(f"{source}: variable '{name}' is not numeric ({da.dtype})") from exc


def _phenotype_values(ds, conditions, iterations, order, source) -> np.ndarray:
    da = ds[PHENOTYPE]
    if "image" not in da.dims and set(da.dims) == {"condition", "iteration"}:
        raise ContractError(f"{source}: variable '{PHENOTYPE}' has no 'image' dimension; per-image phenotypes "
                            f"are (condition, iteration, image), summaries go in {', '.join(SUMMARY_VARIABLES)}")
    x = _ordered(da, ("condition", "iteration", "image"), source, PHENOTYPE)[:, order]
    if np.any(np.isinf(x)):
        raise ContractError(f"{source}: variable '{PHENOTYPE}' holds infinite values; use NaN for images not "
                            "produced")
    if np.any(x < 0):
        c, k, i = np.argwhere(x < 0)[0]
        raise ContractError(f"{source}: variable '{PHENOTYPE}' holds negative phenotypes (e.g. {x[c, k, i]:.4g} "
                            f"at condition '{conditions[c]}', iteration {iterations[k]}, image {i}); the "
                            "phenotype is a power fraction >= 0")
    if not np.any(np.isfinite(x)):
        raise ContractError(f"{source}: variable '{PHENOTYPE}' holds only NaN (no image measured yet)")
    return x


def _summary(ds, conditions, iterations, order, source) -> Phenotypes:
    dims = ("condition", "iteration")
    mean = _ordered(ds["hf_power_mean"], dims, source, "hf_power_mean")[:, order]
    std = _ordered(ds["hf_power_std"], dims, source, "hf_power_std")[:, order]
    num = _ordered(ds["num_images"], dims, source, "num_images")[:, order]
    for name, values in (("hf_power_mean", mean), ("hf_power_std", std), ("num_images", num)):
        if np.any(np.isinf(values)):
            raise ContractError(f"{source}: variable '{name}' holds infinite values; use NaN for cells not "
                                "produced")
        if np.any(values < 0):
            raise ContractError(f"{source}: variable '{name}' holds negative values; it must be >= 0")
    num = np.where(np.isfinite(num), num, 0.0)
    if np.any(num != np.round(num)):
        raise ContractError(f"{source}: variable 'num_images' must hold whole numbers of images")
    have = num > 0
    if not np.any(have & np.isfinite(mean)):
        raise ContractError(f"{source}: variable 'hf_power_mean' holds only NaN (or num_images is 0 everywhere)")
    if np.any(have & ~np.isfinite(mean)):
        raise ContractError(f"{source}: variable 'hf_power_mean' is NaN where num_images > 0; set num_images "
                            "to 0 for cells without data")
    if np.any((num > 1) & ~np.isfinite(std)):
        raise ContractError(f"{source}: variable 'hf_power_std' is NaN where num_images > 1")
    ddof = int(ds["hf_power_std"].attrs.get("ddof", 1))
    if ddof not in (0, 1):
        raise ContractError(f"{source}: variable 'hf_power_std' has attribute ddof={ddof}; use 0 or 1")
    return Phenotypes(conditions, iterations, mean=mean, std=std, num_images=num, ddof=ddof)
