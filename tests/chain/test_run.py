"""The chain driver end to end on a tiny model: the CLI on the example config, resume after an interruption
(equal metrics), a pristine base model in every iteration, a stand-in stage with a known answer (Gaussian
blur lowers every image's high-frequency fraction), and bad inputs failing before any training."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from typer.testing import CliRunner

from tests.chain.fixtures import make_captioned_folder, tiny_config  # noqa: E402

from chain.config import load_config  # noqa: E402
from chain.data import DatasetError  # noqa: E402
from chain.images import load_image  # noqa: E402
from qtmio.images import list_images  # noqa: E402
from chain.models import weights_digest  # noqa: E402
from chain.run import DiffusionStages, IterationResult, RunError, resolve_base_model, run_chain  # noqa: E402
from qtmio.netcdf import read_netcdf  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny_cpu.toml"
CONTRACT_VARS = ("cfg_scale", "cfg_schedule", "condition_drop", "hf_power", "radial_psd", "angular_psd",
                 "fd_dinov2", "recall", "sfd", "clip_score")


@pytest.fixture(scope="module")
def example_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("example")
    make_captioned_folder(root / "tiny_data", num_images=6)
    text = EXAMPLE.read_text()
    path = root / "tiny_cpu.toml"
    path.write_text(text)  # data.path = "tiny_data" resolves next to the copied file
    return path


@pytest.fixture(scope="module")
def uninterrupted(example_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "full"
    from qtm.cli import app

    result = CliRunner().invoke(app, ["chain", "run", str(example_config), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_end_to_end_contract(uninterrupted):
    out, output = uninterrupted
    assert '"conditions": ["cfg7.5", "redifine"]' in output
    ds = read_netcdf(out / "metrics.nc")
    for name in CONTRACT_VARS:
        assert name in ds
    assert list(ds.condition.values) == ["cfg7.5", "redifine"]
    assert list(ds.iteration.values) == [0, 1, 2]
    assert ds.attrs["schema_version"] == 1
    assert ds.attrs["data_kind"] == "chain"           # qtm fit reads it: --drift by default on this folder
    for key in ("phenotype", "dataset", "base_model", "git_revision", "created_at", "version_torch"):
        assert key in ds.attrs
    assert np.all(np.isfinite(ds.hf_power.values)) and np.all(ds.completed.values == 1)
    # iteration 0 is the same real data for every condition
    np.testing.assert_array_equal(ds.hf_power.sel(condition="cfg7.5", iteration=0),
                                  ds.hf_power.sel(condition="redifine", iteration=0))
    # no encoder / CLIP configured: NaN
    assert np.all(np.isnan(ds.fd_dinov2.values)) and np.all(np.isnan(ds.clip_score.values))
    np.testing.assert_array_equal(ds.cfg_scale.values, [7.5, 7.5])
    assert list(ds.cfg_schedule.values) == ["constant", "exponential"]
    np.testing.assert_array_equal(ds.condition_drop.values, [0.0, 0.2])
    # ReDiFine's recorded guidance scales follow s0 exp(-alpha t / T); constant stays 7.5
    T = ds.sizes["step"]
    np.testing.assert_allclose(ds.guidance_scale.sel(condition="redifine", iteration=1),
                               [7.5 * math.exp(-2.0 * t / T) for t in range(T)])
    assert np.all(ds.guidance_scale.sel(condition="cfg7.5", iteration=1) == 7.5)
    assert np.all(ds.guidance_diff_norm.sel(iteration=[1, 2]) > 0)
    hist = ds.latent_histogram.sel(iteration=1).values
    assert np.all(hist.sum(axis=-1) == 6 * 4 * 16 * 16)  # 6 images x 4 channels x 16 x 16 latents
    # files: resolved config, images, LoRA weights, the JSONL log
    assert (out / "config.toml").is_file() and (out / "log.jsonl").is_file()
    for c in ("cfg7.5", "redifine"):
        for k in (1, 2):
            assert len(list_images(out / "images" / c / str(k))) == 6
            assert (out / "lora" / c / str(k) / "pytorch_lora_weights.safetensors").is_file()
    # the stored phenotypes are those of the PNG files, measured independently here
    from chain.spectra import measure_spectra

    imgs = torch.stack([load_image(p) for p in list_images(out / "images" / "redifine" / "2")])
    assert ds.attrs["phenotype_tau"] == 0.16  # the example keeps 5.1 cycles per image at 32 pixels
    np.testing.assert_allclose(measure_spectra(imgs, tau=0.16, dtype=torch.float64).hf_power.numpy(),
                               ds.hf_power.sel(condition="redifine", iteration=2).values, rtol=1e-12)


class _Interrupt(Exception):
    pass


def test_resume_after_interruption_gives_equal_metrics(example_config, uninterrupted, tmp_path):
    full_out, _ = uninterrupted
    cfg = load_config(example_config)
    out = tmp_path / "resumed"

    def kill_after_first(condition, iteration):
        raise _Interrupt

    with pytest.raises(_Interrupt):
        run_chain(cfg, out, after_cell=kill_after_first)
    partial = read_netcdf(out / "metrics.nc")
    assert partial.completed.sel(condition="cfg7.5").values.tolist() == [1, 1, 0]
    assert np.all(np.isnan(partial.hf_power.sel(condition="cfg7.5", iteration=2)))

    # resume with the real stage wrapped to hash the pristine base model around every iteration
    from accelerate import Accelerator

    base = resolve_base_model(cfg, out)
    inner = DiffusionStages(base, Accelerator(cpu=True))
    digests, jobs = [], []

    def stage(job):
        before = [weights_digest(m) for m in (base.unet, base.text_encoder, base.vae)]
        result = inner(job)
        digests.append((before, [weights_digest(m) for m in (base.unet, base.text_encoder, base.vae)]))
        jobs.append((job.condition.name, job.iteration))
        return result

    run_chain(cfg, out, stages=stage)
    assert jobs == [("cfg7.5", 2), ("redifine", 1), ("redifine", 2)]  # finished cells are not redone
    assert all(b == a == digests[0][0] for b, a in digests)

    resumed, full = read_netcdf(out / "metrics.nc"), read_netcdf(full_out / "metrics.nc")
    for name in ("hf_power", "radial_psd", "angular_psd", "train_loss", "guidance_diff_norm", "latent_histogram"):
        np.testing.assert_array_equal(resumed[name].values, full[name].values, err_msg=name)
    # a rerun of a finished run does nothing and changes nothing
    again = run_chain(cfg, out, stages=lambda job: pytest.fail("nothing left to do"))
    xr.testing.assert_identical(again, resumed)


def _gaussian_blur(images: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Circular Gaussian blur in the Fourier domain: every frequency scaled by exp(-2 pi^2 sigma^2 r^2)."""
    h, w = images.shape[-2:]
    fy = torch.fft.fftfreq(h, dtype=torch.float64)[:, None]
    fx = torch.fft.fftfreq(w, dtype=torch.float64)[None, :]
    gain = torch.exp(-2 * math.pi**2 * sigma**2 * (fx**2 + fy**2))
    return torch.fft.ifft2(torch.fft.fft2(images.double()) * gain).real.float().clamp(0, 1)


def test_blurring_stand_in_lowers_the_phenotype_every_iteration(tmp_path):
    data = make_captioned_folder(tmp_path / "data", num_images=4, size=32, seed=5)
    cfg = tiny_config(data, num_iterations=3, conditions=[{"name": "blur", "scale": 1.0}])
    calls = []

    def blur_stage(job):
        calls.append(job.iteration)
        assert job.train_images.shape == (4, 3, 32, 32) and len(job.prompts) == 4
        return IterationResult(images=_gaussian_blur(job.train_images))

    ds = run_chain(cfg, tmp_path / "out", stages=blur_stage)
    assert calls == [1, 2, 3]
    hf = ds.hf_power.sel(condition="blur").values  # (iteration, image)
    assert np.all(np.diff(hf, axis=0) < 0), hf  # every image, every iteration
    assert not (tmp_path / "out" / "base_model").exists()  # the stand-in needs no model


def test_bad_dataset_fails_before_training(tmp_path):
    data = make_captioned_folder(tmp_path / "data", num_images=3)
    (data / "img_01.txt").unlink()
    (data / "img_02.png").write_bytes(b"garbage")
    cfg = tiny_config(data)
    with pytest.raises(DatasetError) as info:
        run_chain(cfg, tmp_path / "out", stages=lambda job: pytest.fail("trained on bad data"))
    assert "img_01.txt" in str(info.value) and "img_02.png" in str(info.value)
    assert not (tmp_path / "out" / "metrics.nc").exists() and not (tmp_path / "out" / "config.toml").exists()


def test_cli_errors_name_the_problem(tmp_path, example_config):
    from qtm.cli import app

    bad = tmp_path / "bad.toml"
    bad.write_text(example_config.read_text().replace("rank = 4", "rank = 4\nrnak = 2"))
    result = CliRunner().invoke(app, ["chain", "run", str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "finetune.rnak" in result.output and str(bad) in result.output
    # a base model that is neither a folder nor in the HF cache
    nomodel = tmp_path / "nomodel.toml"
    nomodel.write_text(example_config.read_text().replace('path = "tiny"', 'path = "no-org/no-model"')
                       .replace('path = "tiny_data"', f'path = "{example_config.parent / "tiny_data"}"'))
    result = CliRunner().invoke(app, ["chain", "run", str(nomodel), "--out", str(tmp_path / "o2")])
    assert result.exit_code == 2 and "no-org/no-model" in result.output
    # a folder of another run is refused
    cfg_a = tiny_config(make_captioned_folder(tmp_path / "d", num_images=2), num_iterations=1,
                        conditions=[{"name": "a", "scale": 1.0}])
    run_chain(cfg_a, tmp_path / "run", stages=lambda job: IterationResult(images=job.train_images))
    cfg_b = tiny_config(tmp_path / "d", num_iterations=1, conditions=[{"name": "a", "scale": 2.0}])
    with pytest.raises(RunError, match=r"config.toml.*conditions\[0\].scale: 1.0 -> 2.0"):
        run_chain(cfg_b, tmp_path / "run", stages=lambda job: IterationResult(images=job.train_images))


def test_resume_refuses_changed_original_images(tmp_path):
    """A run resumed on a D_0 folder that gained an image is refused with a message, not padded or crashed."""
    data = make_captioned_folder(tmp_path / "data", num_images=3, size=32, seed=1)
    cfg = tiny_config(data, num_iterations=2, conditions=[{"name": "a", "scale": 1.0}])
    copy_stage = lambda job: IterationResult(images=job.train_images)  # noqa: E731
    with pytest.raises(_Interrupt):
        run_chain(cfg, tmp_path / "out", stages=copy_stage, after_cell=_stop_after_first)
    before = read_netcdf(tmp_path / "out" / "metrics.nc").hf_power.values.copy()
    make_captioned_folder(tmp_path / "more", num_images=4, size=32, seed=1)
    for name in ("img_03.png", "img_03.txt"):
        (tmp_path / "data" / name).write_bytes((tmp_path / "more" / name).read_bytes())
    with pytest.raises(RunError, match="original images changed"):
        run_chain(cfg, tmp_path / "out", stages=copy_stage)
    np.testing.assert_array_equal(read_netcdf(tmp_path / "out" / "metrics.nc").hf_power.values, before)


def _stop_after_first(condition, iteration):
    if iteration == 1:
        raise _Interrupt


def test_constant_images_do_not_blank_the_mean_spectra():
    """One constant image has an undefined phenotype (no AC energy): NaN for it, the others' spectra stay."""
    from chain.measure import measure

    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    images[1] = 0.5
    m = measure(images)
    assert np.isnan(m.hf_power[1]) and np.isfinite(m.hf_power[[0, 2]]).all()
    expected = measure(images[[0, 2]])
    np.testing.assert_allclose(m.radial_psd, expected.radial_psd, rtol=1e-12)
    np.testing.assert_allclose(m.angular_psd, expected.angular_psd, rtol=1e-12)
