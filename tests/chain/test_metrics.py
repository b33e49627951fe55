"""chain.metrics against independent implementations: scipy.linalg.sqrtm, torchmetrics' FID formula, the
prdc package, a direct CLIP forward pass, and closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from chain.metrics import (
    clip_score,
    collapse_rate,
    collapse_slope,
    frechet_distance,
    frechet_distance_from_moments,
    knn_radii,
    mean_and_covariance,
    metric_trajectory_intervals,
    paired_subsample_intervals,
    real_vs_real_floor,
    recall,
    sfd,
)


def fd_scipy(a, b):
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def fd_torchmetrics(a, b):
    from torchmetrics.image.fid import _compute_fid

    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return float(_compute_fid(ta.mean(0), torch.cov(ta.T), tb.mean(0), torch.cov(tb.T)))


def _sets(kind, rng):
    if kind == "n_gt_d":
        return rng.standard_normal((400, 16)), rng.standard_normal((300, 16)) * 1.3 + 0.4
    if kind == "n_lt_d":
        return rng.standard_normal((40, 64)), rng.standard_normal((30, 64)) * 0.8 + 0.1
    if kind == "near_duplicate":
        a = rng.standard_normal((200, 12))
        return a, a + 1e-3 * rng.standard_normal(a.shape)
    if kind == "correlated":
        mix = rng.standard_normal((10, 10))
        return rng.standard_normal((500, 10)) @ mix, (rng.standard_normal((500, 10)) + 0.2) @ mix.T
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["n_gt_d", "n_lt_d", "near_duplicate", "correlated"])
def test_frechet_distance_against_scipy_and_torchmetrics(kind):
    rng = np.random.default_rng(["n_gt_d", "n_lt_d", "near_duplicate", "correlated"].index(kind))
    a, b = _sets(kind, rng)
    ours = frechet_distance(a, b)
    scale = max(1.0, np.trace(np.cov(a, rowvar=False)))
    np.testing.assert_allclose(ours, fd_torchmetrics(a, b), atol=1e-7 * scale)
    np.testing.assert_allclose(ours, fd_scipy(a, b), atol=1e-6 * scale)
    assert ours >= -1e-9
    np.testing.assert_allclose(frechet_distance(b, a), ours, atol=1e-7 * scale)  # symmetric


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((50, 8))
    assert abs(frechet_distance(a, a)) < 1e-9
    assert abs(frechet_distance(a, a + 3.0) - 9.0 * 8) < 1e-9  # a shift moves only the mean term
    # two isotropic Gaussians: FD = |dmu|^2 + d (s1 - s2)^2
    d = 5
    value = frechet_distance_from_moments(np.zeros(d), 4.0 * np.eye(d), np.ones(d), 9.0 * np.eye(d))
    assert abs(value - (d + d * (2.0 - 3.0) ** 2)) < 1e-12
    mu, cov = mean_and_covariance(a)
    np.testing.assert_allclose(cov, np.cov(a, rowvar=False, ddof=1))
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(a, a[:, :3])
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.full((4, 2), np.nan), a[:, :2])


@pytest.mark.parametrize(("seed", "dim"), [(0, 10), (1, 10), (2, 10), (3, 64)])
def test_recall_against_prdc(seed, dim):
    from prdc import compute_prdc

    rng = np.random.default_rng(seed)
    real = rng.standard_normal((120 if dim < 64 else 40, dim))  # the last case has N < d
    fake = rng.standard_normal((90 if dim < 64 else 30, dim)) * 0.7 + 0.3 * seed
    expected = compute_prdc(real_features=real, fake_features=fake, nearest_k=5)["recall"]
    assert recall(real, fake, k=5) == pytest.approx(expected, abs=1e-12)
    expected3 = compute_prdc(real_features=real, fake_features=fake, nearest_k=3)["recall"]
    assert recall(real, fake, k=3) == pytest.approx(expected3, abs=1e-12)


def test_recall_radius_excludes_self_and_is_strict():
    # points on a line at 0, 1, 2, ..., 9: the 2nd neighbour of 0 is at distance 2, of 5 at distance 1
    fake = np.arange(10, dtype=float)[:, None]
    radii = knn_radii(fake, k=2)
    np.testing.assert_allclose(radii, [2, 1, 1, 1, 1, 1, 1, 1, 1, 2])
    # a real point exactly on a ball's boundary is outside (strict <)
    assert recall(np.array([[-2.0]]), fake, k=2) == 0.0
    assert recall(np.array([[-1.999]]), fake, k=2) == 1.0
    # near-duplicate sets: every real point sits on a generated one
    rng = np.random.default_rng(3)
    real = rng.standard_normal((30, 4))
    assert recall(real, real + 1e-9, k=5) == 1.0
    from prdc import compute_prdc

    near = real + 1e-3 * rng.standard_normal(real.shape)
    assert recall(real, near, k=5) == compute_prdc(real_features=real, fake_features=near, nearest_k=5)["recall"]


def test_sfd_is_mean_paired_distance():
    rng = np.random.default_rng(4)
    f0 = rng.standard_normal((7, 3))
    shift = rng.standard_normal((7, 3))
    expected = np.mean([np.linalg.norm(shift[i]) for i in range(7)])
    assert sfd(f0 + shift, f0) == pytest.approx(expected, rel=1e-12)
    assert sfd(f0, f0) == 0.0
    # pairing matters: shuffling rows changes the answer
    assert sfd(f0[::-1], f0) > 0.1
    with pytest.raises(ValueError, match="pairs image i"):
        sfd(f0[:5], f0)


def test_collapse_rate_and_slope():
    t = np.arange(6)
    assert collapse_rate(2.0 + 3.0 * t) == pytest.approx(3.0)
    assert collapse_slope(2.0 + 3.0 * t) == pytest.approx(3.0)
    rng = np.random.default_rng(5)
    y = rng.standard_normal(6)
    assert collapse_rate(y) == pytest.approx((y[-1] - y[1]) / 4)     # Eq. 3: (FID_K - FID_1) / (K - 1)
    # hand-computed: FID 0, 10, 12, 15, 19, 24, 30 over iterations 0..6 -> (30 - 10) / 5 = 4
    assert collapse_rate([0.0, 10.0, 12.0, 15.0, 19.0, 24.0, 30.0]) == 4.0
    assert collapse_slope(y) == pytest.approx(np.polyfit(t, y, 1)[0])
    iterations = np.array([0, 1, 2, 4, 8])
    z = rng.standard_normal(5)
    assert collapse_slope(z, iterations) == pytest.approx(np.polyfit(iterations, z, 1)[0])
    assert collapse_rate(z, iterations) == pytest.approx((z[-1] - z[1]) / 7)
    with pytest.raises(ValueError, match="iteration 1"):
        collapse_rate([1.0, 2.0, 3.0], [0, 2, 3])
    with pytest.raises(ValueError, match="K >= 2"):
        collapse_rate([0.0, 2.0])
    with pytest.raises(ValueError, match="NaN"):
        collapse_rate([0.0, np.nan, 1.0])
    with pytest.raises(ValueError, match="two iterations"):
        collapse_slope([1.0])


def test_paired_subsample_intervals_keep_pairing_and_cover():
    rng = np.random.default_rng(6)
    f0 = rng.standard_normal((60, 4))
    f1 = f0 + 0.5  # every image moved by exactly the same vector: SFD = 1 in every paired subsample
    result = paired_subsample_intervals(lambda arrays: sfd(arrays[1], arrays[0]), [f0, f1], subsample_size=20,
                                        generator=np.random.default_rng(0), num_subsamples=30)
    assert result.estimate == pytest.approx(1.0) and np.allclose(result.samples, 1.0)
    assert result.lower == pytest.approx(1.0) and result.upper == pytest.approx(1.0)
    # an unpaired resampling would not give exactly 1: check the indices are shared
    seen = []
    paired_subsample_intervals(lambda arrays: seen.append([a[:, 0].copy() for a in arrays]) or 0.0,
                               [np.arange(10.0)[:, None], 100 + np.arange(10.0)[:, None]], subsample_size=4,
                               generator=np.random.default_rng(1), num_subsamples=5)
    for first, second in seen:
        np.testing.assert_array_equal(second, first + 100)
        assert len(set(first)) == len(first)  # without replacement
    # vector statistic: FD per iteration, and the collapse rate of that trajectory
    fds = lambda arrays: np.array([frechet_distance(arrays[0], a) for a in arrays])  # noqa: E731
    trajectory = [f0, f0 + 0.1 * rng.standard_normal(f0.shape) + 0.2, f0 + 0.4]
    vector = paired_subsample_intervals(fds, trajectory, subsample_size=30, generator=np.random.default_rng(2),
                                        num_subsamples=25)
    assert vector.samples.shape == (25, 3) and np.all(vector.lower <= vector.upper)
    rate = paired_subsample_intervals(lambda arrays: collapse_rate(fds(arrays)), trajectory, subsample_size=30,
                                      generator=np.random.default_rng(2), num_subsamples=25)
    assert rate.lower <= rate.upper and rate.estimate == pytest.approx(collapse_rate(fds(trajectory)))
    with pytest.raises(ValueError, match="image count"):
        paired_subsample_intervals(fds, [f0, f0[:10]], subsample_size=5, generator=np.random.default_rng(0))


def test_real_vs_real_floor():
    rng = np.random.default_rng(7)
    reference = rng.standard_normal((200, 3))
    floor = real_vs_real_floor(reference, frechet_distance, generator=np.random.default_rng(0), num_splits=40)
    assert floor.half_size == 100 and floor.samples.shape == (40,)
    # for Gaussian data FD between halves of n is about the bias 2 * tr(S)/n-ish: small, positive
    assert 0.0 < floor.mean < 0.3 and floor.lower <= floor.mean <= floor.upper
    # a real shift of 1 in each of 3 dims (FD = 3) stands far above this floor
    assert frechet_distance(reference, rng.standard_normal((200, 3)) + 1.0) > floor.upper
    assert real_vs_real_floor(reference[:11], recall, generator=np.random.default_rng(0)) is None


# --------------------------------------------------------------------------------------------------------
# CLIP score with a tiny random CLIP and an offline byte-level tokenizer


def _byte_characters():
    """GPT-2/CLIP's printable stand-ins for the 256 byte values."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(
        range(ord("\xae"), ord("\xff") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _byte_tokenizer():
    """transformers 5 CLIPTokenizer from an in-memory byte-level vocabulary (REFERENCE.md), no merges."""
    from transformers import CLIPTokenizer

    chars = _byte_characters()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + len(chars) for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


def _tiny_clip(max_positions=77):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=514, max_position_embeddings=max_positions, bos_token_id=512, eos_token_id=513,
                         pad_token_id=513),
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                           image_size=32, patch_size=16),
        projection_dim=16,
    )
    return CLIPModel(config).eval()


def _direct_clip_cosines(model, tokenizer, pixels, captions, max_length):
    """Cosines from the model's parts (vision tower CLS -> post layer norm -> projection; text tower at the
    end-of-text token -> projection), with our own tokenization and no shared code with clip_score."""
    with torch.no_grad():
        vision = model.vision_model(pixel_values=pixels).pooler_output
        image = model.visual_projection(vision)
        cosines = []
        for i, caption in enumerate(captions):
            ids = tokenizer(caption)["input_ids"]
            if len(ids) > max_length:
                ids = ids[: max_length - 1] + [ids[-1]]
            out = model.text_model(input_ids=torch.tensor([ids])).last_hidden_state[0, len(ids) - 1]
            text = model.text_projection(out)
            cosines.append(float(torch.nn.functional.cosine_similarity(image[i], text, dim=0)))
    return np.array(cosines)


def _smooth_uint8_images(num, height, width, *, seed):
    """Photo-like test images: a few random low-frequency bumps, no overshoot beyond [0, 255] on resizing."""
    rng = np.random.default_rng(seed)
    ys, xs = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    out = np.zeros((num, height, width, 3))
    for n in range(num):
        for c in range(3):
            for _ in range(3):
                fy, fx, phase = rng.uniform(0.5, 3, 2).tolist() + [rng.uniform(0, 6.3)]
                out[n, :, :, c] += np.cos(2 * np.pi * (fy * ys + fx * xs) + phase)
    out = 0.5 + 0.12 * out
    return np.round(out * 255).astype(np.uint8)


def test_clip_preprocess_matches_clip_image_processor():
    from transformers import CLIPImageProcessor

    from chain.features import clip_preprocess

    images = _smooth_uint8_images(2, 40, 52, seed=9)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    expected = processor(images=list(images), return_tensors="np")["pixel_values"]
    ours = clip_preprocess(torch.tensor(images.transpose(0, 3, 1, 2) / 255.0, dtype=torch.float32), 32).numpy()
    assert ours.shape == expected.shape == (2, 3, 32, 32)
    # the processor rounds the resized image to 8 bits: about half a level, divided by CLIP's std (~0.27)
    assert np.abs(ours - expected).max() < 1.0 / 255 / 0.26


def test_clip_score_against_direct_forward_pass():
    from chain.features import clip_preprocess

    tokenizer = _byte_tokenizer()
    model = _tiny_clip()
    rng = np.random.default_rng(8)
    images = torch.tensor(rng.random((3, 3, 40, 48)), dtype=torch.float32)
    captions = ["a red square", "two cats on a mat", "x" * 120]  # the last one is over 77 tokens
    assert len(tokenizer(captions[2])["input_ids"]) > 77
    cosines = _direct_clip_cosines(model, tokenizer, clip_preprocess(images, 32), captions, 77)
    negated = _tiny_clip()
    with torch.no_grad():
        negated.text_projection.weight.mul_(-1.0)
    ours = clip_score(model, tokenizer, images, captions, batch_size=2)
    theirs = clip_score(negated, tokenizer, list(images), captions)  # a list of images works too
    mean = 100.0 * cosines.mean()
    assert abs(mean) > 1e-3
    # the mean is clamped at 0: one of the two models scores 100 |mean cosine|, the other 0
    assert ours == pytest.approx(max(mean, 0.0), abs=1e-4)
    assert theirs == pytest.approx(max(-mean, 0.0), abs=1e-4)
    with pytest.raises(ValueError, match="one caption per image"):
        clip_score(model, tokenizer, images, captions[:2])


def test_metric_trajectory_intervals_against_direct_metrics():
    rng = np.random.default_rng(11)
    f0 = rng.standard_normal((40, 3))
    chain = [f0, f0 + 0.2 * rng.standard_normal(f0.shape), f0 + 0.5 * rng.standard_normal(f0.shape) + 0.3]
    out = metric_trajectory_intervals(chain, subsample_size=20, generator=np.random.default_rng(0), num_subsamples=8)
    expected_fd = [frechet_distance(f0, f) for f in chain]
    np.testing.assert_allclose(out["fd"].estimate, expected_fd, atol=1e-12)
    np.testing.assert_allclose(out["recall"].estimate, [recall(f0, f) for f in chain])
    np.testing.assert_allclose(out["sfd"].estimate, [sfd(f, f0) for f in chain])
    assert out["fd_collapse_rate"].estimate == pytest.approx(collapse_rate(expected_fd))
    assert out["sfd_collapse_slope"].estimate == pytest.approx(collapse_slope([sfd(f, f0) for f in chain]))
    assert out["fd"].samples.shape == (8, 3) and np.all(out["fd"].lower <= out["fd"].upper)
    assert out["fd"].samples[:, 0].max() < 1e-9  # iteration 0 against itself, in every paired subsample
    assert out["fd_floor"].half_size == 20 and out["recall_floor"] is not None
    small = metric_trajectory_intervals([f0[:10], f0[:10] + 1.0], subsample_size=8,
                                        generator=np.random.default_rng(0), num_subsamples=2)
    assert small["recall_floor"] is None and small["fd_floor"] is not None
    assert np.isnan(small["fd_collapse_rate"].estimate)     # Eq. 3 needs an iteration 2
