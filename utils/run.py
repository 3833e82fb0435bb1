"""The whole experiment without notebooks: data -> phase 1 -> phase 2 -> baselines -> test.

    python -m utils.run --profile demo [--data-dir DIR] [--output-dir outputs] [--seed N]
                        [--cache-dir data/processed] [--device cpu|cuda|auto] [--label-mode binary|severity]
                        [--gpus auto|N] [--train-only] [--set key=value ...]  # any TrainConfig field
    torchrun --standalone --nproc_per_node=N -m utils.run ...   # the same, started by hand

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
4. Once, at the end (not with ``--train-only``, which notebook 06 uses): predictions on the TEST split of DiffMIC-3D, its two ablations (DCG
   global prior only; DCG without diffusion = the fused DCG prediction) and the baselines;
   ``evaluation_results.csv``, ``predictions.csv`` and the figures (``utils.evaluation.evaluate``); the
   results table and the wall time are printed.

Several GPUs (``--gpus``, default ``auto``: every visible GPU when there are two or more): the
run restarts itself under ``torchrun`` with one process per GPU (``utils.launch``); every
training stage is data-parallel, the out-of-fold DCGs are spread over the ranks, rank 0 writes
every file and evaluates the test split (``utils.distributed``; README, "Several GPUs"). One
GPU or the CPU: one process, exactly as without the option.

A run killed at any point continues from its last checkpoint when started again with the
same arguments and ends with the same metrics as an uninterrupted run: every stage re-seeds
torch's global generator from (seed, stage) before building its model, and ``utils.training.loop``
restores the rest. The output folder remembers its configuration (``train_config.json``);
starting it again with another configuration is refused.
"""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional

from utils.atomic import atomic_write_text
from utils.cli import add_gpus_option, add_run_options, make_parser, run_config
from utils.distributed import SINGLE, DistContext, check_batch_size, init_from_env, shutdown, world_from_env
from utils.errors import DataError
from utils.evaluation.evaluate import format_results_table
from utils.experiment import prepare_experiment
from utils.launch import launch, resolve_gpus
from utils.paths import TIMINGS_JSON, display_path
from utils.prepare_data import main as prepare_data_main
from utils.pipeline import evaluate_test, train_all
from utils.training.profiles import TrainConfig
from utils.seeding import pick_device
from utils.stage_timer import StageTimer


def run_experiment(config: TrainConfig, output_dir: Path, data_dir: Optional[Path] = None,
                   cache_dir: Optional[Path] = None, device: Optional[str] = None,
                   context: DistContext = SINGLE, train_only: bool = False) -> list[dict]:
    """Run (or resume) the whole experiment; returns the evaluation rows (see the module docstring).
    ``context``: this process's rank of a distributed run; ranks other than 0 train and return [].
    ``train_only``: stop after training (no test split; returns [])."""
    timer = StageTimer(pick_device(device))
    with timer.stage("data"):
        exp = prepare_experiment(config, output_dir, data_dir, cache_dir, device, context=context)
    model, _, baselines = train_all(exp, timer)
    if not context.is_main:
        return []
    if train_only:
        atomic_write_text(exp.output_dir / TIMINGS_JSON, json.dumps(timer.as_dict(), indent=2) + "\n")
        print("\n" + timer.report())
        return []
    with timer.stage("test evaluation"):  # once, by rank 0 alone (utils.pipeline.evaluate_test)
        rows = evaluate_test(replace(exp, context=SINGLE), model, baselines)
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
    add_gpus_option(parser)
    parser.add_argument("--train-only", action="store_true",
                        help="train (or load) every stage and stop: no test split (notebook 06 starts this under "
                             "torchrun; notebook 07 then evaluates)")
    return parser


def data_step_args(args) -> list[str]:
    """The ``utils.prepare_data`` options of a run's parsed options (the data step alone)."""
    out = ["--profile", args.profile, "--output-dir", str(args.output_dir)]
    for flag, value in (("--data-dir", args.data_dir), ("--cache-dir", args.cache_dir), ("--seed", args.seed),
                        ("--label-mode", args.label_mode)):
        if value is not None:
            out += [flag, str(value)]
    return out + [a for item in args.set for a in ("--set", item)]


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = run_config(args)
        device = pick_device(args.device)  # fail early, with the reason, on an unavailable device
        world = world_from_env() if world_from_env() > 1 else resolve_gpus(args.gpus, device)
        check_batch_size(config.batch_size, world)
    except ValueError as exc:
        parser.error(str(exc))
    if world > 1 and world_from_env() == 1:  # the data step here, then the processes; each runs this again
        code = prepare_data_main(data_step_args(args))  # one process fills the cache; the ranks only read it
        # the ranks take the same options: under torchrun the world size comes from it, not from --gpus
        return code or launch("utils.run", list(sys.argv[1:] if argv is None else argv), world)
    context, device = init_from_env(device)
    try:
        run_experiment(config, args.output_dir, args.data_dir, args.cache_dir, str(device), context, args.train_only)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        shutdown(context)
    return 0


if __name__ == "__main__":
    sys.exit(main())
