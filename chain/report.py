"""Figures and a summary of a chain run directory (the results contract, docs/results-contract.md).

Works on any run directory, toy or Stable Diffusion: it reads `metrics.nc`, the images under
`images/<condition>/<iteration>/` and the original images named by `config.toml`. Every figure is a pure
function of those inputs (drawn on qtmio.figures, saved through its one saver); nothing here trains,
generates or fits.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import xarray as xr

from chain.errors import ChainError
from qtmio.contract import METRIC_NAMES
from qtmio.figures import figure, save_figure
from qtmio.images import list_images


def check_metrics(metrics: xr.Dataset, source: str) -> None:
    """Raise ChainError unless `metrics` holds what every report draws: `hf_power` (condition, iteration,
    image) and `radial_psd` (condition, iteration, frequency), as chain.store writes them."""
    for name in ("hf_power", "radial_psd"):
        if name not in metrics.data_vars:
            raise ChainError(f"{source}: variable '{name}' is missing; a report draws the metrics.nc of a run "
                             "folder written by `qtm chain run` or `qtm demo`")


def iteration_images(run_dir: Path, condition: str, iteration: int) -> list[Path]:
    """The image files of one (condition, iteration); iteration 0 falls back to the original images (D_0)."""
    folder = Path(run_dir) / "images" / condition / str(iteration)
    if folder.is_dir():
        return list_images(folder)
    if iteration == 0:
        config_path = Path(run_dir) / "config.toml"
        if config_path.is_file():
            data_path = Path(tomllib.loads(config_path.read_text()).get("data", {}).get("path", ""))
            # an absolute path, else relative to the run directory, else to the working directory
            for root in (Path(run_dir) / data_path, data_path):
                if str(data_path) and root.is_dir():
                    return list_images(root)
    return []


def _thumbnail(path: Path, size: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        m = min(im.size)
        left, top = (im.width - m) // 2, (im.height - m) // 2
        im = im.crop((left, top, left + m, top + m)).resize((size, size), Image.Resampling.BOX)
        return np.asarray(im)


def image_grid(run_dir: Path, metrics: xr.Dataset, *, images_per_cell: int = 4, thumb: int = 64) -> np.ndarray:
    """An RGB mosaic: one row per condition, one column per iteration (the paper's Figure 1b layout);
    each cell shows the first `images_per_cell` images side by side (same prompts in every cell)."""
    conditions = [str(c) for c in metrics["condition"].values]
    iterations = [int(i) for i in metrics["iteration"].values]
    gap = 4
    cell_w = images_per_cell * thumb + (images_per_cell - 1) * 1
    height = len(conditions) * thumb + (len(conditions) - 1) * gap
    width = len(iterations) * cell_w + (len(iterations) - 1) * gap
    grid = np.full((height, width, 3), 255, dtype=np.uint8)
    for r, condition in enumerate(conditions):
        for c, iteration in enumerate(iterations):
            paths = iteration_images(run_dir, condition, iteration)[:images_per_cell]
            for j, path in enumerate(paths):
                y, x = r * (thumb + gap), c * (cell_w + gap) + j * (thumb + 1)
                grid[y : y + thumb, x : x + thumb] = _thumbnail(path, thumb)
    return grid


def plot_image_grid(run_dir: Path, metrics: xr.Dataset, path: Path, *, images_per_cell: int = 4) -> Path:
    conditions = [str(c) for c in metrics["condition"].values]
    iterations = [int(i) for i in metrics["iteration"].values]
    grid = image_grid(run_dir, metrics, images_per_cell=images_per_cell)
    fig = figure(figsize=(min(2.2 * len(iterations) * images_per_cell / 2, 24), 1.3 * len(conditions) + 0.8))
    ax = fig.subplots()
    ax.imshow(grid, interpolation="nearest")
    h, w = grid.shape[:2]
    ax.set_xticks([(i + 0.5) * w / len(iterations) for i in range(len(iterations))],
                  [f"iteration {i}" for i in iterations])
    ax.set_yticks([(r + 0.5) * h / len(conditions) for r in range(len(conditions))], conditions)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_title("Generated images per condition and iteration (iteration 0 = the original images)")
    return save_figure(fig, path, tight=True)


def plot_radial_spectra(metrics: xr.Dataset, path: Path) -> Path:
    """Mean radial power spectral density per iteration, one panel per condition (log-log)."""
    from matplotlib import colormaps

    conditions = [str(c) for c in metrics["condition"].values]
    iterations = metrics["iteration"].values
    freq = metrics["frequency"].values
    keep = freq > 0
    fig = figure(figsize=(4.2 * len(conditions), 3.6))
    axes = fig.subplots(1, len(conditions), squeeze=False, sharey=True)
    cmap = colormaps["viridis"]
    for ax, condition in zip(axes[0], conditions):
        for i, iteration in enumerate(iterations):
            psd = metrics["radial_psd"].sel(condition=condition, iteration=iteration).values
            if np.all(np.isnan(psd)):
                continue
            ax.loglog(freq[keep], psd[keep], color=cmap(i / max(len(iterations) - 1, 1)),
                      label=f"iteration {int(iteration)}")
        ax.set_title(condition)
        ax.set_xlabel("radial frequency (cycles / pixel)")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("mean power (fraction of AC energy per ring)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("Radial power spectra over iterations")
    return save_figure(fig, path, tight=True)


def _save_per_iteration(fig, ax, ylabel: str, path: Path) -> Path:
    """Label a per-iteration line plot (one line per condition) and save it."""
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path, tight=True)


def plot_metric(metrics: xr.Dataset, name: str, path: Path, *, label: str | None = None) -> Path:
    """One metric per iteration, one line per condition (with its interval when `<name>_lower/_upper` exist)."""
    fig = figure(figsize=(5.5, 3.8))
    ax = fig.subplots()
    for condition in metrics["condition"].values:
        series = metrics[name].sel(condition=condition)
        ok = ~np.isnan(series.values)
        x = metrics["iteration"].values[ok]
        ax.plot(x, series.values[ok], marker="o", label=str(condition))
        lo, hi = f"{name}_lower", f"{name}_upper"
        if lo in metrics and hi in metrics:
            ax.fill_between(x, metrics[lo].sel(condition=condition).values[ok],
                            metrics[hi].sel(condition=condition).values[ok], alpha=0.2)
    return _save_per_iteration(fig, ax, label or name, path)


def phenotype_summary(metrics: xr.Dataset) -> xr.Dataset:
    """Per (condition, iteration): mean, sd and count of the phenotype over the produced images."""
    hf = metrics["hf_power"]
    return xr.Dataset({
        "mean": hf.mean("image", skipna=True),
        "std": hf.std("image", ddof=1, skipna=True),
        "count": hf.notnull().sum("image"),
    })


def plot_phenotype(metrics: xr.Dataset, path: Path) -> Path:
    """Observed phenotype mean +- sd per iteration, one line per condition (used when there is no fit)."""
    summary = phenotype_summary(metrics)
    fig = figure(figsize=(5.5, 3.8))
    ax = fig.subplots()
    for condition in metrics["condition"].values:
        s = summary.sel(condition=condition)
        ok = s["count"].values > 0
        x = metrics["iteration"].values[ok]
        ax.errorbar(x, s["mean"].values[ok], yerr=s["std"].values[ok], marker="o", capsize=3,
                    label=str(condition))
    return _save_per_iteration(fig, ax, "high-frequency power (phenotype)", path)


def summary_table(metrics: xr.Dataset) -> list[dict]:
    """Rows (condition, iteration, phenotype mean/sd/n, metrics) for the terminal and the markdown report."""
    summary = phenotype_summary(metrics)
    rows = []
    for condition in metrics["condition"].values:
        for iteration in metrics["iteration"].values:
            s = summary.sel(condition=condition, iteration=iteration)
            if int(s["count"]) == 0:
                continue
            row = {"condition": str(condition), "iteration": int(iteration), "hf_power_mean": float(s["mean"]),
                   "hf_power_std": float(s["std"]), "num_images": int(s["count"])}
            for name in METRIC_NAMES:
                if name in metrics:
                    row[name] = float(metrics[name].sel(condition=condition, iteration=iteration))
            rows.append(row)
    return rows


def write_figures(run_dir: Path, metrics: xr.Dataset, out_dir: Path, *, images_per_cell: int = 4,
                  phenotype: bool = True) -> dict[str, str]:
    """Draw the run's figures into `out_dir`: the phenotype per iteration (unless `phenotype` is False, when
    the caller draws a fitted one), the image grid, the radial spectra and each feature metric the run has.
    Returns {caption: file name in out_dir}, in report order."""
    out_dir = Path(out_dir)
    figures: dict[str, str] = {}
    if phenotype:
        plot_phenotype(metrics, out_dir / "phenotype.png")
        figures["Phenotype trajectories (no fit.nc: run `qtm fit` for fitted curves)"] = "phenotype.png"
    plot_image_grid(run_dir, metrics, out_dir / "images.png", images_per_cell=images_per_cell)
    figures["Images per condition and iteration"] = "images.png"
    plot_radial_spectra(metrics, out_dir / "radial_spectra.png")
    figures["Radial power spectra per iteration"] = "radial_spectra.png"
    for name, label in (("fd_dinov2", "Frechet distance to the original images"),
                        ("recall", "Recall against the original images (k = 5)"),
                        ("sfd", "Paired feature distance to the original images (SFD)")):
        if name in metrics and bool(metrics[name].notnull().any()):
            plot_metric(metrics, name, out_dir / f"{name}.png", label=label)
            figures[f"{label} per iteration"] = f"{name}.png"
    return figures


def conditions_not_finished(metrics: xr.Dataset) -> dict[str, int]:
    """{condition: its last iteration with images (-1: none)} for the conditions whose images stop before
    the last iteration of the dataset (a run, or a shard of it, still running or stopped)."""
    counts = phenotype_summary(metrics)["count"].transpose("condition", "iteration").values
    iterations = metrics["iteration"].values
    out = {}
    for c, condition in enumerate(metrics["condition"].values):
        have = np.flatnonzero(counts[c] > 0)
        last = int(iterations[have].max()) if have.size else -1
        if last < int(iterations.max()):
            out[str(condition)] = last
    return out


def describe_run(run_dir: Path, metrics: xr.Dataset) -> str:
    """One paragraph for the report: the run folder, its dataset, base model, feature encoder and tau, and
    the conditions not finished yet (shown up to their last finished iteration)."""
    encoder = metrics.attrs.get("feature_encoder", "")
    unfinished = conditions_not_finished(metrics)
    return (f"Run directory `{run_dir}`; dataset `{metrics.attrs.get('dataset', '?')}`, base model "
            f"`{metrics.attrs.get('base_model', '?')}`" + (f", feature encoder `{encoder}`" if encoder else "")
            + ". The phenotype is the fraction of the normalised AC spectral energy above radius "
            f"{metrics.attrs.get('phenotype_tau', 0.02)} cycles/pixel (docs/phenotype.md)."
            + ("" if not unfinished else
               " Not finished yet (still running, or stopped; shown up to their last finished iteration of "
               f"{int(metrics['iteration'].values.max())}): "
               + ", ".join(f"`{c}` (up to iteration {k})" if k >= 0 else f"`{c}` (no images yet)"
                           for c, k in unfinished.items()) + "."))


def _fmt(value: float) -> str:
    return "—" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.4g}"


def markdown_report(rows: list[dict], figures: dict[str, str], *, title: str, extra: str = "") -> str:
    """The report page: figures first, then the per-iteration table."""
    lines = [f"# {title}", ""]
    if extra:
        lines += [extra, ""]
    for caption, name in figures.items():
        lines += [f"## {caption}", "", f"![{caption}]({name})", ""]
    metric_names = [k for k in METRIC_NAMES if rows and k in rows[0]]
    lines += ["## Per iteration", "",
              "| condition | iteration | phenotype mean | phenotype sd | images | " + " | ".join(metric_names) + " |",
              "|---|---:|---:|---:|---:|" + "---:|" * len(metric_names)]
    for r in rows:
        cells = [r["condition"], str(r["iteration"]), _fmt(r["hf_power_mean"]), _fmt(r["hf_power_std"]),
                 str(r["num_images"])] + [_fmt(r[k]) for k in metric_names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
