"""The statistical model of the fit: parameters, their unconstrained form, and the objective.

Model (docs/model.md sections 3 and 6): every condition c follows qtm's moment recursion
(`qtm.recursion.trajectory`) with its own selection (r1_c, r2_c, optionally tail_rate_c and sigma_mut_c) and
the shared starting point and environment (mu0, sigma_g0, sigma_env: iteration 0 is the same real data).
The phenotypes of the n images of condition c at iteration k are draws with mean mu_{c,k} and variance
V_{c,k} = V_G,{c,k} (default, as the paper) or V_P,{c,k} (`variance="phenotype"`).

Objective `likelihood` (default). With the sample mean xbar, sample variance s^2 (ddof 1) and count n of a
cell, Gaussian draws give the two independent sufficient statistics

    xbar ~ N(mu_k, V_k / n)                 and       q = (n - 1) s^2 / V_k ~ chi2(n - 1),

so the negative log-likelihood of a cell is

    0.5 [log(2 pi V_k / n) + n (xbar - mu_k)^2 / V_k]
    - [log((n - 1) / V_k) + ((n - 1)/2 - 1) log q - q / 2 - ((n - 1)/2) log 2 - log Gamma((n - 1)/2)]

(the second line is the log-density of s^2; cells with n = 1 contribute the first line only). Summed over
cells (iteration 0 once), this equals the Gaussian log-likelihood of the individual phenotypes up to a
constant free of the parameters, so AIC and BIC differences are those of the per-image model.

With `ModelSpec(drift=True)` the cells of iterations >= 1 are no longer independent: the chain's own
finite-population drift (docs/model.md section 5) makes each condition's per-iteration (xbar, s^2) jointly normal
with the covariance of `fitting.drift` (iteration 0 keeps the term above).

Objective `least-squares`: 0.5 sum_cells ((xbar - mu_k) / s_ref)^2, the paper's visual fit to the means
(s_ref = iteration-0 sd, a fixed scale); its intervals use the residual variance (see `uncertainty`).

Parameters are optimized in an unconstrained vector u (one entry per free parameter; a shared parameter is
one entry): per condition, (r1, r2, 1 - r1 - r2) = softmax(z1, z2, 0) when both are free, so r1, r2 > 0 and
r1 + r2 < 1; a single free r is (1 - r_other) sigmoid(z); standard deviations are s_ref exp(z); tail_rate
is exp(z); mu0 is m_ref + s_ref z (m_ref, s_ref: iteration-0 mean and sd, fixed scales).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special
from jax.scipy.special import gammaln

from fitting.errors import ConstantDataError, ModelError, UnderdeterminedError
from fitting.observations import CellStatistics, Observations, cell_statistics
from qtm.params import PARAM_NAMES, TraitParams, require_x64

_expit = scipy.special.expit  # the logistic 1 / (1 + exp(-x)), without overflow warnings

SELECTIONS = ("hard", "soft")
MUTATIONS = ("none", "paper", "additive")
VARIANCES = ("genetic", "phenotype")
OBJECTIVES = ("likelihood", "least-squares")
PER_CONDITION = ("r1", "r2", "tail_rate", "sigma_mut")
ALWAYS_SHARED = ("mu0", "sigma_g0")
DEFAULT_SHARED = ("mu0", "sigma_g0", "sigma_env")
POSITIVE = ("sigma_mut", "sigma_g0", "sigma_env")
DEFAULT_SOFT_TAIL_RATE = 0.1  # the paper's lambda (Appendix D.2.3) when tail_rate is held fixed
_IDX = {name: i for i, name in enumerate(PARAM_NAMES)}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What is fitted. Defaults: hard truncation, no mutation, V_G observed, Gaussian likelihood.

    Attributes:
        selection: "hard" (tail_rate = inf, Eq. 7-8) or "soft" (finite tail_rate, Appendix D.2.3).
        mutation: "none" (sigma_mut = 0), "paper" (Eq. 16) or "additive" (docs/model.md section 3).
        variance: observed phenotype variance is V_G ("genetic", docs/model.md section 6) or V_P ("phenotype").
        objective: "likelihood" or "least-squares" (module docstring).
        free: names of the free parameters; None = r1, r2, mu0, sigma_g0, sigma_env, plus sigma_mut
            (mutation paper/additive) and tail_rate per condition (soft selection). The recursion depends on
            (r1, r2, tail_rate) only through the two selected moments (m_sel, v_sel), so the data bound
            tail_rate only where no window of another tail rate gives the same moments: its interval is
            always a profile interval, and a flat side (e.g. hard truncation fitting as well, upper = inf)
            makes it "not identified" (docs/model.md section 2).
        fixed: (name, value) pairs; a fixed name is not free. Unset non-free parameters take: mu0 and
            sigma_g0 from iteration 0's mean and sd (as the paper does), tail_rate = inf (hard) or 0.1
            (soft, when `free` leaves it out), sigma_mut = 0, the others TraitParams' defaults.
        shared: parameters with one value for all conditions; mu0 and sigma_g0 always are.
        drift: add the chain's own finite-population drift to the likelihood (`fitting.drift`: the
            realized trajectory wanders around the recursion, so the per-iteration statistics of one
            condition are jointly normal with a non-diagonal covariance). Hard selection, likelihood only.
        population: images generated per iteration (N) when only a subset of them is measured; None =
            every generated image is measured (N = the cell's number of images). Used with `drift` only.
    """

    selection: str = "hard"
    mutation: str = "none"
    variance: str = "genetic"
    objective: str = "likelihood"
    free: tuple[str, ...] | None = None
    fixed: tuple[tuple[str, float], ...] = ()
    shared: tuple[str, ...] = DEFAULT_SHARED
    drift: bool = False
    population: int | None = None

    def free_names(self) -> tuple[str, ...]:
        if self.free is None:
            names = ["r1", "r2", "mu0", "sigma_g0", "sigma_env"]
            if self.mutation != "none":
                names.append("sigma_mut")
            if self.selection == "soft":
                names.append("tail_rate")
        else:
            names = list(self.free)
        fixed = {name for name, _ in self.fixed}
        return tuple(n for n in PARAM_NAMES if n in names and n not in fixed)

    def shared_names(self) -> tuple[str, ...]:
        return tuple(n for n in PARAM_NAMES if n in self.shared or n in ALWAYS_SHARED)

    @property
    def mutation_mode(self) -> str:
        return "additive" if self.mutation == "additive" else "paper"

    def validate(self) -> None:
        """Raise ModelError naming the inconsistent fields (in braces, qtmio.errors) and the fix."""
        for field, value, allowed in (("selection", self.selection, SELECTIONS),
                                      ("mutation", self.mutation, MUTATIONS),
                                      ("variance", self.variance, VARIANCES),
                                      ("objective", self.objective, OBJECTIVES)):
            if value not in allowed:
                raise ModelError(f"{{{field}}} must be one of {', '.join(allowed)}; got {value!r}",
                                 parameters=(field,))
        for field, names in (("free", self.free or ()), ("shared", self.shared),
                             ("fixed", [n for n, _ in self.fixed])):
            for name in names:
                if name not in PARAM_NAMES:
                    raise ModelError(f"{{{field}}}: unknown parameter {name!r}; parameters are "
                                     f"{', '.join(PARAM_NAMES)}", parameters=(field,))
        free = self.free_names()
        fixed = dict(self.fixed)
        if self.selection == "hard" and "tail_rate" in free:
            raise ModelError("tail_rate is free but {selection} hard fixes it at inf; use {selection} soft",
                             parameters=("selection",))
        if self.selection == "hard" and "tail_rate" in fixed and math.isfinite(fixed["tail_rate"]):
            raise ModelError("{fixed} tail_rate with a finite value needs {selection} soft",
                             parameters=("fixed", "selection"))
        if self.selection == "soft" and "tail_rate" in fixed and not (0 < fixed["tail_rate"] < math.inf):
            raise ModelError("{fixed} tail_rate must be a finite value > 0 with {selection} soft",
                             parameters=("fixed", "selection"))
        if self.mutation == "none" and "sigma_mut" in free:
            raise ModelError("sigma_mut is free but {mutation} none fixes it at 0; use {mutation} paper "
                             "or additive", parameters=("mutation",))
        if self.mutation == "none" and fixed.get("sigma_mut", 0.0) != 0.0:
            raise ModelError("{fixed} sigma_mut with a non-zero value needs {mutation} paper or additive",
                             parameters=("fixed", "mutation"))
        for name in ("r1", "r2"):
            if name in fixed and not 0.0 <= fixed[name] < 1.0:
                raise ModelError(f"{{fixed}} {name}={fixed[name]} must lie in [0, 1)", parameters=("fixed",))
        if "r1" in fixed and "r2" in fixed and fixed["r1"] + fixed["r2"] >= 1:
            raise ModelError("{fixed} r1 and r2 must satisfy r1 + r2 < 1", parameters=("fixed",))
        for name in POSITIVE:
            if name in fixed and not (0.0 <= fixed[name] < math.inf):
                raise ModelError(f"{{fixed}} {name}={fixed[name]} must be a finite value >= 0",
                                 parameters=("fixed",))
        if "mu0" in fixed and not math.isfinite(fixed["mu0"]):
            raise ModelError("{fixed} mu0 must be finite", parameters=("fixed",))
        if self.drift and self.selection != "hard":
            raise ModelError("{drift} supports {selection} hard only (the drift of soft selection is not "
                             "derived); use {selection} hard or leave out {drift}", parameters=("drift", "selection"))
        if self.drift and self.objective != "likelihood":
            raise ModelError("{drift} needs {objective} likelihood", parameters=("drift", "objective"))
        if self.population is not None and not self.drift:
            raise ModelError("{population} is used by the drift model only; add {drift}",
                             parameters=("population", "drift"))
        if self.population is not None and self.population < 2:
            raise ModelError(f"{{population}} must be >= 2; got {self.population}", parameters=("population",))
        if not free:
            raise ModelError("no free parameter left: {free}/{fixed} leave nothing to fit",
                             parameters=("free", "fixed"))


@dataclasses.dataclass(frozen=True)
class Layout:
    """The static structure of the unconstrained vector u (hashable: a static argument under jit).

    `free[i] = (name, condition)` with condition = -1 for a shared parameter.
    """

    num_conditions: int
    free: tuple[tuple[str, int], ...]
    mutation_mode: str
    variance: str
    objective: str
    num_iterations: int
    drift: bool = False
    population: int | None = None
    selection: str = "hard"

    @property
    def size(self) -> int:
        return len(self.free)

    @property
    def observation(self):
        """The observation model (`fitting.observation_models`): independent draws or a chain."""
        from fitting.observation_models import observation_model

        return observation_model(self.drift, self.population)

    def slot(self, name: str, condition: int) -> int | None:
        for i, entry in enumerate(self.free):
            if entry == (name, condition) or entry == (name, -1):
                return i
        return None

    def labels(self, conditions: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(name if c < 0 else f"{name}[{conditions[c]}]" for name, c in self.free)


class Data(NamedTuple):
    """Cell statistics as JAX arrays (a pytree: bootstrap draws reuse the compiled objective)."""

    condition_index: jax.Array
    iteration: jax.Array
    num_images: jax.Array
    mean: jax.Array
    var: jax.Array


def data_arrays(cells: CellStatistics) -> Data:
    return Data(jnp.asarray(cells.condition_index), jnp.asarray(cells.iteration),
                jnp.asarray(cells.num_images), jnp.asarray(cells.mean), jnp.asarray(cells.var))


@dataclasses.dataclass(frozen=True)
class Problem:
    """One fitting problem: the layout, the fixed values (C, 7), the scales and the data."""

    spec: ModelSpec
    conditions: tuple[str, ...]
    layout: Layout
    fixed: np.ndarray        # (C, 7) natural values used where a parameter is not free
    scale: np.ndarray        # (2,) m_ref, s_ref
    data: Data
    num_observations: int    # total phenotype values (BIC's n)
    num_cells: int           # number of cell means (least squares' m)
    pilot: object = None     # what the observation model precomputed at a pilot estimate (its covariance,
    #                          `fitting.drift`); None = nothing (independent draws)

    def with_pilot(self, u) -> Problem:
        """The same problem with the observation model's covariance evaluated at the unconstrained u."""
        return dataclasses.replace(self, pilot=self.layout.observation.prepare(self, self.natural(u)))

    def with_data(self, obs: Observations) -> Problem:
        cells = cell_statistics(obs)
        return dataclasses.replace(self, data=data_arrays(cells), num_observations=cells.num_observations,
                                   num_cells=len(cells.mean))

    # ---- numpy-facing wrappers around the compiled functions
    def evaluate(self, us) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Objective, gradient and predicted (mean, var) for a batch of unconstrained vectors (S, P).

        One compiled program per layout serves everything (optimizer steps, the vmapped screening of
        starts, Hessians, profiles and bands): it takes fixed-size chunks of `BATCH` vectors, padding the
        last chunk, so no batch size ever triggers a second compilation."""
        us = np.atleast_2d(np.asarray(us, dtype=np.float64))
        num = us.shape[0]
        pad = (-num) % BATCH
        if pad:
            us = np.concatenate([us, np.repeat(us[-1:], pad, axis=0)])
        fixed, scale, pilot = self._arguments
        parts = [_batched_eval(us[i:i + BATCH], fixed, scale, self.data, pilot, layout=self.layout)
                 for i in range(0, us.shape[0], BATCH)]
        if len(parts) == 1:
            return tuple(np.asarray(x)[:num] for x in parts[0])
        values, grads, means, variances = (np.concatenate([np.asarray(p[k]) for p in parts])[:num]
                                           for k in range(4))
        return values, grads, means, variances

    @functools.cached_property
    def _arguments(self):
        """The compiled objective's array arguments other than u, on the device once (an optimizer calls
        `evaluate` thousands of times, and converting them per call cost as much as the evaluation)."""
        if self.pilot is None and self.layout.observation.needs_pilot:
            raise RuntimeError("this observation model evaluates its covariance at a pilot estimate: "
                               "call Problem.with_pilot(u) first")
        pilot = jnp.zeros(()) if self.pilot is None else self.pilot
        return jnp.asarray(self.fixed), jnp.asarray(self.scale), pilot

    def nll(self, u) -> float:
        return self.value_and_grad(u)[0]

    def value_and_grad(self, u) -> tuple[float, np.ndarray]:
        values, grads, _, _ = self.evaluate(np.asarray(u, dtype=np.float64)[None])
        return float(values[0]), grads[0]

    def batched_nll(self, us) -> np.ndarray:
        return self.evaluate(us)[0]

    def moments(self, us) -> tuple[np.ndarray, np.ndarray]:
        """Predicted phenotype mean and variance (S, C, K+1) for unconstrained vectors (S, P)."""
        _, _, means, variances = self.evaluate(us)
        return means, variances

    def hessian(self, u, *, step: float = 1e-4) -> np.ndarray:
        """Hessian in u by central differences of the exact JAX gradient (symmetrized).

        Differencing the compiled gradient avoids compiling a second-order program (jax.hessian of the
        scanned recursion took ~15 s to compile here against milliseconds for 2P gradient calls); the
        truncation error is O(step^2) relative, far below what the intervals resolve.
        """
        u = np.asarray(u, dtype=np.float64)
        p = u.size
        h = np.empty((p, p))
        for j in range(p):
            e = np.zeros(p)
            e[j] = step
            h[:, j] = (self.value_and_grad(u + e)[1] - self.value_and_grad(u - e)[1]) / (2 * step)
        return 0.5 * (h + h.T)

    def natural(self, u) -> np.ndarray:
        return to_natural(np.asarray(u, dtype=np.float64), self.fixed, self.scale, self.layout, xp=np)


def build_problem(obs: Observations, spec: ModelSpec, *, num_iterations: int | None = None) -> Problem:
    """Resolve `spec` against the conditions of `obs` into a Problem (raises ModelError; RuntimeError
    when JAX is not in float64)."""
    require_x64()
    spec.validate()
    cells = cell_statistics(obs)
    zero = cells.iteration == 0
    ref = zero if zero.any() else cells.iteration == cells.iteration.min()
    m_ref = float(np.average(cells.mean[ref], weights=cells.num_images[ref]))
    v_ref = cells.var[ref][cells.num_images[ref] >= 2]
    s_ref = float(np.sqrt(v_ref.mean())) if v_ref.size and v_ref.mean() > 0 else max(abs(m_ref), 1e-3)

    if spec.drift and spec.population is not None and cells.num_images.max() > spec.population:
        raise ModelError(f"{{population}} {spec.population} is smaller than the {int(cells.num_images.max())} "
                         f"images of a cell of {obs.source}; give the number of images generated per "
                         "iteration (>= the number measured)", parameters=("population",))
    multi = cells.num_images >= 2
    if spec.objective == "likelihood" and multi.any() and not np.any(cells.var[multi] > 0):
        raise ConstantDataError(f"{obs.source}: every cell has zero variance (all values of each iteration are "
                                "identical), so the likelihood has no finite optimum; check the phenotype "
                                "values, or fit the means with {objective} least-squares",
                                parameters=("objective",))
    conditions = obs.conditions
    num_c = len(conditions)
    free_names = spec.free_names()
    shared = spec.shared_names()
    free: list[tuple[str, int]] = [(n, -1) for n in free_names if n in shared]
    for c in range(num_c):
        free += [(n, c) for n in free_names if n not in shared]

    defaults = TraitParams()
    values = {name: float(getattr(defaults, name)) for name in PARAM_NAMES}
    values["mu0"] = m_ref
    values["sigma_g0"] = s_ref
    values["tail_rate"] = math.inf if spec.selection == "hard" else DEFAULT_SOFT_TAIL_RATE
    values["sigma_mut"] = 0.0
    values.update(dict(spec.fixed))
    fixed = np.tile(np.array([values[n] for n in PARAM_NAMES], dtype=np.float64), (num_c, 1))

    num_statistics = num_data_statistics(cells, spec.objective)
    if len(free) > num_statistics:
        what = "cell means" if spec.objective == "least-squares" else "cell means and non-zero cell variances"
        raise UnderdeterminedError(f"{obs.source}: {len(free)} free parameters but only {num_statistics} "
                                   f"observed statistics ({what}): the fit is not determined; fix some "
                                   "parameters with {fixed} or add images", parameters=("fixed",))
    k = int(obs.max_iteration if num_iterations is None else num_iterations)
    layout = Layout(num_conditions=num_c, free=tuple(free), mutation_mode=spec.mutation_mode,
                    variance=spec.variance, objective=spec.objective, num_iterations=k,
                    drift=spec.drift, population=spec.population, selection=spec.selection)
    return Problem(spec=spec, conditions=conditions, layout=layout, fixed=fixed,
                   scale=np.array([m_ref, s_ref]), data=data_arrays(cells),
                   num_observations=cells.num_observations, num_cells=len(cells.mean))


def num_data_statistics(cells: CellStatistics, objective: str = "likelihood") -> int:
    """How many scalar statistics the data give the fit: one mean per cell, plus (likelihood) one sample
    variance per cell with n >= 2 and s^2 > 0 (a zero-variance cell's variance is not scored, `cell_nll`)."""
    num = int(np.sum(cells.num_images >= 1))
    if objective == "likelihood":
        num += int(np.sum((cells.num_images >= 2) & (cells.var > 0)))
    return num


def zero_variance_cells(cells: CellStatistics, conditions: tuple[str, ...]) -> list[str]:
    """'condition/iteration k' for every cell with n >= 2 and sample variance exactly 0."""
    bad = np.flatnonzero((cells.num_images >= 2) & (cells.var == 0))
    return [f"{conditions[int(cells.condition_index[i])]}/iteration {int(cells.iteration[i])}" for i in bad]


# ---------------------------------------------------------------------------------------- transforms

def to_natural(u, fixed, scale, layout: Layout, xp=jnp):
    """Map the unconstrained vector u (layout.size,) to the natural table (C, 7) (module docstring).

    `xp` is jax.numpy (traced, differentiable) or numpy (cheap host-side use, no compilation)."""
    m_ref, s_ref = scale[0], scale[1]
    rows = []
    for c in range(layout.num_conditions):
        row = [fixed[c, i] for i in range(len(PARAM_NAMES))]
        i1, i2 = layout.slot("r1", c), layout.slot("r2", c)
        if i1 is not None and i2 is not None:
            top = xp.maximum(xp.maximum(u[i1], u[i2]), 0.0)
            e1, e2, e0 = xp.exp(u[i1] - top), xp.exp(u[i2] - top), xp.exp(-top)
            total = e1 + e2 + e0
            row[_IDX["r1"]], row[_IDX["r2"]] = e1 / total, e2 / total
        elif i1 is not None:
            row[_IDX["r1"]] = (1.0 - fixed[c, _IDX["r2"]]) / (1.0 + xp.exp(-u[i1]))
        elif i2 is not None:
            row[_IDX["r2"]] = (1.0 - fixed[c, _IDX["r1"]]) / (1.0 + xp.exp(-u[i2]))
        for name in ("tail_rate", "sigma_mut", "mu0", "sigma_g0", "sigma_env"):
            i = layout.slot(name, c)
            if i is None:
                continue
            if name == "mu0":
                row[_IDX[name]] = m_ref + s_ref * u[i]
            elif name == "tail_rate":
                row[_IDX[name]] = xp.exp(u[i])
            else:
                row[_IDX[name]] = s_ref * xp.exp(u[i])
        rows.append(xp.stack([xp.asarray(v, dtype=xp.float64) for v in row]))
    return xp.stack(rows)


def to_unconstrained(table: np.ndarray, problem_or_layout, scale=None, fixed=None) -> np.ndarray:
    """Inverse of `to_natural` for a natural table (C, 7) (shared entries read from condition 0)."""
    if isinstance(problem_or_layout, Problem):
        layout, scale, fixed = problem_or_layout.layout, problem_or_layout.scale, problem_or_layout.fixed
    else:
        layout = problem_or_layout
    m_ref, s_ref = float(scale[0]), float(scale[1])
    u = np.zeros(layout.size)
    for i, (name, c) in enumerate(layout.free):
        c0 = max(c, 0)
        v = float(table[c0, _IDX[name]])
        if name in ("r1", "r2"):
            other = "r2" if name == "r1" else "r1"
            if layout.slot(other, c0) is not None:
                r0 = 1.0 - table[c0, _IDX["r1"]] - table[c0, _IDX["r2"]]
                u[i] = math.log(v / r0)
            else:
                frac = v / (1.0 - fixed[c0, _IDX[other]])
                u[i] = math.log(frac / (1.0 - frac))
        elif name == "mu0":
            u[i] = (v - m_ref) / s_ref
        elif name == "tail_rate":
            u[i] = math.log(v)
        else:
            u[i] = math.log(v / s_ref)
    return u


def report_scale(name: str, value):
    """The scale on which intervals are symmetric: logit for r1, r2; log for positives; identity for mu0."""
    value = np.asarray(value, dtype=np.float64)
    with np.errstate(divide="ignore"):
        if name in ("r1", "r2"):
            return np.log(value) - np.log1p(-value)
        if name == "mu0":
            return value
        return np.log(value)


def from_report_scale(name: str, g: np.ndarray) -> np.ndarray:
    g = np.asarray(g, dtype=np.float64)
    if name in ("r1", "r2"):
        return _expit(g)
    if name == "mu0":
        return g
    return np.exp(g)


# ---------------------------------------------------------------------------------------- objective

def trajectories(table, layout: Layout):
    """qtm's recursion for every condition of a natural table (C, 7): a Trajectory with fields (C, K+1).

    Hard selection passes tail_rate = inf as a constant, so the compiled objective has no soft tails."""
    from qtm.recursion import trajectory

    columns = [table[:, i] for i in range(len(PARAM_NAMES))]
    if layout.selection == "hard":
        columns[_IDX["tail_rate"]] = math.inf
    return trajectory(TraitParams(*columns, mutation_mode=layout.mutation_mode), layout.num_iterations)


def predicted_moments(table, layout: Layout):
    """(mean, variance) of the observed phenotype per condition and iteration, each (C, K+1)."""
    traj = trajectories(table, layout)
    var = traj.var_genetic if layout.variance == "genetic" else traj.var_phenotype
    return traj.mean, var


def cell_nll(mu, var, n, xbar, s2, xp=jnp):
    """Negative log-likelihood of one cell's sufficient statistics (module docstring), vectorized.

    `xp` = jax.numpy (default) or numpy (host-side diagnostics)."""
    lgamma = gammaln if xp is jnp else scipy.special.gammaln
    nll_mean = 0.5 * (xp.log(2.0 * xp.pi * var / n) + n * (xbar - mu) ** 2 / var)
    df = n - 1.0
    # a cell of identical values (s^2 = 0, n >= 2) has no variance statistic a continuous model can score:
    # it keeps its mean term only (the fit warns about it, `zero_variance_cells`)
    has_var = (df > 0) & (s2 > 0)
    df_safe = xp.where(has_var, df, 2.0)
    s2_safe = xp.where(has_var, s2, 1.0)
    q = df_safe * s2_safe / var
    log_density = (xp.log(df_safe / var) + (0.5 * df_safe - 1.0) * xp.log(q) - 0.5 * q
                   - 0.5 * df_safe * xp.log(2.0) - lgamma(0.5 * df_safe))
    return nll_mean - xp.where(has_var, log_density, 0.0)


def image_nll_offset(n, s2):
    """-log of the density of a cell's individual values given its (xbar, s^2), per cell (numpy).

    For n iid normal values the sufficient statistics (xbar, s^2) leave a conditional density of the values
    that is free of the parameters, so the negative log-likelihood of the individual values is
    `cell_nll` + this offset (module docstring), and the same holds for any law of (xbar, s^2) (the drift
    model) given normal values within the cell:

        (df/2) log(2 pi) + (1/2) log n + log df + (df/2 - 1) log(df s^2) - (df/2) log 2 - log Gamma(df/2),

    df = n - 1. Cells with n = 1 or s^2 = 0 (scored by their mean alone, `cell_nll`) get 0. The offset
    depends on the data's scale (s^2), so it matters when fits on different scales are compared
    (`fitting.transforms`)."""
    n = np.asarray(n, dtype=np.float64)
    s2 = np.asarray(s2, dtype=np.float64)
    df = n - 1.0
    ok = (df > 0) & (s2 > 0)
    d = np.where(ok, df, 2.0)
    v = np.where(ok, s2, 1.0)
    out = (0.5 * d * np.log(2.0 * np.pi) + 0.5 * np.log(np.where(ok, n, 1.0)) + np.log(d)
           + (0.5 * d - 1.0) * np.log(d * v) - 0.5 * d * np.log(2.0) - scipy.special.gammaln(0.5 * d))
    return np.where(ok, out, 0.0)


BATCH = 8


def _objective_and_moments(u, fixed, scale, data, pilot, layout):
    table = to_natural(u, fixed, scale, layout)
    mean, var = predicted_moments(table, layout)
    mu = mean[data.condition_index, data.iteration]
    v = var[data.condition_index, data.iteration]
    if layout.objective == "least-squares":
        value = 0.5 * jnp.sum(((data.mean - mu) / scale[1]) ** 2)
    else:
        terms = cell_nll(mu, v, data.num_images, data.mean, data.var)
        value = layout.observation.nll(table, terms, data, layout, pilot)
    return jnp.where(jnp.isfinite(value), value, jnp.inf), (mean, var)


@partial(jax.jit, static_argnames=("layout",))
def _batched_eval(us, fixed, scale, data, pilot, layout):
    """vmap over a chunk of vectors of (objective, gradient, mean, var): the one compiled program (the
    pilot is an argument, so a new pilot reuses it)."""
    one = jax.value_and_grad(lambda u: _objective_and_moments(u, fixed, scale, data, pilot, layout),
                             has_aux=True)
    (values, (means, variances)), grads = jax.vmap(one)(us)
    return values, grads, means, variances


def report_jacobian(u, fixed, scale, layout, *, step: float = 1e-6):
    """d(report-scale value of every free entry)/du and d(natural value)/du, each (P, P), by central
    differences of the closed-form maps (numpy; nothing to compile)."""
    u = np.asarray(u, dtype=np.float64)
    fixed = np.asarray(fixed)

    def values(v):
        nat = free_values(to_natural(v, fixed, scale, layout, xp=np), layout)
        rep = np.array([report_scale(name, x) for (name, _), x in zip(layout.free, nat)])
        return rep, nat

    p = u.size
    jr, jn = np.empty((p, p)), np.empty((p, p))
    for j in range(p):
        e = np.zeros(p)
        e[j] = step * max(1.0, abs(u[j]))
        (rp, npl), (rm, nmi) = values(u + e), values(u - e)
        jr[:, j] = (rp - rm) / (2 * e[j])
        jn[:, j] = (npl - nmi) / (2 * e[j])
    return jr, jn


def free_values(table, layout: Layout) -> np.ndarray:
    """The natural value of every free entry (P,) from a natural table (C, 7)."""
    table = np.asarray(table)
    return np.array([table[max(c, 0), _IDX[name]] for name, c in layout.free])


# ---------------------------------------------------------------------------------------- profiles

PROFILE_KIND = {"mu0": 0, "sigma_g0": 1, "sigma_env": 1, "sigma_mut": 1, "tail_rate": 2}


def profile_embedding(problem: Problem, index: int) -> tuple[int, int, float]:
    """(kind, partner slot, partner's fixed value) describing how entry `index` is pinned in a profile."""
    name, c = problem.layout.free[index]
    if name in PROFILE_KIND:
        return PROFILE_KIND[name], 0, 0.0
    other = "r2" if name == "r1" else "r1"
    partner = problem.layout.slot(other, max(c, 0))
    if partner is not None:
        return 3, partner, 0.0
    return 4, 0, float(problem.fixed[max(c, 0), _IDX[other]])


def embed(problem: Problem, w, g: float, index: int) -> tuple[np.ndarray, int, float]:
    """Insert free entry `index` pinned at report-scale value g into the reduced vector w (P-1,) -> u (P,).

    kind 0: mu0 (z = (g - m_ref) / s_ref); 1: a standard deviation (z = g - log s_ref); 2: tail_rate (z = g);
    3: r with a free partner r (softmax: z = logit(r) + softplus(z_partner)); 4: r with a fixed partner o
    (z = logit(r / (1 - o))). Returns u, the partner slot and dz/dz_partner (kind 3; else 0)."""
    kind, partner, other = profile_embedding(problem, index)
    u = np.insert(np.asarray(w, dtype=np.float64), index, 0.0)
    m_ref, s_ref = float(problem.scale[0]), float(problem.scale[1])
    dz = 0.0
    if kind == 0:
        z = (g - m_ref) / s_ref
    elif kind == 1:
        z = g - math.log(s_ref)
    elif kind == 2:
        z = g
    elif kind == 3:
        z = g + np.logaddexp(0.0, u[partner])
        dz = _expit(u[partner])
    else:
        r = _expit(g)
        frac = min(max(r / (1.0 - other), 1e-300), 1.0 - 1e-16)
        z = math.log(frac) - math.log1p(-frac)
    u[index] = z
    return u, partner, dz


def profile_value_and_grad(problem: Problem, w, g, index: int) -> tuple[float, np.ndarray]:
    """Objective and gradient in the reduced vector w with free entry `index` pinned at report value g
    (chain rule through `embed`; no extra compilation)."""
    u, partner, dz = embed(problem, w, float(g), index)
    value, grad = problem.value_and_grad(u)
    grad = grad.copy()
    if dz:
        grad[partner] += grad[index] * dz
    return value, np.delete(grad, index)


def reduce_vector(u, index: int) -> np.ndarray:
    return np.delete(np.asarray(u, dtype=np.float64), index)
