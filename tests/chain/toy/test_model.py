"""The committed toy base model M_0: offline loading, pixel-space layout, CLIP-skip conditioning, the sampler
(chain.sampling through sample_images) against diffusers' own Euler-ancestral step, and generated images that
the toy encoder recognises.

References: diffusers' EulerAncestralDiscreteScheduler.step (the sampler), the CLIP-skip definition applied by
hand (the embeddings), a binomial tail against the best caption-blind guess (recognition), the weights as
diffusers and transformers load them (the chain's loader).
"""

import json
import math

import numpy as np
import pytest
import torch

from chain.toy.dataset import caption_for, sample_scene
from chain.text import encode_prompts
from chain.toy.model import CLIP_SKIP, load_toy_base_model, sample_images, toy_base_model_dir
from chain.toy.tokenizer import toy_words


@pytest.fixture(scope="module")
def model():
    return load_toy_base_model()


def test_folder_is_a_pixel_space_diffusers_model():
    folder = toy_base_model_dir()
    index = json.loads((folder / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert not (folder / "vae").exists()
    for sub in ("unet", "text_encoder", "tokenizer", "scheduler"):
        assert (folder / sub).is_dir(), sub
    assert list(folder.glob("**/*.bin")) == []  # safetensors only
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 20e6, size


def test_loads_offline_with_diffusers_and_transformers_directly():
    from diffusers import EulerAncestralDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = toy_base_model_dir()
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
    te = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", local_files_only=True)
    tok = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)
    sched = EulerAncestralDiscreteScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    assert unet.dtype == torch.float32 and te.dtype == torch.float32
    assert unet.config.in_channels == unet.config.out_channels == 3
    assert unet.config.sample_size == 32
    assert unet.config.cross_attention_dim == te.config.hidden_size
    assert sched.config.prediction_type == "epsilon"
    # The schedule: DDPM's linear betas over 1000 steps, first 728 kept (terminal sigma ~ SD's 14.6).
    betas = np.linspace(1e-4, 0.02, 1000)[:728]
    np.testing.assert_allclose(np.asarray(sched.config.trained_betas), betas, rtol=1e-12)
    alpha_bar = np.cumprod(1 - betas)
    sched.set_timesteps(30)
    assert float(sched.timesteps[0]) == 727
    np.testing.assert_allclose(float(sched.sigmas[0]), np.sqrt((1 - alpha_bar[-1]) / alpha_bar[-1]), rtol=1e-5)
    assert 14.5 < float(sched.sigmas[0]) < 14.7
    assert te.config.max_position_embeddings >= tok.model_max_length == 77
    assert tok.bos_token == "<|startoftext|>" and tok.eos_token == tok.pad_token == "<|endoftext|>"


def test_every_caption_word_is_one_token(model):
    tok = model.tokenizer
    for word in toy_words():
        ids = tok(word, add_special_tokens=False).input_ids
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids) == [word + "</w>"], (word, ids)
    assert tok("").input_ids == [tok.bos_token_id, tok.eos_token_id]


def _clip_skip_2_by_hand(te, tok, prompts):
    """Run the embeddings and all but the last encoder layer, then the final layer norm."""
    ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        h = te.embeddings(input_ids=ids)
        causal = torch.full((77, 77), float("-inf")).triu(1)[None, None]
        for layer in te.encoder.layers[:-1]:
            out = layer(h, attention_mask=causal)
            h = out[0] if isinstance(out, tuple) else out
        return te.final_layer_norm(h)


def test_prompt_embedding_is_clip_skip_2(model):
    te, tok = model.text_encoder, model.tokenizer
    prompts = ["a red circle on a white background", ""]
    assert CLIP_SKIP == 2
    with torch.no_grad():
        got = encode_prompts(te, tok, prompts, clip_skip=CLIP_SKIP, max_length=tok.model_max_length)
    torch.testing.assert_close(got, _clip_skip_2_by_hand(te, tok, prompts), atol=1e-5, rtol=1e-5)


def test_sampler_matches_diffusers_step_and_is_batch_independent(model):
    from diffusers import EulerAncestralDiscreteScheduler

    prompts = ["a blue square on a gray background", "a green triangle with fine checks on a white background"]
    ours = sample_images(model, prompts, seeds=[7, 8], num_steps=6, cfg_scale=3.0)
    alone = sample_images(model, prompts[1:], seeds=[8], num_steps=6, cfg_scale=3.0)
    # equal up to float32 rounding of batched kernels (channels_last convolutions depend on the batch size
    # at the 1e-5 level), as in tests/test_chain_sampling.py
    torch.testing.assert_close(ours[1:], alone, atol=1e-4, rtol=0)
    # Reference: diffusers' own scheduler step, one image, its generator passed to step(), embeddings by hand.
    g = torch.Generator().manual_seed(7)
    sched = EulerAncestralDiscreteScheduler.from_config(model.scheduler_config)
    sched.set_timesteps(6)
    emb = _clip_skip_2_by_hand(model.text_encoder, model.tokenizer, ["", prompts[0]])
    with torch.no_grad():
        x = torch.randn(1, 3, 32, 32, generator=g) * sched.init_noise_sigma
        for t in sched.timesteps:
            eps_u, eps_c = model.unet(sched.scale_model_input(torch.cat([x, x]), t), t,
                                      encoder_hidden_states=emb).sample.chunk(2)
            x = sched.step(eps_u + 3.0 * (eps_c - eps_u), t, x, generator=g).prev_sample
    torch.testing.assert_close(ours[:1], ((x.clamp(-1, 1) + 1) / 2), atol=1e-4, rtol=0)


def _binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))


def _balanced_d0_scenes(per_combination: int, seed: int):
    """D_0 scenes with every (colour, shape) pair equally often (rejection sampling, deterministic)."""
    from chain.toy.dataset import DISTRIBUTIONS

    d0 = DISTRIBUTIONS["d0"]
    need = {(c, s): per_combination for c in d0.colours for s in d0.shapes}
    rng = np.random.default_rng(seed)
    scenes = []
    while any(need.values()):
        scene = sample_scene(rng, "d0")
        if need[(scene.colour, scene.shape)]:
            need[(scene.colour, scene.shape)] -= 1
            scenes.append(scene)
    return scenes


def test_generated_images_are_recognised_for_their_captions(model):
    """24 images from D_0 captions, each (colour, shape) pair twice (20 steps, CFG 5): the toy encoder's colour
    and shape predictions agree with the captions far more often than any caption-blind guess could (chance
    1/4 for colour, 1/3 for shape: with balanced classes no guess independent of the caption does better)."""
    from chain.toy.encoder import load_toy_encoder

    scenes = _balanced_d0_scenes(2, seed=2024)
    images = sample_images(model, [caption_for(s) for s in scenes],
                           seeds=[100 + i for i in range(len(scenes))],
                           num_steps=20, cfg_scale=5.0)
    pred = load_toy_encoder().predict(images)
    for head, chance in (("colour", 1 / 4), ("shape", 1 / 3)):
        truth = [getattr(s, head) for s in scenes]
        hits = sum(p == t for p, t in zip(pred[head], truth))
        assert _binomial_tail(hits, len(truth), chance) < 0.01, (head, hits, pred[head], truth)


def test_chain_loader_reads_the_toy_folder(model):
    """chain.models.load_base_model gives the pixel-space model whose weights, tokenizer and schedule are those
    that diffusers and transformers load from the folder (the fixture)."""
    from chain.models import load_base_model

    loaded = load_base_model(str(toy_base_model_dir()))
    assert loaded.is_pixel_space and loaded.vae is None
    for ours, theirs in ((loaded.unet, model.unet), (loaded.text_encoder, model.text_encoder)):
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), name
    prompt = "a yellow circle with coarse vertical stripes on a black background"
    assert loaded.tokenizer(prompt).input_ids == model.tokenizer(prompt).input_ids
    assert loaded.max_token_length == 77
    assert loaded.scheduler_config["trained_betas"] == model.scheduler_config["trained_betas"]
    assert loaded.scheduler_config["timestep_spacing"] == model.scheduler_config["timestep_spacing"]
