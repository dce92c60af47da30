"""Test data: phantoms re-stored in other layouts, written as real DICOM (pydicom) and NIfTI/NRRD (SimpleITK)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage, ExplicitVRLittleEndian, generate_uid

from CLEARLib.io.volume import CTVolume


@dataclass
class Layout:
    """A volume as it could be stored on disk: [k, j, i] array, spacing (i, j, k), origin, direction columns."""

    array: np.ndarray
    spacing: np.ndarray
    origin: np.ndarray
    direction: np.ndarray


def relayout(volume: CTVolume, perm=(0, 1, 2), flip=(False, False, False)) -> Layout:
    """The same physical image with stored index axis c running along canonical axis perm[c], flipped if asked."""
    perm = list(perm)
    hu = np.transpose(volume.hu, [2 - perm[2], 2 - perm[1], 2 - perm[0]])
    spacing = np.asarray(volume.spacing)[perm]
    direction = volume.direction[:, perm].copy()
    first_index_xyz = np.zeros(3)
    for c in range(3):
        if flip[c]:
            hu = np.flip(hu, axis=2 - c)
            direction[:, c] *= -1
            first_index_xyz[perm[c]] = volume.shape[2 - perm[c]] - 1
    origin = volume.index_to_lps(first_index_xyz[::-1])
    return Layout(np.ascontiguousarray(hu), spacing, origin, direction)


def layout_of(volume: CTVolume) -> Layout:
    return Layout(volume.hu, np.asarray(volume.spacing), volume.origin, volume.direction)


def write_image(layout: Layout, path: Path) -> Path:
    image = sitk.GetImageFromArray(layout.array)
    image.SetSpacing(tuple(float(s) for s in layout.spacing))
    image.SetOrigin(tuple(float(v) for v in layout.origin))
    image.SetDirection(tuple(layout.direction.ravel()))
    sitk.WriteImage(image, str(path))
    return path


def _base_dataset(sop_class, study_uid, series_uid, modality, description) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.PatientID = "PHANTOM-001"
    ds.PatientName = "Phantom^CLEAR"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.SeriesDescription = description
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    return ds


def _stored(hu: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    stored = np.rint((hu.astype(np.float64) - intercept) / slope)
    assert stored.min() >= 0 and stored.max() <= 65535, "test data must fit unsigned 16 bits"
    return stored.astype(np.uint16)


def write_dicom_series(
    layout: Layout,
    folder: Path,
    *,
    modality: str = "CT",
    slope: float = 1.0,
    intercept: float = -1024.0,
    series_uid: str | None = None,
    study_uid: str | None = None,
    description: str = "phantom",
    transfer_syntax=None,
    shuffle_seed: int | None = 0,
    position_offsets: dict[int, np.ndarray] | None = None,
    skip: tuple[int, ...] = (),
) -> list[Path]:
    """One single-frame file per stored k-slice, with random file names and shuffled InstanceNumbers.

    `position_offsets` adds an offset (mm) to chosen slices' ImagePositionPatient; `skip` leaves slices out.
    """
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    n = layout.array.shape[0]
    rng = random.Random(shuffle_seed)
    instance_numbers = list(range(1, n + 1))
    if shuffle_seed is not None:
        rng.shuffle(instance_numbers)
    row, col, normal = layout.direction[:, 0], layout.direction[:, 1], layout.direction[:, 2]
    paths = []
    for k in range(n):
        if k in skip:
            continue
        ds = _base_dataset(CTImageStorage, study_uid, series_uid, modality, description)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        position = layout.origin + normal * layout.spacing[2] * k
        if position_offsets and k in position_offsets:
            position = position + position_offsets[k]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in np.r_[row, col]]
        ds.PixelSpacing = [f"{layout.spacing[1]:.6f}", f"{layout.spacing[0]:.6f}"]
        ds.SliceThickness = f"{layout.spacing[2]:.6f}"
        ds.InstanceNumber = instance_numbers[k]
        ds.Rows, ds.Columns = layout.array.shape[1:]
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleIntercept = f"{intercept:g}"
        ds.PixelData = _stored(layout.array[k], slope, intercept).tobytes()
        if transfer_syntax is not None:
            ds.compress(transfer_syntax)
        name = f"{rng.getrandbits(40):010x}.dcm" if shuffle_seed is not None else f"slice{k:04d}.dcm"
        path = folder / name
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_enhanced_ct(layout: Layout, path: Path, *, slope=1.0, intercept=-1024.0, frame_order=None) -> Path:
    """An Enhanced CT multi-frame file with per-frame positions (frames optionally stored out of order)."""
    n = layout.array.shape[0]
    order = list(range(n)) if frame_order is None else list(frame_order)
    ds = _base_dataset(EnhancedCTImageStorage, generate_uid(), generate_uid(), "CT", "enhanced phantom")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.NumberOfFrames = n
    ds.Rows, ds.Columns = layout.array.shape[1:]
    shared = Dataset()
    orientation = Dataset()
    orientation.ImageOrientationPatient = [f"{v:.8f}" for v in np.r_[layout.direction[:, 0], layout.direction[:, 1]]]
    measures = Dataset()
    measures.PixelSpacing = [f"{layout.spacing[1]:.6f}", f"{layout.spacing[0]:.6f}"]
    measures.SliceThickness = f"{layout.spacing[2]:.6f}"
    transform = Dataset()
    transform.RescaleSlope = f"{slope:g}"
    transform.RescaleIntercept = f"{intercept:g}"
    transform.RescaleType = "HU"
    shared.PlaneOrientationSequence = Sequence([orientation])
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PixelValueTransformationSequence = Sequence([transform])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for k in order:
        group = Dataset()
        position = Dataset()
        position.ImagePositionPatient = [
            f"{v:.6f}" for v in layout.origin + layout.direction[:, 2] * layout.spacing[2] * k
        ]
        group.PlanePositionSequence = Sequence([position])
        per_frame.append(group)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.PixelData = _stored(layout.array[order], slope, intercept).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path
