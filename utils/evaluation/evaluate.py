"""Evaluation of trained models on the test split: predictions, metrics with CIs, figures.

Every model -- ours, its two ablations and the two 3D CNN baselines -- is evaluated through
one interface: a ``predict_batch(batch) -> {"probs": (B, C)[, "std": (B, C), "entropy": (B,)]}``
callable run over a DataLoader by :func:`predict_loader`, which collects a :class:`Predictions`.
:func:`evaluate_experiment` then turns the models' predictions on the SAME test scans into

    OUTPUT_DIR/evaluation_results.csv    model,metric,value,ci_low,ci_high (utils.evaluation.metrics)
    OUTPUT_DIR/predictions.csv           one row per (model, scan): label, probabilities, uncertainty
    OUTPUT_DIR/figures/confusion_matrix.png, roc_curves.png, reliability_diagram.png

and :func:`write_learning_curves` / :func:`write_model_figures` draw the training curves
(from ``history.json``), the DCG's saliency maps with ROI boxes, and the denoising trajectory
of the class probabilities. The maths lives in ``utils.evaluation.metrics`` and the drawing
(figure layout included) in ``utils.evaluation.visualization``; this module only runs the
models and wires results and figures to files.

Conventions: the first model of the ``predictions`` mapping is the main model (ours); its
confusion matrix and reliability diagram are drawn. Labels are integers in ``[0, C)``;
for C = 2, class 1 is the positive (abnormal) class.
"""
from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from utils.atomic import atomic_write_text
from utils.errors import DataError
from utils.data.splits import path_in_data_dir
from utils.evaluation.metrics import (
    CSV_COLUMNS,
    MIN_RESAMPLES,
    SCALAR_METRICS,
    csv_cell,
    metrics_table,
    write_metrics_csv,
)
from utils.evaluation.visualization import (
    plot_denoising_trajectories,
    plot_result_figures,
    plot_saliency_rois,
    plot_training_history,
    save_figure,
)

RESULTS_CSV = "evaluation_results.csv"
PREDICTIONS_CSV = "predictions.csv"
FIGURES_DIR = "figures"

METRIC_LABELS = {"accuracy": "Accuracy", "precision": "Precision", "recall": "Recall (sensitivity)",
                 "f1": "F1", "specificity": "Specificity", "roc_auc": "ROC-AUC"}
"""Column titles of :func:`format_results_table`."""


# ----------------------------------------------------------------------------------------
# predictions
# ----------------------------------------------------------------------------------------

@dataclass
class Predictions:
    """One model's predictions on N scans (C classes).

    Attributes:
        paths: (N,) scan paths, in loader order.
        labels: (N,) int64 true labels in ``[0, C)``.
        probs: (N, C) predicted class probabilities (rows sum to 1).
        std: (N, C) standard deviation of the probabilities over stochastic samples (the
            diffusion model's uncertainty), or None for deterministic models.
        entropy: (N,) predictive entropy ``-sum_c p_c log p_c`` of ``probs`` in nats, or None.
    """

    paths: list[str]
    labels: np.ndarray
    probs: np.ndarray
    std: np.ndarray | None = None
    entropy: np.ndarray | None = None

    def __post_init__(self):
        self.paths = [str(p) for p in self.paths]
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.probs = np.asarray(self.probs, dtype=np.float64)
        n = len(self.paths)
        if self.labels.shape != (n,):
            raise ValueError(f"Predictions: labels must have shape (N,) = ({n},), got {self.labels.shape}")
        if self.probs.ndim != 2 or self.probs.shape[0] != n or self.probs.shape[1] < 2:
            raise ValueError(f"Predictions: probs must have shape (N, C) = ({n}, C >= 2), got {self.probs.shape}")
        if self.std is not None:
            self.std = np.asarray(self.std, dtype=np.float64)
            if self.std.shape != self.probs.shape:
                raise ValueError(f"Predictions: std must have the shape of probs {self.probs.shape}, "
                                 f"got {self.std.shape}")
        if self.entropy is not None:
            self.entropy = np.asarray(self.entropy, dtype=np.float64)
            if self.entropy.shape != (n,):
                raise ValueError(f"Predictions: entropy must have shape (N,) = ({n},), got {self.entropy.shape}")

    @property
    def num_classes(self) -> int:
        return self.probs.shape[1]


PredictBatch = Callable[[dict], Mapping[str, torch.Tensor]]


def _to_device(batch: Mapping, device: torch.device | str) -> dict:
    """The batch with every tensor on ``device`` (paths and other values unchanged)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def predict_loader(predict_batch: PredictBatch, loader: DataLoader, device: torch.device | str,
                   desc: str = "predict", progress: bool = True) -> Predictions:
    """Run ``predict_batch`` over every batch of ``loader`` without gradients.

    Args:
        predict_batch: ``batch -> {"probs": (B, C)[, "std": (B, C), "entropy": (B,)]}``;
            ``batch`` is a CTDataset batch (``image`` (B, 1, H, W, D), ``label`` (B,),
            ``index``, ``path``[, ``image_hires``]) with its tensors already on ``device``.
            Optional keys must be returned for every batch or for none.
        loader: an unshuffled loader over the split to predict.
        device: where the batch tensors are moved.
        desc: tqdm progress-bar label.
        progress: show the progress bar.

    Returns:
        the concatenated :class:`Predictions`, in loader order.
    """
    paths, labels, probs = [], [], []
    optional = {"std": [], "entropy": []}
    with torch.no_grad():
        for batch in tqdm(loader, desc=desc, leave=False, disable=not progress):
            n = len(batch["path"])
            out = predict_batch(_to_device(batch, device))
            p = out["probs"]
            if p.ndim != 2 or p.shape[0] != n:
                raise ValueError(f"{desc}: predict_batch returned probs of shape {tuple(p.shape)} for a batch of {n}")
            paths.extend(batch["path"])
            labels.append(batch["label"].cpu().numpy())
            probs.append(p.float().cpu().numpy())  # (B, C)
            for key, collected in optional.items():
                if key in out:
                    collected.append(out[key].float().cpu().numpy())
    if not paths:
        raise ValueError(f"{desc}: the loader yielded no batches")
    n_batches = len(probs)
    extra = {}
    for key, collected in optional.items():
        if collected and len(collected) != n_batches:
            raise ValueError(f"{desc}: predict_batch returned {key!r} for {len(collected)} of {n_batches} batches")
        extra[key] = np.concatenate(collected) if collected else None
    return Predictions(paths=paths, labels=np.concatenate(labels), probs=np.concatenate(probs), **extra)


# ----------------------------------------------------------------------------------------
# metrics, per-scan predictions and figures of an experiment
# ----------------------------------------------------------------------------------------

def _check_same_scans(predictions: Mapping[str, Predictions], class_names: Sequence[str]) -> None:
    """All models must be evaluated on the same scans, in the same order, with C classes."""
    if not predictions:
        raise ValueError("predictions is empty: pass at least one model")
    first_name, first = next(iter(predictions.items()))
    for name, pred in predictions.items():
        if pred.num_classes != len(class_names):
            raise ValueError(f"{name}: probs have C = {pred.num_classes} classes but {len(class_names)} class names "
                             f"were given ({list(class_names)})")
        if pred.paths != first.paths or not np.array_equal(pred.labels, first.labels):
            raise ValueError(f"{name} and {first_name} were evaluated on different scans or labels; "
                             "every model must predict the same test split in the same order")


def write_predictions_csv(predictions: Mapping[str, Predictions], class_names: Sequence[str],
                          path: str | Path, data_root: str | Path | None = None) -> Path:
    """Per-scan predictions of every model, atomically, as CSV.

    Columns: ``model, path, label, prob_<class>..., std_<class>..., entropy`` (one row per
    model and scan; ``std_*`` and ``entropy`` are empty for models without them); ``path``
    relative to ``data_root`` (POSIX) when the scan lies inside it, as in ``splits.csv``.
    """

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["model", "path", "label", *(f"prob_{c}" for c in class_names),
                     *(f"std_{c}" for c in class_names), "entropy"])
    n_classes = len(class_names)
    for name, pred in predictions.items():
        for i, scan in enumerate(pred.paths):
            std = [csv_cell(v) for v in pred.std[i]] if pred.std is not None else [""] * n_classes
            entropy = csv_cell(pred.entropy[i]) if pred.entropy is not None else ""
            writer.writerow([name, path_in_data_dir(scan, data_root), int(pred.labels[i]),
                             *(csv_cell(v) for v in pred.probs[i]), *std, entropy])
    atomic_write_text(path, buffer.getvalue())
    return Path(path)


def evaluate_experiment(predictions: Mapping[str, Predictions], output_dir: str | Path, class_names: Sequence[str],
                        seed: int = 0, n_resamples: int = MIN_RESAMPLES, positive_class: int = 1,
                        data_root: str | Path | None = None) -> list[dict]:
    """Metrics with 95% bootstrap CIs, per-scan predictions and figures of all models.

    Args:
        predictions: model name -> its predictions on the test split; every model on the same
            scans in the same order. The FIRST entry is the main model (ours).
        output_dir: run folder; files written (atomically):
            ``evaluation_results.csv`` (``model,metric,value,ci_low,ci_high``: the scalar
            metrics with stratified percentile bootstrap CIs, then the confusion-matrix cells),
            ``predictions.csv`` (see :func:`write_predictions_csv`) and
            ``figures/confusion_matrix.png`` (main model), ``figures/confusion_matrices.png``
            (every model), ``figures/roc_curves.png`` (all models with 95% bootstrap bands;
            for C > 2 any class but 0 against class 0) and
            ``figures/reliability_diagram.png`` (main model).
        class_names: (C,) names, e.g. ``["Normal", "COVID-19"]``.
        seed: bootstrap seed; the same resamples of the test scans for every model (paired).
        n_resamples: bootstrap resamples (>= 1000).
        positive_class: the class precision / recall / specificity / AUC refer to when C = 2.
        data_root: scan paths in ``predictions.csv`` are written relative to it (as in
            ``splits.csv``) when they lie inside it.

    Returns:
        the metric rows written to ``evaluation_results.csv`` (``utils.evaluation.metrics.metrics_table``).
    """
    _check_same_scans(predictions, class_names)
    output_dir = Path(output_dir)
    rows = metrics_table({name: (p.labels, p.probs) for name, p in predictions.items()},
                         n_resamples=n_resamples, seed=seed, positive_class=positive_class)
    write_metrics_csv(rows, output_dir / RESULTS_CSV)
    write_predictions_csv(predictions, class_names, output_dir / PREDICTIONS_CSV, data_root)

    labels = next(iter(predictions.values())).labels  # the same for every model
    figures = plot_result_figures(labels, {name: p.probs for name, p in predictions.items()}, class_names,
                                  positive_class, seed)
    for name, fig in figures.items():
        save_figure(fig, output_dir / FIGURES_DIR / f"{name}.png")
    return rows


def _cell(value: float, low, high, digits: int) -> str:
    """``'0.825 [0.700, 0.925]'``; 'n/a' for an undefined value."""
    if value is None or math.isnan(value):
        return "n/a"
    if low is None or high is None or math.isnan(low) or math.isnan(high):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def format_results_table(rows: Sequence[Mapping], metrics: Sequence[str] = SCALAR_METRICS, digits: int = 3) -> str:
    """Markdown table of metric rows: one line per model, ``value [ci_low, ci_high]`` per metric.

    Args:
        rows: ``{"model", "metric", "value", "ci_low", "ci_high"}`` dicts (as returned by
            :func:`evaluate_experiment`); models keep their order of first appearance.
        metrics: the metric columns, in order (confusion cells are not shown).
        digits: decimals.
    """
    table: dict[str, dict[str, str]] = {}
    for row in rows:
        if set(row) != set(CSV_COLUMNS):
            raise ValueError(f"result rows must have exactly the keys {CSV_COLUMNS}, got {tuple(row)}")
        if row["metric"] in metrics:
            cell = _cell(row["value"], row["ci_low"], row["ci_high"], digits)
            table.setdefault(row["model"], {})[row["metric"]] = cell
    if not table:
        raise ValueError(f"no rows for the metrics {list(metrics)}")
    lines = ["| Model | " + " | ".join(METRIC_LABELS.get(m, m) for m in metrics) + " |",
             "|---|" + "---:|" * len(metrics)]
    for model, cells in table.items():
        lines.append(f"| {model} | " + " | ".join(cells.get(m, "") for m in metrics) + " |")
    return "\n".join(lines)


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
                        num_samples: int | None = None, n_slices: int = 4, dpi: int = 120) -> dict[str, Path]:
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
    out = model.predict(x, guidance, num_samples=num_samples, generator=generator, return_trajectory=True)
    trajectory = out["trajectory"].float().cpu().numpy()  # (S, steps + 1, B, C)
    # states in the DDPM paper's 1-based convention: y_T first (T = num_timesteps), then the
    # state after the step from code index t_i sits at t_{i+1} + 1, the last at 0 (clean y_0)
    timesteps = [int(t) + 1 for t in out["timesteps"]] + [0]
    probs = out["probs"].float().cpu().numpy()  # (B, C)
    priors = guidance.fused_probs.float().cpu().numpy()  # (B, C)
    dcg_pred = guidance.fused_probs.argmax(dim=1).cpu().numpy()  # (B,)
    saliency = guidance.saliency.float().cpu().numpy()  # (B, C, h, w, d)
    boxes = guidance.roi_boxes.cpu().numpy()  # (B, K, 6)

    figures = Path(output_dir) / FIGURES_DIR
    saliency_rois = plot_saliency_rois(volumes, saliency, boxes, dcg_pred, paths, class_names, labels, roi_scale,
                                       n_slices, dpi)
    trajectories = plot_denoising_trajectories(trajectory, timesteps, probs, priors, paths, class_names, labels, dpi)
    return {
        "saliency_rois": save_figure(saliency_rois, figures / "saliency_rois.png", dpi=dpi),
        "denoising_trajectory": save_figure(trajectories, figures / "denoising_trajectory.png", dpi=dpi),
    }
