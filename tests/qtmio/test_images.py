"""qtmio.images: the image files of a folder."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from qtmio.images import IMAGE_SUFFIXES, list_images


def _write(path, array, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def test_list_images_recursive_sorted_and_filtered(tmp_path):
    rgb = np.zeros((4, 4, 3), np.uint8)
    _write(tmp_path / "b.png", rgb)
    _write(tmp_path / "a" / "z.JPG", rgb)
    _write(tmp_path / "a" / "y.webp", rgb)
    _write(tmp_path / "c" / "d" / "x.jpeg", rgb)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "a" / "y.txt").write_text("caption")
    _write(tmp_path / ".hidden" / "h.png", rgb)
    _write(tmp_path / ".h.png", rgb)
    found = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert found == ["a/y.webp", "a/z.JPG", "b.png", "c/d/x.jpeg"]
    assert set(IMAGE_SUFFIXES) == {".png", ".jpg", ".jpeg", ".webp"}


def test_list_images_missing_folder(tmp_path):
    with pytest.raises(NotADirectoryError, match="missing"):
        list_images(tmp_path / "missing")
