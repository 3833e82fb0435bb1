"""Anatomy and lesions of the synthetic chest-CT phantoms (drawn by ``utils.data.phantoms``).

Holds the lesion-visibility presets (``Difficulty``, ``DIFFICULTIES``), the lesion HU
ranges, one scan's ``Geometry`` and the drawing functions that ``generate_phantom``
calls in turn: ``lungs``, ``vessel_fraction`` and ``lesions`` (with the shared
``smooth_noise``). Every function takes the scan's random generator and draws from it in
a fixed order, so a scan depends on its generator alone.

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
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

SEVERITY_BANDS = {0: (0.0, 0.0), 1: (0.0, 0.25), 2: (0.25, 0.50), 3: (0.50, 0.75), 4: (0.75, 1.0)}
"""MosMedData's share of lung volume involved per category (CT-1 is > 0 and < 25 %)."""
GGO_HU = (-700.0, -300.0)
EDGE_RAMP = 0.15  # lesion score over which the density ramps from 0 to full: the edge sharpness
CONSOLIDATION_HU = (-100.0, 50.0)


@dataclass(frozen=True)
class Difficulty:
    """How visible the lesions of a category-1 (binary 'abnormal') scan are.

    Normal scans draw the same foci and turn all of their density into a dependent band
    (the lesion-volume-matched confounder, see ``lesions``), so every field here shapes
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


# ----------------------------------------------------------------------------- helpers

def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox) -> np.ndarray:
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
class Geometry:
    """One scan's acquisition and patient layout (mm; u = +left, v = +posterior, z = +up)."""

    shape: tuple[int, int, int]  # (X, Y, Z)
    spacing: tuple[float, float, float]  # (sx, sy, sz) mm
    body_centre: tuple[float, float]  # (u0, v0) mm from the image centre
    body_axes: tuple[float, float]  # (a, b) half-width and half-depth mm
    fat_mm: float
    muscle_mm: float
    inspiration: float  # 0.8 (expiration) .. 1.0 (deep inspiration): scales lung size
    lung_mean_hu: float


# ----------------------------------------------------------------------------- anatomy

def lungs(rng: np.random.Generator, geom: Geometry, u, v, z):
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


def vessel_fraction(rng: np.random.Generator, geom: Geometry, params: dict) -> np.ndarray:
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

def _foci(rng: np.random.Generator, diff: Difficulty, geom: Geometry, lung: np.ndarray, posterior: np.ndarray,
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


def _dependent_band(rng: np.random.Generator, geom: Geometry, lung: np.ndarray, posterior: np.ndarray,
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
    rank = (posterior + 0.15 * smooth_noise(rng, geom.shape, (20.0 / sx, 20.0 / sy, 20.0 / sz))).flat[free]
    top = np.argpartition(-rank, src.size - 1)[: src.size]
    dest = free[top[np.argsort(-rank[top], kind="stable")]]
    weight.flat[dest], target.flat[dest] = w_vals, t_vals


def lesions(rng: np.random.Generator, category: int, diff: Difficulty, geom: Geometry,
            lung: np.ndarray, posterior: np.ndarray):
    """Lesion density of a scan: weight, target HU and lesion mask (X, Y, Z), and a summary.

    The lung becomes ``parenchyma + weight * (target - parenchyma)``: weight in [0, 1] is
    the focus contrast times a soft edge ramp, target the GGO/consolidation HU plus fine
    texture.

    Categories 0 and 1 draw foci from ``diff`` (the config's difficulty) in exactly the
    same way, a dense-volume budget with one distribution for both classes. A category-1
    scan keeps each focus as a focal lesion with probability ``focal_share`` (at least
    one); the density of its other foci, and of every focus of a normal scan, is moved
    into a dependent band (:func:`_dependent_band`). Both classes therefore carry the same
    amount of GGO/consolidation-range tissue in distribution, and only its shape (focal,
    patchy, sharp-edged vs a smooth posterior gradient) tells them apart. Categories 2..4
    threshold a broad field to 25-50 %, 50-75 % or > 75 % of the lung.
    """
    sx, sy, sz = geom.spacing
    fine = smooth_noise(rng, geom.shape, (2.5 / sx, 2.5 / sy, 2.5 / sz))
    coarse = smooth_noise(rng, geom.shape, (8.0 / sx, 8.0 / sy, 8.0 / sz))
    shape_noise = np.clip(0.6 * fine + 0.4 * coarse, -1.5, 1.5)
    if category >= 2:
        lo, hi = SEVERITY_BANDS[category]
        involved = rng.uniform(lo + 0.03, hi - 0.03)
        peripheral = np.exp(-ndimage.distance_transform_edt(lung, sampling=geom.spacing) / 25.0)
        broad = smooth_noise(rng, geom.shape, (15.0 / sx, 15.0 / sy, 15.0 / sz))
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
