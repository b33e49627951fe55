"""The power-spectrum phenotype of an image (docs/phenotype.md; Eq. 13-15 and Appendix G.3 of the
paper, after Corvi et al. 2023).

Per image x (C channels, H x W pixels, float):

1. x <- (x - mean(x)) / rms(x - mean(x)), one mean and one RMS over height, width and channels.
2. F_c = orthonormal 2D DFT of channel c (Eq. 13).
3. P(u, v) = mean_c |F_c(u, v)|^2 / (H W). By Parseval, sum_{u,v} |F_c|^2 = sum |x_c|^2, and the
   normalised image has sum_c sum |x_c|^2 = C H W, so sum_{u,v} P = 1 exactly. The DC term
   P(0, 0) = mean_c m_c^2 with m_c the channel means of the normalised image (sum_c m_c = 0): it is zero for a
   grey image and small for a colour one.
4. r(u, v) = sqrt(f_y^2 + f_x^2) with f_y = fftfreq(H)[u], f_x = fftfreq(W)[v] in cycles per pixel
   (frequencies past 1/2 wrap to negative, so r <= 1/sqrt(2)).
5. The phenotype S = sum of P over r > tau, tau = 0.02 (Eq. 14): the fraction of the image's normalised
   energy above tau, not binned; invariant to brightness (offset) and contrast (positive gain).
6. Radial spectrum: ring k sums P over round(r / q) = k, q = 1 / min(H, W) (rings of width q centred on
   k q, k = 0 .. round(r_max / q)).
7. Angular spectrum: sector k (k = 0 .. 15) sums P over r > 0.1 and round(16 theta / pi) mod 16 = k, with
   theta = atan2(f_y, f_x), f_y the frequency along the rows (image y axis pointing down) and f_x along the
   columns. The power spectrum of a real image is symmetric, P(-u, -v) = P(u, v), so angles are folded to
   [0, pi): sector k is centred on k pi / 16 and covers [(k - 1/2) pi / 16, (k + 1/2) pi / 16) modulo pi.
   Sector 0 holds horizontal frequencies (vertical stripes), sector 8 vertical ones (horizontal stripes).
   (On the Nyquist row of an even H, f_y = -1/2 at both (u, v) and its mirror, so there the two halves of
   a conjugate pair can fall into sectors theta and pi - theta; the definition is applied to the full
   grid as it stands, as Corvi et al.'s code does.)

round() is round-half-to-even on float64 grids (numpy's), as in Corvi et al.'s code.

Before measuring, `prepare_for_spectrum` brings large images to 256 x 256: an image whose short side m
exceeds 256 is area-downsampled to (256 H // m) x (256 W // m) by true area averaging with fractional pixel
weights (what OpenCV's INTER_AREA computes), then centre-cropped to 256 x 256 with offsets
((H' - 256) // 2, (W' - 256) // 2) as in Corvi et al.'s `rescale_img`. An image whose short side is exactly
256 is only centre-cropped; smaller images are analysed as they are.
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

SPECTRUM_SIZE = 256
HF_THRESHOLD = 0.02
NUM_ANGLES = 16
ANGULAR_MIN_RADIUS = 0.1
CPU_CHUNK = 8  # images per FFT on a CPU (cache-sized); a GPU takes the whole batch at once

def phenotype_attrs(tau: float = HF_THRESHOLD) -> dict[str, str | float | int]:
    """The definition and parameters of the phenotype for dataset attrs (docs/phenotype.md)."""
    return {
        "phenotype": (
            "hf_power: fraction of the image's normalised spectral energy at radial frequency r > tau "
            "(Eq. 14, after Corvi et al. 2023). Image RGB floats minus one global mean, divided by one global "
            "RMS (over H, W, C); orthonormal 2D DFT per channel; |F|^2 averaged over channels, divided by H*W "
            "(sums to 1); r from numpy.fft.fftfreq grids in cycles/pixel; sum over r > tau, not binned."
        ),
        "phenotype_tau": float(tau),
        "phenotype_size": SPECTRUM_SIZE,
        "phenotype_resize": (
            "short side m > 256: true area averaging (fractional pixel weights, as OpenCV INTER_AREA) to "
            "(256*H//m, 256*W//m); short side >= 256: centre crop 256x256 at ((H-256)//2, (W-256)//2); "
            "smaller images as they are"
        ),
        "radial_psd_definition": "ring sums of the power map over round(r / q) = k, q = 1/min(H, W); "
        "coordinate frequency = k q in cycles/pixel",
        "angular_psd_definition": (
            "sector sums of the power map over r > 0.1 and round(16 atan2(f_y, f_x) / pi) mod 16 = k "
            "(angles folded to [0, pi), f_y along rows, f_x along columns); coordinate angle = k pi / 16 radians"
        ),
        "angular_num_sectors": NUM_ANGLES,
        "angular_min_radius": ANGULAR_MIN_RADIUS,
    }


PHENOTYPE_ATTRS: dict[str, str | float | int] = phenotype_attrs(HF_THRESHOLD)


class SpectraBatch(NamedTuple):
    """Spectra of a batch of B images (float64 torch tensors on the device of the input).

    hf_power: (B,) the phenotype S_i. radial_psd: (B, F) ring sums, F = len(radial_frequencies(H, W)).
    angular_psd: (B, 16) sector sums. A constant image has no normalised spectrum: its rows are NaN.
    """

    hf_power: torch.Tensor
    radial_psd: torch.Tensor
    angular_psd: torch.Tensor

    def numpy(self) -> SpectraBatch:
        """The same batch as float64 numpy arrays on the host."""
        return SpectraBatch(*(t.detach().to("cpu", torch.float64).numpy() for t in self))


# ---------------------------------------------------------------------------------------------------------
# Frequency grids


def _frequency_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    fy, fx = np.meshgrid(np.fft.fftfreq(height), np.fft.fftfreq(width), indexing="ij")
    return fy, fx


def radius_grid(height: int, width: int) -> np.ndarray:
    """(H, W) radial frequency r(u, v) = sqrt(f_y^2 + f_x^2) in cycles/pixel, numpy.fft.fftfreq order."""
    fy, fx = _frequency_grid(height, width)
    return np.sqrt(fy**2 + fx**2)


def ring_index(height: int, width: int) -> np.ndarray:
    """(H, W) int ring number round(r / q), q = 1 / min(H, W) (round half to even)."""
    return np.round(radius_grid(height, width) * min(height, width)).astype(np.int64)


def sector_index(height: int, width: int) -> np.ndarray:
    """(H, W) int sector number round(16 atan2(f_y, f_x) / pi) mod 16, folded to [0, pi)."""
    fy, fx = _frequency_grid(height, width)
    return (np.round(NUM_ANGLES * np.arctan2(fy, fx) / np.pi) % NUM_ANGLES).astype(np.int64)


def radial_frequencies(height: int, width: int) -> np.ndarray:
    """(F,) ring centres k / min(H, W) in cycles/pixel, k = 0 .. round(r_max min(H, W))."""
    num = int(ring_index(height, width).max()) + 1
    return np.arange(num, dtype=np.float64) / min(height, width)


def angular_bins() -> np.ndarray:
    """(16,) sector centres k pi / 16 in radians, k = 0 .. 15."""
    return np.arange(NUM_ANGLES, dtype=np.float64) * np.pi / NUM_ANGLES


class _HalfGridMaps(NamedTuple):
    weight: torch.Tensor  # (N,) multiplicity of each rfft2 coefficient in the full grid (1 or 2)
    hf_weight: torch.Tensor  # (N,) weight where r > tau, else 0
    ring: torch.Tensor  # (N,) ring number
    sector: torch.Tensor  # (N,) sector number, NUM_ANGLES where r <= ANGULAR_MIN_RADIUS
    mirror_sector: torch.Tensor  # (N,) sector of the mirror (-u, -v); NUM_ANGLES where it is not a second term
    num_rings: int


@lru_cache(maxsize=16)
def _half_grid_maps_numpy(height: int, width: int, tau: float = HF_THRESHOLD) -> tuple[np.ndarray, ...]:
    """Index maps restricted to the rfft2 half grid (columns 0 .. W // 2).

    The rfft2 coefficient (u, v) stands for itself and, when 0 < v < W / 2, for its mirror (-u, -v) too
    (same power). r and the ring are symmetric under the mirror, so those coefficients count twice. The
    sector is not always: on the Nyquist row of an even H (f_y = -1/2 on both sides of the mirror) the
    angles of (u, v) and (-u, -v) fold to pi - theta and theta. So the mirror keeps its own sector map.
    """
    half = width // 2 + 1
    full_radius = radius_grid(height, width)
    full_ring = ring_index(height, width)
    full_sector = sector_index(height, width)
    full_sector[full_radius <= ANGULAR_MIN_RADIUS] = NUM_ANGLES
    num_rings = int(full_ring.max()) + 1
    radius, ring, sector = full_radius[:, :half], full_ring[:, :half], full_sector[:, :half]
    rows = (-np.arange(height)) % height
    cols = (-np.arange(half)) % width
    mirror_sector = full_sector[rows[:, None], cols[None, :]].copy()
    weight = np.full((height, half), 2.0)
    weight[:, 0] = 1.0
    if width % 2 == 0:
        weight[:, -1] = 1.0
    mirror_sector[weight == 1.0] = NUM_ANGLES
    hf_weight = np.where(radius > tau, weight, 0.0)
    return weight.ravel(), hf_weight.ravel(), ring.ravel(), sector.ravel(), mirror_sector.ravel(), num_rings


@lru_cache(maxsize=8)
def _half_grid_maps(height: int, width: int, device: torch.device, dtype: torch.dtype,
                    tau: float = HF_THRESHOLD) -> _HalfGridMaps:
    weight, hf_weight, ring, sector, mirror_sector, num_rings = _half_grid_maps_numpy(height, width, tau)
    return _HalfGridMaps(
        weight=torch.as_tensor(weight, dtype=dtype, device=device),
        hf_weight=torch.as_tensor(hf_weight, dtype=dtype, device=device),
        ring=torch.as_tensor(ring, device=device),
        sector=torch.as_tensor(sector, device=device),
        mirror_sector=torch.as_tensor(mirror_sector, device=device),
        num_rings=num_rings,
    )


# ---------------------------------------------------------------------------------------------------------
# The measurement


def normalise(images_bchw: torch.Tensor) -> torch.Tensor:
    """Subtract one mean and divide by one RMS per image, over (C, H, W) (step 1 of the definition)."""
    centred = images_bchw - images_bchw.mean(dim=(1, 2, 3), keepdim=True)
    rms = centred.square().mean(dim=(1, 2, 3), keepdim=True).sqrt()
    return centred / rms


def _check_batch(images_bchw: torch.Tensor) -> None:
    if not isinstance(images_bchw, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor of shape (B, C, H, W), got {type(images_bchw).__name__}")
    if images_bchw.ndim != 4:
        raise ValueError(
            f"expected images of shape (B, C, H, W), got {tuple(images_bchw.shape)}; "
            "add a batch dimension with image[None]"
        )
    if min(images_bchw.shape) == 0:
        raise ValueError(f"empty image batch of shape {tuple(images_bchw.shape)}")


def power_map(images_bchw: torch.Tensor, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(B, H, W) normalised power map P(u, v) in numpy.fft order (steps 1-3; sums to 1 per image)."""
    _check_batch(images_bchw)
    x = normalise(images_bchw.to(dtype))
    height, width = x.shape[-2:]
    spectrum = torch.fft.fft2(x, norm="ortho")
    return spectrum.abs().square().mean(dim=1) / (height * width)


def measure_spectra(images_bchw: torch.Tensor, *, dtype: torch.dtype = torch.float32,
                    tau: float = HF_THRESHOLD) -> SpectraBatch:
    """Phenotype, radial and angular spectra of a batch of equally sized images (steps 1-7 above).

    images_bchw: (B, C, H, W) float tensor on any device (values on any scale: the normalisation removes
    offset and gain). Images are not resized here; call `prepare_for_spectrum` first. One batched real FFT
    (rfft2; on a CPU in chunks of CPU_CHUNK images) of the mean-removed images in `dtype` (float32 by
    default; float64 for reference checks); the half spectrum stands for the full one by the symmetry
    P(-u, -v) = P(u, v) (exactly the full-grid sums), and dividing by the total power does the RMS
    normalisation (Parseval). Returns float64 tensors on the input's device.
    `tau` (cycles/pixel) is the phenotype's frequency threshold (Eq. 14; 0.02 for 256-pixel images).
    """
    _check_batch(images_bchw)
    if images_bchw.device.type == "cpu" and images_bchw.shape[0] > CPU_CHUNK:
        # On a CPU, chunks that stay in cache run about twice as fast as one large batched FFT.
        parts = [measure_spectra(images_bchw[i : i + CPU_CHUNK], dtype=dtype, tau=tau)
                 for i in range(0, images_bchw.shape[0], CPU_CHUNK)]
        return SpectraBatch(*(torch.cat(field) for field in zip(*parts)))
    batch = images_bchw.shape[0]
    height, width = images_bchw.shape[-2:]
    x = images_bchw.to(dtype)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = x.sub_(mean) if x is not images_bchw else x - mean  # in place only on our own converted copy
    # The RMS division is folded into the end: sum_c |F_c|^2 over the full grid is C H W rms^2 (Parseval),
    # so P = sum_c |F_c|^2 / (that total) is the normalised map without another pass over the pixels.
    half_spectrum = torch.fft.rfft2(x, norm="ortho")
    power = (half_spectrum.real.square() + half_spectrum.imag.square()).sum(dim=1).reshape(batch, -1)
    maps = _half_grid_maps(height, width, power.device, power.dtype, float(tau))
    weighted = power * maps.weight
    total = weighted.sum(dim=1)
    hf_power = (power @ maps.hf_weight) / total
    radial = torch.zeros(batch, maps.num_rings, dtype=power.dtype, device=power.device)
    radial.scatter_add_(1, maps.ring.expand(batch, -1), weighted)
    angular = torch.zeros(batch, NUM_ANGLES + 1, dtype=power.dtype, device=power.device)
    angular.scatter_add_(1, maps.sector.expand(batch, -1), power)
    angular.scatter_add_(1, maps.mirror_sector.expand(batch, -1), power)
    return SpectraBatch(
        hf_power=hf_power.to(torch.float64),
        radial_psd=(radial / total[:, None]).to(torch.float64),
        angular_psd=(angular[:, :NUM_ANGLES] / total[:, None]).to(torch.float64),
    )


# ---------------------------------------------------------------------------------------------------------
# Resizing to the analysis size


@lru_cache(maxsize=32)
def _area_weights_numpy(size_in: int, size_out: int) -> np.ndarray:
    lower = np.arange(size_out, dtype=np.float64)[:, None] * size_in / size_out
    upper = np.arange(1, size_out + 1, dtype=np.float64)[:, None] * size_in / size_out
    pixel = np.arange(size_in, dtype=np.float64)[None, :]
    overlap = np.clip(np.minimum(pixel + 1.0, upper) - np.maximum(pixel, lower), 0.0, None)
    return overlap * (size_out / size_in)


def area_weights(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) float64 matrix of true area averaging along one axis (size_out <= size_in).

    Output pixel i covers the input interval [i s, (i + 1) s), s = size_in / size_out; its value is the
    average of the piecewise-constant input over that interval, so A[i, j] = |[j, j+1) & [i s, (i+1) s)| / s
    (fractional weights at the ends; every row sums to 1).
    """
    if not 0 < size_out <= size_in:
        raise ValueError(f"area_weights downsamples only: got {size_in} -> {size_out}")
    return _area_weights_numpy(int(size_in), int(size_out)).copy()


def area_resize(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Area-downsample (..., H, W) to (..., height, width): X -> A_h X A_w^T, in the input's float dtype."""
    in_h, in_w = images.shape[-2:]
    a_h = torch.as_tensor(_area_weights_numpy(in_h, height), dtype=images.dtype, device=images.device)
    a_w = torch.as_tensor(_area_weights_numpy(in_w, width), dtype=images.dtype, device=images.device)
    return a_h @ images @ a_w.T


def prepare_for_spectrum(image_chw: torch.Tensor, *, size: int = SPECTRUM_SIZE) -> torch.Tensor:
    """Bring an image (C, H, W) (or a batch (B, C, H, W) of one size) to the analysis size.

    Short side m > size: area-downsample to (size H // m, size W // m) with fractional weights, then centre
    crop size x size at ((H' - size) // 2, (W' - size) // 2); m == size: centre crop only; m < size:
    returned unchanged. Only the rows and columns that survive the crop are computed. Integer images are
    kept as they are when only cropped and converted to float32 when resized (not rescaled: the spectrum
    does not depend on the scale).
    """
    if image_chw.ndim not in (3, 4):
        raise ValueError(f"expected an image (C, H, W) or batch (B, C, H, W), got shape {tuple(image_chw.shape)}")
    height, width = image_chw.shape[-2:]
    short = min(height, width)
    if short < size:
        return image_chw
    new_h, new_w = size * height // short, size * width // short
    top, left = (new_h - size) // 2, (new_w - size) // 2
    if short == size:
        return image_chw[..., top : top + size, left : left + size]
    if not image_chw.is_floating_point():
        image_chw = image_chw.to(torch.float32)
    a_h = _area_weights_numpy(height, new_h)[top : top + size]
    a_w = _area_weights_numpy(width, new_w)[left : left + size]
    a_h = torch.as_tensor(a_h, dtype=image_chw.dtype, device=image_chw.device)
    a_w = torch.as_tensor(a_w, dtype=image_chw.dtype, device=image_chw.device)
    return a_h @ image_chw @ a_w.T


# ---------------------------------------------------------------------------------------------------------
# A folder of images


class _Loaded(NamedTuple):
    index: int
    image: torch.Tensor | None
    original_shape: tuple[int, int]
    error: str | None


def _load_prepared(index: int, path: Path) -> _Loaded:
    """Decode (keeping 8-bit images as uint8: the spectrum does not depend on the scale) and prepare."""
    from chain.errors import ImageReadError
    from chain.images import decode_image

    try:
        array = decode_image(path)
    except ImageReadError as exc:
        return _Loaded(index, None, (0, 0), exc.reason)
    image = torch.from_numpy(array).permute(2, 0, 1)
    return _Loaded(index, prepare_for_spectrum(image), (int(array.shape[0]), int(array.shape[1])), None)


def analysed_shape(height: int, width: int, *, size: int = SPECTRUM_SIZE) -> tuple[int, int]:
    """The (height, width) at which prepare_for_spectrum analyses an image of the given size."""
    return (size, size) if min(height, width) >= size else (height, width)


def _most_common_analysed_shape(paths: list[Path]) -> tuple[int, int] | None:
    """From the file headers only (no decoding): the analysed size shared by most images."""
    from PIL import Image

    counts: dict[tuple[int, int], int] = {}
    for path in paths:
        try:
            with Image.open(path) as img:
                width, height = img.size
        except Exception:  # unreadable files are reported when they are decoded
            continue
        shape = analysed_shape(height, width)
        counts[shape] = counts.get(shape, 0) + 1
    return max(counts, key=counts.get) if counts else None


class _Row(NamedTuple):
    """One measured image of a folder: its relative path, original (H, W) and spectra (radial None when its
    analysed size differs from the folder's reference size)."""

    path: str
    shape: tuple[int, int]
    hf_power: float
    radial_psd: np.ndarray | None
    angular_psd: np.ndarray


def decode_ahead(paths: list[Path], *, batch_size: int, num_workers: int) -> Iterator[list[_Loaded]]:
    """Batches of `batch_size` decoded and prepared images (the last one shorter), in list order.

    Decoding and resizing run ahead in `num_workers` threads while the caller transforms the current batch,
    at most 2 batches ahead: at most 3 x `batch_size` decoded images are held at once.
    """
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        queue = iter(enumerate(paths))
        pending: deque = deque()

        def fill() -> None:
            for index, path in queue:
                pending.append(pool.submit(_load_prepared, index, path))
                if len(pending) >= 2 * batch_size:
                    return

        fill()
        while pending:
            loaded = [pending.popleft().result() for _ in range(min(batch_size, len(pending)))]
            fill()
            yield loaded


def _measure_batch(good: list[_Loaded], *, device: torch.device, tau: float,
                   reference_shape: tuple[int, int]) -> dict[int, tuple[float, np.ndarray | None, np.ndarray]]:
    """Spectra of decoded images, grouped by size (one batched FFT per size): {index: (hf_power, radial row or
    None where the analysed size is not `reference_shape`, angular row)}."""
    results: dict[int, tuple[float, np.ndarray | None, np.ndarray]] = {}
    groups: dict[tuple, list[_Loaded]] = {}
    for item in good:
        groups.setdefault(tuple(item.image.shape), []).append(item)
    for shape, members in groups.items():
        if len({m.image.dtype for m in members}) > 1:  # uint8 and float images: one dtype
            stacked = torch.stack([m.image.to(torch.float32) for m in members]).to(device)
        else:
            stacked = torch.stack([m.image for m in members]).to(device)
        spectra = measure_spectra(stacked, tau=tau).numpy()
        same_rings = tuple(shape[-2:]) == tuple(reference_shape)
        for row, member in enumerate(members):
            results[member.index] = (spectra.hf_power[row], spectra.radial_psd[row] if same_rings else None,
                                     spectra.angular_psd[row])
    return results


def measure_folder(
    root: str | os.PathLike,
    *,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    num_workers: int | None = None,
    on_error: Callable[[Path, str], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
    tau: float = HF_THRESHOLD,
):
    """Measure every image under `root` (qtmio.images.list_images) and return an xarray.Dataset.

    Streams (`decode_ahead`): decoding and resizing run ahead in `num_workers` threads (default
    min(4, cpu count)) while the FFTs of the current batch run on `device`. An unreadable image is skipped
    and reported through `on_error(path, reason)` and the attrs `num_failed` and `failed` (a JSON list of
    {"path", "reason"} with paths relative to `root`). `on_progress(n)` is called after every batch with
    the number of images it handled (read or skipped).

    Dataset (`folder_dataset`): dimension `image` (coordinate 0 .. N-1 over the images that were read, in
    list order); `path` (image, relative posix path), `height`, `width` (image, original size), `hf_power`
    (image), `radial_psd` (image, frequency), `angular_psd` (image, angle); coordinates `frequency`
    (cycles/pixel) and `angle` (radians). Radial rings depend on the analysed size: rows of images whose
    analysed size differs from the most common one (read from the file headers) are NaN in `radial_psd`
    (counted in attr `num_radial_mismatched`).
    Attrs: phenotype_attrs(tau), `num_images`, `num_failed`, `failed`, `root`.
    """
    from qtmio.images import list_images

    root = Path(root)
    paths = list_images(root)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    workers = num_workers if num_workers is not None else min(4, os.cpu_count() or 1)
    device = torch.device(device)
    reference_shape = _most_common_analysed_shape(paths)
    rows: list[_Row] = []
    failed: list[dict[str, str]] = []
    for loaded in decode_ahead(paths, batch_size=batch_size, num_workers=workers):
        good = []
        for item in loaded:
            if item.error is None:
                good.append(item)
                continue
            failed.append({"path": paths[item.index].relative_to(root).as_posix(), "reason": item.error})
            if on_error is not None:
                on_error(paths[item.index], item.error)
        if good and reference_shape is None:  # no readable header: the first measured size is the reference
            reference_shape = tuple(good[0].image.shape[-2:])
        measured = _measure_batch(good, device=device, tau=tau, reference_shape=reference_shape)
        rows += [_Row(paths[item.index].relative_to(root).as_posix(), item.original_shape, *measured[item.index])
                 for item in good]
        if on_progress is not None:
            on_progress(len(loaded))
    return folder_dataset(rows, failed, reference_shape=reference_shape, root=root, tau=tau)


def folder_dataset(rows: list[_Row], failed: list[dict[str, str]], *, reference_shape: tuple[int, int] | None,
                   root: Path, tau: float):
    """The dataset of `measure_folder` from its measured rows (see there)."""
    import xarray as xr

    frequencies = radial_frequencies(*(reference_shape or (SPECTRUM_SIZE, SPECTRUM_SIZE)))
    radial = np.full((len(rows), len(frequencies)), np.nan)
    for i, row in enumerate(rows):
        if row.radial_psd is not None:
            radial[i] = row.radial_psd
    ds = xr.Dataset(
        data_vars={
            "path": ("image", np.asarray([r.path for r in rows], dtype=object)),
            "height": ("image", np.asarray([r.shape[0] for r in rows], dtype=np.int64)),
            "width": ("image", np.asarray([r.shape[1] for r in rows], dtype=np.int64)),
            "hf_power": ("image", np.asarray([r.hf_power for r in rows], dtype=np.float64)),
            "radial_psd": (("image", "frequency"), radial),
            "angular_psd": (("image", "angle"),
                            np.asarray([r.angular_psd for r in rows], dtype=np.float64).reshape(-1, NUM_ANGLES)),
        },
        coords={
            "image": np.arange(len(rows), dtype=np.int64),
            "frequency": frequencies,
            "angle": angular_bins(),
        },
        attrs={
            **phenotype_attrs(tau),
            "root": str(root),
            "num_images": len(rows),
            "num_failed": len(failed),
            "failed": json.dumps(failed),
            "num_radial_mismatched": sum(r.radial_psd is None for r in rows),
        },
    )
    ds["hf_power"].attrs.update(units="1", long_name="fraction of normalised spectral energy above tau")
    ds["frequency"].attrs.update(units="cycles/pixel")
    ds["angle"].attrs.update(units="radian")
    return ds


# ---------------------------------------------------------------------------------------------------------
# The figure of a folder


def plot_folder(ds, path: str | os.PathLike) -> Path:
    """Draw a `measure_folder` dataset: the hf_power histogram, the mean radial spectrum (log-log, tau marked)
    and the mean angular spectrum, side by side; written atomically (qtmio.figures, format from the suffix)."""
    from qtmio.figures import figure, plain_log_ticks, save_figure

    tau = float(ds.attrs["phenotype_tau"])
    fig = figure(figsize=(13, 4.0), layout="constrained")
    axes = fig.subplots(1, 3)
    hf = ds["hf_power"].values
    hf = hf[np.isfinite(hf)]
    axes[0].hist(hf, bins=min(50, max(5, hf.size // 4)), color="tab:blue")
    axes[0].set_xlabel(f"high-frequency power (share of energy above tau = {tau:g})")
    axes[0].set_ylabel("images")
    axes[0].set_title(f"Phenotype of {hf.size} images, mean {hf.mean():.4g}" if hf.size else "no finite values",
                      fontsize=10)
    radial = ds["radial_psd"].mean("image", skipna=True).values
    freq = ds["frequency"].values
    keep = (freq > 0) & np.isfinite(radial) & (radial > 0)
    axes[1].loglog(freq[keep], radial[keep], color="tab:blue", label="mean over the images")
    if tau > 0:
        axes[1].axvline(tau, color="C3", ls="--", lw=1.2, label=f"tau = {tau:g} cycles/pixel")
    if keep.any():
        plain_log_ticks(axes[1], freq[keep].min() * 0.9, freq[keep].max() * 1.05)
    axes[1].set_xlabel("spatial frequency (cycles per pixel)")
    axes[1].set_ylabel("share of the energy per frequency ring")
    axes[1].set_title("Radial power spectrum", fontsize=10)
    axes[1].legend(fontsize=8)
    angular = ds["angular_psd"].mean("image").values
    degrees = np.degrees(ds["angle"].values)
    axes[2].plot(degrees, angular, marker="o")
    axes[2].set_xlabel("orientation (degrees, folded to [0, 180))")
    axes[2].set_ylabel("share of the energy per sector (r > 0.1)")
    axes[2].set_title("Angular power spectrum", fontsize=10)
    return save_figure(fig, path)
