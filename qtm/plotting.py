"""Plots of trajectories (qtmio.figures: no pyplot state, files written atomically)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import xarray as xr

from qtmio.figures import figure, save_figure


def plot_trajectory(ds: xr.Dataset, path: str | os.PathLike, *, reference: xr.Dataset | None = None,
                    band: tuple[float, float] = (0.05, 0.95)) -> Path:
    """Draw the mean (left) and the genetic and phenotypic variances (right) against the iteration.

    A dataset with a `replicate` dimension (Monte Carlo) is drawn as its median with a band between the
    `band` quantiles over replicates; `reference` (a deterministic trajectory dataset) is overlaid dashed.
    The image format follows the suffix of `path` (png, pdf, svg, ...).
    """
    from matplotlib.ticker import MaxNLocator

    fig = figure(figsize=(9.0, 3.6), layout="constrained")
    ax_mean, ax_var = fig.subplots(1, 2)
    it = ds["iteration"].values
    panels = [(ax_mean, [("mean", "mean", "C0")]),
              (ax_var, [("var_genetic", "V_G", "C1"), ("var_phenotype", "V_P", "C2")])]
    for ax, series in panels:
        for name, label, color in series:
            values = ds[name]
            if "replicate" in values.dims:
                lo, med, hi = (values.quantile(q, dim="replicate").values for q in (band[0], 0.5, band[1]))
                n_rep = values.sizes["replicate"]
                ax.fill_between(it, lo, hi, color=color, alpha=0.25, linewidth=0,
                                label=f"{label}: {band[0]:.0%}-{band[1]:.0%} of {n_rep} replicates")
                ax.plot(it, med, color=color, marker="o", markersize=3, label=f"{label}: median")
            else:
                ax.plot(it, values.values, color=color, marker="o", markersize=3, label=label)
            if reference is not None and name in reference:
                ax.plot(reference["iteration"].values, reference[name].values, color=color, linestyle="--",
                        label=f"{label}: recursion (N = inf)")
        ax.set_xlabel("iteration")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax_mean.set_ylabel("phenotype mean")
    ax_var.set_ylabel("variance")
    title = _title(ds)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, Path(path))


def _title(ds: xr.Dataset) -> str:
    attrs = ds.attrs
    if "r1" not in attrs:
        return ""
    parts = [f"r1={attrs['r1']:g}", f"r2={attrs['r2']:g}"]
    if np.isfinite(attrs.get("tail_rate", np.inf)):
        parts.append(f"tail_rate={attrs['tail_rate']:g}")
    if attrs.get("sigma_mut", 0.0):
        parts.append(f"sigma_mut={attrs['sigma_mut']:g} ({attrs.get('mutation_mode', 'paper')})")
    parts.append(f"sigma_env={attrs['sigma_env']:g}")
    if "population" in attrs:
        parts.append(f"N={attrs['population']}")
    return ", ".join(parts)
