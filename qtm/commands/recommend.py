"""`qtm recommend CONFIG --scales 1,1.5,2.5,5,7.5 [--schedule exponential:scale=7.5,alpha=2]`: choose a CFG
scale, or a guidance schedule, from a cheap pilot instead of running the chain at every scale
(docs/recommend.md).

The shell glues the pilot (chain.pilot: M_0's images at every scale and at the reference scale, measured)
to the arithmetic (fitting.recommend: assayed windows, curves r1(s), r2(s), qtm's recursion, the bootstrap),
states the cost against the chain it replaces, and writes what was asked for. `qtm recommend-check` compares
a recommendation with a study's measured collapse rates.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer

from qtm.commands.common import (JsonFlag, PlotOut, check_output, console, fail, print_json, progress_bars,
                                 reported, writing)

FLAGS = {"scales": "--scales", "images": "--images", "after_iterations": "--after-iterations",
         "num_iterations": "--iterations", "heritability": "--heritability", "num_bootstrap": "--bootstrap-samples",
         "schedules": "--schedule"}

TOY_FINETUNE_SAMPLES_PER_S = 8.4
"""The toy world's finetuning rate on the 2-core CPU machine of benchmarks/RESULTS.md ("Toy loop", batch 6,
measured under load), used for the toy chain's finetuning when the pilot does not finetune itself."""
SD15_ANCHORS = {
    "source": "published anchors for one H100, derived from published figures, not measured by this project",
    "finetune_samples_per_s": (15.0, 25.0),  # LoRA, the paper's recipe, batch 6, cached latents, SDPA
    "images_per_s": (2.5, 3.5),  # 512 px, 30 Euler-a steps with CFG, batch 16-32
    "dataset_images": 833,  # the paper's Pokemon set
    "epochs": 100, "batch_size": 6, "num_steps": 30, "num_iterations": 6,
}


def parse_scales(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        fail(f"--scales {text!r}: give comma-separated numbers, e.g. 1,1.5,2.5,5,7.5")


def recommend(
    config: Annotated[Path, typer.Argument(help="TOML config of the chain to choose a scale for.")],
    scales: Annotated[str, typer.Option("--scales", help="Candidate constant CFG scales, comma-separated.")]
    = "1,1.5,2.5,5,7.5",
    schedule: Annotated[list[str] | None, typer.Option(
        "--schedule", help="A guidance schedule to assay beside the scales, NAME:KEY=VALUE,... with the keys of a "
                           "[[conditions]] table (e.g. exponential:scale=7.5,alpha=2; also condition_drop=, "
                           "name=); repeatable.")] = None,
    config_schedules: Annotated[bool, typer.Option(
        "--config-schedules", help="Also assay the config's [[conditions]] whose schedule is not constant.")]
    = False,
    images: Annotated[int, typer.Option("--images", help="Pilot images per scale (same prompts and seeds).")] = 128,
    after_iterations: Annotated[int, typer.Option(
        "--after-iterations", help="1: also finetune M_0 once on each scale's images and measure the response "
                                   "(the heritability); 0: a default heritability and its sensitivity.")] = 0,
    iterations: Annotated[int | None, typer.Option(
        "--iterations", help="K, the chain length to predict (default: the config's run.num_iterations).")] = None,
    heritability: Annotated[float | None, typer.Option(
        "--heritability", help="Use this h2 instead of the measured or default one.")] = None,
    bootstrap_samples: Annotated[int, typer.Option(
        "--bootstrap-samples", help="Bootstrap replicates (images resampled) for the intervals.")] = 200,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the bootstrap.")] = 0,
    out: Annotated[Path | None, typer.Option(
        "--out", help="Folder for pilot.nc (the pilot's phenotypes) and recommendation.json.")] = None,
    plot: PlotOut = None,
    pilot_file: Annotated[Path | None, typer.Option(
        "--pilot", help="Reuse the phenotypes of an earlier pilot (its pilot.nc) instead of generating: "
                        "the scales and images are the file's.")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bars.")] = True,
    json_output: JsonFlag = False,
) -> None:
    """Generate from M_0 at every scale, every schedule and the reference scale (shared seeds), assay the
    realized selection window of each, fit r1(s), r2(s) over the scales, predict each scale's and schedule's
    phenotype trajectory with qtm's recursion and recommend the one that keeps it closest to D_0, with a
    bootstrap interval and the cost against the chain."""
    import tempfile

    import numpy as np

    from chain.config import load_config
    from chain.pilot import check_pilot, config_schedules as schedules_of, parse_schedule, run_pilot
    from fitting.recommend import PilotData, RecommendConfig, recommend as recommend_scale, recommendation_json

    scale_values = parse_scales(scales)
    check_output("--plot", plot)
    if out is not None and out.exists() and not out.is_dir():
        fail(f"--out {out} is a file; give a folder")
    if pilot_file is not None and (schedule or config_schedules):
        fail("--pilot reuses the schedules of its file; drop --schedule and --config-schedules")
    with reported(FLAGS):
        cfg = load_config(config)
        schedules = tuple(parse_schedule(text) for text in schedule or ())
        if config_schedules:
            own = schedules_of(cfg)
            if not own:
                fail(f"--config-schedules: {config} has no [[conditions]] with a non-constant schedule")
            schedules += own
        check_pilot(cfg, scale_values, images, after_iterations, schedules)
        rec_config = RecommendConfig(num_iterations=iterations or cfg.run.num_iterations,
                                     heritability=heritability, num_bootstrap=bootstrap_samples)
        rec_config.validate()
    _quiet_libraries()
    with reported(FLAGS), progress_bars(enabled=progress and not json_output) as bars, \
            tempfile.TemporaryDirectory() as scratch:
        if pilot_file is not None:
            pilot = read_pilot(pilot_file)
            images = pilot.reference.size
        else:
            pilot = run_pilot(cfg, out if out is not None else scratch, scales=scale_values, images=images,
                              after_iterations=after_iterations, schedules=schedules, progress=bars)
        data = PilotData(np.asarray(pilot.scales), pilot.guided, pilot.reference, pilot.originals,
                         pilot.reference_next, pilot.reference_scale, schedules=schedule_data(pilot))
        result = recommend_scale(data, rec_config, rng=np.random.default_rng(seed))
    cost = cost_summary(cfg, pilot, num_iterations=rec_config.num_iterations, images=images)
    summary = recommendation_json(result, cost)
    if out is not None:
        from qtmio.strict_json import dumps_strict
        from qtmio.atomic import write_text_atomic
        from qtmio.netcdf import write_netcdf

        with writing("--out", out):
            write_netcdf(pilot_dataset(pilot, str(config)), out / "pilot.nc")
            write_text_atomic(out / "recommendation.json", dumps_strict(summary, indent=1))
    if plot is not None:
        from fitting.recommend_plotting import plot_recommendation

        with writing("--plot", plot):
            plot_recommendation(result, plot)
    if json_output:
        print_json(summary)
        return
    _render(summary, console())


def _quiet_libraries() -> None:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def schedule_data(pilot) -> tuple:
    """The pilot's schedules as fitting.recommend.ScheduleData (mean scale over the sampling steps)."""
    import numpy as np

    from fitting.recommend import ScheduleData

    return tuple(
        ScheduleData(name, dict(parameters), float(np.mean(pilot.schedule_step_scales[k])), pilot.schedule_guided[k],
                     None if pilot.schedule_reference_next is None else pilot.schedule_reference_next[k])
        for k, (name, parameters) in enumerate(zip(pilot.schedule_names, pilot.schedule_parameters)))


def pilot_dataset(pilot, config: str):
    """The pilot's phenotypes as a dataset: guided (scale, image), reference (image), originals, and
    reference_next (scale, image) after one finetuning when measured; with schedules, hf_power_schedule
    (schedule, image), schedule_step_scale (schedule, step), schedule_parameters (schedule: a JSON table)
    and hf_power_schedule_reference_next (schedule, image)."""
    import xarray as xr

    from qtmio.strict_json import dumps_strict

    data = {"hf_power": (("scale", "image"), pilot.guided),
            "hf_power_reference": (("image",), pilot.reference),
            "hf_power_originals": (("original",), pilot.originals)}
    if pilot.reference_next is not None:
        data["hf_power_reference_next"] = (("scale", "image"), pilot.reference_next)
    coords = {"scale": list(pilot.scales)}
    if pilot.schedule_names:
        coords["schedule"] = list(pilot.schedule_names)
        data["hf_power_schedule"] = (("schedule", "image"), pilot.schedule_guided)
        data["schedule_step_scale"] = (("schedule", "step"), pilot.schedule_step_scales)
        data["schedule_parameters"] = (("schedule",), [dumps_strict(p) for p in pilot.schedule_parameters])
        if pilot.schedule_reference_next is not None:
            data["hf_power_schedule_reference_next"] = (("schedule", "image"), pilot.schedule_reference_next)
    attrs = {"reference_scale": pilot.reference_scale, "config": config,
             **{f"cost_{k}": float(v) for k, v in pilot.cost.items()}}
    return xr.Dataset(data, coords=coords, attrs=attrs)


def read_pilot(path: Path):
    """A PilotResult from the pilot.nc of an earlier `qtm recommend --out` (the inverse of `pilot_dataset`)."""
    import numpy as np

    from chain.pilot import PilotResult
    from qtmio.netcdf import read_netcdf

    try:
        ds = read_netcdf(path)
    except (OSError, ValueError) as err:
        fail(f"--pilot {path}: cannot read ({err})")
    missing = [v for v in ("hf_power", "hf_power_reference", "hf_power_originals") if v not in ds]
    if missing:
        fail(f"--pilot {path} lacks {', '.join(missing)}: give the pilot.nc that qtm recommend --out wrote")
    nxt = ds["hf_power_reference_next"].values if "hf_power_reference_next" in ds else None
    cost = {k[len("cost_"):]: float(v) for k, v in ds.attrs.items() if k.startswith("cost_")}
    cost.setdefault("schedule_images", 0.0)  # a pilot written before schedules were assayed
    schedules = {}
    if "hf_power_schedule" in ds:
        try:
            parameters = tuple(json.loads(str(p)) for p in ds["schedule_parameters"].values)
        except (KeyError, ValueError) as err:
            fail(f"--pilot {path}: schedule_parameters unreadable ({err}); give the pilot.nc that qtm recommend "
                 "--out wrote")
        nxt_q = ds["hf_power_schedule_reference_next"].values if "hf_power_schedule_reference_next" in ds else None
        schedules = dict(schedule_names=tuple(str(q) for q in ds["schedule"].values), schedule_parameters=parameters,
                         schedule_step_scales=np.asarray(ds["schedule_step_scale"].values, float),
                         schedule_guided=np.asarray(ds["hf_power_schedule"].values, float),
                         schedule_reference_next=None if nxt_q is None else np.asarray(nxt_q, float))
    return PilotResult(tuple(float(s) for s in ds["scale"].values), float(ds.attrs.get("reference_scale", 1.0)),
                       np.asarray(ds["hf_power"].values, float), np.asarray(ds["hf_power_reference"].values, float),
                       np.asarray(ds["hf_power_originals"].values, float), nxt, cost, **schedules)


def cost_summary(cfg, pilot, *, num_iterations: int, images: int) -> dict[str, Any]:
    """The pilot's measured cost against the chain it replaces (one condition per scale and per schedule, K
    iterations, the config's images per iteration and finetuning recipe), and the same comparison for the
    paper's SD1.5 recipe from published GPU anchors."""
    from chain.finetune import num_training_steps
    from fitting.recommend import chain_cost, estimated_seconds

    n0 = len(pilot.originals)  # D_0's images, as the pilot read and measured them
    per_iteration = n0 * cfg.sampling.images_per_prompt
    samples = num_training_steps(per_iteration, cfg.finetune) * cfg.finetune.batch_size
    conditions = len(pilot.scales) + len(pilot.schedule_names)
    chain = chain_cost(num_conditions=conditions, num_iterations=num_iterations,
                       images_per_iteration=per_iteration, num_steps=cfg.sampling.num_steps, finetune_samples=samples)
    p = dict(pilot.cost)
    images_per_s = p["images_generated"] / p["generation_seconds"] if p["generation_seconds"] > 0 else None
    if p["finetune_seconds"] > 0:
        ft_rate, ft_source = p["finetune_samples"] / p["finetune_seconds"], "measured by this pilot"
    elif cfg.model.path == "toy":
        ft_rate, ft_source = TOY_FINETUNE_SAMPLES_PER_S, "the toy world's measured rate (benchmarks/RESULTS.md)"
    else:
        ft_rate, ft_source = None, "unknown (--after-iterations 1 measures it)"
    chain_seconds = estimated_seconds(chain, images_per_s=images_per_s, finetune_samples_per_s=ft_rate) \
        if images_per_s else None
    chain.update(estimated_seconds=chain_seconds, generation_rate_images_per_s=images_per_s,
                 finetune_rate_samples_per_s=ft_rate, finetune_rate_source=ft_source)

    def ratio(a, b):
        return a / b if a is not None and b else None

    # the paper's SD1.5 recipe: the same pilot (scales x images) against the chain it replaces
    a = SD15_ANCHORS
    sd_samples = a["epochs"] * math.ceil(a["dataset_images"] / a["batch_size"]) * a["batch_size"]
    sd_chain = chain_cost(num_conditions=conditions, num_iterations=a["num_iterations"],
                          images_per_iteration=a["dataset_images"], num_steps=a["num_steps"],
                          finetune_samples=sd_samples)
    pilot_samples = a["epochs"] * math.ceil(images / a["batch_size"]) * a["batch_size"]
    sd_pilot = {"images_generated": p["images_generated"], "reference_images": p["reference_images"],
                "finetune_samples": p["finetunings"] * pilot_samples}
    sd = {"anchors": a, "chain": sd_chain}
    for end, index in (("fast", 1), ("slow", 0)):
        rates = dict(images_per_s=a["images_per_s"][index], finetune_samples_per_s=a["finetune_samples_per_s"][index])
        sd[f"pilot_seconds_{end}"] = estimated_seconds(sd_pilot, **rates)
        sd[f"chain_seconds_{end}"] = estimated_seconds(sd_chain, **rates)
        sd[f"ratio_{end}"] = ratio(sd[f"pilot_seconds_{end}"], sd[f"chain_seconds_{end}"])
    return {
        "pilot": p,
        "chain": chain,
        "ratio": {"images": ratio(p["images_generated"] + p["reference_images"], chain["images_generated"]),
                  "unet_passes": ratio(p["unet_passes"], chain["unet_passes"]),
                  "seconds": ratio(p["seconds"], chain_seconds)},
        "sd15": sd,
    }


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def _render(summary: dict[str, Any], terminal) -> None:
    from rich.table import Table

    table = Table(title="Pilot: realized selection window per scale and predicted drift per iteration")
    for col in ("scale", "r1 [95 % CI]", "r2 [95 % CI]", "drift / iteration", "distance to D_0 (sd)"):
        table.add_column(col, justify="right")
    for i, s in enumerate(summary["scales"]):
        r1, r2 = summary["r1"][i], summary["r2"][i]
        table.add_row(f"{s:g}", f"{_fmt(r1['estimate'])} [{_fmt(r1['lower'])}, {_fmt(r1['upper'])}]",
                      f"{_fmt(r2['estimate'])} [{_fmt(r2['lower'])}, {_fmt(r2['upper'])}]",
                      _fmt(summary["predicted_drift"][i]), _fmt(summary["predicted_distance"][i]))
    terminal.print(table)
    if summary["schedules"]:
        table = Table(title="Schedules: realized selection window (same prompts and seeds) and predicted drift")
        for col in ("schedule", "parameters", "mean s", "r1 [95 % CI]", "r2 [95 % CI]", "drift / it.",
                    "dist. D_0 (sd)", "wins"):
            table.add_column(col, justify="right", overflow="fold")
        for q in summary["schedules"]:
            r1, r2 = q["r1"], q["r2"]
            parameters = {k: v for k, v in q["parameters"].items() if k != "schedule" and v != 0}
            table.add_row(q["name"], f"{q['parameters'].get('schedule', '')} "
                          + ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in parameters.items()),
                          _fmt(q["mean_scale"]),
                          f"{_fmt(r1['estimate'])} [{_fmt(r1['lower'])}, {_fmt(r1['upper'])}]",
                          f"{_fmt(r2['estimate'])} [{_fmt(r2['lower'])}, {_fmt(r2['upper'])}]",
                          _fmt(q["predicted_drift"]), _fmt(q["distance"]), _fmt(q["bootstrap_wins"], 2))
        terminal.print(table)
        for q in summary["schedules"]:
            if "note" in q:
                terminal.print(f"note: {q['name']}: {q['note']}", markup=False)
    rec, best, h2 = summary["recommended"], summary["best_constant_scale"], summary["heritability"]
    if rec["schedule"] is not None:
        terminal.print(f"recommended: schedule {rec['schedule']} (chosen in {_fmt(rec['bootstrap_support'], 2)} of "
                       f"the bootstrap replicates); best constant scale {_fmt(best['scale'])}", markup=False)
    label = "recommended scale" if rec["schedule"] is None else "best constant scale"
    terminal.print(f"{label}: {_fmt(best['scale'])} (95 % interval {_fmt(best['lower'])} to "
                   f"{_fmt(best['upper'])}), over K = {summary['num_iterations']} iterations, heritability "
                   f"{_fmt(h2['estimate'])} ({h2['source']})", markup=False)
    for row in summary["heritability_sensitivity"]:
        won = f", schedule {row['recommended_schedule']} closer" if row["recommended_schedule"] else ""
        terminal.print(f"  with h2 = {row['heritability']:g}: recommended scale {_fmt(row['recommended_scale'])}"
                       f"{won}", markup=False)
    cost = summary["cost"]
    terminal.print(f"cost: pilot {int(cost['pilot']['unet_passes']):,} UNet passes in {cost['pilot']['seconds']:.0f} s; "
                   f"the chain it replaces {int(cost['chain']['unet_passes']):,} passes and "
                   f"{cost['chain']['finetunings']} finetunings, about {_fmt(cost['chain']['estimated_seconds'])} s "
                   f"(ratio {_fmt(cost['ratio']['seconds'])} in time, {_fmt(cost['ratio']['unet_passes'])} in UNet "
                   f"passes); SD1.5 recipe on one H100 (published anchors): ratio {_fmt(cost['sd15']['ratio_slow'])}"
                   f" to {_fmt(cost['sd15']['ratio_fast'])}", markup=False)


def recommend_check(
    recommendation: Annotated[Path, typer.Argument(help="recommendation.json (qtm recommend --out).")],
    run: Annotated[Path, typer.Argument(help="A study's run folder (metrics.nc) or .nc file.")],
    metric: Annotated[str, typer.Option("--metric", help="The metric whose collapse rate (Eq. 3) is compared.")]
    = "fd_dinov2",
) -> None:
    """Compare a recommendation with a study: Spearman's rank correlation between predicted |drift| and the
    measured collapse rate (FD_K - FD_1) / (K - 1) over the constant-CFG scales, and whether the recommended
    scale is among the two best measured. Prints one JSON object."""
    from fitting.recommend import compare_with_study

    try:
        rec = json.loads(recommendation.read_text())
    except (OSError, ValueError) as err:
        fail(f"{recommendation}: cannot read a recommendation ({err})")
    with reported():
        result = compare_with_study(rec, measured_collapse_rates(run, metric))
    print_json(result)


def measured_collapse_rates(run: Path, metric: str = "fd_dinov2") -> dict[float, float]:
    """{scale: collapse rate} of a study's constant-CFG conditions: chain.metrics.collapse_rate of the metric's
    mean over iterations 1..K (Eq. 3, (m_K - m_1) / (K - 1)); conditions with missing iterations are left out."""
    import numpy as np

    from chain.metrics import collapse_rate
    from qtmio.netcdf import read_netcdf

    path = run / "metrics.nc" if run.is_dir() else run
    try:
        ds = read_netcdf(path)
    except (OSError, ValueError) as err:
        fail(f"{path}: cannot read ({err})")
    if metric not in ds:
        fail(f"{path} has no variable {metric!r}; choose --metric among {', '.join(sorted(ds.data_vars))}")
    rates = {}
    for c in ds.condition.values:
        cell = ds.sel(condition=c)
        if str(cell.cfg_schedule.values) != "constant":
            continue
        values = cell[metric]
        if "image" in values.dims:
            values = values.mean("image")
        y = np.asarray(values.sel(iteration=slice(1, None)).values, float)
        if y.size >= 2 and np.all(np.isfinite(y)):
            rates[float(cell.cfg_scale.values)] = collapse_rate(y, np.arange(1, y.size + 1))
    return rates
