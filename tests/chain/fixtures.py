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
