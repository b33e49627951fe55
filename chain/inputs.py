"""The inputs of a run: where D_0 lives (a user's folder, or the embedded toy world written into the run
folder), and the fingerprint of D_0's content that a resumed run checks (no torch needed)."""

from __future__ import annotations

from pathlib import Path

from chain.config import ChainConfig

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
