"""The selection assay's reference set in the chain ([assay] images > 0): same prompts and seeds as the guided
images at the reference scale, stored as hf_power_reference, never trained on; resumable; old run folders
(without the variable) still load and continue."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from chain.config import config_from_dict, config_to_toml
from chain.errors import ConfigError
from chain.images import load_image
from chain.run import DiffusionStages, resolve_base_model, run_chain
from qtmio.images import list_images
from qtmio.netcdf import read_netcdf, write_netcdf
from tests.chain.fixtures import make_captioned_folder, tiny_config_dict

REFERENCE_IMAGES = 4  # of 6 per iteration


def _config_dict(data: Path, *, assay: bool = True) -> dict:
    # CFG 1 guided images: with reference scale 1 the reference set must reproduce them (the CFG loop at
    # s = 1 and the conditional pass alone agree to rounding), an answer known without the code under test.
    d = tiny_config_dict(data, latent=False, num_iterations=2,
                         conditions=[{"name": "cfg1", "schedule": "constant", "scale": 1.0}])
    if assay:
        d["assay"] = {"images": REFERENCE_IMAGES, "reference_scale": 1.0}
    return d


@pytest.fixture(scope="module")
def assay_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("assay")
    make_captioned_folder(root / "data", num_images=6)
    cfg = config_from_dict(_config_dict(root / "data"))
    run_chain(cfg, root / "full")
    return cfg, root


def _images(folder: Path) -> torch.Tensor:
    return torch.stack([load_image(p) for p in list_images(folder)])


def test_reference_set_is_stored_and_matches_the_unguided_images(assay_run):
    from chain.spectra import measure_spectra

    cfg, root = assay_run
    out = root / "full"
    ds = read_netcdf(out / "metrics.nc")
    ref = ds.hf_power_reference.sel(condition="cfg1")
    assert np.all(np.isnan(ref.sel(iteration=0)))
    for k in (1, 2):
        row = ref.sel(iteration=k).values
        assert np.all(np.isfinite(row[:REFERENCE_IMAGES])) and np.all(np.isnan(row[REFERENCE_IMAGES:]))
        folder = out / "images_reference" / "cfg1" / str(k)
        refs = _images(folder)
        assert refs.shape[0] == REFERENCE_IMAGES
        # stored phenotypes = those of the written PNGs, measured here
        tau = cfg.metrics.phenotype_tau
        np.testing.assert_allclose(measure_spectra(refs, dtype=torch.float64, tau=tau).hf_power.numpy(),
                                   row[:REFERENCE_IMAGES], rtol=1e-12)
        # guided at CFG 1 and reference at scale 1 (conditional pass only): the same images up to rounding,
        # i.e. at most one 8-bit level apart
        guided = _images(out / "images" / "cfg1" / str(k))[:REFERENCE_IMAGES]
        assert (guided - refs).abs().max() <= 1.0 / 255 + 1e-6
    # the reference folder is not a training set: the guided images and their metrics equal those of the
    # same run without the assay
    plain = run_chain(config_from_dict(_config_dict(root / "data", assay=False)), root / "plain")
    for name in ("hf_power", "train_loss", "guidance_diff_norm", "radial_psd"):
        np.testing.assert_array_equal(plain[name].values, ds[name].values, err_msg=name)
    assert np.all(np.isnan(plain.hf_power_reference.values))
    assert not (root / "plain" / "images_reference").exists()


class _Interrupt(Exception):
    pass


@pytest.mark.slow
def test_resume_between_guided_and_reference_set(assay_run, tmp_path):
    cfg, root = assay_run
    from accelerate import Accelerator

    out = tmp_path / "resumed"
    base = resolve_base_model(cfg, out)
    inner = DiffusionStages(base, Accelerator(cpu=True))

    class Stopping:
        def __call__(self, job):
            return inner(job)

        def reference(self, job, count, scale):
            if job.iteration == 2:
                raise _Interrupt  # the guided images of iteration 2 are written, its reference set is not
            return inner.reference(job, count, scale)

    with pytest.raises(_Interrupt):
        run_chain(cfg, out, stages=Stopping())
    partial = read_netcdf(out / "metrics.nc")
    assert partial.completed.sel(condition="cfg1").values.tolist() == [1, 1, 0]
    assert len(list_images(out / "images" / "cfg1" / "2")) == 6
    resumed = run_chain(cfg, out)
    full = read_netcdf(root / "full" / "metrics.nc")
    for name in ("hf_power", "hf_power_reference", "train_loss", "guidance_diff_norm"):
        np.testing.assert_array_equal(resumed[name].values, full[name].values, err_msg=name)


@pytest.mark.slow
def test_run_folder_without_the_variable_loads_and_continues(tmp_path):
    """A folder written before the assay existed (no hf_power_reference, no [assay] in config.toml) resumes."""
    make_captioned_folder(tmp_path / "data", num_images=6)
    cfg = config_from_dict(_config_dict(tmp_path / "data", assay=False))
    out = tmp_path / "old"

    def stop(condition, iteration):
        raise _Interrupt

    with pytest.raises(_Interrupt):
        run_chain(cfg, out, after_cell=stop)
    ds = read_netcdf(out / "metrics.nc").drop_vars("hf_power_reference")
    write_netcdf(ds, out / "metrics.nc")
    assert "[assay]" not in (out / "config.toml").read_text()
    final = run_chain(cfg, out)
    assert final.completed.values.tolist() == [[1, 1, 1]]
    assert np.all(np.isnan(final.hf_power_reference.values))
    assert "hf_power_reference" in read_netcdf(out / "metrics.nc")


def test_assay_config_is_checked_and_off_by_default(tmp_path):
    d = _config_dict(tmp_path, assay=False)
    off = config_from_dict(d)
    assert off.assay.images == 0 and "[assay]" not in config_to_toml(off)  # old config.toml files still match
    on = config_from_dict(_config_dict(tmp_path))
    assert "[assay]" in config_to_toml(on)
    for bad, field in (({"images": -1}, "assay.images"), ({"reference_scale": -0.5}, "assay.reference_scale"),
                       ({"reference": 1.0}, "assay.reference")):
        with pytest.raises(ConfigError, match=field):
            config_from_dict({**d, "assay": bad})


def test_more_reference_images_than_images_is_an_error(tmp_path):
    from chain.errors import RunError
    from chain.run import IterationResult

    make_captioned_folder(tmp_path / "data", num_images=3)
    d = _config_dict(tmp_path / "data")
    d["assay"]["images"] = 5

    class Stage:
        def __call__(self, job):
            return IterationResult(images=job.train_images)

        def reference(self, job, count, scale):
            raise AssertionError("never reached")

    with pytest.raises(RunError, match="assay.images"):
        run_chain(config_from_dict(d), tmp_path / "out", stages=Stage())
