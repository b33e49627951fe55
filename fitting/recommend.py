"""Choosing a guidance scale from a pilot, without running the chain (`qtm recommend`, docs/recommend.md).

A pilot generates, from the base model M_0, the same prompts with the same per-image seeds at every candidate
CFG scale s and at the reference scale (the assay's "unselected offspring"), and measures the phenotype of
every image. This module turns those arrays into a recommendation; it is numpy/scipy plus qtm's recursion
(JAX), never torch:

1. the realized selection window of every scale, (r1(s), r2(s)), by the selection assay's distribution-free
   estimator (`fitting.assay.window_empirical`: moments of the guided images' percentiles in the reference
   set), and the selection differential S(s) = mean(guided_s) - mean(reference);
2. smooth curves through them, r(s) = expit(a + b log s) (`fit_window_curve`): two parameters for a grid of
   3-7 scales, monotone (in either direction), bounded in (0, 1) and saturating, which is how a fraction cut
   by a stronger and stronger guidance behaves; log s because CFG grids are geometric and guidance acts
   multiplicatively on the conditional direction. A smoothing spline would need more scales than a pilot has;
   an interpolant would follow the noise of every estimate;
3. the phenotype trajectory each scale would produce over K iterations, through qtm's recursion
   (`predict_chain`, Eq. 5-6, 11): iteration 0's population is M_0's unselected offspring (the reference set:
   mean m, variance V_P split into V_G = h2 V_P and V_E), selection by (r1(s), r2(s)) gives the guided set D_1,
   the next model inherits the fraction h2 of the selected shift, and so on; the phenotype of D_k is the
   recursion's mean[k-1] + S[k-1] (the selected set of iteration k-1's population). With `--after-iterations
   1` h2 is the realized heritability R / S of the pilot (Falconer), otherwise a stated default with its
   sensitivity;
4. the recommended scale: the one whose predicted D_1..D_K stay closest to D_0 on average,
   mean_k |phenotype(D_k) - mean(D_0)| / sd(D_0) (`recommend`), searched on a fine grid in log s between
   the smallest and the largest scale of the pilot; its interval comes from the bootstrap over images through
   the whole pipeline (windows, curves, recursion, arg min);
5. guidance schedules (ReDiFine's s_t = s0 exp(-alpha t / T) and the others the chain samples), when the
   pilot generated them: each one's window by the same estimator from its own guided set, its trajectory
   through the same recursion (same reference population and heritability), its distance to D_0. A schedule
   has no scale axis, so it stays out of the curves; it competes with the best constant scale, and the
   recommendation is whichever keeps D_1..D_K closest to D_0, with the fraction of bootstrap replicates
   that agree (`bootstrap_support`).

The drift per iteration reported for each scale is (phenotype(D_K) - phenotype(D_1)) / (K - 1), the
recursion's counterpart of the collapse rate (Eq. 3); Theorem 1 makes it zero for a centred window
(r1 = r2).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import numpy as np
from scipy import optimize, special, stats

from fitting.assay import window_empirical
from fitting.errors import FittingError
from qtmio.strict_json import to_strict_json

DEFAULT_HERITABILITY = 0.056**2 / (0.056**2 + 0.25**2)
"""h2_0 = sigma_G,0^2 / (sigma_G,0^2 + sigma_E^2) of the paper's parameters (Appendix D.2.2): about 0.048."""
HERITABILITY_SENSITIVITY = (0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
"""The heritabilities the recommendation is recomputed at when h2 is not measured."""
GRID_POINTS = 241
CHUNK = 8192
"""Parameter sets per call of the jitted recursion (one compilation for every pilot)."""


class RecommendError(FittingError, ValueError):
    """Pilot arrays or options the recommendation cannot use."""


@dataclasses.dataclass(frozen=True)
class RecommendConfig:
    """How the recommendation is computed.

    Attributes:
        num_iterations: K, the length of the chain the recommendation is for.
        heritability: h2 of the recursion's iteration 0; None: measured by the pilot (after one finetuning)
            or DEFAULT_HERITABILITY.
        num_bootstrap: bootstrap replicates (images resampled) for every interval.
        confidence: coverage of the percentile intervals.
    """

    num_iterations: int = 6
    heritability: float | None = None
    num_bootstrap: int = 200
    confidence: float = 0.95

    def validate(self) -> None:
        if self.num_iterations < 2:
            raise RecommendError(f"{{num_iterations}} must be >= 2 (a drift needs two iterations); got "
                                 f"{self.num_iterations}", parameters=("num_iterations",))
        if self.heritability is not None and not 0.0 < self.heritability <= 1.0:
            raise RecommendError(f"{{heritability}} must lie in (0, 1]; got {self.heritability}",
                                 parameters=("heritability",))
        if self.num_bootstrap < 20:
            raise RecommendError(f"{{num_bootstrap}} must be >= 20; got {self.num_bootstrap}",
                                 parameters=("num_bootstrap",))
        if not 0.5 < self.confidence < 1.0:
            raise RecommendError(f"{{confidence}} must lie in (0.5, 1); got {self.confidence}",
                                 parameters=("confidence",))


@dataclasses.dataclass(frozen=True)
class ScheduleData:
    """One guidance schedule of a pilot: its images share prompts and seeds with the scales' sets.

    Attributes:
        name: its label.
        parameters: the schedule's table (`schedule` and its fields, `condition_drop`), reported as given.
        mean_scale: the mean of its per-step scales over the sampling steps (where a figure places it).
        guided: (n,) phenotypes of M_0's images under the schedule.
        reference_next: (n,) or None: the reference set of M_0 finetuned once on those images (with the
            schedule's condition drop).
    """

    name: str
    parameters: dict[str, Any]
    mean_scale: float
    guided: np.ndarray
    reference_next: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class PilotData:
    """A pilot's phenotypes. Image i of every set shares its prompt and seed (NaN: undefined phenotype).

    Attributes:
        scales: (S,) the candidate constant CFG scales, increasing.
        guided: (S, n) phenotypes of M_0's images at each scale.
        reference: (n,) phenotypes of M_0's images at the reference scale.
        originals: (N0,) phenotypes of D_0.
        reference_next: (S, n) or None: the reference set of M_1^s, M_0 finetuned once on the images guided at
            scale s (the pilot's `--after-iterations 1`); gives the response and the heritability.
        reference_scale: the scale of the reference set.
        schedules: guidance schedules generated with the same prompts and seeds (ScheduleData).
    """

    scales: np.ndarray
    guided: np.ndarray
    reference: np.ndarray
    originals: np.ndarray
    reference_next: np.ndarray | None = None
    reference_scale: float = 1.0
    schedules: tuple[ScheduleData, ...] = ()

    def validate(self) -> None:
        scales = np.asarray(self.scales, float)
        if scales.ndim != 1 or scales.size < 3:
            raise RecommendError(f"{{scales}} needs at least 3 scales (two curve parameters and a check); got "
                                 f"{scales.tolist()}", parameters=("scales",))
        if not (np.all(np.isfinite(scales)) and np.all(scales > 0) and np.all(np.diff(scales) > 0)):
            raise RecommendError(f"{{scales}} must be positive and increasing; got {scales.tolist()}",
                                 parameters=("scales",))
        n = np.shape(self.reference)[-1]
        if np.shape(self.guided) != (scales.size, n):
            raise RecommendError(f"guided phenotypes have shape {np.shape(self.guided)}, expected "
                                 f"({scales.size}, {n})")
        if self.reference_next is not None and np.shape(self.reference_next) != (scales.size, n):
            raise RecommendError(f"reference_next has shape {np.shape(self.reference_next)}, expected "
                                 f"({scales.size}, {n})")
        names = [q.name for q in self.schedules]
        if len(set(names)) != len(names):
            raise RecommendError(f"schedule names must be distinct; got {names}", parameters=("schedules",))
        for q in self.schedules:
            if np.shape(q.guided) != (n,):
                raise RecommendError(f"schedule {q.name!r}: guided phenotypes have shape {np.shape(q.guided)}, "
                                     f"expected ({n},)")
            if (q.reference_next is None) != (self.reference_next is None) or (
                    q.reference_next is not None and np.shape(q.reference_next) != (n,)):
                raise RecommendError(f"schedule {q.name!r}: reference_next must be given (shape ({n},)) exactly "
                                     "when the scales have one")
        if np.sum(np.isfinite(self.reference)) < 8 or np.sum(np.isfinite(self.originals)) < 2:
            raise RecommendError("a pilot needs at least 8 images with a defined phenotype ({images}) and 2 "
                                 "images of D_0", parameters=("images",))


# ------------------------------------------------------------------------------------------------ the curves


def window_curve(scales, a, b):
    """r(s) = expit(a + b log s): the window fraction as a logistic function of log s (module docstring)."""
    return special.expit(np.asarray(a)[..., None] + np.asarray(b)[..., None] * np.log(np.asarray(scales, float)))


def fit_window_curve(scales: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares (a, b) of `window_curve` through the estimates r (..., S) at `scales` (S,); rows with
    fewer than 2 finite estimates give NaN. Start: the straight line through logit(clip(r)) against log s."""
    r = np.atleast_2d(np.asarray(r, float))
    x = np.log(np.asarray(scales, float))
    a_out = np.full(r.shape[:-1], np.nan)
    b_out = np.full(r.shape[:-1], np.nan)
    flat_r = r.reshape(-1, r.shape[-1])
    a_flat, b_flat = a_out.reshape(-1), b_out.reshape(-1)
    for row, values in enumerate(flat_r):
        ok = np.isfinite(values)
        if ok.sum() < 2:
            continue
        xs, ys = x[ok], values[ok]
        z = special.logit(np.clip(ys, 1e-3, 1 - 1e-3))
        slope, intercept = np.polyfit(xs, z, 1) if np.ptp(xs) > 0 else (0.0, float(np.mean(z)))
        fit = optimize.least_squares(lambda p: special.expit(p[0] + p[1] * xs) - ys,
                                     x0=np.clip([intercept, slope], -30, 30), bounds=([-40, -40], [40, 40]))
        a_flat[row], b_flat[row] = fit.x
    return a_out.reshape(r.shape[:-1]), b_out.reshape(r.shape[:-1])


# ------------------------------------------------------------------------------------------------ the recursion


def predict_chain(r1, r2, *, heritability, mean, var_phenotype, num_iterations: int) -> np.ndarray:
    """Predicted phenotype means of D_1..D_K (..., K) under qtm's recursion (qtm.recursion.trajectory, hard
    truncation, no mutation): iteration 0's population has mean `mean` and variance `var_phenotype`, split
    into V_G = h2 V_P and V_E = (1 - h2) V_P; D_k is the selected set of iteration k-1's population, with
    mean mean[k-1] + S[k-1]. Arguments broadcast."""
    import jax

    from qtm.params import TraitParams
    from qtm.recursion import trajectory

    jax.config.update("jax_enable_x64", True)
    r1, r2, h2, m, vp = np.broadcast_arrays(*(np.asarray(x, float) for x in
                                              (r1, r2, heritability, mean, var_phenotype)))
    shape = r1.shape
    # the recursion needs r1 + r2 < 1 (something is selected): a window estimate cannot be wider
    total = r1 + r2
    shrink = np.where(total > 0.995, 0.995 / np.where(total > 0, total, 1.0), 1.0)
    columns = [x.ravel() for x in (r1 * shrink, r2 * shrink, h2, m, vp)]
    # fixed-size chunks: the jitted recursion compiles once per array shape (seconds each)
    out = np.empty((columns[0].size, num_iterations))
    for start in range(0, columns[0].size, CHUNK):
        part = [np.resize(c[start:start + CHUNK], CHUNK) for c in columns]
        params = TraitParams(r1=part[0], r2=part[1], tail_rate=math.inf, sigma_mut=0.0, mu0=part[3],
                             sigma_g0=np.sqrt(part[2] * part[4]), sigma_env=np.sqrt((1.0 - part[2]) * part[4]))
        traj = trajectory(params, num_iterations - 1)
        phen = np.asarray(traj.mean + traj.selection_differential)
        stop = min(CHUNK, columns[0].size - start)
        out[start:start + stop] = phen[:stop]
    return out.reshape(*shape, num_iterations)


def drift_per_iteration(phenotypes: np.ndarray) -> np.ndarray:
    """(D_K - D_1) / (K - 1) of predicted phenotype means (..., K): the collapse rate's form (Eq. 3)."""
    return (phenotypes[..., -1] - phenotypes[..., 0]) / (phenotypes.shape[-1] - 1)


def distance_to_originals(phenotypes: np.ndarray, mean0, sd0) -> np.ndarray:
    """mean_k |phenotype(D_k) - mean(D_0)| / sd(D_0) over k = 1..K: how far the chain stays from D_0."""
    return np.mean(np.abs(phenotypes - np.asarray(mean0)[..., None]), axis=-1) / np.asarray(sd0)


# ------------------------------------------------------------------------------------------------ the pipeline


def _nanmean(x, axis=-1):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis=axis)


def _nanvar(x, axis=-1):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanvar(x, axis=axis, ddof=1)


def pipeline(guided: np.ndarray, reference: np.ndarray, originals: np.ndarray, reference_next: np.ndarray | None,
             scales: np.ndarray, grid: np.ndarray, *, num_iterations: int,
             heritability: float | np.ndarray | None, schedule_guided: np.ndarray | None = None,
             schedule_next: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The whole recommendation for a batch of replicates (leading axis B): guided (B, S, n), reference (B, n),
    originals (B, N0), reference_next (B, S, n) or None, schedule_guided (B, Q, n) and schedule_next
    (B, Q, n) or None. Returns per replicate the windows and S per scale, the curve parameters, the
    heritability used, predicted phenotypes, drift and distance at the pilot's scales (B, S[, K]) and on
    `grid` (B, G), the best constant scale `recommended` (B,), the same per schedule (`schedule_*`, (B, Q)),
    and `choice` (B,): -1 when the best constant scale is closest to D_0, q when schedule q is."""
    B, S, n = guided.shape
    r1, r2 = window_empirical(guided.reshape(B * S, n), np.repeat(reference, S, axis=0))
    r1, r2 = r1.reshape(B, S), r2.reshape(B, S)
    ref_mean, ref_var = _nanmean(reference), _nanvar(reference)
    differential = _nanmean(guided) - ref_mean[:, None]
    out = {"r1": r1, "r2": r2, "selection_differential": differential}
    if reference_next is not None:
        response = _nanmean(reference_next) - ref_mean[:, None]
        out["response"] = response
        # realized heritability pooled over scales: regression of R on S through the origin
        with np.errstate(invalid="ignore", divide="ignore"):
            h2_measured = np.sum(response * differential, axis=-1) / np.sum(differential**2, axis=-1)
        out["heritability_measured"] = h2_measured
    if heritability is None:
        heritability = out.get("heritability_measured", np.full(B, DEFAULT_HERITABILITY))
    h2 = np.clip(np.broadcast_to(np.asarray(heritability, float), (B,)), 1e-6, 1.0)
    out["heritability"] = h2
    a1, b1 = fit_window_curve(scales, r1)
    a2, b2 = fit_window_curve(scales, r2)
    out.update(a1=a1, b1=b1, a2=a2, b2=b2)
    mean0, sd0 = _nanmean(originals), np.sqrt(_nanvar(originals))
    for label, points, w1, w2 in (("", scales, r1, r2),
                                  ("grid_", grid, window_curve(grid, a1, b1), window_curve(grid, a2, b2))):
        phen = predict_chain(w1, w2, heritability=h2[:, None], mean=ref_mean[:, None], var_phenotype=ref_var[:, None],
                             num_iterations=num_iterations)
        out[label + "phenotype"] = phen
        out[label + "drift"] = drift_per_iteration(phen)
        out[label + "distance"] = distance_to_originals(phen, mean0[:, None], sd0[:, None])
    # the selection differential the truncation window implies (D_1 - m), beside the measured one
    out["selection_differential_predicted"] = out["phenotype"][..., 0] - ref_mean[:, None]
    out["grid_r1"], out["grid_r2"] = window_curve(grid, a1, b1), window_curve(grid, a2, b2)
    dist = np.where(np.isfinite(out["grid_distance"]), out["grid_distance"], np.inf)
    best = np.argmin(dist, axis=-1)
    out["recommended"] = np.where(np.isfinite(dist).any(axis=-1), grid[best], np.nan)
    best_distance = np.min(dist, axis=-1)
    if schedule_guided is not None and schedule_guided.shape[1] > 0:
        q = schedule_guided.shape[1]
        w1, w2 = window_empirical(schedule_guided.reshape(B * q, n), np.repeat(reference, q, axis=0))
        w1, w2 = w1.reshape(B, q), w2.reshape(B, q)
        differential_q = _nanmean(schedule_guided) - ref_mean[:, None]
        phen = predict_chain(w1, w2, heritability=h2[:, None], mean=ref_mean[:, None],
                             var_phenotype=ref_var[:, None], num_iterations=num_iterations)
        out.update(schedule_r1=w1, schedule_r2=w2, schedule_selection_differential=differential_q,
                   schedule_phenotype=phen, schedule_drift=drift_per_iteration(phen),
                   schedule_distance=distance_to_originals(phen, mean0[:, None], sd0[:, None]),
                   schedule_selection_differential_predicted=phen[..., 0] - ref_mean[:, None])
        if schedule_next is not None:
            response_q = _nanmean(schedule_next) - ref_mean[:, None]
            out["schedule_response"] = response_q
            with np.errstate(invalid="ignore", divide="ignore"):
                out["schedule_heritability_realized"] = response_q / differential_q
        candidates = np.concatenate([best_distance[:, None], out["schedule_distance"]], axis=-1)
        candidates = np.where(np.isfinite(candidates), candidates, np.inf)
        choice = np.argmin(candidates, axis=-1) - 1.0  # ties go to the constant scale
        out["choice"] = np.where(np.isfinite(candidates).any(axis=-1), choice, np.nan)
    else:
        out["choice"] = np.where(np.isfinite(best_distance), -1.0, np.nan)
    return out


@dataclasses.dataclass(frozen=True)
class Recommendation:
    """A recommendation: the point estimates (`estimate`, replicate axis of length 1 removed) and the bootstrap
    replicates (`replicates`, leading axis B) of every `pipeline` output, the scales and the grid."""

    scales: np.ndarray
    grid: np.ndarray
    estimate: dict[str, np.ndarray]
    replicates: dict[str, np.ndarray]
    config: RecommendConfig
    heritability_source: str  # "measured", "given" or "default"
    sensitivity: list[dict[str, Any]]
    reference_scale: float
    schedules: tuple[ScheduleData, ...] = ()

    @property
    def winner(self) -> str | None:
        """The name of the schedule that keeps the chain closest to D_0, or None when a constant scale does."""
        choice = float(self.estimate["choice"])
        return self.schedules[int(choice)].name if math.isfinite(choice) and choice >= 0 else None

    def support(self) -> float | None:
        """The fraction of bootstrap replicates whose choice (the constant scale, or the winning schedule)
        is the estimate's."""
        choice = float(self.estimate["choice"])
        return float(np.mean(self.replicates["choice"] == choice)) if math.isfinite(choice) else None

    def interval(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        alpha = 1.0 - self.config.confidence
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return (np.nanquantile(self.replicates[name], alpha / 2, axis=0),
                    np.nanquantile(self.replicates[name], 1 - alpha / 2, axis=0))


def recommend(data: PilotData, config: RecommendConfig = RecommendConfig(), *,
              rng: np.random.Generator) -> Recommendation:
    """Run `pipeline` on the pilot (the estimate) and on `config.num_bootstrap` bootstrap replicates: image
    indices resampled together for the guided, reference and reference_next sets (pairs by seed kept), D_0's
    images resampled on their own. Without a measured or given heritability, the estimate is recomputed at
    every h2 of HERITABILITY_SENSITIVITY."""
    config.validate()
    data.validate()
    scales = np.asarray(data.scales, float)
    grid = np.unique(np.concatenate([np.geomspace(scales[0], scales[-1], GRID_POINTS), scales]))
    guided, reference = np.asarray(data.guided, float), np.asarray(data.reference, float)
    originals = np.asarray(data.originals, float)
    nxt = None if data.reference_next is None else np.asarray(data.reference_next, float)
    if config.heritability is not None:
        h2, source = config.heritability, "given"
    elif nxt is not None:
        h2, source = None, "measured"
    else:
        h2, source = DEFAULT_HERITABILITY, "default"
    schedules = tuple(data.schedules)
    sched = np.array([np.asarray(q.guided, float) for q in schedules]).reshape(len(schedules), reference.size)
    sched_next = None if nxt is None else np.array([np.asarray(q.reference_next, float) for q in schedules]
                                                   ).reshape(len(schedules), reference.size)

    def run(idx, idx0, heritability):
        """`pipeline` on the images idx (B, n) (pairs by seed kept across every set) and D_0's idx0."""
        return pipeline(guided[:, idx].transpose(1, 0, 2), reference[idx], originals[idx0],
                        None if nxt is None else nxt[:, idx].transpose(1, 0, 2), scales, grid,
                        num_iterations=config.num_iterations, heritability=heritability,
                        schedule_guided=sched[:, idx].transpose(1, 0, 2),
                        schedule_next=None if sched_next is None else sched_next[:, idx].transpose(1, 0, 2))

    n, n0, B = reference.size, originals.size, config.num_bootstrap
    every, every0 = np.arange(n)[None], np.arange(n0)[None]
    estimate = {k: v[0] for k, v in run(every, every0, h2).items()}
    replicates = run(rng.integers(0, n, size=(B, n)), rng.integers(0, n0, size=(B, n0)), h2)
    sensitivity = []
    if source == "default":
        for value in HERITABILITY_SENSITIVITY:
            alt = run(every, every0, value)
            choice = float(alt["choice"][0])
            sensitivity.append({"heritability": value, "recommended_scale": float(alt["recommended"][0]),
                                "recommended_schedule": schedules[int(choice)].name if choice >= 0 else None,
                                "predicted_drift": [float(x) for x in alt["drift"][0]],
                                "schedule_predicted_drift": [float(x) for x in alt.get("schedule_drift", [[]])[0]]})
    return Recommendation(scales, grid, estimate, replicates, config, source, sensitivity, data.reference_scale,
                          schedules)


# ------------------------------------------------------------------------------------------------ JSON


def _num(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _intervals(rec: Recommendation, name: str) -> list[dict[str, float | None]]:
    lo, hi = rec.interval(name)
    return [{"estimate": _num(e), "lower": _num(a), "upper": _num(b)}
            for e, a, b in zip(rec.estimate[name], lo, hi)]


def _interval(rec: Recommendation, name: str, q: int) -> dict[str, float | None]:
    lo, hi = rec.interval(name)
    return {"estimate": _num(rec.estimate[name][q]), "lower": _num(lo[q]), "upper": _num(hi[q])}


def _schedules_json(rec: Recommendation) -> list[dict[str, Any]]:
    out = []
    for q, schedule in enumerate(rec.schedules):
        entry = {"name": schedule.name, "parameters": dict(schedule.parameters),
                 "mean_scale": _num(schedule.mean_scale),
                 "r1": _interval(rec, "schedule_r1", q), "r2": _interval(rec, "schedule_r2", q),
                 "selection_differential": _interval(rec, "schedule_selection_differential", q),
                 "selection_differential_predicted": _interval(rec, "schedule_selection_differential_predicted", q),
                 "predicted_drift": _num(rec.estimate["schedule_drift"][q]),
                 "predicted_drift_interval": _interval(rec, "schedule_drift", q),
                 "distance": _num(rec.estimate["schedule_distance"][q]),
                 "distance_interval": _interval(rec, "schedule_distance", q),
                 "bootstrap_wins": float(np.mean(rec.replicates["choice"] == q))}
        if "schedule_response" in rec.estimate:
            entry["response"] = _interval(rec, "schedule_response", q)
            entry["heritability_realized"] = _interval(rec, "schedule_heritability_realized", q)
        elif schedule.parameters.get("condition_drop"):
            entry["note"] = ("condition_drop acts on finetuning, which this pilot did not do "
                             "(--after-iterations 1 measures its response); the prediction ignores it")
        out.append(entry)
    return out


def recommendation_json(rec: Recommendation, cost: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON summary (strict: NaN becomes null, infinities "inf"/"-inf", as every command writes): {"scales", "r1", "r2", "predicted_drift",
    "recommended": {"scale", "lower", "upper", "schedule", "bootstrap_support"}, "best_constant_scale",
    "schedules", "cost", ...} (docs/recommend.md, JSON)."""
    lo, hi = rec.interval("recommended")
    h_lo, h_hi = rec.interval("heritability")
    best = {"scale": _num(rec.estimate["recommended"]), "lower": _num(lo), "upper": _num(hi)}
    winner = rec.winner
    recommended = ({"scale": None, "lower": None, "upper": None} if winner is not None else dict(best))
    recommended.update(schedule=winner, bootstrap_support=rec.support())
    out = {
        "scales": [float(s) for s in rec.scales],
        "r1": _intervals(rec, "r1"),
        "r2": _intervals(rec, "r2"),
        "selection_differential": _intervals(rec, "selection_differential"),
        "selection_differential_predicted": _intervals(rec, "selection_differential_predicted"),
        "predicted_drift": [_num(x) for x in rec.estimate["drift"]],
        "predicted_drift_interval": _intervals(rec, "drift"),
        "predicted_distance": [_num(x) for x in rec.estimate["distance"]],
        "recommended": recommended,
        "best_constant_scale": best,
        "schedules": _schedules_json(rec),
        "curves": {name: {"a": _num(rec.estimate["a" + name[1]]), "b": _num(rec.estimate["b" + name[1]])}
                   for name in ("r1", "r2")},
        "heritability": {"estimate": _num(rec.estimate["heritability"]), "lower": _num(h_lo),
                         "upper": _num(h_hi), "source": rec.heritability_source},
        "heritability_sensitivity": [
            {"heritability": s["heritability"], "recommended_scale": _num(s["recommended_scale"]),
             "recommended_schedule": s["recommended_schedule"],
             "predicted_drift": [_num(x) for x in s["predicted_drift"]],
             "schedule_predicted_drift": [_num(x) for x in s["schedule_predicted_drift"]]}
            for s in rec.sensitivity],
        "num_iterations": rec.config.num_iterations,
        "reference_scale": rec.reference_scale,
        "num_bootstrap": rec.config.num_bootstrap,
        "cost": cost if cost is not None else {},
    }
    if "response" in rec.estimate:
        out["response"] = _intervals(rec, "response")
        m_lo, m_hi = rec.interval("heritability_measured")
        # R / S as measured, before it is clipped to (0, 1] for the recursion
        out["heritability"]["measured"] = {"estimate": _num(rec.estimate["heritability_measured"]),
                                           "lower": _num(m_lo), "upper": _num(m_hi)}
    return to_strict_json(out)


# ------------------------------------------------------------------------------------------------ cost


def chain_cost(*, num_conditions: int, num_iterations: int, images_per_iteration: int, num_steps: int,
               finetune_samples: int) -> dict[str, float]:
    """What the chain a pilot replaces would cost: every condition runs K iterations, each one finetuning
    (finetune_samples image-steps) and generating images_per_iteration images with CFG (two UNet passes a
    step; the chain pays both at scale 1 too)."""
    images = num_conditions * num_iterations * images_per_iteration
    return {"images_generated": images, "unet_passes": images * num_steps * 2,
            "finetunings": num_conditions * num_iterations,
            "finetune_samples": num_conditions * num_iterations * finetune_samples}


def estimated_seconds(cost: dict[str, float], *, images_per_s: float, finetune_samples_per_s: float | None,
                      reference_images_per_s: float | None = None) -> float | None:
    """Seconds of `cost` at the given rates: guided images (two UNet passes a step) at images_per_s, reference
    images (one pass) at reference_images_per_s (default 2 images_per_s), finetuning image-steps at
    finetune_samples_per_s. None when a needed rate is unknown."""
    seconds = cost.get("images_generated", 0) / images_per_s
    ref = cost.get("reference_images", 0)
    if ref:
        seconds += ref / (reference_images_per_s or 2.0 * images_per_s)
    if cost.get("finetune_samples", 0):
        if not finetune_samples_per_s:
            return None
        seconds += cost["finetune_samples"] / finetune_samples_per_s
    return seconds


# ------------------------------------------------------------------------------------------------ check against a study


def compare_with_study(recommendation: dict[str, Any], measured: dict[float, float]) -> dict[str, Any]:
    """Compare a recommendation (its JSON) with measured collapse rates {scale: rate} of a study's constant-CFG
    conditions: Spearman's rank correlation between predicted |drift| and the measured collapse rate over the
    scales both hold, and whether the recommended scale (the pilot's scale nearest to it) is among the two
    with the lowest measured collapse rate."""
    scales = [float(s) for s in recommendation["scales"]]
    drift = recommendation["predicted_drift"]
    common = [(s, abs(d), measured[s]) for s, d in zip(scales, drift)
              if s in measured and d is not None and math.isfinite(measured[s])]
    if len(common) < 3:
        raise RecommendError(f"the study holds only {len(common)} of the recommendation's scales {scales} "
                             "(constant CFG conditions with a measured collapse rate): at least 3 are needed")
    s_common = np.array([c[0] for c in common])
    predicted = np.array([c[1] for c in common])
    rate = np.array([c[2] for c in common])
    rho, p = stats.spearmanr(predicted, rate)
    # the best constant scale (the overall recommendation may be a schedule, which a study's constant
    # conditions cannot rank)
    rec = recommendation.get("best_constant_scale", recommendation["recommended"])["scale"]
    nearest = float(s_common[np.argmin(np.abs(np.log(s_common) - math.log(rec)))]) if rec else None
    best_two = [float(s) for s in s_common[np.argsort(rate, kind="stable")[:2]]]
    return to_strict_json({"scales": s_common.tolist(), "predicted_abs_drift": predicted.tolist(),
                   "measured_collapse_rate": rate.tolist(), "spearman": float(rho), "p_value": float(p),
                   "recommended_scale": rec, "nearest_pilot_scale": nearest, "best_two_measured": best_two,
                   "recommended_among_best_two": nearest in best_two if nearest is not None else None})
