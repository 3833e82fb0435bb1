"""The data side of a run: configuration, folders, splits and datasets (:class:`Experiment`).

``prepare_experiment`` finds (or generates) the data, freezes the split, fills the volume
cache and records the run's configuration in its output folder; every training stage of
``utils.pipeline`` then reads what it needs from the :class:`Experiment`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from utils.atomic import atomic_write_text
from utils.data.cache import VolumeCache
from utils.data.dataset import CTDataset
from utils.data.discovery import CLASS_NAMES, ScanRecord, data_line, discover_scans, find_dataset_root
from utils.data.medmnist import MedMNISTDataset, is_medmnist_file, load_medmnist, official_splits
from utils.data.phantoms import SIDECAR as PHANTOM_SIDECAR
from utils.data.splits import load_or_create_splits
from utils.distributed import SINGLE, DistContext, describe
from utils.errors import DataError
from utils.log import get_logger
from utils.paths import (CHECKPOINTS_DIR, MAIN_CHECKPOINT, SPLITS_CSV, TRAIN_CONFIG_JSON,
                         default_cache_dir, display_path)
from utils.prepare_data import run_data_dir, split_summary, volume_caches
from utils.provenance import rank_device, record as record_provenance
from utils.seeding import pick_device, seed_everything
from utils.training.profiles import TrainConfig

# settings that may change between a run and its resumption: how it is shown and how it computes
# (like the device, which the folder does not record either), not what it computes
_IGNORED_FOR_RESUME = ("progress", "amp", "amp_dtype", "num_workers")
# TrainConfig fields added later -> the value that reproduces the runs written before them
_BEFORE_FIELD = {"error_weighting": "label"}

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
    context: DistContext = SINGLE  # this process's rank in a distributed run (utils.distributed)

    def checkpoint(self, stage: str) -> Path:
        """Resumable checkpoint of ``stage`` (``'dcg'``, ``'diffusion'``, a baseline's name, ...)."""
        return self.output_dir / CHECKPOINTS_DIR / f"{stage}.pth"

    @property
    def main_checkpoint(self) -> Path:
        return self.output_dir / MAIN_CHECKPOINT


def check_output_dir(output_dir: Path, config: TrainConfig, distributed: Optional[dict] = None) -> None:
    """Record the run's configuration, or refuse to mix two configurations in one folder;
    ``distributed``: how this start splits the batch over its processes
    (``utils.distributed.describe``), recorded under ``"distributed"`` (not compared: a
    resumed stage checks its own world size); a one-process start keeps the last record."""
    path = output_dir / TRAIN_CONFIG_JSON
    current = config.to_dict()
    previous = json.loads(path.read_text()) if path.is_file() else None
    if previous is not None:
        # a field added after the run was written counts as the value the run had in effect
        saved = {**_BEFORE_FIELD, **{k: v for k, v in previous.items() if k != "distributed"}}
        differ = sorted(k for k in set(saved) | set(current)
                        if k not in _IGNORED_FOR_RESUME and saved.get(k) != current.get(k))
        if differ:
            changes = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in differ)
            raise DataError(output_dir, f"holds a run with another configuration ({changes}); "
                                        "use another output folder or delete this one")
    if distributed is None and previous is not None:  # a one-process start (e.g. notebook 07) keeps the record
        distributed = previous.get("distributed")
    if distributed is not None:
        current["distributed"] = distributed
    atomic_write_text(path, json.dumps(current, indent=2) + "\n")


def prepare_experiment(config: TrainConfig, output_dir: str | Path, data_dir: Optional[str | Path] = None,
                       cache_dir: Optional[str | Path] = None, device: Optional[str | torch.device] = None,
                       verbose: bool = True, context: DistContext = SINGLE) -> Experiment:
    """Find (or generate) the data, freeze the split, fill the preprocessing cache.

    Data: ``data_dir``; else ``$MEDISCOPE_DATA_DIR`` or a MosMedData copy under
    ``/kaggle/input``; else phantoms generated at the profile's size into its
    ``phantom_dir`` (``utils.prepare_data.run_data_dir``: for severity labels a five-grade set in its
    own folder). The split is ``OUTPUT_DIR/splits.csv`` (created once, then reused).
    A ``data_dir`` ending in ``.npz`` is a MedMNIST 3D file (``utils.data.medmnist``): its official
    train / val / test split is used as is and its volumes are held in memory (no cache).
    Seeds every generator from ``config.seed``; ``device`` None picks CUDA when available.
    The first line logged, whatever ``verbose``, says which data the run uses
    (``utils.data.discovery.data_line``: real or synthetic, where, how many scans per class).
    ``context``: in a distributed run rank 0 does all of this first, writing what the folder
    needs, and the other ranks then only read it (they write nothing).
    """
    device = device if isinstance(device, torch.device) else pick_device(device)
    rank_devices = context.all_gather(rank_device(device)) if context.enabled else None
    if not context.is_main:
        context.barrier("data prepared by rank 0")
        return _prepare(config, output_dir, data_dir, cache_dir, device, False, context, rank_devices)
    exp = _prepare(config, output_dir, data_dir, cache_dir, device, verbose, context, rank_devices)
    context.barrier("data prepared by rank 0")
    return exp


def _prepare(config: TrainConfig, output_dir: str | Path, data_dir: Optional[str | Path],
             cache_dir: Optional[str | Path], device: torch.device, verbose: bool,
             context: DistContext, rank_devices: Optional[list]) -> Experiment:
    """:func:`prepare_experiment` in one process (rank 0 writes, the others only read)."""
    seed_everything(config.seed)
    output_dir = Path(output_dir)
    if context.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        check_output_dir(output_dir, config, describe(context, config.batch_size, device) if context.enabled else None)
        record_provenance(output_dir, device, rank_devices)
        for stale in output_dir.rglob(".*.tmp*"):  # half-written files of a killed run (utils.atomic)
            stale.unlink()
    if data_dir is not None and is_medmnist_file(data_dir):
        exp = _prepare_medmnist(config, output_dir, Path(data_dir), device, context)
        log.info(f"data: MedMNIST {exp.meta['data_source']['name']} at {display_path(exp.data_root)} "
                 f"({len(exp.records)} volumes of {tuple(exp.meta['data_source']['source_shape'])}, official split)")
        if verbose:
            log.info(f"profile {config.profile}, device {device}, seed {config.seed}, input {config.input_shape}\n"
                     f"{split_summary(exp.splits, exp.class_names)}")
        return exp
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    data_dir = run_data_dir(config, None if data_dir is None else Path(data_dir))
    root, layout = find_dataset_root(data_dir)
    records = discover_scans(root, config.label_mode)
    log.info(data_line(root, layout, records, synthetic=(Path(data_dir) / PHANTOM_SIDECAR).is_file()))  # said first
    cache, hires_cache = volume_caches(config, cache_dir)
    cache.warm([r.path for r in records], progress=config.progress)  # every scan read and checked first ...
    splits = load_or_create_splits(records, output_dir / SPLITS_CSV, seed=config.seed, data_dir=root)  # ... then frozen
    if hires_cache is not None:
        hires_cache.warm([r.path for r in records], progress=config.progress)

    def dataset(split: str, augment: bool = False) -> CTDataset:
        return CTDataset(splits[split], cache, augment=augment, seed=config.seed, hires_cache=hires_cache)

    class_names = list(CLASS_NAMES[config.label_mode])
    meta = {
        "preprocess_config": cache.config.as_dict(),
        "hires_preprocess_config": None if hires_cache is None else hires_cache.config.as_dict(),
        "label_mode": config.label_mode, "class_names": class_names, "train_config": config.to_dict(),
        "data_source": {"kind": "mosmeddata", "root": display_path(root), "layout": layout, "n_scans": len(records),
                        "num_classes": config.num_classes, "synthetic": (Path(data_dir) / PHANTOM_SIDECAR).is_file()},
    }
    exp = Experiment(config=config, output_dir=output_dir, device=device, data_root=root, layout=layout,
                     records=records, splits=splits, class_names=class_names, num_classes=config.num_classes,
                     cache=cache, hires_cache=hires_cache,
                     datasets={"train": dataset("train", True), "train_plain": dataset("train"),
                               "val": dataset("val"), "test": dataset("test")}, meta=meta, context=context)
    if verbose:
        log.info(f"profile {config.profile}, device {device}, seed {config.seed}, input {config.input_shape}\n"
                 f"{split_summary(splits, config.label_mode)}")
    return exp


def _prepare_medmnist(config: TrainConfig, output_dir: Path, path: Path, device: torch.device,
                      context: DistContext) -> Experiment:
    """``prepare_experiment`` for a MedMNIST 3D ``.npz`` (official split, in-memory volumes)."""
    if config.roi_scale > 1:
        raise DataError(path, f"roi_scale={config.roi_scale} needs full-resolution scans, but MedMNIST volumes "
                              "are 28^3 or 64^3; use roi_scale=1")
    data = load_medmnist(path, config.input_shape)
    splits = official_splits(data, output_dir / SPLITS_CSV)

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
                                "val": dataset("val"), "test": dataset("test")}, meta=meta, context=context)
