"""Throughput of the power-spectrum phenotype: chain.spectra.measure_spectra / measure_folder against a plain
per-image numpy loop written from the definition (docs/phenotype.md), from memory and from PNG files.

The baseline is what one writes first: numpy.fft.fft2 per image, then one boolean mask per ring and per
sector (as Corvi et al.'s get_spectrum / get_spectrum_angular do), the grids precomputed once. Both sides
run on one thread (numpy's FFT is single-threaded; torch is set to one thread) unless QTM_BENCH_THREADS says
otherwise; measure_folder decodes in QTM_BENCH_THREADS worker threads while the main thread transforms
(and once more with its default min(4, cpus) decode threads). The baseline is timed on a subset
(QTM_BENCH_BASELINE_IMAGES, default 200) to keep the run short. PNG decoding alone is timed too: it is a
floor shared by both sides and bounds the speedup from files.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import best_time, write_results

NUM_IMAGES = int(os.environ.get("QTM_BENCH_SPECTRA_IMAGES", "1000"))
NUM_BASELINE = int(os.environ.get("QTM_BENCH_BASELINE_IMAGES", "200"))
SIZE = 256
BATCH = 64


def make_images(num: int, size: int, seed: int = 0) -> np.ndarray:
    """(num, size, size, 3) uint8 photo-like images: smooth random patterns plus a little noise."""
    rng = np.random.default_rng(seed)
    ys, xs = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    base = np.zeros((8, size, size, 3))
    for k in range(8):
        for c in range(3):
            fy, fx = rng.uniform(0.5, 12, 2)
            base[k, :, :, c] = np.cos(2 * np.pi * (fy * ys + fx * xs) + rng.uniform(0, 6.3))
    images = np.empty((num, size, size, 3), dtype=np.uint8)
    for i in range(num):
        weights = rng.standard_normal(8)
        pattern = np.tensordot(weights, base, axes=1) * 0.08 + 0.5 + 0.03 * rng.standard_normal((size, size, 3))
        images[i] = np.clip(np.round(pattern * 255), 0, 255)
    return images


class BaselineLoop:
    """Per-image numpy implementation straight from the definition."""

    def __init__(self, height: int, width: int):
        fy, fx = np.meshgrid(np.fft.fftfreq(height), np.fft.fftfreq(width), indexing="ij")
        self.radius = np.sqrt(fy**2 + fx**2)
        self.ring = np.round(self.radius * min(height, width))
        self.rings = np.unique(self.ring)
        self.sector = np.round(16 * np.arctan2(fy, fx) / np.pi) % 16

    def __call__(self, image_hwc_uint8: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        x = image_hwc_uint8.astype(np.float64) / 255.0
        x = x - x.mean()
        x = x / np.sqrt((x**2).mean())
        power = (np.abs(np.fft.fft2(x, axes=(0, 1), norm="ortho")) ** 2).mean(axis=2)
        power = power / power.size
        hf = power[self.radius > 0.02].sum()
        radial = np.array([power[self.ring == k].sum() for k in self.rings])
        angular = np.array([power[(self.sector == k) & (self.radius > 0.1)].sum() for k in range(16)])
        return float(hf), radial, angular


def main() -> None:
    import torch

    from chain.spectra import measure_folder, measure_spectra

    threads = int(os.environ.get("QTM_BENCH_THREADS", "1"))
    torch.set_num_threads(threads)
    images = make_images(NUM_IMAGES, SIZE)
    baseline = BaselineLoop(SIZE, SIZE)
    subset = images[:NUM_BASELINE]

    def ours_memory():
        out = []
        for start in range(0, NUM_IMAGES, BATCH):
            batch = torch.from_numpy(images[start : start + BATCH]).permute(0, 3, 1, 2).float().div_(255.0)
            out.append(measure_spectra(batch).hf_power)
        return torch.cat(out)

    def baseline_memory():
        return [baseline(image) for image in subset]

    ours_hf = ours_memory().numpy()  # warm-up, and the agreement check below
    base_hf = np.array([r[0] for r in baseline_memory()])
    max_diff = float(np.abs(ours_hf[:NUM_BASELINE] - base_hf).max())

    t_ours_mem = best_time(ours_memory, repeats=3)
    t_base_mem = best_time(baseline_memory, repeats=1)

    from PIL import Image

    with tempfile.TemporaryDirectory(prefix="bench_spectra_") as tmp:
        root = Path(tmp)
        for i, image in enumerate(images):
            Image.fromarray(image).save(root / f"{i:04d}.png")
        files = sorted(root.glob("*.png"))

        def ours_files():
            return measure_folder(root, batch_size=BATCH, num_workers=threads)

        def baseline_files():
            return [baseline(np.asarray(Image.open(path).convert("RGB"))) for path in files[:NUM_BASELINE]]

        def decode_only():
            return [np.asarray(Image.open(path).convert("RGB")) for path in files[:NUM_BASELINE]]

        ds = ours_files()
        assert ds.sizes["image"] == NUM_IMAGES
        t_ours_png = best_time(ours_files, repeats=2)
        t_base_png = best_time(baseline_files, repeats=1)
        t_decode = best_time(decode_only, repeats=1)
        workers = os.cpu_count() or 1
        t_ours_png_all = best_time(lambda: measure_folder(root, batch_size=BATCH,
                                                          num_workers=min(4, workers)), repeats=1)
        disk_mb = sum(p.stat().st_size for p in files) / 1e6

    figures = {
        "images": NUM_IMAGES,
        "baseline_images": NUM_BASELINE,
        "size": f"{SIZE}x{SIZE} RGB",
        "torch_threads": threads,
        "memory_measure_spectra_images_per_s": round(NUM_IMAGES / t_ours_mem, 1),
        "memory_numpy_loop_images_per_s": round(NUM_BASELINE / t_base_mem, 1),
        "memory_speedup": round((NUM_IMAGES / t_ours_mem) / (NUM_BASELINE / t_base_mem), 1),
        "png_measure_folder_images_per_s": round(NUM_IMAGES / t_ours_png, 1),
        "png_numpy_loop_images_per_s": round(NUM_BASELINE / t_base_png, 1),
        "png_speedup": round((NUM_IMAGES / t_ours_png) / (NUM_BASELINE / t_base_png), 1),
        "png_decode_only_images_per_s": round(NUM_BASELINE / t_decode, 1),
        f"png_measure_folder_{min(4, os.cpu_count() or 1)}_decode_threads_images_per_s": round(
            NUM_IMAGES / t_ours_png_all, 1),
        "png_speedup_default_decode_threads": round((NUM_IMAGES / t_ours_png_all) / (NUM_BASELINE / t_base_png), 1),
        "png_total_mb": round(disk_mb, 1),
        "max_abs_diff_hf_power_vs_baseline": max_diff,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if torch.cuda.is_available():
        gpu_images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()

        def ours_gpu():
            out = []
            for start in range(0, NUM_IMAGES, 250):
                batch = gpu_images[start : start + 250].cuda(non_blocking=True).float().div_(255.0)
                out.append(measure_spectra(batch).hf_power)
            result = torch.cat(out).cpu()
            torch.cuda.synchronize()
            return result

        ours_gpu()
        figures["gpu_memory_measure_spectra_images_per_s"] = round(NUM_IMAGES / best_time(ours_gpu, repeats=3), 1)
    write_results("spectra", figures)


if __name__ == "__main__":
    main()
