"""Figure of a fit: observed trajectories with fitted curves and bands, one panel per condition."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from fitting.driver import FitResult


def plot_fit(result: FitResult, path: str | Path) -> Path:
    """Observed means with 95 % error bars (1.96 x standard error), the fitted mean, the band of mu_k over
    parameter draws and the wider prediction band for the mean of n new images; a dashed line marks the
    last training iteration of a forecast. Written atomically (PNG, or any suffix matplotlib knows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conditions = result.conditions
    num = len(conditions)
    cols = min(num, 3)
    rows = (num + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False, sharey=True)
    pred = result.prediction
    it = pred.iterations
    obs = result.observed
    with np.errstate(invalid="ignore", divide="ignore"):
        se = np.sqrt(obs["var"] / obs["num_images"])
    for c, name in enumerate(conditions):
        ax = axes[c // cols][c % cols]
        ax.fill_between(it, pred.predict_lower[c], pred.predict_upper[c], color="C0", alpha=0.15,
                        label="95 % prediction (n images)")
        ax.fill_between(it, pred.mean_lower[c], pred.mean_upper[c], color="C0", alpha=0.35,
                        label="95 % band of the mean")
        ax.plot(it, pred.mean[c], color="C0", label="fit")
        mean0 = obs["mean"][:, 0][np.isfinite(obs["mean"][:, 0])]
        y = obs["mean"][c].copy()
        e = se[c].copy()
        if not np.isfinite(y[0]) and mean0.size:
            y[0], e[0] = mean0[0], se[:, 0][np.isfinite(se[:, 0])][0]
        ok = np.isfinite(y)
        ax.errorbar(it[ok], y[ok], yerr=1.96 * np.nan_to_num(e[ok]), fmt="o", color="k", ms=3.5,
                    capsize=2.5, label="observed (95 % CI)")
        if result.config.train_iterations is not None:
            ax.axvline(result.config.train_iterations + 0.5, color="0.4", ls="--", lw=1)
        ax.set_title(name)
        ax.set_xlabel("iteration")
        if c % cols == 0:
            ax.set_ylabel("phenotype mean (hf_power)")
    for k in range(num, rows * cols):
        axes[k // cols][k % cols].axis("off")
    axes[0][0].legend(fontsize=7, loc="best")
    spec = result.config.spec
    fig.suptitle(f"{spec.selection} selection, mutation {spec.mutation} ({result.uncertainty.method})")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix or ".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
