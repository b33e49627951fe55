"""The pilot of `qtm recommend`: M_0's images at every candidate CFG scale and at the reference scale, with
shared per-image seeds, measured; optionally after one finetuning per scale (the response of the next model).

    pilot = run_pilot(config, out_dir, scales=(1.0, 2.5, 7.5), images=128)
    pilot.guided        (S, n) phenotypes at each scale     pilot.reference (n,) at config.assay.reference_scale
    pilot.originals     (N0,) phenotypes of D_0             pilot.reference_next (S, n) or None
    pilot.cost          images, UNet passes and seconds, measured

Guidance schedules (ReDiFine's decay s_t = s0 exp(-alpha t / T) and the others of chain.guidance) are
assayed beside the constant scales: `run_pilot(..., schedules=[parse_schedule("exponential:scale=7.5,alpha=2")])`
adds pilot.schedule_guided (Q, n), generated like every guided set (both UNet passes at every step, as the
chain samples a schedule), and with after_iterations=1 the reference set of M_0 finetuned once on each
schedule's images with that schedule's condition drop.

Image i of every set has prompt i (D_0's captions in order, repeated when n exceeds them) and seed
image_seed(run seed, "pilot", 0, i), so the sets differ only by the guidance scale (the assay's pairing by
seed). Generation, measurement and finetuning are the chain's own (chain.sampling.generate,
chain.measure.measure, chain.finetune.finetune); the phenotype is measured on the 8-bit images the chain
would write. A scale equal to the reference scale reuses the reference set (at scale 1 the conditional pass
alone gives the CFG image up to rounding). Nothing is written except, for a "tiny" model, its base_model/
folder in out_dir (as a run does).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chain.config import ChainConfig, read_condition
from chain.errors import ConfigError
from chain.guidance import Constant, schedule_to_table

PURPOSE = "pilot"


@dataclasses.dataclass(frozen=True)
class PilotSchedule:
    """A guidance schedule the pilot assays: its label, the schedule (chain.guidance) and the condition-drop
    probability of its finetuning (used only when the pilot finetunes)."""

    name: str
    guidance: Any
    condition_drop: float = 0.0

    def parameters(self) -> dict[str, Any]:
        """The schedule's config-file table (`schedule` and its fields) and its condition_drop."""
        return {**schedule_to_table(self.guidance), "condition_drop": self.condition_drop}


def parse_schedule(text: str) -> PilotSchedule:
    """`NAME:KEY=VALUE,...` -> a PilotSchedule: NAME a registered schedule (chain.guidance), the keys those
    of a [[conditions]] table with that schedule (e.g. `exponential:scale=7.5,alpha=2,step_origin=0`), plus
    `condition_drop` and `name` (the label; default: the text itself). Checked like a config's condition."""
    import tomllib

    where = f"{{schedules}} {text!r}"
    head, _, rest = text.strip().partition(":")
    table: dict[str, Any] = {"schedule": head.strip()}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key or not value:
            raise ConfigError(f"{where}: {item!r} is not KEY=VALUE; write e.g. exponential:scale=7.5,alpha=2",
                              parameters=("schedules",))
        if key in table:
            raise ConfigError(f"{where}: {key!r} is given twice", parameters=("schedules",))
        try:
            table[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            table[key] = value
    label = table.pop("name", None)
    if table["schedule"] == "constant":
        raise ConfigError(f"{where}: a constant scale is one of {{scales}}, not a schedule",
                          parameters=("schedules", "scales"))
    try:
        condition = read_condition({"name": "schedule", **table}, "schedule", where)
    except ConfigError as err:
        raise ConfigError(err.template, parameters=("schedules",)) from None
    if label is not None and not isinstance(label, str):
        label = str(label)
    return PilotSchedule(label or text.strip(), condition.guidance, condition.condition_drop)


def config_schedules(config: ChainConfig) -> tuple[PilotSchedule, ...]:
    """The config's [[conditions]] whose schedule is not constant (a constant one is a scale), by name."""
    return tuple(PilotSchedule(c.name, c.guidance, c.condition_drop) for c in config.conditions
                 if not isinstance(c.guidance, Constant))


@dataclasses.dataclass
class PilotResult:
    """A pilot's phenotypes (image i shares its prompt and seed across sets) and what it cost."""

    scales: tuple[float, ...]
    reference_scale: float
    guided: np.ndarray  # (S, n)
    reference: np.ndarray  # (n,)
    originals: np.ndarray  # (N0,)
    reference_next: np.ndarray | None  # (S, n) after one finetuning per scale, or None
    cost: dict[str, float]
    schedule_names: tuple[str, ...] = ()
    schedule_parameters: tuple[dict[str, Any], ...] = ()  # PilotSchedule.parameters() of each
    schedule_step_scales: np.ndarray | None = None  # (Q, T) the scale at every sampling step
    schedule_guided: np.ndarray | None = None  # (Q, n)
    schedule_reference_next: np.ndarray | None = None  # (Q, n) after one finetuning per schedule, or None


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Images as the chain writes them (8-bit PNG: clamped, rounded to 1/255), so that the pilot measures the
    same phenotype as a run."""
    return images.clamp(0.0, 1.0).mul(255.0).round().div(255.0)


def pilot_prompts(captions: Sequence[str], images: int) -> list[str]:
    """Prompt i = caption i mod len(captions): D_0's captions in order, repeated as needed."""
    return [captions[i % len(captions)] for i in range(images)]


def check_pilot(config: ChainConfig, scales: Sequence[float], images: int, after_iterations: int,
                schedules: Sequence[PilotSchedule] = ()) -> None:
    """Refuse settings the pilot cannot run, naming the option."""
    names = [s.name for s in schedules]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"{{schedules}}: the name {twice[0]!r} is used twice; give each schedule its own "
                          "name=...", parameters=("schedules",))
    if len(scales) < 3:
        raise ConfigError(f"{{scales}} needs at least 3 scales; got {list(scales)}", parameters=("scales",))
    if any(not s > 0 for s in scales) or sorted(set(scales)) != list(scales):
        raise ConfigError(f"{{scales}} must be positive, distinct and increasing; got {list(scales)}",
                          parameters=("scales",))
    if images < 8:
        raise ConfigError(f"{{images}} must be >= 8 (the window estimates need a sample); got {images}",
                          parameters=("images",))
    if after_iterations not in (0, 1):
        raise ConfigError(f"{{after_iterations}} must be 0 or 1; got {after_iterations}",
                          parameters=("after_iterations",))


def run_pilot(config: ChainConfig, out_dir: str | Path, *, scales: Sequence[float], images: int,
              after_iterations: int = 0, schedules: Sequence[PilotSchedule] = (),
              progress: Callable[[str, int], Callable[..., None]] | None = None) -> PilotResult:
    """Generate and measure the pilot (module docstring). `progress(description, total)` as chain.run's."""
    from accelerate import Accelerator

    from chain.data import load_captioned_folder
    from chain.inputs import prepare_data
    from chain.finetune import finetune
    from chain.measure import measure
    from chain.run import resolve_base_model
    from chain.sampling import generate, image_seed, make_generator

    scales = tuple(float(s) for s in scales)
    schedules = tuple(schedules)
    check_pilot(config, scales, images, after_iterations, schedules)
    progress = progress or (lambda description, total: (lambda *a, **k: None))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = config.run.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    accelerator = Accelerator(mixed_precision=config.finetune.mixed_precision, cpu=device == "cpu")
    originals = load_captioned_folder(
        prepare_data(config, out_dir), resolution=config.data.resolution, caption_extension=config.data.caption_extension,
        format=config.data.format, center_crop=config.data.center_crop, max_images=config.data.max_images,
    )
    base = resolve_base_model(config, out_dir)
    for module in base.modules():
        module.to(accelerator.device)
    prompts = pilot_prompts(originals.captions, images)
    seeds = [image_seed(config.run.seed, PURPOSE, 0, i) for i in range(images)]
    tau, steps = config.metrics.phenotype_tau, config.sampling.num_steps
    cost = {"images_generated": 0, "schedule_images": 0, "reference_images": 0, "unet_passes": 0,
            "generation_seconds": 0.0, "reference_seconds": 0.0, "finetunings": 0, "finetune_samples": 0,
            "finetune_seconds": 0.0, "measure_seconds": 0.0}

    def sample(model, schedule, label: str) -> tuple[np.ndarray, torch.Tensor, np.ndarray]:
        # a constant scale 1 is the conditional pass alone; every other schedule (a decaying one too, even
        # at steps where its scale is 1) makes both passes at every step, as the chain samples it
        conditional_only = isinstance(schedule, Constant) and schedule.scale_value == 1.0
        bar = progress(label, images)
        t0 = time.perf_counter()
        gen = generate(model, prompts, seeds, schedule, num_steps=steps, resolution=config.data.resolution,
                       clip_skip=config.finetune.clip_skip, batch_size=config.sampling.batch_size,
                       unconditional=not conditional_only, on_batch=lambda n: bar(n))
        seconds = time.perf_counter() - t0
        kind = "reference" if conditional_only else "generation"
        cost["reference_images" if conditional_only else "images_generated"] += images
        if not isinstance(schedule, Constant):
            cost["schedule_images"] += images
        cost[f"{kind}_seconds"] += seconds
        cost["unet_passes"] += images * steps * (1 if conditional_only else 2)
        t1 = time.perf_counter()
        hf = measure(quantize(gen.images), encoder=None, batch_size=config.metrics.batch_size, tau=tau).hf_power
        cost["measure_seconds"] += time.perf_counter() - t1
        return hf, gen.images, gen.scales

    def finetuned_reference(batch: torch.Tensor, condition_drop: float, key: int | str, label: str) -> np.ndarray:
        """M_0 finetuned once on `batch` (the config's recipe), then its reference set."""
        t1 = time.perf_counter()
        result = finetune(base, quantize(batch), prompts, config.finetune, condition_drop=condition_drop,
                          generator=make_generator(image_seed(config.run.seed, PURPOSE, 1, key, "train")),
                          accelerator=accelerator)
        cost["finetunings"] += 1
        cost["finetune_samples"] += result.num_steps * config.finetune.batch_size
        cost["finetune_seconds"] += time.perf_counter() - t1
        model = result.model
        for module in model.modules():
            module.eval()
        return sample(model, Constant(ref_scale), f"{label}: reference after finetuning")[0]

    t0 = time.perf_counter()
    originals_hf = measure(originals.images, encoder=None, batch_size=config.metrics.batch_size, tau=tau).hf_power
    cost["measure_seconds"] += time.perf_counter() - t0
    ref_scale = float(config.assay.reference_scale)
    reference = sample(base, Constant(ref_scale), f"reference (scale {ref_scale:g})")[0]
    guided = np.empty((len(scales), images))
    reference_next = np.empty((len(scales), images)) if after_iterations else None
    for j, scale in enumerate(scales):
        if scale == ref_scale:
            guided[j], batch = reference, None
        else:
            guided[j], batch, _ = sample(base, Constant(scale), f"scale {scale:g}")
        if after_iterations:
            if batch is None:  # the reference set is the guided set of this scale: regenerate its images
                _, batch, _ = sample(base, Constant(scale), f"scale {scale:g}")
            reference_next[j] = finetuned_reference(batch, 0.0, j, f"scale {scale:g}")
    q = len(schedules)
    schedule_guided = np.empty((q, images))
    schedule_next = np.empty((q, images)) if after_iterations else None
    step_scales = np.empty((q, steps))
    for k, schedule in enumerate(schedules):
        schedule_guided[k], batch, step_scales[k] = sample(base, schedule.guidance, f"schedule {schedule.name}")
        if after_iterations:
            # the seed key of a schedule's finetuning differs from every scale's (an index)
            schedule_next[k] = finetuned_reference(batch, schedule.condition_drop, f"schedule{k}",
                                                   f"schedule {schedule.name}")
    cost["seconds"] = sum(cost[k] for k in ("generation_seconds", "reference_seconds", "finetune_seconds",
                                             "measure_seconds"))
    return PilotResult(scales, ref_scale, guided, reference, originals_hf, reference_next, cost,
                       schedule_names=tuple(s.name for s in schedules),
                       schedule_parameters=tuple(s.parameters() for s in schedules),
                       schedule_step_scales=step_scales, schedule_guided=schedule_guided,
                       schedule_reference_next=schedule_next)
