"""SDXL on tiny SDXL-architecture models: the prompt encoding and the added conditioning against
StableDiffusionXLPipeline and against their definitions (kohya's pooled output by hand), the sampling loop
equal to the pipeline's latents, LoRA on the UNet and both text encoders reloaded bit-exactly (our loader
and diffusers'), the SDXL folder layout, the finetune's loss with the added conditioning, the config checks,
and a tiny SDXL chain end to end through run_chain."""

import json

import numpy as np
import pytest
import torch

from chain.config import FinetuneConfig, ModelConfig, TinyModelConfig, config_from_dict
from chain.errors import ConfigError
from chain.guidance import Constant
from chain.lora import (
    add_model_lora,
    load_lora_with_diffusers,
    load_model_lora,
    lora_parameters,
    read_lora_parts,
    save_model_lora,
)
from chain.models import ModelLoadError, load_base_model, save_base_model, weights_digest
from chain.sampling import generate, make_generator, sample_latents
from chain.sdxl import encode_prompts_sdxl, make_tiny_sdxl_model, time_ids, unconditional_sdxl
from tests.chain.fixtures import install_in_hub_cache

PROMPTS = ["a red square", "a blue disc", "a green stripe"]
TINY = TinyModelConfig(cross_attention_dim=64, text_hidden_size=32, text_layers=3, seed=4)


@pytest.fixture(scope="module")
def model():
    return make_tiny_sdxl_model(TINY, resolution=16)


def _pipeline(m, force_zeros=True):
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=m.vae, text_encoder=m.text_encoder, text_encoder_2=m.text_encoder_2, tokenizer=m.tokenizer,
        tokenizer_2=m.tokenizer_2, unet=m.unet,
        scheduler=EulerAncestralDiscreteScheduler.from_config(m.scheduler_config),
        force_zeros_for_empty_prompt=force_zeros, add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_tiny_model_is_sdxl_shaped(model):
    assert model.is_sdxl and model.force_zeros_for_empty_prompt
    assert model.unet.config.addition_embed_type == "text_time"
    assert model.unet.config.cross_attention_dim == 2 * 32
    assert model.tokenizer_2.pad_token == "!" and model.tokenizer.pad_token == "<|endoftext|>"
    assert model.vae.config.scaling_factor == 0.13025
    again = make_tiny_sdxl_model(TINY, resolution=16)
    assert all(weights_digest(a) == weights_digest(b) for a, b in zip(model.modules(), again.modules()))


@pytest.mark.parametrize("clip_skip, pipeline_clip_skip", [(2, None), (3, 1)])
def test_prompt_encoding_equals_pipeline(model, clip_skip, pipeline_clip_skip):
    """clip_skip = 2 + k is the pipeline's clip_skip = k (None for 2); the pooled embedding does not move."""
    pipe = _pipeline(model)
    with torch.no_grad():
        emb, added = encode_prompts_sdxl(model, PROMPTS, clip_skip=clip_skip, resolution=16)
        pe, ne, pooled, npooled = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=True,
                                                     clip_skip=pipeline_clip_skip)
    assert torch.equal(emb, pe) and torch.equal(added["text_embeds"], pooled)
    assert emb.shape == (3, 77, 64) and pooled.shape == (3, 32)
    # force_zeros_for_empty_prompt: the pipeline's unconditional branch is zeros, ours too
    with torch.no_grad():
        uncond, uadded = unconditional_sdxl(model, clip_skip=clip_skip, resolution=16)
    assert torch.all(ne == 0) and torch.all(npooled == 0)
    assert torch.all(uncond == 0) and torch.all(uadded["text_embeds"] == 0) and uncond.shape == (1, 77, 64)


def test_embeddings_by_definition(model):
    """By hand, as kohya's SDXL scripts: h1[-2] and h2[-2] without a final layer norm, side by side; pooled =
    text_projection(final-layer-normed last state at the first end token) (kohya's pool_workaround; the
    second tokenizer pads with '!', so the end token is not simply the largest id)."""
    ids1 = model.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    ids2 = model.tokenizer_2(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        h1 = model.text_encoder(ids1, output_hidden_states=True).hidden_states
        out2 = model.text_encoder_2(ids2, output_hidden_states=True)
        eos = (ids2 == model.tokenizer_2.eos_token_id).int().argmax(dim=1)
        last = out2.last_hidden_state[torch.arange(3), eos]
        pooled = model.text_encoder_2.text_projection(last)
        emb, added = encode_prompts_sdxl(model, PROMPTS, clip_skip=2, resolution=16)
    assert len(h1) == 4  # token embeddings + 3 layers
    assert torch.equal(emb, torch.cat([h1[2], out2.hidden_states[2]], dim=-1))
    torch.testing.assert_close(added["text_embeds"], pooled, rtol=0, atol=0)
    # the padding differs between the tokenizers: '!' after the end token in the second
    assert int(ids2[0, -1]) != model.tokenizer_2.eos_token_id and int(ids1[0, -1]) == model.tokenizer.eos_token_id


def test_time_ids_equal_pipeline(model):
    pipe = _pipeline(model)
    want = pipe._get_add_time_ids((24, 16), (0, 0), (24, 16), dtype=torch.float32,
                                  text_encoder_projection_dim=model.text_encoder_2.config.projection_dim)
    assert torch.equal(time_ids(24, 16), want)
    assert torch.equal(time_ids(16, 16, batch=3), torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 3))


@pytest.mark.parametrize("scale, force_zeros", [(7.5, True), (2.5, False)])
def test_loop_equals_sdxl_pipeline(model, scale, force_zeros):
    """Our loop against StableDiffusionXLPipeline with the same embeddings and generators: torch.equal
    (bit-identical latents, the same arithmetic in the same order). Without force_zeros_for_empty_prompt
    the unconditional branch is the encoding of "" (the pipeline's own negative prompt "")."""
    import dataclasses

    m = dataclasses.replace(model, force_zeros_for_empty_prompt=force_zeros)
    pipe = _pipeline(m, force_zeros)
    seeds = [11, 12]
    with torch.no_grad():
        cond, added = encode_prompts_sdxl(m, PROMPTS[:2], clip_skip=2, resolution=16)
        uncond, uadded = unconditional_sdxl(m, clip_skip=2, resolution=16)
        _, ne, _, npooled = pipe.encode_prompt(PROMPTS[:2], do_classifier_free_guidance=True)
    # the pipeline encodes "" once per prompt (batch 2), we once (batch 1): equal up to float32 rounding of
    # the batched projection
    torch.testing.assert_close(uncond.expand(2, -1, -1), ne, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(uadded["text_embeds"].expand(2, -1), npooled, rtol=1e-6, atol=1e-6)
    assert bool(torch.any(uncond != 0)) == (not force_zeros)
    ne, npooled = uncond.expand(2, -1, -1), uadded["text_embeds"].expand(2, -1)
    ref = pipe(prompt_embeds=cond, pooled_prompt_embeds=added["text_embeds"], negative_prompt_embeds=ne,
               negative_pooled_prompt_embeds=npooled, num_inference_steps=5, guidance_scale=scale,
               generator=[make_generator(s) for s in seeds], output_type="latent", height=16, width=16).images
    ours = sample_latents(m.unet, m.scheduler_config, cond, uncond, Constant(scale), num_steps=5,
                          latent_shape=(4, 8, 8), generator=[make_generator(s) for s in seeds],
                          cond_added=added, uncond_added=uadded)
    assert torch.equal(ours.latents, ref.float())
    assert torch.all(ours.guidance_diff_norm > 0)
    # generate() builds the same conditioning itself (fast=False: the plain module, no inference layout)
    gen = generate(m, PROMPTS[:2], seeds, Constant(scale), num_steps=5, resolution=16, clip_skip=2, batch_size=2,
                   fast=False)
    assert torch.equal(gen.latents, ref.float())


def test_time_ids_reach_the_unet(model):
    """Guard: the added conditioning is used (another resolution's time ids change the prediction)."""
    with torch.no_grad():
        cond, added = encode_prompts_sdxl(model, PROMPTS[:1], clip_skip=2, resolution=16)
        x = torch.randn(1, 4, 8, 8, generator=make_generator(0))
        a = model.unet(x, 500, cond, added_cond_kwargs=added).sample
        b = model.unet(x, 500, cond, added_cond_kwargs={**added, "time_ids": time_ids(1024, 1024)}).sample
    assert (a - b).abs().max() > 1e-4


def _adapted(cfg=FinetuneConfig(rank=4, alpha=2.0, clip_skip=2), seed=0):
    m = make_tiny_sdxl_model(TINY, resolution=16)
    configs = add_model_lora(m, cfg, generator=make_generator(seed))
    gen = make_generator(seed + 1)
    with torch.no_grad():
        for module in (m.unet, m.text_encoder, m.text_encoder_2):
            for p in lora_parameters(module):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return m, configs


def _outputs(m):
    with torch.no_grad():
        emb, added = encode_prompts_sdxl(m, PROMPTS[:2], clip_skip=2, resolution=16)
        x = torch.randn(2, 4, 8, 8, generator=make_generator(3))
        return emb, added["text_embeds"], m.unet(x, torch.tensor([10, 500]), emb, added_cond_kwargs=added).sample


def test_lora_targets_both_text_encoders():
    m, configs = _adapted()
    te1 = {n.rsplit(".lora_A", 1)[0] for n, _ in m.text_encoder.named_parameters() if ".lora_A." in n}
    te2 = {n.rsplit(".lora_A", 1)[0] for n, _ in m.text_encoder_2.named_parameters() if ".lora_A." in n}
    # 3 layers x 6 modules; clip skip 2: text encoder 1's last layer never reaches the UNet, text encoder 2's
    # does (the pooled embedding)
    assert len(te1) == 12 and not any(".layers.2." in n for n in te1)
    assert len(te2) == 18 and any(".layers.2." in n for n in te2)
    assert configs.text_encoder_2 is not None


def test_lora_reload_bit_exact(tmp_path):
    m, configs = _adapted()
    save_model_lora(tmp_path / "lora", m, configs)
    parts = read_lora_parts(tmp_path / "lora")
    assert set(parts) == {"unet", "text_encoder", "text_encoder_2"}
    want = _outputs(m)

    fresh = make_tiny_sdxl_model(TINY, resolution=16)
    add_model_lora(fresh, FinetuneConfig(rank=4, alpha=2.0, clip_skip=2), generator=make_generator(9))
    load_model_lora(tmp_path / "lora", fresh)
    for a, b in ((m.unet, fresh.unet), (m.text_encoder, fresh.text_encoder), (m.text_encoder_2, fresh.text_encoder_2)):
        pa, pb = lora_parameters(a), lora_parameters(b)
        assert len(pa) == len(pb) > 0 and all(torch.equal(x, y) for x, y in zip(pa, pb))
    got = _outputs(fresh)
    assert all(torch.equal(x, y) for x, y in zip(got, want))

    # diffusers' loader (as StableDiffusionXLPipeline.load_lora_weights): scale alpha / r, the same outputs
    other = make_tiny_sdxl_model(TINY, resolution=16)
    load_lora_with_diffusers(tmp_path / "lora", other.unet, other.text_encoder, text_encoder_2=other.text_encoder_2)
    got = _outputs(other)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    # and the guard: without the adapter the outputs differ
    plain = _outputs(make_tiny_sdxl_model(TINY, resolution=16))
    assert not torch.allclose(plain[1], want[1]) and not torch.allclose(plain[2], want[2])


def test_pipeline_load_lora_weights(tmp_path):
    """The full pipeline path: StableDiffusionXLPipeline.load_lora_weights on our file."""
    m, configs = _adapted()
    save_model_lora(tmp_path / "lora", m, configs)
    want = _outputs(m)
    other = make_tiny_sdxl_model(TINY, resolution=16)
    _pipeline(other).load_lora_weights(str(tmp_path / "lora"))
    for x, y in zip(_outputs(other), want):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_sdxl_folder_round_trip(tmp_path, model):
    folder = save_base_model(model, tmp_path / "m")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    loaded = load_base_model(str(folder))
    assert loaded.is_sdxl and loaded.force_zeros_for_empty_prompt
    assert all(weights_digest(a) == weights_digest(b) for a, b in zip(model.modules(), loaded.modules()))
    assert loaded.tokenizer_2.pad_token == "!"
    # diffusers reads the folder as an SDXL pipeline
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(folder), local_files_only=True)
    assert weights_digest(pipe.text_encoder_2) == weights_digest(model.text_encoder_2)
    with pytest.raises(ModelLoadError, match="model.kind = 'sd'"):
        load_base_model(ModelConfig(path=str(folder), kind="sd"))
    # force_zeros_for_empty_prompt = false in model_index.json is honoured
    index["force_zeros_for_empty_prompt"] = False
    (folder / "model_index.json").write_text(json.dumps(index))
    assert not load_base_model(ModelConfig(path=str(folder), kind="sdxl")).force_zeros_for_empty_prompt


def test_loss_with_added_conditioning_by_hand(model):
    """diffusion_loss for SDXL against the formula with the UNet called directly on the pipeline's
    conditioning: pooled embeddings from encode_prompt, time ids (R, R, 0, 0, R, R) from the pipeline."""
    from diffusers import DDPMScheduler

    from chain.finetune import diffusion_loss, min_snr_weights
    from chain.sdxl import tokenize_sdxl

    pipe = _pipeline(model)
    sched = DDPMScheduler.from_config(model.scheduler_config)
    gen = make_generator(4)
    x0, noise = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([30, 700])
    ids1, ids2 = tokenize_sdxl(model, PROMPTS[:2])
    with torch.no_grad():
        loss = diffusion_loss(model.unet, model.text_encoder, sched, x0, noise, t, ids1, clip_skip=2,
                              min_snr_gamma=5.0, train_text_encoder=False, text_encoder_2=model.text_encoder_2,
                              token_ids_2=ids2, pixel_size=(16, 16))
        pe, _, pooled, _ = pipe.encode_prompt(PROMPTS[:2], do_classifier_free_guidance=False)
        tid = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), dtype=torch.float32,
                                     text_encoder_projection_dim=32).repeat(2, 1)
        abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        pred = model.unet(xt, t, pe, added_cond_kwargs={"text_embeds": pooled, "time_ids": tid}).sample
    w = min_snr_weights(sched.alphas_cumprod, t, 5.0)
    want = (((pred - noise) ** 2).mean(dim=(1, 2, 3)) * w).mean()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-7)


def test_finetune_trains_all_three_adapters_and_leaves_base_pristine(model):
    from accelerate import Accelerator

    from chain.finetune import finetune

    digests = [weights_digest(m) for m in model.modules()]
    images = torch.rand(4, 3, 16, 16, generator=make_generator(1))
    cfg = FinetuneConfig(rank=4, alpha=2.0, batch_size=2, epochs=1, unet_lr=1e-2, text_encoder_lr=1e-2)
    result = finetune(model, images, ["a", "b", "c", "d"], cfg, condition_drop=0.5, generator=make_generator(2),
                      accelerator=Accelerator(cpu=True))
    assert len(result.losses) == 2 and all(np.isfinite(result.losses))
    assert [weights_digest(m) for m in model.modules()] == digests
    for module in (result.model.unet, result.model.text_encoder, result.model.text_encoder_2):
        assert any(p.abs().sum() > 0 for n, p in module.named_parameters() if "lora_B" in n)
    assert result.lora_configs.text_encoder_2 is not None


def _sdxl_config(data_path, **model):
    return {
        "run": {"num_iterations": 2, "seed": 3, "device": "cpu"},
        "data": {"path": str(data_path), "resolution": 32},
        "model": {"path": "tiny", "kind": "sdxl",
                  "tiny": {"seed": 1, "cross_attention_dim": 64, "text_hidden_size": 32, "text_layers": 2}, **model},
        "finetune": {"rank": 4, "alpha": 2.0, "batch_size": 2, "epochs": 1, "unet_lr": 1e-3,
                     "text_encoder_lr": 5e-4},
        "sampling": {"num_steps": 3, "batch_size": 4, "latent_histogram_bins": 16},
        "assay": {"images": 2},
        "conditions": [{"name": "redifine", "schedule": "exponential", "scale": 7.5, "alpha": 2.0,
                        "condition_drop": 0.5}],
    }


def test_paper_sdxl_example_is_c11():
    """examples/paper_sdxl.toml: SD 1.5's recipe (examples/paper_sd15.toml) on SDXL base 1.0 with batch size 2
    and 512 px (Appendix C.11); everything else equal."""
    from pathlib import Path

    from chain.config import config_to_dict, load_config
    from chain.resume import flatten

    examples = Path(__file__).resolve().parents[2] / "examples"
    xl, sd = load_config(examples / "paper_sdxl.toml"), load_config(examples / "paper_sd15.toml")
    assert (xl.model.kind, xl.model.path, xl.model.vae) == ("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", "")
    assert xl.finetune.batch_size == 2 and xl.data.resolution == 512 and xl.finetune.clip_skip == 2
    a, b = flatten(config_to_dict(xl)), flatten(config_to_dict(sd))
    differ = {k for k in a if a[k] != b.get(k)}
    assert differ == {"model.path", "model.kind", "model.vae", "finetune.batch_size", "sampling.batch_size"}


def test_config_checks():
    doc = _sdxl_config("/data")
    del doc["data"]["resolution"]
    assert config_from_dict(doc).data.resolution == 1024  # SDXL's native size when not given
    sd = _sdxl_config("/data")
    del sd["data"]["resolution"], sd["model"]["kind"], sd["model"]["tiny"]["cross_attention_dim"]
    assert config_from_dict(sd).data.resolution == 512
    bad = _sdxl_config("/data")
    bad["finetune"]["clip_skip"] = 1
    with pytest.raises(ConfigError, match="clip_skip must be >= 2"):
        config_from_dict(bad)
    bad = _sdxl_config("/data")
    bad["model"]["tiny"]["cross_attention_dim"] = 32
    with pytest.raises(ConfigError, match="twice text_hidden_size"):
        config_from_dict(bad)
    bad = _sdxl_config("/data")
    bad["model"]["kind"] = "xl"
    with pytest.raises(ConfigError, match="model.kind"):
        config_from_dict(bad)


def test_tiny_sdxl_chain_end_to_end(tmp_path):
    """Two iterations of a tiny SDXL chain through run_chain: the base model folder is SDXL, every cell is
    recorded, each adapter holds all three parts, and M_k rebuilt from the saved adapter (the assay's
    reference set) matches the finetuned text encoders."""
    from chain.data import load_captioned_folder
    from chain.images import load_image
    from chain.run import resolve_base_model, run_chain
    from chain.sampling import image_seed
    from qtmio.images import list_images
    from tests.chain.fixtures import make_captioned_folder

    data = make_captioned_folder(tmp_path / "data", num_images=4)
    config = config_from_dict(_sdxl_config(data))
    ds = run_chain(config, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "base_model" / "model_index.json").read_text())["_class_name"] \
        == "StableDiffusionXLPipeline"
    assert np.all(ds.completed.values == 1) and np.all(np.isfinite(ds.hf_power.values))
    reference = ds.hf_power_reference.sel(iteration=[1, 2]).values
    assert np.all(np.isfinite(reference[..., :2])) and np.all(np.isnan(reference[..., 2:]))  # assay.images = 2
    assert np.all(ds.guidance_diff_norm.sel(iteration=[1, 2]) > 0)
    base = resolve_base_model(config, tmp_path / "run")
    captions = list(load_captioned_folder(data, resolution=32).captions)
    for k in (1, 2):
        assert len(list_images(tmp_path / "run" / "images" / "redifine" / str(k))) == 4
        written = [load_image(p) for p in list_images(tmp_path / "run" / "images_reference" / "redifine" / str(k))]
        assert len(written) == 2
        lora = tmp_path / "run" / "lora" / "redifine" / str(k)
        parts = read_lora_parts(lora)
        assert set(parts) == {"unet", "text_encoder", "text_encoder_2"}
        assert any(v.abs().sum() > 0 for n, v in parts["text_encoder_2"].items() if "lora_B" in n)
        # M_k = M_0 + the saved adapter regenerates the reference images (scale 1, conditional pass only)
        m = base.copy()
        add_model_lora(m, config.finetune, generator=make_generator(0))
        load_model_lora(lora, m)
        seeds = [image_seed(3, "redifine", k, i) for i in range(2)]
        again = generate(m, captions[:2], seeds, Constant(1.0), num_steps=3, resolution=32, clip_skip=2,
                         batch_size=4, unconditional=False)
        assert torch.equal((again.images * 255).round() / 255, torch.stack(written))


def test_inference_layout_gives_the_plain_images():
    """Merged adapters + channels_last on an SDXL UNet (linear proj_in/proj_out) against the plain peft
    module: equal up to float32 rounding; the base weights bit-identical afterwards."""
    m, _ = _adapted()
    before = {k: v.clone() for k, v in m.unet.state_dict().items()}
    kw = dict(num_steps=4, resolution=16, clip_skip=2, batch_size=3)
    plain = generate(m, PROMPTS, [1, 2, 3], Constant(7.5), fast=False, **kw)
    fast = generate(m, PROMPTS, [1, 2, 3], Constant(7.5), fast=True, **kw)
    torch.testing.assert_close(fast.latents, plain.latents, rtol=1e-3, atol=1e-4)
    assert all(torch.equal(before[k], v) for k, v in m.unet.state_dict().items())
    # the adapter matters far beyond that tolerance
    bare = generate(make_tiny_sdxl_model(TINY, resolution=16), PROMPTS, [1, 2, 3], Constant(7.5), fast=False, **kw)
    assert (bare.latents - plain.latents).abs().max() > 1e-2


def test_preflight_refuses_clip_skip_1_for_an_sdxl_folder(tmp_path, model):
    from chain.preflight import model_problems

    folder = save_base_model(model, tmp_path / "m")
    doc = _sdxl_config("/data")
    doc["model"] = {"path": str(folder)}  # kind = "auto": recognised from the folder
    assert model_problems(config_from_dict(doc)) == []
    doc["finetune"]["clip_skip"] = 1
    problems = model_problems(config_from_dict(doc))
    assert len(problems) == 1 and "SDXL model" in problems[0] and "'finetune.clip_skip' = 1" in problems[0]


def test_hf_cache_id_offline(tmp_path, monkeypatch, model):
    """An SDXL model in the HF cache layout loads by its id and is recognised as SDXL."""
    install_in_hub_cache(model, "tiny-org/tiny-sdxl", tmp_path, monkeypatch)
    loaded = load_base_model("tiny-org/tiny-sdxl")
    assert loaded.is_sdxl and weights_digest(loaded.text_encoder_2) == weights_digest(model.text_encoder_2)
