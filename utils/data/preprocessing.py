"""HU windowing, scaling, anti-aliased resampling of CT volumes, and train-time flips.

The recipe follows the Keras 3D CT example the seed builds on: clip HU to a lung-to-soft-
tissue window [-1000, 400], scale to [0, 1], resize with linear interpolation to a fixed
grid (H, W, D) = (128, 128, 64), channel first. Array layout: H, W are the in-plane axes
(canonical X, Y from ``utils.data.nifti_io``: H runs Left -> Right, W Posterior -> Anterior), D
the slice axis (Z, Inferior -> Superior).

Deviations from the seed (``PreprocessConfig`` fields, so part of every cache key):

- ``anti_alias`` (default on): before linear interpolation, every axis that shrinks by a
  zoom factor z < 1 is smoothed with a Gaussian of sigma = (1/z - 1) / 2 voxels (the rule of
  ``skimage.transform.resize`` and MONAI's ``Resize(anti_aliasing=True)``). Without it,
  512 -> 128 in-plane keeps every 4th voxel's neighbourhood and aliases fine texture
  (ground-glass opacities) into noise.
- ``target_spacing`` (mm, default None): None stretches the whole scan to
  ``target_shape`` (the seed's behaviour; the voxel size is ignored, so a body's size in
  voxels depends on the scanner's field of view). Given, the scan is resampled to that
  voxel size and centre-cropped or padded with air (0 after scaling) to ``target_shape``,
  so one voxel is the same physical size in every scan; this needs the scan's spacing
  (``preprocess(..., spacing=)``; ``utils.data.cache`` passes the loader's).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from scipy import ndimage

LR_AXIS = -3  # H: canonical X, patient Left -> Right (utils.data.nifti_io); mirrored in training (heart to the right)
AP_AXIS = -2  # W: canonical Y, Posterior -> Anterior; never flipped (spine on top is no supine CT)


@dataclass(frozen=True)
class PreprocessConfig:
    """How a HU volume becomes a network input.

    Args:
        hu_min: lower end of the HU window (air, -1000 HU); values below are clipped.
        hu_max: upper end (400 HU: soft tissue and contrast kept, bone saturates).
        target_shape: output (H, W, D) in voxels.
        anti_alias: Gaussian prefilter (sigma = (1/zoom - 1) / 2 voxels) along every axis
            that is downsampled, before linear interpolation.
        target_spacing: output voxel size (mm) along H, W, D, or None to stretch the scan
            to ``target_shape`` whatever its voxel size (see the module docstring).
    """

    hu_min: float = -1000.0
    hu_max: float = 400.0
    target_shape: tuple[int, int, int] = (128, 128, 64)
    anti_alias: bool = True
    target_spacing: Optional[tuple[float, float, float]] = None

    def __post_init__(self):
        if not self.hu_min < self.hu_max:
            raise ValueError(f"hu_min ({self.hu_min}) must be below hu_max ({self.hu_max})")
        shape = tuple(self.target_shape)
        if len(shape) != 3 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in shape):
            raise ValueError(f"target_shape must be three positive integers, got {self.target_shape}")
        object.__setattr__(self, "target_shape", tuple(int(s) for s in shape))
        object.__setattr__(self, "anti_alias", bool(self.anti_alias))
        if self.target_spacing is not None:
            spacing = tuple(self.target_spacing)
            if len(spacing) != 3 or not all(isinstance(s, (int, float, np.number)) and np.isfinite(s) and s > 0
                                            for s in spacing):
                raise ValueError(f"target_spacing must be None or three positive sizes in mm, "
                                 f"got {self.target_spacing}")
            object.__setattr__(self, "target_spacing", tuple(float(s) for s in spacing))

    def key(self) -> str:
        """Short stable name of the settings (cache folder), e.g. ``'hu-1000_400_128x128x64_aa'``.

        Without anti-aliasing and target spacing it is the name the seed's settings always had
        (``'hu-1000_400_128x128x64'``), so existing caches of those settings stay valid.
        """
        h, w, d = self.target_shape
        key = f"hu{self.hu_min:g}_{self.hu_max:g}_{h}x{w}x{d}"
        if self.anti_alias:
            key += "_aa"
        if self.target_spacing is not None:
            key += "_sp" + "x".join(f"{s:g}" for s in self.target_spacing)
        return key

    def as_dict(self) -> dict:
        """Plain data (tuples as lists), for run folders and checkpoints;
        ``PreprocessConfig(**d)`` or :meth:`from_dict` restores the config."""
        return {"hu_min": self.hu_min, "hu_max": self.hu_max, "target_shape": list(self.target_shape),
                "anti_alias": self.anti_alias,
                "target_spacing": None if self.target_spacing is None else list(self.target_spacing)}

    @classmethod
    def from_dict(cls, data: dict) -> "PreprocessConfig":
        """Inverse of :meth:`as_dict`; a dict written before ``anti_alias`` existed (no such
        key) means the seed's resizing without anti-aliasing, as that model was trained."""
        return cls(**{"anti_alias": False, **data})


def anti_alias_sigma(zoom: Sequence[float]) -> tuple[float, ...]:
    """Gaussian sigma (voxels) per axis for a resampling by ``zoom`` (output / input size):
    ``max(0, (1/zoom - 1) / 2)``, i.e. 0 for axes that are kept or upsampled."""
    return tuple(max(0.0, (1.0 / float(z) - 1.0) / 2.0) for z in zoom)


def _prefilter(volume: np.ndarray, zoom: Sequence[float]) -> np.ndarray:
    sigma = anti_alias_sigma(zoom)
    if not any(s > 0 for s in sigma):
        return volume
    return ndimage.gaussian_filter(volume, sigma, mode="nearest").astype(np.float32, copy=False)


def _resample_to_spacing(volume: np.ndarray, spacing: Sequence[float], config: PreprocessConfig) -> np.ndarray:
    """(X, Y, Z) -> ``target_shape`` at ``target_spacing``, centred on the scan's centre;
    outside the scan: 0 (air after scaling)."""
    source = np.asarray(volume.shape, dtype=np.float64)
    step = np.asarray(config.target_spacing, dtype=np.float64) / np.asarray(spacing, dtype=np.float64)  # in voxels
    target = np.asarray(config.target_shape, dtype=np.float64)
    if config.anti_alias:
        volume = _prefilter(volume, 1.0 / step)
    # output voxel j has its centre at input coordinate (j + 0.5 - T/2) * step + S/2 - 0.5
    # (input voxel i covers [i - 0.5, i + 0.5]; both grids share their centre)
    offset = (0.5 - target / 2) * step + source / 2 - 0.5
    out = np.empty(config.target_shape, dtype=np.float32)
    ndimage.affine_transform(volume, step, offset=offset, output=out, order=1, mode="nearest")
    for axis in range(3):  # air outside the scan's extent [-0.5, S - 0.5]
        coord = np.arange(config.target_shape[axis]) * step[axis] + offset[axis]
        outside = (coord < -0.5) | (coord > source[axis] - 0.5)
        index = [slice(None)] * 3
        index[axis] = outside
        out[tuple(index)] = 0.0
    return out


def preprocess(hu: np.ndarray, config: PreprocessConfig,
               spacing: Optional[Sequence[float]] = None) -> np.ndarray:
    """Window, scale and resample an (X, Y, Z) HU volume.

    Args:
        hu: (X, Y, Z) Hounsfield units.
        config: the settings.
        spacing: voxel size (mm) of ``hu`` along X, Y, Z; needed only when
            ``config.target_spacing`` is set.

    Returns:
        (1, H, W, D) float32 in [0, 1], (H, W, D) = ``config.target_shape`` exactly.
    """
    hu = np.asarray(hu, dtype=np.float32)
    if hu.ndim != 3:
        raise ValueError(f"preprocess expects an (X, Y, Z) volume, got shape {hu.shape}")
    scaled = (np.clip(hu, config.hu_min, config.hu_max) - config.hu_min) / (config.hu_max - config.hu_min)
    if config.target_spacing is not None:
        if spacing is None or len(spacing) != 3 or not all(float(s) > 0 for s in spacing):
            raise ValueError(f"target_spacing {config.target_spacing} needs the scan's voxel spacing "
                             f"(three positive mm values), got {spacing}")
        resized = _resample_to_spacing(scaled, spacing, config)
    else:
        factors = [t / s for t, s in zip(config.target_shape, scaled.shape)]
        if config.anti_alias:
            scaled = _prefilter(scaled, factors)
        # zoom's output size is round(s * t / s) = t per axis; passing the output array makes
        # scipy check that, so an off-by-one could never slip through silently.
        resized = np.empty(config.target_shape, dtype=np.float32)  # (H, W, D)
        ndimage.zoom(scaled, factors, output=resized, order=1)
    np.clip(resized, 0.0, 1.0, out=resized)  # linear interpolation stays in range up to rounding
    return resized[None]  # (1, H, W, D)


def sample_flips(rng: np.random.Generator, p: float = 0.5) -> tuple[bool, bool]:
    """Draw the train-time flips as ``(flip H, flip W)``: H (left-right) with probability
    ``p``; W (anterior-posterior) never, since a supine CT is never upside down. A left-right
    mirror is not anatomically plausible (the heart moves to the patient's right, as in the rare
    situs inversus); it is kept as a label-preserving augmentation for a bilateral disease."""
    flip_lr = rng.random() < p
    return bool(flip_lr), False


def apply_flips(volume: np.ndarray | torch.Tensor, flips: tuple[bool, bool]):
    """Flip a (..., H, W, D) array or tensor along H and/or W; returns a contiguous copy."""
    dims = tuple(axis for axis, flip in zip((-3, -2), flips) if flip)
    if isinstance(volume, torch.Tensor):
        return torch.flip(volume, dims) if dims else volume.clone()
    return np.ascontiguousarray(np.flip(volume, dims)) if dims else volume.copy()
