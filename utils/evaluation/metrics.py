"""Classification metrics with stratified bootstrap confidence intervals, and the results table.

Everything takes the true labels ``y_true`` (N,) as integers in ``[0, C)`` and the predicted
class PROBABILITIES ``probs`` (N, C) (rows sum to 1). Hard predictions are ``argmax(probs)``;
ROC-AUC is always computed from the probabilities, never from hard labels (the seed's table
reported AUC = accuracy, which is what a ROC-AUC of hard 0/1 predictions degenerates to).

Conventions (the point estimates use scikit-learn):

* Binary (C = 2): precision, recall (= sensitivity), F1 and specificity refer to
  ``positive_class``; specificity = TN / (TN + FP) is the recall of the other class; ROC-AUC
  is ``roc_auc_score(y_true == positive_class, probs[:, positive_class])``.
* Multi-class (C > 2, e.g. MosMedData CT-0..CT-4): precision, recall, F1 and specificity are
  macro averages over the C one-vs-rest problems; ROC-AUC is the macro one-vs-rest AUC of
  ``probs[:, c]`` for ``y_true == c`` (scikit-learn's ``multi_class="ovr", average="macro"``).
* Undefined values are NaN, never a crash and never a silent 0: a ratio whose denominator is
  0 (precision when the model never predicts the class, recall / specificity when the class
  has no / all samples) is NaN, and macro averages skip NaN classes (scikit-learn's
  ``zero_division=np.nan``, computed here from the confusion matrix, as that option needs
  scikit-learn >= 1.3). ROC-AUC needs both positives and negatives: with a single class
  in ``y_true`` it is NaN; in the multi-class case classes absent from ``y_true`` are left
  out of the macro mean (their one-vs-rest AUC is undefined).

The bootstrap (Efron & Tibshirani 1993, percentile interval) resamples scans with
replacement, by default within each class so every resample keeps the class counts of the
test set (stratified). All metrics of all resamples are computed at once from per-resample
count vectors: confusion matrices as count-weighted sums, ROC-AUC as the Mann-Whitney
statistic ``AUC = c_pos^T W c_neg / (n_pos n_neg)`` with ``W[i, j] = [s_i > s_j] + [s_i = s_j] / 2``
over the original positives i and negatives j, which equals ``roc_auc_score`` on the
resampled data exactly (tests check this resample by resample).

Comparing two models on the same scans is in ``utils.evaluation.paired``, calibration
(reliability curves, ECE) in ``utils.evaluation.calibration``; both reuse the input checks and
the resampling helpers of this module.
"""
from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, roc_auc_score

from utils.atomic import atomic_write_text

SCALAR_METRICS = ("accuracy", "precision", "recall", "f1", "specificity", "roc_auc")
"""Names of the scalar metrics, in the order they are reported."""

DECISION_METRICS = ("accuracy", "balanced_accuracy", "precision", "recall", "f1", "specificity")
"""The metrics that depend on the decision rule, reported again at each model's
validation-chosen threshold as ``<metric>@val_threshold`` (binary only)."""

THRESHOLD_SUFFIX = "@val_threshold"

CSV_COLUMNS = ("model", "metric", "value", "ci_low", "ci_high")
"""Columns of ``evaluation_results.csv``."""

RATIO_TIE = 1e-9
"""Two scores that are ratios of scan counts (an AUC, an accuracy) and differ by less than this
are equal. Two that truly differ do so by at least 1 / (2 n_pos n_neg) for an AUC (> 1e-9 below
~22,000 scans per class) or 1 / n for an accuracy, while one count summed in another order differs
by ~1e-16: AdrenalMNIST3D seed 4's validation AUCs 0.8672248803827751 vs ...752 once switched its
correction off, and 212/240 - 256/300 is 0.03 less 1e-17, which would miss a goal of 0.03."""

MIN_RESAMPLES = 1000
"""Fewest bootstrap resamples accepted: at alpha = 0.05 each interval end then rests on at
least 25 resamples; fewer make the interval ends themselves noisy."""


# ----------------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------------

def check_labels_and_probs(y_true, probs, positive_class: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Validate and return ``y_true`` (N,) int64 and ``probs`` (N, C) float64."""
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if y.ndim != 1:
        raise ValueError(f"y_true must have shape (N,), got {y.shape}")
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"probs must have shape (N, C) with C >= 2, got {p.shape}")
    if p.shape[0] != y.shape[0]:
        raise ValueError(f"y_true has {y.shape[0]} samples but probs has {p.shape[0]}")
    if y.shape[0] == 0:
        raise ValueError("y_true and probs are empty")
    if y.dtype.kind not in "biuf" or (y.dtype.kind == "f" and not np.all(y == np.round(y))):
        raise ValueError(f"y_true must hold integer class labels, got dtype {y.dtype}")
    y = y.astype(np.int64)
    n_classes = p.shape[1]
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"y_true labels must lie in [0, {n_classes}) for probs with C = {n_classes}, "
                         f"got range [{y.min()}, {y.max()}]")
    if not np.all(np.isfinite(p)) or p.min() < 0 or p.max() > 1:
        raise ValueError("probs must be finite probabilities in [0, 1]")
    row_sums = p.sum(axis=1)
    if not np.allclose(row_sums, 1.0, atol=1e-3):
        worst = int(np.argmax(np.abs(row_sums - 1)))
        raise ValueError(f"probs rows must sum to 1 (softmax outputs); row {worst} sums to {row_sums[worst]:.6f}")
    if positive_class is not None and not 0 <= positive_class < n_classes:
        raise ValueError(f"positive_class must lie in [0, {n_classes}), got {positive_class}")
    return y, p


def check_bootstrap_settings(n_resamples: int, alpha: float) -> None:
    """Raise ValueError unless ``n_resamples`` is an integer >= ``MIN_RESAMPLES`` and 0 < alpha < 1."""
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)) or n_resamples < MIN_RESAMPLES:
        raise ValueError(f"n_resamples must be an integer >= {MIN_RESAMPLES}, got {n_resamples!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")


# ----------------------------------------------------------------------------------------
# point estimates
# ----------------------------------------------------------------------------------------

def binary_auc(is_pos: np.ndarray, scores: np.ndarray) -> float:
    """ROC-AUC of ``scores`` for the indicator ``is_pos``; NaN when only one class is present."""
    if is_pos.all() or not is_pos.any():
        return math.nan  # the ROC curve needs both positives and negatives
    return float(roc_auc_score(is_pos, scores))


def decide(p: np.ndarray, threshold: float | None, positive_class: int) -> np.ndarray:
    """Hard predictions (N,) of probabilities (N, C): ``argmax``, or, with a ``threshold``
    (binary only), ``positive_class`` iff its probability is >= the threshold."""
    if threshold is None:
        return p.argmax(axis=1)
    if p.shape[1] != 2 or not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"a decision threshold needs C = 2 and a value in [0, 1], got C = {p.shape[1]}, {threshold}")
    return np.where(p[:, positive_class] >= threshold, positive_class, 1 - positive_class)


def classification_metrics(y_true, probs, positive_class: int = 1, threshold: float | None = None) -> dict:
    """Accuracy, balanced accuracy, precision, recall, F1, specificity, ROC-AUC and the confusion matrix.

    Args:
        y_true: (N,) integer labels in ``[0, C)``.
        probs: (N, C) class probabilities (rows sum to 1); predictions are ``argmax``, or at
            ``threshold`` (binary: positive iff p(positive) >= threshold).
        positive_class: the class that precision, recall, F1 and specificity refer to when
            C = 2 (ignored for C > 2, where they are macro averages; see module docstring).

    Returns:
        ``{"accuracy", "balanced_accuracy", "precision", "recall", "f1", "specificity", "roc_auc":
        float, "confusion_matrix": (C, C) int64 array, rows = true class, columns = predicted}``.
        Balanced accuracy is the mean recall over classes. Undefined values are NaN (see module
        docstring).
    """
    y, p = check_labels_and_probs(y_true, probs, positive_class)
    n_classes = p.shape[1]
    labels = list(range(n_classes))
    pred = decide(p, threshold, positive_class)
    cm = confusion_matrix(y, pred, labels=labels).astype(np.int64)  # (C, C)

    # per class c (one-vs-rest), from the confusion matrix: NaN where a denominator is 0
    tp = np.diag(cm)  # (C,)
    fp, fn = cm.sum(axis=0) - tp, cm.sum(axis=1) - tp
    tn = cm.sum() - tp - fp - fn
    per_class = {"precision": safe_ratio(tp, tp + fp), "recall": safe_ratio(tp, tp + fn),
                 "f1": safe_ratio(2 * tp, 2 * tp + fp + fn), "specificity": safe_ratio(tn, tn + fp)}
    if n_classes == 2:
        precision, recall, f1_score, specificity = (per_class[k][positive_class] for k in per_class)
        auc = binary_auc(y == positive_class, p[:, positive_class])
    else:
        precision, recall, f1_score, specificity = (mean_without_nan(per_class[k]) for k in per_class)
        per_class_auc = [binary_auc(y == c, p[:, c]) for c in labels]
        auc = mean_without_nan(np.array(per_class_auc))
    recalls = safe_ratio(np.diag(cm), cm.sum(axis=1))  # (C,)
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": float(mean_without_nan(recalls)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1_score),
        "specificity": float(specificity),
        "roc_auc": float(auc),
        "confusion_matrix": cm,
    }


# ----------------------------------------------------------------------------------------
# vectorised metrics over bootstrap resamples
# ----------------------------------------------------------------------------------------

def safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` with NaN where ``den == 0``."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def mean_without_nan(x: np.ndarray, axis: int | None = None) -> np.ndarray | float:
    """Mean over non-NaN entries; NaN (without a RuntimeWarning) where all are NaN."""
    x = np.asarray(x, dtype=np.float64)
    valid = ~np.isnan(x)
    total = np.where(valid, x, 0.0).sum(axis=axis)
    count = valid.sum(axis=axis)
    return safe_ratio(total, count) if axis is not None else float(safe_ratio(total, count))


def resample_indices(y: np.ndarray, n_resamples: int, rng: np.random.Generator, stratified: bool) -> np.ndarray:
    """Bootstrap index arrays (R, N); stratified: the i-th block of each row resamples class i."""
    n = y.shape[0]
    if not stratified:
        return rng.integers(0, n, size=(n_resamples, n))  # (R, N)
    blocks = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)  # (N_c,)
        blocks.append(members[rng.integers(0, members.size, size=(n_resamples, members.size))])  # (R, N_c)
    return np.concatenate(blocks, axis=1)  # (R, N)


def resample_counts(idx: np.ndarray, n: int) -> np.ndarray:
    """How often each of the n samples occurs in each resample: (R, N) from indices (R, N')."""
    r = idx.shape[0]
    flat = (idx + n * np.arange(r)[:, None]).ravel()
    return np.bincount(flat, minlength=r * n).reshape(r, n)  # (R, N)


def auc_from_counts(counts: np.ndarray, is_pos: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Mann-Whitney ROC-AUC of every resample (R,), NaN where a resample lacks a class."""
    pos, neg = scores[is_pos], scores[~is_pos]
    if pos.size == 0 or neg.size == 0:
        return np.full(counts.shape[0], np.nan)
    wins = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])  # (N_pos, N_neg)
    c_pos, c_neg = counts[:, is_pos].astype(np.float64), counts[:, ~is_pos].astype(np.float64)
    pairs = ((c_pos @ wins) * c_neg).sum(axis=1)  # (R,) = c_pos^T W c_neg per resample
    return safe_ratio(pairs, c_pos.sum(axis=1) * c_neg.sum(axis=1))


def metrics_from_indices(y: np.ndarray, p: np.ndarray, idx: np.ndarray, positive_class: int,
                         threshold: float | None = None) -> dict[str, np.ndarray]:
    """Every scalar metric (and the balanced accuracy) for every resample ``idx`` (R, N'):
    dict name -> (R,).

    Same definitions as :func:`classification_metrics`, computed from count vectors.
    """
    n, n_classes = p.shape
    pred = decide(p, threshold, positive_class)
    counts = resample_counts(idx, n)  # (R, N)
    cell = np.zeros((n, n_classes * n_classes))  # (N, C*C): one-hot of (true, pred)
    cell[np.arange(n), y * n_classes + pred] = 1.0
    cm = (counts @ cell).reshape(-1, n_classes, n_classes)  # (R, C, C) rows = true
    tp = np.diagonal(cm, axis1=1, axis2=2)  # (R, C)
    col, row = cm.sum(axis=1), cm.sum(axis=2)  # predicted / true totals per class, (R, C)
    total = cm.sum(axis=(1, 2))  # (R,)
    fp, fn = col - tp, row - tp
    tn = total[:, None] - col - row + tp
    precision = safe_ratio(tp, tp + fp)  # (R, C)
    recall = safe_ratio(tp, tp + fn)
    f1 = safe_ratio(2 * tp, 2 * tp + fp + fn)
    specificity = safe_ratio(tn, tn + fp)
    per_class = {"precision": precision, "recall": recall, "f1": f1, "specificity": specificity}  # each (R, C)
    if n_classes == 2:
        auc = auc_from_counts(counts, y == positive_class, p[:, positive_class])
        out = {name: m[:, positive_class] for name, m in per_class.items()}
    else:
        auc = mean_without_nan(np.stack([auc_from_counts(counts, y == c, p[:, c]) for c in range(n_classes)], axis=1), axis=1)
        out = {name: mean_without_nan(m, axis=1) for name, m in per_class.items()}  # macro averages
    return {"accuracy": tp.sum(axis=1) / total, "balanced_accuracy": mean_without_nan(recall, axis=1), **out,
            "roc_auc": auc}


def bootstrap_ci(y_true, probs, n_resamples: int = 2000, alpha: float = 0.05, seed: int = 0,
                 stratified: bool = True, positive_class: int = 1, threshold: float | None = None,
                 metrics=SCALAR_METRICS) -> dict[str, tuple[float, float, float]]:
    """Point estimates with percentile bootstrap confidence intervals.

    Args:
        y_true: (N,) integer labels in ``[0, C)``.
        probs: (N, C) class probabilities.
        n_resamples: bootstrap resamples, at least ``MIN_RESAMPLES`` (1000).
        alpha: the interval covers ``1 - alpha`` (0.05 -> 95%), from the ``alpha/2`` and
            ``1 - alpha/2`` percentiles of the resampled metric.
        seed: seed of the ``np.random.default_rng`` drawing the resamples. The resamples
            depend only on ``y_true``, the seed and ``n_resamples``, so models evaluated on
            the same test set with the same seed see the same resampled scans (paired).
        stratified: resample within each class, keeping the class counts of ``y_true`` in
            every resample (so recall, specificity and AUC are always defined).
        positive_class, threshold: as in :func:`classification_metrics`.
        metrics: which metrics to return (``SCALAR_METRICS`` or ``DECISION_METRICS`` names).

    Returns:
        dict metric name -> ``(value, ci_low, ci_high)``; ``value`` is the
        point estimate on the full data. Resamples where a metric is undefined (NaN, e.g.
        precision when a resample has no positive prediction) are left out of its percentiles;
        if all are, the interval is ``(nan, nan)``.
    """
    y, p = check_labels_and_probs(y_true, probs, positive_class)
    check_bootstrap_settings(n_resamples, alpha)
    point = classification_metrics(y, p, positive_class, threshold)
    idx = resample_indices(y, int(n_resamples), np.random.default_rng(seed), stratified)  # (R, N)
    boot = metrics_from_indices(y, p, idx, positive_class, threshold)
    out = {}
    for name in metrics:
        values = boot[name][~np.isnan(boot[name])]
        if values.size == 0:
            low = high = math.nan
        else:
            low, high = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
        out[name] = (point[name], float(low), float(high))
    return out


# ----------------------------------------------------------------------------------------
# results table
# ----------------------------------------------------------------------------------------

def metrics_table(rows: Mapping[str, tuple], n_resamples: int = 2000, alpha: float = 0.05, seed: int = 0,
                  stratified: bool = True, positive_class: int = 1, include_confusion: bool = True,
                  thresholds: Mapping[str, float] | None = None) -> list[dict]:
    """Long-format table of every model's metrics with bootstrap confidence intervals.

    Args:
        rows: model name -> ``(y_true (N,), probs (N, C))``.
        n_resamples, alpha, seed, stratified, positive_class: as in :func:`bootstrap_ci`
            (the same seed for every model, so models on the same test set are compared on
            the same resamples).
        include_confusion: also add one row per confusion-matrix cell, named
            ``confusion_true{i}_pred{j}``, holding the count, with ``ci_low = ci_high = None``
            (no interval).
        thresholds: model -> its decision threshold chosen on the validation split (binary):
            adds ``threshold@val_threshold`` (the value) and every ``DECISION_METRICS`` entry at
            that threshold as ``<metric>@val_threshold``, with intervals from the same resamples.

    Returns:
        list of ``{"model", "metric", "value", "ci_low", "ci_high"}`` dicts, models in the
        order given, metrics in ``SCALAR_METRICS`` order then the confusion cells.
    """
    table = []
    for model, (y_true, probs) in rows.items():
        cis = bootstrap_ci(y_true, probs, n_resamples=n_resamples, alpha=alpha, seed=seed,
                           stratified=stratified, positive_class=positive_class)
        for metric in SCALAR_METRICS:
            value, low, high = cis[metric]
            table.append({"model": model, "metric": metric, "value": value, "ci_low": low, "ci_high": high})
        if thresholds is not None and model in thresholds:
            at = bootstrap_ci(y_true, probs, n_resamples=n_resamples, alpha=alpha, seed=seed, stratified=stratified,
                              positive_class=positive_class, threshold=thresholds[model], metrics=DECISION_METRICS)
            table.append({"model": model, "metric": "threshold" + THRESHOLD_SUFFIX, "value": float(thresholds[model]),
                          "ci_low": None, "ci_high": None})
            for metric in DECISION_METRICS:
                value, low, high = at[metric]
                table.append({"model": model, "metric": metric + THRESHOLD_SUFFIX, "value": value, "ci_low": low,
                              "ci_high": high})
        if include_confusion:
            cm = classification_metrics(y_true, probs, positive_class)["confusion_matrix"]
            for i, j in np.ndindex(*cm.shape):
                table.append({"model": model, "metric": f"confusion_true{i}_pred{j}", "value": int(cm[i, j]),
                              "ci_low": None, "ci_high": None})
    return table


def csv_cell(value) -> str:
    """CSV text of one cell: None -> empty (not applicable), floats at full precision, NaN -> 'nan'."""
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    return str(value)


def write_metrics_csv(rows: Iterable[Mapping], path: str | Path) -> Path:
    """Write table rows (as from :func:`metrics_table`) atomically as CSV with ``CSV_COLUMNS``.

    Missing intervals (None) are written as empty cells, undefined values (NaN) as ``nan``.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for i, row in enumerate(rows):
        if set(row) != set(CSV_COLUMNS):
            raise ValueError(f"metrics row {i} must have exactly the keys {CSV_COLUMNS}, got {tuple(row)}")
        writer.writerow([csv_cell(row[column]) for column in CSV_COLUMNS])
    atomic_write_text(path, buffer.getvalue())
    return Path(path)
