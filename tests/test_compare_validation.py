"""scripts/compare_validation.py: two configurations' validation AUCs, per seed and pooled."""
import csv

import numpy as np
import pytest

from helpers import load_script

compare_validation = load_script("compare_validation")


def _write(folder, seed, p1, labels, paths=None, name="x"):
    run = folder / f"quality_{name}_seed{seed}"
    run.mkdir(parents=True)
    with open(run / "val_predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "path", "label", "prob_a", "prob_b", "threshold"])
        for i, (p, y) in enumerate(zip(p1, labels)):
            w.writerow(["DiffMIC-3D", (paths or [f"s{j}" for j in range(len(labels))])[i], y, 1 - p, p, 0.5])


def test_a_better_configuration_is_reported_above_a_random_one(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 2
    for seed in (0, 1):
        _write(tmp_path / "new", seed, 0.2 + 0.6 * labels + 0.05 * rng.random(40), labels)  # perfect ranking
        _write(tmp_path / "old", seed, rng.random(40), labels)
    _write(tmp_path / "new", 2, rng.random(40), labels)  # a seed only one side has is left out
    _write(tmp_path / "old", 0, rng.random(40), labels, name="other")  # so is another data set's run
    _write(tmp_path / "new", 0, rng.random(40), labels, name="other")
    report = compare_validation.compare(tmp_path / "new", tmp_path / "old", n_resamples=1000, data="x_")
    rows = [line for line in report.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["quality_x_seed0", "quality_x_seed1", "mean"]
    new_mean, old_mean = (float(x) for x in rows[-1].split("|")[2:4])
    assert new_mean == 1.0 and old_mean < 0.8
    diff = float(report.splitlines()[-1].split("pooled: ")[1].split()[0])
    assert diff == pytest.approx(new_mean - old_mean, abs=1e-3)


def test_runs_that_scored_other_scans_are_refused(tmp_path):
    labels = np.arange(10) % 2
    _write(tmp_path / "new", 0, labels * 0.5 + 0.2, labels)
    _write(tmp_path / "old", 0, labels * 0.5 + 0.2, labels, paths=[f"t{j}" for j in range(10)])
    with pytest.raises(SystemExit, match="different validation scans"):
        compare_validation.compare(tmp_path / "new", tmp_path / "old")
    with pytest.raises(SystemExit, match="no run has"):
        (tmp_path / "empty").mkdir()
        compare_validation.compare(tmp_path / "new", tmp_path / "empty")
