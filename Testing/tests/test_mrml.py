"""MRML glue on real MRML nodes (slicer-core, headless): volumes, results, plots, slice views, seeds, ROIs,
overlays and key-slice export."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pydicom
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (real MRML nodes) is needed for the glue tests")

from CLEARLib import mrml  # noqa: E402
from CLEARLib.inference import CasePredictor  # noqa: E402
from CLEARLib.preprocess import extract_lesion_patch  # noqa: E402

from ctfactory import layout_of, relayout, write_dicom_series  # noqa: E402


@pytest.fixture
def scene():
    scene = slicer.vtkMRMLScene()
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    previous = getattr(slicer, "mrmlScene", None)
    slicer.mrmlScene = scene  # slicer.util helpers use the global scene
    yield scene
    slicer.mrmlScene = previous


def _node_from_layout(scene, layout, name="CT"):
    """A volume node whose IJK-to-RAS is the layout's IJK-to-LPS with the first two rows negated."""
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = layout.direction * layout.spacing[None, :]
    ijk_to_lps[:3, 3] = layout.origin
    return slicer.util.addVolumeFromArray(
        layout.array, ijkToRAS=np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijk_to_lps, name=name
    )


@pytest.mark.parametrize(
    "perm,flip",
    [((0, 1, 2), (False, False, False)), ((0, 1, 2), (True, False, True)), ((2, 0, 1), (False, True, False))],
)
def test_volume_node_to_ctvolume(scene, phantom, perm, flip):
    volume, _ = phantom
    node = _node_from_layout(scene, relayout(volume, perm, flip))
    read = mrml.volume_from_node(node)
    np.testing.assert_array_equal(read.hu, volume.hu)
    np.testing.assert_allclose(read.origin, volume.origin, atol=1e-9)
    np.testing.assert_allclose(read.spacing, volume.spacing)
    np.testing.assert_allclose(read.direction, np.eye(3), atol=1e-12)


def test_a_volume_read_from_a_node_is_its_own_copy(scene, phantom):
    """A background job works on the CTVolume while the user may edit the node."""
    volume, _ = phantom
    node = mrml.node_from_volume(volume, scene)
    read = mrml.volume_from_node(node)
    slicer.util.arrayFromVolume(node)[:] = 0
    np.testing.assert_array_equal(read.hu, volume.hu)


def test_volume_node_round_trip_and_ras_points(scene, big_lesion_phantom):
    volume, lesion = big_lesion_phantom
    node = mrml.node_from_volume(volume, scene)
    back = mrml.volume_from_node(node)
    np.testing.assert_array_equal(back.hu, volume.hu)
    # A lesion centre in RAS, through the node's own IJK-to-RAS, lands on a lesion voxel.
    ras = np.asarray(lesion.center_lps) * [-1, -1, 1]
    ras_to_ijk = slicer.vtkMatrix4x4() if hasattr(slicer, "vtkMatrix4x4") else __import__("vtk").vtkMatrix4x4()
    node.GetRASToIJKMatrix(ras_to_ijk)
    ijk = np.rint(np.array([ras_to_ijk.MultiplyPoint([*ras, 1.0])[:3]])[0]).astype(int)
    assert slicer.util.arrayFromVolume(node)[ijk[2], ijk[1], ijk[0]] == lesion.hu


def test_results_table_and_attention_plot(scene, phantom, tiny_case_bundle):
    volume, _ = phantom
    result = CasePredictor(tiny_case_bundle, device="cpu").predict(volume)
    table = mrml.results_to_table(result, scene)
    frame = slicer.util.dataframeFromTable(table)
    assert list(frame.label) == ["liver", "lung", "bone"]
    np.testing.assert_allclose(frame.probability, list(result.probabilities.values()))

    plot = mrml.attention_to_plot(result, scene)
    chart = scene.GetNodeByID(plot.chart_id)
    assert set(plot.series_ids) == {"abdomen", "lung"}
    assert chart.GetNumberOfPlotSeriesNodes() == 3  # two windows and the current-slice marker
    series = scene.GetNodeByID(plot.series_ids["lung"])
    assert series.GetXColumnName() == "z_mm" and series.GetYColumnName() == "attention_lung"
    wide = slicer.util.dataframeFromTable(scene.GetNodeByID(plot.table_id))
    assert len(wide) == volume.shape[0]
    np.testing.assert_allclose(wide.z_mm, volume.slice_positions_mm)
    lung = result.attention[result.attention.window == "lung"].sort_values("slice_index")
    np.testing.assert_allclose(wide.attention_lung, lung.attention, rtol=1e-6)

    mrml.set_marker(plot, scene, z_mm=float(volume.slice_positions_mm[7]))
    marker = slicer.util.dataframeFromTable(scene.GetNodeByID(plot.marker_table_id))
    assert list(marker.z_mm) == [volume.slice_positions_mm[7]] * 2
    assert marker.attention.iloc[1] == pytest.approx(wide[["attention_abdomen", "attention_lung"]].max().max())
    assert mrml.slice_index_for_plot_point(plot, 7) == 7

    layout = scene.AddNewNodeByClass("vtkMRMLLayoutNode")
    other = scene.AddNewNodeByClass("vtkMRMLPlotViewNode")  # another module's plot view, first in the scene
    other.SetLayoutName("PlotView1")
    view = scene.AddNewNodeByClass("vtkMRMLPlotViewNode")
    view.SetLayoutName(mrml.PLOT_VIEW_TAG)  # what the layout manager makes from CLEAR's layout
    mrml.show_plot(scene, plot, layout)
    assert layout.IsLayoutDescription(mrml.LAYOUT_ID) and layout.GetViewArrangement() == mrml.LAYOUT_ID
    assert mrml.clear_plot_view(scene) is view and view.GetPlotChartNodeID() == plot.chart_id
    assert view.GetInteractionMode() == slicer.vtkMRMLPlotViewNode.InteractionModeSelectPoints
    assert other.GetPlotChartNodeID() is None  # left alone


def test_layout_registered_at_start_up_survives_a_saved_scene(scene, tmp_path):
    """The scene stores the layout's number only: a layout node that CLEAR registered at start-up shows it
    again when a scene saved in CLEAR's layout is read back."""
    layout = scene.AddNewNodeByClass("vtkMRMLLayoutNode")
    mrml.register_layout(layout)
    layout.SetViewArrangement(mrml.LAYOUT_ID)
    scene.SetURL(str(tmp_path / "scene.mrml"))
    assert scene.Commit()
    reopened = slicer.vtkMRMLScene()
    fresh_layout = reopened.AddNewNodeByClass("vtkMRMLLayoutNode")  # the application's, at start-up
    mrml.register_layout(fresh_layout)
    reopened.SetURL(str(tmp_path / "scene.mrml"))
    assert reopened.Connect()
    layouts = reopened.GetNodesByClass("vtkMRMLLayoutNode")
    arrangements = {layouts.GetItemAsObject(i).GetViewArrangement() for i in range(layouts.GetNumberOfItems())}
    assert mrml.LAYOUT_ID in arrangements and fresh_layout.IsLayoutDescription(mrml.LAYOUT_ID)


def _red_view(scene, volume_node):
    red = scene.AddNewNodeByClass("vtkMRMLSliceNode", "Red")
    red.SetLayoutName("Red")
    red.SetOrientation("Axial")
    composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    composite.SetLayoutName("Red")
    composite.SetBackgroundVolumeID(volume_node.GetID())
    return red, composite


def test_slice_index_to_red_view_and_back(scene, phantom):
    volume, _ = phantom
    stored = relayout(volume, (0, 1, 2), (False, False, True))  # stored superior to inferior
    node = _node_from_layout(scene, stored)
    read = mrml.volume_from_node(node)
    red, _ = _red_view(scene, node)
    logic = slicer.vtkMRMLSliceLogic()
    logic.SetMRMLScene(scene)
    logic.SetSliceNode(red)
    for k in (0, 5, volume.shape[0] - 1):
        mrml.jump_to_slice(red, read, k)
        assert logic.GetSliceOffset() == pytest.approx(mrml.slice_offset(read, k))
        assert mrml.slice_index_of_view(red, read) == k
    logic.SetSliceOffset(mrml.slice_offset(read, 9) + 0.4 * volume.spacing[2])  # scrolled a bit past
    assert mrml.slice_index_of_view(red, read) == 9
    with pytest.raises(IndexError):
        mrml.jump_to_slice(red, read, volume.shape[0])


def test_attention_overlay_shares_the_ct_geometry(scene, phantom, tiny_case_bundle):
    volume, _ = phantom
    node = _node_from_layout(scene, relayout(volume, (0, 1, 2), (True, False, False)))
    read = mrml.volume_from_node(node)
    result = CasePredictor(tiny_case_bundle, device="cpu").predict(read)
    overlay = mrml.attention_overlay(read, result, scene)
    bounds_ct, bounds_overlay = [0.0] * 6, [0.0] * 6
    node.GetRASBounds(bounds_ct)
    overlay.GetRASBounds(bounds_overlay)
    np.testing.assert_allclose(bounds_overlay, bounds_ct, atol=1e-6)
    values = slicer.util.arrayFromVolume(overlay)
    assert values.shape == (volume.shape[0], 1, 1)  # one value per slice, spanning the CT's width and height
    per_slice = result.attention.groupby("slice_index").attention.max().to_numpy()
    np.testing.assert_allclose(values[:, 0, 0], per_slice / per_slice.max(), rtol=1e-5)
    assert values.max() == pytest.approx(1.0)
    assert overlay.GetHideFromEditors() and not overlay.GetDisplayNode().GetInterpolate()
    composites = [scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode") for _ in range(3)]
    mrml.show_overlay(composites, overlay, visible=True, opacity=0.35)
    assert all(c.GetForegroundVolumeID() == overlay.GetID() for c in composites)
    assert composites[0].GetForegroundOpacity() == pytest.approx(0.35)
    mrml.show_overlay(composites, overlay, visible=False, opacity=0.35)
    assert composites[1].GetForegroundOpacity() == 0.0


def test_markups_seed_and_patch_roi(scene, big_lesion_phantom):
    volume, lesion = big_lesion_phantom
    markups = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    ras = np.asarray(lesion.center_lps) * [-1, -1, 1]
    markups.AddControlPointWorld(*ras)
    seed = mrml.seed_lps_from_markups(markups)
    np.testing.assert_allclose(seed, lesion.center_lps)
    roi = mrml.patch_roi(volume, seed, scene)
    centre, size = [0.0] * 3, [0.0] * 3
    roi.GetCenterWorld(centre)
    roi.GetSizeWorld(size)
    assert size == pytest.approx([50.0] * 3)
    # The seed sits in patch voxel 25 (0-based) of the 1 mm grid: 0.5 to 1.5 mm past the box centre.
    offset_lps = (ras - np.asarray(centre)) * [-1, -1, 1]
    assert np.all((offset_lps >= 0.5 - 1e-6) & (offset_lps < 1.5)), offset_lps
    # The ROI's first voxel centre is the patch's voxel [0, 0, 0]: sample the CT there.
    first_ras = np.asarray(centre) - np.array([-1, -1, 1]) * 24.5
    patch = extract_lesion_patch(volume, seed)
    hu_first = patch[0, 0, 0] * 3072 - 1024
    zyx = np.rint(volume.ras_to_index(first_ras)).astype(int)
    assert abs(hu_first - volume.hu[tuple(zyx)]) < 200  # same place (interpolated vs nearest voxel)
    with pytest.raises(Exception, match="place a seed"):
        mrml.seed_lps_from_markups(scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode"))


def test_key_slice_annotation_and_export(scene, big_lesion_phantom, tmp_path):
    volume, lesion = big_lesion_phantom
    notes = mrml.KeySliceAnnotations(scene, "case-7", volume)
    notes.mark(3)
    notes.mark(3)
    notes.mark(10)
    assert notes.is_marked(3) and notes.is_marked(10)
    notes.unmark(10)
    assert not notes.is_marked(10)
    # A box drawn around the lesion on its slice.
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    ras = np.asarray(lesion.center_lps) * [-1, -1, 1]
    roi.SetCenterWorld(*ras)
    roi.SetSizeWorld(28.0, 28.0, 1.0)
    k = notes.add_box(roi, lesion_type=4)
    zyx = volume.lps_to_index(lesion.center_lps)
    assert k == round(zyx[0])
    path = notes.export(tmp_path / "key_slices.csv")
    table = pd.read_csv(path)
    assert list(table.columns) == mrml.KEY_SLICE_COLUMNS
    assert list(table.key_slice_index) == [3, k]
    box = table[table.key_slice_index == k].iloc[0]
    half_x, half_y = 14.0 / volume.spacing[0], 14.0 / volume.spacing[1]
    assert box.x1 == pytest.approx(zyx[2] - half_x, abs=1e-6) and box.x2 == pytest.approx(zyx[2] + half_x, abs=1e-6)
    assert box.y1 == pytest.approx(zyx[1] - half_y, abs=1e-6) and box.y2 == pytest.approx(zyx[1] + half_y, abs=1e-6)
    assert box.lesion_type == 4 and box.spacing_z == volume.spacing[2] and box.case_id == "case-7"
    # The export is what pretraining reads: the box's pixels hold the lesion.
    assert volume.hu[k, int(round((box.y1 + box.y2) / 2)), int(round((box.x1 + box.x2) / 2))] == lesion.hu


def test_repeated_runs_reuse_the_nodes_of_their_input_volume(scene, phantom, tiny_case_bundle):
    """Three runs on one CT leave one table, one chart, its series and one compact overlay; another CT gets
    its own; the overlay is never offered as input."""
    volume, _ = phantom
    node = mrml.node_from_volume(volume, scene, "CT one")
    result = CasePredictor(tiny_case_bundle, device="cpu").predict(volume)
    composites = [scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode") for _ in range(3)]

    classes = ("vtkMRMLTableNode", "vtkMRMLPlotChartNode", "vtkMRMLPlotSeriesNode", "vtkMRMLScalarVolumeNode")

    def counts():
        return {c: scene.GetNumberOfNodesByClass(c) for c in classes}

    first = mrml.show_case_result(scene, volume, result, node, composites)
    after_one = counts()
    for _ in range(2):
        again = mrml.show_case_result(scene, volume, result, node, composites)
    assert (
        counts()
        == after_one
        == {
            "vtkMRMLTableNode": 3,  # predictions, attention, marker
            "vtkMRMLPlotChartNode": 1,
            "vtkMRMLPlotSeriesNode": 3,  # two windows and the marker
            "vtkMRMLScalarVolumeNode": 2,  # the CT and its overlay
        }
    )
    assert again.table is first.table and again.overlay is first.overlay and again.plot.chart_id == first.plot.chart_id
    assert scene.GetNodeByID(again.plot.chart_id).GetNumberOfPlotSeriesNodes() == 3
    assert all(c.GetForegroundVolumeID() == first.overlay.GetID() for c in composites)
    # a lung-only rerun drops the abdomen series it no longer has
    lung_only = result.attention[result.attention.window == "lung"].reset_index(drop=True)
    result.attention = lung_only
    mrml.show_case_result(scene, volume, result, node, composites)
    assert scene.GetNumberOfNodesByClass("vtkMRMLPlotSeriesNode") == 2
    # another input volume gets nodes of its own
    other = mrml.node_from_volume(volume, scene, "CT two")
    mrml.show_case_result(scene, volume, result, other, composites)
    assert scene.GetNumberOfNodesByClass("vtkMRMLPlotChartNode") == 2
    assert mrml.first_input_volume(scene) is node  # overlays are hidden and never picked as input
    labels = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    scene.RemoveNode(node)
    scene.RemoveNode(other)
    assert mrml.first_input_volume(scene) is None and labels is not None


def test_placing_a_seed_again_replaces_it(scene):
    seed = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "seed")
    seed.AddControlPoint(1.0, 2.0, 3.0)
    seed.AddControlPoint(4.0, 5.0, 6.0)
    mrml.keep_last_point(seed)
    assert seed.GetNumberOfControlPoints() == 1
    np.testing.assert_allclose(seed.GetNthControlPointPosition(0), (4.0, 5.0, 6.0))


class _DicomDatabase:
    """What the module asks of slicer.dicomDatabase (a ctkDICOMDatabase, which needs Qt): the file of an
    instance UID. The files and the checks on them are real."""

    def __init__(self, files):
        self.files = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): str(f) for f in files}

    def fileForInstance(self, uid):  # noqa: N802  (ctkDICOMDatabase's name)
        return self.files.get(uid, "")


def test_volumes_loaded_from_dicom_get_the_readers_checks(scene, phantom, tmp_path):
    volume, _ = phantom
    node = mrml.node_from_volume(volume, scene, "3: CT chest")
    assert mrml.dicom_problem(node, _DicomDatabase([])) is None  # not from DICOM: nothing to check
    complete = write_dicom_series(layout_of(volume), tmp_path / "complete")
    gap = write_dicom_series(layout_of(volume), tmp_path / "gap", skip=(4,))
    for files, expected in ((complete, None), (gap, "missing slice")):
        database = _DicomDatabase(files)
        node.SetAttribute("DICOM.instanceUIDs", " ".join(database.files))
        problem = mrml.dicom_problem(node, database)
        assert problem is None if expected is None else expected in problem, problem
    node.SetAttribute("DICOM.instanceUIDs", "1.2.3.4")
    assert "not in the DICOM database" in mrml.dicom_problem(node, _DicomDatabase(complete))


def test_one_labels_attention_refills_the_plot_and_overlay_of_its_input(scene, phantom, tiny_per_label_bundle):
    # What the module's "Attention of" selector does: show the result for one label, then for all again.
    volume, _ = phantom
    node = _node_from_layout(scene, relayout(volume, (0, 1, 2), (False, False, False)))
    read = mrml.volume_from_node(node)
    result = CasePredictor(tiny_per_label_bundle, device="cpu").predict(read)
    shown = mrml.show_case_result(scene, read, result.for_labels("lung"), node)
    wide = slicer.util.dataframeFromTable(scene.GetNodeByID(shown.plot.table_id))
    lung = result.attention[result.attention.window == "lung"].sort_values("slice_index")
    np.testing.assert_allclose(wide.attention_lung, lung["attention:lung"], rtol=1e-6)
    per_slice = result.attention.groupby("slice_index")["attention:lung"].max().to_numpy()
    np.testing.assert_allclose(
        slicer.util.arrayFromVolume(shown.overlay)[:, 0, 0], per_slice / per_slice.max(), rtol=1e-5
    )
    again = mrml.show_case_result(scene, read, result, node)
    assert again.plot.table_id == shown.plot.table_id and again.overlay.GetID() == shown.overlay.GetID()
    wide = slicer.util.dataframeFromTable(scene.GetNodeByID(again.plot.table_id))
    np.testing.assert_allclose(wide.attention_lung, lung["attention"], rtol=1e-6)
