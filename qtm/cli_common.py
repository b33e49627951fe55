"""Shared pieces of the command-line shell: option types, errors, JSON output.

Nothing here holds mathematics; commands build a config, call one library function, write one result.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, NoReturn

import typer


def fail(message: str, *, code: int = 2) -> NoReturn:
    """Print one clear error line on stderr (one per line of `message`, e.g. one per bad config value) and
    exit non-zero."""
    for line in str(message).splitlines() or [""]:
        typer.echo(f"error: {line}", err=True)
    raise typer.Exit(code)


def print_json(obj: Any) -> None:
    """Print one strict JSON object on stdout (numpy scalars and arrays converted; see to_strict_json)."""
    sys.stdout.write(dumps_strict(obj) + "\n")


def to_strict_json(value: Any) -> Any:
    """`value` with every number made strict-JSON: NaN -> null (undefined or not measured), +inf -> the
    string "inf", -inf -> "-inf" (docs/results-contract.md, "JSON output"). Numpy scalars and arrays become
    Python numbers and lists, paths strings."""
    import math

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
    return to_strict_json(_json_default(value))


def dumps_strict(obj: Any, **kwargs: Any) -> str:
    """json.dumps of to_strict_json(obj); never writes NaN or Infinity."""
    return json.dumps(to_strict_json(obj), allow_nan=False, **kwargs)


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "__array__"):
        return np.asarray(value).tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
