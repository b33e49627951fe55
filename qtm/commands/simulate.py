"""`qtm simulate`: the trait model's trajectory (docs/model.md section 3) and, with --population, the
finite-population Monte Carlo (section 5). A thin shell: build `TraitParams`, call qtm, print, write.
Never imports torch."""

from __future__ import annotations

import math
import shlex
from typing import Annotated, Any

import typer

from qtm.commands.common import (JsonFlag, NetcdfOut, PlotOut, check_output, console, fail, print_json, reported,
                                 writing)

FLAGS = {
    "r1": "--r1", "r2": "--r2", "tail_rate": "--tail-rate", "sigma_mut": "--sigma-mut", "mu0": "--mu0",
    "sigma_g0": "--sigma-g0", "sigma_env": "--sigma-env", "mutation_mode": "--mutation-mode",
}
"""TraitParams fields -> this command's flags."""
QUANTILES = (0.05, 0.5, 0.95)


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
    out: NetcdfOut = None,
    plot: PlotOut = None,
    json_output: JsonFlag = False,
) -> None:
    """Simulate the quantitative-trait model of the Chain of Diffusion (defaults: the paper's, App. D.2.2).

    Prints a table per iteration (mean, V_G, V_P, h2, selection differential, response) and the
    asymptotes. With --population N it also runs R replicate chains of N individuals and shows the
    median and the 5-95 % range over replicates. --json prints {iteration, mean, var_genetic,
    var_phenotype, heritability, selection_differential, response (the recursion, lists of K+1), params,
    asymptotes} and, with --population, a "monte_carlo" object with per-iteration quantiles q05, q50, q95
    and the replicate mean of each variable.
    """
    from qtm.params import TraitParams

    params = TraitParams(r1=r1, r2=r2, tail_rate=tail_rate, sigma_mut=sigma_mut, mu0=mu0, sigma_g0=sigma_g0,
                         sigma_env=sigma_env, mutation_mode=mutation_mode)
    with reported(FLAGS):
        params.validate()
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
    check_output("--out", out)
    check_output("--plot", plot)

    import jax

    from qtm.dataset import population_dataset, provenance, trajectory_dataset
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
        from qtmio.netcdf import write_netcdf

        with writing("--out", out):
            write_netcdf(mc if mc is not None else det, out)
    if plot is not None:
        from qtm.plotting import plot_trajectory

        with writing("--plot", plot):
            plot_trajectory(mc if mc is not None else det, plot, reference=det if mc is not None else None)

    if json_output:
        print_json(_json_record(det, params, limits, mc))
        return
    _print_tables(det, limits, mc, params)
    for target in (out, plot):
        if target is not None:
            console().print(f"wrote {target}")


def _command_line(params, iterations, population, replicates, seed, out, plot, json_output) -> str:
    """The fully resolved command line (for the provenance attrs), defaults included."""
    parts = ["qtm", "simulate"]
    for field, flag in FLAGS.items():
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

    terminal = console()
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
    terminal.print(table)
    if limits is not None:
        direction = "upward" if limits["drift_per_iteration"] > 0 else (
            "downward" if limits["drift_per_iteration"] < 0 else "none")
        terminal.print(f"{limits['kind']}: mean drift per iteration {limits['drift_per_iteration']:.6g} "
                      f"({direction}); V_P -> {limits['var_phenotype_limit']:.6g}, "
                      f"V_G -> {limits['var_genetic_limit']:.6g}, h2 -> {limits['heritability_limit']:.6g} "
                      f"(m_sel = {limits['m_sel']:.6g}, v_sel = {limits['v_sel']:.6g})")
    else:
        terminal.print("No selection (v_sel = 1): V_G grows without bound; no asymptotes.")
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
    terminal.print(table)
