"""Evaluation of trained models on the test split: predictions, metrics with CIs, figures.

Every model -- ours, its two ablations and the two 3D CNN baselines -- is evaluated through
one interface: a ``predict_batch(batch) -> {"probs": (B, C)[, "std": (B, C), "entropy": (B,)]}``
callable run over a DataLoader by :func:`predict_loader`, which collects a :class:`Predictions`.
:func:`evaluate_experiment` then turns the models' predictions on the SAME test scans into

    OUTPUT_DIR/evaluation_results.csv    model,metric,value,ci_low,ci_high (utils.evaluation.metrics)
    OUTPUT_DIR/predictions.csv           one row per (model, scan): label, probabilities, uncertainty
    OUTPUT_DIR/figures/confusion_matrix.png, roc_curves.png, reliability_diagram.png

and ``utils.evaluation.run_figures`` draws the training curves (from ``history.json``), the
DCG's saliency maps with ROI boxes, and the denoising trajectory of the class probabilities
(re-exported here). The maths lives in ``utils.evaluation.metrics`` and the drawing
(figure layout included) in ``utils.evaluation.visualization``; this module only runs the
models and wires results and figures to files.

Conventions: the first model of the ``predictions`` mapping is the main model (ours); its
confusion matrix and reliability diagram are drawn. Labels are integers in ``[0, C)``;
for C = 2, class 1 is the positive (abnormal) class.
"""
from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from utils.atomic import atomic_write_text
from utils.data.splits import path_in_data_dir
from utils.evaluation.calibration import expected_calibration_error
from utils.evaluation.metrics import (
    CSV_COLUMNS,
    MIN_RESAMPLES,
    SCALAR_METRICS,
    csv_cell,
    metrics_table,
    write_metrics_csv,
)
from utils.evaluation.metrics import decide as metrics_decide
from utils.evaluation.selective import (SCORE_NAMES, UNCERTAINTY_CSV, curves_of, selective_rows, uncertainty_scores,
                                        write_selective_csv)
from utils.evaluation.thresholds import youden_threshold
from utils.evaluation.run_figures import FIGURES_DIR, read_history, write_learning_curves, write_model_figures  # noqa: F401
from utils.evaluation.visualization import plot_result_figures, plot_risk_coverage, save_figure

RESULTS_CSV = "evaluation_results.csv"
PREDICTIONS_CSV = "predictions.csv"
VAL_PREDICTIONS_CSV = "val_predictions.csv"

METRIC_LABELS = {"accuracy": "Accuracy", "precision": "Precision", "recall": "Recall (sensitivity)",
                 "f1": "F1", "specificity": "Specificity", "roc_auc": "ROC-AUC",
                 "balanced_accuracy": "Balanced accuracy", "threshold": "Threshold"}
METRIC_LABELS.update({f"{k}@val_threshold": f"{v} @ val. threshold" for k, v in list(METRIC_LABELS.items())})
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
        samples: (S, N, C) the stochastic outputs ``probs`` averages (DiffMIC-3D's chains, a DCG
            ensemble's members), or None.
        threshold: the decision threshold on p(class 1) chosen on the validation split (binary),
            or None (argmax).
    """

    paths: list[str]
    labels: np.ndarray
    probs: np.ndarray
    std: np.ndarray | None = None
    entropy: np.ndarray | None = None
    samples: np.ndarray | None = None
    threshold: float | None = None

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
        if self.samples is not None:
            self.samples = np.asarray(self.samples, dtype=np.float64)
            if self.samples.ndim != 3 or self.samples.shape[1:] != self.probs.shape:
                raise ValueError(f"Predictions: samples must have shape (S, N, C) = (S, {n}, {self.probs.shape[1]}), "
                                 f"got {self.samples.shape}")

    def scores(self) -> dict[str, np.ndarray]:
        """Uncertainty scores (N,) of these predictions (``utils.evaluation.selective``)."""
        return uncertainty_scores(self.probs, self.threshold, self.samples)

    def selective_inputs(self) -> dict:
        """``{"probs", "threshold", "samples"}`` as ``selective.selective_rows`` takes them."""
        return {"probs": self.probs, "threshold": self.threshold, "samples": self.samples}

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
        predict_batch: ``batch -> {"probs": (B, C)[, "std": (B, C), "entropy": (B,),
            "samples": (S, B, C)]}``;
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
    optional = {"std": [], "entropy": [], "samples": []}
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
        extra[key] = np.concatenate(collected, axis=1 if key == "samples" else 0) if collected else None
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

    Columns: ``model, path, label, prob_<class>..., std_<class>..., entropy, threshold,
    decision, u_<score>...`` (one row per model and scan; ``std_*``, ``entropy`` and a score a
    model does not have are empty): ``threshold`` is the model's validation-chosen decision
    threshold, ``decision`` the class decided at it (argmax without one), ``u_<score>`` the
    uncertainty scores of ``utils.evaluation.selective``. ``path`` is relative to ``data_root``
    (POSIX) when the scan lies inside it, as in ``splits.csv``.
    """

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["model", "path", "label", *(f"prob_{c}" for c in class_names),
                     *(f"std_{c}" for c in class_names), "entropy", "threshold", "decision",
                     *(f"u_{s}" for s in SCORE_NAMES)])
    n_classes = len(class_names)
    for name, pred in predictions.items():
        scores = pred.scores()
        decided = metrics_decide(pred.probs, pred.threshold, 1)
        for i, scan in enumerate(pred.paths):
            std = [csv_cell(v) for v in pred.std[i]] if pred.std is not None else [""] * n_classes
            entropy = csv_cell(pred.entropy[i]) if pred.entropy is not None else ""
            writer.writerow([name, path_in_data_dir(scan, data_root), int(pred.labels[i]),
                             *(csv_cell(v) for v in pred.probs[i]), *std, entropy, csv_cell(pred.threshold),
                             int(decided[i]), *(csv_cell(scores[s][i]) if s in scores else "" for s in SCORE_NAMES)])
    atomic_write_text(path, buffer.getvalue())
    return Path(path)


def evaluate_experiment(predictions: Mapping[str, Predictions], output_dir: str | Path, class_names: Sequence[str],
                        seed: int = 0, n_resamples: int = MIN_RESAMPLES, positive_class: int = 1,
                        data_root: str | Path | None = None,
                        val_predictions: Mapping[str, Predictions] | None = None,
                        reference: str | None = None) -> list[dict]:
    """Metrics with 95% bootstrap CIs, per-scan predictions, uncertainty and figures of all models.

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
        n_resamples: bootstrap resamples (>= 1000) of every interval: the table's, the ROC
            figure's bands and legend (the same resamples, so the same AUC intervals) and
            ``uncertainty.csv``'s.
        positive_class: the class precision / recall / specificity / AUC refer to when C = 2.
        data_root: scan paths in ``predictions.csv`` are written relative to it (as in
            ``splits.csv``) when they lie inside it.
        val_predictions: the same models on the VALIDATION split (binary): each model's decision
            threshold is Youden's on them (``utils.evaluation.thresholds``) unless its test
            ``Predictions`` already carry one (DiffMIC-3D stores its own, chosen the same way);
            written to ``val_predictions.csv``. Every test prediction then gets its threshold,
            ``evaluation_results.csv`` the ``<metric>@val_threshold`` rows, and
            ``uncertainty.csv`` / ``figures/risk_coverage.png`` are written
            (``utils.evaluation.selective``, errors at the validation threshold).
        reference: the model whose softmax confidence the uncertainty scores are compared
            with (default: the second model, the main model's own DCG).

    Returns:
        the metric rows written to ``evaluation_results.csv`` (``utils.evaluation.metrics.metrics_table``,
        then an ``ece`` row per model: top-label ECE on 10 equal-width bins, no interval).
    """
    _check_same_scans(predictions, class_names)
    output_dir = Path(output_dir)
    binary = len(class_names) == 2
    thresholds = None
    if val_predictions is not None:
        _check_same_scans(val_predictions, class_names)
        if set(val_predictions) != set(predictions):
            raise ValueError(f"val_predictions has models {sorted(val_predictions)}, predictions {sorted(predictions)}")
        if binary:
            for name, pred in predictions.items():
                val = val_predictions[name]
                chosen = pred.threshold if pred.threshold is not None else youden_threshold(val.labels, val.probs,
                                                                                          positive_class)
                pred.threshold = val.threshold = float(chosen)
            thresholds = {name: p.threshold for name, p in predictions.items()}
        write_predictions_csv(val_predictions, class_names, output_dir / VAL_PREDICTIONS_CSV, data_root)
    rows = metrics_table({name: (p.labels, p.probs) for name, p in predictions.items()},
                         n_resamples=n_resamples, seed=seed, positive_class=positive_class, thresholds=thresholds)
    rows += [{"model": name, "metric": "ece", "value": expected_calibration_error(p.labels, p.probs),
              "ci_low": None, "ci_high": None} for name, p in predictions.items()]
    write_metrics_csv(rows, output_dir / RESULTS_CSV)
    write_predictions_csv(predictions, class_names, output_dir / PREDICTIONS_CSV, data_root)

    labels = next(iter(predictions.values())).labels  # the same for every model
    figures = plot_result_figures(labels, {name: p.probs for name, p in predictions.items()}, class_names,
                                  positive_class, seed, thresholds=thresholds, n_resamples=n_resamples)
    if val_predictions is not None:
        names = list(predictions)
        reference = reference or names[min(1, len(names) - 1)]
        models = {name: p.selective_inputs() for name, p in predictions.items()}
        write_selective_csv(selective_rows(labels, models, reference, n_resamples, seed), output_dir / UNCERTAINTY_CSV)
        shown = {name: (("risk", "margin", "spread", "ttest") if i == 0 else ("msp",)) for i, name in enumerate(names)}
        curves, table = curves_of(labels, models, shown)
        figures["risk_coverage"] = plot_risk_coverage(curves, table, title="Risk-coverage (test; errors at the "
                                                      "validation threshold)")
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
