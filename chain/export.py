"""Export one finetuned model M_k of a run for other tools (docs/export.md).

`export_model(run_dir, condition, iteration, out)` writes `out` as one folder, atomically (built beside it,
renamed into place: a killed export leaves no partial folder):

- a diffusers pipeline folder (StableDiffusionPipeline.save_pretrained layout): model_index.json, unet/,
  text_encoder/, tokenizer/, scheduler/ and vae/ (absent for a pixel-space model) holding the base model M_0
  the run used, with the scheduler the chain samples with (EulerAncestralDiscreteScheduler on M_0's noise
  schedule);
- pytorch_lora_weights.safetensors: the run's LoRA of (condition, iteration), byte for byte (peft keys in
  diffusers' layout, `pipe.load_lora_weights(out)` applies it at scale alpha / rank);
- <run>_<condition>_it<k>.safetensors: the same LoRA in kohya sd-scripts' format (`kohya_state_dict`), with
  kohya's ss_* and modelspec.* metadata, for kohya, AUTOMATIC1111 and ComfyUI;
- qtm_export.json: the sampling recipe (`sampling_recipe`: prompts, seeds, guidance per step, CLIP skip,
  steps, resolution, batches), README.md, and regenerate.py (chain/export_recipe.py, needing no qtm) that
  regenerates the chain's images bit for bit with StableDiffusionPipeline.

The LoRA is kept separate from the base weights rather than fused into them: the chain samples with the
UNet's adapter merged into float32 weights (chain.sampling.inference_layout) and the text encoder's adapter
unmerged, and the recipe does the same after loading (`pipe.fuse_lora(components=["unet"])`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
from pathlib import Path

from chain.config import ChainConfig, ConditionConfig, config_to_toml, load_config
from chain.errors import ExportError
from qtmio.atomic import atomic_folder
from qtmio.strict_json import dumps_strict

EXPORT_FILE = "qtm_export.json"
RECIPE_FILE = "regenerate.py"
README_FILE = "README.md"
KOHYA_UNET_PREFIX = "lora_unet"
KOHYA_TEXT_ENCODER_PREFIX = "lora_te"
WEIGHT_DTYPES = {"no": "float32", "fp16": "float16", "bf16": "bfloat16"}
"""finetune.mixed_precision -> the dtype of the weights M_k samples with (chain.finetune)."""


# ------------------------------------------------------------------------------------------------ kohya format


def kohya_module_name(prefix: str, module: str) -> str:
    """kohya's name of an adapted module: prefix + "." + module path, every "." turned into "_"
    (networks/lora.py: `lora_name = prefix + "." + name + "." + child_name`). Text-encoder paths are
    counted from CLIPTextModel as kohya loads it, under `text_model.` (transformers >= 5.6 dropped that level
    from the module names; it is put back)."""
    if prefix == KOHYA_TEXT_ENCODER_PREFIX and not module.startswith("text_model."):
        module = "text_model." + module
    return f"{prefix}.{module}".replace(".", "_")


def kohya_state_dict(unet_lora: dict, text_encoder_lora: dict, alpha: float) -> dict:
    """The LoRA in kohya's layout: for every adapted module `<name>.lora_down.weight` (peft's lora_A),
    `<name>.lora_up.weight` (lora_B) and `<name>.alpha` (a float32 scalar; kohya scales by alpha / rank).
    Inputs are peft state dicts without prefix (`<module>.lora_A.weight`, chain.lora.read_lora); tensors
    are shared, not copied."""
    import torch

    out = {}
    for prefix, state in ((KOHYA_UNET_PREFIX, unet_lora), (KOHYA_TEXT_ENCODER_PREFIX, text_encoder_lora or {})):
        for key, tensor in state.items():
            module, sep, part = key.rpartition(".lora_")
            if not sep or part not in ("A.weight", "B.weight"):
                raise ExportError(f"unexpected LoRA key {key!r}: expected <module>.lora_A.weight or .lora_B.weight")
            name = kohya_module_name(prefix, module)
            out[f"{name}.{'lora_down' if part == 'A.weight' else 'lora_up'}.weight"] = tensor.contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def kohya_hashes(state: dict, metadata: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as kohya precomputes them for sd-webui-additional-networks: the
    SHA-256 of the safetensors payload after its header, and the first 8 hex digits of the SHA-256 of 64 KiB
    at offset 1 MiB, of the file serialised with the ss_* metadata only."""
    from safetensors.torch import save

    blob = save(state, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = int.from_bytes(blob[:8], "little")
    model_hash = hashlib.sha256(blob[8 + header:]).hexdigest()
    legacy = hashlib.sha256(io.BytesIO(blob).getbuffer()[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy


def kohya_metadata(config: ChainConfig, condition: ConditionConfig, iteration: int, *, run_name: str,
                   output_name: str, num_train_images: int, cross_attention_dim: int, prediction_type: str,
                   date: str) -> dict[str, str]:
    """kohya's training metadata (the ss_* keys train_network.py writes, values as str()) and the modelspec.*
    keys of its sai_model_spec, for what the chain knows of its finetune."""
    ft = config.finetune
    v2 = cross_attention_dim == 1024  # SD 2.x: OpenCLIP ViT-H text features
    v_param = prediction_type == "v_prediction"
    version = ("sd_v2" if v2 else "sd_v1") + ("_v" if v_param else "")
    arch = ("stable-diffusion-v2-768-v" if v_param else "stable-diffusion-v2-512") if v2 else "stable-diffusion-v1"
    resolution = config.data.resolution
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": ft.rank,
        "ss_network_alpha": ft.alpha,
        "ss_network_dropout": None,
        "ss_base_model_version": version,
        "ss_v2": v2,
        "ss_sd_model_name": Path(config.model.path).name or config.model.path,
        "ss_vae_name": Path(config.model.vae).name if config.model.vae else None,
        "ss_output_name": output_name,
        "ss_training_comment": f"qtm chain run {run_name}: condition {condition.name}, iteration {iteration} "
                               f"(M_{iteration} = Finetune(M_0, D_{iteration - 1}))",
        "ss_clip_skip": ft.clip_skip,
        "ss_resolution": (resolution, resolution),
        "ss_learning_rate": ft.unet_lr,
        "ss_unet_lr": ft.unet_lr,
        "ss_text_encoder_lr": ft.text_encoder_lr if ft.train_text_encoder else 0.0,
        "ss_num_train_images": num_train_images,
        "ss_total_batch_size": ft.batch_size,
        "ss_num_epochs": ft.epochs,
        "ss_max_train_steps": ft.max_train_steps,
        "ss_mixed_precision": ft.mixed_precision,
        "ss_optimizer": f"torch.optim.AdamW(weight_decay={ft.weight_decay},betas=({ft.adam_beta1}, {ft.adam_beta2}),"
                        f"eps={ft.adam_epsilon})",
        "ss_lr_scheduler": "constant",
        "ss_max_grad_norm": ft.max_grad_norm,
        "ss_min_snr_gamma": ft.min_snr_gamma,
        "ss_noise_offset": ft.noise_offset,
        "ss_caption_dropout_rate": condition.condition_drop,
        "ss_flip_aug": ft.flip,
        "ss_cache_latents": ft.cache_latents,
        "ss_seed": config.run.seed,
    }
    meta = {k: str(v) for k, v in meta.items()}
    meta.update({
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{arch}/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": output_name,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": date,
        "modelspec.description": meta["ss_training_comment"],
        "modelspec.prediction_type": "v" if v_param else "epsilon",
    })
    return meta


# ------------------------------------------------------------------------------------------------ the recipe


def chain_batches(num_images: int, batch_size: int) -> list[list[int]]:
    """The [start, stop) image ranges the chain generates together (one process: consecutive batches of
    sampling.batch_size from image 0, chain.sampling.generate)."""
    return [[start, min(start + batch_size, num_images)] for start in range(0, num_images, batch_size)]


def sampling_recipe(config: ChainConfig, condition: ConditionConfig, iteration: int, *, captions: list[str],
                    sigmas: list[float], scheduler_config: dict, pixel_space: bool, max_token_length: int,
                    lora_file: str, kohya_file: str) -> dict:
    """Everything that fixes the images of (condition, iteration) (qtm_export.json, docs/export.md):
    image i has prompt captions[i // images_per_prompt] and the seed of `regenerate.image_seed`; step j of
    the Euler-ancestral loop guides with scale guidance.scales[j] = schedule.scale(j, T, sigma_j)."""
    from chain.guidance import guidance_scales, schedule_to_table

    sampling, ft = config.sampling, config.finetune
    num_steps = sampling.num_steps
    dtype = WEIGHT_DTYPES[ft.mixed_precision]
    num_images = len(captions) * sampling.images_per_prompt
    return {
        "condition": condition.name,
        "iteration": iteration,
        "num_images": num_images,
        "base_model": config.model.path,
        "external_vae": config.model.vae or None,
        "pixel_space": pixel_space,
        "lora": {"diffusers": lora_file, "kohya": kohya_file, "rank": ft.rank, "alpha": ft.alpha,
                 "scale": ft.alpha / ft.rank, "text_encoder": ft.train_text_encoder},
        "scheduler": {"class": "EulerAncestralDiscreteScheduler", "config": scheduler_config},
        "guidance": {
            "schedule": schedule_to_table(condition.guidance),
            "scales": [float(s) for s in guidance_scales(condition.guidance, sigmas[:num_steps])],
            "unconditional_prompt": "",
            "formula": "e = e_u + scale * (e_c - e_u); both passes at every step, whatever the scale",
        },
        "sampling": {
            "num_steps": num_steps,
            "resolution": config.data.resolution,
            "clip_skip": ft.clip_skip,
            "max_token_length": max_token_length,
            "batch_size": sampling.batch_size,
            "batches": chain_batches(num_images, sampling.batch_size),
            "dtype": dtype,
            "fuse_unet_lora": dtype == "float32",
            "unet_memory_format": "channels_last",
        },
        "seeds": {
            "run_seed": config.run.seed,
            "rule": "seed = int.from_bytes(sha256(f'{run_seed}/{condition}/{iteration}/{image}/sample')"
                    ".digest()[:8], 'little') & (2**63 - 1); generator = torch.Generator('cpu').manual_seed(seed), "
                    "one per image",
        },
        "prompts": {"images_per_prompt": sampling.images_per_prompt, "captions": list(captions),
                    "rule": "image i has prompt captions[i // images_per_prompt]"},
        "chain_images": f"images/{condition.name}/{iteration}/<i:05d>.png in the run folder",
        "config": config_to_toml(config),
    }


# ------------------------------------------------------------------------------------------------ checks


@dataclasses.dataclass(frozen=True)
class ExportSource:
    """A finished (condition, iteration) of a run folder, checked (`find_cell`)."""

    run_dir: Path
    config: ChainConfig
    condition: ConditionConfig
    iteration: int
    lora_dir: Path


def find_cell(run_dir: str | os.PathLike, condition: str, iteration: int) -> ExportSource:
    """Check that `run_dir` is a run folder whose (condition, iteration >= 1) is finished and has its LoRA;
    raises ExportError naming the fix."""
    from chain.lora import LORA_WEIGHTS_NAME
    from chain.store import completed_cells
    from qtmio.contract import METRICS_FILE
    from qtmio.netcdf import read_netcdf

    run_dir = Path(run_dir)
    config_file, metrics_file = run_dir / "config.toml", run_dir / METRICS_FILE
    if not config_file.is_file() or not metrics_file.is_file():
        raise ExportError(f"{run_dir} is not a run folder (it needs config.toml and {METRICS_FILE}); give the "
                          "folder `qtm chain run --out` wrote", parameters=("run_dir",))
    config = load_config(config_file)
    names = [c.name for c in config.conditions]
    if condition not in names:
        raise ExportError(f"{run_dir} has no condition {condition!r}; its conditions are {', '.join(names)} "
                          "({condition})", parameters=("condition",))
    chosen = config.conditions[names.index(condition)]
    last = config.run.num_iterations
    if not 1 <= iteration <= last:
        raise ExportError(f"iteration {iteration} is not a finetuned model of {run_dir}: choose 1..{last} "
                          "({iteration}; 0 is D_0, the original images)", parameters=("iteration",))
    done = sorted(k for c, k in completed_cells(read_netcdf(metrics_file)) if c == condition and k >= 1)
    lora_dir = run_dir / "lora" / condition / str(iteration)
    if iteration not in done:
        have = f"finished: {', '.join(map(str, done))}" if done else "none finished yet"
        raise ExportError(f"iteration {iteration} of condition {condition} in {run_dir} is not finished ({have}); "
                          f"continue the run with `qtm chain run {config_file} --out {run_dir}` or choose a "
                          "finished {iteration}", parameters=("iteration",))
    if not (lora_dir / LORA_WEIGHTS_NAME).is_file():
        raise ExportError(f"{lora_dir / LORA_WEIGHTS_NAME} is missing although the cell is finished: the run "
                          "folder is damaged; rerun the cell (see docs/results-contract.md)")
    if made_from_sdxl(config, run_dir):
        raise ExportError(f"{run_dir} was made from an SDXL base model; `qtm chain export` writes Stable "
                          "Diffusion 1.x pipelines only (docs/export.md): load its LoRA files "
                          f"({lora_dir}) into StableDiffusionXLPipeline instead")
    return ExportSource(run_dir, config, chosen, iteration, lora_dir)


def made_from_sdxl(config: ChainConfig, run_dir: Path) -> bool:
    """Whether the run's base model is SDXL, from the config and the model's model_index.json (no weights
    are loaded; a model that cannot be found is left to the loader to report)."""
    from chain.errors import ModelLoadError
    from chain.models import _model_index, is_sdxl_source
    from chain.run import tiny_base_model_folder

    if config.model.kind == "sdxl":
        return True
    if config.model.path == "toy":
        return False
    source = str(tiny_base_model_folder(run_dir)) if config.model.path == "tiny" else config.model.path
    try:
        return is_sdxl_source(source, _model_index(source))
    except ModelLoadError:
        return False


def check_out(out: str | os.PathLike) -> Path:
    """`out` must be new or an empty folder (an export never overwrites anything)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is a file; name a new folder for {{out}}", parameters=("out",))
    if out.is_dir() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty; name a new folder for {{out}} or remove this one",
                          parameters=("out",))
    return out


def num_training_images(config: ChainConfig, num_originals: int, iteration: int) -> int:
    """How many images M_k was finetuned on: D_{k-1}, or with run.accumulate_iterations the window of
    iterations before k (D_0 has num_originals images, a generated iteration images_per_prompt times as many;
    chain.run.training_set)."""
    window = config.run.accumulate_iterations
    first = 0 if window == 0 else max(0, iteration - window)
    per_prompt = config.sampling.images_per_prompt
    return sum(num_originals if j == 0 else num_originals * per_prompt for j in range(first, iteration))


def kohya_file_name(run_dir: Path, condition: str, iteration: int) -> str:
    """<run folder name>_<condition>_it<k>.safetensors, with characters other than letters, digits, '.',
    '-', '_' and '+' replaced by '_' (a LoRA's file name is its name in AUTOMATIC1111's prompt syntax)."""
    stem = re.sub(r"[^A-Za-z0-9._+-]", "_", f"{run_dir.resolve().name}_{condition}_it{iteration}")
    return stem + ".safetensors"


# ------------------------------------------------------------------------------------------------ the export


def export_model(run_dir: str | os.PathLike, condition: str, iteration: int, out: str | os.PathLike, *,
                 notify=None) -> Path:
    """Write the export of (condition, iteration) of the run in `run_dir` to the new folder `out` (see the
    module docstring; docs/export.md). Raises ExportError (unknown condition, unfinished iteration, `out`
    not empty), ConfigError or ModelLoadError before anything is written."""
    import datetime

    from safetensors.torch import save_file

    from chain.data import load_captioned_folder
    from chain.inputs import data_folder
    from chain.lora import LORA_WEIGHTS_NAME, read_lora
    from chain.models import write_model_folder
    from chain.run import resolve_base_model
    from chain.sampling import sampling_scheduler

    source = find_cell(run_dir, condition, iteration)
    out = check_out(out)
    config = source.config
    data = config.data
    originals = load_captioned_folder(
        data_folder(config, source.run_dir), resolution=data.resolution, caption_extension=data.caption_extension,
        format=data.format, center_crop=data.center_crop, max_images=data.max_images,
    )
    base = resolve_base_model(config, source.run_dir)
    sigmas = sampling_scheduler(base.scheduler_config, config.sampling.num_steps, "cpu").sigmas.tolist()
    unet_lora, te_lora = read_lora(source.lora_dir)
    kohya_name = kohya_file_name(source.run_dir, condition, iteration)
    recipe = sampling_recipe(
        config, source.condition, iteration, captions=list(originals.captions), sigmas=sigmas,
        scheduler_config=dict(base.scheduler_config), pixel_space=base.is_pixel_space,
        max_token_length=base.max_token_length, lora_file=LORA_WEIGHTS_NAME, kohya_file=kohya_name,
    )
    recipe["run"] = str(source.run_dir.resolve())
    kohya = kohya_state_dict(unet_lora, te_lora, config.finetune.alpha)
    metadata = kohya_metadata(
        config, source.condition, iteration, run_name=source.run_dir.resolve().name,
        output_name=kohya_name.removesuffix(".safetensors"),
        num_train_images=num_training_images(config, len(originals), iteration),
        cross_attention_dim=int(base.unet.config.cross_attention_dim),
        prediction_type=str(base.scheduler_config.get("prediction_type", "epsilon")),
        date=datetime.date.today().isoformat(),
    )
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = kohya_hashes(kohya, metadata)
    with atomic_folder(out) as tmp:
        write_model_folder(base, tmp, scheduler_class="EulerAncestralDiscreteScheduler")
        shutil.copyfile(source.lora_dir / LORA_WEIGHTS_NAME, tmp / LORA_WEIGHTS_NAME)
        save_file(kohya, str(tmp / kohya_name), metadata=metadata)
        (tmp / EXPORT_FILE).write_text(dumps_strict(recipe, indent=1) + "\n")
        shutil.copyfile(Path(__file__).with_name("export_recipe.py"), tmp / RECIPE_FILE)
        (tmp / README_FILE).write_text(export_readme(recipe, out))
    if notify is not None and recipe["sampling"]["dtype"] != "float32":
        notify(f"finetune.mixed_precision = {config.finetune.mixed_precision!r}: the recipe samples in "
               f"{recipe['sampling']['dtype']} as the chain did; bit-exact regeneration is verified for float32 only")
    return out


def export_readme(recipe: dict, folder: Path) -> str:
    """README.md of an export folder: what it holds and how to use it."""
    c, k = recipe["condition"], recipe["iteration"]
    s, g = recipe["sampling"], recipe["guidance"]
    lora = recipe["lora"]
    schedule = g["schedule"]["schedule"] + " (" + ", ".join(
        f"{key} = {value}" for key, value in g["schedule"].items() if key != "schedule") + ")"
    model_files = "model_index.json, unet/, text_encoder/, tokenizer/, scheduler/" + (
        "" if recipe["pixel_space"] else ", vae/")
    rows = [
        ("file", "what"), ("---", "---"),
        (model_files, "the base model as a StableDiffusionPipeline folder; scheduler: EulerAncestralDiscreteScheduler"),
        (lora["diffusers"], f"the LoRA (diffusers/peft keys): `pipe.load_lora_weights(folder)`, scale alpha / rank = "
                            f"{lora['scale']:g}"),
        (lora["kohya"], "the same LoRA in kohya format (lora_unet_* / lora_te_*, ss_* metadata) for kohya, "
                        "AUTOMATIC1111, ComfyUI"),
        ("qtm_export.json", "the sampling recipe: prompts, seeds, guidance per step, CLIP skip, steps, resolution, "
                            "batches"),
        ("regenerate.py", "regenerates the chain's images with StableDiffusionPipeline (needs torch, diffusers, "
                          "transformers, peft)"),
    ]
    table = "\n".join(f"| {a} | {b} |" for a, b in rows)
    return f"""# M_{k} of condition {c}

Exported by `qtm chain export` from the run {recipe['run']}: the base model {recipe['base_model']} with the
LoRA the chain finetuned for condition {c}, iteration {k}, and what it takes to regenerate that iteration's
{recipe['num_images']} images exactly.

{table}

Sampling as the chain did it: {s['num_steps']} Euler-ancestral steps at {s['resolution']} x {s['resolution']} px,
guidance schedule {schedule} (per-step scales in qtm_export.json), CLIP skip {s['clip_skip']} (prompt
embeddings computed by hand: the pipeline's own `clip_skip` fails on this text encoder), unconditional prompt
"", {s['dtype']} weights{', UNet LoRA fused and UNet in channels_last' if s['fuse_unet_lora'] else ''}.
Image i has prompt `captions[i // {recipe['prompts']['images_per_prompt']}]` and a seed derived from
(run seed {recipe['seeds']['run_seed']}, condition, iteration, i): {recipe['seeds']['rule']}.

Regenerate images 0, 1 and 2 (identical bits to the run's images/{c}/{k}/00000.png ... when run on the same
kind of device as the chain; images are made in the chain's batches of {s['batch_size']}):

```python
import sys
folder = {str(Path(folder).resolve())!r}   # this folder
sys.path.insert(0, folder)
import regenerate

export = regenerate.read_export(folder)
pipe = regenerate.load_pipeline(folder)                    # device="cuda" on a GPU
images = regenerate.regenerate(pipe, export, [0, 1, 2])    # (3, 3, H, W) float32 in [0, 1]
```

or `python regenerate.py {str(Path(folder).resolve())} 0 1 2 --out regenerated/`. See the project's docs/export.md.
"""
