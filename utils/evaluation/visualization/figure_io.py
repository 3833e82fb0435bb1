"""Writing figures: PNG with a PDF beside it (atomically), and several figures stacked as one.

Figures are built with the object-oriented API (``matplotlib.figure.Figure``), never in
pyplot's global figure list; :func:`save_figure` writes one and releases it.
"""
from __future__ import annotations

import io
import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib.image
import numpy as np
from matplotlib.figure import Figure

from utils.atomic import atomic_path

FIGURE_FORMATS = ("png", "pdf")
"""Formats :func:`save_figure` writes: PNG for viewing, PDF (vector) for papers."""


def save_figure(fig: Figure, path: str | Path, dpi: int = 150) -> Path:
    """Write ``fig`` as PNG at ``path`` and as PDF beside it (vector, for papers), each
    atomically (temp file + rename), and close it; returns the PNG's path.

    Closing removes the figure from pyplot's list if it was made with pyplot (the plot
    functions of this package do not put theirs there) and releases its artists.
    """
    path = Path(path)
    for fmt in FIGURE_FORMATS:
        with atomic_path(path.with_suffix(f".{fmt}")) as tmp:
            fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight")
    pyplot = sys.modules.get("matplotlib.pyplot")  # only if the caller already uses pyplot
    if pyplot is not None:
        pyplot.close(fig)
    fig.clear()
    return Path(path)


def _render(fig: Figure, dpi: int) -> np.ndarray:
    """Rasterise a figure, trimmed to its content like ``save_figure``: (rows, cols, 3) float RGB in [0, 1]."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    fig.clear()
    buffer.seek(0)
    return matplotlib.image.imread(buffer, format="png")[..., :3]


def stack_figures(figures: Sequence[Figure], dpi: int) -> Figure:
    """One figure showing ``figures`` stacked top to bottom (rasterised at ``dpi``).

    The plot functions draw one scan per figure; a report figure shows several.
    """
    images = [_render(fig, dpi) for fig in figures]
    width = max(img.shape[1] for img in images)
    padded = [np.pad(img, ((0, 0), (0, width - img.shape[1]), (0, 0)), constant_values=1.0) for img in images]
    stacked = np.concatenate(padded, axis=0)  # (sum of rows, width, 3)
    fig = Figure(figsize=(stacked.shape[1] / dpi, stacked.shape[0] / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(stacked, interpolation="nearest")
    ax.set_axis_off()
    return fig
