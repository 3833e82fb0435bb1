"""A cheap check that phase 2 can learn at all: the denoiser overfits one batch.

The classic first test of a training setup (Karpathy's "overfit one batch"): with the data, the
noise and the timesteps held fixed, a network that can represent its target drives the loss far
below where it started within a few dozen steps; one that cannot (a detached graph, a target the
inputs cannot reach, a learning rate of zero) does not. Here the target is the model's real
one, the y0-prediction loss of ``DiffMIC3D.diffusion_loss`` (MSE on y0 plus 0.1 x CE, one
timestep per grid point), on the scans' own DCG guidance, training what phase 2 trains (the
prior generator and the denoiser), on a COPY of the model: the caller's model is not changed.

It says nothing about generalisation (the noise never changes, the batch is one), only that the
gradient path from the loss to the denoiser's weights works.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from models.diffmic3d import DiffMIC3D


@dataclass(frozen=True)
class OverfitResult:
    """The loss before every step and after the last (``steps + 1`` values)."""

    losses: tuple[float, ...]

    @property
    def ratio(self) -> float:
        """Final loss over the first."""
        return self.losses[-1] / self.losses[0]

    def passed(self, max_ratio: float = 0.5) -> bool:
        """Whether the loss fell to at most ``max_ratio`` of its start."""
        return self.ratio <= max_ratio

    def report(self, max_ratio: float = 0.5) -> str:
        """One line, e.g. ``'one batch, 40 steps: loss 0.2631 -> 0.0412 (16% of the start): learned'``."""
        verdict = "learned" if self.passed(max_ratio) else f"NOT learned (needs <= {100 * max_ratio:.0f}%)"
        return (f"one batch, {len(self.losses) - 1} steps: loss {self.losses[0]:.4f} -> {self.losses[-1]:.4f} "
                f"({100 * self.ratio:.0f}% of the start): {verdict}")


def class_balanced_batch(dataset: Dataset, size: int = 2) -> dict:
    """A collated batch of ``size`` items of ``dataset`` (with ``labels``), taking the first
    unused item of each class in turn (class 0, 1, ..., 0, ...), so a batch of 2 from a
    class-sorted split holds both classes, not two of the first.

    Raises:
        ValueError: the dataset has fewer than ``size`` items.
    """
    labels = np.asarray(dataset.labels)
    if not 1 <= size <= len(labels):
        raise ValueError(f"size must be in [1, {len(labels)}] (the dataset's length), got {size}")
    queues = [list(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    rows = []
    while len(rows) < size:
        for queue in queues:
            if queue and len(rows) < size:
                rows.append(int(queue.pop(0)))
    return default_collate([dataset[i] for i in rows])


def overfit_one_batch(model: DiffMIC3D, scan: torch.Tensor, labels: torch.Tensor, steps: int = 40,
                      lr: float = 3e-3, seed: int = 0, x_hires: Optional[torch.Tensor] = None) -> OverfitResult:
    """Train a copy of ``model``'s prior generator and denoiser on one batch with fixed noise.

    Args:
        model: a DiffMIC-3D (trained or not); its DCG gives the guidance once, in eval mode.
        scan: (B, 1, H, W, D) the batch; labels: (B,) its classes.
        steps: Adam steps; lr: their learning rate.
        seed: seed of the generator drawing the timesteps and noise, re-seeded before every
            step so each step sees the same noisy targets.
        x_hires: (B, 1, sH, sW, D) when the model's ``roi_scale`` > 1.

    Returns:
        the :class:`OverfitResult` (the loss before each step and after the last).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    work = copy.deepcopy(model).eval()
    with torch.no_grad():
        guidance = work.guidance(scan, x_hires)
    params = [*work.prior_generator.parameters(), *work.denoiser.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    work.prior_generator.train()
    work.denoiser.train()
    losses = []
    for step in range(steps + 1):
        generator = torch.Generator(scan.device).manual_seed(seed)
        loss = work.diffusion_loss(scan, guidance, labels, generator=generator)["loss"]
        losses.append(float(loss.item()))
        if step < steps:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return OverfitResult(tuple(losses))
