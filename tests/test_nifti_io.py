"""Loading NIfTI / DICOM CT volumes: orientation, scaling, real scanner files, atomic save."""
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import DATA, toy_ct, write_nifti

from utils.errors import DataError
from utils.data.nifti_io import HUWarning, hu_problem, load_dicom_series, load_nifti, load_scan, save_nifti
from utils.data.preprocessing import PreprocessConfig, preprocess


def test_lps_and_ras_files_load_to_the_same_array(tmp_path):
    hu = toy_ct()
    spacing = (0.7, 0.8, 8.0)
    ras = np.diag([*spacing, 1.0])
    # the same anatomy stored with x and y reversed (MosMedData-style negative x axis)
    lps = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    lps[:3, 3] = [(hu.shape[0] - 1) * spacing[0], (hu.shape[1] - 1) * spacing[1], 0.0]
    a = load_nifti(write_nifti(tmp_path / "ras.nii.gz", hu, ras))
    b = load_nifti(write_nifti(tmp_path / "lps.nii.gz", hu[::-1, ::-1].copy(), lps))
    np.testing.assert_array_equal(a.hu, b.hu)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-5)  # header stores float32
    assert nib.aff2axcodes(b.affine) == ("R", "A", "S")
    np.testing.assert_allclose(b.spacing, spacing, rtol=1e-6)


def test_scale_slope_and_intercept_applied(tmp_path):
    raw = (toy_ct() + 1024) // 2
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_slope_inter(2.0, -1024.0)
    nib.save(img, tmp_path / "scaled.nii")
    volume = load_nifti(tmp_path / "scaled.nii")
    assert volume.hu.dtype == np.float32
    np.testing.assert_array_equal(volume.hu, raw.astype(np.float32) * 2 - 1024)


def test_trailing_singleton_4d_is_squeezed(tmp_path):
    hu = toy_ct()
    volume = load_nifti(write_nifti(tmp_path / "v.nii.gz", hu[..., None]))
    np.testing.assert_array_equal(volume.hu, hu)


def test_real_scanner_nifti_loads_and_preprocesses():
    volume = load_nifti(DATA / "example_ct.nii.gz")
    assert volume.hu.shape == (122, 101, 112)
    assert nib.aff2axcodes(volume.affine) == ("R", "A", "S")
    np.testing.assert_allclose(volume.spacing, (3.0, 3.0, 3.0))
    assert volume.hu.min() == -1207 and volume.hu.max() == 3382
    assert np.mean(volume.hu < -500) > 0.2  # air and lungs
    x = preprocess(volume.hu, PreprocessConfig(target_shape=(64, 64, 32)))
    assert x.shape == (1, 64, 64, 32) and x.dtype == np.float32
    assert x.min() == 0.0 and x.max() == 1.0


def test_real_nifti_reoriented_from_lps_matches(tmp_path):
    img = nib.load(DATA / "example_ct.nii.gz")
    flipped = img.as_reoriented(nib.orientations.axcodes2ornt(("R", "A", "S")) * [[1, -1], [1, -1], [1, 1]])
    assert nib.aff2axcodes(flipped.affine) == ("L", "P", "S")
    nib.save(flipped, tmp_path / "lps.nii.gz")
    np.testing.assert_array_equal(load_nifti(tmp_path / "lps.nii.gz").hu, load_nifti(DATA / "example_ct.nii.gz").hu)


def test_real_dicom_series_loads():
    volume = load_scan(DATA / "example_ct_dicom")
    assert volume.hu.shape == (512, 512, 20)
    # 3 mm thick slices every 2 mm (positions -804.5 .. -766.5): spacing comes from positions
    np.testing.assert_allclose(volume.spacing, (0.9765625, 0.9765625, 2.0), rtol=1e-5)
    assert nib.aff2axcodes(volume.affine) == ("R", "A", "S")
    assert -1100 < volume.hu.min() < -900  # air after RescaleIntercept -1024
    assert 200 < volume.hu.max() < 4000
    # the slice positions in the files run from z = -804.5 to -766.5 mm (LPS z = RAS z)
    np.testing.assert_allclose(volume.affine[2, 3], -804.5)


def test_dicom_matches_slice_order_not_file_order(tmp_path):
    import pydicom
    files = sorted((DATA / "example_ct_dicom").iterdir())[:6]
    for k, file in enumerate(reversed(files)):  # file names now run opposite to the positions
        ds = pydicom.dcmread(file)
        ds.save_as(tmp_path / f"slice_{k:02d}.dcm")
    volume = load_dicom_series(tmp_path)
    positions = [float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in files]
    first = pydicom.dcmread(files[int(np.argmin(positions))])
    expected = first.pixel_array.T.astype(np.float32) + float(first.RescaleIntercept)
    # RAS flips both in-plane axes of the LPS pixel grid
    np.testing.assert_array_equal(volume.hu[..., 0], expected[::-1, ::-1])


def test_non_ct_values_are_refused_or_warn_when_allowed(tmp_path):
    path = write_nifti(tmp_path / "norm.nii.gz", np.random.default_rng(0).random((20, 20, 6)))
    with pytest.raises(DataError, match="no air"):
        load_nifti(path)
    with pytest.warns(HUWarning, match="norm.nii.gz"):
        load_nifti(path, allow_non_hu=True)


def test_real_ct_files_pass_the_hu_gate():
    for path in (DATA / "example_ct.nii.gz", DATA / "example_ct_dicom"):
        assert hu_problem(load_scan(path).hu) is None


def test_save_nifti_roundtrip(tmp_path):
    hu = toy_ct().astype(np.float64) + 0.2
    affine = np.diag([0.7, 0.7, 8.0, 1.0])
    save_nifti(tmp_path / "out.nii.gz", hu, affine)
    img = nib.load(tmp_path / "out.nii.gz")
    assert img.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asarray(img.dataobj), np.rint(hu))
    np.testing.assert_allclose(img.affine, affine)
    assert [p.name for p in tmp_path.iterdir()] == ["out.nii.gz"]


@pytest.mark.parametrize("hu, match", [
    (np.zeros((20, 20)), "X, Y, Z"),
    (np.full((20, 20, 5), 40000.0), "int16"),
    (np.full((20, 20, 5), np.nan), "non-finite"),
])
def test_save_nifti_rejects(tmp_path, hu, match):
    with pytest.raises(ValueError, match=match):
        save_nifti(tmp_path / "bad.nii.gz", hu, np.eye(4))
    assert list(tmp_path.iterdir()) == []


def test_save_nifti_atomic_when_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "scan.nii.gz"

    def failing_save(img, path):
        Path(path).write_bytes(b"\x1f\x8b half a file")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_nifti(target, toy_ct(), np.eye(4))
    assert list(tmp_path.iterdir()) == []
