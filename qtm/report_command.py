"""`qtm report RUN_DIR`: figures and a markdown summary of any chain run directory (toy or Stable Diffusion).

Reads `metrics.nc` (and `fit.nc` when present), writes `report/` inside the run directory: the phenotype
trajectories (with the fitted curves and bands of `qtm fit` when a fit exists), an image grid (condition x
iteration, the paper's Figure 1b), radial spectra per iteration, FD per iteration, and `report.md`.
torch is never imported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from qtm.cli_common import fail, print_json


def build_report(run_dir: Path, *, fit_path: Path | None = None, out_dir: Path | None = None,
                 images_per_cell: int = 4) -> dict:
    """Write every figure and report.md; returns {"report": path, "figures": {...}, "rows": [...]}."""
    import xarray as xr

    from chain import report as chain_report
    from chain.atomic import write_text_atomic
    from chain.store import read_metrics

    metrics_path = run_dir / "metrics.nc"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path} does not exist: point qtm report at a run directory "
                                "written by `qtm chain run` or `qtm demo`")
    metrics = read_metrics(metrics_path)
    out_dir = out_dir or run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    fit_path = fit_path or (run_dir / "fit.nc")
    figures: dict[str, str] = {}
    fit_text = ""
    if fit_path.is_file():
        from fitting.plotting import plot_fit_dataset

        with xr.open_dataset(fit_path, engine="h5netcdf") as fit:
            fit = fit.load()
        plot_fit_dataset(fit, out_dir / "phenotype.png")
        figures["Phenotype trajectories with the fitted quantitative-trait model"] = "phenotype.png"
        fit_text = _fit_markdown(fit, fit_path)
    else:
        chain_report.plot_phenotype(metrics, out_dir / "phenotype.png")
        figures["Phenotype trajectories (no fit.nc: run `qtm fit` for fitted curves)"] = "phenotype.png"
    chain_report.plot_image_grid(run_dir, metrics, out_dir / "images.png", images_per_cell=images_per_cell)
    figures["Images per condition and iteration"] = "images.png"
    chain_report.plot_radial_spectra(metrics, out_dir / "radial_spectra.png")
    figures["Radial power spectra per iteration"] = "radial_spectra.png"
    for name, label in (("fd_dinov2", "Frechet distance to the original images"),
                        ("recall", "Recall against the original images (k = 5)"),
                        ("sfd", "Paired feature distance to the original images (SFD)")):
        if name in metrics and bool(metrics[name].notnull().any()):
            chain_report.plot_metric(metrics, name, out_dir / f"{name}.png", label=label)
            figures[f"{label} per iteration"] = f"{name}.png"
    rows = chain_report.summary_table(metrics)
    encoder = metrics.attrs.get("feature_encoder", "")
    extra = (f"Run directory `{run_dir}`; dataset `{metrics.attrs.get('dataset', '?')}`, base model "
             f"`{metrics.attrs.get('base_model', '?')}`" + (f", feature encoder `{encoder}`" if encoder else "")
             + ". The phenotype is the fraction of the normalised AC spectral energy above radius "
             f"{metrics.attrs.get('phenotype_tau', 0.02)} cycles/pixel (docs/phenotype.md).")
    text = chain_report.markdown_report(rows, figures, title=f"Chain of Diffusion report: {run_dir.name}",
                                        extra=extra)
    if fit_text:
        text += "\n" + fit_text
    report_path = write_text_atomic(out_dir / "report.md", text)
    return {"report": str(report_path), "figures": {k: str(out_dir / v) for k, v in figures.items()}, "rows": rows}


def _fit_markdown(fit, fit_path: Path) -> str:
    import numpy as np

    lines = [f"## Fitted selection per condition (`{fit_path.name}`: {fit.attrs.get('model', '?')} selection, "
             f"mutation {fit.attrs.get('mutation', '?')}, {fit.attrs.get('interval', '?')} 95 % intervals)", "",
             "| condition | parameter | estimate | lower | upper | identified |", "|---|---|---:|---:|---:|---|"]
    for c in fit["condition"].values:
        for p in fit["parameter"].values:
            if not bool(fit["free"].sel(condition=c, parameter=p)):
                continue
            v = [float(fit[k].sel(condition=c, parameter=p)) for k in ("estimate", "lower", "upper")]
            ident = "yes" if bool(fit["identified"].sel(condition=c, parameter=p)) else "**no**"
            lines.append(f"| {c} | {p} | " + " | ".join(f"{x:.4g}" if np.isfinite(x) else str(x) for x in v)
                         + f" | {ident} |")
    warnings = json.loads(fit.attrs.get("warnings", "[]"))
    if warnings:
        lines += ["", "Warnings of the fit:", ""] + [f"- {w}" for w in warnings]
    return "\n".join(lines) + "\n"


def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (results/NAME) holding metrics.nc.")],
    fit_path: Annotated[Path | None, typer.Option("--fit", help="fit.nc to draw (default RUN_DIR/fit.nc).")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Output folder (default RUN_DIR/report).")] = None,
    images_per_cell: Annotated[int, typer.Option("--images-per-cell", min=1, max=16,
                                                 help="Images shown per grid cell.")] = 4,
    as_json: Annotated[bool, typer.Option("--json", help="Print the written paths and the table as JSON.")] = False,
) -> None:
    """Figures and a markdown summary of a chain run: phenotype (with fit), image grid, spectra, FD."""
    if not run_dir.is_dir():
        fail(f"{run_dir} is not a directory: give a run directory written by `qtm chain run` or `qtm demo`")
    if fit_path is not None and not fit_path.is_file():
        fail(f"--fit {fit_path} does not exist")
    if out is not None and out.exists() and not out.is_dir():
        fail(f"--out {out} exists and is not a folder; name a folder for the report")
    try:
        result = build_report(run_dir, fit_path=fit_path, out_dir=out, images_per_cell=images_per_cell)
    except (FileNotFoundError, KeyError, ValueError, OSError) as err:
        fail(str(err))
    if as_json:
        print_json(result)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{run_dir}: phenotype per condition and iteration")
    for col in ("condition", "iteration", "mean", "sd", "images", "FD"):
        table.add_column(col, justify="right" if col not in ("condition",) else "left")
    for r in result["rows"]:
        fd = r.get("fd_dinov2", float("nan"))
        table.add_row(r["condition"], str(r["iteration"]), f"{r['hf_power_mean']:.5f}", f"{r['hf_power_std']:.5f}",
                      str(r["num_images"]), "—" if fd != fd else f"{fd:.3g}")
    console = Console()
    console.print(table)
    console.print(f"report: {result['report']}")
