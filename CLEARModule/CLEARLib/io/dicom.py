"""DICOM CT series (a folder of single-frame files, or one enhanced multi-frame file) to `CTVolume`.

pydicom reads headers and decodes pixels (compressed transfer syntaxes through its pixel handlers:
JPEG 2000 via pylibjpeg-openjpeg, RLE natively). Geometry is checked here rather than delegated to a
series reader because the checks are the point: slices are ordered by ImagePositionPatient projected
on the slice normal (never by file name or InstanceNumber), and gaps, duplicates, tilt, mixed sizes
and non-CT modalities are reported by file instead of being silently resampled or mis-stacked.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from ..errors import CLEARInputError
from .volume import CTVolume

log = logging.getLogger(__name__)

# Slice-spacing deviations below this (mm, or fraction of the spacing) are rounding in the headers.
SPACING_TOLERANCE_MM = 0.01
SPACING_TOLERANCE_FRACTION = 0.02
# Slices that drift sideways along the stack by more than this angle come from a tilted gantry.
GANTRY_TILT_TOLERANCE_DEG = 0.1
# Orientation vectors of one series may differ by rounding only.
ORIENTATION_TOLERANCE = 1e-4


@dataclass
class _Frame:
    """One 2D image of the series, from a single-frame file or a frame of a multi-frame file."""

    path: Path
    frame: int | None  # None for single-frame files
    position: np.ndarray  # ImagePositionPatient (LPS mm)
    orientation: np.ndarray  # ImageOrientationPatient (row cosines, column cosines)
    pixel_spacing: tuple[float, float]  # (between rows, between columns) as DICOM stores it
    rows: int
    columns: int
    slope: float
    intercept: float
    acquisition: str = ""  # AcquisitionNumber (or TemporalPositionIdentifier): phases of one series differ

    @property
    def name(self) -> str:
        return self.path.name if self.frame is None else f"{self.path.name}[frame {self.frame}]"


def _read_header(path: Path):
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except PermissionError as exc:  # a slice we may not read is a missing slice, not "not DICOM"
        raise CLEARInputError(f"cannot read {path.name}: {exc.strerror}", path.parent) from exc
    except (InvalidDicomError, OSError, EOFError):
        return None
    except Exception as exc:  # a DICOM file pydicom cannot parse at all
        log.warning("%s: skipped, unreadable DICOM header (%s)", path, exc)
        return None


def _floats(value, n: int, what: str, path: Path) -> np.ndarray:
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        arr = np.array([])
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise CLEARInputError(f"missing or malformed {what}: {value!r}", path)
    return arr


def _rescale_values(slope, intercept, where: str, path: Path) -> tuple[float, float]:
    """Checked (slope, intercept): absent means 1 and 0; a slope of 0 (every voxel would be the intercept)
    and non-finite values are refused rather than guessed."""
    try:
        slope = 1.0 if slope is None or str(slope).strip() == "" else float(slope)
        intercept = 0.0 if intercept is None or str(intercept).strip() == "" else float(intercept)
    except (TypeError, ValueError) as exc:
        raise CLEARInputError(f"malformed RescaleSlope/RescaleIntercept in {where}: {exc}", path) from exc
    if not (np.isfinite(slope) and np.isfinite(intercept)):
        raise CLEARInputError(f"RescaleSlope {slope} / RescaleIntercept {intercept} in {where} are not finite", path)
    if slope == 0:
        raise CLEARInputError(f"RescaleSlope is 0 in {where}: every voxel would read as the intercept", path)
    return slope, intercept


def _rescale(ds, path: Path) -> tuple[float, float]:
    return _rescale_values(getattr(ds, "RescaleSlope", None), getattr(ds, "RescaleIntercept", None), path.name, path)


def _single_frame(ds, path: Path) -> _Frame:
    if "PixelSpacing" not in ds:
        raise CLEARInputError("no PixelSpacing: the slice has no physical size", path)
    spacing = _floats(ds.PixelSpacing, 2, "PixelSpacing", path)
    slope, intercept = _rescale(ds, path)
    return _Frame(
        path=path,
        frame=None,
        position=_floats(ds.get("ImagePositionPatient"), 3, "ImagePositionPatient", path),
        orientation=_floats(ds.get("ImageOrientationPatient"), 6, "ImageOrientationPatient", path),
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        slope=slope,
        intercept=intercept,
        acquisition=_acquisition_of(ds),
    )


def _acquisition_of(ds) -> str:
    for keyword in ("TemporalPositionIdentifier", "AcquisitionNumber"):
        value = ds.get(keyword)
        if value not in (None, ""):
            return f"{keyword} {value}"
    return ""


def _functional(ds, frame_group, sequence: str, attribute: str):
    """An attribute of a functional group, per-frame first, then shared."""
    for group in (frame_group, ds.get("SharedFunctionalGroupsSequence", [None])[0]):
        if group is not None and sequence in group and len(group[sequence].value):
            item = group[sequence][0]
            if attribute in item:
                return item[attribute].value
    return None


def _multi_frame(ds, path: Path) -> list[_Frame]:
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    n = int(ds.NumberOfFrames)
    if per_frame is None or len(per_frame) != n:
        raise CLEARInputError(
            f"multi-frame file with {n} frames but without a position for each frame "
            "(PerFrameFunctionalGroupsSequence); only enhanced multi-frame CT is supported",
            path,
        )
    frames = []
    for i, group in enumerate(per_frame):
        where = f"{path.name}[frame {i}]"
        position = _functional(ds, group, "PlanePositionSequence", "ImagePositionPatient")
        orientation = _functional(ds, group, "PlaneOrientationSequence", "ImageOrientationPatient")
        spacing = _functional(ds, group, "PixelMeasuresSequence", "PixelSpacing")
        slope = _functional(ds, group, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _functional(ds, group, "PixelValueTransformationSequence", "RescaleIntercept")
        spacing = _floats(spacing, 2, f"PixelSpacing of {where}", path)
        slope, intercept = _rescale_values(slope, intercept, where, path)
        frames.append(
            _Frame(
                path=path,
                frame=i,
                position=_floats(position, 3, f"ImagePositionPatient of {where}", path),
                orientation=_floats(orientation, 6, f"ImageOrientationPatient of {where}", path),
                pixel_spacing=(float(spacing[0]), float(spacing[1])),
                rows=int(ds.Rows),
                columns=int(ds.Columns),
                slope=slope,
                intercept=intercept,
                acquisition=_acquisition_of(ds),
            )
        )
    return frames


def _is_localizer(ds) -> bool:
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    return "LOCALIZER" in image_type


@dataclass
class _Series:
    uid: str
    modality: str
    description: str
    headers: list  # (path, dataset) pairs, pixel data not loaded

    @property
    def n_images(self) -> int:
        return sum(int(getattr(ds, "NumberOfFrames", 1) or 1) for _, ds in self.headers)

    @property
    def patient_id(self) -> str:
        return str(getattr(self.headers[0][1], "PatientID", "") or "") if self.headers else ""

    @property
    def study_uid(self) -> str:
        return str(getattr(self.headers[0][1], "StudyInstanceUID", "") or "") if self.headers else ""


def _scan_folder(folder: Path) -> dict[str, _Series]:
    files = []

    def unreadable(error: OSError):  # a sub-folder that cannot be listed may hold slices: say so
        raise CLEARInputError(f"cannot list {error.filename}: {error.strerror}", folder) from error

    for root, dirs, names in os.walk(folder, onerror=unreadable):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [Path(root) / n for n in names if not n.startswith(".") and (Path(root) / n).is_file()]
    return _group_series(sorted(files), folder)


def _group_series(files: list[Path], folder: Path) -> dict[str, _Series]:
    """The image files' headers grouped by series (localizers and non-images left out)."""
    series: dict[str, _Series] = {}
    skipped_localizers = defaultdict(int)
    for path in files:
        if path.name.upper() == "DICOMDIR":
            continue
        ds = _read_header(path)
        if ds is None or "Rows" not in ds:  # not an image (DICOMDIR, SR, RTSTRUCT, ...)
            continue
        if _is_localizer(ds):
            skipped_localizers[str(ds.get("SeriesInstanceUID", ""))] += 1
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if uid not in series:
            series[uid] = _Series(
                uid, str(ds.get("Modality", "") or ""), str(ds.get("SeriesDescription", "") or ""), []
            )
        series[uid].headers.append((path, ds))
    for uid, n in skipped_localizers.items():
        log.info("%s: ignored %d localizer image(s) of series %s", folder, n, uid)
    return series


def _choose_series(series: dict[str, _Series], series_uid, allow_non_ct, folder: Path) -> tuple[_Series, str]:
    if not series:
        raise CLEARInputError("no DICOM images found in this folder", folder)
    listing = "; ".join(
        f"{s.uid or '(no SeriesInstanceUID)'} ({s.modality or 'no modality'}, {s.n_images} images, {s.description!r})"
        for s in series.values()
    )
    if series_uid is not None:
        if series_uid not in series:
            raise CLEARInputError(f"series {series_uid} is not in this folder; it holds: {listing}", folder)
        chosen = series[series_uid]
        reason = f"series {chosen.uid} as requested"
    else:
        candidates = [s for s in series.values() if s.modality == "CT" or allow_non_ct]
        if not candidates:
            raise CLEARInputError(
                f"no CT series here (found: {listing}); pass allow_non_ct=True (CLI: --allow-non-ct) "
                "to read another modality anyway",
                folder,
            )
        patients = sorted({s.patient_id for s in candidates})
        if len(patients) > 1:

            def series_of(patient):
                return ", ".join(
                    f"{s.uid} ({s.n_images} images, {s.description!r})" for s in candidates if s.patient_id == patient
                )

            by_patient = "; ".join(f"patient {p or '(no PatientID)'}: {series_of(p)}" for p in patients)
            raise CLEARInputError(
                f"this folder holds {len(patients)} patients ({by_patient}); pass the series to read with "
                "series_uid (CLI: --series-uid UID), or give the folder of one patient",
                folder,
            )
        chosen = max(candidates, key=lambda s: (s.n_images, s.uid))
        reason = f"series {chosen.uid or '(no SeriesInstanceUID)'} ({chosen.description!r}, {chosen.n_images} images)"
        if len(series) > 1:
            reason = f"chose the CT series with the most images: {reason}; the folder holds {listing}"
    if chosen.modality != "CT" and not allow_non_ct:
        raise CLEARInputError(
            f"series {chosen.uid} has modality {chosen.modality or 'unknown'}, not CT; "
            "pass allow_non_ct=True (CLI: --allow-non-ct) to read it anyway",
            folder,
        )
    return chosen, reason


def _frames_of(series: _Series) -> list[_Frame]:
    frames = []
    for path, ds in series.headers:
        if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
            frames.extend(_multi_frame(ds, path))
        else:
            frames.append(_single_frame(ds, path))
    return frames


def _refuse_overlapping_acquisitions(frames: list[_Frame], distance: np.ndarray, where: Path) -> None:
    """Two acquisitions (or contrast phases) in one series that cover the same positions would stack into
    one volume with alternating phases. Acquisitions side by side (step-and-shoot scans number each
    rotation) make one volume and pass."""
    groups: dict[str, list[float]] = {}
    for frame, d in zip(frames, distance, strict=True):
        groups.setdefault(frame.acquisition, []).append(float(d))
    spans = sorted((min(v), max(v), k, len(v)) for k, v in groups.items())
    overlapping = [(a, b) for a, b in zip(spans, spans[1:], strict=False) if b[0] < a[1] - SPACING_TOLERANCE_MM]
    if overlapping:
        a, b = overlapping[0]
        raise CLEARInputError(
            f"one series holds acquisitions that cover the same positions ({a[2]}: {a[3]} images, "
            f"{a[0]:.1f}..{a[1]:.1f} mm; {b[2]}: {b[3]} images, {b[0]:.1f}..{b[1]:.1f} mm), e.g. two contrast "
            "phases; CLEAR will not interleave them: put each acquisition in a folder of its own",
            where,
        )


def _check_and_sort(frames: list[_Frame], where: Path) -> tuple[list[_Frame], float, np.ndarray]:
    """Validate the stack; return frames sorted along the normal, slice spacing and the normal."""
    if len(frames) < 2:
        raise CLEARInputError(f"the series has {len(frames)} image(s); a CT volume needs at least 2 slices", where)
    first = frames[0]
    for f in frames[1:]:
        if (f.rows, f.columns) != (first.rows, first.columns):
            raise CLEARInputError(
                f"mixed image sizes in one series: {first.rows}x{first.columns} in {first.name}, "
                f"{f.rows}x{f.columns} in {f.name}",
                where,
            )
        if np.abs(f.orientation - first.orientation).max() > ORIENTATION_TOLERANCE:
            raise CLEARInputError(
                f"mixed slice orientations in one series: {first.orientation.tolist()} in {first.name}, "
                f"{f.orientation.tolist()} in {f.name}",
                where,
            )
        if not np.allclose(f.pixel_spacing, first.pixel_spacing, rtol=1e-4, atol=1e-5):
            raise CLEARInputError(
                f"mixed pixel spacings in one series: {first.pixel_spacing} in {first.name}, "
                f"{f.pixel_spacing} in {f.name}",
                where,
            )
    row, col = first.orientation[:3], first.orientation[3:]
    normal = np.cross(row, col)
    if abs(np.linalg.norm(normal) - 1.0) > 1e-3 or abs(row @ col) > 1e-3:
        raise CLEARInputError(f"ImageOrientationPatient is not orthonormal in {first.name}", where)
    distance = np.array([f.position @ normal for f in frames])
    _refuse_overlapping_acquisitions(frames, distance, where)
    order = np.argsort(distance, kind="stable")
    frames = [frames[i] for i in order]
    distance = distance[order]
    steps = np.diff(distance)
    for i in np.flatnonzero(steps < SPACING_TOLERANCE_MM):
        raise CLEARInputError(
            f"two slices at the same position ({distance[i]:.3f} mm along the normal): "
            f"{frames[i].name} and {frames[i + 1].name}",
            where,
        )
    spacing = float(np.median(steps))
    tolerance = max(SPACING_TOLERANCE_MM, SPACING_TOLERANCE_FRACTION * spacing)
    for i in np.flatnonzero(np.abs(steps - spacing) > tolerance):
        ratio = steps[i] / spacing
        if ratio > 1.5 and abs(ratio - round(ratio)) * spacing <= tolerance:
            problem = (
                f"{int(round(ratio)) - 1} missing slice(s) between {frames[i].name} and {frames[i + 1].name} "
                f"(gap {steps[i]:.3f} mm, slice spacing {spacing:.3f} mm)"
            )
        else:
            problem = (
                f"non-uniform slice spacing: {steps[i]:.3f} mm between {frames[i].name} and "
                f"{frames[i + 1].name}, {spacing:.3f} mm elsewhere"
            )
        raise CLEARInputError(problem, where)
    # Gantry tilt: the stack drifts within the slice plane as it advances along the normal.
    drift = np.array(
        [[(f.position - frames[0].position) @ row, (f.position - frames[0].position) @ col] for f in frames]
    )
    along = distance - distance[0]
    slope = np.linalg.lstsq(np.c_[along, np.ones_like(along)], drift, rcond=None)[0][0]
    tilt = float(np.degrees(np.arctan(np.linalg.norm(slope))))
    if tilt > GANTRY_TILT_TOLERANCE_DEG:
        raise CLEARInputError(
            f"gantry tilt of {tilt:.2f} degrees: slice positions are sheared relative to the slice "
            "normal, so stacking them would distort the anatomy; correct the tilt first (for example "
            "with Slicer's DICOM acquisition-geometry regularisation) and save the result as NRRD/NIfTI",
            where,
        )
    return frames, spacing, normal


def _rescaled_dtype(frames: list[_Frame]):
    integral = all(float(f.slope).is_integer() and float(f.intercept).is_integer() for f in frames)
    return np.int16 if integral else np.float32


def _decode(path: Path):
    try:
        ds = pydicom.dcmread(path)
        return ds, ds.pixel_array
    except Exception as exc:
        syntax = "unknown"
        try:
            syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID.name
        except Exception:
            pass
        raise CLEARInputError(f"cannot decode pixel data (transfer syntax {syntax}): {exc}", path) from exc


def _load_pixels(frames: list[_Frame], where: Path) -> np.ndarray:
    dtype = _rescaled_dtype(frames)
    out = np.empty((len(frames), frames[0].rows, frames[0].columns), dtype=dtype)
    decoded_multi = {}
    for k, f in enumerate(frames):
        if f.frame is None:
            _, pixels = _decode(f.path)
        else:
            if f.path not in decoded_multi:
                decoded_multi[f.path] = _decode(f.path)[1]
            pixels = decoded_multi[f.path][f.frame]
        if pixels.shape != out.shape[1:]:
            raise CLEARInputError(f"pixel data of shape {pixels.shape}, header says {out.shape[1:]}", f.path)
        hu = pixels.astype(np.float32) * np.float32(f.slope) + np.float32(f.intercept)
        if dtype == np.int16:
            if hu.min() < -32768 or hu.max() > 32767:
                raise CLEARInputError("rescaled values do not fit in 16 bits; not CT Hounsfield units", f.path)
            out[k] = np.rint(hu).astype(np.int16)
        else:
            out[k] = hu
    return out


def check_series_files(files, where: str | os.PathLike | None = None) -> str:
    """The reader's checks (modality, one series, missing slices, spacing, duplicates, gantry tilt, overlapping
    acquisitions) on a series given as its files, e.g. a volume Slicer's DICOM module loaded from its
    database; headers only, no pixel data. Returns why the series was accepted; raises CLEARInputError
    naming the problem otherwise."""
    paths = sorted(Path(f) for f in files)
    where = Path(where) if where is not None else (paths[0].parent if paths else Path("."))
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise CLEARInputError(
            f"{len(missing)} of the series' {len(paths)} files are missing (first: {missing[0]})", where
        )
    series = _group_series(paths, where)
    if not series:
        raise CLEARInputError("no DICOM images among the series' files", where)
    chosen, reason = _choose_series(series, None, False, where)
    _check_and_sort(_frames_of(chosen), where)
    return reason


def read_dicom(path: Path, series_uid: str | None = None, allow_non_ct: bool = False, resample_oblique=False):
    """A DICOM folder (one or several series) or one multi-frame DICOM file, as a canonical `CTVolume`."""
    path = Path(path)
    if path.is_dir():
        series, reason = _choose_series(_scan_folder(path), series_uid, allow_non_ct, path)
    else:
        ds = _read_header(path)
        if ds is None:
            raise CLEARInputError("not a DICOM file, and not a NIfTI/NRRD/MHA file by its extension", path)
        if int(getattr(ds, "NumberOfFrames", 1) or 1) <= 1:
            raise CLEARInputError(
                "a single-frame DICOM file holds one slice; pass the folder that holds the whole series", path
            )
        single = _Series(str(ds.get("SeriesInstanceUID", "")), str(ds.get("Modality", "")), "", [(path, ds)])
        series, reason = _choose_series({single.uid: single}, series_uid, allow_non_ct, path)
    frames, slice_spacing, normal = _check_and_sort(_frames_of(series), path)
    hu = _load_pixels(frames, path)
    first = frames[0]
    direction = np.stack([first.orientation[:3], first.orientation[3:], normal], axis=1)
    spacing = (first.pixel_spacing[1], first.pixel_spacing[0], slice_spacing)
    meta = {
        "format": "DICOM",
        "patient_id": series.patient_id,
        "study_instance_uid": series.study_uid,
        "series_instance_uid": series.uid,
        "series_description": series.description,
        "modality": series.modality,
        "n_files": len(series.headers),
        "series_choice": reason,
    }
    log.info("%s: %s", path, reason)
    return CTVolume.from_array(hu, spacing, first.position, direction, meta, resample_oblique, source=path)
