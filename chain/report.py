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
from qtmio.figures import figure, iteration_axis, one_legend, plain_log_ticks, save_figure
from qtmio.images import list_images


SECTIONS = {
    "images": "the image grid (no images/<condition>/<iteration>/ folders)",
    "radial_psd": "the radial spectra (no radial_psd)",
    "fd_dinov2": "the Frechet distance (no fd_dinov2)",
    "recall": "the recall (no recall)",
    "sfd": "the paired feature distance (no sfd)",
}
"""What a report draws beyond the phenotype, and what it says when the dataset lacks it."""


def left_out(run_dir: Path, metrics: xr.Dataset) -> list[str]:
    """The parts of a report a dataset cannot fill: a dataset holding only what `qtm fit` needs (hf_power or
    the summary trio, docs/results-contract.md) gets the phenotype figure and table, and these are listed
    instead of drawn (the feature metrics only when the run has none of them, as a run without an encoder)."""
    missing = []
    if not any(iteration_images(run_dir, str(c), int(k))
               for c in metrics["condition"].values for k in metrics["iteration"].values):
        missing.append(SECTIONS["images"])
    if not _has_values(metrics, "radial_psd"):
        missing.append(SECTIONS["radial_psd"])
    if not any(_has_values(metrics, name) for name in ("fd_dinov2", "recall", "sfd")):
        missing.append("the feature metrics (no fd_dinov2, recall or sfd)")
    return missing


def _has_values(metrics: xr.Dataset, name: str) -> bool:
    return name in metrics.data_vars and bool(metrics[name].notnull().any())


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
    """Mean radial power spectrum per iteration, one panel per condition, log-log (docs/phenotype.md: ring
    sums of the normalised power map). The phenotype's threshold tau (attribute phenotype_tau) is a dashed
    line and the band above it, whose share is hf_power, is shaded; iterations are coloured dark to light,
    with one legend for the figure."""
    from matplotlib import colormaps

    conditions = [str(c) for c in metrics["condition"].values]
    iterations = metrics["iteration"].values
    freq = metrics["frequency"].values
    keep = freq > 0
    tau = metrics.attrs.get("phenotype_tau")
    fig = figure(figsize=(max(3.8 * len(conditions), 7.5), 4.4), layout="constrained")
    axes = fig.subplots(1, len(conditions), squeeze=False, sharey=True)
    cmap = colormaps["viridis"]
    for ax, condition in zip(axes[0], conditions):
        for i, iteration in enumerate(iterations):
            psd = metrics["radial_psd"].sel(condition=condition, iteration=iteration).values[keep]
            ok = np.isfinite(psd) & (psd > 0)
            if not ok.any():
                continue
            ax.loglog(freq[keep][ok], psd[ok], color=cmap(0.9 * i / max(len(iterations) - 1, 1)), lw=1.3,
                      label=f"iteration {int(iteration)}" + (" (original images)" if int(iteration) == 0 else ""))
        if tau is not None and float(tau) > 0:
            ax.axvline(float(tau), color="C3", ls="--", lw=1.2,
                       label=f"tau = {float(tau):g} cycles/pixel (phenotype threshold)")
            ax.axvspan(float(tau), freq.max() * 1.05, color="C3", alpha=0.06, lw=0,
                       label="above tau: the share hf_power measures")
        ax.set_xlim(freq[keep].min() * 0.9, freq.max() * 1.05)
        plain_log_ticks(ax, freq[keep].min() * 0.9, freq.max() * 1.05)
        ax.set_title(condition, fontsize=10)
        ax.set_xlabel("spatial frequency (cycles per pixel)")
        ax.grid(alpha=0.3, which="major")
    axes[0][0].set_ylabel("share of the image's energy\nper frequency ring (log)")
    one_legend(fig, axes, ncol=4)
    fig.suptitle("Radial power spectrum of the images, mean over the images of each iteration", fontsize=11)
    return save_figure(fig, path)


def _per_iteration_figure(metrics: xr.Dataset, title: str):
    fig = figure(figsize=(7.2, 4.0), layout="constrained")
    ax = fig.subplots()
    iteration_axis(ax, metrics["iteration"].values)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    return fig, ax


METRIC_LABELS = {
    "fd_dinov2": ("Frechet distance to the original images", "Frechet distance\n(feature units, 0 = same)",
                  (0.0, None)),
    "recall": ("Recall against the original images (k = 5)", "recall\n(share of the originals covered)",
               (0.0, 1.0)),
    "sfd": ("Paired feature distance to the original images (SFD)", "paired feature distance\n(feature units)",
            (0.0, None)),
}
"""Feature metric -> (title, axis label with units, support (low, high)) of its figure."""


def plot_metric(metrics: xr.Dataset, name: str, path: Path, *, label: str | None = None) -> Path:
    """One metric per iteration, one line per condition (with its interval when `<name>_lower/_upper` exist,
    kept inside the metric's support: distances >= 0, recall in [0, 1])."""
    title, ylabel, (low, high) = METRIC_LABELS.get(name, (label or name, label or name, (None, None)))
    fig, ax = _per_iteration_figure(metrics, f"{title}, per iteration")
    for condition in metrics["condition"].values:
        series = metrics[name].sel(condition=condition)
        ok = ~np.isnan(series.values)
        x = metrics["iteration"].values[ok]
        ax.plot(x, series.values[ok], marker="o", label=str(condition))
        lo, hi = f"{name}_lower", f"{name}_upper"
        if lo in metrics and hi in metrics:
            ax.fill_between(x, np.clip(metrics[lo].sel(condition=condition).values[ok], low, high),
                            np.clip(metrics[hi].sel(condition=condition).values[ok], low, high), alpha=0.2)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8, title="condition", title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, path)


def phenotype_summary(metrics: xr.Dataset) -> xr.Dataset:
    """Per (condition, iteration): mean, sd and count of the phenotype over the produced images, from the
    per-image `hf_power` or, in a summary-only dataset, from `hf_power_mean`, `hf_power_std`, `num_images`."""
    if "hf_power" not in metrics.data_vars:
        return xr.Dataset({"mean": metrics["hf_power_mean"], "std": metrics["hf_power_std"],
                           "count": metrics["num_images"].fillna(0).astype(int)})
    hf = metrics["hf_power"]
    return xr.Dataset({
        "mean": hf.mean("image", skipna=True),
        "std": hf.std("image", ddof=1, skipna=True),
        "count": hf.notnull().sum("image"),
    })


def plot_phenotype(metrics: xr.Dataset, path: Path) -> Path:
    """Observed phenotype mean per iteration, one line per condition, with a bar of +- 1 sd over the images
    kept inside the phenotype's support [0, 1] (docs/phenotype.md); used when there is no fit."""
    summary = phenotype_summary(metrics)
    fig, ax = _per_iteration_figure(metrics, "High-frequency power per iteration (mean; bars: ± 1 sd over "
                                             "the images)")
    for c, condition in enumerate(metrics["condition"].values):
        s = summary.sel(condition=condition)
        ok = s["count"].values > 0
        x = metrics["iteration"].values[ok] + 0.04 * (c - (metrics.sizes["condition"] - 1) / 2)
        mean, sd = s["mean"].values[ok], np.nan_to_num(s["std"].values[ok])
        lower, upper = np.clip(mean - sd, 0.0, 1.0), np.clip(mean + sd, 0.0, 1.0)
        ax.errorbar(x, mean, yerr=np.vstack([mean - lower, upper - mean]), marker="o", capsize=3,
                    label=str(condition))
    ax.set_ylabel("high-frequency power (share of energy above tau)")
    ax.legend(fontsize=8, title="condition", title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, path)


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
    the caller draws a fitted one), and what the dataset holds of the image grid, the radial spectra and the
    feature metrics (`left_out` names the rest). Returns {caption: file name in out_dir}, in report order."""
    out_dir = Path(out_dir)
    missing = left_out(run_dir, metrics)
    figures: dict[str, str] = {}
    if phenotype:
        plot_phenotype(metrics, out_dir / "phenotype.png")
        figures["Phenotype trajectories (no fit.nc: run `qtm fit` for fitted curves)"] = "phenotype.png"
    if SECTIONS["images"] not in missing:
        plot_image_grid(run_dir, metrics, out_dir / "images.png", images_per_cell=images_per_cell)
        figures["Images per condition and iteration"] = "images.png"
    if SECTIONS["radial_psd"] not in missing:
        plot_radial_spectra(metrics, out_dir / "radial_spectra.png")
        figures["Radial power spectra per iteration"] = "radial_spectra.png"
    for name, (title, _, _) in METRIC_LABELS.items():
        if _has_values(metrics, name):
            plot_metric(metrics, name, out_dir / f"{name}.png")
            figures[f"{title} per iteration"] = f"{name}.png"
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
    the conditions not finished yet (shown up to their last finished iteration) and what the report leaves out
    because the dataset does not hold it (`left_out`)."""
    attrs = metrics.attrs
    encoder = attrs.get("feature_encoder", "")
    if "dataset" in attrs or "base_model" in attrs:
        text = (f"Run directory `{run_dir}`; dataset `{attrs.get('dataset', '?')}`, base model "
                f"`{attrs.get('base_model', '?')}`" + (f", feature encoder `{encoder}`" if encoder else "") + ".")
    else:
        text = f"Results in `{run_dir}` (no chain provenance: a dataset written outside `qtm chain run`)."
    tau = attrs.get("phenotype_tau")
    text += (" The phenotype is the fraction of the normalised AC spectral energy above radius "
             + (f"{tau} cycles/pixel" if tau is not None else "tau") + " (docs/phenotype.md).")
    unfinished = conditions_not_finished(metrics)
    if unfinished:
        text += (" Not finished yet (still running, or stopped; shown up to their last finished iteration of "
                 f"{int(metrics['iteration'].values.max())}): "
                 + ", ".join(f"`{c}` (up to iteration {k})" if k >= 0 else f"`{c}` (no images yet)"
                             for c, k in unfinished.items()) + ".")
    missing = left_out(run_dir, metrics)
    if missing:
        text += ("\n\nLeft out, because the dataset does not hold it: " + "; ".join(missing)
                 + ". The phenotype figures and table need only what `qtm fit` reads (docs/results-contract.md).")
    return text


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
