"""`qtm chain export`: a tiny run's M_1 exported, its images regenerated bit-exactly by diffusers'
StableDiffusionPipeline loaded from the export (8-bit PNGs of the run, and the float images of the chain's
own sampler), the kohya file read back by diffusers' kohya loader equal to the chain's LoRA, and bad input
refused with one `error:` line, leaving nothing half-written."""

import hashlib
import importlib.util
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tests.chain.fixtures import make_captioned_folder, tiny_config
from tests.qtmio.test_strict_json import strict_loads

CONDITION = "lin"
# linear guidance 3 -> 0.5 over 4 steps: the last step guides below 1, where StableDiffusionPipeline would
# drop the unconditional pass (the recipe must keep it)
CONDITIONS = [{"name": CONDITION, "schedule": "linear", "start": 3.0, "end": 0.5}]
NUM_IMAGES = 6


def _make_run(root: Path, latent: bool) -> Path:
    from chain.run import run_chain

    make_captioned_folder(root / "data", num_images=NUM_IMAGES)
    run_chain(tiny_config(root / "data", latent=latent, num_iterations=1, num_steps=4, conditions=CONDITIONS),
              root / "run")
    return root / "run"


def _cli(*args: str):
    from qtm.cli import app

    return CliRunner().invoke(app, ["chain", "export", *map(str, args)])


def _export(run: Path, out: Path) -> Path:
    result = _cli(run, out, "--condition", CONDITION, "--iteration", "1", "--json")
    assert result.exit_code == 0, result.output
    assert strict_loads(result.stdout.strip().splitlines()[-1])["out"] == str(out)  # strict JSON
    strict_loads((out / "qtm_export.json").read_text())
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    run = _make_run(root, latent=True)
    return run, _export(run, root / "out")


def _recipe_module(out: Path):
    """regenerate.py of the export folder, imported from there (what a user runs)."""
    spec = importlib.util.spec_from_file_location(f"regenerate_{abs(hash(str(out)))}", out / "regenerate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _chain_png(run: Path, i: int) -> np.ndarray:
    return np.array(Image.open(run / "images" / CONDITION / "1" / f"{i:05d}.png").convert("RGB"))


def _chain_images(run: Path) -> torch.Tensor:
    """The float images of M_1 as the chain's sampler makes them (chain.sampling.generate, its batches),
    from the run's base model and saved LoRA: the oracle for the bit-level comparison."""
    from chain.config import load_config
    from chain.lora import add_lora, load_lora
    from chain.run import resolve_base_model
    from chain.sampling import generate, image_seed, make_generator

    cfg = load_config(run / "config.toml")
    model = resolve_base_model(cfg, run).copy()
    add_lora(model.unet, model.text_encoder, cfg.finetune, generator=make_generator(0))
    load_lora(run / "lora" / CONDITION / "1", model.unet, model.text_encoder)
    captions = [(p.with_suffix(".txt")).read_text() for p in sorted((run.parent / "data").glob("*.png"))]
    seeds = [image_seed(cfg.run.seed, CONDITION, 1, i) for i in range(NUM_IMAGES)]
    gen = generate(model, captions, seeds, cfg.conditions[0].guidance, num_steps=cfg.sampling.num_steps,
                   resolution=cfg.data.resolution, clip_skip=cfg.finetune.clip_skip, batch_size=cfg.sampling.batch_size)
    return gen.images


def _check_regeneration(run: Path, out: Path) -> None:
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    recipe = _recipe_module(out)
    export = recipe.read_export(out)
    pipe = recipe.load_pipeline(out)
    assert type(pipe) is StableDiffusionPipeline
    assert type(pipe.scheduler) is EulerAncestralDiscreteScheduler
    images = recipe.regenerate(pipe, export, list(range(NUM_IMAGES)))
    got = recipe.to_8bit(images)
    for i in range(NUM_IMAGES):
        assert np.array_equal(got[i], _chain_png(run, i)), f"image {i} differs from the run's PNG"
    assert torch.equal(images, _chain_images(run))
    # one image alone comes from its own chain batch: the same bits
    assert torch.equal(recipe.regenerate(pipe, export, [5])[0], images[5])


def test_export_regenerates_the_chains_images_bit_exactly(exported):
    run, out = exported
    _check_regeneration(run, out)


@pytest.mark.slow
def test_pixel_space_export_regenerates_bit_exactly(tmp_path):
    run = _make_run(tmp_path, latent=False)
    out = _export(run, tmp_path / "out")
    assert not (out / "vae").exists()
    _check_regeneration(run, out)


def test_adapter_and_recipe_matter(exported):
    """Guards: without the LoRA the images differ, and the pipeline's plain guidance (no TwoPassScale) cannot
    run this schedule (it drops the unconditional pass below scale 1)."""
    run, out = exported
    recipe = _recipe_module(out)
    export = recipe.read_export(out)
    pipe = recipe.load_pipeline(out)
    with_lora = recipe.regenerate(pipe, export, [0])
    pipe.unfuse_lora(components=["unet"])
    pipe.unload_lora_weights()
    assert not torch.equal(recipe.regenerate(pipe, export, [0]), with_lora)
    plain = recipe.load_pipeline(out)
    recipe.TwoPassScale = float
    with pytest.raises(RuntimeError):
        recipe.regenerate(plain, export, [0])


def test_pipeline_folder_and_recipe(exported):
    from chain.config import load_config
    from chain.lora import LORA_WEIGHTS_NAME
    from chain.sampling import image_seed

    run, out = exported
    for name in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler", "README.md",
                 "regenerate.py", "qtm_export.json", LORA_WEIGHTS_NAME):
        assert (out / name).exists(), name
    index = json.loads((out / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "EulerAncestralDiscreteScheduler"]
    # the chain's LoRA file, byte for byte
    assert (out / LORA_WEIGHTS_NAME).read_bytes() == (run / "lora" / CONDITION / "1" / LORA_WEIGHTS_NAME).read_bytes()
    cfg = load_config(run / "config.toml")
    export = json.loads((out / "qtm_export.json").read_text())
    assert export["condition"] == CONDITION and export["iteration"] == 1
    assert export["sampling"]["num_steps"] == 4 and export["sampling"]["resolution"] == 32
    assert export["sampling"]["clip_skip"] == cfg.finetune.clip_skip
    assert export["sampling"]["batches"] == [[0, 4], [4, 6]]  # sampling.batch_size 4, 6 images
    np.testing.assert_allclose(export["guidance"]["scales"], [3.0 + (0.5 - 3.0) * t / 3 for t in range(4)],
                               rtol=0, atol=1e-15)
    captions = [p.with_suffix(".txt").read_text() for p in sorted((run.parent / "data").glob("*.png"))]
    assert export["prompts"]["captions"] == captions
    recipe = _recipe_module(out)
    for i in range(NUM_IMAGES):  # the export's seed rule is the chain's
        assert recipe.image_seed(cfg.run.seed, CONDITION, 1, i) == image_seed(cfg.run.seed, CONDITION, 1, i)
    readme = (out / "README.md").read_text()
    assert "regenerate.regenerate(pipe, export, [0, 1, 2])" in readme and "CLIP skip 2" in readme


# ------------------------------------------------------------------------------------------------ kohya


def test_kohya_file_loads_with_diffusers_as_the_chains_lora(exported):
    from diffusers import StableDiffusionPipeline
    from peft import get_peft_model_state_dict
    from safetensors import safe_open

    from chain.config import load_config
    from chain.lora import read_lora

    run, out = exported
    cfg = load_config(run / "config.toml")
    name = json.loads((out / "qtm_export.json").read_text())["lora"]["kohya"]
    assert name == f"run_{CONDITION}_it1.safetensors"
    with safe_open(str(out / name), "pt") as fh:
        keys, meta = set(fh.keys()), fh.metadata()
    # kohya's names (networks/lora.py: prefix + module path, "." -> "_"; CLIP under text_model)
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj.lora_up.weight" in keys
    assert "lora_unet_mid_block_attentions_0_proj_in.alpha" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_1_mlp_fc2.lora_up.weight" in keys
    assert not any("layers_2_" in k for k in keys)  # 3 layers, clip skip 2: the last one has no adapter
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == str(cfg.finetune.rank)
    assert meta["ss_network_alpha"] == str(cfg.finetune.alpha) and meta["ss_clip_skip"] == "2"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    # kohya's hashes, as library/train_util.py computes them: over the file saved with the ss_* metadata only
    from safetensors.torch import load_file, save

    blob = io.BytesIO(save(load_file(str(out / name)), {k: v for k, v in meta.items() if k.startswith("ss_")}))
    n = int.from_bytes(blob.read(8), "little")
    blob.seek(n + 8)
    assert meta["sshs_model_hash"] == hashlib.sha256(blob.read()).hexdigest()
    blob.seek(0x100000)
    assert meta["sshs_legacy_hash"] == hashlib.sha256(blob.read(0x10000)).hexdigest()[:8]

    # diffusers' own kohya loader puts back exactly the chain's adapter, at scale alpha / rank
    unet_lora, te_lora = read_lora(run / "lora" / CONDITION / "1")
    pipe = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(out), weight_name=name, adapter_name="kohya")
    for module, want in ((pipe.unet, unet_lora), (pipe.text_encoder, te_lora)):
        got = get_peft_model_state_dict(module, adapter_name="kohya")
        got = {k.replace("text_model.", "", 1): v for k, v in got.items()}
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)
        scales = {m.scaling["kohya"] for m in module.modules() if isinstance(getattr(m, "scaling", None), dict)}
        assert scales == {cfg.finetune.alpha / cfg.finetune.rank}


def test_kohya_names_of_sd15_modules():
    """The mapping on SD 1.5's module names, against names kohya's SD 1.5 LoRAs carry."""
    from chain.export import kohya_state_dict

    a, b = torch.zeros(4, 8), torch.zeros(8, 4)
    state = kohya_state_dict(
        {"up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0.lora_A.weight": a,
         "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0.lora_B.weight": b},
        {"encoder.layers.10.self_attn.out_proj.lora_A.weight": a,
         "encoder.layers.10.self_attn.out_proj.lora_B.weight": b},
        alpha=8.0,
    )
    assert set(state) == {
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0.lora_down.weight",
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0.lora_up.weight",
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0.alpha",
        "lora_te_text_model_encoder_layers_10_self_attn_out_proj.lora_down.weight",
        "lora_te_text_model_encoder_layers_10_self_attn_out_proj.lora_up.weight",
        "lora_te_text_model_encoder_layers_10_self_attn_out_proj.alpha",
    }
    alpha = state["lora_te_text_model_encoder_layers_10_self_attn_out_proj.alpha"]
    assert alpha.dtype == torch.float32 and alpha.ndim == 0 and float(alpha) == 8.0


# ------------------------------------------------------------------------------------------------ bad input


def _error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_unknown_condition_unfinished_iteration_and_busy_out(exported, tmp_path):
    from qtmio.netcdf import read_netcdf, write_netcdf

    run, _ = exported
    line = _error_line(_cli(run, tmp_path / "a", "--condition", "cfg9", "--iteration", "1"))
    assert "no condition 'cfg9'" in line and CONDITION in line and "--condition" in line
    line = _error_line(_cli(run, tmp_path / "a", "--condition", CONDITION, "--iteration", "2"))
    assert "choose 1..1" in line and "--iteration" in line
    line = _error_line(_cli(run, tmp_path / "a", "--condition", CONDITION, "--iteration", "0"))
    assert "D_0" in line
    # a run whose cell is not finished yet
    copy = tmp_path / "paused"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("images", "base_model"))
    ds = read_netcdf(copy / "metrics.nc")
    ds["completed"].loc[{"condition": CONDITION, "iteration": 1}] = False
    write_netcdf(ds, copy / "metrics.nc")
    line = _error_line(_cli(copy, tmp_path / "a", "--condition", CONDITION, "--iteration", "1"))
    assert "not finished" in line and "qtm chain run" in line
    # OUT not empty, OUT a file, RUN not a run folder
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    line = _error_line(_cli(run, busy, "--condition", CONDITION, "--iteration", "1"))
    assert "not empty" in line and "OUT" in line
    assert (busy / "keep.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    assert "is a file" in _error_line(_cli(run, tmp_path / "file", "--condition", CONDITION, "--iteration", "1"))
    assert "not a run folder" in _error_line(_cli(tmp_path, tmp_path / "b", "--condition", CONDITION,
                                                  "--iteration", "1"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_failed_export_leaves_nothing(exported, tmp_path, monkeypatch):
    import safetensors.torch

    from chain.export import export_model

    run, _ = exported

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as if the export were stopped while writing the kohya file

    monkeypatch.setattr(safetensors.torch, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        export_model(run, CONDITION, 1, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_regenerate_script_writes_the_runs_png_values(exported, tmp_path):
    run, out = exported
    recipe = _recipe_module(out)
    recipe.main([str(out), "4", "1", "--out", str(tmp_path / "again")])
    for i in (4, 1):
        again = np.array(Image.open(tmp_path / "again" / f"{i:05d}.png").convert("RGB"))
        assert np.array_equal(again, _chain_png(run, i))


def test_the_recipe_keeps_the_chains_noise_schedule(exported, tmp_path):
    """A base model whose scheduler has steps_offset 0 ("leading" spacing): StableDiffusionPipeline's loader
    rewrites it to 1; the recipe samples on the chain's timesteps all the same."""
    from chain.sampling import sampling_scheduler

    _, out = exported
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    export = json.loads((copy / "qtm_export.json").read_text())
    config = dict(export["scheduler"]["config"], steps_offset=0, timestep_spacing="leading")
    export["scheduler"]["config"] = config
    (copy / "qtm_export.json").write_text(json.dumps(export))
    saved = json.loads((copy / "scheduler" / "scheduler_config.json").read_text())
    (copy / "scheduler" / "scheduler_config.json").write_text(json.dumps(dict(saved, steps_offset=0)))
    pipe = _recipe_module(copy).load_pipeline(copy)
    pipe.scheduler.set_timesteps(4)
    want = sampling_scheduler(config, 4, "cpu").timesteps
    assert torch.equal(pipe.scheduler.timesteps, want)
    assert not torch.equal(sampling_scheduler(dict(config, steps_offset=1), 4, "cpu").timesteps, want)


def test_sdxl_runs_are_recognised_without_loading_weights(tmp_path):
    """An SDXL run is refused before any model is loaded: by its config's model.kind, or by the tiny
    base_model/ folder's model_index.json when the kind is "auto"; the toy and SD tiny models are not SDXL."""
    import dataclasses

    from chain.config import load_config
    from chain.export import made_from_sdxl
    from chain.models import save_base_model
    from chain.sdxl import make_tiny_sdxl_model

    examples = Path(__file__).resolve().parents[2] / "examples"
    xl = load_config(examples / "tiny_sdxl_cpu.toml")
    assert made_from_sdxl(xl, tmp_path)                                     # model.kind = "sdxl"
    auto = dataclasses.replace(xl, model=dataclasses.replace(xl.model, kind="auto"))
    save_base_model(make_tiny_sdxl_model(xl.model.tiny, resolution=xl.data.resolution), tmp_path / "base_model")
    assert made_from_sdxl(auto, tmp_path)                                   # from base_model/model_index.json
    sd = load_config(examples / "tiny_cpu.toml")
    assert not made_from_sdxl(sd, tmp_path / "elsewhere")                   # no base_model/: the loader says
