"""Finetuning pieces against their definitions: min-SNR weights from the beta schedule, the diffusion loss of
one batch, the condition-drop rate (binomial bounds), cached flips, and a finetune that leaves the base
model untouched."""

import math

import numpy as np
import pytest
import torch

from chain.config import FinetuneConfig, TinyModelConfig
from chain.finetune import cache_latents, diffusion_loss, drop_captions, finetune, min_snr_weights
from chain.lora import lora_parameters
from chain.models import SD_SCHEDULER_CONFIG, make_tiny_base_model, weights_digest
from chain.sampling import make_generator


def _alphas_cumprod_sd():
    # scaled_linear: betas = linspace(sqrt(b0), sqrt(b1), T)^2; abar_t = prod_{s<=t} (1 - beta_s)
    T, b0, b1 = 1000, 0.00085, 0.012
    betas = np.linspace(math.sqrt(b0), math.sqrt(b1), T) ** 2
    return np.cumprod(1.0 - betas)


@pytest.mark.parametrize("gamma", [5.0, 1.0])
def test_min_snr_weights_formula(gamma):
    from diffusers import DDPMScheduler

    abar = _alphas_cumprod_sd()
    t = torch.tensor([0, 10, 100, 500, 999])
    snr = abar[t.numpy()] / (1 - abar[t.numpy()])
    want_eps = np.minimum(snr, gamma) / snr
    want_v = np.minimum(snr, gamma) / (snr + 1)
    sched = DDPMScheduler.from_config(SD_SCHEDULER_CONFIG)
    np.testing.assert_allclose(min_snr_weights(sched.alphas_cumprod, t, gamma).numpy(), want_eps, rtol=1e-4)  # abar is float32 in diffusers
    np.testing.assert_allclose(min_snr_weights(sched.alphas_cumprod, t, gamma, "v_prediction").numpy(), want_v, rtol=1e-4)
    assert torch.all(min_snr_weights(sched.alphas_cumprod, t, 0.0) == 1)


class _ZeroUNet(torch.nn.Module):
    """Predicts 0 everywhere (the loss is then the weighted mean square of the target)."""

    def forward(self, x, t, embeddings):
        return type("Out", (), {"sample": torch.zeros_like(x) + 0.0 * embeddings.sum()})()


class _ZeroText(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def forward(self, ids, output_hidden_states=False):
        return type("Out", (), {"last_hidden_state": torch.zeros(ids.shape[0], ids.shape[1], 4) + self.weight})()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_diffusion_loss_by_hand(prediction_type):
    """loss = mean_b w(t_b) mean((0 - target_b)^2): target eps, or v = sqrt(abar) eps - sqrt(1 - abar) x0."""
    from diffusers import DDPMScheduler

    gamma = 5.0
    sched = DDPMScheduler.from_config({**SD_SCHEDULER_CONFIG, "prediction_type": prediction_type})
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 4, 4, generator=gen), torch.randn(3, 2, 4, 4, generator=gen)
    t = torch.tensor([5, 300, 900])
    loss = diffusion_loss(_ZeroUNet(), _ZeroText(), sched, x0, noise, t, torch.zeros(3, 7, dtype=torch.long),
                          clip_skip=1, min_snr_gamma=gamma, train_text_encoder=False)
    abar = _alphas_cumprod_sd()[t.numpy()]
    snr = abar / (1 - abar)
    eps, x = noise.double().numpy(), x0.double().numpy()
    if prediction_type == "epsilon":
        target, w = eps, np.minimum(snr, gamma) / snr
    else:
        a = abar[:, None, None, None]
        target, w = np.sqrt(a) * eps - np.sqrt(1 - a) * x, np.minimum(snr, gamma) / (snr + 1)
    want = np.mean(w * (target**2).mean(axis=(1, 2, 3)))
    assert float(loss) == pytest.approx(want, rel=1e-5)  # diffusers keeps abar in float32


@pytest.mark.parametrize("p", [0.0, 0.2, 0.5, 1.0])
def test_condition_drop_rate(p):
    n = 20000
    out = drop_captions(["c"] * n, p, generator=make_generator(0))
    dropped = sum(1 for c in out if c == "")
    assert set(out) <= {"", "c"}
    sd = math.sqrt(n * p * (1 - p))
    assert abs(dropped - n * p) <= 5 * sd + (0 if 0 < p < 1 else 0)


def test_cached_latents_hold_both_flips():
    model = make_tiny_base_model(TinyModelConfig(latent=False), resolution=16)
    images = torch.rand(3, 3, 16, 16, generator=make_generator(0))
    cache = cache_latents(model, images, flip=True, generator=make_generator(0))
    assert cache.shape == (3, 2, 3, 16, 16)
    torch.testing.assert_close(cache[:, 0], images * 2 - 1)
    torch.testing.assert_close(cache[:, 1], images.flip(-1) * 2 - 1)
    assert cache_latents(model, images, flip=False, generator=make_generator(0)).shape[1] == 1


@pytest.mark.parametrize("latent", [True, False])
def test_finetune_trains_lora_and_leaves_base_pristine(latent):
    from accelerate import Accelerator

    base = make_tiny_base_model(TinyModelConfig(latent=latent), resolution=16)
    digests = [weights_digest(m) for m in (base.unet, base.text_encoder, base.vae)]
    images = torch.rand(4, 3, 16, 16, generator=make_generator(1))
    cfg = FinetuneConfig(rank=4, alpha=2.0, batch_size=2, epochs=1, unet_lr=1e-2, text_encoder_lr=1e-2)
    seen = []
    result = finetune(base, images, ["a", "b", "c", "d"], cfg, condition_drop=0.0, generator=make_generator(2),
                      accelerator=Accelerator(cpu=True), on_step=lambda s, t, l: seen.append((s, t)))
    assert seen == [(1, 2), (2, 2)] and len(result.losses) == 2 and all(np.isfinite(result.losses))
    assert [weights_digest(m) for m in (base.unet, base.text_encoder, base.vae)] == digests
    assert not any("lora" in n for n, _ in base.unet.named_parameters())
    # the adapters moved away from B = 0
    b = [p for n, p in result.model.unet.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in b)
    assert any(p.abs().sum() > 0 for n, p in result.model.text_encoder.named_parameters() if "lora_B" in n)
    # same generator -> same result (reproducible)
    again = finetune(base, images, ["a", "b", "c", "d"], cfg, condition_drop=0.0, generator=make_generator(2),
                     accelerator=Accelerator(cpu=True))
    assert again.losses == result.losses
    for p, q in zip(lora_parameters(result.model.unet), lora_parameters(again.model.unet)):
        assert torch.equal(p, q)


def test_continual_finetuning_starts_from_saved_adapter(tmp_path):
    """With init_lora and zero learning rates (and no weight decay) the adapter stays exactly the saved one."""
    import dataclasses

    from accelerate import Accelerator

    from chain.lora import lora_state_dicts, save_lora

    base = make_tiny_base_model(TinyModelConfig(latent=False), resolution=16)
    images = torch.rand(2, 3, 16, 16, generator=make_generator(1))
    cfg = FinetuneConfig(rank=4, alpha=2.0, batch_size=2, epochs=1, unet_lr=1e-2, text_encoder_lr=1e-2)
    first = finetune(base, images, ["a", "b"], cfg, condition_drop=0.0, generator=make_generator(2),
                     accelerator=Accelerator(cpu=True))
    save_lora(tmp_path / "lora", first.model.unet, first.model.text_encoder, first.unet_lora_config,
              first.text_encoder_lora_config)
    frozen = dataclasses.replace(cfg, unet_lr=0.0, text_encoder_lr=0.0, weight_decay=0.0)
    second = finetune(base, images, ["a", "b"], frozen, condition_drop=0.0, generator=make_generator(3),
                      accelerator=Accelerator(cpu=True), init_lora=tmp_path / "lora")
    a, b = lora_state_dicts(first.model.unet, first.model.text_encoder), lora_state_dicts(second.model.unet, second.model.text_encoder)
    for sa, sb in zip(a, b):
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(v.abs().sum() > 0 for k, v in a[0].items() if "lora_B" in k)


BF16_SCRIPT = """
import torch
torch.set_num_threads(1)
from accelerate import Accelerator
from chain.config import FinetuneConfig, TinyModelConfig
from chain.finetune import finetune
from chain.models import make_tiny_base_model, weights_digest
from chain.sampling import make_generator
base = make_tiny_base_model(TinyModelConfig(latent=True), resolution=16)
digest = weights_digest(base.unet)
cfg = FinetuneConfig(rank=4, alpha=2.0, batch_size=2, epochs=1, mixed_precision="bf16")
r = finetune(base, torch.rand(2, 3, 16, 16), ["a", "b"], cfg, condition_drop=0.0, generator=make_generator(2),
             accelerator=Accelerator(cpu=True, mixed_precision="bf16"))
lora = {p.dtype for n, p in r.model.unet.named_parameters() if "lora" in n}
rest = {p.dtype for n, p in r.model.unet.named_parameters() if "lora" not in n}
assert lora == {torch.float32} and rest == {torch.bfloat16}, (lora, rest)
assert all(x == x for x in r.losses) and weights_digest(base.unet) == digest
print("ok")
"""


def test_bf16_mixed_precision_keeps_lora_float32():
    """bf16 autocast with float32 adapters (in a subprocess: accelerate fixes the precision per process)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", BF16_SCRIPT], capture_output=True, text=True, env=env, timeout=300,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[2]))
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
