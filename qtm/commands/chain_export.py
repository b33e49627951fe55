"""`qtm chain export RUN --condition C --iteration K OUT`: one finetuned model of a run as a diffusers pipeline
folder plus a kohya-format LoRA file (chain.export, docs/export.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from qtm.commands.common import JsonFlag, console, note, print_json, reported

FLAGS = {"run_dir": "RUN", "condition": "--condition", "iteration": "--iteration", "out": "OUT"}
"""export_model's arguments -> this command's arguments."""


def export(
    run: Annotated[Path, typer.Argument(help="Run folder written by `qtm chain run --out`.")],
    out: Annotated[Path, typer.Argument(help="New (or empty) folder to write the export to.")],
    condition: Annotated[str, typer.Option("--condition", help="Condition name, as in the run's config.")],
    iteration: Annotated[int, typer.Option(
        "--iteration", help="Iteration k >= 1: the model M_k finetuned on D_{k-1}.")],
    json_output: JsonFlag = False,
) -> None:
    """Export M_k of one condition: base model + LoRA as a StableDiffusionPipeline folder with the chain's
    scheduler, the LoRA in kohya format, and the recipe that regenerates the chain's images exactly."""
    from chain.export import EXPORT_FILE, check_out, find_cell

    with reported(FLAGS):  # refused before any model is loaded
        find_cell(run, condition, iteration)
        check_out(out)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from chain.export import export_model

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    with reported(FLAGS):
        folder = export_model(run, condition, iteration, out, notify=note)
    import json

    recipe = json.loads((folder / EXPORT_FILE).read_text())
    summary = {"out": str(folder), "condition": condition, "iteration": iteration,
               "lora": str(folder / recipe["lora"]["diffusers"]),
               "kohya_lora": str(folder / recipe["lora"]["kohya"]),
               "recipe": str(folder / EXPORT_FILE), "num_images": recipe["num_images"]}
    if json_output:
        print_json(summary)
        return
    lora = recipe["lora"]
    console().print(
        f"exported M_{iteration} of {condition} to {folder}\n"
        f"  diffusers: StableDiffusionPipeline.from_pretrained + load_lora_weights ({lora['diffusers']})\n"
        f"  kohya / AUTOMATIC1111 / ComfyUI: {lora['kohya']}\n"
        f"  regenerate the chain's images: python {folder / 'regenerate.py'} {folder} 0 1 2 --out DIR (README.md)",
        markup=False, highlight=False)
