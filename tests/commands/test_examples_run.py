"""The shipped examples run as shipped: examples/tiny_cpu.toml needs no data folder of its own (its D_0 is
the embedded toy world, written into the run folder)."""

import tomllib
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from chain.images import load_image
from qtmio.images import list_images
from qtmio.netcdf import read_netcdf

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "tiny_cpu.toml"


@pytest.mark.slow  # ~20 s; the default suite runs the same file's contents in tests/chain/test_run.py
def test_tiny_example_runs_from_its_shipped_location(tmp_path):
    from qtm.cli import app

    out = tmp_path / "tiny"
    shrink = ["--set", "run.num_iterations=1", "--set", "sampling.num_steps=2", "--set", "finetune.epochs=1",
              "--set", "conditions[1].alpha=3.0"]
    r = CliRunner().invoke(app, ["chain", "run", str(EXAMPLE), "--out", str(out), "--json", *shrink])
    assert r.exit_code == 0, r.output
    shipped = tomllib.loads(EXAMPLE.read_text())
    n = shipped["data"]["toy_images"]
    pngs = list_images(out / "data")
    assert len(pngs) == n and all(p.with_suffix(".txt").read_text().strip() for p in pngs)
    # D_0 is the toy world's d0 distribution drawn from toy_seed (an independent rendering of the same scenes)
    from chain.toy.dataset import caption_for, render_scene, sample_scene

    rng = np.random.default_rng(shipped["data"]["toy_seed"])
    for p in pngs:
        scene = sample_scene(rng, "d0")
        assert p.with_suffix(".txt").read_text().strip() == caption_for(scene)
        expected = np.round(render_scene(scene, shipped["data"]["resolution"]) * 255) / 255
        assert np.abs(load_image(p).numpy().transpose(1, 2, 0) - expected).max() < 1e-6
    ds = read_netcdf(out / "metrics.nc")
    assert ds.sizes["iteration"] == 2 and ds.sizes["image"] == n and ds.attrs["dataset"] == "toy-d0-seed0"
    assert np.isfinite(ds.hf_power.values).all()
    resolved = tomllib.loads((out / "config.toml").read_text())
    assert resolved["run"]["num_iterations"] == 1 and resolved["sampling"]["num_steps"] == 2
    assert resolved["conditions"][1]["alpha"] == 3.0 and resolved["data"]["source"] == "toy"


@pytest.mark.slow  # ~45 s on 2 busy cores
def test_tiny_sdxl_example_runs_as_shipped(tmp_path):
    """examples/tiny_sdxl_cpu.toml exactly as shipped (no overrides): a tiny SDXL M_0 built into the run
    folder, every cell finished, each adapter on the UNet and both text encoders."""
    import json

    from chain.lora import read_lora_parts
    from qtm.cli import app

    example = ROOT / "examples" / "tiny_sdxl_cpu.toml"
    out = tmp_path / "tiny_sdxl"
    r = CliRunner().invoke(app, ["chain", "run", str(example), "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    shipped = tomllib.loads(example.read_text())
    index = json.loads((out / "base_model" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and (out / "base_model" / "text_encoder_2").is_dir()
    ds = read_netcdf(out / "metrics.nc")
    k = shipped["run"]["num_iterations"]
    assert ds.sizes["iteration"] == k + 1 and (ds.completed.values == 1).all()
    assert np.isfinite(ds.hf_power.values).all()
    for c in shipped["conditions"]:
        for i in range(1, k + 1):
            assert len(list_images(out / "images" / c["name"] / str(i))) == shipped["data"]["toy_images"]
            assert set(read_lora_parts(out / "lora" / c["name"] / str(i))) == {"unet", "text_encoder", "text_encoder_2"}
