"""Who works in a run folder, and the sweep of temporary files that killed writes left behind.

Every lock is an OS file lock (fcntl.flock), so the OS releases it when the holding process ends, however it
ends (kill -9 included). The holder writes its pid, host, start time and command line into the lock file, so
a process that finds it taken can name it. Two kinds (docs/scaling.md):

- a condition lock, <run folder>/locks/<condition>.lock, held for the whole time a process runs that
  condition; taken without waiting, so a second process on the same condition stops at once naming the
  holder. A run without --condition holds the locks of all its conditions; processes with disjoint
  conditions (shards) work in one folder at once.
- the run-wide lock, <run folder>/run.lock, held only for short spells: while a process prepares what all
  conditions share (D_0, inputs.json, config.toml, the base model, metrics.nc's creation) and while it
  records a finished cell into metrics.nc (read, fill, write atomically). Taken waiting, so whichever shard
  comes first prepares the shared state once and the others find it ready.

A process takes its condition locks first and the run-wide lock after, never the other way round, and
waits only for the run-wide lock, whose holder waits for nothing: no two processes can wait on each other.

The sweep runs under the run-wide lock and the process's condition locks and removes only the temporary
names of qtmio.atomic (".<name>.<pid>.<hex>.tmp...") whose process is gone, and only outside the folders of
conditions other processes may be writing (images/, images_reference/, lora/ of conditions it does not hold).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import shutil
import socket
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from chain.errors import RunError
from qtmio.atomic import temp_owner

LOCK_NAME = "run.lock"
LOCKS_FOLDER = "locks"
CONDITION_FOLDERS = ("images", "images_reference", "lora")
"""The folders of a run folder that hold one sub-folder per condition (written under its condition lock)."""


class RunLockedError(RunError):
    """Another process holds the run folder or one of its conditions; the message names it."""


def condition_lock_path(out_dir: str | os.PathLike, condition: str) -> Path:
    """<run folder>/locks/<condition>.lock (condition names are folder-safe, chain.config)."""
    return Path(out_dir) / LOCKS_FOLDER / f"{condition}.lock"


class RunLock:
    """An exclusive lock on a run folder (run.lock) or, with `condition`, on one condition of it (see the
    module docstring)."""

    def __init__(self, out_dir: str | os.PathLike, condition: str | None = None):
        self.out_dir = Path(out_dir)
        self.condition = condition
        self.path = self.out_dir / LOCK_NAME if condition is None else condition_lock_path(out_dir, condition)
        self.fd: int | None = None

    def acquire(self, *, wait: bool = False, on_wait: Callable[[str], None] | None = None) -> "RunLock":
        """Take the lock. Taken by another process: without `wait` raise RunLockedError naming the holder;
        with `wait` tell `on_wait(holder)` and block until it is free."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.pread(fd, 4096, 0))
            if not wait:
                os.close(fd)
                raise self._held_error(holder) from None
            if on_wait is not None:
                on_wait(holder)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def _held_error(self, holder: str) -> RunLockedError:
        if self.condition is None:
            return RunLockedError(
                f"{self.out_dir} is in use by another run ({holder}); wait for it to finish or stop that "
                "process (the lock is released when it ends), or use another {out_dir}", parameters=("out_dir",))
        return RunLockedError(
            f"condition '{self.condition}' of {self.out_dir} is being run by another process ({holder}); wait "
            "for it to finish or stop that process (the lock is released when it ends), run other conditions "
            "({conditions}), or use another {out_dir}", parameters=("out_dir", "conditions"))

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # no stale holder once released
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self if self.fd is not None else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _describe(raw: bytes) -> str:
    try:
        info = json.loads(raw.decode())
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}: {info['command']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not written its name yet"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own temporaries cannot be in flight before the run starts
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_temporaries(out_dir: str | os.PathLike, *, skip: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """Remove qtmio.atomic's temporary files and folders under `out_dir` whose writing process is gone (a
    write killed half-way), leaving the folders in `skip` untouched; call it holding the locks of what it
    sweeps. Returns what was removed."""
    skipped = {Path(p) for p in skip}
    removed = []
    for root, dirs, files in os.walk(out_dir):
        dirs[:] = [d for d in dirs if Path(root) / d not in skipped]
        for name in list(dirs) + files:
            pid = temp_owner(name)
            if pid is None or _alive(pid):
                continue
            path = Path(root) / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
                dirs.remove(name)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def sweep_run_folder(out_dir: str | os.PathLike, held: Iterable[str]) -> list[Path]:
    """`sweep_stale_temporaries` of a run folder, except the per-condition folders of conditions not in
    `held` (another process may be writing there, on another host where its pid means nothing here). Call
    it holding the run-wide lock and the condition locks of `held`."""
    out_dir = Path(out_dir)
    held = set(held)
    skip = [out_dir / LOCKS_FOLDER]
    for folder in CONDITION_FOLDERS:
        if (out_dir / folder).is_dir():
            skip += [p for p in (out_dir / folder).iterdir() if p.name not in held]
    return sweep_stale_temporaries(out_dir, skip=skip)


def is_main_process() -> bool:
    """Whether this is the main process of an accelerate/torchrun launch (or the only process)."""
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


def hold_conditions(out_dir: str | os.PathLike, conditions: Iterable[str]) -> list[RunLock] | None:
    """Take the condition lock of every name in `conditions`, without waiting; returns the held locks
    (release them when done), or None in a process other than the main one (the main process holds them for
    all). One held elsewhere raises RunLockedError naming its holder, after releasing those taken."""
    if not is_main_process():
        return None
    held: list[RunLock] = []
    try:
        for name in conditions:
            held.append(RunLock(out_dir, name).acquire())
    except BaseException:
        for lock in held:
            lock.release()
        raise
    return held


@contextlib.contextmanager
def run_folder_lock(out_dir: str | os.PathLike, *, on_wait: Callable[[str], None] | None = None,
                    main: bool = True) -> Iterator[None]:
    """Hold the run-wide lock (run.lock) for the block, waiting for it if another process holds it
    (`on_wait(holder)` is told); in a process other than the main one (`main` False) nothing is taken."""
    if not main:
        yield
        return
    lock = RunLock(out_dir).acquire(wait=True, on_wait=on_wait)
    try:
        yield
    finally:
        lock.release()
