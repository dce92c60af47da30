"""Slicer's Red slice view drawn without the application: slicer-core's own slice pipeline, offscreen.

`SliceViewRenderer(scene)` sets up what Slicer's main window would (an application logic with the default
colour tables and the markups logic), an offscreen render window whose displayable managers are Slicer's
(markups points and ROI boxes drawn exactly as in the application), and the Red slice logic, which reslices
the background CT and the foreground heat overlay with their display nodes' window/level, colour table and
opacity. The slice image itself is drawn in Slicer by a CTK class that the slicer-core wheel lacks, so the
slice logic's output goes to a plain image actor, added before the displayable managers make their actors
(else an ROI's translucent fill would blend over nothing).

Needs only the `slicer` MRML API and VTK (never qt). On a machine without a screen VTK renders through EGL
(Mesa in software); `VTK_DEFAULT_OPENGL_WINDOW` is set to it before the first window is made.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

import slicer  # noqa: E402  (after the window class is chosen)
import vtk  # noqa: E402
from vtk.util.numpy_support import numpy_to_vtk, vtk_to_numpy  # noqa: E402

from .files import write_atomic  # noqa: E402
from .mrml import HEAT_COLORS  # noqa: E402

_DISPLAYABLE_MANAGERS = ("vtkMRMLMarkupsDisplayableManager",)  # seeds and ROI boxes


class SliceViewRenderer:
    """Renders the Red (axial) slice view of `scene`. Make one per scene and render as often as needed."""

    def __init__(self, scene, size: tuple[int, int] = (512, 512)):
        self.scene, self.size = scene, size
        self.app_logic = slicer.vtkMRMLApplicationLogic()
        self.app_logic.SetMRMLScene(scene)
        self.color_logic = slicer.vtkMRMLColorLogic()  # adds Slicer's default colour tables (Grey, Iron...)
        self.color_logic.SetMRMLApplicationLogic(self.app_logic)
        self.color_logic.SetMRMLScene(scene)
        self.app_logic.SetModuleLogic("Colors", self.color_logic)
        self.markups_logic = slicer.vtkSlicerMarkupsLogic()  # the markups displayable manager needs it
        self.markups_logic.SetMRMLApplicationLogic(self.app_logic)
        self.markups_logic.SetMRMLScene(scene)
        self.app_logic.SetModuleLogic("Markups", self.markups_logic)

        self.renderer = vtk.vtkRenderer()
        self.window = vtk.vtkRenderWindow()
        self.window.SetOffScreenRendering(1)
        self.window.SetMultiSamples(0)
        self.window.SetSize(*size)
        self.window.AddRenderer(self.renderer)
        self.interactor = vtk.vtkRenderWindowInteractor()  # the markups widgets need one, never started
        self.interactor.SetRenderWindow(self.window)
        self.interactor.Initialize()

        mapper = vtk.vtkImageMapper()  # the slice logic's output is RGBA 0..255 already windowed
        mapper.SetColorWindow(255)
        mapper.SetColorLevel(127.5)
        self.image_actor = vtk.vtkActor2D()
        self.image_actor.SetMapper(mapper)
        self.renderer.AddViewProp(self.image_actor)

        self.slice_logic = slicer.vtkMRMLSliceLogic()
        self.slice_logic.SetMRMLApplicationLogic(self.app_logic)
        self.slice_logic.SetMRMLScene(scene)
        logics = vtk.vtkCollection()
        logics.AddItem(self.slice_logic)
        self.app_logic.SetSliceLogics(logics)
        self.slice_node = self.slice_logic.AddSliceNode("Red")
        self.slice_node.SetOrientation("Axial")

        factory = slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()
        factory.SetMRMLApplicationLogic(self.app_logic)
        for name in _DISPLAYABLE_MANAGERS:
            if not factory.IsDisplayableManagerRegistered(name):
                factory.RegisterDisplayableManager(name)
        self.managers = slicer.vtkMRMLDisplayableManagerGroup()
        self.managers.Initialize(factory, self.renderer)
        self.managers.SetMRMLDisplayableNode(self.slice_node)

    @property
    def composite(self):
        return self.slice_logic.GetSliceCompositeNode()

    def render(self, background, foreground=None, opacity: float = 0.4, z_mm: float | None = None) -> np.ndarray:
        """The view as an [H, W, 3] uint8 array (row 0 at the top): `background` (a scalar volume node) under
        `foreground` at `opacity`, the slice at `z_mm` (RAS S, which is CLEAR's z_mm) or the volume's middle.
        Markups (seeds, ROI) visible in the scene are drawn by Slicer's displayable managers."""
        if foreground is not None:
            display = foreground.GetDisplayNode()
            if display is not None and display.GetColorNodeID() in (None, "", "vtkMRMLColorTableNodeGrey"):
                display.SetAndObserveColorNodeID(HEAT_COLORS)  # an overlay made before the tables existed
        self.composite.SetBackgroundVolumeID(background.GetID())
        self.composite.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
        self.composite.SetForegroundOpacity(float(opacity) if foreground is not None else 0.0)
        self.slice_logic.ResizeSliceNode(*self.size)
        self.slice_logic.FitSliceToBackground()
        if z_mm is not None:
            self.slice_logic.SetSliceOffset(float(z_mm))
        self.image_actor.GetMapper().SetInputConnection(self.slice_logic.GetImageDataConnection())
        self.window.Render()
        grab = vtk.vtkWindowToImageFilter()
        grab.SetInput(self.window)
        grab.ReadFrontBufferOff()
        grab.Update()
        image = grab.GetOutput()
        width, height, _ = image.GetDimensions()
        pixels = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)[:, :, :3]
        return np.ascontiguousarray(pixels[::-1])  # VTK's rows start at the bottom

    def world_to_pixel(self, ras) -> tuple[int, int]:
        """(row, column) of a RAS point in the rendered image (rows from the top)."""
        ras_to_xy = vtk.vtkMatrix4x4()
        vtk.vtkMatrix4x4.Invert(self.slice_node.GetXYToRAS(), ras_to_xy)
        x, y, _, _ = ras_to_xy.MultiplyPoint([*map(float, ras), 1.0])
        return int(round(self.size[1] - 1 - y)), int(round(x))

    def save_png(self, path, background, foreground=None, opacity: float = 0.4, z_mm: float | None = None) -> Path:
        """`render` written as a PNG (atomically)."""
        return write_png(path, self.render(background, foreground, opacity, z_mm))


def write_png(path, pixels: np.ndarray) -> Path:
    """An [H, W, 3] uint8 array as a PNG file, written atomically."""
    height, width, _ = pixels.shape
    image = vtk.vtkImageData()
    image.SetDimensions(width, height, 1)
    array = numpy_to_vtk(np.ascontiguousarray(pixels[::-1]).reshape(-1, 3), deep=True)
    image.GetPointData().SetScalars(array)
    writer = vtk.vtkPNGWriter()
    writer.SetWriteToMemory(1)
    writer.SetInputData(image)
    writer.Write()
    return write_atomic(path, bytes(vtk_to_numpy(writer.GetResult())))


def render_case_view(volume, result, path, window=None, size: int = 512, seed_lps=None) -> Path:
    """The Red view of a scored case as Slicer would show it: the CT (in `window`, a preprocess Window, or
    abdomen) under the attention heat overlay at the most attended slice, and with `seed_lps` the seed and
    the lesion model's 50 mm patch (drawn where they cross that slice), written as a PNG."""
    from .io.volume import flip_lps_ras
    from .mrml import attention_overlay, node_from_volume, patch_roi

    scene = slicer.vtkMRMLScene()
    renderer = SliceViewRenderer(scene, size=(size, size))
    ct = node_from_volume(volume, scene, "CT")
    low, high = (window.low, window.high) if window is not None else (-160.0, 240.0)
    ct.GetDisplayNode().SetAutoWindowLevel(False)
    ct.GetDisplayNode().SetWindowLevel(high - low, (high + low) / 2)
    overlay = attention_overlay(volume, result, scene)
    if seed_lps is not None:
        seed = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "seed")
        seed.AddControlPoint(*flip_lps_ras(seed_lps))
        patch_roi(volume, seed_lps, scene)
    z_mm = float(result.top_slices(1).z_mm.iloc[0])
    return renderer.save_png(path, ct, overlay, 0.4, z_mm=z_mm)
