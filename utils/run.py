"""The whole experiment without notebooks: data -> phase 1 -> phase 2 -> baselines -> test.

    python -m utils.run --profile demo [--data-dir DIR] [--output-dir outputs] [--seed N]
                        [--cache-dir data/processed] [--device cpu|cuda|auto]
                        [--set key=value ...]          # any TrainConfig field (utils.profiles)

Steps, each resumable:

1. Data: ``--data-dir``; else ``$MEDISCOPE_DATA_DIR`` or a MosMedData copy under
   ``/kaggle/input``; else synthetic phantoms generated at the profile's size into the
   profile's ``phantom_dir`` (demo and full: the embedded ``data/MosMedData``; smoke: its own
   folder). Scans are discovered, split 64/16/20 into ``OUTPUT_DIR/splits.csv`` (frozen), and
   preprocessed into the cache at the profile's ``input_shape``.
2. Phase 1 (DCG), phase 2 (diffusion on cached DCG outputs), then each baseline; each stage
   checkpoints after every epoch under ``OUTPUT_DIR/checkpoints/`` and is skipped when its
   checkpoint says it finished. Model selection uses the validation split only.
3. ``OUTPUT_DIR/diffmic3d_enhanced_model.pth`` (the trained model with its preprocessing,
   class names and training config; ``utils.predict`` loads it) and ``OUTPUT_DIR/history.json``.
4. Once, at the end: predictions on the TEST split of DiffMIC-3D, its two ablations (DCG
   global prior only; DCG without diffusion = the fused DCG prediction) and the baselines;
   ``evaluation_results.csv``, ``predictions.csv`` and the figures (``utils.evaluate``); the
   results table and the wall time are printed.

A run killed at any point continues from its last checkpoint when started again with the
same arguments and ends with the same metrics as an uninterrupted run: every stage re-seeds
torch's global generator from (seed, stage) before building its model, and ``utils.trainer``
restores the rest. The output folder remembers its configuration (``train_config.json``);
starting it again with another configuration is refused.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from models.diffmic3d import DiffMIC3D
from utils.atomic import atomic_write_text
from utils.baselines import DISPLAY_NAMES, train_baseline
from utils.cache import VolumeCache
from utils.checkpoint import save_checkpoint
from utils.dataset import CTDataset
from utils.discovery import CLASS_NAMES, discover_scans, find_dataset_root
from utils.errors import DataError
from utils.evaluate import (Predictions, evaluate_experiment, format_results_table, predict_loader,
                            write_learning_curves, write_model_figures)
from utils.phantoms import PhantomConfig
from utils.prepare_data import REPO_ROOT, resolve_data_dir, split_summary
from utils.preprocessing import PreprocessConfig
from utils.profiles import PROFILES, TrainConfig, get_profile, parse_overrides
from utils.seeding import pick_device, seed_everything
from utils.splits import load_or_create_splits
from utils.trainer import FitResult, epoch_seed
from utils.training import (cache_guidance, calibrate_temperature, eval_loader, predict_guidance, train_dcg,
                            train_diffusion)

MAIN_CHECKPOINT = "diffmic3d_enhanced_model.pth"
OURS = "DiffMIC-3D"
ABLATION_GLOBAL = "DCG global prior only"
ABLATION_FUSED = "DCG without diffusion"
STAGES = ("dcg", "diffusion", "resnet18", "densenet121")
_IGNORED_FOR_RESUME = ("progress",)  # settings that may change between a run and its resumption


def reseed_stage(config: TrainConfig, stage: str) -> None:
    """Seed torch's global generator for ``stage`` (weight init, dropout) from (seed, stage),
    so a stage started in a fresh process draws what it would have in an uninterrupted run."""
    torch.manual_seed(epoch_seed(config.seed, STAGES.index(stage), stream=2))


def check_output_dir(output_dir: Path, config: TrainConfig) -> None:
    """Record the run's configuration, or refuse to mix two configurations in one folder."""
    path = output_dir / "train_config.json"
    current = config.to_dict()
    if path.is_file():
        saved = json.loads(path.read_text())
        differ = sorted(k for k in set(saved) | set(current)
                        if k not in _IGNORED_FOR_RESUME and saved.get(k) != current.get(k))
        if differ:
            changes = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in differ)
            raise DataError(output_dir, f"holds a run with another configuration ({changes}); "
                                        "use another --output-dir or delete this one")
    atomic_write_text(path, json.dumps(current, indent=2) + "\n")


def history_entry(result: FitResult) -> dict:
    """One phase of ``history.json``: the per-epoch series and the selected epoch."""
    return {**result.history, "best_epoch": result.best["epoch"]}


def run_experiment(config: TrainConfig, output_dir: Path, data_dir: Optional[Path] = None,
                   cache_dir: Optional[Path] = None, device: Optional[str] = None) -> list[dict]:
    """Run (or resume) the whole experiment; returns the evaluation rows (see the module docstring)."""
    started = time.perf_counter()
    timings: dict[str, float] = {}
    seed_everything(config.seed)
    device = pick_device(device)
    output_dir = Path(output_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else REPO_ROOT / "data" / "processed"
    checkpoints = output_dir / "checkpoints"
    output_dir.mkdir(parents=True, exist_ok=True)
    check_output_dir(output_dir, config)
    for stale in output_dir.rglob(".*.tmp*"):  # half-written files of a killed run (utils.atomic)
        stale.unlink()
    print(f"profile {config.profile}, device {device}, seed {config.seed}, input {config.input_shape}")

    # -- data ----------------------------------------------------------------------------
    tic = time.perf_counter()
    data_dir = resolve_data_dir(data_dir, REPO_ROOT / config.phantom_dir, config.n_phantoms, config.phantom_seed,
                                PhantomConfig(size=config.phantom_size), config.progress)
    root, layout = find_dataset_root(data_dir)
    records = discover_scans(root, config.label_mode)
    splits = load_or_create_splits(records, output_dir / "splits.csv", seed=config.seed, data_dir=root)
    print(f"dataset: {root} ({layout} layout, {len(records)} scans)\n{split_summary(splits, config.label_mode)}")
    class_names = list(CLASS_NAMES[config.label_mode])
    prep = PreprocessConfig(target_shape=config.input_shape)
    cache = VolumeCache(cache_dir, prep)
    cache.warm([r.path for r in records], progress=config.progress)
    hires_prep, hires_cache = None, None
    if config.roi_scale > 1:
        h, w, d = config.input_shape
        hires_prep = PreprocessConfig(target_shape=(h * config.roi_scale, w * config.roi_scale, d))
        hires_cache = VolumeCache(cache_dir, hires_prep)
        hires_cache.warm([r.path for r in records], progress=config.progress)

    def dataset(split: str, augment: bool = False) -> CTDataset:
        return CTDataset(splits[split], cache, augment=augment, seed=config.seed, hires_cache=hires_cache)

    train_aug, train_plain, val, test = dataset("train", True), dataset("train"), dataset("val"), dataset("test")
    meta = {
        "preprocess_config": prep.as_dict(),
        "hires_preprocess_config": None if hires_prep is None else hires_prep.as_dict(),
        "label_mode": config.label_mode, "class_names": class_names, "train_config": config.to_dict(),
    }
    timings["data"] = time.perf_counter() - tic

    # -- DiffMIC-3D: phase 1, guidance cache, phase 2 --------------------------------------
    history = {}
    tic = time.perf_counter()
    reseed_stage(config, "dcg")
    model = DiffMIC3D(config.model_config(device)).to(device)
    history["dcg"] = history_entry(train_dcg(model, train_aug, val, config, device, checkpoints / "dcg.pth", meta))
    timings["phase 1 (DCG)"] = time.perf_counter() - tic

    tic = time.perf_counter()
    model.freeze_dcg()
    guidance = {split: cache_guidance(model, data, device, config.batch_size, config.num_workers, config.progress)
                for split, data in (("train", train_plain), ("val", val))}
    labels = {split: torch.from_numpy(data.labels) for split, data in (("train", train_plain), ("val", val))}
    reseed_stage(config, "diffusion")
    result = train_diffusion(model, guidance["train"], labels["train"], guidance["val"], labels["val"], config,
                             device, checkpoints / "diffusion.pth", meta)
    history["diffusion"] = history_entry(result)
    temperature = calibrate_temperature(model, guidance["val"], labels["val"], config, device)
    history["diffusion"]["temperature"] = temperature
    print(f"softmax temperature fitted on the validation split: {temperature:.3f}")
    save_checkpoint(output_dir / MAIN_CHECKPOINT, model_config=model.config.to_dict(),
                    model_state_dict=model.state_dict(), **meta,
                    history={"dcg": history["dcg"], "diffusion": history["diffusion"]})
    timings["phase 2 (diffusion)"] = time.perf_counter() - tic

    # -- baselines -------------------------------------------------------------------------
    baselines = {}
    for name in config.baselines:
        tic = time.perf_counter()
        reseed_stage(config, name)
        baselines[name], result = train_baseline(name, train_aug, val, config, device, checkpoints / f"{name}.pth",
                                                 meta)
        history[name] = history_entry(result)
        timings[DISPLAY_NAMES[name]] = time.perf_counter() - tic
    atomic_write_text(output_dir / "history.json", json.dumps(history, indent=2) + "\n")

    # -- the test split, once --------------------------------------------------------------
    tic = time.perf_counter()
    model.eval()
    test_guidance = cache_guidance(model, test, device, config.batch_size, config.num_workers, config.progress)
    ours = predict_guidance(model, test_guidance, device, config.batch_size, config.seed, config.num_samples,
                            config.ddim_steps)

    def rows_of(values: dict[str, torch.Tensor]):
        return lambda batch: {k: v[torch.as_tensor(batch["index"]).cpu()] for k, v in values.items()}

    predictors = {
        OURS: rows_of(ours),
        ABLATION_GLOBAL: rows_of({"probs": test_guidance["global_probs"]}),
        ABLATION_FUSED: rows_of({"probs": test_guidance["fused_probs"]}),
    }
    for name, net in baselines.items():
        net.eval()
        predictors[DISPLAY_NAMES[name]] = (lambda net: lambda batch: {"probs": torch.softmax(net(batch["image"]), 1)})(net)
    loader = eval_loader(test, config)
    predictions: dict[str, Predictions] = {name: predict_loader(fn, loader, device, desc=f"test {name}")
                                           for name, fn in predictors.items()}
    rows = evaluate_experiment(predictions, output_dir, class_names, seed=config.seed, n_resamples=config.n_resamples)
    write_learning_curves(output_dir / "history.json", output_dir)
    shown = _figure_scans(test)
    write_model_figures(model, [test[i]["image"].numpy() for i in shown], [test.records[i].path for i in shown],
                        output_dir, seed=config.seed, class_names=class_names,
                        labels=[int(test.records[i].label) for i in shown],
                        hires_volumes=None if hires_cache is None else [test[i]["image_hires"].numpy() for i in shown],
                        num_samples=config.num_samples)
    timings["test evaluation"] = time.perf_counter() - tic
    timings["total"] = time.perf_counter() - started
    atomic_write_text(output_dir / "timings.json", json.dumps(timings, indent=2) + "\n")

    print(f"\nTest split ({len(test)} scans), 95% stratified bootstrap CIs ({config.n_resamples} resamples):")
    print(format_results_table(rows))
    print("\n" + "\n".join(f"{stage:<22}{seconds:8.1f} s" for stage, seconds in timings.items()))
    print(f"outputs in {output_dir}; wall time {timings['total'] / 60:.1f} min")
    return rows


def _figure_scans(test: CTDataset, per_class: int = 1) -> list[int]:
    """Indices of the first ``per_class`` test scans of each class (for the model figures)."""
    labels = test.labels
    return sorted(int(i) for c in np.unique(labels) for i in np.flatnonzero(labels == c)[:per_class])


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.run", description=__doc__.split("\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="demo")
    parser.add_argument("--data-dir", type=Path, default=None, help="folder holding a MosMedData layout")
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "outputs")
    parser.add_argument("--cache-dir", type=Path, default=None, help="preprocessed-volume cache (data/processed)")
    parser.add_argument("--seed", type=int, default=None, help="overrides the profile's seed")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default: $MEDISCOPE_DEVICE, auto)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a TrainConfig field, e.g. --set dcg_epochs=3 --set input_shape=64,64,32")
    args = parser.parse_args(argv)
    try:
        overrides = parse_overrides(args.set)
        if args.seed is not None:
            overrides["seed"] = args.seed
        config = get_profile(args.profile, **overrides)
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
