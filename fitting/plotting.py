"""Figures of a fit: observed trajectories with fitted curves and bands, one panel per condition; and the
QQ figure of the per-cell goodness of fit (observed against predicted quantiles)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from qtmio.figures import figure, iteration_axis, one_legend, save_figure

if TYPE_CHECKING:  # drawing a fit.nc needs no optimizer
    from fitting.driver import FitResult


def plot_fit(result: FitResult, path: str | Path) -> Path:
    """Draw a fit result (see `plot_fit_dataset`)."""
    from fitting.results import to_dataset

    return plot_fit_dataset(to_dataset(result), path)


SUPPORTS = {"none": (0.0, 1.0), "log": (-np.inf, 0.0), "logit": (-np.inf, np.inf)}
"""The phenotype's support on each fitted scale (fitting.transforms): hf_power is a share of spectral energy
in [0, 1] (docs/phenotype.md); bands are kept in it."""


def support(fit) -> tuple[float, float]:
    """The support of the phenotype on the scale `fit` was fitted on (its `transform` attribute)."""
    return SUPPORTS.get(str(fit.attrs.get("transform", "none")), (-np.inf, np.inf))

SELECTION_WORDS = {"hard": "hard truncation selection", "soft": "soft selection"}
MUTATION_WORDS = {"none": "no mutation", "paper": "mutation (paper's law)", "additive": "additive mutation"}


def not_identified(fit, condition: str) -> list[str]:
    """The free parameters of `condition` (per-condition and shared) that the fit marks not identified."""
    if "identified" not in fit.data_vars or "free" not in fit.data_vars:
        return []
    names = [str(p) for p in fit["parameter"].values]
    free = fit["free"].sel(condition=condition).values.astype(bool)
    identified = fit["identified"].sel(condition=condition).values.astype(bool)
    return [name for name, f, i in zip(names, free, identified) if f and not i]


def plot_fit_dataset(fit, path: str | Path) -> Path:
    """Observed means with 95 % error bars (1.96 x standard error), the fitted mean, the band of mu_k over
    parameter draws and the wider prediction band for the mean of n new images, both kept inside the
    phenotype's support [0, 1]; a dashed line marks the last training iteration of a forecast; each panel
    names the parameters the fit could not identify. `fit` is the dataset of `fitting.results.to_dataset`
    (a fit.nc file opened with xarray). Written atomically (PNG, or any suffix matplotlib knows)."""
    conditions = [str(c) for c in fit["condition"].values]
    num = len(conditions)
    cols = min(num, 3)
    rows = (num + cols - 1) // cols
    fig = figure(figsize=(4.2 * cols, 3.3 * rows + 1.2), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
    it = fit["iteration"].values
    mean = fit["observed_mean"].values
    with np.errstate(invalid="ignore", divide="ignore"):
        se = fit["observed_sd"].values / np.sqrt(fit["observed_num_images"].values)
    train = fit["train"].values.astype(bool)
    last_train = int(it[train].max()) if train.any() else None
    low, high = support(fit)
    for c, name in enumerate(conditions):
        ax = axes[c // cols][c % cols]
        ax.fill_between(it, np.clip(fit["predict_lower"].values[c], low, high),
                        np.clip(fit["predict_upper"].values[c], low, high), color="C0", alpha=0.15, lw=0,
                        label="95 % prediction for the mean of n new images")
        ax.fill_between(it, np.clip(fit["mean_lower"].values[c], low, high),
                        np.clip(fit["mean_upper"].values[c], low, high), color="C0", alpha=0.35, lw=0,
                        label="95 % band of the fitted mean")
        ax.plot(it, fit["fitted_mean"].values[c], color="C0", label="fitted mean")
        mean0 = mean[:, 0][np.isfinite(mean[:, 0])]
        y = mean[c].copy()
        e = se[c].copy()
        if not np.isfinite(y[0]) and mean0.size:
            y[0], e[0] = mean0[0], se[:, 0][np.isfinite(se[:, 0])][0]
        ok = np.isfinite(y)
        ax.errorbar(it[ok], y[ok], yerr=1.96 * np.nan_to_num(e[ok]), fmt="o", color="k", ms=3.5,
                    capsize=2.5, label="observed mean (95 % CI)")
        if last_train is not None and last_train < int(it.max()):
            ax.axvline(last_train + 0.5, color="0.4", ls="--", lw=1, label="end of the fitted iterations")
        ax.set_title(name, fontsize=10)
        iteration_axis(ax, it)
        ax.grid(alpha=0.3)
        if c % cols == 0:
            ax.set_ylabel(_phenotype_label(fit, "mean over the images"))
    _clip_to_data(axes, mean, se, fit["fitted_mean"].values, support(fit))
    for c, name in enumerate(conditions):
        missing = not_identified(fit, name)
        if missing:
            mark_not_identified(axes[c // cols][c % cols], missing, it, [mean[c], fit["fitted_mean"].values[c]])
    for k in range(num, rows * cols):
        axes[k // cols][k % cols].axis("off")
    one_legend(fig, axes, ncol=3)
    fig.suptitle(_title(fit), fontsize=10)
    return save_figure(fig, path)


def mark_not_identified(ax, names: list[str], x, series) -> None:
    """Write "not identified: <names>" on the panel (a text artist with gid "not-identified"), in the
    corner of the panel that the curves `series` over `x` cross least."""
    y0, y1 = ax.get_ylim()
    x0, x1 = ax.get_xlim()
    fx = (np.asarray(x, float) - x0) / (x1 - x0)
    fy = np.concatenate([(np.asarray(y, float) - y0) / (y1 - y0) for y in series])
    fx = np.tile(fx, len(series))
    corners = {(0.03, 0.04, "left", "bottom"): (fx < 0.5) & (fy < 0.3),
               (0.97, 0.04, "right", "bottom"): (fx >= 0.5) & (fy < 0.3),
               (0.03, 0.96, "left", "top"): (fx < 0.5) & (fy > 0.7),
               (0.97, 0.96, "right", "top"): (fx >= 0.5) & (fy > 0.7)}
    (tx, ty, ha, va), _ = min(corners.items(), key=lambda item: int(np.sum(item[1])))
    ax.text(tx, ty, "not identified: " + ", ".join(names), transform=ax.transAxes, fontsize=8, color="C3",
            ha=ha, va=va, gid="not-identified",
            bbox={"boxstyle": "round,pad=0.25", "fc": "white", "ec": "C3", "alpha": 0.9})


def _title(fit) -> str:
    attrs = fit.attrs
    parts = [SELECTION_WORDS.get(str(attrs.get("model", "")), f"{attrs.get('model', '')} selection"),
             MUTATION_WORDS.get(str(attrs.get("mutation", "")), f"mutation {attrs.get('mutation', '')}")]
    if str(attrs.get("drift", "")).lower() in ("1", "true"):
        parts.append("with the chain's own drift")
    if str(attrs.get("transform", "none")) != "none":
        parts.append(f"fitted on the {attrs['transform']} scale")
    interval = f" (intervals: {attrs['interval']})" if attrs.get("interval") else ""
    return "Fitted quantitative-trait model against the observed phenotype\n" + ", ".join(parts) + interval


def _clip_to_data(axes, mean: np.ndarray, se: np.ndarray, fitted: np.ndarray,
                  support: tuple[float, float]) -> None:
    """Keep the observations and fitted curves readable when a band of an unidentified fit explodes:
    the y-range is the data's (means +- 1.96 se, fitted means) widened by half its span, inside the
    phenotype's support."""
    with np.errstate(invalid="ignore"):
        values = np.concatenate([(mean - 1.96 * se).ravel(), (mean + 1.96 * se).ravel(), fitted.ravel()])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return
    lo, hi = float(values.min()), float(values.max())
    pad = 0.5 * (hi - lo) if hi > lo else max(abs(hi), 1e-12) * 0.1
    low, high = axes[0][0].get_ylim()
    axes[0][0].set_ylim(max(low, lo - pad, support[0] - 0.02 * pad), min(high, hi + pad, support[1] + 0.02 * pad))


def _phenotype_label(fit, what: str) -> str:
    scale = fit.attrs.get("transform", "none")
    return ("high-frequency power" if scale == "none" else f"{scale} of high-frequency power") + f"\n({what})"


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
