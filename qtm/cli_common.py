"""Shared pieces of the command-line shell: option types, errors, JSON output.

Nothing here holds mathematics; commands build a config, call one library function, write one result.
"""

from __future__ import annotations

import json
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
    """Print one JSON object on stdout (numpy scalars and arrays converted)."""
    sys.stdout.write(json.dumps(obj, default=_json_default, allow_nan=True) + "\n")


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "__array__"):
        return np.asarray(value).tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
