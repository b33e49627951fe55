"""Throughput of the toy world's chain loop (the committed toy M_0, 32 x 32 pixel space): generation and LoRA
finetuning, the plain path against the chain's path, side by side in one process.

Generation: 30 Euler-ancestral steps at CFG 7.5, a batch of QTM_BENCH_TOY_IMAGES (default 8) images, on
M_k = M_0 plus the demo's adapter (rank 16, alpha 16 on the UNet and the text encoder) after a few
finetuning steps, so the adapter is non-zero as in a chain.
  plain:  chain.sampling.generate(fast=False): the peft-wrapped UNet as finetuning leaves it (three matrix
          products per adapted layer) in contiguous (NCHW) layout: the loop before this benchmark existed.
  chain:  generate(fast=True), what the chain runs: adapters merged into the weights and channels_last
          weights for the duration of the call (chain.sampling.inference_layout); same sampler arithmetic.
  reference pass: the selection assay's reference set at scale 1, the conditional pass alone
          (generate(unconditional=False)): half the UNet work per image.
Finetuning: chain.finetune.finetune with the demo's settings (batch 6, rank 16), steps/s after the set-up,
the base UNet in contiguous layout (plain) and in channels_last (the chain's layout for convolutions).
Images/s of a 64 x 64 world (the same architecture, random weights) against 32 x 32 are measured with the
chain's generation path.

Timings are the best of QTM_BENCH_TOY_REPEATS (default 2) interleaved repetitions (plain, chain, plain,
chain, ...), so a machine loaded by others slows both sides alike; torch runs QTM_BENCH_THREADS threads
(default 1). The images of the two paths agree to float32 rounding (max abs difference reported).
"""

from __future__ import annotations

import os
import time

import torch

from benchmarks.common import write_results

IMAGES = int(os.environ.get("QTM_BENCH_TOY_IMAGES", "8"))
REPEATS = int(os.environ.get("QTM_BENCH_TOY_REPEATS", "2"))
THREADS = int(os.environ.get("QTM_BENCH_THREADS", "1"))
STEPS = 30
SCALE = 7.5
FINETUNE_STEPS = 8


def _toy_data(n: int, resolution: int = 32):
    """n toy images (N, 3, R, R) in [0, 1] and their captions, from the toy world's D_0 distribution."""
    import numpy as np

    from chain.toy.dataset import caption_for, sample_toy_images

    images, scenes = sample_toy_images(np.random.default_rng(0), n, resolution=resolution, distribution="d0")
    return torch.from_numpy(images), [caption_for(s) for s in scenes]


def _finetune_config(**kw):
    from chain.config import FinetuneConfig

    return FinetuneConfig(rank=16, alpha=16.0, unet_lr=1e-3, text_encoder_lr=5e-4, batch_size=6, epochs=1,
                          mixed_precision="no", clip_skip=2, **kw)


def _finetune(base, images, captions, steps: int):
    """(the finetuned model, seconds per step after the first step: set-up and first step excluded)."""
    from accelerate import Accelerator

    from chain.finetune import finetune
    from chain.sampling import make_generator

    stamps = []
    result = finetune(base, images, captions, _finetune_config(max_train_steps=steps), condition_drop=0.0,
                      generator=make_generator(0), accelerator=Accelerator(cpu=True),
                      on_step=lambda step, total, loss: stamps.append(time.perf_counter()))
    return result.model, (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def _generate(model, prompts, seeds, *, fast: bool, unconditional: bool = True, resolution: int = 32):
    from chain.guidance import Constant
    from chain.sampling import generate

    start = time.perf_counter()
    out = generate(model, prompts, seeds, Constant(SCALE), num_steps=STEPS, resolution=resolution, clip_skip=2,
                   batch_size=len(prompts), fast=fast, unconditional=unconditional)
    return time.perf_counter() - start, out.images


def _toy_unet_at(resolution: int):
    """The toy architecture (chain.toy.model.ToyModelConfig) with random weights at `resolution`."""
    import dataclasses

    from chain.models import BaseModel
    from chain.toy.model import ToyModelConfig, build_toy_model, load_toy_base_model

    tokenizer = load_toy_base_model().tokenizer
    toy = build_toy_model(dataclasses.replace(ToyModelConfig(), resolution=resolution), tokenizer,
                          generator=torch.Generator().manual_seed(0))
    return BaseModel(toy.unet.eval(), toy.text_encoder.eval(), toy.tokenizer, toy.scheduler_config)


def main() -> dict:
    from chain.models import load_base_model
    from chain.sampling import image_seed
    from chain.toy import toy_base_model_dir

    torch.set_num_threads(THREADS)
    base = load_base_model(str(toy_base_model_dir()))
    images, captions = _toy_data(max(IMAGES, 24))
    model, _ = _finetune(base, images, captions, 4)  # M_k with a non-zero adapter
    prompts = captions[:IMAGES]
    seeds = [image_seed(0, "bench", 1, i) for i in range(IMAGES)]

    plain, chain, reference = [], [], []
    for _ in range(REPEATS):
        t, plain_images = _generate(model, prompts, seeds, fast=False)
        plain.append(t)
        t, chain_images = _generate(model, prompts, seeds, fast=True)
        chain.append(t)
        t, _ = _generate(model, prompts, seeds, fast=True, unconditional=False)
        reference.append(t)
    gen_plain, gen_chain, gen_ref = IMAGES / min(plain), IMAGES / min(chain), IMAGES / min(reference)

    # finetuning: contiguous vs channels_last base UNet, interleaved
    base_cl = base.copy()
    base_cl.unet.to(memory_format=torch.channels_last)
    ft_plain, ft_cl = [], []
    for _ in range(REPEATS):
        ft_plain.append(_finetune(base, images, captions, FINETUNE_STEPS)[1])
        ft_cl.append(_finetune(base_cl, images, captions, FINETUNE_STEPS)[1])
    batch = _finetune_config().batch_size

    # a 64 px world against 32 px (random weights, the chain's path, interleaved)
    worlds = {r: _toy_unet_at(r) for r in (32, 64)}
    per_world = {32: [], 64: []}
    for _ in range(REPEATS):
        for r, m in worlds.items():
            per_world[r].append(_generate(m, prompts, seeds, fast=True, resolution=r)[0])

    figures = {
        "threads": THREADS,
        "images": IMAGES,
        "steps": STEPS,
        "generation_plain_images_per_s": gen_plain,
        "generation_chain_images_per_s": gen_chain,
        "generation_speedup": gen_chain / gen_plain,
        "generation_max_abs_image_difference": float((chain_images - plain_images).abs().max()),
        "reference_pass_images_per_s": gen_ref,
        "reference_pass_speedup_vs_plain_cfg": gen_ref / gen_plain,
        "finetune_plain_images_per_s": batch / min(ft_plain),
        "finetune_channels_last_images_per_s": batch / min(ft_cl),
        "finetune_speedup": min(ft_plain) / min(ft_cl),
        "world_32px_images_per_s": IMAGES / min(per_world[32]),
        "world_64px_images_per_s": IMAGES / min(per_world[64]),
        "world_64px_cost_ratio": min(per_world[64]) / min(per_world[32]),
    }
    write_results("toy_loop", figures)
    return figures


if __name__ == "__main__":
    main()
