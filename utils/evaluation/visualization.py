"""Figures for the evaluation report: pure functions from arrays to a matplotlib Figure.

Nothing here reads files or touches pyplot's global figure list: figures are built with the
object-oriented API (``matplotlib.figure.Figure``), so they need no display (they render with
Agg), do not pile up in long loops, and show in Jupyter with ``display(fig)`` or as a cell's
last expression. :func:`save_figure` writes one as PNG atomically.

Array layout: a CT volume is (H, W, D) as everywhere in the project, in RAS+ order (index
increases towards the patient's Right, Anterior, Superior), with D the axial (slice) axis;
axial slice k is ``volume[:, :, k]`` (H, W) and is drawn in the **radiological convention**:
the patient's right on the screen's left (the x axis runs from high H to low H), anterior at
the top, with R / L / A / P markers, in a lung window (W 1500, L -600) with a colour bar for
any overlay. Voxel (h, w) is centred at data coordinates (x, y) = (h, w). Boxes are voxel index ranges ``(h0, w0, d0, h1, w1, d1)``,
half-open (``h0 <= h < h1``), as the DCG's ROI crops.

Arrays may be numpy arrays or torch tensors (on any device; they are copied to the CPU).
"""
from __future__ import annotations

import io
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.image
import numpy as np
import seaborn as sns
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from sklearn.metrics import roc_auc_score, roc_curve

from utils.atomic import atomic_path
from utils.evaluation.metrics import quantile_reliability

HU_WINDOW = (-1000.0, 400.0)
"""The preprocessing clip range in Hounsfield units (preprocessed 0..1 maps to it)."""
LUNG_WINDOW = (-1350.0, 150.0)
"""Lung window (width 1500, level -600 HU): the display range of CT slices."""
FIGURE_FORMATS = ("png", "pdf")


def _as_numpy(x, name: str, ndim: int | tuple[int, ...] | None = None) -> np.ndarray:
    """``x`` as a float64 numpy array, with a clear ValueError when its rank is wrong."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    allowed = (ndim,) if isinstance(ndim, int) else ndim
    if allowed is not None and arr.ndim not in allowed:
        raise ValueError(f"{name} must have {' or '.join(f'{n}' for n in allowed)} dimensions, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _auto_window(volume: np.ndarray) -> tuple[float, float]:
    """The lung window, in HU or on the preprocessed 0..1 scale (0 = -1000 HU, 1 = 400 HU)."""
    if volume.min() >= -1e-6 and volume.max() <= 1 + 1e-6:
        lo, hi = HU_WINDOW
        return tuple(max(0.0, (w - lo) / (hi - lo)) for w in LUNG_WINDOW)
    return LUNG_WINDOW


def _show_axial(ax, volume: np.ndarray, k: int, window: tuple[float, float]) -> None:
    """Draw axial slice k of an (H, W, D) RAS volume radiologically (module docstring)."""
    ax.imshow(volume[:, :, k].T, origin="lower", cmap="gray", vmin=window[0], vmax=window[1], interpolation="nearest")
    ax.invert_xaxis()  # patient's right (high H) on the screen's left
    ax.set_xticks([])
    ax.set_yticks([])
    for text, x, y, ha, va in (("R", 0.02, 0.5, "left", "center"), ("L", 0.98, 0.5, "right", "center"),
                               ("A", 0.5, 0.98, "center", "top"), ("P", 0.5, 0.02, "center", "bottom")):
        ax.text(x, y, text, transform=ax.transAxes, ha=ha, va=va, color="yellow", fontsize="small", weight="bold")


def save_figure(fig: Figure, path: str | Path, dpi: int = 150) -> Path:
    """Write ``fig`` as PNG at ``path`` and as PDF beside it (vector, for papers), each
    atomically (temp file + rename), and close it; returns the PNG's path.

    Closing removes the figure from pyplot's list if it was made with pyplot (figures from
    this module are not in it) and releases its artists.
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


def plot_confusion_matrix(cm, class_names: Sequence[str], title: str = "Confusion matrix") -> Figure:
    """Seaborn heatmap of a (C, C) confusion matrix (rows = true class, columns = predicted).

    Each cell shows its count and its share of the row (the true class), e.g. ``"17\\n85.0%"``;
    colours follow the row share so classes of different sizes compare.
    """
    counts = _as_numpy(cm, "cm", 2)
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


def _roc_band(y: np.ndarray, p: np.ndarray, grid: np.ndarray, n_resamples: int, seed: int
              ) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Stratified bootstrap of a ROC curve: 2.5/97.5 percentiles of the TPR at each FPR of
    ``grid`` and the 95% interval of the AUC."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    tprs, aucs = [], []
    for _ in range(n_resamples):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        fpr, tpr, _ = roc_curve(y[idx], p[idx])
        tprs.append(np.interp(grid, fpr, tpr))
        aucs.append(roc_auc_score(y[idx], p[idx]))
    low, high = np.percentile(tprs, [2.5, 97.5], axis=0)
    return low, high, tuple(float(v) for v in np.percentile(aucs, [2.5, 97.5]))


def plot_roc_curves(curves: Mapping[str, tuple], title: str = "ROC curves", positive_label: str | None = None,
                    n_resamples: int = 300, seed: int = 0) -> Figure:
    """All models' ROC curves on one axes with 95% stratified-bootstrap bands, each labelled
    with its ROC-AUC and that AUC's interval, plus the chance line. Curves get distinct line
    styles so overlapping ones stay visible.

    Args:
        curves: model name -> ``(y_true (N,), probs_pos (N,))`` with ``y_true`` 1 for the
            positive class and 0 otherwise, and ``probs_pos`` the predicted probability of
            the positive class (for C > 2 pass one class against the rest).
        positive_label: name of the positive class, shown on the axes.
        n_resamples, seed: the bootstrap of the bands (the same resamples for every model).
    """
    if not curves:
        raise ValueError("curves is empty: pass at least one model")
    fig = Figure(figsize=(6, 5.5), layout="constrained")
    ax = fig.add_subplot()
    grid = np.linspace(0, 1, 101)
    styles = ["-", "--", "-.", ":"]
    for i, (name, (y_true, probs_pos)) in enumerate(curves.items()):
        y = _as_numpy(y_true, f"{name}: y_true", 1)
        p = _as_numpy(probs_pos, f"{name}: probs_pos", 1)
        if y.shape != p.shape:
            raise ValueError(f"{name}: y_true {y.shape} and probs_pos {p.shape} must have the same shape (N,)")
        if not np.isin(y, (0, 1)).all() or y.min() == y.max():
            raise ValueError(f"{name}: y_true must be 0/1 with both classes present for a ROC curve")
        fpr, tpr, _ = roc_curve(y, p)
        low, high, (auc_lo, auc_hi) = _roc_band(y, p, grid, n_resamples, seed)
        (line,) = ax.plot(fpr, tpr, lw=2, ls=styles[i % len(styles)], drawstyle="steps-post",
                          label=f"{name}: AUC {roc_auc_score(y, p):.3f} [{auc_lo:.3f}, {auc_hi:.3f}]")
        ax.fill_between(grid, low, high, color=line.get_color(), alpha=0.12, step="post")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    positive = f" ({positive_label} positive)" if positive_label else ""
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="False positive rate (1 - specificity)",
           ylabel=f"True positive rate (sensitivity){positive}", title=title)
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize="x-small", title="AUC [95% bootstrap CI]", title_fontsize="x-small")
    return fig


def plot_confusion_matrices(matrices: Mapping[str, object], class_names: Sequence[str],
                            title: str = "Confusion matrices") -> Figure:
    """One confusion-matrix panel per model (rows = true class, counts and row shares), side by side."""
    if not matrices:
        raise ValueError("matrices is empty: pass at least one model")
    n = len(class_names)
    fig = Figure(figsize=((1.1 * n + 1.6) * len(matrices), 1.1 * n + 1.8), layout="constrained")
    for ax, (name, cm) in zip(fig.subplots(1, len(matrices), squeeze=False)[0], matrices.items()):
        counts = _as_numpy(cm, f"{name}: cm", 2)
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


def plot_learning_curves(history: Mapping[str, Mapping[str, Sequence[float]]],
                         selected_epochs: Mapping[str, int] | None = None) -> Figure:
    """Per-epoch training curves of one or more phases, one column per phase.

    Args:
        history: phase name (e.g. ``"phase 1: DCG"``) -> series name -> one value per epoch.
            Series whose name contains ``"loss"`` go in the top row, the others (validation
            metrics such as ``val_auc``) in the bottom row; a phase without metrics leaves
            its bottom axes empty and hidden.
        selected_epochs: optional phase name -> the epoch (1-based) chosen by early stopping,
            drawn as a dotted vertical line.

    Returns:
        a Figure with 2 x (number of phases) axes.
    """
    if not history:
        raise ValueError("history is empty: pass at least one phase")
    selected_epochs = selected_epochs or {}
    fig = Figure(figsize=(5 * len(history), 6.5), layout="constrained")
    axes = fig.subplots(2, len(history), squeeze=False, sharex="col")
    for col, (phase, series) in enumerate(history.items()):
        if not series:
            raise ValueError(f"history[{phase!r}] holds no series")
        loss_ax, metric_ax = axes[0, col], axes[1, col]
        for name, values in series.items():
            values = _as_numpy(values, f"history[{phase!r}][{name!r}]", 1)
            if values.size == 0:
                raise ValueError(f"history[{phase!r}][{name!r}] is empty")
            target = loss_ax if "loss" in name else metric_ax
            target.plot(np.arange(1, values.size + 1), values, marker="o", ms=3, label=name)
        for ax, ylabel in ((loss_ax, "loss"), (metric_ax, "validation metric")):
            if phase in selected_epochs:
                ax.axvline(selected_epochs[phase], ls=":", color="black", lw=1, label="selected epoch")
            ax.set_ylabel(ylabel)
            if ax.lines:
                ax.legend(fontsize="small")
        loss_ax.set_title(phase)
        metric_ax.set_xlabel("epoch")
        if not any("loss" not in name for name in series):
            metric_ax.set_visible(False)
    return fig


def plot_reliability_diagram(y_true, probs, n_bins: int = 10, title: str = "Reliability diagram") -> Figure:
    """Top-label reliability diagram (Guo et al. 2017) on quantile bins, with the count of
    predictions in every bin and the ECE of those bins in the title.

    Args:
        y_true: (N,) integer labels; probs: (N, C) class probabilities.

    One bar per bin spanning its confidence range, its height the accuracy in the bin and its
    label ``n = count``; the bin's mean confidence as a point; the diagonal of perfect
    calibration. With 20 test scans that is 4 bins of 5, not 2 nearly empty fixed-width bins.
    """
    curve = quantile_reliability(y_true, probs, n_bins)
    fig = Figure(figsize=(5.5, 5), layout="constrained")
    ax = fig.add_subplot()
    width = np.maximum(curve["high"] - curve["low"], 0.01)
    bars = ax.bar(curve["low"], curve["accuracy"], width=width, align="edge", edgecolor="black", alpha=0.6,
                  label="accuracy in bin")
    ax.bar_label(bars, labels=[f"n = {c}" for c in curve["count"]], fontsize="x-small", padding=2)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", label="perfect calibration")
    ax.plot(curve["confidence"], curve["accuracy"], "o", color="crimson", ms=4, label="mean confidence")
    ax.set(xlim=(0, 1), ylim=(0, 1.08), xlabel="confidence (top-class probability)", ylabel="accuracy",
           title=f"{title}\nECE = {curve['ece']:.3f} over {len(curve['count'])} quantile bins, "
                 f"N = {int(curve['count'].sum())}")
    ax.legend(loc="upper left", fontsize="small")
    return fig


def plot_ct_slices(volume, n: int = 5, title: str | None = None, window: tuple[float, float] | None = None) -> Figure:
    """``n`` evenly spaced axial slices of an (H, W, D) volume in grey.

    Args:
        volume: (H, W, D) in HU or preprocessed to [0, 1].
        n: number of slices, spread evenly between the first and last (excluded).
        window: display range (vmin, vmax); default [0, 1] for a volume within [0, 1],
            else ``HU_WINDOW``.
    """
    vol = _as_numpy(volume, "volume", 3)
    depth = vol.shape[2]
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= depth:
        raise ValueError(f"n must be an integer in [1, D = {depth}], got {n!r}")
    window = window or _auto_window(vol)
    slices = np.linspace(0, depth - 1, n + 2)[1:-1].round().astype(int)
    fig = Figure(figsize=(2.6 * n, 3), layout="constrained")
    for ax, k in zip(fig.subplots(1, n, squeeze=False)[0], slices):
        _show_axial(ax, vol, int(k), window)
        ax.set_title(f"slice {k}/{depth}", fontsize="small")
    if title:
        fig.suptitle(title)
    return fig


def _upsample(saliency: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Trilinear upsampling of an (h, w, d) map to ``shape`` (H, W, D) (cell centres aligned)."""
    grid = torch.from_numpy(saliency)[None, None]  # (1, 1, h, w, d)
    return F.interpolate(grid, size=shape, mode="trilinear", align_corners=False)[0, 0].numpy()  # (H, W, D)


def plot_saliency_overlay(volume, saliency, roi_boxes=None, slices: Sequence[int] | None = None,
                          max_slices: int = 5, alpha: float = 0.45, title: str | None = None,
                          window: tuple[float, float] | None = None) -> Figure:
    """A saliency (class activation) map and ROI boxes over axial CT slices.

    Args:
        volume: (H, W, D) CT volume (HU or [0, 1]).
        saliency: (h, w, d) map on a coarser grid (e.g. the DCG's (8, 8, 4)); it is
            upsampled trilinearly to (H, W, D) and min-max normalised for display.
        roi_boxes: optional (K, 6) integer voxel boxes ``(h0, w0, d0, h1, w1, d1)``,
            half-open, inside the volume. Box j is drawn (labelled ``j``) on every shown
            slice k with ``d0 <= k < d1``.
        slices: axial indices to show; default the centre slice of each box, or without
            boxes the slices with the largest saliency, at most ``max_slices``, in order.
        alpha: opacity of the saliency overlay.
        window: display range of the volume, as in :func:`plot_ct_slices`.
    """
    vol = _as_numpy(volume, "volume", 3)
    sal = _as_numpy(saliency, "saliency", 3)
    H, W, D = vol.shape
    if any(s > v for s, v in zip(sal.shape, vol.shape)):
        raise ValueError(f"saliency {sal.shape} must not be larger than the volume {vol.shape}")
    sal = _upsample(sal, (H, W, D))  # (H, W, D)
    span = sal.max() - sal.min()
    sal = (sal - sal.min()) / span if span > 0 else np.zeros_like(sal)
    boxes = np.zeros((0, 6), dtype=int)
    if roi_boxes is not None:
        raw = _as_numpy(roi_boxes, "roi_boxes", 2)
        if raw.shape[1] != 6 or not np.all(raw == np.round(raw)):
            raise ValueError(f"roi_boxes must be integer (K, 6) boxes (h0, w0, d0, h1, w1, d1), got shape {raw.shape}")
        boxes = raw.astype(int)
        lo, hi = boxes[:, :3], boxes[:, 3:]
        if (lo < 0).any() or (hi > np.array([H, W, D])).any() or (hi <= lo).any():
            raise ValueError(f"roi_boxes must satisfy 0 <= start < end <= (H, W, D) = {(H, W, D)}")
    if slices is None:
        if len(boxes):
            centres = (boxes[:, 2] + boxes[:, 5] - 1) // 2
            slices = sorted(dict.fromkeys(centres.tolist()))[:max_slices]
        else:
            slices = sorted(np.argsort(sal.sum(axis=(0, 1)))[::-1][:max_slices].tolist())
    slices = [int(k) for k in slices]
    if not slices or any(not 0 <= k < D for k in slices):
        raise ValueError(f"slices must be a non-empty list of axial indices in [0, {D}), got {slices}")
    window = window or _auto_window(vol)
    colours = sns.color_palette("tab10", max(len(boxes), 1))
    fig = Figure(figsize=(3 * len(slices) + 0.8, 3.3), layout="constrained")
    axes = fig.subplots(1, len(slices), squeeze=False)[0]
    for ax, k in zip(axes, slices):
        _show_axial(ax, vol, k, window)
        overlay = ax.imshow(sal[:, :, k].T, origin="lower", cmap="jet", vmin=0, vmax=1, alpha=alpha,
                            interpolation="bilinear")
        for j, (h0, w0, d0, h1, w1, d1) in enumerate(boxes):
            if d0 <= k < d1:
                ax.add_patch(Rectangle((h0 - 0.5, w0 - 0.5), h1 - h0, w1 - w0,
                                       fill=False, lw=1.5, edgecolor=colours[j]))
                ax.text(h0, w1 - 0.5, str(j), color=colours[j], fontsize="small", va="bottom")
        ax.set_title(f"slice {k}/{D}", fontsize="small")
    fig.colorbar(overlay, ax=list(axes), shrink=0.8, label="saliency (min-max normalised)")
    if title:
        fig.suptitle(title)
    return fig


def plot_denoising_trajectory(probs_per_step, timesteps: Sequence[int], class_names: Sequence[str],
                              title: str = "Denoising trajectory", prior=None) -> Figure:
    """Class probabilities along the reverse diffusion chain, one line per class.

    Args:
        probs_per_step: (S + 1, C) probabilities after each of S sampling steps, the first
            row at the start ``y_T``; or (S + 1, B, C) for B samples (several stochastic
            samples of one scan, or several scans), drawn as the mean over B with a band of
            +- one standard deviation.
        timesteps: (S + 1,) the timestep of each row (e.g. 500, 450, ..., 0); the x axis
            runs from the first to the last, so denoising reads left to right.
        class_names: (C,) names.
        prior: optional (C,) class probabilities of the DCG prior (the DCG alone), drawn as a
            dashed line per class: where the chain starts from and what diffusion changes.
    """
    probs = _as_numpy(probs_per_step, "probs_per_step", (2, 3))
    prior = None if prior is None else _as_numpy(prior, "prior", 1)
    if prior is not None and prior.shape != (len(class_names),):
        raise ValueError(f"prior must have shape ({len(class_names)},), got {prior.shape}")
    steps = _as_numpy(timesteps, "timesteps", 1)
    if probs.ndim == 2:
        probs = probs[:, None, :]  # (S + 1, 1, C)
    if probs.shape[0] != steps.shape[0]:
        raise ValueError(f"probs_per_step has {probs.shape[0]} steps but timesteps has {steps.shape[0]}")
    if probs.shape[2] != len(class_names):
        raise ValueError(f"probs_per_step has C = {probs.shape[2]} classes but {len(class_names)} class names")
    mean, std = probs.mean(axis=1), probs.std(axis=1)  # (S + 1, C)
    fig = Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.add_subplot()
    for c, name in enumerate(class_names):
        (line,) = ax.plot(steps, mean[:, c], marker="o", ms=3, label=name)
        if probs.shape[1] > 1:
            ax.fill_between(steps, mean[:, c] - std[:, c], mean[:, c] + std[:, c], color=line.get_color(), alpha=0.2)
        if prior is not None:
            ax.axhline(prior[c], ls="--", lw=1.2, color=line.get_color(), label=f"{name}: DCG prior")
    if steps[0] > steps[-1]:
        ax.invert_xaxis()
    ax.set(xlabel="timestep t", ylabel="class probability", ylim=(0, 1), title=title)
    ax.legend(fontsize="small")
    return fig


def plot_hu_histograms(volumes: Mapping[str, object], bins: int = 120, hu_range: tuple[float, float] = (-1200.0, 600.0),
                       window: tuple[float, float] | None = HU_WINDOW, title: str = "HU distribution") -> Figure:
    """Normalised HU histograms of several volumes or groups of voxels, one step line each.

    Args:
        volumes: name -> array of HU values (any shape; flattened).
        bins, hu_range: histogram bins over ``hu_range``; values outside are not counted and
            their share is given in the legend.
        window: the preprocessing clip window, shaded; None for none.
    """
    if not volumes:
        raise ValueError("volumes is empty: pass at least one array")
    edges = np.linspace(hu_range[0], hu_range[1], bins + 1)
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    for name, hu in volumes.items():
        values = _as_numpy(hu, f"volumes[{name!r}]").ravel()
        if values.size == 0:
            raise ValueError(f"volumes[{name!r}] is empty")
        density, _ = np.histogram(values, bins=edges, density=False)
        outside = 1 - density.sum() / values.size
        ax.stairs(density / values.size, edges, lw=1.5, label=f"{name} ({100 * outside:.1f}% outside range)")
    if window is not None:
        ax.axvspan(*window, color="grey", alpha=0.12, label=f"clip window [{window[0]:g}, {window[1]:g}]")
    ax.set(xlabel="HU", ylabel="share of voxels per bin", xlim=hu_range, title=title)
    ax.legend(fontsize="small")
    return fig


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
    grid = _as_numpy(guidance_map, "guidance_map", 4)
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
    feats = _as_numpy(feature_prior, "feature_prior", 2)
    weights = _as_numpy(gates, "gates", (2, 3))
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


def plot_uncertainty(probs, std, y_true, class_names: Sequence[str], positive_class: int = 1,
                     title: str = "Per-scan prediction and uncertainty") -> Figure:
    """Each test scan's probability of ``positive_class`` against its sampling spread.

    Args:
        probs: (N,) predicted probability of ``positive_class`` per scan.
        std: (N,) its standard deviation over the diffusion samples (the uncertainty).
        y_true: (N,) true labels; marker colour = true class, hollow markers = misclassified.
    """
    p = _as_numpy(probs, "probs", 1)
    s = _as_numpy(std, "std", 1)
    y = _as_numpy(y_true, "y_true", 1).astype(int)
    if not len(p) == len(s) == len(y):
        raise ValueError(f"probs, std and y_true must have the same length, got {len(p)}, {len(s)}, {len(y)}")
    fig = Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.add_subplot()
    colours = sns.color_palette("tab10", len(class_names))
    predicted = (p >= 0.5).astype(int) * positive_class
    for c, name in enumerate(class_names):
        for wrong in (False, True):
            sel = (y == c) & ((predicted != y) == wrong)
            if sel.any():
                ax.scatter(p[sel], s[sel], s=40, label=f"{name}{' (misclassified)' if wrong else ''}",
                           facecolors="none" if wrong else colours[c], edgecolors=colours[c], linewidths=1.5)
    ax.axvline(0.5, color="grey", ls=":")
    ax.set(xlabel=f"p({class_names[positive_class]})", ylabel="std over samples", xlim=(-0.02, 1.02), title=title)
    ax.legend(fontsize="small")
    return fig


def _render(fig: Figure, dpi: int) -> np.ndarray:
    """Rasterise a figure, trimmed to its content like ``save_figure``: (rows, cols, 3) float RGB in [0, 1]."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    fig.clear()
    buffer.seek(0)
    return matplotlib.image.imread(buffer, format="png")[..., :3]


def stack_figures(figures: Sequence[Figure], dpi: int) -> Figure:
    """One figure showing ``figures`` stacked top to bottom (rasterised at ``dpi``).

    ``utils.evaluation.visualization`` draws one scan per figure; a report figure shows several.
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
