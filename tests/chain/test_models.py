"""Base models: a saved folder reloads identically, a folder without vae/ is pixel space, an HF cache id
loads offline, and bad folders give clear errors."""

import shutil

import pytest
import torch

from chain.config import ModelConfig, TinyModelConfig
from chain.models import ModelLoadError, load_base_model, make_tiny_base_model, save_base_model, weights_digest
from tests.chain.fixtures import install_in_hub_cache


@pytest.mark.parametrize("latent", [True, False])
def test_save_and_load_folder(tmp_path, latent):
    model = make_tiny_base_model(TinyModelConfig(latent=latent), resolution=16)
    folder = save_base_model(model, tmp_path / "m")
    assert (folder / "vae").is_dir() == latent and (folder / "model_index.json").is_file()
    loaded = load_base_model(str(folder))
    assert loaded.is_pixel_space == (not latent)
    for a, b in ((model.unet, loaded.unet), (model.text_encoder, loaded.text_encoder), (model.vae, loaded.vae)):
        assert weights_digest(a) == weights_digest(b)
    ids = loaded.tokenizer(["a cat"], padding="max_length", max_length=77).input_ids
    assert ids == model.tokenizer(["a cat"], padding="max_length", max_length=77).input_ids
    assert loaded.vae_scale_factor == (2 if latent else 1)


def test_external_vae(tmp_path):
    latent = make_tiny_base_model(TinyModelConfig(latent=True, seed=3), resolution=16)
    latent.vae.save_pretrained(tmp_path / "vae_only")
    pixel_folder = save_base_model(make_tiny_base_model(TinyModelConfig(latent=True, seed=4), resolution=16), tmp_path / "m")
    loaded = load_base_model(ModelConfig(path=str(pixel_folder), vae=str(tmp_path / "vae_only")))
    assert weights_digest(loaded.vae) == weights_digest(latent.vae)


def test_hf_cache_id_offline(tmp_path, monkeypatch):
    """A model in the HF cache layout (models--org--name/snapshots/<rev>/, refs/main) loads by its id."""
    model = make_tiny_base_model(TinyModelConfig(latent=True), resolution=16)
    install_in_hub_cache(model, "tiny-org/tiny-sd", tmp_path, monkeypatch)  # "tiny-org/tiny-sd" is not a folder here
    try:
        loaded = load_base_model("tiny-org/tiny-sd")
    except ModelLoadError as exc:  # pragma: no cover - depends on the libraries reading the patched cache
        pytest.fail(str(exc))
    assert weights_digest(loaded.unet) == weights_digest(model.unet) and loaded.vae is not None


def test_bad_folders(tmp_path):
    with pytest.raises(ModelLoadError, match="model_index.json"):
        (tmp_path / "empty").mkdir()
        load_base_model(str(tmp_path / "empty"))
    folder = save_base_model(make_tiny_base_model(TinyModelConfig(latent=False), resolution=16), tmp_path / "m")
    shutil.rmtree(folder / "tokenizer")
    with pytest.raises(ModelLoadError, match="tokenizer/"):
        load_base_model(str(folder))
    with pytest.raises(ModelLoadError, match="not-a/model"):
        load_base_model("not-a/model")


def test_tiny_model_is_seeded_and_leaves_global_rng():
    state = torch.random.get_rng_state()
    a = make_tiny_base_model(TinyModelConfig(seed=7), resolution=16)
    assert torch.equal(state, torch.random.get_rng_state())
    b = make_tiny_base_model(TinyModelConfig(seed=7), resolution=16)
    assert weights_digest(a.unet) == weights_digest(b.unet)
