"""Regenerate a Chain of Diffusion's images from an export folder with diffusers' StableDiffusionPipeline.

This file is copied verbatim into every folder `qtm chain export` writes (as regenerate.py) and needs only
torch, diffusers, transformers and peft, not qtm. The folder's qtm_export.json holds what the chain used:
prompts, seeds, guidance per step, CLIP skip, steps, resolution, batches (docs/export.md):

    import regenerate                            # this file, from the export folder
    export = regenerate.read_export(folder)
    pipe = regenerate.load_pipeline(folder)
    images = regenerate.regenerate(pipe, export, [0, 1, 2])   # (3, 3, R, R) in [0, 1], as the chain made them

or from a shell: `python regenerate.py FOLDER 0 1 2 --out images/` (8-bit PNGs named like the run's).

What the recipe does and why (each step is what the chain's sampler does):
- The scheduler is EulerAncestralDiscreteScheduler on the base model's noise schedule exactly as recorded
  (export["scheduler"]["config"]; the pipeline's loader would change a steps_offset other than 1), with one
  CPU torch.Generator per image seeded by `image_seed` (SHA-256 of "run_seed/condition/iteration/image/sample",
  low 63 bits).
- The LoRA is loaded with `load_lora_weights` at scale alpha / rank; the UNet's adapter is then fused into
  its weights and the UNet put in channels_last memory order, as the chain samples; the text encoder's
  adapter stays unfused.
- Prompt embeddings are computed here with CLIP skip (`prompt_embeddings`) and passed as prompt_embeds and
  negative_prompt_embeds (the empty prompt ""), because the pipeline's own `clip_skip` fails on the text
  encoder of transformers >= 5.6.
- The guidance scale of step i is export["guidance"]["scales"][i], set step by step through
  callback_on_step_end; `TwoPassScale` keeps the unconditional pass on at scales <= 1 (the chain always makes
  both passes and applies e_u + s (e_c - e_u); the pipeline would drop the unconditional pass).
- Images are generated in the chain's batches (export["sampling"]["batches"]): batched kernels round
  differently from single images, so an image is bit-exact only when regenerated within its own batch.
- A pixel-space model (no vae/) is loaded with vae=None and vae_scale_factor 1; its "latents" are the images.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

EXPORT_FILE = "qtm_export.json"


def read_export(folder) -> dict:
    """The export's description (qtm_export.json)."""
    return json.loads((Path(folder) / EXPORT_FILE).read_text())


def image_seed(run_seed: int, condition: str, iteration: int, image: int) -> int:
    """The seed of image `image` of (condition, iteration): SHA-256 of the text
    "run_seed/condition/iteration/image/sample", its first 8 bytes read little-endian, 63 bits kept."""
    text = f"{run_seed}/{condition}/{iteration}/{image}/sample".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & ((1 << 63) - 1)


def load_pipeline(folder, device: str = "cpu"):
    """StableDiffusionPipeline from the export folder with the LoRA applied as the chain samples."""
    import torch
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    export = read_export(folder)
    sampling = export["sampling"]
    dtype = getattr(torch, sampling["dtype"])
    extra = {"vae": None} if export["pixel_space"] else {}
    pipe = StableDiffusionPipeline.from_pretrained(
        str(folder), dtype=dtype, safety_checker=None, requires_safety_checker=False, **extra)
    if export["pixel_space"]:
        pipe.vae_scale_factor = 1
    # the pipeline rewrites a scheduler's steps_offset to 1 when loading it; the chain uses the config as is
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(export["scheduler"]["config"])
    pipe.to(device)
    pipe.load_lora_weights(str(folder), weight_name=export["lora"]["diffusers"])
    if sampling["fuse_unet_lora"]:
        pipe.fuse_lora(components=["unet"])
    if sampling["unet_memory_format"] == "channels_last":
        pipe.unet.to(memory_format=torch.channels_last)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompt_embeddings(pipe, prompts: list[str], clip_skip: int, max_length: int):
    """Embeddings (B, L, D) with CLIP skip c: the last hidden state for c = 1, else the text encoder's final
    layer norm applied to hidden_states[-c] (hidden_states[0] = token embeddings)."""
    import torch

    encoder = pipe.text_encoder
    ids = pipe.tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                         return_tensors="pt").input_ids.to(next(encoder.parameters()).device)
    with torch.no_grad():
        if clip_skip == 1:
            return encoder(ids).last_hidden_state
        out = encoder(ids, output_hidden_states=True)
        norm = encoder.final_layer_norm
        return norm(out.hidden_states[-clip_skip].to(norm.weight.dtype))


class TwoPassScale(float):
    """A guidance scale for which the pipeline keeps both passes: StableDiffusionPipeline makes the
    unconditional pass only while `guidance_scale > 1`; the chain makes it at every scale."""

    def __gt__(self, other):
        return True if other == 1 else float(self) > other


def regenerate(pipe, export: dict, images: list[int]):
    """The chain's images `images` (indices into the iteration), (len, 3, R, R) float32 in [0, 1] on the
    CPU; each image is generated within its chain batch."""
    import torch

    wanted = sorted(set(int(i) for i in images))
    results = {}
    for start, stop in export["sampling"]["batches"]:
        if any(start <= i < stop for i in wanted):
            batch = _generate_batch(pipe, export, list(range(start, stop)))
            for j, i in enumerate(range(start, stop)):
                results[i] = batch[j]
    missing = [i for i in wanted if i not in results]
    if missing:
        raise ValueError(f"images {missing} are not in this iteration (0..{export['num_images'] - 1})")
    return torch.stack([results[int(i)] for i in images])


def _generate_batch(pipe, export: dict, indices: list[int]):
    import torch

    sampling, guidance = export["sampling"], export["guidance"]
    captions, per_prompt = export["prompts"]["captions"], export["prompts"]["images_per_prompt"]
    prompts = [captions[i // per_prompt] for i in indices]
    seeds = export["seeds"]
    generators = [torch.Generator("cpu").manual_seed(image_seed(seeds["run_seed"], export["condition"],
                                                                export["iteration"], i)) for i in indices]
    clip_skip, max_length = sampling["clip_skip"], sampling["max_token_length"]
    cond = prompt_embeddings(pipe, prompts, clip_skip, max_length)
    uncond = prompt_embeddings(pipe, [guidance["unconditional_prompt"]], clip_skip, max_length)
    uncond = uncond.expand(len(indices), -1, -1)
    scales = [TwoPassScale(s) for s in guidance["scales"]]

    def next_scale(pipeline, step, timestep, tensors):
        if step + 1 < len(scales):
            pipeline._guidance_scale = scales[step + 1]
        return tensors

    resolution = sampling["resolution"]
    with torch.no_grad():
        out = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, guidance_scale=scales[0],
                   num_inference_steps=sampling["num_steps"], height=resolution, width=resolution,
                   generator=generators if len(generators) > 1 else generators[0],
                   callback_on_step_end=next_scale, output_type="latent")
        latents = out.images
        if export["pixel_space"]:
            pixels = latents
        else:
            vae = pipe.vae
            pixels = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
    return (pixels.float().cpu() / 2.0 + 0.5).clamp(0.0, 1.0)


def to_8bit(images):
    """uint8 (N, R, R, 3) arrays of images in [0, 1], rounded as the chain writes its PNGs."""
    import torch

    return images.to(torch.float32).clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def main(argv: list[str]) -> None:
    """python regenerate.py FOLDER IMAGE... [--out DIR]: write the images as <index>.png (5 digits)."""
    import argparse

    from PIL import Image

    parser = argparse.ArgumentParser(description="Regenerate a chain's images from an export folder.")
    parser.add_argument("folder")
    parser.add_argument("images", nargs="+", type=int)
    parser.add_argument("--out", default=".")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    export = read_export(args.folder)
    pipe = load_pipeline(args.folder, device=args.device)
    arrays = to_8bit(regenerate(pipe, export, args.images))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, array in zip(args.images, arrays):
        Image.fromarray(array).save(out / f"{i:05d}.png")


if __name__ == "__main__":
    main(sys.argv[1:])
