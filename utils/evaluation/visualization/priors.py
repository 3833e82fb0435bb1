"""The DCG's priors of one or a few scans: the dense guidance map (a class's probability on the
Np x Np x Np grid) and the image feature prior with the gates that mixed it.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import seaborn as sns
from matplotlib.figure import Figure

from utils.evaluation.visualization.arrays import as_numpy


def plot_guidance_map(guidance_map, class_index: int, class_names: Sequence[str],
                      title: str = "Dense guidance map") -> Figure:
    """One class's probability at every point of the Np x Np x Np guidance grid, slice by slice.

    Args:
        guidance_map: (C, Np, Np, Np) probabilities of one scan (``Priors.guidance_map[b]``):
            the global prior at the grid centre blending into the local prior at the corners.
        class_index: the class whose probability is drawn.
        class_names: (C,) names.
    Returns:
        A figure with one heatmap per grid slice k (i down, j across), on a shared [0, 1] scale.
    """
    grid = as_numpy(guidance_map, "guidance_map", 4)
    if grid.shape[0] != len(class_names) or not 0 <= class_index < grid.shape[0]:
        raise ValueError(f"guidance_map has C = {grid.shape[0]} classes; got {len(class_names)} names and "
                         f"class_index {class_index}")
    values = grid[class_index]  # (Np, Np, Np)
    n = values.shape[2]
    fig = Figure(figsize=(1.9 * n + 1, 2.4), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    for k, ax in enumerate(axes):
        image = ax.imshow(values[:, :, k], cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"k = {k}", fontsize="small")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(image, ax=axes.tolist(), shrink=0.8, label=f"p({class_names[class_index]})")
    fig.suptitle(title)
    return fig


def plot_feature_prior(feature_prior, gates, source_names: Sequence[str] | None = None,
                       title: str = "Image feature prior") -> Figure:
    """The feature prior F of a few scans and the gates that mixed it from its sources.

    Args:
        feature_prior: (B, F) the prior of B scans (``Priors.feature_prior``).
        gates: (K + 1, F) or (B, K + 1, F) softmax weights of the sources per channel (global
            features, then the K ROIs); with a batch, its mean is drawn.
        source_names: (K + 1,) names; default ``global, ROI 1 .. ROI K``.
    """
    feats = as_numpy(feature_prior, "feature_prior", 2)
    weights = as_numpy(gates, "gates", (2, 3))
    if weights.ndim == 3:
        weights = weights.mean(axis=0)
    if weights.shape[1] != feats.shape[1]:
        raise ValueError(f"gates have {weights.shape[1]} channels but feature_prior has {feats.shape[1]}")
    names = list(source_names or ["global"] + [f"ROI {j + 1}" for j in range(weights.shape[0] - 1)])
    if len(names) != weights.shape[0]:
        raise ValueError(f"{len(names)} source names for {weights.shape[0]} gate rows")
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=(3, 2))
    image = left.imshow(feats, aspect="auto", cmap="coolwarm", interpolation="nearest",
                        vmin=-np.abs(feats).max(), vmax=np.abs(feats).max())
    left.set(xlabel="channel", ylabel="scan", title="F per scan")
    left.set_yticks(range(len(feats)))
    fig.colorbar(image, ax=left, shrink=0.8)
    share = weights.mean(axis=1)  # (K + 1,) mean gate per source
    right.bar(names, share, color=sns.color_palette("tab10", len(names)))
    right.axhline(1 / len(names), color="grey", ls=":", label="uniform")
    right.set(ylabel="mean gate over channels", title="Sources of F", ylim=(0, max(1.0, share.max())))
    right.legend(fontsize="small")
    fig.suptitle(title)
    return fig
