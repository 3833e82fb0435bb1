"""Compare two configurations' DiffMIC-3D on the VALIDATION split, seed by seed and pooled.

    python scripts/compare_validation.py NEW_RUNS_DIR OLD_RUNS_DIR [--model DiffMIC-3D]

Each folder holds one finished run per seed (``quality_<data>_seed<s>/val_predictions.csv``,
as ``utils.benchmark_quality`` writes them); the runs of the same name in both are compared
(``--data`` keeps those of one data set, e.g. ``adrenalmnist3d``). Prints the
validation AUC of each seed, their mean, and the pooled paired difference (new minus old, seeds
and scans; ``utils.evaluation.protocol.pooled_comparison``). This is how a change to the
default is decided without the test split: the rule is stated before the runs (e.g. "keep the
change iff the mean validation AUC does not fall"), the test split is then read once per
configuration by the benchmark's report.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.benchmarking.pooled import read_split  # noqa: E402
from utils.benchmarking.report import OURS  # noqa: E402
from utils.evaluation.metrics import classification_metrics  # noqa: E402
from utils.evaluation.protocol import format_pooled, pooled_comparison  # noqa: E402

SEED_DIR = re.compile(r"_seed(\d+)$")


def seed_runs(folder: Path, data: str = "", holding: str = "val_predictions.csv") -> dict[str, Path]:
    """Run name -> run folder holding ``holding`` under ``folder`` (names with ``_seed<s>`` at
    the end and ``data`` in them)."""
    if not Path(folder).is_dir():
        raise SystemExit(f"{folder} is not a folder of runs")
    runs = {}
    for path in sorted(Path(folder).iterdir()):
        match = SEED_DIR.search(path.name)
        if match and data in path.name and (path / holding).is_file():
            runs[path.name] = path
    return runs


def compare(new_dir: Path, old_dir: Path, model: str = OURS, n_resamples: int = 2000, data: str = "") -> str:
    """The report (Markdown lines) of ``model``'s validation AUC, new vs old."""
    new, old = seed_runs(new_dir, data), seed_runs(old_dir, data)
    names = sorted(set(new) & set(old))
    if not names:
        raise SystemExit(f"no run has val_predictions.csv in both {new_dir} and {old_dir}")
    labels, a, b, paths, aucs = [], [], [], [], []
    lines = ["| run | new | old | new - old |", "|---|---:|---:|---:|"]
    for s in names:
        split_new, split_old = read_split(new[s], "val_predictions.csv"), read_split(old[s], "val_predictions.csv")
        if split_new.paths != split_old.paths:
            raise SystemExit(f"{s}: the two runs scored different validation scans")
        if model not in split_new.models or model not in split_old.models:
            raise SystemExit(f"{s}: no {model!r} rows in both runs")
        pa, pb = split_new.models[model].probs, split_old.models[model].probs
        auc_a = classification_metrics(split_new.labels, pa)["roc_auc"]
        auc_b = classification_metrics(split_old.labels, pb)["roc_auc"]
        lines.append(f"| {s} | {auc_a:.4f} | {auc_b:.4f} | {auc_a - auc_b:+.4f} |")
        labels.append(split_new.labels), a.append(pa), b.append(pb), paths.append(split_new.paths)
        aucs.append((auc_a, auc_b))
    mean_a, mean_b = np.mean(aucs, axis=0)
    lines.append(f"| mean | {mean_a:.4f} | {mean_b:.4f} | {mean_a - mean_b:+.4f} |")
    pooled = pooled_comparison(labels, a, b, paths=paths, n_resamples=n_resamples)
    lines.append("")
    lines.append(format_pooled(pooled, f"{model} validation AUC, new minus old, pooled"))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("new_dir", type=Path)
    parser.add_argument("old_dir", type=Path)
    parser.add_argument("--model", default=OURS, help=f"the model rows to compare (default {OURS!r})")
    parser.add_argument("--data", default="", help="only the runs whose folder name contains this")
    args = parser.parse_args(argv)
    print(compare(args.new_dir, args.old_dir, args.model, data=args.data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
