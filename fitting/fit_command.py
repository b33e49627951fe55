"""`qtm fit`: infer per-condition selection (r1, r2, ...) from a results dataset (MODEL.md section 6).

The command builds a FitConfig, calls `fitting.driver.fit_observations`, and writes what was asked for:
a table on the terminal (or `--json`), `--out fit.nc`, `--plot fit.png`. Heavy imports happen inside.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from qtm.cli_common import fail, print_json


def _names(values: list[str] | None, flag: str) -> tuple[str, ...] | None:
    if not values:
        return None
    from qtm.params import PARAM_NAMES

    out = []
    for value in values:
        for name in value.split(","):
            name = name.strip()
            if not name:
                continue
            if name not in PARAM_NAMES:
                fail(f"{flag}: unknown parameter {name!r}; parameters are {', '.join(PARAM_NAMES)}")
            out.append(name)
    return tuple(dict.fromkeys(out))


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


def fit(
    path: Annotated[Path, typer.Argument(help="Run directory (results/NAME with metrics.nc) or a .nc file.")],
    model: Annotated[str, typer.Option(
        "--model", help="Selection: hard (truncation) or soft (tail_rate 0.1 unless --free names it).")] = "hard",
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
    interval: Annotated[str, typer.Option("--interval", help="laplace, profile or bootstrap.")] = "laplace",
    bootstrap_samples: Annotated[int, typer.Option(
        "--bootstrap-samples", help="Replicates for --interval bootstrap.")] = 200,
    starts: Annotated[int, typer.Option("--starts", help="Optimizer starts.")] = 8,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the starts, draws and bootstrap.")] = 0,
    compare: Annotated[bool, typer.Option(
        "--compare", help="Also fit hard/soft x none/paper/additive and compare AIC/BIC.")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="Write the fit dataset (netCDF).")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write the figure (PNG).")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")]
    = False,
) -> None:
    """Fit qtm's recursion to per-iteration phenotypes: per-condition r1, r2 (and tail_rate, sigma_mut),
    shared mu0, sigma_g0, sigma_env, with 95 % intervals, goodness of fit and an optional forecast."""
    import dataclasses
    import sys

    import jax
    from rich.console import Console

    from fitting.driver import FitConfig, FitError, fit_observations
    from fitting.model import DEFAULT_SHARED, ModelError, ModelSpec
    from fitting.observations import ObservationError, load_observations

    if starts < 1:
        fail(f"--starts must be >= 1; got {starts}")
    if bootstrap_samples < 2:
        fail(f"--bootstrap-samples must be >= 2; got {bootstrap_samples}")
    if train_iterations is not None and train_iterations < 1:
        fail(f"--train-iterations must be >= 1; got {train_iterations}")
    try:
        obs = load_observations(path)
    except ObservationError as exc:
        fail(str(exc))
    if drift is None:
        drift = obs.kind == "chain" and model == "hard" and objective == "likelihood"
        if drift:
            obs = dataclasses.replace(obs, notes=obs.notes + (
                f"{obs.source} holds a chain (written by `qtm chain run`): fitted with the chain's own drift "
                "(--drift); --no-drift treats the images as independent draws",))
    spec = ModelSpec(selection=model, mutation=mutation, variance=variance, objective=objective,
                     free=_names(free, "--free"), fixed=_fixes(fix),
                     shared=_names(share, "--share") or DEFAULT_SHARED, drift=drift, population=population)
    config = FitConfig(spec=spec, interval=interval, num_starts=starts, train_iterations=train_iterations,
                       num_bootstrap=bootstrap_samples)
    try:
        config.validate()
    except ValueError as exc:
        fail(str(exc))
    for flag, target in (("--out", out), ("--plot", plot)):
        if target is not None and target.exists() and target.is_dir():
            fail(f"{flag} {target} is a directory; give a file name")

    err = Console(stderr=True)
    try:
        with _progress(err) as progress:
            result = fit_observations(obs, config, key=jax.random.key(seed), progress=progress)
            comparison = None
            if compare:
                from fitting.compare import VARIANTS, compare_variants

                # the drift model is derived for hard selection: compare the hard variants only
                variants = tuple(v for v in VARIANTS if v[0] == "hard") if drift else VARIANTS
                comparison = compare_variants(obs if train_iterations is None else result.train, spec,
                                              num_starts=max(2, min(starts, 4)), key=jax.random.key(seed + 1),
                                              variants=variants, progress=progress("comparing models",
                                                                                   len(variants)))
    except (ObservationError, ModelError, FitError) as exc:
        fail(str(exc))

    from fitting.results import render_tables, to_json, write_fit

    command = "qtm fit " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "qtm fit"
    if out is not None:
        write_fit(result, out, seed=seed, comparison=comparison, command=command)
    if plot is not None:
        from fitting.plotting import plot_fit

        plot_fit(result, plot)
    if json_output:
        print_json(to_json(result, comparison=comparison))
    else:
        render_tables(result, Console(), comparison=comparison)
        for label, target in (("fit dataset", out), ("figure", plot)):
            if target is not None:
                Console().print(f"{label}: {target}", markup=False)


class _progress:
    """Rich progress bars on stderr (only on a terminal); `progress(description, total)` -> advance()."""

    def __init__(self, console):
        from rich.progress import Progress

        self._bar = Progress(console=console, transient=True, disable=not console.is_terminal)

    def __enter__(self):
        self._bar.__enter__()

        def start(description: str, total: int):
            task = self._bar.add_task(description, total=total)
            return lambda: self._bar.advance(task)
        return start

    def __exit__(self, *exc):
        return self._bar.__exit__(*exc)
