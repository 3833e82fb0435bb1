"""One epoch loop for every stage (DCG, diffusion, baselines), resumable at epoch granularity.

:func:`fit` runs ``epochs`` epochs of ``train_step`` over ``train_batches(epoch)``, evaluates
on the validation split after each, keeps the best weights (highest validation AUC; ties go
to the lower validation loss; only from ``min_epochs`` on), stops early after ``patience`` epochs without improvement, and
writes a checkpoint atomically at the end of every epoch.

Reproducible resume. Everything random in an epoch is a function of (seed, epoch) or is in
the checkpoint:

* data order and augmentation: ``train_batches(epoch)`` must derive them from
  :func:`epoch_seed` (``make_epoch_loader`` does: its shuffling generator is seeded with
  ``epoch_seed(seed, epoch, ORDER_STREAM)`` and it calls ``CTDataset.set_epoch(epoch)``);
* noise drawn by the loss (diffusion timesteps and eps): the ``generator`` handed to
  ``train_step``, re-seeded with ``epoch_seed(seed, epoch)`` at the start of each epoch;
* torch's global generators (dropout, anything un-seeded): saved with
  :func:`utils.training.checkpoint.rng_state` at the end of each epoch and restored on resume;
* model, optimizer, scheduler, GradScaler, history and the early-stopping counter: saved at
  the end of each epoch; the best weights when they differ from the current ones (below).

A run killed at any point therefore restarts from its last finished epoch and ends with the
weights and metrics of an uninterrupted run (same device, thread count and number of processes).

A finished stage rewrites its checkpoint with ``fit.complete = True`` and the BEST weights
(optimizer state and best-weights file dropped); calling :func:`fit` again only loads it.

Lean files. Each file holds each thing once:

* ``STAGE.pth`` while training (the resume file): the CURRENT weights, optimizer, scheduler,
  scaler, rng, history; no second copy of the weights.
* ``STAGE.best.pth``: the best weights, written only when they change and are no longer the
  current ones (the first epoch after an improvement that does not improve again), BEFORE the
  resume file that needs it, so a kill between the two writes leaves a consistent pair.
* ``STAGE.pth`` once finished: the best weights and the history only.
* ``checkpoint_keys``: a stage that trains only part of a model (phase 1 trains the DCG of a
  whole DiffMIC-3D; phase 2 leaves the DCGs frozen) stores only those state-dict entries; the
  rest is rebuilt by the caller (the frozen DCGs come from their own stage's file). Files
  written before this rule, holding every entry, still load.

``fit.disk`` of the finished file: the largest resume / best-weights files and the bytes written.

Checkpoint layout (``utils.training.checkpoint.save_checkpoint``, loads with ``weights_only=True``)::

    {model_config, model_state_dict, **meta,            # meta: e.g. preprocess_config
     "fit": {"name", "epoch" (epochs done), "complete", "stopped_early", "history",
             "best": {"epoch", "val_auc", "val_loss", "val_acc"}, "bad_epochs", "disk", "world_size",
             [while training:] "optimizer", "scheduler", "scaler", "rng", "rank_rng" (or None),
             "best_in" ("model_state_dict" or the best-weights file's name)}}
    STAGE.best.pth: {model_config, model_state_dict, "best_of": {"name", "epoch"}}
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingWarmRestarts, ReduceLROnPlateau
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from utils.distributed import SINGLE, DistContext, RankBatchSampler, data_parallel_step, loss_weight
from utils.training.checkpoint import (best_weights_path, check_config_matches, kept_entries, load_checkpoint,
                                       load_kept, rng_state, save_checkpoint, set_rng_state)
from utils.errors import DataError
from utils.log import get_logger
from utils.training import epoch_log
from utils.training.nonfinite import nonfinite_message

HISTORY_KEYS = ("train_loss", "val_loss", "val_auc", "val_acc", "lr")

log = get_logger(__name__)


@dataclass(frozen=True)
class FitConfig:
    """Settings of one :func:`fit` call.

    Args:
        name: stage name, used in log lines and progress bars (e.g. ``'dcg'``, ``'dcg fold 2/3'``).
        epochs: maximum number of epochs.
        patience: stop after this many consecutive epochs without a better validation score.
        grad_clip: max global L2 norm of the gradients (None: no clipping).
        amp: autocast in ``amp_dtype`` (the models keep their heads and losses in float32:
            ``models/precision.py``); float16 also gets a GradScaler, bfloat16 needs none.
        amp_dtype: ``'float16'`` (any CUDA card, e.g. T4, P100) or ``'bfloat16'`` (compute
            capability >= 8.0: same range as float32); see ``utils.seeding.amp_dtype``.
        seed: seed from which every epoch's generator is derived (:func:`epoch_seed`).
        progress: show a tqdm bar per epoch.
        log_every: a progress line every this many epochs (0: none); one summary line at the
            stage's end either way, every epoch at DEBUG (``utils.training.epoch_log``).
        min_epochs: no epoch before this one (1-based) can be selected, and the early-stopping
            counter starts only there (e.g. a curriculum or an EMA that has not yet run its
            course); capped at ``epochs`` so a short run still selects its last epoch.
        ddp_find_unused: some parameters may get no gradient (``utils.distributed.data_parallel_step``).
    """

    name: str
    epochs: int
    patience: int
    grad_clip: Optional[float] = 1.0
    amp: bool = False
    amp_dtype: str = "float16"
    seed: int = 0
    progress: bool = True
    min_epochs: int = 0
    log_every: int = 5
    ddp_find_unused: bool = False


@dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        history: series name (``HISTORY_KEYS``) -> one value per epoch run.
        best: ``{'epoch' (1-based), 'val_auc', 'val_loss', 'val_acc'}`` of the kept weights.
        epochs_run: epochs completed.
        stopped_early: whether early stopping ended the stage before ``epochs``.
    """

    history: dict[str, list[float]]
    best: dict
    epochs_run: int
    stopped_early: bool
    resumed_from: int = 0
    seconds: float = field(default=0.0, compare=False)


STEP_STREAM, ORDER_STREAM = 0, 1  # epoch_seed streams: noise drawn by the loss, data order


def epoch_seed(seed: int, epoch: int, stream: int = STEP_STREAM, rank: int = 0) -> int:
    """A 63-bit seed for ``stream`` in epoch ``epoch`` of a run seeded with ``seed``;
    different (seed, epoch, stream, rank) give statistically independent streams (SeedSequence);
    rank 0's is the single-process seed."""
    entropy = [int(seed), int(epoch), int(stream)] + ([int(rank)] if rank else [])
    state = np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


def make_epoch_loader(dataset: Dataset, batch_size: int, seed: int, epoch: int, num_workers: int = 0,
                      pin_memory: bool = False, context: DistContext = SINGLE) -> DataLoader:
    """A shuffling DataLoader for one epoch: order from ``epoch_seed(seed, epoch, ORDER_STREAM)``, and
    ``dataset.set_epoch(epoch)`` (augmentation draw) when the dataset has it. A last batch of
    a single volume is dropped (BatchNorm, in the baselines, cannot train on it). With several
    ranks (``context``): the same order and global batches, this rank's part of each
    (``utils.distributed.RankBatchSampler``)."""
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch, ORDER_STREAM))
    if context.enabled:  # the same draws from the same generator as the one-process loader below
        return DataLoader(dataset, batch_sampler=RankBatchSampler(len(dataset), batch_size, context, generator),
                          generator=generator, num_workers=num_workers, pin_memory=pin_memory)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=len(dataset) % batch_size == 1)


def _score(metrics: Mapping) -> tuple[float, float]:
    """Model-selection key, larger is better: (val AUC, -val loss); an undefined AUC
    (one class in the validation split) counts as -inf so the loss decides."""
    auc = metrics["val_auc"]
    return (auc if auc is not None and math.isfinite(auc) else -math.inf, -metrics["val_loss"])


def _cpu_state(state: Mapping) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def stage_complete(path: str | Path) -> bool:
    """Whether the checkpoint at ``path`` exists and its stage finished."""
    try:
        return Path(path).is_file() and bool(load_checkpoint(path)["fit"]["complete"])
    except (DataError, KeyError, TypeError):
        return False


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, *,
        train_step: Callable[[object, torch.Generator], torch.Tensor],
        evaluate: Callable[[], Mapping[str, float]],
        train_batches: Callable[[int], Iterable],
        config: FitConfig, checkpoint_path: str | Path, model_config: Mapping,
        meta: Optional[Mapping] = None, device: Optional[torch.device] = None,
        checkpoint_keys: Optional[Callable[[str], bool]] = None, context: DistContext = SINGLE) -> FitResult:
    """Train ``model`` with early stopping on validation; resume from ``checkpoint_path``.

    Args:
        model: the module whose ``state_dict`` is checkpointed (may include frozen parts).
        optimizer: over the parameters being trained; their gradients are clipped.
        scheduler: ``ReduceLROnPlateau`` (stepped on the validation loss after each epoch),
            ``CosineAnnealingWarmRestarts`` (stepped after every batch with the fractional
            epoch ``epoch + (i + 1) / n_batches``), any other scheduler (stepped once per
            epoch), or None.
        train_step: ``(batch, generator) -> scalar loss`` for one batch, run in train mode
            under autocast; ``generator`` is the epoch's seeded torch.Generator on ``device``.
        evaluate: ``() -> {'val_loss', 'val_auc', 'val_acc'}`` on the validation split, run in
            eval mode without gradients. AUC from probabilities; NaN if undefined.
        train_batches: ``epoch (0-based) -> iterable of batches`` whose order and
            augmentation depend only on (seed, epoch) (see :func:`make_epoch_loader`).
        config: epochs, patience, clipping, AMP, seed.
        checkpoint_path: written atomically after every epoch; resumed from if present.
        model_config: the model's configuration as plain data (checked on resume).
        meta: further plain data stored in the checkpoint (preprocess config, class names, ...).
        device: where ``model`` lives (default: its first parameter's device).
        checkpoint_keys: ``state-dict key -> bool``, the entries this stage trains and
            stores (None: all); the others must already hold their final values when
            :func:`fit` is called (module docstring, "Lean files").
        context: this process's rank (``utils.distributed``): with several, ``train_step`` runs under
            DDP on this rank's part of each batch (``make_epoch_loader(..., context=context)``),
            ``evaluate`` must return the whole split's metrics on every rank, rank 0 alone writes
            the checkpoints (with every rank's generator state); a resume with another world size is refused.

    Returns:
        a :class:`FitResult`; ``model`` holds the best weights on return.

    Raises:
        DataError: the checkpoint is unreadable, not a training checkpoint of ours, or its
            ``model_config`` differs from ``model_config`` (one line naming the file and fields).
    """
    checkpoint_path = Path(checkpoint_path)
    meta = dict(meta or {})
    device = device or next(model.parameters()).device
    device = torch.device(device)
    amp_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[config.amp_dtype]
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp and amp_dtype == torch.float16)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if config.amp else nullcontext
    params = [p for group in optimizer.param_groups for p in group["params"]]
    step_fn = data_parallel_step(model, train_step, context, device, config.ddp_find_unused)
    history = {key: [] for key in HISTORY_KEYS}
    best = {"epoch": 0, "val_auc": -math.inf, "val_loss": math.inf, "val_acc": float("nan")}
    best_state = _cpu_state(kept_entries(model.state_dict(), checkpoint_keys))
    start_epoch, bad_epochs, stopped_early = 0, 0, False
    best_path = best_weights_path(checkpoint_path)
    best_on_disk = None  # the epoch whose weights best_path holds
    disk = {"resume_file_bytes": 0, "best_file_bytes": 0, "bytes_written": 0}

    def write(path: Path, **payload) -> int:
        if not context.is_main:  # rank 0 owns the files
            return 0
        save_checkpoint(path, model_config=model_config, **payload)
        size = path.stat().st_size
        disk["bytes_written"] += size
        return size

    def snapshot(complete: bool) -> None:
        nonlocal best_on_disk
        fit_state = {"name": config.name, "config": asdict(config), "epoch": epoch_done, "complete": complete,
                     "stopped_early": stopped_early, "history": history, "best": best, "bad_epochs": bad_epochs,
                     "world_size": context.world_size}
        if complete:
            write(checkpoint_path, model_state_dict=best_state, **meta, fit={**fit_state, "disk": dict(disk)})
            best_path.unlink(missing_ok=True)
            return
        best_is_current = best["epoch"] == epoch_done
        if not best_is_current and best_on_disk != best["epoch"]:  # first: the resume file will point at it
            size = write(best_path, model_state_dict=best_state, best_of={"name": config.name, "epoch": best["epoch"]})
            disk["best_file_bytes"] = max(disk["best_file_bytes"], size)
            best_on_disk = best["epoch"]
        rngs = context.all_gather(rng_state())  # every rank's generators, for an exact resume
        fit_state.update(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                         scheduler=None if scheduler is None else scheduler.state_dict(), rng=rngs[0],
                         rank_rng=rngs if context.enabled else None,
                         best_in="model_state_dict" if best_is_current else best_path.name, disk=dict(disk))
        size = write(checkpoint_path, model_state_dict=kept_entries(model.state_dict(), checkpoint_keys), **meta,
                     fit=fit_state)
        disk["resume_file_bytes"] = max(disk["resume_file_bytes"], size)

    def saved_best(state: Mapping) -> dict:
        """The best weights a resume file refers to (and, for older files, holds)."""
        nonlocal best_on_disk
        if state["best"]["epoch"] == state["epoch"] or state.get("best_state_dict", False) is None:
            return ckpt["model_state_dict"]
        if "best_state_dict" in state:  # written before the separate best-weights file
            return state["best_state_dict"]
        saved = load_checkpoint(best_path)
        if saved.get("best_of", {}).get("epoch") != state["best"]["epoch"]:
            raise DataError(best_path, f"holds the weights of epoch {saved.get('best_of', {}).get('epoch')}, but "
                                       f"{checkpoint_path.name} needs epoch {state['best']['epoch']}'s; delete both "
                                       "to retrain the stage")
        best_on_disk = state["best"]["epoch"]
        return saved["model_state_dict"]

    if checkpoint_path.exists():
        ckpt = load_checkpoint(checkpoint_path)  # on the CPU: load_state_dict copies onto the device
        check_config_matches(ckpt["model_config"], model_config, checkpoint_path)
        if "fit" not in ckpt:
            raise DataError(checkpoint_path, "not a training checkpoint (no 'fit' state); delete it to retrain")
        state = ckpt["fit"]
        history = {key: list(state["history"][key]) for key in HISTORY_KEYS}
        best, bad_epochs, stopped_early = dict(state["best"]), state["bad_epochs"], state["stopped_early"]
        start_epoch = state["epoch"]
        disk.update(state.get("disk", {}))
        if not state["complete"]:  # the file records the writes before its own
            disk["bytes_written"] += checkpoint_path.stat().st_size
            disk["resume_file_bytes"] = max(disk["resume_file_bytes"], checkpoint_path.stat().st_size)
        if state["complete"]:
            load_kept(model, ckpt["model_state_dict"], checkpoint_keys, checkpoint_path)
            best_path.unlink(missing_ok=True)  # left by a kill between the last two writes
            log.info(epoch_log.loaded_line(config.name, start_epoch, best))
            return FitResult(history, best, start_epoch, stopped_early, resumed_from=start_epoch)
        if state.get("world_size", 1) != context.world_size:
            raise DataError(checkpoint_path, f"was written by {state.get('world_size', 1)} process(es), this run has "
                                             f"{context.world_size}: resume with --gpus {state.get('world_size', 1)}, "
                                             "or delete the file to retrain the stage")
        load_kept(model, ckpt["model_state_dict"], checkpoint_keys, checkpoint_path)
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        best_state = _cpu_state(kept_entries(saved_best(state), checkpoint_keys))
        set_rng_state(state["rank_rng"][context.rank] if state.get("rank_rng") else state["rng"])
        log.info(f"[{config.name}] resuming after epoch {start_epoch} from {checkpoint_path}")

    started = time.perf_counter()
    epoch_done = start_epoch
    for epoch in range(start_epoch, config.epochs):
        if bad_epochs >= config.patience:
            break
        tic = time.perf_counter()
        generator = torch.Generator(device).manual_seed(epoch_seed(config.seed, epoch, rank=context.rank))
        batches = train_batches(epoch)
        n_batches = len(batches) if hasattr(batches, "__len__") else None
        model.train()
        total, count = 0.0, 0
        bar = tqdm(batches, total=n_batches, desc=f"{config.name} epoch {epoch + 1}/{config.epochs}",
                   leave=False, disable=not (config.progress and context.is_main))
        for i, batch in enumerate(bar):
            optimizer.zero_grad(set_to_none=True)
            generator_state = generator.get_state()
            with autocast():
                loss = step_fn(batch, generator)
            if not torch.isfinite(loss):
                generator.set_state(generator_state)
                raise FloatingPointError(nonfinite_message(config.name, config.amp, config.amp_dtype, epoch, i, loss,
                                                           model, lambda: train_step(batch, generator), autocast))
            weight = 1.0
            if context.enabled:  # DDP averages the ranks' gradients: weight by each rank's share
                n_rank = len(batch["label"])
                weight = loss_weight(n_rank, context.all_sum([n_rank], device)[0], context.world_size)
            scaler.scale(loss * weight).backward()
            if config.grad_clip is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(params, config.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            if isinstance(scheduler, CosineAnnealingWarmRestarts):
                scheduler.step(epoch + (i + 1) / n_batches)
            total += loss.item() * weight / context.world_size  # the global batch's mean loss
            count += 1
            bar.set_postfix(loss=f"{total / count:.4f}")
        bar.close()
        total = context.all_sum([total], device)[0]
        lr = optimizer.param_groups[0]["lr"]
        model.eval()
        with torch.no_grad():
            metrics = {key: float(value) for key, value in evaluate().items()}
        if isinstance(scheduler, ReduceLROnPlateau):
            scheduler.step(metrics["val_loss"])
        elif scheduler is not None and not isinstance(scheduler, CosineAnnealingWarmRestarts):
            scheduler.step()

        row = {"train_loss": total / max(count, 1), "val_loss": metrics["val_loss"],
               "val_auc": metrics["val_auc"], "val_acc": metrics["val_acc"], "lr": lr}
        for key in HISTORY_KEYS:
            history[key].append(row[key])
        selectable = epoch + 1 >= min(config.min_epochs, config.epochs)
        improved = selectable and _score(metrics) > _score(best)
        if improved:
            best = {"epoch": epoch + 1, "val_auc": metrics["val_auc"], "val_loss": metrics["val_loss"],
                    "val_acc": metrics["val_acc"]}
            best_state = _cpu_state(kept_entries(model.state_dict(), checkpoint_keys))
            bad_epochs = 0
        elif selectable:
            bad_epochs += 1
        epoch_done = epoch + 1
        stopped_early = bad_epochs >= config.patience and epoch_done < config.epochs
        log.debug(epoch_log.epoch_line(config.name, epoch_done, config.epochs, row, time.perf_counter() - tic,
                                       improved))
        if epoch_log.reports_progress(epoch_done, config.epochs, config.log_every) and not stopped_early:
            log.info(epoch_log.progress_line(config.name, epoch_done, config.epochs, row, best,
                                             (time.perf_counter() - started) / (epoch_done - start_epoch)))
        snapshot(complete=False)
        if stopped_early:
            break

    load_kept(model, best_state, checkpoint_keys, checkpoint_path)
    snapshot(complete=True)
    context.barrier(f"{config.name} finished")  # every rank sees the finished file
    seconds = time.perf_counter() - started
    log.info(epoch_log.summary_line(config.name, epoch_done, config.epochs, best, seconds, stopped_early,
                                    config.patience, start_epoch))
    return FitResult(history, best, epoch_done, stopped_early, resumed_from=start_epoch, seconds=seconds)
