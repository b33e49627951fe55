"""`qtm simulate`: the trait model's trajectory (MODEL.md section 3) and, with --population, the
finite-population Monte Carlo (section 5). A thin shell: build `TraitParams`, call the library, print,
write. Never imports torch."""

from __future__ import annotations

import math
import re
import shlex
from pathlib import Path
from typing import Annotated, Any

import typer

from qtm.cli_common import fail, print_json

_FLAGS = {
    "r1": "--r1", "r2": "--r2", "tail_rate": "--tail-rate", "sigma_mut": "--sigma-mut", "mu0": "--mu0",
    "sigma_g0": "--sigma-g0", "sigma_env": "--sigma-env", "mutation_mode": "--mutation-mode",
}
QUANTILES = (0.05, 0.5, 0.95)


def _flag_message(message: str) -> str:
    """Rewrite a TraitParams.validate message in terms of the command-line flags."""
    pattern = r"\b(" + "|".join(sorted(_FLAGS, key=len, reverse=True)) + r")\b"
    return re.sub(pattern, lambda m: _FLAGS[m.group(1)], message)


def simulate(
    r1: Annotated[float, typer.Option(help="Fraction truncated from the left (low) tail, in [0, 1).")] = 0.025,
    r2: Annotated[float, typer.Option(help="Fraction truncated from the right (high) tail, in [0, 1); "
                                           "r1 + r2 < 1.")] = 0.675,
    tail_rate: Annotated[float, typer.Option(help="Softness lambda of the selection tails per phenotypic sd; "
                                                  "inf = hard truncation.")] = math.inf,
    sigma_mut: Annotated[float, typer.Option(help="Mutation sd sigma_M (ReDiFine); 0 = none.")] = 0.0,
    mutation_mode: Annotated[str, typer.Option(help="paper (Eq. 16: h2 = V_G/(V_P+V_M)) or additive "
                                                    "(V_M added to the next V_G).")] = "paper",
    mu0: Annotated[float, typer.Option(help="Phenotype mean at iteration 0.")] = 0.027,
    sigma_g0: Annotated[float, typer.Option(help="Genetic sd at iteration 0.")] = 0.056,
    sigma_env: Annotated[float, typer.Option(help="Environmental sd sigma_E.")] = 0.25,
    iterations: Annotated[int, typer.Option(help="Number of iterations K (the output has K+1 rows).")] = 6,
    population: Annotated[int | None, typer.Option(
        help="Also run the finite-population Monte Carlo with N individuals.")] = None,
    replicates: Annotated[int | None, typer.Option(
        help="Monte Carlo replicates (default 100; needs --population).")] = None,
    seed: Annotated[int | None, typer.Option(help="Monte Carlo seed (default 0; needs --population).")
                    ] = None,
    out: Annotated[Path | None, typer.Option(help="Write the trajectory as netCDF (h5netcdf).")] = None,
    plot: Annotated[Path | None, typer.Option(help="Draw the trajectory to this image file.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of "
                                                             "tables.")] = False,
) -> None:
    """Simulate the quantitative-trait model of the Chain of Diffusion (defaults: the paper's, App. D.2.2).

    Prints a table per iteration (mean, V_G, V_P, h2, selection differential, response) and the
    asymptotes. With --population N it also runs R replicate chains of N individuals and shows the
    median and the 5-95 % range over replicates. --json prints {iteration, mean, var_genetic,
    var_phenotype, heritability, selection_differential, response (the recursion, lists of K+1), params,
    asymptotes} and, with --population, a "monte_carlo" object with per-iteration quantiles q05, q50, q95
    and the replicate mean of each variable.
    """
    from qtm.params import MUTATION_MODES, TraitParams

    if mutation_mode not in MUTATION_MODES:
        fail(f"--mutation-mode must be one of {', '.join(MUTATION_MODES)}; got {mutation_mode!r}")
    params = TraitParams(r1=r1, r2=r2, tail_rate=tail_rate, sigma_mut=sigma_mut, mu0=mu0, sigma_g0=sigma_g0,
                         sigma_env=sigma_env, mutation_mode=mutation_mode)
    try:
        params.validate()
    except ValueError as err:
        fail(_flag_message(str(err)))
    if iterations < 1:
        fail(f"--iterations must be >= 1; got {iterations}")
    if population is None:
        if replicates is not None or seed is not None:
            fail("--replicates and --seed set up the Monte Carlo: give --population N as well")
    else:
        replicates = 100 if replicates is None else replicates
        seed = 0 if seed is None else seed
        if population < 2:
            fail(f"--population must be >= 2; got {population}")
        if replicates < 1:
            fail(f"--replicates must be >= 1; got {replicates}")
        if seed < 0:
            fail(f"--seed must be >= 0; got {seed}")
        if math.isinf(tail_rate) and population - round(r1 * population) - round(r2 * population) < 1:
            fail(f"--population {population} keeps nobody with --r1 {r1} --r2 {r2}: increase --population")
    if out is not None and out.exists() and out.is_dir():
        fail(f"--out {out} is a directory; give a file name such as {out / 'trajectory.nc'}")

    import jax

    from qtm.dataset import population_dataset, provenance, trajectory_dataset, write_netcdf_atomic
    from qtm.recursion import asymptotes, trajectory

    command = _command_line(params, iterations, population, replicates, seed, out, plot, json_output)
    traj = trajectory(params, iterations)
    det = trajectory_dataset(params, traj, attrs=provenance(command=command))
    limits = asymptotes(params)

    mc = None
    if population is not None:
        from rich.console import Console

        from qtm.montecarlo import simulate_population

        with Console(stderr=True).status(f"Monte Carlo: {replicates} replicates x {population} individuals x "
                                         f"{iterations} iterations"):
            pop = simulate_population(params, iterations, population=population, replicates=replicates,
                                      key=jax.random.key(seed))
            jax.block_until_ready(pop.mean)
        mc = population_dataset(params, pop, attrs=provenance(seed=seed, command=command, population=population,
                                                              replicates=replicates))
        mc = mc.assign({
            f"recursion_{name}": det[name].assign_attrs(
                long_name=f"{det[name].attrs['long_name']} of the recursion (N = inf)")
            for name in ("mean", "var_genetic", "var_phenotype", "heritability", "selection_differential",
                         "response")})

    if out is not None:
        try:
            write_netcdf_atomic(mc if mc is not None else det, out)
        except OSError as err:
            fail(f"--out {out}: cannot write ({err.strerror or err})")
    if plot is not None:
        from qtm.plotting import plot_trajectory

        try:
            plot_trajectory(mc if mc is not None else det, plot, reference=det if mc is not None else None)
        except OSError as err:
            fail(f"--plot {plot}: cannot write ({err.strerror or err})")
        except ValueError as err:  # unknown image format
            fail(f"--plot {plot}: {err}")

    if json_output:
        print_json(_json_record(det, params, limits, mc))
        return
    _print_tables(det, limits, mc, params)
    console = _console()
    if out is not None:
        console.print(f"wrote {out}")
    if plot is not None:
        console.print(f"wrote {plot}")


def _command_line(params, iterations, population, replicates, seed, out, plot, json_output) -> str:
    """The fully resolved command line (for the provenance attrs), defaults included."""
    parts = ["qtm", "simulate"]
    for field, flag in _FLAGS.items():
        value = getattr(params, field)
        parts += [flag, value if isinstance(value, str) else f"{value:g}"]
    parts += ["--iterations", str(iterations)]
    if population is not None:
        parts += ["--population", str(population), "--replicates", str(replicates), "--seed", str(seed)]
    if out is not None:
        parts += ["--out", str(out)]
    if plot is not None:
        parts += ["--plot", str(plot)]
    if json_output:
        parts.append("--json")
    return " ".join(shlex.quote(p) for p in parts)


def _console():
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=120)


def _quantiles(values, qs) -> Any:
    """Quantiles over replicates (NaN where every replicate is NaN, without warnings)."""
    import warnings

    import numpy as np

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanquantile(values.transpose("replicate", ...).values, qs, axis=0)


def _finite_or_none(values) -> list[float | None]:
    return [float(v) if math.isfinite(float(v)) else None for v in values]


def _json_record(det, params, limits, mc) -> dict[str, Any]:
    record: dict[str, Any] = {"iteration": det["iteration"].values.tolist()}
    for name in ("mean", "var_genetic", "var_phenotype", "heritability", "selection_differential", "response"):
        record[name] = _finite_or_none(det[name].values)
    record["params"] = params.to_dict()
    record["params"]["tail_rate"] = None if math.isinf(params.tail_rate) else params.tail_rate
    record["params"]["iterations"] = int(det.sizes["iteration"] - 1)
    record["asymptotes"] = limits
    if mc is not None:
        block: dict[str, Any] = {"population": int(mc.attrs["population"]),
                                 "replicates": int(mc.sizes["replicate"]), "seed": int(mc.attrs["seed"])}
        for name in ("mean", "var_genetic", "var_phenotype", "heritability", "selection_differential",
                     "response"):
            values = mc[name]
            quantiles = _quantiles(values, QUANTILES)
            entry = {f"q{round(q * 100):02d}": _finite_or_none(quantiles[i]) for i, q in enumerate(QUANTILES)}
            entry["replicate_mean"] = _finite_or_none(values.mean("replicate").values)
            block[name] = entry
        record["monte_carlo"] = block
    return record


def _print_tables(det, limits, mc, params) -> None:
    from rich.table import Table

    console = _console()
    hard = math.isinf(params.tail_rate)
    title = (f"Moment recursion (N = inf): r1={params.r1:g}, r2={params.r2:g}, "
             + ("hard truncation" if hard else f"tail_rate={params.tail_rate:g}")
             + (f", sigma_mut={params.sigma_mut:g} ({params.mutation_mode})" if params.sigma_mut else ""))
    table = Table(title=title)
    for header in ("iteration", "mean", "V_G", "V_P", "h2", "selection diff.", "response"):
        table.add_column(header, justify="right", no_wrap=True)
    for t in range(det.sizes["iteration"]):
        row = det.isel(iteration=t)
        table.add_row(str(t), *(f"{float(row[name]):.6g}" for name in (
            "mean", "var_genetic", "var_phenotype", "heritability", "selection_differential", "response")))
    console.print(table)
    if limits is not None:
        direction = "upward" if limits["drift_per_iteration"] > 0 else (
            "downward" if limits["drift_per_iteration"] < 0 else "none")
        console.print(f"{limits['kind']}: mean drift per iteration {limits['drift_per_iteration']:.6g} "
                      f"({direction}); V_P -> {limits['var_phenotype_limit']:.6g}, "
                      f"V_G -> {limits['var_genetic_limit']:.6g}, h2 -> {limits['heritability_limit']:.6g} "
                      f"(m_sel = {limits['m_sel']:.6g}, v_sel = {limits['v_sel']:.6g})")
    else:
        console.print("No selection (v_sel = 1): V_G grows without bound; no asymptotes.")
    if mc is None:
        return
    table = Table(title=f"Monte Carlo: N = {mc.attrs['population']}, {mc.sizes['replicate']} replicates, "
                        f"seed {mc.attrs['seed']} (median over replicates, and the 5-95 % range)")
    names = ("mean", "var_genetic", "heritability", "selection_differential", "response")
    headers = ("mean", "mean 5-95 %", "V_G", "V_G 5-95 %", "h2", "sel. diff.", "response")
    table.add_column("iteration", justify="right", no_wrap=True)
    for header in headers:
        table.add_column(header, justify="right", no_wrap=True)
    quant = {name: _quantiles(mc[name], QUANTILES) for name in names}

    def fmt(x: float) -> str:
        return f"{x:.4g}" if math.isfinite(x) else "-"

    for t in range(mc.sizes["iteration"]):
        cells = []
        for name in names:
            lo, med, hi = quant[name][:, t]
            cells.append(fmt(med))
            if name in ("mean", "var_genetic"):
                cells.append(f"{fmt(lo)}..{fmt(hi)}")
        table.add_row(str(t), *cells)
    console.print(table)
