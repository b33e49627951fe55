"""Model comparison across selection and mutation variants and phenotype transforms by AIC and BIC.

Each variant (hard or soft selection x no, paper or additive mutation) is fitted on every requested
phenotype scale (`fitting.transforms`: none, log, logit) to the same measurements with the same objective,
sharing and fixed values; the information criteria come from `fitting.driver.information_criteria`, whose
log-likelihood is that of the measured values (the Jacobian of the transform included), so rows on
different scales compare (docs/model.md section 7). Lower is better; differences below ~2 do not
distinguish models. Akaike weights exp(-dAIC/2) / sum exp(-dAIC/2) over all rows. A transform whose domain
the data leave (e.g. logit with a value >= 1) gets rows with status "outside domain" and AIC = inf. Only
point estimates are needed, so no intervals are computed here.
"""

from __future__ import annotations

import dataclasses
import math

import jax

from fitting.driver import information_criteria, optimize
from fitting.errors import ObservationError
from fitting.model import ModelSpec, build_problem
from fitting.observations import Observations
from fitting.transforms import log_jacobian, transform_observations

VARIANTS = (("hard", "none"), ("soft", "none"), ("hard", "paper"), ("hard", "additive"),
            ("soft", "paper"), ("soft", "additive"))


def compare_variants(obs: Observations, spec: ModelSpec, *, num_starts: int, key: jax.Array,
                     variants=VARIANTS, transforms=("none",), progress=None) -> list[dict]:
    """Fit every (selection, mutation) variant on every transform of the measured observations `obs`;
    rows sorted by AIC with delta_aic, delta_bic and the Akaike weight."""
    rows = []
    keys = jax.random.split(key, len(variants))
    for transform in transforms:
        try:
            scaled = transform_observations(obs, transform)
            jacobian = log_jacobian(obs, transform)
        except ObservationError as err:
            scaled, reason = None, str(err)
        for (selection, mutation), k in zip(variants, keys):
            row = {"model": selection, "mutation": mutation, "transform": transform}
            if scaled is None:
                row.update({"status": "outside domain", "reason": reason, "aic": math.inf, "bic": math.inf,
                            "num_free": None})
            else:
                problem = build_problem(scaled, _variant(spec, selection, mutation))
                result, problem = optimize(problem, scaled, num_starts=num_starts, key=k)
                row["status"] = result.best.status
                row.update(information_criteria(problem, result.best.nll, log_jacobian=jacobian) if result.ok
                           else {"aic": math.inf, "bic": math.inf, "num_free": problem.layout.size})
            rows.append(row)
            if progress is not None:
                progress()
    best_aic = min(r["aic"] for r in rows)
    best_bic = min(r["bic"] for r in rows)
    for r in rows:
        r["delta_aic"] = r["aic"] - best_aic
        r["delta_bic"] = r["bic"] - best_bic
    weights = [math.exp(-0.5 * r["delta_aic"]) if math.isfinite(r["delta_aic"]) else 0.0 for r in rows]
    total = sum(weights)
    for r, w in zip(rows, weights):
        r["weight"] = w / total if total > 0 else math.nan
    return sorted(rows, key=lambda r: r["aic"])


def _variant(spec: ModelSpec, selection: str, mutation: str) -> ModelSpec:
    """`spec` with another selection and mutation: tail_rate free with soft selection (as `--model soft`
    does), sigma_mut free with mutation; fixed values that the variant does not have dropped."""
    free = None
    if spec.free is not None:
        extra = (["tail_rate"] if selection == "soft" else []) + (["sigma_mut"] if mutation != "none" else [])
        free = tuple(n for n in spec.free if n not in ("tail_rate", "sigma_mut")) + tuple(extra)
    fixed = tuple((n, v) for n, v in spec.fixed
                  if not (n == "tail_rate" and selection == "hard") and not (n == "sigma_mut" and mutation == "none"))
    return dataclasses.replace(spec, selection=selection, mutation=mutation, free=free, fixed=fixed)
