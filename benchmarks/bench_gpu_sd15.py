"""GPU throughput at the paper's settings: our finetuning and sampling path against the diffusers recipe.

A Stable-Diffusion-1.5-architecture model (UNet2DConditionModel, AutoencoderKL, CLIPTextModel from the
published configs written out below, random weights, nothing downloaded; the offline byte-level CLIP
tokenizer of chain.models) is measured with the paper's settings (Appendix A, Table 1): 512 x 512
images (64 x 64 latents), batch 6, LoRA rank 32 / alpha 8 on UNet and text encoder, bf16 (or fp16) weights
with float32 LoRA weights, min-SNR gamma 5, clip skip 2.

Training (samples/s, peak GPU memory over the timed steps):
- ours: chain.finetune.finetune (the function the chain calls), max_train_steps = warm-up + timed steps, the
  steps timed through its on_step callback (which runs after the loss is read back, i.e. after a device
  sync). Latents are cached once (its own behaviour), the base weights are cast to the training precision.
  Measured as the chain runs it, and again with the UNet in channels_last memory format.
- reference: the train_text_to_image_lora.py recipe written out below: peft LoraConfig + unet.add_adapter
  (text encoder: peft.inject_adapter_in_model, as add_adapter needs peft >= 0.22 on transformers >= 5.24),
  cast_training_params, VAE encode in float32 at every step (no cached latents), torch.autocast, default
  attention processor, plain torch AdamW (no fused kernel), gradient clipping, compute_snr min-SNR weights,
  no compile. It adapts the same modules as ours (so the same number of LoRA parameters is trained) and gets
  its pixels and token ids pre-made on the device (no data-loading cost is charged to it).

Generation (images/s, peak GPU memory over the timed batches), 30 Euler-ancestral steps, CFG 7.5, batch 16,
both on the same modules: the finetuned model exactly as chain.finetune returns it and the chain generates
with it (LoRA attached in float32, accelerate's mixed-precision forward wrapper kept, VAE in float32):
- reference: StableDiffusionPipeline with the same modules and scheduler, given prompt embeddings computed
  here with clip skip 2 (the pipeline's own clip_skip crashes on transformers 5);
- ours: chain.sampling.generate, as the chain runs it, then cumulatively with the UNet in channels_last,
  with the LoRA merged into the weights (what generation would gain from merging; chain.run does not merge
  today), and, with --compile, torch.compile on top.
Both sides draw from the same per-image seeds, so their first batches are compared image by image.

Ratios are measured in the same run: train_speedup_<variant>, generate_speedup_<variant>; train_speedup and
generate_speedup are those of our fastest variant (named in *_best_variant), generate_speedup_as_in_chain
that of the plain one. Targets (reported, not asserted): training >= 1.5x the reference, generation >= 1.3x. `--tiny` swaps in tiny configs of the same architecture families (CPU smoke test, writes
results/gpu_sd15_tiny.json). Without CUDA and without --tiny, main() prints one line and returns.

    python -m benchmarks.bench_gpu_sd15            # on a CUDA machine (sized for well under 8 min on an H100)
    python -m benchmarks.bench_gpu_sd15 --compile  # adds the torch.compile generation variant
    python -m benchmarks.bench_gpu_sd15 --tiny     # tiny models, CPU
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import math
import sys
import time
from pathlib import Path
from typing import Any

NAME = "gpu_sd15"
TARGETS = {"train_speedup": 1.5, "generate_speedup": 1.3}

# ------------------------------------------------------------------------------------- published configs

SD15_UNET_CONFIG: dict[str, Any] = {  # runwayml/stable-diffusion-v1-5 unet/config.json (859.5 M parameters)
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}

SD15_VAE_CONFIG: dict[str, Any] = {  # vae/config.json (83.7 M parameters)
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

SD15_TEXT_CONFIG: dict[str, Any] = {  # text_encoder/config.json, CLIP ViT-L/14 text tower (123.1 M parameters)
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

# Tiny members of the same families: same block types and depth (so a 64 px image gives 8 x 8 latents and
# cross-attention at every level, as in SD1.5), narrow channels, one attention head.
TINY_UNET_CONFIG: dict[str, Any] = {
    **SD15_UNET_CONFIG,
    "sample_size": 8,
    "block_out_channels": (16, 32, 32, 32),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "cross_attention_dim": 32,
    "attention_head_dim": 1,
}
TINY_VAE_CONFIG: dict[str, Any] = {
    **SD15_VAE_CONFIG,
    "block_out_channels": (8, 16, 16, 16),
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "sample_size": 64,
}
TINY_TEXT_CONFIG: dict[str, Any] = {
    **SD15_TEXT_CONFIG,
    "vocab_size": 1000,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "projection_dim": 32,
}

CONFIGS = {
    "sd15": (SD15_UNET_CONFIG, SD15_VAE_CONFIG, SD15_TEXT_CONFIG),
    "tiny": (TINY_UNET_CONFIG, TINY_VAE_CONFIG, TINY_TEXT_CONFIG),
}

# The paper's LoRA targets (Table 1), written out here rather than imported, so that the reference
# adapts its modules independently of chain.lora.
REFERENCE_UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
REFERENCE_TEXT_TARGETS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                          "mlp.fc1", "mlp.fc2"]


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """What is measured and how often. Defaults are the paper's settings on an SD1.5-size model."""

    size: str = "sd15"  # "sd15" | "tiny"
    device: str = "cuda"
    precision: str = "bf16"  # "bf16" | "fp16" | "no" (float32)
    resolution: int = 512
    train_batch: int = 6
    warmup_steps: int = 3
    timed_steps: int = 10
    gen_batch: int = 16
    gen_warmup_batches: int = 1
    gen_timed_batches: int = 2
    num_inference_steps: int = 30
    cfg_scale: float = 7.5
    rank: int = 32
    alpha: float = 8.0
    min_snr_gamma: float = 5.0
    clip_skip: int = 2
    channels_last: bool = True
    compile: bool = False
    compile_mode: str = "default"  # torch.compile mode: "default" | "reduce-overhead" (CUDA graphs) | "max-autotune"
    seed: int = 0

    def validate(self) -> None:
        if self.size not in CONFIGS:
            raise ValueError(f"BenchSettings.size must be one of {sorted(CONFIGS)}, got {self.size!r}")
        if self.precision not in ("bf16", "fp16", "no"):
            raise ValueError(f"BenchSettings.precision must be 'bf16', 'fp16' or 'no', got {self.precision!r}")
        if self.precision == "fp16" and self.device.startswith("cpu"):
            raise ValueError("BenchSettings.precision 'fp16' needs a CUDA device (accelerate has no fp16 autocast "
                             "on the CPU); use 'bf16' or 'no' (--precision)")
        if self.warmup_steps < 1 or self.timed_steps < 1:
            raise ValueError("BenchSettings.warmup_steps and timed_steps must be >= 1 (the timed window starts "
                             "after a warm-up step)")
        if self.gen_timed_batches < 1 or self.gen_batch < 1:
            raise ValueError("BenchSettings.gen_batch and gen_timed_batches must be >= 1")


def tiny_settings(device: str = "cpu") -> BenchSettings:
    """Tiny models and few steps: the whole benchmark in seconds on one CPU thread."""
    return BenchSettings(
        size="tiny", device=device, precision="no" if device == "cpu" else "bf16", resolution=64, train_batch=2,
        warmup_steps=1, timed_steps=2, gen_batch=2, gen_warmup_batches=1, gen_timed_batches=1,
        num_inference_steps=3, rank=8, alpha=2.0,
    )


# ------------------------------------------------------------------------------------------------ helpers


def _log(message: str, start: float) -> None:
    print(f"[{NAME}] {time.perf_counter() - start:7.1f}s  {message}", flush=True)


def _weight_dtype(precision: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def _precision_label(precision: str) -> str:
    return {"bf16": "bfloat16", "fp16": "float16"}.get(precision, "float32")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device) -> float | None:
    """torch.cuda.max_memory_allocated since the last reset, GiB; None off CUDA."""
    import torch

    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def _free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


def lora_summary(module) -> tuple[int, list[str]]:
    """(number of trainable LoRA parameters, sorted names of the adapted modules)."""
    count = sum(p.numel() for n, p in module.named_parameters() if "lora_" in n and p.requires_grad)
    names = sorted(n for n, m in module.named_modules() if hasattr(m, "lora_A") and len(getattr(m, "lora_A")))
    return count, names


def build_base_model(size: str, *, seed: int):
    """An SD-architecture BaseModel (UNet, VAE, text encoder, offline tokenizer) with random weights on the
    CPU in float32, as chain.models.load_base_model returns one. The weights come from torch's generator
    seeded with `seed` inside a forked RNG state (the caller's RNG is untouched)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from chain.models import SD_SCHEDULER_CONFIG, BaseModel, make_tiny_tokenizer

    unet_config, vae_config, text_config = CONFIGS[size]
    tokenizer = make_tiny_tokenizer(max_length=text_config["max_position_embeddings"])
    if len(tokenizer) > text_config["vocab_size"]:
        raise ValueError(f"{size} text config: vocab_size {text_config['vocab_size']} is smaller than the "
                         f"tokenizer ({len(tokenizer)} tokens)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    for module in (unet, vae, text_encoder):
        module.eval()
        module.requires_grad_(False)
    return BaseModel(unet, text_encoder, tokenizer, dict(SD_SCHEDULER_CONFIG), vae, source=f"random {size}")


# ------------------------------------------------------------------------------------------- training


def reference_prompt_embeddings(text_encoder, input_ids, clip_skip: int):
    """Clip-skip embeddings as kohya computes them: final_layer_norm(hidden_states[-clip_skip]) (clip skip 1:
    last_hidden_state). Written here, independent of chain.text."""
    if clip_skip == 1:
        return text_encoder(input_ids).last_hidden_state
    hidden = text_encoder(input_ids, output_hidden_states=True).hidden_states[-clip_skip]
    norm = text_encoder.final_layer_norm
    # outside autocast, float32 LoRA layers can leave the hidden state in float32 while the norm is bf16
    return norm(hidden.to(norm.weight.dtype))


def time_reference_training(base, settings: BenchSettings, device, start: float) -> dict[str, Any]:
    """The diffusers train_text_to_image_lora.py step (module docstring), timed over settings.timed_steps
    steps after settings.warmup_steps warm-up steps."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from diffusers.training_utils import cast_training_params, compute_snr
    from peft import LoraConfig, inject_adapter_in_model

    s = settings
    weight_dtype = _weight_dtype(s.precision)
    unet = copy.deepcopy(base.unet).to(device, dtype=weight_dtype)
    text_encoder = copy.deepcopy(base.text_encoder).to(device, dtype=weight_dtype)
    vae = copy.deepcopy(base.vae).to(device, dtype=torch.float32)
    for module in (unet, text_encoder, vae):
        module.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=s.rank, lora_alpha=s.alpha, init_lora_weights="gaussian",
                                target_modules=REFERENCE_UNET_TARGETS))
    # with clip skip c the last c - 1 layers never reach the embedding: no adapter there (as ours)
    num_layers = text_encoder.config.num_hidden_layers
    text_targets = [f"encoder.layers.{i}.{t}" for i in range(num_layers - (s.clip_skip - 1))
                    for t in REFERENCE_TEXT_TARGETS]
    inject_adapter_in_model(LoraConfig(r=s.rank, lora_alpha=s.alpha, init_lora_weights="gaussian",
                                       target_modules=text_targets), text_encoder)
    for module in (unet, text_encoder):
        for name, p in module.named_parameters():
            p.requires_grad_("lora_" in name)
    cast_training_params([unet, text_encoder], dtype=torch.float32)
    unet_params = [p for p in unet.parameters() if p.requires_grad]
    text_params = [p for p in text_encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": unet_params, "lr": 1e-4}, {"params": text_params, "lr": 5e-5}],
                                  weight_decay=1e-2)
    scaler = torch.amp.GradScaler(device.type) if s.precision == "fp16" else None
    noise_scheduler = DDPMScheduler.from_config(base.scheduler_config)
    unet.train()
    text_encoder.train()

    g = torch.Generator("cpu").manual_seed(s.seed + 1)
    pixels = (torch.rand(s.train_batch, 3, s.resolution, s.resolution, generator=g) * 2 - 1).to(device)
    captions = [f"a photo of training image {i}" for i in range(s.train_batch)]
    input_ids = base.tokenizer(captions, padding="max_length", max_length=base.max_token_length, truncation=True,
                               return_tensors="pt").input_ids.to(device)
    losses: list[float] = []

    def step() -> None:
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  device=device).long()
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        with torch.autocast(device.type, dtype=weight_dtype, enabled=s.precision != "no"):
            embeddings = reference_prompt_embeddings(text_encoder, input_ids, s.clip_skip)
            pred = unet(noisy, timesteps, embeddings, return_dict=False)[0]
        snr = compute_snr(noise_scheduler, timesteps)
        weights = torch.stack([snr, s.min_snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0] / snr
        loss = F.mse_loss(pred.float(), noise.float(), reduction="none")
        loss = (loss.mean(dim=list(range(1, loss.ndim))) * weights).mean()
        params = unet_params + text_params
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # the recipe logs loss.item() every step (a device sync, as ours)

    for _ in range(s.warmup_steps):
        step()
    _reset_peak(device)
    t0 = time.perf_counter()
    for i in range(s.timed_steps):
        step()
        if (i + 1) % 5 == 0 or i + 1 == s.timed_steps:
            _log(f"reference training step {i + 1}/{s.timed_steps}", start)
    _sync(device)
    seconds = time.perf_counter() - t0
    unet_lora, unet_names = lora_summary(unet)
    text_lora, text_names = lora_summary(text_encoder)
    out = {
        "samples_per_s": s.timed_steps * s.train_batch / seconds,
        "peak_mem_gib": _peak_gib(device),
        "lora_params_unet": unet_lora,
        "lora_params_text_encoder": text_lora,
        "lora_modules_unet": unet_names,
        "lora_modules_text_encoder": text_names,
        "losses_finite": all(math.isfinite(v) for v in losses),
    }
    del unet, text_encoder, vae, optimizer, pixels
    _free(device)
    return out


def time_our_training(base, settings: BenchSettings, device, accelerator, start: float, label: str):
    """chain.finetune.finetune for warmup + timed steps; the timed window is measured between the on_step
    calls after step `warmup_steps` and after the last step. Returns (figures, FinetuneResult)."""
    import torch

    from chain.config import FinetuneConfig
    from chain.finetune import finetune
    from chain.sampling import make_generator

    s = settings
    cfg = FinetuneConfig(
        rank=s.rank, alpha=s.alpha, batch_size=s.train_batch, max_train_steps=s.warmup_steps + s.timed_steps,
        mixed_precision=s.precision, min_snr_gamma=s.min_snr_gamma, clip_skip=s.clip_skip, flip=True,
        cache_latents=True,
    )
    g = make_generator(s.seed + 2)
    images = torch.rand(s.train_batch, 3, s.resolution, s.resolution, generator=g)
    captions = [f"a photo of training image {i}" for i in range(s.train_batch)]
    stamps: dict[int, float] = {}

    def on_step(step: int, total: int, loss: float) -> None:
        stamps[step] = time.perf_counter()
        if step == s.warmup_steps:
            _reset_peak(device)
        if step > s.warmup_steps and ((step - s.warmup_steps) % 5 == 0 or step == total):
            _log(f"ours ({label}) training step {step - s.warmup_steps}/{s.timed_steps} (loss {loss:.4f})", start)

    _reset_peak(device)
    t0 = time.perf_counter()
    result = finetune(base, images, captions, cfg, condition_drop=0.0, generator=make_generator(s.seed + 3),
                      accelerator=accelerator, on_step=on_step)
    total = time.perf_counter() - t0
    last = s.warmup_steps + s.timed_steps
    if last not in stamps or s.warmup_steps not in stamps:
        raise RuntimeError(f"finetune made {len(stamps)} steps, expected {last}")
    seconds = stamps[last] - stamps[s.warmup_steps]
    unet_lora, unet_names = lora_summary(result.model.unet)
    text_lora, text_names = lora_summary(result.model.text_encoder)
    conv = result.model.unet.conv_in.weight
    figures = {
        "samples_per_s": s.timed_steps * s.train_batch / seconds,
        "peak_mem_gib": _peak_gib(device),
        "setup_s": stamps[1] - t0,  # copy, cast, adapters, latent caching, optimizer, first step
        "total_s": total,
        "lora_params_unet": unet_lora,
        "lora_params_text_encoder": text_lora,
        "lora_modules_unet": unet_names,
        "lora_modules_text_encoder": text_names,
        "unet_channels_last": bool(conv.is_contiguous(memory_format=torch.channels_last)
                                   and not conv.is_contiguous()),
        "losses_finite": all(math.isfinite(v) for v in result.losses),
    }
    return figures, result


# ----------------------------------------------------------------------------------------- generation


def merge_lora(module) -> int:
    """Merge every peft LoRA layer of `module` into its base weights (peft BaseTunerLayer.merge); returns
    the number of merged layers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = 0
    for sub in module.modules():
        if isinstance(sub, BaseTunerLayer) and not sub.merged:
            sub.merge()
            merged += 1
    return merged


def _prompts(settings: BenchSettings, batch: int) -> tuple[list[str], list[int]]:
    n = settings.gen_batch
    return [f"a photo of generated image {batch * n + i}" for i in range(n)], [batch * n + i for i in range(n)]


def time_reference_generation(model, settings: BenchSettings, device, start: float):
    """StableDiffusionPipeline on the same modules, prompt embeddings with clip skip computed here. Returns
    (figures, first timed batch of images on the CPU)."""
    import torch
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    s = settings
    pipe = StableDiffusionPipeline(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
        scheduler=EulerAncestralDiscreteScheduler.from_config(model.scheduler_config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    max_length = model.max_token_length

    def run(batch: int):
        prompts, seeds = _prompts(s, batch)
        with torch.no_grad():
            ids = model.tokenizer(prompts + [""], padding="max_length", max_length=max_length, truncation=True,
                                  return_tensors="pt").input_ids.to(device)
            embeddings = reference_prompt_embeddings(model.text_encoder, ids, s.clip_skip)
        cond, uncond = embeddings[:-1], embeddings[-1:].expand(len(prompts), -1, -1)
        images = pipe(
            prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=s.num_inference_steps,
            guidance_scale=s.cfg_scale, generator=[torch.Generator("cpu").manual_seed(x) for x in seeds],
            height=s.resolution, width=s.resolution, output_type="pt",
        ).images
        return images.float().cpu()  # as generate returns them

    return _time_batches(run, s, device, start, "reference pipeline")


def time_our_generation(model, settings: BenchSettings, device, start: float, label: str):
    """chain.sampling.generate with a constant CFG schedule. Returns (figures, first timed batch)."""
    from chain.guidance import Constant
    from chain.sampling import generate

    s = settings
    schedule = Constant(s.cfg_scale)

    def run(batch: int):
        prompts, seeds = _prompts(s, batch)
        images = generate(model, prompts, seeds, schedule, num_steps=s.num_inference_steps,
                          resolution=s.resolution, clip_skip=s.clip_skip, batch_size=s.gen_batch).images
        _sync(device)
        return images

    return _time_batches(run, s, device, start, f"ours ({label})")


def _time_batches(run, s: BenchSettings, device, start: float, label: str):
    t0 = time.perf_counter()
    for b in range(s.gen_warmup_batches):
        run(s.gen_timed_batches + b)  # warm-up batches use prompts and seeds of their own
    warmup = time.perf_counter() - t0
    _reset_peak(device)
    t0 = time.perf_counter()
    first = None
    for b in range(s.gen_timed_batches):
        images = run(b)
        if first is None:
            first = images
    seconds = time.perf_counter() - t0
    _log(f"{label} generation: {s.gen_timed_batches} x {s.gen_batch} images in {seconds:.2f}s", start)
    figures = {
        "images_per_s": s.gen_timed_batches * s.gen_batch / seconds,
        "peak_mem_gib": _peak_gib(device),
        "warmup_s": warmup,
        "image_shape": list(first.shape[1:]),
    }
    return figures, first


# ------------------------------------------------------------------------------------------------ driver


def run_benchmark(settings: BenchSettings) -> dict[str, Any]:
    """Measure everything in one process; returns the flat figures dict (module docstring)."""
    import torch
    from accelerate import Accelerator

    settings.validate()
    s = settings
    start = time.perf_counter()
    device = torch.device(s.device)
    figures: dict[str, Any] = {
        "size": s.size, "device": str(device), "precision": s.precision, "resolution": s.resolution,
        "latent_size": None, "train_batch": s.train_batch, "lora_rank": s.rank, "lora_alpha": s.alpha,
        "min_snr_gamma": s.min_snr_gamma, "clip_skip": s.clip_skip, "warmup_steps": s.warmup_steps,
        "timed_steps": s.timed_steps, "gen_batch": s.gen_batch, "gen_timed_batches": s.gen_timed_batches,
        "num_inference_steps": s.num_inference_steps, "cfg_scale": s.cfg_scale, "scheduler": "euler_ancestral",
        "torch": torch.__version__,
        "cuda_matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
    }
    _log(f"building {s.size} UNet, VAE and text encoder (random weights)", start)
    base = build_base_model(s.size, seed=s.seed)
    figures["latent_size"] = s.resolution // base.vae_scale_factor
    figures.update(unet_params=count_parameters(base.unet), vae_params=count_parameters(base.vae),
                   text_encoder_params=count_parameters(base.text_encoder))
    _log(f"built: UNet {figures['unet_params'] / 1e6:.1f} M, VAE {figures['vae_params'] / 1e6:.1f} M, "
         f"text encoder {figures['text_encoder_params'] / 1e6:.1f} M parameters", start)

    # ---- training: the reference, ours as the chain runs it, ours with channels_last
    accelerator = Accelerator(mixed_precision=s.precision, cpu=device.type == "cpu")
    reference = time_reference_training(base, s, device, start)
    variants: dict[str, dict[str, Any]] = {}
    variants["plain"], result = time_our_training(base, s, device, accelerator, start, "as in the chain")
    if s.channels_last:
        del result
        _free(device)
        base.unet.to(memory_format=torch.channels_last)  # survives finetune's deep copy and casts
        variants["channels_last"], result = time_our_training(base, s, device, accelerator, start, "channels_last")
        base.unet.to(memory_format=torch.contiguous_format)
    best_train = max(variants, key=lambda k: variants[k]["samples_per_s"])
    for key in ("samples_per_s", "peak_mem_gib"):
        figures[f"train_reference_{key}"] = reference[key]
    for name, v in variants.items():
        for key in ("samples_per_s", "peak_mem_gib", "setup_s"):
            figures[f"train_ours_{name}_{key}"] = v[key]
        figures[f"train_speedup_{name}"] = v["samples_per_s"] / reference["samples_per_s"]
    figures["train_ours_channels_last_effective"] = variants.get("channels_last", {}).get("unet_channels_last")
    figures["train_best_variant"] = best_train
    figures["train_speedup"] = figures[f"train_speedup_{best_train}"]
    figures["train_target_met"] = figures["train_speedup"] >= TARGETS["train_speedup"]
    last = variants["channels_last" if s.channels_last else "plain"]
    for side, v in (("ours", last), ("reference", reference)):
        figures[f"lora_params_unet_{side}"] = v["lora_params_unet"]
        figures[f"lora_params_text_encoder_{side}"] = v["lora_params_text_encoder"]
        figures[f"lora_modules_unet_{side}"] = len(v["lora_modules_unet"])
        figures[f"lora_modules_text_encoder_{side}"] = len(v["lora_modules_text_encoder"])
    figures["lora_same_modules"] = (last["lora_modules_unet"] == reference["lora_modules_unet"]
                                    and last["lora_modules_text_encoder"] == reference["lora_modules_text_encoder"])
    figures["train_losses_finite"] = all(v["losses_finite"] for v in (reference, *variants.values()))

    # ---- generation on the finetuned model as finetune returns it (LoRA attached, accelerate's autocast
    # wrapper kept, VAE in float32), the same modules for both sides
    model = result.model
    del result
    model.unet.to(memory_format=torch.contiguous_format)
    for module in (model.unet, model.text_encoder, model.vae):
        module.eval()
    _free(device)
    gen: dict[str, dict[str, Any]] = {}
    gen["reference"], ref_images = time_reference_generation(model, s, device, start)
    gen["plain"], our_images = time_our_generation(model, s, device, start, "as in the chain")
    figures["generate_max_abs_diff_vs_reference"] = float((our_images - ref_images).abs().max())
    figures["generate_mean_abs_diff_vs_reference"] = float((our_images - ref_images).abs().mean())
    # the scale of that difference: how far apart two images of different seeds are (consecutive images)
    figures["generate_mean_abs_diff_between_seeds"] = (float((our_images[1:] - our_images[:-1]).abs().mean())
                                                       if len(our_images) > 1 else float("nan"))
    applied_generation = ["sdpa (diffusers default)", f"{_precision_label(s.precision)} weights"]
    if s.channels_last:
        model.unet.to(memory_format=torch.channels_last)
        gen["channels_last"], _ = time_our_generation(model, s, device, start, "channels_last")
        applied_generation.append("channels_last")
    figures["lora_layers_merged"] = merge_lora(model.unet) + merge_lora(model.text_encoder)
    if s.channels_last:
        model.unet.to(memory_format=torch.channels_last)  # merging may rewrite weights contiguously
    gen["merged_lora"], _ = time_our_generation(model, s, device, start, "LoRA merged")
    applied_generation.append("merged LoRA (variant; chain.run does not merge)")
    figures["generate_compile"] = "not requested (--compile)"
    if s.compile:
        try:
            compiled = dataclasses.replace(model, unet=torch.compile(model.unet, mode=s.compile_mode))
            gen["compiled"], _ = time_our_generation(compiled, s, device, start, "torch.compile")
            figures["generate_compile"] = f"applied (torch.compile mode {s.compile_mode!r}, on top of merged LoRA)"
            applied_generation.append(f"torch.compile ({s.compile_mode})")
        except Exception as exc:  # noqa: BLE001 - a compile failure is a finding, the eager figures stand
            figures["generate_compile"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            _log(figures["generate_compile"], start)
    for name, v in gen.items():
        figures[f"generate_{name}_images_per_s"] = v["images_per_s"]
        figures[f"generate_{name}_peak_mem_gib"] = v["peak_mem_gib"]
        figures[f"generate_{name}_warmup_s"] = v["warmup_s"]  # includes compilation for "compiled"
        if name != "reference":
            figures[f"generate_speedup_{name}"] = v["images_per_s"] / gen["reference"]["images_per_s"]
    figures["image_shape_ours"] = gen["plain"]["image_shape"]
    figures["image_shape_reference"] = gen["reference"]["image_shape"]
    ours_variants = [k for k in gen if k != "reference"]
    best_gen = max(ours_variants, key=lambda k: gen[k]["images_per_s"])
    figures["generate_best_variant"] = best_gen
    figures["generate_speedup"] = figures[f"generate_speedup_{best_gen}"]
    figures["generate_speedup_as_in_chain"] = figures["generate_speedup_plain"]
    figures["generate_target_met"] = figures["generate_speedup"] >= TARGETS["generate_speedup"]
    figures["targets"] = dict(TARGETS)
    figures["applied_training"] = [
        "sdpa (diffusers default)", f"{_precision_label(s.precision)} base weights, float32 LoRA",
        "cached latents (VAE once, both flips)",
    ] + (["channels_last (variant)"] if s.channels_last else [])
    figures["applied_generation"] = applied_generation
    figures["not_applied"] = {
        "fused_adamw": "chain.finetune builds torch.optim.AdamW itself (no option for fused=True)",
        "torch_compile_training": "chain.finetune attaches the adapters after copying the base model; no hook "
                                  "to compile the adapted UNet",
        "cuda_graphs_training": "not reachable through chain.finetune",
    }
    if "compiled" not in gen or s.compile_mode != "reduce-overhead":
        figures["not_applied"]["cuda_graphs_generation"] = (
            "only through --compile --compile-mode reduce-overhead; chain.sampling.generate syncs with the host "
            "at every step (float(sigma), the guidance-gap norms moved to the CPU)")
    del model
    _free(device)
    figures["wall_s"] = time.perf_counter() - start
    _log("done", start)
    return figures


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and write results/gpu_sd15.json (results/gpu_sd15_tiny.json with --tiny). Without
    CUDA and without --tiny: one line, no failure (so `make bench` runs the rest)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_gpu_sd15", description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny configs of the same architectures (CPU smoke run)")
    parser.add_argument("--compile", action="store_true", help="add a torch.compile generation variant")
    parser.add_argument("--compile-mode", default="default",
                        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                        help="torch.compile mode of the --compile variant (reduce-overhead = CUDA graphs)")
    parser.add_argument("--precision", choices=("bf16", "fp16", "no"), default=None,
                        help="mixed precision (default bf16 on CUDA, no = float32 for --tiny on the CPU)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--out-dir", default=None, help="folder for the JSON (default benchmarks/results)")
    args = parser.parse_args([] if argv is None else argv)

    import torch

    from benchmarks.common import write_results

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not args.tiny and not device.startswith("cuda"):
        print(f"{NAME}: skipped, the SD1.5-size benchmark needs a CUDA device (device here: {device}); "
              "`python -m benchmarks.bench_gpu_sd15 --tiny` runs the CPU smoke version")
        return
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {device}: torch sees no CUDA device")
    settings = tiny_settings(device) if args.tiny else BenchSettings(device=device)
    settings = dataclasses.replace(settings, compile=args.compile, compile_mode=args.compile_mode,
                                   precision=args.precision or settings.precision)
    try:
        settings.validate()
    except ValueError as exc:
        parser.error(str(exc))
    figures = run_benchmark(settings)
    write_results(NAME + ("_tiny" if args.tiny else ""), figures,
                  out_dir=Path(args.out_dir) if args.out_dir else None)


if __name__ == "__main__":
    main(sys.argv[1:])
