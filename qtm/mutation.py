"""The mutation law: how V_M = sigma_M^2 enters one iteration (docs/model.md section 3), in one place.

Two modes (`qtm.params.MUTATION_MODES`):

    paper (Eq. 16; Eq. 5 when V_M = 0):   h2_t = V_G,t / (V_P,t + V_M),   V_G,{t+1} = V_sel
    additive (mutation-selection balance): h2_t = V_G,t / V_P,t,           V_G,{t+1} = V_sel + V_M

with V_sel the variance of the selected individuals (V_P,t v_sel in the recursion, Eq. 11; the selected
sample's variance in the Monte Carlo). The recursion (`qtm.recursion`), the Monte Carlo (`qtm.montecarlo`),
the recursion's fixed points and the stored heritability (`qtm.dataset`) all call these two functions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qtm.params import MUTATION_MODES


def _check(mode: str) -> None:
    if mode not in MUTATION_MODES:
        raise ValueError(f"mutation_mode must be one of {', '.join(MUTATION_MODES)}; got {mode!r}")


def heritability(var_genetic, var_phenotype, var_mut, mode: str) -> jax.Array:
    """h2 = V_G / (V_P + V_M) (paper) or V_G / V_P (additive); 1 where the denominator is 0 (its limit
    when V_E = V_M = 0), with a finite gradient there."""
    _check(mode)
    var_genetic = jnp.asarray(var_genetic, jnp.float64)
    denominator = jnp.asarray(var_phenotype, jnp.float64)
    if mode == "paper":
        denominator = denominator + jnp.asarray(var_mut, jnp.float64)
    positive = denominator > 0
    return jnp.where(positive, var_genetic / jnp.where(positive, denominator, 1.0), 1.0)


def next_var_genetic(var_selected, var_mut, mode: str) -> jax.Array:
    """V_G,{t+1} = V_sel (paper) or V_sel + V_M (additive)."""
    _check(mode)
    var_selected = jnp.asarray(var_selected, jnp.float64)
    return var_selected + jnp.asarray(var_mut, jnp.float64) if mode == "additive" else var_selected
