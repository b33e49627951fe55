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
"""

from __future__ import annotations

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


def text_encoder_target_names(text_encoder, targets, clip_skip: int) -> list[str]:
    """Full module names of the text encoder's adapted Linear layers, leaving out the layers CLIP skip
    makes gradient-free (module names of transformers >= 5.6: encoder.layers.N.self_attn.q_proj, ...)."""
    num_layers = text_encoder.config.num_hidden_layers
    unused = set(unused_text_encoder_layers(num_layers, clip_skip))
    names = []
    for name, module in text_encoder.named_modules():
        parts = name.split(".")
        if len(parts) < 3 or parts[0] != "encoder" or parts[1] != "layers":
            continue
        if int(parts[2]) in unused or not isinstance(module, torch.nn.Linear):
            continue
        if any(name == t or name.endswith("." + t) for t in targets):
            names.append(name)
    if not names:
        raise ValueError(f"no text-encoder module matches finetune.text_encoder_target_modules {list(targets)}")
    return names


def text_encoder_lora_config(text_encoder, cfg: FinetuneConfig):
    from peft import LoraConfig

    names = text_encoder_target_names(text_encoder, cfg.text_encoder_target_modules, cfg.clip_skip)
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
    from peft import inject_adapter_in_model

    unet_config = unet_lora_config(cfg)
    unet.add_adapter(unet_config, adapter_name=ADAPTER_NAME)
    te_config = None
    if cfg.train_text_encoder:
        te_config = text_encoder_lora_config(text_encoder, cfg)
        inject_adapter_in_model(te_config, text_encoder, adapter_name=ADAPTER_NAME)
    for module in (unet, text_encoder if te_config is not None else None):
        if module is None:
            continue
        for p in lora_parameters(module):
            p.data = p.data.float()
            p.requires_grad_(True)
        _reinit_lora(module, generator=generator)
    return unet_config, te_config


def lora_state_dicts(unet, text_encoder):
    """The raw peft state dicts (keys without adapter name) of the UNet and text-encoder adapters."""
    from peft import get_peft_model_state_dict

    unet_sd = get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)
    te_sd = None
    if getattr(text_encoder, "peft_config", None):
        te_sd = get_peft_model_state_dict(text_encoder, adapter_name=ADAPTER_NAME)
    return unet_sd, te_sd


def save_lora(folder: str | os.PathLike, unet, text_encoder, unet_config, te_config) -> Path:
    """Write the adapters to `folder`/pytorch_lora_weights.safetensors with their LoraConfig metadata, atomically
    (a temp folder renamed into place)."""
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin

    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        unet_sd, te_sd = lora_state_dicts(unet, text_encoder)
        unet_sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in unet_sd.items()}
        kwargs = {}
        if te_sd:
            kwargs["text_encoder_lora_layers"] = {
                k: v.detach().to("cpu", torch.float32).contiguous() for k, v in te_sd.items()
            }
            kwargs["text_encoder_lora_adapter_metadata"] = te_config.to_dict()
        StableDiffusionLoraLoaderMixin.save_lora_weights(
            tmp, unet_lora_layers=unet_sd, unet_lora_adapter_metadata=unet_config.to_dict(), **kwargs
        )
    return folder


def read_lora(folder: str | os.PathLike) -> tuple[dict, dict]:
    """(UNet state dict, text-encoder state dict) of a saved adapter, prefixes stripped."""
    from safetensors.torch import load_file

    state = load_file(str(Path(folder) / LORA_WEIGHTS_NAME))
    unet_sd = {k[len("unet.") :]: v for k, v in state.items() if k.startswith("unet.")}
    te_sd = {k[len("text_encoder.") :]: v for k, v in state.items() if k.startswith("text_encoder.")}
    return unet_sd, te_sd


def load_lora(folder: str | os.PathLike, unet, text_encoder) -> None:
    """Copy saved adapter weights into adapters already attached (add_lora with the same config): bit-exact."""
    from peft import set_peft_model_state_dict

    unet_sd, te_sd = read_lora(folder)
    _set_checked(set_peft_model_state_dict, unet, unet_sd, "unet", folder)
    if te_sd:
        _set_checked(set_peft_model_state_dict, text_encoder, te_sd, "text_encoder", folder)


def _set_checked(setter, module, state, label, folder) -> None:
    result = setter(module, state, adapter_name=ADAPTER_NAME)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise ValueError(f"{folder}: {label} LoRA keys do not match the model: {unexpected[:3]} ...")
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing:
        raise ValueError(f"{folder}: {label} LoRA weights missing for {missing[:3]} ...")


def load_lora_with_diffusers(folder: str | os.PathLike, unet, text_encoder) -> None:
    """Load a saved adapter the way diffusers' `pipeline.load_lora_weights` does, through the loader's
    lower-level classmethods (lora_state_dict, load_lora_into_unet, load_lora_into_text_encoder), which need
    no pipeline: a pixel-space model has no VAE and so no StableDiffusionPipeline."""
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin as Loader

    state, alphas, metadata = Loader.lora_state_dict(str(folder), return_lora_metadata=True)
    Loader.load_lora_into_unet(state, alphas, unet, metadata=metadata)
    if any(k.startswith("text_encoder.") for k in state):
        Loader.load_lora_into_text_encoder(state, alphas, text_encoder, metadata=metadata)
