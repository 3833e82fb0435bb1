"""Tests of utils.evaluation.protocol: the paired bootstrap over seeds and scans, DeLong's test,
the seed ensemble and the report line, on cases with known answers."""
import math
import re

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from utils.evaluation.metrics import auc_from_counts, resample_counts, resample_indices
from utils.evaluation.paired import paired_auc_difference
from utils.evaluation.protocol import (
    delong_test,
    format_pooled,
    hierarchical_paired_auc,
    pooled_comparison,
    scan_resample_counts,
    seed_averaged,
)


def binary_probs(p_pos):
    p_pos = np.asarray(p_pos, dtype=np.float64)
    return np.stack([1 - p_pos, p_pos], axis=1)


def correlated_pair(n_per_class, d_a, d_b, rng, own_noise=0.3):
    """Labels and two binary scorers sharing most of their noise; AUC ~ Phi(d / sqrt(2 (1 + own^2)))."""
    y = np.repeat([0, 1], n_per_class)
    shared = rng.normal(size=y.size)
    a = y * d_a + shared + own_noise * rng.normal(size=y.size)
    b = y * d_b + shared + own_noise * rng.normal(size=y.size)
    return y, a, b


def multiclass(n, n_classes, separation, rng):
    y = np.arange(n) % n_classes
    logits = separation * np.eye(n_classes)[y] + rng.normal(size=(n, n_classes))
    p = np.exp(logits)
    return y, p / p.sum(axis=1, keepdims=True)


# ----------------------------------------------------------------------------------------
# hierarchical_paired_auc
# ----------------------------------------------------------------------------------------

def test_identical_models_give_zero_difference_and_a_zero_interval():
    rng = np.random.default_rng(0)
    ys, scores = [], []
    for _ in range(5):
        y, a, _ = correlated_pair(20, 1.0, 1.0, rng)
        ys.append(y)
        scores.append(a)
    out = hierarchical_paired_auc(ys, scores, scores, n_resamples=1000)
    assert (out["diff"], out["ci_low"], out["ci_high"], out["p_value"]) == (0.0, 0.0, 0.0, 1.0)
    assert out["per_seed"] == [0.0] * 5 and out["n_seeds"] == 5 and out["n_scans"] == 200


def test_perfect_vs_uninformative_model_gives_the_exact_mean_and_an_interval_above_zero():
    rng = np.random.default_rng(1)
    ys, perfect, random_scores, expected = [], [], [], []
    for _ in range(5):
        y = np.repeat([0, 1], 25)
        ys.append(y)
        perfect.append(y + 0.1 * rng.random(y.size))  # every positive above every negative
        random_scores.append(rng.random(y.size))
        expected.append(1.0 - roc_auc_score(y, random_scores[-1]))
    out = hierarchical_paired_auc(ys, perfect, random_scores, n_resamples=1000, seed=0)
    assert out["per_seed"] == pytest.approx(expected)
    assert out["diff"] == pytest.approx(np.mean(expected))
    assert 0 < out["ci_low"] <= out["diff"] <= out["ci_high"]
    assert out["p_value"] < 0.01


@pytest.mark.parametrize("stratified", [True, False])
def test_one_seed_equals_the_scans_only_paired_bootstrap(stratified):
    rng = np.random.default_rng(2)
    y, a, b = correlated_pair(30, 1.0, 0.7, rng)
    a = np.round(a, 1)  # ties
    one = hierarchical_paired_auc([y], [a], [b], n_resamples=1000, seed=5, stratified=stratified)
    ref = paired_auc_difference(y, a, b, n_resamples=1000, seed=5, stratified=stratified)
    assert {k: one[k] for k in ref} == ref
    assert one["per_seed"] == [ref["diff"]]


def test_one_seed_equals_the_paired_bootstrap_for_multiclass_probabilities():
    rng = np.random.default_rng(3)
    y, pa = multiclass(60, 3, 1.5, rng)
    _, pb = multiclass(60, 3, 0.8, rng)
    one = hierarchical_paired_auc([y], [pa], [pb], n_resamples=1000, seed=1)
    ref = paired_auc_difference(y, pa, pb, n_resamples=1000, seed=1)
    assert {k: one[k] for k in ref} == ref


def test_seeds_that_disagree_widen_the_interval_beyond_any_single_seed():
    """+0.1 on half the seeds, -0.1 on the rest: the pooled interval must hold 0 and reflect
    the seed-to-seed spread, far wider than the (tight) scans-only interval of each seed."""
    rng = np.random.default_rng(4)
    ys, a_s, b_s = [], [], []
    for s in range(6):
        d_a, d_b = (1.5, 0.9) if s % 2 == 0 else (0.9, 1.5)
        y, a, b = correlated_pair(150, d_a, d_b, rng)
        ys.append(y)
        a_s.append(a)
        b_s.append(b)
    out = hierarchical_paired_auc(ys, a_s, b_s, n_resamples=1000, seed=0)
    assert all(abs(abs(d) - 0.12) < 0.04 for d in out["per_seed"])  # the construction worked
    assert out["ci_low"] < 0 < out["ci_high"]
    assert out["p_value"] > 0.2
    widths = []
    for y, a, b in zip(ys, a_s, b_s):
        single = paired_auc_difference(y, a, b, n_resamples=1000, seed=0)
        assert single["ci_low"] > 0 or single["ci_high"] < 0  # each seed alone is "significant"
        widths.append(single["ci_high"] - single["ci_low"])
    assert out["ci_high"] - out["ci_low"] > 2.5 * max(widths)


def test_seeds_with_different_numbers_of_scans():
    rng = np.random.default_rng(5)
    ys, a_s, b_s = [], [], []
    for n in (20, 35, 50):
        y, a, b = correlated_pair(n, 1.2, 0.8, rng)
        ys.append(y)
        a_s.append(binary_probs(1 / (1 + np.exp(-a))))
        b_s.append(binary_probs(1 / (1 + np.exp(-b))))
    out = hierarchical_paired_auc(ys, a_s, b_s, n_resamples=1000)
    expected = [paired_auc_difference(y, a, b, n_resamples=1000)["diff"] for y, a, b in zip(ys, a_s, b_s)]
    assert out["per_seed"] == pytest.approx(expected)
    assert out["diff"] == pytest.approx(np.mean(expected))
    assert out["n_scans"] == 210 and out["n_scans_per_seed"] == [40, 70, 100]
    assert out["ci_low"] <= out["diff"] <= out["ci_high"]


def test_swapping_models_negates_and_a_seed_is_deterministic():
    rng = np.random.default_rng(6)
    ys, a_s, b_s = zip(*(correlated_pair(20, 1.0, 0.6, rng) for _ in range(4)))
    ab = hierarchical_paired_auc(ys, a_s, b_s, n_resamples=1000, seed=3)
    ba = hierarchical_paired_auc(ys, b_s, a_s, n_resamples=1000, seed=3)
    assert ba["diff"] == pytest.approx(-ab["diff"])
    assert (ba["ci_low"], ba["ci_high"]) == pytest.approx((-ab["ci_high"], -ab["ci_low"]))
    assert hierarchical_paired_auc(ys, a_s, b_s, n_resamples=1000, seed=3) == ab
    assert hierarchical_paired_auc(ys, a_s, b_s, n_resamples=1000, seed=4) != ab


def test_seed_level_is_an_index_draw_over_one_scan_draw():
    """Re-derive the bootstrap distribution by hand from the documented draw order: the scans
    drawn once over the union of the seeds' scans (here each seed its own), then S seeds with
    replacement, every drawn seed read on the same scan resample."""
    rng = np.random.default_rng(7)
    ys, a_s, b_s = zip(*(correlated_pair(n, 1.0, 0.6, rng) for n in (10, 14, 18)))
    r, alpha = 1000, 0.1
    out = hierarchical_paired_auc(ys, a_s, b_s, n_resamples=r, seed=9, alpha=alpha)
    draw = np.random.default_rng(9)
    union = np.concatenate(ys)
    counts = resample_counts(resample_indices(union, r, draw, True), union.size)  # (R, 84)
    edges = np.cumsum([0, *map(len, ys)])
    diffs = np.stack([auc_from_counts(counts[:, lo:hi], y == 1, a) - auc_from_counts(counts[:, lo:hi], y == 1, b)
                      for lo, hi, y, a, b in zip(edges[:-1], edges[1:], ys, a_s, b_s)])  # (S, R)
    seeds = draw.integers(0, 3, size=(r, 3))
    boot = diffs[seeds, np.arange(r)[:, None]]  # (R, S)
    boot = np.array([row[~np.isnan(row)].mean() for row in boot])
    assert (out["ci_low"], out["ci_high"]) == pytest.approx(tuple(np.percentile(boot, [5, 95])))


def test_copies_of_one_seed_on_the_same_scans_give_exactly_that_seeds_interval():
    """Five training runs that predicted identically on one shared test split carry no more
    evidence than one: the pooled interval is the single seed's, not sqrt(5) narrower. Were
    their scans five different ones, the evidence would be five times larger."""
    rng = np.random.default_rng(11)
    y, a, b = correlated_pair(40, 1.0, 0.7, rng)
    one = paired_auc_difference(y, a, b, n_resamples=1000, seed=5)
    paths = [f"scan{i}" for i in range(y.size)]
    shared = hierarchical_paired_auc([y] * 5, [a] * 5, [b] * 5, n_resamples=1000, seed=5, paths=[paths] * 5)
    assert (shared["diff"], shared["ci_low"], shared["ci_high"]) == pytest.approx(
        (one["diff"], one["ci_low"], one["ci_high"]))
    assert hierarchical_paired_auc([y] * 5, [a] * 5, [b] * 5, n_resamples=1000, seed=5) == shared  # same labels: same scans
    disjoint = hierarchical_paired_auc([y] * 5, [a] * 5, [b] * 5, n_resamples=1000, seed=5,
                                       paths=[[f"seed{s}/{p}" for p in paths] for s in range(5)])
    assert disjoint["diff"] == pytest.approx(one["diff"])
    width = one["ci_high"] - one["ci_low"]
    assert 0.3 * width < disjoint["ci_high"] - disjoint["ci_low"] < 0.65 * width  # ~ 1 / sqrt(5) = 0.45


def test_scan_resample_counts_draws_a_shared_scan_once_for_every_seed_that_scored_it():
    """Three seeds, overlapping test splits (as phantom splits drawn per seed overlap)."""
    y = np.repeat([0, 1], 10)
    ids = [f"scan{i}" for i in range(30)]
    labels_of = dict(zip(ids, np.tile([0, 1], 15)))
    paths = [ids[0:20], ids[10:30], ids[::3][:10] + ids[1::3][:10]]
    labels = [np.array([labels_of[i] for i in p]) for p in paths]
    counts = scan_resample_counts(labels, paths, 1000, np.random.default_rng(0))
    assert [c.shape for c in counts] == [(1000, 20)] * 3
    column = {}
    for p, c in zip(paths, counts):
        for j, scan in enumerate(p):
            if scan in column:
                np.testing.assert_array_equal(c[:, j], column[scan])  # the same count wherever it occurs
            column[scan] = c[:, j]
    union = np.stack([column[i] for i in sorted(column, key=ids.index)], axis=1)  # (R, 30)
    is_pos = np.array([labels_of[i] for i in sorted(column, key=ids.index)]) == 1
    assert np.all(union[:, is_pos].sum(1) == is_pos.sum()) and np.all(union[:, ~is_pos].sum(1) == (~is_pos).sum())
    with pytest.raises(ValueError, match="scan 'scan0' has label 1 in seed 1 but 0"):
        scan_resample_counts([y, 1 - y], [ids[:20], ids[:20]], 1000, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"paths\[0\] lists a scan more than once"):
        scan_resample_counts([y], [["x"] * 20], 1000, np.random.default_rng(0))


@pytest.mark.parametrize("call, match", [
    (lambda y, a: hierarchical_paired_auc([], [], []), "no seed"),
    (lambda y, a: hierarchical_paired_auc([y, y], [a], [a, a]), "one entry per seed"),
    (lambda y, a: hierarchical_paired_auc(y, a, a), "seed 0"),
    (lambda y, a: hierarchical_paired_auc([y, np.zeros(10, int)], [a, np.ones(10)], [a, np.ones(10)]),
     "seed 1: labels hold a single class"),
    (lambda y, a: hierarchical_paired_auc([y], [a], [a[:-1]]), "seed 0: labels has 40 samples but scores_b"),
    (lambda y, a: hierarchical_paired_auc([y, y], [a, binary_probs(a)], [a, binary_probs(a)]),
     "same number of columns"),
    (lambda y, a: hierarchical_paired_auc([y], [a], [a], n_resamples=10), "n_resamples"),
    (lambda y, a: hierarchical_paired_auc("abc", [a], [a]), "labels must be a sequence"),
])
def test_bad_inputs_raise_a_readable_value_error(call, match):
    y = np.repeat([0, 1], 20)
    a = np.linspace(0.01, 0.99, 40)
    with pytest.raises(ValueError, match=match):
        call(y, a)


# ----------------------------------------------------------------------------------------
# delong_test
# ----------------------------------------------------------------------------------------

def slow_delong_variance(y, a, b):
    """Direct DeLong (1988): structural components by explicit pairwise comparisons."""
    def components(s):
        pos, neg = s[y == 1], s[y == 0]
        psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        return psi.mean(axis=1), psi.mean(axis=0)  # V10 (m,), V01 (n,)
    (v10a, v01a), (v10b, v01b) = components(a), components(b)
    m, n = v10a.size, v01a.size
    s10, s01 = np.cov(np.stack([v10a, v10b])), np.cov(np.stack([v01a, v01b]))
    c = np.array([1.0, -1.0])
    return c @ (s10 / m + s01 / n) @ c


@pytest.mark.parametrize("case", range(5))
def test_delong_aucs_match_sklearn_and_variance_matches_the_direct_formula(case):
    rng = np.random.default_rng(10 + case)
    n = int(rng.integers(8, 40))
    y = np.r_[0, 0, 1, 1, rng.integers(0, 2, size=n)]
    a = np.round(y * 0.5 + rng.random(y.size), 1)  # rounding makes ties, also across classes
    b = np.round(y * 0.2 + rng.random(y.size), 1)
    out = delong_test(y, a, b)
    assert out["auc_a"] == pytest.approx(roc_auc_score(y, a))
    assert out["auc_b"] == pytest.approx(roc_auc_score(y, b))
    assert out["diff"] == pytest.approx(out["auc_a"] - out["auc_b"])
    assert out["se"] ** 2 == pytest.approx(slow_delong_variance(y, a, b), rel=1e-9, abs=1e-15)
    assert out["z"] == pytest.approx(out["diff"] / out["se"])
    assert out["p_value"] == pytest.approx(math.erfc(abs(out["z"]) / math.sqrt(2)))
    assert (out["ci_low"] + out["ci_high"]) / 2 == pytest.approx(out["diff"])
    assert out["ci_high"] - out["ci_low"] == pytest.approx(2 * 1.959963985 * out["se"])


def test_delong_positive_class_and_probability_columns():
    rng = np.random.default_rng(20)
    y = np.repeat([0, 1], 15)
    pa, pb = rng.random(30), rng.random(30)
    from_scores = delong_test(y, pa, pb)
    from_probs = delong_test(y, binary_probs(pa), binary_probs(pb))
    assert from_probs == pytest.approx(from_scores)
    flipped = delong_test(1 - y, binary_probs(1 - pa), binary_probs(1 - pb), positive_class=0)
    assert flipped == pytest.approx(from_scores)


def test_delong_identical_scores_give_zero_difference_without_dividing_by_zero():
    y = np.repeat([0, 1], 10)
    s = np.linspace(0, 1, 20)
    out = delong_test(y, s, s)
    assert (out["diff"], out["se"], out["z"], out["p_value"]) == (0.0, 0.0, 0.0, 1.0)
    assert (out["ci_low"], out["ci_high"]) == (0.0, 0.0)
    # zero variance with a non-zero difference: a perfect scorer against a constant one
    degenerate = delong_test(y, y + 0.5, np.full(20, 0.5))
    assert (degenerate["diff"], degenerate["se"], degenerate["p_value"]) == (0.5, 0.0, 0.0)
    assert degenerate["z"] == math.inf


def test_delong_se_is_close_to_the_paired_bootstrap_sd_on_a_large_sample():
    rng = np.random.default_rng(21)
    y, a, b = correlated_pair(400, 1.0, 0.7, rng, own_noise=0.7)
    out = delong_test(y, a, b)
    counts = resample_counts(resample_indices(y, 2000, np.random.default_rng(0), True), y.size)
    boot = auc_from_counts(counts, y == 1, a) - auc_from_counts(counts, y == 1, b)
    assert out["se"] == pytest.approx(boot.std(ddof=1), rel=0.15)


@pytest.mark.parametrize("y, a, match", [
    (np.arange(12) % 3, np.full((12, 3), 1 / 3), "C = 3 columns: delong_test is binary only"),
    (np.zeros(6, int), np.linspace(0, 1, 6), "single class"),
    (np.array([0, 0, 0, 1]), np.linspace(0, 1, 4), "at least 2 scans of each class"),
    (np.array([0, 1, 0, 1]), np.array([0.1, np.nan, 0.3, 0.4]), "finite"),
])
def test_delong_bad_inputs_raise(y, a, match):
    with pytest.raises(ValueError, match=match):
        delong_test(y, a, a)


# ----------------------------------------------------------------------------------------
# seed ensemble, the report's call and line
# ----------------------------------------------------------------------------------------

def test_seed_averaged_is_the_mean_and_rejects_other_shapes():
    p1, p2 = binary_probs([0.2, 0.8]), binary_probs([0.4, 0.6])
    np.testing.assert_allclose(seed_averaged([p1, p2]), binary_probs([0.3, 0.7]))
    np.testing.assert_allclose(seed_averaged([np.array([1.0, 2.0]), np.array([3.0, 4.0])]), [2.0, 3.0])
    with pytest.raises(ValueError, match="same shape"):
        seed_averaged([p1, binary_probs([0.1, 0.2, 0.3])])
    with pytest.raises(ValueError, match="non-empty"):
        seed_averaged([])


def shared_scan_seeds(n_seeds=5, n_per_class=30, seed=30):
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], n_per_class)
    a_s = [binary_probs(1 / (1 + np.exp(-(1.2 * y + rng.normal(size=y.size))))) for _ in range(n_seeds)]
    b_s = [binary_probs(1 / (1 + np.exp(-(0.8 * y + rng.normal(size=y.size))))) for _ in range(n_seeds)]
    return [y] * n_seeds, a_s, b_s


def test_pooled_comparison_runs_delong_on_the_seed_ensemble_when_the_scans_are_shared():
    ys, a_s, b_s = shared_scan_seeds()
    paths = [[f"scan{i}.nii.gz" for i in range(60)]] * 5
    out = pooled_comparison(ys, a_s, b_s, paths=paths, n_resamples=1000, seed=2)
    assert out["hierarchical"] == hierarchical_paired_auc(ys, a_s, b_s, n_resamples=1000, seed=2, paths=paths)
    assert out["delong_seed_averaged"] == delong_test(ys[0], seed_averaged(a_s), seed_averaged(b_s))
    assert out["delong_skipped"] is None
    line = format_pooled(out, "DiffMIC-3D vs ResNet")
    h, d = out["hierarchical"], out["delong_seed_averaged"]
    assert line.startswith(f"DiffMIC-3D vs ResNet: {h['diff']:+.3f} [{h['ci_low']:+.3f}, {h['ci_high']:+.3f}]")
    assert "5 seeds x 60 scans" in line and f"DeLong on the seed-averaged predictions {d['diff']:+.3f}" in line
    assert "\n" not in line and re.search(r"\(p [=<] 0\.\d{3};", line)
    assert format_pooled(out) == line.removeprefix("DiffMIC-3D vs ResNet: ")  # a table cell: no name


def test_pooled_comparison_skips_delong_when_the_seeds_scored_other_scans():
    ys, a_s, b_s = shared_scan_seeds()
    paths = [[f"scan{i}.nii.gz" for i in range(60)] for _ in range(5)]
    paths[3] = [f"other{i}.nii.gz" for i in range(60)]  # same labels by chance, but other scans
    out = pooled_comparison(ys, a_s, b_s, paths=paths, n_resamples=1000)
    assert out["delong_seed_averaged"] is None and "seed 3" in out["delong_skipped"]
    assert "DeLong skipped: seed 3" in format_pooled(out, "m")
    other_labels = [ys[0]] * 4 + [ys[0][::-1]]
    skipped = pooled_comparison(other_labels, a_s, b_s, n_resamples=1000)["delong_skipped"]
    assert "seed 4 has other labels" in skipped


def test_pooled_comparison_skips_delong_for_multiclass_and_different_sizes():
    rng = np.random.default_rng(31)
    ys, pa, pb = zip(*((y, p, multiclass(45, 3, 0.5, rng)[1]) for y, p in
                       (multiclass(45, 3, 1.0, rng) for _ in range(3))))
    out = pooled_comparison(list(ys), list(pa), list(pb), n_resamples=1000)
    assert out["delong_seed_averaged"] is None and "C = 3" in out["delong_skipped"]
    ys, a_s, b_s = zip(*(correlated_pair(n, 1.0, 0.5, rng) for n in (20, 25)))
    out = pooled_comparison(ys, a_s, b_s, n_resamples=1000)
    assert out["delong_seed_averaged"] is None
    assert "2 seeds, 90 scans in all" in format_pooled(out, "m")
    with pytest.raises(ValueError, match=r"paths\[1\] must hold 50 scan ids"):
        pooled_comparison(ys, a_s, b_s, paths=[[f"x{i}" for i in range(40)], ["y"] * 3], n_resamples=1000)


def test_pooled_comparison_skips_delong_when_a_class_has_one_scan():
    """A smoke-sized test split (one scan per class) still gets its bootstrap comparison; DeLong,
    whose variance needs two scans of each class, is skipped with the reason."""
    ys = [np.array([0, 1])] * 2
    a_s = [binary_probs(np.array([0.4, 0.6])), binary_probs(np.array([0.45, 0.55]))]
    b_s = [binary_probs(np.array([0.6, 0.4])), binary_probs(np.array([0.5, 0.7]))]
    out = pooled_comparison(ys, a_s, b_s, n_resamples=1000)
    assert out["delong_seed_averaged"] is None
    assert out["delong_skipped"] == "1 positive and 1 negative scans (DeLong needs 2 of each)"
    assert np.isfinite(out["hierarchical"]["diff"])
