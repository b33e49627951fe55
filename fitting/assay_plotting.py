"""Figures of the selection assay (docs/assay.md).

`plot_assay_dataset`: one column per condition; rows: realized window (r1, r2), selection differential and
response, realized heritability per iteration, and the cumulative regression.
`plot_routes`: the two routes to the selection window side by side, the assayed r1, r2 per iteration
against the trajectory fit's r1, r2 (one value per condition, with its interval).

Both draw datasets (assay.nc of `fitting.assay.assay_dataset`, fit.nc of `fitting.results.to_dataset`),
without pyplot, and save through qtmio.figures (atomic; the format follows the suffix).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fitting.plotting import mark_not_identified, not_identified
from qtmio.figures import figure, iteration_axis, one_legend, save_figure


def plot_assay(result, path: str | Path) -> Path:
    """Draw an `AssayResult` (see `plot_assay_dataset`)."""
    from fitting.assay import assay_dataset

    return plot_assay_dataset(assay_dataset(result), path)


def _errorbar(ax, x, y, lo, hi, **kwargs) -> None:
    """Points with asymmetric error bars from interval bounds (NaN points and bounds left out)."""
    ok = np.isfinite(y)
    if not ok.any():
        return
    err = np.vstack([np.nan_to_num(y - lo), np.nan_to_num(hi - y)])[:, ok]
    ax.errorbar(x[ok], y[ok], yerr=np.clip(err, 0, None), ms=4, capsize=2.5, lw=1, **kwargs)


def _quantity(ax, x, ds, name: str, c: int, **kwargs) -> None:
    _errorbar(ax, x, ds[name].values[c], ds[f"{name}_lower"].values[c], ds[f"{name}_upper"].values[c], **kwargs)


def _heritability_panel(ax, it, h2, lo, hi, good) -> None:
    """h2 = R / S per iteration: meaningful ones (S's interval excludes 0) in colour; the others grey. The
    y-range is set by the meaningful values and [0, 1]; a grey value beyond it is drawn at the edge as a
    triangle with its value written beside it, so a ratio over S ~ 0 cannot flatten the panel."""
    finite = np.concatenate([h2[good & np.isfinite(h2)], lo[good & np.isfinite(lo)], hi[good & np.isfinite(hi)],
                             [0.0, 1.0]])
    span = finite.max() - finite.min()
    y0, y1 = finite.min() - 0.25 * span, finite.max() + 0.25 * span
    _errorbar(ax, it, np.where(good, h2, np.nan), lo, hi, fmt="o", color="C1", label="h2 = R / S")
    inside = ~good & np.isfinite(h2) & (h2 >= y0) & (h2 <= y1)
    _errorbar(ax, it, np.where(inside, h2, np.nan), np.clip(lo, y0, y1), np.clip(hi, y0, y1), fmt="o",
              color="0.6", label="h2 where S ~ 0 (meaningless)")
    for k, value in zip(it[~good & np.isfinite(h2) & ~inside], h2[~good & np.isfinite(h2) & ~inside]):
        edge = y1 if value > y1 else y0
        ax.plot([k], [edge], marker="^" if value > y1 else "v", color="0.6", ms=6, clip_on=False,
                label="h2 where S ~ 0 (meaningless)")
        ax.annotate(f"{value:.3g}, off scale", (k, edge), textcoords="offset points", xytext=(6, -10 if value > y1
                    else 4), fontsize=7, color="0.4")
    ax.axhline(0, color="0.6", lw=0.8)
    ax.axhline(1, color="0.6", lw=0.8, ls=":")
    ax.set_ylim(y0, y1)


def plot_assay_dataset(ds, path: str | Path) -> Path:
    """`ds` is the dataset of `fitting.assay.assay_dataset` (an assay.nc opened with xarray). Error bars are
    the bootstrap intervals; open markers are the distribution-free window; heritabilities whose selection
    differential is indistinguishable from 0 are drawn grey."""
    conditions = [str(c) for c in ds["condition"].values]
    it = ds["iteration"].values.astype(float)
    num = len(conditions)
    fig = figure(figsize=(3.8 * num + 0.8, 12.5), layout="constrained")
    axes = fig.subplots(4, num, squeeze=False)
    for c, name in enumerate(conditions):
        ax = axes[0][c]
        _quantity(ax, it - 0.06, ds, "r1", c, fmt="o-", color="C0", label="r1, likelihood (normal scores)")
        _quantity(ax, it + 0.06, ds, "r2", c, fmt="o-", color="C3", label="r2, likelihood (normal scores)")
        for q, color, dx, label in (("r1_empirical", "C0", -0.18, "r1, distribution-free"),
                                    ("r2_empirical", "C3", 0.18, "r2, distribution-free")):
            ax.errorbar(it + dx, ds[q].values[c], fmt="o", mfc="none", color=color, ms=4.5, label=label)
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(name)
        ax.set_ylabel("fraction cut from the tail" if c == 0 else "")

        ax = axes[1][c]
        _quantity(ax, it - 0.06, ds, "selection_differential", c, fmt="o-", color="C2",
                  label="S, selection differential")
        _quantity(ax, it + 0.06, ds, "response", c, fmt="o-", color="C4", label="R, response")
        ax.axhline(0, color="0.6", lw=0.8)
        ax.set_ylabel("difference of mean hf_power" if c == 0 else "")

        ax = axes[2][c]
        _heritability_panel(ax, it, ds["heritability"].values[c], ds["heritability_lower"].values[c],
                            ds["heritability_upper"].values[c], ds["heritability_meaningful"].values[c].astype(bool))
        ax.set_ylabel("realized heritability h2" if c == 0 else "")
        for row in range(3):
            iteration_axis(axes[row][c], it)

        ax = axes[3][c]
        cs, cr = ds["cumulative_selection_differential"].values[c], ds["cumulative_response"].values[c]
        ok = np.isfinite(cs) & np.isfinite(cr)
        if ok.any():
            xerr = np.vstack([cs - ds["cumulative_selection_differential_lower"].values[c],
                              ds["cumulative_selection_differential_upper"].values[c] - cs])[:, ok]
            yerr = np.vstack([cr - ds["cumulative_response_lower"].values[c],
                              ds["cumulative_response_upper"].values[c] - cr])[:, ok]
            ax.errorbar(cs[ok], cr[ok], xerr=np.clip(np.nan_to_num(xerr), 0, None),
                        yerr=np.clip(np.nan_to_num(yerr), 0, None), fmt="o", ms=3.5, capsize=2, color="k",
                        label="cumulative R against cumulative S (label: iteration)")
            for x, y, k in zip(cs[ok], cr[ok], it[ok]):
                ax.annotate(f"{int(k)}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
            b = float(ds["realized_heritability"].values[c])
            blo = float(ds["realized_heritability_lower"].values[c])
            bhi = float(ds["realized_heritability_upper"].values[c])
            meaningful = bool(ds["realized_heritability_meaningful"].values[c])
            xs = np.linspace(min(0.0, np.nanmin(cs[ok])), max(0.0, np.nanmax(cs[ok])), 20)
            if np.isfinite(b):
                ax.plot(xs, b * xs, color="C1" if meaningful else "0.6", ls="-" if meaningful else "--",
                        label="realized heritability (slope)" if meaningful else
                        "slope where cumulative S ~ 0 (meaningless)")
                ax.set_title(f"slope {b:.3g} [{blo:.3g}, {bhi:.3g}]" + ("" if meaningful else
                             ", S ~ 0: meaningless"), fontsize=8)
            if meaningful and np.isfinite(blo) and np.isfinite(bhi):
                ax.fill_between(xs, blo * xs, bhi * xs, color="C1", alpha=0.2)
        else:
            ax.text(0.5, 0.5, "needs two consecutive\nassayed iterations", ha="center", va="center",
                    transform=ax.transAxes, fontsize=8, color="0.4")
        ax.axhline(0, color="0.6", lw=0.8)
        ax.axvline(0, color="0.6", lw=0.8)
        ax.set_xlabel("cumulative selection differential\n(hf_power)")
        ax.set_ylabel("cumulative response" if c == 0 else "")
    conf = float(ds.attrs.get("confidence", 0.95))
    scale = ds.attrs.get("reference_scale", "unknown")
    scale = "" if str(scale) == "unknown" else f" at scale {scale}"
    fig.suptitle(f"Selection assay: guided images against reference images{scale}, {conf:.0%} bootstrap intervals")
    one_legend(fig, axes)
    return save_figure(fig, path)


def plot_routes(assay, fit, path: str | Path) -> Path:
    """The selection window by two routes, one column per condition the two share, rows r1 and r2: the
    assay's per-iteration estimates with their bootstrap intervals (points), the trajectory fit's one value
    per condition with its interval (line and band inside [0, 1]; a fixed parameter has no band; a parameter
    the fit could not identify is marked "not identified" on its panel). `assay`: assay.nc,
    `fit`: fit.nc, both as xarray datasets."""
    fit_conditions = [str(c) for c in fit["condition"].values]
    conditions = [str(c) for c in assay["condition"].values if str(c) in fit_conditions]
    it = assay["iteration"].values.astype(float)
    num = max(len(conditions), 1)
    fig = figure(figsize=(3.6 * num + 0.8, 6.8), layout="constrained")
    axes = fig.subplots(2, num, squeeze=False, sharey="row")
    interval = fit.attrs.get("interval", "")
    for c, name in enumerate(conditions):
        a = [str(x) for x in assay["condition"].values].index(name)
        for row, parameter in enumerate(("r1", "r2")):
            ax = axes[row][c]
            value = fit["estimate"].sel(condition=name, parameter=parameter).item()
            lo = fit["lower"].sel(condition=name, parameter=parameter).item()
            hi = fit["upper"].sel(condition=name, parameter=parameter).item()
            free = bool(fit["free"].sel(condition=name, parameter=parameter).item())
            identified = parameter not in not_identified(fit, name)
            span = (it.min() - 0.5, it.max() + 0.5)
            if free and np.isfinite(lo) and np.isfinite(hi):
                ax.fill_between(span, max(lo, 0.0), min(hi, 1.0), color="C0", alpha=0.2,
                                label=f"trajectory fit, 95 % interval ({interval})" if interval else
                                "trajectory fit, 95 % interval")
            ax.plot(span, (value, value), color="C0", lw=1.5,
                    label="trajectory fit" if free else "trajectory fit (fixed)")
            _errorbar(ax, it, assay[parameter].values[a], assay[f"{parameter}_lower"].values[a],
                      assay[f"{parameter}_upper"].values[a], fmt="o", color="k",
                      label="assay per iteration, bootstrap interval")
            ax.set_ylim(-0.03, 1.03)
            iteration_axis(ax, it)
            if free and not identified:
                mark_not_identified(ax, [f"{parameter} (trajectory fit)"], it,
                                    [assay[parameter].values[a], np.full(it.shape, value)])
            if row == 0:
                ax.set_title(name)
            if c == 0:
                ax.set_ylabel(f"{parameter} ({'left' if parameter == 'r1' else 'right'} tail cut)")
    if not conditions:
        axes[0][0].text(0.5, 0.5, "no condition in both", ha="center", va="center",
                        transform=axes[0][0].transAxes)
    fig.suptitle("Selection window: assayed per iteration against the trajectory fit")
    one_legend(fig, axes)
    return save_figure(fig, path)
