"""The base model M_0: loading diffusers-format folders or HF cache ids offline, saving, tiny test models.

A base model folder holds model_index.json, unet/, text_encoder/, tokenizer/, scheduler/ and optionally
vae/. Without vae/ the model is pixel space: the UNet denoises images scaled to [-1, 1] directly (the
embedded toy world uses this). An SDXL folder (model_index.json names StableDiffusionXLPipeline, or
text_encoder_2/ exists) also holds text_encoder_2/ (CLIPTextModelWithProjection) and tokenizer_2/; see
chain.sdxl and docs/sdxl.md. Everything loads with local_files_only=True: nothing is downloaded.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from chain.config import ModelConfig, TinyModelConfig
from chain.errors import ModelLoadError
from chain.text import token_length
from qtmio.atomic import atomic_folder

MODEL_SUBFOLDERS = ("unet", "text_encoder", "tokenizer", "scheduler")

# Stable Diffusion 1.x noise schedule (scaled-linear betas), also used for tiny models.
SD_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "clip_sample": False,
}


@dataclasses.dataclass
class BaseModel:
    """The parts of a Stable-Diffusion-style model the chain uses.

    `vae` is None for a pixel-space model. `scheduler_config` is the training noise schedule (a dict read
    from scheduler/), from which both the training (DDPM) and the sampling (Euler ancestral) schedulers are
    built. An SDXL model also has `text_encoder_2` (with projection) and `tokenizer_2`, and
    `force_zeros_for_empty_prompt` (model_index.json; the pipeline's default True): whether the
    unconditional branch of guidance uses zero embeddings instead of those of "" (chain.sdxl).
    """

    unet: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict
    vae: Any | None = None
    source: str = ""
    text_encoder_2: Any | None = None
    tokenizer_2: Any | None = None
    force_zeros_for_empty_prompt: bool = False

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    def modules(self) -> list:
        """The model's torch modules: UNet, text encoder(s), VAE (those present)."""
        return [m for m in (self.unet, self.text_encoder, self.text_encoder_2, self.vae) if m is not None]

    def text_encoders(self) -> list:
        """The text encoder(s): one, or two for SDXL."""
        return [m for m in (self.text_encoder, self.text_encoder_2) if m is not None]

    @property
    def is_pixel_space(self) -> bool:
        return self.vae is None

    @property
    def vae_scale_factor(self) -> int:
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def max_token_length(self) -> int:
        return token_length(self.tokenizer, self.text_encoder)

    def copy(self) -> "BaseModel":
        """A deep copy (weights included): finetuning always starts from a pristine M_0."""
        return dataclasses.replace(
            self,
            unet=copy.deepcopy(self.unet),
            text_encoder=copy.deepcopy(self.text_encoder),
            text_encoder_2=copy.deepcopy(self.text_encoder_2),
            vae=copy.deepcopy(self.vae),
            scheduler_config=dict(self.scheduler_config),
        )


def byte_level_vocab() -> dict[str, int]:
    """CLIP's byte-level base vocabulary: the 256 byte characters, with and without '</w>', plus
    <|startoftext|> and <|endoftext|>. No merges: one token per byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            chars.append(256 + extra)
            extra += 1
    symbols = [chr(c) for c in chars]
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def make_tiny_tokenizer(max_length: int = 77, pad_token: str = "<|endoftext|>"):
    """An offline CLIP tokenizer with the byte-level vocabulary (no hub access). SDXL's second tokenizer
    pads with "!" instead of the end token."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=byte_level_vocab(), merges=[], model_max_length=max_length, pad_token=pad_token)


def make_tiny_model(config: TinyModelConfig = TinyModelConfig(), *, resolution: int = 32, kind: str = "sd") -> BaseModel:
    """A tiny random model of `kind` ("sd"/"auto": make_tiny_base_model; "sdxl": chain.sdxl.make_tiny_sdxl_model)."""
    if kind == "sdxl":
        from chain.sdxl import make_tiny_sdxl_model

        return make_tiny_sdxl_model(config, resolution=resolution)
    return make_tiny_base_model(config, resolution=resolution)


def make_tiny_base_model(config: TinyModelConfig = TinyModelConfig(), *, resolution: int = 32) -> BaseModel:
    """A tiny random SD-style model from configs (tests, CPU examples).

    Attention sits only in the lowest-resolution UNet block and the mid block, with one head of dimension
    `attention_head_dim` (few heads, attention at low resolution, SDPA). The weights are drawn
    from torch's generator seeded with `config.seed` inside a forked RNG state, so the caller's global RNG is
    untouched and the same config always gives the same model.
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = make_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        unet = make_tiny_unet(config, resolution)
        text_config = CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.text_hidden_size,
            intermediate_size=config.text_intermediate_size,
            num_hidden_layers=config.text_layers,
            num_attention_heads=1,
            projection_dim=config.cross_attention_dim,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        if config.text_hidden_size != config.cross_attention_dim:
            raise ValueError("tiny model: text_hidden_size must equal cross_attention_dim")
        text_encoder = CLIPTextModel(text_config)
        vae = make_tiny_vae(config, resolution) if config.latent else None
    for module in (unet, text_encoder, vae):
        if module is not None:
            module.eval()
    return BaseModel(unet, text_encoder, tokenizer, dict(SD_SCHEDULER_CONFIG), vae, source="tiny")


def make_tiny_unet(config: TinyModelConfig, resolution: int, **kwargs):
    """The tiny models' random UNet2DConditionModel: attention only in the lowest-resolution block and the mid
    block (weights from torch's global generator: call it inside a seeded, forked RNG state); `kwargs` are
    further UNet2DConditionModel arguments (SDXL: its added conditioning)."""
    from diffusers import UNet2DConditionModel

    channels = tuple(config.block_out_channels)
    in_channels = config.latent_channels if config.latent else 3
    vae_factor = 2 ** (len(config.vae_block_out_channels) - 1) if config.latent else 1
    return UNet2DConditionModel(
        sample_size=resolution // vae_factor,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=channels,
        layers_per_block=config.layers_per_block,
        down_block_types=("DownBlock2D",) * (len(channels) - 1) + ("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",) + ("UpBlock2D",) * (len(channels) - 1),
        cross_attention_dim=config.cross_attention_dim,
        attention_head_dim=config.attention_head_dim,
        norm_num_groups=config.norm_num_groups,
        **kwargs,
    )


def make_tiny_vae(config: TinyModelConfig, resolution: int, **kwargs):
    """The tiny models' random AutoencoderKL (weights from torch's global generator: call it inside a seeded,
    forked RNG state); `kwargs` are further AutoencoderKL arguments (SDXL: its scaling_factor)."""
    from diffusers import AutoencoderKL

    vchannels = tuple(config.vae_block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=vchannels,
        down_block_types=("DownEncoderBlock2D",) * len(vchannels),
        up_block_types=("UpDecoderBlock2D",) * len(vchannels),
        latent_channels=config.latent_channels,
        norm_num_groups=min(vchannels[0], 4),
        sample_size=resolution,
        **kwargs,
    )


def save_base_model(model: BaseModel, folder: str | os.PathLike) -> Path:
    """Write a diffusers-format folder (model_index.json, unet/, text_encoder/, tokenizer/, scheduler/,
    vae/ when latent; text_encoder_2/ and tokenizer_2/ for SDXL), atomically: built in a temp folder next to it, then renamed into place."""
    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        write_model_folder(model, tmp)
    return folder


def write_model_folder(model: BaseModel, folder: Path, *, scheduler_class: str = "DDPMScheduler") -> None:
    """The files of a diffusers-format folder written into the existing folder `folder` (not atomic: callers
    write into a temp folder), with the noise schedule saved as `scheduler_class` (a diffusers scheduler)."""
    import diffusers

    folder.mkdir(parents=True, exist_ok=True)
    model.unet.save_pretrained(folder / "unet")
    model.text_encoder.save_pretrained(folder / "text_encoder")
    model.tokenizer.save_pretrained(folder / "tokenizer")
    getattr(diffusers, scheduler_class).from_config(model.scheduler_config).save_pretrained(folder / "scheduler")
    if model.is_sdxl:
        from chain.sdxl import sdxl_model_index

        model.text_encoder_2.save_pretrained(folder / "text_encoder_2")
        model.tokenizer_2.save_pretrained(folder / "tokenizer_2")
        if model.vae is not None:
            model.vae.save_pretrained(folder / "vae")
        index = sdxl_model_index(model, diffusers.__version__)
        index["scheduler"] = ["diffusers", scheduler_class]
        (folder / "model_index.json").write_text(json.dumps(index, indent=2))
        return
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", scheduler_class],
        "vae": [None, None],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    if model.vae is not None:
        model.vae.save_pretrained(folder / "vae")
        index["vae"] = ["diffusers", "AutoencoderKL"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def _model_index(source: str) -> dict:
    path = Path(source)
    if path.is_dir():
        index_file = path / "model_index.json"
        if not index_file.is_file():
            raise ModelLoadError(
                f"{path} is not a diffusers-format model folder: model_index.json is missing (expected "
                f"model_index.json, {', '.join(s + '/' for s in MODEL_SUBFOLDERS)} and optionally vae/)"
            )
        for sub in MODEL_SUBFOLDERS:
            if not (path / sub).is_dir():
                raise ModelLoadError(f"model folder {path} lacks {sub}/ (a diffusers-format folder needs it)")
        return json.loads(index_file.read_text())
    try:
        from huggingface_hub import hf_hub_download

        index_file = hf_hub_download(source, "model_index.json", local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any hub failure means the same thing offline
        raise ModelLoadError(
            f"base model {source!r} is neither a folder nor an HF id in the local cache ({type(exc).__name__}); "
            "download it once with `huggingface-cli download` or give a local folder"
        ) from None
    return json.loads(Path(index_file).read_text())


def load_base_model(config: ModelConfig | str, *, dtype: torch.dtype = torch.float32) -> BaseModel:
    """Load M_0 from a diffusers-format folder or an HF cache id, offline (local_files_only=True).

    `config.vae` names a fixed external VAE (folder or id; a folder may hold the VAE at its root or in
    vae/). A model whose model_index.json has no VAE entry (or a folder without vae/) is pixel space. SDXL is
    recognised from the folder (`is_sdxl_source`); `config.kind` = "sd" or "sdxl" must agree with it.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if isinstance(config, str):
        config = ModelConfig(path=config)
    source = config.path
    index = _model_index(source)
    is_folder = Path(source).is_dir()
    has_vae = (Path(source) / "vae").is_dir() if is_folder else bool((index.get("vae") or [None])[0])
    sdxl = is_sdxl_source(source, index)
    if config.kind != "auto" and (config.kind == "sdxl") != sdxl:
        found = "an SDXL model" if sdxl else "a Stable Diffusion 1.x/2.x model (one text encoder)"
        raise ModelLoadError(f"model.kind = {config.kind!r} but {source} is {found}; set model.kind = 'auto'")
    kwargs = {"local_files_only": True}
    try:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype, **kwargs)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype, **kwargs)
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kwargs)
        scheduler_config = _scheduler_config(source)
        vae = None
        if config.vae:
            vae = _load_vae(config.vae, dtype)
        elif has_vae:
            vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype, **kwargs)
        sdxl_parts = {}
        if sdxl:
            from transformers import CLIPTextModelWithProjection

            sdxl_parts = dict(
                text_encoder_2=CLIPTextModelWithProjection.from_pretrained(
                    source, subfolder="text_encoder_2", dtype=dtype, **kwargs),
                tokenizer_2=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **kwargs),
                force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
            )
    except ModelLoadError:
        raise
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load base model {source}: {exc}") from None
    model = BaseModel(unet, text_encoder, tokenizer, scheduler_config, vae, source=str(source), **sdxl_parts)
    for module in model.modules():
        module.eval()
        module.requires_grad_(False)
    return model


def is_sdxl_source(source: str, index: dict) -> bool:
    """Whether a model folder or cached id is SDXL: model_index.json names StableDiffusionXLPipeline or has a
    text_encoder_2 entry, or the folder holds text_encoder_2/."""
    if index.get("_class_name") == "StableDiffusionXLPipeline" or (index.get("text_encoder_2") or [None])[0]:
        return True
    return (Path(source) / "text_encoder_2").is_dir()


def _scheduler_config(source: str) -> dict:
    from diffusers import DDPMScheduler

    config = dict(DDPMScheduler.load_config(source, subfolder="scheduler", local_files_only=True))
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _load_vae(source: str, dtype: torch.dtype):
    from diffusers import AutoencoderKL

    path = Path(source)
    subfolder = "vae" if (path / "vae").is_dir() else None
    try:
        return AutoencoderKL.from_pretrained(source, subfolder=subfolder, torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the external VAE {source!r} (model.vae): {exc}") from None


def weights_digest(module) -> str:
    """SHA-256 over every parameter and buffer (names, dtypes, bytes): equal digests = identical weights."""
    import hashlib

    h = hashlib.sha256()
    if module is None:
        return "none"
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
