"""Figure of the selection assay: one column per condition; rows: realized window (r1, r2), selection
differential and response, realized heritability per iteration, and the cumulative regression."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qtmio.figures import save_figure


def plot_assay(result, path: str | Path) -> Path:
    """Draw an `AssayResult` (see `plot_assay_dataset`)."""
    from fitting.assay import assay_dataset

    return plot_assay_dataset(assay_dataset(result), path)


def _errorbar(ax, x, ds, name: str, c: int, **kwargs) -> None:
    y = ds[name].values[c]
    lo, hi = ds[f"{name}_lower"].values[c], ds[f"{name}_upper"].values[c]
    ok = np.isfinite(y)
    if not ok.any():
        return
    err = np.vstack([np.nan_to_num(y - lo), np.nan_to_num(hi - y)])[:, ok]
    ax.errorbar(x[ok], y[ok], yerr=np.clip(err, 0, None), fmt="o-", ms=3.5, capsize=2.5, lw=1, **kwargs)


def plot_assay_dataset(ds, path: str | Path) -> Path:
    """`ds` is the dataset of `fitting.assay.assay_dataset` (an assay.nc opened with xarray). Error bars are
    the bootstrap intervals; open markers are the distribution-free window; heritabilities whose selection
    differential is indistinguishable from 0 are drawn grey. Written atomically (PNG or any suffix
    matplotlib knows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    conditions = [str(c) for c in ds["condition"].values]
    it = ds["iteration"].values.astype(float)
    num = len(conditions)
    fig, axes = plt.subplots(4, num, figsize=(3.8 * num + 0.6, 11.0), squeeze=False)
    for c, name in enumerate(conditions):
        ax = axes[0][c]
        _errorbar(ax, it - 0.06, ds, "r1", c, color="C0", label="r1 (normal ML)")
        _errorbar(ax, it + 0.06, ds, "r2", c, color="C3", label="r2 (normal ML)")
        for q, color, dx in (("r1_empirical", "C0", -0.18), ("r2_empirical", "C3", 0.18)):
            y = ds[q].values[c]
            ax.plot(it + dx, y, "o", mfc="none", color=color, ms=4.5, label=q.replace("_", " "))
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(name)
        ax.set_ylabel("realized window" if c == 0 else "")

        ax = axes[1][c]
        _errorbar(ax, it - 0.06, ds, "selection_differential", c, color="C2", label="S (selection differential)")
        _errorbar(ax, it + 0.06, ds, "response", c, color="C4", label="R (response)")
        ax.axhline(0, color="0.6", lw=0.8)
        ax.set_ylabel("phenotype difference" if c == 0 else "")

        ax = axes[2][c]
        h2 = ds["heritability"].values[c]
        lo, hi = ds["heritability_lower"].values[c], ds["heritability_upper"].values[c]
        good = ds["heritability_meaningful"].values[c].astype(bool)
        for mask, color, label in ((good, "C1", "h2 = R / S"), (~good, "0.6", "h2 (S ~ 0: meaningless)")):
            ok = mask & np.isfinite(h2)
            if ok.any():
                err = np.vstack([np.nan_to_num(h2 - lo), np.nan_to_num(hi - h2)])[:, ok]
                ax.errorbar(it[ok], h2[ok], yerr=np.clip(err, 0, None), fmt="o", ms=3.5, capsize=2.5,
                            color=color, label=label)
        ax.axhline(0, color="0.6", lw=0.8)
        ax.axhline(1, color="0.6", lw=0.8, ls=":")
        finite = np.concatenate([h2[np.isfinite(h2)], [0.0, 1.0]])
        span = finite.max() - finite.min()
        ax.set_ylim(finite.min() - 0.5 * span, finite.max() + 0.5 * span)
        ax.set_ylabel("realized heritability" if c == 0 else "")
        if c > 0 and (~good & np.isfinite(h2)).any():
            ax.legend(fontsize=7, loc="best")

        ax = axes[3][c]
        cs, cr = ds["cumulative_selection_differential"].values[c], ds["cumulative_response"].values[c]
        ok = np.isfinite(cs) & np.isfinite(cr)
        if ok.any():
            xerr = np.vstack([cs - ds["cumulative_selection_differential_lower"].values[c],
                              ds["cumulative_selection_differential_upper"].values[c] - cs])[:, ok]
            yerr = np.vstack([cr - ds["cumulative_response_lower"].values[c],
                              ds["cumulative_response_upper"].values[c] - cr])[:, ok]
            ax.errorbar(cs[ok], cr[ok], xerr=np.clip(np.nan_to_num(xerr), 0, None),
                        yerr=np.clip(np.nan_to_num(yerr), 0, None), fmt="o", ms=3.5, capsize=2, color="k")
            for x, y, k in zip(cs[ok], cr[ok], it[ok]):
                ax.annotate(f"{int(k)}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
            b = float(ds["realized_heritability"].values[c])
            blo = float(ds["realized_heritability_lower"].values[c])
            bhi = float(ds["realized_heritability_upper"].values[c])
            xs = np.linspace(min(0.0, np.nanmin(cs[ok])), max(0.0, np.nanmax(cs[ok])), 20)
            if np.isfinite(b):
                ax.plot(xs, b * xs, color="C1", label=f"slope {b:.2f} [{blo:.2f}, {bhi:.2f}]")
            if np.isfinite(blo) and np.isfinite(bhi):
                ax.fill_between(xs, blo * xs, bhi * xs, color="C1", alpha=0.2)
            ax.legend(fontsize=7, loc="best")
        else:
            ax.text(0.5, 0.5, "needs two consecutive\nassayed iterations", ha="center", va="center",
                    transform=ax.transAxes, fontsize=8, color="0.4")
        ax.axhline(0, color="0.6", lw=0.8)
        ax.axvline(0, color="0.6", lw=0.8)
        ax.set_xlabel("cumulative selection differential")
        ax.set_ylabel("cumulative response" if c == 0 else "")
        for row in range(3):
            axes[row][c].xaxis.set_major_locator(MaxNLocator(integer=True))
            axes[row][c].set_xlabel("iteration")
    for row in range(3):
        axes[row][0].legend(fontsize=7, loc="best")
    conf = float(ds.attrs.get("confidence", 0.95))
    scale = ds.attrs.get("reference_scale", "unknown")
    fig.suptitle(f"selection assay: guided vs reference (scale {scale}); {conf:.0%} bootstrap intervals")
    fig.tight_layout()
    try:
        return save_figure(fig, path)
    finally:
        plt.close(fig)
