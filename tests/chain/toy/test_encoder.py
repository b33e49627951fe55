"""The committed toy feature encoder: the FeatureEncoder protocol, and held-out accuracy on fresh images far
above chance (binomial tail against the best caption-blind guess)."""

import math

import numpy as np
import pytest
import torch

from chain.toy.dataset import sample_toy_images
from chain.toy.encoder import LABELS, load_toy_encoder


@pytest.fixture(scope="module")
def encoder():
    return load_toy_encoder()


def test_feature_encoder_protocol(encoder):
    assert isinstance(encoder.name, str) and encoder.name
    assert encoder.feature_dim == 128
    x = torch.rand(5, 3, 32, 32)
    f = encoder(x)
    assert f.shape == (5, 128) and f.dtype == torch.float32 and torch.isfinite(f).all()
    assert not f.requires_grad
    # Larger images are area-resized: a 64 x 64 nearest-neighbour upsampling has the same features.
    big = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    torch.testing.assert_close(encoder(big), f, atol=1e-5, rtol=1e-5)
    # Batch independence (eval-mode batch norm).
    torch.testing.assert_close(encoder(x[:2]), f[:2], atol=1e-5, rtol=1e-5)
    features = pytest.importorskip("chain.features")
    if hasattr(features, "FeatureEncoder") and getattr(features.FeatureEncoder, "_is_runtime_protocol", False):
        assert isinstance(encoder, features.FeatureEncoder)


def _binomial_tail(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))


@pytest.mark.parametrize("distribution", ["pretrain", "d0"])
def test_heldout_accuracy_far_above_chance(encoder, distribution):
    """Fresh images from a seed the training never used (training draws default_rng([seed, step]))."""
    images, scenes = sample_toy_images(np.random.default_rng([987654321, 5]), 200, distribution=distribution)
    pred = encoder.predict(torch.from_numpy(images))
    for head in ("shape", "colour", "background"):
        truth = [getattr(s, head) for s in scenes]
        hits = sum(p == t for p, t in zip(pred[head], truth))
        chance = max(truth.count(c) for c in set(truth)) / len(truth)
        assert hits / len(truth) > 0.8, (head, hits)
        assert _binomial_tail(hits, len(truth), chance) < 1e-6, (head, hits, chance)
    assert set(pred) == set(LABELS)


def test_features_separate_distributions(encoder):
    """Features of two samples of D_0 are closer (Frechet distance) than D_0 against the pretraining set."""
    def fd(a, b):
        """|mu_a - mu_b|^2 + tr Ca + tr Cb - 2 tr sqrt(Ca^1/2 Cb Ca^1/2) (REFERENCE.md, metrics)."""
        mu = a.mean(0) - b.mean(0)
        ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        w, v = np.linalg.eigh(ca)
        root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        cross = np.sqrt(np.clip(np.linalg.eigvalsh(root @ cb @ root), 0, None)).sum()
        return float(mu @ mu + np.trace(ca) + np.trace(cb) - 2 * cross)

    a, _ = sample_toy_images(np.random.default_rng(1), 300, distribution="d0")
    b, _ = sample_toy_images(np.random.default_rng(2), 300, distribution="d0")
    c, _ = sample_toy_images(np.random.default_rng(3), 300, distribution="pretrain")
    fa, fb, fc = (encoder(torch.from_numpy(x)).double().numpy() for x in (a, b, c))
    assert fd(fa, fb) < 0.5 * fd(fa, fc)
