"""Continuing a run folder: which config changes a resume accepts, and growing metrics.nc when
run.num_iterations is raised (no torch needed).

A resumed run must be the run that was started: every field of the resolved config is compared with the
one in <run folder>/config.toml, and any difference is refused naming the fields, except raising
run.num_iterations, which continues the chain ("six more iterations"). Every random draw is seeded by (run
seed, condition, iteration, image), so the continued chain equals one made that long from the start.
"""

from __future__ import annotations

import tomllib
from typing import Any

import numpy as np

from chain.config import ChainConfig, config_from_dict, config_to_dict
from chain.constraints import show_value
from chain.errors import ConfigError

GROWABLE = "run.num_iterations"


def flatten(doc: Any, prefix: str = "") -> dict[str, Any]:
    """{"run": {"seed": 0}, "conditions": [{"name": "a"}]} -> {"run.seed": 0, "conditions[0].name": "a"}."""
    out: dict[str, Any] = {}
    if isinstance(doc, dict):
        for key, value in doc.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else key))
    elif isinstance(doc, list) and doc and all(isinstance(v, dict) for v in doc):
        for i, value in enumerate(doc):
            out.update(flatten(value, f"{prefix}[{i}]"))
    else:
        out[prefix] = tuple(doc) if isinstance(doc, list) else doc
    return out


def config_differences(old: ChainConfig, new: ChainConfig) -> list[tuple[str, Any, Any]]:
    """(field, old value, new value) for every field that differs (conditions by position)."""
    a, b = flatten(config_to_dict(old)), flatten(config_to_dict(new))
    missing = object()
    return [(k, a.get(k, missing), b.get(k, missing)) for k in sorted(set(a) | set(b))
            if a.get(k, missing) != b.get(k, missing)]


def config_change_problem(recorded_toml: str, config: ChainConfig, where: str) -> str | None:
    """Why `config` cannot continue the run whose resolved config is `recorded_toml`, or None. Raising
    run.num_iterations is accepted (the chain continues); every other difference is named. The message names
    the run folder as `{out_dir}` (raise it as RunError(problem, parameters=("out_dir",)))."""
    try:
        old = config_from_dict(tomllib.loads(recorded_toml), where=where)
    except (tomllib.TOMLDecodeError, ConfigError):
        return (f"{where} holds a configuration this version cannot read: this folder belongs to another run. "
                "Use a new {out_dir}, or delete the folder to start over")
    diffs = config_differences(old, config)
    shown = []
    for field, before, after in diffs:
        if field == GROWABLE and after > before:
            continue
        def fmt(v):
            return "(absent)" if not isinstance(v, (str, int, float, bool, tuple)) else show_value(v)
        hint = " (only raising it continues a run)" if field == GROWABLE else ""
        shown.append(f"{field}: {fmt(before)} -> {fmt(after)}{hint}")
    if not shown:
        return None
    return (f"{where} holds a different configuration; fields that differ: {'; '.join(shown)}. Continue with "
            "the recorded values, or use a new {out_dir} (raising run.num_iterations alone continues the chain)")


def extend_iterations(ds, num_iterations: int, config_toml: str):
    """metrics.nc grown to iterations 0..num_iterations: the new cells not produced (NaN, completed 0), the
    recorded config replaced by the continued one."""
    k = num_iterations + 1
    if ds.sizes["iteration"] >= k:
        return ds
    grown = ds.reindex(iteration=np.arange(k, dtype=np.int64), fill_value={"completed": 0, "num_images": 0})
    grown["completed"] = grown["completed"].astype(np.int8)
    grown["num_images"] = grown["num_images"].astype(np.int64)
    for name, var in ds.data_vars.items():
        grown[name].attrs = dict(var.attrs)
    grown.attrs = {**ds.attrs, "config": config_toml}
    return grown
