"""The image files of a folder (decoding them needs torch or PIL and lives in chain.images)."""

from __future__ import annotations

import os
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def list_images(root: str | os.PathLike) -> list[Path]:
    """Every image file under `root` (recursively), sorted by path relative to `root`.

    An image file is one whose suffix, in any case, is in IMAGE_SUFFIXES. Hidden files and folders (names
    starting with '.': temporary files of interrupted writes, macOS AppleDouble files) are skipped. Raises
    NotADirectoryError when `root` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a folder")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                found.append(Path(dirpath) / name)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())
