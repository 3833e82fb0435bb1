"""Synthetic chest-CT phantoms written as MosMedData-style NIfTI files (the embedded default dataset).

Every scan is an int16 Hounsfield-unit volume laid out like a MosMedData file: array axes
(X, Y, Z) = (columns, rows, slices) in DICOM LPS order, so the affine is
``diag(-sx, -sy, sz)`` plus an offset (a negative x and y axis), 30-50 slices of ~8 mm,
a pixel spacing of 0.58-0.92 mm at 512 x 512 (scaled by 512 / size at smaller sizes, so
the field of view stays 300-470 mm) and -2048 outside the circular reconstruction field.
The same loader (``utils.data.nifti_io.load_nifti``) therefore serves phantoms and real data.

This module holds the settings (``PhantomConfig``), the scan assembly
(``generate_phantom``), the dataset writer (``write_dataset``) and the command line. The
anatomy, the lesions, the confounders that keep both classes alike in global HU statistics,
and the ``Difficulty`` presets live in ``utils.data.phantom_anatomy``.

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
from utils.data.phantom_anatomy import (DIFFICULTIES, SEVERITY_BANDS, Difficulty, Geometry, lesions, lungs,
                                        smooth_noise, vessel_fraction)

LAYOUTS = ("ct0_ct23", "studies")
SIDECAR = "phantoms.json"  # generator settings of a dataset folder written by this module


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


# ----------------------------------------------------------------------------- acquisition

def _sample_geometry(rng: np.random.Generator, config: PhantomConfig) -> Geometry:
    """Draw one scan's patient (size, position, fat, inspiration) and acquisition (spacing, slices)."""
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
    return Geometry(shape=(config.size, config.size, nz), spacing=(sxy, sxy, sz),
                    body_centre=(rng.normal(0.0, 8.0), rng.uniform(-10.0, 25.0)), body_axes=(a, b),
                    fat_mm=rng.uniform(3.0, 30.0), muscle_mm=rng.uniform(6.0, 14.0),
                    inspiration=inspiration, lung_mean_hu=lung_mean)


def _affine(rng: np.random.Generator, geom: Geometry) -> np.ndarray:
    """MosMedData-like voxel-to-world matrix: diag(-sx, -sy, sz) with a scanner offset."""
    sx, sy, sz = geom.spacing
    affine = np.diag([-sx, -sy, sz, 1.0])
    centre = (geom.shape[0] - 1) / 2.0
    affine[:3, 3] = [centre * sx + rng.normal(0, 5), centre * sy + rng.normal(0, 5), -rng.uniform(100.0, 400.0)]
    return affine


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

    lung, heart, params = lungs(rng, geom, u, v, z)
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
    soft = rng.uniform(30.0, 50.0) + 10.0 * smooth_noise(rng, geom.shape, (4.0 / sx, 4.0 / sy, 1.0))
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
    texture = (rng.uniform(15.0, 40.0) * smooth_noise(rng, geom.shape, 0.8)
               + rng.uniform(10.0, 30.0) * smooth_noise(rng, geom.shape, (6.0 / sx, 6.0 / sy, 6.0 / sz)))
    parenchyma = texture + dependent
    vessels = vessel_fraction(rng, geom, params) * lung
    vessel_hu = rng.uniform(40.0, 200.0)
    healthy = parenchyma + vessels * (vessel_hu - parenchyma)
    parenchyma += (geom.lung_mean_hu - healthy[lung].mean()) / max(1.0 - float(vessels[lung].mean()), 0.5)

    weight, target, lesion, summary = lesions(rng, category, config.difficulty, geom, lung, posterior)
    parenchyma += weight * (target - parenchyma)  # weight is 0 outside the lung
    parenchyma += vessels * (vessel_hu - parenchyma)  # vessels run through lesions too
    hu = np.where(lung, parenchyma, hu)

    hu = ndimage.gaussian_filter(hu, sigma=(0.5, 0.5, 0.25))  # point-spread function: partial volume at edges
    noise = smooth_noise(rng, geom.shape, (0.6, 0.6, 0.0))
    hu += rng.uniform(*config.noise_std_hu) * noise
    fov = ((np.arange(nx) - centre)[:, None] ** 2 + (np.arange(ny) - centre)[None, :] ** 2) <= (nx / 2.0) ** 2
    hu = np.where(fov[:, :, None], np.clip(np.rint(hu), -1024, 3071), config.pad_value).astype(np.int16)

    affine = _affine(rng, geom)
    n_lung = int(lung.sum())
    info = dict(category=category, **summary,
                involved_fraction=float(lesion.sum()) / max(n_lung, 1), spacing=geom.spacing,
                lung_mask=lung, lesion_mask=lesion)
    return hu, affine, info


# ----------------------------------------------------------------------------- dataset writer

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
