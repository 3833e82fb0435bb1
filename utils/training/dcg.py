"""Phase 1 of DiffMIC-3D: the DCG, on the generic loop of ``utils.training.loop``, and its
guidance cached once per volume for phase 2.

Phase 1 (:func:`train_dcg`): the DCG alone, CE(global logits) + CE(local logits) with label
smoothing, AdamW (lr ``lr_dcg``, weight decay) with a per-step warmup-cosine schedule
(:func:`dcg_lr_factor`) and a pooling / local-CE curriculum, early stopping on validation AUC
of the DCG's fused prediction, train-time H / W flips (``CTDataset(augment=True)``). Before
every evaluation the BatchNorm statistics of the global encoder are recomputed over the
training split (``utils.training.precise_bn``), so the kept (best) weights carry statistics
that match them, and so does the guidance cached from them.

Between the phases (:func:`cache_guidance`): the frozen DCG runs ONCE per volume and its
outputs are kept as one :class:`DCGOutput` over the dataset, for phase 2 to read instead of
running the DCG per epoch (a frozen DCG's guidance is a deterministic function of the volume).
Phase 2 lives in ``utils.training.diffusion``.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from models.dcg_model import DCGOutput
from models.diffmic3d import DiffMIC3D
from utils.distributed import SINGLE, DistContext, steps_per_epoch
from utils.training.precise_bn import bn_stats_loader, recompute_batchnorm_stats
from utils.training.profiles import TrainConfig
from utils.training.loop import FitResult, fit, make_epoch_loader
from utils.training.stage import batch_inputs, fit_config, sharded_validation


# ------------------------------------------------------------------------------------------
# phase 1: DCG
# ------------------------------------------------------------------------------------------

def dcg_lr_factor(step: int, total_steps: int, warmup: float) -> float:
    """Phase-1 learning-rate multiplier at 0-based optimiser ``step`` of ``total_steps``:
    linear warmup ``(step + 1) / W`` over the first W = ceil(warmup * total_steps) steps, then
    cosine decay from 1 towards 0 over the remaining n steps (0.5 (1 - cos(pi / n)) at the last)."""
    if not 0.0 <= warmup < 1.0:
        raise ValueError(f"dcg_lr_warmup must be in [0, 1), got {warmup}")
    total_steps = max(int(total_steps), 1)
    warm = int(np.ceil(warmup * total_steps))
    if step < warm:
        return (step + 1) / warm
    span = max(total_steps - warm, 1)
    return float(0.5 * (1.0 + np.cos(np.pi * min(step - warm, span) / span)))


def dcg_steps_per_epoch(n_train: int, batch_size: int, world_size: int = 1) -> int:
    """Optimiser steps per epoch of :func:`utils.training.loop.make_epoch_loader` (which drops a
    last batch of a single volume, and with ``world_size`` ranks one smaller than the world:
    ``utils.distributed.steps_per_epoch``); phase 2's schedule counts its steps with it too."""
    return steps_per_epoch(n_train, batch_size, world_size)


def train_dcg(model: DiffMIC3D, train_set: Dataset, val_set: Dataset, config: TrainConfig, device: torch.device,
              checkpoint_path: str | Path, meta: Optional[Mapping] = None, name: str = "dcg",
              context: DistContext = SINGLE) -> FitResult:
    """Phase 1: train ``model.dcg`` (see the module docstring); ``model`` ends with the best DCG.

    Schedule, set per optimiser step from (epoch, batch index) alone, so a resumed run follows
    it exactly: the learning rate is ``lr_dcg * dcg_lr_factor(step, total, dcg_lr_warmup)``
    (linear warmup, cosine decay to 0 over ``dcg_epochs``; no ReduceLROnPlateau) and the DCG
    objective gets ``progress = step / total`` (pooling warmup, delayed local CE:
    ``models.dcg_model.dcg_objective``). No epoch before the curriculum has run its course can
    be selected (``TrainConfig.dcg_first_selectable_epoch``: measured on AdrenalMNIST3D, a
    98-scan validation split otherwise picked epoch 2, before the local CE was on, while the
    out-of-fold DCGs that made phase 2's training priors ran 7-9 epochs). AdamW, weight decay, label smoothing, early stopping
    on validation AUC and precise BatchNorm statistics before every evaluation as before;
    validation uses the full objective (progress 1).

    Args:
        train_set: ``CTDataset(..., augment=True)`` of the training split.
        val_set: ``CTDataset`` of the validation split (no augmentation).
        checkpoint_path: resumable checkpoint of this phase (e.g. ``checkpoints/dcg.pth``).
        meta: plain data stored with the checkpoint (preprocess config, class names, ...).
        name: the stage's name in log lines and progress bars (an out-of-fold DCG: ``'dcg fold 2/3'``).
        context: this process's rank (``utils.distributed``; default: one process).
    """
    optimizer = torch.optim.AdamW(model.dcg.parameters(), lr=config.lr_dcg, weight_decay=config.weight_decay)
    steps_per_epoch = dcg_steps_per_epoch(len(train_set), config.batch_size, context.world_size)
    total_steps = max(config.dcg_epochs * steps_per_epoch, 1)
    dcg_lr_factor(0, total_steps, config.dcg_lr_warmup)  # validate the knobs before training
    curriculum = dict(pool_warmup=config.dcg_pool_warmup, local_start=config.dcg_local_start,
                      local_ramp=config.dcg_local_ramp)
    position = {"epoch": 0, "batch": 0}  # set by train_batches, advanced by train_step

    def train_batches(epoch):
        loader = make_epoch_loader(train_set, config.batch_size, config.seed, epoch, config.num_workers,
                                   context=context)
        if len(loader) != steps_per_epoch:
            raise RuntimeError(f"train_dcg: {len(loader)} batches per epoch, expected {steps_per_epoch}")
        position.update(epoch=epoch, batch=0)
        return loader

    def train_step(batch, generator):
        step = position["epoch"] * steps_per_epoch + position["batch"]
        position["batch"] += 1
        lr = config.lr_dcg * dcg_lr_factor(step, total_steps, config.dcg_lr_warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, x_hires, y = batch_inputs(batch, device)
        return model.dcg_loss(x, y, x_hires, label_smoothing=config.label_smoothing,
                              progress=step / total_steps, **curriculum)["loss"]

    def evaluate():
        recompute_batchnorm_stats(model.dcg,
                                  bn_stats_loader(train_set, config.batch_size, config.seed, config.num_workers),
                                  lambda batch: model.dcg(*batch_inputs(batch, device)[:2]))

        def score(batch):
            x, x_hires, y = batch_inputs(batch, device)
            out = model.dcg_loss(x, y, x_hires, label_smoothing=config.label_smoothing)
            return out["loss"].item() * len(y), out["output"].fused_probs

        return sharded_validation(val_set, config, device, score, context)

    return fit(model, optimizer, None, train_step=train_step, evaluate=evaluate, train_batches=train_batches,
               config=fit_config(config, name, config.dcg_epochs, device, config.dcg_first_selectable_epoch(),
                                 ddp_find_unused=True),  # the rest of the model; the curriculum's branches
               checkpoint_path=checkpoint_path, model_config={"dcg": model.config.dcg.to_dict()}, meta=meta,
               device=device, checkpoint_keys=lambda key: key.startswith("dcg."),  # the rest of the model is untrained here
               context=context)


# ------------------------------------------------------------------------------------------
# guidance cache
# ------------------------------------------------------------------------------------------

@torch.no_grad()
def cache_guidance(model: DiffMIC3D, dataset: Dataset, device: torch.device, batch_size: int = 4,
                   num_workers: int = 0, progress: bool = True, member: int = 0,
                   context: DistContext = SINGLE) -> DCGOutput:
    """Run the frozen DCG once per volume of ``dataset``; stack its outputs by dataset index.

    ``member``: which of the model's prior members (``DiffMIC3D.member_guidance`` order: 0 is
    the final DCG, 1.. the out-of-fold DCGs). ``context``: with several ranks each runs its
    round-robin shard and every rank gets the whole cache, gathered back into dataset order.

    Returns:
        one :class:`DCGOutput` over the whole dataset, on CPU (floats in float32), row ``i`` =
        ``dataset[i]``: e.g. ``global_probs`` (N, C), ``roi_features`` (N, K, L), ``saliency``
        (N, C, h, w, d). ``cache.index(rows).to(device)`` is the guidance of a batch for
        ``DiffMIC3D.diffusion_loss`` / ``predict``.
    """
    model.eval()
    dcg = (model.dcg, *model.fold_dcgs)[member]
    parts: list[DCGOutput] = []
    part = Subset(dataset, context.shard(len(dataset))) if context.enabled else dataset
    loader = DataLoader(part, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    seen = []
    for batch in tqdm(loader, desc="cache DCG guidance", leave=False, disable=not (progress and context.is_main)):
        x, x_hires, _ = batch_inputs(batch, device)
        out = dcg(x, x_hires).as_dict()
        parts.append(DCGOutput(**{k: (v.float() if v.is_floating_point() else v).cpu() for k, v in out.items()}))
        seen.append(torch.as_tensor(batch["index"]))
    order, cache = torch.cat(seen), DCGOutput.cat(parts)
    if context.enabled:  # every rank's shard, back into dataset order
        shards = context.all_gather((order, cache))
        order, cache = torch.cat([o for o, _ in shards]), DCGOutput.cat([c for _, c in shards])
        ranked = torch.argsort(order)
        order, cache = order[ranked], cache.index(ranked)
    if not torch.equal(order, torch.arange(len(dataset))):
        raise RuntimeError("cache_guidance: the loader did not visit the dataset in index order")
    return cache
