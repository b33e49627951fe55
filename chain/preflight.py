"""Cheap checks at the start of a run that need the machine or the base model's folder, not the model
itself: the device exists, and the config fits a local base model's shapes (read from its JSON configs)."""

from __future__ import annotations

import json
from pathlib import Path

from chain.config import ChainConfig
from chain.errors import ConfigError


def device_problem(device: str, *, cuda_available: bool, cuda_count: int) -> str | None:
    """Why `device` (run.device) cannot be used on this machine, or None."""
    if device.startswith("cuda"):
        if not cuda_available:
            return (f"field 'run.device' = '{device}': this machine has no usable CUDA device; use 'cpu' or "
                    "'auto' (CUDA when available, else the CPU)")
        index = int(device.partition(":")[2] or 0)
        if index >= cuda_count:
            return f"field 'run.device' = '{device}': this machine has {cuda_count} CUDA device(s) (0..{cuda_count - 1})"
    return None


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def model_problems(config: ChainConfig) -> list[str]:
    """Mismatches between the config and a local base-model folder: the resolution must be a multiple of
    the VAE's downsampling factor (else D_0 is measured at one size and generated at another), clip_skip
    cannot exceed the text encoders' layers, and an SDXL model needs clip_skip >= 2."""
    folder = Path(config.model.path)
    if config.model.path == "tiny" or not folder.is_dir():
        return []
    problems = []
    vae_folder = Path(config.model.vae) / "vae" if config.model.vae else folder / "vae"
    if config.model.vae and not vae_folder.is_dir():
        vae_folder = Path(config.model.vae)
    vae = _json(vae_folder / "config.json")
    if vae and "block_out_channels" in vae:
        factor = 2 ** (len(vae["block_out_channels"]) - 1)
        if config.data.resolution % factor:
            problems.append(f"field 'data.resolution' = {config.data.resolution}: must be a multiple of {factor}, "
                            f"the VAE's downsampling factor ({vae_folder})")
    for sub in ("text_encoder", "text_encoder_2"):
        text = _json(folder / sub / "config.json")
        if text and "num_hidden_layers" in text and config.finetune.clip_skip > text["num_hidden_layers"]:
            problems.append(f"field 'finetune.clip_skip' = {config.finetune.clip_skip}: must be <= "
                            f"{text['num_hidden_layers']}, the text encoder's layer count ({folder / sub})")
    index = _json(folder / "model_index.json") or {}
    sdxl = index.get("_class_name") == "StableDiffusionXLPipeline" or (folder / "text_encoder_2").is_dir()
    if sdxl and config.finetune.clip_skip < 2:
        problems.append(f"field 'finetune.clip_skip' = {config.finetune.clip_skip}: {folder} is an SDXL model, "
                        "which conditions on raw hidden states below the last layer (docs/sdxl.md); use 2 (the "
                        "penultimate layer, as kohya and StableDiffusionXLPipeline) or more")
    return problems


def preflight(config: ChainConfig, where: str = "config") -> None:
    """Raise ConfigError (one line per problem) if the run cannot start on this machine with this model."""
    import torch

    problems = model_problems(config)
    device = device_problem(config.run.device, cuda_available=torch.cuda.is_available(),
                            cuda_count=torch.cuda.device_count())
    if device:
        problems.insert(0, device)
    if problems:
        raise ConfigError("\n".join(f"{where}: {p}" for p in problems))
