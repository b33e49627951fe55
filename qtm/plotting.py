"""Plots of trajectories (qtmio.figures: no pyplot state, files written atomically)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import xarray as xr

from qtmio.figures import figure, iteration_axis, one_legend, save_figure


def plot_trajectory(ds: xr.Dataset, path: str | os.PathLike, *, reference: xr.Dataset | None = None,
                    band: tuple[float, float] = (0.05, 0.95)) -> Path:
    """Draw the mean (left) and the genetic and phenotypic variances (right) against the iteration.

    A dataset with a `replicate` dimension (Monte Carlo) is drawn as its median with a band between the
    `band` quantiles over replicates; `reference` (a deterministic trajectory dataset) is overlaid dashed.
    The image format follows the suffix of `path` (png, pdf, svg, ...).
    """
    fig = figure(figsize=(10.0, 4.4), layout="constrained")
    ax_mean, ax_var = fig.subplots(1, 2)
    it = ds["iteration"].values
    panels = [(ax_mean, [("mean", "mean", "C0")]),
              (ax_var, [("var_genetic", "genetic variance V_G", "C1"),
                        ("var_phenotype", "phenotypic variance V_P", "C2")])]
    for ax, series in panels:
        for name, label, color in series:
            values = ds[name]
            if "replicate" in values.dims:
                lo, med, hi = (values.quantile(q, dim="replicate").values for q in (band[0], 0.5, band[1]))
                n_rep = values.sizes["replicate"]
                ax.fill_between(it, lo, hi, color=color, alpha=0.25, linewidth=0,
                                label=f"{label}: {band[0]:.0%} to {band[1]:.0%} of {n_rep} replicates")
                ax.plot(it, med, color=color, marker="o", markersize=3, label=f"{label}: median")
            else:
                ax.plot(it, values.values, color=color, marker="o", markersize=3, label=label)
            if reference is not None and name in reference:
                ax.plot(reference["iteration"].values, reference[name].values, color=color, linestyle="--",
                        label=f"{label}: recursion (infinite population)")
        iteration_axis(ax, it)
        ax.grid(alpha=0.3)
    ax_mean.set_ylabel("trait mean (phenotype units)")
    ax_mean.set_title("Mean of the trait", fontsize=10)
    ax_var.set_ylabel("variance (phenotype units squared)")
    ax_var.set_title("Variances of the trait", fontsize=10)
    one_legend(fig, [ax_mean, ax_var], ncol=3, fontsize=7.5)
    title = _title(ds)
    fig.suptitle("\n".join(["Simulated chain under selection", *_lines(title, 90)]), fontsize=10)
    return save_figure(fig, Path(path))


def _lines(text: str, width: int) -> list[str]:
    """`text`, a list of "a, b, c" parts, broken into lines of at most `width` characters between parts."""
    lines: list[str] = []
    for part in text.split(", ") if text else []:
        if lines and len(lines[-1]) + 2 + len(part) <= width:
            lines[-1] += ", " + part
        else:
            lines.append(part)
    return lines


def _title(ds: xr.Dataset) -> str:
    attrs = ds.attrs
    if "r1" not in attrs:
        return ""
    parts = [f"left tail cut r1 = {attrs['r1']:g}", f"right tail cut r2 = {attrs['r2']:g}"]
    if np.isfinite(attrs.get("tail_rate", np.inf)):
        parts.append(f"soft selection, tail_rate = {attrs['tail_rate']:g}")
    if attrs.get("sigma_mut", 0.0):
        parts.append(f"mutation sigma_mut = {attrs['sigma_mut']:g} ({attrs.get('mutation_mode', 'paper')})")
    parts.append(f"sigma_env = {attrs['sigma_env']:g}")
    if "population" in attrs:
        parts.append(f"N = {attrs['population']} images per iteration")
    return ", ".join(parts)
