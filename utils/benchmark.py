"""Benchmark suite: quality, speed, checkpoints, memory and scaling of DiffMIC-3D beside a plain 3D CNN.

    python -m utils.benchmark [--sections NAME ...] [--quick] [--output-dir outputs]
                              [--quality-dir outputs/benchmark] [--speed-run RUN] [--device cpu|cuda]

Measures every section (or the ``--sections`` named), stores each in
``OUTPUT_DIR/benchmark_sections/NAME.json`` stamped with the git commit and a fingerprint of
the measuring code (``utils.benchmarking.sections``), then writes ``OUTPUT_DIR/benchmark.md``
(the report, assembled from every stored section: each with its command, machine and stamp;
one measured on code that has changed since is marked stale, with the command that re-measures
it) and ``OUTPUT_DIR/benchmark.csv`` (``section,item,metric,value,spread,unit``). Experiment
runs go to ``OUTPUT_DIR/benchmark_runs/`` and are resumed when started again. Timings within a
section come from one invocation on one machine, so their ratios are meaningful.

Sections (``--quick`` runs the same code at smoke sizes, for CI):

``quality``: the reports of ``python -m utils.benchmark_quality`` (``QUALITY_DIR/quality_
   phantoms300.md``, ``quality_adrenalmnist3d.md``, ``quality_adrenalmnist3d_ablations.md``;
   paired test-AUC differences over seeds), included as text; the quality targets are read
   from their CSVs ("not measured" when absent). ``--quick`` also runs ``run_quality('smoke',
   (0, 1), OUTPUT_DIR/quality)``. Plus a histogram + logistic-regression baseline.
``speed`` (a finished run: ``--speed-run``, else the ``demo`` profile's seed 0 trained in
   ``benchmark_runs/speed_demo_seed0``; the smoke run with ``--quick``): seconds per training
   epoch of phase 1 and phase 2; inference per volume split into its parts (the DCG members,
   the condition branch, the sampling) beside one DCG forward and a ResNet-18 forward, how it
   grows with chains and steps, and the test accuracy / AUC of DDPM, DDIM 10 and DDIM 1.
``checkpoints``: the per-epoch resume, best-weights and finished file of every stage, in the
   earlier layout and the lean one, at the demo and full sizes, and what the run wrote.
``memory``: peak GPU memory of each training stage of ``full`` at batch 4 under float16 AMP
   estimated without a GPU (fake tensors + PyTorch's MemTracker), whether it fits a 15 GB T4
   and the largest batch that does; peak resident memory and seconds per step on this
   machine (each stage in its own process; peak CUDA memory on a GPU); the ``full``
   profile's projected wall time.
``scaling``: time per phase-1 and phase-2 step and peak memory at 64x64x32, 96x96x48 and
   128x128x64, and phase-1 epoch time for 1x, 2x and 4x the number of volumes.
``design``: design choices at the hard phantom difficulty (phase 1 only: the DCG's fused
   prediction): ROI crops at roi_scale 1 vs 2, top-t% vs mean pooling, K = 1, 3, 5 ROIs,
   foreground-only ROIs vs anywhere, probability-weighted vs summed ROI scores.

Timed sections use synthetic volumes of the right shape where only speed matters (the
network does the same work on any input) and the real phantoms where accuracy is reported.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from utils.benchmarking.quality_reports import QUALITY_DIR
from utils.benchmarking.sections import SECTIONS
from utils.benchmarking.suite import run_benchmark
from utils.benchmarking.timing import probe
from utils.cli import make_parser
from utils.paths import REPO_ROOT


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("utils.benchmark", __doc__)
    parser.add_argument("--quick", action="store_true", help="smoke sizes: checks the suite runs (for CI)")
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "outputs", help="where benchmark.md/.csv go")
    parser.add_argument("--quality-dir", type=Path, default=QUALITY_DIR,
                        help="where utils.benchmark_quality wrote its reports (read only)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), metavar="NAME",
                        help=f"the sections to measure ({', '.join(SECTIONS)}); the others are kept as stored "
                             "(default: all)")
    parser.add_argument("--quality-only", action="store_true", help="the same as --sections quality")
    parser.add_argument("--speed-run", type=Path, default=None,
                        help="a finished demo run (seed 0) for the speed and checkpoint sections (default: "
                             "OUTPUT_DIR/benchmark_runs/speed_demo_seed0, trained there when absent)")
    parser.add_argument("--device", default=None, help="cpu, cuda or auto (default: $MEDISCOPE_DEVICE, else auto)")
    parser.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.probe is not None:  # internal: one measurement in a fresh process (timing.run_probe)
        spec = json.loads(args.probe)
        print(json.dumps(probe(spec["stage"], tuple(spec["input_shape"]), spec["preset"], spec["batch_size"],
                               spec["steps"], spec["device"])))
        return 0
    sections = ["quality"] if args.quality_only else args.sections
    md = run_benchmark(args.output_dir, args.quick, args.device, args.quality_dir, sections, args.speed_run)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
