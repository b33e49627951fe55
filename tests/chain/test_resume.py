"""A resumed run is the run that was started: a changed config is refused naming the fields; raising
run.num_iterations continues the chain, to the same results as a chain made that long from the start."""


import numpy as np
import pytest
import torch
import xarray as xr

from chain.config import config_to_toml
from chain.resume import config_change_problem, extend_iterations, flatten
from chain.run import IterationResult, RunError, run_chain
from chain.sampling import make_generator
from qtmio.netcdf import read_netcdf
from tests.chain.fixtures import make_captioned_folder, tiny_config

CONDITIONS = [{"name": "a", "scale": 1.0}, {"name": "b", "schedule": "exponential", "scale": 5.0}]


def noisy_stage(job):
    """A stand-in stage whose output depends on each image's seed: (train image + seeded noise) / 2."""
    n = len(job.prompts)
    noise = torch.stack([torch.rand(job.train_images.shape[1:], generator=make_generator(s)) for s in job.seeds])
    return IterationResult(images=(0.5 * job.train_images[-n:] + 0.5 * noise).clamp(0, 1),
                           train_loss=float(job.train_seed % 1000))


def test_flatten_names_fields_like_the_config_file():
    assert flatten({"run": {"seed": 1}, "conditions": [{"name": "a"}, {"name": "b"}], "x": {"l": [1, 2]}}) == {
        "run.seed": 1, "conditions[0].name": "a", "conditions[1].name": "b", "x.l": (1, 2)}


def test_changed_fields_are_named_and_growth_is_accepted(tmp_path):
    old = tiny_config(tmp_path, num_iterations=2, conditions=CONDITIONS)
    new = tiny_config(tmp_path, num_iterations=2, epochs=3, conditions=[CONDITIONS[0], {**CONDITIONS[1], "alpha": 1.0}])
    problem = config_change_problem(config_to_toml(old), new, "run/config.toml")
    assert problem.startswith("run/config.toml holds a different configuration")
    assert "finetune.epochs: 1 -> 3" in problem and "conditions[1].alpha: 2.0 -> 1.0" in problem
    assert "run.num_iterations:" not in problem
    assert config_change_problem(config_to_toml(old), tiny_config(tmp_path, num_iterations=6, conditions=CONDITIONS),
                                 "c") is None
    shrink = config_change_problem(config_to_toml(old), tiny_config(tmp_path, num_iterations=1, conditions=CONDITIONS),
                                   "c")
    assert "run.num_iterations: 2 -> 1 (only raising it continues a run)" in shrink


def test_extend_iterations_adds_unproduced_cells():
    ds = xr.Dataset({"hf_power": (("condition", "iteration"), np.ones((1, 2))),
                     "completed": (("condition", "iteration"), np.ones((1, 2), dtype=np.int8)),
                     "num_images": (("condition", "iteration"), np.full((1, 2), 3, dtype=np.int64))},
                    coords={"condition": ["a"], "iteration": [0, 1]}, attrs={"config": "old", "x": 1})
    grown = extend_iterations(ds, 3, "new")
    assert list(grown.iteration.values) == [0, 1, 2, 3] and grown.attrs == {"config": "new", "x": 1}
    assert grown.completed.dtype == np.int8 and grown.completed.values.tolist() == [[1, 1, 0, 0]]
    assert grown.num_images.values.tolist() == [[3, 3, 0, 0]]
    assert np.isnan(grown.hf_power.values[0, 2:]).all()


def test_raising_num_iterations_continues_to_the_long_run(tmp_path):
    data = make_captioned_folder(tmp_path / "data", num_images=3, size=32, seed=2)
    short, long_ = (tiny_config(data, num_iterations=k, conditions=CONDITIONS) for k in (2, 4))
    run_chain(short, tmp_path / "grown", stages=noisy_stage)
    grown = run_chain(long_, tmp_path / "grown", stages=noisy_stage)
    direct = run_chain(long_, tmp_path / "direct", stages=noisy_stage)
    assert list(grown.iteration.values) == [0, 1, 2, 3, 4] and grown.completed.values.all()
    for name in ("hf_power", "radial_psd", "angular_psd", "train_loss", "num_images", "completed"):
        np.testing.assert_array_equal(grown[name].values, direct[name].values, err_msg=name)
    on_disk = read_netcdf(tmp_path / "grown" / "metrics.nc")
    np.testing.assert_array_equal(on_disk.hf_power.values, direct.hf_power.values)
    assert on_disk.attrs["config"] == config_to_toml(long_)
    assert (tmp_path / "grown" / "config.toml").read_text() == config_to_toml(long_)
    # iterations 3 and 4 really are new images, not copies of earlier ones
    assert not np.array_equal(direct.hf_power.sel(iteration=3).values, direct.hf_power.sel(iteration=2).values)


def test_a_changed_config_is_refused_naming_the_field(tmp_path):
    data = make_captioned_folder(tmp_path / "data", num_images=2, size=32, seed=2)
    run_chain(tiny_config(data, num_iterations=1, conditions=CONDITIONS), tmp_path / "run",
              stages=noisy_stage)
    other = tiny_config(data, num_iterations=1, num_steps=9, conditions=CONDITIONS)
    with pytest.raises(RunError, match=r"fields that differ: sampling.num_steps: 4 -> 9\."):
        run_chain(other, tmp_path / "run", stages=noisy_stage)
