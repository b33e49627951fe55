"""Image files in and out: decoding to float tensors, atomic PNG writes (listing folders: qtmio.images).

Images travel through the project as float32 torch tensors of shape (3, H, W), RGB, values in [0, 1].
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from chain.errors import ImageReadError
from qtmio.atomic import atomic_write_path


def decode_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file to an (H, W, 3) RGB array without rescaling: uint8 for 8-bit images, float32 in
    [0, 1] for 16-bit and floating-point grey images.

    The whole file is decoded here (so a truncated file fails now, not later). Grey, palette and alpha
    images are converted to RGB (alpha dropped). Raises ImageReadError naming the file and the reason.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
                grey = np.clip(np.asarray(img, dtype=np.float32) / 65535.0, 0.0, 1.0)
                array = np.repeat(grey[:, :, None], 3, axis=2)
            elif img.mode == "F":
                array = np.repeat(np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)[:, :, None], 3, axis=2)
            else:
                array = np.array(img if img.mode == "RGB" else img.convert("RGB"))  # writable
    except FileNotFoundError:
        raise ImageReadError(path, "no such file") from None
    except UnidentifiedImageError:
        raise ImageReadError(path, "not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageReadError(path, f"{type(exc).__name__}: {exc}") from None
    if array.ndim != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageReadError(path, f"unexpected decoded shape {array.shape}")
    return array


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """Decode an image file to a float32 tensor (3, H, W), RGB in [0, 1] (8-bit values / 255, 16-bit values
    / 65535; see decode_image). Raises ImageReadError naming the file and the reason."""
    array = decode_image(path)
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / np.float32(255.0)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def to_uint8_pil(image_chw: torch.Tensor) -> Image.Image:
    """A (3, H, W) or (1, H, W) float tensor in [0, 1] as an 8-bit PIL image (values clamped, rounded)."""
    if image_chw.ndim != 3 or image_chw.shape[0] not in (1, 3):
        raise ValueError(f"expected an image tensor of shape (3, H, W) or (1, H, W), got {tuple(image_chw.shape)}")
    array = image_chw.detach().to("cpu", torch.float32).clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
    array = array.permute(1, 2, 0).numpy()
    if array.shape[2] == 1:
        return Image.fromarray(array[:, :, 0], mode="L")
    return Image.fromarray(array, mode="RGB")


def save_image(image_chw: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write a float (3, H, W) tensor in [0, 1] as a PNG, atomically (temp file in the folder + os.replace)."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"save_image writes PNG files; {path} does not end in .png")
    pil = to_uint8_pil(image_chw)
    with atomic_write_path(path) as tmp:
        pil.save(tmp, format="PNG")
    return path
