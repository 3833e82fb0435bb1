"""MedMNIST 3D benchmark files (``*.npz``) as a data source, with their official split.

The six MedMNIST v2 3D sets (OrganMNIST3D, NoduleMNIST3D, AdrenalMNIST3D, FractureMNIST3D,
VesselMNIST3D, SynapseMNIST3D; Yang et al., Scientific Data 10, 41, 2023) ship as one
``.npz`` each (side 28, or 64 for the ``*_64.npz`` MedMNIST+ files) with the keys

    train_images (N_train, S, S, S) uint8 0..255    train_labels (N_train, 1) int
    val_images   (N_val,   S, S, S) uint8           val_labels   (N_val, 1)
    test_images  (N_test,  S, S, S) uint8           test_labels  (N_test, 1)

``load_medmnist(path, input_shape)`` reads one, scales the images to float32 [0, 1] (x / 255;
no HU window: these are not Hounsfield units), resizes them with trilinear interpolation
(``torch.nn.functional.interpolate``, ``align_corners=False``; 28 -> 32 is an upsampling) to
``input_shape`` and keeps them in memory as (1, H, W, D), channel first. The number of
classes is ``max(label) + 1`` over all splits; class names come from a small table of the six
sets (matched by file name), else ``'class k'``.

The official split is used as it is (never re-drawn): each volume is a ``ScanRecord`` whose
``path`` is ``<npz resolved>#<split>/<row>``, so the split manifest (``utils.data.splits``
format) lists ``adrenalmnist3d.npz#test/17`` relative to the file's folder.
:class:`MedMNISTDataset` serves them with exactly ``CTDataset``'s items and augmentation.
Every problem with the file (unreadable, missing key, wrong shape or dtype, label count
mismatch) is a one-line ``DataError`` naming it.
"""
from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from utils.data.dataset import CTDataset
from utils.data.discovery import ScanRecord
from utils.errors import DataError
from utils.data.splits import SPLITS, read_manifest, write_manifest

KEYS = tuple(f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels"))
CLASS_NAMES = {  # MedMNIST v2's label tables (medmnist.INFO), adrenal as in the brief of this project
    "organmnist3d": ("liver", "kidney-right", "kidney-left", "femur-right", "femur-left", "bladder", "heart",
                     "lung-right", "lung-left", "spleen", "pancreas"),
    "nodulemnist3d": ("benign", "malignant"),
    "adrenalmnist3d": ("normal", "adrenal mass"),
    "fracturemnist3d": ("buckle rib fracture", "nondisplaced rib fracture", "displaced rib fracture"),
    "vesselmnist3d": ("vessel", "aneurysm"),
    "synapsemnist3d": ("inhibitory synapse", "excitatory synapse"),
}
_CHUNK = 128  # volumes resized at once (bounds the float32 working memory)


def is_medmnist_file(path: str | Path) -> bool:
    """True when ``path`` names an ``.npz`` file (existing or not): the MedMNIST data source."""
    return Path(path).suffix.lower() == ".npz"


def dataset_name(path: str | Path) -> str:
    """``.../adrenalmnist3d_64.npz`` -> ``'adrenalmnist3d'`` (the known set the name starts
    with), else the lower-case file stem."""
    stem = Path(path).stem.lower()
    return next((name for name in CLASS_NAMES if stem.startswith(name)), stem)


def class_names_for(name: str, num_classes: int) -> list[str]:
    """The table's names of set ``name`` when they fit ``num_classes``, else ``'class k'``."""
    names = CLASS_NAMES.get(name)
    if names is not None and len(names) == num_classes:
        return list(names)
    return [f"class {k}" for k in range(num_classes)]


class MedMNISTVolumes:
    """All volumes of one file in memory, served like a ``VolumeCache``: ``get(path)`` is the
    (1, H, W, D) float32 [0, 1] array of the record with that ``path`` (a read-only view)."""

    def __init__(self, paths: Sequence[Path], volumes: np.ndarray):
        self.volumes = volumes  # (N, 1, H, W, D) float32
        self.volumes.setflags(write=False)
        self.index = {str(p): i for i, p in enumerate(paths)}
        self.target_shape = tuple(int(s) for s in volumes.shape[2:])

    def get(self, path: str | Path) -> np.ndarray:
        try:
            return self.volumes[self.index[str(path)]]
        except KeyError:
            raise DataError(path, "not a volume of this MedMNIST file") from None

    def warm(self, paths=(), progress: bool = True) -> None:
        """Nothing to do (everything is in memory); for ``VolumeCache`` compatibility."""


class MedMNISTDataset(CTDataset):
    """``CTDataset`` over in-memory MedMNIST volumes: items ``image`` (1, H, W, D) float32 in
    [0, 1], ``label`` int64 scalar, ``index`` int, ``path`` str (``<file>#<split>/<row>``);
    ``labels``, ``records``, ``set_epoch`` and the train-time augmentation (left-right flips
    along H, optional intensity jitter; a function of (seed, epoch, index)) are CTDataset's.
    Note: MedMNIST volumes are not guaranteed to be in RAS orientation, so "left-right" is
    simply the first spatial axis here."""

    def __init__(self, records: list[ScanRecord], volumes: MedMNISTVolumes, augment: bool = False,
                 seed: int = 0, intensity_jitter: float = 0.0):
        super().__init__(records, volumes, augment=augment, seed=seed, intensity_jitter=intensity_jitter)


@dataclass
class MedMNISTData:
    """One loaded file.

    Attributes:
        path: the resolved ``.npz`` file.
        name: set name (e.g. ``'adrenalmnist3d'``).
        splits: official ``{'train' | 'val' | 'test': [ScanRecord]}`` in file order.
        volumes: the resized volumes of every record.
        class_names: (C,) names, index = label.
        source_shape: (S, S, S) side of the file's volumes.
        md5: checksum of the file.
    """

    path: Path
    name: str
    splits: dict[str, list[ScanRecord]]
    volumes: MedMNISTVolumes
    class_names: list[str]
    source_shape: tuple[int, int, int]
    md5: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def records(self) -> list[ScanRecord]:
        return [r for split in SPLITS for r in self.splits[split]]

    def source_meta(self) -> dict:
        """What a checkpoint records about the training data (``data_source``)."""
        return {"kind": "medmnist", "name": self.name, "file": self.path.name, "md5": self.md5,
                "source_shape": list(self.source_shape), "num_classes": self.num_classes,
                "split_sizes": {s: len(self.splits[s]) for s in SPLITS},
                "preprocessing": "uint8 / 255, trilinear resize (align_corners=False) to input_shape"}


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DataError(path, "MedMNIST file not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in KEYS if k not in npz.files]
            if missing:
                raise DataError(path, f"not a MedMNIST 3D file: missing key(s) {', '.join(missing)} "
                                      f"(has {', '.join(npz.files) or 'none'})")
            return {k: npz[k] for k in KEYS}
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise DataError(path, f"cannot read as a .npz file ({type(exc).__name__}: {exc})") from exc


def _check(path: Path, arrays: dict[str, np.ndarray]) -> tuple[tuple[int, int, int], dict[str, np.ndarray]]:
    """The common (S, S, S) volume shape and the (N,) int64 labels per split, or a DataError."""
    shape = None
    labels = {}
    for split in SPLITS:
        images, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 4 or images.shape[0] == 0 or min(images.shape[1:]) < 2:
            raise DataError(path, f"{split}_images must be (N, H, W, D) with N >= 1, got shape {images.shape}")
        if images.dtype != np.uint8:
            raise DataError(path, f"{split}_images must be uint8 0..255 (MedMNIST), got {images.dtype}")
        if shape is None:
            shape = tuple(int(s) for s in images.shape[1:])
        elif tuple(images.shape[1:]) != shape:
            raise DataError(path, f"{split}_images has volumes of {tuple(images.shape[1:])}, train_images {shape}")
        if not (y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1)) or y.shape[0] != images.shape[0]:
            raise DataError(path, f"{split}_labels must be ({images.shape[0]}, 1) to match {split}_images, "
                                  f"got shape {y.shape}")
        if not np.issubdtype(y.dtype, np.integer) or (y.size and y.min() < 0):
            raise DataError(path, f"{split}_labels must be non-negative integers, got dtype {y.dtype}"
                                  + (f", min {y.min()}" if np.issubdtype(y.dtype, np.number) else ""))
        labels[split] = y.reshape(-1).astype(np.int64)
    return shape, labels


def _resize(images: np.ndarray, input_shape: tuple[int, int, int]) -> np.ndarray:
    """(N, S, S, S) uint8 -> (N, 1, H, W, D) float32 in [0, 1]."""
    out = np.empty((len(images), 1, *input_shape), dtype=np.float32)
    for start in range(0, len(images), _CHUNK):
        x = torch.from_numpy(images[start:start + _CHUNK].astype(np.float32) / 255.0)[:, None]  # (B, 1, S, S, S)
        if tuple(x.shape[2:]) != tuple(input_shape):
            x = F.interpolate(x, size=tuple(input_shape), mode="trilinear", align_corners=False)
        out[start:start + len(x)] = x.clamp_(0.0, 1.0).numpy()
    return out


def load_medmnist(path: str | Path, input_shape: Sequence[int]) -> MedMNISTData:
    """Read a MedMNIST 3D ``.npz``, resize every volume to ``input_shape`` (H, W, D).

    Raises:
        DataError: unreadable file, missing key, wrong shapes / dtypes, fewer than 2 classes.
    """
    path = Path(path).resolve()
    input_shape = tuple(int(s) for s in input_shape)
    arrays = _read_arrays(path)
    shape, labels = _check(path, arrays)
    num_classes = int(max(int(y.max()) for y in labels.values())) + 1
    if num_classes < 2:
        raise DataError(path, f"labels hold only class 0; need at least 2 classes")
    name = dataset_name(path)
    names = class_names_for(name, num_classes)
    splits, volumes = {}, []
    for split in SPLITS:
        splits[split] = [ScanRecord(Path(f"{path}#{split}/{i}"), int(label), f"{split}/{i}", names[label])
                         for i, label in enumerate(labels[split])]
        volumes.append(_resize(arrays[f"{split}_images"], input_shape))
    records = [r for split in SPLITS for r in splits[split]]
    store = MedMNISTVolumes([r.path for r in records], np.concatenate(volumes))
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    return MedMNISTData(path=path, name=name, splits=splits, volumes=store, class_names=names,
                        source_shape=shape, md5=md5)


def official_splits(data: MedMNISTData, manifest_path: str | Path) -> dict[str, list[ScanRecord]]:
    """The file's official split, written to ``manifest_path`` (``path,label,split``; paths
    like ``adrenalmnist3d.npz#test/17`` relative to the file's folder) or, when it exists,
    checked against it.

    Raises:
        DataError: an existing manifest lists other volumes, labels or splits.
    """
    manifest_path = Path(manifest_path)
    folder = data.path.parent
    if not manifest_path.exists():
        write_manifest(data.splits, manifest_path, folder)
        return data.splits
    entries = read_manifest(manifest_path, folder)
    expected = {r.path.resolve(): (r.label, split) for split in SPLITS for r in data.splits[split]}
    if entries != expected:
        differ = sorted(set(entries) ^ set(expected)) or sorted(p for p in expected if entries[p] != expected[p])
        raise DataError(manifest_path, f"does not match the official split of {data.path.name} "
                                       f"(e.g. {differ[0].name}); delete it or use another output folder")
    return data.splits

