"""The inputs of a run: where D_0 lives (a user's folder, or the embedded toy world written into the run
folder), and the fingerprint of D_0's content that a resumed run checks (no torch needed)."""

from __future__ import annotations

from pathlib import Path

from chain.config import ChainConfig
from qtmio.contract import METRICS_FILE

TOY_DATA_FOLDER = "data"


def data_folder(config: ChainConfig, out_dir: str | Path) -> Path:
    """The D_0 folder of a run: data.path, or <run folder>/data for data.source = "toy"."""
    if config.data.source == "toy":
        return Path(out_dir) / TOY_DATA_FOLDER
    return Path(config.data.path)


def prepare_data(config: ChainConfig, out_dir: str | Path) -> Path:
    """The D_0 folder, written first for data.source = "toy": `toy_images` procedural captioned images of
    the toy world's D_0 distribution (chain.toy.make_toy_dataset) at data.resolution, a pure function of
    `toy_seed`. They are (re)written unless exactly the expected image/caption pairs are there (a run killed
    while writing them leaves a partial folder; rewriting gives the same bytes)."""
    folder = data_folder(config, out_dir)
    if config.data.source != "toy":
        return folder
    from chain.toy.dataset import make_toy_dataset

    expected = [f"toy_{i:04d}" for i in range(config.data.toy_images)]
    present = sorted(p.stem for p in folder.glob("*.png")) if folder.is_dir() else []
    if present != expected or not all((folder / f"{s}.txt").is_file() for s in expected):
        make_toy_dataset(folder, num_images=config.data.toy_images, seed=config.data.toy_seed,
                         resolution=config.data.resolution, distribution="d0")
    return folder


# ------------------------------------------------------------------------------------------------ fingerprint

INPUTS_NAME = "inputs.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def fingerprint_folder(folder: str | Path) -> dict[str, str]:
    """SHA-256 of every file under `folder` (relative POSIX path -> hex digest): image bytes, caption files
    and metadata.jsonl alike. Hidden files (names starting with ".") are left out."""
    import hashlib

    folder = Path(folder)
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        out[rel.as_posix()] = h.hexdigest()
    return out


def _kind(name: str) -> str:
    return "image" if Path(name).suffix.lower() in IMAGE_SUFFIXES else "caption"


def describe_changes(before: dict[str, str], after: dict[str, str], *, limit: int = 5) -> list[str]:
    """What changed between two fingerprints, e.g. ["image a.png changed", "caption b.txt added"]."""

    def listed(names: list[str], what: str) -> list[str]:
        items = [f"{_kind(n)} {n} {what}" for n in names[:limit]]
        if len(names) > limit:
            items.append(f"and {len(names) - limit} more {what}")
        return items

    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(n for n in set(before) & set(after) if before[n] != after[n])
    return listed(changed, "changed") + listed(added, "added") + listed(removed, "removed")


def check_or_record_inputs(config: ChainConfig, data_path: Path, out_dir: str | Path) -> tuple[str | None, str | None]:
    """Fingerprint D_0 into <run folder>/inputs.json, or check it against the one recorded there when the
    run has produced results (a resume). Returns (problem, note): a problem when D_0 changed under the run
    (naming what changed; the run folder named as `{out_dir}`, as in chain.resume), a note when an older
    run folder without a fingerprint got one now."""
    import json

    from qtmio.atomic import write_text_atomic

    out_dir = Path(out_dir)
    path = out_dir / INPUTS_NAME
    files = fingerprint_folder(data_path)
    resumed = (out_dir / METRICS_FILE).exists()
    if resumed and path.is_file():
        recorded = json.loads(path.read_text())["data"]["files"]
        changes = describe_changes(recorded, files)
        if changes:
            return (f"the original images changed since this run started (D_0, {data_path}): "
                    f"{'; '.join(changes)}. Restore them, or use a new {{out_dir}} for the new data"), None
        return None, None
    doc = {"data": {"folder": str(data_path), "source": config.data.source, "files": files}}
    write_text_atomic(path, json.dumps(doc, indent=1, sort_keys=True) + "\n")
    if resumed:
        return None, (f"{path}: this run folder had no fingerprint of D_0; recorded the current content of "
                      f"{data_path} ({len(files)} files), which later resumes check")
    return None, None


def upscale_note(root: str | Path, names: tuple[str, ...], resolution: int) -> str | None:
    """A note when images of D_0 are smaller than data.resolution (they are upscaled, which invents no
    detail but changes the phenotype), naming how many and the smallest; None when none is."""
    from PIL import Image

    small = []
    for name in names:
        with Image.open(Path(root) / name) as im:
            w, h = im.size
        if min(w, h) < resolution:
            small.append((min(w, h), w, h, name))
    if not small:
        return None
    side, w, h, name = min(small)
    return (f"{len(small)} of {len(names)} images of D_0 are smaller than data.resolution = {resolution} and are "
            f"upscaled (smallest: {name}, {w} x {h}); lower data.resolution to measure them at their own size")
