"""chain.spectra against slow references written from DESIGN.md "The phenotype".

Oracles: a direct double-sum DFT, explicit per-pixel loops for rings and sectors, Parseval's theorem, an
analytic grating, an exact interval-integral area resize, and PIL's BOX filter where it equals area
averaging (integer factors).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from chain.spectra import (
    PHENOTYPE_ATTRS,
    angular_bins,
    area_weights,
    measure_folder,
    measure_spectra,
    power_map,
    prepare_for_spectrum,
    radial_frequencies,
)

# --------------------------------------------------------------------------------------------------------
# slow references, straight from the definition


def _freq(index: int, n: int) -> float:
    """The standard FFT frequency of bin `index` of `n` (past 1/2 wraps to negative)."""
    return index / n if index < (n + 1) // 2 else (index - n) / n


def naive_power_map(image_chw: np.ndarray) -> np.ndarray:
    """Global mean/RMS normalisation, direct double-sum orthonormal DFT, channel mean of |F|^2 / (H W)."""
    c, h, w = image_chw.shape
    x = image_chw - image_chw.mean()
    x = x / math.sqrt((x**2).mean())
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    power = np.zeros((h, w))
    for u in range(h):
        for v in range(w):
            kernel = np.exp(-2j * np.pi * (u * ys / h + v * xs / w)) / math.sqrt(h * w)
            for ch in range(c):
                power[u, v] += abs((x[ch] * kernel).sum()) ** 2
    return power / c / (h * w)


def naive_spectra(power: np.ndarray):
    h, w = power.shape
    q = 1.0 / min(h, w)
    hf = 0.0
    rings: dict[int, float] = {}
    sectors = np.zeros(16)
    for u in range(h):
        for v in range(w):
            fy, fx = _freq(u, h), _freq(v, w)
            r = math.hypot(fy, fx)
            if r > 0.02:
                hf += power[u, v]
            k = int(np.round(r / q))
            rings[k] = rings.get(k, 0.0) + power[u, v]
            if r > 0.1:
                sectors[int(np.round(16 * math.atan2(fy, fx) / math.pi)) % 16] += power[u, v]
    radial = np.array([rings.get(k, 0.0) for k in range(max(rings) + 1)])
    return hf, radial, sectors


def exact_area_resize_1d(x: np.ndarray, n_out: int) -> np.ndarray:
    """Average of the piecewise-constant signal x over [i s, (i+1) s), from its running integral."""
    n_in = x.shape[0]
    cumulative = np.concatenate([[0.0], np.cumsum(x, axis=0)])

    def integral(t: float):  # integral of x from 0 to t
        j = min(int(math.floor(t)), n_in - 1)
        return cumulative[j] + (t - j) * x[j]

    s = n_in / n_out
    return np.array([(integral((i + 1) * s) - integral(i * s)) / s for i in range(n_out)])


def exact_area_resize_2d(image: np.ndarray, n_h: int, n_w: int) -> np.ndarray:
    rows = np.stack([exact_area_resize_1d(image[:, j], n_h) for j in range(image.shape[1])], axis=1)
    return np.stack([exact_area_resize_1d(rows[i], n_w) for i in range(n_h)], axis=0)


# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 6, 5), (3, 8, 8), (1, 7, 4), (3, 10, 6)])
def test_against_direct_double_sum_dft(shape):
    rng = np.random.default_rng(sum(shape))
    images = rng.random((2, *shape))
    ours64 = measure_spectra(torch.tensor(images), dtype=torch.float64).numpy()
    ours32 = measure_spectra(torch.tensor(images, dtype=torch.float32)).numpy()
    for b in range(2):
        power = naive_power_map(images[b])
        np.testing.assert_allclose(power_map(torch.tensor(images[b : b + 1]))[0].numpy(), power, atol=1e-14)
        hf, radial, sectors = naive_spectra(power)
        np.testing.assert_allclose(ours64.hf_power[b], hf, atol=1e-13)
        np.testing.assert_allclose(ours64.radial_psd[b], radial, atol=1e-13)
        np.testing.assert_allclose(ours64.angular_psd[b], sectors, atol=1e-13)
        np.testing.assert_allclose(ours32.hf_power[b], hf, atol=2e-6)
        np.testing.assert_allclose(ours32.radial_psd[b], radial, atol=2e-6)
        np.testing.assert_allclose(ours32.angular_psd[b], sectors, atol=2e-6)
    assert ours64.radial_psd.shape[1] == len(radial_frequencies(*shape[1:]))


def test_parseval_and_dc_term():
    """sum P = 1 exactly; P(0,0) = mean_c m_c^2 for the channel means m_c of the normalised image."""
    rng = np.random.default_rng(3)
    images = rng.random((3, 3, 32, 24)) * [[[0.2]], [[1.0]], [[3.0]]]
    power = power_map(torch.tensor(images)).numpy()
    np.testing.assert_allclose(power.sum(axis=(1, 2)), 1.0, atol=1e-12)
    for b in range(3):
        x = images[b] - images[b].mean()
        x = x / np.sqrt((x**2).mean())
        np.testing.assert_allclose(power[b, 0, 0], np.mean(x.mean(axis=(1, 2)) ** 2), rtol=1e-10)
    spectra = measure_spectra(torch.tensor(images), dtype=torch.float64).numpy()
    np.testing.assert_allclose(spectra.radial_psd.sum(axis=1), 1.0, atol=1e-12)
    # the phenotype is the energy outside the disc r <= tau; the angular spectrum the energy outside r <= 0.1
    fy, fx = np.meshgrid(np.fft.fftfreq(32), np.fft.fftfreq(24), indexing="ij")
    radius = np.hypot(fy, fx)
    np.testing.assert_allclose(spectra.hf_power, 1.0 - power[:, radius <= 0.02].sum(axis=1), atol=1e-12)
    np.testing.assert_allclose(spectra.angular_psd.sum(axis=1), power[:, radius > 0.1].sum(axis=1), atol=1e-12)
    # a grey image has no DC term at all
    grey = np.repeat(images[:1, :1], 3, axis=1)
    assert abs(power_map(torch.tensor(grey))[0, 0, 0].item()) < 1e-15


@pytest.mark.parametrize(
    ("ky", "kx", "sectors"),
    [
        (0, 10, {0: 1.0}),
        (10, 0, {8: 1.0}),
        (7, 7, {4: 1.0}),  # 45 degrees
        (7, -7, {12: 1.0}),  # 135 degrees
        (3, 11, {1: 1.0}),  # atan(3/11) = 0.266 rad = 1.36 sectors
        (-13, 5, {10: 1.0}),  # -1.204 rad = -6.13 sectors, folded: 10
        (32, 0, {8: 1.0}),  # Nyquist row, a single bin
        # Nyquist column: f_x = -1/2 at both (5, 32) and its mirror (-5, 32), angles fold to pi - 0.155 and 0.155
        (5, 32, {15: 0.5, 1: 0.5}),
    ],
)
def test_grating_lands_in_its_ring_and_sector(ky, kx, sectors):
    n = 64
    ys, xs = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    grating = np.cos(2 * np.pi * (ky * ys + kx * xs) / n)
    images = torch.tensor(np.stack([grating, grating, grating])[None] * 0.3 + 0.5)
    spectra = measure_spectra(images, dtype=torch.float64).numpy()
    # the orientation and frequency on the FFT grid (32 cycles is the Nyquist frequency: f = -1/2)
    fy, fx = _freq(ky % n, n), _freq(kx % n, n)
    radius = math.hypot(fy, fx)
    ring = int(np.round(radius * n))
    expected_radial = np.zeros(spectra.radial_psd.shape[1])
    expected_radial[ring] = 1.0
    np.testing.assert_allclose(spectra.radial_psd[0], expected_radial, atol=1e-12)
    np.testing.assert_allclose(radial_frequencies(n, n)[ring], ring / n)
    expected_angular = np.zeros(16)
    for sector, share in sectors.items():
        expected_angular[sector] = share
    np.testing.assert_allclose(spectra.angular_psd[0], expected_angular, atol=1e-12)
    sector = max(sectors, key=sectors.get) if len(sectors) == 1 else 15
    assert abs(angular_bins()[sector] - (math.atan2(fy, fx) % math.pi)) <= math.pi / 32 + 1e-12
    np.testing.assert_allclose(spectra.hf_power[0], 1.0, atol=1e-12)


def test_low_frequency_grating_is_below_tau():
    n = 64  # 1 cycle per image: r = 1/64 < 0.02, and inside the angular exclusion disc
    ys = np.arange(n)[:, None] * np.ones((1, n))
    images = torch.tensor(np.cos(2 * np.pi * ys / n)[None, None])
    spectra = measure_spectra(images, dtype=torch.float64).numpy()
    assert abs(spectra.hf_power[0]) < 1e-12
    assert abs(spectra.radial_psd[0, 1] - 1.0) < 1e-12
    assert np.abs(spectra.angular_psd).max() < 1e-12


def test_brightness_and_contrast_invariance():
    rng = np.random.default_rng(4)
    images = rng.random((4, 3, 20, 28))
    base = measure_spectra(torch.tensor(images), dtype=torch.float64).numpy()
    for gain, offset in [(0.1, 0.0), (7.0, -3.0), (1.0, 100.0)]:
        other = measure_spectra(torch.tensor(images * gain + offset), dtype=torch.float64).numpy()
        for ours, theirs in zip(base, other):
            np.testing.assert_allclose(theirs, ours, atol=1e-10)
    # not invariant to a per-channel change (sanity check that the test can fail)
    tinted = images * np.array([1.0, 0.5, 2.0])[:, None, None]
    other = measure_spectra(torch.tensor(tinted), dtype=torch.float64).numpy()
    assert np.abs(other.hf_power - base.hf_power).max() > 1e-4


def test_batch_equals_per_image():
    rng = np.random.default_rng(5)
    images = torch.tensor(rng.random((5, 3, 16, 16)), dtype=torch.float32)
    batch = measure_spectra(images).numpy()
    for b in range(5):
        single = measure_spectra(images[b : b + 1]).numpy()
        for ours, theirs in zip(batch, single):
            np.testing.assert_allclose(ours[b], theirs[0], rtol=1e-6, atol=1e-9)


def test_constant_image_is_nan_and_bad_input_is_explained():
    spectra = measure_spectra(torch.ones(2, 3, 8, 8)).numpy()
    assert np.isnan(spectra.hf_power).all() and np.isnan(spectra.radial_psd).all()
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        measure_spectra(torch.ones(3, 8, 8))
    with pytest.raises(TypeError, match="torch.Tensor"):
        measure_spectra(np.ones((1, 3, 8, 8)))


def test_frequency_and_angle_coordinates():
    freqs = radial_frequencies(256, 256)
    assert len(freqs) == 182  # rings 0 .. round(256 / sqrt(2)) = 181
    np.testing.assert_allclose(np.diff(freqs), 1 / 256)
    assert len(radial_frequencies(10, 40)) == int(np.round(np.hypot(0.5, 0.5) * 10)) + 1
    np.testing.assert_allclose(angular_bins(), np.arange(16) * np.pi / 16)
    assert PHENOTYPE_ATTRS["phenotype_tau"] == 0.02 and PHENOTYPE_ATTRS["angular_num_sectors"] == 16


# --------------------------------------------------------------------------------------------------------
# area downsampling and centre crop


@pytest.mark.parametrize(("n_in", "n_out"), [(7, 3), (384, 256), (300, 256), (512, 256), (10, 10)])
def test_area_weights_match_exact_integral(n_in, n_out):
    rng = np.random.default_rng(n_in)
    x = rng.random(n_in)
    weights = area_weights(n_in, n_out)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-13)
    np.testing.assert_allclose(weights @ x, exact_area_resize_1d(x, n_out), atol=1e-12)
    with pytest.raises(ValueError, match="downsamples"):
        area_weights(n_out, n_in + 1)


@pytest.mark.parametrize(("height", "width"), [(300, 451), (451, 300), (257, 300)])
def test_prepare_fractional_factor_matches_exact_area_then_crop(height, width):
    rng = np.random.default_rng(height * width)
    image = rng.random((3, height, width))
    ours = prepare_for_spectrum(torch.tensor(image)).numpy()
    m = min(height, width)
    new_h, new_w = 256 * height // m, 256 * width // m
    top, left = (new_h - 256) // 2, (new_w - 256) // 2
    assert ours.shape == (3, 256, 256)
    for c in range(3):
        full = exact_area_resize_2d(image[c], new_h, new_w)
        np.testing.assert_allclose(ours[c], full[top : top + 256, left : left + 256], atol=1e-12)


@pytest.mark.parametrize(("height", "width"), [(512, 768), (768, 1536), (512, 512)])
def test_prepare_integer_factor_matches_pil_box(height, width):
    """At integer factors PIL's BOX filter is exact area averaging; compare on float 'F' images per channel."""
    rng = np.random.default_rng(width)
    image = rng.random((3, height, width)).astype(np.float32)
    ours = prepare_for_spectrum(torch.tensor(image)).numpy()
    m = min(height, width)
    new_h, new_w = 256 * height // m, 256 * width // m
    top, left = (new_h - 256) // 2, (new_w - 256) // 2
    for c in range(3):
        pil = np.asarray(Image.fromarray(image[c], mode="F").resize((new_w, new_h), Image.Resampling.BOX))
        np.testing.assert_allclose(ours[c], pil[top : top + 256, left : left + 256], atol=2e-6)


def test_pil_box_is_not_area_averaging_at_fractional_factors():
    """Why the resize is not PIL's: at 384 -> 256 its BOX weights are 0/1 at pixel centres, not fractions."""
    x = np.array([[1.0, 2.0, 4.0]], dtype=np.float32)
    pil = np.asarray(Image.fromarray(x, mode="F").resize((2, 1), Image.Resampling.BOX))[0]
    np.testing.assert_allclose(pil, [1.5, 4.0])  # PIL
    np.testing.assert_allclose(area_weights(3, 2) @ x[0], [4 / 3, 10 / 3])  # true area average
    np.testing.assert_allclose(exact_area_resize_1d(x[0].astype(np.float64), 2), [4 / 3, 10 / 3])


def test_prepare_crop_only_and_small_images():
    rng = np.random.default_rng(6)
    image = torch.tensor(rng.random((3, 256, 300)), dtype=torch.float32)
    np.testing.assert_array_equal(prepare_for_spectrum(image).numpy(), image[:, :, 22:278].numpy())
    small = torch.tensor(rng.random((3, 100, 300)), dtype=torch.float32)
    assert prepare_for_spectrum(small) is small
    batch = torch.tensor(rng.random((2, 3, 400, 300)), dtype=torch.float32)
    prepared = prepare_for_spectrum(batch)
    assert prepared.shape == (2, 3, 256, 256)
    np.testing.assert_allclose(prepared[1].numpy(), prepare_for_spectrum(batch[1]).numpy(), atol=1e-6)
    small_int = torch.full((3, 8, 8), 7, dtype=torch.uint8)
    assert prepare_for_spectrum(small_int) is small_int
    big_int = torch.tensor(rng.integers(0, 256, (3, 300, 260)), dtype=torch.uint8)
    resized = prepare_for_spectrum(big_int)
    assert resized.dtype == torch.float32
    np.testing.assert_allclose(resized.numpy(), prepare_for_spectrum(big_int.double()).numpy(), rtol=1e-5, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(7)
    images = torch.tensor(rng.random((8, 3, 64, 48)), dtype=torch.float32)
    cpu = measure_spectra(images).numpy()
    gpu = measure_spectra(images.cuda()).numpy()
    for ours, theirs in zip(cpu, gpu):
        np.testing.assert_allclose(theirs, ours, atol=1e-6)
    big = torch.tensor(rng.random((3, 600, 450)), dtype=torch.float32)
    np.testing.assert_allclose(prepare_for_spectrum(big.cuda()).cpu().numpy(), prepare_for_spectrum(big).numpy(),
                               atol=1e-5)


# --------------------------------------------------------------------------------------------------------
# folders


def test_measure_folder_streams_and_skips_bad_files(tmp_path):
    rng = np.random.default_rng(8)
    arrays = {
        "a.png": rng.integers(0, 256, (40, 32, 3), dtype=np.uint8),
        "sub/b.png": rng.integers(0, 256, (40, 32, 3), dtype=np.uint8),
        "sub/deeper/c.png": rng.integers(0, 256, (24, 30, 3), dtype=np.uint8),
        "d.png": rng.integers(0, 256, (40, 32, 3), dtype=np.uint8),
    }
    for name, array in arrays.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(tmp_path / name)
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "broken.png").write_bytes(data[: len(data) // 3])
    errors, progress = [], []
    ds = measure_folder(tmp_path, batch_size=2, num_workers=2,
                        on_error=lambda path, reason: errors.append(path.name), on_progress=progress.append)
    assert progress == [2, 2, 1]  # every batch reported, the unreadable file included
    assert list(ds["path"].values) == ["a.png", "d.png", "sub/b.png", "sub/deeper/c.png"]
    assert ds.attrs["num_failed"] == 1 and errors == ["broken.png"]
    assert json.loads(ds.attrs["failed"])[0]["path"] == "broken.png"
    assert ds.attrs["num_images"] == 4 and ds.attrs["phenotype_tau"] == 0.02
    for i, name in enumerate(ds["path"].values):
        array = arrays[name].transpose(2, 0, 1)[None] / 255.0
        power = naive_power_map(array[0]) if name == "sub/deeper/c.png" else power_map(torch.tensor(array))[0].numpy()
        hf, radial, sectors = naive_spectra(power)
        np.testing.assert_allclose(ds["hf_power"].values[i], hf, atol=2e-6)
        np.testing.assert_allclose(ds["angular_psd"].values[i], sectors, atol=2e-6)
        if name == "sub/deeper/c.png":  # analysed at another size: its rings are not on this frequency axis
            assert np.isnan(ds["radial_psd"].values[i]).all()
        else:
            np.testing.assert_allclose(ds["radial_psd"].values[i], radial, atol=2e-6)
        assert (ds["height"].values[i], ds["width"].values[i]) == arrays[name].shape[:2]
    assert ds.attrs["num_radial_mismatched"] == 1
    np.testing.assert_allclose(ds["frequency"].values, radial_frequencies(40, 32))


def test_measure_folder_radial_axis_follows_the_most_common_size(tmp_path):
    rng = np.random.default_rng(9)
    Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(tmp_path / "0-small.png")
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(tmp_path / f"{i + 1}.png")
    ds = measure_folder(tmp_path, batch_size=8)
    assert list(ds["path"].values)[0] == "0-small.png"
    np.testing.assert_allclose(ds["frequency"].values, radial_frequencies(20, 20))
    assert np.isnan(ds["radial_psd"].values[0]).all() and np.isfinite(ds["radial_psd"].values[1:]).all()
    assert ds.attrs["num_radial_mismatched"] == 1


def test_measure_folder_streams_with_bounded_lookahead(tmp_path, monkeypatch):
    import chain.spectra as spectra_module

    rng = np.random.default_rng(10)
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"{i:02d}.png")
    loads, seen_at_measure = [], []
    original_load, original_measure = spectra_module._load_prepared, spectra_module.measure_spectra

    def counting_load(index, path):
        loads.append(index)
        return original_load(index, path)

    def recording_measure(images, **kwargs):
        seen_at_measure.append((len(loads), images.shape[0]))
        return original_measure(images, **kwargs)

    monkeypatch.setattr(spectra_module, "_load_prepared", counting_load)
    monkeypatch.setattr(spectra_module, "measure_spectra", recording_measure)
    ds = measure_folder(tmp_path, batch_size=2, num_workers=1)
    assert ds.sizes["image"] == 24 and len(loads) == 24
    # never more than 3 batches decoded ahead of the batch being measured
    measured = 0
    for loaded_so_far, size in seen_at_measure:
        assert loaded_so_far - measured <= 3 * 2
        measured += size


def test_measure_folder_mixes_8_and_16_bit_files(tmp_path):
    from chain.images import load_image

    rng = np.random.default_rng(11)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 65536, (16, 16), dtype=np.uint16)).save(tmp_path / "b.png")
    big = rng.integers(0, 256, (300, 280, 3), dtype=np.uint8)
    Image.fromarray(big).save(tmp_path / "c.png")
    ds = measure_folder(tmp_path)
    for i, name in enumerate(["a.png", "b.png", "c.png"]):
        image = prepare_for_spectrum(load_image(tmp_path / name).double())
        expected = measure_spectra(image[None], dtype=torch.float64).numpy()
        np.testing.assert_allclose(ds["hf_power"].values[i], expected.hf_power[0], atol=2e-6)
        np.testing.assert_allclose(ds["angular_psd"].values[i], expected.angular_psd[0], atol=2e-6)


def test_tau_threshold_moves_the_phenotype_cut():
    """hf_power(tau) = the energy of a grating counted only when its frequency lies above tau: a grating of
    6 cycles per 32 pixels (r = 0.1875) counts fully at tau = 0.16 and not at tau = 0.2."""
    import math

    from chain.spectra import measure_spectra, phenotype_attrs

    size = 32
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    grating = torch.cos(2 * math.pi * 6 * x / size).to(torch.float64)
    images = grating.expand(1, 3, size, size).clone()
    assert float(measure_spectra(images, dtype=torch.float64, tau=0.16).hf_power[0]) == pytest.approx(1.0, abs=1e-12)
    assert float(measure_spectra(images, dtype=torch.float64, tau=0.2).hf_power[0]) == pytest.approx(0.0, abs=1e-12)
    assert phenotype_attrs(0.16)["phenotype_tau"] == 0.16
