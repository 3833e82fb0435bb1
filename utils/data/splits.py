"""Stratified train / validation / test split, saved as a manifest CSV and reused.

The split is drawn once per dataset and seed and then frozen in a manifest, so every model
in a comparison is trained, selected and tested on the same scans; the test split is for
the final report only.

Stratification is done per class, not with ``sklearn.train_test_split``: each class is
shuffled with ``np.random.default_rng(seed)`` and cut into round(n * f) test and val scans
and the rest for training, so class proportions are the same in every split, and on tiny
datasets every class still appears in every split (sklearn refuses or drops a class there).
A class with fewer than three scans cannot be split and raises a ``DataError``.

Manifest: CSV with columns ``path,label,split``. Paths are stored relative to ``data_dir``
(POSIX separators) when given and the scan lies under it, so the manifest survives moving
the data folder or the repository; otherwise the absolute resolved path is stored.
``load_or_create_splits`` reuses an existing manifest only when it lists exactly the
dataset's scans with the same labels; otherwise it raises a ``DataError`` telling the user
to delete the manifest, rather than silently drawing a new split (which could move a
former test scan into training). The seed is only used when a manifest is created.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils.atomic import atomic_write_text
from utils.data.discovery import ScanRecord
from utils.errors import DataError

SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = ("path", "label", "split")


@dataclass(frozen=True)
class SplitConfig:
    """Split proportions and seed.

    Args:
        val_fraction: share of each class for validation (model selection, early stopping).
        test_fraction: share of each class for the final test report.
        seed: seed of the per-class shuffle.
    """

    val_fraction: float = 0.16
    test_fraction: float = 0.20
    seed: int = 0

    def __post_init__(self):
        if not (0 < self.val_fraction < 1 and 0 < self.test_fraction < 1
                and self.val_fraction + self.test_fraction < 1):
            raise ValueError(f"val_fraction ({self.val_fraction}) and test_fraction ({self.test_fraction}) "
                             "must be in (0, 1) and leave scans for training")


def _round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def split_records(records: list[ScanRecord], config: SplitConfig = SplitConfig()) -> dict[str, list[ScanRecord]]:
    """Split ``records`` per class into train / val / test (lists sorted by path).

    Raises:
        DataError: a class has too few scans to appear in all three splits.
    """
    rng = np.random.default_rng(config.seed)
    by_class: dict[int, list[ScanRecord]] = {}
    for record in sorted(records, key=lambda r: str(r.path)):
        by_class.setdefault(record.label, []).append(record)
    splits: dict[str, list[ScanRecord]] = {name: [] for name in SPLITS}
    for label in sorted(by_class):
        members = by_class[label]
        n = len(members)
        n_test = max(1, _round_half_up(n * config.test_fraction))
        n_val = max(1, _round_half_up(n * config.val_fraction))
        if n - n_test - n_val < 1:
            folder = members[0].path.parent
            raise DataError(folder, f"class {members[0].category} (label {label}) has only {n} scans; "
                                    "need at least 3 to put one in each of train, val and test")
        order = rng.permutation(n)
        splits["test"] += [members[i] for i in order[:n_test]]
        splits["val"] += [members[i] for i in order[n_test:n_test + n_val]]
        splits["train"] += [members[i] for i in order[n_test + n_val:]]
    return {name: sorted(items, key=lambda r: str(r.path)) for name, items in splits.items()}


def path_in_data_dir(path: str | Path, data_dir: str | Path | None) -> str:
    """How a CSV of a run names a scan: its POSIX path relative to ``data_dir`` when inside it,
    else its resolved path (``splits.csv``, ``predictions.csv``)."""
    resolved, data_dir = Path(path).resolve(), None if data_dir is None else Path(data_dir)
    if data_dir is not None and resolved.is_relative_to(data_dir.resolve()):
        return resolved.relative_to(data_dir.resolve()).as_posix()
    return str(resolved)


def write_manifest(splits: dict[str, list[ScanRecord]], manifest_path: str | Path,
                   data_dir: str | Path | None = None) -> None:
    """Write ``splits`` as a ``path,label,split`` CSV, atomically."""
    data_dir = None if data_dir is None else Path(data_dir)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    for name in SPLITS:
        for record in splits[name]:
            writer.writerow((path_in_data_dir(record.path, data_dir), record.label, name))
    atomic_write_text(manifest_path, buffer.getvalue())


def read_manifest(manifest_path: str | Path, data_dir: str | Path | None = None) -> dict[Path, tuple[int, str]]:
    """Read a manifest as ``{resolved path: (label, split)}``.

    Raises:
        DataError: unreadable file, wrong columns, bad label or split, repeated path.
    """
    manifest_path = Path(manifest_path)
    base = None if data_dir is None else Path(data_dir).resolve()
    try:
        rows = list(csv.DictReader(io.StringIO(manifest_path.read_text())))
        header = tuple(rows[0].keys()) if rows else ()
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(manifest_path, f"cannot read split manifest ({exc})") from exc
    if header[:3] != MANIFEST_COLUMNS:
        raise DataError(manifest_path, f"split manifest must have columns {','.join(MANIFEST_COLUMNS)} "
                                       "and at least one row; delete it to make a new split")
    entries: dict[Path, tuple[int, str]] = {}
    for line, row in enumerate(rows, start=2):
        stored = Path(row["path"])
        if not stored.is_absolute():
            if base is None:
                raise DataError(manifest_path, f"line {line}: relative path {stored} but no data_dir given")
            stored = base / stored
        split, label = row["split"], row["label"]
        if split not in SPLITS or not label.lstrip("-").isdigit():
            raise DataError(manifest_path, f"line {line}: bad split {split!r} or label {label!r}")
        if stored.resolve() in entries:
            raise DataError(manifest_path, f"line {line}: {row['path']} listed twice")
        entries[stored.resolve()] = (int(label), split)
    return entries


def load_or_create_splits(records: list[ScanRecord], manifest_path: str | Path,
                          seed: int = 0, data_dir: str | Path | None = None,
                          config: SplitConfig | None = None) -> dict[str, list[ScanRecord]]:
    """Reuse the split stored in ``manifest_path`` or draw one and store it.

    Args:
        records: the dataset's scans (``utils.data.discovery.discover_scans``).
        manifest_path: CSV to read or create.
        seed: shuffle seed when a new split is drawn (ignored when the manifest exists).
        data_dir: folder the manifest paths are relative to (see the module docstring).
        config: split fractions; defaults to 64/16/20 with ``seed``.

    Returns:
        ``{'train': [...], 'val': [...], 'test': [...]}`` of the given records.

    Raises:
        DataError: the manifest does not match the dataset (missing or extra scans, changed
            labels) or a class is too small to split.
    """
    manifest_path = Path(manifest_path)
    config = SplitConfig(seed=seed) if config is None else config
    if not manifest_path.exists():
        splits = split_records(records, config)
        write_manifest(splits, manifest_path, data_dir)
        return splits
    entries = read_manifest(manifest_path, data_dir)
    by_path = {record.path.resolve(): record for record in records}
    hint = "delete the manifest to draw a new split"
    missing = sorted(set(entries) - set(by_path))
    if missing:
        raise DataError(manifest_path, f"lists {len(missing)} scans not in the dataset (e.g. {missing[0]}); {hint}")
    extra = sorted(set(by_path) - set(entries))
    if extra:
        raise DataError(manifest_path, f"does not list {len(extra)} scans of the dataset (e.g. {extra[0]}); {hint}")
    changed = sorted(p for p, (label, _) in entries.items() if by_path[p].label != label)
    if changed:
        raise DataError(manifest_path, f"labels differ from the dataset for {len(changed)} scans "
                                       f"(e.g. {changed[0]}); {hint}")
    splits = {name: [] for name in SPLITS}
    for path, (_, split) in entries.items():
        splits[split].append(by_path[path])
    return {name: sorted(items, key=lambda r: str(r.path)) for name, items in splits.items()}
