"""LoRA finetuning M_k = Finetune(M_0, D_{k-1}, P) (Eq. 1 of the paper; Appendix A, Table 1; kohya semantics).

One training step on a batch of cached latents x_0 with captions c (`diffusion_loss`):
    t ~ U{0, ..., T_train - 1},  eps ~ N(0, I) (+ noise_offset * N(0, 1) per channel),
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,
    c   -> "" with probability condition_drop (the empty prompt still runs through the trained text encoder),
    loss = mean_b [ w(t_b) * mean((eps_theta(x_t, t, E(c)) - eps)^2) ],  w(t) = min(snr_t, gamma) / snr_t
    (min-SNR weighting, Hang et al. 2023; for v-prediction w = min(snr, gamma) / (snr + 1)),
with E(c) the CLIP-skip embedding (chain.text), AdamW over the LoRA parameters of UNet and text encoder
(separate learning rates), gradient clipping over both groups together. SDXL (chain.sdxl): E(c) from both
text encoders, the UNet also gets the pooled embedding and the time ids of the training size, and the
text-encoder group holds both encoders' adapters at text_encoder_lr (kohya's one text-encoder rate).

All randomness (shuffling, flips, timesteps, noise, caption drop) comes from one CPU torch.Generator, so a
finetune is reproducible and independent of the device and of the number of processes: every process draws
the same global batch and takes its own slice of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Callable

import torch
import torch.nn.functional as F

from chain.config import FinetuneConfig
from chain.lora import ModelLora, add_model_lora, load_model_lora, lora_parameters
from chain.models import BaseModel
from chain.text import encode_tokens, tokenize, unwrap


@dataclasses.dataclass
class FinetuneResult:
    """The finetuned model (adapters attached), its LoRA configs and per-step losses."""

    model: BaseModel
    unet_lora_config: object
    text_encoder_lora_config: object | None
    losses: list[float]
    num_steps: int
    seconds: float
    text_encoder_2_lora_config: object | None = None  # SDXL

    @property
    def lora_configs(self):
        """The three LoraConfigs as chain.lora.ModelLora (for save_model_lora)."""
        return ModelLora(self.unet_lora_config, self.text_encoder_lora_config, self.text_encoder_2_lora_config)


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio abar_t / (1 - abar_t) at the given integer timesteps."""
    a = alphas_cumprod.to(torch.float64)[timesteps.cpu()]
    return a / (1.0 - a)


def min_snr_weights(
    alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float, prediction_type: str = "epsilon"
) -> torch.Tensor:
    """Per-sample loss weights of min-SNR-gamma (kohya `apply_snr_weight`): min(snr, gamma) / snr for
    epsilon prediction, min(snr, gamma) / (snr + 1) for v prediction; gamma <= 0 gives weight 1."""
    s = snr(alphas_cumprod, timesteps)
    if gamma <= 0:
        return torch.ones_like(s, dtype=torch.float32)
    clipped = torch.clamp(s, max=gamma)
    w = clipped / (s + 1.0) if prediction_type == "v_prediction" else clipped / s
    return w.to(torch.float32)


def drop_captions(captions: list[str], probability: float, *, generator: torch.Generator) -> list[str]:
    """Replace each caption by "" independently with `probability` (kohya caption_dropout_rate). One uniform
    draw per caption, always made, so the generator advances the same whatever the probability."""
    u = torch.rand(len(captions), generator=generator)
    return ["" if float(x) < probability else c for x, c in zip(u, captions)]


def diffusion_loss(unet, text_encoder, scheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                   token_ids: torch.Tensor, *, clip_skip: int, min_snr_gamma: float, train_text_encoder: bool,
                   weight_dtype: torch.dtype = torch.float32, autocast=contextlib.nullcontext,
                   text_encoder_2=None, token_ids_2: torch.Tensor | None = None,
                   pixel_size: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """The loss of one batch (module docstring): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, the target eps
    (epsilon prediction) or the velocity (v prediction), and

        loss = mean_b [ w(t_b) * mean((unet(x_t, t, E(c)) - target)^2) ],  w = min_snr_weights(t, gamma).

    x0 and noise (B, C, h, w) lie on the UNet's device, timesteps (B,) are integers, token_ids (B, L) the
    tokenized captions. The UNet and text encoder run under `autocast()` (e.g. accelerator.autocast) with the
    noisy input in `weight_dtype`; the text encoder gets gradients only with `train_text_encoder`.
    SDXL (`text_encoder_2` and `token_ids_2` given): E(c) and the pooled embedding from both encoders
    (chain.sdxl.encode_tokens_sdxl) and the time ids of the training images' size `pixel_size` = (H, W),
    uncropped: (H, W, 0, 0, H, W).
    """
    device = x0.device
    t = timesteps.to(device)
    prediction_type = scheduler.config.prediction_type
    noisy = scheduler.add_noise(x0, noise, t)
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, t)
    added = None
    with autocast():
        with torch.set_grad_enabled(train_text_encoder):
            if text_encoder_2 is None:
                embeddings = encode_tokens(text_encoder, token_ids, clip_skip)
            else:
                from chain.sdxl import encode_tokens_sdxl, time_ids

                embeddings, pooled = encode_tokens_sdxl(text_encoder, text_encoder_2, token_ids, token_ids_2,
                                                        clip_skip)
                height, width = pixel_size
                added = {"text_embeds": pooled, "time_ids": time_ids(height, width, len(x0), pooled.dtype).to(device)}
        extra = {} if added is None else {"added_cond_kwargs": added}
        pred = unet(noisy.to(weight_dtype), t, embeddings, **extra).sample
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    weights = min_snr_weights(scheduler.alphas_cumprod, timesteps, min_snr_gamma, prediction_type).to(device)
    return (per_sample * weights).mean()


@torch.no_grad()
def encode_images(model: BaseModel, images: torch.Tensor, *, generator: torch.Generator, batch_size: int = 16) -> torch.Tensor:
    """Training targets x_0 of images (N, 3, H, W) in [0, 1]: the VAE latent (one posterior sample times the
    scaling factor, kohya's cached latents) or, for a pixel-space model, the image scaled to [-1, 1]."""
    pixels = images * 2.0 - 1.0
    if model.vae is None:
        return pixels.clone()
    vae = model.vae
    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    out = []
    for start in range(0, len(pixels), batch_size):
        chunk = pixels[start : start + batch_size].to(device, dtype)
        dist = vae.encode(chunk).latent_dist
        out.append((dist.sample(generator=generator) * vae.config.scaling_factor).float().cpu())
    return torch.cat(out)


def cache_latents(model: BaseModel, images: torch.Tensor, *, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Cached training targets (N, V, C, h, w): V = 2 with horizontal flip (both orientations cached, as
    kohya does with flip + cached latents), else V = 1."""
    views = [images, images.flip(-1)] if flip else [images]
    return torch.stack([encode_images(model, v, generator=generator) for v in views], dim=1)


def _batches(n: int, batch_size: int, epochs: int, max_steps: int, generator: torch.Generator):
    steps = 0
    for _epoch in range(max(epochs, 1) if not max_steps else 10**9):
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            yield perm[start : start + batch_size]
            steps += 1
            if max_steps and steps >= max_steps:
                return


def num_training_steps(num_images: int, cfg: FinetuneConfig) -> int:
    return cfg.max_train_steps or cfg.epochs * math.ceil(num_images / cfg.batch_size)


def finetune(
    base: BaseModel,
    images: torch.Tensor,
    captions: list[str],
    cfg: FinetuneConfig,
    *,
    condition_drop: float,
    generator: torch.Generator,
    accelerator,
    init_lora=None,
    on_step: Callable[[int, int, float], None] | None = None,
) -> FinetuneResult:
    """LoRA-finetune a copy of `base` on (images, captions); `base` itself is never modified.

    `init_lora` (a saved adapter folder) starts from earlier adapter weights (continual finetuning,
    App. E.4); otherwise the adapter is fresh. `accelerator` (accelerate.Accelerator) supplies the device,
    mixed precision and data parallelism; each process trains on its slice of the same global batch.
    `on_step(step, total, loss)` is called after every optimizer step.
    """
    from diffusers import DDPMScheduler

    start_time = time.perf_counter()
    rank, world = accelerator.process_index, accelerator.num_processes
    if cfg.batch_size % world:
        raise ValueError(f"finetune.batch_size {cfg.batch_size} is not divisible by the {world} processes "
                         "(the global batch is split evenly across processes)")
    model = base.copy()
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    place_for_training(model, device, weight_dtype)
    configs = add_model_lora(model, cfg, generator=generator)
    te_config = configs.text_encoder
    if init_lora is not None:
        load_model_lora(init_lora, model)
    scheduler = DDPMScheduler.from_config(model.scheduler_config)

    latents = cache_latents(model, images, flip=cfg.flip, generator=generator)
    unet_params = lora_parameters(model.unet)
    te_params = lora_parameters(model.text_encoder) if te_config is not None else []
    if configs.text_encoder_2 is not None:
        te_params += lora_parameters(model.text_encoder_2)
    groups = [{"params": unet_params, "lr": cfg.unet_lr}]
    if te_params:
        groups.append({"params": te_params, "lr": cfg.text_encoder_lr})
    optimizer = torch.optim.AdamW(  # one fused kernel for all LoRA tensors on a GPU (same arithmetic)
        groups, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay,
        fused=device.type == "cuda",
    )
    model.unet.train()
    for module in model.text_encoders():
        module.train(te_config is not None)
    text_encoder, text_encoder_2 = model.text_encoder, model.text_encoder_2
    if te_config is not None and text_encoder_2 is not None:
        unet, text_encoder, text_encoder_2, optimizer = accelerator.prepare(
            model.unet, text_encoder, text_encoder_2, optimizer)
    elif te_config is not None:
        unet, text_encoder, optimizer = accelerator.prepare(model.unet, text_encoder, optimizer)
    else:
        unet, optimizer = accelerator.prepare(model.unet, optimizer)
    all_params = unet_params + te_params
    total = num_training_steps(len(images), cfg)
    losses: list[float] = []
    max_length = model.max_token_length
    for index in _batches(len(images), cfg.batch_size, cfg.epochs, cfg.max_train_steps, generator):
        if world > 1 and len(index) % world:
            # a short last batch: keep a multiple of the process count, so every process holds an equal share
            # and DDP's average over processes is the global batch mean
            index = index[: len(index) - len(index) % world]
            if len(index) == 0:
                continue
        b = len(index)
        # Draws for the whole global batch (same on every process), then this process's slice.
        view = torch.randint(0, latents.shape[1], (b,), generator=generator) if latents.shape[1] > 1 else torch.zeros(b, dtype=torch.long)
        x0 = latents[index, view]
        noise = torch.randn(x0.shape, generator=generator)
        if cfg.noise_offset:
            noise = noise + cfg.noise_offset * torch.randn((b, x0.shape[1], 1, 1), generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator)
        batch_captions = drop_captions([captions[int(i)] for i in index], condition_drop, generator=generator)
        mine = slice(rank * b // world, (rank + 1) * b // world)
        x0, noise, timesteps = x0[mine].to(device), noise[mine].to(device), timesteps[mine]
        sdxl = {}
        if model.is_sdxl:
            from chain.sdxl import tokenize_sdxl

            ids, ids_2 = tokenize_sdxl(model, batch_captions[mine])
            sdxl = dict(text_encoder_2=text_encoder_2, token_ids_2=ids_2, pixel_size=tuple(images.shape[-2:]))
        else:
            ids = tokenize(model.tokenizer, batch_captions[mine], max_length)
        loss = diffusion_loss(unet, text_encoder, scheduler, x0, noise, timesteps, ids, clip_skip=cfg.clip_skip,
                              min_snr_gamma=cfg.min_snr_gamma, train_text_encoder=te_config is not None,
                              weight_dtype=weight_dtype, autocast=accelerator.autocast, **sdxl)
        accelerator.backward(loss)
        if cfg.max_grad_norm > 0 and accelerator.sync_gradients:
            accelerator.clip_grad_norm_(all_params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(accelerator.reduce(loss.detach(), reduction="mean"))
        losses.append(value)
        if on_step is not None:
            on_step(len(losses), total, value)
    model.unet = unwrap(accelerator.unwrap_model(unet))
    model.text_encoder = unwrap(accelerator.unwrap_model(text_encoder))
    if text_encoder_2 is not None:
        model.text_encoder_2 = unwrap(accelerator.unwrap_model(text_encoder_2))
    for module in [model.unet, *model.text_encoders()]:
        module.eval()
    accelerator.free_memory()
    return FinetuneResult(model, configs.unet, te_config, losses, len(losses), time.perf_counter() - start_time,
                          configs.text_encoder_2)


def place_for_training(model: BaseModel, device, weight_dtype: torch.dtype) -> None:
    """Freeze every module of `model`, move it to `device` and cast the UNet and text encoder(s) to
    `weight_dtype` (the VAE stays float32: latents are cached once); M_k is rebuilt the same way."""
    for module in model.modules():
        module.requires_grad_(False)
        module.to(device)
    for module in [model.unet, *model.text_encoders()]:
        if next(module.parameters()).dtype != weight_dtype:
            module.to(dtype=weight_dtype)
