"""Phase 2 of DiffMIC-3D: the conditional denoiser on a frozen DCG, with honest priors.

:func:`train_diffusion` trains the prior generator and the denoiser (own image encoder,
condition U-Net, per-point head) on ``DiffMIC3D.diffusion_loss`` over the TRAINING scans
(with the train-time augmentation) and their cached guidance, which should be out-of-fold
(``utils.pipeline.out_of_fold_guidance``: each training scan's priors come from a DCG that
did not train on it, so they are as good as they will be on new scans). Then:

* prior dropout: each volume's priors are replaced by an uninformative one with probability
  ``prior_dropout``, so the denoiser must also read the scan;
* AdamW with a linear warmup then cosine decay per optimiser step (the step count is read
  from the optimiser's own state, so a resumed run continues the same schedule);
* an exponential moving average (EMA) of the weights, which is what is validated, selected
  and kept (its BatchNorm statistics recomputed over the training split before each
  validation, as in phase 1);
* validation: the mean class probability over ``val_num_samples`` DDIM chains per volume
  (one chain is too noisy to select on).

:func:`calibrate_temperature` then fits the readout's softmax temperature on the validation
split and stores it on the model (``DiffMIC3D.set_temperature``).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset

from models.dcg_model import DCGOutput
from models.diffmic3d import DiffMIC3D
from utils.training.precise_bn import bn_stats_loader, recompute_batchnorm_stats
from utils.training.profiles import TrainConfig
from utils.training.loop import FitResult, fit, make_epoch_loader
from utils.training.dcg import dcg_steps_per_epoch
from utils.training.stage import eval_loader, fit_config, validation_metrics


def warmup_cosine(step: int, total: int, warmup: float) -> float:
    """Learning-rate factor at optimiser step ``step`` of ``total``: linear from 0 over the
    first ``warmup`` fraction, then cosine to 0."""
    n_warm = max(1, int(round(warmup * total)))
    if step < n_warm:
        return (step + 1) / n_warm
    progress = min(1.0, (step - n_warm) / max(1, total - n_warm))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _optimizer_step(optimizer: torch.optim.Optimizer) -> int:
    """Optimiser steps taken so far (AdamW keeps them per parameter; checkpointed with it)."""
    for state in optimizer.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


class _Phase2(nn.Module):
    """What phase 2 checkpoints: the model and the EMA of its weights (``ema.module``)."""

    def __init__(self, model: DiffMIC3D, decay: float):
        super().__init__()
        self.model = model
        self.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)
        self.ema.requires_grad_(False)


@torch.no_grad()
def predict_dataset(model: DiffMIC3D, dataset: Dataset, guidance: DCGOutput,
                    device: torch.device, batch_size: int, seed: int, num_samples: Optional[int] = None,
                    steps: Optional[int] = None, num_workers: int = 0) -> dict[str, torch.Tensor]:
    """``model.predict`` over ``dataset`` (fixed order) with its cached guidance rows and ONE
    generator seeded with ``seed``; tensors concatenated on CPU. ``num_samples`` / ``steps``
    None: the model's own sampling settings (``DiffusionConfig``), as for the test predictions.

    Returns probs (N, C), std (N, C), entropy (N,), y0_mean (S, N, C).
    """
    model.eval()
    generator = torch.Generator(device).manual_seed(seed)
    outputs: dict[str, list[torch.Tensor]] = {}
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers):
        rows = torch.as_tensor(batch["index"])
        out = model.predict(batch["image"].to(device), guidance.index(rows).to(device),
                            num_samples=num_samples, steps=steps, generator=generator)
        for key in ("probs", "std", "entropy", "y0_mean"):
            outputs.setdefault(key, []).append(out[key].float().cpu())
    return {key: torch.cat(values, dim=1 if key == "y0_mean" else 0) for key, values in outputs.items()}


def recompute_encoder_bn(model: DiffMIC3D, train_set: Dataset, config: TrainConfig, device: torch.device) -> None:
    """Precise BatchNorm statistics of the denoiser's image encoder over the training split
    (shuffled, fixed order: ``utils.training.precise_bn.bn_stats_loader``)."""
    encoder = model.denoiser.image_encoder
    recompute_batchnorm_stats(encoder,
                              bn_stats_loader(train_set, config.batch_size, config.seed, config.num_workers),
                              lambda batch: encoder(batch["image"].to(device)))


def train_diffusion(model: DiffMIC3D, train_set: Dataset, train_guidance: DCGOutput,
                    val_set: Dataset, val_guidance: DCGOutput, config: TrainConfig,
                    device: torch.device, checkpoint_path: str | Path,
                    meta: Optional[Mapping] = None) -> FitResult:
    """Phase 2 (module docstring); ``model`` ends with the selected EMA weights.

    Args:
        train_set: the training split with augmentation (items ``image``, ``label``, ``index``);
            ``train_guidance`` row i belongs to its item i (built from the same split).
        val_set / val_guidance: the validation split, unaugmented, and its guidance.
        checkpoint_path: resumable checkpoint of this phase.
    """
    model.freeze_dcg()
    params = list(model.prior_generator.parameters()) + list(model.denoiser.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr_diffusion, weight_decay=config.weight_decay)
    wrapper = _Phase2(model, config.ema_decay).to(device)
    # the loader drops a last batch of one volume: count steps the way it batches
    total_steps = max(1, dcg_steps_per_epoch(len(train_set), config.batch_size) * config.diffusion_epochs)
    val_labels = np.asarray(val_set.labels)

    def train_step(batch, generator):
        step = _optimizer_step(optimizer)
        if step > 0:
            wrapper.ema.update_parameters(model)  # the weights after the previous step
        for group in optimizer.param_groups:
            group["lr"] = config.lr_diffusion * warmup_cosine(step, total_steps, config.warmup_fraction)
        model.dcg.eval()  # frozen: keep its BatchNorm in eval mode although fit() sets train()
        wrapper.ema.eval()
        rows = torch.as_tensor(batch["index"])
        return model.diffusion_loss(batch["image"].to(device), train_guidance.index(rows).to(device),
                                    batch["label"].to(device), prior_dropout=config.prior_dropout,
                                    generator=generator)["loss"]

    def evaluate():
        wrapper.ema.update_parameters(model)
        ema: DiffMIC3D = wrapper.ema.module
        recompute_encoder_bn(ema, train_set, config, device)
        ema.eval()
        loss, n = 0.0, 0
        generator = torch.Generator(device).manual_seed(config.seed)
        for batch in eval_loader(val_set, config):
            rows = torch.as_tensor(batch["index"])
            out = ema.diffusion_loss(batch["image"].to(device), val_guidance.index(rows).to(device),
                                     batch["label"].to(device), generator=generator)
            loss += out["loss"].item() * len(rows)
            n += len(rows)
        probs = predict_dataset(ema, val_set, val_guidance, device, config.batch_size, config.seed,
                                config.val_num_samples, config.val_ddim_steps, config.num_workers)["probs"]
        return validation_metrics(val_labels, probs.numpy(), loss / max(n, 1))

    result = fit(wrapper, optimizer, None, train_step=train_step, evaluate=evaluate,
                 train_batches=lambda epoch: make_epoch_loader(train_set, config.batch_size, config.seed, epoch,
                                                               config.num_workers),
                 config=fit_config(config, "diffusion", config.diffusion_epochs, device),
                 checkpoint_path=checkpoint_path, model_config=model.config.to_dict(), meta=meta, device=device)
    model.load_state_dict(wrapper.ema.module.state_dict())  # the selected EMA weights
    model.freeze_dcg()
    return result


def fit_temperature(y0_mean: torch.Tensor, labels: torch.Tensor, grid: Optional[torch.Tensor] = None) -> float:
    """The softmax temperature minimising the NLL of the sample-mean probabilities.

    Args:
        y0_mean: (S, N, C) grid means of the final y_0 of S chains per volume (validation).
        labels: (N,) class indices.
        grid: candidate temperatures (default 200 log-spaced values in [0.01, 10]).

    A minimum on the edge of the grid means the data cannot place the temperature (e.g. a
    validation split that every temperature separates perfectly): then a warning and 1.0.
    """
    grid = torch.logspace(-2, 1, 200) if grid is None else grid
    labels = torch.as_tensor(labels).long()
    logits = y0_mean.float()
    nll = torch.stack([-(torch.softmax(logits / T, dim=-1).mean(0)[torch.arange(len(labels)), labels]
                         .clamp(min=1e-12).log().mean()) for T in grid])
    best = int(torch.argmin(nll))
    if best in (0, len(grid) - 1):
        warnings.warn(f"temperature fit ended on the edge of its grid ({float(grid[best]):.3g}): the validation "
                      f"split ({len(labels)} scans) cannot place it; using 1.0", RuntimeWarning, stacklevel=2)
        return 1.0
    return float(grid[best])


def calibrate_temperature(model: DiffMIC3D, val_set: Dataset, val_guidance: DCGOutput,
                          config: TrainConfig, device: torch.device) -> float:
    """Fit the readout temperature on the VALIDATION split, sampling exactly as the test
    predictions will (the model's ``num_samples`` and ``ddim_steps``, the run's seed), and store it on the model.
    The ranking of each sample is unchanged; deterministic, so a resumed run refits the same value."""
    model.set_temperature(1.0)
    out = predict_dataset(model, val_set, val_guidance, device, config.batch_size, config.seed,
                          num_workers=config.num_workers)
    value = fit_temperature(out["y0_mean"], torch.as_tensor(np.asarray(val_set.labels)))
    model.set_temperature(value)
    return value
