"""Figures of a run that come from its files and its model rather than from test predictions:
the learning curves (from ``history.json``) and, for a few scans (the caller picks them:
``utils.evaluation.showcase.SHOWCASE_RULE`` in the pipeline), the DCG's saliency maps with ROI
boxes and lesion outlines, and the denoising trajectory of the class probabilities. The drawing itself is in
``utils.evaluation.visualization``; this module runs the model and writes the files.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from utils.errors import DataError
from utils.evaluation.showcase import box_notes
from utils.evaluation.visualization import (boxes_in_input, plot_denoising_trajectories, plot_saliency_rois,
                                            plot_training_history, save_figure)

FIGURES_DIR = "figures"


# ----------------------------------------------------------------------------------------
# training curves
# ----------------------------------------------------------------------------------------

def read_history(history_path: str | Path) -> dict:
    """Load ``history.json``: phase -> series name -> per-epoch values (losses, ``val_*`` metrics,
    ``lr``, ``best_epoch``, ...), as :func:`write_learning_curves` draws them."""
    history_path = Path(history_path)
    if not history_path.is_file():
        raise DataError(history_path, "training history not found (written by `python -m utils.run`)")
    try:
        history = json.loads(history_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(history_path, f"not a readable JSON file ({err})") from err
    if not isinstance(history, dict) or not all(isinstance(v, dict) for v in history.values()):
        raise DataError(history_path, "expected a JSON object of phases, each an object of per-epoch series")
    return history


def write_learning_curves(history_path: str | Path, output_dir: str | Path) -> Path:
    """Draw ``OUTPUT_DIR/figures/learning_curves.png`` from the run's ``history.json``: losses in
    the top row, validation metrics in the bottom row, one column per phase, the selected epoch
    dotted (``utils.evaluation.visualization.plot_training_history``).

    Raises:
        DataError: the file is missing or unreadable, a drawn series is not a list of
            numbers, or no phase has any epoch.
    """
    history = read_history(history_path)
    try:
        fig = plot_training_history(history)
    except ValueError as err:
        raise DataError(history_path, str(err)) from err
    return save_figure(fig, Path(output_dir) / FIGURES_DIR / "learning_curves.png")


# ----------------------------------------------------------------------------------------
# model figures: saliency + ROI boxes, denoising trajectory
# ----------------------------------------------------------------------------------------

def write_model_figures(model, volumes: Sequence[np.ndarray], paths: Sequence[str | Path], output_dir: str | Path,
                        seed: int = 0, class_names: Sequence[str] | None = None,
                        labels: Sequence[int] | None = None, hires_volumes: Sequence[np.ndarray] | None = None,
                        num_samples: int | None = None, n_slices: int = 4, dpi: int = 120,
                        lesion_masks: Sequence[np.ndarray | None] | None = None) -> dict[str, Path]:
    """Saliency maps with ROI boxes, and the denoising trajectory, for a few scans.

    Runs the model once on ``volumes`` and writes, as PNG and PDF (``save_figure``),
    ``OUTPUT_DIR/figures/saliency_rois.png`` (``visualization.plot_saliency_rois``) and
    ``OUTPUT_DIR/figures/denoising_trajectory.png`` (``visualization.plot_denoising_trajectories``).

    Args:
        model: a trained ``DiffMIC3D`` (its DCG runs once per scan; predictions reuse it).
        volumes: (1, H, W, D) preprocessed volumes, e.g. a few test scans.
        paths: their file paths (names shown in the titles).
        output_dir: run folder.
        seed: seed of the CPU ``torch.Generator`` drawing the sampling noise (the same
            figures on CPU and CUDA up to floating point).
        class_names: (C,) names; default ``class 0``, ``class 1``, ...
        labels: optional true labels, shown in the titles.
        hires_volumes: (1, sH, sW, D) copies at ``roi_scale`` s times the in-plane resolution;
            required iff the model's ``roi_scale > 1``. ROI boxes are then drawn scaled back
            to the input grid.
        num_samples: stochastic samples per scan (default: the model's config).
        n_slices: axial slices shown per scan in the saliency figure.
        dpi: resolution of the PNGs.
        lesion_masks: for CT scans, per scan an (H, W, D) lesion mask on the volumes' grid or
            None where unknown (``utils.evaluation.showcase.lesion_masks``): the lesion is
            outlined and each row's title says where its ROI boxes lie (on the lesion, in the
            lungs, other tissue, air: ``utils.evaluation.roi_anatomy``). None (the default, and
            for data that are not CT in HU) draws neither.

    Returns:
        ``{"saliency_rois": path, "denoising_trajectory": path}``.
    """
    if not volumes or len(volumes) != len(paths):
        raise ValueError(f"pass one path per volume and at least one volume, got {len(volumes)} volumes "
                         f"and {len(paths)} paths")
    if labels is not None and len(labels) != len(volumes):
        raise ValueError(f"labels has {len(labels)} entries for {len(volumes)} volumes")
    roi_scale = model.config.dcg.roi_scale
    if (hires_volumes is not None) != (roi_scale > 1):
        raise ValueError(f"hires_volumes must be given iff the model's roi_scale > 1 (roi_scale = {roi_scale})")
    if class_names is None:
        class_names = [f"class {c}" for c in range(model.config.num_classes)]
    device = next(model.parameters()).device
    model.eval()
    x = torch.from_numpy(np.stack([np.asarray(v, dtype=np.float32) for v in volumes])).to(device)  # (B, 1, H, W, D)
    x_hires = None
    if hires_volumes is not None:
        x_hires = torch.from_numpy(np.stack([np.asarray(v, dtype=np.float32) for v in hires_volumes])).to(device)
    guidance = model.guidance(x, x_hires)
    generator = torch.Generator().manual_seed(seed)
    members = [guidance, *(dcg(x, x_hires) for dcg in model.fold_dcgs)]  # as the test predictions
    out = model.predict(x, members, num_samples=num_samples, generator=generator, return_trajectory=True)
    trajectory = out["trajectory"].float().cpu().numpy()  # (S, steps + 1, B, C)
    # states in the DDPM paper's 1-based convention: y_T first (T = num_timesteps), then the
    # state after the step from code index t_i sits at t_{i+1} + 1, the last at 0 (clean y_0)
    timesteps = [int(t) + 1 for t in out["timesteps"]] + [0]
    probs = out["probs"].float().cpu().numpy()  # (B, C)
    priors = guidance.fused_probs.float().cpu().numpy()  # (B, C)
    dcg_pred = guidance.fused_probs.argmax(dim=1).cpu().numpy()  # (B,)
    saliency = guidance.saliency.float().cpu().numpy()  # (B, C, h, w, d)
    boxes = guidance.roi_boxes.cpu().numpy()  # (B, K, 6)

    notes = None
    if lesion_masks is not None:
        if len(lesion_masks) != len(volumes):
            raise ValueError(f"lesion_masks has {len(lesion_masks)} entries for {len(volumes)} volumes")
        notes = box_notes(volumes, boxes_in_input(boxes, roi_scale), lesion_masks)

    figures = Path(output_dir) / FIGURES_DIR
    saliency_rois = plot_saliency_rois(volumes, saliency, boxes, dcg_pred, paths, class_names, labels, roi_scale,
                                       n_slices, dpi, probs=priors, lesion_masks=lesion_masks, notes=notes)
    trajectories = plot_denoising_trajectories(trajectory, timesteps, probs, priors, paths, class_names, labels, dpi)
    return {
        "saliency_rois": save_figure(saliency_rois, figures / "saliency_rois.png", dpi=dpi),
        "denoising_trajectory": save_figure(trajectories, figures / "denoising_trajectory.png", dpi=dpi),
    }
