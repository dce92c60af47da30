"""CT input: DICOM folders and multi-frame files, NIfTI, NRRD and MHA/MHD, into a canonical `CTVolume`."""

from __future__ import annotations

import os
from os import PathLike
from pathlib import Path

import SimpleITK as sitk

from ..errors import CLEARInputError
from .dicom import read_dicom
from .seeds import SEED_COLUMNS, read_seed_table
from .volume import AXIAL_TOLERANCE_DEG, CTVolume

__all__ = [
    "AXIAL_TOLERANCE_DEG",
    "CTVolume",
    "read_ct",
    "write_volume",
    "IMAGE_SUFFIXES",
    "SEED_COLUMNS",
    "read_seed_table",
]

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
# Formats written as one file, so that one rename publishes the whole volume.
SINGLE_FILE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha")


def _is_image_file(path: Path) -> bool:
    return path.name.lower().endswith(IMAGE_SUFFIXES)


def read_ct(
    path: str | PathLike,
    series_uid: str | None = None,
    allow_non_ct: bool = False,
    resample_oblique: bool = False,
) -> CTVolume:
    """Read a CT from a DICOM folder, a multi-frame DICOM file, or a NIfTI/NRRD/MHA/MHD file.

    DICOM folders may hold several series: `series_uid` picks one, otherwise the CT series with the
    most images is read and the choice is logged and kept in `volume.meta["series_choice"]`.
    Bad input raises `CLEARInputError` naming the file and the problem.
    """
    path = Path(path)
    if not path.exists():
        raise CLEARInputError("no such file or folder", path)
    if path.is_dir() or not _is_image_file(path):
        return read_dicom(path, series_uid=series_uid, allow_non_ct=allow_non_ct, resample_oblique=resample_oblique)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unreadable"
        raise CLEARInputError(f"cannot read image file: {first_line}", path) from exc
    meta = {"format": next(suffix for suffix in IMAGE_SUFFIXES if path.name.lower().endswith(suffix)).lstrip(".")}
    if meta["format"] in ("nii", "nii.gz"):
        _refuse_non_finite_nifti(path)
    return CTVolume.from_sitk(image, meta=meta, resample_oblique=resample_oblique, source=path)


def _refuse_non_finite_nifti(path: Path) -> None:
    """ITK's NIfTI reader turns NaN and infinite voxels into 0 without a word, so a broken float NIfTI would
    read as water. nibabel reads the stored values; only float-typed files are checked (CT is mostly int16)."""
    import nibabel as nib
    import numpy as np

    try:
        image = nib.load(str(path))
    except Exception as exc:  # nibabel's own header errors: let ITK's reading report the file
        raise CLEARInputError(f"cannot read the NIfTI header: {exc}", path) from exc
    stored = np.dtype(image.header.get_data_dtype())
    scaled = any(v is not None and not np.isfinite(v) for v in image.header.get_slope_inter())
    if not (np.issubdtype(stored, np.floating) or scaled):
        return
    values = np.asanyarray(image.dataobj)
    bad = int(values.size - np.count_nonzero(np.isfinite(values)))
    if bad:
        raise CLEARInputError(f"{bad} of {values.size} voxels are NaN or infinite; CLEAR does not guess their HU", path)


def write_volume(volume: CTVolume, path: str | PathLike) -> Path:
    """Write a volume as NRRD/NIfTI/MHA (by extension), atomically: temporary file, then rename."""
    path = Path(path)
    if not path.name.lower().endswith(SINGLE_FILE_SUFFIXES):
        raise CLEARInputError(f"unsupported output extension; use one of {', '.join(SINGLE_FILE_SUFFIXES)}", path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same extension at the end so that SimpleITK picks the format; hidden so globs skip it.
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    image = sitk.GetImageFromArray(volume.hu)
    volume._set_sitk_geometry(image)
    try:
        sitk.WriteImage(image, str(tmp), useCompression=True)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
