"""chain.images: decoding and PNG writes, checked against PIL/numpy directly (listing: tests/qtmio)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from chain.errors import ImageReadError
from chain.images import load_image, save_image, to_uint8_pil


def _write(path, array, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def test_load_image_exact_values_and_layout(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    image = load_image(_write(tmp_path / "x.png", array))
    assert image.dtype == torch.float32 and image.shape == (3, 5, 7)
    np.testing.assert_array_equal(image.numpy(), array.transpose(2, 0, 1).astype(np.float32) / 255.0)


def test_load_image_grey_alpha_and_16_bit(tmp_path):
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    image = load_image(_write(tmp_path / "g.png", grey))
    for c in range(3):
        np.testing.assert_array_equal(image[c].numpy(), grey / np.float32(255.0))
    rgba = np.concatenate([np.full((2, 2, 3), 100, np.uint8), np.zeros((2, 2, 1), np.uint8)], axis=2)
    image = load_image(_write(tmp_path / "a.png", rgba))
    np.testing.assert_array_equal(image.numpy(), np.full((3, 2, 2), np.float32(100 / 255.0)))
    deep = (np.arange(6, dtype=np.uint16).reshape(2, 3) * 10000)
    Image.fromarray(deep).save(tmp_path / "d.png")
    image = load_image(tmp_path / "d.png")
    np.testing.assert_allclose(image[1].numpy(), deep / 65535.0, rtol=1e-6)


def test_load_image_errors_name_the_file(tmp_path):
    array = np.random.default_rng(1).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    full = _write(tmp_path / "full.png", array).read_bytes()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(full[: len(full) // 2])
    with pytest.raises(ImageReadError, match="truncated.png") as info:
        load_image(truncated)
    assert info.value.path == truncated
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not a jpeg")
    with pytest.raises(ImageReadError, match="garbage.jpg.*not a recognised image format"):
        load_image(garbage)
    with pytest.raises(ImageReadError, match="no such file"):
        load_image(tmp_path / "absent.png")
    assert issubclass(ImageReadError, ValueError)


def test_save_image_round_trip_and_atomic(tmp_path):
    rng = np.random.default_rng(2)
    levels = rng.integers(0, 256, size=(3, 6, 5))
    tensor = torch.tensor(levels / 255.0, dtype=torch.float32)
    out = save_image(tensor, tmp_path / "sub" / "img.png")
    assert out == tmp_path / "sub" / "img.png"
    np.testing.assert_array_equal(np.asarray(Image.open(out)), levels.transpose(1, 2, 0).astype(np.uint8))
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["img.png"]  # no temp file left behind
    np.testing.assert_array_equal(load_image(out).numpy(), (levels / 255.0).astype(np.float32))
    with pytest.raises(ValueError, match="PNG"):
        save_image(tensor, tmp_path / "img.jpg")


def test_to_uint8_pil_clamps_and_rounds():
    tensor = torch.tensor([[[-0.5, 0.5 / 255, 1.6 / 255, 2.0]]]).expand(3, 1, 4)
    pil = to_uint8_pil(tensor)
    assert pil.mode == "RGB" and pil.size == (4, 1)
    np.testing.assert_array_equal(np.asarray(pil)[0, :, 0], [0, 0, 2, 255])  # round half to even at 0.5
    with pytest.raises(ValueError, match="shape"):
        to_uint8_pil(torch.zeros(4, 2, 2))
