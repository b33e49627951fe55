"""How the measured cells meet the recursion (docs/model.md section 6): one object per observation model.

`IndependentDraws` (the default): the n images of iteration k are independent draws around the
recursion's trajectory, so every cell contributes its exact term `fitting.model.cell_nll` (xbar normal,
s^2 scaled chi-square) and the sampling variance of an observed mean is V_k / n_k.

`Chain` (`--drift`): the images of a chain ARE its population, so the realized trajectory drifts around the
recursion and a condition's per-iteration statistics are jointly normal with the finite-population
covariance of `qtm.finite_population` (`fitting.drift`). Iteration 0 keeps its cell term.

Each object gives the negative log-likelihood of the cells given the natural parameters and the cell terms,
the variance of an observed mean (for the prediction band, expressed as an equivalent number of images),
and its goodness-of-fit statistics, so that the driver and the objective call methods instead of branching
on the mode. Both are frozen dataclasses (hashable: they ride in the static `Layout` under jit).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class IndependentDraws:
    """Cells independent given the parameters (module docstring)."""

    name: str = "independent"
    #: a pilot fit of the default model is not needed to start the optimizer
    needs_pilot: bool = False

    def nll(self, table, terms, data, layout):
        """Sum of the cells' exact terms `terms` (fitting.model.cell_nll, one per cell)."""
        return jnp.sum(terms)

    def band_images(self, problem, u, observed) -> np.ndarray:
        """Number of images whose mean has the sampling variance of an observed mean: n itself."""
        return observed["num_images"]

    def goodness_of_fit(self, problem, u, observed, prediction, iterations, conditions):
        from fitting.forecast import goodness_of_fit

        return goodness_of_fit(observed, prediction, iterations, conditions)


@dataclasses.dataclass(frozen=True)
class Chain:
    """A chain's own finite-population drift in the likelihood (`fitting.drift`).

    population: images generated per iteration when only a subset is measured (None = all measured)."""

    population: int | None = None
    name: str = "chain"
    #: far from the optimum the drift likelihood has spurious stalls; the default model's optimum starts it
    needs_pilot: bool = True

    def nll(self, table, terms, data, layout):
        from fitting.drift import drift_nll

        return jnp.sum(jnp.where(data.iteration == 0, terms, 0.0)) + drift_nll(
            table, data, num_iterations=layout.num_iterations, mutation_mode=layout.mutation_mode,
            variance=layout.variance, population=self.population)

    def band_images(self, problem, u, observed) -> np.ndarray:
        """V_k / Sigma_kk: the marginal variance of an observed mean under drift as a number of images."""
        from fitting.drift import observed_mean_variance

        var_mean, var_obs = observed_mean_variance(problem, u, observed["num_images"])
        return var_obs / var_mean

    def goodness_of_fit(self, problem, u, observed, prediction, iterations, conditions):
        from fitting.drift import goodness_of_fit

        return goodness_of_fit(problem, u, observed, iterations)


def observation_model(drift: bool, population: int | None = None) -> IndependentDraws | Chain:
    """The observation model a spec names (`ModelSpec.drift`, `ModelSpec.population`)."""
    return Chain(population) if drift else IndependentDraws()
