"""`qtm simulate` through typer's CliRunner: every flag, every error path, the JSON and file outputs
(numbers checked against a plain loop over MODEL.md section 3 with scipy's truncated-normal moments),
and a subprocess run that must not import torch."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.special
import scipy.stats
import xarray as xr
from typer.testing import CliRunner

from qtm.cli import app

runner = CliRunner()


def _invoke(*args: str):
    return runner.invoke(app, ["simulate", *args])


def _json(*args: str) -> dict:
    result = _invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _naive(r1, r2, mu0=0.027, sg0=0.056, se=0.25, sm=0.0, mode="paper", k=6):
    a = scipy.special.ndtri(r1) if r1 > 0 else -np.inf
    b = -scipy.special.ndtri(r2) if r2 > 0 else np.inf
    m, v = (float(x) for x in scipy.stats.truncnorm.stats(a, b, moments="mv"))
    mu, vg = mu0, sg0**2
    means, vgs = [], []
    for _ in range(k + 1):
        means.append(mu)
        vgs.append(vg)
        vp = vg + se**2
        h2 = vg / (vp + sm**2) if mode == "paper" else vg / vp
        mu += h2 * math.sqrt(vp) * m
        vg = vp * v + (sm**2 if mode == "additive" else 0.0)
    return np.array(means), np.array(vgs)


def test_defaults_print_table_and_theorem1():
    result = _invoke()
    assert result.exit_code == 0, result.output
    for word in ("iteration", "mean", "V_G", "V_P", "h2", "selection diff.", "response", "Theorem 1"):
        assert word in result.stdout
    assert "r1=0.025, r2=0.675" in result.stdout


def test_json_defaults_are_the_papers():
    out = _json()
    for key in ("iteration", "mean", "var_genetic", "var_phenotype", "heritability", "selection_differential",
                "response", "params", "asymptotes"):
        assert key in out
    assert out["iteration"] == list(range(7))
    assert out["params"] == {"r1": 0.025, "r2": 0.675, "tail_rate": None, "sigma_mut": 0.0, "mu0": 0.027,
                             "sigma_g0": 0.056, "sigma_env": 0.25, "mutation_mode": "paper", "iterations": 6}
    means, vgs = _naive(0.025, 0.675)
    np.testing.assert_allclose(out["mean"], means, rtol=1e-11)
    np.testing.assert_allclose(out["var_genetic"], vgs, rtol=1e-11)
    np.testing.assert_allclose(out["var_phenotype"], vgs + 0.0625, rtol=1e-12)
    np.testing.assert_allclose(out["heritability"], vgs / (vgs + 0.0625), rtol=1e-12)
    np.testing.assert_allclose(np.array(out["response"][:-1]), np.diff(means), rtol=1e-10)
    assert "monte_carlo" not in out


def test_every_recursion_flag():
    out = _json("--r1", "0.1", "--r2", "0.2", "--sigma-mut", "0.1", "--mutation-mode", "additive", "--mu0", "1.5",
                "--sigma-g0", "0.3", "--sigma-env", "0.4", "--iterations", "3")
    assert out["params"] == {"r1": 0.1, "r2": 0.2, "tail_rate": None, "sigma_mut": 0.1, "mu0": 1.5,
                             "sigma_g0": 0.3, "sigma_env": 0.4, "mutation_mode": "additive", "iterations": 3}
    means, vgs = _naive(0.1, 0.2, 1.5, 0.3, 0.4, 0.1, "additive", 3)
    np.testing.assert_allclose(out["mean"], means, rtol=1e-11)
    np.testing.assert_allclose(out["var_genetic"], vgs, rtol=1e-11)
    assert out["asymptotes"]["kind"] == "fixed point of the recursion"
    # paper mode: mutation lowers h2 only
    paper = _json("--sigma-mut", "0.1", "--iterations", "2")
    means, vgs = _naive(0.025, 0.675, sm=0.1, k=2)
    np.testing.assert_allclose(paper["heritability"], vgs / (vgs + 0.0625 + 0.01), rtol=1e-12)
    np.testing.assert_allclose(paper["mean"], means, rtol=1e-11)


def test_theorem1_check_numbers_and_tail_rate_flag():
    out = _json("--r1", "0.95", "--r2", "0.0002")
    assert out["asymptotes"]["kind"] == "Theorem 1"
    assert abs(out["asymptotes"]["drift_per_iteration"] - 0.069496) < 5e-7
    assert abs(out["asymptotes"]["var_phenotype_limit"] - 0.071542) < 5e-7
    hard = _json("--tail-rate", "inf")
    assert hard["params"]["tail_rate"] is None and hard["mean"] == _json()["mean"]
    soft = _json("--tail-rate", "0.5")
    assert soft["params"]["tail_rate"] == 0.5
    assert soft["asymptotes"]["kind"] == "fixed point of the recursion"
    assert soft["mean"][1] != hard["mean"][1]
    result = _invoke("--tail-rate", "0.5")
    assert "tail_rate=0.5" in result.stdout and "fixed point" in result.stdout


def test_no_selection_has_no_asymptotes():
    out = _json("--r1", "0", "--r2", "0")
    assert out["asymptotes"] is None
    assert "no asymptotes" in _invoke("--r1", "0", "--r2", "0").stdout


def test_population_json_quantiles_and_seed():
    args = ("--population", "2000", "--replicates", "8", "--seed", "3", "--iterations", "3")
    out = _json(*args)
    mc = out["monte_carlo"]
    assert (mc["population"], mc["replicates"], mc["seed"]) == (2000, 8, 3)
    for name in ("mean", "var_genetic", "var_phenotype", "heritability"):
        for q in ("q05", "q50", "q95", "replicate_mean"):
            assert len(mc[name][q]) == 4
        assert all(lo <= med <= hi for lo, med, hi in zip(mc[name]["q05"], mc[name]["q50"], mc[name]["q95"]))
    assert mc["mean"]["q05"][0] == mc["mean"]["q95"][0] == 0.027          # iteration 0 is given
    assert mc["mean"]["q05"][2] < mc["mean"]["q95"][2]                     # replicates differ later
    assert mc["response"]["q50"][-1] is None                               # last selection not simulated
    # the recursion is still the top level, and the Monte Carlo is near it (N = 2000)
    means, vgs = _naive(0.025, 0.675, k=3)
    np.testing.assert_allclose(out["mean"], means, rtol=1e-11)
    assert np.all(np.abs(np.array(mc["mean"]["replicate_mean"]) - means) < 0.02)
    assert _json(*args) == out                                             # same seed, same numbers
    other = _json("--population", "2000", "--replicates", "8", "--seed", "4", "--iterations", "3")
    assert other["monte_carlo"]["mean"]["q50"] != mc["mean"]["q50"]


def test_population_defaults_and_table():
    result = _invoke("--population", "500", "--iterations", "2")
    assert result.exit_code == 0, result.output
    assert "Monte Carlo: N = 500, 100 replicates, seed 0" in result.stdout


def test_out_and_plot(tmp_path):
    nc, png = tmp_path / "sub" / "traj.nc", tmp_path / "traj.png"
    result = _invoke("--iterations", "4", "--out", str(nc), "--plot", str(png))
    assert result.exit_code == 0, result.output
    assert f"wrote {nc}" in result.stdout.replace("\n", "")
    ds = xr.open_dataset(nc, engine="h5netcdf")
    assert dict(ds.sizes) == {"iteration": 5}
    means, _ = _naive(0.025, 0.675, k=4)
    np.testing.assert_allclose(ds["mean"].values, means, rtol=1e-11)
    for key in ("r1", "r2", "tail_rate", "mutation_mode", "created_at", "command", "version_jax", "version_numpy"):
        assert key in ds.attrs
    assert math.isinf(ds.attrs["tail_rate"]) and "--out" in ds.attrs["command"]
    ds.close()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.rglob("*.tmp")]                       # no temporary file left


def test_out_and_plot_with_population(tmp_path):
    nc, pdf = tmp_path / "mc.nc", tmp_path / "mc.pdf"
    result = _invoke("--population", "300", "--replicates", "5", "--seed", "7", "--iterations", "2",
                     "--tail-rate", "1", "--out", str(nc), "--plot", str(pdf), "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)                                        # stdout stays one JSON object
    assert out["monte_carlo"]["replicates"] == 5 and out["params"]["tail_rate"] == 1.0
    ds = xr.open_dataset(nc, engine="h5netcdf")
    assert dict(ds.sizes) == {"replicate": 5, "iteration": 3}
    assert ds.attrs["seed"] == 7 and ds.attrs["population"] == 300 and ds.attrs["replicates"] == 5
    assert ds.attrs["tail_rate"] == 1.0
    np.testing.assert_allclose(ds["mean"].median("replicate").values, out["monte_carlo"]["mean"]["q50"])
    assert ds["mean"].dims == ("replicate", "iteration") and ds["recursion_mean"].dims == ("iteration",)
    ds.close()
    assert pdf.read_bytes()[:5] == b"%PDF-"


def test_help_lists_every_flag():
    result = runner.invoke(app, ["simulate", "--help"], env={"COLUMNS": "200", "TERM": "dumb"})
    assert result.exit_code == 0
    for flag in ("--r1", "--r2", "--tail-rate", "--sigma-mut", "--mutation-mode", "--mu0", "--sigma-g0",
                 "--sigma-env", "--iterations", "--population", "--replicates", "--seed", "--out", "--plot",
                 "--json"):
        assert flag in result.output


@pytest.mark.parametrize(("args", "flag"), [
    (("--r1", "0.6", "--r2", "0.4"), "--r1 + --r2"),
    (("--r1", "0.7", "--r2", "0.5"), "--r1 + --r2"),
    (("--r1", "-0.1"), "--r1"),
    (("--r1", "1.0", "--r2", "0"), "--r1"),
    (("--r2", "1.5"), "--r2"),
    (("--r2", "-0.2"), "--r2"),
    (("--sigma-env", "-1"), "--sigma-env"),
    (("--sigma-g0", "-0.5"), "--sigma-g0"),
    (("--sigma-mut", "-0.1"), "--sigma-mut"),
    (("--sigma-g0", "0", "--sigma-env", "0"), "--sigma-g0"),
    (("--tail-rate", "0"), "--tail-rate"),
    (("--tail-rate", "-2"), "--tail-rate"),
    (("--mu0", "nan"), "--mu0"),
    (("--mutation-mode", "both"), "--mutation-mode"),
    (("--iterations", "0"), "--iterations"),
    (("--population", "1"), "--population"),
    (("--population", "100", "--replicates", "0"), "--replicates"),
    (("--population", "100", "--seed", "-1"), "--seed"),
    (("--replicates", "5"), "--population"),
    (("--seed", "5"), "--population"),
    (("--population", "4", "--r1", "0.5", "--r2", "0.45"), "--population"),
])
def test_invalid_input_one_line_naming_the_flag(args, flag):
    result = _invoke(*args)
    assert result.exit_code != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and flag in lines[0], lines[0]
    assert "Traceback" not in result.output


def test_out_is_a_directory(tmp_path):
    result = _invoke("--out", str(tmp_path))
    assert result.exit_code != 0 and "--out" in result.stderr


def test_unwritable_outputs_fail_cleanly(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    for flag, name in (("--out", "t.nc"), ("--plot", "t.png")):
        result = _invoke("--iterations", "1", flag, str(blocker / name))
        assert result.exit_code != 0
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"error: {flag}"), result.stderr
    result = _invoke("--iterations", "1", "--plot", str(tmp_path / "t.unknownformat"))
    assert result.exit_code != 0 and "--plot" in result.stderr


def test_simulate_never_imports_torch(tmp_path):
    code = (
        "import sys, json\n"
        "from typer.main import get_command\n"
        "from qtm.cli import app\n"
        "get_command(app).main(args=['simulate', '--iterations', '2', '--population', '50', '--replicates', '2',"
        f" '--plot', {str(tmp_path / 'p.png')!r}, '--out', {str(tmp_path / 'p.nc')!r}, '--json'],"
        " standalone_mode=False)\n"
        "print(json.dumps({'torch_loaded': 'torch' in sys.modules}))\n"
    )
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert json.loads(lines[0])["iteration"] == [0, 1, 2]
    assert json.loads(lines[-1]) == {"torch_loaded": False}
