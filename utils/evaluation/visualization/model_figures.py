"""The report figures of a few scans through the trained model: the DCG's saliency maps with
its ROI boxes (and the lesion outline where known), and the denoising trajectory of the class
probabilities.

Both take plain arrays (the model is run by ``utils.evaluation.evaluate.write_model_figures``)
and draw one row per scan, stacked into one figure (:func:`stack_figures`); each row is titled
with the scan's file name and, when given, its true label.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from utils.evaluation.visualization.curves import plot_denoising_trajectory
from utils.evaluation.visualization.figure_io import stack_figures
from utils.evaluation.visualization.volumes import boxes_in_input, largest_section, plot_saliency_overlay


def slices_to_show(boxes: np.ndarray, depth: int, n_slices: int, first: int | None = None) -> list[int]:
    """Axial slices for a saliency figure, sorted: ``first`` (e.g. a lesion's largest
    cross-section) when given, the centre slice of each ROI box (in box order), topped up to
    ``n_slices`` (at most ``depth``) with evenly spaced slices, first those at least half a
    spacing away from every slice already chosen."""
    n_slices = min(n_slices, depth)
    lead = [] if first is None else [int(first)]
    chosen = list(dict.fromkeys(lead + ((boxes[:, 2] + boxes[:, 5] - 1) // 2).tolist()))[:n_slices]
    even = np.linspace(0, depth - 1, n_slices + 2)[1:-1].round().astype(int).tolist()
    spacing = (depth - 1) / (n_slices + 1)
    for strict in (True, False):
        for k in even:
            fits = all(abs(k - c) > spacing / 2 for c in chosen) if strict else k not in chosen
            if len(chosen) < n_slices and fits:
                chosen.append(k)
    for k in range(depth):  # only when few distinct slices exist
        if len(chosen) < n_slices and k not in chosen:
            chosen.append(k)
    return sorted(int(k) for k in chosen)


def _scan_title(path: str | Path, label: int | None, class_names: Sequence[str]) -> str:
    """``"scan.nii.gz: "``, with ``"label <class>, "`` after it when the label is known."""
    truth = f"label {class_names[int(label)]}, " if label is not None else ""
    return f"{Path(path).name}: {truth}"


def plot_saliency_rois(volumes: Sequence[np.ndarray], saliency: np.ndarray, boxes: np.ndarray,
                       predicted: np.ndarray, paths: Sequence[str | Path], class_names: Sequence[str],
                       labels: Sequence[int] | None = None, roi_scale: int = 1, n_slices: int = 4,
                       dpi: int = 120, probs: np.ndarray | None = None,
                       lesion_masks: Sequence[np.ndarray | None] | None = None,
                       notes: Sequence[str] | None = None) -> Figure:
    """Per scan, one row of axial slices: the DCG's class activation map of its predicted class
    over the CT, the K ROI boxes it cropped and, where known, the lesion outline; on the
    lesion's largest cross-section and the centre slice of each box, topped up with evenly
    spaced slices to ``n_slices`` (:func:`slices_to_show`). Each row is titled with the file
    name, the true class, the DCG's prediction and its probability, and ``notes[i]``.

    Args:
        volumes: B volumes (1, H, W, D).
        saliency: (B, C, h, w, d) class activation maps.
        boxes: (B, K, 6) ROI boxes, on a grid ``roi_scale`` times finer in-plane than the
            volumes; drawn mapped to the volumes' grid (:func:`boxes_in_input`).
        predicted: (B,) the DCG's predicted class, whose map is drawn.
        paths, labels: the scans' files and optional true labels, for the titles.
        class_names: (C,) names.
        n_slices: axial slices shown per scan.
        dpi: resolution at which the rows are rasterised and stacked.
        probs: optional (B, C) the DCG's class probabilities (the predicted one is in the title).
        lesion_masks: optional per scan an (H, W, D) boolean lesion mask or None (unknown).
        notes: optional per scan one more title line (e.g. where its ROI boxes lie).
    """
    figs = []
    for i, path in enumerate(paths):
        c = int(predicted[i])
        scan_boxes = boxes_in_input(boxes[i], roi_scale)  # (K, 6)
        lesion = None if lesion_masks is None else lesion_masks[i]
        p = "" if probs is None else f" (p = {float(probs[i][c]):.2f})"
        note = "" if notes is None or not notes[i] else f"\n{notes[i]}"
        figs.append(plot_saliency_overlay(
            volumes[i][0], saliency[i, c], scan_boxes, lesion_mask=lesion,
            slices=slices_to_show(scan_boxes, volumes[i].shape[-1], n_slices, largest_section(lesion)),
            title=f"{_scan_title(path, None if labels is None else labels[i], class_names)}"
                  f"DCG predicts {class_names[c]}{p}; saliency of {class_names[c]}{note}"))
    return stack_figures(figs, dpi)


def plot_denoising_trajectories(trajectory: np.ndarray, timesteps: Sequence[int], probs: np.ndarray,
                                priors: np.ndarray, paths: Sequence[str | Path], class_names: Sequence[str],
                                labels: Sequence[int] | None = None, dpi: int = 120) -> Figure:
    """Per scan, the class probabilities of the state y_t from y_T = M + noise to y_0
    (:func:`plot_denoising_trajectory`): with several samples the mean +- one standard
    deviation; the DCG's own prediction dashed.

    Args:
        trajectory: (S, steps + 1, B, C) probabilities of every state of S samples of B scans.
        timesteps: (steps + 1,) the timestep of each state, y_T first.
        probs: (B, C) the final predicted probabilities (the title names the top class).
        priors: (B, C) the DCG's class probabilities (the prior).
        paths, labels: the scans' files and optional true labels, for the titles.
        class_names: (C,) names.
        dpi: resolution at which the rows are rasterised and stacked.
    """
    figs = []
    for i, path in enumerate(paths):
        top = int(probs[i].argmax())
        figs.append(plot_denoising_trajectory(
            trajectory[:, :, i, :].transpose(1, 0, 2), timesteps, class_names,  # (steps + 1, S, C)
            title=f"{_scan_title(path, None if labels is None else labels[i], class_names)}"
                  f"predicted {class_names[top]} (p = {probs[i, top]:.2f})",
            prior=priors[i]))
    return stack_figures(figs, dpi)
