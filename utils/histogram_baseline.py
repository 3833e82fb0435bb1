"""Histogram baseline: can global intensity statistics alone tell the classes apart?

A logistic regression on each scan's whole-volume HU histogram (32 bins over
-1100..500 HU) is the check the phantom generator is calibrated against: lesions must not
be separable from normal scans by how much of the volume sits in the ground-glass or
consolidation HU range, only by where and how it is arranged. At the default difficulty
the 5-fold cross-validated accuracy should stay near chance (<= 70 %).

Scans are read with the project's loader (``utils.data.nifti_io.load_nifti``), so the
baseline measures exactly what the pipeline sees.

Usage::

    python -m utils.histogram_baseline --data-dir data/MosMedData [--seed 0]
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from utils.data.discovery import discover_scans
from utils.errors import DataError
from utils.data.nifti_io import load_nifti


def histogram_features(hu: np.ndarray, bins: int = 32, hu_range: tuple[float, float] = (-1100.0, 500.0)) -> np.ndarray:
    """Normalised HU histogram of a whole volume.

    Values are clipped into ``hu_range`` first, so outside-FOV padding (-2048) counts in
    the lowest bin and dense bone in the highest, as the pipeline's own clipping would
    merge them.

    Args:
        hu: any-shape array of Hounsfield units.
        bins: number of equal-width bins.
        hu_range: (low, high) HU edges of the histogram.

    Returns:
        (bins,) float64 frequencies summing to 1.
    """
    lo, hi = hu_range
    if hu.size == 0 or not lo < hi:
        raise ValueError(f"histogram_features needs a non-empty array and low < high, got size {hu.size}, "
                         f"range {hu_range}")
    counts, _ = np.histogram(np.clip(hu, lo, hi), bins=bins, range=(lo, hi))
    return counts / counts.sum()


def histogram_baseline_accuracy(paths: Sequence[str | Path], labels: Sequence[int], seed: int = 0,
                                bins: int = 32, folds: int = 5) -> tuple[float, float]:
    """Mean and std of the stratified ``folds``-fold accuracy of StandardScaler + LogisticRegression.

    Args:
        paths: NIfTI scans, read with ``load_nifti``.
        labels: one integer class per scan.
        seed: shuffles the folds.
        bins: histogram bins per scan.
        folds: cross-validation folds (each class needs at least this many scans).
    """
    labels = np.asarray(labels)
    if len(paths) != len(labels):
        raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
    smallest = np.bincount(labels).min() if len(labels) else 0
    if len(np.unique(labels)) < 2 or smallest < folds:
        raise DataError(None, f"the histogram baseline needs two classes with >= {folds} scans each, "
                              f"got class counts {np.bincount(labels).tolist()}")
    features = np.stack([histogram_features(load_nifti(p).hu, bins=bins) for p in paths])  # (N, bins)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    scores = cross_val_score(model, features, labels, cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    return float(scores.mean()), float(scores.std())


def main(argv: list[str] | None = None) -> tuple[float, float]:
    """Command line: print the histogram baseline's accuracy on a dataset folder."""
    from utils.cli import make_parser

    parser = make_parser("utils.histogram_baseline", __doc__)
    parser.add_argument("--data-dir", type=Path, required=True, help="folder holding a MosMedData layout (required)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the cross-validation folds")
    parser.add_argument("--label-mode", choices=("binary", "severity"), default="binary", help="labels")
    args = parser.parse_args(argv)
    records = discover_scans(args.data_dir, label_mode=args.label_mode)
    mean, std = histogram_baseline_accuracy([r.path for r in records], [r.label for r in records], seed=args.seed)
    counts = np.bincount([r.label for r in records]).tolist()
    print(f"histogram + logistic regression, 5-fold CV on {len(records)} scans (class counts {counts}): "
          f"accuracy {mean:.3f} +/- {std:.3f}")
    return mean, std


if __name__ == "__main__":
    main()
