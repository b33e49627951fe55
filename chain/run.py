"""The Chain of Diffusion driver (Section 3.1, Eq. 1-2): for every condition and k = 1..K,

    M_k = Finetune(M_0, D_{k-1}, P)      (LoRA, always from a pristine M_0; or continued, App. E.4)
    D_k = Generate(M_k, P)
    measure D_k, record it in metrics.nc (atomically, after every finished (condition, iteration))

Entry point: `run_chain(config, out_dir)`. A run directory holds config.toml (resolved), metrics.nc,
images/<condition>/<iteration>/<image>.png, lora/<condition>/<iteration>/ (diffusers layout), log.jsonl,
inputs.json (D_0's fingerprint), locks/<condition>.lock and run.lock (chain.runlock), data/ for data.source =
"toy", for a "tiny" model (SD or SDXL, model.kind) base_model/ and, with the selection assay on ([assay] images > 0), the reference
sets, images_reference/<condition>/<iteration>/<image>.png (see `reference_set`). Rerunning continues where
it stopped: finished cells are read back, the images a later iteration trains on are always read from their
PNG files (also in an uninterrupted run), and every random draw comes from generators seeded by (run seed,
condition, iteration, image), so an interrupted and resumed run gives the same metrics as an uninterrupted
one (on the same device).

A process may run a subset of the conditions (`conditions=`, `qtm chain run --condition`): a shard. Shards
with disjoint conditions work in one folder at once (docs/scaling.md): each holds the locks of its
conditions, the first to come prepares the shared state (D_0, config.toml, inputs.json, metrics.nc) under
the short run-wide lock, and each records its cells into metrics.nc by a read-modify-write under that lock,
so metrics.nc always holds every cell any shard has finished, and a sharded run equals a one-process run.

Reading order: `run_chain` (the loop) calls `open_run` (preflight, the conditions' locks, resume
checks, config.toml, D_0 and its fingerprint, the base model, metrics.nc with its provenance), `record_originals`
(D_0 as iteration 0) and `run_cell` for every (condition, iteration) not yet finished (train, generate,
save, the assay's reference set, measure, record).

The finetune+generate stage is injectable (`stages=`): any callable IterationJob -> IterationResult, so the
loop runs with stand-ins (tests use one that blurs its input). Progress is reported through callbacks the
caller passes in (`progress`, the shell draws them); the JSONL event log `log.jsonl` is part of the run.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import xarray as xr

from chain import store
from chain.config import ChainConfig, ConditionConfig, config_to_toml
from chain.data import CaptionedDataset, load_captioned_folder
from chain.errors import RunError
from chain.images import load_image, save_image
from chain.measure import Measurer, build_clip, build_encoder, measure
from chain.runlock import RunLock, hold_conditions, run_folder_lock, sweep_run_folder
from chain.sampling import image_seed, make_generator
from qtmio.atomic import write_text_atomic
from qtmio.contract import DATA_KIND_ATTR, METRICS_FILE, REFERENCE_PHENOTYPE
from qtmio.images import list_images
from qtmio.netcdf import read_netcdf, write_netcdf
from qtmio.provenance import provenance
from qtmio.strict_json import dumps_strict

PACKAGES = ("qtm", "torch", "diffusers", "transformers", "peft", "accelerate", "numpy", "xarray", "h5netcdf")


@dataclasses.dataclass(frozen=True)
class IterationJob:
    """Everything one (condition, iteration) needs. Images are (N, 3, R, R) float32 in [0, 1]."""

    config: ChainConfig
    condition: ConditionConfig
    iteration: int
    train_images: torch.Tensor
    train_captions: tuple[str, ...]
    prompts: tuple[str, ...]  # one per image to generate
    seeds: tuple[int, ...]  # one per image to generate
    train_seed: int
    lora_dir: Path
    previous_lora_dir: Path | None  # continual finetuning: start from this adapter


@dataclasses.dataclass
class IterationResult:
    """The generated images D_k (len(job.prompts), 3, R, R) in [0, 1] and optional diagnostics."""

    images: torch.Tensor
    train_loss: float = math.nan
    guidance_scale: np.ndarray | None = None  # (steps,)
    guidance_diff_norm: np.ndarray | None = None  # (steps,) mean over images
    latent_histogram: np.ndarray | None = None  # (bins,)


class Stages(Protocol):
    def __call__(self, job: IterationJob) -> IterationResult: ...


Progress = Callable[[str, int], Callable[..., None]]
"""`progress(description, total)` starts a bar and returns `update(advance=1, *, completed=None, total=None,
info="")`; a bar is done once it is complete. qtm.commands.common.progress_bars draws them with rich."""


def _no_progress(description: str, total: int) -> Callable[..., None]:
    return lambda *args, **kwargs: None


class RunLog:
    """The run's event log, one JSON object per line in log.jsonl (main process only; None: no log). Each
    line is appended under a lock on the file itself, so the shards of one folder never interleave lines."""

    def __init__(self, path: Path | None):
        self.path = path

    def event(self, kind: str, **fields) -> None:
        if self.path is None:
            return
        import fcntl

        row = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(), "event": kind, **fields}
        line = dumps_strict(row) + "\n"  # strict JSON: NaN -> null, inf -> "inf" (qtmio.strict_json)
        with open(self.path, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                fh.write(line)
                fh.flush()
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------------ the stages


class DiffusionStages:
    """The real stage: LoRA-finetune a copy of the pristine base model, save the adapter, generate.

    With several processes (accelerate launch) every process trains on its slice of each global batch and
    generates its share of the prompts; the images are gathered on every process.
    """

    def __init__(self, base, accelerator, log: RunLog | None = None, progress: Progress | None = None):
        self.base = base  # pristine M_0, never modified
        self.accelerator = accelerator
        self.log = log or RunLog(None)
        self.progress = progress or _no_progress

    def __call__(self, job: IterationJob) -> IterationResult:
        from accelerate.utils import gather_object

        from chain.finetune import finetune
        from chain.lora import save_model_lora
        from chain.sampling import generate, latent_histogram

        cfg = job.config
        acc = self.accelerator
        label = f"{job.condition.name} it {job.iteration}"
        bar = self.progress(f"{label} finetune", 1)
        t0 = time.perf_counter()

        def on_step(step, total, loss):
            rate = step * cfg.finetune.batch_size / max(time.perf_counter() - t0, 1e-9)
            bar(completed=step, total=total, info=f"loss {loss:.4f}  {rate:.1f} samples/s")
            if step == total or step % 50 == 0:
                self.log.event("finetune_step", condition=job.condition.name, iteration=job.iteration,
                               step=step, total=total, loss=loss, samples_per_s=rate)

        result = finetune(
            self.base, job.train_images, list(job.train_captions), cfg.finetune,
            condition_drop=job.condition.condition_drop, generator=make_generator(job.train_seed),
            accelerator=acc, init_lora=job.previous_lora_dir, on_step=on_step,
        )
        bar(completed=result.num_steps, total=result.num_steps)  # done (fewer steps than planned also end it)
        if acc.is_main_process:
            save_model_lora(job.lora_dir, result.model, result.lora_configs)
        acc.wait_for_everyone()

        indices = list(range(len(job.prompts)))
        t1 = time.perf_counter()
        generate_bar = self.progress(f"{label} generate", len(indices))
        generated = [0]

        def on_batch(n):
            generated[0] += n
            rate = generated[0] * acc.num_processes / max(time.perf_counter() - t1, 1e-9)
            generate_bar(n * acc.num_processes, info=f"{rate:.2f} images/s")

        with acc.split_between_processes(indices) as mine:
            gen = generate(
                result.model, [job.prompts[i] for i in mine], [job.seeds[i] for i in mine], job.condition.guidance,
                num_steps=cfg.sampling.num_steps, resolution=cfg.data.resolution, clip_skip=cfg.finetune.clip_skip,
                batch_size=cfg.sampling.batch_size, on_batch=on_batch,
            )
            parts = gather_object([(list(mine), gen.images, gen.latents, gen.guidance_diff_norm)])
        generate_bar(completed=len(indices))
        order = [i for part in parts for i in part[0]]
        images = torch.cat([p[1] for p in parts])[np.argsort(order)]
        latents = torch.cat([p[2] for p in parts])
        norms = torch.cat([p[3] for p in parts])
        counts, _ = latent_histogram(latents, cfg.sampling.latent_histogram_bins, cfg.sampling.latent_histogram_range)
        seconds = time.perf_counter() - t1
        self.log.event("generated", condition=job.condition.name, iteration=job.iteration,
                       images=len(indices), seconds=seconds, images_per_s=len(indices) / max(seconds, 1e-9),
                       finetune_seconds=result.seconds, finetune_steps=result.num_steps)
        return IterationResult(
            images=images,
            train_loss=float(np.mean(result.losses[-max(1, len(result.losses) // 10):])) if result.losses else math.nan,
            guidance_scale=gen.scales,
            guidance_diff_norm=norms.mean(dim=0).numpy(),
            latent_histogram=counts,
        )

    def reference(self, job: IterationJob, count: int, scale: float) -> torch.Tensor:
        """The reference set of `job` (generate_reference), generated like the guided images."""
        return generate_reference(self.base, job, count=count, scale=scale, accelerator=self.accelerator)


# ------------------------------------------------------------------------------------------------ the assay's reference set


def generate_reference(base, job: IterationJob, *, count: int, scale: float, accelerator) -> torch.Tensor:
    """Images (count, 3, R, R) in [0, 1] from M_k rebuilt as a copy of the pristine M_0 with the adapter saved
    in job.lora_dir (bit-exact, chain.lora.load_lora), for the first `count` prompts and seeds of the job (the
    guided images' own seeds, so reference image i and guided image i share their initial and ancestral
    noise), at the constant guidance scale `scale`; at scale 1 the unconditional pass is not made
    (e = e_c, the CFG formula at s = 1 up to rounding)."""
    from accelerate.utils import gather_object

    from chain.guidance import Constant
    from chain.finetune import place_for_training
    from chain.lora import add_model_lora, load_model_lora
    from chain.sampling import generate

    cfg = job.config
    model = base.copy()
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.finetune.mixed_precision, torch.float32)
    place_for_training(model, accelerator.device, weight_dtype)  # as chain.finetune leaves M_k
    add_model_lora(model, cfg.finetune, generator=make_generator(0))  # then overwritten
    load_model_lora(job.lora_dir, model)
    for module in model.modules():
        module.eval()
    indices = list(range(count))
    with accelerator.split_between_processes(indices) as mine:
        gen = generate(
            model, [job.prompts[i] for i in mine], [job.seeds[i] for i in mine], Constant(scale),
            num_steps=cfg.sampling.num_steps, resolution=cfg.data.resolution, clip_skip=cfg.finetune.clip_skip,
            batch_size=cfg.sampling.batch_size, unconditional=scale != 1.0,
        )
        parts = gather_object([(list(mine), gen.images)])
    order = [i for part in parts for i in part[0]]
    return torch.cat([p[1] for p in parts])[np.argsort(order)]


def _reference_dir(out_dir: Path, condition: str, iteration: int) -> Path:
    return out_dir / "images_reference" / condition / str(iteration)


def reference_set(stages, job: IterationJob, out_dir: Path, *, is_main: bool) -> np.ndarray | None:
    """The selection assay's reference set of one (condition, iteration >= 1): generated by
    `stages.reference(job, count, scale)`, written to images_reference/<condition>/<k>/ (never part of a
    training set), read back and measured like the guided images. Returns the phenotypes (count,), None
    when the assay is off (assay.images = 0) or on processes other than the main one."""
    assay = job.config.assay
    if assay.images == 0:
        return None
    count = assay.images
    if count > len(job.prompts):
        raise RunError(
            f"assay.images = {count} but an iteration holds {len(job.prompts)} images: the reference set takes "
            "the first assay.images prompts; lower assay.images"
        )
    make = getattr(stages, "reference", None)
    if make is None:
        raise RunError("assay.images > 0 needs a stage with a reference(job, count, scale) method; "
                       "set assay.images = 0 or give the stage one")
    images = make(job, count, assay.reference_scale)
    if images.shape[0] != count:
        raise RunError(f"reference stage returned {images.shape[0]} images, expected {count}")
    if not is_main:
        return None
    folder = _reference_dir(out_dir, job.condition.name, job.iteration)
    for i, image in enumerate(images):
        save_image(image, folder / f"{i:05d}.png")
    paths = list_images(folder)
    written = torch.stack([load_image(p) for p in paths[:count]])
    cfg = job.config
    return measure(written, encoder=None, batch_size=cfg.metrics.batch_size, tau=cfg.metrics.phenotype_tau).hf_power


# ------------------------------------------------------------------------------------------------ the run folder


def _check_or_write_config(config: ChainConfig, out_dir: Path) -> None:
    path = out_dir / "config.toml"
    text = config_to_toml(config)
    produced = (out_dir / METRICS_FILE).exists() or tiny_base_model_folder(out_dir).exists()
    if path.exists() and produced:  # before anything is produced a corrected config simply replaces it
        from chain.resume import config_change_problem

        recorded = path.read_text()
        if recorded == text:
            return
        problem = config_change_problem(recorded, config, str(path))  # names the fields that differ
        if problem:
            raise RunError(problem, parameters=("out_dir",))
    write_text_atomic(path, text)


TINY_BASE_MODEL = "base_model"   # the run folder's copy of a model.path = "tiny" base model


def tiny_base_model_folder(out_dir: Path) -> Path:
    """Where a run folder keeps the tiny base model it built (model.path = "tiny")."""
    return Path(out_dir) / TINY_BASE_MODEL


def write_tiny_base_model(config: ChainConfig, out_dir: Path) -> Path | None:
    """model.path = "tiny": build the tiny model into out_dir/base_model/ unless it is there (atomic); the
    folder, or None for any other model."""
    from chain.models import make_tiny_model, save_base_model

    if config.model.path != "tiny":
        return None
    folder = tiny_base_model_folder(out_dir)
    if not folder.is_dir():
        save_base_model(make_tiny_model(config.model.tiny, resolution=config.data.resolution,
                                        kind=config.model.kind), folder)
    return folder


def resolve_base_model(config: ChainConfig, out_dir: Path):
    """Load M_0 (offline). model.path = "tiny" builds the tiny model once into out_dir/base_model/; "toy" is
    the committed toy base model (chain.toy.toy_base_model_dir)."""
    from chain.models import ModelConfig, load_base_model

    if config.model.path == "tiny":
        folder = write_tiny_base_model(config, out_dir)
        return load_base_model(ModelConfig(path=str(folder), vae=config.model.vae, kind=config.model.kind))
    if config.model.path == "toy":
        from chain.toy import toy_base_model_dir

        return load_base_model(ModelConfig(path=str(toy_base_model_dir()), vae=config.model.vae))
    return load_base_model(config.model)


def _image_dir(out_dir: Path, condition: str, iteration: int) -> Path:
    return out_dir / "images" / condition / str(iteration)


def _lora_dir(out_dir: Path, condition: str, iteration: int) -> Path:
    return out_dir / "lora" / condition / str(iteration)


def _read_iteration_images(out_dir: Path, condition: str, iteration: int, expected: int) -> torch.Tensor:
    folder = _image_dir(out_dir, condition, iteration)
    paths = list_images(folder) if folder.is_dir() else []
    if len(paths) != expected:
        raise RunError(
            f"{folder} holds {len(paths)} images, expected {expected}: the run folder is damaged; delete the "
            f"folder and its lora/ twin and set completed = 0 for ({condition}, {iteration}), or start a new "
            "{out_dir}", parameters=("out_dir",)
        )
    return torch.stack([load_image(p) for p in paths])


def training_set(
    config: ChainConfig, out_dir: Path, condition: str, iteration: int, originals: CaptionedDataset
) -> tuple[torch.Tensor, tuple[str, ...]]:
    """The data M_k trains on: D_{k-1}, or with accumulation the last `accumulate_iterations` iterations
    (0 = all since D_0), with a fraction `real_mix_ratio` of generated images replaced by the original
    image of the same prompt (drawn once per (condition, iteration) from its own seed)."""
    ipp = config.sampling.images_per_prompt
    n = len(originals)
    window = config.run.accumulate_iterations
    first = 0 if window == 0 else max(0, iteration - window)
    images, captions = [], []
    generated: list[tuple[int, int]] = []  # (slot in the training set, prompt index) of generated images
    for j in range(first, iteration):
        offset = len(captions)
        if j == 0:
            images.append(originals.images)
            captions.extend(originals.captions)
            continue
        images.append(_read_iteration_images(out_dir, condition, j, n * ipp))
        captions.extend(originals.captions[i // ipp] for i in range(n * ipp))
        generated.extend((offset + i, i // ipp) for i in range(n * ipp))
    train = torch.cat(images)
    if config.run.real_mix_ratio > 0 and generated:
        generator = make_generator(image_seed(config.run.seed, condition, iteration, 0, "mix"))
        count = round(config.run.real_mix_ratio * len(generated))
        train = train.clone()
        for c in torch.randperm(len(generated), generator=generator)[:count].tolist():
            slot, prompt = generated[c]
            train[slot] = originals.images[prompt]
    return train, tuple(captions)


# ------------------------------------------------------------------------------------------------ the driver


@dataclasses.dataclass
class Run:
    """An opened run (`open_run`): what every cell of it shares. `metrics` is the dataset of metrics.nc as
    this process last read or wrote it (its own conditions' cells are always current), replaced by each
    recorded cell; `selected` are the conditions this process runs (all of the config's without a
    selection)."""

    config: ChainConfig
    out_dir: Path
    accelerator: Any
    originals: CaptionedDataset
    stages: Stages
    measurer: Measurer
    log: RunLog
    metrics: xr.Dataset
    notes: tuple[str, ...] = ()
    """What the user should know about the inputs (an older folder fingerprinted now, upscaled D_0 images)."""
    locks: list[RunLock] | None = None
    """The locks of the selected conditions (chain.runlock), held by the main process until `close`."""
    selected: tuple[str, ...] = ()

    def close(self) -> None:
        """Release the selected conditions (another process may run them from now on)."""
        for lock in self.locks or ():
            lock.release()
        self.locks = None

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / METRICS_FILE

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def images_per_prompt(self) -> int:
        return self.config.sampling.images_per_prompt

    @property
    def prompts(self) -> tuple[str, ...]:
        """One prompt per image of a generated iteration (each original caption images_per_prompt times)."""
        ipp = self.images_per_prompt
        return tuple(self.originals.captions[i // ipp] for i in range(len(self.originals) * ipp))

    def pending_cells(self) -> list[tuple[ConditionConfig, int]]:
        """The (condition, iteration >= 1) cells of the selected conditions not finished yet, in the order
        they run."""
        done = store.completed_cells(self.metrics)
        return [(condition, k) for condition in self.config.conditions if condition.name in self.selected
                for k in range(1, self.config.run.num_iterations + 1) if (condition.name, k) not in done]

    def record(self, condition: str | None, iteration: int, **values) -> bool:
        """Record one finished cell (condition None: iteration 0 of every condition, unless another shard
        recorded it already) into metrics.nc: read, fill and written atomically under the run-wide lock, so
        the cells other shards recorded meanwhile are kept. Main process only. Returns whether it wrote."""
        with run_folder_lock(self.out_dir):  # waits only while another shard records a cell: no note
            metrics = _read_metrics(self.metrics_path) if self.metrics_path.exists() else self.metrics
            write = condition is not None or (str(metrics.condition.values[0]), iteration) \
                not in store.completed_cells(metrics)
            if write:
                metrics = store.record(metrics, condition=condition, iteration=iteration, **values)
                write_netcdf(metrics, self.metrics_path)
            self.metrics = metrics
        return write


def _read_metrics(path: Path) -> xr.Dataset:
    return store.with_reference(read_netcdf(path))


def _waiting_note(notify: Callable[[str], None] | None) -> Callable[[str], None] | None:
    if notify is None:
        return None
    return lambda holder: notify(f"waiting for the run folder's shared files, in use by {holder}")


def select_conditions(config: ChainConfig, conditions: Sequence[str] | None) -> tuple[str, ...]:
    """The names of the conditions to run, in the config's order: all of them for None, else those named
    (each must be one of the config's; repeats count once). Raises RunError naming the unknown ones."""
    names = [c.name for c in config.conditions]
    if conditions is None:
        return tuple(names)
    unknown = [c for c in dict.fromkeys(conditions) if c not in names]
    if unknown:
        raise RunError(f"{{conditions}} {', '.join(map(repr, unknown))}: not a condition of the config; its "
                       f"conditions are {', '.join(names)}", parameters=("conditions",))
    if not conditions:
        raise RunError("{conditions} names no condition; name one or more of " + ", ".join(names),
                       parameters=("conditions",))
    return tuple(n for n in names if n in set(conditions))


def open_run(config: ChainConfig, out_dir: str | Path, *, encoder=None, stages: Stages | None = None,
             progress: Progress | None = None, conditions: Sequence[str] | None = None,
             notify: Callable[[str], None] | None = None) -> Run:
    """Open (or reopen) the run folder of `config` for the conditions named in `conditions` (None: all):
    check the device and the base model's shapes (chain.preflight), take the locks of those conditions
    (chain.runlock; a condition another process holds raises RunError naming it), then, under the run-wide
    lock (waited for; `notify` is told): sweep the temporaries of killed writes, write D_0 for data.source =
    "toy", check D_0 completely, check or write config.toml (a changed config is refused naming the fields,
    chain.resume; the full config is stored whichever conditions run) and D_0's fingerprint (inputs.json,
    chain.inputs), build the base model, and read metrics.nc (grown when run.num_iterations was raised,
    checked against the config) or create it with the run's provenance. Then build the stages. Raises
    ConfigError, DatasetError or RunError before anything is trained. The returned Run holds the
    conditions' locks: `close()` it when done."""
    from chain.preflight import preflight

    preflight(config)
    selected = select_conditions(config, conditions)
    out_dir = Path(out_dir)
    locks = hold_conditions(out_dir, selected)
    try:
        run = _open_locked(config, out_dir, selected, encoder=encoder, stages=stages, progress=progress,
                           notify=notify)
    except BaseException:
        for lock in locks or ():
            lock.release()
        raise
    return dataclasses.replace(run, locks=locks, selected=selected)


def _open_locked(config: ChainConfig, out_dir: Path, selected: tuple[str, ...], *, encoder, stages: Stages | None,
                 progress: Progress | None, notify: Callable[[str], None] | None) -> Run:
    from accelerate import Accelerator

    from chain.inputs import check_or_record_inputs, prepare_data, upscale_note

    out_dir.mkdir(parents=True, exist_ok=True)
    device = config.run.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    accelerator = Accelerator(mixed_precision=config.finetune.mixed_precision, cpu=device == "cpu")
    if stages is None and config.finetune.batch_size % accelerator.num_processes:
        raise RunError(
            f"finetune.batch_size = {config.finetune.batch_size} is not divisible by the "
            f"{accelerator.num_processes} processes: the global batch is split evenly; change one of them"
        )
    is_main = accelerator.is_main_process
    notes: tuple[str, ...] = ()
    # The shared state, prepared once whichever shard comes first (chain.runlock, the run-wide lock), in two
    # short spells: the files (D_0, config, fingerprint, a tiny base model folder), then metrics.nc. Loading
    # the base model and the encoders, which can take minutes, happens between them, outside the lock.
    with run_folder_lock(out_dir, on_wait=_waiting_note(notify), main=is_main):
        if is_main:
            sweep_run_folder(out_dir, selected)
        with accelerator.main_process_first():  # data.source = "toy": D_0 is written into the run folder once
            data_path = prepare_data(config, out_dir)
        originals = load_captioned_folder(
            data_path, resolution=config.data.resolution, caption_extension=config.data.caption_extension,
            format=config.data.format, center_crop=config.data.center_crop, max_images=config.data.max_images,
        )
        if is_main:
            _check_or_write_config(config, out_dir)
            problem, input_note = check_or_record_inputs(config, data_path, out_dir)  # D_0 fingerprint
            if problem:
                raise RunError(problem, parameters=("out_dir",))
            small = upscale_note(originals.root, originals.names, config.data.resolution)
            notes = tuple(n for n in (input_note, small) if n)
            if stages is None:
                write_tiny_base_model(config, out_dir)  # model.path = "tiny": built once into base_model/
        accelerator.wait_for_everyone()
    log = RunLog(out_dir / "log.jsonl" if is_main else None)
    progress = progress if progress is not None and is_main else _no_progress
    if stages is None:
        stages = DiffusionStages(resolve_base_model(config, out_dir), accelerator, log, progress)
    measurer = Measurer(config.metrics, encoder if encoder is not None else build_encoder(config, accelerator.device),
                        build_clip(config, accelerator.device))
    accelerator.wait_for_everyone()
    with run_folder_lock(out_dir, main=is_main):
        num_images = len(originals) * config.sampling.images_per_prompt
        path = out_dir / METRICS_FILE
        if path.exists():
            recorded = read_netcdf(path)
            changed = REFERENCE_PHENOTYPE not in recorded  # a file from before the assay gains the variable
            metrics = store.with_reference(recorded)
            if metrics.sizes["iteration"] < config.run.num_iterations + 1:  # num_iterations raised: continue
                from chain.resume import extend_iterations

                metrics = extend_iterations(metrics, config.run.num_iterations, config_to_toml(config))
                changed = True
            _check_resumed_metrics(config, metrics, path, num_images, data_path)
        else:
            metrics = _new_metrics(config, num_images, measurer.encoder)
            changed = True
        if config.assay.images and metrics[REFERENCE_PHENOTYPE].attrs.get("reference_scale") \
                != config.assay.reference_scale:
            metrics[REFERENCE_PHENOTYPE].attrs["reference_scale"] = config.assay.reference_scale
            changed = True
        if changed and is_main:  # from here on the folder holds results: shards compare configs with it
            write_netcdf(metrics, path)
        accelerator.wait_for_everyone()
    return Run(config, out_dir, accelerator, originals, stages, measurer, log, metrics, notes)

def _check_resumed_metrics(config: ChainConfig, metrics: xr.Dataset, path: Path, num_images: int,
                           data_path: Path) -> None:
    expected = [c.name for c in config.conditions]
    if list(map(str, metrics.condition.values)) != expected \
            or metrics.sizes["iteration"] != config.run.num_iterations + 1:
        raise RunError(f"{path} does not match the config's conditions/iterations; use a new {{out_dir}}",
                       parameters=("out_dir",))
    if metrics.sizes["image"] != num_images:
        n, ipp = num_images // config.sampling.images_per_prompt, config.sampling.images_per_prompt
        raise RunError(
            f"{path} holds {metrics.sizes['image']} images per iteration but {data_path} now gives "
            f"{num_images} ({n} images x {ipp} per prompt): the original images changed since this run started; "
            "restore them or use a new {out_dir}", parameters=("out_dir",)
        )


def _new_metrics(config: ChainConfig, num_images: int, encoder) -> xr.Dataset:
    """An empty metrics dataset (chain.store) whose attrs hold the run's provenance and configuration."""
    from chain.spectra import angular_bins, phenotype_attrs, radial_frequencies

    side = min(config.data.resolution, 256)
    attrs = provenance(
        PACKAGES, seed=config.run.seed,
        dataset=config.run.dataset_name or (f"toy-d0-seed{config.data.toy_seed}" if config.data.source == "toy"
                                            else Path(config.data.path).name),
        base_model=config.model.path,
        **{DATA_KIND_ATTR: "chain"},   # the images of an iteration are the chain's population (qtm fit: drift)
        config=config_to_toml(config),
        feature_encoder=getattr(encoder, "name", type(encoder).__name__) if encoder is not None else "",
        clip_model=config.metrics.clip_model,
        **phenotype_attrs(config.metrics.phenotype_tau),
    )
    sampling = config.sampling
    return store.empty_dataset(
        conditions=[c.name for c in config.conditions],
        cfg_scale=[c.guidance.nominal_scale for c in config.conditions],
        cfg_schedule=[c.guidance.name for c in config.conditions],
        condition_drop=[c.condition_drop for c in config.conditions],
        num_iterations=config.run.num_iterations, num_images=num_images, images_per_prompt=sampling.images_per_prompt,
        frequencies=radial_frequencies(side, side), angles=angular_bins(), num_steps=sampling.num_steps,
        latent_bin_edges=np.linspace(-sampling.latent_histogram_range, sampling.latent_histogram_range,
                                     sampling.latent_histogram_bins + 1),
        attrs=attrs,
    )


def record_originals(run: Run) -> None:
    """Measure D_0 (its features are the reference of every later cell) and, the first time (whichever
    shard comes first), record it as iteration 0 of every condition."""
    if not run.is_main:
        return
    originals = run.originals
    m0 = run.measurer.measure(originals.images)
    run.measurer.reference = m0.features
    if (run.config.conditions[0].name, 0) in store.completed_cells(run.metrics):
        return
    metrics = run.measurer.metrics(m0, originals.images, list(originals.captions))
    if run.record(None, 0, hf_power=m0.hf_power, radial_psd=m0.radial_psd, angular_psd=m0.angular_psd,
                  metrics=metrics):
        run.log.event("measured", condition="*", iteration=0, hf_power_mean=_finite_mean(m0.hf_power),
                      num_undefined=int(np.isnan(m0.hf_power).sum()))


def run_cell(run: Run, condition: ConditionConfig, k: int) -> None:
    """One (condition, iteration k >= 1): M_k = Finetune(M_0, D_{k-1}), D_k = Generate(M_k) by the stages;
    the main process saves D_k as PNG; with the assay on, the reference set of M_k (`reference_set`); then
    it measures what was written (the data the next iteration trains on) and records the cell in metrics.nc."""
    t0 = time.perf_counter()
    config, out_dir, seed = run.config, run.out_dir, run.config.run.seed
    prompts = run.prompts
    num_images = len(prompts)
    train_images, train_captions = training_set(config, out_dir, condition.name, k, run.originals)
    continual = config.run.continual_finetuning and k > 1
    job = IterationJob(
        config=config, condition=condition, iteration=k, train_images=train_images,
        train_captions=train_captions, prompts=prompts,
        seeds=tuple(image_seed(seed, condition.name, k, i) for i in range(num_images)),
        train_seed=image_seed(seed, condition.name, k, 0, "train"),
        lora_dir=_lora_dir(out_dir, condition.name, k),
        previous_lora_dir=_lora_dir(out_dir, condition.name, k - 1) if continual else None,
    )
    result = run.stages(job)
    if result.images.shape[0] != num_images:
        raise RunError(f"stage returned {result.images.shape[0]} images, expected {num_images}")
    if run.is_main:
        folder = _image_dir(out_dir, condition.name, k)
        for i, image in enumerate(result.images):
            save_image(image, folder / f"{i:05d}.png")
    # the cell is marked completed only with its reference set: a run stopped in between redoes both
    hf_reference = reference_set(run.stages, job, out_dir, is_main=run.is_main)
    if run.is_main:
        # Measure what was written (8-bit PNG), the same data the next iteration trains on.
        written = _read_iteration_images(out_dir, condition.name, k, num_images)
        mk, metrics = run.measurer(written, list(prompts), images_per_prompt=run.images_per_prompt)
        run.record(condition.name, k, hf_power=mk.hf_power, radial_psd=mk.radial_psd, angular_psd=mk.angular_psd,
                   metrics=metrics, train_loss=result.train_loss, guidance_scale=result.guidance_scale,
                   guidance_diff_norm=result.guidance_diff_norm, latent_histogram=result.latent_histogram,
                   hf_power_reference=hf_reference)
        run.log.event("iteration_done", condition=condition.name, iteration=k, seconds=time.perf_counter() - t0,
                      train_loss=result.train_loss, hf_power_mean=_finite_mean(mk.hf_power),
                      num_undefined=int(np.isnan(mk.hf_power).sum()), **metrics,
                      **({} if hf_reference is None else {"hf_power_reference_mean": _finite_mean(hf_reference)}))
    run.accelerator.wait_for_everyone()
    if not run.is_main:
        run.metrics = _read_metrics(run.metrics_path)


def run_chain(
    config: ChainConfig,
    out_dir: str | Path,
    *,
    progress: Progress | None = None,
    encoder=None,
    stages: Stages | None = None,
    after_cell: Callable[[str, int], None] | None = None,
    notify: Callable[[str], None] | None = None,
    conditions: Sequence[str] | None = None,
) -> xr.Dataset:
    """Run (or continue) the chain of `config` in `out_dir`; returns the final metrics dataset (with the
    cells of every condition finished so far, by this process or another).

    config: a ChainConfig, from `chain.config.load_config(path)` or built in code with
        `chain.config.config_from_dict({...})` (the same tables as a TOML file) or the dataclasses directly.
    progress: progress bars to report to (`Progress`; None reports nothing).
    encoder: a chain.features.FeatureEncoder for fd_dinov2 / recall / sfd (overrides metrics.encoder).
    stages: the finetune+generate stage (default DiffusionStages on the configured base model).
    after_cell(condition, iteration): called after each finished cell has been written (a hook for
    callers and tests).
    notify(message): told each note about the inputs (also written to log.jsonl as a "note" event), and
        when this process waits for another one preparing the shared state.
    conditions: run only these conditions of the config (a shard, docs/scaling.md); None runs all. The
        full config is stored and checked whichever conditions run.
    The dataset (D_0) is checked completely before anything is trained; problems raise DatasetError. One
    process at a time runs a condition of a folder; processes with disjoint conditions share it (`open_run`).
    """
    run = open_run(config, out_dir, encoder=encoder, stages=stages, progress=progress, conditions=conditions,
                   notify=notify)
    try:
        pending = run.pending_cells()
        total = len(run.selected) * config.run.num_iterations
        run.log.event("start", out_dir=str(run.out_dir), conditions=list(run.selected),
                      num_iterations=config.run.num_iterations, num_images=len(run.originals),
                      resumed=bool(store.completed_cells(run.metrics)))
        for note in run.notes:
            run.log.event("note", message=note)
            if notify is not None:
                notify(note)
        record_originals(run)
        bar = (progress if progress is not None and run.is_main else _no_progress)("chain", total)
        bar(completed=total - len(pending))
        for condition, k in pending:
            run_cell(run, condition, k)
            bar(info=f"{condition.name} iteration {k}")
            if after_cell is not None:
                after_cell(condition.name, k)
        run.log.event("finished")
        return run.metrics
    finally:
        run.close()


def _finite_mean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else math.nan
