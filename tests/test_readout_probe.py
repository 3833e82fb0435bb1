"""scripts/readout_probe.py: shape descriptors of known shapes, a leave-one-DCG-fold-out readout
that never reads its held-out fold and finds signal its prior lacks (and none in noise), and a
report that pools seeds and scans."""
import re

import numpy as np
import pytest

from helpers import load_script

probe = load_script("readout_probe")


def _ball(n=24, r=7.0, centre=None):
    grid = np.indices((n, n, n)).astype(float)
    c = np.full(3, (n - 1) / 2) if centre is None else np.asarray(centre, float)
    return (((grid - c[:, None, None, None]) ** 2).sum(0) <= r * r).astype(np.float32)


def _features(volume):
    return dict(zip(probe.MORPHOMETRY, probe.morphometry(volume)))


def test_morphometry_of_a_ball_and_a_rod():
    ball = _ball()
    rod = np.zeros((24, 24, 24), np.float32)
    rod[2:22, 10:13, 10:13] = 1
    b, r = _features(ball), _features(rod)
    assert b["log volume"] == pytest.approx(np.log(ball.sum()))
    assert r["log surface"] == pytest.approx(np.log(2 * 9 + 4 * 60))  # 20 x 3 x 3: two ends, four sides
    assert b["elongation"] > 0.95 and b["flatness"] > 0.95  # a ball has three equal axes
    assert r["elongation"] < 0.2 and r["flatness"] < 0.2
    assert b["sphericity"] > r["sphericity"]
    assert (r["extent 1"], r["extent 2"], r["extent 3"]) == (20, 3, 3)
    assert b["max inscribed radius"] == pytest.approx(7, abs=1) and b["max diameter"] == pytest.approx(14, abs=1)
    assert b["components"] == 1 and b["largest component share"] == 1


def test_morphometry_counts_components_and_concavity_and_ignores_the_intensity_scale():
    two = _ball(32, 5, (8, 8, 8)) + _ball(32, 5, (22, 22, 22))
    f = _features(two)
    assert f["components"] == 2 and f["largest component share"] == pytest.approx(0.5)
    assert f["solidity"] < 0.5  # the hull spans the gap between the balls
    assert np.allclose(probe.morphometry(two * 300.0 - 1000.0), probe.morphometry(two))


def test_morphometry_of_degenerate_masks_is_finite_and_bad_input_is_refused():
    assert not probe.morphometry(np.zeros((8, 8, 8))).any()  # empty: zeros
    sheet = np.zeros((8, 8, 8))
    sheet[4, 1:7, 1:7] = 1  # one plane: no 3D hull
    assert np.isfinite(probe.morphometry(sheet)).all()
    with pytest.raises(ValueError, match="3D volume"):
        probe.morphometry(np.zeros((8, 8)))


def test_logit_is_the_log_odds_of_the_positive_class():
    p = np.array([[0.8, 0.2], [0.5, 0.5], [0.0, 1.0]])
    assert np.allclose(probe.logit(p)[:2], [np.log(0.25), 0.0])
    assert probe.logit(p)[2] == pytest.approx(np.log(1 / 1e-6))


def _problem(seed=0, n=600):
    """Labels, a prior that sees half of the signal, a feature with the other half, a noise feature;
    the scans (labels, signals) are the same for every seed, the prior's and the noise's draws not."""
    scans = np.random.default_rng(0)
    a, b = scans.normal(size=n), scans.normal(size=n)
    labels = (a + b + 0.5 * scans.normal(size=n) > 0.6).astype(int)
    rng = np.random.default_rng(seed + 1)
    prior = 1 / (1 + np.exp(-(a + 0.3 * rng.normal(size=n))))
    return labels, np.stack([1 - prior, prior], 1), b[:, None], rng.normal(size=(n, 3)), np.arange(n) % 3


def _auc(labels, probs):
    from sklearn.metrics import roc_auc_score
    return roc_auc_score(labels, probs[:, 1])


def test_the_readout_finds_signal_its_prior_lacks_and_none_in_noise():
    labels, prior, signal, noise, fold = _problem()
    base = _auc(labels, prior)
    assert _auc(labels, probe.leave_fold_out_readout(prior, signal, labels, fold)) > base + 0.05
    assert abs(_auc(labels, probe.leave_fold_out_readout(prior, noise, labels, fold)) - base) < 0.02


def test_a_fold_is_predicted_without_its_own_labels():
    labels, prior, signal, _, fold = _problem(1)
    first = probe.leave_fold_out_readout(prior, signal, labels, fold)
    flipped = labels.copy()
    flipped[fold == 0] = 1 - flipped[fold == 0]
    again = probe.leave_fold_out_readout(prior, signal, flipped, fold)
    assert np.array_equal(again[fold == 0], first[fold == 0])  # fold 0 read only through its features
    assert not np.allclose(again[fold == 1], first[fold == 1])  # the other folds were fitted on them
    with pytest.raises(ValueError, match="binary"):
        probe.leave_fold_out_readout(prior, signal, labels * 2, fold)


def test_the_report_pools_seeds_and_compares_with_the_cached_correction():
    runs, readouts = {}, {}
    for s in (0, 1):
        labels, prior, signal, noise, fold = _problem(s, n=300)
        runs[s] = {"labels": labels, "fold": fold, "prior": prior, "signal": signal, "noise": noise}
        readouts[s] = probe.probe_run(runs[s], ["none", "signal", "noise"], s)
    rows = np.arange(len(runs[0]["labels"]))[::-1]  # the cross-fit stores its scans fold by fold
    crossfit = {0: {"rows": rows, "labels": runs[0]["labels"][rows], "corrected": runs[0]["prior"][rows]}}
    text = probe.report(runs, readouts, crossfit, n_resamples=1000)
    assert "| prior alone | readout: none | readout: signal |" in text
    assert text.count("\n| ") == 2 and "| 1 | 300 |" in text and text.splitlines()[3].endswith("| - |")
    seed0 = text.splitlines()[2].strip("| ").split(" | ")
    assert seed0[2] == seed0[-1]  # the cached "correction" is the prior: the same AUC, read in its own order
    intervals = {line.split(":")[0][2:]: tuple(float(x) for x in re.search(r"\[([-+0-9.]+), ([-+0-9.]+)\]", line).groups())
                 for line in text.splitlines() if line.startswith("- ")}
    assert intervals["readout (signal) minus its prior alone"][0] > 0
    low, high = intervals["readout (noise) minus readout (none)"]
    assert low < 0 < high  # noise adds nothing to the prior's own readout
    assert intervals["readout (signal) minus readout (none)"][0] > 0
    # the "correction" cached here is the prior itself, in another order: the same difference, one seed
    line = next(x for x in text.splitlines() if x.startswith("- readout (signal) minus the cross-fitted"))
    assert "1 seeds x 300 scans" in line and intervals["readout (signal) minus the cross-fitted correction"][0] > 0


def test_an_unknown_feature_set_is_refused_before_any_work(tmp_path):
    with pytest.raises(SystemExit, match="unknown feature sets \\['texture'\\]"):
        probe.main([str(tmp_path), "adrenal", "--features", "dcg+texture"])
