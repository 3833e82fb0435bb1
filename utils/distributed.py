"""Several GPUs (or CPU processes): one process per device with ``torch.distributed``.

A run started by ``torchrun`` (or ``python -m utils.run --gpus N``, which starts ``torchrun``
for you: ``utils.launch``) has one process per device; each calls :func:`init_from_env`
and passes the :class:`DistContext` it returns down to every stage, explicitly. A run without
``torchrun`` gets :data:`SINGLE` and behaves exactly as before.

What is sharded, and how (README, "Several GPUs"):

* Training batches: ``batch_size`` is the GLOBAL batch, the one the optimiser sees, so the
  number of optimiser steps, the learning-rate schedule and the learning rate are those of one
  device (rule: the learning rate belongs to the global batch; raise both together if you
  raise the batch). Each epoch's order is still the pure function of (seed, epoch) of
  ``utils.training.loop.make_epoch_loader``, drawn the way its one-process DataLoader draws it
  (:class:`RankBatchSampler`); :func:`global_batches` cuts it into the same batches as one
  process would, and each rank takes a contiguous part of every batch
  (:func:`rank_part`, sizes differing by at most one). DDP averages the gradients and each
  rank's loss is weighted by ``world * n_rank / n_batch`` (:func:`loss_weight`), so a step is
  the step of the whole batch.
* BatchNorm: synchronised (``SyncBatchNorm``) on CUDA; CPU processes (gloo, the tests)
  normalise each rank's part alone, as PyTorch's SyncBatchNorm has no CPU kernel.
* Evaluation and the guidance cache: scans dealt round-robin (:meth:`DistContext.shard`),
  results gathered back into scan order (:meth:`DistContext.gather_in_order`), so every rank
  holds the whole split's predictions, computes the same metrics and takes the same
  early-stopping decision.
* Independent fits: out-of-fold DCG ``k`` is trained by rank ``k mod world`` alone.
* The outside world: rank 0 writes checkpoints, logs, figures, CSVs and provenance; the other
  ranks log warnings only, prefixed with their rank.

Failure: every collective has the process group's timeout (``timeout_s``); a barrier that a
rank does not reach raises :class:`RankTimeout` naming the ranks (gloo's monitored barrier)
instead of hanging, and ``torchrun`` ends the job when any rank dies, naming it.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

from utils.log import ROOT, get_logger

DEFAULT_TIMEOUT_S = 3600.0  # a barrier may wait for another rank's out-of-fold DCG
TIMEOUT_ENV = "MEDISCOPE_DIST_TIMEOUT"

log = get_logger(__name__)


class RankTimeout(RuntimeError):
    """A collective did not complete within the process group's timeout."""


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job: ``rank`` of ``world_size`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> list[int]:
        """This rank's items of ``n``, dealt round-robin: ``rank, rank + world, ...``."""
        return list(range(self.rank, n, self.world_size))

    def barrier(self, where: str) -> None:
        """Wait for every rank; :class:`RankTimeout` naming the missing ranks after ``timeout_s``."""
        if not self.enabled:
            return
        try:
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=dt.timedelta(seconds=self.timeout_s), wait_all_ranks=True)
            else:
                dist.barrier(device_ids=[self.local_rank])
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RankTimeout(f"rank {self.rank}: not every rank reached '{where}' within {self.timeout_s:g} s "
                              f"({first}); see the other ranks' errors above") from err

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def all_sum(self, values: Sequence[float], device: torch.device) -> list[float]:
        """Element-wise sum of ``values`` over the ranks (float64)."""
        if not self.enabled:
            return [float(v) for v in values]
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def gather_in_order(self, indices: Sequence[int], rows: Any) -> tuple[list[int], list[Any]]:
        """Every rank's ``(indices, rows)`` (``rows[i]`` belongs to scan ``indices[i]``), merged
        and sorted by index: (all indices, their rows). One process: returned sorted as is."""
        parts = self.all_gather((list(map(int, indices)), list(rows)))
        merged = sorted(((i, r) for idx, rs in parts for i, r in zip(idx, rs)), key=lambda pair: pair[0])
        return [i for i, _ in merged], [r for _, r in merged]


SINGLE = DistContext()


def world_from_env() -> int:
    """``WORLD_SIZE`` as set by ``torchrun`` (1 outside it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device: torch.device, timeout_s: Optional[float] = None) -> tuple[DistContext, torch.device]:
    """Join the process group ``torchrun`` describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``/``PORT``): NCCL on CUDA (device ``cuda:LOCAL_RANK``), gloo on the CPU.
    Outside ``torchrun``: (:data:`SINGLE`, ``device``). ``timeout_s`` (default
    ``$MEDISCOPE_DIST_TIMEOUT`` or :data:`DEFAULT_TIMEOUT_S`) bounds every collective.
    Non-zero ranks then log warnings only, prefixed ``[rank r]``."""
    world = world_from_env()
    if world <= 1:
        return SINGLE, device
    timeout_s = float(timeout_s if timeout_s is not None else os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"rank {rank}: LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA "
                             "device(s); start at most that many processes per machine")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=dt.timedelta(seconds=timeout_s), rank=rank, world_size=world)
    context = DistContext(rank=rank, world_size=world, local_rank=local_rank, timeout_s=timeout_s)
    if not context.is_main:
        root = logging.getLogger(ROOT)
        root.setLevel(logging.WARNING)
        for handler in root.handlers:
            handler.setFormatter(logging.Formatter(f"[rank {rank}] %(message)s"))
    return context, device


def shutdown(context: DistContext) -> None:
    """Leave the process group (after the last collective)."""
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()


# -- training batches ----------------------------------------------------------------------


def global_batches(order: Sequence[int], batch_size: int, world_size: int = 1) -> list[list[int]]:
    """``order`` (one epoch's shuffled indices) cut into the optimiser's batches of
    ``batch_size``: a last batch of a single volume is dropped (BatchNorm cannot train on it),
    and with several ranks so is a last batch with fewer volumes than ranks (a rank would have
    none)."""
    batches = [list(order[i:i + batch_size]) for i in range(0, len(order), batch_size)]
    last = len(batches[-1]) if batches else batch_size
    if last < batch_size and (last == 1 or last < world_size):
        batches.pop()
    return batches


def steps_per_epoch(n: int, batch_size: int, world_size: int = 1) -> int:
    """Optimiser steps per epoch over ``n`` volumes (:func:`global_batches`)."""
    full, last = divmod(n, batch_size)
    return full + (1 if last > 1 and last >= world_size else 0)


def rank_part(batch: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s contiguous part of a global batch (sizes differ by at most one)."""
    bounds = np.linspace(0, len(batch), world_size + 1).round().astype(int)
    return list(batch[bounds[rank]:bounds[rank + 1]])


def check_batch_size(batch_size: int, world_size: int) -> None:
    """Every rank needs a part of every batch."""
    if batch_size < world_size:
        raise ValueError(f"batch_size={batch_size} is the global batch and must be >= the number of processes "
                         f"({world_size}); use --set batch_size={world_size} or more, or fewer GPUs")


class RankBatchSampler(Sampler[list[int]]):
    """This rank's part of each global batch of one epoch (a DataLoader ``batch_sampler``).

    The epoch's order is drawn exactly as ``DataLoader(shuffle=True, generator=generator)``
    draws it, lazily, at the first batch: ``torch.randperm(n, generator=generator)``. Given
    the same generator as the loader (``make_epoch_loader`` passes it to both), every draw the
    loader makes from it first (one per ``iter``: e.g. ``fit``'s progress bar) happens in the
    same sequence, so the ranks split the very batches one process visits.
    """

    def __init__(self, n: int, batch_size: int, context: DistContext, generator: torch.Generator):
        check_batch_size(batch_size, context.world_size)
        self.n, self.batch_size, self.context, self.generator = n, batch_size, context, generator

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.n, generator=self.generator).tolist()
        for batch in global_batches(order, self.batch_size, self.context.world_size):
            yield rank_part(batch, self.context.rank, self.context.world_size)

    def __len__(self) -> int:
        return steps_per_epoch(self.n, self.batch_size, self.context.world_size)


def loss_weight(n_rank: int, n_batch: int, world_size: int) -> float:
    """What a rank's mean loss over its ``n_rank`` volumes is multiplied by so that DDP's
    gradient average over ``world_size`` ranks is the gradient of the global batch's mean."""
    return world_size * n_rank / n_batch


class _StepModule(nn.Module):
    """``model`` with ``train_step`` as its forward, so DDP sees (and all-reduces) its gradients."""

    def __init__(self, model: nn.Module, train_step):
        super().__init__()
        self.model = model
        self.train_step = train_step

    def forward(self, batch, generator):
        return self.train_step(batch, generator)


def data_parallel_step(model: nn.Module, train_step, context: DistContext, device: torch.device,
                       find_unused: bool = False):
    """``train_step`` run through ``DistributedDataParallel`` over ``model`` (BatchNorm made
    synchronised on CUDA); one process: ``train_step`` itself. ``find_unused``: some parameters
    that require gradients may get none in a step (phase 1: the rest of the DiffMIC-3D, and
    the curriculum's branches)."""
    if not context.enabled:
        return train_step
    if device.type == "cuda":
        nn.SyncBatchNorm.convert_sync_batchnorm(model)  # replaces the BatchNorm children in place
    return nn.parallel.DistributedDataParallel(_StepModule(model, train_step), find_unused_parameters=find_unused)


def describe(context: DistContext, batch_size: int, device: torch.device) -> dict:
    """Plain data for ``train_config.json`` / provenance: world size, batches, the lr rule."""
    parts = [len(rank_part(range(batch_size), r, context.world_size)) for r in range(context.world_size)]
    return {"world_size": context.world_size, "global_batch": batch_size, "per_rank_batch": parts,
            "backend": dist.get_backend() if context.enabled else None,
            "sync_batchnorm": context.enabled and device.type == "cuda",
            "lr_rule": "the learning rate belongs to the global batch (batch_size); unchanged by the world size"}
