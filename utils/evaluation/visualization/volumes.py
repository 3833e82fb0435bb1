"""CT volumes and what is drawn over them: axial slices, HU histograms, saliency maps with
ROI boxes, and the mapping of ROI boxes from a high-resolution copy to the input grid.

Array layout: a CT volume is (H, W, D) as everywhere in the project, in RAS+ order (index
increases towards the patient's Right, Anterior, Superior), with D the axial (slice) axis;
axial slice k is ``volume[:, :, k]`` (H, W) and is drawn in the **radiological convention**:
the patient's right on the screen's left (the x axis runs from high H to low H), anterior at
the top, with R / L / A / P markers, in a lung window (W 1500, L -600) with a colour bar for
any overlay. Saliency is an 'inferno' tint, transparent where it is low (:func:`saliency_colormap`),
so the anatomy stays readable. Voxel (h, w) is centred at data coordinates (x, y) = (h, w). Boxes are voxel
index ranges ``(h0, w0, d0, h1, w1, d1)``, half-open (``h0 <= h < h1``), as the DCG's ROI crops.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from utils.evaluation.visualization.arrays import as_numpy

HU_WINDOW = (-1000.0, 400.0)
"""The preprocessing clip range in Hounsfield units (preprocessed 0..1 maps to it)."""
LUNG_WINDOW = (-1350.0, 150.0)
"""Lung window (width 1500, level -600 HU): the display range of CT slices."""


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


def plot_ct_slices(volume, n: int = 5, title: str | None = None, window: tuple[float, float] | None = None) -> Figure:
    """``n`` evenly spaced axial slices of an (H, W, D) volume in grey.

    Args:
        volume: (H, W, D) in HU or preprocessed to [0, 1].
        n: number of slices, spread evenly between the first and last (excluded).
        window: display range (vmin, vmax); default [0, 1] for a volume within [0, 1],
            else ``HU_WINDOW``.
    """
    vol = as_numpy(volume, "volume", 3)
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
        values = as_numpy(hu, f"volumes[{name!r}]").ravel()
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


def _upsample(saliency: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Trilinear upsampling of an (h, w, d) map to ``shape`` (H, W, D) (cell centres aligned)."""
    grid = torch.from_numpy(saliency)[None, None]  # (1, 1, h, w, d)
    return F.interpolate(grid, size=shape, mode="trilinear", align_corners=False)[0, 0].numpy()  # (H, W, D)


SALIENCY_CMAP = "inferno"
"""Colour map of saliency overlays: perceptually uniform, dark to bright, and unlike the grey CT."""
SALIENCY_FLOOR = 0.3
"""Normalised saliency below which an overlay is fully transparent (the CT shows unchanged)."""
BOX_COLOUR = "#00e5ff"  # cyan: apart from the CT's greys and the overlay's purple-orange-yellow
LESION_COLOUR = "#39ff14"  # bright green


def saliency_colormap(floor: float = SALIENCY_FLOOR, alpha: float = 0.7, name: str = SALIENCY_CMAP) -> ListedColormap:
    """``name`` (default 'inferno') with an opacity ramp: fully transparent up to ``floor``, then
    linearly more opaque up to ``alpha`` at 1, so low saliency leaves the CT untouched and only
    the hot regions are tinted. Colours are those of ``name`` at the same values, so a colour
    bar of this map reads directly."""
    if not 0 <= floor < 1 or not 0 < alpha <= 1:
        raise ValueError(f"floor must lie in [0, 1) and alpha in (0, 1], got floor={floor}, alpha={alpha}")
    x = np.linspace(0.0, 1.0, 256)
    colours = matplotlib.colormaps[name](x)  # (256, 4) RGBA
    colours[:, 3] = alpha * np.clip((x - floor) / (1.0 - floor), 0.0, 1.0)
    return ListedColormap(colours, name=f"{name}_from_{floor:g}")


def _check_boxes(roi_boxes, shape: tuple[int, int, int]) -> np.ndarray:
    """(K, 6) int boxes inside ``shape`` (module docstring), or a clear ValueError."""
    if roi_boxes is None:
        return np.zeros((0, 6), dtype=int)
    raw = as_numpy(roi_boxes, "roi_boxes", 2)
    if raw.shape[1] != 6 or not np.all(raw == np.round(raw)):
        raise ValueError(f"roi_boxes must be integer (K, 6) boxes (h0, w0, d0, h1, w1, d1), got shape {raw.shape}")
    boxes = raw.astype(int)
    lo, hi = boxes[:, :3], boxes[:, 3:]
    if (lo < 0).any() or (hi > np.array(shape)).any() or (hi <= lo).any():
        raise ValueError(f"roi_boxes must satisfy 0 <= start < end <= (H, W, D) = {shape}")
    return boxes


def largest_section(mask: np.ndarray | None) -> int | None:
    """The axial slice where an (H, W, D) mask has the most voxels; None for no mask or an empty one."""
    if mask is None or not mask.any():
        return None
    return int(mask.sum(axis=(0, 1)).argmax())


def _draw_boxes(ax, boxes: np.ndarray, k: int) -> None:
    """Box j crossing slice k as a rectangle labelled ``j`` inside its top-left corner (as seen)."""
    for j, (h0, w0, d0, h1, w1, d1) in enumerate(boxes):
        if d0 <= k < d1:
            ax.add_patch(Rectangle((h0 - 0.5, w0 - 0.5), h1 - h0, w1 - w0, fill=False, lw=1.5, edgecolor=BOX_COLOUR))
            # the x axis runs from high to low H, so the box's screen-left edge is h1 - 0.5
            ax.text(h1 - 0.5, w1 - 0.5, f" {j}", color=BOX_COLOUR, fontsize="x-small", ha="left", va="top",
                    weight="bold", clip_on=True)


def plot_saliency_overlay(volume, saliency, roi_boxes=None, slices: Sequence[int] | None = None,
                          max_slices: int = 5, alpha: float = 0.7, title: str | None = None,
                          window: tuple[float, float] | None = None, lesion_mask=None,
                          floor: float = SALIENCY_FLOOR) -> Figure:
    """A saliency (class activation) map, ROI boxes and a lesion outline over axial CT slices.

    The CT is grey in the lung window; the saliency is an 'inferno' tint that is fully
    transparent below ``floor`` and grows to opacity ``alpha`` at the map's maximum
    (:func:`saliency_colormap`), with a colour bar; ROI boxes are cyan, numbered inside their
    top-left corner; the lesion outline (when known) is a green contour. Nothing is drawn
    outside the image.

    Args:
        volume: (H, W, D) CT volume (HU or [0, 1]).
        saliency: (h, w, d) map on a coarser grid (e.g. the DCG's (8, 8, 4)), or the volume's
            own; it is upsampled trilinearly to (H, W, D) and min-max normalised for display.
        roi_boxes: optional (K, 6) integer voxel boxes ``(h0, w0, d0, h1, w1, d1)``,
            half-open, inside the volume. Box j is drawn (labelled ``j``) on every shown
            slice k with ``d0 <= k < d1``.
        slices: axial indices to show; default the slice of the lesion's largest cross-section
            (when ``lesion_mask`` has one) and the centre slice of each box, or without boxes
            the slices with the largest saliency, at most ``max_slices``, in order.
        alpha: opacity of the overlay at the highest saliency.
        window: display range of the volume, as in :func:`plot_ct_slices`.
        lesion_mask: optional (H, W, D) boolean mask of the lesions (e.g. a phantom's ground
            truth), outlined on every shown slice it crosses.
        floor: normalised saliency up to which the overlay is transparent.
    """
    vol = as_numpy(volume, "volume", 3)
    sal = as_numpy(saliency, "saliency", 3)
    H, W, D = vol.shape
    if any(s > v for s, v in zip(sal.shape, vol.shape)):
        raise ValueError(f"saliency {sal.shape} must not be larger than the volume {vol.shape}")
    cmap = saliency_colormap(floor, alpha)
    sal = _upsample(sal, (H, W, D))  # (H, W, D)
    span = sal.max() - sal.min()
    sal = (sal - sal.min()) / span if span > 0 else np.zeros_like(sal)
    boxes = _check_boxes(roi_boxes, (H, W, D))
    lesion = None
    if lesion_mask is not None:
        lesion = as_numpy(lesion_mask, "lesion_mask", 3) > 0.5
        if lesion.shape != vol.shape:
            raise ValueError(f"lesion_mask {lesion.shape} must have the volume's shape {vol.shape}")
    if slices is None:
        first = largest_section(lesion)
        if len(boxes) or first is not None:
            centres = ((boxes[:, 2] + boxes[:, 5] - 1) // 2).tolist()
            slices = sorted(list(dict.fromkeys(([] if first is None else [first]) + centres))[:max_slices])
        else:
            slices = sorted(np.argsort(sal.sum(axis=(0, 1)))[::-1][:max_slices].tolist())
    slices = [int(k) for k in slices]
    if not slices or any(not 0 <= k < D for k in slices):
        raise ValueError(f"slices must be a non-empty list of axial indices in [0, {D}), got {slices}")
    window = window or _auto_window(vol)
    fig = Figure(figsize=(3 * len(slices) + 0.8, 3.6 if len(boxes) or lesion is not None else 3.3),
                 layout="constrained")
    axes = fig.subplots(1, len(slices), squeeze=False)[0]
    for ax, k in zip(axes, slices):
        _show_axial(ax, vol, k, window)
        overlay = ax.imshow(sal[:, :, k].T, origin="lower", cmap=cmap, vmin=0, vmax=1, interpolation="bilinear")
        if lesion is not None and lesion[:, :, k].any():
            ax.contour(lesion[:, :, k].T.astype(float), levels=[0.5], colors=LESION_COLOUR, linewidths=1.2)
        _draw_boxes(ax, boxes, k)
        ax.set_xlim(H - 0.5, -0.5)  # the image's extent, radiological (high H on the left)
        ax.set_ylim(-0.5, W - 0.5)
        ax.set_title(f"axial slice {k}/{D}", fontsize="small")
    bar = fig.colorbar(overlay, ax=list(axes), shrink=0.8,
                       label=f"saliency (min-max per scan;\ntransparent below {floor:g})")
    bar.ax.set_facecolor("0.45")  # the transparent end shows as grey, as the CT does beneath it
    handles = []
    if len(boxes):
        handles.append(Line2D([], [], color=BOX_COLOUR, lw=1.5, label="ROI box j (the DCG's crop)"))
    if lesion is not None:
        known = "lesion outline (ground truth)" if lesion.any() else "lesion outline (ground truth: none in this scan)"
        handles.append(Line2D([], [], color=LESION_COLOUR, lw=1.2, label=known))
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize="small", frameon=False)
    if title:
        fig.suptitle(title)
    return fig


def boxes_in_input(boxes, roi_scale: int):
    """ROI boxes of a high-resolution copy mapped to the input's voxel grid.

    The DCG crops its ROIs from a copy at ``roi_scale`` s times the input's in-plane
    resolution (H and W, not the depth D), so a box ``(h0, w0, d0, h1, w1, d1)`` (half-open,
    as in the module docstring) of that copy covers input voxels ``h0 / s .. h1 / s`` along H
    (likewise W). The start corners are floor-divided and the end corners ceil-divided, so the
    drawn box always covers the whole crop (and is never empty); d0 and d1 are unchanged.
    E.g. s = 2: ``(1, 3, 0, 5, 7, 4)`` -> ``(0, 1, 0, 3, 4, 4)``.

    Args:
        boxes: (..., 6) integer boxes, e.g. (K, 6) of one scan or (B, K, 6): a numpy array
            or a torch tensor (on any device).
        roi_scale: the in-plane factor s >= 1 (``DCGConfig.roi_scale``).

    Returns:
        new boxes of the same type, dtype, device and shape (the input is not changed).
    """
    if isinstance(roi_scale, bool) or not isinstance(roi_scale, (int, np.integer)) or roi_scale < 1:
        raise ValueError(f"roi_scale must be an integer >= 1, got {roi_scale!r}")
    if boxes.shape[-1] != 6:
        raise ValueError(f"boxes must have shape (..., 6) (h0, w0, d0, h1, w1, d1), got {tuple(boxes.shape)}")
    out = boxes.clone() if isinstance(boxes, torch.Tensor) else np.array(boxes, copy=True)
    out[..., [0, 1]] = boxes[..., [0, 1]] // roi_scale  # start: floor
    out[..., [3, 4]] = -(-boxes[..., [3, 4]] // roi_scale)  # end: ceil, so the box covers the crop
    return out
