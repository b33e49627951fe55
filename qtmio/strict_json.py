"""Strict JSON: every `--json` output and every log.jsonl line, with no NaN or Infinity tokens.

The convention (docs/results-contract.md, "JSON output"): NaN -> null (undefined or not measured), +inf ->
the string "inf", -inf -> "-inf". Numpy scalars and arrays become Python numbers and lists, paths strings.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any


def to_strict_json(value: Any) -> Any:
    """`value` with every number made strict-JSON (see the module docstring); dict keys become strings."""
    if isinstance(value, dict):
        return {str(k): to_strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_strict_json(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return to_strict_json(_plain(value))


def dumps_strict(obj: Any, **kwargs: Any) -> str:
    """json.dumps of to_strict_json(obj); never writes NaN or Infinity."""
    return json.dumps(to_strict_json(obj), allow_nan=False, **kwargs)


def _plain(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "__array__"):
        return np.asarray(value).tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
