"""The figure of `qtm recommend`: the realized window r1(s), r2(s) per scale with its curves and intervals, the
predicted drift per iteration and the predicted distance to D_0 per scale, the recommended scale marked.
Guidance schedules appear as open markers at their mean scale over the sampling steps (they are not on the
curves: a schedule has no single scale)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qtmio.figures import figure, save_figure


def _band(ax, x, rec, name: str, color: str, label: str, support=(None, None)) -> None:
    """The curve `name` over x with its 95 % band, the band kept inside the quantity's `support`."""
    lo, hi = rec.interval(name)
    ax.fill_between(x, np.clip(lo, *support), np.clip(hi, *support), color=color, alpha=0.18, lw=0)
    ax.plot(x, rec.estimate[name], color=color, lw=1.6, label=label)


def _points(ax, x, rec, name: str, color: str, label: str, marker: str = "o") -> None:
    lo, hi = rec.interval(name)
    y = rec.estimate[name]
    ax.errorbar(x, y, yerr=[np.clip(y - lo, 0, None), np.clip(hi - y, 0, None)], fmt=marker, color=color,
                ms=5, capsize=3, label=label)


SCHEDULE_MARKERS = "D^v<>ph*"


def _schedule_points(ax, rec, name: str, color: str, label: str | None) -> None:
    """Schedule q's estimate of `schedule_<name>` with its interval, an open marker at its mean scale."""
    if not rec.schedules:
        return
    lo, hi = rec.interval("schedule_" + name)
    y = rec.estimate["schedule_" + name]
    for q, schedule in enumerate(rec.schedules):
        ax.errorbar([schedule.mean_scale], [y[q]], yerr=[[max(y[q] - lo[q], 0)], [max(hi[q] - y[q], 0)]],
                    fmt=SCHEDULE_MARKERS[q % len(SCHEDULE_MARKERS)], mfc="white", color=color, ms=7, capsize=3,
                    label=f"{label or name}: {schedule.name}" + (" (recommended)" if schedule.name == rec.winner
                                                                   else ""))


def _mark(ax, rec, *, label: bool = False) -> None:
    """The recommended scale (dashed) and its bootstrap interval (grey), labelled on one panel."""
    s = float(rec.estimate["recommended"])
    lo, hi = rec.interval("recommended")
    if np.isfinite(lo) and np.isfinite(hi):
        ax.axvspan(lo, hi, color="0.85", zorder=0, lw=0, label="95 % interval of the recommended scale"
                   if label else None)
    if np.isfinite(s):
        ax.axvline(s, color="k", ls="--", lw=1, label="recommended scale" if label else None)


def _scale_axis(ax, rec) -> None:
    ax.set_xscale("log")
    ax.set_xticks(rec.scales)
    ax.set_xticklabels([f"{s:g}" for s in rec.scales])
    ax.minorticks_off()
    ax.set_xlabel("CFG scale s (log axis)")
    ax.grid(alpha=0.3)


def plot_recommendation(rec, path: str | Path) -> Path:
    """Three panels side by side; the grey band and dashed line are the recommended scale and its bootstrap
    interval; bands and error bars are 95 % bootstrap intervals."""
    fig = figure(figsize=(14, 4.8), layout="constrained")
    axes = fig.subplots(1, 3)
    ax = axes[0]
    _mark(ax, rec, label=True)
    _band(ax, rec.grid, rec, "grid_r1", "C0", "r1(s) curve (left tail)", (0.0, 1.0))
    _band(ax, rec.grid, rec, "grid_r2", "C3", "r2(s) curve (right tail)", (0.0, 1.0))
    _points(ax, rec.scales, rec, "r1", "C0", "r1 assayed")
    _points(ax, rec.scales, rec, "r2", "C3", "r2 assayed", marker="s")
    _schedule_points(ax, rec, "r1", "C0", "r1")
    _schedule_points(ax, rec, "r2", "C3", "r2")
    names = ("r1", "r2", "grid_r1", "grid_r2") + (("schedule_r1", "schedule_r2") if rec.schedules else ())
    upper = max(np.nanmax(np.concatenate([rec.interval(n)[1] for n in names])), 0.1)
    ax.set_ylim(-0.02, min(1.0, 1.15 * upper + 0.03))
    ax.set_ylabel("fraction of the reference set cut")
    ax.set_title("Realized selection window\n(assayed against the reference scale)", fontsize=11)
    ax.legend(fontsize=8, loc="upper left")

    ax = axes[1]
    _mark(ax, rec)
    _band(ax, rec.grid, rec, "grid_drift", "C2", "from the curves")
    _points(ax, rec.scales, rec, "drift", "C2", "at the pilot's scales")
    _schedule_points(ax, rec, "drift", "C1", "schedule")
    ax.axhline(0, color="0.4", lw=0.8)
    ax.set_ylabel("change of the mean phenotype per iteration")
    h2 = rec.estimate["heritability"]
    ax.set_title(f"Predicted drift per iteration\nK = {rec.config.num_iterations}, h2 = {h2:.2g} "
                 f"({rec.heritability_source})", fontsize=11)
    ax.legend(fontsize=8, loc="best")

    ax = axes[2]
    _mark(ax, rec)
    _band(ax, rec.grid, rec, "grid_distance", "C4", "from the curves", (0.0, None))
    _points(ax, rec.scales, rec, "distance", "C4", "at the pilot's scales")
    _schedule_points(ax, rec, "distance", "C1", "schedule")
    ax.set_ylabel("mean distance of D_1..D_K to D_0\n(in standard deviations of D_0)")
    lo, hi = rec.interval("recommended")
    best = (f"s = {float(rec.estimate['recommended']):.2f} (95 % interval {lo:.2f} to {hi:.2f})")
    title = (f"recommended {best}" if rec.winner is None else
             f"recommended: schedule {rec.winner} (bootstrap support {rec.support():.2f})\nbest constant {best}")
    ax.set_title(f"Distance to D_0 over K iterations\n{title}", fontsize=11 if rec.winner is None else 9)
    ax.legend(fontsize=8, loc="best")
    for ax in axes:
        _scale_axis(ax, rec)
    return save_figure(fig, path)
