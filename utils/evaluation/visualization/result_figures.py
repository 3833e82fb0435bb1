"""The test-split figures of ``utils.evaluation.evaluate.evaluate_experiment``: which model goes
in which figure, with which title.

The first model is the main model (ours): its confusion matrix and reliability diagram are
drawn; every model gets a confusion-matrix panel and a ROC curve. For C > 2 classes the ROC
curve is any class but 0 (e.g. CT-1..CT-4: any COVID-19 finding) against class 0.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from utils.evaluation.metrics import classification_metrics
from utils.evaluation.visualization.curves import plot_reliability_diagram, plot_roc_curves, plot_uncertainty
from utils.evaluation.visualization.matrices import plot_confusion_matrices, plot_confusion_matrix


def _roc_inputs(labels: np.ndarray, probs: np.ndarray, positive_class: int) -> tuple[np.ndarray, np.ndarray]:
    """(y (N,) 0/1, score (N,)) for a ROC curve: the positive class for C = 2, else any
    class other than 0 against class 0."""
    if probs.shape[1] == 2:
        return (labels == positive_class).astype(int), probs[:, positive_class]
    return (labels != 0).astype(int), 1.0 - probs[:, 0]


def plot_result_figures(labels: np.ndarray, probs: Mapping[str, np.ndarray], class_names: Sequence[str],
                        positive_class: int = 1, seed: int = 0,
                        thresholds: Mapping[str, float] | None = None, n_resamples: int = 2000) -> dict[str, Figure]:
    """The confusion matrix and reliability diagram of the main model, and the confusion
    matrices and ROC curves of every model (with more than two models the 95% bootstrap band of
    the main model only: six bands overlap into one grey area); the
    confusion matrices at each model's validation threshold when ``thresholds`` are given.

    Args:
        labels: (N,) true labels of the test scans, the same for every model.
        probs: model name -> (N, C) class probabilities; the FIRST is the main model.
        class_names: (C,) names.
        positive_class: the positive class when C = 2.
        seed, n_resamples: the ROC bands' bootstrap; pass the run's (``TrainConfig.n_resamples``
            and seed) so the AUC intervals in the ROC legend are those of the results table.

    Returns:
        ``{"confusion_matrix", "confusion_matrices", "roc_curves", "reliability_diagram": Figure}``.
    """
    main_name, main = next(iter(probs.items()))
    thresholds = thresholds or {}
    matrices = {name: classification_metrics(labels, p, positive_class, thresholds.get(name))["confusion_matrix"]
                for name, p in probs.items()}
    at = " at the validation threshold" if thresholds else ""
    binary = len(class_names) == 2
    roc_title = ("ROC curves (test)" if binary
                 else f"ROC curves (test): any of {', '.join(class_names[1:])} vs {class_names[0]}")
    return {
        "confusion_matrix": plot_confusion_matrix(matrices[main_name], class_names,
                                                  title=f"{main_name}: confusion matrix (test{at})"),
        "confusion_matrices": plot_confusion_matrices(matrices, class_names, title=f"Confusion matrices (test{at})"),
        "roc_curves": plot_roc_curves({name: _roc_inputs(labels, p, positive_class) for name, p in probs.items()},
                                      title=roc_title, seed=seed, n_resamples=n_resamples,
                                      bands="first" if len(probs) > 2 else "all",
                                      positive_label=class_names[positive_class] if binary else "abnormal"),
        "reliability_diagram": plot_reliability_diagram(labels, main, title=f"{main_name}: reliability (test)"),
    }


def plot_prediction_uncertainty(predictions, class_names: Sequence[str], model: str = "DiffMIC-3D") -> Figure:
    """``plot_uncertainty`` of one model's rows of ``predictions.csv`` (a pandas DataFrame with
    ``model``, ``label``, ``decision``, ``prob_<class>`` and ``std_<class>`` columns).

    Binary: the positive class's probability and spread, hollow where the decision at the model's
    validation threshold is wrong. C > 2: the probability and spread of the class each scan is
    assigned (argmax), hollow where that is not its grade.

    Raises:
        ValueError: ``model`` has no rows, or a column is missing.
    """
    rows = predictions[predictions["model"] == model]
    if rows.empty:
        raise ValueError(f"no predictions of {model!r}; models: {sorted(set(predictions['model']))}")
    needed = ["label", "decision"] + [f"{kind}_{name}" for kind in ("prob", "std") for name in class_names]
    missing = [c for c in needed if c not in rows.columns]
    if missing:
        raise ValueError(f"predictions lack the columns {missing}")
    decision = rows["decision"].to_numpy().astype(int)
    title = f"{model}: per-scan prediction and uncertainty (test)"
    if len(class_names) == 2:
        positive = class_names[1]
        return plot_uncertainty(rows[f"prob_{positive}"], rows[f"std_{positive}"], rows["label"], class_names,
                                predicted=decision, title=title)
    assigned = [f"_{class_names[d]}" for d in decision]
    prob = np.array([rows[f"prob{c}"].iloc[i] for i, c in enumerate(assigned)])
    std = np.array([rows[f"std{c}"].iloc[i] for i, c in enumerate(assigned)])
    return plot_uncertainty(prob, std, rows["label"], class_names, predicted=decision,
                            xlabel="p(assigned class)", title=title)
