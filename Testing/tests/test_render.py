"""Slicer's Red slice view rendered offscreen by slicer-core's own pipeline (CLEARLib.render): the CT, the heat
overlay, the seed and the ROI drawn where they are, checked pixel by pixel."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is needed to render slice views")

from CLEARLib import mrml  # noqa: E402
from CLEARLib.inference import CasePredictor  # noqa: E402
from CLEARLib.io.volume import flip_lps_ras  # noqa: E402
from CLEARLib.phantom import make_phantom  # noqa: E402

PROBE = "from CLEARLib.render import SliceViewRenderer; import slicer; SliceViewRenderer(slicer.vtkMRMLScene(), (8, 8))"


@pytest.fixture(scope="module")
def can_render():
    """Offscreen OpenGL (EGL) may be missing, and a failing context can abort the process: probe in a child."""
    probe = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"no offscreen OpenGL here (EGL/Mesa): {probe.stderr.strip().splitlines()[-1:]}")


@pytest.fixture
def case(can_render, tiny_case_bundle):
    from CLEARLib.render import SliceViewRenderer

    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    renderer = SliceViewRenderer(scene, size=(256, 256))
    volume, lesions = make_phantom((30, 96, 96), (3.0, 3.0, 5.0), seed=1)
    ct = mrml.node_from_volume(volume, scene, "CT")
    ct.GetDisplayNode().SetAutoWindowLevel(False)
    ct.GetDisplayNode().SetWindowLevel(400, 40)
    result = CasePredictor(tiny_case_bundle, device="cpu").predict(volume)
    # attention as a model that found the lesion gives it (the tiny test model's is near uniform)
    lesion_slice = int(np.argmin(np.abs(volume.slice_positions_mm - lesions[0].center_lps[2])))
    near = np.abs(result.attention.slice_index - lesion_slice)
    result.attention["attention"] = np.exp(-near.to_numpy(float))
    result.attention["attention"] /= result.attention.attention.sum()
    overlay = mrml.attention_overlay(volume, result, scene)
    return scene, renderer, volume, lesions[0], ct, overlay, result


def _redness(pixels: np.ndarray) -> float:
    return float(pixels[..., 0].astype(float).mean() - pixels[..., 2].astype(float).mean())


def test_the_heat_overlay_is_hottest_at_the_most_attended_slice_on_the_lesion(case):
    scene, renderer, volume, lesion, ct, overlay, result = case
    top = result.top_slices(1)
    assert abs(float(top.z_mm.iloc[0]) - lesion.center_lps[2]) <= volume.spacing[2] / 2
    per_slice = result.attention.groupby("slice_index").attention.max()
    coldest = int(per_slice.idxmin())
    plain = renderer.render(ct, z_mm=float(top.z_mm.iloc[0]))
    hot = renderer.render(ct, overlay, 0.4, z_mm=float(top.z_mm.iloc[0]))
    cold = renderer.render(ct, overlay, 0.4, z_mm=volume.slice_positions_mm[coldest])
    assert plain.shape == (256, 256, 3) and plain.dtype == np.uint8
    assert abs(_redness(plain)) < 2  # a grey CT
    # Iron: attention 1 is white-hot, 0 dark red; at 0.4 over the CT the lesion slice is the brightest
    assert hot.mean() > plain.mean() + 30 and hot.mean() > cold.mean() + 30
    assert _redness(cold) > 20  # the cold end is red, not the CT's grey
    row, column = renderer.world_to_pixel(flip_lps_ras(lesion.center_lps))
    lesion_hot, lesion_plain = hot[row, column].astype(int), plain[row, column].astype(int)
    assert lesion_hot[2] < lesion_plain[2] - 40 and lesion_hot[0] > lesion_plain[0] - 20  # yellow-hot on the lesion
    # the CT shows through: body brighter than the air around it
    centre, corner = plain[118:138, 118:138].mean(), plain[:10, :10].mean()
    assert centre > corner + 40


def test_seed_and_roi_are_drawn_around_the_lesion(case):
    scene, renderer, volume, lesion, ct, _, _ = case
    seed = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "seed")
    seed.AddControlPoint(*flip_lps_ras(lesion.center_lps))
    roi = mrml.patch_roi(volume, lesion.center_lps, scene)
    z = lesion.center_lps[2]
    drawn = renderer.render(ct, z_mm=z)
    for node in (seed, roi):
        node.GetDisplayNode().SetVisibility(False)
    bare = renderer.render(ct, z_mm=z)
    row, column = renderer.world_to_pixel(flip_lps_ras(lesion.center_lps))
    pixel = drawn[row, column].astype(int)
    assert pixel[0] - pixel[1] > 60, pixel  # the seed's colour, on the lesion
    assert abs(int(bare[row, column, 0]) - int(bare[row, column, 1])) < 5  # grey without it
    # The ROI box: its edge 25 mm to the patient's left of the seed is drawn, its inside near the edge is not
    edge_ras = flip_lps_ras(np.asarray(lesion.center_lps) + [25.0, 0.0, 0.0])
    edge_row, edge_column = renderer.world_to_pixel(edge_ras)
    window = (slice(edge_row - 2, edge_row + 3), slice(edge_column - 2, edge_column + 3))
    assert np.abs(drawn[window].astype(int) - bare[window].astype(int)).max() > 60
    changed = np.abs(drawn.astype(int) - bare.astype(int)).max(axis=2) > 30
    rows, columns = np.nonzero(changed)
    # everything drawn lies within the patch's 50 mm box (plus the label) around the seed
    assert abs(rows.mean() - row) < 30 and changed.sum() > 50


def test_write_png_round_trips(tmp_path, can_render):
    import SimpleITK as sitk

    from CLEARLib.render import write_png

    pixels = np.zeros((20, 30, 3), np.uint8)
    pixels[2, 5] = (255, 0, 0)  # row 2 from the top
    write_png(tmp_path / "x.png", pixels)
    read = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "x.png")))
    assert read.shape == (20, 30, 3) and tuple(read[2, 5]) == (255, 0, 0)


def test_predict_writes_slicers_view_of_the_most_attended_slice(tmp_path, can_render, phantom, tiny_case_bundle):
    import SimpleITK as sitk

    from CLEARLib.cli import main
    from CLEARLib.io import write_volume

    volume, _ = phantom
    ct = write_volume(volume, tmp_path / "ct.nii.gz")
    out = tmp_path / "results"
    assert main(["-q", "predict", str(ct), "--model", str(tiny_case_bundle), "--out", str(out), "--device", "cpu"]) == 0
    view = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "slice_view.png")))
    assert view.shape == (512, 512, 3) and view.std() > 10  # a picture, not a blank
