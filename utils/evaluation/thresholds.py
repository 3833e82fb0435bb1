"""Decision thresholds chosen on the validation split, and the metrics at a decision.

``metrics.classification_metrics`` calls the argmax class; for a binary model whose scores are
shifted (e.g. trained on another prevalence) a threshold on p(positive) chosen on the
VALIDATION predictions can do better. Choose it with :func:`youden_threshold` or
:func:`prevalence_threshold` on the validation split, then apply it unchanged to the test split
with :func:`predict_at` / :func:`threshold_metrics`: nothing here looks at the test labels when
choosing. :func:`best_balanced_accuracy` is an oracle on the given predictions (what the model's
ranking allows), not a test-set result.

Rule everywhere: a scan is called positive iff ``p_pos >= threshold``, with ``p_pos =
probs[:, positive_class]``. Inputs: ``labels`` (N,) integers in ``[0, C)``, ``probs`` (N, C)
probabilities (rows sum to 1, checked as in ``metrics.check_labels_and_probs``).

Candidate thresholds (:func:`youden_threshold`, :func:`prevalence_threshold`,
:func:`best_balanced_accuracy`): the midpoints between consecutive distinct values of p_pos,
plus one below the minimum (``min / 2``, between 0 and the minimum: everything positive) and
one above the maximum (``(max + 1) / 2``, between the maximum and 1: everything negative unless
the maximum is 1 itself). They realise every split of the sorted scores that a threshold can.
"""
from __future__ import annotations

import math

import numpy as np

from utils.evaluation.metrics import check_labels_and_probs, mean_without_nan, safe_ratio


def _check_probs(probs) -> np.ndarray:
    """``probs`` (N, C) float64, validated without labels."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2 or p.shape[0] == 0:
        raise ValueError(f"probs must have shape (N, C) with N > 0 and C >= 2, got {p.shape}")
    check_labels_and_probs(np.zeros(p.shape[0], dtype=np.int64), p)
    return p


def _binary(labels, probs, positive_class: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``(is_pos (N,) bool, p_pos (N,))`` of binary validation predictions with both classes."""
    y, p = check_labels_and_probs(labels, probs)
    if p.shape[1] != 2:
        raise ValueError(f"{what} is binary only, got probs with C = {p.shape[1]} classes")
    if positive_class not in (0, 1):
        raise ValueError(f"positive_class must be 0 or 1, got {positive_class}")
    is_pos = y == positive_class
    if is_pos.all() or not is_pos.any():
        raise ValueError(f"labels hold a single class: {what} needs positive and negative scans")
    return is_pos, p[:, positive_class]


def _candidates(p_pos: np.ndarray) -> np.ndarray:
    """Candidate thresholds (K,), increasing (see module docstring)."""
    u = np.unique(p_pos)  # sorted distinct scores
    mids = (u[:-1] + u[1:]) / 2
    mids = np.where(mids > u[:-1], mids, u[1:])  # adjacent floats: the midpoint may round down onto u[i]
    return np.concatenate([[u[0] / 2], mids, [(u[-1] + 1) / 2]])


def _called_positive(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """How many of ``scores`` are >= each threshold: (K,)."""
    return scores.size - np.searchsorted(np.sort(scores), thresholds, side="left")


def _youden_j(is_pos: np.ndarray, p_pos: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Youden's J = TPR - FPR at each threshold (K,)."""
    tpr = _called_positive(p_pos[is_pos], thresholds) / is_pos.sum()
    fpr = _called_positive(p_pos[~is_pos], thresholds) / (~is_pos).sum()
    return tpr - fpr


def _closest_to_half(candidates: np.ndarray, best: np.ndarray) -> float:
    """The candidate among ``best`` (bool mask) closest to 0.5; equally close: the smaller."""
    chosen = candidates[best]
    return float(chosen[np.argmin(np.abs(chosen - 0.5))])  # argmin takes the first, i.e. smaller


def youden_threshold(labels, probs, positive_class: int = 1) -> float:
    """Threshold on p(positive) maximising Youden's J = TPR - FPR on these (validation) predictions.

    Args:
        labels: (N,) binary labels of the validation scans.
        probs: (N, 2) validation probabilities.
        positive_class: the class called positive when ``probs[:, positive_class] >= threshold``.

    Returns:
        The best candidate threshold (module docstring), in [0, 1]; ties in J go to the
        candidate closest to 0.5 (then the smaller).

    Raises:
        ValueError: bad shapes or values, C > 2, or a single class in ``labels``.
    """
    is_pos, p_pos = _binary(labels, probs, positive_class, "youden_threshold")
    candidates = _candidates(p_pos)
    j = _youden_j(is_pos, p_pos, candidates)
    return _closest_to_half(candidates, np.isclose(j, j.max(), rtol=0, atol=1e-12))


def prevalence_threshold(labels, probs, positive_class: int = 1) -> float:
    """Threshold that calls as many validation scans positive as there are positives.

    Quantile rule: with k = the number of validation positives (prevalence x N), the threshold
    is the midpoint between the k-th and (k+1)-th largest p(positive), i.e. the (1 - prevalence)
    quantile of the scores, so the share of predicted positives equals the prevalence. With
    ties across that boundary no threshold calls exactly k scans positive; the candidate whose
    count is nearest to k is taken (equally near: closest to 0.5, then the smaller).

    Args / Raises: as :func:`youden_threshold`.
    """
    is_pos, p_pos = _binary(labels, probs, positive_class, "prevalence_threshold")
    candidates = _candidates(p_pos)
    gap = np.abs(_called_positive(p_pos, candidates) - int(is_pos.sum()))
    return _closest_to_half(candidates, gap == gap.min())


def _check_threshold(threshold) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.integer, np.floating)) \
            or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number or None, got {threshold!r}")
    return float(threshold)


def predict_at(probs, threshold: float | None = None, positive_class: int = 1) -> np.ndarray:
    """Predicted classes (N,) int64 at a decision threshold.

    Binary: ``positive_class`` where ``probs[:, positive_class] >= threshold``, the other class
    elsewhere; ``threshold=None`` is argmax. Threshold 0.5 equals argmax except at a tie
    (p = 0.5 exactly, or rows whose sums differ from 1 by rounding): the threshold rule calls a
    tie positive, argmax takes the first column (class 0). C > 2: argmax only.

    Raises:
        ValueError: bad ``probs``, a threshold for C > 2, a non-finite threshold, or a bad
            ``positive_class``.
    """
    p = _check_probs(probs)
    if threshold is None:
        return p.argmax(axis=1).astype(np.int64)
    if p.shape[1] != 2:
        raise ValueError(f"threshold is for binary probs only, got C = {p.shape[1]} classes (use threshold=None)")
    t = _check_threshold(threshold)
    if positive_class not in (0, 1):
        raise ValueError(f"positive_class must be 0 or 1, got {positive_class}")
    return np.where(p[:, positive_class] >= t, positive_class, 1 - positive_class).astype(np.int64)


def threshold_metrics(labels, probs, threshold: float | None = None, positive_class: int = 1) -> dict:
    """Accuracy, balanced accuracy, precision, recall, F1 and specificity at a decision.

    The decision is :func:`predict_at` (``threshold=None``: argmax, the decision of
    ``metrics.classification_metrics``, whose values these then equal). Binary: precision,
    recall, F1 refer to ``positive_class``, specificity is the recall of the other class;
    C > 2: macro averages over the one-vs-rest problems. Balanced accuracy is the mean recall
    over the classes present in ``labels``. Undefined ratios are NaN, and macro means skip
    them, as in ``metrics.classification_metrics``.

    Returns:
        ``{"accuracy", "balanced_accuracy", "precision", "recall", "f1", "specificity": float,
        "threshold": the threshold as float, or None for argmax}``.
    """
    y, p = check_labels_and_probs(labels, probs)
    if p.shape[1] == 2 and positive_class not in (0, 1):
        raise ValueError(f"positive_class must be 0 or 1, got {positive_class}")
    pred = predict_at(p, threshold, positive_class)
    n_classes = p.shape[1]
    cm = np.bincount(y * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    tp = np.diag(cm).astype(np.float64)
    fp, fn = cm.sum(axis=0) - tp, cm.sum(axis=1) - tp
    tn = cm.sum() - tp - fp - fn
    precision, recall = safe_ratio(tp, tp + fp), safe_ratio(tp, tp + fn)  # (C,) each
    f1, specificity = safe_ratio(2 * tp, 2 * tp + fp + fn), safe_ratio(tn, tn + fp)
    if n_classes == 2:
        c = positive_class
        values = (precision[c], recall[c], f1[c], recall[1 - c])
    else:
        values = tuple(mean_without_nan(m) for m in (precision, recall, f1, specificity))
    return {"accuracy": float(tp.sum() / cm.sum()), "balanced_accuracy": float(mean_without_nan(recall)),
            "precision": float(values[0]), "recall": float(values[1]), "f1": float(values[2]),
            "specificity": float(values[3]),
            "threshold": None if threshold is None else _check_threshold(threshold)}


def best_balanced_accuracy(labels, probs, positive_class: int = 1) -> float:
    """Highest balanced accuracy (TPR + TNR) / 2 = (1 + J) / 2 that any threshold on
    p(positive) reaches on THESE predictions: an oracle of what the ranking allows, chosen with
    the labels it is scored on (optimistic; not a test-set result). Binary only.

    Raises: as :func:`youden_threshold`.
    """
    is_pos, p_pos = _binary(labels, probs, positive_class, "best_balanced_accuracy")
    return float((1 + _youden_j(is_pos, p_pos, _candidates(p_pos)).max()) / 2)
