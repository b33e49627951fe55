"""Coverage of the 95 % Laplace intervals over many simulated data sets (slow: `make test-slow`).

Setting: the three conditions of fit_testdata (r1, r2 = (0.9, 0.02), (0.5, 0.09), (0.05, 0.6)), shared
mu0 = 0.3, sigma_g0 = 0.05, sigma_env = 0.05, iterations 0-5, 1000 measured images per iteration. Each seed
gives 9 free entries (r1, r2 per condition and the 3 shared ones); coverage is pooled over entries and seeds.

Two data sources:
- `model`: independent Gaussian draws with the recursion's mean and V_G at every iteration: exactly the
  fit's observation model (MODEL.md section 6), so the intervals must cover 95 %;
- `montecarlo`: qtm's finite-population Monte Carlo with a population of 100,000 of which 1000 are
  measured. The fit's model is the deterministic recursion (the N -> infinity limit, MODEL.md section 5);
  the chain's own drift (a finite selected sample sets the next iteration's mean and variance) is not in
  the likelihood, so coverage falls a little short (measured 0.917 over 100 seeds), and far short when the
  whole population is measured (N = 1000 images: 0.43 over 50 seeds). The drift-aware likelihood
  (`--drift`, fitting/drift.py) is the model for that case; its coverage study is in test_fit_drift.py.
"""

import jax
import numpy as np
import pytest

from tests.fitting.testdata import TRUTH_CONDITIONS, TRUTH_SHARED, montecarlo_phenotypes, recursion_phenotypes
from fitting.driver import FitConfig, fit_observations
from fitting.observations import from_phenotypes


def coverage(num_seeds: int, *, source: str, population: int = 100_000, num_images: int = 1000,
             num_iterations: int = 5):
    """Per-entry hit rates (9,) and the pooled rate of the truth falling inside the 95 % intervals."""
    truth = np.array([[r1, r2, np.inf, 0.0, TRUTH_SHARED["mu0"], TRUTH_SHARED["sigma_g0"],
                       TRUTH_SHARED["sigma_env"]] for r1, r2 in TRUTH_CONDITIONS.values()])
    hits = []
    for seed in range(num_seeds):
        if source == "model":
            x = recursion_phenotypes(TRUTH_CONDITIONS, TRUTH_SHARED, num_iterations=num_iterations,
                                     num_images=num_images, seed=1000 + seed)
        else:
            x = montecarlo_phenotypes(TRUTH_CONDITIONS, TRUTH_SHARED, num_iterations=num_iterations,
                                      num_images=num_images, population=population, seed=1000 + seed)
        obs = from_phenotypes(list(TRUTH_CONDITIONS), np.arange(num_iterations + 1), x)
        result = fit_observations(obs, FitConfig(num_starts=2, num_draws=16), key=jax.random.key(seed))
        inside = (result.lower <= truth) & (truth <= result.upper)
        # one entry per free parameter: r1, r2 of each condition, then the shared ones once
        hits.append(np.concatenate([inside[:, :2].ravel(), inside[0, 4:]]))
    hits = np.array(hits)
    return hits.mean(axis=0), float(hits.mean())


@pytest.mark.slow
def test_laplace_intervals_cover_95_percent_under_the_observation_model():
    per_entry, pooled = coverage(200, source="model")
    print(f"model draws: coverage pooled {pooled:.3f}; per entry {np.round(per_entry, 3).tolist()}")
    # 1800 outcomes: the binomial sd at 0.95 is 0.005.
    assert 0.935 <= pooled <= 0.965
    assert np.all(per_entry >= 0.9)


@pytest.mark.slow
def test_laplace_coverage_on_monte_carlo_chains():
    per_entry, pooled = coverage(100, source="montecarlo")
    print(f"Monte Carlo (population 1e5): coverage pooled {pooled:.3f}; per entry "
          f"{np.round(per_entry, 2).tolist()}")
    # Slightly below 95 % from the unmodelled finite-population drift (module docstring).
    assert 0.88 <= pooled <= 0.98
    assert np.all(per_entry >= 0.8)
