"""One process per run folder (an OS file lock naming its holder, released when the holder dies) and the
sweep of temporary files left by writes killed half-way."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from chain.runlock import LOCK_NAME, RunLock, RunLockedError, sweep_stale_temporaries

ROOT = Path(__file__).resolve().parents[2]
HOLD = """
import sys, time
from chain.runlock import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(120)
"""


def _holder(folder):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, env=env,
                            cwd=ROOT)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture
def config_file(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[data]\nsource = "toy"\ntoy_images = 2\nresolution = 32\n[model]\npath = "tiny"\n'
                 '[run]\ndevice = "cpu"\nnum_iterations = 1\n[[conditions]]\nname = "a"\n')
    return p


def test_second_run_on_a_held_folder_stops_at_once_naming_the_holder(tmp_path, config_file):
    from qtm.cli import app

    out = tmp_path / "run"
    proc = _holder(out)
    try:
        t0 = time.perf_counter()
        r = CliRunner().invoke(app, ["chain", "run", str(config_file), "--out", str(out)])
        assert r.exit_code == 2, r.output
        lines = [line for line in r.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and "in use by another run" in lines[0]
        assert f"pid {proc.pid}" in lines[0] and "started" in lines[0] and "use another --out" in lines[0]
        assert not (out / "data").exists() and not (out / "config.toml").exists()  # nothing was touched
        with pytest.raises(RunLockedError):
            RunLock(out).acquire()
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
