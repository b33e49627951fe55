"""qtmio.provenance: the one provenance writer (time, git revision, versions, seed, command)."""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from qtmio.provenance import git_revision, package_version, provenance

ROOT = Path(__file__).resolve().parents[2]


def test_keys_values_and_order_of_precedence():
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    attrs = provenance(("numpy", "surely-not-a-distribution"), seed=7, command="qtm x --y", population=50)
    after = datetime.datetime.now(datetime.timezone.utc)
    created = datetime.datetime.fromisoformat(attrs["created_at"])
    assert created.tzinfo is not None and before <= created <= after
    assert attrs["version_numpy"] == importlib.metadata.version("numpy")
    assert attrs["version_surely-not-a-distribution"] == "not installed"
    assert attrs["version_python"] == platform.python_version()
    assert attrs["seed"] == 7 and attrs["command"] == "qtm x --y" and attrs["population"] == 50
    assert "seed" not in provenance(()) and "command" not in provenance(())


def test_git_revision_is_the_checkout_head():
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    assert git_revision() == head.stdout.strip() and len(git_revision()) == 40
    assert provenance(())["git_revision"] == git_revision()


def test_package_version_of_an_installed_distribution():
    assert package_version("xarray") == importlib.metadata.version("xarray")
