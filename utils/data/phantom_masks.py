"""The lesion mask of an embedded phantom, drawn again for a scan file and put on the input grid.

A folder written by ``utils.data.phantoms`` holds ``phantoms.json`` (seed, layout, generator
settings), and scan ``study_XXXX`` of it is drawn from ``np.random.default_rng([seed, XXXX])``
alone, so the generator gives that scan's lesion mask again exactly. :func:`phantom_scan` finds
the scan's entry (seed, study, category, settings) from its path, :func:`phantom_lesion_mask`
regenerates it (about 1.6 s for a 256 x 256 phantom on one CPU core; none for a normal scan,
whose mask is empty by construction), checks that the regenerated volume equals the file (so a
replaced or edited file gives no mask rather than a wrong one), and maps the mask through the
same reorientation and preprocessing as the scan (:func:`on_input_grid`).

Real scans have no such mask: every function here returns None for a file that is not an
unchanged phantom of a complete generated set.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from utils.data.phantom_anatomy import Difficulty
from utils.data.phantoms import SIDECAR, PhantomConfig, _plan, _settings, generate_phantom
from utils.data.preprocessing import PreprocessConfig, preprocess

SIDECAR_DEPTH = 3  # CT-0/study_0001.nii.gz or studies/CT-1/study_0001.nii.gz: the sidecar is 2 folders up at most


@dataclass(frozen=True)
class PhantomScan:
    """Where a phantom file comes from: ``generate_phantom(default_rng([seed, study]), category, config)``."""

    seed: int
    study: int
    category: int
    config: PhantomConfig


def _config_from_dict(data: dict) -> PhantomConfig:
    """Inverse of ``asdict(PhantomConfig)`` after a JSON round trip (lists back to tuples)."""
    def tuples(d: dict) -> dict:
        return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    fields = tuples(data)
    fields["difficulty"] = Difficulty(**tuples(data["difficulty"]))
    return PhantomConfig(**fields)


def phantom_scan(path: str | Path) -> PhantomScan | None:
    """The generator entry of a phantom file, or None when ``path`` is not a scan of a complete
    phantom set whose settings this version of the generator reproduces."""
    path = Path(path)
    folder = next((p for p in path.parents[:SIDECAR_DEPTH] if (p / SIDECAR).is_file()), None)
    if folder is None:
        return None
    try:
        saved = json.loads((folder / SIDECAR).read_text())
        config = _config_from_dict(saved["config"])
        n, seed, layout = int(saved["n"]), int(saved["seed"]), saved["layout"]
        if not saved.get("complete") or _settings(n, seed, layout, config) != {k: v for k, v in saved.items()
                                                                             if k != "complete"}:
            return None
        plan = _plan(n, layout)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
    relative = path.relative_to(folder).as_posix()
    for study, category, class_folder in plan:
        if relative == f"{class_folder}/study_{study:04d}.nii.gz":
            return PhantomScan(seed=seed, study=study, category=category, config=config)
    return None


def on_input_grid(volume: np.ndarray, affine: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """An (X, Y, Z) array in a scan file's voxel order, reoriented to RAS+ and preprocessed as
    the scan is (``nib.as_closest_canonical``, then ``preprocess`` with the canonical spacing,
    as ``utils.data.nifti_io.load_nifti`` and ``utils.data.cache`` do): (H, W, D) float32 in [0, 1].
    For HU volumes this is exactly the cached network input; a mask goes in as hu_max inside,
    hu_min outside (:func:`phantom_lesion_mask`)."""
    canonical = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(volume, dtype=np.float32), affine))
    spacing = tuple(float(s) for s in nib.affines.voxel_sizes(canonical.affine))
    return preprocess(np.asarray(canonical.dataobj, dtype=np.float32), config, spacing=spacing)[0]  # (H, W, D)


def phantom_lesion_mask(path: str | Path, config: PreprocessConfig | None) -> np.ndarray | None:
    """The (H, W, D) boolean lesion mask of a phantom file on the network input's grid (a voxel
    is lesion when at least half of it is, after the same resampling as the scan), or None
    when it is unknown: ``config`` is None (no scan files, e.g. MedMNIST), the file is not a
    phantom of a complete set (:func:`phantom_scan`), or it differs from what the generator
    draws for it. A normal (category 0) phantom has no lesion: all False, without regenerating.
    """
    scan = None if config is None else phantom_scan(path)
    if scan is None:
        return None
    if scan.category == 0:
        return np.zeros(config.target_shape, dtype=bool)
    hu, affine, info = generate_phantom(np.random.default_rng([scan.seed, scan.study]), scan.category, scan.config)
    image = nib.load(str(path))
    if image.shape != hu.shape or not np.allclose(image.affine, affine) or not np.array_equal(
            np.asarray(image.dataobj), hu):
        return None
    inside = np.where(info["lesion_mask"], config.hu_max, config.hu_min)
    return on_input_grid(inside, image.affine, config) >= 0.5  # the file's affine, as the cache reads it
