"""Which scans a saliency figure shows, chosen by a stated rule, and the DCG's saliency / ROI
figure of a split with a measured account of where its ROI boxes lie.

A split sorted by class shows only normal scans in its first batch; a figure of the "best"
scans chosen by eye shows what one hopes to see. The rule here (:data:`SHOWCASE_RULE`) is fixed
before looking: per class, the scan the DCG classifies correctly with the highest probability
of its true class, i.e. the DCG's clearest case of each class. Notebook 03 (validation split)
and the report figure of ``utils.evaluation.run_figures`` (test split) use the same rule.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from torch.utils.data import Dataset

from models.dcg_model import DCGOutput
from utils.data.phantom_masks import phantom_lesion_mask
from utils.data.preprocessing import PreprocessConfig
from utils.evaluation.roi_anatomy import Placement, ScanAnatomy, box_shares, describe_boxes, summarise
from utils.evaluation.visualization import boxes_in_input, plot_saliency_rois

SHOWCASE_RULE = ("one scan per class: among the scans the DCG classifies correctly (argmax of its fused "
                 "prediction), the one with the highest probability of its true class; a class with no correctly "
                 "classified scan shows its highest-scored scan, marked misclassified")


def showcase_indices(labels, probs) -> list[int]:
    """Indices of the scans :data:`SHOWCASE_RULE` picks, one per class present, in class order.

    Args:
        labels: (N,) true classes.
        probs: (N, C) the DCG's class probabilities (its fused prediction).
    Ties go to the first scan in dataset order.
    """
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] != labels.shape[0] or labels.ndim != 1 or not len(labels):
        raise ValueError(f"labels (N,) and probs (N, C) must describe the same N > 0 scans, got {labels.shape} "
                         f"and {probs.shape}")
    picks = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        correct = members[probs[members].argmax(axis=1) == c]
        pool = correct if len(correct) else members
        picks.append(int(pool[np.argmax(probs[pool, c])]))
    return picks


def lesion_masks(dataset: Dataset, indices: Sequence[int], preprocess_config: PreprocessConfig | None
                 ) -> list[np.ndarray | None] | None:
    """The (H, W, D) lesion masks of scans ``indices`` of a ``CTDataset`` (None per scan where
    unknown: real data; ``utils.data.phantom_masks``), or None when the data are not CT scan
    files (no ``preprocess_config``, e.g. a MedMNIST set), where no anatomy can be measured."""
    records = getattr(dataset, "records", None)
    if preprocess_config is None or records is None:
        return None
    return [phantom_lesion_mask(records[i].path, preprocess_config) for i in indices]


def box_notes(volumes: Sequence[np.ndarray], boxes: np.ndarray, masks: Sequence[np.ndarray | None]) -> list[str]:
    """Per scan, where its input-grid ROI boxes (B, K, 6) lie (``roi_anatomy.describe_boxes``).

    Args:
        volumes: B preprocessed volumes (1, H, W, D); masks: B lesion masks or None.
    """
    return [describe_boxes(box_shares(b, ScanAnatomy.of(v[0], m)), has_lesion=m is not None and bool(m.any()))
            for v, b, m in zip(volumes, boxes, masks)]


@dataclass
class DCGShowcase:
    """What :func:`dcg_showcase` returns: the figure, the scans shown, the split's placement
    summary (None without anatomy) and the lines to print."""

    figure: Figure
    picks: list[int]
    placement: Placement | None
    lines: list[str]


def dcg_showcase(dataset: Dataset, guidance: DCGOutput, class_names: Sequence[str], roi_scale: int,
                 preprocess_config: PreprocessConfig | None, split: str = "validation", n_slices: int = 4,
                 dpi: int = 110) -> DCGShowcase:
    """The DCG's saliency and ROI boxes on the scans :data:`SHOWCASE_RULE` picks from a split,
    lesion outlines where known, and where the boxes of every scan of the split lie.

    Args:
        dataset: the split's ``CTDataset`` (unaugmented; ``labels``, items with ``image`` and
            ``path``), rows in the order of ``guidance``.
        guidance: the DCG's outputs on it (``utils.pipeline.cache_split_guidance``): fused
            probabilities (N, C), saliency (N, C, h, w, d), ROI boxes (N, K, 6) on the grid
            the crops come from (``roi_scale`` times finer in-plane).
        preprocess_config: the scans' preprocessing (lesion masks of phantoms are put on the
            same grid), or None for data without scan files: no anatomy then.
        split: the split's name, for the printed lines.
    """
    probs = guidance.fused_probs.float().numpy()  # (N, C)
    labels = np.asarray(dataset.labels)  # (N,)
    picks = showcase_indices(labels, probs)
    predicted = probs.argmax(axis=1)
    boxes = boxes_in_input(guidance.roi_boxes.numpy(), roi_scale)  # (N, K, 6) on the input grid
    volumes = [dataset[i]["image"].numpy() for i in range(len(dataset))]  # (1, H, W, D) each
    paths = [str(dataset[i]["path"]) for i in picks]
    masks = lesion_masks(dataset, range(len(dataset)), preprocess_config)
    notes = box_notes([volumes[i] for i in picks], boxes[picks], [masks[i] for i in picks]) if masks else None
    figure = plot_saliency_rois([volumes[i] for i in picks], guidance.saliency[picks].float().numpy(),
                                guidance.roi_boxes[picks].numpy(), predicted[picks], paths, class_names,
                                labels[picks], roi_scale, n_slices, dpi, probs=probs[picks],
                                lesion_masks=None if masks is None else [masks[i] for i in picks], notes=notes)
    lines = [f"shown ({SHOWCASE_RULE}):"]
    for j, i in enumerate(picks):
        verdict = "correct" if predicted[i] == labels[i] else "MISCLASSIFIED"
        where = f"; {notes[j]}" if notes else ""
        lines.append(f"  {Path(paths[j]).name}: {class_names[labels[i]]}, DCG p({class_names[labels[i]]}) = "
                     f"{probs[i, labels[i]]:.2f} ({verdict}){where}")
    placement = None
    if masks is not None:
        placement = summarise(list(boxes), [ScanAnatomy.of(v[0], m) for v, m in zip(volumes, masks)])
        lines += placement.lines(split)
    return DCGShowcase(figure=figure, picks=picks, placement=placement, lines=lines)
