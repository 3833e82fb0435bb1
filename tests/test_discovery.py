"""Finding MosMedData layouts by content and labelling their scans."""
from pathlib import Path

import pytest

from utils.data.discovery import CLASS_NAMES, default_data_dir, discover_scans, find_dataset_root
from utils.errors import DataError


def make_tree(root: Path, folders: dict[str, int]) -> Path:
    """Create ``folder/study_000k.nii.gz`` placeholder files (discovery never opens them)."""
    for folder, count in folders.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for k in range(count):
            (root / folder / f"study_{k:04d}.nii.gz").write_bytes(b"x")
    return root


LAYOUTS = [
    # (folders relative to the search root, expected root, layout, binary label counts)
    ({"CT-0": 3, "CT-23": 2}, ".", "ct0_ct23", {0: 3, 1: 2}),
    ({"CT-0": 2, "CT-1": 1, "CT-23": 2}, ".", "ct0_ct23", {0: 2, 1: 3}),
    ({"MosMedData/studies/CT-0": 2, "MosMedData/studies/CT-2": 1, "MosMedData/studies/CT-4": 1},
     "MosMedData/studies", "studies", {0: 2, 1: 2}),
    ({"Normal": 2, "Abnormal": 3}, ".", "normal_abnormal", {0: 2, 1: 3}),
    ({"normal": 1, "ABNORMAL": 1}, ".", "normal_abnormal", {0: 1, 1: 1}),
    ({"mosmed/v2/data/CT-0": 1, "mosmed/v2/data/CT-23": 1, "other/readme/notes": 0},
     "mosmed/v2/data", "ct0_ct23", {0: 1, 1: 1}),
]


@pytest.mark.parametrize("folders, root, layout, counts", LAYOUTS)
def test_layouts_found_and_labelled(tmp_path, folders, root, layout, counts):
    make_tree(tmp_path, folders)
    found, found_layout = find_dataset_root(tmp_path)
    assert found == tmp_path / root
    assert found_layout == layout
    records = discover_scans(tmp_path)
    assert {label: sum(r.label == label for r in records) for label in counts} == counts
    assert [str(r.path) for r in records] == sorted(str(r.path) for r in records)


def test_record_fields_and_nii_suffix(tmp_path):
    make_tree(tmp_path, {"CT-0": 1, "CT-23": 0})
    (tmp_path / "CT-23" / "study_0999.nii").write_bytes(b"x")
    (tmp_path / "CT-23" / ".study_0998.nii.gz.tmp.nii.gz").write_bytes(b"x")  # half-written temp file
    (tmp_path / "CT-23" / "notes.txt").write_text("not a scan")
    records = discover_scans(tmp_path)
    assert [(r.study_id, r.category, r.label) for r in records] == [("study_0000", "CT-0", 0),
                                                                    ("study_0999", "CT-23", 1)]


def test_severity_labels(tmp_path):
    make_tree(tmp_path / "studies", {"CT-0": 1, "CT-1": 1, "CT-2": 1, "CT-3": 1, "CT-4": 2})
    records = discover_scans(tmp_path, label_mode="severity")
    assert sorted(r.label for r in records) == [0, 1, 2, 3, 4, 4]
    assert {r.category: r.label for r in records} == {f"CT-{k}": k for k in range(5)}
    assert len(CLASS_NAMES["severity"]) == 5
    binary = discover_scans(tmp_path, label_mode="binary")
    assert sorted(r.label for r in binary) == [0, 1, 1, 1, 1, 1]


@pytest.mark.parametrize("folders", [{"CT-0": 1, "CT-23": 1}, {"Normal": 1, "Abnormal": 1}])
def test_severity_on_binary_layout_errors(tmp_path, folders):
    make_tree(tmp_path, folders)
    with pytest.raises(DataError, match="severity"):
        discover_scans(tmp_path, label_mode="severity")


def test_unknown_label_mode(tmp_path):
    make_tree(tmp_path, {"CT-0": 1, "CT-23": 1})
    with pytest.raises(ValueError, match="label_mode"):
        discover_scans(tmp_path, label_mode="multi")


def test_most_complete_root_wins(tmp_path):
    make_tree(tmp_path, {"a/CT-0": 1, "b/CT-0": 1, "b/CT-23": 1})
    assert find_dataset_root(tmp_path)[0] == tmp_path / "b"


def test_missing_folder_errors(tmp_path):
    with pytest.raises(DataError, match="not found") as info:
        discover_scans(tmp_path / "nowhere")
    assert "nowhere" in str(info.value)


def test_nothing_found_lists_what_was_looked_for(tmp_path):
    make_tree(tmp_path, {"images": 2})
    with pytest.raises(DataError) as info:
        find_dataset_root(tmp_path)
    assert "CT-0" in str(info.value) and "Normal" in str(info.value) and "\n" not in str(info.value)


def test_default_data_dir_order(tmp_path):
    repo = tmp_path / "repo"
    kaggle = tmp_path / "kaggle_input"
    assert default_data_dir(repo, kaggle, environ={}) == repo / "data" / "MosMedData"
    make_tree(kaggle, {"other-dataset/images": 2})
    assert default_data_dir(repo, kaggle, environ={}) == repo / "data" / "MosMedData"
    make_tree(kaggle, {"mosmed/CT-0": 1, "mosmed/CT-23": 1})
    assert default_data_dir(repo, kaggle, environ={}) == kaggle / "mosmed"
    chosen = make_tree(tmp_path / "mine", {"Normal": 1, "Abnormal": 1})
    assert default_data_dir(repo, kaggle, environ={"MEDISCOPE_DATA_DIR": str(chosen)}) == chosen
    with pytest.raises(DataError, match="MEDISCOPE_DATA_DIR"):
        default_data_dir(repo, kaggle, environ={"MEDISCOPE_DATA_DIR": str(tmp_path / "missing")})
