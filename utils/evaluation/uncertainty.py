"""Selective prediction and error detection: how well an uncertainty score tells the scans a
classifier gets wrong from those it gets right, and referral of the most uncertain scans.

Conventions: ``errors`` (N,) bool is True where the prediction was wrong; ``uncertainty`` (N,)
float, larger = less sure (pass a confidence negated). Referring abstains on the most uncertain
scans; the coverage is the share of scans kept.

Ties in ``uncertainty`` are broken IN EXPECTATION, never by array order: scans are kept in
ascending uncertainty, and when the k-th cut falls inside a group of tied scans, the m scans
kept from it count as m times the group's error rate. A constant score thus has risk = the
overall error rate at every coverage, and results are invariant to permuting the scans. In a
bootstrap resample the copies of one scan are tied with each other.

Risk-coverage curve, AURC and E-AURC follow Geifman et al., ICLR 2019 (risk at coverage k/N,
k = 1..N; AURC = the mean risk). The resamples and p-values of the paired comparison are those
of ``utils.evaluation.paired``. Scores of a sampling classifier (the diffusion model's S chains)
come from ``samples`` (S, N, C): class probabilities per chain; their mean over S is the prediction.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

from utils.evaluation.paired import bootstrap_interval
from utils.evaluation.metrics import (
    auc_from_counts,
    binary_auc,
    check_bootstrap_settings,
    resample_counts,
    resample_indices,
    safe_ratio,
)

COMPARED = ("aurc", "error_detection_auroc", "accuracy_at_80")
"""Metrics of :func:`paired_uncertainty_comparison`, in the order returned."""

_CLIP = 1e-6  # probabilities are clipped to [_CLIP, 1 - _CLIP] before a logit


# ----------------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------------

def _as_float(x, name: str) -> np.ndarray:
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must hold numbers") from None


def _check_vector(x, name: str) -> np.ndarray:
    """``x`` as a finite float64 (N,) array with N > 0."""
    v = _as_float(x, name)
    if v.ndim != 1 or v.shape[0] == 0:
        raise ValueError(f"{name} must have shape (N,) with N > 0, got {v.shape}")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return v


def _check_errors(errors, name: str = "errors") -> np.ndarray:
    """``errors`` (N,) as bool; accepts bool or 0/1 numbers."""
    e = _check_vector(errors, name)
    if not np.isin(e, (0.0, 1.0)).all():
        raise ValueError(f"{name} must be bool (True = wrong prediction) or 0/1")
    return e.astype(bool)


def _check_pair(errors, uncertainty, suffix: str = "") -> tuple[np.ndarray, np.ndarray]:
    e = _check_errors(errors, f"errors{suffix}")
    u = _check_vector(uncertainty, f"uncertainty{suffix}")
    if e.shape != u.shape:
        raise ValueError(f"errors{suffix} {e.shape} and uncertainty{suffix} {u.shape} must have the same shape (N,)")
    return e, u


def _check_probs(x, name: str = "probs", ndim: int = 2, min_chains: int = 1) -> np.ndarray:
    """``x`` as (N, C) probabilities, or (S, N, C) samples when ``ndim`` = 3: N > 0, C >= 2,
    at least ``min_chains`` chains, values in [0, 1] summing to 1 over C."""
    p = _as_float(x, name)
    if p.ndim != ndim or p.shape[-2] == 0 or p.shape[-1] < 2:
        shape = "(N, C)" if ndim == 2 else "(S, N, C)"
        raise ValueError(f"{name} must have shape {shape} with N > 0 and C >= 2, got {p.shape}")
    if ndim == 3 and p.shape[0] < min_chains:
        raise ValueError(f"{name} needs at least {min_chains} chains (S), got S = {p.shape[0]}")
    if not np.all(np.isfinite(p)) or p.min() < 0 or p.max() > 1:
        raise ValueError(f"{name} must be finite probabilities in [0, 1]")
    sums = p.sum(axis=-1)
    if not np.allclose(sums, 1.0, atol=1e-3):
        raise ValueError(f"{name} must sum to 1 over the classes (last axis); one row sums to "
                         f"{sums.flat[int(np.argmax(np.abs(sums - 1)))]:.6f}")
    return p


def _is_number(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float, np.integer, np.floating))


def _n_kept(coverage, n: int, name: str = "coverage") -> int:
    """ceil(coverage * n), the scans kept at ``coverage``, checked to lie in (0, 1]."""
    if not _is_number(coverage) or not 0 < coverage <= 1:
        raise ValueError(f"{name} must lie in (0, 1], got {coverage!r}")
    return max(1, math.ceil(round(float(coverage) * n, 9)))  # round: 0.07 * 100 is 7.000000000000001


# ----------------------------------------------------------------------------------------
# tie groups and expected errors, for one or many (resampled) sets of scans
# ----------------------------------------------------------------------------------------

def _grouped(counts: np.ndarray, errors: np.ndarray, uncertainty: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scans ``n`` and errors ``e`` (R, G) per resample and tie group (the G distinct values of
    ``uncertainty``, ascending), from ``counts`` (R, N): how often each scan is in each resample."""
    order = np.argsort(uncertainty, kind="stable")
    u, c = uncertainty[order], counts[:, order]
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])  # (G,) where each tie group begins
    return np.add.reduceat(c, starts, axis=1), np.add.reduceat(c * errors[order], starts, axis=1)


def _expected_errors(n: np.ndarray, e: np.ndarray, k: np.ndarray) -> np.ndarray:
    """(R, K) expected errors among the k most certain scans of each resample, for k (K,), or
    (R, K) one row per resample, in [1, that resample's total]: the groups before the cut in
    full, plus the cut group's error rate times the number kept from it."""
    r, g = n.shape
    end = np.cumsum(n, axis=1)  # (R, G)
    k = np.broadcast_to(k, (r, np.shape(k)[-1]))  # (R, K)
    offset = (int(end[:, -1].max()) + 1) * np.arange(r)[:, None]  # one searchsorted over all rows at once
    flat = np.searchsorted((end + offset).ravel(), (k + offset).ravel(), side="left")
    cut = flat.reshape(r, k.shape[1]) - g * np.arange(r)[:, None]  # (R, K) the group holding the k-th scan
    rows = np.arange(r)[:, None]
    before, errors_before = (end - n)[rows, cut], (np.cumsum(e, axis=1) - e)[rows, cut]
    return errors_before + (k - before) * e[rows, cut] / n[rows, cut]


def _aurc_grouped(n: np.ndarray, e: np.ndarray) -> np.ndarray:
    """(R,) AURC = (1/N) sum_k errors(k) / k, in closed form per group: a group of n_g scans
    after s scans and E errors adds (E - q s)(H_{s+n_g} - H_s) + e_g, q = e_g / n_g, H the
    harmonic numbers (empty groups add 0). N may differ between resamples (NaN where it is 0)."""
    total = n.sum(axis=1)  # (R,)
    harmonic = np.r_[0.0, np.cumsum(1.0 / np.arange(1, int(total.max()) + 1))]  # (max N + 1,)
    end = np.cumsum(n, axis=1)
    start, errors_before = end - n, np.cumsum(e, axis=1) - e
    rate = np.nan_to_num(safe_ratio(e, n))
    parts = (errors_before - rate * start) * (harmonic[end] - harmonic[start]) + e
    return safe_ratio(parts.sum(axis=1), total)


# ----------------------------------------------------------------------------------------
# risk-coverage, AURC, accuracy at coverage, error detection
# ----------------------------------------------------------------------------------------

def risk_coverage_curve(errors, uncertainty) -> dict:
    """Risk-coverage curve: the error rate among the k most certain scans, k = 1..N.

    Args:
        errors: (N,) bool, True where the prediction was wrong.
        uncertainty: (N,) float, larger = less sure; ties are broken in expectation.

    Returns:
        ``{"coverage": (N,) k / N, "risk": (N,) error rate among the k kept scans,
        "n_errors": int, "n": int}``.
    """
    e, u = _check_pair(errors, uncertainty)
    n_scans = e.shape[0]
    n, err = _grouped(np.ones((1, n_scans), dtype=np.int64), e, u)
    k = np.arange(1, n_scans + 1)
    risk = _expected_errors(n, err, k)[0] / k
    return {"coverage": k / n_scans, "risk": risk, "n_errors": int(e.sum()), "n": n_scans}


def aurc(errors, uncertainty) -> float:
    """Area under the risk-coverage curve: the mean risk over the coverages k / N (lower is better)."""
    return float(np.mean(risk_coverage_curve(errors, uncertainty)["risk"]))


def optimal_aurc(errors) -> float:
    """AURC of a perfect ranking (all correct scans first): with e errors among n,
    ``(1/n) sum_{k=n-e+1}^{n} (k - n + e) / k``."""
    err = _check_errors(errors)
    n, n_err = err.shape[0], int(err.sum())
    k = np.arange(n - n_err + 1, n + 1, dtype=np.float64)
    return float(np.sum((k - n + n_err) / k) / n)


def excess_aurc(errors, uncertainty) -> float:
    """E-AURC = AURC - optimal AURC (0 for a perfect ranking)."""
    return aurc(errors, uncertainty) - optimal_aurc(errors)


def accuracy_at_coverage(errors, uncertainty, coverages: Sequence[float] = (1.0, 0.9, 0.8, 0.7)) -> dict[float, float]:
    """Accuracy on the ceil(c N) most certain scans for each coverage c in (0, 1] (ties in
    expectation): dict c -> accuracy; c = 1.0 gives the plain accuracy."""
    e, u = _check_pair(errors, uncertainty)
    coverages = list(np.atleast_1d(coverages))
    if not coverages:
        raise ValueError("coverages is empty")
    k = np.array([_n_kept(c, e.shape[0], "every coverage") for c in coverages])
    n, err = _grouped(np.ones((1, e.shape[0]), dtype=np.int64), e, u)
    acc = 1.0 - _expected_errors(n, err, k)[0] / k
    return {float(c): float(a) for c, a in zip(coverages, acc)}


def error_detection_auroc(errors, uncertainty) -> float:
    """ROC-AUC of ``uncertainty`` as a score for ``errors`` (errors are the positives; ties
    count 1/2); NaN when there are no errors or only errors."""
    e, u = _check_pair(errors, uncertainty)
    return binary_auc(e, u)


# ----------------------------------------------------------------------------------------
# paired bootstrap of two models on the same scans
# ----------------------------------------------------------------------------------------

def _interval(diff: float, boot: np.ndarray, alpha: float) -> dict:
    """Percentile interval and two-sided p-value (``paired.bootstrap_interval``)."""
    low, high, p_value = bootstrap_interval(diff, boot, alpha)
    return {"ci_low": low, "ci_high": high, "p_value": p_value}


def boot_selective_metrics(counts: np.ndarray, errors: np.ndarray, uncertainty: np.ndarray) -> dict[str, np.ndarray]:
    """Each of ``COMPARED`` (R,) on every resample given by ``counts`` (R, N), whose totals may
    differ (a seed's share of scans drawn over several seeds' splits); NaN where a resample
    drew none of these scans."""
    n, err = _grouped(counts, errors, uncertainty)
    total = counts.sum(axis=1)  # (R,)
    k80 = np.maximum(1, np.ceil(np.round(0.8 * total, 9))).astype(np.int64)[:, None]  # (R, 1), as _n_kept
    drawn = total > 0
    at_80 = np.full(total.shape, np.nan)
    if drawn.any():
        at_80[drawn] = 1.0 - _expected_errors(n[drawn], err[drawn], k80[drawn])[:, 0] / k80[drawn, 0]
    return {"aurc": _aurc_grouped(n, err),
            "error_detection_auroc": auc_from_counts(counts, errors, uncertainty),
            "accuracy_at_80": at_80}


def paired_uncertainty_comparison(errors_a, uncertainty_a, errors_b, uncertainty_b, labels=None,
                                  n_resamples: int = 2000, seed: int = 0, alpha: float = 0.05) -> dict:
    """Model a against model b on the same scans: AURC, error-detection AUROC and accuracy at
    80% coverage, with a paired percentile bootstrap of each difference a - b.

    Args:
        errors_a, uncertainty_a: (N,) model a's errors and uncertainty (its own predictions).
        errors_b, uncertainty_b: (N,) model b's, on the same N scans in the same order.
        labels: optional (N,) integer labels; when given, resampling is within each class
            (``metrics.resample_indices``, stratified), else over all scans.
        n_resamples: at least ``metrics.MIN_RESAMPLES``; seed: of the resampling generator.
        alpha: the intervals cover ``1 - alpha``.

    Returns:
        ``{name: {"a", "b", "diff" (a - b on all scans), "ci_low", "ci_high", "p_value"}}`` for
        name in ``COMPARED``. Every resample scores both models on the same drawn scans; the
        copies of a drawn scan are tied. The p-value is twice the share of resampled
        differences on the other side of 0 from ``diff`` (0 counts as the other side), capped
        at 1, and 1 when ``diff`` is 0. Resamples where a difference is NaN (an AUROC with no
        error or only errors drawn) are left out.
    """
    ea, ua = _check_pair(errors_a, uncertainty_a, "_a")
    eb, ub = _check_pair(errors_b, uncertainty_b, "_b")
    if ea.shape != eb.shape:
        raise ValueError(f"model a has {ea.shape[0]} scans but model b has {eb.shape[0]}")
    n_scans = ea.shape[0]
    if labels is None:
        y, stratified = np.zeros(n_scans, dtype=np.int64), False
    else:
        y = _check_vector(labels, "labels")
        if y.shape[0] != n_scans or not np.all(y == np.round(y)):
            raise ValueError(f"labels must be {n_scans} integer class labels (one per scan), got shape {y.shape}")
        y, stratified = y.astype(np.int64), True
    check_bootstrap_settings(n_resamples, alpha)

    point = {key: {"aurc": aurc(e, u), "error_detection_auroc": error_detection_auroc(e, u),
                   "accuracy_at_80": accuracy_at_coverage(e, u, (0.8,))[0.8]}
             for key, (e, u) in (("a", (ea, ua)), ("b", (eb, ub)))}
    idx = resample_indices(y, int(n_resamples), np.random.default_rng(seed), stratified)  # (R, N)
    counts = resample_counts(idx, n_scans)  # (R, N): the SAME resampled scans for both models
    boot_a, boot_b = boot_selective_metrics(counts, ea, ua), boot_selective_metrics(counts, eb, ub)
    out = {}
    for name in COMPARED:
        a, b = point["a"][name], point["b"][name]
        out[name] = {"a": a, "b": b, "diff": a - b, **_interval(a - b, boot_a[name] - boot_b[name], alpha)}
    return out


# ----------------------------------------------------------------------------------------
# uncertainty scores of a sampling classifier
# ----------------------------------------------------------------------------------------

def chain_spread(samples) -> np.ndarray:
    """(N,) standard deviation over the S chains (ddof 0) of the probability of the class with
    the highest mean probability; ``samples`` (S, N, C)."""
    s = _check_probs(samples, "samples", 3)
    top = s.mean(axis=0).argmax(axis=1)  # (N,)
    return s[:, np.arange(s.shape[1]), top].std(axis=0)


def ttest_top2_pvalue(samples) -> np.ndarray:
    """(N,) two-sided p-value of CARD's per-scan test (Han et al., NeurIPS 2022): a paired
    t-test over the S chains between the probabilities of the two classes with the highest
    mean probability. Large = the two classes cannot be told apart = uncertain.

    ``samples`` (S, N, C) with S >= 2. With zero variance of the differences, p = 0 if their
    mean is non-zero and 1 if it is zero.
    """
    s = _check_probs(samples, "samples", 3, min_chains=2)
    n_chains, n_scans = s.shape[:2]
    top2 = np.argsort(-s.mean(axis=0), axis=1, kind="stable")[:, :2]  # (N, 2)
    scans = np.arange(n_scans)
    d = s[:, scans, top2[:, 0]] - s[:, scans, top2[:, 1]]  # (S, N)
    mean = d.mean(axis=0)
    constant = np.ptp(d, axis=0) == 0
    se = np.where(constant, 1.0, d.std(axis=0, ddof=1)) / math.sqrt(n_chains)
    p = 2 * stats.t.sf(np.abs(mean / se), df=n_chains - 1)
    return np.where(constant, np.where(mean == 0, 1.0, 0.0), np.minimum(p, 1.0))


def entropy_of_mean(probs) -> np.ndarray:
    """(N,) entropy in nats of the class probabilities ``probs`` (N, C); (S, N, C) samples are
    averaged over S first. 0 log 0 = 0."""
    p = _as_float(probs, "probs")
    p = _check_probs(p, "probs", 3).mean(axis=0) if p.ndim == 3 else _check_probs(p)
    return -np.sum(p * np.log(np.where(p > 0, p, 1.0)), axis=1)


def _binary_threshold(p: np.ndarray, threshold, positive_class: int) -> float | None:
    """Checked threshold (binary only) and positive class."""
    if p.shape[1] != 2:
        if threshold is not None:
            raise ValueError(f"threshold is for binary probs (C = 2); got C = {p.shape[1]}, pass threshold=None")
        return None
    if positive_class not in (0, 1):
        raise ValueError(f"positive_class must be 0 or 1, got {positive_class!r}")
    if threshold is None:
        return None
    if not _is_number(threshold) or not 0 < threshold < 1:
        raise ValueError(f"threshold must lie in (0, 1), got {threshold!r}")
    return float(threshold)


def threshold_margin(probs, threshold=None, positive_class: int = 1) -> np.ndarray:
    """(N,) CONFIDENCE of each decision (negate it for an uncertainty).

    Binary (C = 2): ``|logit(p_pos) - logit(t)|`` with p_pos clipped to [1e-6, 1 - 1e-6] and
    t = ``threshold`` (None means 0.5), so its ranking equals the max-probability ranking at
    t = 0.5 and it is 0 at p = t. C > 2: the max probability (``threshold`` must be None).
    """
    p = _check_probs(probs)
    t = _binary_threshold(p, threshold, positive_class)
    if p.shape[1] != 2:
        return p.max(axis=1)
    t = 0.5 if t is None else t
    pos = np.clip(p[:, positive_class], _CLIP, 1 - _CLIP)
    return np.abs(np.log(pos / (1 - pos)) - math.log(t / (1 - t)))


def decisions(probs, threshold=None, positive_class: int = 1) -> np.ndarray:
    """(N,) int predicted class: binary with a threshold, ``positive_class`` iff
    p_pos >= threshold; otherwise (threshold None, or C > 2) the argmax."""
    p = _check_probs(probs)
    t = _binary_threshold(p, threshold, positive_class)
    if t is None:
        return p.argmax(axis=1)
    return np.where(p[:, positive_class] >= t, positive_class, 1 - positive_class).astype(np.int64)


def decision_risk(probs, threshold=None, positive_class: int = 1) -> np.ndarray:
    """(N,) UNCERTAINTY: the probability, read from ``probs`` themselves, that the decision at
    ``threshold`` (:func:`decisions`) is wrong: 1 - p(decided class). With calibrated probs,
    referring in this order minimises the expected errors at every coverage (Chow's rule). At
    threshold 0.5, or C > 2, it is 1 - max p; at t < 0.5, unlike the symmetric
    ``threshold_margin``, a positive decision at p = t + e (wrong with probability 1 - t - e)
    is less sure than a negative one at t - e (wrong with probability t - e)."""
    p = _check_probs(probs)
    return 1.0 - p[np.arange(p.shape[0]), decisions(p, threshold, positive_class)]


# ----------------------------------------------------------------------------------------
# referral
# ----------------------------------------------------------------------------------------

def refer_threshold(uncertainty_val, coverage: float = 0.8) -> float:
    """The uncertainty threshold chosen on a VALIDATION split: the smallest validation value v
    such that scans with uncertainty <= v make up at least ``coverage`` (in (0, 1]) of the
    validation scans. Apply it to test scans with :func:`refer`."""
    u = np.sort(_check_vector(uncertainty_val, "uncertainty_val"))
    return float(u[_n_kept(coverage, u.shape[0]) - 1])


def refer(uncertainty, threshold: float) -> np.ndarray:
    """(N,) bool: refer (abstain on) the scans with uncertainty > ``threshold``."""
    u = _check_vector(uncertainty, "uncertainty")
    if not _is_number(threshold) or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    return u > threshold
