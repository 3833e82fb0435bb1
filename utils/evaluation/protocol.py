"""Comparing two models trained with several seeds: pooled over the seeds AND the test scans.

A model and a reference are each trained with S seeds (5 or more); each seed's run scores a test
split. On a benchmark with a fixed official split (AdrenalMNIST3D) every seed scores the same
scans in the same order; on the synthetic phantoms each seed draws its own split. A per-seed
paired bootstrap (``paired.paired_auc_difference``) on ~300 scans cannot resolve a 0.01 AUC
difference, and it ignores the seed-to-seed spread of training. The functions here pool:

* :func:`hierarchical_paired_auc`: the mean over seeds of the per-seed AUC difference, with a
  paired bootstrap over seeds and scans (:func:`scan_resample_counts`, :func:`two_stage`); a scan
  that several seeds scored is drawn once for all of them, so a shared test split is not counted
  as S independent ones.
* :func:`delong_test`: DeLong, DeLong & Clarke-Pearson (1988) test of two correlated binary ROC
  AUCs on the same scans, with the fast midrank algorithm of Sun & Xu (2014).
* :func:`seed_averaged`: the seed ensemble (mean prediction) when all seeds scored the same scans.
* :func:`pooled_comparison` / :func:`format_pooled`: the report's one call and its one line.

Shapes: per seed s, labels (N_s,) integers in ``[0, C)`` and each model's (N_s, C)
probabilities or, binary only, (N_s,) positive-class scores; the AUC rule is that of
``paired._auc_rule`` (column ``positive_class`` when C = 2, macro one-vs-rest when C > 2).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.stats import norm, rankdata

from utils.evaluation.metrics import (
    auc_from_counts,
    binary_auc,
    check_bootstrap_settings,
    mean_without_nan,
    resample_counts,
    resample_indices,
)
from utils.evaluation.paired import _auc_rule, bootstrap_interval, check_paired_scores


# ----------------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------------

def _check_pair(labels, scores_a, scores_b, positive_class: int, where: str = "") -> tuple:
    """Validated ``(y (N,) int64, a, b)`` of one seed (``paired.check_paired_scores``), its
    messages prefixed with ``where``."""
    try:
        return check_paired_scores(labels, scores_a, scores_b, positive_class)
    except ValueError as err:
        raise ValueError(f"{where}{err}") from None


def _per_seed(labels, scores_a, scores_b, positive_class: int) -> list[tuple]:
    """Validate the per-seed sequences: a list of ``(y, a, b)``, one per seed."""
    for name, value in (("labels", labels), ("scores_a", scores_a), ("scores_b", scores_b)):
        if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
            raise ValueError(f"{name} must be a sequence with one entry per seed, got {type(value).__name__}")
    if not len(labels) == len(scores_a) == len(scores_b):
        raise ValueError(f"labels, scores_a and scores_b must have one entry per seed, got "
                         f"{len(labels)}, {len(scores_a)} and {len(scores_b)}")
    if len(labels) == 0:
        raise ValueError("labels holds no seed")
    seeds = [_check_pair(y, a, b, positive_class, f"seed {s}: ")
             for s, (y, a, b) in enumerate(zip(labels, scores_a, scores_b))]
    widths = {1 if a.ndim == 1 else a.shape[1] for _, a, _ in seeds}
    if len(widths) > 1:
        raise ValueError(f"every seed's scores must have the same number of columns, got {sorted(widths)}")
    return seeds


def _interval_and_p(boot: np.ndarray, diff: float, alpha: float) -> tuple[float, float, float]:
    """Percentile interval and two-sided p-value (``paired.bootstrap_interval``)."""
    return bootstrap_interval(diff, boot, alpha)


# ----------------------------------------------------------------------------------------
# seeds and scans: the paired bootstrap over both
# ----------------------------------------------------------------------------------------

def scan_resample_counts(labels, paths, n_resamples: int, rng: np.random.Generator,
                         stratified: bool = True) -> list[np.ndarray]:
    """The scan level of the bootstrap over seeds and scans: per seed, how often each of its scans
    occurs in each of R resamples, drawn ONCE over the union of the scans the seeds scored.

    A scan scored by several seeds (a fixed official test split: every seed scores the same
    scans; phantom splits drawn per seed: some scans shared) gets the same count in all of them,
    so its sampling noise is counted once, not once per seed (independent per-seed draws would
    average it over the seeds and make the interval too narrow by up to sqrt(S) when the scans
    are shared). Scans are identified by ``paths``; without them, by position when every seed has
    the same labels in the same order (taken as the same scans), else as distinct per seed.

    Args:
        labels: one (N_s,) integer label array per seed (validated by the caller).
        paths: one sequence of N_s scan ids per seed, or None.
        n_resamples: R. rng: the generator; its first draws are ``metrics.resample_indices`` on
            the union's labels (so one seed draws exactly what ``paired.paired_auc_difference``
            draws with the same generator).
        stratified: resample within each class of the union.

    Returns:
        A list of S int arrays (R, N_s).

    Raises:
        ValueError: ``paths`` not one id per scan per seed, an id repeated within a seed, or a
            scan with different labels in two seeds.
    """
    labels = [np.asarray(y) for y in labels]
    if paths is None:
        same = all(y.shape == labels[0].shape and np.array_equal(y, labels[0]) for y in labels)
        paths = [list(range(len(y))) if same else [(s, i) for i in range(len(y))] for s, y in enumerate(labels)]
    if isinstance(paths, (str, bytes)) or len(paths) != len(labels):
        raise ValueError(f"paths must hold one sequence of scan ids per seed ({len(labels)})")
    label_of: dict = {}  # scan id -> its label, in the order first seen: the union of the seeds' scans
    for s, (y, ids) in enumerate(zip(labels, paths)):
        if isinstance(ids, (str, bytes)) or len(ids) != len(y):
            raise ValueError(f"paths[{s}] must hold {len(y)} scan ids (one per scan of seed {s})")
        if len(set(ids)) != len(ids):
            raise ValueError(f"paths[{s}] lists a scan more than once")
        for scan, label in zip(ids, y.tolist()):
            if label_of.setdefault(scan, label) != label:
                raise ValueError(f"scan {scan!r} has label {label} in seed {s} but {label_of[scan]} in an earlier seed")
    position = {scan: i for i, scan in enumerate(label_of)}
    union = np.array(list(label_of.values()))
    counts = resample_counts(resample_indices(union, int(n_resamples), rng, stratified), union.size)  # (R, U)
    return [counts[:, [position[scan] for scan in ids]] for ids in paths]


def hierarchical_paired_auc(labels, scores_a, scores_b, n_resamples: int = 2000, seed: int = 0,
                            alpha: float = 0.05, positive_class: int = 1, stratified: bool = True,
                            paths=None) -> dict:
    """Mean over training seeds of AUC(a) - AUC(b), with a paired bootstrap over seeds and scans.

    Both the training seeds and the test scans are random draws, and on a fixed test split the seeds
    share their scans: a crossed design, bootstrapped by resampling both factors with replacement,
    independently (the "pigeonhole" bootstrap of Owen 2007, whose variance is mildly conservative
    for crossed random effects; McCullagh 2000: no resampling is exact there). Each resample r draws
    the scans once over all seeds (:func:`scan_resample_counts`; within each class when
    ``stratified``) and S seeds with replacement; each drawn seed scores BOTH models on the drawn
    scans it has, and the resample's value is the mean over the drawn seeds of the paired AUC
    differences. The interval therefore holds the spread between training runs and the test-set
    sampling noise, the latter counted once for a scan every seed scored. Vectorised: the R paired
    differences ``D[s]`` of each seed come at once from count vectors (``metrics.auc_from_counts``,
    as ``paired.paired_auc_difference`` does); the seed level is an index draw over them
    (:func:`two_stage`). With few seeds (< 5) the seed level is coarse. Seeds that scored disjoint
    test splits are resampled from the pool of all their scans.

    With one seed it reduces to the scans-only paired bootstrap: the same resamples, hence the
    same numbers, as ``paired.paired_auc_difference`` with the same ``seed``; S copies of one
    seed on the same scans give exactly that one seed's interval.

    Args:
        labels: sequence, one entry per training seed: (N_s,) integer labels of that seed's
            test scans (N_s may differ between seeds; the scans may or may not be shared).
        scores_a, scores_b: sequences like ``labels``: entry s holds the model's (N_s, C)
            probabilities or, binary only, (N_s,) positive-class scores on seed s's scans, in
            the order of ``labels[s]`` (paired within a seed). Every seed has the same C.
        n_resamples: bootstrap resamples, at least ``metrics.MIN_RESAMPLES`` (1000).
        seed: seed of the ``np.random.default_rng`` drawing every resample (first the scan
            level, then the seed level).
        alpha: the interval covers ``1 - alpha``.
        positive_class: as in ``metrics.classification_metrics`` (binary only).
        stratified: resample scans within each class.
        paths: optional, one sequence of scan ids per seed: which seeds scored the same scans
            (:func:`scan_resample_counts`; pass them whenever they are known).

    Returns:
        ``{"diff": mean over seeds of the per-seed AUC(a) - AUC(b), "ci_low", "ci_high":
        percentile interval, "p_value": two-sided bootstrap p-value (convention of
        ``paired.paired_auc_difference``), "per_seed": [the S per-seed differences],
        "n_seeds": S, "n_scans": sum of N_s, "n_scans_per_seed": [N_s]}``. A resample's mean
        skips drawn seeds whose AUC is undefined (a class not drawn among its scans); resamples
        where all are undefined are left out.

    Raises:
        ValueError: no seed, lengths that differ, a seed with bad shapes or values or a single
            class, seeds with different C, bad ``n_resamples`` / ``alpha``, or bad ``paths``.
    """
    check_bootstrap_settings(n_resamples, alpha)
    rng = np.random.default_rng(seed)
    per_seed, boot_per_seed = seed_differences(labels, scores_a, scores_b, paths, n_resamples, rng, positive_class,
                                               stratified)
    sizes = [int(np.asarray(y).shape[0]) for y in labels]
    return {**two_stage(per_seed, boot_per_seed, rng, alpha), "n_scans": int(sum(sizes)),
            "n_scans_per_seed": sizes}


def seed_differences(labels, scores_a, scores_b, paths, n_resamples: int, rng: np.random.Generator,
                     positive_class: int = 1, stratified: bool = True) -> tuple[list[float], np.ndarray]:
    """Per seed, AUC(a) - AUC(b) on all its scans, and (S, R) on each of the R scan resamples of
    :func:`scan_resample_counts` (arguments and checks as :func:`hierarchical_paired_auc`)."""
    seeds = _per_seed(labels, scores_a, scores_b, positive_class)
    counts_per_seed = scan_resample_counts([y for y, _, _ in seeds], paths, int(n_resamples), rng, stratified)
    per_seed, boot_per_seed = [], []
    for (y, a, b), counts in zip(seeds, counts_per_seed):
        per_seed.append(float(_auc_rule(y, a, positive_class, binary_auc) - _auc_rule(y, b, positive_class, binary_auc)))

        def boot_auc(scores, y=y, counts=counts):
            return _auc_rule(y, scores, positive_class, lambda is_pos, s: auc_from_counts(counts, is_pos, s))

        boot_per_seed.append(boot_auc(a) - boot_auc(b))  # (R,)
    return per_seed, np.stack(boot_per_seed)


def two_stage(per_seed, boot_per_seed: np.ndarray, rng: np.random.Generator, alpha: float = 0.05) -> dict:
    """The seed level of the bootstrap over seeds and scans (see :func:`hierarchical_paired_auc`)
    for any paired statistic: ``per_seed`` (S,) its value per training seed on all its scans,
    ``boot_per_seed`` (S, R) its values on the R scan resamples of :func:`scan_resample_counts`
    (column r: every seed on the same drawn scans; paired: both models scored on them). Resample
    r draws S seeds with replacement and averages their column-r values. Returns ``{"diff": mean
    of per_seed, "ci_low", "ci_high", "p_value", "per_seed", "n_seeds"}``."""
    boot_diffs = np.asarray(boot_per_seed, dtype=np.float64)
    per_seed = [float(v) for v in per_seed]
    if boot_diffs.ndim != 2 or boot_diffs.shape[0] != len(per_seed) or not per_seed:
        raise ValueError(f"boot_per_seed must be (S, R) with S = {len(per_seed)} seeds, got {boot_diffs.shape}")
    n_seeds, r = boot_diffs.shape
    drawn = rng.integers(0, n_seeds, size=(r, n_seeds))  # (R, S) seed level, with replacement
    boot = mean_without_nan(boot_diffs[drawn, np.arange(r)[:, None]], axis=1)  # (R,)
    diff = float(np.mean(per_seed))
    low, high, p_value = _interval_and_p(boot, diff, alpha)
    return {"diff": diff, "ci_low": low, "ci_high": high, "p_value": p_value, "per_seed": per_seed,
            "n_seeds": n_seeds}


# ----------------------------------------------------------------------------------------
# DeLong's test on the same scans
# ----------------------------------------------------------------------------------------

def _delong_components(is_pos: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sun & Xu (2014): AUCs (K,) and structural components V10 (K, m), V01 (K, n) of K
    scorers ``scores`` (K, N) from midranks; ties count 1/2."""
    pos, neg = scores[:, is_pos], scores[:, ~is_pos]  # (K, m), (K, n)
    m, n = pos.shape[1], neg.shape[1]
    t_all = rankdata(np.concatenate([pos, neg], axis=1), axis=1)  # (K, m + n) midranks
    t_pos, t_neg = rankdata(pos, axis=1), rankdata(neg, axis=1)
    aucs = (t_all[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    v10 = (t_all[:, :m] - t_pos) / n  # share of negatives each positive beats
    v01 = 1.0 - (t_all[:, m:] - t_neg) / m  # share of positives that beat each negative
    return aucs, v10, v01


def delong_test(labels, scores_a, scores_b, positive_class: int = 1, alpha: float = 0.05) -> dict:
    """DeLong's test of two correlated binary ROC-AUCs on the same scans.

    DeLong, DeLong & Clarke-Pearson (1988), computed with the fast midrank algorithm of Sun &
    Xu (2014), O(N log N): with m positives and n negatives, V10_i is the share of negatives
    that positive i outranks, V01_j the share of positives that outrank negative j (a tie
    counts 1/2), the AUC is their mean, and ``Var(AUC_a - AUC_b) = c^T (S10 / m + S01 / n) c``
    with S10, S01 the sample covariance matrices (ddof = 1) of the two models' components and
    ``c = (1, -1)``. ``z = diff / se``; the p-value is two-sided from the standard normal.

    Args:
        labels: (N,) integer labels, two classes.
        scores_a, scores_b: (N, 2) probabilities or (N,) positive-class scores, same scans.
        positive_class: the class whose score is ranked.
        alpha: the normal interval ``diff -/+ z_(1 - alpha/2) se`` covers ``1 - alpha``.

    Returns:
        ``{"auc_a", "auc_b", "diff": auc_a - auc_b, "se", "z", "p_value", "ci_low", "ci_high"}``.
        When ``se`` is 0 (e.g. identical scores): ``diff`` 0 gives z = 0 and p = 1, otherwise
        z = +/-inf and p = 0; the interval is then ``[diff, diff]``.

    Raises:
        ValueError: bad shapes or values, C > 2 (DeLong's test here is binary), fewer than two
            scans of either class (the covariances need two), or ``alpha`` outside (0, 1).
    """
    y, a, b = _check_pair(labels, scores_a, scores_b, positive_class)
    if a.ndim == 2 and a.shape[1] > 2:
        raise ValueError(f"scores have C = {a.shape[1]} columns: delong_test is binary only "
                         "(use hierarchical_paired_auc for the macro one-vs-rest AUC)")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    is_pos = y == positive_class
    if min(is_pos.sum(), (~is_pos).sum()) < 2:
        raise ValueError(f"labels need at least 2 scans of each class, got {int(is_pos.sum())} positive "
                         f"and {int((~is_pos).sum())} negative")
    column = (lambda s: s) if a.ndim == 1 else (lambda s: s[:, positive_class])
    aucs, v10, v01 = _delong_components(is_pos, np.stack([column(a), column(b)]))  # (2,), (2, m), (2, n)
    cov = np.cov(v10) / v10.shape[1] + np.cov(v01) / v01.shape[1]  # (2, 2)
    se = math.sqrt(max(float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]), 0.0))
    diff = float(aucs[0] - aucs[1])
    if diff == 0:
        z, p_value = 0.0, 1.0
    elif se == 0:
        z, p_value = math.copysign(math.inf, diff), 0.0
    else:
        z = diff / se
        p_value = float(min(1.0, 2 * norm.sf(abs(z))))
    half = float(norm.ppf(1 - alpha / 2)) * se
    return {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "diff": diff, "se": se, "z": z,
            "p_value": p_value, "ci_low": diff - half, "ci_high": diff + half}


# ----------------------------------------------------------------------------------------
# seed ensemble, the report's call and line
# ----------------------------------------------------------------------------------------

def seed_averaged(scores_per_seed) -> np.ndarray:
    """Mean over seeds of predictions on the SAME scans in the same order.

    Args:
        scores_per_seed: sequence of S arrays, each (N, C) probabilities or (N,) scores.

    Returns:
        (N, C) or (N,) float64 mean (the seed ensemble's prediction).

    Raises:
        ValueError: no seed, non-finite values, or shapes that differ between seeds.
    """
    if isinstance(scores_per_seed, (str, bytes)) or len(scores_per_seed) == 0:
        raise ValueError("scores_per_seed must be a non-empty sequence of (N, C) or (N,) arrays")
    arrays = [np.asarray(s, dtype=np.float64) for s in scores_per_seed]
    shapes = [s.shape for s in arrays]
    if len(set(shapes)) > 1:
        raise ValueError(f"scores_per_seed must all have the same shape (same scans), got {shapes}")
    if arrays[0].ndim not in (1, 2) or arrays[0].shape[0] == 0:
        raise ValueError(f"scores_per_seed entries must have shape (N,) or (N, C) with N > 0, got {shapes[0]}")
    stacked = np.stack(arrays)  # (S, N[, C])
    if not np.all(np.isfinite(stacked)):
        raise ValueError("scores_per_seed must be finite")
    return stacked.mean(axis=0)


def _same_scans(labels: list, paths) -> str | None:
    """None when every seed scored the same scans in the same order, else the reason."""
    first = np.asarray(labels[0])
    for s, y in enumerate(labels[1:], start=1):
        if np.asarray(y).shape != first.shape or not np.array_equal(y, first):
            return f"seed {s} has other labels than seed 0 (different test scans)"
    if paths is not None:
        for s, p in enumerate(paths[1:], start=1):
            if list(p) != list(paths[0]):
                return f"seed {s} scored other scans (paths) than seed 0, or in another order"
    return None


def pooled_comparison(labels, scores_a, scores_b, paths=None, n_resamples: int = 2000, seed: int = 0,
                      alpha: float = 0.05, positive_class: int = 1) -> dict:
    """The report's comparison of model a with reference b over seeds and scans.

    Args:
        labels, scores_a, scores_b: per-seed sequences as in :func:`hierarchical_paired_auc`.
        paths: optional per-seed sequences of scan ids (paths), entry s of length N_s: which
            scans the seeds share (the bootstrap draws each once; DeLong needs all shared).
        n_resamples, seed, alpha, positive_class: as in :func:`hierarchical_paired_auc`.

    Returns:
        ``{"hierarchical": hierarchical_paired_auc(...), "delong_seed_averaged":
        delong_test(labels[0], seed_averaged(scores_a), seed_averaged(scores_b)) or None,
        "delong_skipped": None or the reason}``. DeLong on the seed-averaged predictions is
        computed only when every seed scored the same scans (equal labels and, with
        ``paths``, the same paths in the same order), C = 2 and each class has 2 scans or more.

    Raises:
        ValueError: as :func:`hierarchical_paired_auc` (bad ``paths`` included).
    """
    hierarchical = hierarchical_paired_auc(labels, scores_a, scores_b, n_resamples=n_resamples, seed=seed,
                                           alpha=alpha, positive_class=positive_class, paths=paths)
    first = np.asarray(scores_a[0])
    reason = None
    if first.ndim == 2 and first.shape[1] > 2:
        reason = f"C = {first.shape[1]} classes (DeLong's test is binary)"
    else:
        reason = _same_scans(list(labels), paths)
    if reason is None:
        y = np.asarray(labels[0])
        n_pos = int((y == positive_class).sum())
        if min(n_pos, y.size - n_pos) < 2:
            reason = f"{n_pos} positive and {y.size - n_pos} negative scans (DeLong needs 2 of each)"
    delong = None
    if reason is None:
        delong = delong_test(labels[0], seed_averaged(scores_a), seed_averaged(scores_b),
                             positive_class=positive_class, alpha=alpha)
    return {"hierarchical": hierarchical, "delong_seed_averaged": delong, "delong_skipped": reason}


def _p_text(p: float) -> str:
    return "p = nan" if math.isnan(p) else ("p < 0.001" if p < 0.001 else f"p = {p:.3f}")


def format_pooled(result: dict, name: str = "") -> str:
    """One Markdown-friendly line of a :func:`pooled_comparison` result, e.g.
    ``"name: +0.012 [+0.004, +0.020] (p = 0.003; 5 seeds x 298 scans; DeLong on the
    seed-averaged predictions +0.013, p = 0.010)"``; without ``name`` the line starts at the
    difference (a table cell)."""
    h = result["hierarchical"]
    sizes = h.get("n_scans_per_seed") or []
    if sizes and len(set(sizes)) == 1:
        scans = f"{h['n_seeds']} seeds x {sizes[0]} scans"
    else:
        scans = f"{h['n_seeds']} seeds, {h['n_scans']} scans in all"
    delong = result.get("delong_seed_averaged")
    if delong is not None:
        tail = f"DeLong on the seed-averaged predictions {delong['diff']:+.3f}, {_p_text(delong['p_value'])}"
    else:
        tail = f"DeLong skipped: {result.get('delong_skipped') or 'not computed'}"
    return (f"{name + ': ' if name else ''}{h['diff']:+.3f} [{h['ci_low']:+.3f}, {h['ci_high']:+.3f}] "
            f"({_p_text(h['p_value'])}; {scans}; {tail})")
