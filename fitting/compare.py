"""Model comparison across selection and mutation variants by AIC and BIC.

Each variant (hard or soft selection x no, paper or additive mutation) is fitted to the same observations
with the same objective, sharing and fixed values; the information criteria come from
`fitting.driver.information_criteria`. Lower is better; differences below ~2 do not distinguish models.
Only point estimates are needed, so no intervals are computed here.
"""

from __future__ import annotations

import dataclasses

import jax

from fitting.driver import information_criteria, optimize
from fitting.model import ModelSpec, build_problem
from fitting.observations import Observations

VARIANTS = (("hard", "none"), ("soft", "none"), ("hard", "paper"), ("hard", "additive"),
            ("soft", "paper"), ("soft", "additive"))


def compare_variants(obs: Observations, spec: ModelSpec, *, num_starts: int, key: jax.Array,
                     variants=VARIANTS, progress=None) -> list[dict]:
    """Fit every (selection, mutation) variant; rows sorted by AIC with delta_aic and delta_bic."""
    rows = []
    keys = jax.random.split(key, len(variants))
    for (selection, mutation), k in zip(variants, keys):
        free = None
        if spec.free is not None:
            extra = (["tail_rate"] if selection == "soft" else []) + (["sigma_mut"] if mutation != "none" else [])
            free = tuple(n for n in spec.free if n not in ("tail_rate", "sigma_mut")) + tuple(extra)
        fixed = tuple((n, v) for n, v in spec.fixed
                      if not (n == "tail_rate" and selection == "hard") and not (n == "sigma_mut" and mutation == "none"))
        variant = dataclasses.replace(spec, selection=selection, mutation=mutation, free=free, fixed=fixed)
        problem = build_problem(obs, variant)
        result, problem = optimize(problem, obs, num_starts=num_starts, key=k)
        row = {"model": selection, "mutation": mutation, "status": result.best.status}
        row.update(information_criteria(problem, result.best.nll) if result.ok else
                   {"aic": float("inf"), "bic": float("inf"), "num_free": problem.layout.size})
        rows.append(row)
        if progress is not None:
            progress()
    best_aic = min(r["aic"] for r in rows)
    best_bic = min(r["bic"] for r in rows)
    for r in rows:
        r["delta_aic"] = r["aic"] - best_aic
        r["delta_bic"] = r["bic"] - best_bic
    return sorted(rows, key=lambda r: r["aic"])
