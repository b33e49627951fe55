"""LoRA adapters on the UNet and the text encoder (peft), saving and loading.

Adapters: rank r, alpha a (scale a / r), A kaiming-uniform (a = sqrt 5) and B zero, peft's default, which
matches kohya. The text-encoder adapter is attached with `peft.inject_adapter_in_model` (transformers >= 5.24
needs peft >= 0.22 for `add_adapter`). With CLIP skip c the last c - 1 text-encoder layers never reach the
embedding; they get no adapter (kohya attaches one that stays zero; leaving it out changes nothing in the
model and keeps data-parallel training free of unused parameters).

Saving writes the raw peft state dicts plus each adapter's LoraConfig as metadata in diffusers' layout
(`pytorch_lora_weights.safetensors`, keys `unet.<module>.lora_A.weight`, `text_encoder.<module>...`). That
file reloads bit-exactly (`load_lora`) and loads with diffusers' `load_lora_weights` at scale alpha / r; no
`convert_state_dict_to_diffusers`, which drops attention modules when proj_in/proj_out/ff are adapted.
SDXL models (chain.sdxl) carry a third adapter on text_encoder_2, saved under `text_encoder_2.` (the layout
of StableDiffusionXLPipeline.save_lora_weights); it covers every layer, because the pooled embedding is
taken from that encoder's last layer.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import torch

from chain.config import FinetuneConfig
from chain.text import unused_text_encoder_layers
from qtmio.atomic import atomic_folder

ADAPTER_NAME = "default"
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


def unet_lora_config(cfg: FinetuneConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.unet_target_modules), init_lora_weights=True
    )


def text_encoder_target_names(text_encoder, targets, clip_skip: int, *, pooled: bool = False) -> list[str]:
    """Full module names of the text encoder's adapted Linear layers, leaving out the layers CLIP skip
    makes gradient-free (module names of transformers >= 5.6: encoder.layers.N.self_attn.q_proj, ...; a
    CLIPTextModelWithProjection prefixes them with text_model.). `pooled`: the encoder's last layer also
    feeds the pooled embedding (SDXL's text_encoder_2), so every layer is used and adapted."""
    num_layers = text_encoder.config.num_hidden_layers
    unused = set() if pooled else set(unused_text_encoder_layers(num_layers, clip_skip))
    names = []
    for name, module in text_encoder.named_modules():
        parts = name.split(".")
        if parts[0] == "text_model":
            parts = parts[1:]
        if len(parts) < 3 or parts[0] != "encoder" or parts[1] != "layers":
            continue
        if int(parts[2]) in unused or not isinstance(module, torch.nn.Linear):
            continue
        if any(name == t or name.endswith("." + t) for t in targets):
            names.append(name)
    if not names:
        raise ValueError(f"no text-encoder module matches finetune.text_encoder_target_modules {list(targets)}")
    return names


def text_encoder_lora_config(text_encoder, cfg: FinetuneConfig, *, pooled: bool = False):
    from peft import LoraConfig

    names = text_encoder_target_names(text_encoder, cfg.text_encoder_target_modules, cfg.clip_skip, pooled=pooled)
    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=names, init_lora_weights=True)


def lora_parameters(module) -> list[torch.nn.Parameter]:
    """The adapter's parameters (lora_A and lora_B of every adapted layer), in module order."""
    if module is None:
        return []
    return [p for n, p in module.named_parameters() if "lora_" in n]


def _reinit_lora(module, *, generator: torch.Generator) -> None:
    """Re-draw every lora_A from `generator` exactly as peft does (kaiming uniform, a = sqrt 5), B = 0, so
    the initial adapter depends only on the generator, not on torch's global RNG."""
    with torch.no_grad():
        for name, sub in sorted(module.named_modules(), key=lambda x: x[0]):
            lora_a = getattr(sub, "lora_A", None)
            if lora_a is None or ADAPTER_NAME not in lora_a:
                continue
            weight = lora_a[ADAPTER_NAME].weight
            fresh = torch.empty(weight.shape, dtype=torch.float32)
            torch.nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
            weight.copy_(fresh)
            sub.lora_B[ADAPTER_NAME].weight.zero_()


def add_lora(unet, text_encoder, cfg: FinetuneConfig, *, generator: torch.Generator):
    """Attach fresh adapters (UNet always; text encoder when cfg.train_text_encoder). Returns the two
    LoraConfigs (the second None without a text-encoder adapter). Adapter weights are float32."""
    unet_config = unet_lora_config(cfg)
    unet.add_adapter(unet_config, adapter_name=ADAPTER_NAME)
    _prepare_adapter(unet, generator)
    te_config = None
    if cfg.train_text_encoder:
        te_config = add_text_encoder_lora(text_encoder, cfg, generator=generator)
    return unet_config, te_config


def add_text_encoder_lora(text_encoder, cfg: FinetuneConfig, *, generator: torch.Generator, pooled: bool = False):
    """Attach a fresh adapter to a text encoder (`pooled`: SDXL's text_encoder_2, every layer adapted);
    returns its LoraConfig."""
    from peft import inject_adapter_in_model

    config = text_encoder_lora_config(text_encoder, cfg, pooled=pooled)
    inject_adapter_in_model(config, text_encoder, adapter_name=ADAPTER_NAME)
    _prepare_adapter(text_encoder, generator)
    return config


def _prepare_adapter(module, generator: torch.Generator) -> None:
    for p in lora_parameters(module):
        p.data = p.data.float()
        p.requires_grad_(True)
    _reinit_lora(module, generator=generator)


@dataclasses.dataclass
class ModelLora:
    """The LoraConfigs of a model's adapters: UNet, text encoder, SDXL's text encoder 2 (None: no adapter)."""

    unet: object
    text_encoder: object | None = None
    text_encoder_2: object | None = None


def add_model_lora(model, cfg: FinetuneConfig, *, generator: torch.Generator) -> ModelLora:
    """Fresh adapters on a BaseModel: the UNet, and with cfg.train_text_encoder its text encoder(s) (both for
    SDXL, kohya: one learning rate for both). Drawn from `generator` in the order UNet, text encoder, text
    encoder 2."""
    unet_config, te_config = add_lora(model.unet, model.text_encoder, cfg, generator=generator)
    te2_config = None
    if cfg.train_text_encoder and model.text_encoder_2 is not None:
        te2_config = add_text_encoder_lora(model.text_encoder_2, cfg, generator=generator, pooled=True)
    return ModelLora(unet_config, te_config, te2_config)


def save_model_lora(folder: str | os.PathLike, model, configs: ModelLora) -> Path:
    """save_lora for a BaseModel's adapters (SDXL: text_encoder_2 too)."""
    return save_lora(folder, model.unet, model.text_encoder, configs.unet, configs.text_encoder,
                     text_encoder_2=model.text_encoder_2 if configs.text_encoder_2 is not None else None,
                     text_encoder_2_config=configs.text_encoder_2)


def load_model_lora(folder: str | os.PathLike, model) -> None:
    """load_lora into a BaseModel whose adapters are attached (add_model_lora with the same config)."""
    load_lora(folder, model.unet, model.text_encoder, text_encoder_2=model.text_encoder_2)


def lora_state_dicts(unet, text_encoder):
    """The raw peft state dicts (keys without adapter name) of the UNet and text-encoder adapters."""
    from peft import get_peft_model_state_dict

    unet_sd = get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)
    te_sd = None
    if getattr(text_encoder, "peft_config", None):
        te_sd = get_peft_model_state_dict(text_encoder, adapter_name=ADAPTER_NAME)
    return unet_sd, te_sd


def _cpu32(state: dict) -> dict:
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def save_lora(folder: str | os.PathLike, unet, text_encoder, unet_config, te_config, *, text_encoder_2=None,
              text_encoder_2_config=None) -> Path:
    """Write the adapters to `folder`/pytorch_lora_weights.safetensors with their LoraConfig metadata, atomically
    (a temp folder renamed into place). With `text_encoder_2` (SDXL) its adapter is saved under the prefix
    text_encoder_2. (StableDiffusionXLPipeline.load_lora_weights reads the file)."""
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        unet_sd, te_sd = lora_state_dicts(unet, text_encoder)
        kwargs = {}
        if te_sd:
            kwargs["text_encoder_lora_layers"] = _cpu32(te_sd)
            kwargs["text_encoder_lora_adapter_metadata"] = te_config.to_dict()
        loader = StableDiffusionLoraLoaderMixin
        if text_encoder_2 is not None:
            from peft import get_peft_model_state_dict

            loader = StableDiffusionXLLoraLoaderMixin
            kwargs["text_encoder_2_lora_layers"] = _cpu32(get_peft_model_state_dict(text_encoder_2,
                                                                                     adapter_name=ADAPTER_NAME))
            kwargs["text_encoder_2_lora_adapter_metadata"] = text_encoder_2_config.to_dict()
        loader.save_lora_weights(
            tmp, unet_lora_layers=_cpu32(unet_sd), unet_lora_adapter_metadata=unet_config.to_dict(), **kwargs
        )
    return folder


LORA_PREFIXES = ("unet", "text_encoder", "text_encoder_2")


def read_lora_parts(folder: str | os.PathLike) -> dict[str, dict]:
    """{prefix: state dict} of a saved adapter for the prefixes it holds (unet, text_encoder,
    text_encoder_2), prefixes stripped."""
    from safetensors.torch import load_file

    state = load_file(str(Path(folder) / LORA_WEIGHTS_NAME))
    parts: dict[str, dict] = {}
    for key, value in state.items():
        prefix, _, rest = key.partition(".")
        if prefix in LORA_PREFIXES:
            parts.setdefault(prefix, {})[rest] = value
    return parts


def read_lora(folder: str | os.PathLike) -> tuple[dict, dict]:
    """(UNet state dict, text-encoder state dict) of a saved adapter, prefixes stripped."""
    parts = read_lora_parts(folder)
    return parts.get("unet", {}), parts.get("text_encoder", {})


def load_lora(folder: str | os.PathLike, unet, text_encoder, *, text_encoder_2=None) -> None:
    """Copy saved adapter weights into adapters already attached (add_lora with the same config): bit-exact.
    A file with a text_encoder_2 adapter needs `text_encoder_2` (SDXL) with its adapter attached."""
    from peft import set_peft_model_state_dict

    parts = read_lora_parts(folder)
    _set_checked(set_peft_model_state_dict, unet, parts.get("unet", {}), "unet", folder)
    if parts.get("text_encoder"):
        _set_checked(set_peft_model_state_dict, text_encoder, parts["text_encoder"], "text_encoder", folder)
    if parts.get("text_encoder_2"):
        if text_encoder_2 is None:
            raise ValueError(f"{folder}: the adapter holds a text_encoder_2 part (SDXL) but the model has none")
        _set_checked(set_peft_model_state_dict, text_encoder_2, parts["text_encoder_2"], "text_encoder_2", folder)


def _set_checked(setter, module, state, label, folder) -> None:
    result = setter(module, state, adapter_name=ADAPTER_NAME)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise ValueError(f"{folder}: {label} LoRA keys do not match the model: {unexpected[:3]} ...")
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing:
        raise ValueError(f"{folder}: {label} LoRA weights missing for {missing[:3]} ...")


def load_lora_with_diffusers(folder: str | os.PathLike, unet, text_encoder, *, text_encoder_2=None) -> None:
    """Load a saved adapter the way diffusers' `pipeline.load_lora_weights` does, through the loader's
    lower-level classmethods (lora_state_dict, load_lora_into_unet, load_lora_into_text_encoder), which need
    no pipeline: a pixel-space model has no VAE and so no StableDiffusionPipeline. SDXL: as
    StableDiffusionXLPipeline.load_lora_weights, text_encoder_2's part into `text_encoder_2`."""
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    loader = StableDiffusionLoraLoaderMixin if text_encoder_2 is None else StableDiffusionXLLoraLoaderMixin
    state, alphas, metadata = loader.lora_state_dict(str(folder), return_lora_metadata=True)
    loader.load_lora_into_unet(state, alphas, unet, metadata=metadata)
    if any(k.startswith("text_encoder.") for k in state):
        loader.load_lora_into_text_encoder(state, alphas, text_encoder, metadata=metadata)
    if text_encoder_2 is not None and any(k.startswith("text_encoder_2.") for k in state):
        loader.load_lora_into_text_encoder(state, alphas, text_encoder_2, prefix="text_encoder_2", metadata=metadata)
