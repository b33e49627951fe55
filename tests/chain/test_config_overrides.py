"""`--set section.key=value` overrides: TOML values, unknown keys refused by name, applied before the
checks, and stored in the run's resolved config.toml."""

import tomllib

import pytest

from chain.config import ConfigError, apply_overrides, config_to_toml, load_config, parse_override

CONFIG = """
[data]
path = "d"
resolution = 32
[model]
path = "tiny"
[sampling]
num_steps = 8
[[conditions]]
name = "a"
scale = 2.0
[[conditions]]
name = "b"
schedule = "exponential"
scale = 7.5
"""


@pytest.fixture
def cfg_path(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text(CONFIG)
    return p


@pytest.mark.parametrize("text, parts, value", [
    ("sampling.num_steps=20", ["sampling", "num_steps"], 20),
    ("finetune.unet_lr=1e-3", ["finetune", "unet_lr"], 1e-3),
    ("run.continual_finetuning=true", ["run", "continual_finetuning"], True),
    ('run.device="cuda:1"', ["run", "device"], "cuda:1"),
    ("run.device=cpu", ["run", "device"], "cpu"),
    ("model.tiny.block_out_channels=[8, 16]", ["model", "tiny", "block_out_channels"], [8, 16]),
    ("conditions[1].alpha=3", ["conditions", 1, "alpha"], 3),
])
def test_values_are_toml_values(text, parts, value):
    got_parts, got = parse_override(text)
    assert got_parts == parts and got == value and type(got) is type(value)


def test_overrides_apply_in_order_and_land_in_the_resolved_config(cfg_path):
    cfg = load_config(cfg_path, ["sampling.num_steps=20", "run.seed=3", "run.seed=4", "conditions[1].alpha=3.0",
                                 "model.tiny.seed=7"])
    assert (cfg.sampling.num_steps, cfg.run.seed, cfg.conditions[1].guidance.alpha, cfg.model.tiny.seed) == (20, 4, 3.0, 7)
    doc = tomllib.loads(config_to_toml(cfg))
    assert doc["sampling"]["num_steps"] == 20 and doc["run"]["seed"] == 4 and doc["conditions"][1]["alpha"] == 3.0
    # the file itself is not changed
    assert load_config(cfg_path).sampling.num_steps == 8


@pytest.mark.parametrize("text, fragment", [
    ("sampling.num_stepz=20", "unknown key 'num_stepz' in [sampling]"),
    ("bogus.x=1", "unknown key 'bogus' in [top level]"),
    ("model.tiny.nope=1", "unknown key 'nope' in [model.tiny]"),
    ("conditions[0].alpha=2", "unknown key 'alpha' for a condition"),
    ("conditions[5].scale=2", "conditions[0] .. conditions[1]"),
    ("sampling", "expected section.key=value"),
    ("model.tiny=3", "names a table"),
])
def test_unknown_keys_are_refused_by_name(cfg_path, text, fragment):
    with pytest.raises(ConfigError, match=None) as info:
        load_config(cfg_path, [text])
    assert fragment in str(info.value)
    assert info.value.message({"overrides": "--set"}).startswith("--set ")  # the shell names its flag


def test_overrides_are_checked_like_the_file(cfg_path):
    with pytest.raises(ConfigError) as info:
        load_config(cfg_path, ["finetune.adam_beta1=1.5"])
    assert str(cfg_path) in str(info.value) and "'finetune.adam_beta1' = 1.5" in str(info.value)


def test_apply_overrides_leaves_its_input_alone():
    doc = tomllib.loads(CONFIG)
    out = apply_overrides(doc, ["sampling.num_steps=3"])
    assert doc["sampling"]["num_steps"] == 8 and out["sampling"]["num_steps"] == 3


def test_cli_set_reaches_the_config_checks(cfg_path, tmp_path):
    from typer.testing import CliRunner

    from qtm.cli import app

    r = CliRunner().invoke(app, ["chain", "run", str(cfg_path), "--out", str(tmp_path / "o"),
                                 "--set", "sampling.num_steps=0"])
    assert r.exit_code == 2 and "'sampling.num_steps' = 0" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["chain", "run", str(cfg_path), "--out", str(tmp_path / "o"),
                                 "--set", "sampling.stepz=1"])
    assert r.exit_code == 2 and "error: --set sampling.stepz: unknown key 'stepz'" in r.output
