"""`qtm chain run CONFIG.toml --out results/NAME [--condition NAME ...]`: run or continue a Chain of Diffusion
(chain.run), all its conditions or a shard of them; `qtm chain conditions CONFIG.toml`: the condition names,
one per line (for job arrays, docs/scaling.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from qtm.commands.common import JsonFlag, console, fail, note, print_json, progress_bars, reported

FLAGS = {"out_dir": "--out", "overrides": "--set", "conditions": "--condition"}
"""load_config's and run_chain's arguments -> this command's flags."""


def run(
    config: Annotated[Path, typer.Argument(help="TOML config (see examples/tiny_cpu.toml, examples/paper_sd15.toml).")],
    out: Annotated[Path, typer.Option("--out", help="Run folder, e.g. results/NAME; rerunning continues it.")],
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", help="Override one config value, section.key=value (a TOML value), e.g. --set "
                      "sampling.num_steps=20 --set run.seed=3; repeatable. Stored in the run's config.toml.")] = None,
    conditions: Annotated[list[str] | None, typer.Option(
        "--condition", help="Run only this condition of the config (a shard); repeatable. Processes with "
                            "different conditions may run at once on one --out (docs/scaling.md).")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Rich progress bars.")] = True,
    json_output: JsonFlag = False,
) -> None:
    """Finetune and generate for every condition (or those named by --condition) and iteration; write
    metrics.nc after each one."""
    from chain.config import load_config

    if out.exists() and not out.is_dir():
        fail(f"--out {out} exists and is not a folder; name a new or existing run folder")
    with reported(FLAGS):  # checked before torch or any model is imported
        cfg = load_config(config, overrides or ())
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from chain.run import run_chain

    # The chain shows its own progress; the libraries' per-file loading bars would interleave with it.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    with reported(FLAGS), progress_bars(enabled=progress and not json_output) as bars:
        ds = run_chain(cfg, out, progress=bars, notify=note, conditions=conditions)
    ran = [str(c) for c in ds.condition.values if conditions is None or str(c) in conditions]
    summary = {
        "out": str(out),
        "metrics": str(Path(out) / "metrics.nc"),
        "conditions": ran,
        "iterations": int(ds.sizes["iteration"] - 1),
        "hf_power_mean": {
            c: [float(v) for v in ds.hf_power.sel(condition=c).mean("image", skipna=True).values] for c in ran
        },
    }
    if json_output:
        print_json(summary)
        return
    from rich.table import Table

    table = Table(title=f"hf_power mean per iteration ({summary['metrics']})")
    table.add_column("condition")
    for k in range(summary["iterations"] + 1):
        table.add_column(f"it {k}", justify="right")
    for c, values in summary["hf_power_mean"].items():
        table.add_row(c, *(f"{v:.4f}" for v in values))
    console().print(table)


def conditions(
    config: Annotated[Path, typer.Argument(help="TOML config of a chain run.")],
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", help="Override one config value, as for `qtm chain run`; repeatable.")] = None,
    json_output: JsonFlag = False,
) -> None:
    """Print the config's condition names, one per line, in run order (a job array picks the i-th)."""
    from chain.config import load_config

    with reported(FLAGS):
        cfg = load_config(config, overrides or ())
    names = [c.name for c in cfg.conditions]
    if json_output:
        print_json({"config": str(config), "conditions": names})
        return
    for name in names:
        typer.echo(name)
