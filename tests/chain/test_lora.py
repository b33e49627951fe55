"""LoRA: adapters on the paper's modules, a bit-exact save/reload, and diffusers' loader at scale alpha / r."""

import pytest
import torch

from chain.config import FinetuneConfig, TinyModelConfig
from chain.lora import (
    add_lora,
    load_lora,
    load_lora_with_diffusers,
    lora_parameters,
    lora_state_dicts,
    read_lora,
    save_lora,
)
from chain.models import make_tiny_base_model
from chain.sampling import make_generator

CFG = FinetuneConfig(rank=4, alpha=2.0, clip_skip=2)


def _adapted(latent=True):
    model = make_tiny_base_model(TinyModelConfig(latent=latent, text_layers=3), resolution=16)
    configs = add_lora(model.unet, model.text_encoder, CFG, generator=make_generator(0))
    # random B so that the adapters do something
    gen = make_generator(1)
    with torch.no_grad():
        for p in lora_parameters(model.unet) + lora_parameters(model.text_encoder):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model, configs


def _outputs(model):
    gen = make_generator(2)
    ids = torch.randint(0, 500, (2, 77), generator=gen)
    c = model.unet.config.in_channels
    x = torch.randn(2, c, 8, 8, generator=gen)
    with torch.no_grad():
        emb = model.text_encoder(ids).last_hidden_state
        return emb, model.unet(x, torch.tensor([10, 500]), emb).sample


def test_targets_and_clip_skip_exclusion():
    model, (ucfg, tcfg) = _adapted()
    unet_adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in model.unet.named_parameters() if ".lora_A." in n}
    wanted = {n for n, _ in model.unet.named_modules()
              if any(n.endswith("." + t) for t in CFG.unet_target_modules) and "lora" not in n and not n.endswith("base_layer")}
    assert unet_adapted == wanted and len(wanted) > 0
    te_adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in model.text_encoder.named_parameters() if ".lora_A." in n}
    # 3 layers, clip skip 2: layers 0 and 1 carry 6 adapters each, layer 2 (never used) none
    assert len(te_adapted) == 12 and not any(".layers.2." in n for n in te_adapted)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in lora_parameters(model.unet))


def test_fresh_adapter_is_identity_and_seeded():
    a = make_tiny_base_model(TinyModelConfig(), resolution=16)
    ref = _outputs(a)
    add_lora(a.unet, a.text_encoder, CFG, generator=make_generator(5))
    out = _outputs(a)
    torch.testing.assert_close(out[1], ref[1], rtol=0, atol=0)  # B = 0
    b = make_tiny_base_model(TinyModelConfig(), resolution=16)
    add_lora(b.unet, b.text_encoder, CFG, generator=make_generator(5))
    for pa, pb in zip(lora_parameters(a.unet), lora_parameters(b.unet)):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("latent", [True, False])
def test_round_trip_bit_exact_and_diffusers_scale(tmp_path, latent):
    model, (ucfg, tcfg) = _adapted(latent)
    save_lora(tmp_path / "lora", model.unet, model.text_encoder, ucfg, tcfg)
    want_emb, want_out = _outputs(model)
    usd, tsd = lora_state_dicts(model.unet, model.text_encoder)

    # 1) our loader: bit-exact weights and outputs
    fresh = make_tiny_base_model(TinyModelConfig(latent=latent, text_layers=3), resolution=16)
    add_lora(fresh.unet, fresh.text_encoder, CFG, generator=make_generator(9))
    load_lora(tmp_path / "lora", fresh.unet, fresh.text_encoder)
    usd2, tsd2 = lora_state_dicts(fresh.unet, fresh.text_encoder)
    assert usd.keys() == usd2.keys() and tsd.keys() == tsd2.keys()
    assert all(torch.equal(usd[k], usd2[k]) for k in usd) and all(torch.equal(tsd[k], tsd2[k]) for k in tsd)
    emb, out = _outputs(fresh)
    assert torch.equal(emb, want_emb) and torch.equal(out, want_out)

    # 2) diffusers' loader (as load_lora_weights): every module, scale alpha / r, same outputs
    other = make_tiny_base_model(TinyModelConfig(latent=latent, text_layers=3), resolution=16)
    load_lora_with_diffusers(tmp_path / "lora", other.unet, other.text_encoder)
    scales = [m.scaling for m in other.unet.modules() if hasattr(m, "scaling") and isinstance(m.scaling, dict)]
    scales += [m.scaling for m in other.text_encoder.modules() if hasattr(m, "scaling") and isinstance(m.scaling, dict)]
    n_unet = len({k.rsplit(".lora_", 1)[0] for k in usd})
    n_te = len({k.rsplit(".lora_", 1)[0] for k in tsd})
    assert len(scales) == n_unet + n_te
    assert all(list(s.values()) == [CFG.alpha / CFG.rank] for s in scales)
    emb, out = _outputs(other)
    torch.testing.assert_close(emb, want_emb, rtol=0, atol=0)
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)

    # the file holds exactly the state dicts, prefixed
    fu, ft = read_lora(tmp_path / "lora")
    assert fu.keys() == usd.keys() and ft.keys() == tsd.keys()


def test_pipeline_load_lora_weights_latent_model(tmp_path):
    """For a latent model the full pipeline path works too: StableDiffusionPipeline.load_lora_weights."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    model, (ucfg, tcfg) = _adapted(True)
    save_lora(tmp_path / "lora", model.unet, model.text_encoder, ucfg, tcfg)
    want = _outputs(model)
    other = make_tiny_base_model(TinyModelConfig(latent=True, text_layers=3), resolution=16)
    pipe = StableDiffusionPipeline(
        vae=other.vae, text_encoder=other.text_encoder, tokenizer=other.tokenizer, unet=other.unet,
        scheduler=EulerAncestralDiscreteScheduler.from_config(other.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.load_lora_weights(str(tmp_path / "lora"))
    got = _outputs(other)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
