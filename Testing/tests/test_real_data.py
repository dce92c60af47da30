"""Real CT from public packages' source distributions (not committed; see Testing/fetch_real_data.sh).

Skipped unless CLEAR_REAL_DATA names the folder they were unpacked into.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from CLEARLib.io import CTVolume, read_ct
from CLEARLib.preprocess import extract_lesion_patch, fmcib_reference_patch

ROOT = Path(os.environ.get("CLEAR_REAL_DATA", "/nonexistent"))
pytestmark = pytest.mark.skipif(
    not ROOT.is_dir(), reason="real CT not present: run Testing/fetch_real_data.sh and set CLEAR_REAL_DATA"
)


def _first(pattern: str) -> Path:
    found = sorted(ROOT.glob(pattern))
    if not found:
        pytest.skip(f"{pattern} not found under {ROOT}")
    return found[0]


def test_jpeg2000_dicom_series_matches_gdcm():
    folder = _first("totalsegmentator-*/tests/reference_files/example_ct_dicom")
    ours = read_ct(folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    gdcm = CTVolume.from_sitk(reader.Execute())
    np.testing.assert_array_equal(ours.hu, gdcm.hu)
    np.testing.assert_allclose(ours.origin, gdcm.origin, atol=1e-4)
    np.testing.assert_allclose(ours.spacing, gdcm.spacing, atol=1e-6)
    assert ours.hu.min() >= -1024 and ours.hu.max() > 1000


@pytest.mark.parametrize("case", ["lung1", "lung2"])
def test_lesion_patch_on_a_labelled_lung_lesion(case):
    image = _first(f"pyradiomics-*/data/{case}_image.nrrd")
    volume = read_ct(image)
    label = read_ct(image.with_name(f"{case}_label.nrrd"), allow_non_ct=True)
    assert label.shape == volume.shape
    centroid_lps = volume.index_to_lps(np.argwhere(label.hu > 0).mean(axis=0))
    patch = extract_lesion_patch(volume, centroid_lps)
    np.testing.assert_allclose(patch, fmcib_reference_patch(volume, centroid_lps, border="centred"), atol=1e-5)
    # A solid lung lesion: soft-tissue density at the centre, lung parenchyma around it.
    centre_hu = patch[23:28, 23:28, 23:28].mean() * 3072 - 1024
    assert -300 < centre_hu < 300, centre_hu
    assert (patch * 3072 - 1024).min() < -600
