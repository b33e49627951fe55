"""Image features for the perceptual metrics (Section 3.1, Appendix E.5).

The reference feature is dgm-eval's FD-DINOv2 feature: DINOv2 ViT-L/14, CLS token after the final layer norm
(transformers `Dinov2Model(...).pooler_output`, 1024-d for `facebook/dinov2-large`), computed on the whole
image resized to 224 x 224 with bicubic interpolation (no crop), scaled to [0, 1] and normalised with the
ImageNet mean and std. dgm-eval resizes 8-bit PIL images with PIL's bicubic filter; here the resize runs in
torch (`interpolate(mode="bicubic", antialias=True)`, which uses PIL's kernel, a = -0.5, widened when
shrinking) on float images clamped back to [0, 1]: it differs from PIL only by PIL's rounding to 8 bits.

Weights are never downloaded: `Dinov2Encoder.from_pretrained` reads a local folder or the Hugging Face cache
with `local_files_only=True`. Any object with `feature_dim`, `name` and `__call__(images) -> (B, D)`
(`FeatureEncoder`) can stand in, e.g. the toy world's encoder or a tiny random model in tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch.nn import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@runtime_checkable
class FeatureEncoder(Protocol):
    """Maps images (B, 3, H, W) in [0, 1] to features (B, feature_dim)."""

    feature_dim: int
    name: str

    def __call__(self, images_bchw_01: torch.Tensor) -> torch.Tensor: ...


def resize_bicubic(images_bchw: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic resize with PIL's kernel (a = -0.5, antialiased when shrinking), clamped to [0, 1]."""
    resized = F.interpolate(images_bchw, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return resized.clamp(0.0, 1.0)


def dgm_eval_preprocess(images_bchw_01: torch.Tensor, image_size: int = 224) -> torch.Tensor:
    """dgm-eval's DINOv2 input: whole image to image_size x image_size bicubic, ImageNet mean/std."""
    if images_bchw_01.ndim != 4 or images_bchw_01.shape[1] != 3:
        raise ValueError(f"expected RGB images of shape (B, 3, H, W) in [0, 1], got {tuple(images_bchw_01.shape)}")
    x = resize_bicubic(images_bchw_01.to(torch.float32), image_size, image_size)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class Dinov2Encoder:
    """DINOv2 features as dgm-eval computes them: `pooler_output` of a transformers `Dinov2Model`.

    model: a Dinov2Model (any size; tests use a tiny random one). The input is moved to the model's device
    and dtype; the features come back as float32 on that device.
    """

    def __init__(self, model, image_size: int = 224):
        self.model = model.eval()
        self.image_size = int(image_size)
        self.feature_dim = int(model.config.hidden_size)
        source = getattr(model.config, "_name_or_path", "") or "random"
        self.name = f"dinov2:{source}"

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str = "facebook/dinov2-large",
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        image_size: int = 224,
    ) -> Dinov2Encoder:
        """Load from a local folder or the Hugging Face cache only (local_files_only=True, no download)."""
        from transformers import Dinov2Model

        try:
            model = Dinov2Model.from_pretrained(name_or_path, local_files_only=True, dtype=dtype)
        except OSError as exc:
            raise FileNotFoundError(
                f"DINOv2 weights '{name_or_path}' are not in a local folder or the Hugging Face cache; nothing is "
                f"downloaded here. Fetch them once (e.g. `hf download {name_or_path}`) or pass the path of a "
                f"folder holding config.json and the weights. ({exc.__class__.__name__}: {exc})"
            ) from None
        return cls(model.to(device), image_size=image_size)

    def __call__(self, images_bchw_01: torch.Tensor) -> torch.Tensor:
        param = next(self.model.parameters())
        pixels = dgm_eval_preprocess(images_bchw_01.to(param.device), self.image_size).to(param.dtype)
        with torch.inference_mode():
            output = self.model(pixel_values=pixels)
        return output.pooler_output.float()


def _as_batches(images, batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
        for start in range(0, images.shape[0], batch_size):
            yield images[start : start + batch_size]
    else:
        for batch in images:
            if batch.ndim == 3:
                batch = batch[None]
            for start in range(0, batch.shape[0], batch_size):
                yield batch[start : start + batch_size]


def extract_features(
    encoder: FeatureEncoder,
    images: torch.Tensor | Iterable[torch.Tensor],
    batch_size: int = 32,
    *,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """(N, D) float64 features of images (an (N, 3, H, W) tensor, or an iterable of batches or single
    images), computed `batch_size` images at a time; `on_batch(n)` is called after each batch of n images."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rows: list[np.ndarray] = []
    for batch in _as_batches(images, batch_size):
        with torch.inference_mode():
            features = encoder(batch)
        rows.append(features.detach().to("cpu", torch.float64).numpy())
        if on_batch is not None:
            on_batch(batch.shape[0])
    if not rows:
        return np.zeros((0, int(encoder.feature_dim)), dtype=np.float64)
    return np.concatenate(rows, axis=0)


def clip_preprocess(images_bchw_01: torch.Tensor, image_size: int = 224) -> torch.Tensor:
    """CLIP's input (CLIPImageProcessor defaults): short side to image_size bicubic, centre crop, CLIP
    mean/std. The crop offset is (H' - image_size) // 2, as in transformers' center_crop."""
    height, width = images_bchw_01.shape[-2:]
    scale = image_size / min(height, width)
    new_h = image_size if height <= width else int(height * scale)
    new_w = image_size if width <= height else int(width * scale)
    x = resize_bicubic(images_bchw_01.to(torch.float32), new_h, new_w)
    top = (new_h - image_size) // 2
    left = (new_w - image_size) // 2
    x = x[..., top : top + image_size, left : left + image_size]
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
