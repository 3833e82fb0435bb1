"""Benchmark suite: quality, speed, memory and scaling of DiffMIC-3D beside a plain 3D CNN.

    python -m utils.benchmark [--quick] [--output-dir outputs] [--quality-dir outputs/benchmark] [--device cpu|cuda]

Writes ``OUTPUT_DIR/benchmark.md`` (the report: each table with the command and machine that
produced it, and the targets met, missed or not measured) and ``OUTPUT_DIR/benchmark.csv``
(``section,item,metric,value,spread,unit``) beside it; the experiment runs it needs go to
``OUTPUT_DIR/benchmark_runs/`` and are resumed when the benchmark is started again. Every
timing comes from the same invocation on the same machine, so ratios are meaningful.

Sections (full suite; ``--quick`` runs the same code at smoke sizes, for CI):

1. Quality: the reports of ``python -m utils.benchmark_quality`` (``QUALITY_DIR/quality_
   phantoms300.md``, ``quality_adrenalmnist3d.md``, ``quality_adrenalmnist3d_ablations.md``;
   paired test-AUC differences over seeds), included as text when they exist; the quality
   targets are read from their CSVs ("not measured" when absent). ``--quick`` also runs
   ``run_quality('smoke', (0, 1), OUTPUT_DIR/quality)`` to exercise that code path. Plus a
   histogram + logistic-regression baseline on the phantoms.
2. Speed (a finished run: the ``demo`` profile's seed 0, or the smoke run with ``--quick``):
   seconds per training epoch of phase 1 (DCG) and of phase 2 (``diffusion_loss`` on the
   scans -- the denoiser's own image encoder runs on them every step -- and the cached
   guidance), inference seconds per volume with DDPM (all T steps), DDIM 10 and DDIM 1 (the
   DCG and the condition once per call, the per-point head per step) next to a ResNet-18
   forward, and the accuracy / AUC each sampler gives on the run's test split.
3. Memory: peak resident memory (and peak CUDA memory on a GPU) of training steps at the
   ``full`` configuration, batch 4, each stage in its own subprocess (phase 2: the frozen
   DCG's guidance once, then ``diffusion_loss`` steps on scan + guidance).
4. Scaling: time per phase-1 and phase-2 step and peak memory at 64x64x32, 96x96x48 and
   128x128x64, and phase-1 epoch time for 1x, 2x and 4x the number of volumes.
5. The ``full`` profile's projected wall time from measured steps (out-of-fold DCGs included).
6. Design choices at the hard phantom difficulty (phase 1 only: the DCG's fused prediction):
   ROI crops at roi_scale 1 vs 2, top-t% vs mean pooling, K = 1, 3, 5 ROIs, foreground-only
   ROIs vs anywhere, probability-weighted vs summed ROI scores.

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
    parser.add_argument("--quality-only", action="store_true",
                        help="only section 1 (reads the quality reports; no training)")
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
    md = run_benchmark(args.output_dir, args.quick, args.device, args.quality_dir, args.quality_only)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
