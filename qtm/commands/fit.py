"""`qtm fit`: infer per-condition selection (r1, r2, ...) from a results dataset (docs/model.md section 6).

The command builds a FitConfig, calls `fitting.driver.fit_observations`, and writes what was asked for:
a table on the terminal (or `--json`), `--out fit.nc`, `--plot fit.png`. Given a run folder it writes the
fit to RUN/fit.nc unless `--out` names another file, so that `qtm report RUN` draws it; a previous fit there
is replaced (atomically, and said in a note), anything else there is refused. Heavy imports happen inside.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Annotated

import typer

from qtm.commands.common import (PLOT_SUFFIXES, JsonFlag, PlotOut, check_output, console, fail, note, print_json,
                                 progress_bars, reported, writing)

FLAGS = {
    "selection": "--model", "mutation": "--mutation", "variance": "--variance", "objective": "--objective",
    "free": "--free", "shared": "--share", "fixed": "--fix", "drift": "--drift", "population": "--population",
    "interval": "--interval", "num_starts": "--starts", "num_bootstrap": "--bootstrap-samples",
    "train_iterations": "--train-iterations", "transform": "--transform",
}
"""ModelSpec and FitConfig fields -> this command's flags."""


def _names(values: list[str] | None) -> tuple[str, ...] | None:
    """Parameter names given comma-separated or repeated (unknown names are the library's to refuse)."""
    if not values:
        return None
    names = (name.strip() for value in values for name in value.split(","))
    return tuple(dict.fromkeys(name for name in names if name))


def _fixes(values: list[str] | None) -> tuple[tuple[str, float], ...]:
    from qtm.params import PARAM_NAMES

    out = {}
    for value in values or []:
        name, sep, number = value.partition("=")
        name = name.strip()
        if not sep or name not in PARAM_NAMES:
            fail(f"--fix expects name=value with name one of {', '.join(PARAM_NAMES)}; got {value!r}")
        try:
            out[name] = float(number)
        except ValueError:
            fail(f"--fix {name}: {number!r} is not a number")
        if math.isnan(out[name]):
            fail(f"--fix {name}: NaN is not a value")
    return tuple(out.items())


def default_out(path: Path) -> tuple[Path | None, bool]:
    """Where a fit of `path` goes without --out: (RUN/fit.nc, whether it replaces a previous fit) for a run
    folder holding metrics.nc, (None, False) for a .nc file. Refuses (one `error:` line) a run folder this
    process cannot write into and a RUN/fit.nc that is not a fit (`fit_schema_version` missing), before any
    work, so nothing but an earlier fit is ever replaced."""
    import os

    from qtmio.contract import FIT_FILE, METRICS_FILE

    if not (path.is_dir() and (path / METRICS_FILE).is_file()):
        return None, False
    out = path / FIT_FILE
    if not os.access(path, os.W_OK):
        fail(f"{path} is not writable, so the fit cannot go to {out}; give --out FILE elsewhere")
    if not out.exists():
        return out, False
    if out.is_dir():
        fail(f"{out} is a directory; move it away or give --out FILE")
    try:
        from qtmio.netcdf import read_netcdf

        is_fit = "fit_schema_version" in read_netcdf(out).attrs
    except Exception:  # noqa: BLE001 - anything unreadable is not a fit to replace
        is_fit = False
    if not is_fit:
        fail(f"{out} exists and is not a fit written by `qtm fit` (no fit_schema_version); move it away or "
             "give --out FILE")
    return out, True


def fit(
    path: Annotated[Path, typer.Argument(help="Run directory (results/NAME with metrics.nc) or a .nc file.")],
    model: Annotated[str, typer.Option(
        "--model", help="Selection: hard (truncation) or soft (tail_rate estimated per condition; it, r1 and "
                        "r2 get profile intervals, 'not identified' when unbounded; --fix tail_rate=V "
                        "holds it).")]
    = "hard",
    transform: Annotated[str, typer.Option(
        "--transform", help="Fit the model to none (the phenotype), log or logit of the phenotype (logit "
                            "needs values in (0, 1), log values > 0; per-image data only). r1, r2 mean the "
                            "same on every scale; mu0 and the sigmas are on the transformed scale. AIC "
                            "includes the Jacobian, so it compares transforms (--compare fits all).")] = "none",
    mutation: Annotated[str, typer.Option("--mutation", help="none, paper (Eq. 16) or additive.")] = "none",
    train_iterations: Annotated[int | None, typer.Option(
        "--train-iterations", help="Fit iterations <= K only and forecast the later ones.")] = None,
    free: Annotated[list[str] | None, typer.Option(
        "--free", help="Free parameters (comma-separated or repeated); default by model.")] = None,
    fix: Annotated[list[str] | None, typer.Option(
        "--fix", help="Fix a parameter: name=value (repeatable).")] = None,
    share: Annotated[list[str] | None, typer.Option(
        "--share", help="Parameters with one value for all conditions (default mu0,sigma_g0,sigma_env; "
                        "mu0 and sigma_g0 always).")] = None,
    objective: Annotated[str, typer.Option("--objective", help="likelihood or least-squares.")]
    = "likelihood",
    variance: Annotated[str, typer.Option(
        "--variance", help="Observed variance is V_G (genetic, the paper's) or V_P (phenotype).")] = "genetic",
    drift: Annotated[bool | None, typer.Option(
        "--drift/--no-drift", help="Model the chain's own finite-population drift (hard selection; the "
                                   "per-iteration means and variances become correlated). Default: on for "
                                   "a run folder written by `qtm chain run` (its metrics.nc says it is a "
                                   "chain) with --model hard and --objective likelihood, off otherwise.",
        show_default=False)] = None,
    population: Annotated[int | None, typer.Option(
        "--population", help="Images generated per iteration when only a subset was measured (with "
                             "--drift; default: all generated images were measured).")] = None,
    interval: Annotated[str, typer.Option("--interval", help=(
        "auto (default: Laplace where the curvature is well determined, else profile likelihood; r1 and r2 always "
        "by their profiles), "
        "laplace, profile or bootstrap."))] = "auto",
    bootstrap_samples: Annotated[int, typer.Option(
        "--bootstrap-samples", help="Replicates for --interval bootstrap.")] = 200,
    starts: Annotated[int, typer.Option("--starts", help="Optimizer starts.")] = 8,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the starts, draws and bootstrap.")] = 0,
    compare: Annotated[bool, typer.Option(
        "--compare", help="Also fit hard/soft x none/paper/additive on every transform (none, log, logit) "
                          "and compare AIC/BIC on the measured scale.")] = False,
    out: Annotated[Path | None, typer.Option(
        "--out", help="Write the fit dataset (.nc) to this file. Default for a run directory: RUN/fit.nc, "
                      "where `qtm report RUN` finds it (a previous fit there is replaced); for a .nc file: "
                      "none.", show_default=False)] = None,
    plot: PlotOut = None,
    json_output: JsonFlag = False,
) -> None:
    """Fit qtm's recursion to per-iteration phenotypes: per-condition r1, r2 (and tail_rate, sigma_mut),
    shared mu0, sigma_g0, sigma_env, with 95 % intervals, goodness of fit and an optional forecast.

    Given a run directory, the fit is written to RUN/fit.nc (replacing a previous fit), where `qtm report
    RUN` draws it; --out FILE writes it elsewhere."""
    import dataclasses
    import sys

    import jax

    from fitting.driver import FitConfig, fit_observations
    from fitting.model import DEFAULT_SHARED, ModelSpec
    from fitting.observations import load_observations

    check_output("--out", out)
    check_output("--plot", plot, suffixes=PLOT_SUFFIXES)
    default, replaces = (None, False) if out is not None else default_out(path)
    out = out or default
    with reported(FLAGS):
        obs = load_observations(path)
    if drift is None:
        drift = obs.kind == "chain" and model == "hard" and objective == "likelihood"
        if drift:
            obs = dataclasses.replace(obs, notes=obs.notes + (
                f"{obs.source} holds a chain (written by `qtm chain run`): fitted with the chain's own drift "
                "(--drift); --no-drift treats the images as independent draws",))
    spec = ModelSpec(selection=model, mutation=mutation, variance=variance, objective=objective,
                     free=_names(free), fixed=_fixes(fix),
                     shared=_names(share) or DEFAULT_SHARED, drift=drift, population=population)
    config = FitConfig(spec=spec, interval=interval, num_starts=starts, train_iterations=train_iterations,
                       num_bootstrap=bootstrap_samples, transform=transform)
    with reported(FLAGS):
        config.validate()
    with reported(FLAGS), progress_bars(lines="qtm fit") as bars:
        result = fit_observations(obs, config, key=jax.random.key(seed), progress=bars)
        comparison = None
        if compare:
            from fitting.compare import VARIANTS, compare_variants
            from fitting.transforms import TRANSFORMS

            # the drift model is derived for hard selection: compare the hard variants only
            variants = tuple(v for v in VARIANTS if v[0] == "hard") if drift else VARIANTS
            # transforms other than none need per-image values; least squares has no likelihood to compare
            transforms = (tuple(TRANSFORMS) if obs.phenotypes is not None and objective == "likelihood"
                          else (transform,))
            comparison = compare_variants(obs if train_iterations is None else obs.restrict(train_iterations),
                                          spec, num_starts=max(2, min(starts, 4)), key=jax.random.key(seed + 1),
                                          variants=variants, transforms=transforms,
                                          progress=bars("comparing models", len(variants) * len(transforms))
                                          if bars else None)

    from fitting.results import render_tables, to_json, write_fit

    command = "qtm fit " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "qtm fit"
    if out is not None:
        with writing("--out", out):
            write_fit(result, out, seed=seed, comparison=comparison, command=command)
        if default is not None:
            note(f"fit written to {out}, " + ("replacing the previous fit there " if replaces else "")
                 + f"(the default for a run folder, drawn by `qtm report {path}`; --out FILE writes elsewhere)")
    if plot is not None:
        from fitting.plotting import plot_fit

        with writing("--plot", plot):
            plot_fit(result, plot)
    if json_output:
        print_json(to_json(result, comparison=comparison))
        return
    terminal = console()
    render_tables(result, terminal, comparison=comparison)
    for label, target in (("fit dataset", out), ("figure", plot)):
        if target is not None:
            terminal.print(f"{label}: {target}", markup=False)
