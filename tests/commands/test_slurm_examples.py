"""examples/slurm/: the job scripts parse (bash -n), and run with stand-in `srun`, `scontrol`, `accelerate`
and `qtm` executables on PATH that record their argv, they build the command lines the docs promise: the
array task i runs the i-th condition of the config (read by the real `qtm chain conditions`), the multi-node
script gives every node its machine rank and the first host as the main process, with flags the installed
accelerate accepts, and the analysis fits and reports the run folder with options the real CLI accepts."""

import json
import os
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SLURM = ROOT / "examples" / "slurm"
SCRIPTS = ("array.sbatch", "multinode.sbatch", "analyse.sbatch")
CONFIG = ROOT / "examples" / "paper_sd15.toml"

STUB = """#!{python}
# A stand-in for `{name}`: records its argv (and the Slurm task it runs in) as one JSON line.
import json, os, subprocess, sys
name, argv = {name!r}, sys.argv[1:]
with open(os.environ["STUB_LOG"], "a") as fh:
    fh.write(json.dumps({{"prog": name, "argv": argv, "node": os.environ.get("SLURM_NODEID")}}) + "\\n")
if name == "srun":  # run the command once per node (SLURM_NODEID / SLURM_PROCID set), as srun would
    start = next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))  # srun's own options
    command = argv[start:]
    for node in range(int(os.environ.get("STUB_NODES", "1"))):
        env = dict(os.environ, SLURM_NODEID=str(node), SLURM_PROCID=str(node))
        code = subprocess.run(command, env=env).returncode
        if code:
            sys.exit(code)
elif name == "scontrol":
    print("\\n".join(os.environ["STUB_HOSTS"].split()))
elif name == "qtm" and argv[:2] == ["chain", "conditions"]:  # the real command reads the config
    sys.exit(subprocess.run([sys.executable, "-m", "qtm", *argv]).returncode)
"""


@pytest.fixture
def stubs(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("srun", "scontrol", "accelerate", "qtm"):
        path = bin_dir / name
        path.write_text(STUB.format(python=sys.executable, name=name))
        path.chmod(0o755)
    log = tmp_path / "calls.jsonl"

    def run(script: str, **env) -> tuple[subprocess.CompletedProcess, list[dict]]:
        log.unlink(missing_ok=True)
        base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        full = {**base, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(log),
                "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
        done = subprocess.run(["bash", str(SLURM / script)], env=full, cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)
        calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        return done, calls

    return run


def _check_qtm_argv(argv: list[str]) -> None:
    """The real CLI parses `qtm argv` (with --help appended, so nothing runs): an unknown command or option
    fails to parse."""
    from typer.testing import CliRunner

    from qtm.cli import app

    r = CliRunner().invoke(app, [*argv, "--help"])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse_and_say_how_to_use_them(script):
    text = (SLURM / script).read_text()
    assert subprocess.run(["bash", "-n", str(SLURM / script)]).returncode == 0
    assert text.startswith("#!/bin/bash\n# ") and "sbatch " in text.split("#SBATCH")[0]  # a usage header
    assert "set -euo pipefail" in text


def test_array_task_runs_the_condition_of_its_index(stubs, tmp_path):
    names = [c["name"] for c in tomllib.loads(CONFIG.read_text())["conditions"]]
    assert len(names) >= 3
    done, calls = stubs("array.sbatch", CONFIG=str(CONFIG), OUT="results/paper", SLURM_ARRAY_TASK_ID="2",
                        EXTRA="--set run.seed=1")
    assert done.returncode == 0, done.stderr
    run = ["chain", "run", str(CONFIG), "--out", "results/paper", "--condition", names[2], "--no-progress",
           "--set", "run.seed=1"]
    assert [(c["prog"], c["argv"]) for c in calls] == [
        ("qtm", ["chain", "conditions", str(CONFIG)]), ("srun", ["qtm", *run]), ("qtm", run)]
    _check_qtm_argv(run)
    # an index past the last condition stops with one clear line and runs nothing
    done, calls = stubs("array.sbatch", CONFIG=str(CONFIG), OUT="o", SLURM_ARRAY_TASK_ID=str(len(names)))
    assert done.returncode == 2 and [c["prog"] for c in calls] == ["qtm"]
    assert f"error: array task {len(names)} but {CONFIG} has {len(names)} conditions" in done.stderr
    assert f"--array=0-{len(names) - 1}" in done.stderr
    done, calls = stubs("array.sbatch", CONFIG=str(tmp_path / "absent.toml"), OUT="o", SLURM_ARRAY_TASK_ID="0")
    assert done.returncode == 2 and [c["prog"] for c in calls] == ["qtm"]  # qtm's own error, nothing run
    assert done.stderr.startswith("error: ") and "absent.toml" in done.stderr and "array task" not in done.stderr
    done, calls = stubs("array.sbatch", OUT="o", SLURM_ARRAY_TASK_ID="0")  # no CONFIG
    assert done.returncode != 0 and "set CONFIG" in done.stderr and calls == []


def test_multinode_gives_every_node_its_rank_and_the_first_host(stubs):
    from accelerate.commands.launch import launch_command_parser

    done, calls = stubs("multinode.sbatch", CONFIG=str(CONFIG), OUT="results/paper", CONDITION="cfg7.5",
                        SLURM_JOB_NUM_NODES="3", SLURM_JOB_NODELIST="gpu[07-09]", SLURM_GPUS_ON_NODE="4",
                        STUB_NODES="3", STUB_HOSTS="gpu07 gpu08 gpu09", MAIN_PROCESS_PORT="29777")
    assert done.returncode == 0, done.stderr
    assert calls[0] == {"prog": "scontrol", "argv": ["show", "hostnames", "gpu[07-09]"], "node": None}
    assert calls[1]["prog"] == "srun" and calls[1]["argv"][:2] == ["--ntasks-per-node=1", "bash"]
    launches = [c for c in calls if c["prog"] == "accelerate"]
    assert [c["node"] for c in launches] == ["0", "1", "2"]
    parser = launch_command_parser()
    for rank, call in enumerate(launches):
        assert call["argv"][0] == "launch"
        args = parser.parse_args(call["argv"][1:])  # the installed accelerate's own flags
        assert (args.multi_gpu, args.num_machines, args.machine_rank, args.num_processes) == (True, 3, rank, 12)
        assert (args.main_process_ip, args.main_process_port, args.module) == ("gpu07", 29777, True)
        assert [args.training_script, *args.training_script_args] == [
            "qtm.cli", "chain", "run", str(CONFIG), "--out", "results/paper", "--condition", "cfg7.5",
            "--no-progress"]
        _check_qtm_argv(args.training_script_args)
    done, _ = stubs("multinode.sbatch", CONFIG=str(CONFIG), OUT="o", SLURM_JOB_NUM_NODES="2")
    assert done.returncode != 0 and "set CONDITION" in done.stderr


def test_analysis_fits_and_reports_the_run_folder(stubs):
    done, calls = stubs("analyse.sbatch", OUT="results/paper", FIT_ARGS="--drift")
    assert done.returncode == 0, done.stderr
    fit = ["fit", "results/paper", "--out", "results/paper/fit.nc", "--drift"]
    report = ["report", "results/paper"]
    assert [(c["prog"], c["argv"]) for c in calls] == [
        ("srun", ["qtm", *fit]), ("qtm", fit), ("srun", ["qtm", *report]), ("qtm", report)]
    for argv in (fit, report):
        _check_qtm_argv(argv)


def test_the_documented_submission_lines_name_the_scripts():
    for script in ("array.sbatch", "multinode.sbatch"):
        header = (SLURM / script).read_text().split("#SBATCH")[0]
        lines = [line.lstrip("# ").rstrip("\\ ") for line in header.splitlines() if "sbatch " in line]
        assert any(f"examples/slurm/{script}" in line for line in header.splitlines()), script
        assert any("examples/slurm/analyse.sbatch" in line for line in header.splitlines()), script
        assert all(shlex.split(line.split("$(")[0]) for line in lines)
