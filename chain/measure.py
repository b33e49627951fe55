"""Measuring the images of one iteration: the phenotype and spectra of every image (chain.spectra) and,
with a feature encoder and a CLIP model, the metrics against the original images D_0 (chain.metrics).

`Measurer` holds what stays fixed through a run (the metrics configuration, the encoder, the CLIP model
and D_0's features); calling it on a set of images returns what chain.store records for their cell.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import torch

from chain.config import ChainConfig, MetricsConfig
from chain.errors import RunError


@dataclasses.dataclass
class Measurements:
    """hf_power (N,) per image; radial_psd (F,) and angular_psd (16,) means over the images; features
    (N, D) or None without an encoder."""

    hf_power: np.ndarray
    radial_psd: np.ndarray
    angular_psd: np.ndarray
    features: np.ndarray | None


def measure(images: torch.Tensor, *, encoder=None, batch_size: int = 32, tau: float = 0.02) -> Measurements:
    """Phenotype and spectra of every image (chain.spectra, docs/phenotype.md), features if an
    encoder is given. The spectra are means over images."""
    from chain.spectra import measure_spectra, prepare_for_spectrum

    hf, radial, angular = [], [], []
    for start in range(0, len(images), batch_size):
        chunk = torch.stack([prepare_for_spectrum(im) for im in images[start : start + batch_size]])
        s = measure_spectra(chunk, dtype=torch.float64, tau=tau).numpy()
        hf.append(s.hf_power)
        radial.append(s.radial_psd)
        angular.append(s.angular_psd)
    features = None
    if encoder is not None:
        from chain.features import extract_features

        features = extract_features(encoder, images, batch_size=batch_size)
    # A constant image (one grey level) has no AC energy: its phenotype and spectra are undefined (NaN) and
    # it is left out of the mean spectra rather than blanking them.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a cell of constant images only: NaN spectra
        radial_mean = np.nanmean(np.concatenate(radial), axis=0)
        angular_mean = np.nanmean(np.concatenate(angular), axis=0)
    return Measurements(np.concatenate(hf), radial_mean, angular_mean, features)


def feature_metrics(features: np.ndarray | None, features_0: np.ndarray | None, *, ipp: int, k: int) -> dict:
    """FD, recall and SFD of D_k against D_0 (chain.metrics); empty without features."""
    if features is None or features_0 is None:
        return {}
    from chain.metrics import frechet_distance, recall, sfd

    out = {"sfd": float(sfd(features[::ipp], features_0))}
    # FD needs two rows per set; recall's k-NN radii need more than k generated images (else NaN)
    out["fd_dinov2"] = float(frechet_distance(features_0, features)) if min(len(features), len(features_0)) > 1 else math.nan
    out["recall"] = float(recall(features_0, features, k=k)) if len(features) > k else math.nan
    return out


@dataclasses.dataclass
class Measurer:
    """What measuring a cell needs through a whole run: the metrics configuration, the feature encoder and
    CLIP model (None: not configured) and D_0's features, the `reference` of the feature metrics (set it
    from `measure(originals)` before measuring a generated cell)."""

    config: MetricsConfig
    encoder: object | None = None
    clip: tuple | None = None  # (CLIPModel, CLIPTokenizer)
    reference: np.ndarray | None = None

    def measure(self, images: torch.Tensor) -> Measurements:
        """Phenotype, spectra and features of `images` (module `measure`)."""
        return measure(images, encoder=self.encoder, batch_size=self.config.batch_size,
                       tau=self.config.phenotype_tau)

    def metrics(self, m: Measurements, images: torch.Tensor, captions: list[str], *,
                images_per_prompt: int = 1) -> dict[str, float]:
        """The configured feature metrics of measured images against D_0: fd_dinov2, recall and sfd (with an
        encoder), clip_score of the images with their captions (with a CLIP model)."""
        out = feature_metrics(m.features, self.reference, ipp=images_per_prompt, k=self.config.recall_k)
        if self.clip is not None:
            from chain.metrics import clip_score

            model, tokenizer = self.clip
            out["clip_score"] = float(clip_score(model, tokenizer, images, captions))
        return out

    def __call__(self, images: torch.Tensor, captions: list[str], *, images_per_prompt: int = 1
                 ) -> tuple[Measurements, dict[str, float]]:
        """Measure one cell: (measurements, metrics)."""
        m = self.measure(images)
        return m, self.metrics(m, images, captions, images_per_prompt=images_per_prompt)


def build_encoder(config: ChainConfig, device):
    """The feature encoder of `metrics.encoder` ("dinov2:<folder or HF id>", or "toy": chain.toy's committed
    encoder), or None when it is ""."""
    spec = config.metrics.encoder
    if not spec:
        return None
    if spec == "toy":
        from chain.toy import load_toy_encoder

        return load_toy_encoder(device=device)
    kind, _, name = spec.partition(":")
    if kind != "dinov2" or not name:
        raise RunError(f"metrics.encoder {spec!r}: expected 'dinov2:<folder or HF id>', 'toy' or ''")
    from chain.features import Dinov2Encoder

    try:
        return Dinov2Encoder.from_pretrained(name, device=device)
    except FileNotFoundError as exc:
        raise RunError(f"metrics.encoder: {exc}") from None


def build_clip(config: ChainConfig, device):
    """(CLIPModel, CLIPTokenizer) of `metrics.clip_model`, or None when it is ""."""
    if not config.metrics.clip_model:
        return None
    from transformers import CLIPModel, CLIPTokenizer

    name = config.metrics.clip_model
    try:
        model = CLIPModel.from_pretrained(name, local_files_only=True).to(device).eval()
        tokenizer = CLIPTokenizer.from_pretrained(name, local_files_only=True)
    except OSError as exc:
        raise RunError(f"metrics.clip_model {name!r} is not a local folder or cached HF id: {exc}") from None
    return model, tokenizer
