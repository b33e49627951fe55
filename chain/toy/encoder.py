"""The toy world's feature encoder: a small CNN trained to recognise shape, colours and textures.

It plays DINOv2's part in the toy world (chain/features.py FeatureEncoder protocol): features are the
penultimate layer (after global average pooling and one fully connected layer with ReLU), so Frechet
distance, recall and SFD are computed on a representation that knows what the toy images show.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from torch import nn

from chain.toy.dataset import COLOURS, DISTRIBUTIONS, SHAPES, TEXTURES

__all__ = ["LABELS", "ToyEncoderNet", "ToyFeatureEncoder", "load_toy_encoder", "toy_encoder_dir", "scene_labels"]

#: Classification heads and their class names (order = logit index).
LABELS: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": DISTRIBUTIONS["pretrain"].colours,
    "background": tuple(COLOURS),
    "shape_texture": tuple(TEXTURES),
    "background_texture": tuple(TEXTURES),
}


def toy_encoder_dir() -> Path:
    return Path(__file__).resolve().parent / "assets" / "encoder"


def scene_labels(scenes) -> dict[str, torch.Tensor]:
    """Integer class targets of each head for a list of chain.toy.dataset.Scene."""
    return {
        head: torch.tensor([names.index(getattr(s, head)) for s in scenes]) for head, names in LABELS.items()
    }


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
    )


class ToyEncoderNet(nn.Module):
    """CNN on 32 x 32 RGB in [0, 1]: three conv blocks (32, 64, 128 channels, 2x2 max-pool between),
    global average pool, FC to ``feature_dim`` with ReLU (the features), one linear head per label."""

    def __init__(self, feature_dim: int = 128, resolution: int = 32):
        super().__init__()
        self.resolution = resolution
        self.body = nn.Sequential(
            _block(3, 32), nn.MaxPool2d(2), _block(32, 64), nn.MaxPool2d(2), _block(64, 128),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, feature_dim), nn.ReLU(inplace=True),
        )
        self.heads = nn.ModuleDict({k: nn.Linear(feature_dim, len(v)) for k, v in LABELS.items()})

    def features(self, images_bchw_01: torch.Tensor) -> torch.Tensor:
        x = images_bchw_01
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = nn.functional.interpolate(x, size=(self.resolution, self.resolution), mode="area")
        return self.body(x * 2.0 - 1.0)

    def forward(self, images_bchw_01: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(images_bchw_01)
        return {k: h(f) for k, h in self.heads.items()}


@dataclasses.dataclass
class ToyFeatureEncoder:
    """FeatureEncoder (chain/features.py) for the toy world: ``__call__`` maps (B, 3, H, W) images in [0, 1]
    to (B, feature_dim) penultimate-layer features. Images of another size are area-resized to 32 x 32."""

    net: ToyEncoderNet
    name: str = "toy-cnn"

    @property
    def feature_dim(self) -> int:
        return self.net.body[-2].out_features

    @torch.no_grad()
    def __call__(self, images_bchw_01: torch.Tensor) -> torch.Tensor:
        self.net.eval()
        device = next(self.net.parameters()).device
        return self.net.features(images_bchw_01.to(device=device, dtype=torch.float32))

    @torch.no_grad()
    def predict(self, images_bchw_01: torch.Tensor) -> dict[str, list[str]]:
        """Most likely class name of every head for each image."""
        self.net.eval()
        device = next(self.net.parameters()).device
        logits = self.net(images_bchw_01.to(device=device, dtype=torch.float32))
        return {k: [LABELS[k][i] for i in v.argmax(1).tolist()] for k, v in logits.items()}


def save_toy_encoder(net: ToyEncoderNet, out_dir: str | os.PathLike, meta: dict | None = None) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (architecture, label names, training metadata)."""
    from safetensors.torch import save_file

    from qtmio.atomic import write_bytes_atomic, write_text_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".model.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
    write_bytes_atomic(out / "model.safetensors", tmp.read_bytes())
    tmp.unlink()
    config = {
        "feature_dim": net.body[-2].out_features,
        "resolution": net.resolution,
        "labels": {k: list(v) for k, v in LABELS.items()},
        **(meta or {}),
    }
    write_text_atomic(out / "config.json", json.dumps(config, indent=2) + "\n")
    return out


def load_toy_encoder(folder: str | os.PathLike | None = None, *, device: str | torch.device = "cpu") -> ToyFeatureEncoder:
    """Load the toy encoder (default: the committed one under chain/toy/assets/encoder)."""
    from safetensors.torch import load_file

    folder = Path(folder) if folder is not None else toy_encoder_dir()
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(
            f"{cfg_path} is missing: {folder} is not a toy encoder folder; "
            "rebuild it with `python -m chain.toy.train_encoder` (see chain/toy/assets/README.md)"
        )
    cfg = json.loads(cfg_path.read_text())
    stored = {k: tuple(v) for k, v in cfg["labels"].items()}
    if stored != LABELS:
        raise ValueError(f"{cfg_path}: its label names differ from chain.toy.encoder.LABELS; retrain the encoder")
    net = ToyEncoderNet(feature_dim=cfg["feature_dim"], resolution=cfg["resolution"])
    net.load_state_dict(load_file(str(folder / "model.safetensors")))
    return ToyFeatureEncoder(net.to(device).eval())
