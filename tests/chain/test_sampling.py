"""The written-out Euler-ancestral CFG loop against diffusers' StableDiffusionPipeline, batch-size
invariance, pixel-space generation and the recorded diagnostics."""

import numpy as np
import pytest
import torch

from chain.config import TinyModelConfig
from chain.guidance import Constant, Exponential
from chain.models import make_tiny_base_model
from chain.sampling import generate, image_seed, latent_histogram, make_generator, sample_latents
from chain.text import encode_prompts

PROMPTS = ["a red square", "a blue disc", "a green stripe"]


@pytest.fixture(scope="module")
def latent_model():
    return make_tiny_base_model(TinyModelConfig(latent=True, seed=4), resolution=16)


def _embeddings(model, prompts, clip_skip=2):
    cond = encode_prompts(model.text_encoder, model.tokenizer, prompts, clip_skip=clip_skip, max_length=77)
    uncond = encode_prompts(model.text_encoder, model.tokenizer, [""] * len(prompts), clip_skip=clip_skip, max_length=77)
    return cond, uncond


@pytest.mark.parametrize("scale", [7.5, 2.5])
def test_loop_equals_diffusers_pipeline(latent_model, scale):
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    m = latent_model
    pipe = StableDiffusionPipeline(
        vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer, unet=m.unet,
        scheduler=EulerAncestralDiscreteScheduler.from_config(m.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        cond, uncond = _embeddings(m, PROMPTS[:2])
    seeds = [11, 12]
    ref = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=5, guidance_scale=scale,
               generator=[make_generator(s) for s in seeds], output_type="latent", height=16, width=16).images
    ours = sample_latents(m.unet, m.scheduler_config, cond, uncond, Constant(scale), num_steps=5,
                          latent_shape=(4, 8, 8), generator=[make_generator(s) for s in seeds])
    assert torch.equal(ours.latents, ref.float())
    assert ours.guidance_diff_norm.shape == (2, 5) and torch.all(ours.guidance_diff_norm > 0)


def test_diff_norm_is_norm_of_prediction_gap(latent_model):
    m = latent_model
    cond, uncond = _embeddings(m, PROMPTS[:1])
    res = sample_latents(m.unet, m.scheduler_config, cond, uncond, Constant(3.0), num_steps=2,
                         latent_shape=(4, 8, 8), generator=[make_generator(5)])
    # step 0 by hand: the same initial noise, both predictions, their gap's L2 norm
    from diffusers import EulerAncestralDiscreteScheduler

    sched = EulerAncestralDiscreteScheduler.from_config(m.scheduler_config)
    sched.set_timesteps(2)
    x = torch.randn((1, 4, 8, 8), generator=make_generator(5)) * sched.init_noise_sigma
    t = sched.timesteps[0]
    with torch.no_grad():
        xin = sched.scale_model_input(x, t)
        e_c = m.unet(xin, t, cond).sample
        e_u = m.unet(xin, t, uncond).sample
    assert float(res.guidance_diff_norm[0, 0]) == pytest.approx(float((e_c - e_u).norm()), rel=1e-4)


@pytest.mark.parametrize("latent", [True, False])
def test_batch_size_does_not_change_images(latent):
    model = make_tiny_base_model(TinyModelConfig(latent=latent, seed=2), resolution=16)
    seeds = [image_seed(0, "c", 1, i) for i in range(3)]
    kw = dict(num_steps=4, resolution=16, clip_skip=2)
    one = generate(model, PROMPTS, seeds, Exponential(7.5, 2.0), batch_size=1, **kw)
    three = generate(model, PROMPTS, seeds, Exponential(7.5, 2.0), batch_size=3, **kw)
    assert one.images.shape == (3, 3, 16, 16)
    assert one.images.min() >= 0 and one.images.max() <= 1
    # equal up to float32 rounding of batched kernels (seeds differing give O(1) differences, below)
    torch.testing.assert_close(one.latents, three.latents, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(one.guidance_diff_norm, three.guidance_diff_norm, rtol=1e-4, atol=1e-6)
    # different seeds give different images
    other = generate(model, PROMPTS, [s + 1 for s in seeds], Exponential(7.5, 2.0), batch_size=3, **kw)
    assert not torch.allclose(other.latents, three.latents)
    np.testing.assert_allclose(three.scales, [7.5 * np.exp(-2.0 * t / 4) for t in range(4)])


def test_seeds_are_distinct_and_stable():
    seeds = {image_seed(0, c, k, i) for c in ("a", "b") for k in (1, 2) for i in range(10)}
    assert len(seeds) == 40
    # Pinned values: a resumed run relies on the same seeds as the run it continues, across processes and
    # versions (the first 8 bytes, little-endian, of SHA-256("0/a/1/0/sample"), top bit cleared).
    assert image_seed(0, "a", 1, 0) == 4030583252190949538
    assert image_seed(3, "cfg7.5", 2, 17, "train") == 5093918342859201004


def test_latent_histogram_counts_everything():
    x = torch.tensor([-10.0, -1.0, 0.0, 0.5, 10.0])
    counts, edges = latent_histogram(x, 4, 2.0)
    np.testing.assert_array_equal(edges, [-2, -1, 0, 1, 2])
    np.testing.assert_array_equal(counts, [1, 1, 2, 1])


def _model_with_lora(latent: bool, seed: int = 6):
    """A tiny model with a UNet adapter whose B matrices are non-zero (a trained-looking adapter)."""
    from chain.config import FinetuneConfig
    from chain.lora import add_lora

    model = make_tiny_base_model(TinyModelConfig(latent=latent, seed=seed), resolution=16)
    add_lora(model.unet, model.text_encoder, FinetuneConfig(rank=4, alpha=2.0), generator=make_generator(seed))
    g = make_generator(seed + 1)
    with torch.no_grad():
        for name, p in model.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("latent", [True, False])
def test_inference_layout_gives_the_plain_images_and_restores_the_model(latent):
    """Merged adapters + channels_last against the plain peft module: equal up to float32 rounding (the
    adapter's product is summed in another order); the base weights are bit-identical afterwards."""
    from peft.tuners.lora import LoraLayer

    model = _model_with_lora(latent)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    seeds = [image_seed(0, "c", 1, i) for i in range(3)]
    kw = dict(num_steps=4, resolution=16, clip_skip=2, batch_size=3)
    plain = generate(model, PROMPTS, seeds, Constant(7.5), fast=False, **kw)
    fast = generate(model, PROMPTS, seeds, Constant(7.5), fast=True, **kw)
    torch.testing.assert_close(fast.latents, plain.latents, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(fast.guidance_diff_norm, plain.guidance_diff_norm, rtol=1e-4, atol=1e-6)
    # the adapter is non-zero (test_adapter_changes_images: it moves the images far beyond the tolerance)
    for name, p in model.unet.named_parameters():
        if "lora_B" in name:
            assert p.abs().max() > 0
    after = model.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.is_contiguous() for p in model.unet.parameters())
    assert not any(m.merged for m in model.unet.modules() if isinstance(m, LoraLayer))
    # the restored module still gives the plain images exactly
    again = generate(model, PROMPTS, seeds, Constant(7.5), fast=False, **kw)
    assert torch.equal(again.latents, plain.latents)


def test_adapter_changes_images():
    """Guard for the test above: the non-zero adapter moves the images far beyond its tolerance."""
    model = _model_with_lora(True)
    seeds = [image_seed(0, "c", 1, i) for i in range(3)]
    kw = dict(num_steps=4, resolution=16, clip_skip=2, batch_size=3)
    with_adapter = generate(model, PROMPTS, seeds, Constant(7.5), fast=False, **kw)
    model.unet.disable_adapters()
    without = generate(model, PROMPTS, seeds, Constant(7.5), fast=False, **kw)
    assert (with_adapter.latents - without.latents).abs().max() > 1e-2


@pytest.mark.parametrize("latent", [True, False])
def test_conditional_pass_only_equals_cfg_at_scale_one(latent):
    """e_u + 1 (e_c - e_u) = e_c up to rounding: the loop without its unconditional half gives the CFG
    loop's images at s = 1; its gap norm is NaN (not measured)."""
    model = make_tiny_base_model(TinyModelConfig(latent=latent, seed=3), resolution=16)
    seeds = [image_seed(1, "ref", 2, i) for i in range(3)]
    kw = dict(num_steps=5, resolution=16, clip_skip=2, batch_size=2)
    cfg = generate(model, PROMPTS, seeds, Constant(1.0), **kw)
    cond = generate(model, PROMPTS, seeds, Constant(1.0), unconditional=False, **kw)
    torch.testing.assert_close(cond.latents, cfg.latents, rtol=1e-3, atol=1e-4)
    assert torch.isnan(cond.guidance_diff_norm).all() and torch.isfinite(cfg.guidance_diff_norm).all()
    np.testing.assert_array_equal(cond.scales, cfg.scales)
    # at another scale the two differ at O(1): the test above can fail
    cfg3 = generate(model, PROMPTS, seeds, Constant(3.0), **kw)
    assert (cfg3.latents - cond.latents).abs().max() > 1e-2


@pytest.mark.parametrize("latent", [True, False])
def test_worker_threads_give_the_same_batches_and_images(latent):
    """Batches run side by side on worker threads (one intra-op thread each) give the images, latents and gap
    norms of one worker, in the prompts' order; torch's thread count is restored; on_batch sees every image."""
    from chain.sampling import cpu_workers

    model = _model_with_lora(latent)
    prompts = PROMPTS * 3
    seeds = [image_seed(0, "c", 1, i) for i in range(len(prompts))]
    kw = dict(num_steps=3, resolution=16, clip_skip=2, batch_size=2)
    one = generate(model, prompts, seeds, Constant(5.0), workers=1, **kw)
    threads = torch.get_num_threads()
    seen = []
    three = generate(model, prompts, seeds, Constant(5.0), workers=3, on_batch=seen.append, **kw)
    assert torch.get_num_threads() == threads
    assert sorted(seen) == [1, 2, 2, 2, 2] and sum(seen) == len(prompts)
    # the same batches on one intra-op thread each: bit for bit the same numbers
    assert torch.equal(three.images, one.images) and torch.equal(three.latents, one.latents)
    assert torch.equal(three.guidance_diff_norm, one.guidance_diff_norm)
    assert cpu_workers("cpu", 5, 3) == 3 and cpu_workers("cpu", 2, 8) == 2 and cpu_workers("cuda", 5) == 1
    assert cpu_workers("cpu", 5) == min(5, torch.get_num_threads())
    with pytest.raises(ValueError, match="workers"):
        cpu_workers("cpu", 5, 0)
