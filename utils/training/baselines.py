"""3D CNN baselines, 3D ResNet-18 and 3D DenseNet-121, trained in the same harness as ours.

The networks are MONAI's (``monai.networks.nets.resnet18`` and ``DenseNet121`` with
``spatial_dims=3`` and one input channel), not hand-written: they are the field's standard,
tested 3D implementations and the ones readers compare 3D medical-imaging classifiers
against (MedicalNet-style ResNets, MONAI's DenseNet tutorials), so a gap between them and
ours cannot come from a weak re-implementation.

ResNet-18 uses the standard ResNet stem (He et al. 2016: 7x7x7 convolution with stride 2,
then max pooling); MONAI's default stride-1 stem would run the first convolution at full
resolution, about 8x the compute, for no gain at these input sizes. DenseNet-121 is
MONAI's default (growth rate 32, blocks 6-12-24-16, stride-2 stem and pooling).

Both networks use BatchNorm, and with the small batches a 3D CT volume allows (4) the
running statistics that eval mode uses are poor estimates. Before every evaluation the
statistics are therefore recomputed over the training split with the current weights
(``utils.training.precise_bn``), so the checkpoint that validation selects carries statistics that
match its weights. That pass reads the split in a fixed SHUFFLED order
(:func:`bn_stats_loader`): the splits are stored sorted by class, and single-class batches
would leave the between-class variance out of the averaged batch variances.

Training (:func:`train_baseline`) uses the same splits, preprocessing, train-time flips,
epoch loop (``utils.training.loop.fit``), early stopping on validation AUC (patience), AdamW with
``lr_baseline`` (1e-3, as phase 1) and weight decay, ReduceLROnPlateau and cross-entropy with
the same label smoothing as phase 1; the epoch budget is ``baseline_epochs``.

MONAI is optional for the rest of the pipeline: it is imported only when a baseline is built,
and ``utils.pipeline`` asks :func:`runnable_baselines` which to run, which without MONAI is
none, with one logged line saying so and why (their Grad-CAM goes with them).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.utils.data import Dataset

from utils.distributed import SINGLE, DistContext
from utils.log import get_logger
from utils.training.precise_bn import bn_stats_loader, recompute_batchnorm_stats
from utils.training.profiles import BASELINE_NAMES, TrainConfig
from utils.training.loop import FitResult, fit, make_epoch_loader
from utils.training.stage import batch_inputs, fit_config, sharded_validation

DISPLAY_NAMES = {"resnet18": "3D ResNet-18", "densenet121": "3D DenseNet-121"}

log = get_logger(__name__)


def monai_missing() -> Optional[str]:
    """None when MONAI imports; else one line: the baselines and their Grad-CAM are skipped, why,
    and how to include them."""
    try:
        import monai  # noqa: F401
    except ImportError as err:
        return (f"baselines skipped: MONAI cannot be imported ({err}), so the 3D ResNet-18 / DenseNet-121 "
                "baselines and their Grad-CAM maps are left out of this run; install it (pip install 'monai>=1.3'; "
                "on Kaggle attach the wheels dataset or turn on Internet) to include them")
    return None


def runnable_baselines(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` when MONAI imports (or there are none); else () after logging :func:`monai_missing`'s line."""
    reason = monai_missing() if names else None
    if reason is not None:
        log.warning(reason)
        return ()
    return tuple(names)


def baseline_config(name: str, num_classes: int) -> dict:
    """The plain-data ``model_config`` of a baseline checkpoint."""
    return {"name": name, "num_classes": int(num_classes), "in_channels": 1}


def build_baseline(name: str, num_classes: int) -> nn.Module:
    """A MONAI 3D classifier: (B, 1, H, W, D) -> logits (B, num_classes).

    Raises:
        ValueError: unknown ``name`` (choose from ``BASELINE_NAMES``) or ``num_classes < 2``.
        ImportError: MONAI cannot be imported (:func:`monai_missing` says so first).
    """
    from monai.networks.nets import DenseNet121, resnet18

    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if name == "resnet18":
        return resnet18(spatial_dims=3, n_input_channels=1, num_classes=num_classes, conv1_t_stride=2)
    if name == "densenet121":
        return DenseNet121(spatial_dims=3, in_channels=1, out_channels=num_classes)
    raise ValueError(f"unknown baseline {name!r}; choose one of {BASELINE_NAMES}")


def baseline_from_checkpoint(checkpoint: Mapping) -> nn.Module:
    """Rebuild a baseline from a loaded checkpoint (``model_config`` + ``model_state_dict``)."""
    config = checkpoint["model_config"]
    model = build_baseline(config["name"], config["num_classes"])
    model.load_state_dict(checkpoint["model_state_dict"])
    return model


def train_baseline(name: str, train_set: Dataset, val_set: Dataset, config: TrainConfig, device: torch.device,
                   checkpoint_path: str | Path, meta: Optional[Mapping] = None, num_classes: Optional[int] = None,
                   stats_set: Optional[Dataset] = None, context: DistContext = SINGLE) -> tuple[nn.Module, FitResult]:
    """Build and train baseline ``name`` (see the module docstring); returns (best model, result).

    ``stats_set``: the split the BatchNorm statistics are recomputed over before each
    evaluation (default ``train_set``; the pipeline may pass its un-augmented training split,
    ``train_plain``), always read in the shuffled order of :func:`bn_stats_loader`. ``context``:
    this process's rank (``utils.distributed``; default: one process).
    """
    if name == "densenet121" and min(config.input_shape) < 32:
        raise ValueError(f"densenet121 needs every input side >= 32 (its stride is 32), got {config.input_shape}")
    model = build_baseline(name, num_classes or config.num_classes).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr_baseline, weight_decay=config.weight_decay)
    scheduler = ReduceLROnPlateau(optimizer, mode="min", factor=config.plateau_factor,
                                  patience=config.plateau_patience)

    def train_step(batch, generator):
        x, _, y = batch_inputs(batch, device)
        return F.cross_entropy(model(x), y, label_smoothing=config.label_smoothing)

    def evaluate():
        stats = train_set if stats_set is None else stats_set
        recompute_batchnorm_stats(model, bn_stats_loader(stats, config.batch_size, config.seed, config.num_workers),
                                  lambda b: model(b["image"].to(device)))

        def score(batch):
            x, _, y = batch_inputs(batch, device)
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=config.label_smoothing).item() * len(y)
            return loss, torch.softmax(logits.float(), dim=1)

        return sharded_validation(val_set, config, device, score, context)

    result = fit(model, optimizer, scheduler, train_step=train_step, evaluate=evaluate,
                 train_batches=lambda epoch: make_epoch_loader(train_set, config.batch_size, config.seed, epoch,
                                                               config.num_workers, context=context),
                 config=fit_config(config, name, config.baseline_epochs, device), checkpoint_path=checkpoint_path,
                 model_config=baseline_config(name, num_classes or config.num_classes), meta=meta, device=device,
                 context=context)
    return model, result
