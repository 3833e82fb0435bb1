"""Figures for the evaluation report: pure functions from arrays to a matplotlib Figure.

Nothing here reads files or touches pyplot's global figure list: figures are built with the
object-oriented API (``matplotlib.figure.Figure``), so they need no display (they render with
Agg), do not pile up in long loops, and show in Jupyter with ``display(fig)`` or as a cell's
last expression. :func:`save_figure` writes one as PNG and PDF atomically. Arrays may be numpy
arrays or torch tensors (on any device; they are copied to the CPU).

    volumes        CT slices (radiological, lung window), HU histograms, saliency (a clear-below-
                   threshold 'inferno' tint) + ROI boxes + lesion outline, boxes_in_input (ROI
                   boxes of a high-resolution copy on the input grid)
    priors         the DCG's dense guidance map and image feature prior
    curves         ROC curves, learning curves, reliability diagram, denoising trajectory,
                   per-scan uncertainty, risk-coverage curves
    matrices       confusion matrices
    result_figures the test-split figures of evaluate_experiment (confusion, ROC, reliability)
    model_figures  the report's saliency / ROI and denoising-trajectory figures of a few scans
    figure_io      save_figure (PNG + PDF), stack_figures
    arrays         the input conversion every plot shares

Every public function is importable from here, e.g.
``from utils.evaluation.visualization import plot_saliency_overlay``.
"""
from utils.evaluation.visualization.curves import (
    plot_denoising_trajectory,
    plot_learning_curves,
    plot_reliability_diagram,
    plot_risk_coverage,
    plot_roc_curves,
    plot_training_history,
    plot_uncertainty,
)
from utils.evaluation.visualization.figure_io import FIGURE_FORMATS, save_figure, stack_figures
from utils.evaluation.visualization.matrices import plot_confusion_matrices, plot_confusion_matrix
from utils.evaluation.visualization.model_figures import (
    plot_denoising_trajectories,
    plot_saliency_rois,
    slices_to_show,
)
from utils.evaluation.visualization.priors import plot_feature_prior, plot_guidance_map
from utils.evaluation.visualization.result_figures import plot_prediction_uncertainty, plot_result_figures
from utils.evaluation.visualization.volumes import (
    HU_WINDOW,
    LUNG_WINDOW,
    SALIENCY_CMAP,
    SALIENCY_FLOOR,
    boxes_in_input,
    largest_section,
    plot_ct_slices,
    plot_hu_histograms,
    plot_saliency_overlay,
    saliency_colormap,
)

__all__ = [
    "FIGURE_FORMATS", "HU_WINDOW", "LUNG_WINDOW", "SALIENCY_CMAP", "SALIENCY_FLOOR",
    "boxes_in_input", "largest_section", "saliency_colormap", "slices_to_show", "save_figure", "stack_figures",
    "plot_confusion_matrices", "plot_confusion_matrix", "plot_ct_slices", "plot_denoising_trajectories",
    "plot_denoising_trajectory", "plot_feature_prior", "plot_guidance_map", "plot_hu_histograms",
    "plot_learning_curves", "plot_prediction_uncertainty", "plot_reliability_diagram", "plot_result_figures",
    "plot_risk_coverage",
    "plot_roc_curves", "plot_saliency_overlay", "plot_saliency_rois", "plot_training_history", "plot_uncertainty",
]
