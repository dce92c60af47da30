"""MRML glue: everything the CLEAR module does to a Slicer scene, as functions on MRML nodes.

Needs only the `slicer` MRML API (real Slicer, or the `slicer-core` wheel headless); never qt.
`CLEAR.py` wires widgets to these calls, and the tests run them on real MRML nodes.

Coordinates: Slicer works in RAS, files and the engine in LPS; RAS = (-L, -P, S). An axial slice
view's offset is the S coordinate of its plane, which is also each slice's `z_mm`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import slicer
import vtk

from .errors import CLEARInputError
from .io.volume import LPS_RAS, CTVolume, flip_lps_ras
from .preprocess.lesion import lesion_patch_centre

_RAS_FROM_LPS = np.diag([*LPS_RAS, 1.0])
HEAT_COLORS = "vtkMRMLColorTableNodeIron"  # black, red, yellow, white: 0 to 1 attention
LAYOUT_ID = 20251  # CLEAR's custom layout: slice views beside the attention plot
LAYOUT_XML = """
<layout type="horizontal" split="true">
 <item splitSize="600">
  <layout type="vertical">
   <item><view class="vtkMRMLSliceNode" singletontag="Red">
    <property name="orientation" action="default">Axial</property>
    <property name="viewlabel" action="default">R</property>
    <property name="viewcolor" action="default">#F34A33</property></view></item>
   <item><layout type="horizontal">
    <item><view class="vtkMRMLSliceNode" singletontag="Yellow">
     <property name="orientation" action="default">Sagittal</property>
     <property name="viewlabel" action="default">Y</property>
     <property name="viewcolor" action="default">#EDD54C</property></view></item>
    <item><view class="vtkMRMLSliceNode" singletontag="Green">
     <property name="orientation" action="default">Coronal</property>
     <property name="viewlabel" action="default">G</property>
     <property name="viewcolor" action="default">#6EB04B</property></view></item>
   </layout></item>
  </layout>
 </item>
 <item splitSize="400"><view class="vtkMRMLPlotViewNode" singletontag="CLEARPlot">
  <property name="viewlabel" action="default">P</property></view></item>
</layout>
"""


def _matrix(vtk_matrix) -> np.ndarray:
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _vtk_matrix(array: np.ndarray):
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(array[r, c]))
    return m


# ------------------------------------------------------------------------------------ volumes
def volume_from_node(node) -> CTVolume:
    """A scalar volume node as a canonical `CTVolume` (IJK-to-RAS, flips and permutations included)."""
    if node is None or node.GetImageData() is None:
        raise CLEARInputError("the volume node has no image data", getattr(node, "GetName", lambda: None)())
    ijk_to_ras = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras)
    ijk_to_lps = _RAS_FROM_LPS @ _matrix(ijk_to_ras)  # the same diagonal maps RAS to LPS
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    direction = ijk_to_lps[:3, :3] / spacing
    # [k, j, i]; a copy: a background job must not see the node change under it (arrayFromVolume is a view)
    hu = slicer.util.arrayFromVolume(node).copy()
    meta = {"source": f"Slicer volume node {node.GetName()}", "node_id": node.GetID()}
    return CTVolume.from_array(hu, spacing, ijk_to_lps[:3, 3], direction, meta=meta, source=node.GetName())


def node_from_volume(volume: CTVolume, scene, name: str = "CT", array: np.ndarray | None = None, node=None):
    """A scalar volume node holding `array` (default: the HU) on the volume's voxel grid."""
    node = node or scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetIJKToRASMatrix(_vtk_matrix(volume.ijk_to_ras_matrix))
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(volume.hu if array is None else array))
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    return node


# ------------------------------------------------------------------------------------ results
ROLE, FOR_VOLUME = "CLEAR.role", "CLEAR.volume"  # node attributes: what a node shows, and for which input


def owned_node(scene, class_name: str, role: str, key: str | None, name: str):
    """CLEAR's node of this role for input `key` (a volume node ID), made once and reused by every later run
    on that input, so that runs do not pile up tables, charts and overlays. `key` None: always a new node."""
    if key is not None:
        nodes = scene.GetNodesByClass(class_name)
        for i in range(nodes.GetNumberOfItems()):
            node = nodes.GetItemAsObject(i)
            if node.GetAttribute(ROLE) == role and node.GetAttribute(FOR_VOLUME) == key:
                return node
    node = scene.AddNewNodeByClass(class_name, scene.GenerateUniqueName(name))
    node.SetAttribute(ROLE, role)
    if key is not None:
        node.SetAttribute(FOR_VOLUME, key)
    return node


def _table_node(scene, name: str, node=None):
    node = node or scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    node.RemoveAllColumns()
    return node


def _fill_table(node, frame: pd.DataFrame) -> None:
    for column in frame.columns:
        values = frame[column].to_numpy()
        array = vtk.vtkDoubleArray() if values.dtype.kind in "fiub" else vtk.vtkStringArray()
        _insert(array, values)
        array.SetName(str(column))
        node.AddColumn(array)
    node.Modified()


def _insert(array, values) -> None:
    """Append values to a table column: numbers to a vtkDoubleArray, everything else as text."""
    numeric = isinstance(array, vtk.vtkDoubleArray)
    for value in values:
        array.InsertNextValue(float(value) if numeric else str(value))


def table_from_frame(scene, frame: pd.DataFrame, name: str, node=None):
    """A table node holding a DataFrame (numbers as numbers, everything else as text)."""
    node = _table_node(scene, name, node)
    _fill_table(node, frame)
    return node


def append_to_table(node, frame: pd.DataFrame) -> None:
    """Add `frame`'s rows to a table node filled by `table_from_frame` with the same columns, without
    rewriting the rows already there (a batch adds each finished case to tables of many thousand rows)."""
    if node.GetNumberOfColumns() == 0:
        _fill_table(node, frame)
        return
    table = node.GetTable()
    for column in frame.columns:
        array = table.GetColumnByName(str(column))
        if array is None:
            raise ValueError(f"table {node.GetName()!r} has no column {column!r}")
        _insert(array, frame[column].to_numpy())
    table.Modified()
    node.Modified()


def results_to_table(result, scene, node=None, name: str = "CLEAR predictions", key: str | None = None):
    """label, probability rows in a table node (the one of input `key`, when given)."""
    frame = pd.DataFrame({"label": result.labels, "probability": list(result.probabilities.values())})
    node = node or owned_node(scene, "vtkMRMLTableNode", "predictions", key, name)
    return table_from_frame(scene, frame, name, node)


@dataclass
class AttentionPlot:
    """Node IDs of the attention plot: table, one series per window, the current-slice marker."""

    table_id: str
    chart_id: str
    series_ids: dict[str, str]
    marker_table_id: str
    marker_series_id: str
    slice_index: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, int))
    z_mm: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))


def attention_wide(result) -> pd.DataFrame:
    """One row per slice: slice_index, z_mm, and one attention column per window."""
    wide = result.attention.pivot_table(index=["slice_index", "z_mm"], columns="window", values="attention", sort=True)
    wide.columns = [f"attention_{w}" for w in wide.columns]
    return wide.reset_index()


def attention_to_plot(result, scene, title: str = "CLEAR attention", key: str | None = None) -> AttentionPlot:
    """Attention table, a plot series per window against slice position (mm), a chart, and a marker; the
    nodes of input `key` are refilled when a run on it made them before."""
    wide = attention_wide(result)
    table = _table_node(
        scene, f"{title} table", owned_node(scene, "vtkMRMLTableNode", "attention", key, f"{title} table")
    )
    _fill_table(table, wide)
    chart = owned_node(scene, "vtkMRMLPlotChartNode", "attention chart", key, title)
    chart.RemoveAllPlotSeriesNodeIDs()
    chart.SetTitle(title)
    chart.SetXAxisTitle("slice position S (mm)")
    chart.SetYAxisTitle("attention")
    colors = [(0.2, 0.4, 0.9), (0.9, 0.25, 0.2), (0.2, 0.7, 0.3), (0.6, 0.3, 0.8)]
    windows = [c[len("attention_") :] for c in wide.columns if c.startswith("attention_")]
    _remove_stale_series(scene, key, keep={f"attention series {w}" for w in windows})
    series_ids = {}
    for i, window in enumerate(windows):
        series = owned_node(scene, "vtkMRMLPlotSeriesNode", f"attention series {window}", key, f"{window} window")
        series.SetAndObserveTableNodeID(table.GetID())
        series.SetXColumnName("z_mm")
        series.SetYColumnName(f"attention_{window}")
        series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
        series.SetColor(*colors[i % len(colors)])
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
        series_ids[window] = series.GetID()
    marker_table = owned_node(scene, "vtkMRMLTableNode", "marker", key, f"{title} marker")
    _fill_table(_table_node(scene, "", marker_table), pd.DataFrame({"z_mm": [0.0, 0.0], "attention": [0.0, 0.0]}))
    marker = owned_node(scene, "vtkMRMLPlotSeriesNode", "marker series", key, "current slice")
    marker.SetAndObserveTableNodeID(marker_table.GetID())
    marker.SetXColumnName("z_mm")
    marker.SetYColumnName("attention")
    marker.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeLine)
    marker.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
    marker.SetColor(0.1, 0.1, 0.1)
    chart.AddAndObservePlotSeriesNodeID(marker.GetID())
    return AttentionPlot(
        table.GetID(),
        chart.GetID(),
        series_ids,
        marker_table.GetID(),
        marker.GetID(),
        wide.slice_index.to_numpy(),
        wide.z_mm.to_numpy(),
    )


def _remove_stale_series(scene, key: str | None, keep: set[str]) -> None:
    """Series of windows an earlier run on this input had and this one has not."""
    if key is None:
        return
    nodes = scene.GetNodesByClass("vtkMRMLPlotSeriesNode")
    stale = [nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())]
    for node in stale:
        role = node.GetAttribute(ROLE) or ""
        if node.GetAttribute(FOR_VOLUME) == key and role.startswith("attention series ") and role not in keep:
            scene.RemoveNode(node)


def set_marker(plot: AttentionPlot, scene, z_mm: float) -> None:
    """Move the current-slice marker (a vertical line from 0 to the highest attention) to z_mm."""
    table = scene.GetNodeByID(plot.table_id)
    peak = 0.0
    for c in range(table.GetNumberOfColumns()):
        name = table.GetColumnName(c)
        if name.startswith("attention_"):
            peak = max(peak, float(np.nanmax(slicer.util.arrayFromTableColumn(table, name))))
    marker = scene.GetNodeByID(plot.marker_table_id)
    table_data = marker.GetTable()
    for row, y in enumerate((0.0, peak)):
        table_data.SetValue(row, 0, vtk.vtkVariant(float(z_mm)))
        table_data.SetValue(row, 1, vtk.vtkVariant(float(y)))
    table_data.Modified()
    marker.Modified()


def slice_index_for_plot_point(plot: AttentionPlot, row: int) -> int:
    """A clicked plot point (row of the attention table) to its slice index."""
    return int(plot.slice_index[row])


PLOT_VIEW_TAG = "CLEARPlot"  # the singleton tag of CLEAR's plot view in LAYOUT_XML


def register_layout(layout_node) -> None:
    """Make CLEAR's layout known to the layout node. The module does this at application start-up: a saved
    scene stores only the layout's number, so a layout registered only after a run would be missing when
    the scene is reopened."""
    if layout_node is not None and not layout_node.IsLayoutDescription(LAYOUT_ID):
        layout_node.AddLayoutDescription(LAYOUT_ID, LAYOUT_XML)


def clear_plot_view(scene):
    """CLEAR's own plot view node (made when its layout is shown), not whichever plot view comes first."""
    views = scene.GetNodesByClass("vtkMRMLPlotViewNode")
    for i in range(views.GetNumberOfItems()):
        view = views.GetItemAsObject(i)
        if PLOT_VIEW_TAG in (view.GetSingletonTag(), view.GetLayoutName()):
            return view
    return None


def show_plot(scene, plot: AttentionPlot, layout_node=None) -> None:
    """Switch to CLEAR's layout (slice views beside a plot view) and show the chart in CLEAR's plot view."""
    if layout_node is not None:
        register_layout(layout_node)
        layout_node.SetViewArrangement(LAYOUT_ID)
    view = clear_plot_view(scene)
    if view is not None:
        view.SetPlotChartNodeID(plot.chart_id)
        view.SetInteractionMode(slicer.vtkMRMLPlotViewNode.InteractionModeSelectPoints)  # clicks select slices


# ------------------------------------------------------------------------------ slice views
def slice_offset(volume: CTVolume, slice_index: int) -> float:
    """The axial slice view offset (S in mm) that shows slice `slice_index`."""
    return float(volume.slice_positions_mm[int(slice_index)])


def jump_to_slice(slice_node, volume: CTVolume, slice_index: int) -> None:
    """Move a slice view (e.g. Red) so that it shows `slice_index`, keeping its in-plane position."""
    if not 0 <= slice_index < volume.shape[0]:
        raise IndexError(f"slice {slice_index} outside 0..{volume.shape[0] - 1}")
    centre = volume.index_to_ras([slice_index, (volume.shape[1] - 1) / 2, (volume.shape[2] - 1) / 2])
    slice_node.JumpSliceByOffsetting(*centre)


def slice_index_of_view(slice_node, volume: CTVolume) -> int:
    """The slice of `volume` nearest to a slice view's plane (clamped to the volume)."""
    point = _matrix(slice_node.GetSliceToRAS())[:3, 3]
    index = int(round(volume.ras_to_index(point)[0]))
    return min(max(index, 0), volume.shape[0] - 1)


def attention_overlay(
    volume: CTVolume, result, scene, window: str | None = None, node=None, name="CLEAR attention", key=None
):
    """The heat overlay: each slice's attention scaled to 0..1 (the maximum over windows, or one window), shown
    over the slice views. Stored compactly: one voxel per slice, as wide and high as the CT, drawn without
    interpolation, so a 512x512x600 CT's overlay holds 600 values, not 157 million. Hidden from volume
    selectors (it is not a CT to pick as input); the node of input `key` is refilled on later runs."""
    frame = result.attention if window is None else result.attention[result.attention.window == window]
    per_slice = frame.groupby("slice_index").attention.max()
    values = np.zeros(volume.shape[0], dtype=np.float32)
    values[per_slice.index.to_numpy()] = per_slice.to_numpy()
    if values.max() > 0:
        values /= values.max()
    node = node or owned_node(scene, "vtkMRMLScalarVolumeNode", "overlay", key, name)
    node.SetHideFromEditors(True)
    ijk_to_ras = volume.ijk_to_ras_matrix.copy()
    rows, columns = volume.shape[1], volume.shape[2]
    ijk_to_ras[:, 3] = ijk_to_ras @ np.array([(columns - 1) / 2, (rows - 1) / 2, 0.0, 1.0])  # the CT's centre
    ijk_to_ras[:3, 0] *= columns  # one voxel spans the CT's width, one its height
    ijk_to_ras[:3, 1] *= rows
    node.SetIJKToRASMatrix(_vtk_matrix(ijk_to_ras))
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(values[:, None, None]))
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetAutoWindowLevel(False)
    display.SetWindowLevelMinMax(0.0, 1.0)
    display.SetInterpolate(False)
    if scene.GetNodeByID(HEAT_COLORS) is not None:  # Slicer's default tables (a bare scene has none)
        display.SetAndObserveColorNodeID(HEAT_COLORS)
    return node


def show_overlay(composite_nodes, overlay_node, visible: bool = True, opacity: float = 0.4) -> None:
    """Put the overlay in the foreground of the given slice views, at `opacity` (0 when hidden)."""
    for composite in composite_nodes:
        composite.SetForegroundVolumeID(overlay_node.GetID() if overlay_node is not None else None)
        composite.SetForegroundOpacity(float(opacity) if visible else 0.0)


@dataclass
class CaseDisplay:
    """What `show_case_result` put in the scene: the results table, the attention plot and the heat overlay."""

    table: object  # vtkMRMLTableNode
    plot: AttentionPlot
    overlay: object  # vtkMRMLScalarVolumeNode


def show_case_result(scene, volume: CTVolume, result, volume_node=None, composite_nodes=(), opacity: float = 0.4,
                     visible: bool = True) -> CaseDisplay:  # fmt: skip
    """The results table, the attention plot and the heat overlay of a case, in the nodes of its input volume
    node (made by the first run on it, refilled by later runs), the overlay shown in `composite_nodes`."""
    key = volume_node.GetID() if volume_node is not None else None
    name = volume_node.GetName() if volume_node is not None else "CT"
    table = results_to_table(result, scene, name=f"CLEAR predictions {name}", key=key)
    plot = attention_to_plot(result, scene, title=f"CLEAR attention {name}", key=key)
    overlay = attention_overlay(volume, result, scene, name=f"CLEAR attention overlay {name}", key=key)
    show_overlay(composite_nodes, overlay, visible, opacity)
    return CaseDisplay(table, plot, overlay)


def first_input_volume(scene):
    """The volume to offer as input when none is chosen: the first scalar volume a user made or loaded, never
    one of CLEAR's overlays or another node hidden from selectors, nor a label map."""
    nodes = scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
    for i in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(i)
        if not node.GetHideFromEditors() and not node.IsA("vtkMRMLLabelMapVolumeNode") and not node.GetAttribute(ROLE):
            return node
    return None


def dicom_problem(volume_node, database) -> str | None:
    """For a volume Slicer's DICOM module loaded: the same checks CLEARLib.io runs on a DICOM folder, on the
    files the DICOM database holds for the node's instance UIDs (missing slices, tilt, duplicates, modality).
    The problem in words, or None (also for volumes that did not come from DICOM)."""
    from .io.dicom import check_series_files

    uids = (volume_node.GetAttribute("DICOM.instanceUIDs") or "").split()
    if not uids or database is None:
        return None
    files = [database.fileForInstance(uid) for uid in uids]
    if not all(files):
        return f"{sum(not f for f in files)} of the series' {len(files)} instances are not in the DICOM database"
    try:
        check_series_files(files, where=volume_node.GetName())
    except CLEARInputError as exc:
        return str(exc)
    return None


# ------------------------------------------------------------------------------------- lesion
def keep_last_point(markups_node) -> None:
    """A seed is one point: placing another replaces it (the newest point is kept)."""
    while markups_node.GetNumberOfControlPoints() > 1:
        markups_node.RemoveNthControlPoint(0)


def seed_lps_from_markups(markups_node, index: int = 0) -> np.ndarray:
    if markups_node is None or markups_node.GetNumberOfControlPoints() <= index:
        raise CLEARInputError("place a seed point on the lesion first")
    ras = [0.0, 0.0, 0.0]
    markups_node.GetNthControlPointPositionWorld(index, ras)
    return flip_lps_ras(ras)


def patch_roi(volume: CTVolume, seed, scene, coord: str = "LPS", size: int = 50, spacing_mm: float = 1.0, node=None):
    """An ROI node outlining exactly the voxels of the lesion patch extracted at this seed."""
    centre_lps = lesion_patch_centre(volume, seed, coord, size, spacing_mm)
    # The patch's voxel centres span size - 1 mm; its voxels, and so the box, span size mm.
    node = node or scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "CLEAR lesion patch")
    node.SetCenterWorld(*flip_lps_ras(centre_lps))
    node.SetSizeWorld(*(size * spacing_mm,) * 3)
    return node


# ---------------------------------------------------------------------------- key slices
KEY_SLICE_COLUMNS = [
    "case_id",
    "key_slice_index",
    "x1",
    "y1",
    "x2",
    "y2",
    "lesion_type",
    "spacing_x",
    "spacing_y",
    "spacing_z",
]


class KeySliceAnnotations:
    """Key slices and lesion boxes of one case, kept in a table node (saved with the scene) and
    exported as the DeepLesion-style table that `clear-train prepare-ct --key-slices` reads."""

    def __init__(self, scene, case_id: str, volume: CTVolume, node=None):
        self.scene, self.case_id, self.volume = scene, case_id, volume
        self.node = node or scene.AddNewNodeByClass("vtkMRMLTableNode", f"CLEAR key slices {case_id}")
        if node is None:
            self._store(self._typed(pd.DataFrame(columns=KEY_SLICE_COLUMNS)))

    @staticmethod
    def _typed(frame: pd.DataFrame) -> pd.DataFrame:
        """case_id as text, indices and types as integers, the rest as numbers (also when empty)."""
        frame = frame[KEY_SLICE_COLUMNS].copy()
        frame["case_id"] = frame.case_id.astype(str)
        for column in KEY_SLICE_COLUMNS[1:]:
            frame[column] = frame[column].astype(float)
        for column in ("key_slice_index", "lesion_type"):
            frame[column] = frame[column].astype(int)
        return frame.reset_index(drop=True)

    def frame(self) -> pd.DataFrame:
        if self.node.GetNumberOfRows() == 0:
            return self._typed(pd.DataFrame(columns=KEY_SLICE_COLUMNS))
        return self._typed(slicer.util.dataframeFromTable(self.node))

    def _store(self, frame: pd.DataFrame) -> None:
        self.node.RemoveAllColumns()
        _fill_table(self.node, self._typed(frame))

    def _row(self, slice_index: int, box=(np.nan,) * 4, lesion_type: int = -1) -> dict:
        sx, sy, sz = self.volume.spacing
        return dict(
            zip(KEY_SLICE_COLUMNS, [self.case_id, int(slice_index), *box, int(lesion_type), sx, sy, sz], strict=True)
        )

    def mark(self, slice_index: int) -> None:
        frame = self.frame()
        if not (frame.key_slice_index == slice_index).any():
            self._store(pd.concat([frame, pd.DataFrame([self._row(slice_index)])], ignore_index=True))

    def unmark(self, slice_index: int) -> None:
        frame = self.frame()
        self._store(frame[frame.key_slice_index != slice_index])

    def is_marked(self, slice_index: int) -> bool:
        return bool((self.frame().key_slice_index == slice_index).any())

    def box_from_roi(self, roi_node) -> tuple[int, tuple[float, float, float, float]]:
        """An ROI drawn on a slice, as (slice index, x1, y1, x2, y2 in pixels of that axial slice)."""
        centre, size = [0.0] * 3, [0.0] * 3
        roi_node.GetCenterWorld(centre)
        roi_node.GetSizeWorld(size)
        centre, half = np.asarray(centre), np.asarray(size) / 2
        corners = np.array([centre + half * np.array([sx, sy, 0.0]) for sx in (-1, 1) for sy in (-1, 1)])
        zyx = self.volume.ras_to_index(corners)
        slice_index = int(round(self.volume.ras_to_index(centre)[0]))
        x1, x2 = float(zyx[:, 2].min()), float(zyx[:, 2].max())
        y1, y2 = float(zyx[:, 1].min()), float(zyx[:, 1].max())
        return slice_index, (x1, y1, x2, y2)

    def add_box(self, roi_node, lesion_type: int = -1) -> int:
        """Add the lesion box of an ROI to its slice (marking the slice as key if needed)."""
        slice_index, box = self.box_from_roi(roi_node)
        if not 0 <= slice_index < self.volume.shape[0]:
            raise CLEARInputError(f"the box lies outside the volume (slice {slice_index})")
        frame = self.frame()
        empty = (frame.key_slice_index == slice_index) & frame.x1.isna()
        frame = frame[~empty]
        row = pd.DataFrame([self._row(slice_index, box, lesion_type)])
        self._store(pd.concat([frame, row], ignore_index=True))
        return slice_index

    def export(self, path: str | os.PathLike) -> str:
        from .files import write_csv

        frame = self.frame()
        return str(write_csv(path, frame.sort_values("key_slice_index", kind="stable")))
