"""`qtm spectra DIR`: the power-spectrum phenotype of every image in a folder (docs/phenotype.md).

A thin shell around chain.spectra.measure_folder: check the arguments, measure (streaming, in batches),
print a summary or JSON, optionally write the per-image dataset (.nc) and a plot (chain.spectra.plot_folder).
torch is imported inside the command body only.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from qtm.commands.common import (PLOT_SUFFIXES, JsonFlag, NetcdfOut, PlotOut, check_output, console, fail,
                                 print_json, progress_bars, writing)


def spectra(
    directory: Annotated[Path, typer.Argument(help="Folder of images (png, jpg, jpeg, webp; nested folders allowed).",
                                              metavar="DIR", show_default=False)],
    out: NetcdfOut = None,
    plot: PlotOut = None,
    json_output: JsonFlag = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images decoded and transformed at once.")]
    = 32,
    device: Annotated[str, typer.Option("--device", help="torch device for the FFTs, e.g. cpu or cuda.")] = "cpu",
    tau: Annotated[float, typer.Option("--tau", help="Phenotype threshold in cycles/pixel (Eq. 14); 0.02 for "
                                       "256-pixel images, 0.02 * 256 / size for smaller ones.")] = 0.02,
) -> None:
    """Measure the power-spectrum phenotype (hf_power) of every image in DIR and summarise it.

    --out writes the per-image dataset (hf_power, radial and angular spectra); --plot draws the hf_power
    histogram and the mean radial and angular spectra.
    """
    if not directory.exists():
        fail(f"{directory} does not exist; give the folder that holds the images")
    if not directory.is_dir():
        fail(f"{directory} is not a folder; give the folder that holds the images")
    if not 0.0 <= tau < 0.7072:
        fail(f"--tau {tau}: the threshold is a radial frequency in cycles/pixel, in [0, 1/sqrt(2))")
    check_output("--out", out, suffixes=(".nc",))
    check_output("--plot", plot, suffixes=PLOT_SUFFIXES)
    for target, flag in ((out, "--out"), (plot, "--plot")):
        if target is not None and not target.parent.is_dir():
            fail(f"{flag} {target}: the folder {target.parent} does not exist")

    from qtmio.images import IMAGE_SUFFIXES, list_images

    paths = list_images(directory)
    if not paths:
        fail(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {directory}")

    import torch

    from chain.spectra import measure_folder

    try:
        torch_device = torch.device(device)
    except RuntimeError:
        fail(f"--device {device}: not a torch device name (try cpu or cuda)")
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {device}: CUDA is not available on this machine; use --device cpu")

    def skipped(path: Path, reason: str) -> None:
        typer.echo(f"warning: skipped {path.relative_to(directory).as_posix()}: {reason}", err=True)

    with progress_bars(enabled=not json_output) as bars:
        ds = measure_folder(directory, batch_size=batch_size, device=torch_device, on_error=skipped, tau=tau,
                            on_progress=bars("spectra", len(paths)) if bars else None)
    num_failed = int(ds.attrs["num_failed"])
    if ds.sizes["image"] == 0:
        fail(f"none of the {len(paths)} images under {directory} could be read")

    if out is not None:
        from qtmio.netcdf import write_netcdf

        with writing("--out", out):
            write_netcdf(ds, out)
    if plot is not None:
        from chain.spectra import plot_folder

        with writing("--plot", plot):
            plot_folder(ds, plot)

    summary = _summary(ds["hf_power"].values)
    if json_output:
        import json

        print_json({
            "directory": str(directory),
            "images": [str(p) for p in ds["path"].values],
            "hf_power": [_finite_or_none(v) for v in ds["hf_power"].values],
            "num_images": int(ds.sizes["image"]),
            "num_failed": num_failed,
            "failed": json.loads(ds.attrs["failed"]),
            "summary": {k: _finite_or_none(v) for k, v in summary.items()},
            "frequency": ds["frequency"].values.tolist(),
            "radial_psd_mean": [_finite_or_none(v) for v in ds["radial_psd"].mean("image", skipna=True).values],
            "angle": ds["angle"].values.tolist(),
            "angular_psd_mean": [_finite_or_none(v) for v in ds["angular_psd"].mean("image", skipna=True).values],
            "phenotype_tau": ds.attrs["phenotype_tau"],
            "out": str(out) if out is not None else None,
            "plot": str(plot) if plot is not None else None,
        })
        return
    _print_summary(directory, ds, summary, num_failed, out, plot)


def _finite_or_none(value):
    value = float(value)
    return value if math.isfinite(value) else None


def _summary(values) -> dict[str, float]:
    import numpy as np

    finite = values[np.isfinite(values)]
    if finite.size == 0:
        nan = float("nan")
        return {"mean": nan, "sd": nan, "min": nan, "q05": nan, "q25": nan, "median": nan, "q75": nan, "q95": nan,
                "max": nan, "num_undefined": int(values.size)}
    q = np.quantile(finite, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {
        "mean": float(finite.mean()),
        "sd": float(finite.std(ddof=1)) if finite.size > 1 else float("nan"),
        "min": float(finite.min()),
        "q05": float(q[0]), "q25": float(q[1]), "median": float(q[2]), "q75": float(q[3]), "q95": float(q[4]),
        "max": float(finite.max()),
        "num_undefined": int(values.size - finite.size),
    }


def _print_summary(directory, ds, summary, num_failed, out, plot) -> None:
    from rich.table import Table

    terminal = console()
    table = Table(title=f"hf_power of the images in {directory}", show_header=True)
    table.add_column("statistic")
    table.add_column("value", justify="right")
    table.add_row("images measured", str(ds.sizes["image"]))
    table.add_row("images skipped (unreadable)", str(num_failed))
    if summary["num_undefined"]:
        table.add_row("constant images (hf_power undefined)", str(summary["num_undefined"]))
    for key in ("mean", "sd", "min", "q05", "q25", "median", "q75", "q95", "max"):
        table.add_row(key, f"{summary[key]:.6g}")
    terminal.print(table)
    terminal.print(f"tau = {ds.attrs['phenotype_tau']} cycles/pixel; images with a short side >= 256 are "
                   "area-downsampled and centre-cropped to 256 x 256")
    for target in (out, plot):
        if target is not None:
            terminal.print(f"wrote {target}")
