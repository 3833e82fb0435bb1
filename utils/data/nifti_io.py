"""Load CT volumes (NIfTI file or DICOM series) as HU arrays in canonical RAS+ orientation.

Scanners and converters store the same anatomy with different axis orders and signs:
MosMedData's NIfTI files have a negative x axis (LPS-like), TotalSegmentator's are RAS,
DICOM positions are LPS+. Every loader here reorients to nibabel's closest canonical
orientation (``nib.as_closest_canonical``), so array index increases towards the patient's
Right, Anterior and Superior along axes 0, 1, 2, and downstream code sees one layout.

Validation turns every bad file into a one-line ``DataError`` naming it: missing file,
corrupt or truncated gzip, a non-NIfTI file with a NIfTI name, not 3D, non-finite or
constant voxels, too few voxels, an unreadable file in a DICOM series folder, and values that
are not Hounsfield units (:func:`hu_problem`: a chest CT has air, below -500 HU, around the
body and in the lungs, and soft tissue above -200 HU; an 8-bit or normalised image, or raw
stored values without the rescale, has neither). Real files hold values up to ~3400 HU
(metal, dense bone) and padding down to -3024, so a wide range itself is normal. With
``allow_non_hu=True`` a non-HU volume loads with an ``HUWarning`` instead (``utils.predict
--allow-non-hu`` then marks its prediction out-of-distribution).
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


AIR_HU, MIN_AIR_FRACTION = -500.0, 0.01  # at least 1% of voxels are air in a chest CT
TISSUE_HU = -200.0  # and some voxel is soft tissue or denser


def hu_problem(hu: np.ndarray) -> str | None:
    """Why ``hu`` does not look like a chest CT in Hounsfield units, or None when it does."""
    lo, hi = float(hu.min()), float(hu.max())
    air = float(np.mean(hu < AIR_HU))
    if air < MIN_AIR_FRACTION:
        return (f"values {lo:g}..{hi:g} with {100 * air:.2g}% of voxels below {AIR_HU:g} HU: no air, so not a CT in "
                "Hounsfield units (an 8-bit or normalised image, or stored values without RescaleSlope/Intercept?)")
    if hi < TISSUE_HU:
        return (f"values {lo:g}..{hi:g}: nothing above {TISSUE_HU:g} HU (no soft tissue), so not a CT in "
                "Hounsfield units (rescaled twice?)")
    return None


def validate_hu(hu: np.ndarray, source: str | Path, min_inplane: int = MIN_INPLANE,
                min_slices: int = MIN_SLICES, allow_non_hu: bool = False) -> None:
    """Raise a ``DataError`` naming ``source`` unless ``hu`` is a usable (X, Y, Z) CT volume.

    Args:
        hu: the voxel array.
        source: file or folder the array came from (named in the message).
        min_inplane: smallest accepted size of axes 0 and 1.
        min_slices: smallest accepted size of axis 2.
        allow_non_hu: a volume failing :func:`hu_problem` only warns (``HUWarning``).
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
    problem = hu_problem(hu)
    if problem is not None and not allow_non_hu:
        raise DataError(source, problem + "; to predict anyway, marked out-of-distribution: --allow-non-hu")
    if problem is not None:
        warnings.warn(f"{source}: {problem}", HUWarning, stacklevel=3)


def _canonical(img: nib.Nifti1Image, source: Path, min_inplane: int, min_slices: int,
               allow_non_hu: bool = False) -> CTVolume:
    """Reorient a 3D nibabel image to RAS+, read its scaled data and validate it."""
    try:
        canonical = nib.as_closest_canonical(img)  # reads the data when axes must be flipped
        hu = np.asarray(canonical.dataobj, dtype=np.float32)  # (X, Y, Z), slope/inter applied
    except _READ_ERRORS as exc:
        raise DataError(source, f"cannot read voxel data, file is corrupt or truncated ({exc})") from exc
    validate_hu(hu, source, min_inplane, min_slices, allow_non_hu)
    spacing = tuple(float(s) for s in nib.affines.voxel_sizes(canonical.affine))
    return CTVolume(hu=hu, spacing=spacing, affine=canonical.affine.copy())


def load_nifti(path: str | Path, min_inplane: int = MIN_INPLANE, min_slices: int = MIN_SLICES,
               allow_non_hu: bool = False) -> CTVolume:
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
    return _canonical(img, path, min_inplane, min_slices, allow_non_hu)


def _dicom_slices(folder: Path) -> list[tuple[Path, pydicom.Dataset]]:
    """(file, dataset) of every DICOM image slice in ``folder``. Every visible file must be
    readable DICOM image slice (files without the 128-byte preamble are read with
    ``force=True``; a ``DICOMDIR`` is left out); the ones that are not, e.g. truncated (no
    pixel data) or not DICOM at all, are named in one error, never skipped silently."""
    slices, unreadable = [], []
    for file in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            ds = pydicom.dcmread(file)
        except pydicom.errors.InvalidDicomError:
            try:
                ds = pydicom.dcmread(file, force=True)
            except Exception:  # noqa: BLE001 - any failure means "not readable DICOM"; named below
                ds = None
            if ds is None or not ("PixelData" in ds or "SOPClassUID" in ds):
                unreadable.append(file.name)
                continue
        except (OSError, EOFError, ValueError, TypeError, AttributeError) as exc:
            unreadable.append(f"{file.name} ({type(exc).__name__})")
            continue
        if file.name.upper() == "DICOMDIR":
            continue  # the media directory of a DICOM file set, not an image
        if "PixelData" not in ds or "ImagePositionPatient" not in ds:
            unreadable.append(f"{file.name} (no {'PixelData' if 'PixelData' not in ds else 'ImagePositionPatient'}:"
                              " truncated, or not an image slice)")
            continue
        slices.append((file, ds))
    if unreadable:
        shown = ", ".join(unreadable[:5]) + (f" and {len(unreadable) - 5} more" if len(unreadable) > 5 else "")
        raise DataError(folder, f"{len(unreadable)} file(s) in the series folder are not readable DICOM: {shown}; "
                                "remove them or repair them")
    return slices


def load_dicom_series(folder: str | Path, min_inplane: int = MIN_INPLANE,
                      min_slices: int = MIN_SLICES, allow_non_hu: bool = False) -> CTVolume:
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
    files_and_slices = _dicom_slices(folder)
    if not files_and_slices:
        raise DataError(folder, "no DICOM image slices found")
    slices = [ds for _, ds in files_and_slices]
    series = {str(getattr(ds, "SeriesInstanceUID", "")) for ds in slices}
    if len(series) > 1:
        raise DataError(folder, f"holds {len(series)} DICOM series; put each series in its own folder")
    orientation = np.asarray(slices[0].ImageOrientationPatient, dtype=np.float64)
    row_cos, col_cos = orientation[:3], orientation[3:]
    normal = np.cross(row_cos, col_cos)
    files_and_slices.sort(key=lambda fd: float(np.dot(np.asarray(fd[1].ImagePositionPatient, float), normal)))
    names = [file.name for file, _ in files_and_slices]
    slices = [ds for _, ds in files_and_slices]
    positions = np.array([ds.ImagePositionPatient for ds in slices], dtype=np.float64)  # (Z, 3) LPS mm
    steps = np.diff(positions @ normal)
    if steps.size and np.min(steps) <= 0:
        i = int(np.argmin(steps))
        raise DataError(folder, f"{names[i]} and {names[i + 1]} lie at the same position (a duplicated slice?)")
    if steps.size and np.ptp(steps) > 0.01 * np.max(steps) + 1e-3:
        i = int(np.argmax(steps))
        raise DataError(folder, f"slices are not evenly spaced: {steps[i]:g} mm between {names[i]} and {names[i + 1]}, "
                                f"{float(np.median(steps)):g} mm typically (a missing or unreadable slice?)")
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
    return _canonical(img, folder, min_inplane, min_slices, allow_non_hu)


def load_scan(path: str | Path, min_inplane: int = MIN_INPLANE, min_slices: int = MIN_SLICES,
              allow_non_hu: bool = False) -> CTVolume:
    """Load a NIfTI file (``.nii`` / ``.nii.gz``) or a folder holding a DICOM series."""
    path = Path(path)
    if path.is_dir():
        return load_dicom_series(path, min_inplane, min_slices, allow_non_hu)
    return load_nifti(path, min_inplane, min_slices, allow_non_hu)


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
