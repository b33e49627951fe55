"""qtmio.atomic: a file or folder is replaced whole or not at all, and nothing is left behind."""

from __future__ import annotations

import pytest

from qtmio.atomic import atomic_folder, atomic_write_path, write_bytes_atomic, write_text_atomic


def test_atomic_write_path_replaces_or_leaves_the_old_file(tmp_path):
    import os
    import stat

    target = tmp_path / "data.nc"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write_path(target) as tmp:
            tmp.write_text("half written")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["data.nc"]
    with atomic_write_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".nc"
        tmp.write_text("new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["data.nc"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_missing_folders_are_created_and_text_is_utf8(tmp_path):
    target = tmp_path / "a" / "b" / "notes.md"
    assert write_text_atomic(target, "héllo\n") == target
    assert target.read_bytes() == "héllo\n".encode("utf-8")
    write_bytes_atomic(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01" and [p.name for p in target.parent.iterdir()] == ["notes.md"]


def test_atomic_folder_replaces_the_old_folder_or_keeps_it(tmp_path):
    target = tmp_path / "lora" / "cfg" / "1"
    with atomic_folder(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".") and tmp.is_dir()
        (tmp / "weights.bin").write_bytes(b"first")
    assert sorted(p.name for p in target.iterdir()) == ["weights.bin"]
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as tmp:
            (tmp / "weights.bin").write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert (target / "weights.bin").read_bytes() == b"first"
    assert [p.name for p in target.parent.iterdir()] == ["1"]  # no temporary folder left
    with atomic_folder(target) as tmp:
        (tmp / "other.bin").write_bytes(b"second")
    assert sorted(p.name for p in target.iterdir()) == ["other.bin"]  # the old content is gone, not merged
