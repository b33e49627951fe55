"""Generation D_k = Generate(M_k, P) (Eq. 2 of the paper): a written-out Euler-ancestral loop with
classifier-free guidance whose scale follows a schedule (chain.guidance).

Per step i with timestep t_i and noise level sigma_i (diffusers EulerAncestralDiscreteScheduler):
    x_in          = scale_model_input([x, x], t_i)                    (one batched UNet call for both)
    (e_u, e_c)    = eps_theta(x_in, t_i, [E(""), E(prompt)])
    e             = e_u + s_i (e_c - e_u),   s_i = schedule.scale(i, T, sigma_i)
    x             = scheduler.step(e, t_i, x, generator)              (ancestral noise from the generator)
The loop is the same arithmetic, in the same order, as StableDiffusionPipeline's (for SDXL models, with
the pooled text embeddings and time ids of chain.sdxl, StableDiffusionXLPipeline's), so with equal
generators both give equal latents (tests check it); unlike the pipeline it also returns both noise predictions' gap
|e_c - e_u| per step (Appendix G.1) and the final latents (Appendix G.2). With scale 1 the pipeline skips the
unconditional pass; this loop makes it unless asked not to (`unconditional=False`: then e = e_c, which is the
CFG formula at s = 1 up to rounding, and the gap norm is NaN).

`generate` runs the loop on a float32 UNet in its inference layout (`inference_layout`): LoRA adapters merged
into the weights they adapt (W + (alpha/r) B A, one matrix product per layer instead of three) and
convolution weights in channels_last memory order; both are undone exactly afterwards. The images equal
those of the plain module up to float32 rounding (tests check it).

One CPU torch.Generator per image (seeded by `image_seed`) draws that image's initial and ancestral noise,
so an image does not depend on the batch it is generated in.

On a CPU, `generate` runs its batches on as many worker threads as torch has intra-op threads, each batch
with one intra-op thread (`cpu_workers`): the toy world's 32 x 32 convolutions are too small to keep two
cores busy from inside one operator, two batches side by side do (benchmarks/RESULTS.md, "Toy loop"). The
batches themselves, and so every image, are the same as with one worker; only their order in time changes.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import threading

import numpy as np
import torch

from chain.models import BaseModel
from chain.text import encode_prompts, unwrap


def image_seed(run_seed: int, condition: str, iteration: int, image: int, purpose: str = "sample") -> int:
    """A 63-bit seed from (run seed, condition, iteration, image index): SHA-256 of their text, so seeds of
    different images, conditions and iterations are unrelated and independent of batch composition."""
    text = f"{run_seed}/{condition}/{iteration}/{image}/{purpose}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & ((1 << 63) - 1)


def make_generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


@dataclasses.dataclass
class SampleResult:
    """Final latents (B, C, h, w), float32 on CPU, and the per-image L2 norm of (e_c - e_u) at every step (B, T)."""

    latents: torch.Tensor
    guidance_diff_norm: torch.Tensor
    scales: np.ndarray


def sampling_scheduler(scheduler_config: dict, num_steps: int, device):
    from diffusers import EulerAncestralDiscreteScheduler

    scheduler = EulerAncestralDiscreteScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(num_steps, device=device)
    return scheduler


@torch.no_grad()
def sample_latents(
    unet,
    scheduler_config: dict,
    cond_embeddings: torch.Tensor,
    uncond_embeddings: torch.Tensor,
    schedule,
    *,
    num_steps: int,
    latent_shape: tuple[int, int, int],
    generator: list[torch.Generator],
    unconditional: bool = True,
    cond_added: dict | None = None,
    uncond_added: dict | None = None,
) -> SampleResult:
    """The Euler-ancestral CFG loop for a batch: B = len(generator) images, embeddings (B, L, D) each
    (an unconditional embedding with batch 1 is broadcast). unconditional=False: the conditional pass only,
    e = e_c (the loop at s = 1 without the unconditional half; uncond_embeddings is ignored, the gap norm NaN).
    SDXL: `cond_added` / `uncond_added` are the UNet's added conditioning of either branch
    ({"text_embeds": (B or 1, P), "time_ids": (B or 1, 6)}, chain.sdxl), batched like the embeddings."""
    from diffusers.utils.torch_utils import randn_tensor

    unet = unwrap(unet)
    device, dtype = next(unet.parameters()).device, cond_embeddings.dtype
    b = len(generator)

    def batch(x: torch.Tensor) -> torch.Tensor:  # a batch-1 tensor broadcast to the B images
        return x.expand(b, *x.shape[1:]) if x.shape[0] == 1 and b > 1 else x

    added = None
    if not unconditional:
        embeddings = cond_embeddings.to(device)
        if cond_added is not None:
            added = {k: batch(v).to(device) for k, v in cond_added.items()}
    else:
        embeddings = torch.cat([batch(uncond_embeddings), batch(cond_embeddings)]).to(device)
        if cond_added is not None:
            added = {k: torch.cat([batch(uncond_added[k]), batch(v)]).to(device) for k, v in cond_added.items()}
    extra = {} if added is None else {"added_cond_kwargs": added}
    passes = 2 if unconditional else 1
    scheduler = sampling_scheduler(scheduler_config, num_steps, device)
    gens = generator if b > 1 else generator[0]
    latents = randn_tensor((b, *latent_shape), generator=gens, device=device, dtype=dtype)
    latents = latents * scheduler.init_noise_sigma
    # Per-step bookkeeping stays on the device and the sigmas are read from one host copy, so the loop never
    # waits for the GPU between steps.
    norms = torch.zeros(b, len(scheduler.timesteps), dtype=torch.float64, device=latents.device)
    scales = np.zeros(len(scheduler.timesteps))
    sigmas = scheduler.sigmas.detach().cpu().tolist()
    for i, t in enumerate(scheduler.timesteps):
        sigma = float(sigmas[i])
        model_input = scheduler.scale_model_input(torch.cat([latents] * passes), t)
        pred = unet(model_input, t, encoder_hidden_states=embeddings, return_dict=False, **extra)[0]
        scale = schedule.scale(i, len(scheduler.timesteps), sigma)
        scales[i] = scale
        if unconditional:
            pred_uncond, pred_cond = pred.chunk(2)
            noise_pred = pred_uncond + scale * (pred_cond - pred_uncond)
            norms[:, i] = (pred_cond - pred_uncond).flatten(1).double().norm(dim=1)
        else:
            noise_pred = pred
            norms[:, i] = float("nan")
        latents = scheduler.step(noise_pred, t, latents, generator=gens, return_dict=False)[0]
    return SampleResult(latents.float().cpu(), norms.cpu(), scales)


def _lora_layers(module) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in module.modules() if isinstance(m, LoraLayer)]


@contextlib.contextmanager
def inference_layout(unet, *, merge_lora: bool = True, channels_last: bool = True):
    """Within the block, `unet` computes the same function up to float32 rounding, faster on a CPU:
    its active LoRA adapters merged into the base weights (W' = W + (alpha/r) B A, peft's `merge`) and its
    4-D weights in channels_last order. Afterwards the base weights are restored bit for bit (saved copies,
    not W' - BA) and the memory order is contiguous again. Merging applies to float32 weights only (a
    half-precision W + BA would lose the adapter's update to rounding); nothing is merged under autograd."""
    unet = unwrap(unet)
    saved = []
    merge = merge_lora and next(unet.parameters()).dtype == torch.float32 and not torch.is_grad_enabled()
    layers = [m for m in _lora_layers(unet) if not m.merged and not m.disable_adapters] if merge else []
    try:
        with torch.no_grad():
            for layer in layers:
                base = layer.get_base_layer()
                saved.append((layer, base, base.weight.detach().clone(),
                              None if base.bias is None else base.bias.detach().clone()))
                layer.merge()
            if channels_last:
                unet.to(memory_format=torch.channels_last)
        yield unet
    finally:
        with torch.no_grad():
            if channels_last:
                unet.to(memory_format=torch.contiguous_format)
            for layer, base, weight, bias in saved:
                layer.merged_adapters.clear()
                base.weight.copy_(weight)
                if bias is not None:
                    base.bias.copy_(bias)


@torch.no_grad()
def decode(model: BaseModel, latents: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1]: VAE decode of latents / scaling_factor, or for a pixel-space model the
    sample itself, mapped from [-1, 1]."""
    if model.vae is None:
        pixels = latents
    else:
        vae = model.vae
        device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
        pixels = vae.decode(latents.to(device, dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return (pixels.float().cpu() / 2.0 + 0.5).clamp(0.0, 1.0)


@dataclasses.dataclass
class GenerationResult:
    images: torch.Tensor  # (N, 3, H, W) in [0, 1]
    latents: torch.Tensor  # (N, C, h, w)
    guidance_diff_norm: torch.Tensor  # (N, T)
    scales: np.ndarray  # (T,)


def cpu_workers(device, num_batches: int, requested: int | None = None) -> int:
    """How many batches `generate` runs side by side: `requested` if given, else on a CPU torch's intra-op
    thread count (torch.get_num_threads(), one core each), on an accelerator 1; never more than the batches."""
    if requested is None:
        requested = torch.get_num_threads() if torch.device(device).type == "cpu" else 1
    if requested < 1:
        raise ValueError(f"generate: workers must be >= 1, got {requested}")
    return max(1, min(requested, num_batches))


@contextlib.contextmanager
def _intra_op_threads(n: int):
    """torch's intra-op thread count set to `n` within the block and restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def generate(
    model: BaseModel,
    prompts: list[str],
    seeds: list[int],
    schedule,
    *,
    num_steps: int,
    resolution: int,
    clip_skip: int,
    batch_size: int,
    on_batch=None,
    unconditional: bool = True,
    fast: bool = True,
    workers: int | None = None,
) -> GenerationResult:
    """One image per (prompt, seed) pair, in batches of `batch_size`; prompts embedded with CLIP skip, the
    unconditional embedding is that of "" through the same (finetuned) text encoder (SDXL: chain.sdxl, with
    the added conditioning of the resolution and zeros under force_zeros_for_empty_prompt). unconditional=False:
    conditional pass only (see sample_latents). fast=False: the UNet as given, without `inference_layout`.
    workers: batches run side by side, each with one intra-op thread (default `cpu_workers`: on a CPU one per
    torch thread; 1 on an accelerator); the batches and the images are the same for any number of workers.
    `on_batch(n)` is called once per finished batch of n images, from one thread at a time."""
    if len(prompts) != len(seeds):
        raise ValueError("generate: one seed per prompt")
    side = resolution // model.vae_scale_factor
    latent_shape = (model.latent_channels, side, side)
    if not prompts:  # a process with no share of the prompts
        return GenerationResult(torch.zeros(0, 3, resolution, resolution), torch.zeros(0, *latent_shape),
                                torch.zeros(0, num_steps, dtype=torch.float64), np.full(num_steps, np.nan))
    encode = _prompt_encoder(model, clip_skip, resolution)
    starts = list(range(0, len(prompts), batch_size))
    n_workers = cpu_workers(next(model.unet.parameters()).device, len(starts), workers)
    with torch.no_grad():
        uncond, uncond_added = encode(None)
    report = threading.Lock()

    def one_batch(unet, start):
        with torch.no_grad():  # grad mode is per thread
            chunk = prompts[start : start + batch_size]
            cond, cond_added = encode(chunk)
            gens = [make_generator(s) for s in seeds[start : start + batch_size]]
            result = sample_latents(
                unet, model.scheduler_config, cond, uncond, schedule,
                num_steps=num_steps, latent_shape=latent_shape, generator=gens, unconditional=unconditional,
                cond_added=cond_added, uncond_added=uncond_added,
            )
            images = decode(model, result.latents)
        if on_batch is not None:
            with report:
                on_batch(len(chunk))
        return images, result

    layout = inference_layout(model.unet) if fast else contextlib.nullcontext(model.unet)
    threads = _intra_op_threads(1) if n_workers > 1 else contextlib.nullcontext()
    with torch.no_grad(), layout as unet, threads:
        if n_workers == 1:
            done = [one_batch(unet, start) for start in starts]
        else:
            with concurrent.futures.ThreadPoolExecutor(n_workers, thread_name_prefix="qtm-generate") as pool:
                done = list(pool.map(functools.partial(one_batch, unet), starts))
    return GenerationResult(torch.cat([d[0] for d in done]), torch.cat([d[1].latents for d in done]),
                            torch.cat([d[1].guidance_diff_norm for d in done]), done[-1][1].scales)


def _prompt_encoder(model: BaseModel, clip_skip: int, resolution: int):
    """prompts -> (embeddings, added conditioning or None); None -> the unconditional branch. SD: the
    CLIP-skip embedding (chain.text), the unconditional one that of "". SDXL: chain.sdxl (two encoders,
    pooled embeddings, time ids; zeros for the unconditional branch with force_zeros_for_empty_prompt)."""
    if model.is_sdxl:
        from chain.sdxl import encode_prompts_sdxl, unconditional_sdxl

        def encode_sdxl(prompts):
            if prompts is None:
                return unconditional_sdxl(model, clip_skip=clip_skip, resolution=resolution)
            return encode_prompts_sdxl(model, prompts, clip_skip=clip_skip, resolution=resolution)

        return encode_sdxl
    te, max_length = unwrap(model.text_encoder), model.max_token_length

    def encode_sd(prompts):
        return encode_prompts(te, model.tokenizer, [""] if prompts is None else prompts, clip_skip=clip_skip,
                              max_length=max_length), None

    return encode_sd


def latent_histogram(latents: torch.Tensor, bins: int, value_range: float) -> tuple[np.ndarray, np.ndarray]:
    """Counts of all final latent values in `bins` equal bins over [-range, range] (values outside are
    counted in the edge bins), and the bin edges (Appendix G.2)."""
    edges = np.linspace(-value_range, value_range, bins + 1)
    values = np.clip(latents.double().numpy().ravel(), -value_range, value_range)
    counts, _ = np.histogram(values, bins=edges)
    return counts.astype(np.float64), edges
