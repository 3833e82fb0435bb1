"""Classification metrics with stratified bootstrap confidence intervals, and calibration.

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
  ``zero_division=np.nan``). ROC-AUC needs both positives and negatives: with a single class
  in ``y_true`` it is NaN; in the multi-class case classes absent from ``y_true`` are left
  out of the macro mean (their one-vs-rest AUC is undefined).

The bootstrap (Efron & Tibshirani 1993, percentile interval) resamples scans with
replacement, by default within each class so every resample keeps the class counts of the
test set (stratified). All metrics of all resamples are computed at once from per-resample
count vectors: confusion matrices as count-weighted sums, ROC-AUC as the Mann-Whitney
statistic ``AUC = c_pos^T W c_neg / (n_pos n_neg)`` with ``W[i, j] = [s_i > s_j] + [s_i = s_j] / 2``
over the original positives i and negatives j, which equals ``roc_auc_score`` on the
resampled data exactly (tests check this resample by resample).

Comparing two models on the same test scans (:func:`paired_auc_difference`): the same
resamples score both models, so the interval is that of the AUC difference itself (a paired
bootstrap), which is narrower than two separate intervals suggest when the models agree on
which scans are hard. :func:`seed_summary` gives a metric's mean and sample standard deviation
over seeds.

Calibration: top-label expected calibration error and reliability curve (Guo et al.,
"On Calibration of Modern Neural Networks", ICML 2017, eqs. 2-3).
"""
from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support, roc_auc_score

from utils.atomic import atomic_write_text

SCALAR_METRICS = ("accuracy", "precision", "recall", "f1", "specificity", "roc_auc")
"""Names of the scalar metrics, in the order they are reported."""

CSV_COLUMNS = ("model", "metric", "value", "ci_low", "ci_high")
"""Columns of ``evaluation_results.csv``."""

MIN_RESAMPLES = 1000
"""Fewest bootstrap resamples accepted: at alpha = 0.05 each interval end then rests on at
least 25 resamples; fewer make the interval ends themselves noisy."""


# ----------------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------------

def _check_inputs(y_true, probs, positive_class: int | None = None) -> tuple[np.ndarray, np.ndarray]:
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


# ----------------------------------------------------------------------------------------
# point estimates
# ----------------------------------------------------------------------------------------

def _binary_auc(is_pos: np.ndarray, scores: np.ndarray) -> float:
    """ROC-AUC of ``scores`` for the indicator ``is_pos``; NaN when only one class is present."""
    if is_pos.all() or not is_pos.any():
        return math.nan  # the ROC curve needs both positives and negatives
    return float(roc_auc_score(is_pos, scores))


def classification_metrics(y_true, probs, positive_class: int = 1) -> dict:
    """Accuracy, precision, recall, F1, specificity, ROC-AUC and the confusion matrix.

    Args:
        y_true: (N,) integer labels in ``[0, C)``.
        probs: (N, C) class probabilities (rows sum to 1); predictions are ``argmax``.
        positive_class: the class that precision, recall, F1 and specificity refer to when
            C = 2 (ignored for C > 2, where they are macro averages; see module docstring).

    Returns:
        ``{"accuracy", "precision", "recall", "f1", "specificity", "roc_auc": float,
        "confusion_matrix": (C, C) int64 array, rows = true class, columns = predicted}``.
        Undefined values are NaN (see module docstring).
    """
    y, p = _check_inputs(y_true, probs, positive_class)
    n_classes = p.shape[1]
    labels = list(range(n_classes))
    pred = p.argmax(axis=1)
    cm = confusion_matrix(y, pred, labels=labels).astype(np.int64)  # (C, C)

    if n_classes == 2:
        prec, rec, f1, _ = precision_recall_fscore_support(
            y, pred, labels=[positive_class], average=None, zero_division=np.nan)
        negative_class = 1 - positive_class
        _, spec, _, _ = precision_recall_fscore_support(
            y, pred, labels=[negative_class], average=None, zero_division=np.nan)
        precision, recall, f1_score, specificity = prec[0], rec[0], f1[0], spec[0]
        auc = _binary_auc(y == positive_class, p[:, positive_class])
    else:
        precision, recall, f1_score, _ = precision_recall_fscore_support(
            y, pred, labels=labels, average="macro", zero_division=np.nan)
        # specificity of class c = TN / (TN + FP) = recall of "not c" in the one-vs-rest problem
        fp = cm.sum(axis=0) - np.diag(cm)
        tn = cm.sum() - cm.sum(axis=0) - cm.sum(axis=1) + np.diag(cm)
        specificity = _nanmean(_safe_ratio(tn, tn + fp))
        per_class = [_binary_auc(y == c, p[:, c]) for c in labels]
        auc = _nanmean(np.array(per_class))
    return {
        "accuracy": float(accuracy_score(y, pred)),
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

def _safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` with NaN where ``den == 0``."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _nanmean(x: np.ndarray, axis: int | None = None) -> np.ndarray | float:
    """Mean over non-NaN entries; NaN (without a RuntimeWarning) where all are NaN."""
    x = np.asarray(x, dtype=np.float64)
    valid = ~np.isnan(x)
    total = np.where(valid, x, 0.0).sum(axis=axis)
    count = valid.sum(axis=axis)
    return _safe_ratio(total, count) if axis is not None else float(_safe_ratio(total, count))


def _resample_indices(y: np.ndarray, n_resamples: int, rng: np.random.Generator, stratified: bool) -> np.ndarray:
    """Bootstrap index arrays (R, N); stratified: the i-th block of each row resamples class i."""
    n = y.shape[0]
    if not stratified:
        return rng.integers(0, n, size=(n_resamples, n))  # (R, N)
    blocks = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)  # (N_c,)
        blocks.append(members[rng.integers(0, members.size, size=(n_resamples, members.size))])  # (R, N_c)
    return np.concatenate(blocks, axis=1)  # (R, N)


def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    """How often each of the n samples occurs in each resample: (R, N) from indices (R, N')."""
    r = idx.shape[0]
    flat = (idx + n * np.arange(r)[:, None]).ravel()
    return np.bincount(flat, minlength=r * n).reshape(r, n)  # (R, N)


def _auc_from_counts(counts: np.ndarray, is_pos: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Mann-Whitney ROC-AUC of every resample (R,), NaN where a resample lacks a class."""
    pos, neg = scores[is_pos], scores[~is_pos]
    if pos.size == 0 or neg.size == 0:
        return np.full(counts.shape[0], np.nan)
    wins = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])  # (N_pos, N_neg)
    c_pos, c_neg = counts[:, is_pos].astype(np.float64), counts[:, ~is_pos].astype(np.float64)
    pairs = ((c_pos @ wins) * c_neg).sum(axis=1)  # (R,) = c_pos^T W c_neg per resample
    return _safe_ratio(pairs, c_pos.sum(axis=1) * c_neg.sum(axis=1))


def _metrics_from_indices(y: np.ndarray, p: np.ndarray, idx: np.ndarray, positive_class: int) -> dict[str, np.ndarray]:
    """Every scalar metric for every resample ``idx`` (R, N'): dict name -> (R,).

    Same definitions as :func:`classification_metrics`, computed from count vectors.
    """
    n, n_classes = p.shape
    pred = p.argmax(axis=1)
    counts = _counts(idx, n)  # (R, N)
    cell = np.zeros((n, n_classes * n_classes))  # (N, C*C): one-hot of (true, pred)
    cell[np.arange(n), y * n_classes + pred] = 1.0
    cm = (counts @ cell).reshape(-1, n_classes, n_classes)  # (R, C, C) rows = true
    tp = np.diagonal(cm, axis1=1, axis2=2)  # (R, C)
    col, row = cm.sum(axis=1), cm.sum(axis=2)  # predicted / true totals per class, (R, C)
    total = cm.sum(axis=(1, 2))  # (R,)
    fp, fn = col - tp, row - tp
    tn = total[:, None] - col - row + tp
    precision = _safe_ratio(tp, tp + fp)  # (R, C)
    recall = _safe_ratio(tp, tp + fn)
    f1 = _safe_ratio(2 * tp, 2 * tp + fp + fn)
    specificity = _safe_ratio(tn, tn + fp)
    per_class = {"precision": precision, "recall": recall, "f1": f1, "specificity": specificity}  # each (R, C)
    if n_classes == 2:
        auc = _auc_from_counts(counts, y == positive_class, p[:, positive_class])
        out = {name: m[:, positive_class] for name, m in per_class.items()}
    else:
        auc = _nanmean(np.stack([_auc_from_counts(counts, y == c, p[:, c]) for c in range(n_classes)], axis=1), axis=1)
        out = {name: _nanmean(m, axis=1) for name, m in per_class.items()}  # macro averages
    return {"accuracy": tp.sum(axis=1) / total, **out, "roc_auc": auc}


def bootstrap_ci(y_true, probs, n_resamples: int = 2000, alpha: float = 0.05, seed: int = 0,
                 stratified: bool = True, positive_class: int = 1) -> dict[str, tuple[float, float, float]]:
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
        positive_class: as in :func:`classification_metrics`.

    Returns:
        dict metric name (``SCALAR_METRICS``) -> ``(value, ci_low, ci_high)``; ``value`` is the
        point estimate on the full data. Resamples where a metric is undefined (NaN, e.g.
        precision when a resample has no positive prediction) are left out of its percentiles;
        if all are, the interval is ``(nan, nan)``.
    """
    y, p = _check_inputs(y_true, probs, positive_class)
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)) or n_resamples < MIN_RESAMPLES:
        raise ValueError(f"n_resamples must be an integer >= {MIN_RESAMPLES}, got {n_resamples!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    point = classification_metrics(y, p, positive_class)
    idx = _resample_indices(y, int(n_resamples), np.random.default_rng(seed), stratified)  # (R, N)
    boot = _metrics_from_indices(y, p, idx, positive_class)
    out = {}
    for name in SCALAR_METRICS:
        values = boot[name][~np.isnan(boot[name])]
        if values.size == 0:
            low = high = math.nan
        else:
            low, high = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
        out[name] = (point[name], float(low), float(high))
    return out


# ----------------------------------------------------------------------------------------
# paired comparison of two models on the same scans
# ----------------------------------------------------------------------------------------

def _check_scores(y: np.ndarray, scores, name: str) -> np.ndarray:
    """``scores`` as float64: (N,) positive-class scores (binary) or (N, C) probabilities."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 1:
        if s.shape[0] != y.shape[0]:
            raise ValueError(f"labels has {y.shape[0]} samples but {name} has {s.shape[0]}")
        if not np.all(np.isfinite(s)):
            raise ValueError(f"{name} must be finite")
        return s
    _, s = _check_inputs(y, s)  # (N, C) probabilities: same checks as classification_metrics
    return s


def _auc_rule(y: np.ndarray, scores: np.ndarray, positive_class: int,
              auc_of: Callable[[np.ndarray, np.ndarray], np.ndarray | float]):
    """The AUC rule of :func:`classification_metrics` with ``auc_of(is_pos, score_column)``:
    binary -> the positive class's column; C > 2 -> macro one-vs-rest (NaN classes skipped)."""
    if scores.ndim == 1:
        return auc_of(y == positive_class, scores)
    if scores.shape[1] == 2:
        return auc_of(y == positive_class, scores[:, positive_class])
    per_class = [auc_of(y == c, scores[:, c]) for c in range(scores.shape[1])]
    if np.ndim(per_class[0]) == 0:
        return _nanmean(np.array(per_class, dtype=np.float64))
    return _nanmean(np.stack(per_class, axis=1), axis=1)


def paired_auc_difference(labels, scores_a, scores_b, n_resamples: int = 2000, seed: int = 0,
                          stratified: bool = True, alpha: float = 0.05, positive_class: int = 1) -> dict:
    """ROC-AUC(a) - ROC-AUC(b) on the same scans, with a paired percentile bootstrap.

    Each resample draws scans (with replacement; within each class when ``stratified``, as
    :func:`bootstrap_ci` does, with the same resampling helper) and scores BOTH models on the
    same drawn scans, so what the two models share (easy and hard scans) cancels in the
    difference: the interval is that of the difference, not of two independent AUCs.

    Args:
        labels: (N,) integer labels in ``[0, C)``.
        scores_a, scores_b: the two models' outputs on the same scans in the same order:
            (N, C) class probabilities (the AUC rule of :func:`classification_metrics`:
            column ``positive_class`` when C = 2, macro one-vs-rest when C > 2) or, binary
            only, (N,) positive-class scores (any monotone score; ranks are what count).
        n_resamples: bootstrap resamples, at least ``MIN_RESAMPLES`` (1000).
        seed: seed of the ``np.random.default_rng`` drawing the resamples; with the same seed
            they are the same resamples :func:`bootstrap_ci` draws.
        stratified: resample within each class (every resample keeps the class counts).
        alpha: the interval covers ``1 - alpha``.
        positive_class: as in :func:`classification_metrics` (binary only).

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
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)) or n_resamples < MIN_RESAMPLES:
        raise ValueError(f"n_resamples must be an integer >= {MIN_RESAMPLES}, got {n_resamples!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")

    diff = float(_auc_rule(y, a, positive_class, _binary_auc) - _auc_rule(y, b, positive_class, _binary_auc))
    idx = _resample_indices(y, int(n_resamples), np.random.default_rng(seed), stratified)  # (R, N)
    counts = _counts(idx, y.shape[0])  # (R, N): the SAME resampled scans for both models

    def boot_auc(scores):
        return _auc_rule(y, scores, positive_class, lambda is_pos, s: _auc_from_counts(counts, is_pos, s))

    boot = boot_auc(a) - boot_auc(b)  # (R,)
    boot = boot[~np.isnan(boot)]
    if boot.size == 0:
        return {"diff": diff, "ci_low": math.nan, "ci_high": math.nan, "p_value": math.nan}
    low, high = np.percentile(boot, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    if diff > 0:
        p_value = min(1.0, 2 * float(np.mean(boot <= 0)))
    elif diff < 0:
        p_value = min(1.0, 2 * float(np.mean(boot >= 0)))
    else:
        p_value = 1.0
    return {"diff": diff, "ci_low": float(low), "ci_high": float(high), "p_value": p_value}


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


# ----------------------------------------------------------------------------------------
# results table
# ----------------------------------------------------------------------------------------

def metrics_table(rows: Mapping[str, tuple], n_resamples: int = 2000, alpha: float = 0.05, seed: int = 0,
                  stratified: bool = True, positive_class: int = 1, include_confusion: bool = True) -> list[dict]:
    """Long-format table of every model's metrics with bootstrap confidence intervals.

    Args:
        rows: model name -> ``(y_true (N,), probs (N, C))``.
        n_resamples, alpha, seed, stratified, positive_class: as in :func:`bootstrap_ci`
            (the same seed for every model, so models on the same test set are compared on
            the same resamples).
        include_confusion: also add one row per confusion-matrix cell, named
            ``confusion_true{i}_pred{j}``, holding the count, with ``ci_low = ci_high = None``
            (no interval).

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
        if include_confusion:
            cm = classification_metrics(y_true, probs, positive_class)["confusion_matrix"]
            for i, j in np.ndindex(*cm.shape):
                table.append({"model": model, "metric": f"confusion_true{i}_pred{j}", "value": int(cm[i, j]),
                              "ci_low": None, "ci_high": None})
    return table


def _csv_cell(value) -> str:
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
        writer.writerow([_csv_cell(row[column]) for column in CSV_COLUMNS])
    atomic_write_text(path, buffer.getvalue())
    return Path(path)


# ----------------------------------------------------------------------------------------
# calibration
# ----------------------------------------------------------------------------------------

def reliability_curve(y_true, probs, n_bins: int = 10) -> dict[str, np.ndarray]:
    """Top-label reliability curve (Guo et al. 2017): accuracy against confidence per bin.

    The confidence of a prediction is its top probability ``max_c probs[n, c]`` and it is
    correct when ``argmax == y_true``. Bins are ``n_bins`` equal-width intervals
    ``(e_b, e_{b+1}]`` of [0, 1] (the first also holds 0).

    Returns:
        ``{"bin_edges": (n_bins + 1,), "confidence": (n_bins,) mean confidence per bin,
        "accuracy": (n_bins,) fraction correct per bin, "count": (n_bins,) int}``; confidence
        and accuracy are NaN in empty bins.
    """
    y, p = _check_inputs(y_true, probs)
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    confidence = p.max(axis=1)  # (N,)
    correct = (p.argmax(axis=1) == y).astype(np.float64)  # (N,)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.searchsorted(edges[1:-1], confidence, side="left")  # (N,) bin index in [0, n_bins)
    count = np.bincount(which, minlength=n_bins)
    return {
        "bin_edges": edges,
        "confidence": _safe_ratio(np.bincount(which, weights=confidence, minlength=n_bins), count),
        "accuracy": _safe_ratio(np.bincount(which, weights=correct, minlength=n_bins), count),
        "count": count,
    }


def quantile_reliability(y_true, probs, n_bins: int = 10) -> dict[str, np.ndarray]:
    """Top-label reliability on QUANTILE bins (equal counts, so no bin is empty or holds all):
    ``{edges (B+1,), confidence (B,), accuracy (B,), count (B,), ece}`` with at most
    ``n_bins`` bins and at least 5 predictions per bin (fewer bins for small sets)."""
    y, p = _check_inputs(y_true, probs)
    conf, correct = p.max(axis=1), (p.argmax(axis=1) == y).astype(float)
    bins = max(1, min(n_bins, len(y) // 5))
    edges = np.unique(np.quantile(conf, np.linspace(0, 1, bins + 1)))
    if len(edges) < 2:
        edges = np.array([conf.min(), conf.max() + 1e-12])
    which = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, len(edges) - 2)
    count = np.bincount(which, minlength=len(edges) - 1).astype(float)
    keep = count > 0
    confidence = np.bincount(which, conf, len(edges) - 1)[keep] / count[keep]
    accuracy = np.bincount(which, correct, len(edges) - 1)[keep] / count[keep]
    ece = float(np.sum(count[keep] / len(y) * np.abs(accuracy - confidence)))
    lows, highs = edges[:-1][keep], edges[1:][keep]
    return {"edges": np.append(lows, highs[-1]), "low": lows, "high": highs, "confidence": confidence,
            "accuracy": accuracy, "count": count[keep].astype(int), "ece": ece}


def expected_calibration_error(y_true, probs, n_bins: int = 10) -> float:
    """Top-label ECE = sum_b (n_b / N) |acc_b - conf_b| (Guo et al. 2017, eq. 3), in [0, 1]."""
    curve = reliability_curve(y_true, probs, n_bins)
    filled = curve["count"] > 0
    weights = curve["count"][filled] / curve["count"].sum()
    return float(np.sum(weights * np.abs(curve["accuracy"][filled] - curve["confidence"][filled])))
