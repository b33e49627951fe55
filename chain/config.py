"""Configuration of a chain run: frozen dataclasses read from (and written back to) TOML.

Defaults are the paper's recipe (Appendix A, Table 1; kohya sd-scripts semantics). A config
file names tables `[run]`, `[data]`, `[model]`, `[finetune]`, `[sampling]`, `[metrics]` and an array
`[[conditions]]`; every key is checked: an unknown key, a missing required key or a value of the wrong type
raises ConfigError naming the file and the field.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import typing
from pathlib import Path
from typing import Any, Callable

from chain.constraints import field_problems, show_value, spec, toml_value
from chain.errors import ConfigError
from chain.guidance import SCHEDULES, schedule_fields, schedule_to_table

UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
TEXT_ENCODER_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


DEVICE_PATTERN = r"auto|cpu|cuda|cuda:[0-9]+"
NAME_PATTERN = r"[A-Za-z0-9_+=,@-][A-Za-z0-9._+=,@-]*"
INT64_MAX = 2**63 - 1


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The chain itself (Section 3.1) and the paper's variants (Appendix C.2, C.3, C.12, E.4)."""

    num_iterations: int = spec(5, ge=1)  # K: models M_1 .. M_K are finetuned, each on the images of the one before
    seed: int = spec(0, ge=0, le=INT64_MAX)  # seeds every random draw, by (seed, condition, iteration, image)
    # Fraction of each training set replaced by the original image of the same prompt (App. C.3).
    real_mix_ratio: float = spec(0.0, ge=0.0, le=1.0)
    # Train M_k on the images of the last `accumulate_iterations` iterations (1 = D_{k-1} only; 0 = all of
    # D_0 .. D_{k-1}) (App. C.12).
    accumulate_iterations: int = spec(1, ge=0, note="0 = all previous iterations")
    # Continue the previous iteration's LoRA instead of a fresh one on M_0 (App. E.4).
    continual_finetuning: bool = False
    # auto = CUDA when available, else the CPU
    device: str = spec("auto", pattern=DEVICE_PATTERN, pattern_help="'auto', 'cpu', 'cuda' or 'cuda:N'")
    dataset_name: str = ""  # recorded in metrics.nc attrs; defaults to the data folder's name


DATA_SOURCES = ("folder", "toy")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """D_0: a captioned image folder (kohya: same-name caption files) or an HF imagefolder (source =
    "folder", the default), or the embedded toy world's procedural images (source = "toy"), written
    deterministically from `toy_seed` into the run folder's data/ so D_0 is part of the run."""

    path: str = ""  # the folder (source = "folder"); unused for source = "toy"
    # folder = data.path; toy = the embedded toy world written into <run>/data/
    source: str = spec("folder", choices=DATA_SOURCES)
    # how many toy images D_0 holds (source = "toy")
    toy_images: int = spec(24, ge=1, le=100_000, note="number of toy images, source = 'toy'")
    toy_seed: int = spec(0, ge=0, le=INT64_MAX)  # the toy images are a pure function of this seed (source = "toy")
    # caption files beside the images (kohya's default is ".caption"; the paper's folders use ".txt")
    caption_extension: str = spec(".txt", pattern=r"\.[A-Za-z0-9_.-]+", pattern_help="an extension such as '.txt'")
    format: str = spec("auto", choices=("auto", "captions", "metadata"))  # metadata: metadata.jsonl
    # images are resized (short side) and centre-cropped to this square size
    resolution: int = spec(512, ge=8, le=8192, note="default 1024 when model.kind = 'sdxl'")
    center_crop: bool = True  # false: the whole image is resized to a square (aspect ratio not kept)
    max_images: int = spec(0, ge=0, note="0 = all images")  # use only the first N images (sorted by name)


@dataclasses.dataclass(frozen=True)
class TinyModelConfig:
    """A tiny random base model built from configs (tests and CPU examples); see chain.models."""

    seed: int = spec(0, ge=0, le=INT64_MAX)  # the random weights are a pure function of this seed
    latent: bool = True  # with a tiny VAE (latent space); False: pixel space (no vae/)
    # UNet channels per resolution level (the last level has attention)
    block_out_channels: tuple[int, ...] = spec((16, 32), ge=1, nonempty=True)
    layers_per_block: int = spec(1, ge=1)  # UNet residual layers per level
    cross_attention_dim: int = spec(32, ge=1)  # width of the text conditioning seen by the UNet
    attention_head_dim: int = spec(32, ge=1)  # passed to diffusers' UNet2DConditionModel as is
    norm_num_groups: int = spec(8, ge=1)  # group-norm groups of the UNet
    text_hidden_size: int = spec(32, ge=1)  # CLIP text encoder width (equal to cross_attention_dim)
    text_layers: int = spec(3, ge=1)  # CLIP text encoder layers
    text_intermediate_size: int = spec(64, ge=1)  # CLIP text encoder MLP width
    # VAE channels per level; downsampling 2^(levels - 1)
    vae_block_out_channels: tuple[int, ...] = spec((8, 16), ge=1, nonempty=True)
    latent_channels: int = spec(4, ge=1)  # VAE latent channels
    # SDXL only (model.kind = "sdxl"): width of each of the six time-id embeddings (SDXL: 256)
    addition_time_embed_dim: int = spec(8, ge=1)


MODEL_KINDS = ("auto", "sd", "sdxl")
SDXL_RESOLUTION = 1024  # SDXL's native image size (data.resolution's default for model.kind = "sdxl")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """M_0: a diffusers-format folder or HF cache id (offline), "tiny" (built from `tiny`), or "toy" (the
    committed toy base model of chain.toy, pretrained on the toy world's D_0 at 32 x 32). Stable Diffusion
    1.x/2.x (one text encoder) or SDXL (two text encoders, pooled text embeddings and time ids; docs/sdxl.md)."""

    # a diffusers folder, a cached HF id such as runwayml/stable-diffusion-v1-5, or "tiny"
    path: str = spec(nonempty=True)
    vae: str = ""  # a fixed external VAE (folder or HF id), e.g. sd-vae-ft-mse; "" = the model's own
    # auto = from the model folder (SDXL: model_index.json names StableDiffusionXLPipeline or text_encoder_2/
    # exists); "sdxl" with path = "tiny" builds a tiny SDXL
    kind: str = spec("auto", choices=MODEL_KINDS, note="'tiny' is SD unless 'sdxl'; data.resolution defaults to "
                     "1024 for 'sdxl'")
    tiny: TinyModelConfig = TinyModelConfig()


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """LoRA finetuning, Table 1 of the paper in kohya sd-scripts terms."""

    rank: int = spec(32, ge=1)  # LoRA rank (kohya network_dim)
    alpha: float = spec(8.0, gt=0.0)  # LoRA alpha (kohya network_alpha); the update is scaled by alpha / rank
    unet_lr: float = spec(1e-4, ge=0.0)  # AdamW learning rate of the UNet's LoRA weights
    text_encoder_lr: float = spec(5e-5, ge=0.0)  # AdamW learning rate of the text encoder's LoRA weights
    train_text_encoder: bool = True  # also put LoRA adapters on the text encoder
    batch_size: int = spec(6, ge=1)  # the global batch, whatever the number of processes
    epochs: int = spec(100, ge=0)  # passes over the training set (kohya max_train_epochs)
    max_train_steps: int = spec(0, ge=0, note="0 = epochs decide")  # optimizer steps; overrides epochs when > 0
    mixed_precision: str = spec("no", choices=("no", "fp16", "bf16"))  # LoRA weights stay float32
    weight_decay: float = spec(0.01, ge=0.0)  # AdamW weight decay
    adam_beta1: float = spec(0.9, ge=0.0, lt=1.0)  # AdamW beta1
    adam_beta2: float = spec(0.999, ge=0.0, lt=1.0)  # AdamW beta2
    adam_epsilon: float = spec(1e-8, gt=0.0)  # AdamW epsilon
    min_snr_gamma: float = spec(5.0, ge=0.0, note="0 = plain MSE")  # Min-SNR loss weighting min(SNR, gamma) / SNR
    noise_offset: float = spec(0.0, ge=0.0)  # kohya noise_offset: a per-channel constant added to the training noise
    # gradient-norm clipping
    max_grad_norm: float = spec(1.0, ge=0.0, note="over all LoRA parameters together; 0 = no clipping")
    # text embeddings from this layer counted from the end (2 = penultimate)
    clip_skip: int = spec(2, ge=1, note="1 = the text encoder's last layer")
    flip: bool = True  # random horizontal flips while finetuning
    # encode the training images (both flips) once
    cache_latents: bool = spec(True, choices=(True,), note="latents (both flips) are always encoded once and "
                               "cached; a fresh VAE sample per step is not implemented")
    # UNet modules that get LoRA adapters (diffusers names)
    unet_target_modules: tuple[str, ...] = spec(UNET_LORA_TARGETS, choices=UNET_LORA_TARGETS, nonempty=True)
    # text-encoder modules that get LoRA adapters (transformers CLIP names)
    text_encoder_target_modules: tuple[str, ...] = spec(
        TEXT_ENCODER_LORA_TARGETS, choices=TEXT_ENCODER_LORA_TARGETS, nonempty=True)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Generation with the written-out Euler-ancestral loop (chain.sampling)."""

    num_steps: int = spec(30, ge=1)  # Euler-ancestral sampling steps
    batch_size: int = spec(8, ge=1)  # images generated at once (per process)
    images_per_prompt: int = spec(1, ge=1)  # App. C.2
    # bins of the histogram of final latent values (metrics.nc latent_histogram)
    latent_histogram_bins: int = spec(64, ge=1)
    # the histogram covers [-range, range]
    latent_histogram_range: float = spec(4.0, gt=0.0, note="histogram of final latents over [-range, range]")


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
    """Optional feature metrics; "" switches one off (its variables stay NaN)."""

    # feature encoder of fd_dinov2, recall and sfd: "" (off), "dinov2:<folder or HF id>" or "toy" (chain.toy's)
    encoder: str = spec("", pattern=r"(dinov2:.+|toy)?", pattern_help="'', 'dinov2:<folder or HF id>' or 'toy'")
    clip_model: str = ""  # "" | a CLIP folder or HF id for clip_score
    recall_k: int = spec(5, ge=1)  # k of the k-nearest-neighbour recall
    batch_size: int = spec(32, ge=1)  # images per batch when measuring
    # The phenotype's threshold in cycles/pixel (Eq. 14): 0.02 at 256 pixels, i.e. 5.1 cycles per image;
    # for smaller images keep the cycles per image: 0.02 * 256 / resolution (0.16 at 32 pixels).
    phenotype_tau: float = spec(0.02, ge=0.0, lt=0.7072, note="cycles/pixel, below 1/sqrt(2); 0.02 at 256 pixels")


@dataclasses.dataclass(frozen=True)
class AssayConfig:
    """The selection assay's reference set: for every condition and iteration k >= 1, `images` more images
    from the same M_k with the same prompts and per-image seeds as the first `images` guided ones, at the
    constant guidance scale `reference_scale` (1 = the unguided model: the conditional pass only). Measured
    and stored (hf_power_reference), never trained on. images = 0 (the default) switches it off."""

    images: int = spec(0, ge=0)  # reference images per cell (the first `images` prompts); 0 = no reference set
    # constant guidance scale of the reference set; 1 = unguided (the conditional pass only)
    reference_scale: float = spec(1.0, ge=0.0)


@dataclasses.dataclass(frozen=True)
class ConditionConfig:
    """One condition of a run: a guidance schedule and a condition-drop probability."""

    # the folder name of the condition under images/ and lora/, and its label in metrics.nc
    name: str = spec(pattern=NAME_PATTERN, pattern_help="a folder-safe name (letters, digits, '._+=,@-', "
                     "not starting with '.')")
    guidance: Any = dataclasses.field(default=None, metadata={"flatten": True})  # a chain.guidance schedule
    # probability that a training caption is replaced by the empty one (ReDiFine)
    condition_drop: float = spec(0.0, ge=0.0, le=1.0)


def _tiny_factor(t: TinyModelConfig) -> int:
    """The side of the smallest feature map is resolution / this factor (VAE x UNet downsampling)."""
    vae = 2 ** (len(t.vae_block_out_channels) - 1) if t.latent else 1
    return vae * 2 ** max(len(t.block_out_channels) - 1, 0)


# Consistency between fields: (fields named in the message, predicate on the config, what is allowed).
CROSS_FIELD_RULES: tuple[tuple[tuple[str, ...], Callable[[Any], bool], str], ...] = (
    (("finetune.epochs", "finetune.max_train_steps"),
     lambda c: c.finetune.epochs >= 1 or c.finetune.max_train_steps >= 1,
     "one of them must be >= 1 (max_train_steps = 0 lets epochs decide)"),
    (("data.path",), lambda c: c.data.source != "folder" or bool(c.data.path),
     "must name the D_0 folder (or set data.source = 'toy')"),
    (("model.tiny.block_out_channels",), lambda c: len(c.model.tiny.block_out_channels) >= 2,
     "needs at least two UNet blocks"),
    (("model.tiny.block_out_channels", "model.tiny.norm_num_groups"),
     lambda c: all(ch % c.model.tiny.norm_num_groups == 0 for ch in c.model.tiny.block_out_channels),
     "every channel count must be a multiple of norm_num_groups"),
    (("model.tiny.vae_block_out_channels",),
     lambda c: all(ch % min(c.model.tiny.vae_block_out_channels[0], 4) == 0 for ch in c.model.tiny.vae_block_out_channels),
     "every channel count must be a multiple of min(first channel count, 4) (the VAE's group norm)"),
    (("model.tiny.text_hidden_size", "model.tiny.cross_attention_dim"),
     lambda c: c.model.kind == "sdxl" or c.model.tiny.text_hidden_size == c.model.tiny.cross_attention_dim,
     "must be equal"),
    (("model.tiny.text_hidden_size", "model.tiny.cross_attention_dim"),
     lambda c: c.model.kind != "sdxl" or c.model.path != "tiny" or 2 * c.model.tiny.text_hidden_size == c.model.tiny.cross_attention_dim,
     "a tiny SDXL (model.kind = 'sdxl') has two text encoders of width text_hidden_size side by side: "
     "cross_attention_dim must be twice text_hidden_size"),
    (("data.resolution", "model.tiny"),
     lambda c: c.model.path != "tiny" or c.data.resolution % _tiny_factor(c.model.tiny) == 0,
     "the resolution must be a multiple of the tiny model's downsampling factor (VAE x UNet), else images "
     "would be measured at one size and generated at another"),
    (("finetune.clip_skip", "model.tiny.text_layers"),
     lambda c: c.model.path != "tiny" or c.finetune.clip_skip <= c.model.tiny.text_layers,
     "clip_skip counts text-encoder layers from the last one and cannot exceed text_layers"),
    (("finetune.clip_skip", "model.kind"),
     lambda c: c.model.kind != "sdxl" or c.finetune.clip_skip >= 2,
     "SDXL conditions on raw hidden states below the last layer (docs/sdxl.md): clip_skip must be >= 2 "
     "(2 = the penultimate layer, as kohya and StableDiffusionXLPipeline)"),
    (("model.kind", "model.path"), lambda c: c.model.kind != "sdxl" or c.model.path != "toy",
     "the toy base model is a Stable Diffusion 1.x-style model; use model.kind = 'auto' or 'sd'"),
    (("conditions",), lambda c: len(c.conditions) >= 1, "needs at least one [[conditions]] table"),
)


@dataclasses.dataclass(frozen=True)
class ChainConfig:
    data: DataConfig
    model: ModelConfig
    conditions: tuple[ConditionConfig, ...]
    run: RunConfig = RunConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    sampling: SamplingConfig = SamplingConfig()
    metrics: MetricsConfig = MetricsConfig()
    assay: AssayConfig = AssayConfig()

    def validate(self, where: str = "config") -> None:
        """Raise ConfigError listing every bad value, one line each (see config_problems)."""
        problems = config_problems(self)
        if problems:
            raise ConfigError("\n".join(f"{where}: {p}" for p in problems))


def config_problems(config: ChainConfig) -> list[str]:
    """Every field's declared constraint (chain.constraints.spec beside the field), then the cross-field
    rules (CROSS_FIELD_RULES); one line per problem naming the field, the value and what is allowed."""
    problems: list[str] = []
    for f in dataclasses.fields(config):
        if f.name != "conditions":
            problems += field_problems(getattr(config, f.name), f.name)
    names = [c.name for c in config.conditions]
    for i, c in enumerate(config.conditions):
        problems += condition_problems(c, f"conditions[{i}]")
        if names.count(c.name) > 1 and names.index(c.name) < i:
            problems.append(f"field 'conditions[{i}].name' = {show_value(c.name)}: must be unique (used twice)")
    if problems:  # cross-field rules assume every field is in range
        return problems
    for fields, ok, allowed in CROSS_FIELD_RULES:
        if not ok(config):
            shown = ", ".join(f"'{name}' = {_field_value(config, name)}" for name in fields)
            problems.append(f"{'field' if len(fields) == 1 else 'fields'} {shown}: {allowed}")
    return problems


def condition_problems(condition: ConditionConfig, field: str) -> list[str]:
    """The declared constraints of one condition's fields (named `field.key`), then its schedule's own
    consistency (an interval needs sigma_low < sigma_high)."""
    problems = field_problems(condition, field)
    g = condition.guidance
    if not problems and hasattr(g, "sigma_low") and hasattr(g, "sigma_high") and not g.sigma_low < g.sigma_high:
        problems.append(f"fields '{field}.sigma_low' = {show_value(g.sigma_low)}, "
                        f"'{field}.sigma_high' = {show_value(g.sigma_high)}: must have sigma_low < sigma_high")
    return problems


def _field_value(config: ChainConfig, dotted: str) -> str:
    obj: Any = config
    for part in dotted.split("."):
        obj = getattr(obj, part)
    if dataclasses.is_dataclass(obj):
        return "{" + ", ".join(f"{f.name} = {show_value(getattr(obj, f.name))}" for f in dataclasses.fields(obj)) + "}"
    return show_value(obj)


# ------------------------------------------------------------------------------------------------ reading


def _check_value(value: Any, hint: Any, field: str, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is tuple:
        (item_type, _ellipsis) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: field '{field}' must be a list, got {value!r}")
        return tuple(_check_value(v, item_type, f"{field}[{i}]", where) for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: field '{field}' must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: field '{field}' must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: field '{field}' must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: field '{field}' must be a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: field '{field}' must be a table, got {value!r}")
        return _build(hint, value, field, where)
    raise TypeError(f"unsupported config type {hint!r} for {field}")  # pragma: no cover


def _build(cls: type, table: dict, prefix: str, where: str, renames: dict[str, str] | None = None):
    """Build dataclass `cls` from a TOML table, rejecting unknown keys and requiring fields without defaults."""
    hints = typing.get_type_hints(cls)
    renames = renames or {f.name: f.name for f in dataclasses.fields(cls)}
    known = {key: attr for key, attr in renames.items()}
    dotted = (prefix + ".") if prefix else ""
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ConfigError(
            f"{where}: unknown field '{dotted}{unknown[0]}' (known fields of [{prefix or 'top level'}]: "
            f"{', '.join(sorted(known))})"
        )
    kwargs = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, attr in known.items():
        f = fields[attr]
        if key in table:
            kwargs[attr] = _check_value(table[key], hints[attr], dotted + key, where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required field '{dotted}{key}'")
    return cls(**kwargs)


def read_condition(table: dict, field: str, where: str) -> ConditionConfig:
    """One condition from its table (the keys of a [[conditions]] table: name, schedule, its fields,
    condition_drop), checked on its own (condition_problems); errors name `where` and `field.key`."""
    condition = _condition(table, field, where)
    problems = condition_problems(condition, field)
    if problems:
        raise ConfigError("\n".join(f"{where}: {p}" for p in problems))
    return condition


def _condition(table: dict, field: str, where: str) -> ConditionConfig:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: '{field}' must be a table")
    table = dict(table)
    if "name" not in table:
        raise ConfigError(f"{where}: missing required field '{field}.name'")
    name = _check_value(table.pop("name"), str, f"{field}.name", where)
    drop = _check_value(table.pop("condition_drop", 0.0), float, f"{field}.condition_drop", where)
    schedule_name = _check_value(table.pop("schedule", "constant"), str, f"{field}.schedule", where)
    if schedule_name not in SCHEDULES:
        raise ConfigError(
            f"{where}: field '{field}.schedule' is {schedule_name!r}; known schedules: {', '.join(sorted(SCHEDULES))}"
        )
    cls = SCHEDULES[schedule_name]
    known = schedule_fields(cls)
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ConfigError(
            f"{where}: unknown field '{field}.{unknown[0]}' for schedule {schedule_name!r} (known: name, "
            f"condition_drop, schedule, {', '.join(sorted(known))})"
        )
    guidance = _build(cls, table, field, where, renames=known)
    return ConditionConfig(name=name, guidance=guidance, condition_drop=drop)


def config_from_dict(data: dict, *, where: str = "config", base_dir: Path | None = None) -> ChainConfig:
    """Build and validate a ChainConfig from a parsed TOML document.

    Relative `data.path`, `model.path` and `model.vae` are resolved against `base_dir` when they exist there.
    """
    data = dict(data)
    conditions_raw = data.pop("conditions", None)
    if conditions_raw is None:
        raise ConfigError(f"{where}: missing required field 'conditions' (one [[conditions]] table per condition)")
    if not isinstance(conditions_raw, list):
        raise ConfigError(f"{where}: 'conditions' must be an array of tables ([[conditions]])")
    conditions = tuple(_condition(t, f"conditions[{i}]", where) for i, t in enumerate(conditions_raw))
    data = _sdxl_default_resolution(data)
    sections = {f.name: f for f in dataclasses.fields(ChainConfig) if f.name != "conditions"}
    unknown = sorted(set(data) - set(sections))
    if unknown:
        raise ConfigError(f"{where}: unknown table '[{unknown[0]}]' (known: {', '.join(sorted(sections))}, conditions)")
    hints = typing.get_type_hints(ChainConfig)
    kwargs: dict[str, Any] = {"conditions": conditions}
    for name, f in sections.items():
        if name in data:
            kwargs[name] = _check_value(data[name], hints[name], name, where)
        elif f.default is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required table '[{name}]'")
    config = ChainConfig(**kwargs)
    if base_dir is not None:
        config = _resolve_paths(config, base_dir)
    config.validate(where)
    return config


def _sdxl_default_resolution(data: dict) -> dict:
    """SDXL's native size: data.resolution defaults to 1024 when model.kind = "sdxl" (512 otherwise)."""
    model, table = data.get("model"), data.get("data", {})
    if isinstance(model, dict) and model.get("kind") == "sdxl" and isinstance(table, dict) \
            and "resolution" not in table:
        data = {**data, "data": {**table, "resolution": SDXL_RESOLUTION}}
    return data


def _resolve_paths(config: ChainConfig, base_dir: Path) -> ChainConfig:
    def resolve(p: str) -> str:
        if not p or p in ("tiny", "toy") or Path(p).is_absolute():
            return p
        candidate = (base_dir / p).resolve()
        # An HF id ("org/name") stays as it is unless such a folder exists next to the config.
        return str(candidate) if (candidate.exists() or p.startswith(".")) else p

    data_path = config.data.path
    if data_path and not Path(data_path).is_absolute():
        data_path = str((base_dir / data_path).resolve())
    data = dataclasses.replace(config.data, path=data_path)
    model = dataclasses.replace(config.model, path=resolve(config.model.path), vae=resolve(config.model.vae))
    return dataclasses.replace(config, data=data, model=model)


def load_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> ChainConfig:
    """Read a TOML config file, apply `section.key=value` overrides (apply_overrides), check it;
    errors name the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    data = apply_overrides(data, overrides, where=str(path))
    return config_from_dict(data, where=str(path), base_dir=path.parent.resolve())


_INDEXED = re.compile(r"conditions\[([0-9]+)\]")


def parse_override(text: str) -> tuple[list[str | int], Any]:
    """`section.key=value` -> (["section", "key"], value). The value is read as a TOML value (3, 1e-4, true,
    "text", [1, 2]); a value that is not valid TOML is taken as a plain string (`run.device=cpu`).
    Conditions are addressed by position: `conditions[0].scale=5`."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"{{overrides}} {text!r}: expected section.key=value, e.g. {{overrides}} "
                          "sampling.num_steps=20", parameters=("overrides",))
    parts: list[str | int] = []
    for part in key.split("."):
        m = _INDEXED.fullmatch(part)
        parts += ["conditions", int(m.group(1))] if m else [part]
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return parts, value


def _known_keys(cls: type) -> set[str]:
    return {f.metadata.get("key", f.name) for f in dataclasses.fields(cls)}


def apply_overrides(doc: dict, overrides: typing.Sequence[str], *, where: str = "config") -> dict:
    """A copy of TOML document `doc` with every `section.key=value` of `overrides` set (in order), before the
    config is built and checked. An unknown section or key is refused naming it; the resolved config (and so
    the run's config.toml) holds the result."""
    import copy

    doc = copy.deepcopy(doc)
    hints = typing.get_type_hints(ChainConfig)
    for text in overrides:
        parts, value = parse_override(text)
        dotted = text.partition("=")[0].strip()
        if parts[0] == "conditions":
            conditions = doc.get("conditions") or []
            if len(parts) != 3 or not isinstance(parts[1], int):
                raise ConfigError(f"{{overrides}} {dotted}: address a condition as conditions[N].key",
                                  parameters=("overrides",))
            if parts[1] >= len(conditions):
                raise ConfigError(f"{{overrides}} {dotted}: {where} has {len(conditions)} [[conditions]] tables "
                                  f"(conditions[0] .. conditions[{len(conditions) - 1}])", parameters=("overrides",))
            table = conditions[parts[1]]
            schedule = SCHEDULES.get(value if parts[2] == "schedule" else table.get("schedule", "constant"))
            known = {"name", "condition_drop", "schedule"} | (set(schedule_fields(schedule)) if schedule else set())
            if parts[2] not in known:
                raise ConfigError(f"{{overrides}} {dotted}: unknown key '{parts[2]}' for a condition (known: "
                                  f"{', '.join(sorted(known))})", parameters=("overrides",))
            table[parts[2]] = value
            continue
        cls: Any = ChainConfig
        table = doc
        for i, part in enumerate(parts):
            known = _known_keys(cls) - {"conditions"}
            if not isinstance(part, str) or part not in known:
                prefix = ".".join(map(str, parts[:i])) or "top level"
                raise ConfigError(f"{{overrides}} {dotted}: unknown key '{part}' in [{prefix}] (known: "
                                  f"{', '.join(sorted(known))})", parameters=("overrides",))
            hint = typing.get_type_hints(cls)[part] if cls is not ChainConfig else hints[part]
            if i == len(parts) - 1:
                if dataclasses.is_dataclass(hint):
                    raise ConfigError(f"{{overrides}} {dotted}: names a table; set one of its keys, e.g. "
                                      f"{dotted}.KEY=VALUE", parameters=("overrides",))
                table[part] = value
            else:
                if not dataclasses.is_dataclass(hint):
                    raise ConfigError(f"{{overrides}} {dotted}: '{part}' is a value, not a table",
                                      parameters=("overrides",))
                sub = table.setdefault(part, {})
                if not isinstance(sub, dict):
                    raise ConfigError(f"{where}: '{'.'.join(map(str, parts[:i + 1]))}' must be a table")
                table, cls = sub, hint
    return doc


# ------------------------------------------------------------------------------------------------ writing


def config_to_dict(config: ChainConfig) -> dict:
    """The TOML document of a config (inverse of config_from_dict)."""

    def plain(obj):
        if dataclasses.is_dataclass(obj):
            return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if isinstance(obj, tuple):
            return [plain(v) for v in obj]
        return obj

    doc = {}
    for f in dataclasses.fields(config):
        if f.name == "conditions":
            continue
        if f.name == "assay" and config.assay == AssayConfig():
            continue  # off: configs (and run folders) written before the assay existed read back unchanged
        doc[f.name] = plain(getattr(config, f.name))
    doc["conditions"] = [
        {"name": c.name, "condition_drop": c.condition_drop, **schedule_to_table(c.guidance)} for c in config.conditions
    ]
    return doc


def dumps_toml(doc: dict) -> str:
    """A small TOML writer for config documents: scalars, lists of scalars, tables, arrays of tables."""
    lines: list[str] = []

    def table(obj: dict, name: str, header: str | None) -> None:
        scalars = {k: v for k, v in obj.items() if not isinstance(v, dict) and not _is_table_array(v)}
        if header is not None:
            lines.append("")
            lines.append(header)
        for k, v in scalars.items():
            lines.append(f"{k} = {toml_value(v)}")
        for k, v in obj.items():
            sub = f"{name}.{k}" if name else k
            if isinstance(v, dict):
                table(v, sub, f"[{sub}]")
            elif _is_table_array(v):
                for item in v:
                    table(item, sub, f"[[{sub}]]")

    table(doc, "", None)
    return "\n".join(lines).lstrip("\n") + "\n"


def _is_table_array(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def config_to_toml(config: ChainConfig) -> str:
    return dumps_toml(config_to_dict(config))

