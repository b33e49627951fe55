"""The toy study's outcome tables and its collapse figure, from the committed files only.

    python studies/toy/outcome.py studies/toy

reads `metrics.nc` (the study's run, every per-iteration metric and every image's phenotype), `fit.json`
(`qtm fit ... --json`) and `assay.json` (`qtm assay ... --json`) in that folder, writes `collapse.png` (the
paper's Fig. 2 / Fig. 6 analogue: the collapse rate of FD, Eq. 3, against FD_1 per condition) and prints the
README's tables as Markdown. Conditions that have not finished every iteration are listed as such and left out
of the collapse rate (Eq. 3 needs iterations 1 and K).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import xarray as xr

from chain.metrics import collapse_rate
from qtmio.figures import figure, save_figure


def finished_iterations(metrics: xr.Dataset, condition: str) -> list[int]:
    """Iterations k >= 1 of `condition` whose cell is complete (the `completed` flag of the run folder)."""
    done = metrics["completed"].sel(condition=condition).values.astype(bool)
    return [int(k) for k, ok in zip(metrics["iteration"].values, done) if ok and k >= 1]


def condition_label(metrics: xr.Dataset, condition: str) -> str:
    """The guidance of a condition in words: 'CFG 2.5' or 'ReDiFine (7.5, alpha 2, drop 0.2)'."""
    cell = metrics.sel(condition=condition)
    schedule = str(cell["cfg_schedule"].values)
    scale = float(cell["cfg_scale"].values)
    if schedule == "constant":
        label = f"CFG {scale:g}"
    else:
        label = f"{schedule} from {scale:g}"
    drop = float(cell["condition_drop"].values)
    return label + (f", drop {drop:g}" if drop > 0 else "")


def collapse_table(metrics: xr.Dataset) -> list[dict]:
    """Per condition: FD_1, FD_K, the collapse rate of FD (Eq. 3), the phenotype's mean at 0, 1 and K with its
    change per iteration, recall at K; `None` where the condition has not reached K."""
    num_iterations = int(metrics["iteration"].max())
    rows = []
    for condition in [str(c) for c in metrics["condition"].values]:
        done = finished_iterations(metrics, condition)
        complete = done == list(range(1, num_iterations + 1))
        fd = metrics["fd_dinov2"].sel(condition=condition).values
        hf = metrics["hf_power"].sel(condition=condition).mean("image").values
        row = {"condition": condition, "guidance": condition_label(metrics, condition), "finished": len(done),
               "fd_1": float(fd[1]) if 1 in done else None,
               "fd_K": float(fd[num_iterations]) if complete else None,
               "collapse_rate_fd": collapse_rate(fd) if complete else None,
               "hf_0": float(hf[0]), "hf_1": float(hf[1]) if 1 in done else None,
               "hf_K": float(hf[num_iterations]) if complete else None,
               "hf_rate": collapse_rate(hf) if complete else None,
               "recall_K": float(metrics["recall"].sel(condition=condition).values[num_iterations])
               if complete else None}
        rows.append(row)
    return rows


def plot_collapse(rows: list[dict], path: Path) -> Path:
    """Fig. 2 / Fig. 6 analogue: collapse rate of FD (Eq. 3) against FD_1, one point per finished condition."""
    fig = figure(figsize=(5.6, 4.2))
    ax = fig.subplots()
    for row in rows:
        if row["collapse_rate_fd"] is None:
            continue
        ax.scatter(row["fd_1"], row["collapse_rate_fd"], s=36)
        ax.annotate(row["guidance"], (row["fd_1"], row["collapse_rate_fd"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    ax.set_xlabel("FD between iteration 1 and the original images (toy encoder)")
    ax.set_ylabel("collapse rate (FD_K - FD_1) / (K - 1)")
    ax.set_title("How fast each condition collapses (lower is slower)")
    ax.grid(alpha=0.3)
    return save_figure(fig, path, tight=True)


def _num(x, fmt: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, fmt)


def _interval(entry: dict | None, fmt: str = ".2f") -> str:
    if not entry or entry.get("estimate") is None:
        return "-"
    lo, hi = entry.get("lower"), entry.get("upper")
    bounds = f" [{_num(lo, fmt)}, {_num(hi, fmt)}]" if lo is not None and hi is not None else ""
    return _num(entry["estimate"], fmt) + bounds


def window_side_by_side(fit: dict, assay: dict) -> list[dict]:
    """Per condition: the fit's r1, r2 (one window for all iterations, with its 95 % interval) beside the
    assay's (one window per iteration k >= 1: their mean and range), the assay's preferred change per iteration
    (truncation / shift / scale / none, counted) and its realized heritability."""
    rows = []
    for name, params in fit["conditions"].items():
        entry = assay["conditions"].get(name)
        row = {"condition": name, "fit_r1": params.get("r1"), "fit_r2": params.get("r2")}
        if entry is not None:
            for side in ("r1", "r2"):
                values = [it[side]["estimate"] for it in entry["iterations"] if it.get(side)
                          and it[side].get("estimate") is not None]
                row[f"assay_{side}"] = (float(np.mean(values)), float(np.min(values)), float(np.max(values))) \
                    if values else None
            best = [it.get("truncation_test", {}).get("best", "-") for it in entry["iterations"]]
            row["assay_change"] = ", ".join(f"{b} {best.count(b)}" for b in dict.fromkeys(best))
            row["realized_heritability"] = entry.get("realized_heritability")
        rows.append(row)
    return rows


def _heritability(entry: dict | None) -> str:
    """h2 with its interval, or 'n.m.' where the assay marks it not meaningful (S below the floor)."""
    if isinstance(entry, dict) and entry.get("meaningful") is False:
        return "n.m."
    return _interval(entry)


def _mean_range(value) -> str:
    return "-" if value is None else f"{value[0]:.3f} ({value[1]:.3f}-{value[2]:.3f})"


def markdown_tables(metrics: xr.Dataset, fit: dict | None, assay: dict | None) -> str:
    rows = collapse_table(metrics)
    out = ["| condition | guidance | iterations done | FD_1 | FD_K | collapse rate (FD, Eq. 3) | hf_power 0 / 1 / K "
           "| hf_power change per iteration (Eq. 3) | recall_K |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['condition']} | {r['guidance']} | {r['finished']} | {_num(r['fd_1'], '.1f')} | "
                   f"{_num(r['fd_K'], '.1f')} | {_num(r['collapse_rate_fd'], '.2f')} | {_num(r['hf_0'])} / "
                   f"{_num(r['hf_1'])} / {_num(r['hf_K'])} | {_num(r['hf_rate'], '+.4f')} | {_num(r['recall_K'], '.2f')} |")
    means = metrics["hf_power"].mean("image")
    out += ["", "Mean hf_power per iteration (guided images; iteration 0 = D_0):", "",
            "| condition | " + " | ".join(str(int(k)) for k in metrics["iteration"].values) + " |",
            "|---|" + "---|" * metrics.sizes["iteration"]]
    for condition in [str(c) for c in metrics["condition"].values]:
        done = set(finished_iterations(metrics, condition)) | {0}
        vals = [_num(float(v)) if int(k) in done else "-" for k, v in
                zip(metrics["iteration"].values, means.sel(condition=condition).values)]
        out.append(f"| {condition} | " + " | ".join(vals) + " |")
    if fit is not None:
        out += ["", "Trajectory fit (`qtm fit`), 95 % intervals:", "", "| condition | r1 | r2 |", "|---|---|---|"]
        for name, params in fit["conditions"].items():
            out.append(f"| {name} | {_interval(params.get('r1'))} | {_interval(params.get('r2'))} |")
        shared = fit.get("shared", {})
        out.append("")
        out.append("Shared: " + ", ".join(f"{k} {_interval(v, '.3f')}" for k, v in shared.items()
                                          if isinstance(v, dict)))
    if fit is not None and assay is not None:
        out += ["", "Selection window, fit against assay (assay: mean over iterations 1-K and range):", "",
                "| condition | r1 fit [95 %] | r1 assay | r2 fit [95 %] | r2 assay | assay's preferred change "
                "(iterations) | realized h2 [95 %] |", "|---|---|---|---|---|---|---|"]
        for r in window_side_by_side(fit, assay):
            realized = r.get("realized_heritability")
            h2 = _heritability(realized)
            out.append(f"| {r['condition']} | {_interval(r['fit_r1'], '.3f')} | {_mean_range(r.get('assay_r1'))} | "
                       f"{_interval(r['fit_r2'], '.3f')} | {_mean_range(r.get('assay_r2'))} | "
                       f"{r.get('assay_change', '-')} | {h2} |")
    if assay is not None:
        out += ["", "Selection assay (`qtm assay`), per iteration, 95 % bootstrap intervals:", "",
                "| condition | k | r1 | r2 | S | R | h2 | test |", "|---|---|---|---|---|---|---|---|"]
        for name, entry in assay["conditions"].items():
            for it in entry["iterations"]:
                test = it.get("truncation_test", {}).get("best", "-")
                out.append(f"| {name} | {it['iteration']} | {_interval(it.get('r1'))} | {_interval(it.get('r2'))} | "
                           f"{_interval(it.get('selection_differential'), '.3f')} | "
                           f"{_interval(it.get('response'), '.3f')} | {_heritability(it.get('heritability'))} | {test} |")
            realized = entry.get("realized_heritability")
            if isinstance(realized, dict):
                out.append(f"| {name} | all | | | | | realized (cumulative): {_heritability(realized)} | |")
    return "\n".join(out)


def main(folder: str) -> None:
    root = Path(folder)
    metrics = xr.load_dataset(root / "metrics.nc")
    fit = json.loads((root / "fit.json").read_text()) if (root / "fit.json").is_file() else None
    assay = json.loads((root / "assay.json").read_text()) if (root / "assay.json").is_file() else None
    plot_collapse(collapse_table(metrics), root / "collapse.png")
    print(markdown_tables(metrics, fit, assay))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).parent))
