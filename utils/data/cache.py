"""On-disk cache of preprocessed volumes, one ``.npy`` file per scan and setting.

Loading a 512 x 512 x 45 NIfTI and resizing it takes about a second; an epoch reads every
scan, so the (1, H, W, D) float32 network input is computed once and stored under
``<root>/<config.key()>/``. Settings therefore live side by side (the default 128x128x64
and a high-resolution 256x256x64 copy for ``roi_scale = 2``), and changing any field of
``PreprocessConfig`` (window, shape, ``anti_alias``, ``target_spacing``) selects a different folder.
The scan's voxel spacing from the loader is passed to ``preprocess`` (used with ``target_spacing``).

A cache file's name holds a hash of the scan's resolved path, size and modification time
(for a DICOM folder: of every file in it), so an edited or replaced scan is recomputed,
never served stale; the superseded file of the same scan is removed. Writes are atomic.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from tqdm.auto import tqdm

from utils.atomic import atomic_path
from utils.data.discovery import study_id_of
from utils.errors import DataError
from utils.data.nifti_io import CTVolume, load_scan
from utils.data.preprocessing import PreprocessConfig, preprocess


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def source_fingerprint(path: Path) -> str:
    """``name:size:mtime_ns`` of a file, or of every file in a DICOM folder.

    Raises:
        DataError: ``path`` does not exist.
    """
    if not path.exists():
        raise DataError(path, "scan not found")
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


class VolumeCache:
    """Preprocessed volumes of one ``PreprocessConfig``, computed on first use.

    Args:
        root: cache folder (the project uses ``data/processed``); one subfolder per config.
        config: preprocessing settings; part of every cache key.
        loader: reads a scan into a ``CTVolume`` (default ``utils.data.nifti_io.load_scan``).
    """

    def __init__(self, root: str | Path, config: PreprocessConfig,
                 loader: Callable[[Path], CTVolume] = load_scan):
        self.root = Path(root)
        self.config = config
        self.loader = loader
        self.folder = self.root / config.key()

    def _stem(self, path: Path) -> str:
        """``<study id>_<hash of resolved path>``, the part shared by every version of a scan."""
        readable = re.sub(r"[^A-Za-z0-9_-]", "_", study_id_of(path))
        return f"{readable}_{_digest(str(path.resolve()))}"

    def cache_path(self, path: str | Path) -> Path:
        """Where the preprocessed copy of the current version of ``path`` lives."""
        path = Path(path)
        return self.folder / f"{self._stem(path)}_{_digest(source_fingerprint(path))}.npy"

    def _read(self, cached: Path) -> np.ndarray | None:
        """The cached array, or ``None`` when absent or not a valid (1, H, W, D) float32 file."""
        try:
            volume = np.load(cached, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None
        if volume.shape != (1, *self.config.target_shape) or volume.dtype != np.float32:
            return None
        return volume

    def get(self, path: str | Path) -> np.ndarray:
        """The (1, H, W, D) float32 preprocessed volume of ``path``, computed if not cached.

        Raises:
            DataError: the scan cannot be loaded (nothing is written then).
        """
        path = Path(path)
        cached = self.cache_path(path)
        volume = self._read(cached) if cached.is_file() else None
        if volume is not None:
            return volume
        scan = self.loader(path)
        volume = preprocess(scan.hu, self.config, spacing=scan.spacing)  # (1, H, W, D)
        with atomic_path(cached) as tmp, open(tmp, "wb") as handle:
            np.save(handle, volume, allow_pickle=False)
        for stale in self.folder.glob(f"{self._stem(path)}_*.npy"):
            if stale != cached:
                stale.unlink(missing_ok=True)
        return volume

    def warm(self, paths: Iterable[str | Path], progress: bool = True) -> None:
        """Compute every missing entry of ``paths`` now (e.g. before the first epoch).

        Raises:
            DataError: one or more scans cannot be loaded; every one is named with its reason
                (all scans are tried first, so one run lists everything to fix).
        """
        paths = list(paths)
        bad: list[DataError] = []
        for path in tqdm(paths, desc=f"cache {self.config.key()}", disable=not progress):
            try:
                self.get(path)
            except DataError as err:
                bad.append(err)
        if len(bad) == 1:
            raise bad[0]
        if bad:
            raise DataError(None, f"{len(bad)} of {len(paths)} scans cannot be used; fix or remove them: "
                                  + "; ".join(map(str, bad)))
