"""Stratified 64/16/20 splits, determinism, manifest reuse and mismatch errors."""
from pathlib import Path

import pytest

from utils.data.discovery import ScanRecord
from utils.errors import DataError
from utils.data.splits import SPLITS, SplitConfig, load_or_create_splits, split_records


def make_records(root: Path, n_normal: int, n_abnormal: int) -> list[ScanRecord]:
    records = []
    for label, category, n in ((0, "CT-0", n_normal), (1, "CT-23", n_abnormal)):
        for k in range(n):
            path = root / category / f"study_{label}{k:03d}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x")
            records.append(ScanRecord(path, label, path.name[:-7], category))
    return records


def paths(splits):
    return {name: [str(r.path) for r in items] for name, items in splits.items()}


@pytest.mark.parametrize("n_normal, n_abnormal, expected", [
    # per-class counts (train, val, test)
    (100, 100, {0: (64, 16, 20), 1: (64, 16, 20)}),
    (50, 150, {0: (32, 8, 10), 1: (96, 24, 30)}),
    (5, 5, {0: (3, 1, 1), 1: (3, 1, 1)}),
    (3, 7, {0: (1, 1, 1), 1: (5, 1, 1)}),
])
def test_stratified_counts(tmp_path, n_normal, n_abnormal, expected):
    splits = split_records(make_records(tmp_path, n_normal, n_abnormal), SplitConfig(seed=3))
    for label, counts in expected.items():
        assert tuple(sum(r.label == label for r in splits[name]) for name in SPLITS) == counts


def test_no_overlap_and_complete(tmp_path):
    records = make_records(tmp_path, 30, 20)
    splits = split_records(records, SplitConfig(seed=1))
    sets = [set(p) for p in paths(splits).values()]
    assert sum(len(s) for s in sets) == len(records) == len(set.union(*sets))


def test_deterministic_for_a_seed(tmp_path):
    records = make_records(tmp_path, 30, 20)
    assert paths(split_records(records, SplitConfig(seed=7))) == paths(split_records(records[::-1], SplitConfig(seed=7)))
    assert paths(split_records(records, SplitConfig(seed=7))) != paths(split_records(records, SplitConfig(seed=8)))


def test_too_small_class_errors(tmp_path):
    with pytest.raises(DataError, match="only 2 scans") as info:
        split_records(make_records(tmp_path, 2, 10))
    assert "CT-0" in str(info.value)


def test_manifest_created_then_reused(tmp_path):
    records = make_records(tmp_path / "data", 10, 10)
    manifest = tmp_path / "splits.csv"
    first = load_or_create_splits(records, manifest, seed=0, data_dir=tmp_path / "data")
    text = manifest.read_text()
    assert text.splitlines()[0] == "path,label,split"
    assert "CT-0/study_0000.nii.gz" in text and str(tmp_path) not in text  # relative paths
    # a different seed does not redraw: the stored split wins
    again = load_or_create_splits(records, manifest, seed=99, data_dir=tmp_path / "data")
    assert paths(again) == paths(first)
    assert paths(split_records(records, SplitConfig(seed=99))) != paths(first)


def test_manifest_survives_moving_the_data(tmp_path):
    records = make_records(tmp_path / "a", 5, 5)
    first = load_or_create_splits(records, tmp_path / "m.csv", seed=0, data_dir=tmp_path / "a")
    (tmp_path / "a").rename(tmp_path / "b")
    moved = [ScanRecord(tmp_path / "b" / r.path.relative_to(tmp_path / "a"), r.label, r.study_id, r.category)
             for r in records]
    again = load_or_create_splits(moved, tmp_path / "m.csv", seed=0, data_dir=tmp_path / "b")
    assert {k: [r.study_id for r in v] for k, v in again.items()} == {k: [r.study_id for r in v] for k, v in first.items()}


def test_manifest_with_files_not_in_dataset_errors(tmp_path):
    records = make_records(tmp_path / "data", 10, 10)
    manifest = tmp_path / "splits.csv"
    load_or_create_splits(records, manifest, seed=0, data_dir=tmp_path / "data")
    with pytest.raises(DataError, match="not in the dataset.*delete") as info:
        load_or_create_splits(records[1:], manifest, seed=0, data_dir=tmp_path / "data")
    assert "splits.csv" in str(info.value)


def test_manifest_missing_new_scans_errors(tmp_path):
    records = make_records(tmp_path / "data", 10, 10)
    manifest = tmp_path / "splits.csv"
    load_or_create_splits(records[1:], manifest, seed=0, data_dir=tmp_path / "data")
    with pytest.raises(DataError, match="does not list 1 scans"):
        load_or_create_splits(records, manifest, seed=0, data_dir=tmp_path / "data")


def test_manifest_label_change_errors(tmp_path):
    records = make_records(tmp_path / "data", 5, 5)
    manifest = tmp_path / "splits.csv"
    load_or_create_splits(records, manifest, seed=0, data_dir=tmp_path / "data")
    relabelled = [ScanRecord(r.path, 1 - r.label, r.study_id, r.category) for r in records]
    with pytest.raises(DataError, match="labels differ"):
        load_or_create_splits(relabelled, manifest, seed=0, data_dir=tmp_path / "data")


def test_malformed_manifest_errors(tmp_path):
    manifest = tmp_path / "splits.csv"
    manifest.write_text("file,class\na,1\n")
    with pytest.raises(DataError, match="columns"):
        load_or_create_splits(make_records(tmp_path, 5, 5), manifest, seed=0)
