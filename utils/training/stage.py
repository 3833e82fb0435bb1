"""What every training stage (DCG, diffusion, baselines) shares: its :class:`FitConfig` from
the run's :class:`TrainConfig`, a batch's tensors on the device, the fixed-order evaluation
loader and the validation metrics that drive early stopping."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from utils.distributed import SINGLE, DistContext
from utils.evaluation.metrics import classification_metrics
from utils.training.loop import FitConfig
from utils.training.profiles import TrainConfig


def validation_metrics(labels: np.ndarray, probs: np.ndarray, loss: float) -> dict[str, float]:
    """``{'val_loss', 'val_auc', 'val_acc'}``; AUC from the probabilities (NaN if one class)."""
    metrics = classification_metrics(labels, probs)
    return {"val_loss": float(loss), "val_auc": metrics["roc_auc"], "val_acc": metrics["accuracy"]}


def fit_config(config: TrainConfig, name: str, epochs: int, device: torch.device,
               min_epochs: int = 0, ddp_find_unused: bool = False) -> FitConfig:
    """The :class:`FitConfig` of one stage of a run (``min_epochs``: the first selectable epoch)."""
    return FitConfig(name=name, epochs=epochs, patience=config.patience, grad_clip=config.grad_clip,
                     amp=config.use_amp(device), amp_dtype=config.autocast_dtype(device), seed=config.seed,
                     progress=config.progress, min_epochs=min_epochs, ddp_find_unused=ddp_find_unused)


def batch_inputs(batch: Mapping, device: torch.device) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """(image (B, 1, H, W, D), image_hires or None, labels (B,)) of a CTDataset batch on ``device``."""
    hires = batch.get("image_hires")
    return (batch["image"].to(device), None if hires is None else hires.to(device), batch["label"].to(device))


def eval_loader(dataset: Dataset, config: TrainConfig) -> DataLoader:
    """Fixed-order loader for validation / caching (no shuffling, no augmentation)."""
    return DataLoader(dataset, batch_size=config.batch_size, shuffle=False, num_workers=config.num_workers)


def sharded_validation(dataset: Dataset, config: TrainConfig, device: torch.device,
                       score: Callable[[Mapping], tuple[float, torch.Tensor]],
                       context: DistContext = SINGLE) -> dict[str, float]:
    """:func:`validation_metrics` of ``dataset`` (items with ``index`` and ``label``) in fixed
    order; ``score(batch) -> (the batch's summed loss, probabilities (B, C))``. With several
    ranks each scores its round-robin shard and the rows are gathered back into scan order
    (``DistContext.gather_in_order``): every rank gets the metrics of the whole split, so all
    take the same early-stopping decision (never an average of per-rank AUCs)."""
    part = Subset(dataset, context.shard(len(dataset))) if context.enabled else dataset
    indices, rows, loss = [], [], 0.0
    for batch in eval_loader(part, config):
        batch_loss, probs = score(batch)
        loss += batch_loss
        indices += torch.as_tensor(batch["index"]).tolist()
        rows += list(zip(probs.float().cpu().numpy(), torch.as_tensor(batch["label"]).tolist()))
    _, rows = context.gather_in_order(indices, rows)
    loss = context.all_sum([loss], device)[0]
    labels = np.array([label for _, label in rows])
    return validation_metrics(labels, np.stack([p for p, _ in rows]), loss / len(labels))
