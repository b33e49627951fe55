"""Provenance for dataset attrs: when, from which code, with which packages, seed and command. The one
provenance writer of the project: trajectories, metrics and fits all carry the same keys."""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import platform
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def provenance(packages: Iterable[str], *, seed: int | None = None, command: str | None = None,
               **extra: Any) -> dict[str, Any]:
    """{created_at (UTC, ISO 8601, seconds), git_revision, version_python, version_<name> for each of
    `packages` ("not installed" where absent), seed and command where given}, then `extra`."""
    attrs: dict[str, Any] = {
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_revision": git_revision(),
        "version_python": platform.python_version(),
    }
    for name in packages:
        attrs[f"version_{name}"] = package_version(name)
    if seed is not None:
        attrs["seed"] = int(seed)
    if command is not None:
        attrs["command"] = command
    attrs.update(extra)
    return attrs


def package_version(name: str) -> str:
    """The installed version of a distribution, or "not installed"."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


@functools.lru_cache(maxsize=1)
def git_revision() -> str:
    """The commit of the source tree this code runs from, or "unknown" (not a checkout, or no git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
