"""Trajectories as self-describing xarray Datasets (written with qtmio.netcdf.write_netcdf).

Dimensions: `iteration` (coordinate 0..K) and, for the Monte Carlo, `replicate`. Data variables:
`mean`, `var_genetic`, `var_phenotype`, `heritability`, `selection_differential`, `response` (each with a
`long_name` and a `definition`). Dataset attrs: the parameters (one attr per `TraitParams` field),
`model`, the provenance (qtmio.provenance: `created_at`, `git_revision`, package versions, and `seed`,
`population`, `replicates`, `command` where given) and `schema_version`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import xarray as xr

from qtm.params import TraitParams
from qtmio import provenance as _provenance
from qtmio.contract import SCHEMA_VERSION
from qtmio.netcdf import netcdf_attrs

VARIABLE_ATTRS: dict[str, dict[str, str]] = {
    "mean": {"long_name": "phenotype mean", "definition": "mu_t (docs/model.md section 3)"},
    "var_genetic": {"long_name": "additive genetic variance", "definition": "V_G,t"},
    "var_phenotype": {"long_name": "phenotypic variance", "definition": "V_P,t = V_G,t + V_E"},
    "heritability": {"long_name": "heritability",
                     "definition": "h2_t = V_G,t / (V_P,t + V_M) (paper mode, Eq. 16) or V_G,t / V_P,t "
                                   "(additive mode)"},
    "selection_differential": {"long_name": "selection differential",
                               "definition": "S_t = mean of the selected phenotypes - mean of iteration t"},
    "response": {"long_name": "response to selection",
                 "definition": "mean[t+1] - mean[t] (= h2_t S_t in the recursion, Eq. 6)"},
}

PACKAGES = ("qtm", "jax", "jaxlib", "numpy", "scipy", "xarray", "h5netcdf")


def provenance(*, seed: int | None = None, command: str | None = None, **extra: Any) -> dict[str, Any]:
    """Provenance attrs of a trajectory (qtmio.provenance with the theory's packages)."""
    return _provenance.provenance(PACKAGES, seed=seed, command=command, **extra)


def _heritability(params: TraitParams, var_genetic: np.ndarray) -> np.ndarray:
    from qtm import mutation

    var_env, var_mut = float(params.sigma_env) ** 2, float(params.sigma_mut) ** 2
    return np.asarray(mutation.heritability(var_genetic, var_genetic + var_env, var_mut, params.mutation_mode))


def _attrs(params: TraitParams, model: str, extra: Mapping[str, Any] | None) -> dict[str, Any]:
    attrs: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "model": model}
    attrs.update(params.to_dict())
    attrs.update(provenance() if extra is None else extra)
    return netcdf_attrs(attrs)


def trajectory_dataset(params: TraitParams, trajectory: Any, *,
                       attrs: Mapping[str, Any] | None = None) -> xr.Dataset:
    """Dataset (dim `iteration`) of one deterministic trajectory (`qtm.recursion.Trajectory` of shape (K+1,)).

    `attrs`: provenance to store (default: `provenance()`); the parameters are always added.
    """
    values = {name: np.asarray(getattr(trajectory, name), dtype=np.float64) for name in VARIABLE_ATTRS}
    if values["mean"].ndim != 1:
        raise ValueError(f"trajectory_dataset takes one trajectory of shape (K+1,); got shape "
                         f"{values['mean'].shape} (select one parameter setting first)")
    k1 = values["mean"].shape[0]
    ds = xr.Dataset(
        {name: (("iteration",), v, VARIABLE_ATTRS[name]) for name, v in values.items()},
        coords={"iteration": ("iteration", np.arange(k1), {"long_name": "iteration of the chain"})},
        attrs=_attrs(params, "moment recursion (docs/model.md section 3)", attrs),
    )
    return ds


def population_dataset(params: TraitParams, population_trajectory: Any, *,
                       attrs: Mapping[str, Any] | None = None) -> xr.Dataset:
    """Dataset (dims `replicate`, `iteration`) of a Monte Carlo run (`qtm.montecarlo.PopulationTrajectory`).

    Heritability is the model's h2_t at each replicate's state; selection_differential and response are
    the realized ones (NaN at the last iteration, whose selection is not simulated).
    """
    mean = np.asarray(population_trajectory.mean, dtype=np.float64)
    var_genetic = np.asarray(population_trajectory.var_genetic, dtype=np.float64)
    if mean.ndim != 2:
        raise ValueError(f"population_dataset takes arrays of shape (replicates, K+1); got {mean.shape}")
    nan = np.full_like(mean, np.nan)
    diff = population_trajectory.selection_differential
    resp = population_trajectory.response
    values = {
        "mean": mean,
        "var_genetic": var_genetic,
        "var_phenotype": np.asarray(population_trajectory.var_phenotype, dtype=np.float64),
        "heritability": _heritability(params, var_genetic),
        "selection_differential": nan if diff is None else np.asarray(diff, dtype=np.float64),
        "response": nan if resp is None else np.asarray(resp, dtype=np.float64),
    }
    dims = ("replicate", "iteration")
    ds = xr.Dataset(
        {name: (dims, v, VARIABLE_ATTRS[name]) for name, v in values.items()},
        coords={
            "replicate": ("replicate", np.arange(mean.shape[0]), {"long_name": "independent replicate chain"}),
            "iteration": ("iteration", np.arange(mean.shape[1]), {"long_name": "iteration of the chain"}),
        },
        attrs=_attrs(params, "finite-population Monte Carlo (docs/model.md section 5)", attrs),
    )
    return ds


def params_from_attrs(attrs: Mapping[str, Any]) -> TraitParams:
    """The `TraitParams` stored in a dataset's attrs by `trajectory_dataset` / `population_dataset`."""
    fields = {name: float(attrs[name]) for name in ("r1", "r2", "tail_rate", "sigma_mut", "mu0", "sigma_g0",
                                                    "sigma_env")}
    return TraitParams(**fields, mutation_mode=str(attrs.get("mutation_mode", "paper")))
