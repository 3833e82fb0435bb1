"""Calibration of predicted class probabilities: top-label reliability curves and expected
calibration error (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017, eqs. 2-3).

Inputs as in ``utils.evaluation.metrics``: labels ``y_true`` (N,) in ``[0, C)`` and class
probabilities ``probs`` (N, C). The confidence of a prediction is its top probability and it is
correct when ``argmax(probs) == y_true``.
"""
from __future__ import annotations

import numpy as np

from utils.evaluation.metrics import check_labels_and_probs, safe_ratio


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
    y, p = check_labels_and_probs(y_true, probs)
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    confidence = p.max(axis=1)  # (N,)
    correct = (p.argmax(axis=1) == y).astype(np.float64)  # (N,)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.searchsorted(edges[1:-1], confidence, side="left")  # (N,) bin index in [0, n_bins)
    count = np.bincount(which, minlength=n_bins)
    return {
        "bin_edges": edges,
        "confidence": safe_ratio(np.bincount(which, weights=confidence, minlength=n_bins), count),
        "accuracy": safe_ratio(np.bincount(which, weights=correct, minlength=n_bins), count),
        "count": count,
    }


def quantile_reliability(y_true, probs, n_bins: int = 10) -> dict[str, np.ndarray]:
    """Top-label reliability on QUANTILE bins (equal counts, so no bin is empty or holds all):
    ``{edges (B+1,), confidence (B,), accuracy (B,), count (B,), ece}`` with at most
    ``n_bins`` bins and at least 5 predictions per bin (fewer bins for small sets)."""
    y, p = check_labels_and_probs(y_true, probs)
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
