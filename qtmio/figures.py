"""Figures without pyplot's global state, saved atomically: the one figure saver of the project.

`figure(...)` is a matplotlib Figure on the Agg canvas: no GUI backend, no pyplot registry, nothing to
close. `save_figure` writes any figure through qtmio.atomic, in the format of the file's suffix.
`iteration_axis`, `one_legend` and `plain_log_ticks` are the conventions every figure of the project
shares: whole-number iteration ticks, one legend per figure, log axes labelled in plain decimals.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qtmio.atomic import atomic_write_path


def figure(**kwargs: Any):
    """A new `matplotlib.figure.Figure(**kwargs)` drawn by the Agg canvas (e.g. figsize=(9, 4))."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | os.PathLike, *, dpi: int = 120, tight: bool = False) -> Path:
    """Save `fig` atomically; the format follows the suffix (png, pdf, svg, ...; PNG when there is none;
    an unknown one raises ValueError). `tight` crops the page to what is drawn (bbox_inches="tight")."""
    path = Path(path)
    options: dict[str, Any] = {"dpi": dpi, "format": (path.suffix or ".png").lstrip(".")}
    if tight:
        options["bbox_inches"] = "tight"
    with atomic_write_path(path) as tmp:
        fig.savefig(tmp, **options)
    return path


def iteration_axis(ax, iterations=None, *, axis: str = "x", label: str = "iteration") -> None:
    """Whole-number ticks on an iteration axis (an integer tick locator; at most 12 ticks), labelled
    `label`; with `iterations`, the axis spans them with half an iteration of room on either side."""
    from matplotlib.ticker import MaxNLocator

    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_locator(MaxNLocator(integer=True, nbins=12, min_n_ticks=1))
    target.set_minor_locator(MaxNLocator(integer=True, nbins=1))
    target.set_label_text(label)
    if iterations is not None and len(iterations):
        lo, hi = float(min(iterations)) - 0.5, float(max(iterations)) + 0.5
        (ax.set_xlim if axis == "x" else ax.set_ylim)(lo, hi)


def one_legend(fig, axes, *, loc: str = "outside lower center", ncol: int = 3, fontsize: float = 8):
    """One legend for the whole figure: every labelled artist of `axes` once (by label, in the order drawn),
    placed `loc` (the "outside ..." places of a constrained layout, or any Figure.legend loc). Returns the
    legend, or None when nothing is labelled."""
    import numpy as np

    handles: dict[str, object] = {}
    for ax in np.ravel(axes):
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if not handles:
        return None
    return fig.legend(list(handles.values()), list(handles), loc=loc, ncol=min(len(handles), ncol),
                      fontsize=fontsize, frameon=False)


def plain_log_ticks(ax, low: float, high: float, *, axis: str = "x") -> None:
    """Ticks of a log axis at 1, 2 and 5 x 10^n between `low` and `high`, written as plain decimals (0.02,
    0.05, 0.1, ...), minor ticks unlabelled."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    ticks = [m * 10.0 ** e for e in range(-6, 7) for m in (1, 2, 5) if low <= m * 10.0 ** e <= high]
    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_locator(FixedLocator(ticks))
    target.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    target.set_minor_formatter(NullFormatter())
