"""Shards: `qtm chain run --condition` processes with disjoint conditions work in one run folder at once
(real subprocesses) and give exactly the results of one process running every condition; the same
condition twice stops the second at once naming the holder; a shard killed mid-cell resumes to the same
results; fit and report read the sharded folder, naming a condition not finished yet."""

import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import xarray as xr
from typer.testing import CliRunner

from chain.config import config_from_dict, config_to_toml
from chain.run import run_chain
from qtmio.images import list_images
from qtmio.netcdf import read_netcdf
from tests.chain.fixtures import SeededStage, tiny_config_dict

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = """
import sys
from chain.config import load_config
from chain.run import run_chain
from tests.chain.fixtures import SeededStage
config, out, *names = sys.argv[1:]
run_chain(load_config(config), out, stages=SeededStage(), conditions=names)
"""
CONDITIONS = [{"name": "a", "scale": 1.0}, {"name": "b", "schedule": "exponential", "scale": 5.0}]


def _config_dict() -> dict:
    d = tiny_config_dict(Path("unused"), num_iterations=2, conditions=CONDITIONS)
    d["data"] = {"source": "toy", "toy_images": 3, "resolution": 32}  # D_0 is written into the run folder
    d["assay"] = {"images": 2, "reference_scale": 1.0}
    return d


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "c.toml"
    path.write_text(config_to_toml(config_from_dict(_config_dict())))
    return path


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference: one process running both conditions."""
    out = tmp_path_factory.mktemp("single") / "run"
    run_chain(config_from_dict(_config_dict()), out, stages=SeededStage())
    return out


def _shard(config, out, *names, barrier=None, kill=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if barrier is not None:
        barrier.mkdir(exist_ok=True)
        env.update(SHARD_BARRIER=str(barrier), SHARD_WAIT_FOR="a,b")
    if kill is not None:
        env["SHARD_KILL"] = kill
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(config), str(out), *names], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=900):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def _assert_same_run(sharded: Path, single: Path):
    a, b = read_netcdf(sharded / "metrics.nc"), read_netcdf(single / "metrics.nc")
    assert a.completed.values.all()
    xr.testing.assert_equal(a, b)  # every variable and coordinate, hf_power and hf_power_reference included
    for folder in ("images", "images_reference"):
        if not (single / folder).exists():  # a run without the assay
            assert not (sharded / folder).exists()
            continue
        names = sorted(p.relative_to(single) for p in (single / folder).rglob("*.png"))
        assert names and names == sorted(p.relative_to(sharded) for p in (sharded / folder).rglob("*.png"))
        assert all((sharded / n).read_bytes() == (single / n).read_bytes() for n in names)


def _events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]  # no interleaved lines


def test_two_shards_at_once_equal_one_process(config_file, single, tmp_path):
    out = tmp_path / "run"
    barrier = tmp_path / "barrier"
    procs = [_shard(config_file, out, name, barrier=barrier) for name in ("a", "b")]
    for proc in procs:
        rc, err = _finish(proc)
        assert rc == 0, err[-3000:]
    _assert_same_run(out, single)
    events = _events(out)
    assert len([e for e in events if e["event"] == "measured"]) == 1  # D_0 recorded once, by the first shard
    assert sorted(e["conditions"] for e in events if e["event"] == "start") == [["a"], ["b"]]
    assert (out / "config.toml").read_text() == config_file.read_text()  # the full config, not a shard's part
    assert len(list_images(out / "data")) == 3


def test_the_same_condition_twice_stops_the_second_at_once(config_file, tmp_path):
    from qtm.cli import app

    out = tmp_path / "run"
    barrier = tmp_path / "barrier"
    holder = _shard(config_file, out, "a", barrier=barrier)  # waits in its first cell for a "b" that never comes
    try:
        deadline = time.monotonic() + 600
        while not (barrier / "a.started").exists():
            assert holder.poll() is None and time.monotonic() < deadline, holder.stderr.read()[-3000:]
            time.sleep(0.1)
        t0 = time.perf_counter()
        r = CliRunner().invoke(app, ["chain", "run", str(config_file), "--out", str(out), "--condition", "a",
                                     "--no-progress"])
        assert r.exit_code == 2, r.output
        lines = [line for line in r.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"error: condition 'a' of {out} is being run by another "
                                                       f"process (pid {holder.pid} on host ")
        assert "run other conditions (--condition)" in lines[0]
        assert time.perf_counter() - t0 < 60
        r = CliRunner().invoke(app, ["chain", "run", str(config_file), "--out", str(out), "--condition", "c"])
        assert r.exit_code == 2 and r.output.strip() == (
            "error: --condition 'c': not a condition of the config; its conditions are a, b")
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_shard_resumes_to_the_same_results_and_fit_and_report_read_the_folder(config_file, single,
                                                                                        tmp_path):
    from fitting.observations import load_observations
    from qtm.commands.report import build_report

    out = tmp_path / "run"
    barrier = tmp_path / "barrier"
    a = _shard(config_file, out, "a", barrier=barrier)
    b = _shard(config_file, out, "b", barrier=barrier, kill="b:2")  # killed after writing images/b/2
    assert _finish(b)[0] == -9
    rc, err = _finish(a)
    assert rc == 0, err[-3000:]  # the other shard is unaffected
    partial = read_netcdf(out / "metrics.nc")
    assert partial.completed.sel(condition="a").values.tolist() == [1, 1, 1]
    assert partial.completed.sel(condition="b").values.tolist() == [1, 1, 0]
    assert len(list_images(out / "images" / "b" / "2")) == 3  # the killed cell's images, not recorded

    # fit and report read what is finished and name the condition that is not
    obs = load_observations(out)
    assert obs.conditions == ("a", "b") and obs.num_images[1].tolist() == [3, 3, 0]
    assert "condition b has finished iterations up to 1 of 2 (still running, or stopped); fitted up to there" \
        in obs.notes
    report = Path(build_report(out, num_bootstrap=20)["report"]).read_text()
    assert "Not finished yet (still running, or stopped; shown up to their last finished iteration of 2): " \
           "`b` (up to iteration 1)." in report

    rc, err = _finish(_shard(config_file, out, "b"))  # the OS released b's lock: it resumes
    assert rc == 0, err[-3000:]
    _assert_same_run(out, single)
    assert [(e["condition"], e["iteration"]) for e in _events(out) if e["event"] == "iteration_done"
            and e["condition"] == "b"] == [("b", 1), ("b", 2)]  # b,1 was not redone
    assert not [n for n in load_observations(out).notes if "finished iterations" in n]
    rows = build_report(out, num_bootstrap=20)["rows"]
    assert json.dumps(rows) == json.dumps(build_report(single, num_bootstrap=20)["rows"])  # NaN metrics alike
    assert "Not finished" not in (out / "report" / "report.md").read_text()


class _Interrupt(Exception):
    pass


def test_a_folder_from_before_shards_resumes_and_a_shard_with_another_config_is_refused(single, tmp_path):
    from chain.run import RunError

    out = tmp_path / "run"
    config = config_from_dict(_config_dict())

    def stop(condition, iteration):
        raise _Interrupt

    with pytest.raises(_Interrupt):
        run_chain(config, out, stages=SeededStage(), after_cell=stop)
    for lock in (out / "locks").iterdir():  # the layout of a folder written before shards: run.lock only
        lock.unlink()
    (out / "locks").rmdir()
    other = _config_dict()
    other["sampling"]["num_steps"] = 9
    with pytest.raises(RunError, match=r"fields that differ: sampling.num_steps: 4 -> 9\."):
        run_chain(config_from_dict(other), out, stages=SeededStage(), conditions=["b"])
    run_chain(config, out, stages=SeededStage(), conditions=["b"])
    assert read_netcdf(out / "metrics.nc").completed.values.tolist() == [[1, 1, 0], [1, 1, 1]]
    run_chain(config, out, stages=SeededStage())  # without --condition: the rest, as before
    _assert_same_run(out, single)


@pytest.mark.slow  # a few minutes on 2 busy cores: three tiny diffusion runs
def test_shards_of_the_real_stage_equal_one_process(tmp_path):
    """The same with the real finetune+generate stage on the tiny example model, through the CLI: no state
    of one condition (random generators, the base model) reaches another."""
    from qtm.cli import app

    example = ROOT / "examples" / "tiny_cpu.toml"
    shrink = ["--set", "run.num_iterations=2", "--set", "sampling.num_steps=2", "--set", "finetune.epochs=1",
              "--no-progress"]
    r = CliRunner().invoke(app, ["chain", "run", str(example), "--out", str(tmp_path / "single"), *shrink])
    assert r.exit_code == 0, r.output
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    names = [c["name"] for c in tomllib.loads(example.read_text())["conditions"]]
    procs = [subprocess.Popen([sys.executable, "-m", "qtm", "chain", "run", str(example), "--out",
                               str(tmp_path / "sharded"), "--condition", name, *shrink], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in names]
    for proc in procs:
        rc, err = _finish(proc)
        assert rc == 0, err[-3000:]
    _assert_same_run(tmp_path / "sharded", tmp_path / "single")
    from safetensors.torch import load_file

    for name in names:  # the adapters' weights too, bit for bit (their metadata lists peft's target-module
        for k in (1, 2):  # sets in each process's own hash order)
            file = Path("lora") / name / str(k) / "pytorch_lora_weights.safetensors"
            a, b = load_file(tmp_path / "sharded" / file), load_file(tmp_path / "single" / file)
            assert a.keys() == b.keys() and all(a[key].equal(b[key]) for key in a)


def test_chain_conditions_lists_the_names_in_run_order(config_file, tmp_path):
    from qtm.cli import app

    names = [c["name"] for c in tomllib.loads(config_file.read_text())["conditions"]]
    r = CliRunner().invoke(app, ["chain", "conditions", str(config_file)])
    assert r.exit_code == 0 and r.output.splitlines() == names == ["a", "b"]
    r = CliRunner().invoke(app, ["chain", "conditions", str(config_file), "--json", "--set", 'conditions[1].name="z"'])
    assert r.exit_code == 0 and json.loads(r.output)["conditions"] == ["a", "z"]
    r = CliRunner().invoke(app, ["chain", "conditions", str(tmp_path / "absent.toml")])
    assert r.exit_code == 2 and r.output.startswith("error: ") and "absent.toml" in r.output
