"""The deterministic moment recursion of the trait (docs/model.md section 3; Eq. 5, 6, 9, 11, 16).

One iteration, from the state (mu_t, V_G,t):

    V_P,t      = V_G,t + V_E
    S_t        = sqrt(V_P,t) m_sel                 selection differential (mu'_t - mu_t)
    h2_t       = V_G,t / (V_P,t + V_M)            paper mode (Eq. 16; Eq. 5 when V_M = 0)
               = V_G,t / V_P,t                     additive mode
    R_t        = h2_t S_t                          response (breeder's equation, Eq. 6)
    mu_{t+1}   = mu_t + R_t
    V_G,{t+1}  = V_P,t v_sel                       paper mode (Eq. 11 as the proof of Theorem 1 uses it)
               = V_P,t v_sel + V_M                 additive mode (mutation-selection balance)

`step` is the pure transition; `trajectory` drives it with `jax.lax.scan`. Everything is float64,
jit-compiled, differentiable in every float field of `TraitParams`, and vmappable over any of them.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qtm import mutation
from qtm.params import TraitParams, require_x64
from qtm.selection import is_hard_truncation, selection_moments


class TraitState(NamedTuple):
    """The state carried from iteration to iteration: phenotype mean and additive genetic variance."""

    mean: jax.Array
    var_genetic: jax.Array


class Trajectory(NamedTuple):
    """Per-iteration moments; every field has shape (..., K+1) and index t is iteration t.

    `selection_differential[t]` (S_t) and `response[t]` (R_t = h2_t S_t) describe the selection applied
    to iteration t's population, so mean[t+1] = mean[t] + response[t]; the last entry (t = K) is the
    selection iteration K would undergo next.
    """

    mean: jax.Array
    var_genetic: jax.Array
    var_phenotype: jax.Array
    heritability: jax.Array
    selection_differential: jax.Array
    response: jax.Array


def _safe_sqrt(x: jax.Array) -> jax.Array:
    """sqrt with a finite (zero) gradient at x = 0 (a variance that underflowed)."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def initial_state(params: TraitParams) -> TraitState:
    """Iteration 0: mu_0 and V_G,0 = sigma_g0**2."""
    mean = jnp.asarray(params.mu0, jnp.float64)
    var_genetic = jnp.square(jnp.asarray(params.sigma_g0, jnp.float64))
    return TraitState(*jnp.broadcast_arrays(mean, var_genetic))


def step(state: TraitState, params: TraitParams, moments: tuple[jax.Array, jax.Array] | None = None,
         ) -> tuple[TraitState, Trajectory]:
    """One iteration of the recursion (module docstring): (state_t, params) -> (state_{t+1}, record_t).

    `moments` = (m_sel, v_sel) may be passed in when already computed (they do not depend on the state);
    by default they come from `selection_moments(r1, r2, tail_rate)`. The record holds iteration t's
    values in the fields of `Trajectory`.
    """
    m_sel, v_sel = moments if moments is not None else selection_moments(params.r1, params.r2,
                                                                          params.tail_rate)
    var_env = jnp.square(jnp.asarray(params.sigma_env, jnp.float64))
    var_mut = jnp.square(jnp.asarray(params.sigma_mut, jnp.float64))
    var_phenotype = state.var_genetic + var_env
    differential = _safe_sqrt(var_phenotype) * m_sel
    heritability = mutation.heritability(state.var_genetic, var_phenotype, var_mut, params.mutation_mode)
    next_var_genetic = mutation.next_var_genetic(var_phenotype * v_sel, var_mut, params.mutation_mode)
    response = heritability * differential
    record = Trajectory(state.mean, state.var_genetic, var_phenotype, heritability, differential, response)
    return TraitState(state.mean + response, next_var_genetic), record


def trajectory(params: TraitParams, num_iterations: int) -> Trajectory:
    """Moments of iterations 0..K (K = num_iterations) by `jax.lax.scan` over `step`.

    Parameter leaves may carry leading batch dimensions (they broadcast), or the function may be
    vmapped over any leaf; outputs then have shape (..., K+1). A `tail_rate` known at trace time to be
    +inf (a Python number or a concrete array; `qtm.selection.is_hard_truncation`) compiles the smaller
    program of hard truncation; a traced one decides at run time (same values).
    """
    return _trajectory(params, num_iterations, is_hard_truncation(params.tail_rate))


@functools.partial(jax.jit, static_argnames=("num_iterations", "hard"))
def _trajectory(params: TraitParams, num_iterations: int, hard: bool) -> Trajectory:
    require_x64()
    if num_iterations < 0:
        raise ValueError(f"num_iterations must be >= 0; got {num_iterations}")
    tail_rate = np.full(np.shape(params.tail_rate), np.inf) if hard else params.tail_rate
    moments = selection_moments(params.r1, params.r2, tail_rate)
    state = initial_state(params)
    batch = jnp.broadcast_shapes(state.mean.shape, moments[0].shape,
                                 *(jnp.shape(getattr(params, f)) for f in ("sigma_env", "sigma_mut")))
    state = TraitState(*(jnp.broadcast_to(x, batch) for x in state))

    def body(carry, _):
        return step(carry, params, moments)

    _, records = jax.lax.scan(body, state, xs=None, length=num_iterations + 1)
    return Trajectory(*(jnp.moveaxis(x, 0, -1) for x in records))


def theorem1_asymptotes(r1: float, r2: float, sigma_env: float) -> dict[str, float]:
    """Theorem 1 (hard truncation, V_M = 0): c1 = |m_sel|, c2 = v_sel,
    V_P -> V_E / (1 - c2), V_G -> V_E c2 / (1 - c2), and the mean moves by
    sign(m_sel) c1 c2 sigma_E / sqrt(1 - c2) per iteration (upward when r1 > r2)."""
    m_sel, v_sel = (float(x) for x in selection_moments(r1, r2, jnp.inf))
    var_env = sigma_env**2
    return {
        "drift_per_iteration": m_sel * v_sel * sigma_env / (1.0 - v_sel) ** 0.5,
        "var_phenotype_limit": var_env / (1.0 - v_sel),
        "var_genetic_limit": var_env * v_sel / (1.0 - v_sel),
        "m_sel": m_sel,
        "v_sel": v_sel,
    }


def asymptotes(params: TraitParams) -> dict[str, float | str] | None:
    """Limits of the recursion for concrete parameters, or None when there is no stationary variance.

    The recursion is linear in V_G with constant (m_sel, v_sel), so with v_sel < 1 it converges to
      paper mode:    V_G* = V_E v_sel / (1 - v_sel),           h2* = V_G* / (V_P* + V_M)
      additive mode: V_G* = (V_E v_sel + V_M) / (1 - v_sel),   h2* = V_G* / V_P*
    with V_P* = V_G* + V_E and a constant drift of the mean h2* sqrt(V_P*) m_sel per iteration.
    Hard truncation with V_M = 0 is Theorem 1 (drift c1 c2 sigma_E / sqrt(1 - c2), V_P* = V_E / (1 - c2));
    `kind` says which case applies. Without selection (v_sel = 1) V_G grows without bound: None.
    """
    m_sel, v_sel = (float(x) for x in selection_moments(params.r1, params.r2, params.tail_rate))
    if not v_sel < 1.0:
        return None
    var_env, var_mut = float(params.sigma_env) ** 2, float(params.sigma_mut) ** 2
    # fixed point of V_G* = next_var_genetic((V_G* + V_E) v_sel, V_M), linear in V_G*
    intercept = float(mutation.next_var_genetic(var_env * v_sel, var_mut, params.mutation_mode))
    var_genetic = intercept / (1.0 - v_sel)
    var_phenotype = var_genetic + var_env
    heritability = float(mutation.heritability(var_genetic, var_phenotype, var_mut, params.mutation_mode))
    hard = float(params.tail_rate) == float("inf")
    kind = "Theorem 1" if hard and var_mut == 0.0 else "fixed point of the recursion"
    return {
        "kind": kind,
        "drift_per_iteration": heritability * var_phenotype**0.5 * m_sel,
        "var_phenotype_limit": var_phenotype,
        "var_genetic_limit": var_genetic,
        "heritability_limit": heritability,
        "m_sel": m_sel,
        "v_sel": v_sel,
    }
