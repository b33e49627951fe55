"""The SD1.5 GPU benchmark proven on the CPU: its tiny path end to end (float32 in process, bf16 autocast in a
subprocess, as on a GPU), its SD1.5 configs against the published model sizes, and its skip without CUDA.

The like-with-like checks use independent references: the number of LoRA parameters both sides train is
compared with a closed form over the UNet's transformer blocks and the text encoder's layers, and the
pipeline's images with ours image by image (same seeds, same modules: equal up to rounding).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import bench_gpu_sd15 as bench

ROOT = Path(__file__).resolve().parents[2]

THROUGHPUTS = [
    "train_reference_samples_per_s", "train_ours_plain_samples_per_s", "train_ours_channels_last_samples_per_s",
    "generate_reference_images_per_s", "generate_plain_images_per_s", "generate_channels_last_images_per_s",
    "generate_merged_lora_images_per_s",
]
RATIOS = {  # ratio key: (ours, reference)
    "train_speedup_plain": ("train_ours_plain_samples_per_s", "train_reference_samples_per_s"),
    "train_speedup_channels_last": ("train_ours_channels_last_samples_per_s", "train_reference_samples_per_s"),
    "generate_speedup_plain": ("generate_plain_images_per_s", "generate_reference_images_per_s"),
    "generate_speedup_channels_last": ("generate_channels_last_images_per_s", "generate_reference_images_per_s"),
    "generate_speedup_merged_lora": ("generate_merged_lora_images_per_s", "generate_reference_images_per_s"),
}
OTHER_KEYS = [
    "size", "device", "precision", "resolution", "latent_size", "train_batch", "lora_rank", "lora_alpha",
    "min_snr_gamma", "clip_skip", "num_inference_steps", "cfg_scale", "unet_params", "vae_params",
    "text_encoder_params", "train_reference_peak_mem_gib", "train_ours_plain_peak_mem_gib",
    "train_ours_channels_last_peak_mem_gib", "generate_reference_peak_mem_gib", "generate_plain_peak_mem_gib",
    "train_speedup", "generate_speedup", "generate_speedup_as_in_chain", "train_target_met", "generate_target_met",
    "lora_params_unet_ours", "lora_params_unet_reference", "lora_params_text_encoder_ours",
    "lora_params_text_encoder_reference", "lora_same_modules", "image_shape_ours", "image_shape_reference",
    "generate_max_abs_diff_vs_reference", "generate_mean_abs_diff_vs_reference",
    "generate_mean_abs_diff_between_seeds", "applied_training", "applied_generation", "not_applied", "targets",
    "train_ours_channels_last_effective", "lora_layers_merged", "wall_s",
]


def unet_lora_parameters(config: dict, rank: int) -> tuple[int, int]:
    """(LoRA parameters, adapted modules) of the paper's targets in an SD-layout UNet, in closed form.

    Per transformer block of width C with cross-attention width D: self-attention q, k, v, out (C -> C),
    cross-attention q, out (C -> C) and k, v (D -> C), GEGLU ff.net.0.proj (C -> 8C), ff.net.2 (4C -> C), and
    the 1x1 proj_in / proj_out (C -> C): a rank-r adapter on an (in -> out) layer holds r (in + out)
    parameters, so a block holds r (32 C + 2 D) in 12 modules. SD layout: levels with cross-attention hold
    layers_per_block blocks going down and layers_per_block + 1 going up; the mid block holds one at the last
    width.
    """
    channels = config["block_out_channels"]
    d, per_level = config["cross_attention_dim"], config["layers_per_block"]
    widths = []
    for level, kind in enumerate(config["down_block_types"]):
        if kind.startswith("CrossAttn"):
            widths += [channels[level]] * (2 * per_level + 1)
    widths.append(channels[-1])  # mid block
    return sum(rank * (32 * c + 2 * d) for c in widths), 12 * len(widths)


def text_lora_parameters(config: dict, rank: int, clip_skip: int) -> tuple[int, int]:
    """q, k, v, out (H -> H), fc1 (H -> I), fc2 (I -> H) in each layer that reaches the clip-skip output."""
    h, i = config["hidden_size"], config["intermediate_size"]
    layers = config["num_hidden_layers"] - (clip_skip - 1)
    return layers * rank * (10 * h + 2 * i), 6 * layers


def _check_record(record: dict, settings: bench.BenchSettings, *, image_tolerance: float | None) -> None:
    figures = record["figures"]
    assert record["benchmark"] == "gpu_sd15_tiny" and "cpu" in record["machine"]
    missing = [k for k in THROUGHPUTS + list(RATIOS) + OTHER_KEYS if k not in figures]
    assert not missing, missing
    for key in THROUGHPUTS:
        assert math.isfinite(figures[key]) and figures[key] > 0, key
    for key, (ours, ref) in RATIOS.items():
        assert figures[key] == pytest.approx(figures[ours] / figures[ref], rel=1e-12), key
    assert figures["generate_speedup_as_in_chain"] == figures["generate_speedup_plain"]
    assert figures["train_speedup"] == max(figures["train_speedup_plain"], figures["train_speedup_channels_last"])
    assert figures["train_target_met"] == (figures["train_speedup"] >= 1.5)
    # peak GPU memory is reported only on CUDA
    assert all(figures[k] is None for k in figures if k.endswith("_peak_mem_gib"))
    # both sides train the same adapters, and as many parameters as the closed form says
    unet_config, _, text_config = bench.CONFIGS["tiny"]
    unet_count, unet_modules = unet_lora_parameters(unet_config, settings.rank)
    text_count, text_modules = text_lora_parameters(text_config, settings.rank, settings.clip_skip)
    for side in ("ours", "reference"):
        assert figures[f"lora_params_unet_{side}"] == unet_count
        assert figures[f"lora_params_text_encoder_{side}"] == text_count
        assert figures[f"lora_modules_unet_{side}"] == unet_modules
        assert figures[f"lora_modules_text_encoder_{side}"] == text_modules
    assert figures["lora_same_modules"] is True
    assert figures["lora_layers_merged"] == unet_modules + text_modules
    assert figures["train_ours_channels_last_effective"] is True
    # both sides generate the same images (same seeds, same modules)
    side = settings.resolution
    assert figures["image_shape_ours"] == figures["image_shape_reference"] == [3, side, side]
    assert figures["latent_size"] == side // 8
    if image_tolerance is not None:     # float32: the same images to rounding
        assert 0.0 <= figures["generate_max_abs_diff_vs_reference"] <= image_tolerance
    # in every precision, the images of the same seed are far closer than images of different seeds are (bf16:
    # measured mean 0.0027 against 0.17 between seeds on the tiny models; its largest pixel difference, 0.04
    # on one CPU, depends on the CPU's bf16 kernels)
    between = figures["generate_mean_abs_diff_between_seeds"]
    assert between > 0.0
    assert 0.0 <= figures["generate_mean_abs_diff_vs_reference"] <= 0.05 * between


def test_tiny_benchmark_float32_in_process(tmp_path):
    bench.main(["--tiny", "--device", "cpu", "--out-dir", str(tmp_path)])
    record = json.loads((tmp_path / "gpu_sd15_tiny.json").read_text())
    settings = bench.tiny_settings("cpu")
    assert record["figures"]["precision"] == "no"
    _check_record(record, settings, image_tolerance=1e-5)


def test_tiny_benchmark_bf16_autocast_cli(tmp_path):
    """The GPU's code path (bf16 weights, accelerate's autocast wrapper, float32 LoRA) through the CLI, in a
    subprocess since accelerate fixes the precision once per process."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_gpu_sd15", "--tiny", "--device", "cpu", "--precision", "bf16",
         "--out-dir", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300, cwd=str(ROOT),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[gpu_sd15]" in out.stdout and "done" in out.stdout
    record = json.loads((tmp_path / "gpu_sd15_tiny.json").read_text())
    assert record["figures"]["precision"] == "bf16"
    _check_record(record, bench.tiny_settings("cpu"), image_tolerance=None)


def test_sd15_configs_have_the_published_sizes():
    """Parameter counts of SD1.5's UNet, VAE and CLIP ViT-L/14 text encoder (built on the meta device), and
    the 192 + 72 LoRA target modules of REFERENCE.md."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_config, vae_config, text_config = bench.CONFIGS["sd15"]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
        text = CLIPTextModel(CLIPTextConfig(**text_config))
    assert bench.count_parameters(unet) == 859_520_964
    assert bench.count_parameters(vae) == 83_653_863
    assert bench.count_parameters(text) == 123_060_480
    assert unet.config.sample_size * 8 == 512 and vae.config.scaling_factor == 0.18215
    unet_targets = [n for n, _ in unet.named_modules()
                    if any(n == t or n.endswith("." + t) for t in bench.REFERENCE_UNET_TARGETS)]
    text_targets = [n for n, _ in text.named_modules()
                    if any(n.endswith("." + t) for t in bench.REFERENCE_TEXT_TARGETS)]
    assert len(unet_targets) == unet_lora_parameters(unet_config, 32)[1] == 192
    assert len(text_targets) == 72 and text_lora_parameters(text_config, 32, 1)[1] == 72
    assert text_lora_parameters(text_config, 32, 2)[1] == 66  # clip skip 2 leaves the last layer out


def test_main_without_cuda_prints_one_line_and_returns(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main([]) is None
    assert bench.main(["--out-dir", str(tmp_path)]) is None
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all("skipped" in line and "--tiny" in line for line in lines)
    assert not list(tmp_path.iterdir())


def test_fp16_on_cpu_is_refused_with_the_flag_named(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--tiny", "--device", "cpu", "--precision", "fp16"])
    assert exc.value.code == 2
    assert "--precision" in capsys.readouterr().err
