"""Observations for the fit: per condition and iteration, the sufficient statistics of the phenotype.

Reads the results contract (qtmio.contract; docs/results-contract.md): a run directory holding
`metrics.nc`, or a netCDF file, with either the per-image phenotype `hf_power` (condition, iteration, image;
NaN = not produced) or the summary-only trio `hf_power_mean`, `hf_power_std`, `num_images` (condition,
iteration). Only those variables, the coordinates `condition` and `iteration` and the attribute
`schema_version` (= 1) are required, so a dataset written by hand with plain xarray works.

Every problem is an `ObservationError` whose message names the file, the variable and the fix.

The fit needs only the sufficient statistics of each (condition, iteration) cell: the number of images n,
their mean and their sample variance s^2 (ddof = 1). `hf_power_std` of the summary form is read as that sample
standard deviation (ddof = 1) unless the variable carries the attribute `ddof = 0`.

Iteration 0 (the original images D_0) is the same real data for every condition (docs/model.md section 6), so it
enters the likelihood once: conditions whose iteration-0 statistics coincide are merged, and distinct ones
(e.g. different subsets of D_0) are pooled as one sample.

A run still in progress can be fitted (one process runs every iteration of one condition before the next;
shards run several conditions at once, docs/scaling.md): conditions with no data at any iteration >= 1 yet
are left out with a note ("condition X has no finished iteration yet; left out"), and conditions that stop
short of the others' last iteration are fitted up to their last finished iteration with a note naming them;
the fit reports both among its warnings. Only when no condition has an iteration >= 1 is the dataset
refused.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from fitting.errors import FittingError, ObservationError
from qtmio.contract import PHENOTYPE, data_kind, read_phenotypes, read_results, results_file
from qtmio.errors import ContractError


@dataclasses.dataclass(frozen=True)
class Observations:
    """Sufficient statistics per (condition, iteration), plus the per-image phenotypes when available.

    Attributes:
        conditions: condition names, in dataset order.
        iterations: (I,) observed iteration numbers, increasing, non-negative integers.
        num_images: (C, I) images per cell (0 = no data there).
        mean: (C, I) sample mean of the phenotype (NaN where num_images = 0).
        var: (C, I) sample variance, ddof = 1 (NaN where num_images < 2).
        phenotypes: (C, I, N) per-image phenotypes (NaN = missing), or None for the summary-only form.
        source: where the data came from (for messages and provenance).
        notes: remarks made while reading (e.g. pooled iteration 0).
        kind: "chain" (the images of an iteration are the chain's population, `data_kind`),
            "independent" or "unknown".
    """

    conditions: tuple[str, ...]
    iterations: np.ndarray
    num_images: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    phenotypes: np.ndarray | None
    source: str = "<memory>"
    notes: tuple[str, ...] = ()
    kind: str = "unknown"

    @property
    def num_conditions(self) -> int:
        return len(self.conditions)

    @property
    def max_iteration(self) -> int:
        return int(self.iterations.max())

    def restrict(self, max_iteration: int) -> Observations:
        """The observations of iterations <= max_iteration (the training part of a forecast)."""
        keep = self.iterations <= max_iteration
        if int(keep.sum()) < 2:
            raise ObservationError(
                f"{self.source}: iterations <= {max_iteration} are {int(keep.sum())} iteration(s) "
                f"(observed iterations {self.iterations.tolist()}); need at least 2 to fit"
            )
        return dataclasses.replace(
            self,
            iterations=self.iterations[keep],
            num_images=self.num_images[:, keep],
            mean=self.mean[:, keep],
            var=self.var[:, keep],
            phenotypes=None if self.phenotypes is None else self.phenotypes[:, keep],
        )

    def resample_images(self, image_index: np.ndarray) -> Observations:
        """The observations recomputed on images `image_index` (a paired bootstrap draw: the same image
        indices for every condition and iteration)."""
        if self.phenotypes is None:
            raise ObservationError(
                f"{self.source}: a bootstrap over images needs the per-image variable '{PHENOTYPE}'; "
                "this dataset holds only the summary trio (a laplace or profile interval needs no more)"
            )
        return from_phenotypes(self.conditions, self.iterations, self.phenotypes[:, :, image_index],
                               source=self.source)


@dataclasses.dataclass(frozen=True)
class CellStatistics:
    """The flat list of independent observations the likelihood sums over (iteration 0 counted once).

    Arrays of shape (M,): condition index, iteration number, n, mean, sample variance (0 where n < 2).
    """

    condition_index: np.ndarray
    iteration: np.ndarray
    num_images: np.ndarray
    mean: np.ndarray
    var: np.ndarray

    @property
    def num_observations(self) -> int:
        """Total number of phenotype values behind the statistics (the n of BIC)."""
        return int(self.num_images.sum())


def cell_statistics(obs: Observations) -> CellStatistics:
    """Flatten `obs` into independent cells; iteration 0 enters once (docs/model.md section 6).

    Iteration 0 of all conditions is merged: identical statistics count once, distinct ones are pooled
    (pooled n, mean, and ddof-1 variance of the union of the samples).
    """
    cond, it, n, mean, var = [], [], [], [], []
    for j, iteration in enumerate(obs.iterations.tolist()):
        if iteration == 0:
            groups = _unique_cells(obs.num_images[:, j], obs.mean[:, j], obs.var[:, j])
            if groups:
                pn, pm, pv = _pool(groups)
                cond.append(0), it.append(0), n.append(pn), mean.append(pm), var.append(pv)
            continue
        for c in range(obs.num_conditions):
            if obs.num_images[c, j] > 0:
                cond.append(c), it.append(iteration), n.append(obs.num_images[c, j])
                mean.append(obs.mean[c, j])
                var.append(obs.var[c, j] if obs.num_images[c, j] >= 2 else 0.0)
    return CellStatistics(
        condition_index=np.asarray(cond, dtype=np.int64),
        iteration=np.asarray(it, dtype=np.int64),
        num_images=np.asarray(n, dtype=np.float64),
        mean=np.asarray(mean, dtype=np.float64),
        var=np.asarray(var, dtype=np.float64),
    )


def distinct_samples(n: np.ndarray, mean: np.ndarray, var: np.ndarray) -> list[int]:
    """The rows (conditions) of one iteration's (n, mean, var) whose sample is the first of its kind: the rule
    by which iteration 0 enters the likelihood, the Jacobian and the goodness of fit once. Two rows hold the
    same sample when n, mean and variance agree (to 1e-12 relative; a one-image cell has variance 0); rows
    with no image hold none."""
    seen: list[tuple[float, float, float]] = []
    rows = []
    for row, (nc, mc, vc) in enumerate(zip(np.asarray(n).tolist(), np.asarray(mean).tolist(),
                                           np.asarray(var).tolist())):
        if nc <= 0:
            continue
        vc = 0.0 if nc < 2 else vc
        if not any(nc == a and np.isclose(mc, b, rtol=1e-12, atol=0) and np.isclose(vc, c, rtol=1e-12, atol=0)
                   for a, b, c in seen):
            seen.append((nc, mc, vc))
            rows.append(row)
    return rows


def _unique_cells(n: np.ndarray, mean: np.ndarray, var: np.ndarray) -> list[tuple[float, float, float]]:
    """(n, mean, var) of each distinct sample (`distinct_samples`)."""
    return [(float(n[r]), float(mean[r]), 0.0 if n[r] < 2 else float(var[r])) for r in distinct_samples(n, mean, var)]


def _pool(groups: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    """n, mean and ddof-1 variance of the union of samples given by (n, mean, var) each."""
    n = np.array([g[0] for g in groups], dtype=np.float64)
    m = np.array([g[1] for g in groups])
    v = np.array([g[2] for g in groups])
    total = n.sum()
    grand = float((n * m).sum() / total)
    ss = float(((n - 1) * v).sum() + (n * (m - grand) ** 2).sum())
    return float(total), grand, ss / (total - 1) if total > 1 else 0.0


# ------------------------------------------------------------------------------------------------ builders

def sample_moments(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Count, mean and sample variance (ddof 1) over the last axis, NaN marking a missing value:
    n = #finite, mean = sum / n (NaN where n = 0), var = sum (x - mean)^2 / (n - 1) (NaN where n < 2)."""
    x = np.asarray(values, dtype=np.float64)
    valid = np.isfinite(x)
    n = valid.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        total = np.where(valid, x, 0.0).sum(axis=-1)
        mean = np.where(n > 0, total / np.maximum(n, 1), np.nan)
        dev = np.where(valid, x - mean[..., None], 0.0)
        var = np.where(n > 1, (dev**2).sum(axis=-1) / np.maximum(n - 1, 1), np.nan)
    return n, mean, var


def from_phenotypes(conditions, iterations, phenotypes, *, source: str = "<memory>") -> Observations:
    """Observations from per-image phenotypes (C, I, N); NaN marks an image not produced."""
    x = np.asarray(phenotypes, dtype=np.float64)
    n, mean, var = sample_moments(x)
    return Observations(
        conditions=tuple(str(c) for c in conditions),
        iterations=np.asarray(iterations, dtype=np.int64),
        num_images=n.astype(np.int64),
        mean=mean,
        var=var,
        phenotypes=x,
        source=source,
    )


def from_summary(conditions, iterations, mean, std, num_images, *, ddof: int = 1,
                 source: str = "<memory>") -> Observations:
    """Observations from the summary trio (C, I) each; std with the given ddof (1 = sample sd)."""
    n = np.asarray(num_images, dtype=np.float64)
    n = np.where(np.isfinite(n), n, 0.0).astype(np.int64)
    m = np.where(n > 0, np.asarray(mean, dtype=np.float64), np.nan)
    sd = np.asarray(std, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        var = sd**2 * (n - ddof) / np.maximum(n - 1, 1) if ddof == 0 else sd**2
        var = np.where(n > 1, var, np.nan)
    return Observations(
        conditions=tuple(str(c) for c in conditions),
        iterations=np.asarray(iterations, dtype=np.int64),
        num_images=n,
        mean=m,
        var=var,
        phenotypes=None,
        source=source,
    )


# ------------------------------------------------------------------------------------------------ reading

def read_run(path: str | Path, error: type[FittingError] = ObservationError) -> tuple[Path, Any]:
    """The results file of a run directory (results/NAME, holding metrics.nc) or a .nc file, and its
    dataset (qtmio.contract.results_file, read_results); a ContractError is raised again as `error`."""
    try:
        file = results_file(path)
        return file, read_results(file)
    except ContractError as err:
        raise error(str(err)) from err


def load_observations(path: str | Path) -> Observations:
    """Read a run directory (results/NAME, holding metrics.nc) or a .nc file of the results contract
    (qtmio.contract) and extract its observations. Raises ObservationError."""
    file, ds = read_run(path)
    return observations_from_dataset(ds, source=str(file))


def observations_from_dataset(ds: Any, *, source: str = "<dataset>") -> Observations:
    """Validate an xarray Dataset of the results contract and extract its observations."""
    try:
        data = read_phenotypes(ds, source=source)
    except ContractError as err:
        raise ObservationError(str(err)) from err
    if data.values is not None:
        obs = from_phenotypes(data.conditions, data.iterations, data.values, source=source)
    else:
        obs = from_summary(data.conditions, data.iterations, data.mean, data.std, data.num_images, ddof=data.ddof,
                           source=source)
    _check_content(obs, source)
    obs = dataclasses.replace(obs, kind=data_kind(ds))
    return _note_iteration_zero(_note_partial(_drop_unfinished(obs)))


def _check_content(obs: Observations, source: str) -> None:
    name = PHENOTYPE if obs.phenotypes is not None else "hf_power_mean"
    have_iteration = (obs.num_images > 0).any(axis=0)
    if not np.any(have_iteration & (obs.iterations > 0)):
        raise ObservationError(f"{source}: variable '{name}' has data only at iteration 0 (no condition has a "
                               "finished iteration >= 1 yet); the fit needs at least 2 iterations: wait until "
                               "the chain has measured iteration 1 of a condition")
    if int(have_iteration.sum()) < 2:
        raise ObservationError(f"{source}: variable '{name}' has data at {int(have_iteration.sum())} "
                               f"iteration(s) ({obs.iterations[have_iteration].tolist()}); the fit needs at "
                               "least 2 iterations")


def unfinished_conditions(obs: Observations) -> list[int]:
    """Indices of the conditions without data at any iteration >= 1 (at most the shared D_0 so far)."""
    later = (obs.iterations > 0)[None, :] & (obs.num_images > 0)
    return np.flatnonzero(~later.any(axis=1)).tolist()


def _drop_unfinished(obs: Observations) -> Observations:
    """Leave out the conditions of a run still in progress that have no iteration >= 1 yet.

    The chain runs every iteration of one condition before the next, so the last conditions may hold
    only iteration 0 (the shared D_0, docs/model.md section 6): they carry no information on their own
    selection. They are dropped with a note (it reaches the fit's warnings); `_check_content` has
    already made sure that some condition has an iteration >= 1.
    """
    drop = unfinished_conditions(obs)
    if not drop:
        return obs
    keep = np.array([c for c in range(obs.num_conditions) if c not in drop], dtype=np.int64)
    notes = tuple(f"condition {obs.conditions[c]} has no finished iteration yet; left out" for c in drop)
    return dataclasses.replace(
        obs,
        conditions=tuple(obs.conditions[c] for c in keep.tolist()),
        num_images=obs.num_images[keep],
        mean=obs.mean[keep],
        var=obs.var[keep],
        phenotypes=None if obs.phenotypes is None else obs.phenotypes[keep],
        notes=obs.notes + notes,
    )


def _note_partial(obs: Observations) -> Observations:
    """A note per condition whose data stop before the last iteration any condition reached (a shard still
    running, or stopped): it is fitted up to its last finished iteration (cells without data carry no
    likelihood)."""
    have = obs.num_images > 0
    last = np.where(have.any(axis=1), np.argmax(np.where(have, obs.iterations[None, :], -1), axis=1), -1)
    reached = int(last.max()) if last.size else -1
    notes = tuple(
        f"condition {name} has finished iterations up to {int(obs.iterations[last[c]])} of "
        f"{int(obs.iterations[reached])} (still running, or stopped); fitted up to there"
        for c, name in enumerate(obs.conditions) if last[c] < reached)
    return dataclasses.replace(obs, notes=obs.notes + notes) if notes else obs


def _note_iteration_zero(obs: Observations) -> Observations:
    where = np.flatnonzero(obs.iterations == 0)
    if where.size == 0:
        return dataclasses.replace(obs, notes=obs.notes + (
            "no iteration 0: mu0 and sigma_g0 are inferred from later iterations only",))
    j = int(where[0])
    groups = _unique_cells(obs.num_images[:, j], obs.mean[:, j], obs.var[:, j])
    if len(groups) > 1:
        return dataclasses.replace(obs, notes=obs.notes + (
            f"iteration 0 differs between conditions ({len(groups)} distinct samples); pooled as one sample "
            "of D_0",))
    return obs


def observed_summary(obs: Observations) -> dict[str, np.ndarray]:
    """Per (condition, iteration): n, mean, sd and the standard error of the mean (for tables and plots)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        sd = np.sqrt(obs.var)
        se = sd / np.sqrt(obs.num_images)
    return {"num_images": obs.num_images, "mean": obs.mean, "sd": sd, "se": se}
