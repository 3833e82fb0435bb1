"""Confusion matrices as seaborn heatmaps: one model, or every model side by side.

A (C, C) matrix has rows = true class and columns = predicted class; cells show the count and
its share of the row (the true class), and colours follow that share.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import seaborn as sns
from matplotlib.figure import Figure

from utils.evaluation.visualization.arrays import as_numpy


def plot_confusion_matrix(cm, class_names: Sequence[str], title: str = "Confusion matrix") -> Figure:
    """Seaborn heatmap of a (C, C) confusion matrix (rows = true class, columns = predicted).

    Each cell shows its count and its share of the row (the true class), e.g. ``"17\\n85.0%"``;
    colours follow the row share so classes of different sizes compare.
    """
    counts = as_numpy(cm, "cm", 2)
    n = len(class_names)
    if counts.shape != (n, n):
        raise ValueError(f"cm must have shape (C, C) = ({n}, {n}) for {n} class names, got {counts.shape}")
    if counts.min() < 0 or not np.all(counts == np.round(counts)):
        raise ValueError("cm must hold non-negative integer counts")
    row_total = counts.sum(axis=1, keepdims=True)  # (C, 1)
    share = np.divide(counts, row_total, out=np.zeros_like(counts), where=row_total > 0)  # (C, C)
    labels = np.array([[f"{int(c)}\n{100 * s:.1f}%" for c, s in zip(crow, srow)] for crow, srow in zip(counts, share)])
    fig = Figure(figsize=(1.2 * n + 2.5, 1.1 * n + 1.5), layout="constrained")
    ax = fig.add_subplot()
    sns.heatmap(share, annot=labels, fmt="", cmap="Blues", vmin=0, vmax=1, square=True, ax=ax,
                xticklabels=class_names, yticklabels=class_names, cbar_kws={"label": "share of true class"})
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    ax.set_title(title)
    return fig


def plot_confusion_matrices(matrices: Mapping[str, object], class_names: Sequence[str],
                            title: str = "Confusion matrices") -> Figure:
    """One confusion-matrix panel per model (rows = true class, counts and row shares), side by side."""
    if not matrices:
        raise ValueError("matrices is empty: pass at least one model")
    n = len(class_names)
    fig = Figure(figsize=((1.1 * n + 1.6) * len(matrices), 1.1 * n + 1.8), layout="constrained")
    for ax, (name, cm) in zip(fig.subplots(1, len(matrices), squeeze=False)[0], matrices.items()):
        counts = as_numpy(cm, f"{name}: cm", 2)
        if counts.shape != (n, n):
            raise ValueError(f"{name}: cm must have shape ({n}, {n}), got {counts.shape}")
        totals = counts.sum(axis=1, keepdims=True)
        share = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
        labels = np.array([[f"{int(c)}\n{100 * s:.0f}%" for c, s in zip(cr, sr)] for cr, sr in zip(counts, share)])
        sns.heatmap(share, annot=labels, fmt="", cmap="Blues", vmin=0, vmax=1, square=True, ax=ax, cbar=False,
                    xticklabels=class_names, yticklabels=class_names)
        ax.set(xlabel="Predicted", ylabel="True", title=name)
    fig.suptitle(title)
    return fig
