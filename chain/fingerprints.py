"""Fingerprints of an image set (Appendix G.4 of the paper, after Corvi et al. 2023).

A fingerprint is the mean power spectrum of the images' noise residuals and its autocorrelation:

    R_i = residual(x_i)                         (a denoiser's estimate of the noise in image i, per channel)
    P(u, v) = mean_i |DFT_ortho(R_i)(u, v)|^2   (per channel; Corvi et al. area-resize each |DFT|^2 to a
                                                 common size first, which `size=` reproduces)
    A(n, m) = IDFT(P)(n, m)                     (Wiener-Khinchin: the mean circular autocorrelation of the
                                                 residuals, sum_{a,b} R(a, b) R(a + n, b + m) / (H W))

Both are returned centred (numpy.fft.fftshift), as Corvi et al. plot them.

The residual extractor is pluggable (anything with a `name` and a `__call__(images_bchw) -> residuals`):

- `WienerResidual` (the default): residual = image - local adaptive Wiener filter of each channel, the
  classical noise-residual filter of camera forensics; the filter is scipy.signal.wiener's (window 3 x 3,
  zero padding at the borders, noise power = mean local variance of that channel of that image).
- `DnCNNResidual`: the 17-layer DnCNN of Corvi et al. without padding (256 in, 222 out), whose output is
  the residual. Its weights are not shipped and not downloadable here; `DnCNNResidual.from_weights(path)`
  loads a state dict saved by their code (`{"network": state_dict}`) or a plain state dict.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from chain.spectra import _area_weights_numpy


@runtime_checkable
class ResidualExtractor(Protocol):
    """Maps images (B, C, H, W) to noise residuals (B, C, H', W'); `name` goes into the outputs."""

    name: str

    def __call__(self, images_bchw: torch.Tensor) -> torch.Tensor: ...


class WienerResidual:
    """residual = x - wiener(x): scipy.signal.wiener per channel (window `size`, zero-padded borders).

    wiener(x) = m + (1 - noise / v) (x - m) where v >= noise, else m; m and v are the local mean and
    variance over the window, noise = mean of v over the channel.
    """

    def __init__(self, size: int = 3):
        if size < 1 or size % 2 == 0:
            raise ValueError(f"WienerResidual size must be a positive odd integer, got {size}")
        self.size = size
        self.name = f"wiener{size}x{size}"

    def __call__(self, images_bchw: torch.Tensor) -> torch.Tensor:
        x = images_bchw
        if not x.is_floating_point():
            x = x.to(torch.float32)
        batch, channels, height, width = x.shape
        flat = x.reshape(batch * channels, 1, height, width)
        kernel = torch.ones(1, 1, self.size, self.size, dtype=x.dtype, device=x.device) / self.size**2
        pad = self.size // 2
        local_mean = F.conv2d(flat, kernel, padding=pad)
        local_var = F.conv2d(flat.square(), kernel, padding=pad) - local_mean.square()
        noise = local_var.mean(dim=(2, 3), keepdim=True)
        gain = 1.0 - noise / torch.where(local_var > 0, local_var, torch.ones_like(local_var))
        filtered = torch.where(local_var < noise, local_mean, local_mean + gain * (flat - local_mean))
        return (flat - filtered).reshape(batch, channels, height, width)


def make_dncnn(channels: int = 3, features: int = 64, depth: int = 17) -> nn.Sequential:
    """The DnCNN of Corvi et al. without padding, as an nn.Sequential whose state-dict keys match theirs.

    conv(3x3, bias) + ReLU, then depth - 2 times conv(3x3, no bias) + BatchNorm + ReLU, then conv(3x3, bias).
    Each convolution trims one pixel per side: an H x W input gives (H - 2 depth) x (W - 2 depth).
    """
    layers: list[nn.Module] = [nn.Conv2d(channels, features, 3, padding=0, bias=True), nn.ReLU(inplace=True)]
    for _ in range(depth - 2):
        layers += [nn.Conv2d(features, features, 3, padding=0, bias=False), nn.BatchNorm2d(features, momentum=0.1),
                   nn.ReLU(inplace=True)]
    layers.append(nn.Conv2d(features, channels, 3, padding=0, bias=True))
    return nn.Sequential(*layers)


class DnCNNResidual:
    """Residual = DnCNN(x) on images in [0, 1] (Corvi et al. feed RGB / 256; here RGB / 255)."""

    def __init__(self, network: nn.Module, *, name: str = "dncnn"):
        self.network = network.eval()
        self.name = name

    @classmethod
    def from_weights(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu") -> DnCNNResidual:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"DnCNN weights not found: {path} (point at the denoiser's state-dict file)")
        state = torch.load(path, map_location=device, weights_only=True)
        if isinstance(state, dict) and "network" in state:
            state = state["network"]
        network = make_dncnn()
        try:
            network.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(f"{path} is not a 17-layer DnCNN state dict: {exc}") from None
        return cls(network.to(device), name=f"dncnn:{path.name}")

    def __call__(self, images_bchw: torch.Tensor) -> torch.Tensor:
        param = next(self.network.parameters())
        with torch.inference_mode():
            return self.network(images_bchw.to(param.device, param.dtype))


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """Mean residual power spectrum and autocorrelation, (C, S, S) float64, centred (fftshift)."""

    power: np.ndarray
    autocorrelation: np.ndarray
    num_images: int
    extractor: str

    def to_dataset(self):
        import xarray as xr

        channels, height, width = self.power.shape
        fy = np.fft.fftshift(np.fft.fftfreq(height))
        fx = np.fft.fftshift(np.fft.fftfreq(width))
        lag_y = np.arange(height) - height // 2
        lag_x = np.arange(width) - width // 2
        return xr.Dataset(
            {
                "residual_power": (("channel", "frequency_y", "frequency_x"), self.power),
                "residual_autocorrelation": (("channel", "lag_y", "lag_x"), self.autocorrelation),
            },
            coords={"channel": np.arange(channels), "frequency_y": fy, "frequency_x": fx, "lag_y": lag_y,
                    "lag_x": lag_x},
            attrs={"extractor": self.extractor, "num_images": self.num_images,
                   "definition": "mean |DFT_ortho(residual)|^2 per channel and its inverse DFT (Wiener-Khinchin), "
                   "fftshift-centred (Appendix G.4, Corvi et al. 2023)"},
        )


def residual_power(residuals_bchw: torch.Tensor, *, size: int | None = None) -> torch.Tensor:
    """(B, C, S, S') |DFT_ortho|^2 of each residual channel, numpy.fft order, float64.

    With `size`, each map is area-resized to size x size (Corvi et al.'s `fft2_area`, on the uncentred map).
    """
    spectrum = torch.fft.fft2(residuals_bchw.to(torch.float64), norm="ortho")
    power = spectrum.real.square() + spectrum.imag.square()
    if size is not None:
        height, width = power.shape[-2:]
        a_h = torch.as_tensor(_area_weights_numpy(height, size), device=power.device)
        a_w = torch.as_tensor(_area_weights_numpy(width, size), device=power.device)
        power = a_h @ power @ a_w.T
    return power


def fingerprint(
    batches: Iterable[torch.Tensor] | torch.Tensor,
    extractor: ResidualExtractor | None = None,
    *,
    size: int | None = None,
) -> Fingerprint:
    """Fingerprint of the images in `batches` (a (B, C, H, W) tensor or an iterable of them), streamed.

    Without `size` every residual must have one shape; with it every power map is area-resized to
    size x size first (size no larger than any residual).
    """
    extractor = extractor if extractor is not None else WienerResidual()
    if isinstance(batches, torch.Tensor):
        batches = [batches]
    total = None
    count = 0
    for batch in batches:
        residuals = extractor(batch)
        power = residual_power(residuals, size=size)
        if total is not None and power.shape[1:] != total.shape:
            raise ValueError(
                f"residuals of shape {tuple(residuals.shape[1:])} do not match the earlier "
                f"{tuple(total.shape)}; pass size= to area-resize every power spectrum to one size"
            )
        total = power.sum(dim=0) if total is None else total + power.sum(dim=0)
        count += power.shape[0]
    if total is None or count == 0:
        raise ValueError("fingerprint needs at least one image")
    mean_power = total / count
    autocorrelation = torch.fft.ifft2(mean_power).real
    return Fingerprint(
        power=np.fft.fftshift(mean_power.cpu().numpy(), axes=(-2, -1)),
        autocorrelation=np.fft.fftshift(autocorrelation.cpu().numpy(), axes=(-2, -1)),
        num_images=count,
        extractor=extractor.name,
    )


def fingerprint_folder(
    root: str | os.PathLike,
    extractor: ResidualExtractor | None = None,
    *,
    size: int | None = None,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
) -> Fingerprint:
    """Fingerprint of every image under `root` (decoded as they are, unreadable files skipped)."""
    from chain.errors import ImageReadError
    from chain.images import load_image
    from qtmio.images import list_images

    paths = list_images(root)

    def batches():
        pending: list[torch.Tensor] = []
        for path in paths:
            try:
                image = load_image(path)
            except ImageReadError:
                continue
            if pending and image.shape != pending[0].shape:
                yield torch.stack(pending).to(device)
                pending = []
            pending.append(image)
            if len(pending) == batch_size:
                yield torch.stack(pending).to(device)
                pending = []
        if pending:
            yield torch.stack(pending).to(device)

    return fingerprint(batches(), extractor, size=size)
