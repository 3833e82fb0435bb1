"""Tests of utils.evaluation.thresholds: thresholds chosen on validation predictions and the metrics
at a decision, against hand-computed values, sklearn and metrics.classification_metrics."""
import math

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score

from utils.evaluation.metrics import classification_metrics
from utils.evaluation.thresholds import (
    best_balanced_accuracy,
    predict_at,
    prevalence_threshold,
    threshold_metrics,
    youden_threshold,
)


def binary_probs(p_pos):
    p_pos = np.asarray(p_pos, dtype=np.float64)
    return np.stack([1 - p_pos, p_pos], axis=1)


# 4 negatives, 6 positives (the hand example of test_metrics).
HAND_Y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
HAND_P = binary_probs([0.1, 0.2, 0.3, 0.7, 0.4, 0.45, 0.6, 0.8, 0.9, 0.95])


def scored(n, shift, seed):
    """Binary labels and probabilities whose positives score ``shift`` higher in logit."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=n)
    return y, binary_probs(1 / (1 + np.exp(-(shift * y - 1.0 + rng.normal(size=n)))))


def test_youden_on_a_hand_made_example():
    # t = 0.35 (between 0.3 and 0.4): TPR = 6/6, FPR = 1/4 -> J = 0.75, the best; e.g.
    # t = 0.425: 5/6 - 1/4 = 0.583; t = 0.75: 3/6 - 0 = 0.5; t = 0.25: 1 - 2/4 = 0.5
    assert youden_threshold(HAND_Y, HAND_P) == pytest.approx(0.35)
    assert best_balanced_accuracy(HAND_Y, HAND_P) == pytest.approx((1 + 0.75) / 2)
    m = threshold_metrics(HAND_Y, HAND_P, threshold=0.35)
    assert (m["recall"], m["specificity"], m["balanced_accuracy"]) == pytest.approx((1.0, 0.75, 0.875))


def test_youden_ties_go_to_the_candidate_closest_to_one_half():
    y = np.array([0, 1, 0, 1])
    p = binary_probs([0.1, 0.2, 0.6, 0.7])
    # t = 0.15: TPR 1, FPR 1/2; t = 0.65: TPR 1/2, FPR 0: both J = 0.5; 0.65 is closer to 0.5
    assert youden_threshold(y, p) == pytest.approx(0.65)
    # equally close (0.15 and 0.85): the smaller
    assert youden_threshold(y, binary_probs([0.1, 0.2, 0.8, 0.9])) == pytest.approx(0.15)


def test_youden_candidates_include_the_ends_and_stay_in_unit_interval():
    y = np.array([0, 0, 1, 1])
    inverted = binary_probs([0.9, 1.0, 0.0, 0.1])  # positives lowest: every threshold has J <= 0
    t = youden_threshold(y, inverted)
    assert 0 <= t <= 1
    assert t in (pytest.approx(0.0), pytest.approx(1.0))  # J = 0: call all positive or all negative
    assert best_balanced_accuracy(y, inverted) == pytest.approx(0.5)
    perfect = binary_probs([0.0, 0.0, 1.0, 1.0])
    assert youden_threshold(perfect.argmax(1), perfect) == pytest.approx(0.5)


def test_youden_with_positive_class_zero_ranks_the_other_column():
    t = youden_threshold(1 - HAND_Y, HAND_P[:, ::-1], positive_class=0)
    assert t == pytest.approx(0.35)


def test_threshold_is_chosen_on_validation_and_applied_unchanged_to_test():
    y_val, p_val = scored(80, 2.0, seed=0)
    y_test, p_test = scored(120, 2.0, seed=1)
    t = youden_threshold(y_val, p_val)
    assert youden_threshold(y_val, p_val) == t  # deterministic, from the validation predictions only
    assert youden_threshold(y_test, p_test) != t  # the test split would choose another one
    m = threshold_metrics(y_test, p_test, threshold=t)
    assert m["threshold"] == t
    pred = (p_test[:, 1] >= t).astype(int)
    np.testing.assert_array_equal(predict_at(p_test, t), pred)
    assert m["accuracy"] == pytest.approx(np.mean(pred == y_test))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_test, pred))
    assert m["recall"] == pytest.approx(np.mean(pred[y_test == 1] == 1))
    assert m["specificity"] == pytest.approx(np.mean(pred[y_test == 0] == 0))


def test_prevalence_threshold_calls_as_many_positives_as_there_are():
    # 6 positives: midpoint of the 6th (0.45) and 7th (0.4) largest scores
    assert prevalence_threshold(HAND_Y, HAND_P) == pytest.approx(0.425)
    y, p = scored(101, 1.0, seed=2)
    t = prevalence_threshold(y, p)
    assert int((p[:, 1] >= t).sum()) == int(y.sum())
    # ties across the boundary: the nearest count (here 2 positives, scores 0.9, 0.5, 0.5, 0.1)
    y_tied = np.array([1, 1, 0, 0])
    t_tied = prevalence_threshold(y_tied, binary_probs([0.9, 0.5, 0.5, 0.1]))
    assert int((np.array([0.9, 0.5, 0.5, 0.1]) >= t_tied).sum()) in (1, 3)


def test_predict_at_one_half_equals_argmax_except_at_exact_ties():
    rng = np.random.default_rng(3)
    p_pos = rng.random(200)
    p_pos = p_pos[p_pos != 0.5]
    probs = binary_probs(p_pos)
    np.testing.assert_array_equal(predict_at(probs, 0.5), probs.argmax(axis=1))
    np.testing.assert_array_equal(predict_at(probs), probs.argmax(axis=1))
    np.testing.assert_array_equal(predict_at(probs, 0.5, positive_class=0), probs.argmax(axis=1))
    tie = binary_probs([0.5])
    assert predict_at(tie, 0.5)[0] == 1  # the threshold rule calls a tie positive ...
    assert predict_at(tie)[0] == 0  # ... argmax takes the first column
    assert predict_at(tie, 0.5, positive_class=0)[0] == 0
    assert predict_at(probs, 0.0).tolist() == [1] * len(p_pos)
    assert predict_at(probs, 1.01).tolist() == [0] * len(p_pos)


def test_predict_at_multiclass_is_argmax():
    rng = np.random.default_rng(4)
    p = rng.dirichlet(np.ones(4), size=30)
    np.testing.assert_array_equal(predict_at(p), p.argmax(axis=1))
    assert predict_at(p).dtype == np.int64


@pytest.mark.parametrize("n_classes", [2, 3])
def test_threshold_metrics_at_argmax_equal_classification_metrics(n_classes):
    rng = np.random.default_rng(5)
    y = np.arange(60) % n_classes
    logits = 1.2 * np.eye(n_classes)[y] + rng.normal(size=(60, n_classes))
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    m, ref = threshold_metrics(y, p), classification_metrics(y, p)
    for name in ("accuracy", "precision", "recall", "f1", "specificity"):
        assert m[name] == pytest.approx(ref[name]), name
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p.argmax(axis=1)))
    assert m["threshold"] is None


def test_threshold_metrics_undefined_precision_is_nan():
    m = threshold_metrics(HAND_Y, HAND_P, threshold=0.99)  # nothing called positive
    assert math.isnan(m["precision"])  # 0 / 0: no positive prediction
    assert m["f1"] == 0.0  # 2 TP / (2 TP + FP + FN) = 0 / 6 is defined
    assert (m["recall"], m["specificity"], m["balanced_accuracy"]) == (0.0, 1.0, 0.5)


def test_best_balanced_accuracy_bounds_every_threshold():
    for seed in range(5):
        y, p = scored(60, 1.5, seed=10 + seed)
        p = np.round(p, 2)  # ties
        p[:, 0] = 1 - p[:, 1]
        best = best_balanced_accuracy(y, p)
        grid = np.r_[np.linspace(0, 1, 201), np.unique(p[:, 1]), np.random.default_rng(seed).random(50)]
        reached = [threshold_metrics(y, p, threshold=t)["balanced_accuracy"] for t in grid]
        assert best >= max(reached) - 1e-12
        assert best == pytest.approx(max(reached))  # the grid holds every score, so it reaches the best
        t = youden_threshold(y, p)
        assert threshold_metrics(y, p, threshold=t)["balanced_accuracy"] == pytest.approx(best)


@pytest.mark.parametrize("call, match", [
    (lambda: youden_threshold(np.zeros(4, int), binary_probs([0.1, 0.2, 0.3, 0.4])), "single class"),
    (lambda: youden_threshold(np.arange(6) % 3, np.full((6, 3), 1 / 3)), "binary only, got probs with C = 3"),
    (lambda: best_balanced_accuracy(np.arange(6) % 3, np.full((6, 3), 1 / 3)), "binary only"),
    (lambda: prevalence_threshold(np.ones(4, int), binary_probs([0.1, 0.2, 0.3, 0.4])), "single class"),
    (lambda: youden_threshold(HAND_Y, HAND_P[:5]), "y_true has 10 samples but probs has 5"),
    (lambda: youden_threshold(HAND_Y, HAND_P, positive_class=2), "positive_class must be 0 or 1"),
    (lambda: youden_threshold(HAND_Y, HAND_P * 0.5), "rows must sum to 1"),
    (lambda: predict_at(np.full((6, 3), 1 / 3), threshold=0.5), "threshold is for binary probs only"),
    (lambda: predict_at(HAND_P, threshold=float("nan")), "threshold must be a finite number"),
    (lambda: predict_at(HAND_P, threshold="0.5"), "threshold must be a finite number"),
    (lambda: predict_at(HAND_P[:, 1]), r"probs must have shape \(N, C\)"),
    (lambda: threshold_metrics(HAND_Y, HAND_P, positive_class=3), "positive_class must be 0 or 1"),
])
def test_bad_inputs_raise_a_readable_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
