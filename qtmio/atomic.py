"""Atomic writes: a reader, or a writer killed half-way, never sees a partial file or folder.

The one place that writes files for qtm, chain and fitting: a file is written to a temporary name beside
its destination and renamed into place (`os.replace`, atomic on one file system); a folder is built beside
its destination and renamed likewise. Missing parent folders are created. Files get the ordinary
permissions (umask), unlike tempfile.mkstemp's 0600.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


# The names of the temporary files and folders below: ".<name>.<pid>.<12 hex digits>.tmp[<suffix>]".
TEMP_NAME = re.compile(r"\.(?P<name>.+)\.(?P<pid>[0-9]+)\.[0-9a-f]{12}\.tmp(\.[^.]*)?")


def temp_owner(name: str) -> int | None:
    """The pid that made a temporary file or folder of this module (from its name), else None."""
    m = TEMP_NAME.fullmatch(name)
    return int(m.group("pid")) if m else None


def _temporary_name(path: Path, suffix: str) -> Path:
    """A fresh hidden name beside `path` ending in `suffix` (hidden: qtmio.images.list_images skips it)."""
    return path.with_name(f".{path.name.removesuffix(suffix)}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp{suffix}")


@contextlib.contextmanager
def atomic_write_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary path beside `path` (same suffix, so writers that choose the format by the
    suffix keep working); on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path, path.suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically."""
    path = Path(path)
    with atomic_write_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return write_bytes_atomic(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `path`; on success it replaces `path` (an old folder there is
    removed first), on error it is removed. Readers see the old folder or the complete new one; a kill between
    the removal and the rename leaves no folder, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path, "")
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
