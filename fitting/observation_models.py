"""How the measured cells meet the recursion (docs/model.md section 6): one object per observation model.

`IndependentDraws` (the default): the n images of iteration k are independent draws around the
recursion's trajectory, so every cell contributes its exact term `fitting.model.cell_nll` (xbar normal,
s^2 scaled chi-square) and the sampling variance of an observed mean is V_k / n_k.

`Chain` (`--drift`): the images of a chain ARE its population, so the realized trajectory drifts around the
recursion, and all conditions start from one D_0: the per-iteration statistics of all conditions are jointly
normal with the finite-population covariance of `qtm.finite_population` (cross-condition terms from the
shared D_0), fitted by generalized least squares with that covariance at a pilot estimate (`fitting.drift`).

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

    def prepare(self, problem, table):
        """Nothing to precompute at a pilot."""
        return None

    def nll(self, table, terms, data, layout, pilot):
        """Sum of the cells' exact terms `terms` (fitting.model.cell_nll, one per cell); no pilot used."""
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
    #: the covariance is evaluated at a pilot estimate, iterated to a fixed point (`fitting.drift`); the
    #: independent-draws fit is the first pilot
    needs_pilot: bool = True

    def prepare(self, problem, table):
        """The whitening of the shared-D_0 covariance at the pilot `table` (`fitting.drift.gls_weights`)."""
        from fitting.drift import gls_weights

        return gls_weights(table, problem.data, problem.layout)

    def nll(self, table, terms, data, layout, pilot):
        """Generalized least squares with the covariance held at the pilot (`fitting.drift`)."""
        from fitting.drift import chain_gls_nll

        return chain_gls_nll(table, pilot, data, layout)

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
