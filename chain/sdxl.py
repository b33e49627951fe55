"""SDXL (Appendix C.11 of the paper): two text encoders and the added conditioning (docs/sdxl.md, Eq. S1-S3).

An SDXL UNet is conditioned on three things instead of one:
    (S1) embeddings  E(c) = concat(h1[-s], h2[-s])          (B, L, D1 + D2), along the feature axis
    (S2) text_embeds p(c) = P2 final_layer_norm(h2[-1])[eos] (B, P), text_encoder_2's pooled, projected output
    (S3) time_ids         = (H, W, 0, 0, H, W)               original size, crop top-left, target size
where h1, h2 are the hidden states of text_encoder (CLIPTextModel) and text_encoder_2
(CLIPTextModelWithProjection), h[0] the token embeddings, s = finetune.clip_skip >= 2, and no final layer
norm is applied to h[-s] (SDXL was trained on the raw penultimate states). At s = 2 this is what kohya
sd-scripts computes for SDXL in training and generation (it ignores clip_skip there) and what
StableDiffusionXLPipeline computes with clip_skip=None; s = 2 + k equals the pipeline's clip_skip=k. The
pooled embedding always comes from text_encoder_2's last layer, whatever s.

The time ids are those of an image of the training resolution that was neither cropped nor resized from
another size: original = target = (R, R), crop (0, 0), in training and generation alike (the chain's
images are all R x R).

Classifier-free guidance's unconditional branch is that of StableDiffusionXLPipeline without a negative
prompt: zero embeddings and zero pooled embeddings when the model's model_index.json sets
force_zeros_for_empty_prompt (SDXL base 1.0 does; the pipeline's default), else the embeddings of ""
through both (finetuned) encoders; the time ids are the same as the conditional branch's. Caption dropout
in training replaces a caption by "" and encodes it (kohya), whatever force_zeros_for_empty_prompt says.
"""

from __future__ import annotations

import torch

from chain.config import TinyModelConfig
from chain.models import (
    SD_SCHEDULER_CONFIG,
    BaseModel,
    make_tiny_tokenizer,
    make_tiny_unet,
    make_tiny_vae,
)
from chain.text import token_length, tokenize, unwrap

SDXL_PIPELINE = "StableDiffusionXLPipeline"
SDXL_VAE_SCALING_FACTOR = 0.13025  # SDXL's VAE (stabilityai/stable-diffusion-xl-base-1.0, vae/config.json)


def tokenize_sdxl(model: BaseModel, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, L) of `prompts` for each of the two tokenizers (SDXL's second pads with '!')."""
    return (tokenize(model.tokenizer, prompts, token_length(model.tokenizer, model.text_encoder)),
            tokenize(model.tokenizer_2, prompts, token_length(model.tokenizer_2, model.text_encoder_2)))


def encode_tokens_sdxl(text_encoder, text_encoder_2, ids_1: torch.Tensor, ids_2: torch.Tensor,
                       clip_skip: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings (B, L, D1 + D2), pooled text embeddings (B, P)) of token ids (module docstring):
    hidden state [-clip_skip] of both encoders side by side, without the final layer norm, and
    text_encoder_2's projected pooled output of its last layer."""
    if clip_skip < 2:
        raise ValueError(f"SDXL needs clip_skip >= 2 (2 = the penultimate layer), got {clip_skip}")
    out_1 = text_encoder(ids_1.to(next(unwrap(text_encoder).parameters()).device), output_hidden_states=True)
    out_2 = text_encoder_2(ids_2.to(next(unwrap(text_encoder_2).parameters()).device), output_hidden_states=True)
    h2 = out_2.hidden_states[-clip_skip]
    embeddings = torch.cat([out_1.hidden_states[-clip_skip].to(h2.dtype), h2], dim=-1)
    return embeddings, out_2.text_embeds


def time_ids(height: int, width: int, batch: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """SDXL's micro-conditioning (B, 6): original size (H, W), crop top-left (0, 0), target size (H, W), as
    StableDiffusionXLPipeline._get_add_time_ids builds them for an uncropped image."""
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype).repeat(batch, 1)


def encode_prompts_sdxl(model: BaseModel, prompts: list[str], *, clip_skip: int,
                        resolution: int) -> tuple[torch.Tensor, dict]:
    """(embeddings (B, L, D), added conditioning {"text_embeds": (B, P), "time_ids": (B, 6)}) of prompts."""
    ids_1, ids_2 = tokenize_sdxl(model, prompts)
    embeddings, pooled = encode_tokens_sdxl(unwrap(model.text_encoder), unwrap(model.text_encoder_2), ids_1, ids_2,
                                            clip_skip)
    return embeddings, {"text_embeds": pooled,
                        "time_ids": time_ids(resolution, resolution, len(prompts), embeddings.dtype)}


def unconditional_sdxl(model: BaseModel, *, clip_skip: int, resolution: int) -> tuple[torch.Tensor, dict]:
    """The unconditional branch (batch 1): zeros when model.force_zeros_for_empty_prompt, else the
    embeddings of "" (module docstring)."""
    embeddings, added = encode_prompts_sdxl(model, [""], clip_skip=clip_skip, resolution=resolution)
    if model.force_zeros_for_empty_prompt:
        embeddings = torch.zeros_like(embeddings)
        added = {**added, "text_embeds": torch.zeros_like(added["text_embeds"])}
    return embeddings, added


def make_tiny_sdxl_model(config: TinyModelConfig = TinyModelConfig(cross_attention_dim=64), *,
                         resolution: int = 32) -> BaseModel:
    """A tiny random SDXL-architecture model from configs (tests, CPU examples): a UNet with
    addition_embed_type "text_time" and linear projections in its transformer blocks, two text encoders of
    width `text_hidden_size` (CLIPTextModel with quick-GELU like CLIP ViT-L, CLIPTextModelWithProjection
    with GELU like OpenCLIP bigG, projection width text_hidden_size), two byte-level tokenizers (the second
    pads with '!', as SDXL's), a VAE with SDXL's scaling factor, force_zeros_for_empty_prompt as SDXL base.
    cross_attention_dim must be 2 x text_hidden_size. Weights are drawn from torch's generator seeded with
    `config.seed` in a forked RNG state: the same config always gives the same model."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    width = config.text_hidden_size
    if config.cross_attention_dim != 2 * width:
        raise ValueError("tiny SDXL model: cross_attention_dim must be twice text_hidden_size")
    tokenizer, tokenizer_2 = make_tiny_tokenizer(), make_tiny_tokenizer(pad_token="!")

    def text_config(tok, act: str, **kwargs):
        return CLIPTextConfig(
            vocab_size=len(tok), hidden_size=width, intermediate_size=config.text_intermediate_size,
            num_hidden_layers=config.text_layers, num_attention_heads=1, max_position_embeddings=77,
            hidden_act=act, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, **kwargs,
        )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        unet = make_tiny_unet(
            config, resolution, use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=config.addition_time_embed_dim,
            projection_class_embeddings_input_dim=6 * config.addition_time_embed_dim + width,
        )
        text_encoder = CLIPTextModel(text_config(tokenizer, "quick_gelu"))
        text_encoder_2 = CLIPTextModelWithProjection(text_config(tokenizer_2, "gelu", projection_dim=width))
        vae = make_tiny_vae(config, resolution, scaling_factor=SDXL_VAE_SCALING_FACTOR) if config.latent else None
    model = BaseModel(unet, text_encoder, tokenizer, dict(SD_SCHEDULER_CONFIG), vae, source="tiny",
                      text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, force_zeros_for_empty_prompt=True)
    for module in model.modules():
        module.eval()
    return model


def sdxl_model_index(model: BaseModel, diffusers_version: str) -> dict:
    """model_index.json of an SDXL folder (StableDiffusionXLPipeline's layout)."""
    return {
        "_class_name": SDXL_PIPELINE,
        "_diffusers_version": diffusers_version,
        "force_zeros_for_empty_prompt": bool(model.force_zeros_for_empty_prompt),
        "add_watermarker": None,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "vae": ["diffusers", "AutoencoderKL"] if model.vae is not None else [None, None],
        "image_encoder": [None, None],
        "feature_extractor": [None, None],
    }
