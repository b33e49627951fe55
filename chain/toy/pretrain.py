"""Pretrain the toy base model M_0 on the broad procedural distribution.

    python -m chain.toy.pretrain --out chain/toy/assets/base_model --seed 0 --steps 2400

Denoising objective of DDPM (Ho et al. 2020) with epsilon prediction and min-SNR-5 weighting
(Hang et al. 2023: weight min(SNR, 5) / SNR on the epsilon loss), UNet and text encoder trained together from
scratch, the prompt embedding exactly as the chain computes it (chain.text, CLIP skip 2), 10 % of the
captions replaced by "" so that classifier-free guidance works. Every batch is fresh data drawn from
``numpy.random.default_rng([seed, step])``, and the learning rate is constant after a warm-up, so a run
stopped after N steps equals a run asked for N steps, and a checkpointed run resumes bit-for-bit. The saved
model holds the exponential moving average of the weights (decay 0.999).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

__all__ = ["PretrainConfig", "main", "pretrain"]


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    steps: int = 2400
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 200
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    seed: int = 0
    checkpoint_every: int = 200
    # Steps at the start whose timesteps are drawn from the whole 1000-step linear schedule (the first
    # pretraining run did so for 600 steps before the schedule was cut at 728; chain/toy/assets/README.md).
    full_range_steps: int = 0


def _loss(unet, text_encoder, tokenizer, alphas_cumprod, images_01, captions, cfg, generator, num_timesteps):
    """Min-SNR-weighted epsilon MSE of one batch (images in [0, 1] are scaled to [-1, 1]); timesteps uniform
    on [0, num_timesteps)."""
    import torch

    from chain.text import encode_prompts
    from chain.toy.model import CLIP_SKIP

    x0 = images_01 * 2.0 - 1.0
    b = x0.shape[0]
    t = torch.randint(0, num_timesteps, (b,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    ab = alphas_cumprod[t].view(b, 1, 1, 1)
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    drop = torch.rand(b, generator=generator) < cfg.caption_dropout
    prompts = ["" if d else c for d, c in zip(drop.tolist(), captions)]
    emb = encode_prompts(text_encoder, tokenizer, prompts, clip_skip=CLIP_SKIP, max_length=tokenizer.model_max_length)
    pred = unet(xt, t, encoder_hidden_states=emb).sample
    snr = ab.view(b) / (1 - ab.view(b))
    weight = torch.clamp(snr, max=cfg.min_snr_gamma) / snr
    per_image = (pred - noise).pow(2).mean(dim=(1, 2, 3))
    return (weight * per_image).mean()


def pretrain(out_dir: Path, cfg: PretrainConfig, *, checkpoint: Path, resolution: int = 32, log=print) -> None:
    import numpy as np
    import torch
    from diffusers import DDPMScheduler
    from transformers import CLIPTokenizer

    from chain.toy.dataset import sample_toy_images, caption_for
    from chain.toy.model import ToyModelConfig, build_toy_model, sample_images, save_toy_base_model
    from chain.toy.tokenizer import train_toy_tokenizer
    from qtmio.atomic import atomic_write_path

    out_dir = Path(out_dir)
    tok_dir = train_toy_tokenizer(out_dir / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    mcfg = ToyModelConfig(resolution=resolution)
    model = build_toy_model(mcfg, tokenizer, generator=torch.Generator().manual_seed(cfg.seed))
    unet, te = model.unet.train(), model.text_encoder.train()
    ema = {"unet": copy.deepcopy(unet).eval(), "te": copy.deepcopy(te).eval()}
    for m in ema.values():
        m.requires_grad_(False)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps))
    # alpha_bar of the whole linear schedule; the model's own schedule is its first mcfg.num_train_timesteps.
    full_betas = torch.linspace(mcfg.beta_start, mcfg.beta_end, mcfg.linear_schedule_length, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1 - full_betas, 0).float()
    stored = DDPMScheduler.from_config(model.scheduler_config).alphas_cumprod.float()
    assert torch.allclose(alphas_cumprod[: len(stored)], stored), "scheduler config and schedule disagree"
    step = 0
    if checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        unet.load_state_dict(state["unet"]); te.load_state_dict(state["te"])
        ema["unet"].load_state_dict(state["ema_unet"]); ema["te"].load_state_dict(state["ema_te"])
        opt.load_state_dict(state["opt"]); sched.load_state_dict(state["sched"])
        step = state["step"]
        log(f"resumed from {checkpoint} at step {step}")
    elapsed = 0.0 if step == 0 else state.get("elapsed", 0.0)

    def save(step: int) -> None:
        state = {
            "unet": unet.state_dict(), "te": te.state_dict(),
            "ema_unet": ema["unet"].state_dict(), "ema_te": ema["te"].state_dict(),
            "opt": opt.state_dict(), "sched": sched.state_dict(), "step": step,
            "elapsed": elapsed, "config": dataclasses.asdict(cfg),
        }
        with atomic_write_path(checkpoint) as tmp:
            torch.save(state, tmp)
        export = dataclasses.replace(model, unet=ema["unet"], text_encoder=ema["te"])
        save_toy_base_model(export, out_dir)
        meta = {"steps": step, "train_seconds": round(elapsed, 1), "config": dataclasses.asdict(cfg),
                "model": dataclasses.asdict(mcfg),
                "unet_parameters": sum(p.numel() for p in unet.parameters()),
                "text_encoder_parameters": sum(p.numel() for p in te.parameters())}
        from qtmio.atomic import write_text_atomic
        write_text_atomic(out_dir / "training.json", json.dumps(meta, indent=2) + "\n")
        # A small grid to look at.
        rng = np.random.default_rng(1234)
        _, scenes = sample_toy_images(rng, 16, resolution=resolution, distribution="pretrain")
        imgs = sample_images(export, [caption_for(s) for s in scenes],
                             seeds=list(range(16)),
                             num_steps=20, cfg_scale=4.0)
        grid = imgs.reshape(4, 4, 3, resolution, resolution).permute(0, 3, 1, 4, 2).reshape(4 * resolution, 4 * resolution, 3)
        from PIL import Image
        Image.fromarray((grid.numpy() * 255).round().astype("uint8")).resize((512, 512), Image.NEAREST).save(
            checkpoint.with_name(f"grid_{step:05d}.png"))
        log(f"saved step {step} to {out_dir} ({elapsed / 60:.1f} min of training)")

    window = []
    while step < cfg.steps:
        t0 = time.perf_counter()
        rng = np.random.default_rng([cfg.seed, step])
        images, scenes = sample_toy_images(rng, cfg.batch_size, resolution=resolution, distribution="pretrain")
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        num_t = mcfg.linear_schedule_length if step < cfg.full_range_steps else mcfg.num_train_timesteps
        loss = _loss(unet, te, tokenizer, alphas_cumprod, torch.from_numpy(images),
                     [caption_for(s) for s in scenes], cfg, gen, num_t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step(); sched.step()
        step += 1
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for live, avg in ((unet, ema["unet"]), (te, ema["te"])):
                for p, q in zip(live.parameters(), avg.parameters()):
                    q.lerp_(p, 1 - decay)
        elapsed += time.perf_counter() - t0
        window.append(loss.item())
        if step % 50 == 0:
            log(f"step {step}/{cfg.steps} loss {np.mean(window):.4f} {elapsed / step:.2f} s/step "
                f"elapsed {elapsed / 60:.1f} min")
            window = []
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save(step)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder (diffusers format)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=PretrainConfig.steps)
    p.add_argument("--batch-size", type=int, default=PretrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=PretrainConfig.lr)
    p.add_argument("--checkpoint-every", type=int, default=PretrainConfig.checkpoint_every)
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="training-state file for resuming; sample grids go next to it "
                        "(default: qtm_toy_pretrain_seed<SEED>.pt in the system temp folder)")
    p.add_argument("--full-range-steps", type=int, default=0,
                   help="first steps drawing timesteps from the whole 1000-step linear schedule")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    cfg = PretrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
                         checkpoint_every=a.checkpoint_every, full_range_steps=a.full_range_steps)
    import tempfile

    ckpt = a.checkpoint or Path(tempfile.gettempdir()) / f"qtm_toy_pretrain_seed{a.seed}.pt"
    pretrain(a.out, cfg, checkpoint=ckpt, resolution=a.resolution,
             log=lambda m: print(time.strftime("%H:%M:%S"), m, flush=True))


if __name__ == "__main__":
    main()
