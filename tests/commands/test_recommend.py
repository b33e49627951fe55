"""`qtm recommend` and `qtm recommend-check` through the CLI: the tiny CPU example end to end (slow), strict
JSON, the files, error paths, and the study comparison on a hand-written metrics.nc."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from typer.testing import CliRunner

from qtm.cli import app
from tests.fitting.testdata import strict_loads

runner = CliRunner()
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny_cpu.toml"


@pytest.fixture(scope="module")
def example_config(tmp_path_factory):
    from tests.chain.fixtures import make_captioned_folder

    root = tmp_path_factory.mktemp("example")
    make_captioned_folder(root / "tiny_data", num_images=6)
    path = root / "tiny_cpu.toml"
    path.write_text(EXAMPLE.read_text())  # data.path = "tiny_data" resolves next to the copied file
    return path


def test_too_few_scales_are_refused_naming_the_flag(example_config):
    result = runner.invoke(app, ["recommend", str(example_config), "--scales", "1,2.5"])
    assert result.exit_code == 2
    assert "--scales needs at least 3 scales" in result.output
    result = runner.invoke(app, ["recommend", str(example_config), "--scales", "1,x"])
    assert result.exit_code == 2 and "comma-separated" in result.output
    result = runner.invoke(app, ["recommend", str(example_config), "--images", "4"])
    assert result.exit_code == 2 and "--images must be >= 8" in result.output


@pytest.mark.parametrize("args, message", [
    (["--schedule", "exponential:alpha=-1"], "--schedule 'exponential:alpha=-1': field 'schedule.alpha' = -1.0"),
    (["--schedule", "constant:scale=2"], "a constant scale is one of --scales"),
    (["--schedule", "exponential:scale=2", "--schedule", "exponential:scale=2"], "is used twice"),
    (["--pilot", "pilot.nc", "--config-schedules"], "--pilot reuses the schedules of its file"),
])
def test_bad_schedules_are_refused_naming_the_flag(example_config, args, message):
    result = runner.invoke(app, ["recommend", str(example_config), *args])
    assert result.exit_code == 2 and message in result.output, result.output


def test_config_schedules_needs_a_schedule_in_the_config(tmp_path):
    path = tmp_path / "constant.toml"
    text = EXAMPLE.read_text()
    path.write_text(text[:text.index('[[conditions]]\nname = "redifine"')])
    result = runner.invoke(app, ["recommend", str(path), "--config-schedules"])
    assert result.exit_code == 2 and "has no [[conditions]] with a non-constant schedule" in result.output


@pytest.mark.slow
def test_tiny_example_end_to_end(example_config, tmp_path):
    out, plot = tmp_path / "pilot", tmp_path / "recommend.png"
    # scales 1 (the reference set), 2.5 and 7.5; the config's ReDiFine condition (exponential, scale 7.5,
    # alpha 2, condition drop 0.2) and an exponential schedule with alpha 0, which is scale 7.5 at every step
    result = runner.invoke(app, ["recommend", str(example_config), "--scales", "1,2.5,7.5", "--images", "8",
                                 "--config-schedules", "--schedule", "exponential:scale=7.5,alpha=0,name=flat",
                                 "--bootstrap-samples", "30", "--out", str(out), "--plot", str(plot),
                                 "--json", "--no-progress"])
    assert result.exit_code == 0, result.output
    summary = strict_loads(result.stdout.strip().splitlines()[-1])
    assert summary["scales"] == [1.0, 2.5, 7.5]
    assert len(summary["r1"]) == len(summary["r2"]) == len(summary["predicted_drift"]) == 3
    assert set(summary["recommended"]) == {"scale", "lower", "upper", "schedule", "bootstrap_support"}
    assert 1.0 <= summary["best_constant_scale"]["scale"] <= 7.5
    # scale 1 is the reference scale: its guided set is the reference set, no selection
    assert summary["r1"][0]["estimate"] < 0.1 and summary["r2"][0]["estimate"] < 0.1
    flat, redifine = summary["schedules"]  # --schedule first, then the config's
    assert redifine["name"] == "redifine" and flat["name"] == "flat"
    assert redifine["parameters"] == {"schedule": "exponential", "scale": 7.5, "alpha": 2.0, "step_origin": 0,
                                      "condition_drop": 0.2}
    assert "condition_drop" in redifine["note"] and "note" not in flat  # no finetuning: the drop is not measured
    # s_t = 7.5 exp(-2 t / 8) over the 8 steps, t = 0..7
    assert redifine["mean_scale"] == pytest.approx(7.5 * np.mean(np.exp(-2.0 * np.arange(8) / 8)), rel=1e-12)
    # same prompts, same per-image seeds: the flat schedule regenerates the scale-7.5 images exactly
    assert flat["r1"] == summary["r1"][2] and flat["r2"] == summary["r2"][2] and flat["mean_scale"] == 7.5
    assert flat["predicted_drift"] == pytest.approx(summary["predicted_drift"][2], abs=1e-12)
    cost = summary["cost"]
    # 8 images at 2.5, 7.5 and under each schedule (two passes at every step) and 8 reference images at
    # scale 1 (one pass), 8 steps
    assert cost["pilot"]["images_generated"] == 32 and cost["pilot"]["schedule_images"] == 16
    assert cost["pilot"]["reference_images"] == 8
    assert cost["pilot"]["unet_passes"] == 8 * 8 * (2 + 2 + 2 + 2 + 1)
    # the chain: 5 conditions (3 scales, 2 schedules) x 2 iterations x 6 images, two passes a step
    assert cost["chain"]["unet_passes"] == 5 * 2 * 6 * 8 * 2 and cost["chain"]["finetunings"] == 10
    assert cost["ratio"]["unet_passes"] == pytest.approx(576 / 960)
    assert cost["sd15"]["ratio_fast"] < 0.01
    ds = xr.open_dataset(out / "pilot.nc", engine="h5netcdf")
    assert ds.hf_power.shape == (3, 8) and np.allclose(ds.hf_power.values[0], ds.hf_power_reference.values)
    assert ds.hf_power_schedule.shape == (2, 8) and list(ds.schedule.values) == ["flat", "redifine"]
    assert np.array_equal(ds.hf_power_schedule.values[0], ds.hf_power.values[2])
    assert np.allclose(ds.schedule_step_scale.values[1], 7.5 * np.exp(-2.0 * np.arange(8) / 8), rtol=1e-12)
    assert json.loads((out / "recommendation.json").read_text())["scales"] == [1.0, 2.5, 7.5]
    assert plot.stat().st_size > 10_000
    # the arithmetic again from the stored phenotypes, without generating: same windows, same pilot cost
    again = runner.invoke(app, ["recommend", str(example_config), "--pilot", str(out / "pilot.nc"),
                                "--bootstrap-samples", "30", "--json"])
    assert again.exit_code == 0, again.output
    again = strict_loads(again.stdout.strip().splitlines()[-1])
    assert again["r1"] == summary["r1"] and again["recommended"] == summary["recommended"]
    assert again["schedules"] == summary["schedules"]
    assert again["cost"]["pilot"]["unet_passes"] == cost["pilot"]["unet_passes"]


def _study(tmp_path: Path) -> Path:
    """A hand-written study: 4 constant CFG conditions and a ReDiFine one, FD per iteration 0..4."""
    fd = np.array([[0, 5, 7, 9, 11],     # cfg1: (11 - 5) / 3 = 2
                   [0, 4, 4.5, 5, 5.5],  # cfg2.5: 0.5
                   [0, 6, 9, 12, 15],    # cfg5: 3
                   [0, 7, 11, 15, 19],   # cfg7.5: 4
                   [0, 1, 1, 1, 1]], float)
    ds = xr.Dataset({"fd_dinov2": (("condition", "iteration"), fd),
                     "cfg_scale": (("condition",), [1.0, 2.5, 5.0, 7.5, 7.5]),
                     "cfg_schedule": (("condition",), ["constant"] * 4 + ["exponential"])},
                    coords={"condition": ["cfg1", "cfg2.5", "cfg5", "cfg7.5", "redifine"], "iteration": range(5)})
    path = tmp_path / "metrics.nc"
    ds.to_netcdf(path, engine="h5netcdf")
    return path


def test_measured_collapse_rates_are_eq3_over_iterations_1_to_k(tmp_path):
    from qtm.commands.recommend import measured_collapse_rates

    assert measured_collapse_rates(_study(tmp_path)) == pytest.approx({1.0: 2.0, 2.5: 0.5, 5.0: 3.0, 7.5: 4.0})


def test_recommend_check_prints_the_comparison(tmp_path):
    rec = {"scales": [1.0, 2.5, 5.0, 7.5], "predicted_drift": [0.02, 0.001, -0.03, -0.05],
           "recommended": {"scale": 2.3, "lower": 1.8, "upper": 3.1}}
    (tmp_path / "rec.json").write_text(json.dumps(rec))
    result = runner.invoke(app, ["recommend-check", str(tmp_path / "rec.json"), str(_study(tmp_path))])
    assert result.exit_code == 0, result.output
    got = strict_loads(result.stdout)
    assert got["spearman"] == pytest.approx(1.0) and got["recommended_among_best_two"] is True
    assert got["best_two_measured"] == [2.5, 1.0]
    result = runner.invoke(app, ["recommend-check", str(tmp_path / "rec.json"), str(_study(tmp_path)),
                                 "--metric", "nope"])
    assert result.exit_code == 2 and "no variable 'nope'" in result.output


@pytest.mark.slow
def test_tiny_example_after_one_finetuning(example_config):
    result = runner.invoke(app, ["recommend", str(example_config), "--scales", "1,2.5,7.5", "--images", "8",
                                 "--after-iterations", "1", "--config-schedules", "--bootstrap-samples", "20",
                                 "--json", "--no-progress"])
    assert result.exit_code == 0, result.output
    summary = strict_loads(result.stdout.strip().splitlines()[-1])
    assert summary["heritability"]["source"] == "measured" and summary["heritability_sensitivity"] == []
    assert "measured" in summary["heritability"] and len(summary["response"]) == 3
    # the ReDiFine condition is finetuned once too (with its condition drop): its own response
    (redifine,) = summary["schedules"]
    assert redifine["response"]["estimate"] is not None and "note" not in redifine
    cost = summary["cost"]["pilot"]
    assert cost["finetunings"] == 4 and cost["finetune_seconds"] > 0
    # one finetuning of 8 images: tiny_cpu.toml trains 2 epochs at batch 3 -> 3 steps an epoch
    assert cost["finetune_samples"] == 4 * 2 * 3 * 3
    # 8 images at 2.5, 7.5 and under the schedule, both passes; one pass for 8 reference images of M_0, the
    # scale-1 images regenerated to finetune on, and the reference sets of the 4 finetuned models; 8 steps
    assert cost["unet_passes"] == 8 * 8 * (2 * 3 + 1 * 6)
    # the finetuning rate is measured, so the chain's time is estimated
    assert summary["cost"]["chain"]["estimated_seconds"] > 0 and summary["cost"]["ratio"]["seconds"] > 0
