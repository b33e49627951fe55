"""Data with known parameters for the coverage studies (docs/model.md sections 5 and 6).

`independent_draws`: the n images of iteration k are independent Gaussian draws with the recursion's mean
and V_G,k (the observation model of `fitting.observation_models.IndependentDraws`).

`shared_origin_chains`: chains from qtm's finite-population Monte Carlo in which every condition starts
from ONE iteration-0 sample D_0, as a real chain does (`qtm.montecarlo.simulate_shared_origin`: each
condition selects from the same D_0 with its own window, then draws its own individuals). All N images of
every iteration are measured (their genetic values, docs/model.md section 6).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Truth:
    """Known parameters of a study: per-condition (r1, r2) and the shared mu0, sigma_g0, sigma_env."""

    conditions: tuple[tuple[str, float, float], ...] = (("c0", 0.5, 0.02), ("c1", 0.3, 0.1),
                                                        ("c2", 0.05, 0.4))
    mu0: float = 0.4
    sigma_g0: float = 0.05
    sigma_env: float = 0.1

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c[0] for c in self.conditions)

    def params(self, r1: float, r2: float):
        from qtm.params import TraitParams

        return TraitParams(r1=r1, r2=r2, mu0=self.mu0, sigma_g0=self.sigma_g0, sigma_env=self.sigma_env)


def independent_draws(truth: Truth, *, num_images: int, num_iterations: int, seed: int) -> np.ndarray:
    """(C, K+1, N) phenotypes: independent draws around the recursion; iteration 0 shared."""
    from qtm.recursion import trajectory

    rng = np.random.default_rng(seed)
    x0 = truth.mu0 + truth.sigma_g0 * rng.standard_normal(num_images)
    out = []
    for _, r1, r2 in truth.conditions:
        traj = trajectory(truth.params(r1, r2), num_iterations)
        mean = np.asarray(traj.mean)[1:, None]
        sd = np.sqrt(np.asarray(traj.var_genetic))[1:, None]
        later = mean + sd * rng.standard_normal((num_iterations, num_images))
        out.append(np.concatenate([x0[None], later]))
    return np.stack(out)


def shared_origin_chains(truth: Truth, *, num_images: int, num_iterations: int, seed: int) -> np.ndarray:
    """(C, K+1, N) genetic values of chains that share D_0 (module docstring)."""
    import jax
    import jax.numpy as jnp

    from qtm.montecarlo import simulate_shared_origin

    r1 = jnp.array([c[1] for c in truth.conditions])
    r2 = jnp.array([c[2] for c in truth.conditions])
    sim = simulate_shared_origin(truth.params(r1, r2), num_iterations, population=num_images,
                                 key=jax.random.key(seed), return_individuals=True)
    x = np.array(sim.genetic_values)
    assert np.all(x[:, 0] == x[0, 0]), "iteration 0 must be the same D_0 for every condition"
    return x
