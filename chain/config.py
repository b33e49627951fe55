"""Configuration of a chain run: frozen dataclasses read from (and written back to) TOML.

Defaults are the paper's recipe (Appendix A, Table 1; kohya sd-scripts semantics, REFERENCE.md). A config
file names tables `[run]`, `[data]`, `[model]`, `[finetune]`, `[sampling]`, `[metrics]` and an array
`[[conditions]]`; every key is checked: an unknown key, a missing required key or a value of the wrong type
raises ConfigError naming the file and the field.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from pathlib import Path
from typing import Any

from chain.errors import ConfigError
from chain.guidance import SCHEDULES, schedule_fields, schedule_to_table

UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
TEXT_ENCODER_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The chain itself (Section 3.1) and the paper's variants (Appendix C.2, C.3, C.12, E.4)."""

    num_iterations: int = 5
    seed: int = 0
    # Fraction of each training set replaced by the original image of the same prompt (App. C.3).
    real_mix_ratio: float = 0.0
    # Train M_k on the images of the last `accumulate_iterations` iterations (1 = D_{k-1} only; 0 = all of
    # D_0 .. D_{k-1}) (App. C.12).
    accumulate_iterations: int = 1
    # Continue the previous iteration's LoRA instead of a fresh one on M_0 (App. E.4).
    continual_finetuning: bool = False
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    dataset_name: str = ""  # recorded in metrics.nc attrs; defaults to the data folder's name


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """D_0: a captioned image folder (kohya: same-name caption files) or an HF imagefolder."""

    path: str
    caption_extension: str = ".txt"  # kohya's default is ".caption"; the paper's folders use ".txt"
    format: str = "auto"  # "auto" | "captions" | "metadata" (metadata.jsonl with file_name + text)
    resolution: int = 512
    center_crop: bool = True
    max_images: int = 0  # 0 = all images


@dataclasses.dataclass(frozen=True)
class TinyModelConfig:
    """A tiny random base model built from configs (tests and CPU examples); see chain.models."""

    seed: int = 0
    latent: bool = True  # with a tiny VAE (latent space); False: pixel space (no vae/)
    block_out_channels: tuple[int, ...] = (16, 32)
    layers_per_block: int = 1
    cross_attention_dim: int = 32
    attention_head_dim: int = 32
    norm_num_groups: int = 8
    text_hidden_size: int = 32
    text_layers: int = 3
    text_intermediate_size: int = 64
    vae_block_out_channels: tuple[int, ...] = (8, 16)
    latent_channels: int = 4


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """M_0: a diffusers-format folder or HF cache id (offline), "tiny" (built from `tiny`), or "toy" (the
    committed toy base model of chain.toy, pretrained on the toy world's D_0 at 32 x 32)."""

    path: str
    vae: str = ""  # a fixed external VAE (folder or HF id), e.g. sd-vae-ft-mse; "" = the model's own
    tiny: TinyModelConfig = TinyModelConfig()


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """LoRA finetuning, Table 1 of the paper in kohya sd-scripts terms (REFERENCE.md)."""

    rank: int = 32
    alpha: float = 8.0
    unet_lr: float = 1e-4
    text_encoder_lr: float = 5e-5
    train_text_encoder: bool = True
    batch_size: int = 6  # the global batch, whatever the number of processes
    epochs: int = 100
    max_train_steps: int = 0  # 0 = epochs decide
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16" (LoRA weights stay float32)
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    min_snr_gamma: float = 5.0  # 0 = plain MSE
    noise_offset: float = 0.0
    max_grad_norm: float = 1.0  # over all LoRA parameters together; 0 = no clipping
    clip_skip: int = 2
    flip: bool = True
    cache_latents: bool = True
    unet_target_modules: tuple[str, ...] = UNET_LORA_TARGETS
    text_encoder_target_modules: tuple[str, ...] = TEXT_ENCODER_LORA_TARGETS


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Generation with the written-out Euler-ancestral loop (chain.sampling)."""

    num_steps: int = 30
    batch_size: int = 8
    images_per_prompt: int = 1  # App. C.2
    latent_histogram_bins: int = 64
    latent_histogram_range: float = 4.0  # histogram of final latents over [-range, range]


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
    """Optional feature metrics; "" switches one off (its variables stay NaN)."""

    encoder: str = ""  # "" | "dinov2:<folder or HF id>" | "toy" (chain.toy's feature encoder)
    clip_model: str = ""  # "" | a CLIP folder or HF id for clip_score
    recall_k: int = 5
    batch_size: int = 32
    # The phenotype's threshold in cycles/pixel (Eq. 14): 0.02 at 256 pixels, i.e. 5.1 cycles per image;
    # for smaller images keep the cycles per image: 0.02 * 256 / resolution (0.16 at 32 pixels).
    phenotype_tau: float = 0.02


@dataclasses.dataclass(frozen=True)
class AssayConfig:
    """The selection assay's reference set: for every condition and iteration k >= 1, `images` more images
    from the same M_k with the same prompts and per-image seeds as the first `images` guided ones, at the
    constant guidance scale `reference_scale` (1 = the unguided model: the conditional pass only). Measured
    and stored (hf_power_reference), never trained on. images = 0 (the default) switches it off."""

    images: int = 0
    reference_scale: float = 1.0


@dataclasses.dataclass(frozen=True)
class ConditionConfig:
    """One condition of a run: a guidance schedule and a condition-drop probability."""

    name: str
    guidance: Any  # a chain.guidance schedule
    condition_drop: float = 0.0


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
        """Range checks across fields; raises ConfigError naming the field."""

        def bad(field: str, why: str) -> None:
            raise ConfigError(f"{where}: field '{field}' {why}")

        if self.run.num_iterations < 1:
            bad("run.num_iterations", "must be >= 1")
        if not 0.0 <= self.run.real_mix_ratio <= 1.0:
            bad("run.real_mix_ratio", "must lie in [0, 1]")
        if self.run.accumulate_iterations < 0:
            bad("run.accumulate_iterations", "must be >= 0 (0 = all previous iterations)")
        if self.data.format not in ("auto", "captions", "metadata"):
            bad("data.format", "must be 'auto', 'captions' or 'metadata'")
        if self.data.resolution < 8:
            bad("data.resolution", "must be >= 8")
        if self.data.max_images < 0:
            bad("data.max_images", "must be >= 0")
        f = self.finetune
        if f.rank < 1:
            bad("finetune.rank", "must be >= 1")
        if f.batch_size < 1:
            bad("finetune.batch_size", "must be >= 1")
        if f.epochs < 1 and f.max_train_steps < 1:
            bad("finetune.epochs", "must be >= 1 (or set finetune.max_train_steps)")
        if f.mixed_precision not in ("no", "fp16", "bf16"):
            bad("finetune.mixed_precision", "must be 'no', 'fp16' or 'bf16'")
        if f.clip_skip < 1:
            bad("finetune.clip_skip", "must be >= 1 (1 = last layer)")
        if self.sampling.num_steps < 1:
            bad("sampling.num_steps", "must be >= 1")
        if self.sampling.batch_size < 1:
            bad("sampling.batch_size", "must be >= 1")
        if not self.finetune.cache_latents:
            bad("finetune.cache_latents", "must be true: latents (both flips) are always encoded once and cached; "
                "a fresh VAE sample per step is not implemented")
        if not 0.0 <= self.metrics.phenotype_tau < 0.7072:
            bad("metrics.phenotype_tau", "must lie in [0, 1/sqrt(2)) cycles/pixel (0.02 at 256 pixels)")
        if self.sampling.images_per_prompt < 1:
            bad("sampling.images_per_prompt", "must be >= 1")
        if self.assay.images < 0:
            bad("assay.images", "must be >= 0 (0 = no reference set)")
        if not (self.assay.reference_scale >= 0.0 and math.isfinite(self.assay.reference_scale)):
            bad("assay.reference_scale", "must be a finite number >= 0 (1 = unguided)")
        if not self.conditions:
            bad("conditions", "needs at least one [[conditions]] table")
        names = [c.name for c in self.conditions]
        for i, c in enumerate(self.conditions):
            if not c.name or "/" in c.name or c.name.startswith("."):
                bad(f"conditions[{i}].name", "must be a non-empty folder-safe name")
            if names.count(c.name) > 1:
                bad(f"conditions[{i}].name", f"{c.name!r} is used twice")
            if not 0.0 <= c.condition_drop <= 1.0:
                bad(f"conditions[{i}].condition_drop", "must lie in [0, 1]")


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


def _condition(table: dict, index: int, where: str) -> ConditionConfig:
    field = f"conditions[{index}]"
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
    conditions = tuple(_condition(t, i, where) for i, t in enumerate(conditions_raw))
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


def load_config(path: str | Path) -> ChainConfig:
    """Read a TOML config file; errors name the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return config_from_dict(data, where=str(path), base_dir=path.parent.resolve())


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


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def dumps_toml(doc: dict) -> str:
    """A small TOML writer for config documents: scalars, lists of scalars, tables, arrays of tables."""
    lines: list[str] = []

    def table(obj: dict, name: str, header: str | None) -> None:
        scalars = {k: v for k, v in obj.items() if not isinstance(v, dict) and not _is_table_array(v)}
        if header is not None:
            lines.append("")
            lines.append(header)
        for k, v in scalars.items():
            lines.append(f"{k} = {_toml_value(v)}")
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

