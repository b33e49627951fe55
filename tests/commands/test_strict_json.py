"""Every `--json` output and every log.jsonl line is strict JSON: no NaN or Infinity tokens. Undefined
values are null; infinities are the strings "inf" / "-inf" (docs/results-contract.md, "JSON output")."""

import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qtm.cli import app
from tests.chain.fixtures import make_captioned_folder
from tests.commands.test_fit import run_dir  # noqa: F401  (the fixture: a results dataset of qtm's recursion)
from tests.fitting.testdata import TRUTH_CONDITIONS
from tests.qtmio.test_strict_json import strict_loads

ROOT = Path(__file__).resolve().parents[2]


def _json_out(args):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return strict_loads(result.stdout)


def test_simulate_json_is_strict():
    # r2 = 0 keeps the upper tail: infinite truncation bounds are in play
    out = _json_out(["simulate", "--r1", "0.5", "--r2", "0", "--iterations", "3", "--json"])
    assert len(out["mean"]) == 4
    assert out


def test_spectra_json_is_strict(tmp_path):
    folder = make_captioned_folder(tmp_path / "imgs", num_images=3)
    from PIL import Image

    Image.new("RGB", (32, 32), (128, 128, 128)).save(folder / "flat.png")  # a constant image: NaN phenotype
    out = _json_out(["spectra", str(folder), "--json"])
    assert out


@pytest.mark.slow  # ~20 s (the fit compiles); tests/commands/test_fit.py checks the inf convention by default
def test_fit_json_is_strict(run_dir):
    result = CliRunner().invoke(app, ["fit", str(run_dir), "--starts", "1", "--json"])
    assert result.exit_code == 0 and "qtm fit: optimizing (1)" in result.stderr  # progress off a terminal
    fit = strict_loads(result.stdout)
    assert fit["conditions"][next(iter(TRUTH_CONDITIONS))]["tail_rate"]["estimate"] == "inf"


@pytest.mark.slow  # ~3 minutes: the quick demo
def test_demo_json_is_strict(tmp_path):
    out = CliRunner().invoke(app, ["demo", "--quick", "--out", str(tmp_path / "demo"), "--json"])
    assert out.exit_code == 0, out.output
    assert strict_loads(out.stdout.strip().splitlines()[-1])["fit"]
    assert all(strict_loads(line) for line in (tmp_path / "demo" / "log.jsonl").read_text().splitlines())



def test_report_json_is_strict(tmp_path):
    from tests.commands.test_report import make_run

    run, _ = make_run(tmp_path)
    assert _json_out(["report", str(run), "--json"])


@pytest.mark.slow  # ~20 s: a tiny chain on the CPU
def test_chain_run_json_and_log_are_strict(tmp_path):
    out = tmp_path / "run"
    summary = _json_out(["chain", "run", str(ROOT / "examples" / "tiny_cpu.toml"), "--out", str(out), "--json",
                         "--set", "run.num_iterations=1", "--set", "sampling.num_steps=2",
                         "--set", "finetune.epochs=1"])
    assert summary["iterations"] == 1
    lines = (out / "log.jsonl").read_text().splitlines()
    assert lines and all(strict_loads(line) for line in lines)
    # the tiny example has no feature encoder: its metrics are NaN, written as null
    done = [strict_loads(line) for line in lines if '"iteration_done"' in line]
    assert done and all(row.get("train_loss") is None or math.isfinite(row["train_loss"]) for row in done)
