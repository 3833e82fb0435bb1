"""Precise BatchNorm statistics (Wu & Johnson, "Rethinking Batch in BatchNorm", 2021).

With the batches a 3D CT volume allows (4), the running statistics BatchNorm keeps during
training are poor estimates of the population statistics eval mode needs: validation losses
of 9-31 were measured while the training loss was ~0.8. :func:`recompute_batchnorm_stats`
replaces them by the average over a pass of the training split with the current weights, so
that a model evaluated (or checkpointed) right after carries statistics that match its
weights. It is a deterministic function of the weights and the batches.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

BN_STATS_STREAM = 3  # utils.training.loop.epoch_seed stream of the batch order of the statistics pass


def bn_stats_loader(dataset: Dataset, batch_size: int, seed: int, num_workers: int = 0) -> DataLoader:
    """The batches BatchNorm statistics are recomputed over: the whole split in a SHUFFLED
    order fixed by ``seed`` (the same order at every evaluation, so the statistics stay a
    deterministic function of the weights).

    Shuffled because the splits are stored sorted by class (``splits.csv``): an unshuffled
    loader gives single-class batches, whose averaged per-batch variances leave out the
    between-class variance, and eval mode then normalises with statistics that match no
    (shuffled, mixed) training batch. A last batch of one volume is dropped, as in training.
    """
    from utils.training.loop import epoch_seed  # utils.training.loop imports this module's users

    generator = torch.Generator().manual_seed(epoch_seed(seed, 0, BN_STATS_STREAM))
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator, num_workers=num_workers,
                      drop_last=len(dataset) % batch_size == 1)


@torch.no_grad()
def recompute_batchnorm_stats(model: nn.Module, batches: Iterable[Mapping],
                              forward: Callable[[Mapping], object]) -> int:
    """Set every BatchNorm's running mean / variance of ``model`` to the average over ``batches``.

    Runs ``forward(batch)`` (which must call ``model``) in train mode without gradients for
    each batch, with each BatchNorm's momentum set to None (a cumulative average), then
    restores momentum and the model's mode. Returns the number of BatchNorm layers updated
    (0: nothing to do, ``batches`` is not read).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        for batch in batches:
            forward(batch)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    return len(norms)
