"""Every kind of bad input gives a one-line DataError naming the file, and writes nothing."""
import gzip
from pathlib import Path

import numpy as np
import pytest
from helpers import toy_ct, write_nifti

from utils.data.cache import VolumeCache
from utils.data.discovery import discover_scans
from utils.errors import DataError
from utils.data.nifti_io import load_dicom_series, load_nifti, load_scan
from utils.data.preprocessing import PreprocessConfig


def assert_one_line_error(info, name: str) -> None:
    message = str(info.value)
    assert name in message, message
    assert "\n" not in message, message


def truncated(tmp_path: Path) -> Path:
    good = write_nifti(tmp_path / "good.nii.gz",
                       np.random.default_rng(0).integers(-1000, 1000, (40, 40, 20)).astype(np.int16))
    data = good.read_bytes()
    path = tmp_path / "truncated.nii.gz"
    path.write_bytes(data[: int(len(data) * 0.6)])  # header intact, voxel data cut off
    return path


def text_named_nifti(tmp_path: Path) -> Path:
    path = tmp_path / "notes.nii.gz"
    path.write_text("patient list, not an image\n")
    return path


def gzipped_text(tmp_path: Path) -> Path:
    path = tmp_path / "archive.nii.gz"
    path.write_bytes(gzip.compress(b"definitely not a NIfTI header " * 40))
    return path


def array_file(name: str, array: np.ndarray):
    return lambda tmp_path: write_nifti(tmp_path / name, array)


def nan_volume():
    hu = toy_ct().astype(np.float32)
    hu[3, 4, 5] = np.nan
    return hu


def inf_volume():
    hu = toy_ct().astype(np.float32)
    hu[1, 2, 3] = np.inf
    return hu


BAD_FILES = [
    # (id, make(tmp_path) -> path, words expected in the message)
    ("truncated", truncated, "corrupt or truncated"),
    ("text-with-nifti-name", text_named_nifti, "not a readable NIfTI"),
    ("gzipped-non-nifti", gzipped_text, "not a readable NIfTI"),
    ("2d", array_file("flat.nii.gz", toy_ct()[:, :, 0]), "3D"),
    ("4d", array_file("series.nii.gz", np.stack([toy_ct(), toy_ct(seed=1)], axis=-1)), "3D"),
    ("nan", array_file("nan.nii.gz", nan_volume()), "1 NaN"),
    ("inf", array_file("inf.nii.gz", inf_volume()), "1 inf"),
    ("constant", array_file("constant.nii.gz", np.full((20, 20, 6), -1000, np.int16)), "constant"),
    ("tiny", array_file("tiny.nii.gz", toy_ct()[:4, :4, :2]), "too small"),
    ("one-slice", array_file("slab.nii.gz", toy_ct()[:, :, :1]), "too small"),
    ("missing", lambda tmp_path: tmp_path / "missing.nii.gz", "not found"),
]


@pytest.mark.parametrize("make, words", [case[1:] for case in BAD_FILES], ids=[case[0] for case in BAD_FILES])
def test_bad_file_gives_one_line_error(tmp_path, make, words):
    path = make(tmp_path)
    with pytest.raises(DataError, match=words) as info:
        load_nifti(path)
    assert_one_line_error(info, path.name)


@pytest.mark.parametrize("make", [case[1] for case in BAD_FILES], ids=[case[0] for case in BAD_FILES])
def test_cache_writes_nothing_for_bad_file(tmp_path, make):
    path = make(tmp_path)
    processed = tmp_path / "processed"
    with pytest.raises(DataError):
        VolumeCache(processed, PreprocessConfig(target_shape=(16, 16, 8))).get(path)
    assert not processed.exists() or not any(p.is_file() for p in processed.rglob("*"))


def test_minimum_size_is_a_parameter(tmp_path):
    path = write_nifti(tmp_path / "small.nii.gz", toy_ct()[:8, :8, :3])
    with pytest.raises(DataError, match="too small"):
        load_nifti(path)
    assert load_nifti(path, min_inplane=8, min_slices=3).hu.shape == (8, 8, 3)


def test_folder_given_as_nifti(tmp_path):
    with pytest.raises(DataError, match="folder") as info:
        load_nifti(tmp_path)
    assert_one_line_error(info, tmp_path.name)


def test_folder_without_dicom(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="not readable DICOM: readme.txt") as info:
        load_scan(tmp_path)  # a file that is not DICOM is named, never skipped
    assert_one_line_error(info, tmp_path.name)
    (tmp_path / "readme.txt").unlink()
    with pytest.raises(DataError, match="no DICOM image slices"):
        load_scan(tmp_path)
    with pytest.raises(DataError, match="not found"):
        load_dicom_series(tmp_path / "absent")


def test_folder_with_no_scans(tmp_path):
    for folder in ("CT-0", "CT-23"):
        (tmp_path / folder).mkdir()
    (tmp_path / "CT-0" / "study_0001.nii.gz").write_bytes(b"x")
    (tmp_path / "CT-23" / "readme.txt").write_text("scans not downloaded")
    with pytest.raises(DataError, match="no .*scans") as info:
        discover_scans(tmp_path)
    assert_one_line_error(info, "CT-23")


def test_empty_data_folder(tmp_path):
    with pytest.raises(DataError, match="no MosMedData scans") as info:
        discover_scans(tmp_path)
    assert_one_line_error(info, tmp_path.name)


def test_folder_with_one_class_only(tmp_path):
    (tmp_path / "CT-0").mkdir()
    for k in range(3):
        (tmp_path / "CT-0" / f"study_{k:04d}.nii.gz").write_bytes(b"x")
    with pytest.raises(DataError, match=r"only one class found \(Normal: 3 scans\)") as info:
        discover_scans(tmp_path)
    assert_one_line_error(info, tmp_path.name)


# DICOM series with a bad file ------------------------------------------------------------------

DICOM = Path(__file__).resolve().parent / "data" / "example_ct_dicom"


def copy_series(dest: Path, n: int = 8) -> list[Path]:
    dest.mkdir()
    files = sorted(DICOM.iterdir())[:n]
    for f in files:
        (dest / f.name).write_bytes(f.read_bytes())
    return sorted(dest.iterdir())


@pytest.mark.parametrize("where", ["edge", "middle"])
def test_an_unreadable_slice_without_dcm_suffix_is_named(tmp_path, where):
    files = copy_series(tmp_path / "series")
    victim = files[0] if where == "edge" else files[4]
    renamed = victim.with_name("slice_no_suffix")
    renamed.write_bytes(victim.read_bytes()[:300])  # truncated, and not called *.dcm
    victim.unlink()
    with pytest.raises(DataError, match="not readable DICOM: slice_no_suffix") as info:
        load_scan(tmp_path / "series")
    assert_one_line_error(info, "series")


def test_a_missing_middle_slice_names_the_gap(tmp_path):
    import pydicom
    files = copy_series(tmp_path / "series")
    by_position = sorted(files, key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))
    by_position[4].unlink()
    with pytest.raises(DataError, match=rf"between {by_position[3].name} and {by_position[5].name}") as info:
        load_scan(tmp_path / "series")
    assert_one_line_error(info, "series")


# not Hounsfield units -------------------------------------------------------------------------------


@pytest.mark.parametrize("name, values", [
    ("uint8.nii.gz", lambda ct: np.clip((ct + 1000) / 8, 0, 255).astype(np.uint8)),  # an 8-bit image of a CT
    ("raw.nii.gz", lambda ct: (ct + 1024).astype(np.int16)),  # stored values, the -1024 intercept not applied
    ("norm.nii.gz", lambda ct: ((ct - ct.min()) / np.ptp(ct)).astype(np.float32)),  # normalised to [0, 1]
    ("twice.nii.gz", lambda ct: (ct - 2048).astype(np.int16)),  # rescaled twice: nothing above -200
])
def test_a_volume_not_in_hu_is_refused_with_the_reason(tmp_path, name, values):
    path = write_nifti(tmp_path / name, values(toy_ct().astype(np.float64)))
    with pytest.raises(DataError, match="not a CT in Hounsfield units.*--allow-non-hu") as info:
        load_scan(path)
    assert_one_line_error(info, name)
    with pytest.warns(UserWarning, match="not a CT in Hounsfield units"):
        load_scan(path, allow_non_hu=True)


# a dataset with bad scans -------------------------------------------------------------------------


def test_bad_scans_stop_the_run_before_the_split_manifest_and_are_all_named(tmp_path):
    from utils.data.phantoms import PhantomConfig, write_dataset
    from utils.experiment import prepare_experiment
    from utils.training.profiles import get_profile

    config = get_profile("smoke", progress=False)
    paths = write_dataset(tmp_path / "data", 12, seed=0, config=PhantomConfig(size=config.phantom_size), progress=False)
    paths[2].write_bytes(b"not a scan")
    paths[7].write_bytes(gzip.compress(b"\x00" * 400))
    run = tmp_path / "run"
    with pytest.raises(DataError, match="2 of 12 scans cannot be used") as info:
        prepare_experiment(config, run, tmp_path / "data", tmp_path / "cache", "cpu", verbose=False)
    assert paths[2].name in str(info.value) and paths[7].name in str(info.value)
    assert "\n" not in str(info.value)
    assert not (run / "splits.csv").exists()  # nothing frozen yet: removing the bad scans is the whole fix
    paths[2].unlink()
    paths[7].unlink()
    exp = prepare_experiment(config, run, tmp_path / "data", tmp_path / "cache", "cpu", verbose=False)
    assert (run / "splits.csv").is_file() and len(exp.records) == 10
