"""`qtm spectra` through typer's CliRunner: summary, --json, --out, --plot, bad files and bad arguments."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import xarray as xr
from PIL import Image
from typer.testing import CliRunner

from qtm.cli import app

runner = CliRunner()


def _direct_hf_power(array_hwc: np.ndarray) -> float:
    """hf_power from the definition with numpy.fft (independent of chain.spectra)."""
    x = array_hwc.astype(np.float64) / 255.0
    x = x - x.mean()
    x = x / np.sqrt((x**2).mean())
    h, w = x.shape[:2]
    power = (np.abs(np.fft.fft2(x, axes=(0, 1), norm="ortho")) ** 2).mean(axis=2) / (h * w)
    fy, fx = np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij")
    return float(power[np.hypot(fy, fx) > 0.02].sum())


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    arrays = {}
    for name in ["a.png", "nested/b.jpg", "nested/deeper/c.webp", "d.PNG"]:
        array = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith((".jpg", ".webp")):
            Image.fromarray(array).save(path, quality=100, **({"lossless": True} if name.endswith(".webp") else {}))
            array = np.asarray(Image.open(path).convert("RGB"))  # what the decoder returns (JPEG is lossy)
        else:
            Image.fromarray(array).save(path)
        arrays[name] = array
    full = (root / "a.png").read_bytes()
    (root / "nested" / "truncated.png").write_bytes(full[: len(full) // 2])
    (root / "caption.txt").write_text("not an image")
    return root, arrays


def test_json_output_matches_definition_and_reports_bad_file(folder):
    root, arrays = folder
    result = runner.invoke(app, ["spectra", str(root), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["images"] == ["a.png", "d.PNG", "nested/b.jpg", "nested/deeper/c.webp"]
    assert payload["num_images"] == 4 and payload["num_failed"] == 1
    assert payload["failed"][0]["path"] == "nested/truncated.png"
    assert "nested/truncated.png" in result.stderr
    for name, value in zip(payload["images"], payload["hf_power"]):
        assert value == pytest.approx(_direct_hf_power(arrays[name]), abs=2e-6)
    expected = [_direct_hf_power(arrays[n]) for n in payload["images"]]
    assert payload["summary"]["mean"] == pytest.approx(np.mean(expected), abs=2e-6)
    assert payload["summary"]["sd"] == pytest.approx(np.std(expected, ddof=1), abs=2e-6)
    assert payload["summary"]["median"] == pytest.approx(np.median(expected), abs=2e-6)
    assert len(payload["angular_psd_mean"]) == 16 and len(payload["radial_psd_mean"]) == len(payload["frequency"])


def test_summary_out_and_plot(folder, tmp_path):
    root, arrays = folder
    out, plot = tmp_path / "spectra.nc", tmp_path / "spectra.png"
    result = runner.invoke(app, ["spectra", str(root), "--out", str(out), "--plot", str(plot), "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    assert "images measured" in result.stdout and "4" in result.stdout
    assert "images skipped (unreadable)" in result.stdout
    assert "skipped nested/truncated.png" in result.stderr
    with xr.open_dataset(out, engine="h5netcdf") as ds:
        assert ds.sizes["image"] == 4 and ds.attrs["num_failed"] == 1
        assert list(ds["path"].values) == ["a.png", "d.PNG", "nested/b.jpg", "nested/deeper/c.webp"]
        np.testing.assert_allclose(ds["hf_power"].values, [_direct_hf_power(arrays[n]) for n in ds["path"].values],
                                   atol=2e-6)
        assert ds.attrs["phenotype_tau"] == 0.02 and "orthonormal" in ds.attrs["phenotype"]
    with Image.open(plot) as image:
        assert image.size[0] > 500 and image.size[1] > 200
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp files left


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{missing}"], "does not exist"),
        (["{empty}"], "no images"),
        (["{file}"], "is not a folder"),
        (["{root}", "--out", "{tmp}/spectra.csv"], "ending in .nc"),
        (["{root}", "--plot", "{tmp}/spectra.gif"], "--plot"),
        (["{root}", "--out", "{tmp}/absent/spectra.nc"], "does not exist"),
        (["{root}", "--device", "cuda:7"], "--device"),
    ],
)
def test_bad_arguments_exit_non_zero_with_one_clear_line(folder, tmp_path, args, message):
    root, _ = folder
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    names = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "file": tmp_path / "file.txt",
             "root": root, "tmp": tmp_path}
    if "cuda" in " ".join(args):
        import torch

        if torch.cuda.is_available():
            pytest.skip("CUDA present: --device cuda:7 may exist")
    result = runner.invoke(app, ["spectra", *[a.format(**names) for a in args]])
    assert result.exit_code != 0
    assert message in result.stderr
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error:")


def test_all_unreadable_fails(tmp_path):
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    result = runner.invoke(app, ["spectra", str(tmp_path)])
    assert result.exit_code != 0 and "none of the 1 images" in result.stderr and "x.png" in result.stderr


def test_importing_the_command_does_not_import_torch():
    code = "import sys, qtm.commands.spectra; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
