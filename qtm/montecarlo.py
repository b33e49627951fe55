"""The finite-population Monte Carlo (docs/model.md section 5).

Each replicate runs a chain of N individuals. At iteration t, from the state (mu_t, V_G,t):

1. draw N phenotypes x ~ N(mu_t, V_P,t), V_P,t = V_G,t + V_E (docs/model.md draws genetic values
   g ~ N(mu_t, V_G,t) and adds N(0, V_E) noise; x has exactly this law, and the next state depends on x
   only, so g is drawn, from its conditional law given x, only when `return_individuals=True`; the
   trajectory is then the same as without it);
2. select: hard (tail_rate = inf) keeps the individuals between the empirical r1 and 1 - r2 quantiles,
   i.e. drops the round(r1 N) smallest and the round(r2 N) largest; soft keeps each individual with
   probability w(z) (docs/model.md section 2), z = (x - mean(x)) / std(x) standardized by the sample;
3. estimate the next state from the selected sample as in section 3, with the realized selection
   differential S = mean(selected) - mean(x) and the model's heritability h2_t (Eq. 5/16 in `paper`
   mode, V_G / V_P in `additive` mode):
       mu_{t+1}  = mean(x) + h2_t S                  (breeder's equation, Eq. 6)
       V_G,{t+1} = var(selected) [+ V_M in additive mode]   (Eq. 11)
   var(selected) is the maximum-likelihood variance (divisor n_selected, `ddof=0`) by default, so that
   with r1 = r2 = 0 and V_E = 0 (h2 = 1) this is the Gaussian refitting loop of Shumailov et al. (2023)
   with E[V_t] = ((N - 1) / N)^t V_0; `ddof=1` gives the unbiased sample variance instead.

If no individual is selected (possible only with soft selection and a tiny N) the next state is NaN.

Speed: no sort and no top_k. The hard cutoffs are found from counts alone: a safeguarded Newton
iteration on #{x < c}, started at the known quantile of N(mu_t, V_P,t) (from which x was drawn), with
regula falsi as the fallback (see `_hard_cutoffs`); each step is one compare-and-count pass over the data
and about six steps suffice. The selected sample's moments then come from masks.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtri

from qtm import mutation
from qtm.params import TraitParams, require_x64
from qtm.selection import selection_window


class PopulationTrajectory(NamedTuple):
    """Monte Carlo moments, shapes (replicates, K+1); index t is iteration t.

    `mean` and `var_genetic` are the state (mu_t, V_G,t) from which iteration t's individuals are drawn
    (for t >= 1: estimated from iteration t-1's selected sample); `var_phenotype` = V_G,t + V_E.
    `phenotypes` and `genetic_values` (replicates, K+1, N) are filled when `return_individuals=True`.
    `selection_differential[t]` is the realized S_t = mean(selected) - mean(x) of iteration t and
    `response[t]` = mean[t+1] - mean[t] the realized change of the mean (h2_t S_t plus the sampling drift
    of mean(x)); both are NaN at t = K, whose selection is not simulated.
    """

    mean: jax.Array
    var_genetic: jax.Array
    var_phenotype: jax.Array
    phenotypes: jax.Array | None = None
    genetic_values: jax.Array | None = None
    selection_differential: jax.Array | None = None
    response: jax.Array | None = None


_WIDE_SD = 50.0       # starting bracket, in phenotypic standard deviations (no float64 normal draw reaches it)
_MAX_STEPS = 200


def _hard_cutoffs(x: jax.Array, mu: jax.Array, sd: jax.Array, k_low: jax.Array, k_high: jax.Array,
                  ) -> tuple[jax.Array, jax.Array]:
    """Cutoffs (c_low, c_high) with #{x < c_low} = k_low and #{x >= c_high} = k_high, without sorting.

    x was drawn from N(mu, sd^2), so the count #{x < c} is close to N Phi((c - mu) / sd). Each cutoff is
    found by a safeguarded Newton iteration on that count: start at the quantile of N(mu, sd^2), step by
    (target + 1/2 - count) / (N pdf(c)) (aiming at the middle of the gap between the two order statistics),
    and fall back to regula falsi on the bracket [lo, hi] (#{x < lo} < target < #{x < hi}, counts known)
    whenever a step would leave it. Each step is one compare-and-count pass over x per cutoff; the count
    error shrinks from O(sqrt(N)) roughly like e -> sqrt(e), then the last order-statistic gap takes a step
    or two: about six passes on average (measured at N = 1e4 and 1e6). k = 0 gives -inf / +inf.
    """
    n = x.shape[-1]
    target = jnp.stack([k_low, n - k_high]).astype(x.dtype)   # #{x < c} wanted at each cutoff
    p = jnp.clip((target + 0.5) / n, 0.5 / n, 1.0 - 0.5 / n)
    cut = mu + sd * ndtri(p)
    lo = jnp.broadcast_to(mu - _WIDE_SD * sd, (2,))
    hi = jnp.broadcast_to(mu + _WIDE_SD * sd, (2,))
    done = jnp.stack([k_low == 0, k_high == 0])

    def counts(c: jax.Array) -> jax.Array:
        # two plain reductions (a stacked or broadcast form runs several times slower on XLA:CPU)
        return jnp.stack([jnp.sum(x < c[0]), jnp.sum(x < c[1])]).astype(x.dtype)

    def cond(carry):
        *_, done, it = carry
        return jnp.logical_and(jnp.logical_not(jnp.all(done)), it < _MAX_STEPS)

    def body(carry):
        c, lo, hi, cnt_lo, cnt_hi, done, it = carry
        cnt = counts(c)
        hit = cnt == target
        below = cnt < target
        above = cnt > target
        lo, cnt_lo = jnp.where(below, c, lo), jnp.where(below, cnt, cnt_lo)
        hi, cnt_hi = jnp.where(above, c, hi), jnp.where(above, cnt, cnt_hi)
        z = (c - mu) / sd
        density = n * jnp.exp(-0.5 * z * z) / (math.sqrt(2.0 * math.pi) * sd)
        newton = c + (target + 0.5 - cnt) / jnp.maximum(density, 1e-300)
        # regula falsi inside the bracket: strictly between lo and hi since cnt_lo < target < cnt_hi
        falsi = lo + (target + 0.5 - cnt_lo) / jnp.maximum(cnt_hi - cnt_lo, 1.0) * (hi - lo)
        inside = jnp.logical_and(newton > lo, newton < hi)
        proposal = jnp.where(inside, newton, falsi)
        finished = done | hit
        c = jnp.where(finished, c, proposal)
        # ties only: after _MAX_STEPS settle on hi, where #{x < hi} >= target
        c = jnp.where(jnp.logical_and(jnp.logical_not(finished), it == _MAX_STEPS - 1), hi, c)
        return c, lo, hi, cnt_lo, cnt_hi, finished, it + 1

    cnt_lo = jnp.zeros(2, x.dtype)
    cnt_hi = jnp.full(2, float(n), x.dtype)
    cut, _, _, _, _, _, _ = jax.lax.while_loop(cond, body, (cut, lo, hi, cnt_lo, cnt_hi, done, jnp.asarray(0)))
    return (jnp.where(k_low == 0, -jnp.inf, cut[0]), jnp.where(k_high == 0, jnp.inf, cut[1]))


def _materialize(make: Callable[[], jax.Array], anchor: jax.Array) -> jax.Array:
    """make() computed once into memory.

    XLA:CPU otherwise fuses the elementwise tail of the normal draws (erf_inv) into every pass that reads
    them and recomputes it there, which tripled the cost of an iteration. The output of a conditional
    cannot be fused into its consumers; the predicate `anchor == anchor` is true for every non-NaN anchor
    (a scalar parameter, so that vmapping over replicates keeps it a real conditional; a NaN parameter
    gives NaN phenotypes, as it would anyway).
    """
    shape = jax.eval_shape(make)
    return jax.lax.cond(anchor == anchor, make, lambda: jnp.full(shape.shape, jnp.nan, shape.dtype))


def _soft_weight(z: jax.Array, a: jax.Array, b: jax.Array, lam: jax.Array) -> jax.Array:
    """w(z) of docs/model.md section 2 (a = -inf / b = +inf allowed)."""
    below = jnp.where(z < a, lam * (a - z), 0.0)
    above = jnp.where(z > b, lam * (z - b), 0.0)
    return jnp.exp(-(below + above))


def _iteration(mu, var_genetic, params: TraitParams, key, population: int, ddof: int, hard: bool,
               want_individuals: bool):
    """One iteration of one replicate: (state_t, key) -> (state_{t+1}, S_t, individuals_t or None)."""
    n = population
    var_env = jnp.square(jnp.asarray(params.sigma_env, jnp.float64))
    var_mut = jnp.square(jnp.asarray(params.sigma_mut, jnp.float64))
    var_phenotype = var_genetic + var_env
    sd = jnp.sqrt(var_phenotype)
    key_x, key_sel, key_g = jax.random.split(key, 3)
    x = _materialize(lambda: mu + sd * jax.random.normal(key_x, (n,), jnp.float64), var_env)
    xbar = jnp.mean(x)
    if hard:
        k_low = jnp.round(jnp.asarray(params.r1, jnp.float64) * n)
        k_high = jnp.round(jnp.asarray(params.r2, jnp.float64) * n)
        c_low, c_high = _hard_cutoffs(x, mu, sd, k_low, k_high)
        keep = jnp.logical_and(x >= c_low, x < c_high)
    else:
        r1 = jnp.asarray(params.r1, jnp.float64)
        r2 = jnp.asarray(params.r2, jnp.float64)
        a, b = selection_window(r1, r2)
        s = jnp.sqrt(jnp.mean(jnp.square(x - xbar)))
        w = _soft_weight((x - xbar) / s, a, b, jnp.asarray(params.tail_rate, jnp.float64))
        keep = jax.random.uniform(key_sel, (n,), jnp.float64) < w
    # selected moments, shifted by mu for accuracy, in one pass
    d = jnp.where(keep, x - mu, 0.0)
    n_sel = jnp.sum(keep).astype(jnp.float64)
    sum1 = jnp.sum(d)
    sum2 = jnp.sum(d * d)
    sel_mean = mu + sum1 / n_sel
    sel_var = (sum2 - sum1 * sum1 / n_sel) / (n_sel - ddof)
    heritability = mutation.heritability(var_genetic, var_phenotype, var_mut, params.mutation_mode)
    next_var_genetic = mutation.next_var_genetic(sel_var, var_mut, params.mutation_mode)
    next_mean = xbar + heritability * (sel_mean - xbar)
    individuals = None
    if want_individuals:
        # g | x ~ N(mu + (V_G / V_P)(x - mu), V_G V_E / V_P): with x ~ N(mu, V_P) this makes g ~ N(mu, V_G)
        # and x - g ~ N(0, V_E) independent of g, as docs/model.md section 5 draws them.
        ratio = var_genetic / var_phenotype
        g = mu + ratio * (x - mu) + jnp.sqrt(ratio * var_env) * jax.random.normal(key_g, (n,), jnp.float64)
        individuals = (x, g)
    return (next_mean, next_var_genetic), sel_mean - xbar, individuals


def _check_sizes(params: TraitParams, num_iterations: int, population: int, replicates: int) -> None:
    if not isinstance(num_iterations, int) or num_iterations < 0:
        raise ValueError(f"num_iterations must be an integer >= 0; got {num_iterations!r}")
    if not isinstance(population, int) or population < 2:
        raise ValueError(f"population must be an integer >= 2; got {population!r}")
    if not isinstance(replicates, int) or replicates < 1:
        raise ValueError(f"replicates must be an integer >= 1; got {replicates!r}")
    try:
        r1, r2, lam = float(params.r1), float(params.r2), float(params.tail_rate)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return  # traced parameters: checked by the caller
    if math.isinf(lam) and population - round(r1 * population) - round(r2 * population) < 1:
        raise ValueError(f"population {population} is too small to keep anyone with r1 = {r1}, r2 = {r2}: "
                         "increase population")


def _chain(params, mu0, vg0, keys, *, population, return_individuals, ddof, hard):
    """One chain from the state (mu0, V_G,0), iteration t drawing with keys[t] (K+1 keys): means,
    V_G, realized S and response (K+1,), and the individuals (K+1, N) when asked for."""
    num_iterations = keys.shape[0] - 1

    def body(state, key_t):
        new_state, differential, individuals = _iteration(state[0], state[1], params, key_t, population, ddof,
                                                          hard, return_individuals)
        return new_state, (state, differential, individuals)

    final, (states, differential, individuals) = jax.lax.scan(body, (mu0, vg0), keys[:num_iterations])
    means = jnp.concatenate([states[0], final[0][None]])
    var_genetic = jnp.concatenate([states[1], final[1][None]])
    nan = jnp.full((1,), jnp.nan)
    differential = jnp.concatenate([differential, nan])
    response = jnp.concatenate([jnp.diff(means), nan])
    if not return_individuals:
        return means, var_genetic, differential, response, None, None
    _, _, last = _iteration(final[0], final[1], params, keys[num_iterations], population, ddof, hard, True)
    if num_iterations == 0:
        return means, var_genetic, differential, response, last[0][None], last[1][None]
    return (means, var_genetic, differential, response, jnp.concatenate([individuals[0], last[0][None]]),
            jnp.concatenate([individuals[1], last[1][None]]))


def _iteration_keys(key, first: int, last: int):
    """fold_in(key, t) for t = first .. last."""
    return jax.vmap(lambda t: jax.random.fold_in(key, t))(jnp.arange(first, last + 1))


@functools.partial(jax.jit, static_argnames=("num_iterations", "population", "replicates",
                                             "return_individuals", "ddof", "hard"))
def _simulate(params, key, *, num_iterations, population, replicates, return_individuals, ddof, hard):
    keys = jax.random.split(key, replicates)
    mu0 = jnp.asarray(params.mu0, jnp.float64)
    vg0 = jnp.square(jnp.asarray(params.sigma_g0, jnp.float64))
    var_env = jnp.square(jnp.asarray(params.sigma_env, jnp.float64))

    def one_replicate(rep_key):
        return _chain(params, mu0, vg0, _iteration_keys(rep_key, 0, num_iterations), population=population,
                      return_individuals=return_individuals, ddof=ddof, hard=hard)

    means, var_genetic, differential, response, phen, gen = jax.vmap(one_replicate)(keys)
    return PopulationTrajectory(means, var_genetic, var_genetic + var_env, phen, gen, differential, response)


def simulate_population(params: TraitParams, num_iterations: int, *, population: int, replicates: int,
                        key: jax.Array, return_individuals: bool = False, ddof: int = 0,
                        ) -> PopulationTrajectory:
    """Run `replicates` independent finite-population chains of `population` individuals for
    `num_iterations` iterations (module docstring; docs/model.md section 5). Replicates are vmapped; the
    iterations run in `jax.lax.scan`; the whole is jit-compiled (sizes static).

    Hard or soft selection follows `params.tail_rate` (inf = hard), which must therefore be concrete.
    `ddof` is the divisor offset of the selected sample's variance: 0 (maximum likelihood, default) or 1.
    """
    require_x64()
    _check_sizes(params, num_iterations, population, replicates)
    try:
        hard = math.isinf(float(params.tail_rate))
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise ValueError("simulate_population needs a concrete tail_rate (it decides hard or soft "
                         "selection); vmap over the other parameters instead") from None
    if ddof not in (0, 1):
        raise ValueError(f"ddof must be 0 (maximum likelihood) or 1 (unbiased); got {ddof!r}")
    return _simulate(params, key, num_iterations=num_iterations, population=population,
                     replicates=replicates, return_individuals=return_individuals, ddof=ddof, hard=hard)


@functools.partial(jax.jit, static_argnames=("num_iterations", "population", "return_individuals", "ddof",
                                             "hard"))
def _simulate_shared_origin(params, key, *, num_iterations, population, return_individuals, ddof, hard):
    shared_key, own_key = jax.random.split(key)
    num_c = jnp.shape(params.r1)[0]
    mu0 = jnp.asarray(params.mu0, jnp.float64) * jnp.ones(num_c)
    vg0 = jnp.square(jnp.asarray(params.sigma_g0, jnp.float64)) * jnp.ones(num_c)
    var_env = jnp.square(jnp.asarray(params.sigma_env, jnp.float64)) * jnp.ones(num_c)

    def one_condition(p, m0, v0, cond_key):
        # iteration 0 draws from the one shared key: the same D_0 for every condition; later ones its own
        keys = jnp.concatenate([jax.random.fold_in(shared_key, 0)[None],
                                _iteration_keys(cond_key, 1, num_iterations)])
        return _chain(p, m0, v0, keys, population=population, return_individuals=return_individuals,
                      ddof=ddof, hard=hard)

    leaves = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64) * jnp.ones(num_c), params)
    means, var_genetic, differential, response, phen, gen = jax.vmap(one_condition)(
        leaves, mu0, vg0, jax.random.split(own_key, num_c))
    return PopulationTrajectory(means, var_genetic, var_genetic + var_env[:, None], phen, gen, differential,
                                response)


def simulate_shared_origin(params: TraitParams, num_iterations: int, *, population: int, key: jax.Array,
                           return_individuals: bool = False, ddof: int = 0) -> PopulationTrajectory:
    """Chains of several conditions that start from ONE original sample D_0, as the conditions of a real
    chain do (docs/model.md section 5): `params` holds one value per condition in r1 and r2 (and any other
    per-condition leaf, shape (C,)); mu0, sigma_g0 and sigma_env are those of the shared D_0. Iteration 0's
    N individuals are drawn once (the same numbers for every condition) and each condition selects from them
    with its own window; iterations >= 1 draw each condition's own individuals. The result has the shape of
    `simulate_population`'s with the conditions in place of the replicates: (C, K+1) and (C, K+1, N)."""
    require_x64()
    num_c = int(jnp.shape(params.r1)[0]) if jnp.ndim(params.r1) else 0
    if num_c < 1:
        raise ValueError("simulate_shared_origin needs r1 (and r2) with one value per condition, shape (C,)")
    for name in ("mu0", "sigma_g0", "sigma_env"):
        if jnp.ndim(getattr(params, name)) != 0:
            raise ValueError(f"{name} belongs to the shared D_0: give one value, not one per condition")
    hard = bool(jnp.all(jnp.isinf(jnp.asarray(params.tail_rate))))
    for c in range(num_c):
        one = jax.tree_util.tree_map(lambda x: x[c] if jnp.ndim(x) else x, params)
        _check_sizes(one, num_iterations, population, 1)
    if ddof not in (0, 1):
        raise ValueError(f"ddof must be 0 (maximum likelihood) or 1 (unbiased); got {ddof!r}")
    return _simulate_shared_origin(params, key, num_iterations=num_iterations, population=population,
                                   return_individuals=return_individuals, ddof=ddof, hard=hard)
