"""The paper's variants as config: images per prompt, iteration accumulation, real-image mixing, continual
finetuning; and a pixel-space chain with the real stages plus feature and CLIP metrics."""


import numpy as np
import pytest
import torch

from tests.chain.fixtures import make_captioned_folder, tiny_config_dict  # noqa: E402

from chain.config import config_from_dict  # noqa: E402
from chain.images import load_image  # noqa: E402
from qtmio.images import list_images  # noqa: E402
from chain.run import IterationResult, run_chain  # noqa: E402


def _value(iteration, prompt, j):
    return (40 * iteration + 7 * prompt + j) / 255.0  # exact in 8 bits


@pytest.mark.parametrize("window, mix", [(0, 0.5), (1, 0.0), (2, 1.0)])
def test_training_sets(tmp_path, window, mix):
    n, ipp, K = 3, 2, 3
    data = make_captioned_folder(tmp_path / "data", num_images=n, size=16)
    d = tiny_config_dict(data, num_iterations=K, conditions=[{"name": "c", "scale": 1.0}])
    d["data"]["resolution"] = 16
    d["sampling"]["images_per_prompt"] = ipp
    d["run"].update(accumulate_iterations=window, real_mix_ratio=mix, continual_finetuning=True)
    cfg = config_from_dict(d)
    originals = torch.stack([load_image(p) for p in list_images(data)])
    captions = [(data / f"img_{i:02d}.txt").read_text() for i in range(n)]
    jobs = []

    def stage(job):
        jobs.append(job)
        images = torch.stack([torch.full((3, 16, 16), _value(job.iteration, i // ipp, i % ipp)) for i in range(n * ipp)])
        return IterationResult(images=images)

    ds = run_chain(cfg, tmp_path / "out", stages=stage)
    assert ds.sizes["image"] == n * ipp
    assert np.all(np.isnan(ds.hf_power.sel(iteration=0).values[0, n:]))  # D_0 has n images only
    assert ds.image_prompt.values.tolist() == [0, 0, 1, 1, 2, 2]
    for job in jobs:
        k = job.iteration
        assert job.prompts == tuple(captions[i // ipp] for i in range(n * ipp))
        assert job.previous_lora_dir == (None if k == 1 else tmp_path / "out" / "lora" / "c" / str(k - 1))
        sources = list(range(0 if window == 0 else max(0, k - window), k))
        expect_len = sum(n if j == 0 else n * ipp for j in sources)
        assert len(job.train_images) == expect_len == len(job.train_captions)
        slot, generated, replaced = 0, 0, 0
        for j in sources:
            count = n if j == 0 else n * ipp
            for i in range(count):
                prompt, copy = (i, 0) if j == 0 else (i // ipp, i % ipp)
                image, caption = job.train_images[slot], job.train_captions[slot]
                assert caption == captions[prompt]
                if j == 0:
                    torch.testing.assert_close(image, originals[prompt], rtol=0, atol=1e-6)
                else:
                    generated += 1
                    if torch.allclose(image, originals[prompt], atol=1e-6):
                        replaced += 1
                    else:
                        torch.testing.assert_close(image, torch.full_like(image, _value(j, prompt, copy)), rtol=0, atol=1e-6)
                slot += 1
        assert replaced == round(mix * generated)


def test_pixel_space_chain_with_metrics(tmp_path):
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    from chain.metrics import frechet_distance, sfd
    from chain.models import make_tiny_tokenizer

    clip_dir = tmp_path / "clip"
    tok = make_tiny_tokenizer()
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(
        text_config=CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=1, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id).to_dict(),
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=1,
                                       image_size=32, patch_size=8).to_dict(),
        projection_dim=8))
    clip.save_pretrained(clip_dir)
    tok.save_pretrained(clip_dir)

    class PoolEncoder:  # a FeatureEncoder: 4 x 4 average pooling, 48 features
        feature_dim, name = 48, "pool4"

        def __call__(self, images):
            return torch.nn.functional.adaptive_avg_pool2d(images, 4).flatten(1)

    data = make_captioned_folder(tmp_path / "data", num_images=6, size=32)
    d = tiny_config_dict(data, latent=False, num_iterations=1, conditions=[{"name": "cfg2.5", "scale": 2.5}])
    d["sampling"]["images_per_prompt"] = 1
    d["metrics"] = {"clip_model": str(clip_dir), "recall_k": 2}
    cfg = config_from_dict(d)
    ds = run_chain(cfg, tmp_path / "out", encoder=PoolEncoder())
    assert not (tmp_path / "out" / "base_model" / "vae").exists()
    assert np.all(np.isfinite(ds.hf_power.values))
    for name in ("fd_dinov2", "recall", "sfd", "clip_score"):
        assert np.all(np.isfinite(ds[name].values)), name
    assert ds.fd_dinov2.sel(iteration=0).item() == pytest.approx(0.0, abs=1e-6)
    assert ds.sfd.sel(iteration=0).item() == 0.0 and ds.recall.sel(iteration=0).item() == 1.0
    # iteration 1 against the PNG files and the originals, recomputed here
    enc = PoolEncoder()
    f1 = enc(torch.stack([load_image(p) for p in list_images(tmp_path / "out" / "images" / "cfg2.5" / "1")])).double().numpy()
    from chain.data import load_captioned_folder

    f0 = enc(load_captioned_folder(data, resolution=32).images).double().numpy()
    assert ds.fd_dinov2.sel(iteration=1).item() == pytest.approx(frechet_distance(f0, f1), rel=1e-9)
    assert ds.sfd.sel(iteration=1).item() == pytest.approx(sfd(f1, f0), rel=1e-9)
