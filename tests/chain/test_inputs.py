"""D_0 is fingerprinted into the run (inputs.json) and checked on resume: inverted images, an edited caption,
an added or removed pair are refused naming the files; an old run folder without a fingerprint gets one."""

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from chain.inputs import INPUTS_NAME, describe_changes, fingerprint_folder
from chain.run import IterationResult, RunError, run_chain
from tests.chain.fixtures import make_captioned_folder, tiny_config


class _Stop(Exception):
    pass


def _stop(condition, iteration):
    raise _Stop


def _copy(job):
    return IterationResult(images=job.train_images)


def _paused_run(tmp_path):
    data = make_captioned_folder(tmp_path / "data", num_images=3, size=32, seed=1)
    cfg = tiny_config(data, num_iterations=2, conditions=[{"name": "a", "scale": 1.0}])
    with pytest.raises(_Stop):
        run_chain(cfg, tmp_path / "out", stages=_copy, after_cell=_stop)
    return data, cfg, tmp_path / "out"


def test_fingerprint_is_the_sha256_of_every_file(tmp_path):
    data = make_captioned_folder(tmp_path / "d", num_images=2)
    (data / ".hidden").write_text("x")
    fp = fingerprint_folder(data)
    expected = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in data.iterdir() if not p.name.startswith(".")}
    assert fp == expected and len(fp) == 4


def test_describe_changes_names_kind_and_file():
    before = {"a.png": "1", "a.txt": "2", "b.png": "3"}
    after = {"a.png": "9", "a.txt": "2", "c.txt": "4"}
    assert describe_changes(before, after) == ["image a.png changed", "caption c.txt added", "image b.png removed"]


def test_inverted_image_refused_naming_it(tmp_path):
    data, cfg, out = _paused_run(tmp_path)
    recorded = json.loads((out / INPUTS_NAME).read_text())["data"]["files"]
    assert set(recorded) == {p.name for p in data.iterdir()}
    name = sorted(data.glob("*.png"))[1]
    Image.fromarray(255 - np.asarray(Image.open(name))).save(name)
    with pytest.raises(RunError, match=rf"original images changed.*image {name.name} changed"):
        run_chain(cfg, out, stages=_copy)


def test_edited_caption_refused_naming_it(tmp_path):
    data, cfg, out = _paused_run(tmp_path)
    caption = sorted(data.glob("*.txt"))[0]
    caption.write_text(caption.read_text() + " and a hat")
    with pytest.raises(RunError) as info:
        run_chain(cfg, out, stages=_copy)
    assert f"caption {caption.name} changed" in str(info.value) and "image" not in str(info.value).split(":")[-1]


def test_unchanged_inputs_resume_and_old_folders_get_a_fingerprint(tmp_path):
    data, cfg, out = _paused_run(tmp_path)
    (out / INPUTS_NAME).unlink()  # a run folder from before fingerprints
    run_chain(cfg, out, stages=_copy)
    events = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any(e["event"] == "note" and "no fingerprint" in e["message"] for e in events)
    assert json.loads((out / INPUTS_NAME).read_text())["data"]["files"] == fingerprint_folder(data)
    # and from now on a change is caught
    (data / "img_02.png").unlink()
    (data / "img_02.txt").unlink()
    with pytest.raises(RunError, match=r"image img_02.png removed; caption img_02.txt removed"):
        run_chain(cfg, out, stages=_copy)


def test_images_smaller_than_the_resolution_get_a_note(tmp_path):
    from chain.inputs import upscale_note

    data = make_captioned_folder(tmp_path / "data", num_images=2, size=32)
    Image.new("RGB", (1, 1), (10, 20, 30)).save(data / "img_00.png")
    note = upscale_note(data, ("img_00.png", "img_01.png"), 32)
    assert note.startswith("1 of 2 images") and "img_00.png, 1 x 1" in note
    assert upscale_note(data, ("img_01.png",), 32) is None
    cfg = tiny_config(data, num_iterations=1, conditions=[{"name": "a", "scale": 1.0}])
    run_chain(cfg, tmp_path / "out", stages=_copy)
    events = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert any(e["event"] == "note" and "upscaled" in e["message"] for e in events)
