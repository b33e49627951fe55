"""Fit time of `qtm fit` on a 3-condition, 6-iteration, 1000-image dataset with 95 % intervals.

- cold, library: a fresh Python process imports fitting, reads the dataset and runs
  `fitting.driver.fit_observations` with the defaults (`auto` intervals: Laplace where the curvature is
  adequate and the profile of every r1 and r2; 8 starts; bands from 1000 draws); the time of the fit call
  (compilation included) and of the whole process are reported;
- cold, CLI: the `qtm fit PATH --json --out fit.nc` console command in a subprocess, wall clock (target: under
  10 s), and its CPU time (user + system: what a quiet single core would need, since the
  wall clock on a shared machine includes waiting for a core);
- warm: the same library call again in one process (best of 3), then with Laplace intervals only (best of
  3), profile intervals for every parameter and the paired bootstrap (200 replicates).

The dataset comes from qtm's Monte Carlo (population 100,000, 1000 measured images per iteration).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from benchmarks.common import best_time, write_results

CONDITIONS = {"cfg7.5": (0.9, 0.02), "cfg2.5": (0.5, 0.09), "cfg1.0": (0.05, 0.6)}
SHARED = {"mu0": 0.3, "sigma_g0": 0.05, "sigma_env": 0.05}
NUM_ITERATIONS = 6
NUM_IMAGES = 1000

_COLD_LIBRARY = """
import time
start = time.perf_counter()
import jax
jax.config.update("jax_enable_x64", True)
from fitting.driver import FitConfig, fit_observations
from fitting.observations import load_observations
imported = time.perf_counter()
obs = load_observations({path!r})
result = fit_observations(obs, FitConfig(), key=jax.random.key(0))
done = time.perf_counter()
print(done - imported, done - start)
"""


def _write_dataset(path: Path) -> None:
    import xarray as xr

    from qtm.montecarlo import simulate_population
    from qtm.params import TraitParams

    values = []
    for seed, (r1, r2) in enumerate(CONDITIONS.values()):
        sim = simulate_population(TraitParams(r1=r1, r2=r2, **SHARED), NUM_ITERATIONS, population=100_000,
                                  replicates=1, key=jax.random.key(seed), return_individuals=True)
        values.append(np.asarray(sim.genetic_values)[0, :, :NUM_IMAGES])
    x = np.stack(values)
    x[:, 0] = x[0, 0]
    ds = xr.Dataset({"hf_power": (("condition", "iteration", "image"), x)},
                    coords={"condition": list(CONDITIONS), "iteration": np.arange(NUM_ITERATIONS + 1),
                            "image": np.arange(NUM_IMAGES)}, attrs={"schema_version": 1})
    ds.to_netcdf(path, engine="h5netcdf")


def main() -> None:
    jax.config.update("jax_enable_x64", True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "metrics.nc"
        _write_dataset(path)

        proc = subprocess.run([sys.executable, "-c", _COLD_LIBRARY.format(path=str(path))], capture_output=True,
                              text=True, env=env, check=True)
        cold_fit, cold_process = (float(v) for v in proc.stdout.split())

        qtm = Path(sys.executable).with_name("qtm")
        command = [str(qtm)] if qtm.exists() else [sys.executable, "-m", "qtm"]
        start, usage = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(command + ["fit", str(path), "--json", "--out", str(Path(tmp) / "fit.nc")],
                              capture_output=True, text=True, env=env, check=True)
        cold_cli = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cold_cli_cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
        json.loads(proc.stdout)

        from fitting.driver import FitConfig, fit_observations
        from fitting.observations import load_observations

        obs = load_observations(path)
        fit_observations(obs, FitConfig(), key=jax.random.key(0))
        warm = best_time(lambda: fit_observations(obs, FitConfig(), key=jax.random.key(0)))
        warm_laplace = best_time(lambda: fit_observations(obs, FitConfig(interval="laplace"),
                                                          key=jax.random.key(0)))
        fit_observations(obs, FitConfig(interval="profile"), key=jax.random.key(0))
        warm_profile = best_time(lambda: fit_observations(obs, FitConfig(interval="profile"),
                                                          key=jax.random.key(0)), repeats=1)
        warm_bootstrap = best_time(lambda: fit_observations(obs, FitConfig(interval="bootstrap"),
                                                            key=jax.random.key(0)), repeats=1)
    write_results("fit", {
        "dataset": f"{len(CONDITIONS)} conditions x {NUM_ITERATIONS + 1} iterations x {NUM_IMAGES} images",
        "cold_library_fit_s": round(cold_fit, 3),
        "cold_library_process_s": round(cold_process, 3),
        "cold_cli_s": round(cold_cli, 3),
        "cold_cli_cpu_s": round(cold_cli_cpu, 3),
        "warm_default_s": round(warm, 4),
        "warm_laplace_s": round(warm_laplace, 4),
        "warm_profile_s": round(warm_profile, 3),
        "warm_bootstrap_200_s": round(warm_bootstrap, 3),
        "load_average_1min": round(os.getloadavg()[0], 2),
    })


if __name__ == "__main__":
    main()
