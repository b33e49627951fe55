"""`qtm demo`: the paper's whole experiment on the embedded toy world, end to end on a laptop CPU.

1. D_0: the procedural captioned toy images (chain.toy.make_toy_dataset), written into the run folder.
2. The Chain of Diffusion (chain.run.run_chain) from the committed toy base model, for a low CFG, a high
   CFG and ReDiFine (exponentially decaying CFG + condition drop), measured with the toy feature encoder;
   with the selection assay's reference set (every iteration's images once more at scale 1, unguided).
3. `qtm fit --drift` on the measured phenotypes (fitting.driver.fit_observations) -> fit.nc.
4. `qtm report` on the run folder -> report/, the selection assay included (report/assay.nc, assay.png and
   the assay against the fit).

Rerunning continues where a previous run stopped (the chain is resumable; the fit and report are redone).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Annotated

import typer

from qtm.commands.common import JsonFlag, console, fail, note, print_json, progress_bars, reported

FLAGS = {"out_dir": "--out"}
"""run_chain's arguments -> this command's flags."""


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """The size of the demo chain. Defaults are the full demo; `quick()` the smoke-test size."""

    num_images: int = 48
    num_iterations: int = 4
    num_steps: int = 30
    epochs: int = 4
    rank: int = 16
    alpha: float = 16.0
    unet_lr: float = 1e-3
    text_encoder_lr: float = 5e-4
    batch_size: int = 6
    sampling_batch_size: int = 24  # two batches per iteration: one per core (chain.sampling.cpu_workers)
    low_cfg: float = 1.0
    high_cfg: float = 7.5
    redifine_alpha: float = 2.0
    redifine_drop: float = 0.2

    @classmethod
    def quick(cls) -> "DemoSettings":
        return cls(num_images=16, num_iterations=2, num_steps=10, epochs=2, sampling_batch_size=8)


def demo_config(data_dir: Path, settings: DemoSettings, *, seed: int):
    """The chain configuration of the demo (the same tables a TOML config would hold)."""
    from chain.config import config_from_dict
    from chain.toy import toy_base_model_dir

    s = settings
    return config_from_dict({
        "run": {"num_iterations": s.num_iterations, "seed": seed, "device": "cpu", "dataset_name": "toy-d0"},
        "data": {"path": str(data_dir.resolve()), "caption_extension": ".txt", "resolution": 32},
        "model": {"path": str(toy_base_model_dir())},
        "finetune": {"rank": s.rank, "alpha": s.alpha, "unet_lr": s.unet_lr, "text_encoder_lr": s.text_encoder_lr,
                     "batch_size": s.batch_size, "epochs": s.epochs, "mixed_precision": "no", "clip_skip": 2},
        "sampling": {"num_steps": s.num_steps, "batch_size": s.sampling_batch_size, "images_per_prompt": 1},
        # 32-pixel images: the threshold keeps the 5.1 cycles per image of tau = 0.02 at 256 pixels
        # (0.02 cycles/pixel lies below the lowest non-zero frequency of a 32-pixel image, 1/32).
        "metrics": {"phenotype_tau": 0.02 * 256 / 32},
        # the selection assay's reference set: every generated image once more from the same M_k and seed,
        # unguided (scale 1: the conditional pass only)
        "assay": {"images": s.num_images, "reference_scale": 1.0},
        "conditions": [
            {"name": f"cfg{s.low_cfg:g}", "schedule": "constant", "scale": s.low_cfg},
            {"name": f"cfg{s.high_cfg:g}", "schedule": "constant", "scale": s.high_cfg},
            {"name": "redifine", "schedule": "exponential", "scale": s.high_cfg, "alpha": s.redifine_alpha,
             "condition_drop": s.redifine_drop},
        ],
    }, where="qtm demo")


def run_demo(out: Path, settings: DemoSettings, *, seed: int = 0, progress: bool = True) -> dict:
    """Run the four steps; returns the paths written and the wall time of each step."""
    import jax
    from rich.console import Console

    from chain.config import config_to_toml
    from chain.errors import RunError
    from chain.run import run_chain
    from chain.toy import load_toy_encoder, make_toy_dataset
    from fitting.driver import FitConfig, fit_observations
    from fitting.model import ModelSpec
    from fitting.observations import load_observations
    from fitting.results import write_fit
    from qtm.commands.report import build_report
    from qtmio.contract import FIT_FILE, METRICS_FILE

    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    data_dir = out / "data"
    config = demo_config(data_dir, settings, seed=seed)
    previous = out / "config.toml"
    if (out / METRICS_FILE).exists() and previous.is_file() and previous.read_text() != config_to_toml(config):
        # checked before D_0 is touched, so another run's images are never rewritten
        from chain.resume import config_change_problem

        problem = config_change_problem(previous.read_text(), config, str(previous))
        if problem:
            raise RunError(problem, parameters=("out_dir",))
    # D_0 is a pure function of the seed: (re)write it unless exactly the expected image/caption pairs are
    # there (a demo killed while writing it leaves a partial folder; rewriting gives the same bytes).
    pngs = sorted(data_dir.glob("*.png"))
    if len(pngs) != settings.num_images or not all(p.with_suffix(".txt").is_file() for p in pngs):
        make_toy_dataset(data_dir, num_images=settings.num_images, seed=seed, resolution=32, distribution="d0")
    with progress_bars(enabled=progress) as bars:
        run_chain(config, out, progress=bars, encoder=load_toy_encoder(), notify=note)
    seconds["chain"] = time.perf_counter() - t0

    status = Console(stderr=True, quiet=not progress).status
    t1 = time.perf_counter()
    with status("qtm fit: selection per condition from the measured phenotypes"):
        # Every generated image is measured and is the next iteration's training set: the chain's own
        # finite-population drift belongs in the likelihood (fitting.drift).
        config_fit = FitConfig(spec=ModelSpec(drift=True))
        result = fit_observations(load_observations(out), config_fit, key=jax.random.key(seed))
        fit_path = write_fit(result, out / FIT_FILE, seed=seed, command="qtm demo")
    seconds["fit"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    with status("qtm report: figures and report.md"):
        report = build_report(out, fit_path=fit_path)
    seconds["report"] = time.perf_counter() - t2
    return {"run_dir": str(out), "metrics": str(out / METRICS_FILE), "fit": str(fit_path),
            "report": report["report"], "assay": str(out / "report" / "assay.nc"),
            "figures": report["figures"], "rows": report["rows"],
            "fit_warnings": list(result.warnings), "seconds": seconds}


def demo(
    out: Annotated[Path, typer.Option("--out", help="Run folder (resumable).")] = Path("results/demo"),
    quick: Annotated[bool, typer.Option("--quick", help="A smaller chain (smoke test, ~2 minutes).")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of D_0, finetuning and sampling.")] = 0,
    json_output: JsonFlag = False,
) -> None:
    """The whole loop on the embedded toy world: chain (low CFG, high CFG, ReDiFine), fit, assay, report."""
    if seed < 0:
        fail(f"--seed {seed}: must be >= 0")
    if out.exists() and not out.is_dir():
        fail(f"--out {out} exists and is not a directory")
    settings = DemoSettings.quick() if quick else DemoSettings()
    with reported(FLAGS):
        result = run_demo(out, settings, seed=seed, progress=not json_output)
    if json_output:
        print_json(result)
        return
    from rich.markup import escape

    terminal = console()
    for warning in result["fit_warnings"]:
        terminal.print(f"[yellow]fit warning:[/yellow] {escape(warning)}", highlight=False)
    times = ", ".join(f"{k} {v:.0f} s" for k, v in result["seconds"].items())
    terminal.print(escape(f"demo finished ({times}): metrics {result['metrics']}, fit {result['fit']}, "
                          f"report {result['report']}"), highlight=False)
