"""PyTorch dataset and loader over cached, preprocessed CT volumes.

Augmentation is a pure function of (seed, epoch, index): item ``index`` in epoch ``epoch``
draws its flips from ``np.random.default_rng([seed, epoch, index])``, so a run is
reproducible regardless of worker count or the order items are fetched in. Call
``set_epoch`` before each epoch (DataLoader workers copy the dataset when an iterator is
created, so this works with ``num_workers > 0`` unless ``persistent_workers`` is set).
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from utils.cache import VolumeCache
from utils.discovery import ScanRecord
from utils.preprocessing import apply_flips, sample_flips


class CTDataset(Dataset):
    """Labelled CT volumes for classification.

    Args:
        records: scans to serve, in order.
        cache: preprocessed-volume cache giving the (1, H, W, D) network input.
        augment: apply random H / W flips (training only).
        seed: augmentation seed.
        hires_cache: optional second cache (e.g. (256, 256, 64) for ``roi_scale = 2``);
            its volume gets exactly the same flips as ``image``.

    Items are dicts: ``image`` (1, H, W, D) float32, ``label`` int64 scalar, ``index`` int,
    ``path`` str, and ``image_hires`` (1, H', W', D') float32 when ``hires_cache`` is given.
    """

    def __init__(self, records: list[ScanRecord], cache: VolumeCache, augment: bool = False,
                 seed: int = 0, hires_cache: VolumeCache | None = None):
        self.records = list(records)
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

    def __getitem__(self, index: int) -> dict:
        index = range(len(self.records))[index]  # negative indices -> 0..N-1, seeds must be >= 0
        record = self.records[index]
        flips = (sample_flips(np.random.default_rng([self.seed, self.epoch, index]))
                 if self.augment else (False, False))
        item = {
            "image": torch.from_numpy(apply_flips(self.cache.get(record.path), flips)),  # (1, H, W, D)
            "label": torch.tensor(record.label, dtype=torch.int64),
            "index": index,
            "path": str(record.path),
        }
        if self.hires_cache is not None:
            item["image_hires"] = torch.from_numpy(apply_flips(self.hires_cache.get(record.path), flips))
        return item


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0,
                num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A DataLoader whose shuffling order is fixed by ``seed`` (own ``torch.Generator``)."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      generator=generator, pin_memory=pin_memory)
