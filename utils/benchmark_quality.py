"""Quality benchmark: DiffMIC-3D against its own DCG and the 3D CNN baselines, paired, over seeds.

    python -m utils.benchmark_quality --data adrenal --seeds 0 1 2 [--ablations] [--set key=value ...]
    python -m utils.benchmark_quality --data phantoms --seeds 0 1 2

Datasets (``--data``):
    adrenal   AdrenalMNIST3D (MedMNIST v2; real CT-derived, 1,188 / 98 / 298 official split),
              from ``../shared/data/medmnist/adrenalmnist3d.npz`` beside the repository, at
              32^3 (``--data`` may also be the path of any MedMNIST 3D ``.npz``);
    phantoms  300 embedded chest-CT phantoms at 128 in-plane, input 64x64x32 (60 test scans per
              seed, so that a 0.1 AUC difference is resolvable), each seed its own split.
    smoke     the CI size (12 phantoms), to check the code path only.

Per seed the whole experiment runs (``utils.run.run_experiment``, resumable: a finished run is
only loaded) and its test predictions, made ONCE per configuration, are compared pairwise on
the same scans: ROC-AUC of DiffMIC-3D minus that of the DCG it is conditioned on (its fused
prediction, and its global prior alone) and minus each baseline, with a 95% stratified paired
bootstrap interval (``utils.evaluation.paired.paired_auc_difference``). ``--ablations`` (seed 0 only)
retrains phase 2 with one design element reverted at a time, and phase 1 without the DCG
curriculum or the foreground ROI restriction, each evaluated once on the test split.

Writes ``OUTPUT_DIR/quality_<data>.md`` and ``.csv`` (``table,item,metric,value,ci_low,ci_high``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from utils.benchmarking.quality import run_quality
from utils.cli import make_parser
from utils.paths import REPO_ROOT
from utils.training.profiles import parse_overrides


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("utils.benchmark_quality", __doc__)
    parser.add_argument("--data", default="adrenal", help="adrenal, phantoms, smoke or the path of a MedMNIST .npz")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run per seed")
    parser.add_argument("--ablations", action="store_true", help="also the seed-0 ablation table")
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "outputs" / "benchmark", help="report folder")
    parser.add_argument("--device", default=None, help="cpu, cuda or auto (default: $MEDISCOPE_DEVICE, else auto)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="TrainConfig overrides (default: none; keys as in python -m utils.run --help)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    path = run_quality(args.data, tuple(args.seeds), args.output_dir, parse_overrides(args.set), args.ablations,
                       args.device)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
