"""Phenotype transforms for the fit (docs/model.md section 7): the model is fitted to y = T(x).

qtm's model treats the phenotypes of one (condition, iteration) cell as normal. A phenotype that is bounded
below and right-skewed (the toy world's hf_power) is closer to normal on the log scale; a fraction bounded
in (0, 1) on the logit scale. `qtm fit --transform none|log|logit` fits the model to T(x) instead of x.

Each transform is an object with its forward map, the log of its derivative and a domain check:

    none    T(x) = x                 log|T'(x)| = 0                        any real x
    log     T(x) = log x             log|T'(x)| = -log x                   x > 0
    logit   T(x) = log(x / (1 - x))  log|T'(x)| = -log x - log(1 - x)      0 < x < 1

Comparison on the same data. The density of the measured phenotypes x is that of y = T(x) times the
Jacobian, so the log-likelihood of the data on the measured scale is

    log L_x = log L_y + sum over the images entering the fit of log|T'(x_i)|,

and AIC = 2p - 2 log L_x compares transforms (and models) fitted to the same measurements. What the
images entering the fit are: every image of iterations >= 1 and iteration 0 once (conditions sharing the
same D_0 count it once, as the likelihood does, `fitting.observations.cell_statistics`); a cell whose values
are all identical enters through its mean alone, so it contributes one value's log|T'|.

Meaning of the parameters. r1 and r2 are fractions of the phenotype distribution (quantile fractions), and
a strictly increasing T keeps every quantile fraction, so they mean the same on every scale. mu0 and the
standard deviations (sigma_g0, sigma_env, sigma_mut) live on the transformed scale (e.g. log hf_power).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fitting.errors import ObservationError
from fitting.observations import Observations, distinct_samples, from_phenotypes
from qtmio.contract import PHENOTYPE


@dataclasses.dataclass(frozen=True)
class Identity:
    """T(x) = x: the measured scale (`--transform none`)."""

    name: str = "none"
    domain: str = "any real value"

    def forward(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float64)

    def log_abs_jacobian(self, x: np.ndarray) -> np.ndarray:
        return np.zeros_like(np.asarray(x, dtype=np.float64))

    def outside(self, x: np.ndarray) -> np.ndarray:
        """True where a finite value lies outside the domain (never, here)."""
        return np.zeros(np.shape(x), dtype=bool)


@dataclasses.dataclass(frozen=True)
class Log:
    """T(x) = log x, for x > 0 (`--transform log`)."""

    name: str = "log"
    domain: str = "x > 0"

    def forward(self, x: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.log(np.asarray(x, dtype=np.float64))

    def log_abs_jacobian(self, x: np.ndarray) -> np.ndarray:
        """log|d log x / dx| = -log x."""
        return -self.forward(x)

    def outside(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        return np.isfinite(x) & ~(x > 0)


@dataclasses.dataclass(frozen=True)
class Logit:
    """T(x) = log(x / (1 - x)), for 0 < x < 1 (`--transform logit`)."""

    name: str = "logit"
    domain: str = "0 < x < 1"

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.log(x) - np.log1p(-x)

    def log_abs_jacobian(self, x: np.ndarray) -> np.ndarray:
        """log|dT/dx| = log(1 / (x (1 - x))) = -log x - log(1 - x)."""
        x = np.asarray(x, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            return -np.log(x) - np.log1p(-x)

    def outside(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        return np.isfinite(x) & ~((x > 0) & (x < 1))


TRANSFORMS = {"none": Identity(), "log": Log(), "logit": Logit()}
"""The transforms by the name `--transform` takes."""


def get_transform(name: str):
    """The transform called `name` (raises ObservationError naming the choices)."""
    if name not in TRANSFORMS:
        raise ObservationError(f"{{transform}} must be one of {', '.join(TRANSFORMS)}; got {name!r}",
                               parameters=("transform",))
    return TRANSFORMS[name]


def domain_problems(obs: Observations, transform) -> list[str]:
    """One line per (condition, iteration) cell holding values outside the transform's domain:
    'condition/iteration k: m of n values (min .., max ..)'. Empty when every value is inside."""
    if obs.phenotypes is None:
        return []
    bad = transform.outside(obs.phenotypes)
    lines = []
    for c, j in zip(*np.nonzero(bad.any(axis=-1))):
        values = obs.phenotypes[c, j][np.isfinite(obs.phenotypes[c, j])]
        lines.append(f"{obs.conditions[c]}/iteration {int(obs.iterations[j])}: {int(bad[c, j].sum())} of "
                     f"{values.size} values outside (min {values.min():.4g}, max {values.max():.4g})")
    return lines


def transform_observations(obs: Observations, name: str) -> Observations:
    """The observations of y = T(x) (per-image phenotypes transformed, cell statistics recomputed).

    Raises ObservationError when T is not the identity and the dataset holds only the summary trio (the
    statistics of T(x) need the images), or when any value lies outside T's domain: the message names every
    such cell (at most 8, then a count) and the fix."""
    transform = get_transform(name)
    if transform.name == "none":
        return obs
    if obs.phenotypes is None:
        raise ObservationError(f"{obs.source}: {{transform}} {name} needs the per-image variable '{PHENOTYPE}'; "
                               "this dataset holds only the summary trio (mean and sd), whose transform is "
                               "unknown: fit it with {transform} none", parameters=("transform",))
    problems = domain_problems(obs, transform)
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more cell(s)" if len(problems) > 8 else "")
        raise ObservationError(f"{obs.source}: {{transform}} {name} needs every '{PHENOTYPE}' value in "
                               f"{transform.domain}; {len(problems)} cell(s) hold values outside: {shown}. "
                               "Use {transform} none (or log for values > 0), or correct the phenotype",
                               parameters=("transform",))
    y = transform.forward(obs.phenotypes)
    out = from_phenotypes(obs.conditions, obs.iterations, y, source=obs.source)
    return dataclasses.replace(out, notes=obs.notes, kind=obs.kind)


def log_jacobian(obs: Observations, name: str) -> float:
    """sum of log|T'(x_i)| over the images of `obs` (measured scale) that enter the likelihood (module
    docstring): all images of iterations >= 1, iteration 0 once per distinct D_0 sample, one value of a cell
    whose values are all identical. 0 for the identity (also for summary-only data). `obs` must lie in T's
    domain: `transform_observations` checks it (with a clear error) and comes first."""
    transform = get_transform(name)
    if transform.name == "none" or obs.phenotypes is None:
        return 0.0
    total = 0.0
    for j, iteration in enumerate(obs.iterations.tolist()):
        rows = range(obs.num_conditions)
        if iteration == 0:
            # T is one-to-one: samples are the same on either scale
            rows = distinct_samples(obs.num_images[:, j], obs.mean[:, j], obs.var[:, j])
        for c in rows:
            x = obs.phenotypes[c, j][np.isfinite(obs.phenotypes[c, j])]
            if x.size == 0:
                continue
            if x.size >= 2 and np.all(x == x[0]):
                x = x[:1]
            total += float(np.sum(transform.log_abs_jacobian(x)))
    return total
