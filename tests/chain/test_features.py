"""chain.features: dgm-eval preprocessing against PIL, DINOv2 features against the model's own forward pass
(a tiny random Dinov2Model), offline loading, and batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from chain.features import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Dinov2Encoder,
    FeatureEncoder,
    dgm_eval_preprocess,
    extract_features,
)


def _tiny_dinov2():
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          patch_size=14, image_size=56)
    return Dinov2Model(config).eval()


def _smooth_images(num, height, width, seed):
    rng = np.random.default_rng(seed)
    ys, xs = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    out = np.zeros((num, 3, height, width))
    for n in range(num):
        for c in range(3):
            for _ in range(3):
                fy, fx, phase = rng.uniform(0.5, 3), rng.uniform(0.5, 3), rng.uniform(0, 6.3)
                out[n, c] += np.cos(2 * np.pi * (fy * ys + fx * xs) + phase)
    return np.round((0.5 + 0.12 * out) * 255) / 255


def _pil_reference(images_01: np.ndarray, size: int, *, float_mode: bool) -> np.ndarray:
    """dgm-eval's transform written with PIL: resize (size, size) bicubic, /255, ImageNet mean/std."""
    out = []
    for image in images_01:
        if float_mode:
            channels = [np.asarray(Image.fromarray(image[c].astype(np.float32), mode="F").resize(
                (size, size), Image.Resampling.BICUBIC)) for c in range(3)]
            resized = np.stack(channels)
        else:
            pil = Image.fromarray(np.round(image.transpose(1, 2, 0) * 255).astype(np.uint8))
            resized = np.asarray(pil.resize((size, size), Image.Resampling.BICUBIC)).transpose(2, 0, 1) / 255.0
        out.append((resized - np.array(IMAGENET_MEAN)[:, None, None]) / np.array(IMAGENET_STD)[:, None, None])
    return np.stack(out)


@pytest.mark.parametrize(("height", "width"), [(48, 64), (300, 260), (224, 224)])
def test_dgm_eval_preprocess_matches_pil_bicubic(height, width):
    images = _smooth_images(2, height, width, seed=height)
    ours = dgm_eval_preprocess(torch.tensor(images, dtype=torch.float32)).numpy()
    assert ours.shape == (2, 3, 224, 224)
    # same kernel as PIL on float images (no 8-bit rounding): agreement to float32 rounding
    np.testing.assert_allclose(ours, _pil_reference(images, 224, float_mode=True), atol=1e-4)
    # dgm-eval's actual path resizes 8-bit images, rounding after each of PIL's two passes: at most a
    # little over one level apart (/ std >= 0.224), a third of a level on average
    levels = np.abs(ours - _pil_reference(images, 224, float_mode=False)) * 0.224 * 255
    assert levels.max() < 1.5 and levels.mean() < 0.4
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        dgm_eval_preprocess(torch.zeros(1, 1, 8, 8))


def test_dinov2_encoder_is_pooler_output_of_the_model():
    model = _tiny_dinov2()
    encoder = Dinov2Encoder(model, image_size=56)
    assert isinstance(encoder, FeatureEncoder) and encoder.feature_dim == 32
    images = _smooth_images(3, 70, 50, seed=1)
    ours = encoder(torch.tensor(images, dtype=torch.float32))
    pixels = torch.tensor(_pil_reference(images, 56, float_mode=True), dtype=torch.float32)
    with torch.no_grad():
        output = model(pixel_values=pixels)
        # CLS token after the final layer norm, computed from the parts
        hidden = model.encoder(model.embeddings(pixels)).last_hidden_state
        cls = model.layernorm(hidden)[:, 0]
    np.testing.assert_allclose(ours.numpy(), output.pooler_output.numpy(), atol=1e-4)
    np.testing.assert_allclose(output.pooler_output.numpy(), cls.numpy(), atol=1e-6)
    # the default 224 x 224 input works on the same model (position embeddings interpolated)
    assert Dinov2Encoder(model)(torch.tensor(images[:1], dtype=torch.float32)).shape == (1, 32)


def test_from_pretrained_reads_local_folders_only(tmp_path):
    model = _tiny_dinov2()
    model.save_pretrained(tmp_path / "dinov2-tiny")
    encoder = Dinov2Encoder.from_pretrained(str(tmp_path / "dinov2-tiny"), image_size=56)
    images = torch.tensor(_smooth_images(2, 56, 56, seed=2), dtype=torch.float32)
    np.testing.assert_allclose(encoder(images).numpy(), Dinov2Encoder(model, image_size=56)(images).numpy(),
                               atol=1e-6)
    assert "dinov2-tiny" in encoder.name
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        Dinov2Encoder.from_pretrained(str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="not-a-real-org/dinov2-none"):
        Dinov2Encoder.from_pretrained("not-a-real-org/dinov2-none")


class _MeanColour:
    """An injected encoder: per-channel means and a product, computed directly."""

    feature_dim = 4
    name = "mean-colour"

    def __init__(self):
        self.calls = []

    def __call__(self, images):
        self.calls.append(images.shape[0])
        means = images.mean(dim=(2, 3))
        return torch.cat([means, (means[:, :1] * means[:, 1:2])], dim=1)


def test_extract_features_batching_and_inputs():
    rng = np.random.default_rng(3)
    images = torch.tensor(rng.random((7, 3, 5, 6)), dtype=torch.float32)
    encoder = _MeanColour()
    assert isinstance(encoder, FeatureEncoder)
    features = extract_features(encoder, images, batch_size=3)
    assert features.dtype == np.float64 and features.shape == (7, 4) and encoder.calls == [3, 3, 1]
    expected = images.double().mean(dim=(2, 3)).numpy()
    np.testing.assert_allclose(features[:, :3], expected, atol=1e-6)
    np.testing.assert_allclose(features[:, 3], expected[:, 0] * expected[:, 1], atol=1e-6)
    from_batches = extract_features(_MeanColour(), [images[:2], images[2:]], batch_size=4)
    seen = []
    from_singles = extract_features(_MeanColour(), iter(list(images)), batch_size=4, on_batch=seen.append)
    assert sum(seen) == len(images) and max(seen) <= 4
    np.testing.assert_array_equal(from_batches, features)
    np.testing.assert_array_equal(from_singles, features)
    assert extract_features(_MeanColour(), [], batch_size=2).shape == (0, 4)
