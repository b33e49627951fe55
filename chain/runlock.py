"""One process per run folder, and the sweep of temporary files that killed writes left behind.

The lock is an OS file lock (fcntl.flock) on <run folder>/run.lock, so the OS releases it when the holding
process ends, however it ends (kill -9 included). The holder writes its pid, host, start time and command
line into the file, so a second run can name it. The sweep runs under the lock and removes only the
temporary names of qtmio.atomic (".<name>.<pid>.<hex>.tmp...") whose process is gone.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import shutil
import socket
import sys
from pathlib import Path

from chain.errors import RunError
from qtmio.atomic import temp_owner

LOCK_NAME = "run.lock"


class RunLockedError(RunError):
    """Another process holds the run folder; the message names it."""


class RunLock:
    """An exclusive, non-blocking lock on a run folder (see the module docstring)."""

    def __init__(self, out_dir: str | os.PathLike):
        self.path = Path(out_dir) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.read(fd, 4096))
            os.close(fd)
            raise RunLockedError(
                f"{self.path.parent} is in use by another run ({holder}); wait for it to finish or stop that "
                "process (the lock is released when it ends), or use another {out_dir}", parameters=("out_dir",)
            ) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # no stale holder once released
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

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


def sweep_stale_temporaries(out_dir: str | os.PathLike) -> list[Path]:
    """Remove qtmio.atomic's temporary files and folders under `out_dir` whose writing process is gone (a
    write killed half-way); call it holding the run's lock. Returns what was removed."""
    removed = []
    for root, dirs, files in os.walk(out_dir):
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


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


def hold_run_folder(out_dir: str | os.PathLike) -> RunLock | None:
    """Lock the run folder for this process and sweep stale temporaries under the lock; returns the held
    lock (release it when the run ends), or None in a process other than the main one (the main process
    holds the folder for all of them). A held folder raises RunLockedError naming the holder."""
    if not _is_main_process():
        return None
    lock = RunLock(out_dir).acquire()
    try:
        sweep_stale_temporaries(out_dir)
    except BaseException:
        lock.release()
        raise
    return lock
