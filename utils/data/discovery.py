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
the data may sit at any depth (``/kaggle/input/<dataset>/<anything>/CT-0``). A class folder
doubled by unzipping (``CT-0/CT-0/*.nii.gz``, as Kaggle extracts an uploaded ``CT-0.zip``) is
the same class folder: it votes for the folder above the outer one.

On Kaggle (:func:`default_data_dir`) copies of this repository under ``/kaggle/input`` (the
code dataset, with its test scans) are passed over, and CT-like files (``CT_LIKE_SUFFIXES``)
that lie in no accepted layout are a ``DataError`` naming some of them, never a silent
fall-back to the phantoms. :func:`data_line` is the line a run prints first about its data;
``python -m utils.data.discovery`` prints it for the data a run would use now (the Kaggle
cell does, before the notebooks). Standard library only.
"""
from __future__ import annotations

import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

from utils.errors import DataError
from utils.paths import EMBEDDED_DATA, REPO_ROOT, display_path

LABEL_MODES = ("binary", "severity")
CLASS_NAMES = {"binary": ("Normal", "COVID-19"), "severity": ("CT-0", "CT-1", "CT-2", "CT-3", "CT-4")}
DATA_DIR_ENV = "MEDISCOPE_DATA_DIR"
SCAN_SUFFIXES = (".nii.gz", ".nii")
CT_LIKE_SUFFIXES = SCAN_SUFFIXES + (".dcm", ".mha", ".mhd", ".nrrd")  # volumetric medical image files
KAGGLE_INPUT = Path("/kaggle/input")

_CT_FOLDER = re.compile(r"^ct-(0|1|2|3|4|23)$", re.IGNORECASE)
_SEED_FOLDERS = {"normal": 0, "abnormal": 1}
_LOOKED_FOR = ("CT-0/ + CT-23/ (or CT-1..CT-4/), studies/CT-0..CT-4/, or Normal/ + Abnormal/ "
               "folders holding *.nii.gz or *.nii scans")
_CODE_MARKER = Path("models") / "diffmic3d.py"  # a folder holding it is a copy of this repository
_EXAMPLES = 3  # CT-like files named when they match no layout


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


def _doubled(folder: Path) -> Optional[Path]:
    """The inner folder of a class folder doubled by unzipping (``CT-0/CT-0/``), else None."""
    if any(is_scan_file(p) for p in folder.iterdir()):
        return None
    inner = [p for p in folder.iterdir() if p.is_dir() and p.name.lower() == folder.name.lower()]
    return inner[0] if len(inner) == 1 else None


def _class_folders(root: Path) -> list[Path]:
    """Class folders directly under ``root`` (with or without scans; of a doubled folder the
    inner one), sorted by name."""
    folders = (p for p in root.iterdir() if p.is_dir() and _is_class_folder(p.name))
    return sorted((_doubled(p) or p for p in folders), key=lambda p: p.name.lower())


@dataclass
class _Found:
    """What a walk over ``search_root`` saw: class folders holding scans (as votes for their
    dataset root) and the CT-like files outside them (how many, the first few)."""

    search_root: Path
    votes: dict[Path, set[str]] = field(default_factory=dict)
    others: int = 0
    examples: list[Path] = field(default_factory=list)

    def root(self) -> Optional[tuple[Path, str]]:
        """(root, layout) of the candidate with the most voting class folders, then the
        shallowest, then the first in sorted order; None without votes."""
        if not self.votes:
            return None
        root = min(self.votes, key=lambda r: (-len(self.votes[r]), len(r.parts), str(r)))
        return root, _layout_of(root, _class_folders(root))

    def unrecognised(self) -> str:
        """``N CT-like files (e.g. a, b, c)``, paths below the search root."""
        shown = ", ".join(str(p.relative_to(self.search_root)) for p in self.examples)
        return f"{self.others} CT-like files (e.g. {shown}{', ...' if self.others > len(self.examples) else ''})"


def _walk(search_root: Path, skip_code: bool) -> _Found:
    """Walk ``search_root`` (sorted; hidden folders and, with ``skip_code``, copies of this
    repository passed over) collecting a :class:`_Found`."""
    found = _Found(search_root)
    for dirpath, dirnames, filenames in os.walk(search_root):
        folder = Path(dirpath)
        if skip_code and (folder / _CODE_MARKER).is_file():
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if folder != search_root and _is_class_folder(folder.name) and any(is_scan_file(folder / f) for f in filenames):
            doubled = folder.parent != search_root and folder.parent.name.lower() == folder.name.lower()
            found.votes.setdefault(folder.parent.parent if doubled else folder.parent, set()).add(folder.name.lower())
            continue
        ct_like = [f for f in sorted(filenames) if f.lower().endswith(CT_LIKE_SUFFIXES) and not f.startswith(".")]
        found.others += len(ct_like)
        found.examples += [folder / f for f in ct_like[: _EXAMPLES - len(found.examples)]]
    return found


def find_dataset_root(search_root: str | Path) -> tuple[Path, str]:
    """Return ``(root, layout)`` of the MosMedData copy under ``search_root`` (any depth).

    Among candidate roots the one with the most class folders holding scans wins, then
    the shallowest, then the first in sorted order, so the answer is deterministic.

    Raises:
        DataError: ``search_root`` is not a folder, or no class folder with scans is found (the
            message names a few CT-like files that lie in no accepted layout, if any).
    """
    search_root = Path(search_root)
    if not search_root.is_dir():
        raise DataError(search_root, "data folder not found")
    found = _walk(search_root, skip_code=False)
    if found.root() is None:
        seen = f", but {found.unrecognised()} in no accepted layout" if found.others else ""
        raise DataError(search_root, f"no MosMedData scans found{seen}; looked for {_LOOKED_FOR}")
    return found.root()


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


def default_data_dir(repo_root: str | Path, kaggle_input: str | Path = KAGGLE_INPUT,
                     environ: Mapping[str, str] | None = None) -> Path:
    """Where to read scans from, first match wins.

    1. ``$MEDISCOPE_DATA_DIR`` if set (must exist);
    2. the MosMedData root found under ``kaggle_input`` (an attached Kaggle dataset; copies of
       this repository there are passed over);
    3. ``<repo_root>/data/MosMedData``, the embedded synthetic phantom set.

    ``environ`` defaults to ``os.environ``; it and ``kaggle_input`` are arguments so the
    choice is testable.

    Raises:
        DataError: ``$MEDISCOPE_DATA_DIR`` names no folder, or ``kaggle_input`` holds CT-like
            files in no accepted layout (a few are named, with the layouts accepted).
    """
    environ = os.environ if environ is None else environ
    if environ.get(DATA_DIR_ENV):
        chosen = Path(environ[DATA_DIR_ENV]).expanduser()
        if not chosen.is_dir():
            raise DataError(chosen, f"folder named by ${DATA_DIR_ENV} not found")
        return chosen
    kaggle_input = Path(kaggle_input)
    found = _walk(kaggle_input, skip_code=True) if kaggle_input.is_dir() else _Found(kaggle_input)
    if found.root() is not None:
        return found.root()[0]
    if found.others:
        raise DataError(kaggle_input, f"holds {found.unrecognised()} in no accepted layout; accepted: {_LOOKED_FOR}; "
                                      "arrange the scans so (e.g. a copy under /kaggle/working) and set "
                                      f"${DATA_DIR_ENV} to it, or detach that dataset to run on the synthetic phantoms")
    return Path(repo_root) / "data" / "MosMedData"


def data_line(root: Path, layout: str, records: Sequence[ScanRecord], synthetic: bool) -> str:
    """The line a run prints first about its data: ``data: MosMedData at /kaggle/input/mosmed
    (1110 scans, ct0_ct23 layout: CT-0 254, CT-23 856)``, or for the phantoms ``data:
    synthetic phantoms at data/MosMedData (100 scans, ...) -- not real CT``."""
    counts = Counter(r.category for r in records)
    per_class = ", ".join(f"{name} {counts[name]}" for name in sorted(counts, key=str.lower))
    what = "synthetic phantoms" if synthetic else "MosMedData"
    return (f"data: {what} at {display_path(root)} ({len(records)} scans, {layout} layout: {per_class})"
            + (" -- not real CT" if synthetic else ""))


def main(argv: Sequence[str] | None = None) -> int:
    """The data line of the data a run would use now: ``$MEDISCOPE_DATA_DIR``, a MosMedData
    copy under ``--kaggle-input``, else the embedded phantoms. Exit status 2 and one ``error:``
    line on standard error when that data cannot be used."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m utils.data.discovery", description=main.__doc__)
    parser.add_argument("--kaggle-input", type=Path, default=KAGGLE_INPUT, help="where attached datasets are")
    args = parser.parse_args(argv)
    try:
        chosen = default_data_dir(REPO_ROOT, args.kaggle_input)
        if chosen == EMBEDDED_DATA:
            print(f"data: no MosMedData attached (nor ${DATA_DIR_ENV} set): the run uses the embedded synthetic "
                  "phantoms -- not real CT")
            return 0
        root, layout = find_dataset_root(chosen)
        records = discover_scans(root)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(data_line(root, layout, records, synthetic=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
