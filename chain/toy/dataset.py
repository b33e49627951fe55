"""Procedural captioned images of the embedded toy world (D_0 of the Chain of Diffusion).

Each image shows one shape of one named colour, optionally textured (stripes, checks or dots at several
spatial periods), on a background of another named colour that may itself be textured. The caption names
what is drawn, e.g. ``"a red circle with fine vertical stripes on a blue background"``. Textures at periods
from 2 to 8 pixels make the high-frequency power of the phenotype (docs/phenotype.md) vary widely
from image to image.

Two distributions share one renderer:

- ``"d0"``: the finetuning set, a narrow slice (3 shapes, 4 foreground colours, 4 background colours, the
  shape near the centre and large);
- ``"pretrain"``: the broader distribution the base model M_0 learns first (6 shapes, 8 foreground colours,
  11 background colours, free position and size, more textures).

Everything is a pure function of a ``numpy.random.Generator``; no global state. A scene is sampled first
(:func:`sample_scene`), then rendered (:func:`render_scene`) and captioned (:func:`caption_for`), so tests can
check the caption against the drawn pixels.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from qtmio.atomic import write_bytes_atomic

__all__ = [
    "COLOURS",
    "DISTRIBUTIONS",
    "SHAPES",
    "TEXTURES",
    "Distribution",
    "Scene",
    "caption_for",
    "iter_toy_batches",
    "make_toy_dataset",
    "render_scene",
    "sample_scene",
    "sample_toy_images",
]

#: Named colours, linear RGB in [0, 1].
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.10, 0.10),
    "green": (0.10, 0.68, 0.20),
    "blue": (0.12, 0.25, 0.90),
    "yellow": (0.96, 0.86, 0.10),
    "orange": (0.98, 0.50, 0.05),
    "purple": (0.55, 0.15, 0.75),
    "pink": (1.00, 0.50, 0.75),
    "cyan": (0.10, 0.85, 0.90),
    "white": (0.96, 0.96, 0.96),
    "black": (0.06, 0.06, 0.06),
    "gray": (0.50, 0.50, 0.50),
    "brown": (0.50, 0.30, 0.10),
}

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")


@dataclasses.dataclass(frozen=True)
class Texture:
    """A periodic modulation of a region: ``kind`` in plain/stripes/checks/dots, ``period`` in pixels at the
    nominal 32-pixel resolution (scaled with the resolution), ``orientation`` for stripes."""

    name: str  # phrase used in the caption ("" for plain)
    kind: str
    period: float = 0.0
    orientation: str = ""


def _stripes(size: str, period: float, orientation: str) -> Texture:
    return Texture(f"{size} {orientation} stripes", "stripes", period, orientation)


TEXTURES: dict[str, Texture] = {
    t.name or "plain": t
    for t in (
        Texture("", "plain"),
        _stripes("fine", 2, "vertical"),
        _stripes("fine", 2, "horizontal"),
        _stripes("medium", 4, "vertical"),
        _stripes("medium", 4, "horizontal"),
        _stripes("medium", 4, "diagonal"),
        _stripes("coarse", 8, "vertical"),
        _stripes("coarse", 8, "horizontal"),
        _stripes("coarse", 8, "diagonal"),
        Texture("fine checks", "checks", 2),
        Texture("coarse checks", "checks", 8),
        Texture("small dots", "dots", 4),
        Texture("large dots", "dots", 8),
    )
}


@dataclasses.dataclass(frozen=True)
class Distribution:
    """Support and sampling ranges of one toy distribution (sizes and offsets as fractions of the side)."""

    name: str
    shapes: tuple[str, ...]
    colours: tuple[str, ...]
    backgrounds: tuple[str, ...]
    shape_textures: tuple[str, ...]
    background_textures: tuple[str, ...]
    p_shape_texture: float
    p_background_texture: float
    size_range: tuple[float, float]  # shape radius / side
    max_offset: float  # |centre - 0.5| / side


DISTRIBUTIONS: dict[str, Distribution] = {
    "d0": Distribution(
        name="d0",
        shapes=("circle", "square", "triangle"),
        colours=("red", "green", "blue", "yellow"),
        backgrounds=("white", "black", "gray", "blue"),
        shape_textures=(
            "fine vertical stripes",
            "medium horizontal stripes",
            "coarse vertical stripes",
            "fine checks",
        ),
        background_textures=("fine horizontal stripes", "medium vertical stripes", "small dots"),
        p_shape_texture=0.5,
        p_background_texture=0.4,
        size_range=(0.30, 0.38),
        max_offset=0.06,
    ),
    "pretrain": Distribution(
        name="pretrain",
        shapes=SHAPES,
        colours=("red", "green", "blue", "yellow", "orange", "purple", "pink", "cyan"),
        backgrounds=tuple(COLOURS),
        shape_textures=tuple(k for k in TEXTURES if k != "plain"),
        background_textures=tuple(k for k in TEXTURES if k != "plain"),
        p_shape_texture=0.5,
        p_background_texture=0.4,
        size_range=(0.22, 0.40),
        max_offset=0.16,
    ),
}


@dataclasses.dataclass(frozen=True)
class Scene:
    """What one image shows. Positions and sizes are fractions of the image side."""

    shape: str
    colour: str
    background: str
    shape_texture: str  # key of TEXTURES
    background_texture: str  # key of TEXTURES
    centre: tuple[float, float]  # (x, y)
    radius: float
    angle: float  # rotation of the shape in radians
    phase: tuple[int, int]  # integer texture offsets in nominal pixels


def _distribution(name: str) -> Distribution:
    try:
        return DISTRIBUTIONS[name]
    except KeyError:
        raise ValueError(
            f"distribution={name!r} is unknown; choose one of {sorted(DISTRIBUTIONS)}"
        ) from None


def sample_scene(rng: np.random.Generator, distribution: str = "d0") -> Scene:
    """Draw one scene of ``distribution`` ("d0" or "pretrain") from ``rng``."""
    d = _distribution(distribution)
    shape = d.shapes[rng.integers(len(d.shapes))]
    colour = d.colours[rng.integers(len(d.colours))]
    backgrounds = [b for b in d.backgrounds if b != colour]
    background = backgrounds[rng.integers(len(backgrounds))]
    shape_texture = (
        d.shape_textures[rng.integers(len(d.shape_textures))]
        if rng.random() < d.p_shape_texture
        else "plain"
    )
    background_texture = (
        d.background_textures[rng.integers(len(d.background_textures))]
        if rng.random() < d.p_background_texture
        else "plain"
    )
    radius = float(rng.uniform(*d.size_range))
    offset = rng.uniform(-d.max_offset, d.max_offset, size=2)
    # Rotations that keep the shape recognisable: small tilts only, and none for the square and diamond
    # (a square tilted by 45 degrees is a diamond).
    angle = float(rng.uniform(-0.25, 0.25)) if shape in ("triangle", "cross") else 0.0
    phase = tuple(int(v) for v in rng.integers(0, 8, size=2))
    return Scene(
        shape=shape,
        colour=colour,
        background=background,
        shape_texture=shape_texture,
        background_texture=background_texture,
        centre=(0.5 + float(offset[0]), 0.5 + float(offset[1])),
        radius=radius,
        angle=angle,
        phase=phase,  # type: ignore[arg-type]
    )


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_for(scene: Scene) -> str:
    """The caption of a scene: ``"a red circle with fine vertical stripes on a blue background"``; the texture
    phrases appear only when the region is textured."""
    text = f"{_article(scene.colour)} {scene.colour} {scene.shape}"
    if scene.shape_texture != "plain":
        text += f" with {scene.shape_texture}"
    text += f" on {_article(scene.background)} {scene.background} background"
    if scene.background_texture != "plain":
        text += f" with {scene.background_texture}"
    return text


def _shape_mask(scene: Scene, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Boolean inside-mask of the shape at sample points (x, y) in units of the image side."""
    cx, cy = scene.centre
    r = scene.radius
    c, s = np.cos(scene.angle), np.sin(scene.angle)
    u = (x - cx) * c + (y - cy) * s
    v = -(x - cx) * s + (y - cy) * c
    if scene.shape == "circle":
        return u**2 + v**2 <= r**2
    if scene.shape == "ring":
        d2 = u**2 + v**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    if scene.shape == "square":
        h = 0.85 * r
        return (np.abs(u) <= h) & (np.abs(v) <= h)
    if scene.shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.1 * r
    if scene.shape == "cross":
        w = 0.36 * r
        return ((np.abs(u) <= w) & (np.abs(v) <= r)) | ((np.abs(v) <= w) & (np.abs(u) <= r))
    if scene.shape == "triangle":
        # Upward equilateral triangle with circumradius r (y grows downwards in images).
        top = -r
        bottom = 0.5 * r
        half_width = (v - top) / (bottom - top) * (np.sqrt(3) / 2 * r)
        return (v >= top) & (v <= bottom) & (np.abs(u) <= half_width)
    raise ValueError(f"scene.shape={scene.shape!r} is unknown; choose one of {SHAPES}")


def _pattern(texture: Texture, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Pattern indicator in {0, 1} at sample points given in nominal (32-pixel) pixel units."""
    if texture.kind == "plain":
        return np.zeros_like(px, dtype=bool)
    p = texture.period
    if texture.kind == "stripes":
        coord = {"vertical": px, "horizontal": py, "diagonal": (px + py) / np.sqrt(2)}[texture.orientation]
        return np.floor(coord / (p / 2)) % 2 == 1
    if texture.kind == "checks":
        return (np.floor(px / (p / 2)) + np.floor(py / (p / 2))) % 2 == 1
    if texture.kind == "dots":
        dx = (px % p) - p / 2
        dy = (py % p) - p / 2
        return dx**2 + dy**2 <= (0.3 * p) ** 2
    raise ValueError(f"texture.kind={texture.kind!r} is unknown")


def _shade(colour: np.ndarray) -> np.ndarray:
    """The second colour of a texture: darker for light colours, lighter for dark ones."""
    luminance = float(colour @ np.array([0.299, 0.587, 0.114]))
    return colour * 0.35 if luminance > 0.3 else colour + 0.45 * (1.0 - colour)


def render_scene(scene: Scene, resolution: int = 32, supersample: int = 4) -> np.ndarray:
    """Render ``scene`` to a float32 (resolution, resolution, 3) RGB array in [0, 1].

    Each pixel is the mean of ``supersample``^2 point samples (box anti-aliasing). Texture periods are in
    pixels at resolution 32 and scale with the resolution, so the picture is the same at every size.
    """
    if resolution < 8:
        raise ValueError(f"resolution={resolution} is too small; use at least 8 pixels")
    n = resolution * supersample
    t = (np.arange(n) + 0.5) / n  # sample positions in units of the side
    x, y = np.meshgrid(t, t, indexing="xy")
    scale = 32.0  # nominal pixels per side
    px = x * scale + scene.phase[0]
    py = y * scale + scene.phase[1]
    inside = _shape_mask(scene, x, y)
    fg = np.asarray(COLOURS[scene.colour])
    bg = np.asarray(COLOURS[scene.background])
    fg_pattern = _pattern(TEXTURES[scene.shape_texture], px, py)
    bg_pattern = _pattern(TEXTURES[scene.background_texture], px, py)
    fg_img = np.where(fg_pattern[..., None], _shade(fg), fg)
    bg_img = np.where(bg_pattern[..., None], _shade(bg), bg)
    img = np.where(inside[..., None], fg_img, bg_img)
    img = img.reshape(resolution, supersample, resolution, supersample, 3).mean(axis=(1, 3))
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def sample_toy_images(
    rng: np.random.Generator, num_images: int, *, resolution: int = 32, distribution: str = "pretrain"
) -> tuple[np.ndarray, list[Scene]]:
    """``num_images`` fresh images (N, 3, H, W) float32 in [0, 1] and their scenes, drawn from ``rng``."""
    scenes = [sample_scene(rng, distribution) for _ in range(num_images)]
    images = np.stack([render_scene(s, resolution) for s in scenes]).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(images), scenes


def iter_toy_batches(
    *, batch_size: int, seed: int, resolution: int = 32, distribution: str = "pretrain"
) -> Iterator[tuple[np.ndarray, list[str], list[Scene]]]:
    """Endless stream of fresh batches ``(images (B, 3, H, W) in [0, 1], captions, scenes)`` for pretraining;
    the stream is a pure function of ``seed``."""
    rng = np.random.default_rng(seed)
    while True:
        images, scenes = sample_toy_images(rng, batch_size, resolution=resolution, distribution=distribution)
        yield images, [caption_for(s) for s in scenes], scenes


def _png_bytes(image_hwc01: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    # Fixed encoder settings and no metadata, so equal pixels give equal bytes.
    Image.fromarray(np.round(image_hwc01 * 255.0).astype(np.uint8), mode="RGB").save(
        buf, format="PNG", compress_level=6
    )
    return buf.getvalue()


def make_toy_dataset(
    out_dir: str | os.PathLike,
    *,
    num_images: int = 48,
    seed: int = 0,
    resolution: int = 32,
    distribution: str = "d0",
) -> list[Path]:
    """Write ``num_images`` images of ``distribution`` to ``out_dir`` as ``toy_0000.png`` with same-name
    ``.txt`` captions (kohya convention). Deterministic in ``seed``: the same arguments give the same bytes.
    Returns the image paths. Every file is written atomically."""
    if num_images < 1:
        raise ValueError(f"num_images={num_images} must be at least 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(num_images):
        scene = sample_scene(rng, distribution)
        image = render_scene(scene, resolution)
        path = out / f"toy_{i:04d}.png"
        write_bytes_atomic(path, _png_bytes(image))
        write_bytes_atomic(path.with_suffix(".txt"), (caption_for(scene) + "\n").encode())
        paths.append(path)
    return paths
