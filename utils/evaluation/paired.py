"""Comparing models on the same test scans: a paired bootstrap of the ROC-AUC difference, and
a metric's mean and spread over seeds.

:func:`paired_auc_difference` scores both models on the same resamples, so the interval is that
of the AUC difference itself (a paired bootstrap), which is narrower than two separate intervals
suggest when the models agree on which scans are hard. The resamples and the AUC rule are those
of ``utils.evaluation.metrics``. :func:`seed_summary` gives a metric's mean and sample standard
deviation over seeds.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from utils.evaluation.metrics import (
    auc_from_counts,
    binary_auc,
    check_bootstrap_settings,
    check_labels_and_probs,
    mean_without_nan,
    resample_counts,
    resample_indices,
)


def _check_scores(y: np.ndarray, scores, name: str) -> np.ndarray:
    """``scores`` as float64: (N,) positive-class scores (binary) or (N, C) probabilities."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 1:
        if s.shape[0] != y.shape[0]:
            raise ValueError(f"labels has {y.shape[0]} samples but {name} has {s.shape[0]}")
        if not np.all(np.isfinite(s)):
            raise ValueError(f"{name} must be finite")
        return s
    _, s = check_labels_and_probs(y, s)  # (N, C) probabilities: same checks as classification_metrics
    return s


def _auc_rule(y: np.ndarray, scores: np.ndarray, positive_class: int,
              auc_of: Callable[[np.ndarray, np.ndarray], np.ndarray | float]):
    """The AUC rule of ``metrics.classification_metrics`` with ``auc_of(is_pos, score_column)``:
    binary -> the positive class's column; C > 2 -> macro one-vs-rest (NaN classes skipped)."""
    if scores.ndim == 1:
        return auc_of(y == positive_class, scores)
    if scores.shape[1] == 2:
        return auc_of(y == positive_class, scores[:, positive_class])
    per_class = [auc_of(y == c, scores[:, c]) for c in range(scores.shape[1])]
    if np.ndim(per_class[0]) == 0:
        return mean_without_nan(np.array(per_class, dtype=np.float64))
    return mean_without_nan(np.stack(per_class, axis=1), axis=1)


def paired_auc_difference(labels, scores_a, scores_b, n_resamples: int = 2000, seed: int = 0,
                          stratified: bool = True, alpha: float = 0.05, positive_class: int = 1) -> dict:
    """ROC-AUC(a) - ROC-AUC(b) on the same scans, with a paired percentile bootstrap.

    Each resample draws scans (with replacement; within each class when ``stratified``, as
    ``metrics.bootstrap_ci`` does, with the same resampling helper) and scores BOTH models on the
    same drawn scans, so what the two models share (easy and hard scans) cancels in the
    difference: the interval is that of the difference, not of two independent AUCs.

    Args:
        labels: (N,) integer labels in ``[0, C)``.
        scores_a, scores_b: the two models' outputs on the same scans in the same order:
            (N, C) class probabilities (the AUC rule of ``metrics.classification_metrics``:
            column ``positive_class`` when C = 2, macro one-vs-rest when C > 2) or, binary
            only, (N,) positive-class scores (any monotone score; ranks are what count).
        n_resamples: bootstrap resamples, at least ``metrics.MIN_RESAMPLES`` (1000).
        seed: seed of the ``np.random.default_rng`` drawing the resamples; with the same seed
            they are the same resamples ``metrics.bootstrap_ci`` draws.
        stratified: resample within each class (every resample keeps the class counts).
        alpha: the interval covers ``1 - alpha``.
        positive_class: as in ``metrics.classification_metrics`` (binary only).

    Returns:
        ``{"diff": AUC(a) - AUC(b) on all scans, "ci_low", "ci_high": percentile interval of
        the resampled differences, "p_value": two-sided bootstrap p-value}``. The p-value is
        twice the share of resamples whose difference lies on the other side of 0 from
        ``diff`` (0 itself counts as the other side), capped at 1; it is 1 when ``diff`` is
        0 and 0 when no resample crosses 0 (i.e. below ``2 / n_resamples``). Resamples where
        the AUC is undefined (unstratified, one class drawn) are left out.

    Raises:
        ValueError: bad shapes or values, ``scores_a`` and ``scores_b`` of different shapes,
            a single class in ``labels``, or bad ``n_resamples`` / ``alpha``.
    """
    y, a, b = check_paired_scores(labels, scores_a, scores_b, positive_class)
    check_bootstrap_settings(n_resamples, alpha)

    diff = float(_auc_rule(y, a, positive_class, binary_auc) - _auc_rule(y, b, positive_class, binary_auc))
    idx = resample_indices(y, int(n_resamples), np.random.default_rng(seed), stratified)  # (R, N)
    counts = resample_counts(idx, y.shape[0])  # (R, N): the SAME resampled scans for both models

    def boot_auc(scores):
        return _auc_rule(y, scores, positive_class, lambda is_pos, s: auc_from_counts(counts, is_pos, s))

    low, high, p_value = bootstrap_interval(diff, boot_auc(a) - boot_auc(b), alpha)
    return {"diff": diff, "ci_low": low, "ci_high": high, "p_value": p_value}


def check_paired_scores(labels, scores_a, scores_b, positive_class: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated ``(y (N,) int64, a, b)`` of two models' scores on the same scans (the inputs of
    :func:`paired_auc_difference`); ``a``, ``b`` are (N,) or (N, C) float64."""
    y = np.asarray(labels)
    if y.ndim != 1 or y.shape[0] == 0:
        raise ValueError(f"labels must have shape (N,) with N > 0, got {y.shape}")
    if y.dtype.kind not in "biuf" or (y.dtype.kind == "f" and not np.all(y == np.round(y))):
        raise ValueError(f"labels must hold integer class labels, got dtype {y.dtype}")
    y = y.astype(np.int64)
    a, b = _check_scores(y, scores_a, "scores_a"), _check_scores(y, scores_b, "scores_b")
    if a.shape != b.shape:
        raise ValueError(f"scores_a {a.shape} and scores_b {b.shape} must have the same shape")
    if a.ndim == 1 and not np.isin(y, (0, 1)).all():
        raise ValueError("(N,) scores are for binary labels in {0, 1}; pass (N, C) probabilities otherwise")
    n_classes = 2 if a.ndim == 1 else a.shape[1]
    if n_classes == 2 and not 0 <= positive_class < 2:
        raise ValueError(f"positive_class must be 0 or 1, got {positive_class}")
    if np.unique(y).size < 2:
        raise ValueError("labels hold a single class: ROC-AUC is undefined")
    return y, a, b


def bootstrap_interval(diff: float, boot: np.ndarray, alpha: float = 0.05) -> tuple[float, float, float]:
    """(ci_low, ci_high, p_value) of a paired difference ``diff`` from its bootstrap values
    ``boot`` (NaN values left out): the percentile interval, and twice the share of resamples on
    the other side of 0 from ``diff`` (0 itself counts as the other side), capped at 1; p = 1 when
    ``diff`` is 0, NaN when it is NaN or no resample is defined."""
    boot = np.asarray(boot, dtype=np.float64)
    boot = boot[~np.isnan(boot)]
    if boot.size == 0:
        return math.nan, math.nan, math.nan
    low, high = np.percentile(boot, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    if diff > 0:
        p_value = min(1.0, 2 * float(np.mean(boot <= 0)))
    elif diff < 0:
        p_value = min(1.0, 2 * float(np.mean(boot >= 0)))
    else:
        p_value = 1.0 if diff == 0 else math.nan
    return float(low), float(high), p_value


def seed_summary(values) -> tuple[float, float]:
    """(mean, sample standard deviation, ddof = 1) of a metric over seeds; NaN values are
    left out; the standard deviation is NaN for fewer than two values.

    Raises:
        ValueError: ``values`` is empty (or all NaN) or not one-dimensional.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"values must be one-dimensional, got shape {v.shape}")
    v = v[~np.isnan(v)]
    if v.size == 0:
        raise ValueError("values holds no (non-NaN) number")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan
