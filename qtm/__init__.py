"""qtm: the quantitative-trait theory of model collapse (docs/model.md sections 1-5), in JAX float64.

Public API (imported lazily, so that `import qtm` alone, e.g. for the CLI helpers, stays cheap):

- `TraitParams`, `PARAM_NAMES`, `MUTATION_MODES`: parameters (section 1).
- `selection_moments`, `hard_moments`: standardized moments of the selected phenotypes (section 2).
- `step`, `trajectory`, `Trajectory`, `TraitState`, `theorem1_asymptotes`, `asymptotes`: the moment
  recursion (section 3).
- `simulate_population`, `PopulationTrajectory`: the finite-population Monte Carlo (section 5).
- `trajectory_dataset`, `population_dataset`: results as xarray datasets (written with
  `qtmio.netcdf.write_netcdf`).
- `QtmError`, `ParameterError`: the errors qtm raises on purpose (qtm.errors).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TraitParams": "qtm.params",
    "PARAM_NAMES": "qtm.params",
    "MUTATION_MODES": "qtm.params",
    "require_x64": "qtm.params",
    "selection_moments": "qtm.selection",
    "hard_moments": "qtm.selection",
    "step": "qtm.recursion",
    "trajectory": "qtm.recursion",
    "Trajectory": "qtm.recursion",
    "TraitState": "qtm.recursion",
    "theorem1_asymptotes": "qtm.recursion",
    "asymptotes": "qtm.recursion",
    "simulate_population": "qtm.montecarlo",
    "PopulationTrajectory": "qtm.montecarlo",
    "trajectory_dataset": "qtm.dataset",
    "population_dataset": "qtm.dataset",
    "QtmError": "qtm.errors",
    "ParameterError": "qtm.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qtm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
