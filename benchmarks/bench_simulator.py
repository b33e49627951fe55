"""Simulator throughput: the vmapped moment recursion and the finite-population Monte Carlo.

- recursion: 1e5 parameter sets x 100 iterations under `jax.vmap`, cold (first call, compilation
  included) and warm (best of 3), hard and soft selection;
- Monte Carlo: individual-iterations per second at N = 1e4, 1e5, 1e6 (few replicates and iterations, so
  that the whole stays under about two minutes on a laptop CPU), and the ratio of its time to the time of
  only drawing the same random numbers with the same key handling (target <= 2).
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import best_time, write_results
from qtm.montecarlo import _materialize, simulate_population
from qtm.params import TraitParams
from qtm.recursion import trajectory


def _recursion_figures(num_sets: int = 100_000, num_iterations: int = 100) -> dict[str, float]:
    rng = np.random.default_rng(0)
    r1 = rng.uniform(0.0, 0.9, num_sets)
    r2 = rng.uniform(0.0, 1.0, num_sets) * (0.99 - r1)
    figures: dict[str, float] = {}
    for label, tail_rate in (("hard", np.full(num_sets, np.inf)), ("soft", rng.uniform(0.01, 100.0, num_sets))):
        base = TraitParams()
        batch = (jnp.asarray(r1), jnp.asarray(r2), jnp.asarray(tail_rate))

        def one(a, b, lam):
            return trajectory(dataclasses.replace(base, r1=a, r2=b, tail_rate=lam), num_iterations).mean

        # a fresh jit(vmap(...)) per case, so that the first call pays the compilation
        fn = jax.jit(jax.vmap(one))
        start = time.perf_counter()
        jax.block_until_ready(fn(*batch))
        cold = time.perf_counter() - start
        warm = best_time(lambda: jax.block_until_ready(fn(*batch)), repeats=3)
        figures[f"recursion_{label}_{num_sets:.0e}x{num_iterations}_cold_s"] = round(cold, 4)
        figures[f"recursion_{label}_{num_sets:.0e}x{num_iterations}_warm_s"] = round(warm, 4)
    return figures


def _draws_only(population: int, replicates: int, num_iterations: int, soft: bool):
    """The same random numbers as `simulate_population` (same key derivation), and nothing else.

    `anchor` is any non-NaN scalar (it keeps the materialization a runtime conditional, as in the
    simulation)."""

    @jax.jit
    def run(key, anchor):
        def one(rep_key):
            def body(acc, t):
                key_x, key_sel, _ = jax.random.split(jax.random.fold_in(rep_key, t), 3)
                # drawn into memory the same way as the simulation does (XLA:CPU runs that elementwise
                # loop on all cores; a draw fused into a reduction runs on one), then summed
                x = _materialize(lambda: jax.random.normal(key_x, (population,), jnp.float64), anchor)
                acc = acc + jnp.sum(x)
                if soft:
                    acc = acc + jnp.sum(jax.random.uniform(key_sel, (population,), jnp.float64))
                return acc, None

            acc, _ = jax.lax.scan(body, jnp.zeros((), jnp.float64), jnp.arange(num_iterations))
            return acc

        return jax.vmap(one)(jax.random.split(key, replicates))

    return run


def _montecarlo_figures() -> dict[str, float]:
    figures: dict[str, float] = {}
    cases = [  # (label, N, replicates, iterations, params)
        ("hard", 10_000, 16, 20, TraitParams()),
        ("hard", 100_000, 4, 20, TraitParams()),
        ("hard", 1_000_000, 2, 10, TraitParams()),
        ("soft", 100_000, 4, 20, TraitParams(tail_rate=0.1)),
    ]
    key = jax.random.key(0)
    for label, n, reps, k, params in cases:
        def mc(params=params, n=n, reps=reps, k=k):
            return jax.block_until_ready(
                simulate_population(params, k, population=n, replicates=reps, key=key).mean)

        draws = _draws_only(n, reps, k, soft=label == "soft")
        start = time.perf_counter()
        mc()
        cold = time.perf_counter() - start
        jax.block_until_ready(draws(key, 0.25))
        # alternate the two measurements so that load from other processes hits both alike
        t_mc, t_draw = math.inf, math.inf
        for _ in range(3):
            t_mc = min(t_mc, best_time(mc, repeats=1))
            t_draw = min(t_draw, best_time(lambda: jax.block_until_ready(draws(key, 0.25)), repeats=1))
        name = f"montecarlo_{label}_N{n:.0e}"
        figures[f"{name}_individual_iterations_per_s"] = round(n * reps * k / t_mc)
        figures[f"{name}_time_s ({reps} replicates x {k} iterations)"] = round(t_mc, 4)
        figures[f"{name}_cold_s"] = round(cold, 3)
        figures[f"{name}_ratio_to_random_draws"] = round(t_mc / t_draw, 3)
    return figures


def main() -> None:
    jax.config.update("jax_enable_x64", True)  # the benchmark is an entry point, like the CLI
    figures = {"devices": ", ".join(str(d) for d in jax.devices())}
    figures.update(_recursion_figures())
    figures.update(_montecarlo_figures())
    write_results("simulator", figures)


if __name__ == "__main__":
    main()
