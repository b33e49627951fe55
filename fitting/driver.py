"""One fit from observations to a self-contained result (the library function behind `qtm fit`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import numpy as np

from fitting.errors import FitError, ModelError, ObservationError
from fitting.forecast import Prediction, align, forecast_report, predict
from fitting.goodness import CellGoodness, aligned_phenotypes, cell_goodness_of_fit
from fitting.model import ModelSpec, Problem, build_problem, image_nll_offset, to_unconstrained, zero_variance_cells
from fitting.observations import Observations, cell_statistics
from fitting.optimize import (OptimizationResult, initial_table, local_minimize, minimize_multistart,
                              numpy_generator)
from fitting.transforms import TRANSFORMS, log_jacobian, transform_observations
from fitting.uncertainty import Uncertainty, bootstrap, laplace, laplace_is_adequate, posterior_draws, profile
from qtm.params import PARAM_NAMES, require_x64

INTERVALS = ("auto", "laplace", "profile", "bootstrap")
_IDX = {name: i for i, name in enumerate(PARAM_NAMES)}


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """Everything that decides a fit besides the data and the random key (stored in the fit's attrs)."""

    spec: ModelSpec = ModelSpec()
    interval: str = "auto"
    num_starts: int = 8
    train_iterations: int | None = None
    num_bootstrap: int = 200
    num_draws: int = 1000
    transform: str = "none"

    def validate(self) -> None:
        """Raise ModelError naming the inconsistent fields (in braces, qtmio.errors) and the fix."""
        self.spec.validate()
        if self.interval not in INTERVALS:
            raise ModelError(f"{{interval}} must be one of {', '.join(INTERVALS)}; got {self.interval!r}",
                             parameters=("interval",))
        if self.transform not in TRANSFORMS:
            raise ModelError(f"{{transform}} must be one of {', '.join(TRANSFORMS)}; got {self.transform!r}",
                             parameters=("transform",))
        if self.num_starts < 1:
            raise ModelError(f"{{num_starts}} must be >= 1; got {self.num_starts}", parameters=("num_starts",))
        if self.num_bootstrap < 2:
            raise ModelError(f"{{num_bootstrap}} must be >= 2; got {self.num_bootstrap}",
                             parameters=("num_bootstrap",))
        if self.train_iterations is not None and self.train_iterations < 1:
            raise ModelError(f"{{train_iterations}} must be >= 1; got {self.train_iterations}",
                             parameters=("train_iterations",))

    def to_attrs(self) -> dict[str, str | int]:
        spec = self.spec
        return {
            "model": spec.selection, "mutation": spec.mutation, "variance": spec.variance,
            "objective": spec.objective, "free": ",".join(spec.free_names()),
            "fixed": ",".join(f"{n}={v}" for n, v in spec.fixed), "shared": ",".join(spec.shared_names()),
            "interval": self.interval, "num_starts": self.num_starts,
            "train_iterations": -1 if self.train_iterations is None else self.train_iterations,
            "num_bootstrap": self.num_bootstrap, "num_draws": self.num_draws,
            "drift": int(spec.drift), "population": -1 if spec.population is None else spec.population,
            "transform": self.transform,
        }


@dataclasses.dataclass(frozen=True)
class FitResult:
    """A finished fit: estimates and intervals per condition and parameter, diagnostics, trajectories."""

    config: FitConfig
    observations: Observations          # all observed iterations, on the fitted scale (config.transform)
    train: Observations                 # those the fit used
    problem: Problem
    optimization: OptimizationResult
    uncertainty: Uncertainty
    estimate: np.ndarray                # (C, 7) natural values (fixed ones included)
    lower: np.ndarray                   # (C, 7) (= estimate where fixed)
    upper: np.ndarray
    free: np.ndarray                    # (C, 7) bool
    identified: np.ndarray              # (C, 7) bool (True where fixed)
    prediction: Prediction
    observed: dict[str, np.ndarray]     # aligned (C, K+1) n, mean, var
    goodness_of_fit: dict[str, dict[str, float]]
    cells: CellGoodness                 # per-cell goodness of fit (fitting.goodness)
    forecast: dict[str, dict[str, float]] | None
    information: dict[str, float]
    warnings: tuple[str, ...]

    @property
    def conditions(self) -> tuple[str, ...]:
        return self.observations.conditions

    @property
    def shared(self) -> tuple[str, ...]:
        return self.config.spec.shared_names()

    def parameter_table(self) -> dict:
        """{"conditions": {NAME: {PARAM: {estimate, lower, upper, free}}}, "shared": {PARAM: {...}}}."""
        def entry(c, name):
            i = _IDX[name]
            return {"estimate": float(self.estimate[c, i]), "lower": float(self.lower[c, i]),
                    "upper": float(self.upper[c, i]), "free": bool(self.free[c, i]),
                    "identified": bool(self.identified[c, i])}
        conditions = {name: {p: entry(c, p) for p in PARAM_NAMES if p not in self.shared}
                      for c, name in enumerate(self.conditions)}
        return {"conditions": conditions, "shared": {p: entry(0, p) for p in PARAM_NAMES if p in self.shared}}


def fit_observations(obs: Observations, config: FitConfig = FitConfig(), *, key: jax.Array,
                     progress: Callable[[str, int], Callable[[], None]] | None = None) -> FitResult:
    """Fit qtm's recursion to `obs` (docs/model.md section 6): multi-start optimization, intervals, bands,
    goodness of fit and, with `config.train_iterations`, a forecast of the held-out iterations.

    `progress(description, total)` may return a callback advanced once per unit of work.
    Raises FitError when every start fails, ModelError / ObservationError on bad input.
    """
    require_x64()
    config.validate()
    measured = obs
    obs = transform_observations(obs, config.transform)
    if config.interval == "bootstrap" and obs.phenotypes is None:
        raise ObservationError(f"{obs.source}: {{interval}} bootstrap needs the per-image variable 'hf_power'; "
                               "this dataset holds only the summary trio (use laplace or profile)",
                               parameters=("interval",))
    train = obs if config.train_iterations is None else obs.restrict(config.train_iterations)
    measured_train = measured if config.train_iterations is None else measured.restrict(config.train_iterations)
    # The trajectory always runs to the last observed iteration (the forecast horizon); a training subset
    # only removes cells from the objective.
    problem = build_problem(train, config.spec, num_iterations=obs.max_iteration)
    k_start, k_unc, k_draw, k_noise = jax.random.split(key, 4)

    observation = problem.layout.observation
    optimization, problem = optimize(problem, train, num_starts=config.num_starts, key=k_start, progress=progress)
    if not optimization.ok:
        messages = "; ".join(sorted({s.message for s in optimization.starts}))
        raise FitError(f"the optimization failed from all {len(optimization.starts)} starts ({messages}); "
                       "try more {num_starts} or fix poorly determined parameters with {fixed}",
                       parameters=("num_starts", "fixed"))
    u_hat, nll_hat = optimization.best.u, optimization.best.nll

    unc = laplace(problem, u_hat, nll_hat)
    restarts = numpy_generator(k_unc).spawn(1)[0]     # the profile's restarts at a crossing (own stream)
    profiled = config.interval == "profile" or (config.interval == "auto" and not laplace_is_adequate(
        problem, u_hat, nll_hat, unc))
    if profiled:
        tick = progress("profiling", problem.layout.size) if progress else None
        unc = profile(problem, u_hat, nll_hat, unc, progress=tick, rng=restarts)
    elif config.interval == "bootstrap":
        tick = progress("bootstrapping", config.num_bootstrap) if progress else None
        unc = bootstrap(problem, train, u_hat, unc, num_samples=config.num_bootstrap, key=k_unc, progress=tick)

    window = window_entries(problem, config.interval)
    if window and not profiled and problem.layout.size > 1:
        tick = progress("profiling the selection window", len(window)) if progress else None
        unc = profile(problem, u_hat, nll_hat, unc, indices=window, progress=tick, rng=restarts)
    draws = unc.samples if unc.samples is not None else posterior_draws(u_hat, unc.cov_u, config.num_draws,
                                                                         key=k_draw)
    k_full = obs.max_iteration
    observed = align(obs, k_full)
    noise = numpy_generator(k_noise).standard_normal((draws.shape[0],) + observed["mean"].shape)
    # the sampling variance of an observed mean, as an equivalent number of images (n, or V_k / Sigma_kk
    # under drift)
    band_images = observation.band_images(problem, u_hat, observed)
    prediction = predict(problem, u_hat, draws, band_images, noise=noise)

    table = problem.natural(u_hat)
    lower, upper = table.copy(), table.copy()
    free = np.zeros_like(table, dtype=bool)
    identified = np.ones_like(table, dtype=bool)
    for i, (name, c) in enumerate(problem.layout.free):
        rows = range(problem.layout.num_conditions) if c < 0 else [c]
        for row in rows:
            lower[row, _IDX[name]], upper[row, _IDX[name]] = unc.lower[i], unc.upper[i]
            free[row, _IDX[name]] = True
            identified[row, _IDX[name]] = unc.identified[i]

    train_iterations = train.iterations
    gof = observation.goodness_of_fit(problem, u_hat, observed, prediction, train_iterations, obs.conditions)
    cells = cell_goodness_of_fit(aligned_phenotypes(obs, k_full), observed, prediction.mean, prediction.var,
                                 band_images, train_iterations, obs.conditions)
    forecast = None
    if config.train_iterations is not None:
        forecast = forecast_report(observed, prediction, config.train_iterations, obs.conditions)

    warnings = list(obs.notes) + list(unc.warnings)
    flat = zero_variance_cells(cell_statistics(train), train.conditions)
    if flat:
        warnings.append(f"{len(flat)} cell(s) with zero variance (identical values) enter through their mean "
                        f"only: {', '.join(flat[:5])}{' ...' if len(flat) > 5 else ''}")
    failed = [s for s in optimization.starts if s.status == "failed"]
    if failed:
        warnings.append(f"{len(failed)} of {len(optimization.starts)} starts failed ({failed[0].message})")
    if optimization.best.status != "converged":
        warnings.append(f"the best start ended with status '{optimization.best.status}' "
                        f"({optimization.best.message})")
    if len(optimization.starts) > 1 and optimization.agreeing_starts < 2:
        warnings.append("only one start reached the best objective: the optimum may be local "
                        "(try more starts)")
    if cells.warning:
        warnings.append(cells.warning)
    info = information_criteria(problem, nll_hat, log_jacobian=log_jacobian(measured_train, config.transform))
    return FitResult(config=config, observations=obs, train=train, problem=problem, optimization=optimization,
                     uncertainty=unc, estimate=table, lower=lower, upper=upper, free=free, identified=identified,
                     prediction=prediction, observed=observed, goodness_of_fit=gof, cells=cells, forecast=forecast,
                     information=info, warnings=tuple(dict.fromkeys(warnings)))


def window_entries(problem: Problem, interval: str) -> list[int]:
    """The free entries whose interval is a profile even where the rest are Laplace intervals.

    - Soft selection with its tail rate free (any interval method): (r1, r2, tail_rate) act through
      (m_sel, v_sel) only, so the likelihood is flat along a curve that ends where no window of that tail rate
      gives the moments; the curvature at the optimum says nothing about these three and their profiles do
      (fitting.model.ModelSpec).
    - `auto` with the likelihood objective: every r1 and r2. A small r sits near its bound 0 on a ridge with
      the other window fraction and sigma_env, where the logit-scale Laplace interval passes the quadratic
      check of `laplace_is_adequate` yet covers too little: measured at N = 1000, K = 6 on independent draws
      (200 seeds, docs/model.md section 6), Laplace-where-adequate covered r2 = 0.02 0.885 and r1 = 0.05
      0.875, the interval lying wholly above the truth 8-9 % of the time; their profiles covered 0.965."""
    free = problem.layout.free
    soft = {c for name, c in free if name == "tail_rate"}
    auto = interval == "auto" and problem.layout.objective == "likelihood"
    return [i for i, (name, c) in enumerate(free)
            if (name in ("r1", "r2", "tail_rate") and (c in soft or -1 in soft))
            or (auto and name in ("r1", "r2"))]


MAX_PILOT_ROUNDS = 4
PILOT_TOLERANCE = 1e-3   # largest change of the unconstrained vector between rounds at the fixed point


def optimize(problem: Problem, train: Observations, *, num_starts: int, key: jax.Array,
             progress=None) -> tuple[OptimizationResult, Problem]:
    """The optimum of `problem` and the problem it belongs to: multi-start optimization, or, for an
    observation model with a pilot (a chain), generalized least squares with the covariance at a pilot,
    iterated to a fixed point (fitting.drift).

    The first pilot is the independent-draws fit of the same data; each round minimizes with the covariance
    held at the previous round's estimate (all starts in the first round, the previous optimum then), until
    the estimate moves by less than PILOT_TOLERANCE or after MAX_PILOT_ROUNDS rounds. Returns the last
    optimization and the problem whose pilot it used."""
    tick = progress("optimizing", num_starts) if progress else None
    if not problem.layout.observation.needs_pilot:
        return minimize_multistart(problem, num_starts=num_starts, key=key, progress=tick), problem
    base = build_problem(train, dataclasses.replace(problem.spec, drift=False, population=None),
                         num_iterations=problem.layout.num_iterations)
    first = minimize_multistart(base, num_starts=num_starts, key=key)
    # a chain's drift can pull the independent-draws optimum outside the covariance's domain (a window that
    # keeps almost nobody); the deterministic first start is then the pilot of the first round
    u = to_unconstrained(initial_table(problem), problem)
    if first.ok and np.isfinite(problem.with_pilot(first.best.u).nll(first.best.u)):
        u = first.best.u
    current = problem.with_pilot(u)
    optimization = minimize_multistart(current, num_starts=num_starts, key=key, init=u, progress=tick)
    for _ in range(MAX_PILOT_ROUNDS - 1):
        if not optimization.ok:
            break
        step = float(np.max(np.abs(optimization.best.u - u)))
        u = optimization.best.u
        if step < PILOT_TOLERANCE:
            break
        current = problem.with_pilot(u)
        best = local_minimize(current, u)
        optimization = OptimizationResult(best=best, starts=(best,))
    return optimization, current


def information_criteria(problem: Problem, nll_hat: float, *, log_jacobian: float = 0.0) -> dict[str, float]:
    """AIC = 2p - 2 log L and BIC = p ln n - 2 log L (n = phenotype values), with log L the log-likelihood of
    the individual measured values: the objective (a likelihood of the cell statistics) plus the
    parameter-free density of the values given their statistics (`fitting.model.image_nll_offset`), plus
    `log_jacobian` = sum log|T'(x)| when the model was fitted to y = T(x) (`fitting.transforms`), so that
    fits on different scales compare on the same data (docs/model.md section 7). For least squares the
    Gaussian forms m ln(SSE / m) + 2p and m ln(SSE / m) + p ln m over the m cell means."""
    p = problem.layout.size
    if problem.layout.objective == "least-squares":
        m = problem.num_cells
        sse = 2.0 * nll_hat * float(problem.scale[1]) ** 2
        base = m * math.log(max(sse, 1e-300) / m)
        return {"objective": nll_hat, "num_free": p, "num_observations": m, "sse": sse,
                "aic": base + 2 * p, "bic": base + p * math.log(m)}
    n = problem.num_observations
    data = problem.data
    log_lik = -nll_hat - float(np.sum(image_nll_offset(np.asarray(data.num_images), np.asarray(data.var))))
    log_lik += log_jacobian
    return {"objective": nll_hat, "log_likelihood": log_lik, "log_jacobian": log_jacobian, "num_free": p,
            "num_observations": n, "aic": 2 * p - 2 * log_lik, "bic": p * math.log(n) - 2 * log_lik}
