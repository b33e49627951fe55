"""Every config field refuses a bad value with one line naming the file, the field, the value and what is
allowed; the table below covers every field of every config dataclass (a test checks that it does)."""

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pytest

from chain.config import ChainConfig, ConditionConfig, ConfigError, config_from_dict
from chain.guidance import SCHEDULES, schedule_fields

ROOT = Path(__file__).resolve().parents[2]

BASE = {"data": {"path": "d", "resolution": 32}, "model": {"path": "tiny"},
        "conditions": [{"name": "a", "schedule": "constant", "scale": 2.0}]}

# (section.key, a bad value, a fragment of the expected message). Sections are config-file tables; for
# conditions the first [[conditions]] table (the schedule named in the case).
CASES = [
    ("run.num_iterations", 0, ">= 1"),
    ("run.seed", -1, "[0, "),
    ("run.real_mix_ratio", 1.5, "[0, 1]"),
    ("run.real_mix_ratio", math.nan, "= nan"),
    ("run.accumulate_iterations", -1, "0 = all previous iterations"),
    ("run.continual_finetuning", "yes", "true or false"),
    ("run.device", "gpu", "'cuda:N'"),
    ("run.dataset_name", 3, "must be a string"),
    ("data.path", "", "D_0 folder"),
    ("data.source", "web", '"folder", "toy"'),
    ("data.toy_images", 0, "[1, 100000]"),
    ("data.toy_seed", -2, "[0, "),
    ("data.caption_extension", "txt", "'.txt'"),
    ("data.format", "csv", '"auto", "captions", "metadata"'),
    ("data.resolution", 4, "[8, 8192]"),
    ("data.resolution", 33, "downsampling factor"),
    ("data.center_crop", 1, "true or false"),
    ("data.max_images", -1, ">= 0"),
    ("model.path", "", "not empty"),
    ("model.vae", 1, "must be a string"),
    ("model.tiny.seed", -1, "[0, "),
    ("model.tiny.latent", "no", "true or false"),
    ("model.tiny.block_out_channels", [], "not empty"),
    ("model.tiny.block_out_channels", [16], "at least two"),
    ("model.tiny.block_out_channels", [16, 0], ">= 1"),
    ("model.tiny.block_out_channels", [12, 32], "multiple of norm_num_groups"),
    ("model.tiny.layers_per_block", 0, ">= 1"),
    ("model.tiny.cross_attention_dim", 16, "must be equal"),
    ("model.tiny.attention_head_dim", 0, ">= 1"),
    ("model.tiny.norm_num_groups", 0, ">= 1"),
    ("model.tiny.text_hidden_size", 0, ">= 1"),
    ("model.tiny.text_layers", 1, "cannot exceed text_layers"),
    ("model.tiny.text_intermediate_size", 0, ">= 1"),
    ("model.tiny.vae_block_out_channels", [6, 10], "group norm"),
    ("model.tiny.latent_channels", 0, ">= 1"),
    ("model.tiny.addition_time_embed_dim", 0, ">= 1"),
    ("model.kind", "xl", 'one of "auto", "sd", "sdxl"'),
    ("finetune.rank", 0, ">= 1"),
    ("finetune.alpha", -1.0, "> 0"),
    ("finetune.unet_lr", math.nan, "= nan"),
    ("finetune.unet_lr", math.inf, "= inf"),
    ("finetune.unet_lr", -1e-4, ">= 0"),
    ("finetune.text_encoder_lr", -1e-4, ">= 0"),
    ("finetune.train_text_encoder", 0, "true or false"),
    ("finetune.batch_size", 0, ">= 1"),
    ("finetune.epochs", -1, ">= 0"),
    ("finetune.max_train_steps", -5, ">= 0"),
    ("finetune.mixed_precision", "fp8", '"no", "fp16", "bf16"'),
    ("finetune.weight_decay", -1.0, ">= 0"),
    ("finetune.adam_beta1", 1.5, "[0, 1)"),
    ("finetune.adam_beta2", 1.0, "[0, 1)"),
    ("finetune.adam_epsilon", 0.0, "> 0"),
    ("finetune.min_snr_gamma", -5.0, "0 = plain MSE"),
    ("finetune.noise_offset", -0.1, ">= 0"),
    ("finetune.max_grad_norm", math.inf, "= inf"),
    ("finetune.clip_skip", 0, ">= 1"),
    ("finetune.clip_skip", 99, "cannot exceed text_layers"),
    ("finetune.flip", "true", "true or false"),
    ("finetune.cache_latents", False, "not implemented"),
    ("finetune.unet_target_modules", [], "not empty"),
    ("finetune.unet_target_modules", ["to_qq"], '"to_q"'),
    ("finetune.text_encoder_target_modules", ["to_q"], '"q_proj"'),
    ("sampling.num_steps", 0, ">= 1"),
    ("sampling.batch_size", 0, ">= 1"),
    ("sampling.images_per_prompt", 0, ">= 1"),
    ("sampling.latent_histogram_bins", 0, ">= 1"),
    ("sampling.latent_histogram_range", -4.0, "> 0"),
    ("metrics.encoder", "clip:x", "dinov2:"),
    ("metrics.clip_model", 5, "must be a string"),
    ("metrics.recall_k", -1, ">= 1"),
    ("metrics.batch_size", 0, ">= 1"),
    ("metrics.phenotype_tau", 0.8, "1/sqrt(2)"),
    ("assay.images", -1, ">= 0"),
    ("assay.reference_scale", float("nan"), ">= 0"),
    ("conditions.name", "../x", "folder-safe"),
    ("conditions.condition_drop", 1.5, "[0, 1]"),
    ("conditions.constant.scale", -1.0, ">= 0"),
    ("conditions.exponential.scale", math.nan, "= nan"),
    ("conditions.exponential.alpha", -2.0, "0 = constant guidance"),
    ("conditions.exponential.step_origin", -1, ">= 0"),
    ("conditions.redifine.alpha", math.inf, "= inf"),
    ("conditions.redifine.scale", -7.5, ">= 0"),
    ("conditions.redifine.step_origin", -1, ">= 0"),
    ("conditions.interval.scale", -1.0, ">= 0"),
    ("conditions.interval.sigma_low", 6.0, "sigma_low < sigma_high"),
    ("conditions.interval.sigma_high", 0.0, "> 0"),
    ("conditions.linear.start", -1.0, ">= 0"),
    ("conditions.linear.end", math.inf, "= inf"),
]


def _table(dotted, value):
    doc = {k: (dict(v) if isinstance(v, dict) else [dict(c) for c in v]) for k, v in BASE.items()}
    parts = dotted.split(".")
    if parts[0] == "conditions":
        cond = doc["conditions"][0]
        if len(parts) == 3:
            cond["schedule"] = parts[1]
            if "scale" not in schedule_fields(SCHEDULES[parts[1]]):
                del cond["scale"]
        cond[parts[-1]] = value
        return doc, f"conditions[0].{parts[-1]}"
    table = doc.setdefault(parts[0], {})
    for p in parts[1:-1]:
        table = table.setdefault(p, {})
    table[parts[-1]] = value
    return doc, dotted


@pytest.mark.parametrize("dotted, value, fragment", CASES, ids=[f"{c[0]}={c[1]!r}" for c in CASES])
def test_bad_value_is_one_line_naming_file_field_value(dotted, value, fragment):
    doc, field = _table(dotted, value)
    with pytest.raises(ConfigError) as info:
        config_from_dict(doc, where="my.toml")
    message = str(info.value)
    lines = message.splitlines()
    assert len(lines) == 1, message
    assert lines[0].startswith("my.toml: ") and f"'{field}'" in message, message
    assert fragment in message, message


def test_every_field_of_every_config_dataclass_has_a_case():
    covered = {c[0] for c in CASES}
    wanted = set()

    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            if dataclasses.is_dataclass(default):
                walk(type(default), f"{prefix}.{f.name}")
            else:
                wanted.add(f"{prefix}.{f.name}")

    for f in dataclasses.fields(ChainConfig):
        if f.name == "conditions":
            continue
        cls = f.type if isinstance(f.type, type) else None
        cls = cls or {"data": __import__("chain.config").config.DataConfig,
                      "model": __import__("chain.config").config.ModelConfig}.get(f.name) or type(f.default)
        walk(cls, f.name)
    for f in dataclasses.fields(ConditionConfig):
        if f.name != "guidance":
            wanted.add(f"conditions.{f.name}")
    for name, cls in SCHEDULES.items():
        for key in schedule_fields(cls):
            wanted.add(f"conditions.{name}.{key}")
    assert wanted - covered == set()


def test_several_bad_values_give_one_line_each():
    doc, _ = _table("finetune.adam_beta1", 1.5)
    doc["finetune"]["weight_decay"] = -1.0
    doc["metrics"] = {"recall_k": -1}
    with pytest.raises(ConfigError) as info:
        config_from_dict(doc, where="my.toml")
    lines = str(info.value).splitlines()
    assert len(lines) == 3 and all(line.startswith("my.toml: field '") for line in lines)


def test_shipped_examples_and_defaults_pass():
    from chain.config import load_config

    for path in (ROOT / "examples").glob("*.toml"):
        load_config(path)
    config_from_dict(BASE, where="x")


def test_bad_config_through_the_cli_is_one_error_line_without_torch(tmp_path):
    """Refused before torch or diffusers is imported: the check runs in a fresh interpreter that records
    whether torch got imported."""
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[data]\npath = "d"\nresolution = 32\n[model]\npath = "tiny"\n[finetune]\nadam_beta1 = 1.5\n'
                   '[[conditions]]\nname = "a"\nscale = 2.0\n')
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom qtm.cli import app\n"
            f"r = CliRunner().invoke(app, ['chain', 'run', {str(cfg)!r}, '--out', {str(tmp_path / 'o')!r}])\n"
            "print(r.exit_code, 'torch' in sys.modules, 'diffusers' in sys.modules)\nprint(r.output)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    first, *rest = out.stdout.splitlines()
    assert first == "2 False False", out.stdout + out.stderr
    errors = [line for line in rest if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "finetune.adam_beta1" in errors[0]
    assert "1.5" in errors[0] and "[0, 1)" in errors[0] and str(cfg) in errors[0]
    assert "Traceback" not in out.stdout + out.stderr
    assert not (tmp_path / "o").exists()


def _cli(args):
    from typer.testing import CliRunner

    from qtm.cli import app

    return CliRunner().invoke(app, args)


def _one_error_line(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], result.output


def test_demo_negative_seed_refused_before_any_folder(tmp_path):
    out = tmp_path / "demo"
    _one_error_line(_cli(["demo", "--out", str(out), "--seed", "-1"]), "--seed -1", ">= 0")
    assert not out.exists()


def test_fit_unknown_plot_format_refused_before_the_fit(tmp_path):
    # a folder that is not a run at all: the plot name is refused first, so the fit is never tried
    _one_error_line(_cli(["fit", str(tmp_path), "--plot", str(tmp_path / "x.xyz")]), "x.xyz", ".png")


def test_chain_run_out_naming_a_file_is_refused(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[data]\npath = "d"\nresolution = 32\n[model]\npath = "tiny"\n[[conditions]]\nname = "a"\n')
    target = tmp_path / "file"
    target.write_text("x")
    _one_error_line(_cli(["chain", "run", str(cfg), "--out", str(target)]), str(target), "not a folder")


def test_report_out_naming_a_file_is_refused(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    _one_error_line(_cli(["report", str(tmp_path), "--out", str(target)]), str(target), "not a folder")
    assert target.read_text() == "x"


@pytest.mark.parametrize("dotted, value, fragment", [
    ("finetune.unet_lr", "nan", "= nan"), ("finetune.clip_skip", "99", "cannot exceed text_layers"),
    ("metrics.batch_size", "0", ">= 1"), ("finetune.unet_target_modules", "[]", "not empty"),
])
def test_bad_values_through_the_cli(tmp_path, dotted, value, fragment):
    section, key = dotted.split(".")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[data]\npath = "d"\nresolution = 32\n[model]\npath = "tiny"\n[{section}]\n{key} = {value}\n'
                   '[[conditions]]\nname = "a"\n')
    _one_error_line(_cli(["chain", "run", str(cfg), "--out", str(tmp_path / "o")]), f"'{dotted}'", fragment, str(cfg))
    assert not (tmp_path / "o").exists()


def test_cuda_device_refused_without_cuda():
    from chain.preflight import device_problem

    assert "no usable CUDA" in device_problem("cuda", cuda_available=False, cuda_count=0)
    assert "2 CUDA device" in device_problem("cuda:2", cuda_available=True, cuda_count=2)
    assert device_problem("cuda:1", cuda_available=True, cuda_count=2) is None
    assert device_problem("cpu", cuda_available=False, cuda_count=0) is None


def test_model_folder_shapes_are_checked(tmp_path):
    import json

    from chain.preflight import model_problems

    (tmp_path / "m" / "vae").mkdir(parents=True)
    (tmp_path / "m" / "text_encoder").mkdir()
    (tmp_path / "m" / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [1, 2, 3, 4]}))
    (tmp_path / "m" / "text_encoder" / "config.json").write_text(json.dumps({"num_hidden_layers": 12}))
    doc = {**BASE, "model": {"path": str(tmp_path / "m")}, "data": {"path": "d", "resolution": 516},
           "finetune": {"clip_skip": 13}}
    problems = model_problems(config_from_dict(doc, where="x"))
    assert len(problems) == 2 and "multiple of 8" in problems[0] and "<= 12" in problems[1]
    doc["data"]["resolution"], doc["finetune"]["clip_skip"] = 512, 2
    assert model_problems(config_from_dict(doc, where="x")) == []


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_refused_at_run_start_through_the_cli(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[run]\ndevice = "cuda"\n[data]\nsource = "toy"\ntoy_images = 2\nresolution = 32\n'
                   '[model]\npath = "tiny"\n[[conditions]]\nname = "a"\n')
    _one_error_line(_cli(["chain", "run", str(cfg), "--out", str(tmp_path / "o")]), "'run.device' = 'cuda'",
                    "no usable CUDA")
    assert not (tmp_path / "o").exists()  # nothing made: no folder, no data/, no run.lock
    # a refused run in an existing folder leaves it as it was: no run.lock is created
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "notes.txt").write_text("mine")
    _one_error_line(_cli(["chain", "run", str(cfg), "--out", str(tmp_path / "o")]), "'run.device' = 'cuda'",
                    "no usable CUDA")
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["notes.txt"]
