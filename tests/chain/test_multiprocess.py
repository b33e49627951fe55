"""Data-parallel finetuning and split generation through torch.distributed on CPU (gloo, 2 processes via
torchrun): the same global batch and the same per-image seeds give the metrics of a one-process run, up to
float rounding of DDP's gradient averaging. GPUs (NCCL) run the same code path but are not checked here."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.chain.fixtures import make_captioned_folder, tiny_config_dict  # noqa: E402

from chain.config import config_from_dict, config_to_toml  # noqa: E402
from qtmio.netcdf import read_netcdf  # noqa: E402

SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from chain.config import load_config
from chain.run import run_chain
run_chain(load_config(sys.argv[1]), sys.argv[2])
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind, port", [("sd", 29517), ("sdxl", 29518)])
def test_two_processes_match_one(tmp_path, kind, port):
    """SDXL: three adapted modules under DDP (UNet and both text encoders), every adapted layer reached."""
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed")
    data = make_captioned_folder(tmp_path / "data", num_images=6)
    d = tiny_config_dict(data, num_iterations=2, epochs=2)
    d["finetune"]["batch_size"] = 6  # divisible by 2 processes
    if kind == "sdxl":
        d["model"]["kind"] = "sdxl"
        d["model"]["tiny"].update(cross_attention_dim=64, text_hidden_size=32)
    config = tmp_path / "c.toml"
    config.write_text(config_to_toml(config_from_dict(d)))
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    one = subprocess.run([sys.executable, str(script), str(config), str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", str(port), str(script), str(config),
                          str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = read_netcdf(tmp_path / "one" / "metrics.nc"), read_netcdf(tmp_path / "two" / "metrics.nc")
    assert np.all(b.completed.values == 1)
    for name in ("hf_power", "radial_psd", "train_loss", "guidance_diff_norm"):
        np.testing.assert_allclose(b[name].values, a[name].values, rtol=1e-3, atol=1e-4, err_msg=name)
