"""The fit as data: the fit dataset (fit.nc), the JSON summary and the terminal tables.

fit.nc (one xarray Dataset, dims `condition`, `iteration`, `parameter`, `free_parameter`,
`free_parameter_b`, `start`):
- estimate, lower, upper, free, identified (condition, parameter): natural values, 95 % interval;
  fixed parameters have lower = upper = estimate and free = False; `shared` (parameter) flags shared ones.
- covariance, correlation (free_parameter, free_parameter_b): natural-scale delta-method covariance of the
  free entries (labels like `r1[cfg7.5]`, `mu0`); `hessian_eigenvalue` (free_parameter).
- observed_num_images, observed_mean, observed_sd (condition, iteration) and `train` (iteration).
- fitted_mean, fitted_var, mean_lower, mean_upper (parameter-uncertainty band), predict_lower,
  predict_upper (band for the mean of n new images), var_lower, var_upper (condition, iteration).
- cell goodness of fit (condition, iteration; fitting.goodness): gof_shape_statistic, gof_shape_pvalue
  (Anderson-Darling test of normality of the cell's values, mean and sd estimated), gof_mean_z,
  gof_mean_pvalue (standardized residual of the cell mean), gof_counted (cells the fit used, iteration 0
  once); observed_quantile (condition, iteration, quantile_level) for the QQ figure.
- start_objective, start_status (start): the multi-start record.
- Everything phenotype-valued (observed and fitted means, sds, bands, quantiles, mu0, the sigmas) is on the
  fitted scale, attr `transform` (none, log, logit; docs/model.md section 7); r1, r2 mean the same on
  every scale.
- attrs: fit_schema_version, provenance (qtmio.provenance: created_at, git revision, package versions, seed,
  command; the source and the configuration), information criteria, warnings (JSON), goodness of fit,
  forecast and model comparison (JSON strings).

Also the fit as text: `render_tables` (rich, for the terminal) and `markdown_table` (for report.md).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fitting.goodness import quantile_levels
from qtm.params import PARAM_NAMES
from qtmio.contract import FIT_SCHEMA_VERSION
from qtmio.netcdf import write_netcdf
from qtmio.strict_json import dumps_strict
from qtmio.provenance import provenance

if TYPE_CHECKING:  # the fit's dataset and tables need no optimizer: `qtm report` draws a fit.nc without it
    from fitting.driver import FitResult

PACKAGES = ("qtm", "jax", "jaxlib", "numpy", "scipy", "xarray", "h5netcdf")


def _finite_or_none(x: float) -> float | None | str:
    x = float(x)
    if math.isnan(x):
        return None
    return x


def to_json(result: FitResult, *, comparison: list[dict] | None = None) -> dict[str, Any]:
    """The `--json` object: {"conditions": ..., "shared": ..., "diagnostics": ...}."""
    table = result.parameter_table()
    unc = result.uncertainty
    labels = result.problem.layout.labels(result.conditions)
    diagnostics = {
        "model": result.config.spec.selection,
        "mutation": result.config.spec.mutation,
        "objective": result.config.spec.objective,
        "variance": result.config.spec.variance,
        "transform": result.config.transform,
        "drift": result.config.spec.drift,
        "population": result.config.spec.population,
        "interval": unc.method,
        "warnings": list(result.warnings),
        "not_identified": [labels[i] for i in np.flatnonzero(~unc.identified)],
        "information": result.information,
        "goodness_of_fit": result.goodness_of_fit,
        "cell_goodness_of_fit": cell_table(result),
        "starts": [{"objective": s.nll, "status": s.status, "iterations": s.num_iterations}
                   for s in result.optimization.starts],
        "correlation": {"labels": list(labels), "matrix": np.round(unc.correlation, 6).tolist()},
        "iterations_used": result.train.iterations.tolist(),
    }
    if result.forecast is not None:
        diagnostics["forecast"] = result.forecast
    if comparison is not None:
        diagnostics["model_comparison"] = comparison
    return {"conditions": table["conditions"], "shared": table["shared"], "diagnostics": diagnostics}


def cell_table(result: FitResult) -> dict[str, Any]:
    """The per-cell goodness of fit for JSON: the summary counts and, per condition, lists over iterations
    0..K of the shape p-value and the mean residual z (null where not tested)."""
    cells = result.cells
    per = {name: {"shape_pvalue": [_finite_or_none(v) for v in cells.shape_pvalue[c]],
                  "mean_z": [_finite_or_none(v) for v in cells.mean_z[c]]}
           for c, name in enumerate(result.conditions)}
    return {"summary": cells.summary, "conditions": per}


def to_dataset(result: FitResult, *, seed: int | None = None, comparison: list[dict] | None = None,
               command: str | None = None):
    """The fit dataset (module docstring)."""
    import xarray as xr

    conditions = list(result.conditions)
    iterations = result.prediction.iterations
    labels = list(result.problem.layout.labels(result.conditions))
    unc = result.uncertainty
    obs = result.observed
    cp = ("condition", "parameter")
    ci = ("condition", "iteration")
    pred = result.prediction
    cells = result.cells
    train = np.isin(iterations, result.train.iterations)
    with np.errstate(invalid="ignore"):
        observed_sd = np.sqrt(obs["var"])
    ds = xr.Dataset(
        data_vars={
            "estimate": (cp, result.estimate, {"long_name": "point estimate (natural scale)"}),
            "lower": (cp, result.lower, {"long_name": f"lower end of the 95 % interval ({unc.method})"}),
            "upper": (cp, result.upper, {"long_name": f"upper end of the 95 % interval ({unc.method})"}),
            "free": (cp, result.free),
            "identified": (cp, result.identified),
            "shared": (("parameter",), np.array([p in result.shared for p in PARAM_NAMES])),
            "covariance": (("free_parameter", "free_parameter_b"), unc.covariance,
                           {"long_name": "delta-method covariance of the free entries (natural scale)"}),
            "correlation": (("free_parameter", "free_parameter_b"), unc.correlation),
            "hessian_eigenvalue": (("free_parameter",), unc.hessian_eigenvalues,
                                   {"long_name": "eigenvalues of the objective's Hessian in unconstrained space"}),
            "observed_num_images": (ci, obs["num_images"].astype(np.int64)),
            "observed_mean": (ci, obs["mean"]),
            "observed_sd": (ci, observed_sd, {"long_name": "sample sd, ddof 1"}),
            "train": (("iteration",), train, {"long_name": "iteration used by the fit"}),
            "fitted_mean": (ci, pred.mean),
            "fitted_var": (ci, pred.var, {"long_name": f"fitted V_{'G' if result.config.spec.variance == 'genetic' else 'P'}"}),
            "mean_lower": (ci, pred.mean_lower, {"long_name": "2.5 % of mu_k over parameter draws"}),
            "mean_upper": (ci, pred.mean_upper),
            "predict_lower": (ci, pred.predict_lower,
                              {"long_name": "2.5 % of the mean of n new images (parameters + sampling)"}),
            "predict_upper": (ci, pred.predict_upper),
            "var_lower": (ci, pred.var_lower),
            "var_upper": (ci, pred.var_upper),
            "gof_shape_statistic": (ci, cells.shape_statistic, {
                "long_name": "Anderson-Darling A^2 of the cell's values against a normal law with their own mean "
                             "and sd"}),
            "gof_shape_pvalue": (ci, cells.shape_pvalue, {"long_name": "p-value of gof_shape_statistic "
                                                                       "(D'Agostino-Stephens, n >= 8)"}),
            "gof_mean_z": (ci, cells.mean_z, {"long_name": "(observed mean - fitted mean) / sd of an observed "
                                                           "mean"}),
            "gof_mean_pvalue": (ci, cells.mean_pvalue, {"long_name": "two-sided normal p-value of gof_mean_z"}),
            "gof_counted": (ci, cells.counted, {"long_name": "cell used by the fit (iteration 0 once)"}),
            "observed_quantile": (ci + ("quantile_level",), cells.quantiles,
                                  {"long_name": "empirical quantiles of the cell's values (fitted scale)"}),
            "start_objective": (("start",), np.array([s.nll for s in result.optimization.starts])),
            "start_status": (("start",), np.array([s.status for s in result.optimization.starts], dtype=object)),
        },
        coords={
            "condition": conditions,
            "iteration": iterations,
            "parameter": list(PARAM_NAMES),
            "free_parameter": labels,
            "free_parameter_b": labels,
            "start": np.arange(len(result.optimization.starts)),
            "quantile_level": quantile_levels(),
        },
    )
    attrs: dict[str, Any] = {"fit_schema_version": FIT_SCHEMA_VERSION, "source": result.observations.source,
                             "description": "qtm fit: qtm's moment recursion fitted to per-iteration phenotypes "
                                            "(docs/model.md section 6)"}
    attrs.update(provenance(PACKAGES, seed=seed, command=command))
    attrs.update(result.config.to_attrs())
    for key, value in result.information.items():
        attrs[f"information_{key}"] = float(value)
    attrs["warnings"] = dumps_strict(list(result.warnings))
    attrs["goodness_of_fit"] = dumps_strict(result.goodness_of_fit)
    attrs["cell_goodness_of_fit"] = dumps_strict(cells.summary)
    if result.forecast is not None:
        attrs["forecast"] = dumps_strict(result.forecast)
    if comparison is not None:
        attrs["model_comparison"] = dumps_strict(comparison)
    ds.attrs.update(attrs)
    return ds


def write_fit(result: FitResult, path: str | Path, **kwargs) -> Path:
    """Write the fit dataset atomically (temp file in the same directory, then os.replace)."""
    ds = to_dataset(result, **kwargs)
    ds["start_status"] = ds["start_status"].astype(str)
    return write_netcdf(ds, path)


# ------------------------------------------------------------------------------------------------ tables

def _fmt(x: float) -> str:
    if not np.isfinite(x):
        return "inf" if x > 0 else ("-inf" if x < 0 else "nan")
    return f"{x:.4g}"


def render_tables(result: FitResult, console, *, comparison: list[dict] | None = None) -> None:
    """Rich tables: parameters with intervals, goodness of fit, forecast, comparison, warnings."""
    from rich.markup import escape
    from rich.table import Table

    spec = result.config.spec
    scale = "" if result.config.transform == "none" else f", {result.config.transform} scale"
    title = (f"qtm fit: {spec.selection} selection, mutation {spec.mutation}, {spec.objective}"
             f"{' with drift' if spec.drift else ''}{scale}, {result.uncertainty.method} 95 % intervals")
    table = Table(title=title)
    for col in ("parameter", "condition", "estimate", "95 % interval", ""):
        table.add_column(col, justify="right" if col in ("estimate",) else "left")
    for name in PARAM_NAMES:
        i = PARAM_NAMES.index(name)
        rows = [(0, "(shared)")] if name in result.shared else list(enumerate(result.conditions))
        for c, label in rows:
            if result.free[c, i]:
                interval = f"[{_fmt(result.lower[c, i])}, {_fmt(result.upper[c, i])}]"
                flag = "" if result.identified[c, i] else "[red]not identified[/red]"
            else:
                interval, flag = "fixed", ""
            table.add_row(name, escape(label), _fmt(result.estimate[c, i]), interval, flag)
    console.print(table)

    gof = Table(title="goodness of fit (iterations used, >= 1)")
    for col in ("condition", "iterations", "chi2 means", "p", "max |z|", "variance deviance", "p"):
        gof.add_column(col)
    for name, row in result.goodness_of_fit.items():
        gof.add_row(escape(name), str(row["num_iterations"]), _fmt(row["mean_chi2"]), _fmt(row["mean_chi2_pvalue"]),
                    _fmt(row["max_abs_z"]), _fmt(row["variance_deviance"]), _fmt(row["variance_deviance_pvalue"]))
    console.print(gof)
    console.print(_cell_rich_table(result, Table, escape))
    labels = result.problem.layout.labels(result.conditions)
    corr = result.uncertainty.correlation
    strong = [f"{labels[i]} ~ {labels[j]} {corr[i, j]:+.2f}" for i in range(len(labels))
              for j in range(i + 1, len(labels)) if np.isfinite(corr[i, j]) and abs(corr[i, j]) >= 0.9]
    if strong:
        console.print("strong correlations (|rho| >= 0.9): " + escape("; ".join(strong)))
    info = result.information
    console.print(f"objective {info['objective']:.6g}   free parameters {info['num_free']}   "
                  f"AIC {info['aic']:.6g}   BIC {info['bic']:.6g}")

    if result.forecast is not None:
        fc = Table(title=f"forecast of iterations > {result.config.train_iterations}")
        for col in ("condition", "held out", "inside 95 % band", "mean change obs", "mean change pred [95 %]",
                    "var ratio obs", "var ratio pred [95 %]"):
            fc.add_column(col)
        for name, row in result.forecast.items():
            if row.get("num_held_out", 0) == 0:
                fc.add_row(escape(name), "0", "", "", "", "", "")
                continue
            fc.add_row(escape(name), str(row["num_held_out"]), f"{row['fraction_inside_band']:.0%}",
                       _fmt(row["observed_mean_change"]),
                       f"{_fmt(row['predicted_mean_change'])} [{_fmt(row['predicted_mean_change_lower'])}, "
                       f"{_fmt(row['predicted_mean_change_upper'])}]",
                       _fmt(row["observed_var_ratio"]),
                       f"{_fmt(row['predicted_var_ratio'])} [{_fmt(row['predicted_var_ratio_lower'])}, "
                       f"{_fmt(row['predicted_var_ratio_upper'])}]")
        console.print(fc)

    if comparison is not None:
        cmp_table = Table(title="model comparison on the measured scale (lower is better)")
        for col in ("model", "mutation", "transform", "free", "AIC", "dAIC", "weight", "BIC", "dBIC", "status"):
            cmp_table.add_column(col)
        for row in comparison:
            cmp_table.add_row(row["model"], row["mutation"], row.get("transform", "none"),
                              "" if row["num_free"] is None else str(row["num_free"]), _fmt(row["aic"]),
                              _fmt(row["delta_aic"]), f"{row['weight']:.3f}", _fmt(row["bic"]),
                              _fmt(row["delta_bic"]), row["status"])
        console.print(cmp_table)
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}")


def _cell_rich_table(result: FitResult, Table, escape):
    """Per condition and iteration: the shape test's p-value / the mean residual z (fitting.goodness)."""
    cells = result.cells
    iterations = result.prediction.iterations.tolist()
    summary = cells.summary
    title = ("goodness of fit per cell: Anderson-Darling p (normal shape) / z of the mean; "
             f"{summary['shape']['num_failing']} of {summary['shape']['num_cells']} shape tests and "
             f"{summary['mean']['num_failing']} of {summary['mean']['num_cells']} means at p < 0.01")
    table = Table(title=title)
    table.add_column("condition")
    for k in iterations:
        table.add_column(str(k), justify="right")
    for c, name in enumerate(result.conditions):
        entries = []
        for k in iterations:
            p, z = cells.shape_pvalue[c, k], cells.mean_z[c, k]
            if not np.isfinite(z):
                entries.append("")
                continue
            text = f"{'-' if not np.isfinite(p) else f'{p:.2g}'} / {z:+.1f}"
            failed = (np.isfinite(p) and p < 0.01) or cells.mean_pvalue[c, k] < 0.01
            entries.append(f"[red]{text}[/red]" if failed else text)
        table.add_row(escape(name), *entries)
    return table


def markdown_table(fit, name: str = "fit.nc") -> str:
    """The free parameters of a fit dataset (`to_dataset`, or fit.nc read back) as a markdown section: one
    row per condition and parameter with the estimate, the 95 % interval and whether it is identified, then
    the fit's warnings. `name` is how the section refers to the fit."""
    lines = [f"## Fitted selection per condition (`{name}`: {fit.attrs.get('model', '?')} selection, "
             f"mutation {fit.attrs.get('mutation', '?')}, {fit.attrs.get('interval', '?')} 95 % intervals)", "",
             "| condition | parameter | estimate | lower | upper | identified |", "|---|---|---:|---:|---:|---|"]
    for c in fit["condition"].values:
        for p in fit["parameter"].values:
            if not bool(fit["free"].sel(condition=c, parameter=p)):
                continue
            v = [float(fit[k].sel(condition=c, parameter=p)) for k in ("estimate", "lower", "upper")]
            ident = "yes" if bool(fit["identified"].sel(condition=c, parameter=p)) else "**no**"
            lines.append(f"| {c} | {p} | " + " | ".join(f"{x:.4g}" if np.isfinite(x) else str(x) for x in v)
                         + f" | {ident} |")
    transform = fit.attrs.get("transform", "none")
    if transform != "none":
        lines += ["", f"Fitted on the {transform} scale of the phenotype: mu0 and the standard deviations are "
                      "on that scale; r1, r2 are fractions of the distribution on every scale (docs/model.md "
                      "section 7)."]
    if "gof_shape_pvalue" in fit:
        lines += ["", markdown_cells(fit)]
    warnings = json.loads(fit.attrs.get("warnings", "[]"))
    if warnings:
        lines += ["", "Warnings of the fit:", ""] + [f"- {w}" for w in warnings]
    return "\n".join(lines) + "\n"


def markdown_cells(fit) -> str:
    """The per-cell goodness of fit of a fit dataset as a markdown table: per condition and iteration the
    Anderson-Darling p-value of the normal shape and the z of the cell mean (fitting.goodness)."""
    iterations = [int(k) for k in fit["iteration"].values]
    lines = ["Goodness of fit per cell (fitting scale): Anderson-Darling p-value of the normal shape / "
             "standardized residual z of the mean; **bold** = p < 0.01.", "",
             "| condition | " + " | ".join(str(k) for k in iterations) + " |",
             "|---|" + "---:|" * len(iterations)]
    p_shape, z, p_mean = (fit[v].values for v in ("gof_shape_pvalue", "gof_mean_z", "gof_mean_pvalue"))
    for c, name in enumerate(fit["condition"].values):
        entries = []
        for k in range(len(iterations)):
            if not np.isfinite(z[c, k]):
                entries.append("")
                continue
            text = f"{'-' if not np.isfinite(p_shape[c, k]) else f'{p_shape[c, k]:.2g}'} / {z[c, k]:+.1f}"
            bad = (np.isfinite(p_shape[c, k]) and p_shape[c, k] < 0.01) or p_mean[c, k] < 0.01
            entries.append(f"**{text}**" if bad else text)
        lines.append(f"| {name} | " + " | ".join(entries) + " |")
    return "\n".join(lines)
