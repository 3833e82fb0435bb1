"""Synthetic chest-CT phantoms written as MosMedData-style NIfTI files (the embedded default dataset).

Every scan is an int16 Hounsfield-unit volume laid out like a MosMedData file: array axes
(X, Y, Z) = (columns, rows, slices) in DICOM LPS order, so the affine is
``diag(-sx, -sy, sz)`` plus an offset (a negative x and y axis), 30-50 slices of ~8 mm,
a pixel spacing of 0.58-0.92 mm at 512 x 512 (scaled by 512 / size at smaller sizes, so
the field of view stays 300-470 mm) and -2048 outside the circular reconstruction field.
The same loader (``utils.data.nifti_io.load_nifti``) therefore serves phantoms and real data.

Anatomy, per scan with its own random patient: body ellipse with subcutaneous fat and
muscle, two lungs whose outline follows the apex-to-base profile and the diaphragm domes,
heart and mediastinum, a vertebra with canal and spinous process, ribs, the scanner
table, a branching vascular tree whose calibre (and so partial-volume brightness) falls
towards the periphery, fine lung texture and correlated Gaussian scanner noise.

Lesions (categories 1..4) are ground-glass opacities (-700..-300 HU) and consolidation
(-100..+50 HU): multifocal, drawn mostly in peripheral and posterior (dependent) lung,
shaped as ellipsoids thresholded with smoothed noise (patchy, with a sharp edge) and
confined to the lungs. Category 1 (and the binary ``CT-23`` class) takes its foci from a
``Difficulty``; categories 2..4 involve 25-50 %, 50-75 % and > 75 % of the lung volume,
as MosMedData defines CT-2..CT-4.

Confounders appear in both classes so that global HU statistics do not give the label
away. The main one is lesion-volume matched: a normal scan draws foci exactly as an
abnormal one does (a dense-volume budget with one distribution for both classes) and lays
their density out as a smooth dependent band along the posterior lung (like dependent
atelectasis), where an abnormal scan keeps most of it as focal lesions. The whole-volume
histogram is then the same in distribution and only the shape (focal vs a posterior
gradient) tells the classes apart. Further confounders: a posterior dependent-density
gradient of random strength, lung mean attenuation -920..-800 HU before partial volume
(inspiration level, which also scales lung volume), vessel count and calibre, body fat,
patient size and position, and noise level.

Calibration (160 scans at size 128, 100 train / 60 test, preprocessed to 64 x 64 x 32; a
plain 3D CNN with BatchNorm and global average pooling; histogram = 5-fold logistic
regression on 32 HU bins): easy CNN ~0.87, default ~0.73-0.80 (AUC 0.84-0.89), hard
~0.6; the histogram baseline stays at 0.5-0.67 at the default for sizes 64, 128 and 256.

Usage::

    python -m utils.data.phantoms --out data/MosMedData --n 100 --seed 0 [--difficulty easy|default|hard]
                             [--layout ct0_ct23|studies] [--size 256]

Scan ``i`` (1-based study number) is drawn from ``np.random.default_rng([seed, i])``, so a
scan does not depend on generation order and an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from utils.atomic import atomic_write_text
from utils.errors import DataError
from utils.data.nifti_io import save_nifti

SEVERITY_BANDS = {0: (0.0, 0.0), 1: (0.0, 0.25), 2: (0.25, 0.50), 3: (0.50, 0.75), 4: (0.75, 1.0)}
"""MosMedData's share of lung volume involved per category (CT-1 is > 0 and < 25 %)."""
LAYOUTS = ("ct0_ct23", "studies")
SIDECAR = "phantoms.json"  # generator settings of a dataset folder written by this module
GGO_HU = (-700.0, -300.0)
EDGE_RAMP = 0.15  # lesion score over which the density ramps from 0 to full: the edge sharpness
CONSOLIDATION_HU = (-100.0, 50.0)


@dataclass(frozen=True)
class Difficulty:
    """How visible the lesions of a category-1 (binary 'abnormal') scan are.

    Normal scans draw the same foci and turn all of their density into a dependent band
    (the lesion-volume-matched confounder, see ``_lesions``), so every field here shapes
    the dense-volume budget of both classes alike; only ``focal_share`` and the focus
    shape decide how much of it an abnormal scan shows as focal lesions.

    Args:
        lesion_count: inclusive (min, max) number of foci of a regular draw.
        lesion_radius_mm: (min, max) mean radius of a focus in mm, drawn log-uniformly so
            small and large foci are equally common per octave.
        contrast: share of the difference between a focus's target attenuation (GGO
            -700..-300 HU, consolidation -100..+50 HU) and the underlying lung applied at
            its core (1 = full attenuation, 0 = invisible). Also used by CT-2..CT-4.
        consolidation_prob: probability that a focus is consolidation, not ground glass.
        mild_share: share of draws that instead carry one small faint focus.
        mild_radius_mm: (min, max) radius in mm of that single focus.
        mild_contrast: contrast (as ``contrast``) of that single focus.
        focal_share: probability that a focus of an abnormal scan stays focal (at least
            one always does); the others become dependent density.
        patchiness: amplitude of the smoothed noise added to a focus's ellipsoid before
            thresholding (0 = solid ellipsoid; larger = patchier, more broken outline).
    """

    lesion_count: tuple[int, int] = (4, 10)
    lesion_radius_mm: tuple[float, float] = (20.0, 45.0)
    contrast: float = 1.0
    consolidation_prob: float = 0.3
    mild_share: float = 0.05
    mild_radius_mm: tuple[float, float] = (10.0, 16.0)
    mild_contrast: float = 0.8
    focal_share: float = 0.9
    patchiness: float = 0.3

    def __post_init__(self):
        if not 1 <= self.lesion_count[0] <= self.lesion_count[1]:
            raise ValueError(f"Difficulty.lesion_count must be 1 <= min <= max, got {self.lesion_count}")
        for name in ("lesion_radius_mm", "mild_radius_mm"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"Difficulty.{name} must be 0 < min <= max, got {(lo, hi)}")
        for name in ("contrast", "consolidation_prob", "mild_share", "mild_contrast", "focal_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"Difficulty.{name} must lie in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.patchiness <= 1.5:
            raise ValueError(f"Difficulty.patchiness must lie in [0, 1.5], got {self.patchiness}")


DIFFICULTIES = {
    "easy": Difficulty(lesion_count=(5, 12), lesion_radius_mm=(25.0, 50.0), consolidation_prob=0.35,
                       mild_share=0.0, focal_share=1.0, patchiness=0.25),
    "default": Difficulty(),
    "hard": Difficulty(lesion_count=(3, 8), lesion_radius_mm=(15.0, 40.0), contrast=0.9, consolidation_prob=0.25,
                       mild_share=0.2, mild_radius_mm=(8.0, 14.0), mild_contrast=0.7, focal_share=0.8,
                       patchiness=0.35),
}


@dataclass(frozen=True)
class PhantomConfig:
    """Geometry, acquisition and difficulty of generated scans.

    Args:
        size: in-plane matrix (X = Y = size voxels); MosMedData is 512. The default 256
            is twice the pipeline's 128 x 128 input, so the DCG's ``roi_scale = 2`` crops
            see real detail rather than interpolation, and a 100-scan set still takes
            about 1.5-2.5 minutes on 2 CPU cores (128: ~40 s; 512: ~5x the time of 256).
        slices: inclusive (min, max) number of axial slices per scan.
        slice_spacing_mm: (min, max) slice spacing in mm (MosMedData: 8 mm).
        pixel_spacing_512_mm: (min, max) in-plane spacing at a 512 matrix; the actual
            spacing is this times 512 / size so the field of view does not depend on size.
        noise_std_hu: (min, max) std of the (slightly correlated) Gaussian scanner noise.
        lung_mean_hu: (min, max) mean attenuation of the healthy lung, vessels included
            (inspiration level); set before the point-spread blur, which adds partial
            volume at the lung boundary.
        dependent_density_hu: (min, max) extra attenuation at the posterior lung edge
            (gravity-dependent density, present in normal and abnormal scans alike).
        pad_value: value outside the circular field of view (MosMedData: -2048).
        difficulty: lesion visibility of category-1 / binary abnormal scans.
    """

    size: int = 256
    slices: tuple[int, int] = (30, 50)
    slice_spacing_mm: tuple[float, float] = (7.5, 8.5)
    pixel_spacing_512_mm: tuple[float, float] = (0.58, 0.92)
    noise_std_hu: tuple[float, float] = (10.0, 30.0)
    lung_mean_hu: tuple[float, float] = (-920.0, -800.0)
    dependent_density_hu: tuple[float, float] = (0.0, 400.0)
    pad_value: int = -2048
    difficulty: Difficulty = field(default_factory=Difficulty)

    def __post_init__(self):
        if self.size < 32:
            raise ValueError(f"PhantomConfig.size must be >= 32, got {self.size}")
        if not 4 <= self.slices[0] <= self.slices[1]:
            raise ValueError(f"PhantomConfig.slices must be 4 <= min <= max, got {self.slices}")
        for name in ("slice_spacing_mm", "pixel_spacing_512_mm", "noise_std_hu", "lung_mean_hu",
                     "dependent_density_hu"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"PhantomConfig.{name} must be (min, max) with min <= max, got {(lo, hi)}")


# ----------------------------------------------------------------------------- helpers

def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox) -> np.ndarray:
    """Unit-std Gaussian noise smoothed by a Gaussian of ``sigma_vox`` voxels per axis.

    Wide kernels are applied on a coarser grid (then linearly upsampled), which keeps the
    cost independent of the kernel width.
    """
    sigma = np.broadcast_to(np.asarray(sigma_vox, dtype=float), (len(shape),))
    factor = np.maximum(1, np.floor(sigma / 1.5)).astype(int)
    coarse = tuple(int(np.ceil(s / f)) + 1 for s, f in zip(shape, factor))
    noise = ndimage.gaussian_filter(rng.standard_normal(coarse, dtype=np.float32), sigma / factor, mode="wrap")
    if np.any(factor > 1):
        noise = ndimage.zoom(noise, factor.astype(float), order=1)
    noise = noise[tuple(slice(0, s) for s in shape)]
    return (noise - noise.mean()) / max(float(noise.std()), 1e-6)


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


@dataclass(frozen=True)
class _Geometry:
    """One scan's acquisition and patient layout (mm; u = +left, v = +posterior, z = +up)."""

    shape: tuple[int, int, int]  # (X, Y, Z)
    spacing: tuple[float, float, float]  # (sx, sy, sz) mm
    body_centre: tuple[float, float]  # (u0, v0) mm from the image centre
    body_axes: tuple[float, float]  # (a, b) half-width and half-depth mm
    fat_mm: float
    muscle_mm: float
    inspiration: float  # 0.8 (expiration) .. 1.0 (deep inspiration): scales lung size
    lung_mean_hu: float


def _sample_geometry(rng: np.random.Generator, config: PhantomConfig) -> _Geometry:
    a = rng.uniform(135.0, 190.0)
    b = a * rng.uniform(0.62, 0.78)
    lo, hi = config.pixel_spacing_512_mm
    lo = min(max(lo, 2.08 * a / 512.0), hi)  # a larger patient is scanned with a larger field of view
    sxy = rng.uniform(lo, hi) * 512.0 / config.size
    sz = rng.uniform(*config.slice_spacing_mm)
    nz = int(rng.integers(config.slices[0], config.slices[1] + 1))
    lung_mean = rng.uniform(*config.lung_mean_hu)
    span = config.lung_mean_hu[1] - config.lung_mean_hu[0]
    # darker lungs = deeper inspiration = larger lungs
    inspiration = float(np.clip(1.0 - 0.15 * (lung_mean - config.lung_mean_hu[0]) / max(span, 1e-6)
                                + rng.normal(0, 0.02), 0.8, 1.0))
    return _Geometry(shape=(config.size, config.size, nz), spacing=(sxy, sxy, sz),
                     body_centre=(rng.normal(0.0, 8.0), rng.uniform(-10.0, 25.0)), body_axes=(a, b),
                     fat_mm=rng.uniform(3.0, 30.0), muscle_mm=rng.uniform(6.0, 14.0),
                     inspiration=inspiration, lung_mean_hu=lung_mean)


def _affine(rng: np.random.Generator, geom: _Geometry) -> np.ndarray:
    """MosMedData-like voxel-to-world matrix: diag(-sx, -sy, sz) with a scanner offset."""
    sx, sy, sz = geom.spacing
    affine = np.diag([-sx, -sy, sz, 1.0])
    centre = (geom.shape[0] - 1) / 2.0
    affine[:3, 3] = [centre * sx + rng.normal(0, 5), centre * sy + rng.normal(0, 5), -rng.uniform(100.0, 400.0)]
    return affine


# ----------------------------------------------------------------------------- anatomy

def _lungs(rng: np.random.Generator, geom: _Geometry, u, v, z):
    """Lung mask (X, Y, Z) and the parameters the lesion and vessel models need."""
    a, b = geom.body_axes
    cav_a, cav_b = a - geom.fat_mm - geom.muscle_mm, b - geom.fat_mm - geom.muscle_mm
    half_gap = rng.uniform(12.0, 25.0)  # half-width of the mediastinum between the lungs
    au0 = (cav_a - half_gap) / 2.0 * rng.uniform(0.95, 1.02) * geom.inspiration
    bv0 = cav_b * rng.uniform(0.85, 0.95) * geom.inspiration
    cv = cav_b * rng.uniform(0.03, 0.12)
    height = geom.shape[2] * geom.spacing[2]
    z_lo, z_hi = height * rng.uniform(0.03, 0.15), height * rng.uniform(0.88, 0.99)
    tn = np.clip((z - z_lo) / (z_hi - z_lo), 0.0, 1.0)  # (1, 1, Z) 0 at the base, 1 at the apex
    profile = np.sqrt(np.clip(1.0 - tn ** 2.5, 0.0, 1.0)) * (0.85 + 0.15 * (1.0 - tn))
    dome_right = rng.uniform(30.0, 55.0)
    lung = np.zeros(geom.shape, dtype=bool)
    centres = []
    for side, dome in ((-1.0, dome_right), (1.0, dome_right - rng.uniform(5.0, 15.0))):  # -1 = patient right
        cu = side * (half_gap + au0)
        centres.append(cu)
        au, bv = au0 * profile + 1e-3, bv0 * profile ** 0.7 + 1e-3
        cvz = cv + (1.0 - profile) * 0.2 * cav_b  # the apex sits posteriorly
        du, dv = (u - cu) / au, (v - cvz) / bv  # (X, 1, Z), (1, Y, Z)
        theta = np.arctan2(dv, du)
        wobble = sum(rng.uniform(0.0, 0.05) * np.cos(k * theta + rng.uniform(0, 2 * np.pi) + 3.0 * tn)
                     for k in (2, 3, 5))
        dome_r2 = ((u - cu) / (1.1 * au0)) ** 2 + ((v - cv + 0.35 * bv0) / (1.1 * bv0)) ** 2  # (X, Y, 1)
        floor = z_lo + dome * np.clip(1.0 - dome_r2, 0.0, 1.0)  # diaphragm: posterior recess lowest
        lung |= (du ** 2 + dv ** 2 < 1.0 + wobble) & (z > floor) & (z <= z_hi)
    lung &= ((u / cav_a) ** 2 + (v / cav_b) ** 2 < 1.0)
    heart = (((u - 0.25 * cav_a) / (0.45 * cav_a)) ** 2 + ((v + 0.3 * cav_b) / (0.55 * cav_b)) ** 2
             + ((z - z_lo - 0.25 * (z_hi - z_lo)) / (0.3 * (z_hi - z_lo))) ** 2) < 1.0
    lung &= ~heart
    params = dict(cav=(cav_a, cav_b), cv=cv, bv0=bv0, au0=au0, half_gap=half_gap, centres=centres,
                  z_range=(z_lo, z_hi))
    return lung, heart, params


def _vessel_fraction(rng: np.random.Generator, geom: _Geometry, params: dict) -> np.ndarray:
    """Partial-volume vessel fraction (X, Y, Z) in [0, 1] of a branching vascular tree.

    Each branch is a random-walk polyline from the hilum outwards whose radius tapers;
    every sample point adds pi r^2 * step / voxel_volume to its voxel, so thin peripheral
    branches are faint and hilar trunks saturate, as partial volume makes them on CT.
    """
    sx, sy, sz = geom.spacing
    step = 1.0  # mm between polyline samples
    scale = rng.uniform(0.7, 1.3)  # vessel calibre of this patient
    z_lo, z_hi = params["z_range"]
    points, weights = [], []

    def branch(start, direction, length, radius, depth):
        n = max(int(length / step), 2)
        dirs = direction + np.cumsum(rng.normal(0.0, 0.06, (n, 3)), axis=0)
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        path = start + np.cumsum(dirs * step, axis=0)  # (n, 3) mm
        r = radius * (1.0 - 0.75 * np.arange(n) / n)
        points.append(path)
        weights.append(np.pi * r ** 2 * step / (sx * sy * sz))
        if depth < 3:
            for _ in range(int(rng.integers(2, 4))):
                at = int(rng.integers(n // 5, n))
                child_dir = dirs[at] + rng.normal(0.0, 0.7, 3)
                branch(path[at], child_dir / np.linalg.norm(child_dir), length * rng.uniform(0.3, 0.6),
                       r[at] * 0.75, depth + 1)

    for side, cu in zip((-1.0, 1.0), params["centres"]):
        hilum = np.array([side * (params["half_gap"] + 0.3 * params["au0"]), params["cv"],
                          z_lo + rng.uniform(0.45, 0.6) * (z_hi - z_lo)])
        for _ in range(int(rng.integers(5, 11))):
            direction = np.array([side * abs(rng.normal(1.0, 0.4)), rng.normal(0.0, 0.6), rng.normal(0.0, 0.9)])
            branch(hilum + rng.normal(0.0, 5.0, 3), direction / np.linalg.norm(direction),
                   rng.uniform(70.0, 150.0), rng.uniform(3.0, 5.5) * scale, 0)
    pts = np.concatenate(points)  # (N, 3) mm, (u, v, z)
    w = np.concatenate(weights)
    centre = (geom.shape[0] - 1) / 2.0
    idx = np.rint(np.stack([(pts[:, 0] + geom.body_centre[0]) / sx + centre,
                            (pts[:, 1] + geom.body_centre[1]) / sy + centre, pts[:, 2] / sz - 0.5], axis=1)).astype(int)
    keep = np.all((idx >= 0) & (idx < np.array(geom.shape)), axis=1)
    frac = np.zeros(geom.shape, dtype=np.float32)
    np.add.at(frac, tuple(idx[keep].T), w[keep].astype(np.float32))
    frac = ndimage.gaussian_filter(frac, sigma=(0.6, 0.6, 0.3))  # scanner point-spread function
    return np.clip(frac, 0.0, 1.0)


# ----------------------------------------------------------------------------- lesions

def _foci(rng: np.random.Generator, diff: Difficulty, geom: _Geometry, lung: np.ndarray, posterior: np.ndarray,
          shape_noise: np.ndarray):
    """Place the foci of a category-0/1 draw: score (> 0 inside), target HU, contrast, focus id, all (X, Y, Z).

    Centres are drawn from lung voxels with weight exp(-d / 25 mm) (1 + 2 * posterior),
    d the distance to the lung boundary, so foci are mostly peripheral and dependent. A
    focus is an ellipsoid thresholded with smoothed noise (patchy, irregular edge); where
    foci overlap the higher score wins (``focus`` holds the winner, -1 outside every focus).
    """
    score = np.full(geom.shape, -1.0, dtype=np.float32)
    target = np.zeros(geom.shape, dtype=np.float32)
    contrast = np.zeros(geom.shape, dtype=np.float32)
    focus = np.full(geom.shape, -1, dtype=np.int16)
    depth = ndimage.distance_transform_edt(lung, sampling=geom.spacing).astype(np.float32)
    mild = bool(rng.random() < diff.mild_share)
    count = 1 if mild else int(rng.integers(diff.lesion_count[0], diff.lesion_count[1] + 1))
    lung_idx = np.flatnonzero(lung)
    prob = (np.exp(-depth / 25.0) * (1.0 + 2.0 * posterior)).ravel()[lung_idx]
    centres = np.stack(np.unravel_index(rng.choice(lung_idx, size=count, p=prob / prob.sum()), geom.shape), 1)
    for k, c in enumerate(centres):
        radius = _log_uniform(rng, *(diff.mild_radius_mm if mild else diff.lesion_radius_mm))
        radii = radius * np.array([rng.uniform(0.7, 1.3), rng.uniform(0.7, 1.3), rng.uniform(0.8, 1.5)])
        half = np.ceil(1.6 * radii / np.array(geom.spacing)).astype(int)
        box = tuple(slice(max(ci - h, 0), min(ci + h + 1, s)) for ci, h, s in zip(c, half, geom.shape))
        grids = np.ogrid[box]
        d2 = sum(((g - ci) * sp / r) ** 2 for g, ci, sp, r in zip(grids, c, geom.spacing, radii))
        s_l = 1.0 - np.sqrt(d2) + diff.patchiness * shape_noise[box]
        consolidation = rng.random() < diff.consolidation_prob
        wins = s_l > score[box]
        score[box] = np.where(wins, s_l, score[box])
        target[box] = np.where(wins, rng.uniform(*(CONSOLIDATION_HU if consolidation else GGO_HU)), target[box])
        contrast[box] = np.where(wins, diff.mild_contrast if mild else diff.contrast, contrast[box])
        focus[box] = np.where(wins, k, focus[box])
        score[tuple(c)] = max(score[tuple(c)], 0.1)  # never empty: the centre voxel is always inside
    lung_scores = score[lung]
    if np.mean(lung_scores > 0) >= SEVERITY_BANDS[1][1] - 0.01:  # keep CT-1 below 25 % of the lung
        score -= np.quantile(lung_scores, 0.8)
    return score, target, contrast, focus, mild, count


def _dependent_band(rng: np.random.Generator, geom: _Geometry, lung: np.ndarray, posterior: np.ndarray,
                    weight: np.ndarray, target: np.ndarray, moved: np.ndarray) -> None:
    """Move the density of the ``moved`` voxels into a smooth dependent band, in place.

    The (weight, target) pairs of the moved voxels are sorted by the attenuation they add
    and laid, densest first, onto the most dependent free lung voxels (ranked by the
    posterior coordinate plus a broad 20 mm noise field, so the band's thickness varies
    along the lung). The multiset of added densities, and so the whole-volume HU
    histogram, is unchanged; only the shape changes from focal blobs to a posterior
    gradient like dependent atelectasis.
    """
    src = np.flatnonzero(moved)
    if src.size == 0:
        return
    sx, sy, sz = geom.spacing
    excess = weight.flat[src] * (target.flat[src] - geom.lung_mean_hu)
    order = src[np.argsort(-excess, kind="stable")]
    w_vals, t_vals = weight.flat[order].copy(), target.flat[order].copy()
    weight.flat[src] = 0.0
    free = np.flatnonzero(lung & (weight == 0))  # the moved voxels and healthy lung
    rank = (posterior + 0.15 * _smooth_noise(rng, geom.shape, (20.0 / sx, 20.0 / sy, 20.0 / sz))).flat[free]
    top = np.argpartition(-rank, src.size - 1)[: src.size]
    dest = free[top[np.argsort(-rank[top], kind="stable")]]
    weight.flat[dest], target.flat[dest] = w_vals, t_vals


def _lesions(rng: np.random.Generator, category: int, config: PhantomConfig, geom: _Geometry,
             lung: np.ndarray, posterior: np.ndarray):
    """Lesion density of a scan: weight, target HU and lesion mask (X, Y, Z), and a summary.

    The lung becomes ``parenchyma + weight * (target - parenchyma)``: weight in [0, 1] is
    the focus contrast times a soft edge ramp, target the GGO/consolidation HU plus fine
    texture.

    Categories 0 and 1 draw foci from ``config.difficulty`` in exactly the same way, a
    dense-volume budget with one distribution for both classes. A category-1 scan keeps
    each focus as a focal lesion with probability ``focal_share`` (at least one); the
    density of its other foci, and of every focus of a normal scan, is moved into a
    dependent band (:func:`_dependent_band`). Both classes therefore carry the same
    amount of GGO/consolidation-range tissue in distribution, and only its shape (focal,
    patchy, sharp-edged vs a smooth posterior gradient) tells them apart. Categories 2..4
    threshold a broad field to 25-50 %, 50-75 % or > 75 % of the lung.
    """
    sx, sy, sz = geom.spacing
    diff = config.difficulty
    fine = _smooth_noise(rng, geom.shape, (2.5 / sx, 2.5 / sy, 2.5 / sz))
    coarse = _smooth_noise(rng, geom.shape, (8.0 / sx, 8.0 / sy, 8.0 / sz))
    shape_noise = np.clip(0.6 * fine + 0.4 * coarse, -1.5, 1.5)
    if category >= 2:
        lo, hi = SEVERITY_BANDS[category]
        involved = rng.uniform(lo + 0.03, hi - 0.03)
        peripheral = np.exp(-ndimage.distance_transform_edt(lung, sampling=geom.spacing) / 25.0)
        broad = _smooth_noise(rng, geom.shape, (15.0 / sx, 15.0 / sy, 15.0 / sz))
        field_ = broad + 0.3 * shape_noise + 1.0 * posterior + 0.8 * peripheral
        score = (field_ - np.quantile(field_[lung], 1.0 - involved)).astype(np.float32)
        consolidated = score > np.quantile(score[lung], 1.0 - 0.3 * involved)  # the densest third is consolidation
        target = np.where(consolidated, rng.uniform(*CONSOLIDATION_HU), rng.uniform(*GGO_HU)).astype(np.float32)
        weight = np.clip(score / EDGE_RAMP, 0.0, 1.0) * lung * diff.contrast
        return weight, target + 40.0 * fine, lung & (score > 0), dict(lesion_count=0, mild=False,
                                                                      dependent_fraction=0.0)
    score, target, contrast, focus, mild, count = _foci(rng, diff, geom, lung, posterior, shape_noise)
    weight = (np.clip(score / EDGE_RAMP, 0.0, 1.0) * lung * contrast).astype(np.float32)
    target += 40.0 * fine
    focal = np.zeros(count, dtype=bool)
    if category == 1:
        focal = rng.random(count) < diff.focal_share
        focal[rng.integers(count)] |= not focal.any()
    inside = lung & (score > 0)
    lesion = inside & np.concatenate([[False], focal])[focus + 1]
    moved = inside & ~lesion
    _dependent_band(rng, geom, lung, posterior, weight, target, moved)
    summary = dict(lesion_count=int(focal.sum()), mild=mild and category == 1,
                   dependent_fraction=float(moved.sum()) / max(int(lung.sum()), 1))
    return weight, target, lesion, summary


# ----------------------------------------------------------------------------- public API

def generate_phantom(rng: np.random.Generator, category: int,
                     config: PhantomConfig = PhantomConfig()) -> tuple[np.ndarray, np.ndarray, dict]:
    """Draw one synthetic chest CT.

    Args:
        rng: the scan's random generator (``write_dataset`` uses ``default_rng([seed, study])``).
        category: 0 = normal (CT-0); 1..4 = MosMedData severity CT-1..CT-4. Category 1 is the
            binary 'abnormal' class (``CT-23`` folder) and follows ``config.difficulty``;
            2..4 involve 25-50 %, 50-75 %, > 75 % of the lung.
        config: geometry and difficulty.

    Returns:
        hu: (X, Y, Z) int16 HU, X = Y = ``config.size``, in DICOM LPS voxel order.
        affine: (4, 4) float64 voxel-to-world matrix ``diag(-sx, -sy, sz)`` plus offset.
        info: ``category``, ``lesion_count`` (focal foci kept; 0 for category 0, and for
            2..4 where lesions are a thresholded field), ``mild`` (single faint focus),
            ``dependent_fraction`` (share of lung voxels that received the dependent band
            of moved foci), ``involved_fraction`` (share of lung voxels inside a lesion),
            ``spacing`` (sx, sy, sz) mm, ``lung_mask`` and ``lesion_mask`` ((X, Y, Z) bool,
            lesion_mask within lung_mask).
    """
    if category not in SEVERITY_BANDS:
        raise ValueError(f"category must be one of 0..4, got {category!r}")
    geom = _sample_geometry(rng, config)
    sx, sy, sz = geom.spacing
    nx, ny, nz = geom.shape
    centre = (nx - 1) / 2.0
    u = ((np.arange(nx) - centre) * sx - geom.body_centre[0]).reshape(nx, 1, 1).astype(np.float32)  # +left
    v = ((np.arange(ny) - centre) * sy - geom.body_centre[1]).reshape(1, ny, 1).astype(np.float32)  # +posterior
    z = ((np.arange(nz) + 0.5) * sz).reshape(1, 1, nz).astype(np.float32)  # +superior, mm from the bottom
    a, b = geom.body_axes

    lung, heart, params = _lungs(rng, geom, u, v, z)
    cav_a, cav_b = params["cav"]
    body = (u / a) ** 2 + (v / b) ** 2 < 1.0  # (X, Y, 1)
    muscle = (u / (a - geom.fat_mm)) ** 2 + (v / (b - geom.fat_mm)) ** 2 < 1.0
    cavity = (u / cav_a) ** 2 + (v / cav_b) ** 2 < 1.0

    # vertebra (cortex, cancellous bone, canal, spinous process) and ribs
    r_vb = rng.uniform(14.0, 20.0)
    v_vb = cav_b - r_vb - rng.uniform(0.0, 8.0)
    r_spine = np.sqrt(u ** 2 + (v - v_vb) ** 2)
    canal = np.sqrt(u ** 2 + (v - v_vb - r_vb - 9.0) ** 2) < 7.0
    spinous = (np.abs(u) < 4.0) & (v > v_vb + r_vb + 14.0) & (v < v_vb + r_vb + 40.0)
    cortex_hu, cancellous_hu = rng.uniform(700.0, 1000.0), rng.uniform(200.0, 400.0)
    lung &= ~(r_spine < r_vb + 6.0)
    rim = ((u / (cav_a + 10.0)) ** 2 + (v / (cav_b + 10.0)) ** 2 < 1.0) & ~cavity
    pitch, slope = rng.uniform(24.0, 32.0), rng.uniform(0.2, 0.4)
    rib = rim & (np.mod(z + slope * (v + cav_b) + rng.uniform(0, pitch), pitch) < 10.0)

    hu = np.full(geom.shape, -1000.0, dtype=np.float32)  # air
    table_top = b + geom.body_centre[1] + rng.uniform(5.0, 30.0)  # mm below the image centre
    v_img = v + geom.body_centre[1]
    table = (v_img > table_top) & (v_img < table_top + rng.uniform(6.0, 12.0)) & (np.abs(u) < 200.0)
    hu = np.where(table, rng.uniform(-300.0, 100.0), hu)
    soft = rng.uniform(30.0, 50.0) + 10.0 * _smooth_noise(rng, geom.shape, (4.0 / sx, 4.0 / sy, 1.0))
    hu = np.where(body, rng.uniform(-115.0, -85.0), hu)  # subcutaneous fat
    hu = np.where(muscle, soft + rng.uniform(0.0, 15.0), hu)
    hu = np.where(cavity | heart, soft, hu)  # mediastinum, heart, upper abdomen below the domes
    hu = np.where(rib, rng.uniform(350.0, 700.0), hu)
    hu = np.where(r_spine < r_vb, cancellous_hu, hu)
    hu = np.where((r_spine < r_vb) & (r_spine > r_vb - 2.5) | spinous, cortex_hu, hu)
    hu = np.where(canal, 20.0, hu)

    # lung parenchyma: texture + dependent density, shifted to the scan's mean attenuation
    posterior = np.clip((v - (params["cv"] - params["bv0"])) / (2.0 * params["bv0"]), 0.0, 1.0)  # (1, Y, 1)
    posterior = np.broadcast_to(posterior, geom.shape)
    dependent = rng.uniform(*config.dependent_density_hu) * posterior ** rng.uniform(2.0, 6.0)
    texture = (rng.uniform(15.0, 40.0) * _smooth_noise(rng, geom.shape, 0.8)
               + rng.uniform(10.0, 30.0) * _smooth_noise(rng, geom.shape, (6.0 / sx, 6.0 / sy, 6.0 / sz)))
    parenchyma = texture + dependent
    vessels = _vessel_fraction(rng, geom, params) * lung
    vessel_hu = rng.uniform(40.0, 200.0)
    healthy = parenchyma + vessels * (vessel_hu - parenchyma)
    parenchyma += (geom.lung_mean_hu - healthy[lung].mean()) / max(1.0 - float(vessels[lung].mean()), 0.5)

    weight, target, lesion, summary = _lesions(rng, category, config, geom, lung, posterior)
    parenchyma += weight * (target - parenchyma)  # weight is 0 outside the lung
    parenchyma += vessels * (vessel_hu - parenchyma)  # vessels run through lesions too
    hu = np.where(lung, parenchyma, hu)

    hu = ndimage.gaussian_filter(hu, sigma=(0.5, 0.5, 0.25))  # point-spread function: partial volume at edges
    noise = _smooth_noise(rng, geom.shape, (0.6, 0.6, 0.0))
    hu += rng.uniform(*config.noise_std_hu) * noise
    fov = ((np.arange(nx) - centre)[:, None] ** 2 + (np.arange(ny) - centre)[None, :] ** 2) <= (nx / 2.0) ** 2
    hu = np.where(fov[:, :, None], np.clip(np.rint(hu), -1024, 3071), config.pad_value).astype(np.int16)

    affine = _affine(rng, geom)
    n_lung = int(lung.sum())
    info = dict(category=category, **summary,
                involved_fraction=float(lesion.sum()) / max(n_lung, 1), spacing=geom.spacing,
                lung_mask=lung, lesion_mask=lesion)
    return hu, affine, info



def _plan(n: int, layout: str) -> list[tuple[int, int, str]]:
    """(study number, category, class folder) per scan; numbers are unique across folders.

    ``ct0_ct23``: n - n // 2 normals in ``CT-0`` then n // 2 category-1 scans in ``CT-23``.
    ``studies``: 40 % ``studies/CT-0`` (at most n - 4), the rest spread evenly over
    ``studies/CT-1`` .. ``CT-4`` (at least one each for n >= 5).
    """
    if layout == "ct0_ct23":
        counts = {0: n - n // 2, 1: n // 2}
        folders = {0: "CT-0", 1: "CT-23"}
    elif layout == "studies":
        n0 = max(min(round(0.4 * n), n - 4), 0 if n < 5 else 1)
        rest = n - n0
        counts = {0: n0, **{c: rest // 4 + (c - 1 < rest % 4) for c in range(1, 5)}}
        folders = {c: f"studies/CT-{c}" for c in range(5)}
    else:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    plan, study = [], 0
    for category, count in counts.items():
        for _ in range(count):
            study += 1
            plan.append((study, category, folders[category]))
    return plan


def _settings(n: int, seed: int, layout: str, config: PhantomConfig) -> dict:
    return {"generator": "utils.data.phantoms", "version": 2, "n": n, "seed": seed, "layout": layout,
            "config": json.loads(json.dumps(asdict(config)))}


PHANTOMS_PER_WORKER = 8  # fewer scans per process do not repay starting it
MAX_WORKERS = 8


def _write_one(seed: int, study: int, category: int, config: PhantomConfig, path: Path) -> None:
    """Scan ``study`` of the set: drawn from ``default_rng([seed, study])`` alone, so any worker
    and any order give the same file."""
    hu, affine, _ = generate_phantom(np.random.default_rng([seed, study]), category, config)
    save_nifti(path, hu, affine)


def write_dataset(out: str | Path, n: int, seed: int, layout: str = "ct0_ct23",
                  config: PhantomConfig = PhantomConfig(), progress: bool = True) -> list[Path]:
    """Write ``n`` phantoms as ``<out>/<class folder>/study_XXXX.nii.gz``; return their paths.

    ``<out>/phantoms.json`` records the generator settings. A folder whose sidecar matches
    and whose files all exist is left alone; with matching settings but missing files (an
    interrupted run) only the missing scans are written, which is valid because scan ``i``
    is drawn from ``default_rng([seed, i])`` alone. With other settings the previous
    phantoms' ``study_*.nii.gz`` files are deleted and the set is regenerated. A folder
    holding NIfTI files but no sidecar (real data) is never written into. Larger sets are
    written by up to ``MAX_WORKERS`` processes (one per ``PHANTOMS_PER_WORKER`` scans and CPU
    core); the files are the same whatever the number of workers.

    Raises:
        DataError: ``out`` holds NIfTI files not written by this generator.
        ValueError: ``n`` < 2 or an unknown layout.
    """
    if n < 2:
        raise ValueError(f"n must be >= 2 (both classes), got {n}")
    out = Path(out)
    plan = _plan(n, layout)
    paths = [out / folder / f"study_{study:04d}.nii.gz" for study, _, folder in plan]
    settings = _settings(n, seed, layout, config)
    sidecar = out / SIDECAR
    previous = json.loads(sidecar.read_text()) if sidecar.is_file() else None
    if previous is None:
        foreign = next((p for p in out.rglob("*.nii*") if not p.name.startswith(".")), None) if out.is_dir() else None
        if foreign is not None:
            raise DataError(out, f"holds NIfTI files not written by the phantom generator ({foreign.name}); "
                                 "choose another output folder")
    elif {k: v for k, v in previous.items() if k != "complete"} != settings:
        for old in [*out.glob("CT-*/study_*.nii.gz"), *out.glob("studies/CT-*/study_*.nii.gz")]:
            old.unlink()
        sidecar.unlink()
    elif previous.get("complete") and all(p.is_file() for p in paths):
        return paths
    atomic_write_text(sidecar, json.dumps({**settings, "complete": False}, indent=2))
    todo = [(seed, study, category, config, path) for (study, category, _), path in zip(plan, paths)
            if not path.is_file()]
    workers = min(len(todo) // PHANTOMS_PER_WORKER, os.cpu_count() or 1, MAX_WORKERS)
    bar = tqdm(total=len(todo), desc="phantoms", unit="scan", disable=not progress)
    if workers > 1:  # spawn: the parent may hold torch's OpenMP threads, which fork does not copy safely
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for _ in as_completed([pool.submit(_write_one, *job) for job in todo]):
                bar.update()
    else:
        for job in todo:
            _write_one(*job)
            bar.update()
    bar.close()
    atomic_write_text(sidecar, json.dumps({**settings, "complete": True}, indent=2))
    return paths


def main(argv: list[str] | None = None) -> list[Path]:
    """Command line: write a phantom dataset and print a summary."""
    from utils.cli import make_parser  # utils.cli imports the profiles, which import this module

    parser = make_parser("utils.data.phantoms", __doc__)
    parser.add_argument("--out", type=Path, default=Path("data/MosMedData"), help="dataset folder")
    parser.add_argument("--n", type=int, default=100, help="number of scans (balanced classes)")
    parser.add_argument("--seed", type=int, default=0, help="scan i is drawn from (seed, i)")
    parser.add_argument("--difficulty", choices=sorted(DIFFICULTIES), default="default", help="lesion visibility")
    parser.add_argument("--layout", choices=LAYOUTS, default="ct0_ct23", help="MosMedData folder layout")
    parser.add_argument("--size", type=int, default=PhantomConfig.size, help="in-plane matrix (512 = MosMedData)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    config = PhantomConfig(size=args.size, difficulty=DIFFICULTIES[args.difficulty])
    start = time.perf_counter()
    paths = write_dataset(args.out, args.n, args.seed, args.layout, config, progress=not args.quiet)
    elapsed = time.perf_counter() - start
    headers = [nib.load(p).header for p in paths]
    slices = [h.get_data_shape()[2] for h in headers]
    pixel = [float(h.get_zooms()[0]) for h in headers]
    thick = [float(h.get_zooms()[2]) for h in headers]
    per_class: dict[str, int] = {}
    for p in paths:
        key = str(p.parent.relative_to(args.out))
        per_class[key] = per_class.get(key, 0) + 1
    print(f"{len(paths)} phantoms in {args.out} ({args.layout}, difficulty {args.difficulty}, seed {args.seed}), "
          f"{elapsed:.1f} s")
    print("  per class: " + ", ".join(f"{k}: {v}" for k, v in sorted(per_class.items())))
    print(f"  shape {args.size} x {args.size} x {min(slices)}..{max(slices)}, "
          f"pixel {min(pixel):.2f}..{max(pixel):.2f} mm, slice {min(thick):.2f}..{max(thick):.2f} mm")
    return paths


if __name__ == "__main__":
    main()
