"""Coverage studies: how often the default 95 % intervals of `qtm fit` hold the truth.

A study simulates `num_seeds` datasets from a `Truth` (`verification.simulate`), fits each with the mode a
user would pick (independent draws: the default model; chains: the drift model, `--drift`), and reports per
free parameter the coverage of the truth by the 95 % interval, the median bias of the estimate and the median
interval half-width (the issue's criteria: coverage >= 0.93 pooled and >= 0.90 per parameter, |median bias|
< 0.25 median half-width). The binomial standard error of a coverage near 0.95 is sqrt(0.95 x 0.05 / S):
S = 53 seeds per parameter for +-0.03 at one standard error, S = 203 at two.

The forecast study fits iterations <= `train_iterations` and counts the later observed means inside the
95 % prediction bands.

A joint check of the objective's scale, independent of how the intervals are computed: per seed the
likelihood ratio of the truth, LR = 2 (NLL(truth) - NLL(estimate)), the objective at the fit's final state
(for a chain: generalized least squares with the covariance at the final pilot). Where the objective is the
log-likelihood of a correct model with P free parameters, LR follows chi2_P asymptotically (Wilks): mean P,
variance 2P, above chi2_P(0.95) in 5 % of seeds. A variance far from 2P says the objective's curvature is
right on average but not seed by seed, which profile intervals inherit.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np

from verification.simulate import Truth, independent_draws, shared_origin_chains

SIMULATORS = {"independent": independent_draws, "chain": shared_origin_chains}
ENTRY_NAMES = ("r1", "r2", "mu0", "sigma_g0", "sigma_env")


@dataclasses.dataclass(frozen=True)
class StudyResult:
    """Per seed and free entry: truth, estimate, lower, upper (S, P); labels (P,); seconds per fit."""

    kind: str
    labels: tuple[str, ...]
    truth: np.ndarray
    estimate: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    seconds: np.ndarray
    forecast_hits: np.ndarray | None = None    # (S, M) later means inside the prediction band
    likelihood_ratio: np.ndarray | None = None  # (S,) 2 (NLL(truth) - NLL(estimate)) (module docstring)

    def likelihood_ratio_summary(self) -> dict | None:
        """Mean, variance and the fraction above chi2_P(0.95) of the truth's likelihood ratio, next to
        their chi2_P values (P free parameters; module docstring); None without ratios."""
        if self.likelihood_ratio is None:
            return None
        import scipy.stats

        lr = self.likelihood_ratio[np.isfinite(self.likelihood_ratio)]
        p = len(self.labels)
        return {"seeds": int(lr.size), "free": p, "mean": float(lr.mean()), "variance": float(lr.var(ddof=1)),
                "above_95": float(np.mean(lr > scipy.stats.chi2.ppf(0.95, p))), "chi2_mean": float(p),
                "chi2_variance": float(2 * p)}

    def per_seed_rows(self, first_seed: int = 0) -> list[dict]:
        """One row per (seed, free entry): truth, estimate, interval, and the seed's fit time and
        likelihood ratio of the truth (for analyses the summary does not make)."""
        rows = []
        for i in range(self.estimate.shape[0]):
            lr = math.nan if self.likelihood_ratio is None else float(self.likelihood_ratio[i])
            for j, label in enumerate(self.labels):
                rows.append({"seed": first_seed + i, "parameter": label, "truth": float(self.truth[i, j]),
                             "estimate": float(self.estimate[i, j]), "lower": float(self.lower[i, j]),
                             "upper": float(self.upper[i, j]), "seconds": float(self.seconds[i]),
                             "likelihood_ratio": lr})
        return rows

    def summary(self) -> list[dict]:
        """One row per free entry plus a pooled row: coverage, its standard error, median bias, median
        half-width, and bias / half-width."""
        inside = (self.lower <= self.truth) & (self.truth <= self.upper)
        half = 0.5 * (self.upper - self.lower)
        rows = []
        for j, label in enumerate(self.labels):
            cov = float(inside[:, j].mean())
            bias = float(np.median(self.estimate[:, j] - self.truth[:, j]))
            width = float(np.median(half[:, j]))
            rows.append({"parameter": label, "coverage": cov, "se": math.sqrt(cov * (1 - cov) / len(inside)),
                         "median_bias": bias, "median_half_width": width,
                         "bias_ratio": bias / width if width > 0 else math.inf})
        pooled = float(inside.mean())
        rows.append({"parameter": "pooled", "coverage": pooled, "se": math.sqrt(pooled * (1 - pooled) / inside.size),
                     "median_bias": math.nan, "median_half_width": math.nan, "bias_ratio": math.nan})
        return rows


def run_study(kind: str, *, truth: Truth = Truth(), num_seeds: int, num_images: int = 1000,
              num_iterations: int = 6, first_seed: int = 0, train_iterations: int | None = None,
              num_starts: int = 2, interval: str = "auto", progress=None) -> StudyResult:
    """Simulate and fit `num_seeds` datasets (module docstring)."""
    import jax

    from fitting.driver import FitConfig, fit_observations
    from fitting.model import ModelSpec, to_unconstrained
    from fitting.observations import from_phenotypes
    from qtm.params import PARAM_NAMES

    idx = {n: i for i, n in enumerate(PARAM_NAMES)}
    simulate = SIMULATORS[kind]
    spec = ModelSpec(drift=kind == "chain")
    config = FitConfig(spec=spec, interval=interval, num_starts=num_starts, num_draws=200,
                       train_iterations=train_iterations)
    labels = [f"{n}[{c}]" for c, _, _ in truth.conditions for n in ("r1", "r2")] + ["mu0", "sigma_g0",
                                                                                     "sigma_env"]
    # the truth as a fit's (C, parameters) table: the studied entries set, the rest (fixed in the fit) nan
    truth_table = np.full((len(truth.conditions), len(PARAM_NAMES)), np.nan)
    for c, (_, r1, r2) in enumerate(truth.conditions):
        truth_table[c, [idx[n] for n in ENTRY_NAMES]] = (r1, r2, truth.mu0, truth.sigma_g0, truth.sigma_env)

    def pick(table):
        """The studied entries of a (C, parameters) table in the order of `labels`."""
        row = [table[c, idx[n]] for c in range(len(truth.conditions)) for n in ("r1", "r2")]
        return row + [table[0, idx[n]] for n in ("mu0", "sigma_g0", "sigma_env")]

    true_row = pick(truth_table)
    est, lo, up, secs, hits, ratios = [], [], [], [], [], []
    for s in range(first_seed, first_seed + num_seeds):
        x = simulate(truth, num_images=num_images, num_iterations=num_iterations, seed=10_000 + s)
        obs = from_phenotypes(list(truth.names), np.arange(num_iterations + 1), x)
        start = time.perf_counter()
        result = fit_observations(obs, config, key=jax.random.key(s))
        secs.append(time.perf_counter() - start)

        at_truth = np.where(np.isnan(truth_table), result.estimate, truth_table)
        nll_truth = result.problem.nll(to_unconstrained(at_truth, result.problem))
        ratios.append(2.0 * (float(nll_truth) - result.optimization.best.nll))
        est.append(pick(result.estimate))
        lo.append(pick(result.lower))
        up.append(pick(result.upper))
        if train_iterations is not None:
            later = np.arange(train_iterations + 1, num_iterations + 1)
            m = result.observed["mean"][:, later]
            pred = result.prediction
            hits.append(((pred.predict_lower[:, later] <= m) & (m <= pred.predict_upper[:, later])).ravel())
        if progress is not None:
            progress(s)
    n = len(est)
    return StudyResult(kind, tuple(labels), np.tile(true_row, (n, 1)), np.array(est), np.array(lo),
                       np.array(up), np.array(secs), np.array(hits) if hits else None, np.array(ratios))


def format_table(study: StudyResult) -> str:
    lines = [f"### {study.kind}: {len(study.seconds)} seeds, median {np.median(study.seconds):.1f} s per fit",
             "", "| parameter | coverage | se | median bias | median half-width | bias / half-width |",
             "|---|---|---|---|---|---|"]
    for row in study.summary():
        lines.append(f"| {row['parameter']} | {row['coverage']:.3f} | {row['se']:.3f} | {row['median_bias']:.4g} "
                     f"| {row['median_half_width']:.4g} | {row['bias_ratio']:.3f} |")
    if study.forecast_hits is not None:
        f = float(study.forecast_hits.mean())
        lines += ["", f"forecast: {f:.3f} of the later means inside the 95 % prediction bands "
                      f"({study.forecast_hits.size} means)"]
    joint = study.likelihood_ratio_summary()
    if joint is not None:
        lines += ["", f"likelihood ratio of the truth, 2 (NLL(truth) - NLL(estimate)), over {joint['seeds']} seeds: "
                      f"mean {joint['mean']:.2f} (chi2_{joint['free']}: {joint['chi2_mean']:.0f}), variance "
                      f"{joint['variance']:.1f} ({joint['chi2_variance']:.0f}), above chi2_{joint['free']}(0.95) "
                      f"in {joint['above_95']:.3f} of seeds (0.05)"]
    return "\n".join(lines)


def plot_study(study: StudyResult, path) -> None:
    """Coverage per parameter with the 0.93 / 0.95 lines, and a QQ plot of z = (estimate - truth) / sd,
    sd = interval half-width / 1.96 (standard normal if the intervals are calibrated)."""
    import scipy.stats

    from qtmio.figures import figure, save_figure

    rows = study.summary()
    fig = figure(figsize=(11, 4))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.errorbar(range(len(rows)), [r["coverage"] for r in rows], yerr=[2 * r["se"] for r in rows], fmt="o")
    ax1.axhline(0.95, color="k", lw=0.8)
    ax1.axhline(0.93, color="r", lw=0.8, ls="--")
    ax1.axhline(0.90, color="r", lw=0.8, ls=":")
    ax1.set_xticks(range(len(rows)), [r["parameter"] for r in rows], rotation=60, fontsize=7)
    ax1.set_ylabel("coverage of the 95 % interval")
    ax1.set_title(f"{study.kind}")
    half = 0.5 * (study.upper - study.lower)
    with np.errstate(divide="ignore", invalid="ignore"):     # a zero-width interval gives no z
        z = ((study.estimate - study.truth) / (half / 1.959963984540054)).ravel()
    z = np.sort(z[np.isfinite(z)])
    q = scipy.stats.norm.ppf((np.arange(1, z.size + 1) - 0.5) / z.size)
    ax2.plot(q, z, ".", ms=3)
    ax2.plot(q, q, "k", lw=0.8)
    ax2.set_xlabel("standard normal quantile")
    ax2.set_ylabel("(estimate - truth) / sd")
    ax2.set_title("QQ, all parameters")
    fig.tight_layout()
    save_figure(fig, path)
