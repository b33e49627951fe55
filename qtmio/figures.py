"""Figures without pyplot's global state, saved atomically: the one figure saver of the project.

`figure(...)` is a matplotlib Figure on the Agg canvas: no GUI backend, no pyplot registry, nothing to
close. `save_figure` writes any figure through qtmio.atomic, in the format of the file's suffix.
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
