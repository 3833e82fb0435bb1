"""Finding MosMedData layouts by content and labelling their scans."""
from pathlib import Path

import pytest

from utils.data.discovery import CLASS_NAMES, data_line, default_data_dir, discover_scans, find_dataset_root
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
    # class folders doubled by unzipping CT-0.zip / CT-23.zip (Kaggle extracts each into its own folder)
    ({"mosmed/CT-0/CT-0": 3, "mosmed/CT-23/CT-23": 2}, "mosmed", "ct0_ct23", {0: 3, 1: 2}),
    ({"mosmed/ct-0/CT-0": 1, "mosmed/CT-23": 2}, "mosmed", "ct0_ct23", {0: 1, 1: 2}),  # one doubled, one not
    ({"studies/CT-0/CT-0": 2, "studies/CT-3/CT-3": 1}, "studies", "studies", {0: 2, 1: 1}),
    ({"Normal/Normal": 1, "Abnormal/Abnormal": 1}, ".", "normal_abnormal", {0: 1, 1: 1}),
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


def test_doubled_folders_keep_their_class_names(tmp_path):
    make_tree(tmp_path, {"CT-0/CT-0": 2, "CT-23/CT-23": 1})
    records = discover_scans(tmp_path)
    assert [(r.category, r.label, r.path.parent.relative_to(tmp_path).as_posix()) for r in records] == [
        ("CT-0", 0, "CT-0/CT-0"), ("CT-0", 0, "CT-0/CT-0"), ("CT-23", 1, "CT-23/CT-23")]


def test_an_outer_folder_is_doubled_only_with_one_inner_folder_of_its_name_and_no_scans(tmp_path):
    make_tree(tmp_path, {"CT-0": 1, "CT-0/CT-0": 5, "CT-23": 1})  # the outer folder has scans: it is the class folder
    assert len(discover_scans(tmp_path)) == 2
    make_tree(tmp_path / "x", {"CT-0/CT-0": 1, "CT-0/ct-0": 1, "CT-23": 1})  # ambiguous: two inner folders
    with pytest.raises(DataError, match="class folder holds no"):
        discover_scans(tmp_path / "x")


def test_default_data_dir_order(tmp_path):
    repo = tmp_path / "repo"
    kaggle = tmp_path / "kaggle_input"
    assert default_data_dir(repo, kaggle, environ={}) == repo / "data" / "MosMedData"
    make_tree(kaggle, {"other-dataset/tables": 0})
    (kaggle / "other-dataset" / "tables" / "labels.csv").write_text("id,label\n")  # not CT-like: ignored
    (kaggle / "other-dataset" / "tables" / "preview.png").write_bytes(b"x")
    assert default_data_dir(repo, kaggle, environ={}) == repo / "data" / "MosMedData"
    make_tree(kaggle, {"mosmed/CT-0": 1, "mosmed/CT-23": 1})
    assert default_data_dir(repo, kaggle, environ={}) == kaggle / "mosmed"
    chosen = make_tree(tmp_path / "mine", {"Normal": 1, "Abnormal": 1})
    assert default_data_dir(repo, kaggle, environ={"MEDISCOPE_DATA_DIR": str(chosen)}) == chosen
    with pytest.raises(DataError, match="MEDISCOPE_DATA_DIR"):
        default_data_dir(repo, kaggle, environ={"MEDISCOPE_DATA_DIR": str(tmp_path / "missing")})


# ------------------------------------------------------------------------------------------
# Kaggle: /kaggle/input holds other datasets too (the code, the wheels, unrelated data)
# ------------------------------------------------------------------------------------------

def test_ct_like_data_in_no_accepted_layout_is_an_error_naming_what_was_found(tmp_path):
    """Never a silent fall-back to the phantoms when CT data are attached in an unknown layout."""
    kaggle = tmp_path / "input"
    make_tree(kaggle, {"lung-ct/scans/patient1": 2, "lung-ct/scans/patient2": 2})
    (kaggle / "lung-ct" / "scans" / "patient3").mkdir()
    (kaggle / "lung-ct" / "scans" / "patient3" / "IM0001.dcm").write_bytes(b"x")
    with pytest.raises(DataError) as info:
        default_data_dir(tmp_path / "repo", kaggle, environ={})
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(kaggle))
    assert "5 CT-like files" in message
    assert "lung-ct/scans/patient1/study_0000.nii.gz" in message and ", ..." in message  # the first few, sorted
    assert "CT-0/ + CT-23/" in message and "Normal/ + Abnormal/" in message  # the layouts accepted
    assert "MEDISCOPE_DATA_DIR" in message


def test_an_explicit_folder_in_no_layout_names_the_ct_like_files_too(tmp_path):
    make_tree(tmp_path, {"CT-0/series1": 1})  # scans one level too deep: CT-0/ itself holds none
    with pytest.raises(DataError, match=r"no MosMedData scans found, but 1 CT-like files \(e.g. CT-0/series1/"):
        find_dataset_root(tmp_path)


def test_copies_of_this_repository_are_passed_over(tmp_path):
    """The code dataset holds test scans (tests/data) and maybe phantoms: neither is the data."""
    kaggle = tmp_path / "input"
    code = make_tree(kaggle / "mediscope-code" / "MediScopeDiffusion", {"tests/data": 1, "data/MosMedData/CT-0": 1,
                                                                       "data/MosMedData/CT-23": 1})
    (code / "models").mkdir()
    (code / "models" / "diffmic3d.py").write_text("# the model\n")
    assert default_data_dir(tmp_path / "repo", kaggle, environ={}) == tmp_path / "repo" / "data" / "MosMedData"
    make_tree(kaggle, {"mosmed/CT-0/CT-0": 1, "mosmed/CT-23/CT-23": 1})
    assert default_data_dir(tmp_path / "repo", kaggle, environ={}) == kaggle / "mosmed"


def test_data_line_says_which_data_and_whether_real(tmp_path):
    make_tree(tmp_path, {"CT-0": 2, "CT-23": 3})
    records = discover_scans(tmp_path)
    assert data_line(tmp_path, "ct0_ct23", records, synthetic=False) == \
        f"data: MosMedData at {tmp_path} (5 scans, ct0_ct23 layout: CT-0 2, CT-23 3)"
    assert data_line(tmp_path, "ct0_ct23", records, synthetic=True).endswith("-- not real CT")
    assert "synthetic phantoms" in data_line(tmp_path, "ct0_ct23", records, synthetic=True)


def test_the_command_line_prints_the_data_line_or_one_error_line(tmp_path, capsys):
    from utils.data.discovery import main

    kaggle = make_tree(tmp_path / "input", {"mosmed/CT-0/CT-0": 1, "mosmed/CT-23/CT-23": 2})
    assert main(["--kaggle-input", str(kaggle)]) == 0
    assert capsys.readouterr().out == f"data: MosMedData at {kaggle / 'mosmed'} (3 scans, ct0_ct23 layout: CT-0 1, CT-23 2)\n"
    assert main(["--kaggle-input", str(tmp_path / "nothing-attached")]) == 0
    assert "embedded synthetic phantoms -- not real CT" in capsys.readouterr().out
    make_tree(tmp_path / "other", {"x/y": 1})
    assert main(["--kaggle-input", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "x/y/study_0000.nii.gz" in err
