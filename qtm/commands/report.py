"""`qtm report RUN_DIR`: figures and a markdown summary of any chain run directory (toy or Stable Diffusion).

Reads `metrics.nc` (and `fit.nc` when present), writes `report/` inside the run directory: the phenotype
trajectories (with the fitted curves and bands of `qtm fit` when a fit exists), an image grid (condition x
iteration, the paper's Figure 1b), radial spectra per iteration, FD per iteration, and `report.md`.
torch is never imported.

`build_report` joins the two libraries that each know half of a report, chain.report (the run's figures
and table) and fitting (the fit's figure and table); it lives here because neither library imports the
other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from qtm.commands.common import JsonFlag, console, fail, print_json, reported, writing


def build_report(run_dir: Path, *, fit_path: Path | None = None, out_dir: Path | None = None,
                 images_per_cell: int = 4) -> dict:
    """Write every figure and report.md; returns {"report": path, "figures": {...}, "rows": [...]}."""
    from chain import report as chain_report
    from qtmio import contract
    from qtmio.atomic import write_text_atomic

    metrics = contract.read_results(run_dir)
    source = str(run_dir / contract.METRICS_FILE)
    contract.check_schema(metrics, source)
    chain_report.check_metrics(metrics, source)
    out_dir = out_dir or run_dir / "report"
    fit_path = fit_path or run_dir / contract.FIT_FILE
    fit = contract.read_results(fit_path) if fit_path.is_file() else None
    figures: dict[str, str] = {}
    if fit is not None:
        from fitting.plotting import plot_fit_dataset

        plot_fit_dataset(fit, out_dir / "phenotype.png")
        figures["Phenotype trajectories with the fitted quantitative-trait model"] = "phenotype.png"
    figures.update(chain_report.write_figures(run_dir, metrics, out_dir, images_per_cell=images_per_cell,
                                              phenotype=fit is None))
    rows = chain_report.summary_table(metrics)
    text = chain_report.markdown_report(rows, figures, title=f"Chain of Diffusion report: {run_dir.name}",
                                        extra=chain_report.describe_run(run_dir, metrics))
    if fit is not None:
        from fitting.results import markdown_table

        text += "\n" + markdown_table(fit, fit_path.name)
    report_path = write_text_atomic(out_dir / "report.md", text)
    return {"report": str(report_path), "figures": {k: str(out_dir / v) for k, v in figures.items()}, "rows": rows}


def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (results/NAME) holding metrics.nc.")],
    fit_path: Annotated[Path | None, typer.Option("--fit", help="fit.nc to draw (default RUN_DIR/fit.nc).")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Output folder (default RUN_DIR/report).")] = None,
    images_per_cell: Annotated[int, typer.Option("--images-per-cell", min=1, max=16,
                                                 help="Images shown per grid cell.")] = 4,
    json_output: JsonFlag = False,
) -> None:
    """Figures and a markdown summary of a chain run: phenotype (with fit), image grid, spectra, FD."""
    if not run_dir.is_dir():
        fail(f"{run_dir} is not a directory: give a run directory written by `qtm chain run` or `qtm demo`")
    if fit_path is not None and not fit_path.is_file():
        fail(f"--fit {fit_path} does not exist")
    if out is not None and out.exists() and not out.is_dir():
        fail(f"--out {out} exists and is not a folder; name a folder for the report")
    with writing("--out", out or run_dir / "report"), reported():
        result = build_report(run_dir, fit_path=fit_path, out_dir=out, images_per_cell=images_per_cell)
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
    terminal.print(f"report: {result['report']}")
