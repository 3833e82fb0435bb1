"""What every training stage (DCG, diffusion, baselines) shares: its :class:`FitConfig` from
the run's :class:`TrainConfig`, a batch's tensors on the device, the fixed-order evaluation
loader and the validation metrics that drive early stopping."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from utils.evaluation.metrics import classification_metrics
from utils.training.loop import FitConfig
from utils.training.profiles import TrainConfig


def validation_metrics(labels: np.ndarray, probs: np.ndarray, loss: float) -> dict[str, float]:
    """``{'val_loss', 'val_auc', 'val_acc'}``; AUC from the probabilities (NaN if one class)."""
    metrics = classification_metrics(labels, probs)
    return {"val_loss": float(loss), "val_auc": metrics["roc_auc"], "val_acc": metrics["accuracy"]}


def fit_config(config: TrainConfig, name: str, epochs: int, device: torch.device,
               min_epochs: int = 0) -> FitConfig:
    """The :class:`FitConfig` of one stage of a run (``min_epochs``: the first selectable epoch)."""
    return FitConfig(name=name, epochs=epochs, patience=config.patience, grad_clip=config.grad_clip,
                     amp=config.use_amp(device), amp_dtype=config.autocast_dtype(device), seed=config.seed,
                     progress=config.progress, min_epochs=min_epochs)


def batch_inputs(batch: Mapping, device: torch.device) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """(image (B, 1, H, W, D), image_hires or None, labels (B,)) of a CTDataset batch on ``device``."""
    hires = batch.get("image_hires")
    return (batch["image"].to(device), None if hires is None else hires.to(device), batch["label"].to(device))


def eval_loader(dataset: Dataset, config: TrainConfig) -> DataLoader:
    """Fixed-order loader for validation / caching (no shuffling, no augmentation)."""
    return DataLoader(dataset, batch_size=config.batch_size, shuffle=False, num_workers=config.num_workers)
