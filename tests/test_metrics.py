"""Tests of utils.evaluation.metrics, .paired and .calibration against hand-computed values, sklearn,
and bootstrap properties."""
import csv
import math
import time

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from utils.evaluation.calibration import expected_calibration_error, reliability_curve
from utils.evaluation.metrics import (
    CSV_COLUMNS,
    SCALAR_METRICS,
    auc_from_counts,
    bootstrap_ci,
    classification_metrics,
    metrics_from_indices,
    metrics_table,
    resample_counts,
    resample_indices,
    write_metrics_csv,
)
from utils.evaluation.paired import paired_auc_difference, seed_summary


def binary_probs(p_pos):
    """(N, 2) probabilities from the positive-class probability (N,)."""
    p_pos = np.asarray(p_pos, dtype=np.float64)
    return np.stack([1 - p_pos, p_pos], axis=1)


# 4 negatives, 6 positives; threshold 0.5 gives TN=3, FP=1 (0.7), FN=2 (0.4, 0.45), TP=4.
HAND_Y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
HAND_P = binary_probs([0.1, 0.2, 0.3, 0.7, 0.4, 0.45, 0.6, 0.8, 0.9, 0.95])


def test_binary_metrics_match_hand_computation():
    m = classification_metrics(HAND_Y, HAND_P)
    np.testing.assert_array_equal(m["confusion_matrix"], [[3, 1], [2, 4]])
    tn, fp, fn, tp = 3, 1, 2, 4
    assert m["accuracy"] == pytest.approx((tp + tn) / 10)
    assert m["precision"] == pytest.approx(tp / (tp + fp))
    assert m["recall"] == pytest.approx(tp / (tp + fn))
    assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert m["specificity"] == pytest.approx(tn / (tn + fp))
    # AUC = share of (positive, negative) pairs ranked correctly: positives 0.4, 0.45, 0.6
    # beat 3 negatives each, 0.8, 0.9, 0.95 beat all 4 -> 21 of 24 pairs.
    assert m["roc_auc"] == pytest.approx(21 / 24)
    assert m["confusion_matrix"].dtype.kind == "i"


def test_positive_class_zero_equals_relabelled_problem():
    swapped = classification_metrics(1 - HAND_Y, HAND_P[:, ::-1], positive_class=0)
    direct = classification_metrics(HAND_Y, HAND_P, positive_class=1)
    for name in SCALAR_METRICS:
        assert swapped[name] == pytest.approx(direct[name])


def test_auc_from_probabilities_differs_from_accuracy():
    # perfectly ranked but every score below 0.5: AUC 1, every prediction negative
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    probs = binary_probs([0.10, 0.20, 0.30, 0.40, 0.42, 0.44, 0.46, 0.48])
    m = classification_metrics(y, probs)
    assert m["roc_auc"] == pytest.approx(1.0)
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["recall"] == 0.0
    assert math.isnan(m["precision"])  # no positive prediction: precision undefined, not 0


def test_multiclass_macro_metrics_match_hand_computation():
    y = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(3), size=6) * 0.4
    probs[np.arange(6), pred] += 0.6  # argmax = pred, rows sum to 1
    m = classification_metrics(y, probs)
    np.testing.assert_array_equal(m["confusion_matrix"], [[1, 1, 0], [0, 2, 0], [1, 0, 1]])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(np.mean([1 / 2, 2 / 3, 1 / 1]))
    assert m["recall"] == pytest.approx(np.mean([1 / 2, 2 / 2, 1 / 2]))
    assert m["f1"] == pytest.approx(np.mean([2 / 4, 4 / 5, 2 / 3]))  # 2TP / (2TP + FP + FN)
    assert m["specificity"] == pytest.approx(np.mean([3 / 4, 3 / 4, 4 / 4]))  # TN / (TN + FP)
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))


def test_single_class_gives_nan_auc_not_a_crash():
    y = np.ones(6, dtype=int)
    probs = binary_probs([0.9, 0.8, 0.3, 0.7, 0.6, 0.2])
    m = classification_metrics(y, probs)
    assert math.isnan(m["roc_auc"])
    assert math.isnan(m["specificity"])  # no negatives
    assert m["recall"] == pytest.approx(4 / 6)
    cis = bootstrap_ci(y, probs, n_resamples=1000)
    assert all(math.isnan(v) for v in cis["roc_auc"])


@pytest.mark.parametrize(
    "y_true, probs, match",
    [
        (np.zeros((4, 1), int), binary_probs([0.1] * 4), "y_true must have shape"),
        (np.zeros(4, int), np.full(4, 0.5), "probs must have shape"),
        (np.zeros(3, int), binary_probs([0.1] * 4), "3 samples but probs has 4"),
        (np.array([0, 1, 2, 1]), binary_probs([0.1] * 4), r"labels must lie in \[0, 2\)"),
        (np.array([0, 1, 0, 1]), np.full((4, 2), 0.7), "sum to 1"),
        (np.array([0, 1, 0, 1]), np.array([[1.5, -0.5]] * 4), r"in \[0, 1\]"),
        (np.array([0.0, 0.5, 1.0, 1.0]), binary_probs([0.1] * 4), "integer class labels"),
        (np.array([], int), np.zeros((0, 2)), "empty"),
    ],
)
def test_bad_inputs_raise_clear_value_errors(y_true, probs, match):
    with pytest.raises(ValueError, match=match):
        classification_metrics(y_true, probs)


def synthetic(n_per_class, n_classes=2, separation=1.5, seed=0):
    """Labels (N,) and softmax probabilities (N, C) of a noisy but informative classifier."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(n_classes), n_per_class)
    logits = rng.normal(size=(y.size, n_classes))
    logits[np.arange(y.size), y] += separation
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, probs


@pytest.mark.parametrize("n_classes, stratified", [(2, True), (2, False), (5, True), (5, False)])
def test_vectorised_bootstrap_metrics_equal_sklearn_on_each_resample(n_classes, stratified):
    y, probs = synthetic(8, n_classes, separation=0.8, seed=n_classes)
    probs = np.round(probs, 1)  # ties in the scores exercise the half-credit term of the AUC
    probs /= probs.sum(axis=1, keepdims=True)
    idx = resample_indices(y, 30, np.random.default_rng(3), stratified)
    boot = metrics_from_indices(y, probs, idx, positive_class=1)
    for r in range(idx.shape[0]):
        ref = classification_metrics(y[idx[r]], probs[idx[r]])
        for name in SCALAR_METRICS:
            np.testing.assert_allclose(boot[name][r], ref[name], atol=1e-12, err_msg=f"{name} resample {r}")


def test_stratified_resampling_keeps_class_counts():
    y = np.array([0] * 7 + [1] * 3 + [2] * 5)
    idx = resample_indices(y, 200, np.random.default_rng(0), stratified=True)
    counts = np.stack([np.bincount(y[row], minlength=3) for row in idx])
    assert (counts == [7, 3, 5]).all()
    plain = resample_indices(y, 200, np.random.default_rng(0), stratified=False)
    assert len({tuple(np.bincount(y[row], minlength=3)) for row in plain}) > 1


def test_bootstrap_ci_contains_estimate_and_shrinks_with_more_samples():
    small = bootstrap_ci(*synthetic(20), n_resamples=1000, seed=0)
    large = bootstrap_ci(*synthetic(400), n_resamples=1000, seed=0)
    for name in SCALAR_METRICS:
        for cis in (small, large):
            value, low, high = cis[name]
            assert low <= value <= high, name
        assert large[name][2] - large[name][1] < small[name][2] - small[name][1], name


def test_bootstrap_is_deterministic_for_a_seed():
    y, probs = synthetic(20)
    first = bootstrap_ci(y, probs, n_resamples=1000, seed=7)
    assert bootstrap_ci(y, probs, n_resamples=1000, seed=7) == first
    assert bootstrap_ci(y, probs, n_resamples=1000, seed=8) != first


def test_bootstrap_multiclass_five_classes():
    y, probs = synthetic(10, n_classes=5, seed=2)
    cis = bootstrap_ci(y, probs, n_resamples=1000)
    point = classification_metrics(y, probs)
    assert set(cis) == set(SCALAR_METRICS)
    for name in SCALAR_METRICS:
        assert cis[name][0] == pytest.approx(point[name])
        assert 0.0 <= cis[name][1] <= cis[name][2] <= 1.0


def test_bootstrap_is_fast_on_a_test_set_of_forty():
    y, probs = synthetic(20)
    start = time.perf_counter()
    bootstrap_ci(y, probs, n_resamples=1000)
    assert time.perf_counter() - start < 5.0


@pytest.mark.parametrize("kwargs", [{"n_resamples": 999}, {"n_resamples": 1000.0}, {"alpha": 0.0}, {"alpha": 1.0}])
def test_bootstrap_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        bootstrap_ci(*synthetic(5), **kwargs)


def test_metrics_table_and_csv_round_trip(tmp_path):
    y, probs = synthetic(10)
    worse = 0.5 * probs + 0.25
    table = metrics_table({"ours": (y, probs), "baseline, 3D": (y, worse)}, n_resamples=1000)
    assert [r["model"] for r in table[:6]] == ["ours"] * 6
    assert [r["metric"] for r in table[:6]] == list(SCALAR_METRICS)
    assert len(table) == 2 * (6 + 4)
    path = write_metrics_csv(table, tmp_path / "out" / "evaluation_results.csv")
    assert sorted(p.name for p in path.parent.iterdir()) == ["evaluation_results.csv"]  # no temp files left
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        back = list(reader)
    assert len(back) == len(table)
    auc = next(r for r in back if r["model"] == "baseline, 3D" and r["metric"] == "roc_auc")
    expected = bootstrap_ci(y, worse, n_resamples=1000)["roc_auc"]
    assert (float(auc["value"]), float(auc["ci_low"]), float(auc["ci_high"])) == expected
    cell = next(r for r in back if r["model"] == "ours" and r["metric"] == "confusion_true1_pred1")
    assert int(cell["value"]) == classification_metrics(y, probs)["confusion_matrix"][1, 1]
    assert cell["ci_low"] == cell["ci_high"] == ""


def test_write_metrics_csv_rejects_rows_with_wrong_columns(tmp_path):
    with pytest.raises(ValueError, match="row 0"):
        write_metrics_csv([{"model": "a", "metric": "accuracy", "value": 1.0}], tmp_path / "x.csv")
    assert not (tmp_path / "x.csv").exists()


def test_ece_and_reliability_curve_hand_example():
    y = np.array([1, 0, 1, 1])
    probs = binary_probs([0.95, 0.95, 0.65, 0.65])  # confidences 0.95, 0.95, 0.65, 0.65
    curve = reliability_curve(y, probs, n_bins=10)
    assert curve["count"][9] == 2 and curve["count"][6] == 2 and curve["count"].sum() == 4
    assert curve["accuracy"][9] == pytest.approx(0.5) and curve["confidence"][9] == pytest.approx(0.95)
    assert curve["accuracy"][6] == pytest.approx(1.0) and curve["confidence"][6] == pytest.approx(0.65)
    assert np.isnan(curve["accuracy"][0])
    assert expected_calibration_error(y, probs, n_bins=10) == pytest.approx(0.5 * 0.45 + 0.5 * 0.35)


def test_ece_small_when_calibrated_and_large_when_overconfident():
    rng = np.random.default_rng(0)
    n = 20000
    confidence = rng.uniform(0.5, 1.0, n)
    predicted = rng.integers(0, 2, n)
    correct = rng.random(n) < confidence  # P(correct | confidence) = confidence
    y = np.where(correct, predicted, 1 - predicted)
    probs = binary_probs(np.where(predicted == 1, confidence, 1 - confidence))
    assert expected_calibration_error(y, probs) < 0.02
    y_over = np.where(rng.random(n) < 0.6, predicted, 1 - predicted)  # 60% right at 99% confidence
    over = binary_probs(np.where(predicted == 1, 0.99, 0.01))
    assert expected_calibration_error(y_over, over) == pytest.approx(0.39, abs=0.02)


# ----------------------------------------------------------------------------------------
# paired bootstrap of AUC differences
# ----------------------------------------------------------------------------------------

def correlated_scorers(n_per_class=30, seed=0):
    """Labels and two binary scorers that share most of their noise (positively correlated):
    b is a plus a little extra noise, so AUC(a) - AUC(b) varies far less than either AUC."""
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], n_per_class)
    a = y * 1.0 + rng.normal(size=y.size)
    b = a + 0.4 * rng.normal(size=y.size)
    return y, a, b


def test_paired_identical_scores_give_zero_difference():
    y, probs = synthetic(15)
    out = paired_auc_difference(y, probs, probs, n_resamples=1000)
    assert (out["diff"], out["ci_low"], out["ci_high"]) == (0.0, 0.0, 0.0)
    assert out["p_value"] == 1.0


def test_paired_perfect_vs_random_scorer_has_interval_above_zero():
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1], 20)
    perfect = y + 0.1 * rng.random(y.size)  # every positive above every negative
    random_scores = rng.random(y.size)
    out = paired_auc_difference(y, perfect, random_scores, n_resamples=1000, seed=0)
    assert out["diff"] == pytest.approx(1.0 - roc_auc_score(y, random_scores))
    assert 0 < out["ci_low"] <= out["diff"] <= out["ci_high"]
    assert out["p_value"] < 0.01


def test_paired_swapping_models_negates_difference_and_interval():
    y, a, b = correlated_scorers()
    ab = paired_auc_difference(y, a, b, n_resamples=1000, seed=3)
    ba = paired_auc_difference(y, b, a, n_resamples=1000, seed=3)
    assert ba["diff"] == pytest.approx(-ab["diff"])
    assert ba["ci_low"] == pytest.approx(-ab["ci_high"])
    assert ba["ci_high"] == pytest.approx(-ab["ci_low"])
    assert ba["p_value"] == pytest.approx(ab["p_value"])


def test_paired_is_deterministic_for_a_seed():
    y, a, b = correlated_scorers()
    first = paired_auc_difference(y, a, b, n_resamples=1000, seed=7)
    assert paired_auc_difference(y, a, b, n_resamples=1000, seed=7) == first
    assert paired_auc_difference(y, a, b, n_resamples=1000, seed=8) != first


@pytest.mark.parametrize("stratified", [True, False])
def test_paired_interval_equals_sklearn_on_the_same_resamples(stratified):
    y, probs_a = synthetic(10, separation=1.0, seed=4)
    _, probs_b = synthetic(10, separation=0.5, seed=5)
    probs_a = np.round(probs_a, 1)  # ties: the half-credit term of the AUC
    probs_a /= probs_a.sum(axis=1, keepdims=True)
    out = paired_auc_difference(y, probs_a, probs_b, n_resamples=1000, seed=2, stratified=stratified)
    idx = resample_indices(y, 1000, np.random.default_rng(2), stratified)
    diffs = np.array([roc_auc_score(y[r], probs_a[r, 1]) - roc_auc_score(y[r], probs_b[r, 1])
                      for r in idx if 0 < y[r].sum() < len(r)])
    diffs = np.round(diffs, 12)  # sklearn's trapezoids leave ~1e-16 where the difference is exactly 0
    assert out["diff"] == pytest.approx(roc_auc_score(y, probs_a[:, 1]) - roc_auc_score(y, probs_b[:, 1]))
    assert (out["ci_low"], out["ci_high"]) == pytest.approx(tuple(np.percentile(diffs, [2.5, 97.5])))
    side = (diffs <= 0) if out["diff"] > 0 else (diffs >= 0)
    assert out["p_value"] == pytest.approx(min(1.0, 2 * side.mean()))


def test_paired_interval_is_narrower_than_an_unpaired_one_for_correlated_scorers():
    """Mutation check: the two AUCs of a resample must come from the SAME resampled scans.
    Drawing them from independent resamples (an unpaired bootstrap) ignores the shared noise
    of positively correlated scorers and gives a much wider interval."""
    y, a, b = correlated_scorers()
    paired = paired_auc_difference(y, a, b, n_resamples=2000, seed=0)
    rng = np.random.default_rng(0)
    idx_a, idx_b = (resample_indices(y, 2000, rng, True) for _ in range(2))  # independent draws
    auc_a = auc_from_counts(resample_counts(idx_a, y.size), y == 1, a)
    auc_b = auc_from_counts(resample_counts(idx_b, y.size), y == 1, b)
    np.testing.assert_allclose(auc_a[:3], [roc_auc_score(y[r], a[r]) for r in idx_a[:3]])
    unpaired_width = np.subtract(*np.percentile(auc_a - auc_b, [97.5, 2.5]))
    assert paired["ci_high"] - paired["ci_low"] < 0.6 * unpaired_width


def test_paired_multiclass_uses_the_macro_one_vs_rest_rule():
    y, probs_a = synthetic(8, n_classes=5, separation=1.5, seed=6)
    _, probs_b = synthetic(8, n_classes=5, separation=0.5, seed=7)
    out = paired_auc_difference(y, probs_a, probs_b, n_resamples=1000)
    expected = classification_metrics(y, probs_a)["roc_auc"] - classification_metrics(y, probs_b)["roc_auc"]
    assert out["diff"] == pytest.approx(expected)
    assert out["ci_low"] <= out["diff"] <= out["ci_high"]


def test_paired_binary_probabilities_and_positive_class_scores_agree():
    y, probs_a = synthetic(12, seed=8)
    _, probs_b = synthetic(12, separation=0.3, seed=9)
    from_probs = paired_auc_difference(y, probs_a, probs_b, n_resamples=1000)
    from_scores = paired_auc_difference(y, probs_a[:, 1], probs_b[:, 1], n_resamples=1000)
    assert from_probs == pytest.approx(from_scores)
    flipped = paired_auc_difference(1 - y, probs_a[:, ::-1], probs_b[:, ::-1], n_resamples=1000, positive_class=0)
    assert flipped["diff"] == pytest.approx(from_probs["diff"])


@pytest.mark.parametrize("labels, a, b, kwargs", [
    ([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8], [0.1, 0.9, 0.2], {}),                      # lengths differ
    ([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8], binary_probs([0.1, 0.9, 0.2, 0.8]), {}),  # shapes differ
    ([1, 1, 1, 1], [0.1, 0.9, 0.2, 0.8], [0.3, 0.9, 0.2, 0.8], {}),                # one class
    ([0, 1, 2, 1], [0.1, 0.9, 0.2, 0.8], [0.3, 0.9, 0.2, 0.8], {}),                # (N,) scores, 3 classes
    ([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8], [0.3, 0.9, 0.2, 0.8], {"n_resamples": 10}),
    ([0, 1, 0, 1], [0.1, 0.9, np.nan, 0.8], [0.3, 0.9, 0.2, 0.8], {}),
])
def test_paired_rejects_bad_inputs(labels, a, b, kwargs):
    with pytest.raises(ValueError):
        paired_auc_difference(labels, a, b, **kwargs)


def test_seed_summary_is_mean_and_sample_sd():
    mean, sd = seed_summary([0.39, 0.43, 0.41])
    assert mean == pytest.approx(0.41)
    assert sd == pytest.approx(0.02)  # ddof = 1
    assert math.isnan(seed_summary([0.5])[1])
    with pytest.raises(ValueError):
        seed_summary([])
