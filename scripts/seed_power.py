"""How the pooled interval of a multi-seed comparison would narrow with more seeds.

    python scripts/seed_power.py RUNS_DIR [--data adrenalmnist3d] [--a DiffMIC-3D]
                                 [--b "DCG without diffusion"] [--seeds 5 10 20 50]

RUNS_DIR holds one finished run per seed (``quality_<data>_seed<s>/predictions.csv``, as
``utils.benchmark_quality`` writes them, or as ``scripts/external_test.py`` writes the runs'
predictions on an external set). The comparison is the report's: the mean over seeds of
the per-seed paired test-AUC difference a - b. Its variance has two parts:

* scans: the mean of k seeds' differences over scan resamples alone (the seeds fixed; the scans
  drawn once for all seeds, ``utils.evaluation.protocol.scan_resample_counts``), fitted as
  ``floor + spread / k`` over k = 1..S (every subset of k seeds, or 20 drawn ones when there
  are many). On a test split every seed shares, ``floor`` is the noise the scans leave however
  many seeds are trained; on disjoint splits it is near 0.
* seeds: the variance of the per-seed differences, divided by the number of seeds.

It prints both and the projected 95% half-width ``1.96 sqrt(floor + (spread + seed var) / S)``
for each S asked (a normal approximation; the report's bootstrap interval at the S run is printed
beside it to compare). This says how many seeds a difference of a given size needs, before
anyone trains them.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.compare_validation import seed_runs  # noqa: E402
from utils.benchmarking.pooled import read_split  # noqa: E402
from utils.benchmarking.report import DCG_FUSED, OURS  # noqa: E402
from utils.evaluation.protocol import seed_differences, two_stage  # noqa: E402

Z95 = 1.959964


def variance_parts(labels, scores_a, scores_b, paths=None, n_resamples: int = 2000, seed: int = 0) -> dict:
    """The two parts of the variance of the mean over seeds of AUC(a) - AUC(b) (binary).

    Args:
        labels, scores_a, scores_b, paths: per seed, as ``protocol.hierarchical_paired_auc``.
        n_resamples: scan resamples. seed: their generator's seed.

    Returns:
        ``{"floor", "spread": the scans' part fitted as floor + spread / k, "seed_var": the
        per-seed differences' variance (ddof 1; 0 with one seed), "per_seed": the S
        differences, "by_k": {k: mean over subsets of the scans-only variance of their mean},
        "bootstrap": the pooled interval at the S seeds run (``protocol.two_stage``)}``.
    """
    rng = np.random.default_rng(seed)
    per_seed, diffs = seed_differences(labels, scores_a, scores_b, paths, n_resamples, rng)  # (S,), (S, R)
    bootstrap = two_stage(per_seed, diffs, rng)  # the same draws as hierarchical_paired_auc(..., seed=seed)
    n_seeds = len(per_seed)
    by_k = {}
    for k in range(1, n_seeds + 1):
        subsets = list(itertools.combinations(range(n_seeds), k))
        if len(subsets) > 20:
            subsets = [tuple(rng.choice(n_seeds, k, replace=False)) for _ in range(20)]
        by_k[k] = float(np.mean([np.nanvar(diffs[list(sub)].mean(axis=0)) for sub in subsets]))
    ks = np.array(sorted(by_k), dtype=np.float64)
    if len(ks) > 1:
        design = np.stack([np.ones_like(ks), 1.0 / ks], axis=1)
        floor, spread = np.linalg.lstsq(design, np.array([by_k[k] for k in sorted(by_k)]), rcond=None)[0]
    else:  # one seed: the scans' part cannot be split
        floor, spread = 0.0, by_k[1]
    return {"floor": float(max(floor, 0.0)), "spread": float(max(spread, 0.0)),
            "seed_var": float(np.var(per_seed, ddof=1)) if n_seeds > 1 else 0.0,
            "per_seed": per_seed, "by_k": by_k, "bootstrap": bootstrap}


def half_width(parts: dict, n_seeds: int) -> float:
    """Projected 95% half-width of the pooled difference with ``n_seeds`` seeds (normal approximation)."""
    return Z95 * float(np.sqrt(parts["floor"] + (parts["spread"] + parts["seed_var"]) / n_seeds))


def report(runs_dir: Path, a: str = OURS, b: str = DCG_FUSED, data: str = "", seeds=(5, 10, 20, 50),
           n_resamples: int = 2000) -> str:
    """The printed report (Markdown lines)."""
    runs = [read_split(path) for _, path in sorted(seed_runs(runs_dir, data, "predictions.csv").items())]
    runs = [r for r in runs if a in r.models and b in r.models]
    if not runs:
        raise SystemExit(f"no run under {runs_dir} has both {a!r} and {b!r} in its predictions.csv")
    labels, paths = [r.labels for r in runs], [r.paths for r in runs]
    sa, sb = [r.models[a].probs for r in runs], [r.models[b].probs for r in runs]
    parts = variance_parts(labels, sa, sb, paths, n_resamples)
    boot = parts["bootstrap"]
    lines = [f"{a} minus {b}, test ROC-AUC, {len(runs)} seeds: {boot['diff']:+.4f} "
             f"[{boot['ci_low']:+.4f}, {boot['ci_high']:+.4f}] (bootstrap; half-width "
             f"{(boot['ci_high'] - boot['ci_low']) / 2:.4f})",
             f"scans: SD of the mean of k seeds over scan resamples, k = 1..{len(runs)}: "
             + ", ".join(f"{np.sqrt(v):.4f}" for _, v in sorted(parts["by_k"].items()))
             + f"; floor SD {np.sqrt(parts['floor']):.4f}",
             f"seeds: SD of the per-seed differences {np.sqrt(parts['seed_var']):.4f}",
             "", "| seeds | projected 95% half-width |", "|---:|---:|"]
    lines += [f"| {s} | {half_width(parts, s):.4f} |" for s in sorted({len(runs), *seeds})]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("runs_dir", type=Path, help="folder of finished runs, one per seed")
    parser.add_argument("--data", default="", help="keep the runs whose name holds this (e.g. adrenalmnist3d)")
    parser.add_argument("--a", default=OURS, help="model a")
    parser.add_argument("--b", default=DCG_FUSED, help="model b (the reference)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[5, 10, 20, 50], help="seed counts to project")
    parser.add_argument("--n-resamples", type=int, default=2000)
    args = parser.parse_args(argv)
    print(report(args.runs_dir, args.a, args.b, args.data, args.seeds, args.n_resamples))


if __name__ == "__main__":
    main()
