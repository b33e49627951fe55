"""Multi-start optimization of the objective in unconstrained space.

Starts are drawn at random (with a data-driven first start), all candidates are screened by one vmapped
evaluation of the objective, and the best `num_starts` are refined by scipy's L-BFGS-B with the exact JAX
gradient (compiled once per problem shape; 0.7 s per fit measured this way on a 2-core CPU, against 8-14 s for
the JAX-native optimizers, mostly compilation). Each start returns a status instead of raising: a start that
meets a non-finite objective or fails inside the optimizer is recorded as failed and the others go on.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import scipy.optimize

from fitting.model import Problem, to_unconstrained
from qtm.params import PARAM_NAMES

_IDX = {name: i for i, name in enumerate(PARAM_NAMES)}


@dataclasses.dataclass(frozen=True)
class StartResult:
    """One local optimization: where it began and ended, and how it ended."""

    start: np.ndarray
    u: np.ndarray
    nll: float
    status: str            # "converged" | "max-iterations" | "failed"
    message: str
    num_iterations: int


@dataclasses.dataclass(frozen=True)
class OptimizationResult:
    best: StartResult
    starts: tuple[StartResult, ...]

    @property
    def ok(self) -> bool:
        return self.best.status != "failed"

    @property
    def agreeing_starts(self) -> int:
        """Starts that reached the best objective within 1e-3 (a multi-modality diagnostic)."""
        return sum(1 for s in self.starts if s.status != "failed" and s.nll - self.best.nll < 1e-3)


def initial_table(problem: Problem) -> np.ndarray:
    """A deterministic first start: iteration-0 mean and sd, r1 = r2 = 0.3, sigma_env = s_ref."""
    table = np.array(problem.fixed, dtype=np.float64)
    s_ref = float(problem.scale[1])
    for name, c in problem.layout.free:
        rows = range(problem.layout.num_conditions) if c < 0 else [c]
        for row in rows:
            table[row, _IDX[name]] = {"r1": 0.3, "r2": 0.3, "tail_rate": 1.0, "sigma_mut": 0.3 * s_ref,
                                      "mu0": float(problem.scale[0]), "sigma_g0": s_ref,
                                      "sigma_env": s_ref}[name]
    return _clip_simplex(table, problem)


def numpy_generator(key: jax.Array) -> np.random.Generator:
    """A numpy Generator seeded by a JAX key: the fit's host-side draws (starts, posterior draws, bootstrap
    resamples, prediction noise) come from numpy, which compiles nothing; the key keeps them reproducible."""
    return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())


def random_tables(problem: Problem, num: int, *, key: jax.Array) -> np.ndarray:
    """`num` random natural tables (num, C, 7) for the free entries (Dirichlet(1, 1, 1) for the window,
    log-uniform spreads for the scales)."""
    rng = numpy_generator(key)
    s_ref, m_ref = float(problem.scale[1]), float(problem.scale[0])
    tables = np.repeat(initial_table(problem)[None], num, axis=0)
    for name, c in problem.layout.free:
        rows = list(range(problem.layout.num_conditions)) if c < 0 else [c]
        if name in ("r1", "r2"):
            draw = rng.dirichlet([1.0, 1.0, 1.0], size=num)[:, 0 if name == "r1" else 1]
        elif name == "mu0":
            draw = m_ref + 0.2 * s_ref * rng.standard_normal(num)
        elif name == "sigma_g0":
            draw = s_ref * np.exp(0.3 * rng.standard_normal(num))
        elif name == "sigma_env":
            draw = s_ref * np.exp(rng.uniform(np.log(0.1), np.log(10.0), num))
        elif name == "sigma_mut":
            draw = s_ref * np.exp(rng.uniform(np.log(0.01), np.log(1.0), num))
        else:  # tail_rate
            draw = np.exp(rng.uniform(np.log(0.05), np.log(20.0), num))
        for row in rows:
            tables[:, row, _IDX[name]] = draw
    return np.stack([_clip_simplex(t, problem) for t in tables])


def _clip_simplex(table: np.ndarray, problem: Problem) -> np.ndarray:
    """Keep r1 + r2 < 1 and both free r's strictly inside (0, 1) so the unconstrained map is defined."""
    table = table.copy()
    for c in range(problem.layout.num_conditions):
        r1, r2 = table[c, _IDX["r1"]], table[c, _IDX["r2"]]
        free1 = problem.layout.slot("r1", c) is not None
        free2 = problem.layout.slot("r2", c) is not None
        if free1:
            r1 = min(max(r1, 1e-4), 0.999 - (r2 if not free2 else 0.0))
        if free2:
            r2 = min(max(r2, 1e-4), 0.999 - (r1 if not free1 else 0.0))
        total = r1 + r2
        if total >= 0.999 and (free1 or free2):
            shrink = 0.98 / total
            r1, r2 = (r1 * shrink if free1 else r1), (r2 * shrink if free2 else r2)
        table[c, _IDX["r1"]], table[c, _IDX["r2"]] = r1, r2
    return table


def local_minimize(problem: Problem, u0: np.ndarray, *, max_iterations: int = 500) -> StartResult:
    """L-BFGS-B from u0 with the JAX gradient; never raises for a bad start (status = "failed")."""
    u0 = np.asarray(u0, dtype=np.float64)
    try:
        value0, _ = problem.value_and_grad(u0)
        if not np.isfinite(value0):
            return StartResult(u0, u0, float("inf"), "failed", "objective not finite at the start", 0)

        def fun(u):
            value, grad = problem.value_and_grad(u)
            if not np.isfinite(value) or not np.all(np.isfinite(grad)):
                return 1e300, np.zeros_like(u)
            return value, grad

        res = scipy.optimize.minimize(fun, u0, jac=True, method="L-BFGS-B",
                                      options={"maxiter": max_iterations, "ftol": 1e-13, "gtol": 1e-7})
        value = problem.nll(res.x)
        if not np.isfinite(value) or value >= 1e299:
            return StartResult(u0, res.x, float("inf"), "failed", "objective not finite at the end", res.nit)
        if res.success:
            status = "converged"
        elif res.nit >= max_iterations:
            status = "max-iterations"
        else:
            # L-BFGS-B stops on "ABNORMAL" line searches at flat optima too; accept a small gradient.
            _, grad = problem.value_and_grad(res.x)
            status = "converged" if np.max(np.abs(grad)) < 1e-3 else "stalled"
        return StartResult(u0, np.asarray(res.x), value, status, str(res.message), int(res.nit))
    except (FloatingPointError, ValueError, np.linalg.LinAlgError) as exc:
        return StartResult(u0, u0, float("inf"), "failed", f"{type(exc).__name__}: {exc}", 0)


def minimize_multistart(problem: Problem, *, num_starts: int, key: jax.Array,
                        init: np.ndarray | None = None, num_candidates: int | None = None,
                        progress=None) -> OptimizationResult:
    """Screen random starts with one vmapped evaluation, refine the best `num_starts` with L-BFGS-B.

    `init` (an unconstrained vector) is always among the refined starts; so is the deterministic
    `initial_table` start.
    """
    num_starts = max(1, int(num_starts))
    num_candidates = num_candidates or max(8 * num_starts, 32)
    tables = random_tables(problem, num_candidates, key=key)
    candidates = np.stack([to_unconstrained(t, problem) for t in tables])
    values = problem.batched_nll(candidates)
    values = np.where(np.isfinite(values), values, np.inf)
    order = np.argsort(values, kind="stable")
    fixed_starts = [to_unconstrained(initial_table(problem), problem)]
    if init is not None:
        fixed_starts.insert(0, np.asarray(init, dtype=np.float64))
    chosen = fixed_starts + [candidates[i] for i in order[: max(0, num_starts - len(fixed_starts))]]
    results = []
    for u0 in chosen[:num_starts]:
        results.append(local_minimize(problem, u0))
        if progress is not None:
            progress()
    ranked = sorted(results, key=lambda r: (r.status == "failed", r.nll))
    return OptimizationResult(best=ranked[0], starts=tuple(results))
