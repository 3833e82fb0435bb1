"""HU windowing, scaling and resizing of CT volumes, and train-time flips.

The recipe follows the Keras 3D CT example the seed builds on: clip HU to a lung-to-soft-
tissue window [-1000, 400], scale to [0, 1], resize with linear interpolation to a fixed
grid (H, W, D) = (128, 128, 64), channel first. Array layout: H, W are the in-plane axes
(canonical X, Y from ``utils.nifti_io``), D the slice axis (Z).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage


@dataclass(frozen=True)
class PreprocessConfig:
    """How a HU volume becomes a network input.

    Args:
        hu_min: lower end of the HU window (air, -1000 HU); values below are clipped.
        hu_max: upper end (400 HU: soft tissue and contrast kept, bone saturates).
        target_shape: output (H, W, D) in voxels.
    """

    hu_min: float = -1000.0
    hu_max: float = 400.0
    target_shape: tuple[int, int, int] = (128, 128, 64)

    def __post_init__(self):
        if not self.hu_min < self.hu_max:
            raise ValueError(f"hu_min ({self.hu_min}) must be below hu_max ({self.hu_max})")
        shape = tuple(self.target_shape)
        if len(shape) != 3 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in shape):
            raise ValueError(f"target_shape must be three positive integers, got {self.target_shape}")
        object.__setattr__(self, "target_shape", tuple(int(s) for s in shape))

    def key(self) -> str:
        """Short stable name of the settings, e.g. ``'hu-1000_400_128x128x64'`` (cache folder)."""
        h, w, d = self.target_shape
        return f"hu{self.hu_min:g}_{self.hu_max:g}_{h}x{w}x{d}"

    def as_dict(self) -> dict:
        """Plain data (target_shape as a list), for run folders and checkpoints;
        ``PreprocessConfig(**d)`` restores the config."""
        return {"hu_min": self.hu_min, "hu_max": self.hu_max, "target_shape": list(self.target_shape)}


def preprocess(hu: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Window, scale and resize an (X, Y, Z) HU volume.

    Returns:
        (1, H, W, D) float32 in [0, 1], (H, W, D) = ``config.target_shape`` exactly.
    """
    hu = np.asarray(hu, dtype=np.float32)
    if hu.ndim != 3:
        raise ValueError(f"preprocess expects an (X, Y, Z) volume, got shape {hu.shape}")
    scaled = (np.clip(hu, config.hu_min, config.hu_max) - config.hu_min) / (config.hu_max - config.hu_min)
    factors = [t / s for t, s in zip(config.target_shape, scaled.shape)]
    # zoom's output size is round(s * t / s) = t per axis; passing the output array makes
    # scipy check that, so an off-by-one could never slip through silently.
    resized = np.empty(config.target_shape, dtype=np.float32)  # (H, W, D)
    ndimage.zoom(scaled, factors, output=resized, order=1)
    np.clip(resized, 0.0, 1.0, out=resized)  # linear interpolation stays in range up to rounding
    return resized[None]  # (1, H, W, D)


def sample_flips(rng: np.random.Generator, p: float = 0.5) -> tuple[bool, bool]:
    """Draw independent (flip H, flip W) decisions, each true with probability ``p``."""
    flip_h, flip_w = rng.random(2) < p
    return bool(flip_h), bool(flip_w)


def apply_flips(volume: np.ndarray | torch.Tensor, flips: tuple[bool, bool]):
    """Flip a (..., H, W, D) array or tensor along H and/or W; returns a contiguous copy."""
    dims = tuple(axis for axis, flip in zip((-3, -2), flips) if flip)
    if isinstance(volume, torch.Tensor):
        return torch.flip(volume, dims) if dims else volume.clone()
    return np.ascontiguousarray(np.flip(volume, dims)) if dims else volume.copy()


def random_flip(volume: np.ndarray | torch.Tensor, rng: np.random.Generator, p: float = 0.5):
    """Train-time augmentation: flip (..., H, W, D) along H and W independently with prob. ``p``.

    Left-right and anterior-posterior mirror images of a chest CT keep its label; the
    slice axis D is never flipped.
    """
    return apply_flips(volume, sample_flips(rng, p))
