"""chain.fingerprints against scipy.signal.wiener, a direct circular autocorrelation and a direct DFT."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.signal
import torch
from PIL import Image

from chain.fingerprints import (
    DnCNNResidual,
    ResidualExtractor,
    WienerResidual,
    fingerprint,
    fingerprint_folder,
    make_dncnn,
    residual_power,
)
from chain.spectra import area_weights


def direct_circular_autocorrelation(x: np.ndarray) -> np.ndarray:
    """A(n, m) = sum_{a,b} x(a, b) x(a + n, b + m) / (H W), indices modulo the size; lag (0, 0) at [0, 0]."""
    h, w = x.shape
    out = np.zeros((h, w))
    for n in range(h):
        for m in range(w):
            out[n, m] = (x * np.roll(x, shift=(-n, -m), axis=(0, 1))).sum() / (h * w)
    return out


def test_wiener_residual_matches_scipy():
    rng = np.random.default_rng(0)
    images = rng.random((2, 3, 17, 12))
    images[1, 2] = 0.25  # a constant channel: zero residual inside, the zero padding shows at the borders
    residual = WienerResidual()(torch.tensor(images)).numpy()
    for b in range(2):
        for c in range(3):
            with np.errstate(divide="ignore", invalid="ignore"):
                expected = images[b, c] - scipy.signal.wiener(images[b, c], mysize=3)
            np.testing.assert_allclose(residual[b, c], expected, atol=1e-12)
    np.testing.assert_allclose(residual[1, 2, 1:-1, 1:-1], 0.0, atol=1e-15)
    five = WienerResidual(5)(torch.tensor(images[:1])).numpy()
    np.testing.assert_allclose(five[0, 0], images[0, 0] - scipy.signal.wiener(images[0, 0], mysize=5), atol=1e-12)
    assert WienerResidual().name == "wiener3x3" and isinstance(WienerResidual(), ResidualExtractor)
    with pytest.raises(ValueError, match="odd"):
        WienerResidual(4)


def test_residual_power_is_direct_dft_squared_and_area_resized():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 1, 6, 5))
    ys, xs = np.meshgrid(np.arange(6), np.arange(5), indexing="ij")
    direct = np.zeros((6, 5))
    for u in range(6):
        for v in range(5):
            direct[u, v] = abs((x[0, 0] * np.exp(-2j * np.pi * (u * ys / 6 + v * xs / 5))).sum()) ** 2 / 30
    np.testing.assert_allclose(residual_power(torch.tensor(x))[0, 0].numpy(), direct, atol=1e-12)
    resized = residual_power(torch.tensor(x), size=4)[0, 0].numpy()
    np.testing.assert_allclose(resized, area_weights(6, 4) @ direct @ area_weights(5, 4).T, atol=1e-12)


class _Identity:
    name = "identity"

    def __call__(self, images):
        return images


def test_fingerprint_wiener_khinchin_against_direct_autocorrelation():
    rng = np.random.default_rng(2)
    batches = [torch.tensor(rng.standard_normal((3, 2, 8, 6))), torch.tensor(rng.standard_normal((2, 2, 8, 6)))]
    result = fingerprint(batches, _Identity())
    everything = np.concatenate([b.numpy() for b in batches])
    assert result.num_images == 5 and result.extractor == "identity"
    for c in range(2):
        expected_acf = np.mean([direct_circular_autocorrelation(everything[i, c]) for i in range(5)], axis=0)
        np.testing.assert_allclose(result.autocorrelation[c], np.fft.fftshift(expected_acf), atol=1e-12)
        expected_power = np.mean([np.abs(np.fft.fft2(everything[i, c], norm="ortho")) ** 2 for i in range(5)], axis=0)
        np.testing.assert_allclose(result.power[c], np.fft.fftshift(expected_power), atol=1e-12)
    # lag 0 sits at the centre and equals the mean energy per pixel (Parseval)
    np.testing.assert_allclose(result.autocorrelation[:, 4, 3], (everything**2).mean(axis=(0, 2, 3)), atol=1e-12)
    ds = result.to_dataset()
    assert ds.attrs["extractor"] == "identity" and ds["residual_power"].shape == (2, 8, 6)
    assert ds["lag_y"].values[4] == 0 and ds["frequency_x"].values[3] == 0.0


def test_fingerprint_of_a_periodic_pattern_peaks_at_its_period():
    """A residual with period 4 along x has autocorrelation peaks at lags 0, +-4, +-8 along x."""
    rng = np.random.default_rng(3)
    period = np.tile(rng.standard_normal((1, 4)), (16, 4))  # (16, 16), columns repeat every 4
    images = torch.tensor(period[None, None] + 0.1 * rng.standard_normal((4, 1, 16, 16)))
    acf = fingerprint(images, _Identity()).autocorrelation[0]
    row = acf[8]  # lag_y = 0
    peaks = {int(i) - 8 for i in np.argsort(row)[-4:]}
    assert peaks == {-8, -4, 0, 4}


def test_fingerprint_shapes_and_errors():
    rng = np.random.default_rng(4)
    mixed = [torch.tensor(rng.random((1, 3, 12, 12))), torch.tensor(rng.random((1, 3, 10, 14)))]
    with pytest.raises(ValueError, match="size="):
        fingerprint(mixed)
    resized = fingerprint(mixed, size=8)
    assert resized.power.shape == (3, 8, 8) and resized.extractor == "wiener3x3"
    with pytest.raises(ValueError, match="at least one"):
        fingerprint([])


def test_dncnn_shape_keys_and_loading(tmp_path):
    torch.manual_seed(0)
    network = make_dncnn()
    convs = [m for m in network if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 17 and sum(isinstance(m, torch.nn.BatchNorm2d) for m in network) == 15
    assert convs[0].bias is not None and convs[1].bias is None and convs[-1].bias is not None
    keys = set(network.state_dict())
    assert {"0.weight", "0.bias", "2.weight", "3.running_mean", "47.weight", "47.bias"} <= keys
    small = make_dncnn(features=4)
    out = DnCNNResidual(small)(torch.rand(1, 3, 40, 40))
    assert out.shape == (1, 3, 6, 6)  # 17 unpadded 3x3 convolutions: 40 - 34
    torch.save({"network": network.state_dict()}, tmp_path / "model_best.th")
    loaded = DnCNNResidual.from_weights(tmp_path / "model_best.th")
    assert loaded.name == "dncnn:model_best.th"
    x = torch.rand(1, 3, 36, 38)
    np.testing.assert_allclose(loaded(x).numpy(), network.eval()(x).detach().numpy(), atol=1e-6)
    torch.save(small.state_dict(), tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="wrong.pt"):
        DnCNNResidual.from_weights(tmp_path / "wrong.pt")
    with pytest.raises(FileNotFoundError, match="missing.th"):
        DnCNNResidual.from_weights(tmp_path / "missing.th")


def test_fingerprint_folder_records_extractor_and_skips_bad_files(tmp_path):
    rng = np.random.default_rng(5)
    arrays = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(3)]
    for i, array in enumerate(arrays):
        Image.fromarray(array).save(tmp_path / f"{i}.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    result = fingerprint_folder(tmp_path, batch_size=2)
    assert result.num_images == 3 and result.extractor == "wiener3x3"
    images = torch.tensor(np.stack(arrays).transpose(0, 3, 1, 2) / 255.0, dtype=torch.float32)
    direct = fingerprint(images)
    np.testing.assert_allclose(result.power, direct.power, rtol=1e-5, atol=1e-12)
