"""Captioned image folders: D_0 of the chain.

Two layouts are read:
- kohya: every image has a same-name caption file beside it (`cat.png` + `cat.txt`; the extension is
  `data.caption_extension`, ".txt" for the paper's folders, kohya's default ".caption");
- HF imagefolder: a `metadata.jsonl` at the root with one JSON object per line holding `file_name` and a
  caption column (`text`, or `caption`).

Every problem (missing captions, unreadable images, duplicate names, metadata rows without a file) is
collected and raised at once, as one DatasetError listing the files, before any training starts.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from chain.errors import DatasetError, ImageReadError
from chain.images import load_image
from qtmio.images import list_images

CAPTION_COLUMNS = ("text", "caption")


@dataclasses.dataclass(frozen=True)
class CaptionedDataset:
    """Images (N, 3, R, R) float32 in [0, 1] at the training resolution, their captions and names."""

    images: torch.Tensor
    captions: tuple[str, ...]
    names: tuple[str, ...]
    root: Path

    def __len__(self) -> int:
        return len(self.captions)


def prepare_image(image: torch.Tensor, resolution: int, *, center_crop: bool = True) -> torch.Tensor:
    """Resize so the short side is `resolution` (bicubic, antialiased, clamped to [0, 1]), then crop the
    centre `resolution` x `resolution` (kohya without buckets: resize + centre crop). With
    center_crop=False the whole image is resized to a square (aspect ratio not kept)."""
    _, h, w = image.shape
    if center_crop:
        scale = resolution / min(h, w)
        nh, nw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
    else:
        nh, nw = resolution, resolution
    if (nh, nw) != (h, w):
        image = F.interpolate(image[None], size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)[0]
    top, left = (nh - resolution) // 2, (nw - resolution) // 2
    return image[:, top : top + resolution, left : left + resolution].clamp(0.0, 1.0).contiguous()


def _scan_captions(root: Path, extension: str) -> tuple[list[Path], list[str], list[str]]:
    images = list_images(root)
    problems: list[str] = []
    captions: list[str] = []
    by_name: dict[str, list[Path]] = {}
    for path in images:
        rel = path.relative_to(root)
        by_name.setdefault(rel.with_suffix("").as_posix(), []).append(path)
    for stem, paths in sorted(by_name.items()):
        if len(paths) > 1:
            problems.append(f"duplicate name {stem!r}: {', '.join(str(p) for p in paths)} (one caption cannot serve both)")
    for path in images:
        caption_file = path.with_suffix(extension)
        if not caption_file.is_file():
            problems.append(f"missing caption {caption_file} for {path}")
            captions.append("")
            continue
        try:
            captions.append(caption_file.read_text(encoding="utf-8").strip())
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"unreadable caption {caption_file}: {exc}")
            captions.append("")
    return images, captions, problems


def _scan_metadata(root: Path) -> tuple[list[Path], list[str], list[str]]:
    meta = root / "metadata.jsonl"
    images: list[Path] = []
    captions: list[str] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{meta}:{lineno}: not JSON ({exc.msg})")
            continue
        name = row.get("file_name")
        column = next((c for c in CAPTION_COLUMNS if c in row), None)
        if not isinstance(name, str) or column is None:
            problems.append(f"{meta}:{lineno}: needs 'file_name' and one of {CAPTION_COLUMNS}")
            continue
        if name in seen:
            problems.append(f"{meta}:{lineno}: duplicate file_name {name!r} (first on line {seen[name]})")
            continue
        seen[name] = lineno
        path = root / name
        if not path.is_file():
            problems.append(f"{meta}:{lineno}: file {path} does not exist")
            continue
        images.append(path)
        captions.append(str(row[column]).strip())
    return images, captions, problems


def load_captioned_folder(
    root: str | Path,
    *,
    resolution: int,
    caption_extension: str = ".txt",
    format: str = "auto",
    center_crop: bool = True,
    max_images: int = 0,
) -> CaptionedDataset:
    """Read, check and prepare D_0. `format` "auto" uses metadata.jsonl when the folder has one.

    Raises DatasetError naming every problem file (all of them, not the first), before anything else runs.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist (data.path)")
    if not caption_extension.startswith("."):
        caption_extension = "." + caption_extension
    use_metadata = format == "metadata" or (format == "auto" and (root / "metadata.jsonl").is_file())
    if use_metadata:
        if not (root / "metadata.jsonl").is_file():
            raise DatasetError(f"{root}: data.format is 'metadata' but there is no metadata.jsonl")
        paths, captions, problems = _scan_metadata(root)
    else:
        paths, captions, problems = _scan_captions(root, caption_extension)
    if max_images:
        paths, captions = paths[:max_images], captions[:max_images]
    tensors = []
    for path in paths:
        try:
            tensors.append(prepare_image(load_image(path), resolution, center_crop=center_crop))
        except ImageReadError as exc:
            problems.append(str(exc))
    if not paths and not problems:
        problems.append(f"no images ({', '.join(('.png', '.jpg', '.jpeg', '.webp'))}) found")
    if problems:
        listing = "\n  ".join(problems)
        raise DatasetError(f"dataset {root} has {len(problems)} problem(s):\n  {listing}")
    names = tuple(p.relative_to(root).as_posix() for p in paths)
    return CaptionedDataset(torch.stack(tensors), tuple(captions), names, root)
