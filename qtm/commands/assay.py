"""`qtm assay`: the selection assay of a run (docs/assay.md): realized window (r1, r2), the truncation test,
selection differential, response and realized heritability per condition and iteration, with intervals.

The command builds an AssayConfig, calls `fitting.assay.run_assay`, and writes what was asked for: a table
on the terminal (or `--json`), `--out assay.nc`, `--plot assay.png`. numpy/scipy only: never imports torch.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from qtm.commands.common import (JsonFlag, NetcdfOut, PlotOut, check_output, console, print_json, progress_bars,
                                 reported, writing)

FLAGS = {"num_bootstrap": "--bootstrap-samples"}
"""AssayConfig fields -> this command's flags."""


def assay(
    path: Annotated[Path, typer.Argument(help="Run directory (results/NAME with metrics.nc) or a .nc file.")],
    bootstrap_samples: Annotated[int, typer.Option(
        "--bootstrap-samples", help="Bootstrap replicates (images resampled by index) for the intervals.")] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the bootstrap.")] = 0,
    out: NetcdfOut = None,
    plot: PlotOut = None,
    json_output: JsonFlag = False,
) -> None:
    """Measure selection directly: per condition and iteration k >= 1, the guided images against the same
    model's reference images (hf_power vs hf_power_reference): realized r1, r2, which change (truncation,
    shift, scale, none) explains the guided set, S, R and h2 = R / S, with 95 % bootstrap intervals."""
    import sys

    import numpy as np

    from fitting.assay import AssayConfig, assay_json, load_assay_input, run_assay, write_assay

    config = AssayConfig(num_bootstrap=bootstrap_samples)
    with reported(FLAGS):
        config.validate()
    check_output("--out", out)
    check_output("--plot", plot)
    with reported(FLAGS), progress_bars() as bars:
        data = load_assay_input(path)
        result = run_assay(data, config, rng=np.random.default_rng(seed), seed=seed, progress=bars)

    command = "qtm assay " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "qtm assay"
    if out is not None:
        with writing("--out", out):
            write_assay(result, out, command=command)
    if plot is not None:
        from fitting.assay_plotting import plot_assay

        with writing("--plot", plot):
            plot_assay(result, plot)
    if json_output:
        print_json(assay_json(result))
        return
    terminal = console()
    _render(result, terminal)
    for label, target in (("assay dataset", out), ("figure", plot)):
        if target is not None:
            terminal.print(f"{label}: {target}", markup=False)


def _fmt(x: float, digits: int = 3) -> str:
    return "nan" if not math.isfinite(float(x)) else f"{float(x):.{digits}g}"


def _cell(result, name: str, c: int, i: int, digits: int = 3) -> str:
    est, lo, hi = (getattr(result, part)[name][c, i] for part in ("estimate", "lower", "upper"))
    if not math.isfinite(float(est)):
        return ""
    return f"{_fmt(est, digits)} [{_fmt(lo, digits)}, {_fmt(hi, digits)}]"


def _render(result, console) -> None:
    from rich.markup import escape
    from rich.table import Table

    meaningful = result.meaningful_heritability()
    conf = f"{result.config.confidence:.0%}"
    for c, name in enumerate(result.conditions):
        window = Table(title=f"{name}: realized selection window ({conf} bootstrap intervals)")
        for col in ("iteration", "r1 (ML)", "r2 (ML)", "r1 free", "r2 free", "best", "weight"):
            window.add_column(col)
        gain = Table(title=f"{name}: selection, response, heritability ({conf} bootstrap intervals)")
        for col in ("iteration", "S", "R", "h2 = R / S"):
            gain.add_column(col)
        for i, k in enumerate(result.iterations):
            test = result.tests[c][i]
            best = test["best"] or ""
            weight = _fmt(test["aic_weight"][best], 2) if best else ""
            window.add_row(str(int(k)), _cell(result, "r1", c, i, 2), _cell(result, "r2", c, i, 2),
                           _fmt(result.estimate["r1_empirical"][c, i], 2),
                           _fmt(result.estimate["r2_empirical"][c, i], 2), best, weight)
            h2 = _cell(result, "heritability", c, i, 2)
            if h2 and not meaningful[c, i]:
                h2 += " S~0"
            gain.add_row(str(int(k)), _cell(result, "selection_differential", c, i, 2),
                         _cell(result, "response", c, i, 2), escape(h2))
        console.print(window)
        console.print(gain)
        est, lo, hi = result.realized_heritability[c]
        if math.isfinite(float(est)):
            flag = "" if result.meaningful_realized_heritability()[c] else " (cumulative S ~ 0: meaningless)"
            console.print(f"{name}: realized heritability (cumulative regression) {_fmt(est, 2)} "
                          f"[{_fmt(lo, 2)}, {_fmt(hi, 2)}]{flag}", markup=False)
    scale = result.data.reference_scale
    console.print(f"reference scale: {'unknown' if scale is None else _fmt(scale)}; "
                  f"{result.config.num_bootstrap} bootstrap replicates; 'ML' = likelihood window and best = "
                  "truncation test (Akaike weight), both on the reference's normal scores; 'free' = "
                  "distribution-free window", markup=False)
    for note in result.notes:
        console.print(f"note: {note}", markup=False)
