"""Prompt embeddings with CLIP skip, computed by hand.

transformers >= 5.6 flattened CLIPTextModel (no `.text_model`), and diffusers' pipeline `clip_skip` crashes on
it; kohya computes the embeddings itself, for the conditional and the empty prompt alike:

    clip_skip = 1:  last_hidden_state (the final layer norm already applied)
    clip_skip = c:  final_layer_norm(hidden_states[-c])      (hidden_states[0] = token embeddings)
"""

from __future__ import annotations

import torch


def unwrap(module):
    """The model inside a DistributedDataParallel (or similar) wrapper."""
    return getattr(module, "module", module)


def token_length(tokenizer, text_encoder) -> int:
    """Tokens per prompt: the tokenizer's length, at most the encoder's positions (77 for CLIP)."""
    return int(min(tokenizer.model_max_length, unwrap(text_encoder).config.max_position_embeddings))


def tokenize(tokenizer, prompts: list[str], max_length: int) -> torch.Tensor:
    """Token ids (B, max_length), padded and truncated like Stable Diffusion (77 tokens for CLIP)."""
    return tokenizer(
        list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids


def encode_tokens(text_encoder, input_ids: torch.Tensor, clip_skip: int) -> torch.Tensor:
    """Embeddings (B, L, D) of token ids with CLIP skip `clip_skip` (>= 1), as kohya sd-scripts does."""
    if clip_skip < 1:
        raise ValueError(f"clip_skip must be >= 1, got {clip_skip}")
    device = next(unwrap(text_encoder).parameters()).device
    input_ids = input_ids.to(device)
    if clip_skip == 1:
        return text_encoder(input_ids).last_hidden_state
    out = text_encoder(input_ids, output_hidden_states=True)
    norm = unwrap(text_encoder).final_layer_norm
    # LoRA outputs can promote the hidden state to float32 under mixed precision; the layer norm runs in
    # its own weight dtype (CPU autocast does not cast layer_norm as CUDA autocast does).
    return norm(out.hidden_states[-clip_skip].to(norm.weight.dtype))


def encode_prompts(text_encoder, tokenizer, prompts: list[str], *, clip_skip: int, max_length: int) -> torch.Tensor:
    """Embeddings (B, L, D) of prompts; the empty prompt "" is the unconditional embedding."""
    return encode_tokens(text_encoder, tokenize(tokenizer, prompts, max_length), clip_skip)


def unused_text_encoder_layers(num_layers: int, clip_skip: int) -> list[int]:
    """Layers whose output never reaches the embedding: with clip skip c the last c - 1 layers."""
    return list(range(num_layers - (clip_skip - 1), num_layers))
