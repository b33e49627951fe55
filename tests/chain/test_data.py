"""Captioned folders: both layouts, resize/crop, and one error listing every bad file."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from chain.data import DatasetError, load_captioned_folder, prepare_image
from chain.images import save_image


def _img(path, h=20, w=30, value=0.5):
    save_image(torch.full((3, h, w), value), path)


def test_kohya_folder(tmp_path):
    for i in range(3):
        _img(tmp_path / f"a{i}.png", value=0.1 * (i + 1))
        (tmp_path / f"a{i}.txt").write_text(f" caption {i}\n")
    ds = load_captioned_folder(tmp_path, resolution=16)
    assert ds.images.shape == (3, 3, 16, 16)
    assert ds.captions == ("caption 0", "caption 1", "caption 2")
    assert ds.names == ("a0.png", "a1.png", "a2.png")
    np.testing.assert_allclose(ds.images[1].numpy(), round(0.2 * 255) / 255, atol=1e-6)


def test_caption_extension_field(tmp_path):
    _img(tmp_path / "x.png")
    (tmp_path / "x.caption").write_text("kohya default")
    assert load_captioned_folder(tmp_path, resolution=8, caption_extension=".caption").captions == ("kohya default",)
    with pytest.raises(DatasetError, match="missing caption"):
        load_captioned_folder(tmp_path, resolution=8, caption_extension=".txt")


def test_all_problems_in_one_error(tmp_path):
    _img(tmp_path / "ok.png")
    (tmp_path / "ok.txt").write_text("fine")
    _img(tmp_path / "nocap.png")
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    (tmp_path / "broken.txt").write_text("x")
    _img(tmp_path / "dup.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "dup.jpg")
    (tmp_path / "dup.txt").write_text("d")
    with pytest.raises(DatasetError) as info:
        load_captioned_folder(tmp_path, resolution=8)
    msg = str(info.value)
    assert "nocap.txt" in msg and "broken.png" in msg and "duplicate name 'dup'" in msg
    assert "ok.png" not in msg


def test_metadata_jsonl(tmp_path):
    _img(tmp_path / "train" / "p.png")
    _img(tmp_path / "train" / "q.png")
    rows = [{"file_name": "train/p.png", "text": "pee"}, {"file_name": "train/q.png", "text": "queue"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = load_captioned_folder(tmp_path, resolution=8)
    assert ds.captions == ("pee", "queue")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "train/missing.png", "text": "x"}))
    with pytest.raises(DatasetError, match="missing.png"):
        load_captioned_folder(tmp_path, resolution=8)


def test_centre_crop_keeps_the_middle():
    # a 3 x 8 x 16 image whose columns are numbered; resolution 8 = no resize, crop columns 4..11
    image = torch.arange(16, dtype=torch.float32).repeat(3, 8, 1) / 16
    out = prepare_image(image, 8)
    np.testing.assert_allclose(out[0, 0].numpy(), np.arange(4, 12) / 16)


def test_resize_short_side():
    out = prepare_image(torch.rand(3, 40, 80), 20)
    assert out.shape == (3, 20, 20)
    out = prepare_image(torch.rand(3, 40, 80), 20, center_crop=False)
    assert out.shape == (3, 20, 20)
