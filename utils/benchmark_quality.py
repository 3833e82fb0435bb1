"""Quality benchmark: DiffMIC-3D against its own DCG, a matched DCG ensemble and the 3D CNN
baselines, over seeds and scans together.

    python -m utils.benchmark_quality --data adrenal --seeds 0 1 2 3 4 [--ablations [all|inference|no-correction|...]] [--set key=value ...]
    python -m utils.benchmark_quality --data phantoms --seeds 0 1 2 3 4

Datasets (``--data``):
    adrenal   AdrenalMNIST3D (MedMNIST v2; real CT-derived, 1,188 / 98 / 298 official split),
              from ``../shared/data/medmnist/adrenalmnist3d.npz`` beside the repository, at
              32^3 (``--data`` may also be the path of any MedMNIST 3D ``.npz``); every seed
              scores the same 298 test scans;
    phantoms  300 embedded chest-CT phantoms at 128 in-plane, input 64x64x32 (60 test scans per
              seed), each seed its own split.
    smoke     the CI size (12 phantoms), to check the code path only.

Per seed the whole experiment runs (``utils.run.run_experiment``, resumable) and scores its test
split ONCE; a finished run (its ``timings.json`` written, same configuration) is only read. The primary comparison, stated before any run, is
DiffMIC-3D minus its DCG (fused prediction) in test ROC-AUC, pooled over seeds and scans
(``utils.benchmarking.pooled``: a paired bootstrap over seeds and scans, and DeLong's test on the
seed-averaged predictions where the seeds share their test scans), reported beside the per-seed
paired intervals; the same for the matched DCG ensemble, the DCG's global prior and the
baselines. Decisions at each model's validation threshold, calibration, and the uncertainty
scores' risk-coverage curves are pooled the same way, and the method's goals are printed with
their measured figures. ``--ablations`` runs the ablations of ``utils.benchmarking.ablations`` on
every seed and pools them likewise; ``--ablations inference`` only the inference-only variants
(minutes per seed, where each retrained one costs a phase-2 training per seed), ``--ablations
no-correction`` (``no-weighting``, ``label-weights``, ``image-ce``, ``fine-encoder``, ``fine-encoder-16``,
``morphometry``, ``shape-only``, ``distance-blend``) those and one retrained variant.

Writes ``OUTPUT_DIR/quality_<data>.md`` and ``.csv`` (``table,item,metric,value,ci_low,ci_high``,
goal rows included), ``quality_<data>_ablations.md`` and ``risk_coverage_<data>.png``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from utils.benchmarking.quality import ABLATION_MODES, run_quality
from utils.cli import make_parser
from utils.paths import REPO_ROOT
from utils.training.profiles import parse_overrides


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("utils.benchmark_quality", __doc__)
    parser.add_argument("--data", default="adrenal", help="adrenal, phantoms, smoke or the path of a MedMNIST .npz")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="one run per seed")
    parser.add_argument("--ablations", nargs="?", const="all", default=None, choices=ABLATION_MODES,
                        help="also the ablations on every seed, pooled: all (default; nine phase-2 retrainings "
                             "per seed), inference (the inference-only variants alone, minutes per seed), or the "
                             "inference-only variants and one retrained variant: no-correction, no-weighting, "
                             "label-weights, image-ce, fine-encoder, fine-encoder-16, morphometry, shape-only or distance-blend")
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
