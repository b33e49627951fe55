"""One process per condition of a run folder (an OS file lock naming its holder, released when the holder
dies), the run-wide lock that shards wait for, and the sweep of temporary files left by writes killed
half-way."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from chain.runlock import (LOCK_NAME, RunLock, RunLockedError, condition_lock_path, hold_conditions,
                           sweep_run_folder, sweep_stale_temporaries)

ROOT = Path(__file__).resolve().parents[2]
HOLD = """
import sys, time
from chain.runlock import RunLock
RunLock(sys.argv[1], *sys.argv[2:]).acquire()
print("held", flush=True)
time.sleep(120)
"""


def _holder(folder, *condition):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), *condition], stdout=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture
def config_file(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[data]\nsource = "toy"\ntoy_images = 2\nresolution = 32\n[model]\npath = "tiny"\n'
                 '[run]\ndevice = "cpu"\nnum_iterations = 1\n[[conditions]]\nname = "a"\n')
    return p


def test_second_run_on_a_held_condition_stops_at_once_naming_the_holder(tmp_path, config_file):
    from qtm.cli import app

    out = tmp_path / "run"
    proc = _holder(out, "a")
    try:
        t0 = time.perf_counter()
        r = CliRunner().invoke(app, ["chain", "run", str(config_file), "--out", str(out)])
        assert r.exit_code == 2, r.output
        lines = [line for line in r.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and "being run by another process" in lines[0]
        assert f"condition 'a' of {out}" in lines[0] and f"pid {proc.pid}" in lines[0] and "started" in lines[0]
        assert "run other conditions (--condition)" in lines[0] and "use another --out" in lines[0]
        assert not (out / "data").exists() and not (out / "config.toml").exists()  # nothing was touched
        with pytest.raises(RunLockedError):
            RunLock(out, "a").acquire()
    finally:
        proc.kill()
        proc.wait()
    assert time.perf_counter() - t0 < 60


def test_a_killed_holder_releases_the_folder(tmp_path):
    out = tmp_path / "run"
    proc = _holder(out)
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == proc.pid
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with RunLock(out):
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            RunLock(out).acquire()  # a second lock in the same process is refused too (flock per open file)
    assert (out / LOCK_NAME).read_text() == ""  # released: no holder named


def test_condition_locks_are_taken_all_or_none(tmp_path):
    out = tmp_path / "run"
    proc = _holder(out, "b")
    try:
        with pytest.raises(RunLockedError, match=f"condition 'b' of {out} .*pid {proc.pid}"):
            hold_conditions(out, ["a", "b", "c"])
        with RunLock(out, "a"), RunLock(out, "c"):  # "a", taken before "b" failed, was released again
            pass
        held = hold_conditions(out, ["a", "c"])  # disjoint from the holder's: no conflict
        assert [lock.path for lock in held] == [condition_lock_path(out, "a"), condition_lock_path(out, "c")]
        assert json.loads(condition_lock_path(out, "c").read_text())["pid"] == os.getpid()
        for lock in held:
            lock.release()
    finally:
        proc.kill()
        proc.wait()


def test_the_run_wide_lock_waits_for_its_holder(tmp_path):
    out = tmp_path / "run"
    proc = _holder(out)
    told = []
    t0 = time.perf_counter()
    killer = subprocess.Popen([sys.executable, "-c", f"import os, time; time.sleep(2); os.kill({proc.pid}, 9)"])
    try:
        with RunLock(out).acquire(wait=True, on_wait=told.append) as lock:
            assert time.perf_counter() - t0 >= 1.5  # it waited for the holder to end
            assert json.loads(lock.path.read_text())["pid"] == os.getpid()
        assert len(told) == 1 and f"pid {proc.pid}" in told[0]
    finally:
        killer.wait()
        proc.wait()


KILLED_WRITE = """
import os, sys
from pathlib import Path
from qtmio.atomic import atomic_folder, atomic_write_path
out = Path(sys.argv[1])
with atomic_folder(out / "lora" / "a" / "1") as tmp:
    (tmp / "w.bin").write_bytes(b"half")
    with atomic_write_path(out / "metrics.nc") as f:
        f.write_bytes(b"partial")
        os.kill(os.getpid(), 9)
"""


def test_sweep_removes_only_temporaries_of_dead_writers(tmp_path):
    out = tmp_path / "run"
    (out / "lora" / "a").mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(out)], env=env, cwd=ROOT)
    assert r.returncode == -9
    stale = sorted(p.name for p in out.rglob(".*tmp*"))
    assert len(stale) == 2, stale  # the killed write's file and folder
    keep = [out / "metrics.nc", out / ".hidden.tmp", out / "a.123.tmp.png", out / "notes.tmp"]
    for p in keep:
        p.write_text("keep")
    alive = _holder(tmp_path / "other")  # a live writer's temporary is left alone
    try:
        live = out / f".metrics.{alive.pid}.0123456789ab.tmp.nc"
        live.write_text("in flight")
        removed = sweep_stale_temporaries(out)
        assert sorted(p.name for p in removed) == stale
        assert live.exists() and all(p.exists() for p in keep)
        assert sorted(p.name for p in out.rglob(".*tmp*") if p != live and p not in keep) == []
    finally:
        alive.kill()
        alive.wait()


def test_a_shard_sweeps_only_its_own_conditions_and_the_shared_files(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          env=env).stdout.strip()
    stale = {name: out / name for name in (
        f".metrics.{dead}.0123456789ab.tmp.nc", f"images/a/1/.00000.{dead}.0123456789ab.tmp.png",
        f"lora/a/.1.{dead}.0123456789ab.tmp", f"images/b/1/.00000.{dead}.0123456789ab.tmp.png",
        f"images_reference/b/1/.00000.{dead}.0123456789ab.tmp.png", f"lora/b/.1.{dead}.0123456789ab.tmp")}
    for path in stale.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir() if path.suffix == ".tmp" else path.write_text("half")
    removed = sweep_run_folder(out, ["a"])
    mine = [n for n in stale if "/b/" not in n]
    assert sorted(removed) == sorted(stale[n] for n in mine)
    assert all(stale[n].exists() for n in stale if n not in mine)  # condition b may be in flight elsewhere
