"""qtmio.figures: figures without pyplot, one atomic saver whose format follows the suffix."""

from __future__ import annotations

import os
import sys

import pytest

from qtmio.figures import figure, save_figure


def _drawn():
    fig = figure(figsize=(2, 1.5))
    fig.subplots().plot([0, 1], [1, 0])
    return fig


@pytest.mark.parametrize(("name", "magic"), [("f.png", b"\x89PNG"), ("f.pdf", b"%PDF"), ("f", b"\x89PNG"),
                                             ("f.svg", b"<?xml")])
def test_format_follows_the_suffix(tmp_path, name, magic):
    path = save_figure(_drawn(), tmp_path / "out" / name)
    assert path.read_bytes().startswith(magic)
    assert os.listdir(tmp_path / "out") == [name]


def test_unknown_format_raises_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError):
        save_figure(_drawn(), tmp_path / "f.unknownformat")
    assert os.listdir(tmp_path) == []


def test_tight_crops_to_what_is_drawn(tmp_path):
    from PIL import Image

    fig = figure(figsize=(4, 4))
    fig.text(0.5, 0.5, "x")
    loose = save_figure(fig, tmp_path / "loose.png", dpi=50)
    tight = save_figure(fig, tmp_path / "tight.png", dpi=50, tight=True)
    with Image.open(loose) as a, Image.open(tight) as b:
        assert a.size == (200, 200) and b.size[0] < 100 and b.size[1] < 100


def test_no_pyplot_state():
    already = "matplotlib.pyplot" in sys.modules
    fig = _drawn()
    assert type(fig.canvas).__name__ == "FigureCanvasAgg"
    if not already:
        assert "matplotlib.pyplot" not in sys.modules


def test_iteration_axis_ticks_whole_numbers_only():
    from qtmio.figures import iteration_axis

    fig = figure(figsize=(3, 2))
    ax = fig.subplots()
    ax.plot([0, 1, 2], [0.1, 0.3, 0.2])
    iteration_axis(ax, [0, 1, 2])
    fig.canvas.draw()
    ticks = [t for t in ax.get_xticks() if -0.5 <= t <= 2.5]
    assert ticks == [0, 1, 2] and ax.get_xlim() == (-0.5, 2.5) and ax.get_xlabel() == "iteration"


def test_one_legend_gathers_each_label_once():
    from qtmio.figures import one_legend

    fig = figure(figsize=(3, 2), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax in axes:
        ax.plot([0, 1], [0, 1], label="fit")
        ax.plot([0, 1], [1, 0], label="observed")
    axes[1].plot([0, 1], [0.5, 0.5], label="only here")
    legend = one_legend(fig, axes)
    assert [t.get_text() for t in legend.get_texts()] == ["fit", "observed", "only here"]
    assert fig.legends == [legend] and one_legend(fig, [fig.subplots()]) is None
