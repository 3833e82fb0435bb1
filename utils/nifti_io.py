"""Load CT volumes (NIfTI file or DICOM series) as HU arrays in canonical RAS+ orientation.

Scanners and converters store the same anatomy with different axis orders and signs:
MosMedData's NIfTI files have a negative x axis (LPS-like), TotalSegmentator's are RAS,
DICOM positions are LPS+. Every loader here reorients to nibabel's closest canonical
orientation (``nib.as_closest_canonical``), so array index increases towards the patient's
Right, Anterior and Superior along axes 0, 1, 2, and downstream code sees one layout.

Validation turns every bad file into a one-line ``DataError`` naming it: missing file,
corrupt or truncated gzip, a non-NIfTI file with a NIfTI name, not 3D, non-finite or
constant voxels, too few voxels. HU plausibility is only a warning (``HUWarning``): real
files hold values up to ~3400 HU (metal, dense bone) and padding down to -2048, so a wide
range is normal; a volume entirely below -500 HU or inside [0, 1] (already normalised, or
not CT at all) is suspicious but may still be intended.
"""
from __future__ import annotations

import gzip
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from utils.atomic import atomic_path
from utils.errors import DataError

MIN_INPLANE = 16  # smallest accepted in-plane size (voxels) of a CT volume
MIN_SLICES = 4  # smallest accepted number of slices
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_READ_ERRORS = (ImageFileError, HeaderDataError, OSError, EOFError, zlib.error, gzip.BadGzipFile,
                ValueError)


class HUWarning(UserWarning):
    """A volume loaded fine but its values do not look like Hounsfield units."""


@dataclass
class CTVolume:
    """A CT volume in canonical RAS+ orientation.

    Attributes:
        hu: (X, Y, Z) float32 Hounsfield units, scanner rescaling (slope/intercept) applied.
        spacing: voxel size in mm along X, Y, Z.
        affine: (4, 4) voxel-to-RAS+-world (mm) matrix of ``hu``.
    """

    hu: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray


def validate_hu(hu: np.ndarray, source: str | Path, min_inplane: int = MIN_INPLANE,
                min_slices: int = MIN_SLICES) -> None:
    """Raise a ``DataError`` naming ``source`` unless ``hu`` is a usable (X, Y, Z) CT volume.

    Args:
        hu: the voxel array.
        source: file or folder the array came from (named in the message).
        min_inplane: smallest accepted size of axes 0 and 1.
        min_slices: smallest accepted size of axis 2.
    """
    if hu.ndim != 3:
        raise DataError(source, f"expected a 3D volume, got a {hu.ndim}D array of shape {hu.shape}")
    if min(hu.shape[:2]) < min_inplane or hu.shape[2] < min_slices:
        raise DataError(source, f"volume of shape {hu.shape} is too small (need at least "
                                f"{min_inplane} x {min_inplane} voxels in-plane and {min_slices} slices)")
    finite = np.isfinite(hu)
    if not finite.all():
        n_nan, n_inf = int(np.isnan(hu).sum()), int(np.isinf(hu).sum())
        raise DataError(source, f"volume has non-finite voxels ({n_nan} NaN, {n_inf} inf)")
    lo, hi = float(hu.min()), float(hu.max())
    if lo == hi:
        raise DataError(source, f"volume is constant (every voxel is {lo:g})")
    if hi < -500 or (lo >= 0 and hi <= 1):
        warnings.warn(f"{source}: values {lo:g}..{hi:g} do not look like CT Hounsfield units",
                      HUWarning, stacklevel=3)


def _canonical(img: nib.Nifti1Image, source: Path, min_inplane: int, min_slices: int) -> CTVolume:
    """Reorient a 3D nibabel image to RAS+, read its scaled data and validate it."""
    try:
        canonical = nib.as_closest_canonical(img)  # reads the data when axes must be flipped
        hu = np.asarray(canonical.dataobj, dtype=np.float32)  # (X, Y, Z), slope/inter applied
    except _READ_ERRORS as exc:
        raise DataError(source, f"cannot read voxel data, file is corrupt or truncated ({exc})") from exc
    validate_hu(hu, source, min_inplane, min_slices)
    spacing = tuple(float(s) for s in nib.affines.voxel_sizes(canonical.affine))
    return CTVolume(hu=hu, spacing=spacing, affine=canonical.affine.copy())


def load_nifti(path: str | Path, min_inplane: int = MIN_INPLANE, min_slices: int = MIN_SLICES) -> CTVolume:
    """Load a ``.nii`` / ``.nii.gz`` CT volume as float32 HU in canonical RAS+ orientation.

    A 4D file whose trailing axes are singletons (X, Y, Z, 1) is squeezed to 3D.

    Raises:
        DataError: missing file, unreadable or non-NIfTI content, not 3D, non-finite or
            constant voxels, or fewer than ``min_inplane`` x ``min_inplane`` x ``min_slices``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "folder given where a NIfTI file was expected" if path.is_dir()
                        else "file not found")
    try:
        img = nib.load(path)
    except _READ_ERRORS as exc:
        raise DataError(path, f"not a readable NIfTI file ({exc})") from exc
    if not isinstance(img, nib.Nifti1Image):  # Nifti2Image subclasses Nifti1Image
        raise DataError(path, f"not a NIfTI image (nibabel read it as {type(img).__name__})")
    img = nib.squeeze_image(img)
    if img.ndim != 3:
        raise DataError(path, f"expected a 3D volume, got a {img.ndim}D image of shape {img.shape}")
    return _canonical(img, path, min_inplane, min_slices)


def _dicom_slices(folder: Path) -> list[pydicom.Dataset]:
    """Read every DICOM image slice in ``folder`` (non-DICOM files are skipped)."""
    slices = []
    for file in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            ds = pydicom.dcmread(file)
        except (pydicom.errors.InvalidDicomError, OSError, EOFError) as exc:
            if file.suffix.lower() == ".dcm":
                raise DataError(file, f"corrupt DICOM file ({exc})") from exc
            continue
        if "PixelData" in ds and "ImagePositionPatient" in ds:
            slices.append(ds)
    return slices


def load_dicom_series(folder: str | Path, min_inplane: int = MIN_INPLANE,
                      min_slices: int = MIN_SLICES) -> CTVolume:
    """Load a folder holding one axial-ish DICOM CT series as float32 HU in RAS+.

    Slices are sorted by their position along the slice normal (the cross product of the
    ImageOrientationPatient row and column cosines), rescaled with RescaleSlope/Intercept,
    and stacked as (column, row, slice). The LPS+ affine is built from the orientation,
    PixelSpacing and the first/last positions (DICOM PS3.3 C.7.6.2.1.1), turned into RAS+
    by negating x and y, then reoriented to canonical like a NIfTI file.

    Raises:
        DataError: no slices, several series, inconsistent slice geometry, or a volume that
            fails ``validate_hu``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, "DICOM series folder not found")
    slices = _dicom_slices(folder)
    if not slices:
        raise DataError(folder, "no DICOM image slices found")
    series = {str(getattr(ds, "SeriesInstanceUID", "")) for ds in slices}
    if len(series) > 1:
        raise DataError(folder, f"holds {len(series)} DICOM series; put each series in its own folder")
    orientation = np.asarray(slices[0].ImageOrientationPatient, dtype=np.float64)
    row_cos, col_cos = orientation[:3], orientation[3:]
    normal = np.cross(row_cos, col_cos)
    slices.sort(key=lambda ds: float(np.dot(np.asarray(ds.ImagePositionPatient, float), normal)))
    positions = np.array([ds.ImagePositionPatient for ds in slices], dtype=np.float64)  # (Z, 3) LPS mm
    steps = np.diff(positions @ normal)
    if steps.size and (np.min(steps) <= 0 or np.ptp(steps) > 0.01 * np.max(steps) + 1e-3):
        raise DataError(folder, f"slices are not evenly spaced (steps {np.min(steps):g}..{np.max(steps):g} mm)")
    shapes = {(int(ds.Rows), int(ds.Columns)) for ds in slices}
    if len(shapes) > 1:
        raise DataError(folder, f"slices have different sizes {sorted(shapes)}")
    # (rows, cols) per slice -> (X=column, Y=row, Z=slice)
    try:
        hu = np.stack([ds.pixel_array.astype(np.float32).T * float(getattr(ds, "RescaleSlope", 1.0))
                       + float(getattr(ds, "RescaleIntercept", 0.0)) for ds in slices], axis=-1)
    except (RuntimeError, NotImplementedError, ValueError) as exc:  # e.g. no codec for compressed data
        raise DataError(folder, f"cannot decode DICOM pixel data ({exc})") from exc
    row_spacing, col_spacing = (float(s) for s in slices[0].PixelSpacing)  # between rows, between columns
    if len(slices) > 1:
        slice_step = (positions[-1] - positions[0]) / (len(slices) - 1)  # LPS mm per slice
    else:
        slice_step = normal * float(getattr(slices[0], "SliceThickness", 1.0))
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_cos * col_spacing  # column index moves along the row direction
    affine_lps[:3, 1] = col_cos * row_spacing
    affine_lps[:3, 2] = slice_step
    affine_lps[:3, 3] = positions[0]
    img = nib.Nifti1Image(hu, _LPS_TO_RAS @ affine_lps)
    return _canonical(img, folder, min_inplane, min_slices)


def load_scan(path: str | Path, min_inplane: int = MIN_INPLANE, min_slices: int = MIN_SLICES) -> CTVolume:
    """Load a NIfTI file (``.nii`` / ``.nii.gz``) or a folder holding a DICOM series."""
    path = Path(path)
    if path.is_dir():
        return load_dicom_series(path, min_inplane, min_slices)
    return load_nifti(path, min_inplane, min_slices)


def save_nifti(path: Path, hu: np.ndarray, affine: np.ndarray) -> None:
    """Write an (X, Y, Z) HU volume as an int16 NIfTI file, atomically.

    Values are rounded to whole HU; the affine is stored as both sform and qform
    (code 1, scanner coordinates), units mm.

    Raises:
        ValueError: ``hu`` not 3D, non-finite, or outside the int16 range; ``affine`` not 4x4.
    """
    hu = np.asarray(hu)
    affine = np.asarray(affine, dtype=np.float64)
    if hu.ndim != 3:
        raise ValueError(f"save_nifti expects an (X, Y, Z) array, got shape {hu.shape}")
    if affine.shape != (4, 4):
        raise ValueError(f"save_nifti expects a 4x4 affine, got shape {affine.shape}")
    if not np.isfinite(hu).all():
        raise ValueError("save_nifti: volume has non-finite values")
    info = np.iinfo(np.int16)
    if hu.min() < info.min or hu.max() > info.max:
        raise ValueError(f"save_nifti: values {hu.min()}..{hu.max()} do not fit int16")
    img = nib.Nifti1Image(np.rint(hu).astype(np.int16), affine)
    img.header.set_xyzt_units("mm")
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
