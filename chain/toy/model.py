"""The toy base model M_0: a pixel-space diffusers UNet, a small CLIP text encoder, the toy tokenizer.

Pixel space (no ``vae/``): the UNet denoises RGB images scaled to [-1, 1] directly (docs/results-contract.md, chain engine
contract). The prompt embedding is CLIP skip 2: hidden state [-2]
of the text encoder, then its final layer norm, for the conditional and the empty prompt alike, computed by
chain.text with ``clip_skip=CLIP_SKIP``. Images come from the chain's own sampler (chain.sampling);
``sample_images`` only fills in the toy model's settings.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

__all__ = [
    "CLIP_SKIP",
    "ToyModelConfig",
    "ToyBaseModel",
    "build_toy_model",
    "load_toy_base_model",
    "sample_images",
    "save_toy_base_model",
    "toy_base_model_dir",
]

ASSETS = Path(__file__).resolve().parent / "assets"

# Prompt embeddings of the toy model, in pretraining and sampling alike (chain.text.encode_prompts).
CLIP_SKIP = 2


def toy_base_model_dir() -> Path:
    """Folder of the committed toy base model (diffusers format, pixel space)."""
    return ASSETS / "base_model"


@dataclasses.dataclass(frozen=True)
class ToyModelConfig:
    """Architecture of the toy base model. Cross-attention only in the low-resolution blocks, one attention
    head of the block width (this is what makes CPU training cheap).
    """

    resolution: int = 32
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    norm_num_groups: int = 8
    text_hidden_size: int = 64
    text_intermediate_size: int = 128
    text_layers: int = 3
    text_heads: int = 2
    # Noise schedule: DDPM's linear betas (1e-4 to 0.02 over 1000 steps, Ho et al. 2020) cut after the first
    # `num_train_timesteps` = 728 steps, where alpha_bar = 0.00465 and sigma = 14.63: the terminal noise level
    # of Stable Diffusion's scaled-linear schedule (sigma_max 14.61). Sampling from sigma ~157 (the full
    # linear schedule) makes Euler steps amplify tiny epsilon errors at the first step by 157, and a small
    # model then paints flat colour fields picked by the initial noise; from sigma ~15 it draws the scenes.
    # Stored as `trained_betas` so that every diffusers scheduler built from the config agrees.
    beta_start: float = 0.0001
    beta_end: float = 0.02
    linear_schedule_length: int = 1000
    num_train_timesteps: int = 728
    timestep_spacing: str = "trailing"

    def betas(self) -> list[float]:
        """The stored betas: the first num_train_timesteps of the linear schedule."""
        import numpy as np

        full = np.linspace(self.beta_start, self.beta_end, self.linear_schedule_length, dtype=np.float64)
        return [float(b) for b in full[: self.num_train_timesteps]]


@dataclasses.dataclass
class ToyBaseModel:
    """The parts of a pixel-space text-to-image model (no VAE)."""

    unet: "diffusers.UNet2DConditionModel"  # noqa: F821
    text_encoder: "transformers.CLIPTextModel"  # noqa: F821
    tokenizer: "transformers.CLIPTokenizer"  # noqa: F821
    scheduler_config: dict


def _scheduler_config(cfg: ToyModelConfig) -> dict:
    from diffusers import EulerAncestralDiscreteScheduler

    sched = EulerAncestralDiscreteScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule="linear",
        trained_betas=cfg.betas(),
        prediction_type="epsilon",
        timestep_spacing=cfg.timestep_spacing,
        steps_offset=0,
    )
    return dict(sched.config)


def build_toy_model(cfg: ToyModelConfig, tokenizer, *, generator: torch.Generator | None = None) -> ToyBaseModel:
    """Fresh (randomly initialised) toy model for ``tokenizer``. ``generator`` seeds the initialisation."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    n = len(cfg.block_out_channels)
    # Attention only below full resolution: the first block (full resolution) has none.
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1)
    up = ("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",)
    seed = None if generator is None else int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=cfg.resolution,
            in_channels=3,
            out_channels=3,
            down_block_types=down,
            up_block_types=up,
            block_out_channels=cfg.block_out_channels,
            layers_per_block=cfg.layers_per_block,
            norm_num_groups=cfg.norm_num_groups,
            cross_attention_dim=cfg.text_hidden_size,
            # diffusers' legacy name: attention_head_dim is the number of heads here -> one head per block.
            attention_head_dim=1,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=cfg.text_hidden_size,
                intermediate_size=cfg.text_intermediate_size,
                num_hidden_layers=cfg.text_layers,
                num_attention_heads=cfg.text_heads,
                max_position_embeddings=tokenizer.model_max_length,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                projection_dim=cfg.text_hidden_size,
            )
        )
    return ToyBaseModel(unet, text_encoder, tokenizer, _scheduler_config(cfg))


def save_toy_base_model(model: ToyBaseModel, out_dir: str | os.PathLike) -> Path:
    """Write ``model`` as a pixel-space diffusers-format folder (no ``vae/``), atomically, through
    chain.models.save_base_model: model_index.json, unet/, text_encoder/, tokenizer/, scheduler/."""
    from chain.models import BaseModel, save_base_model

    base = BaseModel(model.unet, model.text_encoder, model.tokenizer, dict(model.scheduler_config))
    return save_base_model(base, out_dir)


def load_toy_base_model(folder: str | os.PathLike | None = None) -> ToyBaseModel:
    """Load a toy base model folder (default: the committed one) offline, in float32, eval mode."""
    from diffusers import EulerAncestralDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(folder) if folder is not None else toy_base_model_dir()
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{folder / 'model_index.json'} is missing: {folder} is not a toy base model folder; "
            "rebuild it with `python -m chain.toy.pretrain` (see chain/toy/assets/README.md)"
        )
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32).eval()
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch.float32).eval()
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    scheduler = EulerAncestralDiscreteScheduler.from_pretrained(folder / "scheduler")
    return ToyBaseModel(unet, text_encoder, tokenizer, dict(scheduler.config))


@torch.no_grad()
def sample_images(
    model: ToyBaseModel,
    prompts: list[str],
    *,
    seeds: list[int],
    num_steps: int = 30,
    cfg_scale: float = 7.5,
    batch_size: int = 64,
) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] from chain.sampling.generate with constant CFG scale ``cfg_scale``, CLIP
    skip ``CLIP_SKIP`` and the model's own resolution; one seed per prompt (chain.sampling.make_generator),
    so an image does not depend on the batch it is in."""
    from chain.guidance import Constant
    from chain.models import BaseModel
    from chain.sampling import generate

    base = BaseModel(model.unet, model.text_encoder, model.tokenizer, model.scheduler_config)
    return generate(base, list(prompts), list(seeds), Constant(cfg_scale), num_steps=num_steps,
                    resolution=model.unet.config.sample_size, clip_skip=CLIP_SKIP, batch_size=batch_size).images
