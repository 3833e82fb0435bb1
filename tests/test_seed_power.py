"""scripts/seed_power.py: the scans' and the seeds' parts of a pooled difference's variance, and
the half-width projected for more seeds, on cases whose answer is known."""
import csv

import numpy as np
import pytest

from helpers import load_script
from utils.evaluation.protocol import hierarchical_paired_auc

seed_power = load_script("seed_power")


def scorers(rng, n=60):
    y = np.repeat([0, 1], n // 2)
    shared = rng.normal(size=n)
    return y, y * 1.2 + shared + 0.3 * rng.normal(size=n), y * 0.8 + shared + 0.3 * rng.normal(size=n)


def test_copies_of_one_seed_on_one_split_leave_only_the_scans_floor():
    """Five identical runs: no seed spread, and no seed count narrows the scans' noise."""
    y, a, b = scorers(np.random.default_rng(0))
    parts = seed_power.variance_parts([y] * 5, [a] * 5, [b] * 5, n_resamples=1000)
    one = parts["by_k"][1]
    assert parts["seed_var"] == 0 and len(set(parts["per_seed"])) == 1
    assert all(v == pytest.approx(one) for v in parts["by_k"].values())
    assert parts["floor"] == pytest.approx(one) and parts["spread"] == pytest.approx(0, abs=1e-12)
    assert seed_power.half_width(parts, 5) == pytest.approx(seed_power.half_width(parts, 500))


def test_disjoint_splits_average_their_scan_noise_away():
    rng = np.random.default_rng(1)
    ys, a_s, b_s = zip(*(scorers(rng) for _ in range(5)))
    paths = [[f"seed{s}/scan{i}" for i in range(60)] for s in range(5)]
    parts = seed_power.variance_parts(ys, a_s, b_s, paths, n_resamples=1000)
    assert parts["by_k"][5] < 0.35 * parts["by_k"][1]  # ~ 1/5
    assert parts["floor"] < 0.1 * parts["spread"]
    assert seed_power.half_width(parts, 50) < 0.5 * seed_power.half_width(parts, 5)
    pooled = hierarchical_paired_auc(ys, a_s, b_s, 1000, 0, paths=paths)  # the report's interval, same draws
    assert parts["bootstrap"] == {k: pooled[k] for k in parts["bootstrap"]}


def test_the_report_reads_run_folders_and_prints_the_projection(tmp_path, capsys):
    rng = np.random.default_rng(2)
    y, _, _ = scorers(rng)
    for s in range(3):
        _, a, b = scorers(rng)
        run = tmp_path / f"quality_x_seed{s}"
        run.mkdir()
        with open(run / "predictions.csv", "w", newline="") as f:  # no val_predictions.csv: an external set's
            w = csv.writer(f)
            w.writerow(["model", "path", "label", "prob_a", "prob_b", "threshold"])
            for model, score in (("DiffMIC-3D", a), ("DCG without diffusion", b)):
                p = 1 / (1 + np.exp(-score))
                w.writerows([model, f"scan{i}", y[i], 1 - p[i], p[i], 0.5] for i in range(len(y)))
    seed_power.main([str(tmp_path), "--seeds", "10", "--n-resamples", "1000"])
    out = capsys.readouterr().out
    assert "DiffMIC-3D minus DCG without diffusion, test ROC-AUC, 3 seeds" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    widths = {int(r.split("|")[1]): float(r.split("|")[2]) for r in rows}
    assert set(widths) == {3, 10} and widths[10] < widths[3]
    with pytest.raises(SystemExit, match="no run"):
        seed_power.main([str(tmp_path), "--b", "3D ResNet-18"])
