"""`qtm demo --quick`: the whole loop on the embedded toy world produces every file of the report, the
selection assay included."""

import json

import numpy as np
import xarray as xr
from typer.testing import CliRunner

from qtm.cli import app

REPORT_FILES = ("report.md", "phenotype.png", "images.png", "radial_spectra.png", "fd_dinov2.png", "recall.png",
                "sfd.png", "assay.nc", "assay.png", "fit_qq.png")


def test_quick_demo_end_to_end_and_rerun(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    for name in ("metrics.nc", "fit.nc", "config.toml"):
        assert (out / name).is_file(), name
    for name in REPORT_FILES:
        assert (out / "report" / name).is_file(), name

    metrics = xr.open_dataset(out / "metrics.nc", engine="h5netcdf").load()
    assert list(metrics["condition"].values) == ["cfg1", "cfg7.5", "redifine"]
    assert int(metrics["completed"].sum()) == 3 * 3  # iteration 0 and two iterations per condition
    hf = metrics["hf_power"].values
    assert np.isfinite(hf).all() and ((hf > 0) & (hf < 1)).all()
    # iteration 0 is D_0 itself: the same phenotypes in every condition, zero paired feature distance
    assert np.allclose(hf[:, 0], hf[0, 0])
    assert np.allclose(metrics["sfd"].sel(iteration=0).values, 0.0)
    # the images every iteration trained on exist on disk, one per prompt
    for condition in metrics["condition"].values:
        for k in (1, 2):
            assert len(list((out / "images" / str(condition) / str(k)).glob("*.png"))) == metrics.sizes["image"]
    # the fit describes the same observations the chain measured
    fit = xr.open_dataset(out / "fit.nc", engine="h5netcdf").load()
    observed = np.nanmean(hf, axis=2)
    assert np.allclose(fit["observed_mean"].sel(iteration=[1, 2]).values, observed[:, 1:], rtol=1e-9)
    assert {r["condition"] for r in summary["rows"]} == {"cfg1", "cfg7.5", "redifine"}

    # the assay's reference set: one unguided image per generated image, never trained on
    ref = metrics["hf_power_reference"].values
    assert np.isnan(ref[:, 0]).all() and np.isfinite(ref[:, 1:]).all()
    assert metrics["hf_power_reference"].attrs["reference_scale"] == 1.0
    from chain.images import load_image

    for k in (1, 2):  # CFG 1 is the unguided model itself: its guided and reference images agree to 8 bits
        guided = sorted((out / "images" / "cfg1" / str(k)).glob("*.png"))
        reference = sorted((out / "images_reference" / "cfg1" / str(k)).glob("*.png"))
        assert len(reference) == len(guided) == metrics.sizes["image"]
        for g, r in zip(guided, reference):
            assert (load_image(g) - load_image(r)).abs().max() <= 1.0 / 255 + 1e-6
    # assay.nc summarizes exactly the stored phenotypes: S = mean(guided) - mean(reference) per cell
    assay = xr.open_dataset(out / "report" / "assay.nc", engine="h5netcdf").load()
    assert list(assay["condition"].values) == ["cfg1", "cfg7.5", "redifine"]
    assert list(assay["iteration"].values) == [1, 2]
    np.testing.assert_allclose(assay["guided_mean"].values, hf[:, 1:].mean(axis=2), rtol=1e-12)
    np.testing.assert_allclose(assay["reference_mean"].values, ref[:, 1:].mean(axis=2), rtol=1e-12)
    np.testing.assert_allclose(assay["selection_differential"].values,
                               hf[:, 1:].mean(axis=2) - ref[:, 1:].mean(axis=2), rtol=1e-9, atol=1e-15)
    assert summary["assay"] == str(out / "report" / "assay.nc")
    # CFG 1 is the control (guided images = reference images up to rounding): no selection in either route
    # and the test says "none", although hf_power is skewed (docs/assay.md, "The normal-score scale")
    assert list(assay["best_model"].sel(condition="cfg1").values) == ["none", "none"]
    for q in ("r1", "r2", "r1_empirical", "r2_empirical"):
        assert (assay[q].sel(condition="cfg1").values < 0.05).all(), q

    # a rerun continues: nothing is regenerated, the metrics are unchanged, fit and report are redone
    mtime = (out / "images" / "cfg1" / "1").stat().st_mtime_ns
    again = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out), "--json"])
    assert again.exit_code == 0, again.output
    assert (out / "images" / "cfg1" / "1").stat().st_mtime_ns == mtime
    rerun = xr.open_dataset(out / "metrics.nc", engine="h5netcdf").load()
    np.testing.assert_array_equal(rerun["hf_power"].values, hf)


def test_demo_refuses_a_file_as_output(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(target)])
    assert result.exit_code != 0
    assert "not a directory" in result.output


def test_demo_refuses_another_runs_folder_before_touching_its_images(tmp_path):
    out = tmp_path / "other"
    (out / "data").mkdir(parents=True)
    (out / "data" / "mine.png").write_bytes(b"not the demo's")
    (out / "config.toml").write_text("[run]\nnum_iterations = 9\n")
    (out / "metrics.nc").write_bytes(b"")
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out)])
    assert result.exit_code != 0
    assert "config.toml" in result.output
    assert [p.name for p in (out / "data").iterdir()] == ["mine.png"]
