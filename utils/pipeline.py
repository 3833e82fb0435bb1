"""The experiment as stages that pass state through files in one output folder.

``utils.run`` calls them in order; each notebook calls the ones of its chapter, so any
notebook can be re-run alone once the stages before it have written their files:

    exp = prepare_experiment(config, output_dir, data_dir)   # splits.csv, the volume cache
    model = build_model(exp)
    dcg = train_phase1(exp, model)            # checkpoints/dcg.pth          (03_dcg_model)
    guidance = cache_split_guidance(exp, model, ("train", "val"))          (04_prior_generation)
    diffusion = train_phase2(exp, model, guidance)  # checkpoints/diffusion.pth + the main checkpoint
    baselines = train_baselines(exp)          # checkpoints/{resnet18,densenet121}.pth  (06_training)
    write_history(exp, {"dcg": dcg, "diffusion": diffusion, **baselines})
    rows = evaluate_test(exp, model, baselines)   # the test split, once   (07_evaluation)

Every training stage checkpoints after each epoch and, when its checkpoint says it finished,
only loads it; :func:`require_stage` gives a clear error, naming what to run first, when a
stage that a later step needs has not finished.
"""
from __future__ import annotations

import dataclasses
import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold
from torch import nn
from torch.utils.data import Subset

from models.diffmic3d import DiffMIC3D
from utils.atomic import atomic_write_text
from utils.training.baselines import DISPLAY_NAMES, baseline_from_checkpoint, train_baseline
from utils.data.cache import VolumeCache
from utils.training.checkpoint import load_checkpoint, save_checkpoint
from utils.data.dataset import CTDataset
from utils.data.discovery import CLASS_NAMES, ScanRecord, discover_scans, find_dataset_root
from utils.errors import DataError
from utils.log import get_logger
from utils.evaluation.ood import fit_feature_stats
from utils.paths import default_cache_dir, display_path  # noqa: F401 - display_path re-exported
from utils.provenance import record as record_provenance
from utils.data.medmnist import MedMNISTDataset, is_medmnist_file, load_medmnist, official_splits
from utils.evaluation.gradcam import write_baseline_gradcam
from utils.evaluation.evaluate import Predictions, evaluate_experiment, predict_loader, write_learning_curves, write_model_figures
from utils.data.phantoms import SIDECAR as PHANTOM_SIDECAR, PhantomConfig
from utils.paths import REPO_ROOT
from utils.prepare_data import resolve_data_dir, split_summary
from utils.data.preprocessing import PreprocessConfig
from utils.training.profiles import TrainConfig
from utils.seeding import pick_device, seed_everything
from utils.data.splits import load_or_create_splits
from utils.stage_timer import StageTimer
from utils.training.loop import FitResult, epoch_seed, stage_complete
from utils.training.diffusion import calibrate_temperature, predict_dataset, train_diffusion
from utils.training.dcg import cache_guidance, train_dcg
from utils.training.stage import eval_loader

MAIN_CHECKPOINT = "diffmic3d_enhanced_model.pth"
OURS = "DiffMIC-3D"
ABLATION_GLOBAL = "DCG global prior only"
ABLATION_FUSED = "DCG without diffusion"
STAGES = ("dcg", "diffusion", "resnet18", "densenet121")
# settings that may change between a run and its resumption: how it is shown and how it computes
# (like the device, which the folder does not record either), not what it computes
_IGNORED_FOR_RESUME = ("progress", "amp", "amp_dtype", "num_workers")

log = get_logger(__name__)


@dataclass
class Experiment:
    """The data side of a run: configuration, folders, splits, datasets and checkpoint metadata.

    Datasets (CTDataset, or its subclass MedMNISTDataset; items ``image`` (1, H, W, D) float32
    in [0, 1], ``label``, ...): ``train`` (with train-time flips), ``train_plain`` (no flips:
    guidance cache, precise BN), ``val`` and ``test``.

    ``num_classes`` comes from the data: ``config.num_classes`` for MosMedData folders, the
    labels of a MedMNIST ``.npz`` (``layout == 'medmnist'``, ``data_root`` = the file, ``cache``
    = its in-memory volumes). ``meta['data_source']`` records what the model is trained on.
    """

    config: TrainConfig
    output_dir: Path
    device: torch.device
    data_root: Path
    layout: str
    records: list[ScanRecord]
    splits: dict[str, list[ScanRecord]]
    class_names: list[str]
    num_classes: int
    cache: VolumeCache
    hires_cache: Optional[VolumeCache]
    datasets: dict[str, CTDataset]
    meta: dict

    def checkpoint(self, stage: str) -> Path:
        """Resumable checkpoint of ``stage`` (one of ``STAGES``)."""
        return self.output_dir / "checkpoints" / f"{stage}.pth"

    @property
    def main_checkpoint(self) -> Path:
        return self.output_dir / MAIN_CHECKPOINT


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
                                        "use another output folder or delete this one")
    atomic_write_text(path, json.dumps(current, indent=2) + "\n")


def prepare_experiment(config: TrainConfig, output_dir: str | Path, data_dir: Optional[str | Path] = None,
                       cache_dir: Optional[str | Path] = None, device: Optional[str] = None,
                       verbose: bool = True) -> Experiment:
    """Find (or generate) the data, freeze the split, fill the preprocessing cache.

    Data: ``data_dir``; else ``$MEDISCOPE_DATA_DIR`` or a MosMedData copy under
    ``/kaggle/input``; else phantoms generated at the profile's size into its
    ``phantom_dir``. The split is ``OUTPUT_DIR/splits.csv`` (created once, then reused).
    A ``data_dir`` ending in ``.npz`` is a MedMNIST 3D file (``utils.data.medmnist``): its official
    train / val / test split is used as is and its volumes are held in memory (no cache).
    Seeds every generator from ``config.seed``; ``device`` None picks CUDA when available.
    """
    seed_everything(config.seed)
    device = pick_device(device)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    check_output_dir(output_dir, config)
    record_provenance(output_dir, device)
    for stale in output_dir.rglob(".*.tmp*"):  # half-written files of a killed run (utils.atomic)
        stale.unlink()
    if data_dir is not None and is_medmnist_file(data_dir):
        exp = _prepare_medmnist(config, output_dir, Path(data_dir), device)
        if verbose:
            log.info(f"profile {config.profile}, device {device}, seed {config.seed}, input {config.input_shape}")
            log.info(f"dataset: {display_path(exp.data_root)} (MedMNIST {exp.meta['data_source']['name']}, "
                  f"{len(exp.records)} volumes of {tuple(exp.meta['data_source']['source_shape'])}, official split)\n"
                  f"{split_summary(exp.splits, exp.class_names)}")
        return exp
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    data_dir = resolve_data_dir(None if data_dir is None else Path(data_dir), REPO_ROOT / config.phantom_dir,
                                config.n_phantoms, config.phantom_seed, PhantomConfig(size=config.phantom_size),
                                config.progress)
    root, layout = find_dataset_root(data_dir)
    records = discover_scans(root, config.label_mode)
    prep = PreprocessConfig(target_shape=config.input_shape, target_spacing=config.target_spacing)
    cache = VolumeCache(cache_dir, prep)
    cache.warm([r.path for r in records], progress=config.progress)  # every scan read and checked first ...
    splits = load_or_create_splits(records, output_dir / "splits.csv", seed=config.seed, data_dir=root)  # ... then frozen
    hires_prep, hires_cache = None, None
    if config.roi_scale > 1:
        h, w, d = config.input_shape
        spacing = config.target_spacing
        hires_prep = PreprocessConfig(target_shape=(h * config.roi_scale, w * config.roi_scale, d),
                                      target_spacing=None if spacing is None else
                                      (spacing[0] / config.roi_scale, spacing[1] / config.roi_scale, spacing[2]))
        hires_cache = VolumeCache(cache_dir, hires_prep)
        hires_cache.warm([r.path for r in records], progress=config.progress)

    def dataset(split: str, augment: bool = False) -> CTDataset:
        return CTDataset(splits[split], cache, augment=augment, seed=config.seed, hires_cache=hires_cache)

    class_names = list(CLASS_NAMES[config.label_mode])
    meta = {
        "preprocess_config": prep.as_dict(),
        "hires_preprocess_config": None if hires_prep is None else hires_prep.as_dict(),
        "label_mode": config.label_mode, "class_names": class_names, "train_config": config.to_dict(),
        "data_source": {"kind": "mosmeddata", "root": display_path(root), "layout": layout, "n_scans": len(records),
                        "num_classes": config.num_classes, "synthetic": (Path(data_dir) / PHANTOM_SIDECAR).is_file()},
    }
    exp = Experiment(config=config, output_dir=output_dir, device=device, data_root=root, layout=layout,
                     records=records, splits=splits, class_names=class_names, num_classes=config.num_classes,
                     cache=cache, hires_cache=hires_cache,
                     datasets={"train": dataset("train", True), "train_plain": dataset("train"),
                               "val": dataset("val"), "test": dataset("test")}, meta=meta)
    if verbose:
        log.info(f"profile {config.profile}, device {device}, seed {config.seed}, input {config.input_shape}")
        log.info(f"dataset: {display_path(root)} ({layout} layout, {len(records)} scans)\n"
              f"{split_summary(splits, config.label_mode)}")
    return exp


def _prepare_medmnist(config: TrainConfig, output_dir: Path, path: Path, device: torch.device) -> Experiment:
    """``prepare_experiment`` for a MedMNIST 3D ``.npz`` (official split, in-memory volumes)."""
    if config.roi_scale > 1:
        raise DataError(path, f"roi_scale={config.roi_scale} needs full-resolution scans, but MedMNIST volumes "
                              "are 28^3 or 64^3; use roi_scale=1")
    data = load_medmnist(path, config.input_shape)
    splits = official_splits(data, output_dir / "splits.csv")

    def dataset(split: str, augment: bool = False) -> MedMNISTDataset:
        return MedMNISTDataset(splits[split], data.volumes, augment=augment, seed=config.seed)

    meta = {
        "preprocess_config": {"source": "medmnist", "target_shape": list(config.input_shape)},  # no HU pipeline
        "hires_preprocess_config": None,
        "label_mode": "medmnist", "class_names": data.class_names, "train_config": config.to_dict(),
        "data_source": data.source_meta(),
    }
    return Experiment(config=config, output_dir=output_dir, device=device, data_root=data.path, layout="medmnist",
                      records=data.records, splits=splits, class_names=data.class_names,
                      num_classes=data.num_classes, cache=data.volumes, hires_cache=None,
                      datasets={"train": dataset("train", True), "train_plain": dataset("train"),
                                "val": dataset("val"), "test": dataset("test")}, meta=meta)


def reseed_stage(config: TrainConfig, stage: str) -> None:
    """Seed torch's global generator for ``stage`` (weight init, dropout) from (seed, stage),
    so a stage started in a fresh process draws what it would have in an uninterrupted run."""
    torch.manual_seed(epoch_seed(config.seed, STAGES.index(stage), stream=2))


def require_stage(exp: Experiment, stage: str, run_first: str) -> None:
    """Raise a one-line ``DataError`` unless ``stage``'s checkpoint says it finished.

    Args:
        run_first: what the user should run to produce it (e.g. ``'notebook 03_dcg_model'``).
    """
    path = exp.checkpoint(stage)
    if not stage_complete(path):
        state = "is unfinished" if path.is_file() else "does not exist"
        raise DataError(path, f"{state}: run {run_first} first (with the same output folder and profile)")


def build_model(exp: Experiment) -> DiffMIC3D:
    """A freshly initialised DiffMIC-3D of the run's configuration with ``exp.num_classes``
    classes, seeded for phase 1."""
    reseed_stage(exp.config, "dcg")
    return DiffMIC3D(with_num_classes(exp.config.model_config(exp.device), exp.num_classes)).to(exp.device)


def with_num_classes(model_config, num_classes: int):
    """``model_config`` with every sub-config's ``num_classes`` set to ``num_classes``."""
    if model_config.num_classes == num_classes:
        return model_config
    parts = {}
    for field in dataclasses.fields(model_config):
        part = getattr(model_config, field.name)
        if dataclasses.is_dataclass(part) and any(f.name == "num_classes" for f in dataclasses.fields(part)):
            part = dataclasses.replace(part, num_classes=num_classes)
        parts[field.name] = part
    return type(model_config)(**parts)


def train_phase1(exp: Experiment, model: DiffMIC3D) -> FitResult:
    """Phase 1 (DCG pre-training), resumed or just loaded when its checkpoint is complete."""
    return train_dcg(model, exp.datasets["train"], exp.datasets["val"], exp.config, exp.device,
                     exp.checkpoint("dcg"), exp.meta)


def cache_split_guidance(exp: Experiment, model: DiffMIC3D,
                         splits: tuple[str, ...] = ("train", "val")) -> dict[str, dict[str, torch.Tensor]]:
    """The frozen DCG's outputs once per volume of each split (unflipped), e.g. ``['train']
    ['guidance'...]``; see ``utils.training.dcg.cache_guidance``."""
    model.freeze_dcg()
    names = {"train": "train_plain"}
    return {split: cache_guidance(model, exp.datasets[names.get(split, split)], exp.device, exp.config.batch_size,
                                  exp.config.num_workers, exp.config.progress)
            for split in splits}


def labels_of(exp: Experiment, split: str) -> torch.Tensor:
    """(N,) int64 labels of ``split`` in dataset order."""
    return torch.from_numpy(exp.datasets[split].labels)


class _Subset(Subset):
    """A Subset that forwards ``set_epoch`` (augmentation draw) and exposes ``labels``."""

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self.dataset.labels)[self.indices]


def out_of_fold_guidance(exp: Experiment, model: DiffMIC3D) -> dict[str, torch.Tensor]:
    """Guidance for the TRAINING scans from DCGs that did not train on them.

    The training split is cut into ``config.oof_folds`` stratified folds (seeded); for each
    fold a DCG of the same configuration is trained on the other folds exactly as in phase 1
    (``checkpoints/dcg_fold{i}.pth``, resumable; early stopping on the validation split) and
    gives the guidance of the held-out fold. Without this, phase 2 sees the final DCG's priors
    on its own training scans, which are near perfect, and learns to copy them (measured: the
    diffusion then scores below its own DCG on new scans). Returns a cache like
    ``cache_guidance`` (rows in ``train_plain`` order).
    """
    config, device = exp.config, exp.device
    labels = exp.datasets["train_plain"].labels
    folds = StratifiedKFold(n_splits=config.oof_folds, shuffle=True, random_state=config.seed)
    merged: dict[str, torch.Tensor] = {}
    for i, (rest, held) in enumerate(folds.split(np.zeros(len(labels)), labels)):
        torch.manual_seed(epoch_seed(config.seed, 100 + i, stream=2))
        fold_model = DiffMIC3D(model.config).to(device)
        train_dcg(fold_model, _Subset(exp.datasets["train"], rest.tolist()), exp.datasets["val"], config, device,
                  exp.output_dir / "checkpoints" / f"dcg_fold{i}.pth", exp.meta)
        fold_model.freeze_dcg()
        cache = cache_guidance(fold_model, exp.datasets["train_plain"], device, config.batch_size,
                               config.num_workers, config.progress)
        for key, value in cache.items():
            merged.setdefault(key, torch.empty_like(value))[torch.as_tensor(held)] = value[torch.as_tensor(held)]
    return merged


def train_phase2(exp: Experiment, model: DiffMIC3D, guidance: dict[str, dict[str, torch.Tensor]]) -> FitResult:
    """Phase 2, the validation-fitted temperature, and the main checkpoint's weights.

    ``model`` must hold the finished phase-1 DCG; ``guidance['val']`` its validation guidance.
    The training priors are out of fold (:func:`out_of_fold_guidance`) when
    ``config.oof_folds >= 2``, else ``guidance['train']`` (the final DCG's own). The fitted
    temperature is in ``result.history['temperature']`` and on the model.
    """
    config = exp.config
    train_guidance = out_of_fold_guidance(exp, model) if config.oof_folds >= 2 else guidance["train"]
    reseed_stage(config, "diffusion")
    result = train_diffusion(model, exp.datasets["train"], train_guidance, exp.datasets["val"], guidance["val"],
                             config, exp.device, exp.checkpoint("diffusion"), exp.meta)
    temperature = calibrate_temperature(model, exp.datasets["val"], guidance["val"], config, exp.device)
    log.info(f"softmax temperature fitted on the validation split: {temperature:.3f}")
    result.history["temperature"] = temperature
    return result


def save_main_checkpoint(exp: Experiment, model: DiffMIC3D, history: dict) -> Path:
    """Write ``OUTPUT_DIR/diffmic3d_enhanced_model.pth`` (what ``utils.predict`` loads): the
    finished model with its preprocessing, history, and the training scans' DCG feature
    statistics for the out-of-distribution flag (``utils.evaluation.ood``)."""
    features = cache_split_guidance(exp, model, ("train",))["train"]["global_features"]  # (N, F)
    return save_checkpoint(exp.main_checkpoint, model_config=model.config.to_dict(),
                           model_state_dict=model.state_dict(), **exp.meta, history=history,
                           feature_stats=fit_feature_stats(features))


def train_baselines(exp: Experiment, timer: Optional[StageTimer] = None) -> dict[str, tuple[nn.Module, FitResult]]:
    """Each baseline of ``config.baselines`` trained (or loaded) in the same harness, each
    timed as a stage of ``timer`` (under its display name) when given."""
    out = {}
    for name in exp.config.baselines:
        with timer.stage(DISPLAY_NAMES[name]) if timer is not None else nullcontext():
            reseed_stage(exp.config, name)
            out[name] = train_baseline(name, exp.datasets["train"], exp.datasets["val"], exp.config, exp.device,
                                       exp.checkpoint(name), exp.meta, num_classes=exp.num_classes)
    return out


def load_baselines(exp: Experiment, run_first: str) -> dict[str, nn.Module]:
    """The finished baselines of ``config.baselines`` from their checkpoints, in eval mode."""
    out = {}
    for name in exp.config.baselines:
        require_stage(exp, name, run_first)
        out[name] = baseline_from_checkpoint(load_checkpoint(exp.checkpoint(name))).to(exp.device).eval()
    return out


def history_entry(result: FitResult) -> dict:
    """One phase of ``history.json``: the per-epoch series and the selected epoch."""
    return {**result.history, "best_epoch": result.best["epoch"]}


def write_history(exp: Experiment, results: dict[str, FitResult]) -> Path:
    """``OUTPUT_DIR/history.json`` (per stage: per-epoch series, best epoch) and the
    learning-curve figure."""
    history = {name: history_entry(result) for name, result in results.items()}
    path = exp.output_dir / "history.json"
    atomic_write_text(path, json.dumps(history, indent=2) + "\n")
    write_learning_curves(path, exp.output_dir)
    return path


def evaluate_test(exp: Experiment, model: DiffMIC3D, baselines: dict[str, nn.Module]) -> list[dict]:
    """The test split, once: DiffMIC-3D, its two ablations and the baselines.

    Writes ``evaluation_results.csv``, ``predictions.csv`` and the figures (``utils.evaluation.evaluate``),
    including the saliency / ROI and denoising-trajectory figures of one test scan per class
    and the baselines' Grad-CAM maps of the same scans (``utils.evaluation.gradcam``).
    Returns the evaluation rows (``model, metric, value, ci_low, ci_high``).
    """
    config, device, test = exp.config, exp.device, exp.datasets["test"]
    model.eval()
    test_guidance = cache_split_guidance(exp, model, ("test",))["test"]
    ours = predict_dataset(model, test, test_guidance, device, config.batch_size, config.seed, config.num_samples,
                           config.ddim_steps, config.num_workers)
    ours.pop("y0_mean")  # (S, N, C): per-sample, not per-scan

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
    predictions: dict[str, Predictions] = {name: predict_loader(fn, loader, device, desc=f"test {name}",
                                                           progress=config.progress)
                                           for name, fn in predictors.items()}
    csv_base = exp.data_root if exp.data_root.is_dir() else exp.data_root.parent  # as splits.csv: a .npz's folder
    rows = evaluate_experiment(predictions, exp.output_dir, exp.class_names, seed=config.seed,
                               n_resamples=config.n_resamples, data_root=csv_base)
    shown = figure_scans(test)
    volumes, paths = [test[i]["image"].numpy() for i in shown], [test.records[i].path for i in shown]
    write_model_figures(model, volumes, paths, exp.output_dir, seed=config.seed, class_names=exp.class_names,
                        labels=[int(test.records[i].label) for i in shown],
                        hires_volumes=None if exp.hires_cache is None else [test[i]["image_hires"].numpy()
                                                                            for i in shown],
                        num_samples=config.num_samples)
    write_baseline_gradcam(baselines, DISPLAY_NAMES, volumes, paths, exp.output_dir, exp.class_names)
    return rows


def figure_scans(test: CTDataset, per_class: int = 1) -> list[int]:
    """Indices of the first ``per_class`` test scans of each class (for the model figures)."""
    labels = test.labels
    return sorted(int(i) for c in np.unique(labels) for i in np.flatnonzero(labels == c)[:per_class])
