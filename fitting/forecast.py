"""Fitted trajectories with bands, goodness of fit, and forecasts of later iterations.

Bands propagate parameter uncertainty: draws of the unconstrained parameters (from the Laplace
approximation N(u*, Cov_u), or the bootstrap replicates) are pushed through qtm's recursion. Per condition
and iteration the *mean band* is the 2.5-97.5 % range of the predicted phenotype mean mu_k over the draws;
the *prediction band* is that of the mean of n_k new images, mu_k + sqrt(V_k / n_k) eps with eps ~ N(0, 1)
(n_k: the observed number of images of that cell, or the condition's median where unobserved). Forecasting
(`train_iterations` K) fits on iterations <= K and compares the later observed means with the prediction
band, and the predicted collapse (change of mean and ratio of variance from iteration 0 to the last
iteration) with the observed one.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.stats

from fitting.model import Problem, cell_nll
from fitting.observations import Observations


@dataclasses.dataclass(frozen=True)
class Prediction:
    """Per condition and iteration 0..K (C, K+1): the fit's trajectory and its bands."""

    iterations: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    mean_lower: np.ndarray
    mean_upper: np.ndarray
    predict_lower: np.ndarray
    predict_upper: np.ndarray
    var_lower: np.ndarray
    var_upper: np.ndarray
    num_draws: int


def predict(problem: Problem, u_hat: np.ndarray, draws: np.ndarray, num_images: np.ndarray, *,
            noise: np.ndarray) -> Prediction:
    """Trajectory at u* and percentile bands over `draws` (S, P) for iterations 0..K of the problem.

    `num_images` (C, K+1) sets the sampling noise of the prediction band; `noise` (S, C, K+1) standard
    normal numbers (passed in: randomness is an argument)."""
    best_mean, best_var = problem.moments(np.asarray(u_hat)[None])
    mean_s, var_s = problem.moments(draws)
    mean_s, var_s = np.asarray(mean_s), np.asarray(var_s)
    bad = ~(np.isfinite(mean_s) & np.isfinite(var_s) & (var_s > 0))
    mean_s = np.where(bad, np.nan, mean_s)
    var_s = np.where(bad, np.nan, var_s)
    n = np.where(num_images > 0, num_images, np.nan)
    fill = np.nanmedian(n, axis=1, keepdims=True)
    n = np.where(np.isfinite(n), n, np.where(np.isfinite(fill), fill, 1.0))
    observed_mean = mean_s + np.sqrt(var_s / n[None]) * noise
    with np.errstate(invalid="ignore"):
        q = lambda x, p: np.nanpercentile(x, p, axis=0)  # noqa: E731
        return Prediction(
            iterations=np.arange(problem.layout.num_iterations + 1),
            mean=np.asarray(best_mean)[0], var=np.asarray(best_var)[0],
            mean_lower=q(mean_s, 2.5), mean_upper=q(mean_s, 97.5),
            predict_lower=q(observed_mean, 2.5), predict_upper=q(observed_mean, 97.5),
            var_lower=q(var_s, 2.5), var_upper=q(var_s, 97.5), num_draws=int(draws.shape[0]))


def align(obs: Observations, num_iterations: int) -> dict[str, np.ndarray]:
    """Observed n, mean, var on the full iteration grid 0..K (C, K+1); NaN / 0 where unobserved."""
    shape = (obs.num_conditions, num_iterations + 1)
    out = {"num_images": np.zeros(shape), "mean": np.full(shape, np.nan), "var": np.full(shape, np.nan)}
    for j, k in enumerate(obs.iterations.tolist()):
        out["num_images"][:, k] = obs.num_images[:, j]
        out["mean"][:, k] = obs.mean[:, j]
        out["var"][:, k] = obs.var[:, j]
    return out


def goodness_of_fit(observed: dict[str, np.ndarray], prediction: Prediction, iterations: np.ndarray,
                    conditions: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Per condition over the given iterations (>= 1): z-scores of the means, chi2 of the means with its
    p-value (df = number of cells), the variance deviance 2 [l(s^2) - l(V)] of the chi2 part of the
    likelihood, and the RMSE of the means."""
    out = {}
    for c, name in enumerate(conditions):
        ks = [k for k in iterations.tolist() if k >= 1 and observed["num_images"][c, k] > 0]
        n = observed["num_images"][c, ks]
        xbar, s2 = observed["mean"][c, ks], observed["var"][c, ks]
        mu, v = prediction.mean[c, ks], prediction.var[c, ks]
        z = (xbar - mu) / np.sqrt(v / n)
        chi2 = float(np.sum(z**2))
        has_var = (n > 1) & np.isfinite(s2)
        dev_var = 0.0
        if has_var.any():
            a = cell_nll(mu[has_var], v[has_var], n[has_var], mu[has_var], s2[has_var], xp=np)
            b = cell_nll(mu[has_var], s2[has_var], n[has_var], mu[has_var], s2[has_var], xp=np)
            dev_var = float(2.0 * np.sum(a - b))
        out[name] = {
            "num_iterations": len(ks),
            "mean_chi2": chi2,
            "mean_chi2_pvalue": float(scipy.stats.chi2.sf(chi2, len(ks))) if ks else float("nan"),
            "max_abs_z": float(np.max(np.abs(z))) if ks else float("nan"),
            "variance_deviance": dev_var,
            "variance_deviance_pvalue": float(scipy.stats.chi2.sf(dev_var, int(has_var.sum())))
            if has_var.any() else float("nan"),
            "rmse_mean": float(np.sqrt(np.mean((xbar - mu) ** 2))) if ks else float("nan"),
        }
    return out


def forecast_report(observed: dict[str, np.ndarray], prediction: Prediction, train_iterations: int,
                    conditions: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """For each condition, the held-out iterations (> train_iterations): fraction of observed means inside
    the 95 % prediction band, their z-scores, and predicted vs observed collapse from iteration 0 to the last
    observed iteration (change of mean, ratio of variance)."""
    out = {}
    for c, name in enumerate(conditions):
        held = [k for k in range(train_iterations + 1, prediction.iterations.size)
                if observed["num_images"][c, k] > 0]
        if not held:
            out[name] = {"num_held_out": 0}
            continue
        xbar = observed["mean"][c, held]
        inside = (xbar >= prediction.predict_lower[c, held]) & (xbar <= prediction.predict_upper[c, held])
        last = held[-1]
        zero_mean = observed["mean"][:, 0][np.isfinite(observed["mean"][:, 0])]
        zero_var = observed["var"][:, 0][np.isfinite(observed["var"][:, 0])]
        obs0_mean = float(zero_mean[0]) if zero_mean.size else float(prediction.mean[c, 0])
        obs0_var = float(zero_var[0]) if zero_var.size else float(prediction.var[c, 0])
        out[name] = {
            "num_held_out": len(held),
            "held_out_iterations": held,
            "fraction_inside_band": float(inside.mean()),
            "last_iteration": last,
            "observed_mean_last": float(observed["mean"][c, last]),
            "predicted_mean_last": float(prediction.mean[c, last]),
            "predicted_mean_last_lower": float(prediction.predict_lower[c, last]),
            "predicted_mean_last_upper": float(prediction.predict_upper[c, last]),
            "observed_mean_change": float(observed["mean"][c, last] - obs0_mean),
            "predicted_mean_change": float(prediction.mean[c, last] - prediction.mean[c, 0]),
            "predicted_mean_change_lower": float(prediction.mean_lower[c, last] - prediction.mean[c, 0]),
            "predicted_mean_change_upper": float(prediction.mean_upper[c, last] - prediction.mean[c, 0]),
            "observed_var_ratio": float(observed["var"][c, last] / obs0_var),
            "predicted_var_ratio": float(prediction.var[c, last] / prediction.var[c, 0]),
            "predicted_var_ratio_lower": float(prediction.var_lower[c, last] / prediction.var[c, 0]),
            "predicted_var_ratio_upper": float(prediction.var_upper[c, last] / prediction.var[c, 0]),
        }
    return out
