"""How well each parameter is determined: Laplace, profile likelihood, paired bootstrap; identifiability.

Report scale. Intervals are formed on the scale where each parameter is unbounded (logit for r1, r2; log for
the standard deviations and tail_rate; identity for mu0) and mapped back, so they respect the bounds.

Laplace (default). H = Hessian of the objective at the optimum u* in the unconstrained vector u. The
covariance of u is H^-1 (likelihood) or sigma2_hat H^-1 with sigma2_hat = 2 f(u*) / (m - p) (least squares:
m cell means, p free parameters, the usual nonlinear least-squares estimate). By the delta method the
report-scale value g_i has variance J_i Cov_u J_i^T (J = dg/du), and the 95 % interval is
g^-1(g_i +- 1.96 sd_i). The covariance and correlations of the natural parameters use J = dtheta/du.
Directions where H is near-singular (eigenvalue < 1e-9 of the largest, or negative) get a variance floor
that makes them wide, and the parameters loading on them are flagged.

Profile. For each free entry, the entry is pinned on its report scale and the objective minimized over
the rest; the interval is where the profile rises by chi2_1(0.95) / 2 = 1.92 (likelihood objective) above
the minimum. A profile that does not rise that far within the search is flat: the parameter is not
identified and the interval runs to the search limit (or to the bound, e.g. 0 for r2). The profile walks
outwards from the optimum, each point's inner minimization started from the previous point's (continuation).
Along a curved ridge, or where the objective has a second valley, that path can stall in a place where the
others are not at their minimum, and the profile then rises too early: the interval comes out too short.
So every point of the walk and of the crossing's refinement that reaches the threshold (within
`RESTART_MARGIN`) is minimized again from the optimum's other coordinates and from `PROFILE_RESTARTS`
random perturbations of them and of the last point inside (sd `RESTART_SD` on the unconstrained scale);
the lowest value counts, and where it lies below the threshold the walk, or the crossing's bracket, goes on
from there. On simulated chains (N = 1000, K = 6, 30 data sets) this cut the interval ends where an
8-start minimization finds the profile more than 0.05 below its threshold from 23 of 374 to 7 of 372
(more than 0.5 below: 12 to 1), at about three times the profile's cost.

Bootstrap. Images are resampled with replacement with the same image indices for every condition and
iteration (paired over images: iteration 0 stays shared), the fit is repeated from the optimum, and the
2.5 % / 97.5 % percentiles of each parameter form the interval.

Identifiability warning: a free parameter is "not identified" when its report-scale sd exceeds its flat
threshold (`flat_threshold`), when it loads on a near-singular direction of H, or when its profile is flat.
The threshold is 2 on the logit and log scales (the 95 % interval spans more than a factor e^7.8 in odds
or scale). mu0's report scale is the phenotype's own scale (identity), where a fixed 2 means nothing (a
phenotype of scale 0.03 would need an interval of +-4 to trip it), so for mu0 (every parameter in
DATA_SCALE_PARAMETERS) the sd is compared with the data's own scale s_ref, the iteration-0 sd of the
phenotype (problem.scale[1], fitting.model; the earliest observed iteration's sd when there is no
iteration 0): not identified when sd > 2 s_ref, i.e. when the 95 % interval is wider than +-3.9 sd of the
data themselves (iteration 0 alone gives sd s_ref / sqrt(n_0)).

For r1, r2 and sigma_mut the value 0 is tested directly: if setting it to 0 raises the objective by less
than 1.92 (conditionally, the others held at the optimum, or, when that rise is moderate, along the
profile), the data cannot tell it from 0: the parameter is flagged and the lower end of its interval
becomes 0 (the likelihood-ratio region contains 0).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
import scipy.optimize

from fitting.model import (
    Problem,
    free_values,
    from_report_scale,
    profile_value_and_grad,
    reduce_vector,
    report_jacobian,
    report_scale,
)
from fitting.observations import Observations
from fitting.optimize import local_minimize, numpy_generator
from qtm.params import PARAM_NAMES

Z95 = 1.959963984540054
CHI2_HALF = 1.920729410347062   # chi2_1(0.95) / 2
SD_FLAT = 2.0
DATA_SCALE_PARAMETERS = ("mu0",)   # report scale = the phenotype's own units (identity)


def flat_threshold(name: str, data_scale: float) -> float:
    """The report-scale sd above which a parameter is "not identified" (module docstring): SD_FLAT on the
    logit / log scales, SD_FLAT x data_scale (the iteration-0 sd s_ref) for parameters in the data's units."""
    if name in DATA_SCALE_PARAMETERS:
        return SD_FLAT * float(data_scale)
    return SD_FLAT


@dataclasses.dataclass(frozen=True)
class Uncertainty:
    """Intervals and diagnostics of the free entries (order of problem.layout.free)."""

    method: str
    estimate: np.ndarray            # (P,) natural values
    lower: np.ndarray               # (P,)
    upper: np.ndarray               # (P,)
    report_sd: np.ndarray           # (P,) Laplace sd on the report scale
    cov_u: np.ndarray               # (P, P) Laplace covariance of u
    covariance: np.ndarray          # (P, P) natural-scale covariance (delta method)
    correlation: np.ndarray         # (P, P)
    hessian_eigenvalues: np.ndarray
    identified: np.ndarray          # (P,) bool
    warnings: tuple[str, ...]
    samples: np.ndarray | None = None   # (S, P) bootstrap replicates of u, when bootstrapped


RHO_WARN = 0.95   # |correlation| of two parameters' estimates above which the fit names the pair
MAX_PAIRS_NAMED = 6


def strong_correlations(correlation: np.ndarray, labels, threshold: float = RHO_WARN,
                        ) -> list[tuple[str, str, float]]:
    """(label_i, label_j, rho_ij) for every pair i < j with |rho_ij| > threshold (NaN entries skipped),
    strongest first."""
    c = np.asarray(correlation, dtype=np.float64)
    i, j = np.triu_indices(c.shape[0], k=1)
    rho = c[i, j]
    keep = np.isfinite(rho) & (np.abs(rho) > threshold)
    order = np.argsort(-np.abs(rho[keep]), kind="stable")
    return [(labels[a], labels[b], float(r)) for a, b, r in
            zip(i[keep][order], j[keep][order], rho[keep][order])]


def laplace(problem: Problem, u_hat: np.ndarray, nll_hat: float) -> Uncertainty:
    """Laplace intervals and identifiability diagnostics (module docstring)."""
    u_hat = np.asarray(u_hat, dtype=np.float64)
    p = u_hat.size
    hessian = problem.hessian(u_hat)
    if problem.layout.objective == "least-squares":
        dof = problem.num_cells - p
        sigma2 = 2.0 * nll_hat / dof if dof > 0 else math.nan
    else:
        dof, sigma2 = None, 1.0
    eigval, eigvec = np.linalg.eigh(hessian)
    top = max(float(np.max(np.abs(eigval))), 1e-300)
    floor = 1e-9 * top
    singular = eigval < floor
    cov_u = (eigvec / np.maximum(eigval, floor)) @ eigvec.T * sigma2
    jac_report, jac_natural = report_jacobian(u_hat, problem.fixed, problem.scale, problem.layout)
    report_var = np.einsum("ij,jk,ik->i", jac_report, cov_u, jac_report)
    report_sd = np.sqrt(np.maximum(report_var, 0.0))
    estimate = free_values(problem.natural(u_hat), problem.layout)
    lower, upper = np.empty(p), np.empty(p)
    for i, (name, _) in enumerate(problem.layout.free):
        g = float(report_scale(name, estimate[i]))
        lower[i] = from_report_scale(name, g - Z95 * report_sd[i])
        upper[i] = from_report_scale(name, g + Z95 * report_sd[i])
    covariance = jac_natural @ cov_u @ jac_natural.T
    sd = np.sqrt(np.maximum(np.diag(covariance), 0.0))
    with np.errstate(invalid="ignore", divide="ignore"):
        correlation = covariance / np.outer(sd, sd)
    labels = problem.layout.labels(problem.conditions)
    warnings: list[str] = []
    identified = np.ones(p, dtype=bool)
    if dof is not None and dof <= 0:
        warnings.append(f"least squares with {problem.num_cells} means and {p} free parameters leaves no "
                        "residual degrees of freedom: intervals are undefined (fix some parameters)")
        identified[:] = False
    if singular.any():
        loading = np.abs(eigvec[:, singular]).max(axis=1) > 0.3
        involved = [labels[i] for i in np.flatnonzero(loading)]
        identified &= ~loading
        warnings.append(f"near-singular curvature ({int(singular.sum())} direction(s), eigenvalue ratio "
                        f"{eigval.min() / top:.1e}): not identified together: {', '.join(involved)}")
    pairs = strong_correlations(correlation, labels)
    if len(pairs) > MAX_PAIRS_NAMED:
        warnings.append(f"{len(pairs) - MAX_PAIRS_NAMED} more parameter pair(s) correlated beyond |rho| = "
                        f"{RHO_WARN:g} besides the {MAX_PAIRS_NAMED} named below")
    for a, b, rho in pairs[:MAX_PAIRS_NAMED]:
        warnings.append(f"{a} and {b} are correlated at rho = {rho:+.3f} (|rho| > {RHO_WARN:g}): the data "
                        "determine a combination of them far better than either alone (see the correlation "
                        "matrix in fit.nc; fixing one of them pins the other)")
    data_scale = float(problem.scale[1])
    thresholds = np.array([flat_threshold(name, data_scale) for name, _ in problem.layout.free])
    for i in np.flatnonzero(report_sd > thresholds):
        identified[i] = False
        name = problem.layout.free[i][0]
        if name in DATA_SCALE_PARAMETERS:
            spread = (f"is {2 * Z95 * report_sd[i] / data_scale:.3g} times as wide as the data's own sd "
                      f"({data_scale:.3g} at iteration 0, or the earliest iteration observed; not identified "
                      f"beyond sd > {SD_FLAT:g} x that)")
        else:
            spread = f"spans a factor of 10^{2 * Z95 * report_sd[i] / math.log(10):.1f}"
        warnings.append(f"{labels[i]} is not identified: its 95 % interval [{lower[i]:.3g}, {upper[i]:.3g}] "
                        f"{spread} (flat likelihood; a profile interval is likelihood-based)")
    for i, delta, how in _zero_tests(problem, u_hat, nll_hat):
        identified[i] = False
        lower[i] = 0.0
        warnings.append(f"{labels[i]} = {estimate[i]:.3g} is indistinguishable from 0 ({how} log-likelihood "
                        f"ratio at 0: {delta:.2f} < 1.92); its interval is extended down to 0")
    return Uncertainty("laplace", estimate, lower, upper, report_sd, cov_u, covariance, correlation, eigval,
                       identified, tuple(warnings))


def _zero_tests(problem: Problem, u_hat, nll_hat) -> list[tuple[int, float, str]]:
    """Can r1, r2, sigma_mut be told from 0? (index, rise of the objective at 0, how it was measured).

    First the conditional rise (the others held at u*; u_i = -inf maps to exactly 0). It bounds the profile
    rise from above, so a conditional rise below 1.92 settles it. A moderate conditional rise (< 200) is
    followed by the profile rise at 0 (the others re-optimized), which decides.
    """
    if problem.layout.objective != "likelihood":
        return []
    out = []
    for i, (name, _) in enumerate(problem.layout.free):
        if name not in ("r1", "r2", "sigma_mut"):
            continue
        zeroed = np.array(u_hat, dtype=np.float64)
        zeroed[i] = -np.inf
        delta = problem.value_and_grad(zeroed)[0] - nll_hat
        if not np.isfinite(delta):
            continue
        if delta < CHI2_HALF:
            out.append((i, delta, "conditional"))
        elif delta < 200.0 and problem.layout.size > 1:
            value, _ = _profile_point(problem, reduce_vector(u_hat, i), _ZERO_REPORT, i)
            if np.isfinite(value) and value - nll_hat < CHI2_HALF:
                out.append((i, value - nll_hat, "profile"))
    return out


_ZERO_REPORT = -60.0   # logit / log of ~1e-26: zero to every digit that matters here


def posterior_draws(u_hat: np.ndarray, cov_u: np.ndarray, num: int, *, key: jax.Array) -> np.ndarray:
    """Draws of u from the Laplace approximation N(u*, Cov_u), (num, P)."""
    rng = numpy_generator(key)
    return rng.multivariate_normal(np.asarray(u_hat), np.asarray(cov_u), size=num, method="eigh")


QUADRATIC_TOLERANCE = 0.25   # relative departure of the objective's rise from the quadratic's 1.92 (`auto`)
R_FLOOR = 1e-4               # r1, r2 below this are moved up to it before profiling (`profile_start`)
PROFILE_RESTARTS = 4         # random restarts at a profile point near or above its threshold (module docstring)
RESTART_SD = 0.7             # their spread on the unconstrained scale
RESTART_MARGIN = 0.05        # restarted where the profile is within this of its threshold or above


def laplace_is_adequate(problem: Problem, u_hat: np.ndarray, nll_hat: float, base: Uncertainty) -> bool:
    """Whether the data support Laplace intervals (the `auto` interval method), else profile likelihood.

    Laplace needs a well-determined quadratic objective: every free entry identified (no near-singular
    direction, no r indistinguishable from 0: at such a boundary the softmax coordinates freeze the other
    parameters at their conditional values, which makes their Laplace intervals far too narrow), and along
    every coordinate u_i the objective must rise by chi2_1(0.95)/2 = 1.92 within QUADRATIC_TOLERANCE of
    that at u_i +- 1.96 / sqrt(H_ii), where a quadratic with the Hessian H rises by exactly 1.92 (a skewed or
    flattening objective, e.g. a small r whose window edge moves fast, fails this). Costs 2P objective
    evaluations in one batch."""
    if problem.layout.objective != "likelihood":
        return True          # least squares: the residual-variance Laplace intervals (module docstring)
    if not np.all(base.identified):
        return False
    hessian = np.linalg.pinv(base.cov_u)
    curvature = np.diag(hessian)
    if np.any(curvature <= 0):
        return False
    steps = Z95 / np.sqrt(curvature)
    p = u_hat.size
    points = np.concatenate([u_hat + np.diag(steps), u_hat - np.diag(steps)])
    rise = problem.batched_nll(points) - nll_hat
    predicted = 0.5 * Z95 ** 2
    return bool(rise.size == 2 * p and np.all(np.isfinite(rise))
                and np.all(np.abs(rise / predicted - 1.0) < QUADRATIC_TOLERANCE))


def profile_start(problem: Problem, u_hat: np.ndarray) -> np.ndarray:
    """u_hat with every free r1, r2 below R_FLOOR moved up to R_FLOOR (the others unchanged). At r -> 0
    the softmax coordinate runs to -inf and its gradient vanishes, so a profile started there could never
    move that r off 0 to follow the ridge it spans with the others."""
    from fitting.model import to_unconstrained

    table = problem.natural(u_hat)
    moved = False
    for name, c in problem.layout.free:
        if name in ("r1", "r2"):
            rows = range(problem.layout.num_conditions) if c < 0 else [c]
            for row in rows:
                col = 0 if name == "r1" else 1
                room = 1.0 - table[row, 0] - table[row, 1] - (R_FLOOR - table[row, col])
                if table[row, col] < R_FLOOR and room > R_FLOOR:   # keep the kept fraction positive
                    table[row, col] = R_FLOOR
                    moved = True
    return to_unconstrained(table, problem) if moved else np.asarray(u_hat, dtype=np.float64)


# ------------------------------------------------------------------------------------------------ profile

def profile(problem: Problem, u_hat: np.ndarray, nll_hat: float, base: Uncertainty, *,
            max_steps: int = 12, progress=None, indices=None, rng: np.random.Generator | None = None,
            restarts: int = PROFILE_RESTARTS) -> Uncertainty:
    """Profile-likelihood intervals (module docstring); Laplace quantities are kept for the rest.

    indices: the free entries to profile (default all; the others keep `base`'s intervals). A tail_rate
    whose profile stays flat upwards gets the upper end inf (hard truncation fits as well). rng draws the
    restarts at a crossing (default: seeded 0, so a profile is reproducible); restarts = 0 turns them off."""
    rng = np.random.default_rng(0) if rng is None else rng
    labels = problem.layout.labels(problem.conditions)
    p = len(labels)
    lower, upper = base.lower.copy(), base.upper.copy()
    identified = base.identified.copy()
    warnings = list(base.warnings)
    threshold = CHI2_HALF if problem.layout.objective == "likelihood" else None
    if threshold is None:
        # Least squares: profile F-type threshold on the scaled objective: delta f = sigma2_hat * 1.92.
        dof = problem.num_cells - p
        threshold = (2.0 * nll_hat / dof) * CHI2_HALF if dof > 0 else math.inf
    start = profile_start(problem, u_hat)
    for i, (name, _) in enumerate(problem.layout.free):
        if indices is not None and i not in indices:
            continue
        if p == 1:
            warnings.append("profile needs 2 or more free parameters; Laplace interval kept")
            break
        if indices is not None:
            # the profile replaces the curvature's verdict on this entry's width
            warnings = [w for w in warnings if not w.startswith(f"{labels[i]} is not identified: its 95 % interval")]
        g_hat = float(report_scale(name, base.estimate[i]))
        step = float(np.clip(0.75 * base.report_sd[i], 1e-3, 1.0)) if np.isfinite(base.report_sd[i]) else 0.5
        bounds, flat, lowest = [], False, 0.0
        anchor = reduce_vector(start, i)

        def point(g, w_warm, i=i, anchor=anchor):
            """The profile at g from the warm start w_warm (the last point inside); restarted near or
            above the threshold (module docstring)."""
            value, w_new = _profile_point(problem, w_warm, g, i)
            if restarts > 0 and not value - nll_hat < threshold - RESTART_MARGIN:
                for j in range(restarts + 1):
                    alt = anchor if j == 0 else (anchor, w_warm)[j % 2] + RESTART_SD * rng.standard_normal(
                        anchor.shape)
                    alt_value, alt_w = _profile_point(problem, alt, g, i)
                    if alt_value < value:
                        value, w_new = alt_value, alt_w
            return value, w_new

        for direction in (-1.0, 1.0):
            w = reduce_vector(start, i)
            w_prev = w
            g_prev, d_prev = g_hat, 0.0
            bound = None
            for k in range(1, max_steps + 1):
                g = g_hat + direction * step * k * (1.0 + 0.25 * k)
                value, w_new = point(g, w)
                if not np.isfinite(value):
                    break
                w = w_new
                d = value - nll_hat
                lowest = min(lowest, d)
                if d >= threshold:
                    bound = _refine_crossing(point, nll_hat, threshold, (g_prev, d_prev), (g, d), w_prev)
                    break
                w_prev = w
                g_prev, d_prev = g, d
            if bound is None:
                flat = True
                # A flat fall towards the bound runs to it (r -> 0, sd -> 0); otherwise the search limit.
                bound = -math.inf if (direction < 0 and name != "mu0") else g_prev
                if direction > 0 and name == "tail_rate":
                    bound = math.inf
            bounds.append(bound)
        if lowest < -1e-3:
            warnings.append(f"profile of {labels[i]} found a lower objective ({lowest:.3g}): the optimum "
                            "may be a local one (try more starts)")
        lower[i] = float(from_report_scale(name, bounds[0]))
        upper[i] = float(from_report_scale(name, bounds[1]))
        if flat:
            identified[i] = False
            warnings.append(f"{labels[i]} is not identified: flat profile (the log-likelihood changes by less "
                            f"than 1.92 out to [{lower[i]:.3g}, {upper[i]:.3g}])")
        elif indices is not None:
            identified[i] = True   # bounded on both sides: its profile, not the curvature, decides
        if progress is not None:
            progress()
    if indices is None:
        method = "profile"
    else:
        profiled = {problem.layout.free[i][0] for i in indices}
        names = ", ".join(n for n in PARAM_NAMES if n in profiled)
        method = f"{base.method}; profile for {names}"
    return dataclasses.replace(base, method=method, lower=lower,
                               upper=upper, identified=identified, warnings=tuple(dict.fromkeys(warnings)))


def _refine_crossing(point, nll_hat, threshold, inside, outside, w, max_evaluations: int = 20,
                     tolerance: float = 0.01) -> float:
    """The report-scale value g where the profile crosses `threshold`, within the bracket (inside, outside);
    point(g, w) -> (objective, other coordinates) is the profile at g started from w.

    Brent's method (`scipy.optimize.brentq`: inverse quadratic interpolation, bisection as the safeguard) on
    the signed root r(g) - sqrt(2 threshold), r(g) = sqrt(2 (profile(g) - nll_hat)), which is linear in g
    wherever the profile is quadratic (a Wald interval is the same line through the optimum). Where the
    profile is far from quadratic (a window fraction at its bound 0, on the logit scale) r(g) is strongly
    curved and plain interpolation converges slowly from a far outside point; Brent's safeguard keeps the
    bracket shrinking. It stops when the profile is within `tolerance` of the threshold (0.01: about 0.005
    in units of the standard error at the crossing), when the bracket is narrower than 1e-6, or after
    `max_evaluations`. Each point starts from the last point inside; a point whose objective is not finite
    counts as outside."""
    target = math.sqrt(2.0 * threshold)
    (g_in, d_in), (g_out, d_out) = inside, outside
    known = {g_in: math.sqrt(2.0 * max(d_in, 0.0)) - target, g_out: math.sqrt(2.0 * max(d_out, 0.0)) - target}
    warm = [w]

    def signed_root(g: float) -> float:
        if g in known:
            return known[g]
        value, w_new = point(g, warm[0])
        if not np.isfinite(value):
            return target                     # outside
        d = value - nll_hat
        if abs(d - threshold) < tolerance:
            raise _Crossing(g)
        if d < threshold:
            warm[0] = w_new
        return math.sqrt(2.0 * max(d, 0.0)) - target

    if known[g_in] >= 0.0:
        return g_in
    if known[g_out] <= 0.0:
        return g_out
    try:
        g, _ = scipy.optimize.brentq(signed_root, g_in, g_out, xtol=1e-6, rtol=1e-10, maxiter=max_evaluations,
                                     full_output=True, disp=False)
    except _Crossing as found:
        g = found.g
    return float(g)


class _Crossing(Exception):
    """Raised inside Brent's iteration when the profile is within tolerance of its threshold."""

    def __init__(self, g: float):
        super().__init__(g)
        self.g = g


def _profile_point(problem: Problem, w0: np.ndarray, g: float, index: int) -> tuple[float, np.ndarray]:
    def fun(w):
        value, grad = profile_value_and_grad(problem, w, g, index)
        if not np.isfinite(value) or not np.all(np.isfinite(grad)):
            return 1e300, np.zeros_like(w)
        return value, grad

    start, _ = fun(w0)
    if start >= 1e299:
        return math.inf, w0
    res = scipy.optimize.minimize(fun, w0, jac=True, method="L-BFGS-B",
                                  options={"maxiter": 300, "ftol": 1e-13, "gtol": 1e-7})
    value = float(res.fun)
    return (value if value < 1e299 else math.inf), np.asarray(res.x)


# ------------------------------------------------------------------------------------------------ bootstrap

def bootstrap(problem: Problem, obs: Observations, u_hat: np.ndarray, base: Uncertainty, *,
              num_samples: int, key: jax.Array, progress=None) -> Uncertainty:
    """Paired bootstrap over images (module docstring): percentile intervals of refits from u*."""
    if obs.phenotypes is None:
        from fitting.errors import ObservationError

        raise ObservationError(f"{obs.source}: {{interval}} bootstrap needs the per-image variable 'hf_power'; "
                               "this dataset holds only the summary trio (use laplace or profile)",
                               parameters=("interval",))
    rng = numpy_generator(key)
    num_images = obs.phenotypes.shape[-1]
    draws, failed = [], 0
    for _ in range(num_samples):
        index = rng.integers(0, num_images, size=num_images)
        replicate = problem.with_data(obs.resample_images(index))
        result = local_minimize(replicate, u_hat)
        if result.status == "failed":
            failed += 1
        else:
            draws.append(result.u)
        if progress is not None:
            progress()
    warnings = list(base.warnings)
    if failed:
        warnings.append(f"bootstrap: {failed} of {num_samples} refits failed and were left out")
    if len(draws) < 2:
        warnings.append("bootstrap: too few successful refits; Laplace intervals kept")
        return dataclasses.replace(base, warnings=tuple(warnings))
    samples = np.stack(draws)
    values = np.stack([free_values(problem.natural(u), problem.layout) for u in samples])
    lower = np.percentile(values, 2.5, axis=0)
    upper = np.percentile(values, 97.5, axis=0)
    return dataclasses.replace(base, method="bootstrap", lower=lower, upper=upper, warnings=tuple(warnings),
                               samples=samples)
