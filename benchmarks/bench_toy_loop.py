"""Throughput of the toy world's chain loop (the committed toy M_0, 32 x 32 pixel space): generation and LoRA
finetuning, the loop as it first landed ("old") against the chain's path today ("new"), side by side in one
process, on all of torch's threads (the machine's cores unless QTM_BENCH_THREADS says otherwise).

Generation: 30 Euler-ancestral steps at CFG 7.5, QTM_BENCH_TOY_IMAGES (default 64) images in batches of
QTM_BENCH_TOY_BATCH (default 32), on M_k = M_0 plus the demo's adapter (rank 16, alpha 16 on the UNet and the
text encoder) after a few finetuning steps, so the adapter is non-zero as in a chain.
  old:  generate(fast=False, workers=1): the peft-wrapped UNet as finetuning leaves it (three matrix products
        per adapted layer), contiguous (NCHW) layout, one batch at a time on all threads.
  new:  generate() as the chain calls it: adapters merged into the weights and channels_last weights for the
        duration of the call (chain.sampling.inference_layout), and on a CPU one batch per thread side by side,
        each on one intra-op thread (chain.sampling.cpu_workers); the same batches, the same sampler arithmetic.
  reference set of the selection assay at scale 1: old = the CFG loop at s = 1 (both passes) on the old path;
        new = the conditional pass alone (e = e_c) on the new path.
Finetuning: chain.finetune.finetune with the demo's settings (batch 6, rank 16), images/s after the set-up,
the base UNet in contiguous layout (the chain's) and in channels_last.
One study cell (examples/toy_study.toml: 256 guided + 256 reference images, 4 epochs of 256 images of
finetuning) is priced from the figures above on either path: the toy-loop speed-up.
Images/s of a 64 x 64 world (the same architecture, random weights) against 32 x 32 on the new path.

Timings are the best of QTM_BENCH_TOY_REPEATS (default 2) interleaved repetitions (old, new, old, new, ...),
so a machine loaded by others slows both sides alike. The images of the two paths agree to float32 rounding
(largest difference reported).
"""

from __future__ import annotations

import os
import time

import torch

from benchmarks.common import write_results

IMAGES = int(os.environ.get("QTM_BENCH_TOY_IMAGES", "64"))
BATCH = int(os.environ.get("QTM_BENCH_TOY_BATCH", "32"))
REPEATS = int(os.environ.get("QTM_BENCH_TOY_REPEATS", "2"))
THREADS = int(os.environ.get("QTM_BENCH_THREADS", "0"))  # 0: torch's default (the machine's cores)
# one cell of examples/toy_study.toml
CELL_GUIDED, CELL_REFERENCE, CELL_FINETUNE_SAMPLES = 256, 256, 4 * 256
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


def _generate(model, prompts, seeds, *, new: bool, scale: float = SCALE, resolution: int = 32,
              batch: int = BATCH):
    """(seconds, images) of the old or the new generation path; at scale 1 the new path makes the conditional
    pass only, as the chain's reference set does."""
    from chain.guidance import Constant
    from chain.sampling import generate

    start = time.perf_counter()
    out = generate(model, prompts, seeds, Constant(scale), num_steps=STEPS, resolution=resolution, clip_skip=2,
                   batch_size=batch, fast=new, workers=None if new else 1,
                   unconditional=not (new and scale == 1.0))
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

    if THREADS:
        torch.set_num_threads(THREADS)
    threads = torch.get_num_threads()
    base = load_base_model(str(toy_base_model_dir()))
    images, captions = _toy_data(max(IMAGES, 24))
    model, _ = _finetune(base, images, captions, 4)  # M_k with a non-zero adapter
    prompts = (captions * (IMAGES // len(captions) + 1))[:IMAGES]
    seeds = [image_seed(0, "bench", 1, i) for i in range(IMAGES)]
    _generate(model, prompts[:2], seeds[:2], new=True, batch=1)  # first-call set-up out of the timings

    times = {k: [] for k in ("old", "new", "old_reference", "new_reference")}
    for _ in range(REPEATS):
        t, old_images = _generate(model, prompts, seeds, new=False)
        times["old"].append(t)
        t, new_images = _generate(model, prompts, seeds, new=True)
        times["new"].append(t)
        times["old_reference"].append(_generate(model, prompts, seeds, new=False, scale=1.0)[0])
        times["new_reference"].append(_generate(model, prompts, seeds, new=True, scale=1.0)[0])
    rate = {k: IMAGES / min(v) for k, v in times.items()}

    # finetuning: contiguous (the chain's) vs channels_last base UNet, interleaved
    base_cl = base.copy()
    base_cl.unet.to(memory_format=torch.channels_last)
    ft_plain, ft_cl = [], []
    for _ in range(REPEATS):
        ft_plain.append(_finetune(base, images, captions, FINETUNE_STEPS)[1])
        ft_cl.append(_finetune(base_cl, images, captions, FINETUNE_STEPS)[1])
    batch = _finetune_config().batch_size
    finetune_rate = batch / min(ft_plain)

    def cell_seconds(path: str) -> float:  # one toy-study cell on either path
        return (CELL_GUIDED / rate[path] + CELL_REFERENCE / rate[f"{path}_reference"]
                + CELL_FINETUNE_SAMPLES / finetune_rate)

    # a 64 px world against 32 px (random weights, the new path, interleaved; a quarter of the images)
    worlds = {r: _toy_unet_at(r) for r in (32, 64)}
    per_world = {32: [], 64: []}
    n_world = max(2, IMAGES // 4)
    for _ in range(REPEATS):
        for r, m in worlds.items():
            per_world[r].append(_generate(m, prompts[:n_world], seeds[:n_world], new=True, resolution=r,
                                          batch=max(1, n_world // 2))[0])

    figures = {
        "threads": threads,
        "images": IMAGES,
        "batch": BATCH,
        "steps": STEPS,
        "generation_old_images_per_s": rate["old"],
        "generation_new_images_per_s": rate["new"],
        "generation_speedup": rate["new"] / rate["old"],
        "generation_max_abs_image_difference": float((new_images - old_images).abs().max()),
        "reference_old_images_per_s": rate["old_reference"],
        "reference_new_images_per_s": rate["new_reference"],
        "reference_speedup": rate["new_reference"] / rate["old_reference"],
        "finetune_images_per_s": finetune_rate,
        "finetune_channels_last_images_per_s": batch / min(ft_cl),
        "finetune_channels_last_speedup": min(ft_plain) / min(ft_cl),
        "study_cell_old_s": cell_seconds("old"),
        "study_cell_new_s": cell_seconds("new"),
        "toy_loop_speedup": cell_seconds("old") / cell_seconds("new"),
        "world_32px_images_per_s": n_world / min(per_world[32]),
        "world_64px_images_per_s": n_world / min(per_world[64]),
        "world_64px_cost_ratio": min(per_world[64]) / min(per_world[32]),
    }
    write_results("toy_loop", figures)
    return figures


if __name__ == "__main__":
    main()
