"""Synthetic results datasets for the fit tests, written with plain xarray (the results contract)."""

from __future__ import annotations

import numpy as np
import xarray as xr

TRUTH_SHARED = {"mu0": 0.3, "sigma_g0": 0.05, "sigma_env": 0.05}
TRUTH_CONDITIONS = {"cfg7.5": (0.9, 0.02), "cfg2.5": (0.5, 0.09), "cfg1.0": (0.05, 0.6)}


def results_dataset(phenotypes: np.ndarray, conditions, *, schema_version=1) -> xr.Dataset:
    """A minimal metrics.nc: hf_power (condition, iteration, image) plus schema_version."""
    num_c, num_k, num_i = phenotypes.shape
    ds = xr.Dataset(
        {"hf_power": (("condition", "iteration", "image"), phenotypes)},
        coords={"condition": list(conditions), "iteration": np.arange(num_k), "image": np.arange(num_i)},
    )
    if schema_version is not None:
        ds.attrs["schema_version"] = schema_version
    return ds


def summary_dataset(phenotypes: np.ndarray, conditions) -> xr.Dataset:
    """The summary-only trio computed from per-image phenotypes (sample sd, ddof 1)."""
    num_k = phenotypes.shape[1]
    n = np.isfinite(phenotypes).sum(-1)
    ds = xr.Dataset(
        {"hf_power_mean": (("condition", "iteration"), np.nanmean(phenotypes, -1)),
         "hf_power_std": (("condition", "iteration"), np.nanstd(phenotypes, -1, ddof=1)),
         "num_images": (("condition", "iteration"), n)},
        coords={"condition": list(conditions), "iteration": np.arange(num_k)},
        attrs={"schema_version": 1},
    )
    return ds


def montecarlo_phenotypes(conditions: dict, shared: dict, *, num_iterations: int, num_images: int,
                          population: int, seed: int, observe: str = "genetic",
                          extra: dict | None = None) -> np.ndarray:
    """Per-image phenotypes (C, K+1, num_images) of chains from qtm's finite-population Monte Carlo that
    share one D_0, as the conditions of a real chain do (`qtm.montecarlo.simulate_shared_origin`).

    Each condition is a chain of `population` individuals; `num_images` of them are measured at every
    iteration (the first ones: individuals are exchangeable). Observed values are the genetic values
    (docs/model.md section 6, default mapping) or the phenotypes. Iteration 0 is the same sample for all.
    `extra`: further TraitParams fields for every condition (e.g. a finite tail_rate: soft selection).
    """
    import jax
    import jax.numpy as jnp

    from qtm.montecarlo import simulate_shared_origin
    from qtm.params import TraitParams

    r1, r2 = (jnp.array([r[i] for r in conditions.values()]) for i in (0, 1))
    sim = simulate_shared_origin(TraitParams(r1=r1, r2=r2, **shared, **(extra or {})), num_iterations,
                                 population=population, key=jax.random.key(seed), return_individuals=True)
    values = sim.genetic_values if observe == "genetic" else sim.phenotypes
    return np.array(values)[:, :, :num_images]


def recursion_phenotypes(conditions: dict, shared: dict, *, num_iterations: int, num_images: int,
                         seed: int, extra: dict | None = None) -> np.ndarray:
    """Independent Gaussian draws with qtm's recursion mean and V_G per iteration (the fit's own model)."""
    from qtm.params import TraitParams
    from qtm.recursion import trajectory

    rng = np.random.default_rng(seed)
    out = []
    for r1, r2 in conditions.values():
        traj = trajectory(TraitParams(r1=r1, r2=r2, **shared, **(extra or {})), num_iterations)
        mean = np.asarray(traj.mean)[:, None]
        sd = np.sqrt(np.asarray(traj.var_genetic))[:, None]
        out.append(mean + sd * rng.standard_normal((num_iterations + 1, num_images)))
    x = np.stack(out)
    x[:, 0] = x[0, 0]
    return x


def strict_loads(text: str):
    """json.loads that refuses NaN and Infinity (strict JSON, as scripts read it)."""
    import json

    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def selection_experiment(windows: dict[str, tuple[float, float]], *, num_iterations: int = 3,
                         num_images: int = 400, mu0: float = 0.3, sd: float = 0.05, h2: float = 0.5,
                         seed: int = 0) -> xr.Dataset:
    """A hand-written metrics.nc of a chain with reference images and a known truncation: per condition
    (name -> (r1, r2)) and iteration k >= 1, hf_power_reference ~ N(mu_k, sd^2) and hf_power = that law
    truncated at its r1 and 1 - r2 quantiles (scipy.stats.truncnorm); the mean moves by h2 times the
    expected selection differential, mu_{k+1} = mu_k + h2 sd (phi(a) - phi(b)) / (1 - r1 - r2) (the
    breeder's equation with the truncated normal's mean). Iteration 0 holds hf_power ~ N(mu0, sd^2) only."""
    from scipy import stats

    rng = np.random.default_rng(seed)
    guided = np.zeros((len(windows), num_iterations + 1, num_images))
    reference = np.full_like(guided, np.nan)
    guided[:, 0] = rng.normal(mu0, sd, num_images)
    for c, (r1, r2) in enumerate(windows.values()):
        a, b = stats.norm.ppf(r1), stats.norm.ppf(1 - r2)
        mu = mu0
        for k in range(1, num_iterations + 1):
            reference[c, k] = rng.normal(mu, sd, num_images)
            guided[c, k] = stats.truncnorm.rvs(a, b, loc=mu, scale=sd, size=num_images, random_state=rng)
            mu += h2 * sd * (stats.norm.pdf(a) - stats.norm.pdf(b)) / (1 - r1 - r2)
    dims = ("condition", "iteration", "image")
    return xr.Dataset({"hf_power": (dims, guided), "hf_power_reference": (dims, reference)},
                      coords={"condition": list(windows), "iteration": np.arange(num_iterations + 1),
                              "image": np.arange(num_images)}, attrs={"schema_version": 1})
