"""The paper's image-set metrics in numpy float64 (Section 3.1, Appendix E.5).

- `frechet_distance`: FD = |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2), means and covariances (N - 1)
  in float64, tr sqrt(S1 S2) = sum_i sqrt(lambda_i(sqrt(S1) S2 sqrt(S1))) by two symmetric
  eigendecompositions (exact for PSD matrices, no complex square roots).
- `recall` (Kynkaanniemi et al. 2019, as the `prdc` package computes it for dgm-eval): the radius of each
  generated sample is the distance to its k-th nearest generated neighbour (itself excluded); recall is the
  fraction of real samples strictly inside at least one generated ball.
- `sfd`: mean distance between the features of image i at iteration k and of image i at iteration 0.
- `clip_score`: 100 x cosine of CLIP image and caption embeddings, averaged, the mean clamped at 0
  (torchmetrics' definition); captions are tokenized with truncation to 77 tokens.
- `collapse_rate` (the paper's Eq. 3) and `collapse_slope`: how fast a metric moves along the chain (see their
  docstrings).
- `paired_subsample_intervals` and `real_vs_real_floor`: uncertainty of all of the above;
  `metric_trajectory_intervals` applies them to a whole chain's features at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np


def _features(x, name: str, *, min_rows: int = 2) -> np.ndarray:
    array = np.asarray(x, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (samples, feature dims), got shape {array.shape}")
    if array.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} samples, got {array.shape[0]}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return array


# --------------------------------------------------------------------------------------------------------
# Frechet distance


def mean_and_covariance(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased (N - 1) covariance of (N, D) features, float64."""
    x = _features(features, "features")
    return x.mean(axis=0), np.cov(x, rowvar=False, ddof=1).reshape(x.shape[1], x.shape[1])


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance_from_moments(mu1, sigma1, mu2, sigma2) -> float:
    """FD between N(mu1, sigma1) and N(mu2, sigma2); covariances symmetric positive semi-definite."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    root1 = _sqrt_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def frechet_distance(a, b) -> float:
    """FD between two feature sets (N1, D) and (N2, D) in float64 (see module docstring)."""
    a, b = _features(a, "a"), _features(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} and {b.shape[1]}")
    return frechet_distance_from_moments(*mean_and_covariance(a), *mean_and_covariance(b))


# --------------------------------------------------------------------------------------------------------
# recall, SFD


def _pairwise_distances(x: np.ndarray, y: np.ndarray, *, chunk: int = 1024) -> np.ndarray:
    """Euclidean distances (len(x), len(y)) via |x|^2 + |y|^2 - 2 x.y in float64 (as sklearn/prdc)."""
    y_sq = (y**2).sum(axis=1)
    out = np.empty((x.shape[0], y.shape[0]))
    for start in range(0, x.shape[0], chunk):
        block = x[start : start + chunk]
        sq = (block**2).sum(axis=1)[:, None] + y_sq[None, :] - 2.0 * block @ y.T
        out[start : start + chunk] = np.sqrt(np.clip(sq, 0.0, None))
    return out


def knn_radii(features, k: int = 5) -> np.ndarray:
    """Distance from each sample to its k-th nearest neighbour in the same set, itself excluded."""
    x = _features(features, "features", min_rows=k + 1)
    distances = _pairwise_distances(x, x)
    np.fill_diagonal(distances, -np.inf)  # itself is never one of the k neighbours
    return np.partition(distances, k, axis=1)[:, k]


def recall(real, fake, k: int = 5) -> float:
    """Fraction of real samples inside at least one generated k-NN ball (strict <), as prdc computes it."""
    real = _features(real, "real", min_rows=1)
    fake = _features(fake, "fake", min_rows=k + 1)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: {real.shape[1]} and {fake.shape[1]}")
    radii = knn_radii(fake, k)
    inside = np.zeros(real.shape[0], dtype=bool)
    for start in range(0, real.shape[0], 1024):
        block = _pairwise_distances(real[start : start + 1024], fake)
        inside[start : start + 1024] = (block < radii[None, :]).any(axis=1)
    return float(inside.mean())


def sfd(features_k, features_0) -> float:
    """Mean Euclidean distance between row i of iteration k and row i of iteration 0 (paired by image)."""
    a, b = _features(features_k, "features_k", min_rows=1), _features(features_0, "features_0", min_rows=1)
    if a.shape != b.shape:
        raise ValueError(f"sfd pairs image i with image i: shapes {a.shape} and {b.shape} differ")
    return float(np.sqrt(((a - b) ** 2).sum(axis=1)).mean())


# --------------------------------------------------------------------------------------------------------
# CLIP score


def _embedding(output):
    """transformers >= 5 returns a model output from get_*_features; older versions a tensor."""
    return output if not hasattr(output, "pooler_output") else output.pooler_output


def clip_score(model, tokenizer, images, captions: Sequence[str], *, batch_size: int = 32,
               image_size: int | None = None, max_length: int = 77) -> float:
    """CLIP score of images against their captions: max(0, mean_i 100 cos(E_img(x_i), E_txt(c_i))).

    model: a transformers CLIPModel (any size); tokenizer: its CLIPTokenizer (or a processor with one).
    images: (N, 3, H, W) in [0, 1] or a sequence of (3, H, W) tensors; preprocessed as CLIPImageProcessor
    does (chain.features.clip_preprocess). Captions longer than `max_length` tokens (or the model's
    position limit) are truncated by the tokenizer, keeping the end-of-text token that CLIP pools on.
    """
    import torch

    from chain.features import clip_preprocess

    captions = list(captions)
    if len(images) != len(captions):
        raise ValueError(f"clip_score needs one caption per image: {len(images)} images, {len(captions)} captions")
    if not captions:
        raise ValueError("clip_score needs at least one image")
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    param = next(model.parameters())
    size = int(image_size or model.config.vision_config.image_size)
    limit = min(max_length, int(model.config.text_config.max_position_embeddings))
    scores = []
    for start in range(0, len(captions), batch_size):
        chunk = images[start : start + batch_size]
        if isinstance(chunk, torch.Tensor):
            pixels = clip_preprocess(chunk, size)
        else:
            pixels = torch.cat([clip_preprocess(image[None], size) for image in chunk])
        tokens = tokenizer(captions[start : start + batch_size], padding=True, truncation=True, max_length=limit,
                           return_tensors="pt")
        with torch.inference_mode():
            image_embeds = _embedding(model.get_image_features(pixel_values=pixels.to(param.device, param.dtype)))
            text_embeds = _embedding(model.get_text_features(input_ids=tokens["input_ids"].to(param.device),
                                                             attention_mask=tokens["attention_mask"].to(param.device)))
        image_embeds = image_embeds.double()
        text_embeds = text_embeds.double()
        cosine = (image_embeds / image_embeds.norm(dim=-1, keepdim=True)
                  * text_embeds / text_embeds.norm(dim=-1, keepdim=True)).sum(dim=-1)
        scores.append(100.0 * cosine.cpu().numpy())
    return float(max(np.concatenate(scores).mean(), 0.0))


# --------------------------------------------------------------------------------------------------------
# collapse rate


def _trajectory(values, iterations) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(values, dtype=np.float64)
    if y.ndim != 1 or y.shape[0] < 2:
        raise ValueError(f"a metric trajectory needs at least two iterations, got shape {y.shape}")
    t = np.arange(y.shape[0], dtype=np.float64) if iterations is None else np.asarray(iterations, np.float64)
    if t.shape != y.shape:
        raise ValueError(f"iterations {t.shape} and values {y.shape} differ in length")
    if not (np.isfinite(y).all() and np.isfinite(t).all()):
        raise ValueError("the metric trajectory holds NaN: drop iterations not yet produced first")
    return t, y


def collapse_rate(values, iterations=None) -> float:
    """The paper's collapse rate (Eq. 3, Section 3.1): the metric's change per iteration from the first
    generated iteration to the last,

        collapse rate = (m_K - m_1) / (K - 1),

    with m_k the metric (e.g. FID) between iteration k's images and the original set D_0. Iteration 0 (D_0
    against itself) does not enter. values: the metric per iteration, (K + 1,) for iterations 0 .. K by
    default; with `iterations` given, the entry at iteration 1 and the last entry (iteration K) are used.
    Raises ValueError without an iteration 1 or without a later iteration (K >= 2 is needed).
    """
    t, y = _trajectory(values, iterations)
    first = np.flatnonzero(t == 1.0)
    if first.size != 1:
        raise ValueError(f"the collapse rate (Eq. 3) needs the metric at iteration 1; iterations are {t.tolist()}")
    if not t[-1] > 1.0:
        raise ValueError(f"the collapse rate (Eq. 3) needs an iteration K >= 2 after iteration 1; the last "
                         f"iteration is {t[-1]:g}")
    return float((y[-1] - y[first[0]]) / (t[-1] - 1.0))


def collapse_slope(values, iterations=None) -> float:
    """Least-squares slope of the metric against the iteration over all iterations (uses every point,
    so it is less sensitive to the last iteration's noise than collapse_rate)."""
    t, y = _trajectory(values, iterations)
    tc = t - t.mean()
    return float((tc * (y - y.mean())).sum() / (tc**2).sum())


# --------------------------------------------------------------------------------------------------------
# intervals


class Interval(NamedTuple):
    """estimate: the statistic on all the data; lower/upper: percentile interval of `samples`, the statistic
    on `num_subsamples` paired subsamples of `subsample_size` images (without replacement)."""

    estimate: np.ndarray | float
    lower: np.ndarray | float
    upper: np.ndarray | float
    samples: np.ndarray
    subsample_size: int


def paired_subsample_intervals(
    statistic: Callable[[list[np.ndarray]], float | np.ndarray],
    arrays: Sequence[np.ndarray],
    *,
    subsample_size: int,
    generator: np.random.Generator,
    num_subsamples: int = 100,
    confidence: float = 0.9,
) -> Interval:
    """Percentile intervals of statistic(arrays) by paired subsampling without replacement.

    arrays: one array per iteration (or per set), all with the same number N of rows, row i being image i
    (prompt i) in each. Each subsample draws `subsample_size` of the N indices without replacement and
    applies the same indices to every array, so the pairing across iterations (SFD, collapse rate) is kept.
    statistic(list of subsetted arrays) returns a float or an array (e.g. FD per iteration). FD and recall
    depend on the sample size, so the interval describes the statistic at `subsample_size` images (m out of
    n subsampling), not at N: compare conditions at equal sizes.
    """
    arrays = [np.asarray(a) for a in arrays]
    if not arrays:
        raise ValueError("paired_subsample_intervals needs at least one array")
    num = arrays[0].shape[0]
    if any(a.shape[0] != num for a in arrays):
        raise ValueError(f"paired arrays must share the image count; got {[a.shape[0] for a in arrays]}")
    if not 1 <= subsample_size <= num:
        raise ValueError(f"subsample_size must lie in 1 .. {num}, got {subsample_size}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    estimate = np.asarray(statistic(arrays), dtype=np.float64)
    samples = np.stack([
        np.asarray(statistic([a[idx] for a in arrays]), dtype=np.float64)
        for idx in (generator.choice(num, size=subsample_size, replace=False) for _ in range(num_subsamples))
    ])
    alpha = (1.0 - confidence) / 2.0
    lower, upper = np.quantile(samples, [alpha, 1.0 - alpha], axis=0)
    if estimate.ndim == 0:
        return Interval(float(estimate), float(lower), float(upper), samples, subsample_size)
    return Interval(estimate, lower, upper, samples, subsample_size)


class NoiseFloor(NamedTuple):
    """metric(half A, half B) over random splits of the reference set into two disjoint halves."""

    mean: float
    lower: float
    upper: float
    samples: np.ndarray
    half_size: int


def real_vs_real_floor(
    reference,
    metric: Callable[[np.ndarray, np.ndarray], float],
    *,
    generator: np.random.Generator,
    num_splits: int = 20,
    half_size: int | None = None,
    min_half_size: int = 6,
    confidence: float = 0.9,
) -> NoiseFloor | None:
    """The value a metric takes between two disjoint random halves of the same real set: the floor below
    which differences between iterations are noise. Compare with the metric at `half_size` images.

    Returns None when the reference set is too small (fewer than 2 x min_half_size rows; recall with k = 5
    needs 6 per half).
    """
    x = np.asarray(reference)
    half = x.shape[0] // 2 if half_size is None else int(half_size)
    if half < min_half_size or 2 * half > x.shape[0]:
        return None
    values = []
    for _ in range(num_splits):
        order = generator.permutation(x.shape[0])
        values.append(float(metric(x[order[:half]], x[order[half : 2 * half]])))
    samples = np.asarray(values)
    alpha = (1.0 - confidence) / 2.0
    lower, upper = np.quantile(samples, [alpha, 1.0 - alpha])
    return NoiseFloor(float(samples.mean()), float(lower), float(upper), samples, half)


def metric_trajectory_intervals(
    features: Sequence[np.ndarray],
    *,
    subsample_size: int,
    generator: np.random.Generator,
    num_subsamples: int = 50,
    confidence: float = 0.9,
    k: int = 5,
) -> dict[str, Interval | NoiseFloor | None]:
    """FD, recall and SFD of every iteration against iteration 0, their collapse rates and slopes, with
    paired-subsampling intervals, and the real-vs-real floors of FD and recall.

    features: one (N, D) array per iteration, iteration 0 first (D_0), row i = image i in every iteration.
    Returns {"fd", "recall", "sfd"} -> Interval over iterations (arrays of K + 1), "<metric>_collapse_rate"
    and "<metric>_collapse_slope" -> Interval (floats), "fd_floor" and "recall_floor" -> NoiseFloor between
    two disjoint halves of D_0 of min(subsample_size, N // 2) rows each (the same size as the subsamples
    when D_0 allows it), or None when D_0 is too small. Each subsample computes K + 1 FDs: with 1024-d
    features budget about a second per subsample.
    """
    arrays = [_features(f, f"features[{i}]") for i, f in enumerate(features)]
    if len(arrays) < 2:
        raise ValueError("metric_trajectory_intervals needs iteration 0 and at least one more iteration")
    half = min(subsample_size, arrays[0].shape[0] // 2)

    def trajectories(subsets: list[np.ndarray]) -> np.ndarray:
        reference = subsets[0]
        fd = [frechet_distance(reference, s) for s in subsets]
        rec = [recall(reference, s, k=k) for s in subsets]
        dist = [sfd(s, reference) for s in subsets]
        rows = [fd, rec, dist]
        for row in (fd, rec, dist):
            rate = collapse_rate(row) if len(subsets) >= 3 else np.nan    # Eq. 3 needs K >= 2
            rows.append([rate, collapse_slope(row)] + [np.nan] * (len(subsets) - 2))
        return np.asarray(rows, dtype=np.float64)

    table = paired_subsample_intervals(trajectories, arrays, subsample_size=subsample_size, generator=generator,
                                       num_subsamples=num_subsamples, confidence=confidence)
    out: dict[str, Interval | NoiseFloor | None] = {}
    for row, name in enumerate(("fd", "recall", "sfd")):
        out[name] = Interval(table.estimate[row], table.lower[row], table.upper[row], table.samples[:, row],
                             subsample_size)
        for col, kind in enumerate(("collapse_rate", "collapse_slope")):
            r = 3 + row
            out[f"{name}_{kind}"] = Interval(float(table.estimate[r, col]), float(table.lower[r, col]),
                                             float(table.upper[r, col]), table.samples[:, r, col], subsample_size)
    out["fd_floor"] = real_vs_real_floor(arrays[0], frechet_distance, generator=generator, confidence=confidence,
                                         half_size=half, min_half_size=2)
    out["recall_floor"] = real_vs_real_floor(arrays[0], lambda a, b: recall(a, b, k=k), generator=generator,
                                             confidence=confidence, half_size=half, min_half_size=k + 1)
    return out
