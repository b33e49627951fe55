"""The Chain of Diffusion driver (Section 3.1, Eq. 1-2): for every condition and k = 1..K,

    M_k = Finetune(M_0, D_{k-1}, P)      (LoRA, always from a pristine M_0; or continued, App. E.4)
    D_k = Generate(M_k, P)
    measure D_k, record it in metrics.nc (atomically, after every finished (condition, iteration))

Entry point: `run_chain(config, out_dir)`. A run directory holds config.toml (resolved), metrics.nc,
images/<condition>/<iteration>/<image>.png, lora/<condition>/<iteration>/ (diffusers layout), log.jsonl and,
for a "tiny" model, base_model/. Rerunning continues where it stopped: finished cells are read back, the
images a later iteration trains on are always read from their PNG files (also in an uninterrupted run), and
every random draw comes from generators seeded by (run seed, condition, iteration, image), so an interrupted
and resumed run gives the same metrics as an uninterrupted one (on the same device).

The finetune+generate stage is injectable (`stages=`): any callable IterationJob -> IterationResult, so the
loop runs with stand-ins (tests use one that blurs its input).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from chain.config import ChainConfig, ConditionConfig, config_to_toml
from chain.data import CaptionedDataset, load_captioned_folder
from chain.atomic import write_text_atomic
from chain.images import list_images, load_image, save_image
from chain.sampling import image_seed, make_generator
from chain import store

PACKAGES = ("torch", "diffusers", "transformers", "peft", "accelerate", "numpy", "xarray", "h5netcdf")


class RunError(ValueError):
    """A run cannot start or continue; the message names the file and the fix."""


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


# ------------------------------------------------------------------------------------------------ reporting


class Reporter:
    """Rich progress on the terminal (main process only) and a JSONL event log."""

    def __init__(self, log_path: Path | None, *, enabled: bool, is_main: bool = True):
        self.log_path = log_path if is_main else None
        self.progress = None
        if enabled and is_main:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("{task.fields[info]}"),
            )

    def __enter__(self):
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()

    def event(self, kind: str, **fields) -> None:
        if self.log_path is None:
            return
        row = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(), "event": kind, **fields}
        with open(self.log_path, "a") as fh:
            fh.write(json.dumps(row, default=float) + "\n")

    def task(self, description: str, total: int):
        if self.progress is None:
            return None
        return self.progress.add_task(description, total=total, info="")

    def update(self, task, *, advance: float = 0, completed: float | None = None, total: float | None = None,
               info: str = "") -> None:
        if self.progress is not None and task is not None:
            kwargs = {"info": info, "total": total}
            kwargs.update({"completed": completed} if completed is not None else {"advance": advance})
            self.progress.update(task, **kwargs)

    def remove(self, task) -> None:
        if self.progress is not None and task is not None:
            self.progress.remove_task(task)


# ------------------------------------------------------------------------------------------------ the stages


class DiffusionStages:
    """The real stage: LoRA-finetune a copy of the pristine base model, save the adapter, generate.

    With several processes (accelerate launch) every process trains on its slice of each global batch and
    generates its share of the prompts; the images are gathered on every process.
    """

    def __init__(self, base, accelerator, reporter: Reporter | None = None):
        self.base = base  # pristine M_0, never modified
        self.accelerator = accelerator
        self.reporter = reporter or Reporter(None, enabled=False)

    def __call__(self, job: IterationJob) -> IterationResult:
        from accelerate.utils import gather_object

        from chain.finetune import finetune
        from chain.lora import save_lora
        from chain.sampling import generate, latent_histogram

        cfg = job.config
        acc = self.accelerator
        label = f"{job.condition.name} it {job.iteration}"
        task = self.reporter.task(f"{label} finetune", total=1)
        t0 = time.perf_counter()

        def on_step(step, total, loss):
            rate = step * cfg.finetune.batch_size / max(time.perf_counter() - t0, 1e-9)
            self.reporter.update(task, completed=step, total=total, info=f"loss {loss:.4f}  {rate:.1f} samples/s")
            if step == total or step % 50 == 0:
                self.reporter.event("finetune_step", condition=job.condition.name, iteration=job.iteration,
                                    step=step, total=total, loss=loss, samples_per_s=rate)

        result = finetune(
            self.base, job.train_images, list(job.train_captions), cfg.finetune,
            condition_drop=job.condition.condition_drop, generator=make_generator(job.train_seed),
            accelerator=acc, init_lora=job.previous_lora_dir, on_step=on_step,
        )
        self.reporter.remove(task)
        if acc.is_main_process:
            save_lora(job.lora_dir, result.model.unet, result.model.text_encoder,
                      result.unet_lora_config, result.text_encoder_lora_config)
        acc.wait_for_everyone()

        indices = list(range(len(job.prompts)))
        t1 = time.perf_counter()
        gtask = self.reporter.task(f"{label} generate", total=len(indices))
        generated = [0]

        def on_batch(n):
            generated[0] += n
            rate = generated[0] * acc.num_processes / max(time.perf_counter() - t1, 1e-9)
            self.reporter.update(gtask, advance=n * acc.num_processes, info=f"{rate:.2f} images/s")

        with acc.split_between_processes(indices) as mine:
            gen = generate(
                result.model, [job.prompts[i] for i in mine], [job.seeds[i] for i in mine], job.condition.guidance,
                num_steps=cfg.sampling.num_steps, resolution=cfg.data.resolution, clip_skip=cfg.finetune.clip_skip,
                batch_size=cfg.sampling.batch_size, on_batch=on_batch,
            )
            parts = gather_object([(list(mine), gen.images, gen.latents, gen.guidance_diff_norm)])
        self.reporter.remove(gtask)
        order = [i for part in parts for i in part[0]]
        images = torch.cat([p[1] for p in parts])[np.argsort(order)]
        latents = torch.cat([p[2] for p in parts])
        norms = torch.cat([p[3] for p in parts])
        counts, _ = latent_histogram(latents, cfg.sampling.latent_histogram_bins, cfg.sampling.latent_histogram_range)
        seconds = time.perf_counter() - t1
        self.reporter.event("generated", condition=job.condition.name, iteration=job.iteration,
                            images=len(indices), seconds=seconds, images_per_s=len(indices) / max(seconds, 1e-9),
                            finetune_seconds=result.seconds, finetune_steps=result.num_steps)
        return IterationResult(
            images=images,
            train_loss=float(np.mean(result.losses[-max(1, len(result.losses) // 10):])) if result.losses else math.nan,
            guidance_scale=gen.scales,
            guidance_diff_norm=norms.mean(dim=0).numpy(),
            latent_histogram=counts,
        )


# ------------------------------------------------------------------------------------------------ helpers


def _git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def _check_or_write_config(config: ChainConfig, out_dir: Path) -> None:
    path = out_dir / "config.toml"
    text = config_to_toml(config)
    produced = (out_dir / "metrics.nc").exists() or (out_dir / "base_model").exists()
    if path.exists() and produced:  # before anything is produced a corrected config simply replaces it
        if path.read_text() != text:
            raise RunError(
                f"{path} holds a different configuration: this folder belongs to another run. Use a new --out, "
                "or delete the folder to start over"
            )
        return
    write_text_atomic(path, text)


def resolve_base_model(config: ChainConfig, out_dir: Path):
    """Load M_0 (offline). model.path = "tiny" builds the tiny model once into out_dir/base_model/."""
    from chain.models import ModelConfig, load_base_model, make_tiny_base_model, save_base_model

    if config.model.path == "tiny":
        folder = out_dir / "base_model"
        if not folder.is_dir():
            save_base_model(make_tiny_base_model(config.model.tiny, resolution=config.data.resolution), folder)
        return load_base_model(ModelConfig(path=str(folder), vae=config.model.vae))
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
            f"folder and its lora/ twin and set completed = 0 for ({condition}, {iteration}), or start a new --out"
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


@dataclasses.dataclass
class Measurements:
    hf_power: np.ndarray
    radial_psd: np.ndarray
    angular_psd: np.ndarray
    features: np.ndarray | None


def measure(images: torch.Tensor, *, encoder=None, batch_size: int = 32, tau: float = 0.02) -> Measurements:
    """Phenotype and spectra of every image (chain.spectra, DESIGN.md "The phenotype"), features if an
    encoder is given. The spectra are means over images."""
    from chain.spectra import measure_spectra, prepare_for_spectrum

    hf, radial, angular = [], [], []
    for start in range(0, len(images), batch_size):
        chunk = torch.stack([prepare_for_spectrum(im) for im in images[start : start + batch_size]])
        s = measure_spectra(chunk, dtype=torch.float64, tau=tau).numpy()
        hf.append(s.hf_power)
        radial.append(s.radial_psd)
        angular.append(s.angular_psd)
    features = None
    if encoder is not None:
        from chain.features import extract_features

        features = extract_features(encoder, images, batch_size=batch_size)
    # A constant image (one grey level) has no AC energy: its phenotype and spectra are undefined (NaN) and
    # it is left out of the mean spectra rather than blanking them.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a cell of constant images only: NaN spectra
        radial_mean = np.nanmean(np.concatenate(radial), axis=0)
        angular_mean = np.nanmean(np.concatenate(angular), axis=0)
    return Measurements(np.concatenate(hf), radial_mean, angular_mean, features)


def feature_metrics(features: np.ndarray | None, features_0: np.ndarray | None, *, ipp: int, k: int) -> dict:
    """FD, recall and SFD of D_k against D_0 (chain.metrics); empty without features."""
    if features is None or features_0 is None:
        return {}
    from chain.metrics import frechet_distance, recall, sfd

    out = {"sfd": float(sfd(features[::ipp], features_0))}
    # FD needs two rows per set; recall's k-NN radii need more than k generated images (else NaN)
    out["fd_dinov2"] = float(frechet_distance(features_0, features)) if min(len(features), len(features_0)) > 1 else math.nan
    out["recall"] = float(recall(features_0, features, k=k)) if len(features) > k else math.nan
    return out


def _build_encoder(config: ChainConfig, device):
    spec = config.metrics.encoder
    if not spec:
        return None
    kind, _, name = spec.partition(":")
    if kind != "dinov2" or not name:
        raise RunError(f"metrics.encoder {spec!r}: expected 'dinov2:<folder or HF id>' or ''")
    from chain.features import Dinov2Encoder

    try:
        return Dinov2Encoder.from_pretrained(name, device=device)
    except FileNotFoundError as exc:
        raise RunError(f"metrics.encoder: {exc}") from None


def _build_clip(config: ChainConfig, device):
    if not config.metrics.clip_model:
        return None
    from transformers import CLIPModel, CLIPTokenizer

    name = config.metrics.clip_model
    try:
        model = CLIPModel.from_pretrained(name, local_files_only=True).to(device).eval()
        tokenizer = CLIPTokenizer.from_pretrained(name, local_files_only=True)
    except OSError as exc:
        raise RunError(f"metrics.clip_model {name!r} is not a local folder or cached HF id: {exc}") from None
    return model, tokenizer


# ------------------------------------------------------------------------------------------------ the driver


def run_chain(
    config: ChainConfig,
    out_dir: str | Path,
    *,
    progress: bool = True,
    encoder=None,
    stages: Stages | None = None,
    after_cell: Callable[[str, int], None] | None = None,
):
    """Run (or continue) the chain of `config` in `out_dir`; returns the final metrics dataset (xarray).

    config: a ChainConfig, from `chain.config.load_config(path)` or built in code with
        `chain.config.config_from_dict({...})` (the same tables as a TOML file) or the dataclasses directly.
    encoder: a chain.features.FeatureEncoder for fd_dinov2 / recall / sfd (overrides metrics.encoder).
    stages: the finetune+generate stage (default DiffusionStages on the configured base model).
    after_cell(condition, iteration): called after each finished cell has been written (a hook for
    callers and tests).
    The dataset (D_0) is checked completely before anything is trained; problems raise DatasetError.
    """
    from accelerate import Accelerator

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = config.run.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    accelerator = Accelerator(mixed_precision=config.finetune.mixed_precision, cpu=device == "cpu")
    is_main = accelerator.is_main_process
    if stages is None and config.finetune.batch_size % accelerator.num_processes:
        raise RunError(
            f"finetune.batch_size = {config.finetune.batch_size} is not divisible by the "
            f"{accelerator.num_processes} processes: the global batch is split evenly; change one of them"
        )
    originals = load_captioned_folder(
        config.data.path, resolution=config.data.resolution, caption_extension=config.data.caption_extension,
        format=config.data.format, center_crop=config.data.center_crop, max_images=config.data.max_images,
    )
    if is_main:
        _check_or_write_config(config, out_dir)
    accelerator.wait_for_everyone()
    n, ipp = len(originals), config.sampling.images_per_prompt
    reporter = Reporter(out_dir / "log.jsonl", enabled=progress, is_main=is_main)
    base_source = config.model.path
    if stages is None:
        with accelerator.main_process_first():  # the main process builds a "tiny" model folder once
            base = resolve_base_model(config, out_dir)
        stages = DiffusionStages(base, accelerator, reporter)
    if encoder is None:
        encoder = _build_encoder(config, accelerator.device)
    clip = _build_clip(config, accelerator.device)

    metrics_path = out_dir / "metrics.nc"
    from chain.spectra import angular_bins, phenotype_attrs, radial_frequencies

    side = min(config.data.resolution, 256)
    accelerator.wait_for_everyone()
    if metrics_path.exists():
        ds = store.read_metrics(metrics_path)
        expected = [c.name for c in config.conditions]
        if list(map(str, ds.condition.values)) != expected or ds.sizes["iteration"] != config.run.num_iterations + 1:
            raise RunError(f"{metrics_path} does not match the config's conditions/iterations; use a new --out")
        if ds.sizes["image"] != n * ipp:
            raise RunError(
                f"{metrics_path} holds {ds.sizes['image']} images per iteration but {config.data.path} now gives "
                f"{n * ipp} ({n} images x {ipp} per prompt): the original images changed since this run started; "
                "restore them or use a new --out"
            )
    else:
        attrs = {
            "dataset": config.run.dataset_name or Path(config.data.path).name,
            "data_kind": "chain",   # the images of an iteration are the chain's population (qtm fit: --drift)
            "base_model": base_source,
            "seed": config.run.seed,
            "git_revision": _git_revision(),
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "config": config_to_toml(config),
            "feature_encoder": getattr(encoder, "name", type(encoder).__name__) if encoder is not None else "",
            "clip_model": config.metrics.clip_model,
            **{f"version_{k}": v for k, v in _versions().items()},
            **phenotype_attrs(config.metrics.phenotype_tau),
        }
        ds = store.empty_dataset(
            conditions=[c.name for c in config.conditions],
            cfg_scale=[c.guidance.nominal_scale for c in config.conditions],
            cfg_schedule=[c.guidance.name for c in config.conditions],
            condition_drop=[c.condition_drop for c in config.conditions],
            num_iterations=config.run.num_iterations, num_images=n * ipp, images_per_prompt=ipp,
            frequencies=radial_frequencies(side, side), angles=angular_bins(),
            num_steps=config.sampling.num_steps,
            latent_bin_edges=np.linspace(-config.sampling.latent_histogram_range,
                                         config.sampling.latent_histogram_range,
                                         config.sampling.latent_histogram_bins + 1),
            attrs=attrs,
        )

    done = store.completed_cells(ds)
    first = config.conditions[0].name
    with reporter:
        reporter.event("start", out_dir=str(out_dir), conditions=[c.name for c in config.conditions],
                       num_iterations=config.run.num_iterations, num_images=n, resumed=bool(done))
        m0 = (measure(originals.images, encoder=encoder, batch_size=config.metrics.batch_size,
                      tau=config.metrics.phenotype_tau) if is_main else None)
        if is_main and (first, 0) not in done:
            extra = feature_metrics(m0.features, m0.features, ipp=1, k=config.metrics.recall_k)
            if clip is not None:
                extra["clip_score"] = _clip_score(clip, originals.images, list(originals.captions))
            ds = store.record(ds, condition=None, iteration=0, hf_power=m0.hf_power, radial_psd=m0.radial_psd,
                              angular_psd=m0.angular_psd, metrics=extra)
            store.write_metrics(ds, metrics_path)
            reporter.event("measured", condition="*", iteration=0, hf_power_mean=_finite_mean(m0.hf_power),
                           num_undefined=int(np.isnan(m0.hf_power).sum()))
        prompts = tuple(originals.captions[i // ipp] for i in range(n * ipp))
        total = len(config.conditions) * config.run.num_iterations
        overall = reporter.task("chain", total=total)
        reporter.update(overall, completed=len([d for d in done if d[1] > 0]))
        for condition in config.conditions:
            for k in range(1, config.run.num_iterations + 1):
                if (condition.name, k) in done:
                    continue
                t0 = time.perf_counter()
                train_images, train_captions = training_set(config, out_dir, condition.name, k, originals)
                previous = None
                if config.run.continual_finetuning and k > 1:
                    previous = _lora_dir(out_dir, condition.name, k - 1)
                job = IterationJob(
                    config=config, condition=condition, iteration=k, train_images=train_images,
                    train_captions=train_captions, prompts=prompts,
                    seeds=tuple(image_seed(config.run.seed, condition.name, k, i) for i in range(n * ipp)),
                    train_seed=image_seed(config.run.seed, condition.name, k, 0, "train"),
                    lora_dir=_lora_dir(out_dir, condition.name, k), previous_lora_dir=previous,
                )
                result = stages(job)
                if result.images.shape[0] != n * ipp:
                    raise RunError(f"stage returned {result.images.shape[0]} images, expected {n * ipp}")
                if is_main:
                    folder = _image_dir(out_dir, condition.name, k)
                    for i, image in enumerate(result.images):
                        save_image(image, folder / f"{i:05d}.png")
                    # Measure what was written (8-bit PNG), the same data the next iteration trains on.
                    written = _read_iteration_images(out_dir, condition.name, k, n * ipp)
                    mk = measure(written, encoder=encoder, batch_size=config.metrics.batch_size,
                                 tau=config.metrics.phenotype_tau)
                    extra = feature_metrics(mk.features, m0.features, ipp=ipp, k=config.metrics.recall_k)
                    if clip is not None:
                        extra["clip_score"] = _clip_score(clip, written, list(prompts))
                    ds = store.record(
                        ds, condition=condition.name, iteration=k, hf_power=mk.hf_power, radial_psd=mk.radial_psd,
                        angular_psd=mk.angular_psd, metrics=extra, train_loss=result.train_loss,
                        guidance_scale=result.guidance_scale, guidance_diff_norm=result.guidance_diff_norm,
                        latent_histogram=result.latent_histogram,
                    )
                    store.write_metrics(ds, metrics_path)
                    reporter.event("iteration_done", condition=condition.name, iteration=k,
                                   seconds=time.perf_counter() - t0, train_loss=result.train_loss,
                                   hf_power_mean=_finite_mean(mk.hf_power),
                                   num_undefined=int(np.isnan(mk.hf_power).sum()), **extra)
                accelerator.wait_for_everyone()
                if not is_main:
                    ds = store.read_metrics(metrics_path)
                reporter.update(overall, advance=1, info=f"{condition.name} iteration {k}")
                if after_cell is not None:
                    after_cell(condition.name, k)
        reporter.event("finished")
    return ds


def _finite_mean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else math.nan


def _clip_score(clip, images: torch.Tensor, captions: list[str]) -> float:
    from chain.metrics import clip_score

    model, processor = clip
    return float(clip_score(model, processor, images, captions))
