"""PyTorch dataset over cached, preprocessed CT volumes (the loaders are in ``utils.training``).

Augmentation is a pure function of (seed, epoch, index): item ``index`` in epoch ``epoch``
draws its flip (and optional intensity jitter) from ``np.random.default_rng([seed, epoch,
index])``, so a run is
reproducible regardless of worker count or the order items are fetched in. Call
``set_epoch`` before each epoch (DataLoader workers copy the dataset when an iterator is
created, so this works with ``num_workers > 0`` unless ``persistent_workers`` is set).

The only flip is a left-right mirror (along H, canonical X) with probability 0.5: a label-
preserving augmentation for a bilateral disease, though a mirrored chest is not a real one (the
heart moves to the patient's right); never anterior-posterior (W: a supine CT never shows the
spine on top) nor along the slice axis D. ``intensity_jitter`` j > 0 (off by default) also rescales the
intensities as ``clip(x * (1 + a) + b, 0, 1)`` with a, b uniform in [-j, j].
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from utils.data.cache import VolumeCache
from utils.data.discovery import ScanRecord
from utils.data.preprocessing import apply_flips, sample_flips


class CTDataset(Dataset):
    """Labelled CT volumes for classification.

    Args:
        records: scans to serve, in order.
        cache: preprocessed-volume cache giving the (1, H, W, D) network input.
        augment: apply random left-right flips (along H) (training only).
        seed: augmentation seed.
        hires_cache: optional second cache (e.g. (256, 256, 64) for ``roi_scale = 2``);
            its volume gets exactly the same flips (and jitter) as ``image``.
        intensity_jitter: j >= 0; with ``augment``, intensities become
            ``clip(x * (1 + a) + b, 0, 1)``, a and b uniform in [-j, j] per item (0: off).

    Items are dicts: ``image`` (1, H, W, D) float32, ``label`` int64 scalar, ``index`` int,
    ``path`` str, and ``image_hires`` (1, H', W', D') float32 when ``hires_cache`` is given.
    """

    def __init__(self, records: list[ScanRecord], cache: VolumeCache, augment: bool = False,
                 seed: int = 0, hires_cache: VolumeCache | None = None, intensity_jitter: float = 0.0):
        if not 0.0 <= intensity_jitter < 1.0:
            raise ValueError(f"intensity_jitter must be in [0, 1), got {intensity_jitter}")
        self.records = list(records)
        self.intensity_jitter = float(intensity_jitter)
        self.cache = cache
        self.augment = augment
        self.seed = seed
        self.hires_cache = hires_cache
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draw of ``epoch``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> np.ndarray:
        """(N,) int64 labels, e.g. for class weights."""
        return np.array([r.label for r in self.records], dtype=np.int64)

    def augmentation(self, index: int) -> tuple[tuple[bool, bool], float, float]:
        """``(flips, scale, shift)`` of item ``index`` in the current epoch (identity when
        ``augment`` is off): a pure function of (seed, epoch, index)."""
        if not self.augment:
            return (False, False), 1.0, 0.0
        rng = np.random.default_rng([self.seed, self.epoch, index])
        flips = sample_flips(rng)  # left-right only
        if self.intensity_jitter > 0:
            a, b = rng.uniform(-self.intensity_jitter, self.intensity_jitter, size=2)
            return flips, 1.0 + float(a), float(b)
        return flips, 1.0, 0.0

    @staticmethod
    def _apply(volume: np.ndarray, augmentation: tuple[tuple[bool, bool], float, float]) -> torch.Tensor:
        flips, scale, shift = augmentation
        out = apply_flips(volume, flips)  # a copy: the cached array is never modified
        if scale != 1.0 or shift != 0.0:
            out = np.clip(out * np.float32(scale) + np.float32(shift), 0.0, 1.0).astype(np.float32, copy=False)
        return torch.from_numpy(out)

    def __getitem__(self, index: int) -> dict:
        index = range(len(self.records))[index]  # negative indices -> 0..N-1, seeds must be >= 0
        record = self.records[index]
        augmentation = self.augmentation(index)
        item = {
            "image": self._apply(self.cache.get(record.path), augmentation),  # (1, H, W, D)
            "label": torch.tensor(record.label, dtype=torch.int64),
            "index": index,
            "path": str(record.path),
        }
        if self.hires_cache is not None:
            item["image_hires"] = self._apply(self.hires_cache.get(record.path), augmentation)
        return item


class EpochSubset(Subset):
    """A Subset that forwards ``set_epoch`` (augmentation draw) and exposes ``labels``."""

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self.dataset.labels)[self.indices]
