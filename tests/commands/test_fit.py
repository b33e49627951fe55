"""`qtm fit` through the CLI: flags, outputs (--json, --out, --plot, tables) and error paths."""

import json

import numpy as np
import pytest
import xarray as xr
from typer.testing import CliRunner

from tests.fitting.testdata import TRUTH_CONDITIONS, TRUTH_SHARED, recursion_phenotypes, results_dataset, summary_dataset
from tests.commands import assert_runs_without_torch
from qtm.cli import app
from qtm.params import PARAM_NAMES

runner = CliRunner()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    # Independent Gaussian draws around qtm's recursion (fast); 4 iterations, 300 images.
    x = recursion_phenotypes(TRUTH_CONDITIONS, TRUTH_SHARED, num_iterations=4, num_images=300, seed=0)
    root = tmp_path_factory.mktemp("results") / "toy"
    root.mkdir()
    results_dataset(x, TRUTH_CONDITIONS).to_netcdf(root / "metrics.nc", engine="h5netcdf")
    summary_dataset(x, TRUTH_CONDITIONS).to_netcdf(root.parent / "summary.nc", engine="h5netcdf")
    weak = dict(TRUTH_CONDITIONS, **{"cfg7.5": (0.9, 1e-4)})
    y = recursion_phenotypes(weak, TRUTH_SHARED, num_iterations=4, num_images=300, seed=1)
    results_dataset(y, weak).to_netcdf(root.parent / "weak.nc", engine="h5netcdf")
    return root


def test_table_shows_the_identifiability_warning(run_dir):
    result = _invoke(run_dir.parent / "weak.nc", "--starts", "2", "--interval", "laplace")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.startswith("warning:")]
    assert any("r2[cfg7.5]" in line and "indistinguishable from 0" in line for line in lines), result.stdout
    assert "not identified" in result.stdout


def _invoke(*args):
    return runner.invoke(app, ["fit", *map(str, args)])


def test_json_output_has_the_documented_shape(run_dir):
    result = _invoke(run_dir, "--json", "--starts", "2")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert set(out) == {"conditions", "shared", "diagnostics"}
    assert set(out["conditions"]) == set(TRUTH_CONDITIONS)
    assert set(out["shared"]) == {"mu0", "sigma_g0", "sigma_env"}
    for name, params in out["conditions"].items():
        assert set(params) == {"r1", "r2", "tail_rate", "sigma_mut"}
        for p in ("r1", "r2"):
            entry = params[p]
            assert entry["lower"] <= entry["estimate"] <= entry["upper"]
            assert entry["free"] is True
        assert params["tail_rate"]["free"] is False and params["tail_rate"]["estimate"] == "inf"  # strict JSON: inf as the string "inf"
        r1, r2 = TRUTH_CONDITIONS[name]
        assert abs(params["r1"]["estimate"] - r1) < 0.1 and abs(params["r2"]["estimate"] - r2) < 0.1
    assert set(out["shared"]) | {p for c in out["conditions"].values() for p in c} == set(PARAM_NAMES)
    diag = out["diagnostics"]
    assert diag["model"] == "hard" and diag["interval"] == "laplace; profile for r1, r2"
    assert diag["information"]["aic"] == pytest.approx(2 * diag["information"]["num_free"]
                                                       - 2 * diag["information"]["log_likelihood"])
    assert diag["transform"] == "none"
    assert diag["cell_goodness_of_fit"]["summary"]["shape"]["num_cells"] == 1 + 3 * 4
    assert len(diag["starts"]) == 2 and set(diag["goodness_of_fit"]) == set(TRUTH_CONDITIONS)


def test_out_and_plot_write_files(run_dir, tmp_path):
    out, plot = tmp_path / "fit.nc", tmp_path / "fit.png"
    result = _invoke(run_dir / "metrics.nc", "--out", out, "--plot", plot, "--starts", "2", "--seed", "3")
    assert result.exit_code == 0, result.output
    assert "r1" in result.stdout and "cfg7.5" in result.stdout and "goodness of fit" in result.stdout
    ds = xr.open_dataset(out, engine="h5netcdf").load()
    assert ds.attrs["seed"] == 3 and ds.attrs["model"] == "hard" and "git_revision" in ds.attrs
    assert list(ds["parameter"].values) == list(PARAM_NAMES)
    assert ds["estimate"].dims == ("condition", "parameter")
    assert ds["fitted_mean"].shape == (3, 5) and ds["covariance"].shape == (9, 9)
    np.testing.assert_allclose(np.diag(ds["correlation"].values), 1.0, rtol=1e-10)
    # The stored covariance is the one the intervals came from: symmetric, positive definite.
    cov = ds["covariance"].values
    np.testing.assert_allclose(cov, cov.T, rtol=1e-10)
    assert np.all(np.linalg.eigvalsh(cov) > 0)
    assert np.all(ds["lower"].values <= ds["estimate"].values + 1e-15)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp"))


def test_fix_free_share_flags(run_dir):
    result = _invoke(run_dir, "--json", "--starts", "1", "--fix", "sigma_env=0.05", "--free", "r1,r2,mu0",
                     "--fix", "sigma_g0=0.05", "--share", "mu0,sigma_g0,r2")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    for params in out["conditions"].values():
        assert params["sigma_env"]["estimate"] == 0.05 and params["sigma_env"]["free"] is False
    assert out["shared"]["sigma_g0"]["estimate"] == 0.05
    assert out["shared"]["mu0"]["free"] is True
    # r2 shared: one free value for all conditions; sigma_env no longer shared: listed per condition.
    assert out["shared"]["r2"]["free"] is True and "r2" not in out["conditions"]["cfg1.0"]
    assert len(out["diagnostics"]["correlation"]["labels"]) == 1 + 1 + 3   # mu0, r2, r1 x 3


def test_transform_log_is_recorded_and_puts_mu0_on_the_log_scale(run_dir):
    result = _invoke(run_dir, "--json", "--starts", "2", "--transform", "log")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["diagnostics"]["transform"] == "log"
    # the data's iteration-0 mean is 0.3 with sd 0.05: on the log scale mu0 ~ log 0.3
    assert abs(out["shared"]["mu0"]["estimate"] - np.log(0.3)) < 0.05
    assert out["diagnostics"]["information"]["log_jacobian"] > 0   # a sum of -log x over values below 1


def test_train_iterations_forecast(run_dir):
    result = _invoke(run_dir, "--json", "--starts", "2", "--train-iterations", "2")
    assert result.exit_code == 0, result.output
    diag = json.loads(result.stdout)["diagnostics"]
    assert diag["iterations_used"] == [0, 1, 2]
    row = diag["forecast"]["cfg2.5"]
    assert row["num_held_out"] == 2 and row["held_out_iterations"] == [3, 4]
    assert 0.0 <= row["fraction_inside_band"] <= 1.0


@pytest.mark.parametrize("args, needle", [
    (["{missing}"], "no such file"),
    (["{run}", "--fix", "r1"], "--fix expects name=value"),
    (["{run}", "--fix", "r1=abc"], "not a number"),
    (["{run}", "--free", "r9"], "unknown parameter"),
    (["{run}", "--free", "r1,tail_rate"], "--model soft"),
    (["{run}", "--model", "medium"], "--model must be one of"),
    (["{run}", "--interval", "jackknife"], "--interval must be one of"),
    (["{run}", "--starts", "0"], "--starts must be >= 1"),
    (["{run}", "--train-iterations", "0"], "--train-iterations must be >= 1"),
    (["{summary}", "--interval", "bootstrap", "--starts", "1"], "hf_power"),
    (["{run}", "--transform", "cube"], "--transform must be one of none, log, logit"),
    (["{summary}", "--transform", "log", "--starts", "1"], "--transform log needs the per-image variable"),
])
def test_error_paths_exit_2_with_one_clear_line(run_dir, tmp_path, args, needle):
    mapping = {"{missing}": tmp_path / "nothing", "{run}": run_dir, "{summary}": run_dir.parent / "summary.nc"}
    result = _invoke(*[mapping.get(a, a) for a in args])
    assert result.exit_code == 2
    assert needle in result.stderr
    assert result.stderr.startswith("error: ")


def test_bad_schema_version_names_file_and_attribute(tmp_path):
    x = recursion_phenotypes(TRUTH_CONDITIONS, TRUTH_SHARED, num_iterations=2, num_images=20, seed=1)
    path = tmp_path / "old.nc"
    results_dataset(x, TRUTH_CONDITIONS, schema_version=0).to_netcdf(path, engine="h5netcdf")
    result = _invoke(path)
    assert result.exit_code == 2 and str(path) in result.stderr and "schema_version" in result.stderr


def test_fit_never_imports_torch(run_dir):
    assert_runs_without_torch(["fit", str(run_dir), "--json", "--starts", "1"])


def test_run_in_progress_fits_the_finished_conditions(tmp_path):
    # The chain runs every iteration of one condition before the next: mid-run, cfg2.5 has only the
    # shared iteration 0 (the rest NaN, not produced yet).
    x = recursion_phenotypes(TRUTH_CONDITIONS, TRUTH_SHARED, num_iterations=4, num_images=300, seed=2)
    x[1, 1:] = np.nan
    x[2, 1:] = np.nan
    path = tmp_path / "partial.nc"
    results_dataset(x, TRUTH_CONDITIONS).to_netcdf(path, engine="h5netcdf")
    result = _invoke(path, "--starts", "2")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning:")]
    for name in ("cfg2.5", "cfg1.0"):
        assert f"warning: condition {name} has no finished iteration yet; left out" in warnings, result.stdout
    result = _invoke(path, "--json", "--starts", "2")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert set(out["conditions"]) == {"cfg7.5"}
    r1, r2 = TRUTH_CONDITIONS["cfg7.5"]
    assert abs(out["conditions"]["cfg7.5"]["r1"]["estimate"] - r1) < 0.1
    assert abs(out["conditions"]["cfg7.5"]["r2"]["estimate"] - r2) < 0.1
    assert "condition cfg1.0 has no finished iteration yet; left out" in out["diagnostics"]["warnings"]
    # Nothing finished yet anywhere: the clear one-line error remains.
    x[0, 1:] = np.nan
    results_dataset(x, TRUTH_CONDITIONS).to_netcdf(path, engine="h5netcdf")
    result = _invoke(path, "--starts", "2")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and str(path) in result.stderr
    assert "only at iteration 0" in result.stderr


def _run_copy(run_dir, tmp_path):
    import shutil

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(run_dir / "metrics.nc", run / "metrics.nc")
    return run


def test_a_run_folder_gets_its_fit_nc_by_default_and_a_refit_replaces_it(run_dir, tmp_path):
    run = _run_copy(run_dir, tmp_path)
    first = _invoke(run, "--starts", "2", "--seed", "1")
    assert first.exit_code == 0, first.output
    fit_nc = run / "fit.nc"
    assert xr.open_dataset(fit_nc, engine="h5netcdf").load().attrs["seed"] == 1
    assert f"note: fit written to {fit_nc}" in first.output and "replacing" not in first.output
    second = _invoke(run, "--starts", "2", "--seed", "2")
    assert second.exit_code == 0, second.output
    assert "replacing the previous fit" in second.output
    assert xr.open_dataset(fit_nc, engine="h5netcdf").load().attrs["seed"] == 2
    assert sorted(p.name for p in run.iterdir()) == ["fit.nc", "metrics.nc"]  # no temporaries left
    # qtm report draws the fit it finds there
    report = runner.invoke(app, ["report", str(run), "--json"])
    assert report.exit_code == 0, report.output
    assert any("fitted" in caption for caption in json.loads(report.stdout)["figures"])


def test_out_overrides_the_default_and_a_nc_file_gets_no_default(run_dir, tmp_path):
    run = _run_copy(run_dir, tmp_path)
    other = tmp_path / "elsewhere.nc"
    result = _invoke(run, "--starts", "2", "--out", other)
    assert result.exit_code == 0, result.output
    assert other.is_file() and not (run / "fit.nc").exists() and "note: fit written" not in result.output
    result = _invoke(run / "metrics.nc", "--starts", "2")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in run.iterdir()) == ["metrics.nc"]


def test_a_fit_nc_that_is_not_a_fit_is_refused_before_the_fit_and_kept(run_dir, tmp_path):
    run = _run_copy(run_dir, tmp_path)
    (run / "fit.nc").write_bytes(b"my own notes")
    result = _invoke(run, "--starts", "2")
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "is not a fit written by `qtm fit`" in errors[0] and "--out" in errors[0]
    assert (run / "fit.nc").read_bytes() == b"my own notes"
    assert "qtm fit:" not in result.output  # refused before any stage ran


@pytest.mark.slow
def test_compare_ranks_models_and_transforms(run_dir):
    result = _invoke(run_dir, "--json", "--starts", "2", "--compare")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["diagnostics"]["model_comparison"]
    assert len(rows) == 6 * 3
    assert {(r["model"], r["mutation"], r["transform"]) for r in rows} == {
        (m, u, t) for m in ("hard", "soft") for u in ("none", "paper", "additive") for t in ("none", "log", "logit")}
    assert sum(r["weight"] for r in rows) == pytest.approx(1.0)
    # normal draws on the measured scale: the measured scale wins (the log and logit scales skew them)
    assert rows[0]["transform"] == "none"
