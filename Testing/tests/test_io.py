"""CT input: every format and layout reads back to the same canonical volume; bad input is named."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, RLELossless

from CLEARLib.errors import CLEARInputError
from CLEARLib.io import CTVolume, read_ct, write_volume

from ctfactory import layout_of, relayout, write_dicom_series, write_enhanced_ct, write_image


def assert_same_volume(read: CTVolume, expected: CTVolume, atol_mm=1e-4):
    assert read.shape == expected.shape
    np.testing.assert_array_equal(read.hu, expected.hu)
    np.testing.assert_allclose(read.spacing, expected.spacing, atol=atol_mm)
    np.testing.assert_allclose(read.origin, expected.origin, atol=atol_mm)
    np.testing.assert_allclose(read.direction, expected.direction, atol=1e-6)


LAYOUTS = [
    ((0, 1, 2), (False, False, False)),  # plain axial, head-first
    ((0, 1, 2), (False, False, True)),  # slices stored superior to inferior
    ((0, 1, 2), (True, True, False)),  # rows/columns reversed
    ((0, 1, 2), (True, False, True)),
    ((1, 0, 2), (False, False, False)),  # rows and columns swapped
    ((1, 2, 0), (False, True, False)),  # sagittal stack: slice normal along L
    ((0, 2, 1), (False, False, True)),  # coronal stack: slice normal along P
]


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".mha"])
@pytest.mark.parametrize("perm,flip", LAYOUTS)
def test_image_files_read_to_the_canonical_volume(tmp_path, phantom, suffix, perm, flip):
    volume, _ = phantom
    path = write_image(relayout(volume, perm, flip), tmp_path / f"ct{suffix}")
    read = read_ct(path)
    assert_same_volume(read, volume)
    assert read.hu.dtype == np.int16
    assert read.meta["source"] == str(path)
    assert ("reoriented" in read.meta) == (perm != (0, 1, 2) or any(flip))


@pytest.mark.parametrize("perm,flip", LAYOUTS)
def test_dicom_series_with_shuffled_names_and_numbers(tmp_path, phantom, perm, flip):
    volume, _ = phantom
    write_dicom_series(relayout(volume, perm, flip), tmp_path / "series", shuffle_seed=7)
    read = read_ct(tmp_path / "series")
    assert_same_volume(read, volume)
    assert read.meta["modality"] == "CT"


def test_dicom_order_comes_from_positions_not_instance_numbers(tmp_path, phantom):
    volume, _ = phantom
    paths = write_dicom_series(layout_of(volume), tmp_path / "s", shuffle_seed=3)
    numbers = [pydicom.dcmread(p).InstanceNumber for p in paths]
    assert numbers != sorted(numbers), "the test needs InstanceNumbers out of position order"
    assert_same_volume(read_ct(tmp_path / "s"), volume)


def test_rescale_slope_and_intercept_are_applied(tmp_path, phantom):
    volume, _ = phantom
    write_dicom_series(layout_of(volume), tmp_path / "s", slope=0.5, intercept=-2048.0)
    read = read_ct(tmp_path / "s")
    assert read.hu.dtype == np.float32  # a fractional slope makes non-integer HU possible
    np.testing.assert_array_equal(read.hu, volume.hu.astype(np.float32))


@pytest.mark.parametrize(("value", "message"), [("0", "RescaleSlope is 0"), ("NaN", "not finite")])
def test_a_zero_or_non_finite_rescale_slope_is_refused(tmp_path, phantom, value, message):
    """A slope of 0 used to be read as 1; now the file is named instead of guessing."""
    volume, _ = phantom
    paths = write_dicom_series(layout_of(volume), tmp_path / "s")
    ds = pydicom.dcmread(paths[3])
    ds.RescaleSlope = value
    ds.save_as(paths[3])
    with pytest.raises(CLEARInputError, match=message) as error:
        read_ct(tmp_path / "s")
    assert paths[3].name in str(error.value)


@pytest.mark.parametrize("name", ["nan.nii.gz", "nan.nrrd", "nan.mha"])
def test_non_finite_voxels_are_refused_with_their_count(tmp_path, name):
    """ITK reads NaN in NIfTI as 0 without a word; every format must refuse them instead."""
    import nibabel as nib
    import SimpleITK as sitk

    hu = np.zeros((4, 6, 5), np.float32)
    hu[1, 2, 3] = np.nan
    hu[2, 0, 0] = np.inf
    if name.endswith(".nii.gz"):  # written by nibabel, so the stored values really are NaN and inf
        nib.save(nib.Nifti1Image(hu.transpose(2, 1, 0), np.diag([-1.0, -1.0, 1.0, 1.0])), str(tmp_path / name))
    else:
        sitk.WriteImage(sitk.GetImageFromArray(hu), str(tmp_path / name))
    with pytest.raises(CLEARInputError, match="2 of 120 voxels are NaN or infinite") as error:
        read_ct(tmp_path / name)
    assert name in str(error.value)


def test_implausible_hu_from_a_wrong_slope_is_refused(tmp_path, phantom):
    volume, _ = phantom
    for path in write_dicom_series(layout_of(volume), tmp_path / "s"):  # stored values of 0..~1500
        ds = pydicom.dcmread(path)
        ds.RescaleSlope = "1000.5"  # a corrupted slope: HU in the millions
        ds.save_as(path)
    with pytest.raises(CLEARInputError, match=r"voxels lie outside any CT's HU range .* check the RescaleSlope"):
        read_ct(tmp_path / "s")


def test_integer_rescale_keeps_int16(tmp_path, phantom):
    volume, _ = phantom
    write_dicom_series(layout_of(volume), tmp_path / "s", slope=2.0, intercept=-1024.0)
    read = read_ct(tmp_path / "s")
    assert read.hu.dtype == np.int16
    # Stored values are rounded to multiples of the slope.
    assert np.abs(read.hu.astype(int) - volume.hu).max() <= 1


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, RLELossless], ids=["jpeg2000", "rle"])
def test_compressed_transfer_syntaxes(tmp_path, phantom, syntax):
    volume, _ = phantom
    paths = write_dicom_series(layout_of(volume), tmp_path / "s", transfer_syntax=syntax)
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == syntax
    assert_same_volume(read_ct(tmp_path / "s"), volume)


def test_enhanced_multiframe_file(tmp_path, phantom):
    volume, _ = phantom
    order = list(np.random.default_rng(0).permutation(volume.shape[0]))
    path = write_enhanced_ct(relayout(volume, (0, 1, 2), (False, True, True)), tmp_path / "mf.dcm", frame_order=order)
    read = read_ct(path)
    assert_same_volume(read, volume)
    assert read.meta["n_files"] == 1


def test_a_folder_with_several_patients_is_refused_unless_a_series_is_named(
    tmp_path, phantom, tiny_case_bundle, capsys
):
    import json

    from CLEARLib.bundle import read_manifest
    from CLEARLib.cli import main

    volume, _ = phantom
    folder = tmp_path / "two"
    write_dicom_series(layout_of(volume), folder / "a", series_uid="1.2.3.1", description="first")
    paths = write_dicom_series(layout_of(volume), folder / "b", series_uid="1.2.3.2", description="second")
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.PatientID = "LUNG1-002"
        ds.save_as(path)
    with pytest.raises(
        CLEARInputError, match=r"2 patients .*LUNG1-002: 1\.2\.3\.2.*PHANTOM-001: 1\.2\.3\.1.*--series-uid"
    ):
        read_ct(folder)
    chosen = read_ct(folder, series_uid="1.2.3.2")
    assert chosen.meta["patient_id"] == "LUNG1-002" and chosen.meta["study_instance_uid"]
    # The outputs say what was read and with which model.
    argv = ["predict", str(folder), "--series-uid", "1.2.3.2", "--model", str(tiny_case_bundle), "--device", "cpu"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["input"]["patient_id"] == "LUNG1-002" and summary["input"]["series_instance_uid"] == "1.2.3.2"
    assert summary["input"]["series_choice"] == "series 1.2.3.2 as requested"
    assert summary["bundle_sha256"] == read_manifest(tiny_case_bundle).weights.sha256


def test_several_series_default_is_largest_ct_and_choice_is_reported(tmp_path, phantom, caplog):
    volume, _ = phantom
    small = CTVolume(volume.hu[:10].copy(), volume.spacing, volume.origin, volume.direction)
    big = CTVolume(np.concatenate([volume.hu, volume.hu[:6]]), volume.spacing, volume.origin, volume.direction)
    folder = tmp_path / "study"
    write_dicom_series(layout_of(volume), folder / "a", series_uid="1.2.3.1", description="main")
    write_dicom_series(layout_of(small), folder / "b", series_uid="1.2.3.2", description="small")
    write_dicom_series(layout_of(big), folder / "c", series_uid="1.2.3.3", modality="MR", description="mr")
    read = read_ct(folder)
    assert read.meta["series_instance_uid"] == "1.2.3.1"
    assert "most images" in read.meta["series_choice"] and "1.2.3.2" in read.meta["series_choice"]
    assert any("1.2.3.1" in r.getMessage() for r in caplog.records)
    chosen = read_ct(folder, series_uid="1.2.3.2")
    assert chosen.shape[0] == 10
    with pytest.raises(CLEARInputError, match="modality MR"):
        read_ct(folder, series_uid="1.2.3.3")
    assert read_ct(folder, series_uid="1.2.3.3", allow_non_ct=True).shape[0] == volume.shape[0] + 6
    with pytest.raises(CLEARInputError, match="9.9.9 is not in this folder.*1.2.3.1"):
        read_ct(folder, series_uid="9.9.9")


def test_localizer_images_are_ignored(tmp_path, phantom):
    volume, _ = phantom
    uid = "1.2.3.4"
    write_dicom_series(layout_of(volume), tmp_path / "s", series_uid=uid)
    scout = relayout(volume, (0, 2, 1))  # a coronal image in the same series
    path = write_dicom_series(scout, tmp_path / "scout", series_uid=uid, skip=tuple(range(1, 48)))[0]
    ds = pydicom.dcmread(path)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.save_as(tmp_path / "s" / "scout.dcm")
    assert_same_volume(read_ct(tmp_path / "s"), volume)


# ------------------------------------------------------------------------------------ bad input
def test_missing_slice_is_reported(tmp_path, phantom):
    volume, _ = phantom
    write_dicom_series(layout_of(volume), tmp_path / "s", skip=(11,), shuffle_seed=None)
    with pytest.raises(CLEARInputError, match=r"1 missing slice\(s\) between slice0010.dcm and slice0012.dcm"):
        read_ct(tmp_path / "s")


def test_non_uniform_spacing_is_reported(tmp_path, phantom):
    volume, _ = phantom
    offsets = {k: np.array([0, 0, 1.7]) for k in range(15, volume.shape[0])}
    write_dicom_series(layout_of(volume), tmp_path / "s", position_offsets=offsets, shuffle_seed=None)
    with pytest.raises(CLEARInputError, match="non-uniform slice spacing: 6.700 mm between slice0014.dcm"):
        read_ct(tmp_path / "s")


def test_duplicate_positions_are_reported(tmp_path, phantom):
    volume, _ = phantom
    write_dicom_series(layout_of(volume), tmp_path / "s", position_offsets={5: np.array([0, 0, -5.0])})
    with pytest.raises(CLEARInputError, match="two slices at the same position"):
        read_ct(tmp_path / "s")


def test_gantry_tilt_is_reported(tmp_path, phantom):
    volume, _ = phantom
    # Each slice shifted posteriorly by its distance along z times tan(12 degrees).
    shift = np.tan(np.radians(12.0)) * volume.spacing[2]
    offsets = {k: np.array([0.0, shift * k, 0.0]) for k in range(volume.shape[0])}
    write_dicom_series(layout_of(volume), tmp_path / "s", position_offsets=offsets)
    with pytest.raises(CLEARInputError, match=r"gantry tilt of 12.00 degrees"):
        read_ct(tmp_path / "s")


def test_mixed_image_sizes_are_reported(tmp_path, phantom):
    volume, _ = phantom
    uid = "1.2.3.9"
    write_dicom_series(layout_of(volume), tmp_path / "s", series_uid=uid, skip=(0,), shuffle_seed=None)
    cropped = CTVolume(volume.hu[:1, :20].copy(), volume.spacing, volume.origin, volume.direction)
    write_dicom_series(layout_of(cropped), tmp_path / "odd", series_uid=uid, shuffle_seed=None)
    (tmp_path / "odd" / "slice0000.dcm").rename(tmp_path / "s" / "odd.dcm")
    with pytest.raises(CLEARInputError, match=r"mixed image sizes in one series: .*20x48 in odd.dcm"):
        read_ct(tmp_path / "s")


def test_non_ct_modality_is_refused_unless_allowed(tmp_path, phantom):
    volume, _ = phantom
    write_dicom_series(layout_of(volume), tmp_path / "s", modality="MR")
    with pytest.raises(CLEARInputError, match="no CT series here.*MR") as info:
        read_ct(tmp_path / "s")
    assert isinstance(info.value, ValueError) and str(tmp_path / "s") in str(info.value)
    assert read_ct(tmp_path / "s", allow_non_ct=True).meta["modality"] == "MR"


def test_single_slice_and_empty_inputs(tmp_path, phantom):
    volume, _ = phantom
    paths = write_dicom_series(layout_of(volume), tmp_path / "s", shuffle_seed=None)
    with pytest.raises(CLEARInputError, match="single-frame DICOM file holds one slice"):
        read_ct(paths[0])
    one = tmp_path / "one"
    one.mkdir()
    paths[0].rename(one / paths[0].name)
    with pytest.raises(CLEARInputError, match="at least 2 slices"):
        read_ct(one)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not dicom")
    with pytest.raises(CLEARInputError, match="no DICOM images found"):
        read_ct(empty)
    with pytest.raises(CLEARInputError, match="no such file"):
        read_ct(tmp_path / "missing.nrrd")


def test_corrupt_image_file_names_the_file(tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b this is not a nifti file")
    with pytest.raises(CLEARInputError, match="cannot read image file") as info:
        read_ct(bad)
    assert "broken.nii.gz" in str(info.value)


def test_undecodable_pixel_data_names_the_file(tmp_path, phantom):
    volume, _ = phantom
    paths = write_dicom_series(layout_of(volume), tmp_path / "s", shuffle_seed=None)
    ds = pydicom.dcmread(paths[3])
    ds.PixelData = ds.PixelData[:100]  # truncated
    ds.save_as(paths[3])
    with pytest.raises(CLEARInputError, match="slice0003.dcm: cannot decode pixel data"):
        read_ct(tmp_path / "s")


def _rotation(axis, degrees):
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def test_oblique_volume_is_rejected_or_resampled(tmp_path, big_lesion_phantom):
    volume, lesion = big_lesion_phantom
    rotation = _rotation(0, 15.0)  # tilted about the L axis
    layout = layout_of(volume)
    # Same array, rotated about the lesion centre: the lesion stays where it was in LPS.
    centre = np.asarray(lesion.center_lps)
    layout.origin = centre + rotation @ (volume.origin - centre)
    layout.direction = rotation @ volume.direction
    path = write_image(layout, tmp_path / "oblique.nrrd")
    with pytest.raises(CLEARInputError, match=r"oblique acquisition: an image axis is 15.0 degrees"):
        read_ct(path)
    read = read_ct(path, resample_oblique=True)
    np.testing.assert_allclose(read.direction, np.eye(3))
    assert read.meta["resampled_from_oblique_deg"] == pytest.approx(15.0, abs=1e-3)
    zyx = np.rint(read.lps_to_index(centre)).astype(int)
    assert read.hu[tuple(zyx)] == pytest.approx(lesion.hu, abs=1)


def test_small_tilt_is_kept_exactly(tmp_path, phantom):
    volume, _ = phantom
    layout = layout_of(volume)
    layout.direction = _rotation(2, 0.4) @ volume.direction
    read = read_ct(write_image(layout, tmp_path / "tilt.nrrd"))
    np.testing.assert_allclose(read.direction, layout.direction, atol=1e-9)
    np.testing.assert_array_equal(read.hu, volume.hu)


def test_non_volume_images_are_refused(tmp_path):
    import SimpleITK as sitk

    flat = tmp_path / "flat.nrrd"
    sitk.WriteImage(sitk.Image(16, 16, sitk.sitkInt16), str(flat))
    with pytest.raises(CLEARInputError, match="expected a 3D scalar image"):
        read_ct(flat)


# ------------------------------------------------------------------------------------ geometry
def test_point_conversions_round_trip(phantom):
    volume, _ = phantom
    tilted = CTVolume.from_array(volume.hu, volume.spacing, (10.0, -20.0, 30.0), _rotation(2, 0.7))
    rng = np.random.default_rng(0)
    zyx = rng.uniform(-2, 40, size=(50, 3))
    np.testing.assert_allclose(tilted.lps_to_index(tilted.index_to_lps(zyx)), zyx, atol=1e-9)
    ras = tilted.index_to_ras(zyx)
    np.testing.assert_allclose(ras[:, :2], -tilted.index_to_lps(zyx)[:, :2])
    np.testing.assert_allclose(tilted.ras_to_index(ras), zyx, atol=1e-9)
    one = tilted.index_to_lps([1.5, 2.0, 3.0])
    assert one.shape == (3,)
    # index (z, y, x) = (0, 0, 1) moves by spacing_x along the first direction column
    np.testing.assert_allclose(
        tilted.index_to_lps([0, 0, 1]) - tilted.index_to_lps([0, 0, 0]),
        tilted.direction[:, 0] * volume.spacing[0],
    )
    homogeneous = tilted.ijk_to_ras_matrix @ np.r_[zyx[0][::-1], 1.0]
    np.testing.assert_allclose(homogeneous[:3], ras[0])


@pytest.mark.parametrize("perm,flip", LAYOUTS[:4])
def test_lesion_centre_maps_to_lesion_voxels_after_reading(tmp_path, big_lesion_phantom, perm, flip):
    volume, lesion = big_lesion_phantom
    write_dicom_series(relayout(volume, perm, flip), tmp_path / "s")
    read = read_ct(tmp_path / "s")
    mask = read.hu == lesion.hu
    centroid_zyx = np.argwhere(mask).mean(axis=0)
    # Sub-voxel: the centroid of the lesion voxels sits on the lesion's LPS centre.
    error_mm = np.abs(read.index_to_lps(centroid_zyx) - np.asarray(lesion.center_lps))
    assert np.all(error_mm < 0.5 * np.asarray(read.spacing)), error_mm
    assert read.hu[tuple(np.rint(read.lps_to_index(lesion.center_lps)).astype(int))] == lesion.hu


def test_slice_positions_increase_superiorly(tmp_path, phantom):
    volume, _ = phantom
    write_dicom_series(relayout(volume, (0, 1, 2), (False, False, True)), tmp_path / "s")
    z = read_ct(tmp_path / "s").slice_positions_mm
    np.testing.assert_allclose(np.diff(z), volume.spacing[2])
    assert z[0] == pytest.approx(volume.origin[2])


def test_write_volume_is_atomic_and_round_trips(tmp_path, phantom):
    volume, _ = phantom
    path = write_volume(volume, tmp_path / "out" / "ct.nrrd")
    assert sorted(p.name for p in path.parent.iterdir()) == ["ct.nrrd"]
    assert_same_volume(read_ct(path), volume)
    with pytest.raises(CLEARInputError, match="unsupported output extension"):
        write_volume(volume, tmp_path / "ct.mhd")


def test_from_array_rejects_bad_geometry():
    hu = np.zeros((4, 5, 6), np.int16)
    with pytest.raises(CLEARInputError, match="spacing must be positive"):
        CTVolume.from_array(hu, (1, 0, 1), (0, 0, 0))
    with pytest.raises(CLEARInputError, match="not orthonormal"):
        CTVolume.from_array(hu, (1, 1, 1), (0, 0, 0), np.diag([1.0, 2.0, 1.0]))
    with pytest.raises(CLEARInputError, match="expected a 3D volume"):
        CTVolume.from_array(hu[0], (1, 1, 1), (0, 0, 0))


@pytest.mark.parametrize(
    "perm,flip",
    list(itertools.product(itertools.permutations(range(3)), itertools.product([False, True], repeat=3))),
)
def test_from_array_canonicalizes_every_axis_aligned_layout(phantom, perm, flip):
    volume, _ = phantom
    layout = relayout(volume, perm, flip)
    read = CTVolume.from_array(layout.array, layout.spacing, layout.origin, layout.direction)
    assert_same_volume(read, volume)


@pytest.mark.parametrize("perm,flip", [((0, 1, 2), (False, False, True)), ((0, 1, 2), (True, True, False))])
def test_dicom_reader_agrees_with_gdcm_series_reader(tmp_path, phantom, perm, flip):
    """An independent oracle: SimpleITK's GDCM-based series reader on the same files."""
    import SimpleITK as sitk

    volume, _ = phantom
    write_dicom_series(relayout(volume, perm, flip), tmp_path / "s")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "s")))
    gdcm = CTVolume.from_sitk(reader.Execute())
    assert_same_volume(read_ct(tmp_path / "s"), gdcm)


def test_case_names_are_unique_and_meaningful(tmp_path):
    from CLEARLib.io.cohort import case_names

    assert case_names([tmp_path / "LUNG1-001/image.nrrd", tmp_path / "CRLM-CT-1004/image.nii.gz"]) == [
        "LUNG1-001/image",
        "CRLM-CT-1004/image",
    ]
    assert case_names([tmp_path / "P001/ct.nii.gz", tmp_path / "P002/ct.nii.gz", tmp_path / "P001/ct.nii.gz"]) == [
        "P001/ct",
        "P002/ct",
        "P001/ct#2",
    ]
    assert case_names([tmp_path / "dicom" / "1.2.840.1", tmp_path / "dicom" / "1.2.840.2"]) == [
        "1.2.840.1",
        "1.2.840.2",
    ]
    assert case_names([tmp_path / "only" / "case.mha"]) == ["case"]


def test_cohort_table_fills_ids_and_refuses_what_it_cannot_use(tmp_path):
    from CLEARLib.io.cohort import file_stem_for, read_cohort

    (tmp_path / "c.csv").write_text("path,patient_id\nLUNG1-001/image.nrrd,\nCRLM-CT-1004/image.nrrd,P9\n")
    cohort = read_cohort(tmp_path / "c.csv")
    assert list(cohort.case_id) == ["LUNG1-001/image", "CRLM-CT-1004/image"]
    assert list(cohort.patient_id) == ["LUNG1-001/image", "P9"]
    assert cohort.path[0] == str(tmp_path / "LUNG1-001/image.nrrd")
    (tmp_path / "dup.csv").write_text("path,case_id\na.nrrd,x\nb.nrrd,x\n")
    with pytest.raises(CLEARInputError, match=r"dup.csv: case_id values must be unique: \['x'\]"):
        read_cohort(tmp_path / "dup.csv")
    (tmp_path / "nopath.csv").write_text("file\na.nrrd\n")
    with pytest.raises(CLEARInputError, match="nopath.csv: a cohort table needs a 'path' column"):
        read_cohort(tmp_path / "nopath.csv")
    # IDs that differ only in characters a file name cannot hold get different feature files.
    stems = {file_stem_for(c) for c in ("LUNG1/001", "LUNG1_001", "case 1", "case_1")}
    assert len(stems) == 4 and file_stem_for("LUNG1_001") == "LUNG1_001"


def test_deeplesion_and_radchest_readers(tmp_path):
    from deeplesion_factory import write_deeplesion
    from PIL import Image

    from CLEARLib.io.deeplesion import lesion_type_code, read_deeplesion_slices, read_deeplesion_study
    from CLEARLib.io.radchest import read_radchest

    write_deeplesion(tmp_path, n_patients=1, slices=8, size=32)
    folder = tmp_path / "Images_png" / "000001_01_01"
    hu, numbers = read_deeplesion_slices(folder)
    png = np.asarray(Image.open(folder / "003.png")).astype(np.int32) - 32768
    assert numbers == list(range(8)) and hu.dtype == np.int16 and np.array_equal(hu[3], png)
    volume = read_deeplesion_study(folder, (0.7, 0.7, 5.0))
    assert volume.shape == (8, 32, 32) and volume.spacing == (0.7, 0.7, 5.0) and volume.meta["format"] == "deeplesion"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(folder / "008.png")
    with pytest.raises(CLEARInputError, match="008.png: expected a 16-bit PNG"):
        read_deeplesion_slices(folder)
    with pytest.raises(CLEARInputError, match="no PNG slices"):
        read_deeplesion_slices(tmp_path)
    assert [lesion_type_code(v) for v in ("lung", "Soft Tissue", "4", "", None)] == [5, 7, 4, -1, -1]

    np.savez(tmp_path / "chest.npz", ct=np.full((5, 8, 8), -800, np.int16))
    chest = read_radchest(tmp_path / "chest.npz")
    assert chest.spacing == (0.8, 0.8, 0.8) and int(chest.hu[0, 0, 0]) == -800
    np.savez(tmp_path / "two.npz", a=np.zeros(2), b=np.zeros(2))
    with pytest.raises(CLEARInputError, match="two.npz: expected an array named 'ct'"):
        read_radchest(tmp_path / "two.npz")


@pytest.mark.parametrize("header", ["ct.mhd", "ct.nhdr"])
def test_detached_headers_read_only_their_own_data_file(tmp_path, header):
    import os
    import re

    import SimpleITK as sitk

    hu = np.full((4, 8, 8), 40, np.int16)
    hu[-1] = -1000  # air: a volume of one value would be refused as a mask
    volume = CTVolume.from_array(hu, (1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
    path = tmp_path / header
    sitk.WriteImage(sitk.GetImageFromArray(volume.hu), str(path))
    assert int(read_ct(path).hu[0, 0, 0]) == 40
    text = path.read_text()
    field = r"(ElementDataFile = |data file: )(.*)"
    data_name = re.search(field, text).group(2).strip()
    secret = tmp_path.parent / f"{tmp_path.name}-outside.raw"
    secret.write_bytes((tmp_path / data_name).read_bytes())
    for pointer, message in (
        (str(secret), "lies outside the header's folder"),
        (f"../{secret.name}", "lies outside the header's folder"),
    ):
        path.write_text(re.sub(field, lambda m, p=pointer: m.group(1) + p, text))
        with pytest.raises(CLEARInputError, match=message):
            read_ct(path)
    os.mkfifo(tmp_path / "pipe.raw")  # a reader of a pipe would wait forever
    path.write_text(re.sub(field, lambda m: m.group(1) + "pipe.raw", text))
    with pytest.raises(CLEARInputError, match="missing or not a regular file"):
        read_ct(path)


def test_two_phases_in_one_series_are_refused_and_side_by_side_acquisitions_read(tmp_path, phantom):
    volume, _ = phantom
    layout = layout_of(volume)
    n, step = volume.shape[0], volume.spacing[2]

    def two_acquisitions(folder, shift_mm):
        uid = pydicom.uid.generate_uid()
        first = write_dicom_series(layout, folder, series_uid=uid, shuffle_seed=1)
        shift = {k: np.array([0.0, 0.0, shift_mm]) for k in range(n)}
        second = write_dicom_series(layout, folder / "b", series_uid=uid, shuffle_seed=2, position_offsets=shift)
        for number, files in ((1, first), (2, second)):
            for f in files:
                ds = pydicom.dcmread(f)
                ds.AcquisitionNumber = number
                ds.save_as(f)

    two_acquisitions(tmp_path / "phases", step / 2)  # interleaved: a second phase between the first's slices
    with pytest.raises(CLEARInputError, match=r"acquisitions that cover the same positions \(AcquisitionNumber 1"):
        read_ct(tmp_path / "phases")
    two_acquisitions(tmp_path / "steps", n * step)  # one after the other: a step-and-shoot scan
    assert read_ct(tmp_path / "steps").shape[0] == 2 * n


def test_a_nifti_without_geometry_is_refused(tmp_path):
    import nibabel as nib

    image = nib.Nifti1Image(np.zeros((6, 5, 4), np.int16), np.eye(4))
    image.set_qform(None, code=0)
    image.set_sform(None, code=0)
    nib.save(image, str(tmp_path / "nogeom.nii.gz"))
    with pytest.raises(CLEARInputError, match="nogeom.nii.gz: no geometry: the header's qform and sform codes are 0"):
        read_ct(tmp_path / "nogeom.nii.gz")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode; needs an ordinary user")
def test_an_unreadable_slice_or_sub_folder_is_named(tmp_path, phantom):
    volume, _ = phantom
    paths = write_dicom_series(layout_of(volume), tmp_path / "s" / "series")
    paths[2].chmod(0o000)
    try:
        with pytest.raises(CLEARInputError, match=f"cannot read {paths[2].name}"):
            read_ct(tmp_path / "s")
    finally:
        paths[2].chmod(0o644)
    (tmp_path / "s" / "series").chmod(0o000)
    try:
        with pytest.raises(CLEARInputError, match="cannot list .*series"):
            read_ct(tmp_path / "s")
    finally:
        (tmp_path / "s" / "series").chmod(0o755)


def test_headers_are_checked_before_the_voxels_are_read(tmp_path):
    import gzip

    import SimpleITK as sitk

    bomb = tmp_path / "bomb.nrrd"  # a few bytes that claim 8e9 voxels
    header = b"NRRD0004\ntype: int16\ndimension: 3\nsizes: 2000 2000 2000\nendian: little\nencoding: gzip\n"
    header += b"spacings: 1 1 1\n\n"
    bomb.write_bytes(header + gzip.compress(bytes(1024)))
    with pytest.raises(CLEARInputError, match=r"bomb.nrrd: the header declares 8000000000 voxels"):
        read_ct(bomb)
    flipped = tmp_path / "flip.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 5), np.int16)), str(flipped))
    data = flipped.read_bytes()
    start = data.index(b"ElementSpacing = ")
    end = data.index(b"\n", start)
    flipped.write_bytes(data[:start] + b"ElementSpacing = -1 1 1" + data[end:])
    with pytest.raises(CLEARInputError, match="flip.mha: negative ElementSpacing -1 1 1"):
        read_ct(flipped)


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 64, 64)])
def test_a_single_voxel_or_slice_image_is_not_a_ct(tmp_path, shape):
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros(shape[::-1], np.int16), np.eye(4)), str(tmp_path / "tiny.nii.gz"))
    with pytest.raises(CLEARInputError, match=r"tiny.nii.gz: shape .* needs at least 2 voxels on every axis"):
        read_ct(tmp_path / "tiny.nii.gz")


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".mha"])
@pytest.mark.parametrize("kept", [0.5, 0.97])
def test_a_file_cut_short_is_refused_not_read_as_zeros(tmp_path, phantom, suffix, kept):
    """ITK reads a cut NIfTI file with zeros for the missing voxels; every format must refuse it instead."""
    import SimpleITK as sitk

    volume, _ = phantom
    image = sitk.GetImageFromArray(volume.hu)
    full = tmp_path / f"full{suffix}"
    sitk.WriteImage(image, str(full), useCompression=suffix != ".nii")
    data = full.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: int(len(data) * kept)])
    expected = {".nii": "voxel data is incomplete", ".nii.gz": "voxel data is incomplete", ".nrrd": "nrrd",
                ".mha": "shorter than the header declares"}[suffix]  # fmt: skip
    with pytest.raises(CLEARInputError, match=expected) as error:
        read_ct(cut)
    assert str(cut) in str(error.value)
    assert read_ct(full).shape == volume.shape  # the whole file reads


def test_a_label_map_file_is_not_a_ct_unless_allowed(tmp_path, phantom):
    import SimpleITK as sitk

    volume, _ = phantom
    labels = np.zeros(volume.shape, np.uint8)
    labels[volume.hu > 100] = 1
    labels[volume.hu < -500] = 3
    path = tmp_path / "labels.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(labels), str(path))
    with pytest.raises(CLEARInputError, match=r"label map or mask, not a CT in HU: 3 distinct integer values in 0..3"):
        read_ct(path)
    assert read_ct(path, allow_non_ct=True).hu.max() == 3
    # a CT cropped to soft tissue (no air, all values 0..255) still reads: it has far more distinct values
    crop = np.clip(volume.hu, 0, 255).astype(np.int16) + np.arange(volume.hu.size).reshape(volume.shape) % 200
    sitk.WriteImage(sitk.GetImageFromArray(np.clip(crop, 0, 255).astype(np.int16)), str(tmp_path / "crop.nrrd"))
    assert read_ct(tmp_path / "crop.nrrd").shape == volume.shape
