"""The toy dataset generator: determinism, captions that describe the drawn pixels, a phenotype that varies.

The checks read the written PNG files and parse the captions; the references are written from the
definitions (named colour values, shape fill ratios, DESIGN.md's phenotype in plain numpy), not from the
generator's own helpers.
"""

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chain.toy.dataset import COLOURS, DISTRIBUTIONS, make_toy_dataset, sample_scene, render_scene, caption_for
import dataclasses

CAPTION = re.compile(
    r"^an? (?P<colour>\w+) (?P<shape>\w+)(?: with (?P<texture>[\w ]+?))? on an? (?P<background>\w+) background"
    r"(?: with (?P<bg_texture>[\w ]+))?$"
)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_same_seed_same_bytes_different_seed_differs(tmp_path):
    a = make_toy_dataset(tmp_path / "a", num_images=12, seed=3)
    make_toy_dataset(tmp_path / "b", num_images=12, seed=3)
    make_toy_dataset(tmp_path / "c", num_images=12, seed=4)
    fa, fb, fc = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert len(a) == 12 and len(fa) == 24  # one .png and one .txt per image (kohya convention)
    assert all((p.with_suffix(".txt")).is_file() for p in a)
    assert fa == fb
    assert fa.keys() == fc.keys()
    assert sum(fa[k] != fc[k] for k in fa if k.endswith(".png")) >= 10


def test_resolution_and_distribution_arguments(tmp_path):
    paths = make_toy_dataset(tmp_path, num_images=3, seed=0, resolution=48, distribution="pretrain")
    assert Image.open(paths[0]).size == (48, 48)
    assert Image.open(paths[0]).mode == "RGB"
    with pytest.raises(ValueError, match="distribution"):
        make_toy_dataset(tmp_path, num_images=1, seed=0, distribution="imagenet")


def _uint8(name: str) -> np.ndarray:
    return np.round(np.asarray(COLOURS[name]) * 255).astype(int)


def _count(pixels: np.ndarray, name: str) -> int:
    """Pixels exactly of the named colour (up to PNG rounding)."""
    return int((np.abs(pixels.astype(int) - _uint8(name)).max(axis=-1) <= 1).sum())


@pytest.mark.parametrize("distribution", ["d0", "pretrain"])
def test_captions_name_the_drawn_colours(tmp_path, distribution):
    """The background colour is the commonest named colour on the 1-pixel border (d0: the shape never reaches
    it), and the caption's shape colour is the commonest named colour of the rest of the image."""
    paths = make_toy_dataset(tmp_path, num_images=40, seed=11, distribution=distribution)
    checked = 0
    for path in paths:
        m = CAPTION.match(path.with_suffix(".txt").read_text().strip())
        assert m, path.with_suffix(".txt").read_text()
        pixels = np.asarray(Image.open(path))
        border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
        inner = pixels[1:-1, 1:-1].reshape(-1, 3)
        counts_inner = {c: _count(inner, c) for c in COLOURS}
        assert m["colour"] != m["background"]
        fg = max((c for c in COLOURS if c != m["background"]), key=counts_inner.get)
        assert fg == m["colour"], (path, m.groupdict(), counts_inner)
        if distribution == "d0":
            counts_border = {c: _count(border, c) for c in COLOURS}
            assert max(counts_border, key=counts_border.get) == m["background"], (path, counts_border)
        checked += 1
    assert checked == 40


def test_d0_is_a_narrow_slice_of_pretrain(tmp_path):
    d0, pre = DISTRIBUTIONS["d0"], DISTRIBUTIONS["pretrain"]
    assert set(d0.shapes) < set(pre.shapes) and set(d0.colours) < set(pre.colours)
    assert set(d0.shape_textures) < set(pre.shape_textures)
    words = {w for p in make_toy_dataset(tmp_path, num_images=48, seed=0) for w in p.with_suffix(".txt").read_text().split()}
    assert words.isdisjoint({"diamond", "cross", "ring", "orange", "purple", "pink", "cyan"})


@pytest.mark.parametrize("shape,lo,hi", [("square", 0.9, 1.0), ("circle", 0.7, 0.86), ("triangle", 0.4, 0.6)])
def test_shapes_fill_their_bounding_box_as_named(shape, lo, hi):
    """Plain shapes: fraction of the bounding box covered, pi/4 for a circle, 1 for a square, 1/2 for a triangle
    (rendered at 128 pixels so that edges matter little)."""
    rng = np.random.default_rng(5)
    for _ in range(5):
        scene = sample_scene(rng, "d0")
        scene = dataclasses.replace(scene, shape=shape, angle=0.0, shape_texture="plain", background_texture="plain")
        img = render_scene(scene, resolution=128)
        fg, bg = np.asarray(COLOURS[scene.colour]), np.asarray(COLOURS[scene.background])
        mask = np.linalg.norm(img - fg, axis=-1) < np.linalg.norm(img - bg, axis=-1)
        ys, xs = np.nonzero(mask)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        assert lo <= mask.sum() / box <= hi, (shape, mask.sum() / box)
        assert caption_for(scene).startswith(f"a{'n' if scene.colour[0] in 'aeiou' else ''} {scene.colour} {shape} on ")


def _hf_power(image_hwc: np.ndarray, tau: float) -> float:
    """DESIGN.md "The phenotype", written from the definition: one global mean and RMS, orthonormal DFT per
    channel, power averaged over channels / (H W), summed where the radius exceeds tau."""
    x = image_hwc - image_hwc.mean()
    x = x / np.sqrt((x**2).mean())
    power = (np.abs(np.fft.fft2(x, axes=(0, 1), norm="ortho")) ** 2).mean(-1) / (x.shape[0] * x.shape[1])
    fy, fx = np.fft.fftfreq(x.shape[0]), np.fft.fftfreq(x.shape[1])
    radius = np.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    return float(power[radius > tau].sum())


def test_phenotype_varies_widely_across_d0(tmp_path):
    """hf_power (tau = 0.02 as in DESIGN.md, and tau = 0.16, the same 5.1 cycles per image as 0.02 at 256
    pixels) spreads over a wide range; with chain.spectra present, its measurement agrees with the definition."""
    paths = make_toy_dataset(tmp_path, num_images=48, seed=0)
    images = np.stack([np.asarray(Image.open(p), dtype=np.float64) / 255 for p in paths])
    for tau, min_sd, min_range in ((0.02, 0.08, 0.4), (0.16, 0.1, 0.5)):
        s = np.array([_hf_power(im, tau) for im in images])
        assert s.std() > min_sd and s.max() - s.min() > min_range, (tau, s.std(), s.min(), s.max())
    spectra = pytest.importorskip("chain.spectra")
    import torch

    measured = spectra.measure_spectra(torch.from_numpy(images.transpose(0, 3, 1, 2)), dtype=torch.float64)
    expected = np.array([_hf_power(im, 0.02) for im in images])
    np.testing.assert_allclose(measured.hf_power.cpu().numpy(), expected, rtol=1e-9, atol=1e-12)
