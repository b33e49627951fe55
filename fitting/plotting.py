"""Figures of a fit: observed trajectories with fitted curves and bands, one panel per condition; and the
QQ figure of the per-cell goodness of fit (observed against predicted quantiles)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from qtmio.figures import figure, save_figure

if TYPE_CHECKING:  # drawing a fit.nc needs no optimizer
    from fitting.driver import FitResult


def plot_fit(result: FitResult, path: str | Path) -> Path:
    """Draw a fit result (see `plot_fit_dataset`)."""
    from fitting.results import to_dataset

    return plot_fit_dataset(to_dataset(result), path)


def plot_fit_dataset(fit, path: str | Path) -> Path:
    """Observed means with 95 % error bars (1.96 x standard error), the fitted mean, the band of mu_k over
    parameter draws and the wider prediction band for the mean of n new images; a dashed line marks the
    last training iteration of a forecast. `fit` is the dataset of `fitting.results.to_dataset` (a fit.nc
    file opened with xarray). Written atomically (PNG, or any suffix matplotlib knows)."""
    conditions = [str(c) for c in fit["condition"].values]
    num = len(conditions)
    cols = min(num, 3)
    rows = (num + cols - 1) // cols
    fig = figure(figsize=(4.2 * cols, 3.4 * rows))
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
    it = fit["iteration"].values
    mean = fit["observed_mean"].values
    with np.errstate(invalid="ignore", divide="ignore"):
        se = fit["observed_sd"].values / np.sqrt(fit["observed_num_images"].values)
    train = fit["train"].values.astype(bool)
    last_train = int(it[train].max()) if train.any() else None
    for c, name in enumerate(conditions):
        ax = axes[c // cols][c % cols]
        ax.fill_between(it, fit["predict_lower"].values[c], fit["predict_upper"].values[c], color="C0",
                        alpha=0.15, label="95 % prediction (n images)")
        ax.fill_between(it, fit["mean_lower"].values[c], fit["mean_upper"].values[c], color="C0", alpha=0.35,
                        label="95 % band of the mean")
        ax.plot(it, fit["fitted_mean"].values[c], color="C0", label="fit")
        mean0 = mean[:, 0][np.isfinite(mean[:, 0])]
        y = mean[c].copy()
        e = se[c].copy()
        if not np.isfinite(y[0]) and mean0.size:
            y[0], e[0] = mean0[0], se[:, 0][np.isfinite(se[:, 0])][0]
        ok = np.isfinite(y)
        ax.errorbar(it[ok], y[ok], yerr=1.96 * np.nan_to_num(e[ok]), fmt="o", color="k", ms=3.5,
                    capsize=2.5, label="observed (95 % CI)")
        if last_train is not None and last_train < int(it.max()):
            ax.axvline(last_train + 0.5, color="0.4", ls="--", lw=1)
        ax.set_title(name)
        ax.set_xlabel("iteration")
        if c % cols == 0:
            ax.set_ylabel(_phenotype_label(fit, "phenotype mean"))
    _clip_to_data(axes, mean, se, fit["fitted_mean"].values)
    for k in range(num, rows * cols):
        axes[k // cols][k % cols].axis("off")
    axes[0][0].legend(fontsize=7, loc="best")
    scale = fit.attrs.get("transform", "none")
    drift = (f", {scale} scale" if scale != "none" else "") + (" with the chain's drift" if str(fit.attrs.get("drift", "")).lower() in ("1", "true") else "")
    fig.suptitle(f"{fit.attrs.get('model', '')} selection, mutation {fit.attrs.get('mutation', '')}{drift} "
                 f"({fit.attrs.get('interval', '')})")
    fig.tight_layout()
    return save_figure(fig, path)


def _clip_to_data(axes, mean: np.ndarray, se: np.ndarray, fitted: np.ndarray) -> None:
    """Keep the observations and fitted curves readable when a band of an unidentified fit explodes:
    the y-range is the data's (means +- 1.96 se, fitted means) widened by half its span."""
    from matplotlib.ticker import MaxNLocator

    with np.errstate(invalid="ignore"):
        values = np.concatenate([(mean - 1.96 * se).ravel(), (mean + 1.96 * se).ravel(), fitted.ravel()])
    values = values[np.isfinite(values)]
    for ax in np.ravel(axes):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if values.size == 0:
        return
    lo, hi = float(values.min()), float(values.max())
    pad = 0.5 * (hi - lo) if hi > lo else max(abs(hi), 1e-12) * 0.1
    low, high = axes[0][0].get_ylim()
    axes[0][0].set_ylim(max(low, lo - pad), min(high, hi + pad))


def _phenotype_label(fit, what: str) -> str:
    scale = fit.attrs.get("transform", "none")
    return f"{what} ({'hf_power' if scale == 'none' else f'{scale} hf_power'})"


def plot_qq_dataset(fit, path: str | Path) -> Path:
    """QQ figure of the per-cell goodness of fit (fitting.goodness): per condition, the observed quantiles of
    every iteration's values (fit.nc `observed_quantile`) against the quantiles the fit predicts for that
    cell, mu_k + sqrt(V_k) Phi^-1(p) (fitted_mean, fitted_var), one colour per iteration, on the fitted
    scale; points on the diagonal = the cell is what the model says. Written atomically."""
    from matplotlib import colormaps
    from scipy.stats import norm

    conditions = [str(c) for c in fit["condition"].values]
    iterations = [int(k) for k in fit["iteration"].values]
    num = len(conditions)
    cols = min(num, 3)
    rows = (num + cols - 1) // cols
    fig = figure(figsize=(4.2 * cols, 3.8 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    z = norm.ppf(fit["quantile_level"].values)
    observed = fit["observed_quantile"].values
    mean, var = fit["fitted_mean"].values, fit["fitted_var"].values
    p_shape = fit["gof_shape_pvalue"].values
    cmap = colormaps["viridis"]
    for c, name in enumerate(conditions):
        ax = axes[c // cols][c % cols]
        lo, hi = np.inf, -np.inf
        for k in iterations:
            q = observed[c, k]
            if not np.all(np.isfinite(q)) or not (var[c, k] > 0):
                continue
            predicted = mean[c, k] + np.sqrt(var[c, k]) * z
            p = p_shape[c, k]
            label = f"{k}" + (f" (p {p:.2g})" if np.isfinite(p) else "")
            ax.plot(predicted, q, "o", ms=2.5, color=cmap(k / max(len(iterations) - 1, 1)), label=label)
            lo, hi = min(lo, predicted.min(), q.min()), max(hi, predicted.max(), q.max())
        if np.isfinite(lo):
            ax.plot([lo, hi], [lo, hi], color="0.4", lw=1, ls="--")
        ax.set_title(name)
        ax.set_xlabel(_phenotype_label(fit, "predicted quantile"))
        if c % cols == 0:
            ax.set_ylabel(_phenotype_label(fit, "observed quantile"))
        ax.legend(fontsize=6, title="iteration (shape p)", title_fontsize=6, loc="upper left")
    for k in range(num, rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.suptitle("Observed against predicted quantiles per cell (diagonal = the fitted normal law)")
    fig.tight_layout()
    return save_figure(fig, path)
