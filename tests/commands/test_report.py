"""`qtm report`: figures and the markdown table of a run directory built here with plain xarray and PIL."""

import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from PIL import Image
from typer.testing import CliRunner

from chain.report import image_grid
from qtm.cli import app

CONDITIONS = ["cfg1.0", "cfg7.5"]
COLOURS = {("cfg1.0", 0): (255, 0, 0), ("cfg1.0", 1): (0, 255, 0), ("cfg1.0", 2): (0, 0, 255),
           ("cfg7.5", 0): (255, 0, 0), ("cfg7.5", 1): (255, 255, 0), ("cfg7.5", 2): (0, 255, 255)}


def make_run(root: Path, *, with_fd: bool = True) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(0)
    hf = rng.uniform(0.1, 0.9, size=(2, 3, 5))
    hf[:, 0] = hf[0, 0]  # iteration 0 is shared
    hf[1, 2, 4] = np.nan  # one image not produced
    freq = np.linspace(0, 0.7, 12)
    ds = xr.Dataset(
        {
            "hf_power": (("condition", "iteration", "image"), hf),
            "radial_psd": (("condition", "iteration", "frequency"), rng.uniform(0.01, 1, (2, 3, 12))),
            "angular_psd": (("condition", "iteration", "angle"), rng.uniform(0.01, 1, (2, 3, 16))),
            "fd_dinov2": (("condition", "iteration"), np.array([[0.0, 3.0, 5.0], [0.0, 4.0, 9.0]]) if with_fd
                          else np.full((2, 3), np.nan)),
        },
        coords={"condition": CONDITIONS, "iteration": [0, 1, 2], "image": np.arange(5), "frequency": freq,
                "angle": np.arange(16) * np.pi / 16},
        attrs={"schema_version": 1, "dataset": "synthetic", "base_model": "none"},
    )
    run = root / "run"
    run.mkdir()
    ds.to_netcdf(run / "metrics.nc", engine="h5netcdf")
    for (condition, iteration), colour in COLOURS.items():
        folder = run / "images" / condition / str(iteration)
        folder.mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (16, 16), colour).save(folder / f"{i:04d}.png")
    return run, hf


def test_report_writes_figures_and_table(tmp_path):
    run, hf = make_run(tmp_path)
    result = CliRunner().invoke(app, ["report", str(run), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    for name in ("phenotype.png", "images.png", "radial_spectra.png", "fd_dinov2.png", "report.md"):
        assert (run / "report" / name).is_file()
    rows = {(r["condition"], r["iteration"]): r for r in out["rows"]}
    assert len(rows) == 6
    for c, condition in enumerate(CONDITIONS):
        for k in range(3):
            values = hf[c, k][np.isfinite(hf[c, k])]
            row = rows[(condition, k)]
            assert row["num_images"] == len(values)
            assert np.isclose(row["hf_power_mean"], values.mean())
            assert np.isclose(row["hf_power_std"], values.std(ddof=1))
    text = (run / "report" / "report.md").read_text()
    assert "| cfg7.5 | 2 |" in text and "![" in text


def test_image_grid_places_each_condition_and_iteration(tmp_path):
    run, _ = make_run(tmp_path)
    metrics = xr.open_dataset(run / "metrics.nc", engine="h5netcdf")
    thumb, per_cell, gap = 8, 2, 4
    grid = image_grid(run, metrics, images_per_cell=per_cell, thumb=thumb)
    cell_w = per_cell * thumb + (per_cell - 1)
    for r, condition in enumerate(CONDITIONS):
        for k in range(3):
            y = r * (thumb + gap) + thumb // 2
            x = k * (cell_w + gap) + thumb // 2
            assert tuple(grid[y, x]) == COLOURS[(condition, k)]


def test_report_without_metrics_fails_clearly(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code != 0
    assert "metrics.nc" in result.output


def test_report_skips_absent_metrics(tmp_path):
    run, _ = make_run(tmp_path, with_fd=False)
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert not (run / "report" / "fd_dinov2.png").exists()


def test_iteration_zero_comes_from_the_configured_dataset(tmp_path):
    """Without images/<condition>/0 the grid shows D_0 from config.toml's data.path (relative to the run)."""
    import shutil

    run, _ = make_run(tmp_path)
    data = run / "data"
    data.mkdir()
    for i in range(5):
        Image.new("RGB", (16, 16), (9, 99, 199)).save(data / f"d{i}.png")
    for condition in CONDITIONS:
        shutil.rmtree(run / "images" / condition / "0")
    (run / "config.toml").write_text('[data]\npath = "data"\n')
    metrics = xr.open_dataset(run / "metrics.nc", engine="h5netcdf")
    grid = image_grid(run, metrics, images_per_cell=2, thumb=8)
    assert tuple(grid[4, 4]) == (9, 99, 199)
    assert tuple(grid[12 + 4, 4]) == (9, 99, 199)


def test_hidden_files_are_skipped(tmp_path):
    """Temp files of interrupted writes and macOS AppleDouble files (names starting with '.') are not images."""
    run, _ = make_run(tmp_path)
    (run / "images" / "cfg1.0" / "1" / ".00003.123.abc.tmp.png").write_bytes(b"partial")
    (run / "images" / "cfg1.0" / "1" / "._0000.png").write_bytes(b"\x00\x05\x16\x07")
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output


ASSAY_WINDOWS = {"cfg1.0": (0.05, 0.4), "cfg7.5": (0.3, 0.05)}
FIT_WINDOWS = {"cfg1.0": {"r1": (0.06, 0.0, 0.2), "r2": (0.8, 0.7, 0.9)},   # r2 far from the truth, 0.4
               "cfg7.5": {"r1": (0.3, 0.1, 0.5), "r2": (0.05, 0.0, 0.3)}}  # both hold the truth


def make_assay_run(root: Path, *, with_fit: bool = True) -> Path:
    """A hand-written run with reference images: hf_power is hf_power_reference truncated at the known
    ASSAY_WINDOWS (tests.fitting.testdata.selection_experiment), and a hand-written fit.nc whose r1, r2
    intervals (FIT_WINDOWS) hold the truth except cfg1.0's r2."""
    from qtm.params import PARAM_NAMES
    from tests.fitting.testdata import selection_experiment

    ds = selection_experiment(ASSAY_WINDOWS, num_iterations=3, num_images=300)
    rng = np.random.default_rng(1)
    ds["radial_psd"] = (("condition", "iteration", "frequency"), rng.uniform(0.01, 1, (2, 4, 12)))
    ds = ds.assign_coords(frequency=np.linspace(0, 0.7, 12))
    run = root / "assay_run"
    run.mkdir()
    ds.to_netcdf(run / "metrics.nc", engine="h5netcdf")
    if not with_fit:
        return run
    names = list(PARAM_NAMES)
    values = np.full((2, len(names), 3), 0.1)
    free = np.zeros((2, len(names)), bool)
    for c, condition in enumerate(ASSAY_WINDOWS):
        for parameter, triple in FIT_WINDOWS[condition].items():
            values[c, names.index(parameter)] = triple
            free[c, names.index(parameter)] = True
    hf = ds["hf_power"].values
    mean, sd, n = np.nanmean(hf, -1), np.nanstd(hf, -1, ddof=1), np.isfinite(hf).sum(-1)
    cp, ci = ("condition", "parameter"), ("condition", "iteration")
    fit = xr.Dataset(
        {"estimate": (cp, values[..., 0]), "lower": (cp, values[..., 1]), "upper": (cp, values[..., 2]),
         "free": (cp, free), "identified": (cp, np.ones_like(free)),
         "observed_mean": (ci, mean), "observed_sd": (ci, sd), "observed_num_images": (ci, n),
         "train": (("iteration",), np.ones(hf.shape[1], bool)), "fitted_mean": (ci, mean),
         "mean_lower": (ci, mean - 0.002), "mean_upper": (ci, mean + 0.002),
         "predict_lower": (ci, mean - 0.005), "predict_upper": (ci, mean + 0.005)},
        coords={"condition": list(ASSAY_WINDOWS), "iteration": ds["iteration"].values, "parameter": names},
        attrs={"fit_schema_version": 1, "model": "hard", "mutation": "none", "interval": "laplace",
               "warnings": "[]"})
    fit.to_netcdf(run / "fit.nc", engine="h5netcdf")
    return run


def test_report_shows_the_assay_next_to_the_fit(tmp_path):
    run = make_assay_run(tmp_path)
    result = CliRunner().invoke(app, ["report", str(run), "--json", "--bootstrap-samples", "200"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    for name in ("assay.png", "selection_routes.png"):
        assert (run / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert str(run / "report" / name) in out["figures"].values()
    verdicts = {(r["condition"], r["parameter"]): r["verdict"] for r in out["selection_routes"]}
    assert verdicts == {("cfg1.0", "r1"): "agree", ("cfg1.0", "r2"): "disagree",
                        ("cfg7.5", "r1"): "agree", ("cfg7.5", "r2"): "agree"}
    for row in out["selection_routes"]:
        assert [a["iteration"] for a in row["assay"]] == [1, 2, 3]
        assert row["fit"]["estimate"] == FIT_WINDOWS[row["condition"]][row["parameter"]][0]
    text = (run / "report" / "report.md").read_text()
    assert "## Selection assay" in text and "![Selection assay](assay.png)" in text
    assert "| cfg7.5 | 2 |" in text and "truncation" in text
    assert "cfg1.0, r2: the fit's r2 = 0.8 [0.7, 0.9] overlaps none of the assay's intervals" in text
    assert "the two routes agree." in text


def test_report_with_reference_images_and_no_fit_shows_the_assay_alone(tmp_path):
    run = make_assay_run(tmp_path, with_fit=False)
    result = CliRunner().invoke(app, ["report", str(run), "--bootstrap-samples", "50"])
    assert result.exit_code == 0, result.output
    assert (run / "report" / "assay.png").is_file()
    assert not (run / "report" / "selection_routes.png").exists()
    text = (run / "report" / "report.md").read_text()
    assert "## Selection assay" in text and "trajectory fit" not in text


def test_report_without_reference_images_has_no_assay(tmp_path):
    run, _ = make_run(tmp_path)
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert not (run / "report" / "assay.png").exists()
    assert "Selection assay" not in (run / "report" / "report.md").read_text()


def _fit_only(root: Path, *, summary: bool = False) -> tuple[Path, np.ndarray]:
    """A folder holding only what `qtm fit` needs (docs/results-contract.md): hf_power (or the summary trio)
    over condition and iteration, and schema_version."""
    hf = np.random.default_rng(3).uniform(0.1, 0.9, size=(2, 3, 7))
    if summary:
        ds = xr.Dataset({"hf_power_mean": (("condition", "iteration"), hf.mean(-1)),
                         "hf_power_std": (("condition", "iteration"), hf.std(-1, ddof=1)),
                         "num_images": (("condition", "iteration"), np.full((2, 3), 7))},
                        coords={"condition": CONDITIONS, "iteration": [0, 1, 2]}, attrs={"schema_version": 1})
    else:
        ds = xr.Dataset({"hf_power": (("condition", "iteration", "image"), hf)},
                        coords={"condition": CONDITIONS, "iteration": [0, 1, 2]}, attrs={"schema_version": 1})
    run = root / "mine"
    run.mkdir()
    ds.to_netcdf(run / "metrics.nc", engine="h5netcdf")
    return run, hf


@pytest.mark.parametrize("summary", [False, True])
def test_report_on_a_dataset_holding_only_what_fit_needs_says_what_it_leaves_out(tmp_path, summary):
    run, hf = _fit_only(tmp_path, summary=summary)
    result = CliRunner().invoke(app, ["report", str(run), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert sorted(p.name for p in (run / "report").iterdir()) == ["phenotype.png", "report.md"]
    assert len(out["left_out"]) == 3
    assert any("image grid" in s for s in out["left_out"]) and any("radial_psd" in s for s in out["left_out"])
    assert any("fd_dinov2" in s for s in out["left_out"])
    rows = {(r["condition"], r["iteration"]): r for r in out["rows"]}
    assert np.isclose(rows[("cfg7.5", 2)]["hf_power_mean"], hf[1, 2].mean())
    assert np.isclose(rows[("cfg7.5", 2)]["hf_power_std"], hf[1, 2].std(ddof=1))
    assert rows[("cfg7.5", 2)]["num_images"] == 7
    text = (run / "report" / "report.md").read_text()
    assert "Left out, because the dataset does not hold it:" in text and "radial_psd" in text
    assert "| cfg7.5 | 2 |" in text
    plain = CliRunner().invoke(app, ["report", str(run)])
    assert plain.exit_code == 0, plain.output
    assert "note: the report leaves out the radial spectra (no radial_psd)" in plain.output


def test_a_full_run_leaves_nothing_out(tmp_path):
    run, _ = make_run(tmp_path)
    result = CliRunner().invoke(app, ["report", str(run), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["left_out"] == []
    assert "Left out" not in (run / "report" / "report.md").read_text()


def test_report_with_a_fit_draws_the_qq_figure_and_the_cell_table(tmp_path):
    import jax

    from fitting.driver import FitConfig, fit_observations
    from fitting.observations import load_observations
    from fitting.results import write_fit

    run, _ = make_run(tmp_path)
    fit = fit_observations(load_observations(run), FitConfig(num_starts=1, num_draws=50, transform="log"),
                           key=jax.random.key(0))
    write_fit(fit, run / "fit.nc")
    result = CliRunner().invoke(app, ["report", str(run), "--json"])
    assert result.exit_code == 0, result.output
    assert (run / "report" / "fit_qq.png").is_file()
    text = (run / "report" / "report.md").read_text()
    assert "![Goodness of fit per cell: observed against predicted quantiles](fit_qq.png)" in text
    assert "Goodness of fit per cell" in text and "Fitted on the log scale" in text
    # 5 images per cell: too few for the shape test (n >= 8), the mean residual is there
    assert "| cfg7.5 | - / " in text
