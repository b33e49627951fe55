"""`qtm report RUN_DIR`: figures and a markdown summary of any chain run directory (toy or Stable Diffusion).

Reads `metrics.nc` (and `fit.nc` when present), writes `report/` inside the run directory: the phenotype
trajectories (with the fitted curves and bands of `qtm fit` when a fit exists, and the fit's QQ figure of
observed against predicted quantiles per cell), an image grid (condition x
iteration, the paper's Figure 1b), radial spectra per iteration, FD per iteration, and `report.md`. A run
with reference images (hf_power_reference) also gets the selection assay (assay.png: r1, r2, S, R, h2 per
iteration) and, with a fit, the assayed r1, r2 against the fit's (selection_routes.png) with a verdict.
torch is never imported.

`build_report` joins the two libraries that each know half of a report, chain.report (the run's figures
and table) and fitting (the fit's figure and table; the selection assay, and the assay against the fit, when the run
has reference images); it lives here because neither library imports the other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from qtm.commands.common import JsonFlag, console, fail, note, print_json, reported, writing


def build_report(run_dir: Path, *, fit_path: Path | None = None, out_dir: Path | None = None,
                 images_per_cell: int = 4, num_bootstrap: int = 1000) -> dict:
    """Write every figure and report.md; returns {"report": path, "figures": {...}, "rows": [...], "left_out":
    [what the dataset does not hold, so the report leaves it out (chain.report.left_out)]}, and
    "selection_routes" (fitting.assay.compare_routes) when the run has reference images and a fit.
    `num_bootstrap`: replicates of the assay's intervals (runs with reference images)."""
    from chain import report as chain_report
    from fitting.assay import REFERENCE
    from qtmio import contract
    from qtmio.atomic import write_text_atomic

    metrics = contract.read_results(run_dir)
    source = str(run_dir / contract.METRICS_FILE)
    contract.read_phenotypes(metrics, source=source)  # all a report needs is what `qtm fit` reads
    out_dir = out_dir or run_dir / "report"
    fit_path = fit_path or run_dir / contract.FIT_FILE
    fit = contract.read_results(fit_path) if fit_path.is_file() else None
    figures: dict[str, str] = {}
    if fit is not None:
        from fitting.plotting import plot_fit_dataset

        plot_fit_dataset(fit, out_dir / "phenotype.png")
        figures["Phenotype trajectories with the fitted quantitative-trait model"] = "phenotype.png"
        if "observed_quantile" in fit:
            from fitting.plotting import plot_qq_dataset

            plot_qq_dataset(fit, out_dir / "fit_qq.png")
            figures["Goodness of fit per cell: observed against predicted quantiles"] = "fit_qq.png"
    figures.update(chain_report.write_figures(run_dir, metrics, out_dir, images_per_cell=images_per_cell,
                                              phenotype=fit is None))
    rows = chain_report.summary_table(metrics)
    text = chain_report.markdown_report(rows, figures, title=f"Chain of Diffusion report: {run_dir.name}",
                                        extra=chain_report.describe_run(run_dir, metrics))
    if fit is not None:
        from fitting.results import markdown_table

        text += "\n" + markdown_table(fit, fit_path.name)
    routes = None
    if REFERENCE in metrics.data_vars:
        section, assay_figures, routes = _assay_section(metrics, fit, out_dir, source=source,
                                                        num_bootstrap=num_bootstrap)
        text += "\n" + section
        figures.update(assay_figures)
    report_path = write_text_atomic(out_dir / "report.md", text)
    result = {"report": str(report_path), "figures": {k: str(out_dir / v) for k, v in figures.items()},
              "rows": rows, "left_out": chain_report.left_out(run_dir, metrics)}
    if routes is not None:
        result["selection_routes"] = routes
    return result


def _assay_section(metrics, fit, out_dir: Path, *, source: str, num_bootstrap: int) -> tuple[str, dict, list | None]:
    """The selection assay of a run with reference images (fitting.assay), and with a fit the two routes to
    the selection window side by side: (markdown, {caption: figure file}, compare_routes rows or None)."""
    import numpy as np

    from fitting.assay import (AssayConfig, assay_dataset, assay_input_from_dataset, compare_routes,
                               markdown_assay, markdown_routes, run_assay)
    from fitting.assay_plotting import plot_assay_dataset, plot_routes

    from qtmio.netcdf import write_netcdf

    data = assay_input_from_dataset(metrics, source=source)
    assay = assay_dataset(run_assay(data, AssayConfig(num_bootstrap=num_bootstrap), rng=np.random.default_rng(0),
                                    seed=0), command="qtm report")
    write_netcdf(assay, out_dir / "assay.nc")  # the numbers behind the section, as `qtm assay --out` writes them
    plot_assay_dataset(assay, out_dir / "assay.png")
    figures = {"Selection assay": "assay.png"}
    text = markdown_assay(assay, figure="assay.png")
    routes = None
    if fit is not None:
        routes = compare_routes(assay, fit)
        plot_routes(assay, fit, out_dir / "selection_routes.png")
        figures["Selection window: the assay against the trajectory fit"] = "selection_routes.png"
        text += "\n" + markdown_routes(routes, figure="selection_routes.png")
    return text, figures, routes


def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (results/NAME) holding metrics.nc, or a "
                                                 "folder holding a hand-written one.")],
    fit_path: Annotated[Path | None, typer.Option("--fit", help="fit.nc to draw (default RUN_DIR/fit.nc).")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Output folder (default RUN_DIR/report).")] = None,
    images_per_cell: Annotated[int, typer.Option("--images-per-cell", min=1, max=16,
                                                 help="Images shown per grid cell.")] = 4,
    bootstrap_samples: Annotated[int, typer.Option(
        "--bootstrap-samples", help="Bootstrap replicates of the selection assay's intervals (runs with "
                                    "reference images).")] = 1000,
    json_output: JsonFlag = False,
) -> None:
    """Figures and a markdown summary of a chain run: phenotype (with fit), image grid, spectra, FD.

    A dataset holding only what `qtm fit` needs (hf_power, or the summary trio) gets the phenotype figure and
    table; the report names what it leaves out."""
    if not run_dir.is_dir():
        fail(f"{run_dir} is not a directory: give a run directory written by `qtm chain run` or `qtm demo`")
    if fit_path is not None and not fit_path.is_file():
        fail(f"--fit {fit_path} does not exist")
    if out is not None and out.exists() and not out.is_dir():
        fail(f"--out {out} exists and is not a folder; name a folder for the report")
    with writing("--out", out or run_dir / "report"), reported({"num_bootstrap": "--bootstrap-samples"}):
        result = build_report(run_dir, fit_path=fit_path, out_dir=out, images_per_cell=images_per_cell,
                              num_bootstrap=bootstrap_samples)
    if json_output:
        print_json(result)
        return
    from rich.table import Table

    table = Table(title=f"{run_dir}: phenotype per condition and iteration")
    for col in ("condition", "iteration", "mean", "sd", "images", "FD"):
        table.add_column(col, justify="right" if col not in ("condition",) else "left")
    for r in result["rows"]:
        fd = r.get("fd_dinov2", float("nan"))
        table.add_row(r["condition"], str(r["iteration"]), f"{r['hf_power_mean']:.5f}", f"{r['hf_power_std']:.5f}",
                      str(r["num_images"]), "—" if fd != fd else f"{fd:.3g}")
    terminal = console()
    terminal.print(table)
    for row in result.get("selection_routes", []):
        terminal.print(row["sentence"], markup=False)
    for part in result["left_out"]:
        note(f"the report leaves out {part}")
    terminal.print(f"report: {result['report']}")
