"""`qtm report`: figures and the markdown table of a run directory built here with plain xarray and PIL."""

import json
from pathlib import Path

import numpy as np
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
