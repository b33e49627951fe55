"""Shared helpers for the chain tests: a tiny captioned dataset and tiny configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from chain.config import config_from_dict
from chain.images import save_image

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("square", "stripe", "disc")


def make_captioned_folder(root: Path, num_images: int = 6, size: int = 32, seed: int = 0) -> Path:
    """A kohya-style folder: num_images PNGs with shapes, noise and texture, plus same-name .txt captions."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(num_images):
        colour = COLOURS[i % len(COLOURS)]
        shape = SHAPES[i % len(SHAPES)]
        rgb = rng.uniform(0.2, 0.9, size=3)
        img = np.full((3, size, size), 0.5) + 0.1 * rng.standard_normal((3, size, size))
        if shape == "square":
            mask = (abs(xx - 0.5) < 0.25) & (abs(yy - 0.5) < 0.25)
        elif shape == "stripe":
            mask = np.sin(2 * np.pi * 4 * xx) > 0
        else:
            mask = (xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.1
        img[:, mask] = rgb[:, None]
        save_image(torch.from_numpy(img.clip(0, 1)).float(), root / f"img_{i:02d}.png")
        (root / f"img_{i:02d}.txt").write_text(f"a {colour} {shape}")
    return root


def tiny_config_dict(data_path: Path, *, latent: bool = True, num_iterations: int = 2, epochs: int = 1,
                     num_steps: int = 4, conditions=None) -> dict:
    if conditions is None:
        conditions = [
            {"name": "cfg7.5", "schedule": "constant", "scale": 7.5},
            {"name": "redifine", "schedule": "exponential", "scale": 7.5, "alpha": 2.0, "condition_drop": 0.2},
        ]
    return {
        "run": {"num_iterations": num_iterations, "seed": 3, "device": "cpu"},
        "data": {"path": str(data_path), "resolution": 32},
        "model": {"path": "tiny", "tiny": {"latent": latent, "seed": 1}},
        "finetune": {"rank": 4, "alpha": 2.0, "batch_size": 3, "epochs": epochs, "unet_lr": 1e-3,
                     "text_encoder_lr": 5e-4},
        "sampling": {"num_steps": num_steps, "batch_size": 4, "latent_histogram_bins": 16},
        "conditions": conditions,
    }


def tiny_config(data_path: Path, **kwargs):
    return config_from_dict(tiny_config_dict(data_path, **kwargs))


class SeededStage:
    """A stand-in finetune+generate stage for run_chain whose every image is a pure function of its seed and
    the training set: (last training images + seeded noise) / 2, and reference images from the seeds alone.

    Controlled by the environment, for tests that run it in subprocesses (tests/chain/test_shards.py):
    SHARD_BARRIER (a folder) and SHARD_WAIT_FOR (condition names, comma-separated): at its first cell the stage
    writes <barrier>/<condition>.started and waits until every named condition has written its file (so
    shards provably run at once); SHARD_KILL = "<condition>:<iteration>": the process kills itself (SIGKILL)
    while making that cell's reference set, after the cell's images were written.
    """

    def __init__(self):
        self.started = False

    def __call__(self, job):
        import os
        import time

        from chain.run import IterationResult
        from chain.sampling import make_generator

        barrier = os.environ.get("SHARD_BARRIER")
        if barrier and not self.started:
            self.started = True
            (Path(barrier) / f"{job.condition.name}.started").write_text(str(os.getpid()))
            deadline = time.monotonic() + 600
            while not all((Path(barrier) / f"{c}.started").exists()
                          for c in os.environ["SHARD_WAIT_FOR"].split(",")):
                assert time.monotonic() < deadline, "the other shards never started"
                time.sleep(0.05)
        n = len(job.prompts)
        noise = torch.stack([torch.rand(job.train_images.shape[1:], generator=make_generator(s)) for s in job.seeds])
        return IterationResult(images=(0.5 * job.train_images[-n:] + 0.5 * noise).clamp(0, 1),
                               train_loss=float(job.train_seed % 1000))

    def reference(self, job, count, scale):
        import os
        import signal

        from chain.sampling import make_generator

        if os.environ.get("SHARD_KILL") == f"{job.condition.name}:{job.iteration}":
            os.kill(os.getpid(), signal.SIGKILL)
        shape = job.train_images.shape[1:]
        return torch.stack([torch.rand(shape, generator=make_generator(s + 1)) ** scale for s in job.seeds[:count]])


def install_in_hub_cache(model, repo_id: str, tmp_path: Path, monkeypatch) -> None:
    """Save `model` in the Hugging Face cache layout (models--org--name/snapshots/<rev>/, refs/main) under
    tmp_path/hub, point the hub at that cache and work from tmp_path, where `repo_id` is not a folder."""
    import huggingface_hub.constants as hub_constants

    from chain.models import save_base_model

    cache = tmp_path / "hub"
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    save_base_model(model, repo / "snapshots" / rev)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
