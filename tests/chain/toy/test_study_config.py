"""The toy world named in a config: model.path = "toy" is the committed toy base model, metrics.encoder =
"toy" the committed toy encoder; examples/toy_study.toml holds the study the issue fixes in advance."""

from __future__ import annotations

from pathlib import Path

import torch

from chain.config import config_from_dict, load_config
from chain.guidance import Constant, Exponential
from chain.measure import build_encoder
from chain.models import ModelConfig, load_base_model, weights_digest
from chain.run import resolve_base_model
from chain.toy import load_toy_encoder, toy_base_model_dir

ROOT = Path(__file__).resolve().parents[3]
STUDY = ROOT / "examples" / "toy_study.toml"


def _config(tmp_path: Path, **tables):
    return config_from_dict({"data": {"path": str(tmp_path)}, "model": {"path": "toy"}, **tables,
                             "conditions": [{"name": "c", "scale": 1.0}]}, base_dir=tmp_path)


def test_model_path_toy_is_the_committed_toy_base_model(tmp_path):
    config = _config(tmp_path)
    assert config.model.path == "toy"  # not resolved against the config's folder
    loaded = resolve_base_model(config, tmp_path)
    direct = load_base_model(ModelConfig(path=str(toy_base_model_dir())))
    for a, b in ((loaded.unet, direct.unet), (loaded.text_encoder, direct.text_encoder)):
        assert weights_digest(a) == weights_digest(b)
    assert not (tmp_path / "base_model").exists()  # nothing copied into the run folder


def test_metrics_encoder_toy_is_the_committed_toy_encoder(tmp_path):
    encoder = build_encoder(_config(tmp_path, metrics={"encoder": "toy"}), torch.device("cpu"))
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(encoder(images), load_toy_encoder()(images), rtol=0, atol=0)


def test_toy_study_config_is_the_planned_study():
    config = load_config(STUDY)
    assert config.model.path == "toy" and config.metrics.encoder == "toy"
    assert (config.data.source, config.data.toy_images, config.data.toy_seed) == ("toy", 256, 0)
    assert (config.data.resolution, config.run.num_iterations, config.run.seed) == (32, 6, 0)
    f = config.finetune
    assert (f.rank, f.alpha, f.unet_lr, f.text_encoder_lr, f.batch_size, f.epochs, f.clip_skip) \
        == (16, 16.0, 1e-3, 5e-4, 6, 4, 2)
    assert config.sampling.num_steps == 30 and config.metrics.phenotype_tau == 0.16
    assert (config.assay.images, config.assay.reference_scale) == (256, 1.0)
    names = [c.name for c in config.conditions]
    assert names == ["cfg1", "cfg7.5", "cfg2.5", "redifine", "cfg1.5", "cfg5"]
    for c, scale in zip(config.conditions, (1.0, 7.5, 2.5, None, 1.5, 5.0)):
        if scale is not None:
            assert isinstance(c.guidance, Constant) and c.guidance.scale_value == scale and c.condition_drop == 0.0
    redifine = config.conditions[3]
    assert isinstance(redifine.guidance, Exponential) and redifine.condition_drop == 0.2
    assert (redifine.guidance.scale_value, redifine.guidance.alpha, redifine.guidance.step_origin) == (7.5, 2.0, 0)
