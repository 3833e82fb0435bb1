"""Tests of utils.evaluation.uncertainty (risk-coverage, AURC, error detection, the paired
bootstrap, the scores of a sampling classifier, referral) and of plot_risk_coverage: against
brute force, hand computation, scipy / sklearn, and slow per-resample loops."""
import itertools
import math

import numpy as np
import pytest
from matplotlib.figure import Figure
from scipy import stats
from sklearn.metrics import roc_auc_score

from utils.evaluation.metrics import resample_indices
from utils.evaluation.uncertainty import (
    accuracy_at_coverage,
    aurc,
    boot_selective_metrics,
    chain_spread,
    decision_risk,
    decisions,
    entropy_of_mean,
    error_detection_auroc,
    excess_aurc,
    optimal_aurc,
    paired_uncertainty_comparison,
    refer,
    refer_threshold,
    risk_coverage_curve,
    threshold_margin,
    ttest_top2_pvalue,
)
from utils.evaluation.visualization import plot_risk_coverage


def toy(n=40, error_rate=0.3, seed=0, n_levels=None):
    """errors (N,) bool and an uncertainty (N,) that is higher on errors on average; with
    ``n_levels`` the uncertainty takes that many values only (many ties)."""
    rng = np.random.default_rng(seed)
    errors = rng.random(n) < error_rate
    u = errors + rng.normal(0, 0.8, n)
    if n_levels is not None:
        u = np.digitize(u, np.quantile(u, np.linspace(0, 1, n_levels + 1)[1:-1])).astype(float)
    return errors, u


def brute_risk(errors_in_order):
    """Risk at k = 1..N of scans already sorted most certain first (no ties)."""
    e = np.asarray(errors_in_order, dtype=float)
    return np.cumsum(e) / np.arange(1, e.size + 1)


# ----------------------------------------------------------------------------------------
# risk-coverage and AURC
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, n_errors", [(10, 0), (10, 3), (7, 7), (25, 9)])
def test_perfect_scorer_reaches_optimal_aurc_and_detection_auroc_one(n, n_errors):
    errors = np.zeros(n, dtype=bool)
    errors[np.random.default_rng(n).choice(n, n_errors, replace=False)] = True
    perfect = errors.astype(float)  # all correct scans tied, all errors tied, errors last
    assert aurc(errors, perfect) == pytest.approx(optimal_aurc(errors), abs=1e-12)
    assert excess_aurc(errors, perfect) == pytest.approx(0.0, abs=1e-12)
    if 0 < n_errors < n:
        assert error_detection_auroc(errors, perfect) == 1.0
        assert aurc(errors, -perfect) > aurc(errors, perfect)
    else:
        assert math.isnan(error_detection_auroc(errors, perfect))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_optimal_aurc_closed_form_equals_best_of_all_orderings(n):
    for n_errors in range(n + 1):
        errors = np.array([True] * n_errors + [False] * (n - n_errors))
        best = min(brute_risk(np.array(p)).mean() for p in set(itertools.permutations(errors)))
        assert optimal_aurc(errors) == pytest.approx(best, abs=1e-12)
        assert optimal_aurc(errors[::-1]) == pytest.approx(best, abs=1e-12)


def test_curve_without_ties_equals_cumulative_error_rate():
    errors, u = toy(30, seed=1)
    curve = risk_coverage_curve(errors, u)
    np.testing.assert_allclose(curve["risk"], brute_risk(errors[np.argsort(u)]), atol=1e-12)
    np.testing.assert_allclose(curve["coverage"], np.arange(1, 31) / 30)
    assert curve["n"] == 30 and curve["n_errors"] == int(errors.sum())
    assert aurc(errors, u) == pytest.approx(curve["risk"].mean())


def test_random_scorer_aurc_averages_to_the_error_rate_and_constant_is_exact():
    errors, _ = toy(50, seed=2)
    rng = np.random.default_rng(0)
    mean_random = np.mean([aurc(errors, rng.permutation(50).astype(float)) for _ in range(1000)])
    assert mean_random == pytest.approx(errors.mean(), abs=0.01)
    good = aurc(*toy(50, seed=2))
    assert good < errors.mean() - 0.05  # an informative score does clearly better than chance
    constant = risk_coverage_curve(errors, np.full(50, 3.0))
    np.testing.assert_allclose(constant["risk"], errors.mean(), atol=1e-12)  # ties in expectation
    assert aurc(errors, np.zeros(50)) == pytest.approx(errors.mean(), abs=1e-12)
    assert error_detection_auroc(errors, np.zeros(50)) == 0.5


def test_tie_rule_is_invariant_to_the_order_of_scans():
    errors, u = toy(40, seed=3, n_levels=4)
    base = risk_coverage_curve(errors, u)
    base_acc = accuracy_at_coverage(errors, u)
    rng = np.random.default_rng(1)
    for _ in range(20):
        perm = rng.permutation(40)
        np.testing.assert_allclose(risk_coverage_curve(errors[perm], u[perm])["risk"], base["risk"], atol=1e-12)
        assert aurc(errors[perm], u[perm]) == pytest.approx(aurc(errors, u), abs=1e-12)
        assert accuracy_at_coverage(errors[perm], u[perm]) == pytest.approx(base_acc, abs=1e-12)
    # tied errors first or last would change a by-order tie break; the tie rule does not care
    ordered = np.argsort(u + 0.5 * errors, kind="stable")
    reordered = np.argsort(u - 0.5 * errors, kind="stable")
    assert aurc(errors[ordered], u[ordered]) == pytest.approx(aurc(errors[reordered], u[reordered]), abs=1e-12)


def test_tie_rule_equals_the_mean_over_all_tie_breaks():
    errors = np.array([1, 0, 0, 1, 1, 0, 0], dtype=bool)
    u = np.array([0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 2.0])
    curves = [brute_risk(errors[np.lexsort((np.array(p), u))]) for p in itertools.permutations(range(7))]
    np.testing.assert_allclose(risk_coverage_curve(errors, u)["risk"], np.mean(curves, axis=0), atol=1e-12)


def test_accuracy_at_coverage_by_hand():
    # most certain first: errors at ranks 4, 7, 9, 10
    errors_sorted = np.array([0, 0, 0, 1, 0, 0, 1, 0, 1, 1], dtype=bool)
    perm = np.random.default_rng(0).permutation(10)
    errors, u = errors_sorted[perm], np.arange(10.0)[perm]
    acc = accuracy_at_coverage(errors, u)
    assert acc == pytest.approx({1.0: 0.6, 0.9: 6 / 9, 0.8: 6 / 8, 0.7: 5 / 7}, abs=1e-12)  # 0.7 keeps 7, not 8
    assert acc[1.0] == pytest.approx(1 - errors.mean())
    assert accuracy_at_coverage(errors, u, [0.05])[0.05] == 1.0  # ceil(0.5) = 1 scan kept
    errors_100 = np.arange(100) == 7  # the 8th most certain scan is the only error
    assert accuracy_at_coverage(errors_100, np.arange(100.0), [0.07])[0.07] == 1.0  # 7 kept, not 8
    # a cut inside a tie group: 1 error in the first 5 tied scans, 3 in the last 5
    errors_tied = np.array([1, 0, 0, 0, 0, 1, 1, 1, 0, 0], dtype=bool)
    u_tied = np.array([0.0] * 5 + [1.0] * 5)
    assert accuracy_at_coverage(errors_tied, u_tied, (0.7,))[0.7] == pytest.approx(1 - (1 + 2 * 3 / 5) / 7)


def test_error_detection_auroc_matches_sklearn():
    errors, u = toy(40, seed=4, n_levels=5)
    assert error_detection_auroc(errors, u) == pytest.approx(roc_auc_score(errors, u))
    assert error_detection_auroc(errors.astype(int), u) == pytest.approx(roc_auc_score(errors, u))  # 0/1 accepted


# ----------------------------------------------------------------------------------------
# paired bootstrap
# ----------------------------------------------------------------------------------------

NAMES = ("aurc", "error_detection_auroc", "accuracy_at_80")


def test_paired_identical_inputs_give_zero_difference():
    errors, u = toy(30, seed=5, n_levels=6)
    out = paired_uncertainty_comparison(errors, u, errors, u, n_resamples=1000)
    assert set(out) == set(NAMES)
    for name in NAMES:
        assert out[name]["diff"] == 0.0 and out[name]["a"] == out[name]["b"]
        assert (out[name]["ci_low"], out[name]["ci_high"], out[name]["p_value"]) == (0.0, 0.0, 1.0)


def test_paired_perfect_vs_reversed_scorer_has_intervals_of_the_right_sign():
    errors, _ = toy(60, error_rate=0.2, seed=6)
    perfect, reversed_ = errors.astype(float), -errors.astype(float)
    out = paired_uncertainty_comparison(errors, perfect, errors, reversed_, n_resamples=1000)
    assert out["aurc"]["diff"] < 0 and out["aurc"]["ci_high"] < 0  # lower AURC is better
    assert out["error_detection_auroc"]["diff"] == 1.0 and out["error_detection_auroc"]["ci_low"] == 1.0
    assert out["accuracy_at_80"]["diff"] > 0 and out["accuracy_at_80"]["ci_low"] > 0
    assert all(out[name]["p_value"] < 0.01 for name in NAMES)
    swapped = paired_uncertainty_comparison(errors, reversed_, errors, perfect, n_resamples=1000)
    for name in NAMES:
        assert swapped[name]["diff"] == -out[name]["diff"]
        assert swapped[name]["ci_low"] == pytest.approx(-out[name]["ci_high"])


@pytest.mark.parametrize("stratified", [False, True])
def test_paired_equals_a_slow_loop_over_the_same_resamples(stratified):
    rng = np.random.default_rng(7)
    errors_a, u_a = toy(24, seed=7, n_levels=5)
    errors_b = np.where(rng.random(24) < 0.2, ~errors_a, errors_a)  # model b: its own predictions
    u_b = rng.normal(size=24) + errors_b
    labels = rng.integers(0, 3, 24) if stratified else None
    out = paired_uncertainty_comparison(errors_a, u_a, errors_b, u_b, labels=labels, n_resamples=1000, seed=3)
    y = labels if stratified else np.zeros(24, dtype=int)
    idx = resample_indices(y, 1000, np.random.default_rng(3), stratified)
    slow = {name: [] for name in NAMES}
    for row in idx:
        ea, ua, eb, ub = errors_a[row], u_a[row], errors_b[row], u_b[row]  # copies of a scan are tied
        slow["aurc"].append(aurc(ea, ua) - aurc(eb, ub))
        slow["error_detection_auroc"].append(error_detection_auroc(ea, ua) - error_detection_auroc(eb, ub))
        slow["accuracy_at_80"].append(accuracy_at_coverage(ea, ua, (0.8,))[0.8] - accuracy_at_coverage(eb, ub, (0.8,))[0.8])
    for name in NAMES:
        boot = np.array(slow[name])
        boot = boot[~np.isnan(boot)]
        low, high = np.percentile(boot, [2.5, 97.5])
        assert (out[name]["ci_low"], out[name]["ci_high"]) == pytest.approx((low, high), abs=1e-10)
        diff = out[name]["diff"]
        share = np.mean(boot <= 0) if diff > 0 else np.mean(boot >= 0)
        assert out[name]["p_value"] == pytest.approx(min(1.0, 2 * share))
    assert out["aurc"]["a"] == pytest.approx(aurc(errors_a, u_a))
    assert out["aurc"]["b"] == pytest.approx(aurc(errors_b, u_b))


def test_resampled_metrics_equal_a_slow_loop_when_resamples_hold_different_numbers_of_scans():
    """A seed's share of scans drawn over several seeds' splits varies between resamples (and may
    be empty): every metric equals the one computed on that resample's scans, copies tied."""
    errors, u = toy(24, seed=9, n_levels=6)
    counts = np.random.default_rng(9).poisson(0.8, size=(300, 24))  # (R, N), totals vary
    counts[0] = 0  # a resample without any of these scans
    fast = boot_selective_metrics(counts, errors, u)
    assert all(np.isnan(fast[name][0]) for name in NAMES)
    assert all(np.isnan(v).all() for v in boot_selective_metrics(counts[:1], errors, u).values())  # none drawn at all
    for r in range(1, 300):
        row = np.repeat(np.arange(24), counts[r])
        slow = {"aurc": aurc(errors[row], u[row]),
                "error_detection_auroc": error_detection_auroc(errors[row], u[row]),
                "accuracy_at_80": accuracy_at_coverage(errors[row], u[row], (0.8,))[0.8]}
        for name in NAMES:
            assert fast[name][r] == pytest.approx(slow[name], abs=1e-12, nan_ok=True), (r, name)


def test_paired_is_deterministic_for_a_seed():
    errors, u = toy(30, seed=8)
    _, u_b = toy(30, seed=9)
    first = paired_uncertainty_comparison(errors, u, errors, u_b, n_resamples=1000, seed=1)
    assert paired_uncertainty_comparison(errors, u, errors, u_b, n_resamples=1000, seed=1) == first
    other = paired_uncertainty_comparison(errors, u, errors, u_b, n_resamples=1000, seed=2)
    assert other["aurc"]["diff"] == first["aurc"]["diff"] and other["aurc"]["ci_low"] != first["aurc"]["ci_low"]


# ----------------------------------------------------------------------------------------
# scores of a sampling classifier
# ----------------------------------------------------------------------------------------

def test_chain_spread_by_hand():
    samples = np.array([[[0.4, 0.6], [0.9, 0.1]],
                        [[0.2, 0.8], [0.3, 0.7]],
                        [[0.3, 0.7], [0.9, 0.1]]])  # (S=3, N=2, C=2)
    # scan 0: class 1 on top (mean 0.7); scan 1: class 0 on top (mean 0.7) though chain 2 prefers class 1
    expected = [np.std([0.6, 0.8, 0.7]), np.std([0.9, 0.3, 0.9])]
    np.testing.assert_allclose(chain_spread(samples), expected, atol=1e-12)


def test_ttest_top2_pvalue_equals_scipy_ttest_rel():
    rng = np.random.default_rng(10)
    samples = rng.dirichlet([4.0, 2.0, 1.0], size=(8, 15))  # (S, N, C)
    p = ttest_top2_pvalue(samples)
    for n in range(15):
        first, second = np.argsort(-samples[:, n].mean(axis=0))[:2]
        assert p[n] == pytest.approx(stats.ttest_rel(samples[:, n, first], samples[:, n, second]).pvalue, rel=1e-9)
    assert p.shape == (15,) and np.all((p >= 0) & (p <= 1))


def test_ttest_top2_pvalue_edge_cases():
    same = np.tile(np.array([[0.7, 0.2, 0.1], [0.5, 0.5, 0.0]]), (4, 1, 1))  # 4 identical chains
    np.testing.assert_array_equal(ttest_top2_pvalue(same), [0.0, 1.0])
    with pytest.raises(ValueError, match="at least 2 chains"):
        ttest_top2_pvalue(same[:1])


def test_entropy_of_mean():
    probs = np.array([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    np.testing.assert_allclose(entropy_of_mean(probs), [math.log(4), 0.0, math.log(2)], atol=1e-12)
    samples = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])  # two confident chains that disagree
    np.testing.assert_allclose(entropy_of_mean(samples), [math.log(2)])


def test_threshold_margin_ranks_like_max_probability_and_is_zero_at_the_threshold():
    rng = np.random.default_rng(11)
    p_pos = rng.uniform(0.01, 0.99, 50)
    probs = np.stack([1 - p_pos, p_pos], axis=1)
    margin = threshold_margin(probs)
    np.testing.assert_array_equal(stats.rankdata(margin), stats.rankdata(probs.max(axis=1)))
    at_t = threshold_margin(np.array([[0.7, 0.3], [0.4, 0.6]]), threshold=0.3)
    assert at_t[0] == pytest.approx(0.0, abs=1e-12) and at_t[1] > 0
    # positive_class 0 with threshold t on p(class 0) is the mirror image
    np.testing.assert_allclose(threshold_margin(probs[:, ::-1], 0.3, positive_class=0), threshold_margin(probs, 0.3))
    probs3 = rng.dirichlet([1, 1, 1], 5)
    np.testing.assert_allclose(threshold_margin(probs3), probs3.max(axis=1))
    with pytest.raises(ValueError, match="threshold is for binary"):
        threshold_margin(probs3, threshold=0.5)


def test_decision_risk_is_one_minus_the_decided_class_probability():
    probs = np.array([[0.8, 0.2], [0.65, 0.35], [0.3, 0.7]])
    np.testing.assert_allclose(decision_risk(probs), [0.2, 0.35, 0.3])  # t = 0.5: 1 - max p
    # t = 0.3: the scan at p = 0.35 is now decided positive, and wrong with probability 0.65
    np.testing.assert_allclose(decision_risk(probs, threshold=0.3), [0.2, 0.65, 0.3])
    np.testing.assert_allclose(decision_risk(probs[:, ::-1], 0.3, positive_class=0), decision_risk(probs, 0.3))
    probs3 = np.array([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]])
    np.testing.assert_allclose(decision_risk(probs3), [0.5, 0.4])
    with pytest.raises(ValueError, match="threshold is for binary"):
        decision_risk(probs3, threshold=0.3)


def test_on_calibrated_probabilities_decision_risk_refers_errors_better_than_the_margin():
    """Chow's rule: labels drawn from the probabilities themselves, decided at t = 0.25; the
    margin refers a scan at p = t - e as readily as one at t + e, which is wrong three times as
    often; the decision risk ranks by the probability of error and reaches a lower AURC."""
    rng = np.random.default_rng(5)
    p_pos = rng.beta(1, 3, 20000)
    labels = rng.random(p_pos.size) < p_pos
    probs = np.stack([1 - p_pos, p_pos], axis=1)
    errors = decisions(probs, threshold=0.25) != labels
    risk = decision_risk(probs, threshold=0.25)
    margin = -threshold_margin(probs, threshold=0.25)
    assert aurc(errors, risk) < aurc(errors, margin) - 0.01
    assert error_detection_auroc(errors, risk) > error_detection_auroc(errors, margin) + 0.05


def test_decisions():
    probs = np.array([[0.8, 0.2], [0.65, 0.35], [0.3, 0.7]])
    np.testing.assert_array_equal(decisions(probs), [0, 0, 1])
    np.testing.assert_array_equal(decisions(probs, threshold=0.3), [0, 1, 1])
    np.testing.assert_array_equal(decisions(probs, threshold=0.7, positive_class=0), [0, 1, 1])
    np.testing.assert_array_equal(decisions(np.array([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]])), [1, 0])


# ----------------------------------------------------------------------------------------
# referral
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("coverage", [0.05, 0.5, 0.7, 0.8, 0.93, 1.0])
def test_refer_threshold_keeps_the_requested_share_of_validation_scans(coverage):
    u_val = np.round(np.random.default_rng(12).normal(size=37), 1)  # with ties
    thr = refer_threshold(u_val, coverage)
    assert thr in u_val  # chosen from the validation values only
    assert np.mean(u_val <= thr) >= coverage
    smaller = u_val[u_val < thr]
    assert smaller.size == 0 or np.mean(u_val <= smaller.max()) < coverage  # the smallest such value
    np.testing.assert_array_equal(refer(u_val, thr), u_val > thr)


def test_refer_threshold_hand_example_and_refer_on_test_scans():
    assert refer_threshold(np.arange(10.0), 0.7) == 6.0  # 7 of 10 kept
    assert refer_threshold(np.arange(10.0), 1.0) == 9.0
    assert refer_threshold(np.arange(100.0), 0.07) == 6.0  # 0.07 * 100 is 7.000000000000001 in floats: 7 kept
    np.testing.assert_array_equal(refer([1.0, 6.0, 6.5, 20.0], 6.0), [False, False, True, True])


# ----------------------------------------------------------------------------------------
# bad inputs
# ----------------------------------------------------------------------------------------

E, U = np.array([True, False, False]), np.array([0.3, 0.1, 0.2])


@pytest.mark.parametrize("call, match", [
    (lambda: aurc(E, U[:2]), r"errors \(3,\) and uncertainty \(2,\)"),
    (lambda: aurc([0, 2, 1], U), "errors must be bool"),
    (lambda: aurc(E, [0.1, np.nan, 0.2]), "uncertainty contains NaN"),
    (lambda: aurc([], []), r"errors must have shape \(N,\) with N > 0"),
    (lambda: aurc(E[None], U[None]), r"errors must have shape \(N,\)"),
    (lambda: aurc(E, ["a", "b", "c"]), "uncertainty must hold numbers"),
    (lambda: optimal_aurc([0.5, 1.0]), "errors must be bool"),
    (lambda: accuracy_at_coverage(E, U, (0.0,)), r"every coverage must lie in \(0, 1\]"),
    (lambda: accuracy_at_coverage(E, U, (1.2,)), r"every coverage must lie in \(0, 1\]"),
    (lambda: paired_uncertainty_comparison(E, U, E, U, n_resamples=10), "n_resamples must be an integer >= 1000"),
    (lambda: paired_uncertainty_comparison(E, U, E, U, alpha=1.5), "alpha must lie in"),
    (lambda: paired_uncertainty_comparison(E, U, E[:2], U[:2]), "model a has 3 scans but model b has 2"),
    (lambda: paired_uncertainty_comparison(E, U, E, U[:2]), "errors_b .* and uncertainty_b"),
    (lambda: paired_uncertainty_comparison(E, U, E, U, labels=[0, 1]), "labels must be 3 integer class labels"),
    (lambda: paired_uncertainty_comparison(E, U, E, U, labels=[0, 1.5, 1]), "labels must be 3 integer"),
    (lambda: chain_spread(np.full((2, 3), 0.5)), r"samples must have shape \(S, N, C\)"),
    (lambda: chain_spread(np.full((2, 3, 2), 0.6)), "samples must sum to 1"),
    (lambda: chain_spread(np.full((2, 3, 2), [1.5, -0.5])), r"samples must be finite probabilities in \[0, 1\]"),
    (lambda: entropy_of_mean(np.ones((3, 1))), r"probs must have shape \(N, C\) with N > 0 and C >= 2"),
    (lambda: threshold_margin([[0.5, 0.5]], threshold=1.0), r"threshold must lie in \(0, 1\)"),
    (lambda: threshold_margin([[0.5, 0.5]], positive_class=2), "positive_class must be 0 or 1"),
    (lambda: decisions([[0.2, 0.3, 0.5]], threshold=0.5), "threshold is for binary"),
    (lambda: refer_threshold(U, 0.0), r"coverage must lie in \(0, 1\]"),
    (lambda: refer_threshold(U, True), r"coverage must lie in \(0, 1\]"),
    (lambda: refer_threshold([], 0.8), "uncertainty_val must have shape"),
    (lambda: refer(U, float("nan")), "threshold must be a finite number"),
])
def test_bad_inputs_raise_readable_value_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ----------------------------------------------------------------------------------------
# figure
# ----------------------------------------------------------------------------------------

def test_plot_risk_coverage_draws_one_line_per_curve_and_the_bar_panel():
    curves, table = {}, {}
    for name, seed in (("DiffMIC-3D: chain spread", 13), ("ResNet-18: max prob", 14)):
        errors, u = toy(30, seed=seed, n_levels=6)
        curve = risk_coverage_curve(errors, u)
        curves[name] = (curve["coverage"], curve["risk"])
        table[name] = accuracy_at_coverage(errors, u)
    fig = plot_risk_coverage(curves)
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    ax = fig.axes[0]
    assert len(ax.lines) == 2 and len({line.get_linestyle() for line in ax.lines}) == 2
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0] == f"DiffMIC-3D: chain spread: AURC {curves['DiffMIC-3D: chain spread'][1].mean():.3f}"
    assert "%" in ax.get_xlabel() and "%" in ax.get_ylabel()

    fig = plot_risk_coverage(curves, accuracy_table=table, title="Referral")
    assert len(fig.axes) == 2 and fig.get_suptitle() == "Referral"
    bar_ax = fig.axes[1]
    assert len(bar_ax.patches) == 2 * 4  # 2 models x 4 coverages
    heights = sorted(p.get_height() for p in bar_ax.patches)
    assert heights == pytest.approx(sorted(100 * v for row in table.values() for v in row.values()))
    printed = {t.get_text() for t in bar_ax.texts}
    assert f"{100 * table['ResNet-18: max prob'][0.7]:.1f}" in printed
    assert [t.get_text() for t in bar_ax.get_xticklabels()] == ["100%", "90%", "80%", "70%"]


def test_plot_risk_coverage_rejects_bad_input():
    with pytest.raises(ValueError, match="curves is empty"):
        plot_risk_coverage({})
    with pytest.raises(ValueError, match="must have the same shape"):
        plot_risk_coverage({"a": ([0.5, 1.0], [0.1])})
    with pytest.raises(ValueError, match="has coverages"):
        plot_risk_coverage({"a": ([0.5, 1.0], [0.1, 0.2])},
                           accuracy_table={"a": {1.0: 0.8, 0.9: 0.9}, "b": {1.0: 0.8}})


def test_plot_risk_coverage_gives_a_score_the_same_colour_in_both_panels():
    from matplotlib.colors import to_rgba

    curves, table = {}, {}
    for name, seed in (("DiffMIC-3D: risk", 15), ("DiffMIC-3D: margin", 16), ("DCG: msp", 17)):
        errors, u = toy(30, seed=seed, n_levels=6)
        curve = risk_coverage_curve(errors, u)
        curves[name] = (curve["coverage"], curve["risk"])
        table[name] = accuracy_at_coverage(errors, u)
    table = {name: table[name] for name in reversed(list(table))}  # the table in another order
    fig = plot_risk_coverage(curves, accuracy_table=table)
    line_ax, bar_ax = fig.axes
    line_colour = {line.get_label().split(": AURC")[0]: to_rgba(line.get_color()) for line in line_ax.lines}
    bar_colour = {c.get_label(): to_rgba(c.patches[0].get_facecolor()) for c in bar_ax.containers}
    assert set(line_colour) == set(bar_colour) == set(curves)
    assert bar_colour == line_colour and len(set(line_colour.values())) == 3
    assert [c.get_label() for c in bar_ax.containers] == list(curves)  # the bars in the curves' order
