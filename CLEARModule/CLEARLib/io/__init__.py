"""CT input: DICOM folders and multi-frame files, NIfTI, NRRD and MHA/MHD, into a canonical `CTVolume`."""

from __future__ import annotations

from os import PathLike
from pathlib import Path

import SimpleITK as sitk

from ..errors import CLEARInputError
from ..files import atomic_path
from .dicom import read_dicom
from .seeds import SEED_COLUMNS, read_seed_table
from .volume import AXIAL_TOLERANCE_DEG, CTVolume

__all__ = [
    "AXIAL_TOLERANCE_DEG",
    "refuse_label_map",
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
    _confine_detached_data(path)
    _check_header_before_reading(path)
    meta = {"format": next(suffix for suffix in IMAGE_SUFFIXES if path.name.lower().endswith(suffix)).lstrip(".")}
    if meta["format"] in ("nii", "nii.gz"):
        _check_nifti(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        last_line = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unreadable"
        if meta["format"] in ("mha", "mhd") and "No such file" in last_line:  # MetaIO's words for short data
            last_line = "the voxel data is unreadable or shorter than the header declares"
        raise CLEARInputError(f"cannot read image file: {last_line}", path) from exc
    volume = CTVolume.from_sitk(image, meta=meta, resample_oblique=resample_oblique, source=path)
    if min(volume.shape) < 2:  # as for DICOM series: a single slice or voxel is not a CT volume to score
        problem = f"shape (z, y, x) {volume.shape}: a CT volume needs at least 2 voxels on every axis"
        raise CLEARInputError(problem, path)
    if not allow_non_ct:  # DICOM says its modality; an image file does not, so its values must
        refuse_label_map(volume, path)
    return volume


# A label map or mask holds a few small non-negative integers; a CT in HU holds air (about -1000) and
# hundreds of distinct values even when cropped to one organ.
_LABEL_MAP_MAX_VALUES = 64


def refuse_label_map(volume: CTVolume, source=None) -> None:
    """Raise `CLEARInputError` when the voxels look like a label map or mask (integers in 0..255, at most 64
    distinct values), not CT in HU: scoring one gives a confident, meaningless answer."""
    import numpy as np

    hu = volume.hu
    low, high = float(hu.min()), float(hu.max())
    if low < 0 or high > 255:
        return
    if np.issubdtype(hu.dtype, np.floating) and not np.array_equal(hu, np.round(hu)):
        return
    distinct = int(np.count_nonzero(np.bincount(hu.astype(np.int64).ravel(), minlength=1)))
    if distinct <= _LABEL_MAP_MAX_VALUES:
        raise CLEARInputError(
            f"this looks like a label map or mask, not a CT in HU: {distinct} distinct integer values in "
            f"{low:.0f}..{high:.0f} and no air (about -1000 HU)",
            source if source is not None else volume.meta.get("source"),
        )


# The largest CTs (512 x 512 x 4,000 slices) hold about 1e9 voxels; a header that declares more than twice
# that is refused before a compressed file inflates (a 6 MB gzip NRRD can hold 6 GiB of zeros).
MAX_VOXELS = 2_000_000_000


def _check_header_before_reading(path: Path) -> None:
    """What the header says, checked before the voxels are read: their number, and (MetaImage) spacing signs
    that ITK would drop (a negative spacing is a flip; CLEAR will not guess which)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        message = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unreadable"
        raise CLEARInputError(f"cannot read image file: {message}", path) from exc
    n_voxels = 1
    for size in reader.GetSize():
        n_voxels *= int(size)
    if n_voxels > MAX_VOXELS:
        raise CLEARInputError(f"the header declares {n_voxels} voxels ({reader.GetSize()}), more than any CT", path)
    if path.name.lower().endswith((".mha", ".mhd")):
        fields = _text_header(path)
        for name in ("ElementSpacing", "ElementSize"):
            value = fields.get(name.lower(), "")
            if any(v.startswith("-") for v in value.split()):
                raise CLEARInputError(f"negative {name} {value}: a flip that ITK drops", path)


def _text_header(path: Path) -> dict[str, str]:
    """The fields of a MetaImage (`Key = value`, .mha/.mhd) or detached NRRD (`key: value`, .nhdr) header,
    keys lowercased, read up to the voxel data (at most 64 KiB)."""
    metaimage = path.name.lower().endswith((".mha", ".mhd"))
    try:
        with open(path, "rb") as f:
            text = f.read(65536).decode("latin-1")
    except OSError as exc:
        raise CLEARInputError(f"cannot read the header: {exc.strerror}", path) from exc
    fields = {}
    for line in text.splitlines():
        if not metaimage and not line.strip():
            break  # NRRD: a blank line ends the header
        name, sep, value = line.partition("=" if metaimage else ":")
        if sep:
            fields[name.strip().lower()] = value.strip()
        if metaimage and name.strip().lower() == "elementdatafile":
            break  # MetaImage: the last field; with LOCAL the voxels follow
    return fields


def _confine_detached_data(path: Path) -> None:
    """A .mhd or .nhdr header names its voxel file: it must be a regular file beside the header (or below
    it), never an absolute path, a way out of the folder, or a pipe that would block the read forever."""
    lower = path.name.lower()
    if not lower.endswith((".mhd", ".nhdr")):
        return
    fields = _text_header(path)
    value = fields.get("elementdatafile") if lower.endswith(".mhd") else fields.get("data file", fields.get("datafile"))
    if value is None or value.upper() == "LOCAL":  # no data file named (ITK reports it), or voxels in this file
        return
    if value.upper().startswith("LIST") or "%" in value:
        raise CLEARInputError(f"data file {value!r} is not supported; give one data file beside the header", path)
    data = (path.parent / value).resolve()
    if Path(value).is_absolute() or path.parent.resolve() not in data.parents:
        raise CLEARInputError(f"the header's data file {value!r} lies outside the header's folder", path)
    if not data.is_file():
        raise CLEARInputError(f"the header's data file {value!r} is missing or not a regular file", path)


def _check_nifti(path: Path) -> None:
    """What ITK's NIfTI reader lets through without a word, checked on the header nibabel reads once: voxel
    data cut short, no geometry, NaN or infinite values."""
    import nibabel as nib

    try:
        image = nib.load(str(path))
    except Exception as exc:  # nibabel's own header errors name the problem
        raise CLEARInputError(f"cannot read the NIfTI header: {exc}", path) from exc
    _refuse_incomplete_nifti(image.header, path)
    _refuse_non_finite_nifti(image, path)


def _refuse_incomplete_nifti(header, path: Path) -> None:
    """ITK reads a NIfTI file whose voxel data stops early (a cut download or copy) and fills the rest with
    zeros, so the volume's top half would be water. The header says how many bytes follow it; they must all
    be there (for .nii.gz, decompressed: a stream read, never held in memory)."""
    import gzip
    import zlib

    import numpy as np

    expected = int(header.get_data_offset()) + int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize
    if path.name.lower().endswith(".gz"):
        available = 0
        try:
            with gzip.open(path, "rb") as stream:
                while available < expected and (chunk := stream.read(min(1 << 20, expected - available))):
                    available += len(chunk)
        except (EOFError, OSError, zlib.error):
            pass  # a cut gzip stream ends early (the last partial chunk is not counted)
        held = "the compressed stream ends before that"
    else:
        available = path.stat().st_size
        held = f"the file holds {available}"
    if available < expected:
        raise CLEARInputError(
            f"the voxel data is incomplete: the header declares {expected} bytes, {held} (a cut download or copy?)",
            path,
        )


def _refuse_non_finite_nifti(image, path: Path) -> None:
    """ITK's NIfTI reader turns NaN and infinite voxels into 0, so a broken float NIfTI would read as water,
    and it invents a geometry for a header without one. nibabel reads the stored values; only float-typed
    files are checked for values (CT is mostly int16)."""
    import numpy as np

    if int(image.header["qform_code"]) == 0 and int(image.header["sform_code"]) == 0:
        raise CLEARInputError(
            "no geometry: the header's qform and sform codes are 0, so position and orientation are unknown "
            "(ITK would assume them); write the file with its affine",
            path,
        )
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
    image = sitk.GetImageFromArray(volume.hu)
    volume._set_sitk_geometry(image)
    suffix = next(s for s in SINGLE_FILE_SUFFIXES if path.name.lower().endswith(s))
    with atomic_path(path, keep_suffix=suffix) as tmp:  # SimpleITK picks the format by the suffix
        sitk.WriteImage(image, str(tmp), useCompression=True)
    return path
