"""The selection assay: selection, response and heritability measured directly in a chain.

At every iteration k >= 1 the chain's model M_k generates a guided set (the images trained on next, the
phenotype `hf_power`) and a reference set at the reference scale (same prompts, same per-image seeds, never
trained on, the phenotype `hf_power_reference`). The reference set is M_k's unselected offspring, the guided
set its selected one, so every chain is a selection experiment (docs/assay.md defines every quantity):

- realized selection window (r1, r2): the fractions cut from the left and right tail of the reference
  distribution that, truncated there, best explain the guided phenotypes. Two estimators:
  `window_normal` (maximum likelihood under the normal law on the reference's normal-score scale, with the
  endpoint bias removed) and `window_empirical` (distribution-free, matching the moments of the guided set's
  reference percentiles);
- `truncation_test`: truncation against a shift, a scale change and no change, by AIC weights, on the
  normal-score scale;
- selection differential S_k = mean(guided_k) - mean(reference_k), response R_k = mean(reference_{k+1}) -
  mean(reference_k), realized heritability h2_k = R_k / S_k (Falconer), and the realized-heritability
  regression of cumulative response on cumulative selection differential (through the origin).

Intervals: percentile bootstrap over images. Images are resampled by index (the image coordinate: one prompt
and one seed), once per replicate and for every iteration and both sets of a condition together, so guided
and reference images of the same seed stay paired and the correlations between iterations are kept.

The normal-score scale: r1 and r2 are quantile fractions of the reference law, so they are the same on every
monotone scale of the phenotype. The normal-law route therefore works on the scale where the reference set is
normal by construction, its van der Waerden normal scores z = Phi^-1(F_ref(v)) (`normal_scores`), whatever
law the phenotype itself follows (hf_power is bounded below and skewed).

The core is numpy/scipy only: small pure functions on arrays; `run_assay` drives them over a dataset and
returns an `AssayResult`; `assay_dataset` and `assay_json` turn it into assay.nc and the JSON summary.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from scipy import special, stats

from fitting.errors import AssayError
from fitting.observations import read_run, sample_moments
from qtmio.contract import PHENOTYPE

REFERENCE = "hf_power_reference"
"""The reference set's per-image phenotype (condition, iteration, image) in metrics.nc."""
ASSAY_SCHEMA_VERSION = 1
PACKAGES = ("qtm", "numpy", "scipy", "xarray", "h5netcdf")
MODELS = ("truncation", "shift", "scale", "none")
MODEL_NUM_PARAMS = {"truncation": 4, "shift": 3, "scale": 3, "none": 2}
NORMALIZING_TRANSFORM = "normal_scores"
"""The monotone map under which the normal-law window and the truncation test are computed: the van der Waerden
normal scores of the reference set (`normal_scores`), recorded per condition in assay.nc and the JSON."""
CELL_QUANTITIES = ("r1", "r2", "r1_empirical", "r2_empirical", "selection_differential")
ITERATION_QUANTITIES = CELL_QUANTITIES + ("response", "heritability", "cumulative_selection_differential",
                                          "cumulative_response")


@dataclasses.dataclass(frozen=True)
class AssayConfig:
    """How the assay is computed.

    Attributes:
        num_bootstrap: bootstrap replicates (resampled image sets) for the intervals.
        confidence: coverage of the percentile intervals.
        min_images: fewest images per set for a cell to be assayed (fewer: NaN with a note).
    """

    num_bootstrap: int = 1000
    confidence: float = 0.95
    min_images: int = 3

    def validate(self) -> None:
        """Raise AssayError naming the field ({field} templates: a shell may show its own flag)."""
        if self.num_bootstrap < 2:
            raise AssayError(f"{{num_bootstrap}} must be >= 2; got {self.num_bootstrap}",
                             parameters=("num_bootstrap",))
        if not 0.0 < self.confidence < 1.0:
            raise AssayError(f"{{confidence}} must lie in (0, 1); got {self.confidence}", parameters=("confidence",))
        if self.min_images < 2:
            raise AssayError(f"{{min_images}} must be >= 2; got {self.min_images}", parameters=("min_images",))


# ---------------------------------------------------------------------------------------------------------
# The core: one (condition, iteration) cell, vectorized over rows (bootstrap replicates)
# ---------------------------------------------------------------------------------------------------------


def uniform_endpoints(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unbiased estimates of the endpoints (lo, hi) of U(lo, hi) from the rows of `u` (NaN = missing).

    The maximum-likelihood endpoints are the sample extremes u_(1), u_(n), which lie inside the interval by
    (hi - lo) / (n + 1) on average; moving each out by (u_(n) - u_(1)) / (n - 1) removes that bias (the
    minimum-variance unbiased estimator of a uniform's endpoints). Returns (lo, hi), not clipped.
    """
    u = np.atleast_2d(u)
    n = np.sum(np.isfinite(u), axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # rows without values give NaN
        umin, umax = np.nanmin(u, axis=-1), np.nanmax(u, axis=-1)
        pad = (umax - umin) / (n - 1)
    return umin - pad, umax + pad


def reference_ranks(values: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mid-ranks of `values` among their row's reference set: (#{x < v} + #{x = v} / 2, m) per value, m the
    row's number of finite reference values (broadcast to the values' shape). NaN where the value is missing
    or the reference row is empty."""
    values, reference = np.atleast_2d(values), np.atleast_2d(reference)
    ranks = np.full(values.shape, np.nan)
    size = np.zeros(values.shape)
    for row in range(values.shape[0]):
        x = np.sort(reference[row][np.isfinite(reference[row])])
        ok = np.isfinite(values[row])
        if x.size == 0 or not ok.any():
            continue
        v = values[row][ok]
        ranks[row, ok] = (np.searchsorted(x, v, "left") + np.searchsorted(x, v, "right")) / 2.0
        size[row] = x.size
    return ranks, size


def reference_percentiles(guided: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The percentile of every guided phenotype in its row's reference set: the empirical CDF
    F_n(y) = (#{x < y} + #{x = y} / 2) / n (mid-rank, so a guided image equal to its paired reference image
    sits in the middle of the tie). NaN where the guided value is missing or the reference row is empty."""
    ranks, size = reference_ranks(guided, reference)
    with np.errstate(invalid="ignore", divide="ignore"):
        return ranks / size


def normal_scores(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The van der Waerden normal scores of `values` in their row's reference set (docs/assay.md, "The
    normal-score scale"): z = Phi^-1(u), u = (#{x < v} + #{x = v} / 2 + 1/2) / (m + 1).

    At the reference images themselves (no ties) u = j / (m + 1) for the j-th smallest, the expected value of
    F(x_(j)) for any continuous law F, so the reference set's scores are the N(0, 1) quantiles whatever the
    phenotype's law; a value between the reference's j-th and (j + 1)-th smallest gets u = (j + 1/2) / (m + 1),
    one beyond the reference's extremes 1/2 / (m + 1) or 1 - 1/2 / (m + 1), so every score is finite. The
    map is monotone (non-decreasing): quantile fractions such as r1, r2 are the same on this scale as on the
    phenotype's. NaN where the value is missing or the reference row is empty."""
    ranks, size = reference_ranks(values, reference)
    with np.errstate(invalid="ignore", divide="ignore"):
        return special.ndtri((ranks + 0.5) / (size + 1.0))


def window_normal(guided: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Realized window (r1, r2) by maximum likelihood under the normal law (the hard truncation of Eq. 7-8) on
    the reference's normal-score scale (docs/assay.md).

    On the scale of `normal_scores` the reference law is N(0, 1); the guided set, if it is that law truncated
    at its r1 and 1 - r2 quantiles, has scores in [Phi^-1(r1), Phi^-1(1 - r2)]. Reparametrised by the
    probability transform u = Phi(z) = (#{x < g} + #{x = g} / 2 + 1/2) / (m + 1), the guided set is
    U(r1, 1 - r2), whose likelihood (1 - r1 - r2)^-n grows as the window shrinks: the ML window is the
    sample's extremes, biased inwards. `uniform_endpoints` removes that bias. The phenotype's own law does not
    enter (r1, r2 are quantile fractions, the same on every monotone scale). Rows are bootstrap replicates
    (NaN = missing); estimates are clipped to [0, 1].
    """
    return _windows(*reference_ranks(guided, reference))["normal"]


def window_empirical(guided: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Realized window (r1, r2), distribution-free: moments of the guided set's reference percentiles.

    If the guided set is the reference distribution F (any continuous F) truncated at its r1 and 1 - r2
    quantiles, then u = F(guided) ~ U(r1, 1 - r2), with mean (1 + r1 - r2) / 2 and variance
    (1 - r1 - r2)^2 / 12. With u from the reference set's empirical CDF (`reference_percentiles`), matching
    both moments gives width w = sqrt(12 var(u)) and centre c = mean(u):
        r1 = c - w / 2,   r2 = 1 - c - w / 2.
    Every guided image counts (one stray image cannot move the window, unlike the extremes the likelihood
    uses), and the estimator is a smooth function of means, so the bootstrap is valid for it. Clipped to
    [0, 1].
    """
    return _windows(*reference_ranks(guided, reference))["empirical"]


def _windows(ranks: np.ndarray, size: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Both windows from the guided set's mid-ranks in the reference (`reference_ranks`), computed once for
    the two: "normal" (`window_normal`: u = Phi(normal score) = (rank + 1/2) / (m + 1), unbiased endpoints)
    and "empirical" (`window_empirical`: u = rank / m, moments)."""
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # rows with fewer than 2 values give NaN
        lo, hi = uniform_endpoints((ranks + 0.5) / (size + 1.0))
        u = ranks / size
        centre = np.nanmean(u, axis=-1)
        width = np.sqrt(12.0 * np.nanvar(u, axis=-1, ddof=1))
    return {"normal": (np.clip(lo, 0.0, 1.0), np.clip(1.0 - hi, 0.0, 1.0)),
            "empirical": (np.clip(centre - width / 2, 0.0, 1.0), np.clip(1.0 - centre - width / 2, 0.0, 1.0))}


def cell_statistics(guided: np.ndarray, reference: np.ndarray, *, min_images: int = 3) -> dict[str, np.ndarray]:
    """Per row (bootstrap replicate) of one cell: both windows, the selection differential
    S = mean(guided) - mean(reference), and the reference mean (for the response). Rows with fewer than
    `min_images` finite values in either set give NaN."""
    guided, reference = np.atleast_2d(guided), np.atleast_2d(reference)
    windows = _windows(*reference_ranks(guided, reference))  # window_normal and window_empirical
    (r1, r2), (r1e, r2e) = windows["normal"], windows["empirical"]
    gmean = sample_moments(guided)[1]
    rmean = sample_moments(reference)[1]
    out = {"r1": r1, "r2": r2, "r1_empirical": r1e, "r2_empirical": r2e,
           "selection_differential": gmean - rmean, "reference_mean": rmean}
    few = (np.sum(np.isfinite(guided), axis=-1) < min_images) | (np.sum(np.isfinite(reference), axis=-1) < min_images)
    return {k: np.where(few, np.nan, v) for k, v in out.items()}


def response_and_heritability(selection_differential: np.ndarray, reference_mean: np.ndarray,
                              iterations: np.ndarray) -> dict[str, np.ndarray]:
    """Response, realized heritability and the cumulative series of one condition (last axis = iteration).

    R_k = mean(reference_{k+1}) - mean(reference_k) (NaN at the last iteration or when k + 1 is missing);
    h2_k = R_k / S_k (Falconer's realized heritability); cumulative selection differential
    CS_k = S_1 + ... + S_k and cumulative response CR_k = R_1 + ... + R_k (= mean(reference_{k+1}) -
    mean(reference_1)), over the leading run of iterations where both S and R exist (NaN after it).
    """
    s = np.asarray(selection_differential, float)
    ref = np.asarray(reference_mean, float)
    iterations = np.asarray(iterations)
    response = np.full(s.shape, np.nan)
    nxt = np.flatnonzero(np.diff(iterations) == 1)
    response[..., nxt] = ref[..., nxt + 1] - ref[..., nxt]
    with np.errstate(invalid="ignore", divide="ignore"):
        heritability = response / s
    both = np.isfinite(s) & np.isfinite(response)
    lead = np.cumprod(both, axis=-1).astype(bool)
    cs = np.where(lead, np.cumsum(np.where(lead, s, 0.0), axis=-1), np.nan)
    cr = np.where(lead, np.cumsum(np.where(lead, response, 0.0), axis=-1), np.nan)
    return {"response": response, "heritability": heritability, "cumulative_selection_differential": cs,
            "cumulative_response": cr}


def realized_heritability_slope(cumulative_selection: np.ndarray, cumulative_response: np.ndarray) -> np.ndarray:
    """Falconer's realized-heritability regression: the least-squares slope through the origin of cumulative
    response on cumulative selection differential, b = sum(CS_k CR_k) / sum(CS_k^2), over the finite
    points of each row (last axis = iteration). NaN where no point exists."""
    cs, cr = np.asarray(cumulative_selection, float), np.asarray(cumulative_response, float)
    ok = np.isfinite(cs) & np.isfinite(cr)
    with np.errstate(invalid="ignore", divide="ignore"):
        num = np.sum(np.where(ok, cs * cr, 0.0), axis=-1)
        den = np.sum(np.where(ok, cs * cs, 0.0), axis=-1)
        return np.where(ok.any(axis=-1), num / den, np.nan)


def truncation_test(guided: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """Which change of the reference law explains the guided set best: truncation, shift, scale, none.

    Both sets are first mapped to the reference's normal-score scale (`normal_scores`, fitted to the
    reference set alone), where the reference is normal whatever the phenotype's law; the four normal models
    of `normal_models_test` are fitted there. The map is fitted before any model and is the same for all
    four, so the models compete on one scale: under a smooth monotone map the phenotypes' log-likelihood
    would differ from the scores' by the same summed log-Jacobian in every model, leaving AIC differences,
    Akaike weights and likelihood ratios unchanged; the rank map has no Jacobian, and the four models are
    models of the scores. On normal phenotypes the scores are (up to rank noise) the standardized phenotypes,
    so the test means what it meant on the raw scale there (docs/assay.md, "The truncation test").

    Returns `normal_models_test`'s dict, except `shift` = mean(guided) - mean(reference) in phenotype units;
    log-likelihoods, `scale` and `truncation_fit` are those of the scores.
    """
    g = np.asarray(guided, float).ravel()
    x = np.asarray(reference, float).ravel()
    out = normal_models_test(normal_scores(g, x)[0], normal_scores(x, x)[0])
    gf, xf = g[np.isfinite(g)], x[np.isfinite(x)]
    if out["best"] is not None:
        out["shift"] = float(np.mean(gf) - np.mean(xf))
    return out


def normal_models_test(guided: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """The truncation test's four normal models on values (the normal scores in `truncation_test`).

    Four normal models of both sets together (reference x, n_x images; guided g, n_g images), each fitted by
    maximum likelihood to all n_x + n_g values, so that the uncertainty of the reference's own mean
    and sd enters every model alike:
        none        x, g ~ N(m, s^2)                                        k = 2
        shift       x ~ N(m, s^2),  g ~ N(m + d, s^2)                       k = 3
        scale       x ~ N(m, s^2),  g ~ N(m, c^2 s^2)                       k = 3
        truncation  x ~ N(m, s^2),  g ~ N(m, s^2) truncated to the window   k = 4
                    [m + s Phi^-1(r1), m + s Phi^-1(1 - r2)]
    The truncation likelihood is sum log phi over both sets - n_g log(1 - r1 - r2), maximized over (m, s)
    with the window at its bias-corrected endpoints (`uniform_endpoints` of Phi((g - m) / s)): at the plain
    ML endpoints (the guided extremes) the likelihood gains about one unit per endpoint even when nothing is
    truncated. Compared by AIC = 2 k - 2 log L and Akaike weights exp(-dAIC / 2) / sum; `best` is the model
    of largest weight, `statistic` the likelihood ratio 2 (log L_best - log L_runner_up); `p_value` holds the
    likelihood-ratio tests of shift and of scale against none (nested, chi^2 with 1 degree of freedom; the
    truncation model is not regular at its endpoints and gets no such p-value); `truncation_fit` holds the
    truncation model's (m, s). The four fits treat the two sets as independent samples (paired seeds make
    them correlated; docs/assay.md).
    """
    from scipy import optimize

    g = np.asarray(guided, float)
    x = np.asarray(reference, float)
    g, x = g[np.isfinite(g)], x[np.isfinite(x)]
    ng, nx = g.size, x.size
    nan = {k: math.nan for k in MODELS}
    if ng < 2 or nx < 2 or np.ptp(x) <= 0 or np.ptp(g) <= 0:
        return {"best": None, "log_likelihood": dict(nan), "aic": dict(nan), "aic_weight": dict(nan),
                "statistic": math.nan, "p_value": {"shift": math.nan, "scale": math.nan}, "shift": math.nan,
                "scale": math.nan, "truncation_fit": {"mean": math.nan, "sd": math.nan}}
    n = nx + ng
    const = -0.5 * n * (1.0 + np.log(2 * np.pi))
    both = np.concatenate([x, g])
    loglik = {"none": const - 0.5 * n * np.log(np.var(both))}
    xbar, gbar = float(np.mean(x)), float(np.mean(g))
    pooled = (np.sum((x - xbar) ** 2) + np.sum((g - gbar) ** 2)) / n
    loglik["shift"] = const - 0.5 * n * np.log(pooled)

    def scale_profile(m: float) -> float:  # -log L at mean m, both variances at their ML values
        return 0.5 * nx * np.log(np.mean((x - m) ** 2)) + 0.5 * ng * np.log(np.mean((g - m) ** 2))

    lo, hi = min(xbar, gbar), max(xbar, gbar)
    m_scale = optimize.minimize_scalar(scale_profile, bounds=(lo, hi), method="bounded").x if hi > lo else xbar
    loglik["scale"] = -0.5 * n * (1.0 + np.log(2 * np.pi)) - scale_profile(m_scale)
    scale = math.sqrt(np.mean((g - m_scale) ** 2) / np.mean((x - m_scale) ** 2))

    def truncation_nll(theta: np.ndarray) -> float:
        m, s = theta[0], math.exp(theta[1])
        zx, zg = (x - m) / s, (g - m) / s
        lo_u, hi_u = uniform_endpoints(special.ndtr(zg)[None, :])
        mass = float(np.clip(hi_u[0], 0.0, 1.0) - np.clip(lo_u[0], 0.0, 1.0))
        if not mass > 0:
            return math.inf
        return (0.5 * (np.sum(zx * zx) + np.sum(zg * zg)) + n * math.log(s) + ng * math.log(mass)
                + 0.5 * n * math.log(2 * math.pi))

    start = np.array([xbar, math.log(np.std(x))])
    fit = optimize.minimize(truncation_nll, start, method="Nelder-Mead",
                            options={"xatol": 1e-9, "fatol": 1e-9, "maxiter": 2000})
    theta = fit.x if fit.fun <= truncation_nll(start) else start
    loglik["truncation"] = -float(truncation_nll(theta))
    aic = {k: 2 * MODEL_NUM_PARAMS[k] - 2 * float(loglik[k]) for k in MODELS}
    best_aic = min(aic.values())
    raw = {k: math.exp(-0.5 * (aic[k] - best_aic)) for k in MODELS}
    total = sum(raw.values())
    ranked = sorted(MODELS, key=lambda k: aic[k])
    lr = {k: max(0.0, 2 * float(loglik[k] - loglik["none"])) for k in ("shift", "scale")}
    return {"best": ranked[0], "log_likelihood": {k: float(loglik[k]) for k in MODELS}, "aic": aic,
            "aic_weight": {k: raw[k] / total for k in MODELS},
            "statistic": float(2 * (loglik[ranked[0]] - loglik[ranked[1]])),
            "p_value": {k: float(stats.chi2.sf(v, 1)) for k, v in lr.items()},
            "shift": gbar - xbar, "scale": scale,
            "truncation_fit": {"mean": float(theta[0]), "sd": math.exp(theta[1])}}


def condition_statistics(guided: np.ndarray, reference: np.ndarray, iterations: np.ndarray, *,
                         min_images: int = 3) -> dict[str, np.ndarray]:
    """Every bootstrapped quantity of one condition. `guided`, `reference`: (I, B, N) phenotypes (iterations,
    rows, images; NaN = missing). Returns arrays (B, I) for the per-iteration quantities and (B,) for
    `realized_heritability` (the slope of `realized_heritability_slope`)."""
    cells = [cell_statistics(guided[i], reference[i], min_images=min_images) for i in range(guided.shape[0])]
    out = {k: np.stack([c[k] for c in cells], axis=-1) for k in cells[0]}
    out.update(response_and_heritability(out["selection_differential"], out["reference_mean"], iterations))
    out["realized_heritability"] = realized_heritability_slope(out["cumulative_selection_differential"],
                                                               out["cumulative_response"])
    return out


# ---------------------------------------------------------------------------------------------------------
# The driver: a dataset in, an AssayResult out
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AssayInput:
    """Per-image phenotypes of the assay: guided and reference, (condition, iteration, image), k >= 1."""

    conditions: tuple[str, ...]
    iterations: np.ndarray
    guided: np.ndarray
    reference: np.ndarray
    source: str = "<memory>"
    reference_scale: float | None = None


SELECTION_FLOOR = 1e-3
"""A selection differential below this many reference standard deviations is rounding, not selection: guided
and reference images that agree to 8 bits (CFG 1 against its own reference) give |S| ~ 1e-6 sd with a
bootstrap interval that may exclude 0. Truncating even a fraction 0.001 of one tail gives |S| ~ 3e-3 sd."""


@dataclasses.dataclass(frozen=True)
class AssayResult:
    """The assay of every condition and iteration k >= 1.

    `estimate`, `lower`, `upper`: name -> (C, I) arrays for ITERATION_QUANTITIES (bootstrap percentile
    interval at `config.confidence`); `realized_heritability`: (C, 3) estimate, lower, upper;
    `tests`: [condition][iteration] -> `truncation_test` dict; `num_guided`, `num_reference`: (C, I);
    `guided_mean`, `reference_mean`, `reference_sd`: (C, I); `notes`: remarks (cells left out, ...).
    """

    data: AssayInput
    config: AssayConfig
    estimate: dict[str, np.ndarray]
    lower: dict[str, np.ndarray]
    upper: dict[str, np.ndarray]
    realized_heritability: np.ndarray
    tests: list[list[dict[str, Any]]]
    num_guided: np.ndarray
    num_reference: np.ndarray
    guided_mean: np.ndarray
    reference_mean: np.ndarray
    reference_sd: np.ndarray
    seed: int | None
    notes: tuple[str, ...] = ()

    @property
    def conditions(self) -> tuple[str, ...]:
        return self.data.conditions

    @property
    def iterations(self) -> np.ndarray:
        return self.data.iterations

    def meaningful_heritability(self) -> np.ndarray:
        """(C, I): the interval of S excludes 0 and |S| is at least SELECTION_FLOOR reference sds, so h2 = R / S
        means something."""
        lo, hi = self.lower["selection_differential"], self.upper["selection_differential"]
        with np.errstate(invalid="ignore"):
            above_rounding = np.abs(self.estimate["selection_differential"]) >= SELECTION_FLOOR * self.reference_sd
        return ((lo > 0) | (hi < 0)) & above_rounding

    def meaningful_realized_heritability(self) -> np.ndarray:
        """(C,): the interval of the last cumulative selection differential excludes 0."""
        out = np.zeros(len(self.conditions), bool)
        for c in range(len(self.conditions)):
            cs = self.estimate["cumulative_selection_differential"][c]
            ok = np.flatnonzero(np.isfinite(cs))
            if ok.size:
                lo = self.lower["cumulative_selection_differential"][c, ok[-1]]
                hi = self.upper["cumulative_selection_differential"][c, ok[-1]]
                sd = self.reference_sd[c, 0] if np.isfinite(self.reference_sd[c, 0]) else np.nanmean(self.reference_sd[c])
                above_rounding = abs(cs[ok[-1]]) >= SELECTION_FLOOR * sd
                out[c] = ((lo > 0) or (hi < 0)) and bool(above_rounding)
        return out


def run_assay(data: AssayInput, config: AssayConfig = AssayConfig(), *, rng: np.random.Generator,
              seed: int | None = None, progress=None) -> AssayResult:
    """Assay every condition of `data`: point estimates, bootstrap intervals and the truncation test.

    Bootstrap: per replicate, one resample (with replacement) of the condition's image indices, applied to
    every iteration and both sets (pairs by seed are kept). Intervals are the replicates' percentiles
    (NaN replicates ignored). `progress(description, total)` may return a callable advanced per condition.
    """
    config.validate()
    num_c, num_i = data.guided.shape[:2]
    alpha = (1.0 - config.confidence) / 2
    est = {k: np.full((num_c, num_i), np.nan) for k in ITERATION_QUANTITIES}
    lower = {k: np.full((num_c, num_i), np.nan) for k in ITERATION_QUANTITIES}
    upper = {k: np.full((num_c, num_i), np.nan) for k in ITERATION_QUANTITIES}
    slope = np.full((num_c, 3), np.nan)
    tests: list[list[dict[str, Any]]] = []
    notes: list[str] = []
    num_g, gmean, _ = sample_moments(data.guided)
    num_r, rmean, rvar = sample_moments(data.reference)
    rsd = np.sqrt(rvar)
    advance = progress("bootstrap over images", num_c) if progress is not None else None
    for c, name in enumerate(data.conditions):
        g, r = data.guided[c], data.reference[c]
        few = (num_r[c] < config.min_images) | (num_g[c] < config.min_images)
        tests.append([truncation_test(g[i][:0] if few[i] else g[i], r[i]) for i in range(num_i)])
        if few.any():
            notes.append(f"condition {name}: iteration(s) {', '.join(str(int(k)) for k in data.iterations[few])} "
                         f"have fewer than {config.min_images} guided or reference images; not assayed")
        point = condition_statistics(g[:, None, :], r[:, None, :], data.iterations, min_images=config.min_images)
        for k in ITERATION_QUANTITIES:
            est[k][c] = point[k][0]
        slope[c, 0] = point["realized_heritability"][0]
        images = np.flatnonzero(np.any(np.isfinite(g) | np.isfinite(r), axis=0))
        if images.size == 0:
            if advance:
                advance()
            continue
        reps: dict[str, list[np.ndarray]] = {k: [] for k in (*ITERATION_QUANTITIES, "realized_heritability")}
        for start in range(0, config.num_bootstrap, 200):
            size = min(200, config.num_bootstrap - start)
            idx = images[rng.integers(0, images.size, size=(size, images.size))]
            boot = condition_statistics(g[:, idx], r[:, idx], data.iterations, min_images=config.min_images)
            for k in reps:
                reps[k].append(boot[k])
        for k in ITERATION_QUANTITIES:
            lower[k][c], upper[k][c] = _percentiles(np.concatenate(reps[k]), alpha)
        slope[c, 1], slope[c, 2] = _percentiles(np.concatenate(reps["realized_heritability"]), alpha)
        if advance:
            advance()
    result = AssayResult(data=data, config=config, estimate=est, lower=lower, upper=upper,
                         realized_heritability=slope, tests=tests, num_guided=num_g, num_reference=num_r,
                         guided_mean=gmean, reference_mean=rmean, reference_sd=rsd, seed=seed, notes=tuple(notes))
    weak = [f"{c} iteration {int(k)}" for ci, c in enumerate(data.conditions)
            for ii, k in enumerate(data.iterations)
            if np.isfinite(est["heritability"][ci, ii]) and not result.meaningful_heritability()[ci, ii]]
    if weak:
        notes.append("selection differential indistinguishable from 0 (its interval covers 0, or |S| < 0.001 "
                     "reference sd: rounding), so h2 = R / S means nothing at: " + ", ".join(weak))
    return dataclasses.replace(result, notes=tuple(notes))


def _percentiles(values: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval over axis 0, ignoring NaN replicates; NaN where more than half are NaN."""
    values = np.asarray(values, float)
    finite = np.isfinite(values)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns give NaN
        lo = np.nanquantile(np.where(finite, values, np.nan), alpha, axis=0)
        hi = np.nanquantile(np.where(finite, values, np.nan), 1 - alpha, axis=0)
    bad = finite.mean(axis=0) < 0.5
    return np.where(bad, np.nan, lo), np.where(bad, np.nan, hi)


# ---------------------------------------------------------------------------------------------------------
# Reading a results dataset
# ---------------------------------------------------------------------------------------------------------


def load_assay_input(path: str | Path) -> AssayInput:
    """Read a run directory (holding metrics.nc) or a .nc file (fitting.observations.read_run); see
    `assay_input_from_dataset`. Raises AssayError."""
    file, ds = read_run(path, AssayError)
    return assay_input_from_dataset(ds, source=str(file))


def assay_input_from_dataset(ds: Any, *, source: str = "<dataset>") -> AssayInput:
    """The assay's arrays from an xarray Dataset of the results contract (qtmio.contract: schema_version,
    condition and iteration coordinates) holding `hf_power` and `hf_power_reference` over (condition,
    iteration, image). Iterations >= 1 only (iteration 0 is the real data). Raises AssayError naming the
    file, the variable and the fix."""
    from qtmio.contract import check_schema, read_coordinates
    from qtmio.errors import ContractError

    try:
        check_schema(ds, source)
        conditions, iterations, order = read_coordinates(ds, source)
    except ContractError as exc:
        raise AssayError(str(exc)) from exc
    for name in (PHENOTYPE, REFERENCE):
        if name not in ds.data_vars:
            fix = ("run the chain with [assay] reference_scale (and images) set in its config, so that every "
                   "iteration also generates its reference set" if name == REFERENCE else
                   "the assay needs the per-image phenotypes of the guided images")
            raise AssayError(f"{source}: variable '{name}' (condition, iteration, image) is missing; {fix} "
                             "(docs/assay.md)")
        if set(ds[name].dims) != {"condition", "iteration", "image"}:
            raise AssayError(f"{source}: variable '{name}' has dimensions {tuple(ds[name].dims)}; the assay needs "
                             "(condition, iteration, image)")
    keep = iterations >= 1
    if not keep.any():
        raise AssayError(f"{source}: no iteration >= 1; the assay compares the guided and reference sets of "
                         "iterations k >= 1")
    guided, reference = (np.asarray(ds[name].transpose("condition", "iteration", "image").values,
                                    float)[:, order][:, keep] for name in (PHENOTYPE, REFERENCE))
    if not np.isfinite(reference).any():
        raise AssayError(f"{source}: variable '{REFERENCE}' holds no value at any iteration >= 1; run the chain "
                         "with [assay] reference_scale set (docs/assay.md)")
    scale = ds[REFERENCE].attrs.get("reference_scale", ds.attrs.get("reference_scale"))
    try:
        scale = None if scale is None else float(np.asarray(scale).item())
    except (TypeError, ValueError):
        scale = None
    return AssayInput(conditions=conditions, iterations=iterations[keep], guided=guided, reference=reference,
                      source=source, reference_scale=scale)


# ---------------------------------------------------------------------------------------------------------
# The result as data: assay.nc and the JSON summary
# ---------------------------------------------------------------------------------------------------------

_DESCRIPTIONS = {
    "r1": "realized left-tail fraction: maximum likelihood under the normal law on the reference's normal-score "
          "scale, endpoint bias removed",
    "r2": "realized right-tail fraction: maximum likelihood under the normal law on the reference's normal-score "
          "scale, endpoint bias removed",
    "r1_empirical": "realized left-tail fraction, distribution-free (moments of the reference percentiles)",
    "r2_empirical": "realized right-tail fraction, distribution-free (moments of the reference percentiles)",
    "selection_differential": "S_k = mean(guided_k) - mean(reference_k)",
    "response": "R_k = mean(reference_{k+1}) - mean(reference_k)",
    "heritability": "realized heritability h2_k = R_k / S_k (Falconer)",
    "cumulative_selection_differential": "S_1 + ... + S_k",
    "cumulative_response": "R_1 + ... + R_k",
}


def assay_dataset(result: AssayResult, *, command: str | None = None) -> Any:
    """assay.nc as an xarray Dataset: dims condition, iteration (k >= 1), model; every quantity with its
    `_lower` / `_upper` bounds; truncation-test log-likelihoods and Akaike weights; provenance in attrs."""
    import xarray as xr

    from qtmio.netcdf import netcdf_attrs
    from qtmio.provenance import provenance

    dims = ("condition", "iteration")
    data_vars: dict[str, Any] = {}
    for k in ITERATION_QUANTITIES:
        for suffix, arr in (("", result.estimate[k]), ("_lower", result.lower[k]), ("_upper", result.upper[k])):
            bound = {"": "estimate", "_lower": "lower bound", "_upper": "upper bound"}[suffix]
            data_vars[k + suffix] = (dims, arr, {"description": f"{_DESCRIPTIONS[k]} ({bound})"})
    data_vars["heritability_meaningful"] = (dims, result.meaningful_heritability(),
                                            {"description": "the interval of S excludes 0"})
    tests = result.tests
    loglik = np.array([[[t["log_likelihood"][m] for m in MODELS] for t in row] for row in tests])
    weight = np.array([[[t["aic_weight"][m] for m in MODELS] for t in row] for row in tests])
    best = np.array([[t["best"] or "" for t in row] for row in tests], dtype=str)
    data_vars["log_likelihood"] = (dims + ("model",), loglik,
                                   {"description": "truncation test: maximized log-likelihood of both sets' "
                                                   "normal scores (see normalizing_transform)"})
    data_vars["aic_weight"] = (dims + ("model",), weight, {"description": "truncation test: Akaike weight"})
    data_vars["best_model"] = (dims, best, {"description": "truncation test: the model of largest Akaike weight"})
    data_vars["normalizing_transform"] = (
        ("condition",), np.array([NORMALIZING_TRANSFORM] * len(result.conditions), dtype=str),
        {"description": "monotone map of the phenotype under which r1, r2 (normal law) and the truncation test "
                        "are computed: normal_scores = Phi^-1((mid-rank + 1/2) / (m + 1)) in the reference set "
                        "of the same iteration (docs/assay.md)"})
    data_vars["num_guided"] = (dims, result.num_guided, {"description": "guided images measured"})
    data_vars["num_reference"] = (dims, result.num_reference, {"description": "reference images measured"})
    data_vars["guided_mean"] = (dims, result.guided_mean, {"description": "mean phenotype of the guided set"})
    data_vars["reference_mean"] = (dims, result.reference_mean, {"description": "mean phenotype of the reference set"})
    data_vars["reference_sd"] = (dims, result.reference_sd, {"description": "sd (ddof 1) of the reference set"})
    for j, suffix in enumerate(("", "_lower", "_upper")):
        data_vars["realized_heritability" + suffix] = (
            ("condition",), result.realized_heritability[:, j],
            {"description": "slope through the origin of cumulative response on cumulative selection "
                            "differential (Falconer)"})
    data_vars["realized_heritability_meaningful"] = (("condition",), result.meaningful_realized_heritability())
    attrs = {
        "title": "qtm selection assay",
        "assay_schema_version": ASSAY_SCHEMA_VERSION,
        "source": result.data.source,
        "phenotype": PHENOTYPE,
        "reference_variable": REFERENCE,
        "reference_scale": result.data.reference_scale if result.data.reference_scale is not None else "unknown",
        "confidence": result.config.confidence,
        "interval": "percentile bootstrap over images (resampled by image index: pairs by seed kept)",
        "num_bootstrap": result.config.num_bootstrap,
        "min_images": result.config.min_images,
        "notes": json.dumps(list(result.notes)),
        "definitions": "docs/assay.md",
        **provenance(PACKAGES, seed=result.seed, command=command or None),
    }
    return xr.Dataset(data_vars, coords={"condition": list(result.conditions), "iteration": result.iterations,
                                         "model": list(MODELS)}, attrs=netcdf_attrs(attrs))


def write_assay(result: AssayResult, path: str | Path, **kwargs) -> Path:
    """Write assay.nc atomically (qtmio.netcdf.write_netcdf)."""
    from qtmio.netcdf import write_netcdf

    return write_netcdf(assay_dataset(result, **kwargs), path)


def _num(x: Any) -> float | None:
    """A number for the JSON summary: NaN -> None; infinities stay floats, which qtmio.strict_json writes as
    "inf" / "-inf" like every other command's JSON."""
    x = float(x)
    return None if math.isnan(x) else x


def _interval(result: AssayResult, name: str, c: int, i: int) -> dict[str, float | None]:
    return {"estimate": _num(result.estimate[name][c, i]), "lower": _num(result.lower[name][c, i]),
            "upper": _num(result.upper[name][c, i])}


def assay_json(result: AssayResult) -> dict[str, Any]:
    """The JSON summary, to be written through qtmio.strict_json (NaN -> null, infinities -> "inf" / "-inf"):
    {"conditions": {NAME: {"iterations": [{"iteration": k, "r1": {estimate, lower, upper}, "r2", "r1_empirical",
    "r2_empirical", "selection_differential", "response", "heritability" (+ "meaningful"),
    "truncation_test": {"best", "aic_weight", "log_likelihood", "statistic"}, "num_guided",
    "num_reference"}, ...], "realized_heritability": {estimate, lower, upper, meaningful},
    "cumulative": [...], "normalizing_transform"}}, "confidence", "num_bootstrap", "reference_scale", "source",
    "notes"}."""
    meaningful = result.meaningful_heritability()
    slope_ok = result.meaningful_realized_heritability()
    conditions = {}
    for c, name in enumerate(result.conditions):
        rows = []
        for i, k in enumerate(result.iterations):
            test = result.tests[c][i]
            row: dict[str, Any] = {"iteration": int(k)}
            for q in ("r1", "r2", "r1_empirical", "r2_empirical", "selection_differential", "response",
                      "heritability"):
                row[q] = _interval(result, q, c, i)
            row["heritability"]["meaningful"] = bool(meaningful[c, i])
            row["truncation_test"] = {
                "best": test["best"],
                "aic_weight": {m: _num(v) for m, v in test["aic_weight"].items()},
                "log_likelihood": {m: _num(v) for m, v in test["log_likelihood"].items()},
                "statistic": _num(test["statistic"]),
                "p_value": {m: _num(v) for m, v in test["p_value"].items()},
                "shift": _num(test["shift"]),
                "scale": _num(test["scale"]),
            }
            row["num_guided"] = int(result.num_guided[c, i])
            row["num_reference"] = int(result.num_reference[c, i])
            rows.append(row)
        cumulative = [{"iteration": int(k),
                       "selection_differential": _interval(result, "cumulative_selection_differential", c, i),
                       "response": _interval(result, "cumulative_response", c, i)}
                      for i, k in enumerate(result.iterations)
                      if math.isfinite(result.estimate["cumulative_response"][c, i])]
        est, lo, hi = result.realized_heritability[c]
        conditions[name] = {"iterations": rows, "cumulative": cumulative,
                            "realized_heritability": {"estimate": _num(est), "lower": _num(lo), "upper": _num(hi),
                                                      "meaningful": bool(slope_ok[c])},
                            "normalizing_transform": NORMALIZING_TRANSFORM}
    return {"conditions": conditions, "confidence": result.config.confidence,
            "num_bootstrap": result.config.num_bootstrap, "reference_scale": result.data.reference_scale,
            "source": result.data.source, "notes": list(result.notes)}


# ---------------------------------------------------------------------------------------------------------
# The two routes side by side: the assay against a trajectory fit (both read as datasets, for `qtm report`)
# ---------------------------------------------------------------------------------------------------------

WINDOW_PARAMETERS = ("r1", "r2")


def intervals_overlap(lower_a: float, upper_a: float, lower_b: float, upper_b: float) -> bool:
    """Whether the closed intervals [lower_a, upper_a] and [lower_b, upper_b] share a point."""
    return bool(lower_a <= upper_b and lower_b <= upper_a)


def compare_routes(assay: Any, fit: Any) -> list[dict[str, Any]]:
    """The assayed window against the trajectory fit's, per condition the two share and per parameter
    r1, r2. `assay`: an assay.nc dataset (`assay_dataset`); `fit`: a fit.nc dataset (fitting.results).

    The fit has one value per condition with its interval; the assay one per iteration k >= 1 with its
    bootstrap interval. The routes agree at iteration k when the two intervals overlap
    (`intervals_overlap`; a fixed parameter is the point interval [value, value]). Verdict: "agree" when
    they overlap at every assayed iteration, "disagree" at none, "partly" at some, "not comparable" when
    the assay has no interval or the fit no finite one. Returns one dict per (condition, parameter):
    {condition, parameter, fit: {estimate, lower, upper, free, identified}, assay: [{iteration, estimate,
    lower, upper, overlaps}], verdict, sentence}."""
    fit_conditions = [str(c) for c in fit["condition"].values]
    rows = []
    for a, name in enumerate(str(c) for c in assay["condition"].values):
        if name not in fit_conditions:
            continue
        for parameter in WINDOW_PARAMETERS:
            cell = {k: fit[k].sel(condition=name, parameter=parameter).item()
                    for k in ("estimate", "lower", "upper", "free", "identified")}
            est, free = float(cell["estimate"]), bool(cell["free"])
            lo, hi = (float(cell["lower"]), float(cell["upper"])) if free else (est, est)
            fit_row = {"estimate": est, "lower": lo, "upper": hi, "free": free,
                       "identified": bool(cell["identified"])}
            assayed = []
            for i, k in enumerate(assay["iteration"].values):
                e, alo, ahi = (float(assay[parameter + s].values[a, i]) for s in ("", "_lower", "_upper"))
                if not (math.isfinite(alo) and math.isfinite(ahi)):
                    continue
                ok = math.isfinite(lo) and math.isfinite(hi) and intervals_overlap(lo, hi, alo, ahi)
                assayed.append({"iteration": int(k), "estimate": e, "lower": alo, "upper": ahi, "overlaps": ok})
            verdict = _verdict(fit_row, assayed)
            rows.append({"condition": name, "parameter": parameter, "fit": fit_row, "assay": assayed,
                         "verdict": verdict, "sentence": _sentence(name, parameter, fit_row, assayed, verdict)})
    return rows


def _verdict(fit_row: dict[str, Any], assayed: list[dict[str, Any]]) -> str:
    if not assayed or not (math.isfinite(fit_row["lower"]) and math.isfinite(fit_row["upper"])):
        return "not comparable"
    hits = sum(row["overlaps"] for row in assayed)
    return "agree" if hits == len(assayed) else "disagree" if hits == 0 else "partly"


def _sentence(name: str, parameter: str, fit_row: dict[str, Any], assayed: list[dict[str, Any]],
              verdict: str) -> str:
    """The verdict of `compare_routes` in words."""
    f = fit_row
    fit_text = (f"the fit's {parameter} = {f['estimate']:.3g} [{f['lower']:.3g}, {f['upper']:.3g}]" if f["free"]
                else f"the fit held {parameter} fixed at {f['estimate']:.3g}")
    if verdict == "not comparable":
        why = "the assay has no interval at any iteration" if not assayed else "the fit gives no finite interval"
        return f"{name}, {parameter}: not comparable ({why})."
    its = [row["iteration"] for row in assayed]
    hit = [row["iteration"] for row in assayed if row["overlaps"]]
    if verdict == "agree":
        text = (f"{name}, {parameter}: {fit_text} overlaps the assay's interval at every assayed iteration "
                f"({_iterations(its)}): the two routes agree.")
    elif verdict == "disagree":
        text = (f"{name}, {parameter}: {fit_text} overlaps none of the assay's intervals (iterations "
                f"{_iterations(its)}): the two routes disagree.")
    else:
        miss = [k for k in its if k not in hit]
        text = (f"{name}, {parameter}: {fit_text} overlaps the assay's interval at iteration(s) {_iterations(hit)} "
                f"but not at {_iterations(miss)}: the two routes agree only in part.")
    if f["free"] and not f["identified"]:
        text += f" The fit marks {parameter} as not identified, so its interval says little."
    return text


def _iterations(values: list[int]) -> str:
    return ", ".join(str(k) for k in values)


def _md(x: float, digits: int = 3) -> str:
    return "—" if not math.isfinite(float(x)) else f"{float(x):.{digits}g}"


def _md_interval(ds: Any, name: str, c: int, i: int) -> str:
    est, lo, hi = (float(ds[name + s].values[c, i]) for s in ("", "_lower", "_upper"))
    if not math.isfinite(est):
        return "—"
    return f"{_md(est)} [{_md(lo)}, {_md(hi)}]"


def markdown_assay(assay: Any, *, figure: str | None = None) -> str:
    """The assay (an assay.nc dataset) as a markdown section for report.md: per condition and iteration the
    realized window, S, R, h2 with their intervals and the truncation test's verdict, the realized
    heritability per condition, the notes, and `figure` (a file name beside report.md) when given."""
    conf = float(assay.attrs.get("confidence", 0.95))
    scale = str(assay.attrs.get("reference_scale", "unknown"))
    scale = "" if scale == "unknown" else f" (reference scale {scale})"
    lines = ["## Selection assay", "",
             f"Guided images against the same model's reference images{scale}, {conf:.0%} bootstrap intervals "
             f"over images ({assay.attrs.get('num_bootstrap', '?')} replicates); every quantity is defined in "
             "docs/assay.md. "
             "h2 is marked where the interval of S covers 0 or |S| < 0.001 reference sd (h2 = R / S then means nothing).", ""]
    if figure:
        lines += [f"![Selection assay]({figure})", ""]
    lines += ["| condition | iteration | r1 | r2 | S | R | h2 | best model |",
              "|---|---:|---:|---:|---:|---:|---:|---|"]
    meaningful = assay["heritability_meaningful"].values.astype(bool)
    for c, name in enumerate(str(x) for x in assay["condition"].values):
        for i, k in enumerate(assay["iteration"].values):
            h2 = _md_interval(assay, "heritability", c, i)
            if h2 != "—" and not meaningful[c, i]:
                h2 += " (S ~ 0)"
            cells = [name, str(int(k))] + [_md_interval(assay, q, c, i) for q in
                                           ("r1", "r2", "selection_differential", "response")]
            cells += [h2, str(assay["best_model"].values[c, i]) or "—"]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for c, name in enumerate(str(x) for x in assay["condition"].values):
        est, lo, hi = (float(assay["realized_heritability" + s].values[c]) for s in ("", "_lower", "_upper"))
        if math.isfinite(est):
            flag = "" if bool(assay["realized_heritability_meaningful"].values[c]) else \
                " (cumulative S ~ 0: means nothing)"
            lines.append(f"- {name}: realized heritability (cumulative regression) {_md(est)} "
                         f"[{_md(lo)}, {_md(hi)}]{flag}")
    for note in json.loads(str(assay.attrs.get("notes", "[]"))):
        lines.append(f"- note: {note}")
    return "\n".join(lines) + "\n"


def markdown_routes(rows: list[dict[str, Any]], *, figure: str | None = None) -> str:
    """`compare_routes` as a markdown section: one row per condition and parameter (the fit's value and
    interval, the assay's per iteration, the verdict), then the verdicts in words."""
    lines = ["## Selection window: the assay against the trajectory fit", "",
             "The trajectory fit (`qtm fit`) infers one r1, r2 per condition from the phenotype trajectory; the "
             "assay measures them at every iteration from the guided and reference images. The routes agree at "
             "an iteration when the two intervals overlap.", ""]
    if figure:
        lines += [f"![Selection window by both routes]({figure})", ""]
    lines += ["| condition | parameter | trajectory fit | assay per iteration | verdict |", "|---|---|---|---|---|"]
    for row in rows:
        f = row["fit"]
        fit_text = (f"{_md(f['estimate'])} [{_md(f['lower'])}, {_md(f['upper'])}]" if f["free"]
                    else f"{_md(f['estimate'])} (fixed)")
        if f["free"] and not f["identified"]:
            fit_text += " (not identified)"
        assayed = "; ".join(f"{a['iteration']}: {_md(a['estimate'])} [{_md(a['lower'])}, {_md(a['upper'])}]"
                            for a in row["assay"]) or "—"
        lines.append(f"| {row['condition']} | {row['parameter']} | {fit_text} | {assayed} | {row['verdict']} |")
    lines += [""] + [f"- {row['sentence']}" for row in rows]
    return "\n".join(lines) + "\n"
