"""`qtm assay` through the CLI: tables, --json (strict), --out, --plot, error paths, no torch."""

import pytest
import xarray as xr
from typer.testing import CliRunner

from qtm.cli import app
from tests.commands import assert_runs_without_torch
from tests.fitting.testdata import selection_experiment, strict_loads

runner = CliRunner()
WINDOWS = {"cfg7.5": (0.3, 0.05), "cfg1": (0.05, 0.4)}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A hand-written results dataset: 2 conditions x iterations 0..3 x 400 images, guided = the reference
    law truncated at a known window, the mean moving by half the selection differential."""
    ds = selection_experiment(WINDOWS, num_iterations=3, num_images=400)
    root = tmp_path_factory.mktemp("results") / "toy"
    root.mkdir()
    ds.to_netcdf(root / "metrics.nc", engine="h5netcdf")
    ds.drop_vars("hf_power_reference").to_netcdf(root.parent / "no_reference.nc", engine="h5netcdf")
    return root


def _invoke(*args):
    return runner.invoke(app, ["assay", *map(str, args)])


def test_json_is_strict_and_has_the_issue_shape(run_dir):
    result = _invoke(run_dir, "--json", "--bootstrap-samples", "100")
    assert result.exit_code == 0, result.output
    out = strict_loads(result.stdout)
    assert set(out["conditions"]) == set(WINDOWS)
    for name, (r1, r2) in WINDOWS.items():
        rows = out["conditions"][name]["iterations"]
        assert [row["iteration"] for row in rows] == [1, 2, 3]
        for row in rows:
            for q in ("r1", "r2", "selection_differential", "response", "heritability"):
                assert set(row[q]) >= {"estimate", "lower", "upper"}
            assert row["truncation_test"]["best"] == "truncation"
            assert abs(row["r1"]["estimate"] - r1) < 0.1 and abs(row["r2"]["estimate"] - r2) < 0.1
            assert row["num_guided"] == row["num_reference"] == 400
        assert rows[-1]["response"]["estimate"] is None  # no iteration after the last
        assert out["conditions"][name]["realized_heritability"]["estimate"] is not None


def test_table_out_and_plot(run_dir, tmp_path):
    out, plot = tmp_path / "assay.nc", tmp_path / "assay.png"
    result = _invoke(run_dir / "metrics.nc", "--out", out, "--plot", plot, "--bootstrap-samples", "50",
                     "--seed", "3")
    assert result.exit_code == 0, result.output
    assert "cfg7.5" in result.stdout and "realized selection window" in result.stdout
    assert "realized heritability" in result.stdout
    ds = xr.open_dataset(out, engine="h5netcdf").load()
    assert ds.attrs["seed"] == 3 and ds.attrs["num_bootstrap"] == 50
    assert ds["r1"].dims == ("condition", "iteration") and ds.sizes["iteration"] == 3
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_seed_same_intervals(run_dir):
    a = strict_loads(_invoke(run_dir, "--json", "--bootstrap-samples", "30", "--seed", "5").stdout)
    b = strict_loads(_invoke(run_dir, "--json", "--bootstrap-samples", "30", "--seed", "5").stdout)
    assert a["conditions"] == b["conditions"]


def test_missing_reference_is_one_clear_error(run_dir):
    path = run_dir.parent / "no_reference.nc"
    result = _invoke(path)
    assert result.exit_code == 2
    assert str(path) in result.stderr and "hf_power_reference" in result.stderr
    assert "reference_scale" in result.stderr and "Traceback" not in result.output


def test_bad_arguments(run_dir, tmp_path):
    result = _invoke(run_dir, "--bootstrap-samples", "1")
    assert result.exit_code == 2 and "--bootstrap-samples" in result.stderr
    result = _invoke(run_dir, "--out", tmp_path)
    assert result.exit_code == 2 and "is a directory" in result.stderr
    result = _invoke(tmp_path / "missing")
    assert result.exit_code == 2 and "no such file" in result.stderr


def test_assay_never_imports_torch(run_dir):
    assert_runs_without_torch(["assay", str(run_dir), "--json", "--bootstrap-samples", "20"])
