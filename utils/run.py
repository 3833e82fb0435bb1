"""The whole experiment without notebooks: data -> phase 1 -> phase 2 -> baselines -> test.

    python -m utils.run --profile demo [--data-dir DIR] [--output-dir outputs] [--seed N]
                        [--cache-dir data/processed] [--device cpu|cuda|auto] [--label-mode binary|severity]
                        [--set key=value ...]          # any TrainConfig field (utils.training.profiles)

A bad option or ``--set`` value (checked against the field's type and range) is a one-line
error and exit status 2, before anything is run.

Steps, each resumable:

1. Data: ``--data-dir``; else ``$MEDISCOPE_DATA_DIR`` or a MosMedData copy under
   ``/kaggle/input``; else synthetic phantoms generated at the profile's size into the
   profile's ``phantom_dir`` (demo and full: the embedded ``data/MosMedData``; smoke: its own
   folder; with ``--label-mode severity`` a five-grade set in ``PHANTOM_DIR_severity``, e.g.
   ``data/MosMedData_severity``, at least 20 phantoms). Scans are discovered, split 64/16/20
   into ``OUTPUT_DIR/splits.csv`` (frozen), and preprocessed into the cache at the profile's
   ``input_shape`` (``python -m utils.prepare_data`` with the same options does this step alone).
2. Phase 1 (DCG), phase 2 (diffusion on cached DCG outputs), then each baseline; each stage
   checkpoints after every epoch under ``OUTPUT_DIR/checkpoints/`` and is skipped when its
   checkpoint says it finished. Model selection uses the validation split only.
3. ``OUTPUT_DIR/diffmic3d_enhanced_model.pth`` (the trained model with its preprocessing,
   class names and training config; ``utils.predict`` loads it) and ``OUTPUT_DIR/history.json``.
4. Once, at the end: predictions on the TEST split of DiffMIC-3D, its two ablations (DCG
   global prior only; DCG without diffusion = the fused DCG prediction) and the baselines;
   ``evaluation_results.csv``, ``predictions.csv`` and the figures (``utils.evaluation.evaluate``); the
   results table and the wall time are printed.

A run killed at any point continues from its last checkpoint when started again with the
same arguments and ends with the same metrics as an uninterrupted run: every stage re-seeds
torch's global generator from (seed, stage) before building its model, and ``utils.training.loop``
restores the rest. The output folder remembers its configuration (``train_config.json``);
starting it again with another configuration is refused.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

from utils.atomic import atomic_write_text
from utils.cli import add_run_options, make_parser, run_config
from utils.errors import DataError
from utils.evaluation.evaluate import format_results_table
from utils.experiment import prepare_experiment
from utils.paths import TIMINGS_JSON, display_path
from utils.pipeline import evaluate_test, train_all
from utils.training.profiles import TrainConfig
from utils.seeding import pick_device
from utils.stage_timer import StageTimer


def run_experiment(config: TrainConfig, output_dir: Path, data_dir: Optional[Path] = None,
                   cache_dir: Optional[Path] = None, device: Optional[str] = None) -> list[dict]:
    """Run (or resume) the whole experiment; returns the evaluation rows (see the module docstring)."""
    timer = StageTimer(pick_device(device))
    with timer.stage("data"):
        exp = prepare_experiment(config, output_dir, data_dir, cache_dir, device)
    model, _, baselines = train_all(exp, timer)
    with timer.stage("test evaluation"):
        rows = evaluate_test(exp, model, baselines)
    atomic_write_text(exp.output_dir / TIMINGS_JSON, json.dumps(timer.as_dict(), indent=2) + "\n")
    test = exp.datasets["test"]
    print(f"\nTest split ({len(test)} scans), 95% stratified bootstrap CIs ({config.n_resamples} resamples):")
    print(format_results_table(rows))
    print("\n" + timer.report())
    print(f"outputs in {display_path(exp.output_dir)}; wall time {timer.total() / 60:.1f} min")
    return rows


def build_parser():
    parser = make_parser("utils.run", __doc__)
    add_run_options(parser)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = run_config(args)
        pick_device(args.device)  # fail early, with the reason, on an unavailable device
    except ValueError as exc:
        parser.error(str(exc))
    try:
        run_experiment(config, args.output_dir, args.data_dir, args.cache_dir, args.device)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
