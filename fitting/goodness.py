"""Goodness of fit per (condition, iteration) cell (docs/model.md section 7).

The model says the values of cell (c, k), on the fitted scale (`fitting.transforms`), are normal with the
predicted mean mu_{c,k} and variance V_{c,k} (V_G or V_P, docs/model.md section 6). Each cell gets two tests
of that statement, chosen so that their p-values are honest although the parameters were fitted:

Shape: the Anderson-Darling statistic of the cell's values against the normal law with the cell's *own*
mean and sd (ddof 1), the statistic `scipy.stats.anderson` computes,

    A^2 = -n - (1/n) sum_i (2i - 1) [log F(z_(i)) + log(1 - F(z_(n+1-i)))],   z = (x - xbar) / s.

Its null distribution with both parameters estimated from the same values ("case 3") is known: with
A*^2 = A^2 (1 + 0.75/n + 2.25/n^2) the p-value is the closed form of D'Agostino and Stephens (1986,
Table 4.9), accurate for n >= 8 (cells with fewer values get no shape test). The test is location-scale
invariant, so neither the fitted parameters nor a chain's drift of the cell mean enter it: it asks whether
the values are normal *on this scale*, which is what a transform changes.

Mean: the standardized residual of the cell mean, z = (xbar - mu_{c,k}) / sqrt(Var(xbar)), with the
variance of an observed mean of the observation model (V / n for independent draws, the drift covariance
for a chain, `fitting.observation_models`), and the two-sided normal p-value. The parameters were fitted to
these same cells (p free parameters from m cells), which pulls the residuals towards 0 (their squares sum to
about chi2(m - p) rather than chi2(m)): these p-values are conservative, so a cell flagged is truly off.

The fit warns when the chosen model fails either test in more cells than chance allows: under the model
the number of cells with p < 0.01 is at most Binomial(m, 0.01) (m = cells used by the fit, iteration 0
once), and the warning comes when that count has a binomial tail probability below 0.001 (e.g. 3 or more
of 19 cells).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import scipy.special
import scipy.stats

from fitting.observations import Observations, distinct_samples

MIN_SHAPE_IMAGES = 8       # the closed-form p-value of the Anderson-Darling test holds for n >= 8
CELL_LEVEL = 0.01          # a cell fails a test at p < 0.01
WARN_LEVEL = 0.001         # warn when the count of failing cells has a binomial tail below this
NUM_QUANTILES = 25         # observed quantiles stored per cell for the QQ figure


def anderson_darling_normal(x: np.ndarray) -> tuple[float, float]:
    """(A^2, p) of the Anderson-Darling test of normality with mean and sd estimated (module docstring).

    NaN for fewer than MIN_SHAPE_IMAGES finite values or values all identical."""
    x = np.sort(np.asarray(x, dtype=np.float64)[np.isfinite(x)])
    n = x.size
    if n < MIN_SHAPE_IMAGES:
        return math.nan, math.nan
    s = x.std(ddof=1)
    if not s > 0:
        return math.nan, math.nan
    z = (x - x.mean()) / s
    i = np.arange(1, n + 1)
    log_cdf = scipy.special.log_ndtr(z)
    log_sf = scipy.special.log_ndtr(-z[::-1])
    a2 = float(-n - np.sum((2 * i - 1) * (log_cdf + log_sf)) / n)
    return a2, anderson_darling_pvalue(a2, n)


def anderson_darling_pvalue(a2: float, n: int) -> float:
    """p-value of A^2 for normality with estimated mean and variance (D'Agostino and Stephens 1986)."""
    a = a2 * (1.0 + 0.75 / n + 2.25 / n**2)
    if a >= 0.6:
        p = math.exp(1.2937 - 5.709 * a + 0.0186 * a * a)
    elif a >= 0.34:
        p = math.exp(0.9177 - 4.279 * a - 1.38 * a * a)
    elif a >= 0.2:
        p = 1.0 - math.exp(-8.318 + 42.796 * a - 59.938 * a * a)
    else:
        p = 1.0 - math.exp(-13.436 + 101.14 * a - 223.73 * a * a)
    return float(min(max(p, 0.0), 1.0))


def aligned_phenotypes(obs: Observations, num_iterations: int) -> np.ndarray | None:
    """Per-image values on the full iteration grid 0..K, (C, K+1, N), NaN where unobserved (None for the
    summary-only form)."""
    if obs.phenotypes is None:
        return None
    out = np.full((obs.num_conditions, num_iterations + 1, obs.phenotypes.shape[-1]), np.nan)
    for j, k in enumerate(obs.iterations.tolist()):
        out[:, k] = obs.phenotypes[:, j]
    return out


def observed_quantiles(values: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    """Empirical quantiles of every cell at the plotting positions (j - 0.5) / Q, j = 1..Q (C, K+1, Q);
    NaN for cells with fewer than 2 values or without per-image data."""
    out = np.full(shape + (NUM_QUANTILES,), np.nan)
    if values is None:
        return out
    probs = quantile_levels()
    for c in range(shape[0]):
        for k in range(shape[1]):
            x = values[c, k][np.isfinite(values[c, k])]
            if x.size >= 2:
                out[c, k] = np.quantile(x, probs)
    return out


def quantile_levels() -> np.ndarray:
    return (np.arange(1, NUM_QUANTILES + 1) - 0.5) / NUM_QUANTILES


@dataclasses.dataclass(frozen=True)
class CellGoodness:
    """Per cell (C, K+1): shape test (A^2, p), mean residual (z, p), observed quantiles (C, K+1, Q);
    `counted` marks the cells of the fit (iteration 0 once); summary counts and the warning, if any."""

    shape_statistic: np.ndarray
    shape_pvalue: np.ndarray
    mean_z: np.ndarray
    mean_pvalue: np.ndarray
    quantiles: np.ndarray
    counted: np.ndarray
    summary: dict
    warning: str | None


def cell_goodness_of_fit(values: np.ndarray | None, observed: dict[str, np.ndarray], mean: np.ndarray,
                         var: np.ndarray, band_images: np.ndarray, iterations, conditions: tuple[str, ...]
                         ) -> CellGoodness:
    """Both tests for every observed cell (module docstring).

    values: per-image values (C, K+1, N) on the fitted scale or None; observed: aligned n, mean, var
    (`fitting.forecast.align`); mean, var: the predicted mu and V (C, K+1); band_images: the number of
    images whose mean has the variance of an observed mean (the observation model's `band_images`);
    iterations: those the fit used (the summary and the warning count these cells)."""
    shape = observed["mean"].shape
    a2 = np.full(shape, np.nan)
    pa = np.full(shape, np.nan)
    n = observed["num_images"]
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (observed["mean"] - mean) / np.sqrt(var / band_images)
    z = np.where(n > 0, z, np.nan)
    pz = 2.0 * scipy.stats.norm.sf(np.abs(z))
    if values is not None:
        for c in range(shape[0]):
            for k in range(shape[1]):
                a2[c, k], pa[c, k] = anderson_darling_normal(values[c, k])
    counted = np.zeros(shape, dtype=bool)
    used = set(int(k) for k in np.asarray(iterations).tolist())
    first = set(distinct_samples(n[:, 0], observed["mean"][:, 0], observed["var"][:, 0])) if shape[1] else set()
    for c in range(shape[0]):
        for k in range(shape[1]):
            if k in used and n[c, k] > 0 and (k > 0 or c in first):
                counted[c, k] = True
    summary, problems = {}, []
    for label, p, what in (("shape", pa, "reject the normal shape (Anderson-Darling)"),
                           ("mean", pz, "have a mean off the fitted trajectory")):
        tested = counted & np.isfinite(p)
        fail = tested & (p < CELL_LEVEL)
        m, count = int(tested.sum()), int(fail.sum())
        tail = float(scipy.stats.binom.sf(count - 1, m, CELL_LEVEL)) if m else math.nan
        summary[label] = {"num_cells": m, "num_failing": count, "fraction_failing": count / m if m else math.nan,
                          "binomial_tail": tail}
        if m and tail < WARN_LEVEL:
            cells = [f"{conditions[c]}/iteration {k}" for c, k in zip(*np.nonzero(fail))]
            problems.append(f"{count} of {m} cells {what} at p < {CELL_LEVEL:g} (about {CELL_LEVEL:.0%} "
                            f"expected): {', '.join(cells[:6])}{' ...' if len(cells) > 6 else ''}")
    warning = None
    if problems:
        warning = ("the fitted model fails the per-cell goodness of fit: " + "; ".join(problems)
                   + " (a skewed phenotype may be normal on another scale: try the log transform and compare the "
                   "transforms, docs/model.md section 7)")
    return CellGoodness(a2, pa, z, pz, observed_quantiles(values, shape), counted, summary, warning)
