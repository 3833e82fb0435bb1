"""Find a MosMedData folder by its content and list its scans with labels.

Three layouts are accepted (folder names case-insensitive, scans ``*.nii.gz`` or ``*.nii``
directly inside each class folder, e.g. ``CT-0/study_0001.nii.gz``):

- ``ct0_ct23``: ``CT-0/`` (normal) beside ``CT-23/`` (abnormal), as in the Keras 3D CT
  example; Kaggle copies may also carry ``CT-1/`` .. ``CT-4/`` siblings.
- ``studies``: the official MosMedData release, ``studies/CT-0`` .. ``studies/CT-4``
  (severity grades: CT-0 no findings, CT-1 <25 %, CT-2 25-50 %, CT-3 50-75 %, CT-4 >75 %
  of the lung affected).
- ``normal_abnormal``: the seed project's ``Normal/`` + ``Abnormal/``.

The dataset root (the folder holding the class folders) is found by content: every NIfTI
file under the search folder whose parent is a class folder votes for its grandparent, so
the data may sit at any depth (``/kaggle/input/<dataset>/<anything>/CT-0``).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from utils.errors import DataError

LABEL_MODES = ("binary", "severity")
CLASS_NAMES = {"binary": ("Normal", "COVID-19"), "severity": ("CT-0", "CT-1", "CT-2", "CT-3", "CT-4")}
DATA_DIR_ENV = "MEDISCOPE_DATA_DIR"
SCAN_SUFFIXES = (".nii.gz", ".nii")

_CT_FOLDER = re.compile(r"^ct-(0|1|2|3|4|23)$", re.IGNORECASE)
_SEED_FOLDERS = {"normal": 0, "abnormal": 1}
_LOOKED_FOR = ("CT-0/ + CT-23/ (or CT-1..CT-4/), studies/CT-0..CT-4/, or Normal/ + Abnormal/ "
               "folders holding *.nii.gz or *.nii scans")


@dataclass(frozen=True)
class ScanRecord:
    """One labelled scan: ``category`` is its class folder's name (``'CT-0'``, ``'Normal'``)."""

    path: Path
    label: int
    study_id: str
    category: str


def is_scan_file(path: Path) -> bool:
    """True for a visible ``*.nii`` / ``*.nii.gz`` file (hidden names are temporary files)."""
    name = path.name.lower()
    return not path.name.startswith(".") and name.endswith(SCAN_SUFFIXES) and path.is_file()


def study_id_of(path: Path) -> str:
    """``study_0001.nii.gz`` -> ``study_0001``."""
    name = path.name
    for suffix in SCAN_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _is_class_folder(name: str) -> bool:
    return bool(_CT_FOLDER.match(name)) or name.lower() in _SEED_FOLDERS


def _layout_of(root: Path, class_folders: list[Path]) -> str:
    if any(_CT_FOLDER.match(folder.name) for folder in class_folders):
        return "studies" if root.name.lower() == "studies" else "ct0_ct23"
    return "normal_abnormal"


def _class_folders(root: Path) -> list[Path]:
    """Class folders directly under ``root`` (with or without scans), sorted by name."""
    return sorted((p for p in root.iterdir() if p.is_dir() and _is_class_folder(p.name)),
                  key=lambda p: p.name.lower())


def find_dataset_root(search_root: str | Path) -> tuple[Path, str]:
    """Return ``(root, layout)`` of the MosMedData copy under ``search_root`` (any depth).

    Among candidate roots the one with the most class folders holding scans wins, then
    the shallowest, then the first in sorted order, so the answer is deterministic.

    Raises:
        DataError: ``search_root`` is not a folder, or no class folder with scans is found.
    """
    search_root = Path(search_root)
    if not search_root.is_dir():
        raise DataError(search_root, "data folder not found")
    found = _search_root(search_root)
    if found is None:
        raise DataError(search_root, f"no MosMedData scans found; looked for {_LOOKED_FOR}")
    return found


def _search_root(search_root: Path) -> tuple[Path, str] | None:
    """``find_dataset_root`` without the errors: ``None`` when nothing is found."""
    votes: dict[Path, set[str]] = {}
    for dirpath, dirnames, filenames in os.walk(search_root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        folder = Path(dirpath)
        if folder == search_root or not _is_class_folder(folder.name):
            continue
        if any(is_scan_file(folder / f) for f in filenames):
            votes.setdefault(folder.parent, set()).add(folder.name.lower())
    if not votes:
        return None
    root = min(votes, key=lambda r: (-len(votes[r]), len(r.parts), str(r)))
    return root, _layout_of(root, _class_folders(root))


def _label_of(category: str, label_mode: str, root: Path, layout: str) -> int:
    ct = _CT_FOLDER.match(category)
    if label_mode == "binary":
        return 0 if category.lower() in ("ct-0", "normal") else 1
    if ct is None or ct.group(1) == "23":
        raise DataError(root, f"severity labels need CT-0..CT-4 folders, but this {layout} layout has "
                              f"folder {category}/ without severity grades; use label_mode='binary'")
    return int(ct.group(1))


def discover_scans(data_dir: str | Path, label_mode: str = "binary") -> list[ScanRecord]:
    """List every scan under ``data_dir`` (the dataset root or any folder above it).

    Args:
        data_dir: folder to search (see ``find_dataset_root``).
        label_mode: ``'binary'`` (CT-0/Normal = 0, any other class = 1, names in
            ``CLASS_NAMES['binary']``) or ``'severity'`` (CT-k = k for k = 0..4).

    Returns:
        Records sorted by path.

    Raises:
        ValueError: unknown ``label_mode``.
        DataError: folder missing, a class folder without scans, only one class present, or
            severity labels asked of a layout without grades (CT-23, Normal/Abnormal).
    """
    if label_mode not in LABEL_MODES:
        raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {label_mode!r}")
    root, layout = find_dataset_root(data_dir)
    records = []
    for folder in _class_folders(root):
        label = _label_of(folder.name, label_mode, root, layout)
        scans = sorted(p for p in folder.iterdir() if is_scan_file(p))
        if not scans:
            raise DataError(folder, "class folder holds no *.nii.gz or *.nii scans")
        records += [ScanRecord(path=p, label=label, study_id=study_id_of(p), category=folder.name)
                    for p in scans]
    labels = {r.label for r in records}
    if len(labels) < 2:
        name = CLASS_NAMES[label_mode][labels.pop()]
        raise DataError(root, f"only one class found ({name}: {len(records)} scans); a classifier "
                              f"needs scans of at least two classes ({_LOOKED_FOR})")
    return sorted(records, key=lambda r: str(r.path))


def default_data_dir(repo_root: str | Path, kaggle_input: str | Path = "/kaggle/input",
                     environ: Mapping[str, str] | None = None) -> Path:
    """Where to read scans from, first match wins.

    1. ``$MEDISCOPE_DATA_DIR`` if set (must exist);
    2. the MosMedData root found under ``kaggle_input`` (an attached Kaggle dataset);
    3. ``<repo_root>/data/MosMedData``, the embedded synthetic phantom set.

    ``environ`` defaults to ``os.environ``; it and ``kaggle_input`` are arguments so the
    choice is testable.
    """
    environ = os.environ if environ is None else environ
    if environ.get(DATA_DIR_ENV):
        chosen = Path(environ[DATA_DIR_ENV]).expanduser()
        if not chosen.is_dir():
            raise DataError(chosen, f"folder named by ${DATA_DIR_ENV} not found")
        return chosen
    kaggle_input = Path(kaggle_input)
    found = _search_root(kaggle_input) if kaggle_input.is_dir() else None
    if found is not None:
        return found[0]
    return Path(repo_root) / "data" / "MosMedData"
