"""CLEAR scripted module for 3D Slicer: patient-level predictions with an attention navigator, lesion
predictions from a seed, key-slice annotation, and a batch API.

Every behaviour lives in CLEARLib (engine and MRML glue, tested headlessly); this file wires widgets
to it. Inference runs in-process on a worker thread, polled by a timer so the GUI stays responsive;
results touch the scene only when a run completes, so Cancel leaves the scene unchanged.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated

import qt
import slicer
import vtk
from slicer import (
    vtkMRMLMarkupsFiducialNode,
    vtkMRMLMarkupsROINode,
    vtkMRMLScalarVolumeNode,
)
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

LOCAL_BUNDLE = "Local bundle (folder or .zip)"
# Parameters the widget syncs itself instead of binding them: Slicer's Path connector would write an unset
# path as "." into the field, where an empty field is what the user should see.
PATH_FIELDS = {"bundlePath": "modelPathLineEdit", "lesionBundlePath": "lesionModelPathLineEdit"}
JOB_POLL_WAIT_S = 0.085  # of every 10 ms timer tick plus this wait, the worker gets the wait


def hostProblem():
    """Why this Slicer cannot run CLEAR (CLEARLib.dependencies.host_problem), or None."""
    import sys

    from CLEARLib.dependencies import host_problem

    return host_problem((slicer.app.majorVersion, slicer.app.minorVersion), sys.version_info[:2])


def pathIsSet(path) -> bool:
    """Whether a path parameter holds a path: the parameter node stores an unset one as "."."""
    return bool(path) and str(path) not in ("", ".")


def registerSampleData():
    """A synthetic CT with lesions (CLEARLib.phantom) in the Sample Data module, to try CLEAR without data.
    Made once into Slicer's cache; a failure here must never stop Slicer from starting."""
    try:
        import SampleData

        from CLEARLib.io import write_volume
        from CLEARLib.phantom import make_phantom

        path = Path(slicer.app.cachePath) / "CLEAR" / "CLEAR-synthetic-CT.nrrd"
        if not path.exists():
            volume, _ = make_phantom((80, 192, 192), (2.0, 2.0, 4.0), seed=0)
            write_volume(volume, path)
        SampleData.SampleDataLogic.registerCustomSampleDataSource(
            category="CLEAR",
            sampleName="CLEARSyntheticCT",
            uris=path.as_uri(),
            fileNames=path.name,
            nodeNames="CLEAR synthetic CT",
            thumbnailFileName=os.path.join(os.path.dirname(__file__), "Resources", "Icons", "CLEAR.png"),
            loadFileType="VolumeFile",
        )
    except Exception as exc:  # noqa: BLE001  (sample data is a convenience)
        logging.warning(f"CLEAR: sample data not registered: {exc}")


def registerLayout():
    """CLEAR's layout known from start-up on, so that a scene saved in it reopens in it (mrml.register_layout)."""
    from CLEARLib import mrml

    layoutManager = slicer.app.layoutManager()
    if layoutManager is not None:
        mrml.register_layout(layoutManager.layoutLogic().GetLayoutNode())


class CLEAR(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        problem = hostProblem()
        if problem:
            logging.error(problem)
        else:
            slicer.app.connect("startupCompleted()", registerLayout)
            slicer.app.connect("startupCompleted()", registerSampleData)
        self.parent.title = _("CLEAR")
        self.parent.categories = ["Quantification"]
        self.parent.dependencies = []
        self.parent.contributors = ["CLEAR developers"]
        self.parent.helpText = (
            _(
                "Patient-level CT predictions from a frozen 2D slice encoder and attention-MIL, with the per-slice "
                "attention drawn beside the slice views (click a point to jump to its slice), FMCIB-style lesion "
                "predictions from a seed point with a stability estimate, and key-slice annotation for pretraining."
            )
            + ' <a href="https://github.com/clear-ct/SlicerCLEAR#the-slicer-extension">'
            + _("Documentation")
            + "</a>"
        )
        self.parent.acknowledgementText = (
            "Methods: CLEAR (Abnormality-Driven Representation Learning for Radiology Imaging, MICCAI 2025) "
            "and FMCIB (Pai et al., Foundation model for cancer imaging biomarkers, 2024)."
        )


@parameterNodeWrapper
class CLEARParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    bundlePath: Path
    device: Annotated[str, Choice(["auto", "cpu", "gpu"])] = "auto"
    topK: Annotated[int, WithinRange(1, 50)] = 5
    showOverlay: bool = True
    overlayOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.4
    seed: vtkMRMLMarkupsFiducialNode
    lesionBundlePath: Path
    stability: Annotated[int, WithinRange(0, 500)] = 50
    lesionBox: vtkMRMLMarkupsROINode
    keySliceExportPath: Path


def ensure_dependencies() -> bool:
    """torch from the PyTorch extension (never replaced); the rest with pip after one confirmation, constrained
    to the installed torch, torchvision and numpy (CLEARLib.dependencies). Never at import."""
    import tempfile

    from CLEARLib.dependencies import missing_requirements, needs_restart, pip_arguments, torch_problem

    problem = torch_problem()
    if problem is not None and "not installed" in problem:
        try:
            import PyTorchUtils
        except ImportError:
            slicer.util.errorDisplay(_("CLEAR needs PyTorch. Install the 'PyTorch' extension from the Extensions "
                                       "Manager, restart Slicer, and run CLEAR again."))  # fmt: skip
            return False
        if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True) is None:
            return False
        problem = torch_problem()
    if problem is not None:
        slicer.util.errorDisplay(problem)
        return False
    missing = missing_requirements()
    if missing:
        if not slicer.util.confirmOkCancelDisplay(
            _("CLEAR needs these Python packages, which will be installed now (your PyTorch stays as it is):")
            + "\n\n"
            + "\n".join(missing)
        ):
            return False
        with tempfile.TemporaryDirectory() as folder, slicer.util.WaitCursor():
            slicer.util.pip_install(pip_arguments(missing, os.path.join(folder, "constraints.txt")))
        if needs_restart(missing):
            slicer.util.infoDisplay(
                _("Packages that Slicer had loaded were updated: restart Slicer before using CLEAR.")
            )
            return False
    return True


class CLEARWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._onJobDone = None
        # Short ticks, most of each spent in BackgroundJob.poll waiting on the job (the worker holds the
        # GIL meanwhile; Slicer's main thread holds it between ticks): CLI speed, and the GUI gets control
        # about ten times a second (benchmarks/slicer_job_runner.py under the GIL host: hold within 15%
        # of release, longest poll 0.09 s).
        self._timer = qt.QTimer()
        self._timer.setInterval(10)
        self._timer.connect("timeout()", self._pollJob)
        self._caseResult = None
        self._ctVolume = None
        self._plot = None
        self._overlayNode = None
        self._annotations = None
        self._observedSliceNode = None
        self._plotClicksConnected = False

    # ------------------------------------------------------------------------------- set-up
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CLEAR.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = CLEARLogic()
        from CLEARLib.jobs import LogCollector

        self._log = LogCollector().attach()
        problem = hostProblem()
        if problem:  # say it where the user looks, and offer nothing that would fail
            self.ui.statusLabel.text = problem
            uiWidget.setEnabled(False)
            slicer.util.errorDisplay(problem)
            return

        # Catalog names from the JSON alone: nothing that needs the Python requirements runs at set-up.
        from CLEARLib.resources import module_resource

        catalog = json.loads(module_resource("models.json").read_text())
        names = [m["name"] for m in catalog.get("models", []) if m.get("kind") == "case"]
        self.ui.modelComboBox.addItems(names + [LOCAL_BUNDLE])
        from CLEARLib.io.deeplesion import LESION_TYPES

        # item i is DeepLesion's code i (1..8); item 0 is unlabelled (-1)
        self.ui.lesionTypeComboBox.addItems(["unlabelled", *(LESION_TYPES[code] for code in range(1, 9))])
        self.ui.topSlicesTable.setColumnCount(4)
        self.ui.topSlicesTable.setHorizontalHeaderLabels(["slice", "window", "z (mm)", "attention"])

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.modelComboBox.connect("currentIndexChanged(int)", self._updateButtons)
        self.ui.runButton.connect("clicked(bool)", self.onRun)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.topSlicesTable.connect("cellDoubleClicked(int,int)", self.onTopSliceActivated)
        self.ui.attentionLabelComboBox.connect("currentIndexChanged(int)", self.onAttentionLabelChanged)
        self.ui.jumpToSliceButton.connect("clicked(bool)", self.onJumpToSelectedSlice)
        self.ui.showOverlayCheckBox.connect("toggled(bool)", self.onOverlayChanged)
        self.ui.overlayOpacitySlider.connect("valueChanged(double)", self.onOverlayChanged)
        self.ui.showPatchButton.connect("clicked(bool)", self.onShowPatch)
        self.ui.runLesionButton.connect("clicked(bool)", self.onRunLesion)
        for field, widgetName in PATH_FIELDS.items():
            getattr(self.ui, widgetName).connect(
                "currentPathChanged(QString)", lambda path, field=field: self._onPathEdited(field, path)
            )
        self.ui.fetchFmcibButton.connect("clicked(bool)", self.onFetchFmcib)
        self.ui.markKeySliceButton.connect("clicked(bool)", self.onMarkKeySlice)
        self.ui.unmarkKeySliceButton.connect("clicked(bool)", self.onUnmarkKeySlice)
        self.ui.addBoxButton.connect("clicked(bool)", self.onAddBox)
        self.ui.exportKeySlicesButton.connect("clicked(bool)", self.onExportKeySlices)
        self.ui.seedPlaceWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.seedPlaceWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceSingleMarkup

        self.initializeParameterNode()

    def cleanup(self):
        if getattr(self, "_log", None) is not None:
            self._log.detach()
        self.onCancel()
        self.removeObservers()
        self._timer.stop()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event):
        self.onCancel()
        self.setParameterNode(None)
        self._caseResult = self._plot = self._overlayNode = self._annotations = None
        self._fillAttentionLabels(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            from CLEARLib.mrml import first_input_volume

            first = first_input_volume(slicer.mrmlScene)
            if first:
                self._parameterNode.inputVolume = first

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            for field, widgetName in PATH_FIELDS.items():  # an unset path shows as an empty field
                value = getattr(self._parameterNode, field)
                getattr(self.ui, widgetName).currentPath = str(value) if pathIsSet(value) else ""
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self._updateButtons()

    def _onPathEdited(self, field, path):
        if self._parameterNode is not None:
            setattr(self._parameterNode, field, Path(path))  # "" is stored as "." and means unset

    def _updateButtons(self, *_):
        p = self._parameterNode
        self._observeSeed(p.seed if p else None)
        if p is not None and getattr(self, "_shownDevice", None) != p.device:
            self._shownDevice = p.device
            self._showDevice()
        if p is not None and getattr(self, "_shownTopK", None) != p.topK:  # after the parameter changed, not before
            self._shownTopK = p.topK
            self._fillTopSlices()
        running = self._job is not None
        local = self.ui.modelComboBox.currentText == LOCAL_BUNDLE
        self.ui.modelPathLineEdit.setEnabled(local)
        haveModel = (not local) or bool(p and pathIsSet(p.bundlePath))
        self.ui.runButton.enabled = bool(p and p.inputVolume) and haveModel and not running
        self.ui.cancelButton.enabled = running
        haveLesionModel = bool(p and pathIsSet(p.lesionBundlePath))
        self.ui.runLesionButton.enabled = bool(p and p.inputVolume and p.seed) and haveLesionModel and not running
        self.ui.showPatchButton.enabled = bool(p and p.inputVolume and p.seed)
        haveCase = bool(p and p.inputVolume)
        for button in (self.ui.markKeySliceButton, self.ui.unmarkKeySliceButton, self.ui.exportKeySlicesButton):
            button.enabled = haveCase
        self.ui.addBoxButton.enabled = haveCase and bool(p and p.lesionBox)

    def _observeSeed(self, seedNode):
        """Placing a seed again replaces the old point (mrml.keep_last_point)."""
        previous = getattr(self, "_seedNode", None)
        if seedNode is previous:
            return
        event = slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent
        if previous is not None:
            self.removeObserver(previous, event, self._onSeedPlaced)
        self._seedNode = seedNode
        if seedNode is not None:
            self.addObserver(seedNode, event, self._onSeedPlaced)

    def _onSeedPlaced(self, caller, event):
        from CLEARLib.mrml import keep_last_point

        keep_last_point(caller)

    # ------------------------------------------------------------------------ case inference
    def _bundleForRun(self):
        """A function (progress, cancel) -> bundle path, run inside the job: a catalog model downloads there,
        in the background with the progress bar and Cancel."""
        if self.ui.modelComboBox.currentText == LOCAL_BUNDLE:
            path = str(self._parameterNode.bundlePath)
            return lambda progress, cancel: path
        from CLEARLib.catalog import fetch, load_catalog

        entry = load_catalog().entry(self.ui.modelComboBox.currentText)
        cache = Path(slicer.app.cachePath) / "CLEAR"
        return lambda progress, cancel: str(fetch(entry, cache_dir=cache, progress=progress, cancel=cancel))

    def onRun(self):
        if not ensure_dependencies():
            return
        problem = self.logic.dicomProblem(self._parameterNode.inputVolume)
        if problem and not slicer.util.confirmYesNoDisplay(
            _("The DICOM series of this volume has a problem:") + f"\n\n{problem}\n\n" + _("Run CLEAR anyway?")
        ):
            return
        with slicer.util.tryWithErrorDisplay(_("CLEAR could not start."), waitCursor=True):
            bundle = self._bundleForRun()
            self._ctVolume = self.logic.volumeFromNode(self._parameterNode.inputVolume)
            from CLEARLib.jobs import BackgroundJob
            from CLEARLib.progress import scaled

            device = self._parameterNode.device

            def work(progress, cancel):
                path = bundle(scaled(progress, 0.0, 0.2), cancel)
                return self.logic.predictCase(self._ctVolume, path, device, scaled(progress, 0.2, 1.0), cancel)

            self._startJob(BackgroundJob(work).start(), self._onCaseDone)

    def _startJob(self, job, onDone):
        """Drive a started BackgroundJob from the timer; `onDone(result)` runs on the GUI thread."""
        self._job, self._onJobDone = job, onDone
        self._timer.start()
        self._updateButtons()

    def startBatch(self, inputs, bundle, device="auto", **options):
        """A cohort in the background (CLEARLib.batch.start_batch) with the module's progress bar and Cancel:
        finished cases appear in the scene's tables as they complete; returns the BatchJob (`partial()`,
        `done`, `result` once done)."""
        from CLEARLib.batch import start_batch

        if self._job is not None:
            raise RuntimeError("CLEAR is already running a job; cancel it or wait for it to finish")
        if not ensure_dependencies():
            return None
        job = start_batch(inputs, bundle, device=device, scene=slicer.mrmlScene, **options)
        self._startJob(job, self._onBatchDone)
        return job

    def _onBatchDone(self, result):
        ok = int((result.predictions.status == "ok").sum())
        ending = f"stopped ({result.stopped})" if result.stopped else "done"
        self._setProgress(1.0 if result.complete else self.ui.progressBar.value / 100, f"batch {ending}: {ok} cases ok")
        self.ui.resultsTableView.setMRMLTableNode(result.predictions_node)

    def _pollJob(self):
        job = self._job
        if job is None:
            self._timer.stop()
            return
        finished = job.poll(wait_s=JOB_POLL_WAIT_S)
        self._setProgress(job.fraction, job.message)
        self._showLog()
        if not finished:
            return
        self._job = None
        self._timer.stop()
        self._updateButtons()
        if job.cancelled:
            self._setProgress(0.0, _("cancelled; the scene is unchanged"))
        elif job.error is not None:
            self._showLog(f"failed: {job.error}")
            self._setProgress(0.0, _("failed"))
            slicer.util.errorDisplay(_("CLEAR failed:") + f" {job.error}")
        else:
            with slicer.util.tryWithErrorDisplay(_("Could not show the results."), waitCursor=True):
                self._onJobDone(job.result)

    def _showLog(self, note=None):
        """The log panel: CLEARLib's records since the last call (from any thread), and `note`."""
        if note:
            self._log.note(note)
        for line in self._log.drain():
            self.ui.logTextEdit.appendPlainText(line)

    def _showDevice(self, *_):
        """The device a run would use, before it runs (nothing when PyTorch is not installed yet)."""
        from CLEARLib.dependencies import torch_problem

        if torch_problem() is not None or self._parameterNode is None:
            self.ui.deviceLabel.text = ""
            return
        from CLEARLib.inference.runtime import describe_device

        try:
            self.ui.deviceLabel.text = _("Runs on: ") + describe_device(self._parameterNode.device)
        except Exception as exc:  # noqa: BLE001  (a GPU asked for and missing: say so, do not raise in the GUI)
            self.ui.deviceLabel.text = str(exc)

    def _setProgress(self, fraction, message):
        self.ui.progressBar.setValue(int(round(100 * fraction)))
        self.ui.statusLabel.text = message

    def onCancel(self):
        if self._job is not None:
            self._job.cancel()
            self.ui.statusLabel.text = _("cancelling after the current batch...")

    def _onCaseDone(self, result):
        self._caseResult = result
        self._fillAttentionLabels(result)
        self._showAttention()
        self._observeRedSlice()
        self._connectPlotClicks()
        self._setProgress(1.0, _("done:") + " " + ", ".join(f"{k} {v:.2f}" for k, v in result.probabilities.items()))
        timings = ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items())
        self._showLog(f"{result.bundle_name} on {result.runtime}: {timings}; {json.dumps(result.probabilities)}")

    def _fillAttentionLabels(self, result):
        """'all labels', and each label where the model has one attention per label (otherwise the one
        attention is every label's, and there is nothing to choose)."""
        combo = self.ui.attentionLabelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        combo.addItem(_("all labels"))
        if result is not None and result.per_label_attention:
            combo.addItems(result.labels)
        combo.setEnabled(combo.count > 1)
        combo.blockSignals(wasBlocked)

    def _shownResult(self):
        """The case result as the attention selector shows it: one label's attention, or all labels' mean."""
        combo = self.ui.attentionLabelComboBox
        if self._caseResult is None or combo.currentIndex <= 0:
            return self._caseResult
        return self._caseResult.for_labels(combo.currentText)

    def _showAttention(self):
        p = self._parameterNode
        result = self._shownResult()
        shown = self.logic.showCaseResult(self._ctVolume, result, p.inputVolume, p.showOverlay, p.overlayOpacity)
        self.ui.resultsTableView.setMRMLTableNode(shown.table)
        self._plot, self._overlayNode = shown.plot, shown.overlay
        self._fillTopSlices()

    def onAttentionLabelChanged(self, *_):
        if self._caseResult is not None and self._ctVolume is not None and self._parameterNode is not None:
            self._showAttention()
            self.onRedSliceModified()

    def _fillTopSlices(self, *_):
        result = self._shownResult()
        if result is None:
            return
        top = result.top_slices(self._parameterNode.topK)
        table = self.ui.topSlicesTable
        table.setRowCount(len(top))
        for row, item in enumerate(top.itertuples()):
            values = [str(item.slice_index), item.window, f"{item.z_mm:.1f}", f"{item.attention:.4f}"]
            for col, text in enumerate(values):
                table.setItem(row, col, qt.QTableWidgetItem(text))

    # ------------------------------------------------------------------- navigation and overlay
    def _redSliceNode(self):
        return slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode()

    def _observeRedSlice(self):
        if self._observedSliceNode is not None:
            self.removeObserver(self._observedSliceNode, vtk.vtkCommand.ModifiedEvent, self.onRedSliceModified)
        self._observedSliceNode = self._redSliceNode()
        self.addObserver(self._observedSliceNode, vtk.vtkCommand.ModifiedEvent, self.onRedSliceModified)
        self.onRedSliceModified()

    def onRedSliceModified(self, *_):
        if self._plot is None or self._ctVolume is None:
            return
        from CLEARLib import mrml

        index = mrml.slice_index_of_view(self._redSliceNode(), self._ctVolume)
        mrml.set_marker(self._plot, slicer.mrmlScene, mrml.slice_offset(self._ctVolume, index))

    def _jumpTo(self, sliceIndex):
        from CLEARLib import mrml

        mrml.jump_to_slice(self._redSliceNode(), self._ctVolume, int(sliceIndex))

    def onTopSliceActivated(self, row, column=0):
        item = self.ui.topSlicesTable.item(row, 0)
        if item is not None and self._ctVolume is not None:
            self._jumpTo(int(item.text()))

    def onJumpToSelectedSlice(self):
        self.onTopSliceActivated(max(self.ui.topSlicesTable.currentRow(), 0))

    def _connectPlotClicks(self):
        """Clicks on plot points jump to slices; the plot view exists once CLEAR's layout is shown."""
        from CLEARLib import mrml

        layoutManager = slicer.app.layoutManager()
        view = mrml.clear_plot_view(slicer.mrmlScene)
        if self._plotClicksConnected or layoutManager is None or view is None:
            return
        for i in range(layoutManager.plotViewCount):  # plotWidget(i) comes in hash order: find CLEAR's own
            widget = layoutManager.plotWidget(i)
            if widget.mrmlPlotViewNode() is view:
                widget.plotView().connect("dataSelected(vtkStringArray*, vtkCollection*)", self.onPlotDataSelected)
                self._plotClicksConnected = True
                return

    def onPlotDataSelected(self, seriesIds, selections):
        if self._plot is None:
            return
        from CLEARLib import mrml

        for i in range(seriesIds.GetNumberOfValues()):
            if seriesIds.GetValue(i) not in self._plot.series_ids.values():
                continue  # the current-slice marker
            points = selections.GetItemAsObject(i)
            if points is not None and points.GetNumberOfValues() > 0:
                self._jumpTo(mrml.slice_index_for_plot_point(self._plot, points.GetValue(0)))
                return

    def onOverlayChanged(self, *_):
        if self._overlayNode is None:
            return
        from CLEARLib import mrml

        composites = slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode")
        mrml.show_overlay(
            composites, self._overlayNode, self.ui.showOverlayCheckBox.checked, self.ui.overlayOpacitySlider.value
        )

    # ------------------------------------------------------------------------------- lesion
    def onShowPatch(self):
        if not ensure_dependencies():
            return
        with slicer.util.tryWithErrorDisplay(_("Could not show the lesion patch."), waitCursor=True):
            p = self._parameterNode
            self.logic.showPatch(self.logic.volumeFromNode(p.inputVolume), p.seed)

    def onRunLesion(self):
        if not ensure_dependencies():
            return
        with slicer.util.tryWithErrorDisplay(_("CLEAR could not start the lesion model."), waitCursor=True):
            p = self._parameterNode
            volume = self.logic.volumeFromNode(p.inputVolume)
            self.logic.showPatch(volume, p.seed)
            seed, bundle, stability, device = p.seed, str(p.lesionBundlePath), p.stability, p.device
            from CLEARLib.jobs import BackgroundJob

            work = lambda progress, cancel: self.logic.predictLesion(  # noqa: E731
                volume, seed, bundle, stability, device, progress, cancel
            )
            self._startJob(BackgroundJob(work).start(), self._onLesionDone)

    def onFetchFmcib(self):
        """FMCIB's published weights as the lesion model: one confirmation naming source, size and license, then
        download, verification and conversion in the background (CLEARLib.published), and the bundle is set."""
        if not ensure_dependencies():
            return
        from CLEARLib.jobs import BackgroundJob
        from CLEARLib.published import cached_bundle, fetch_published, published_entry

        entry = published_entry("fmcib")
        cached = cached_bundle(entry)
        if cached is None:
            question = _("Download FMCIB's lesion model?") + f"\n\n{entry.describe()}\n{entry.url}"
            if not slicer.util.confirmOkCancelDisplay(question):
                return
        work = lambda progress, cancel: fetch_published("fmcib", progress=progress, cancel=cancel)  # noqa: E731
        self._startJob(BackgroundJob(work).start(), self._onFmcibFetched)

    def _onFmcibFetched(self, fetched):
        bundle, record = fetched
        self.ui.lesionModelPathLineEdit.currentPath = str(bundle)  # sets lesionBundlePath (_onPathEdited)
        self._showLog(f"FMCIB: {bundle} (sha256 {record['sha256'][:16]}, verified by {record['verified_by']})")
        self._setProgress(1.0, _("FMCIB ready: place a seed and run the lesion model"))

    def _onLesionDone(self, result):
        lines = [f"{label}: {prob:.3f}" for label, prob in result.probabilities.items()] or ["features only"]
        if result.stability:
            lines.append(f"stability over {result.stability['n']} seeds (sd {result.stability['sd_mm']:.0f} mm):")
            lines += [
                f"  {k}: {result.stability['mean'][k]:.3f} +/- {result.stability['std'][k]:.3f}"
                for k in result.stability["mean"]
            ]
        self.ui.lesionResultLabel.text = "\n".join(lines)
        self._setProgress(1.0, _("lesion done"))

    # ---------------------------------------------------------------------------- key slices
    def _keySlices(self):
        """The key-slice table of the input volume; None when the requirements are not there (pandas)."""
        if not ensure_dependencies():
            return None
        p = self._parameterNode
        if self._annotations is None or self._annotations.case_id != p.inputVolume.GetName():
            self._annotations = self.logic.keySliceAnnotations(p.inputVolume)
        return self._annotations

    def _currentSlice(self):
        from CLEARLib import mrml

        return mrml.slice_index_of_view(self._redSliceNode(), self._keySlices().volume)

    def _showKeySliceCount(self):
        frame = self._keySlices().frame()
        self.ui.keySliceCountLabel.text = (
            f"{frame.key_slice_index.nunique()} key slices, {frame.x1.notna().sum()} lesion boxes"
        )

    def onMarkKeySlice(self):
        with slicer.util.tryWithErrorDisplay(_("Could not mark the key slice."), waitCursor=True):
            if (notes := self._keySlices()) is not None:
                notes.mark(self._currentSlice())
                self._showKeySliceCount()

    def onUnmarkKeySlice(self):
        with slicer.util.tryWithErrorDisplay(_("Could not unmark the key slice."), waitCursor=True):
            if (notes := self._keySlices()) is not None:
                notes.unmark(self._currentSlice())
                self._showKeySliceCount()

    def onAddBox(self):
        with slicer.util.tryWithErrorDisplay(_("Could not add the lesion box."), waitCursor=True):
            if (notes := self._keySlices()) is not None:
                notes.add_box(self._parameterNode.lesionBox, self.ui.lesionTypeComboBox.currentIndex or -1)
                self._showKeySliceCount()

    def onExportKeySlices(self):
        with slicer.util.tryWithErrorDisplay(_("Could not export the key slices."), waitCursor=True):
            path = self._parameterNode.keySliceExportPath
            if not pathIsSet(path):
                from CLEARLib.io.cohort import file_stem_for  # DICOM volumes are named "3: CT chest" and the like

                path = Path(slicer.app.defaultScenePath) / f"{file_stem_for(self._keySlices().case_id)}_key_slices.csv"
            written = self._keySlices().export(path)
            self.ui.keySliceCountLabel.text = f"exported to {written}"


class CLEARLogic(ScriptedLoadableModuleLogic):
    """The module's logic, usable from Slicer's Python console; it delegates to CLEARLib."""

    def getParameterNode(self):
        return CLEARParameterNode(super().getParameterNode())

    @staticmethod
    def volumeFromNode(volumeNode):
        from CLEARLib import mrml

        return mrml.volume_from_node(volumeNode)

    @staticmethod
    def predictCase(volume, bundle, device="auto", progress=None, cancel=None):
        from CLEARLib.inference import CasePredictor

        return CasePredictor(bundle, device=device).predict(volume, progress=progress, cancel=cancel)

    @staticmethod
    def showCaseResult(volume, result, volumeNode=None, showOverlay=True, overlayOpacity=0.4):
        """Results table, attention plot beside the slice views, and the heat overlay."""
        from CLEARLib import mrml

        scene = slicer.mrmlScene
        if volumeNode is not None:
            slicer.util.setSliceViewerLayers(background=volumeNode)
        composites = slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode")
        shown = mrml.show_case_result(scene, volume, result, volumeNode, composites, overlayOpacity, showOverlay)
        layoutManager = slicer.app.layoutManager()
        layoutNode = layoutManager.layoutLogic().GetLayoutNode() if layoutManager else None
        mrml.show_plot(scene, shown.plot, layoutNode)
        return shown

    @staticmethod
    def dicomProblem(volumeNode):
        """CLEARLib.io's DICOM checks on the files behind a volume the DICOM module loaded (None if fine)."""
        from CLEARLib import mrml

        return mrml.dicom_problem(volumeNode, getattr(slicer, "dicomDatabase", None))

    @staticmethod
    def showPatch(volume, seedNode):
        from CLEARLib import mrml

        existing = slicer.mrmlScene.GetFirstNodeByName("CLEAR lesion patch")
        return mrml.patch_roi(volume, mrml.seed_lps_from_markups(seedNode), slicer.mrmlScene, node=existing)

    @staticmethod
    def predictLesion(volume, seedNode_or_lps, bundle, stability=0, device="auto", progress=None, cancel=None):
        from CLEARLib import mrml
        from CLEARLib.inference import LesionPredictor

        seed = seedNode_or_lps
        if hasattr(seed, "GetNumberOfControlPoints"):
            seed = mrml.seed_lps_from_markups(seed)
        return LesionPredictor(bundle, device=device).predict(
            volume, seed, coord="LPS", stability=stability, progress=progress, cancel=cancel
        )

    @staticmethod
    def keySliceAnnotations(volumeNode):
        from CLEARLib import mrml

        volume = mrml.volume_from_node(volumeNode)
        name = f"CLEAR key slices {volumeNode.GetName()}"
        existing = slicer.mrmlScene.GetFirstNodeByName(name)
        return mrml.KeySliceAnnotations(slicer.mrmlScene, volumeNode.GetName(), volume, node=existing)

    @staticmethod
    def runBatch(inputs, bundle, device="auto", progress="print", cancel=None, **options):
        """Python-console batch on the main thread (CLEARLib.batch.run_batch): the GUI waits until it ends;
        the widget's `startBatch` runs the same in the background."""
        from CLEARLib.batch import run_batch

        return run_batch(inputs, bundle, device, slicer.mrmlScene, progress, cancel, **options)


class CLEARTest(ScriptedLoadableModuleTest):
    """The whole flow on a synthetic CT with small real bundles, inside Slicer."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_CaseLesionAndKeySliceFlow()

    def _tinyBundles(self, folder):
        import torch

        from CLEARLib.bundle import save_bundle
        from CLEARLib.models import ABMIL, LinearHead, create_encoder
        from CLEARLib.preprocess import InputSpec

        torch.manual_seed(0)
        encoder = create_encoder("mambaout_femto", depths=(1, 1, 1, 1), dims=(8, 16, 24, 32))
        case = save_bundle(
            os.path.join(folder, "case.zip"),
            name="self-test case",
            kind="case",
            encoder=encoder,
            head=ABMIL(32, 2, hidden_dim=32, attention_dim=16),
            labels=["liver", "lung"],
            task="multilabel",
            windows=["abdomen", "lung"],
            input_spec=InputSpec(size=32),
        )
        lesion_encoder = create_encoder(
            "fmcib_resnet50", layers=(1, 1, 1, 1), block_inplanes=(4, 8, 8, 16), widen_factor=1.0
        )
        lesion = save_bundle(
            os.path.join(folder, "lesion.zip"),
            name="self-test lesion",
            kind="lesion",
            encoder=lesion_encoder,
            head=LinearHead(lesion_encoder.num_features, 2),
            labels=["benign", "malignant"],
            task="multiclass",
        )
        return case, lesion

    def test_CaseLesionAndKeySliceFlow(self):
        import tempfile

        from CLEARLib import mrml
        from CLEARLib.io.volume import flip_lps_ras
        from CLEARLib.phantom import make_phantom

        self.assertTrue(ensure_dependencies())
        self.delayDisplay("Synthetic CT and small bundles")
        volume, lesions = make_phantom(shape_zyx=(30, 64, 64), spacing_xyz=(4.0, 4.0, 8.0), seed=0)
        node = mrml.node_from_volume(volume, slicer.mrmlScene, name="CLEAR self-test CT")
        logic = CLEARLogic()
        with tempfile.TemporaryDirectory() as folder:
            caseBundle, lesionBundle = self._tinyBundles(folder)
            self.delayDisplay("Case prediction and attention navigator")
            ct = logic.volumeFromNode(node)
            result = logic.predictCase(ct, caseBundle, device="cpu")
            self.assertAlmostEqual(float(result.attention.attention.sum()), 1.0, places=4)
            shown = logic.showCaseResult(ct, result, node)
            self.assertEqual(shown.table.GetNumberOfRows(), 2)
            red = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode()
            top = int(result.top_slices(1).slice_index.iloc[0])
            mrml.jump_to_slice(red, ct, top)
            self.assertEqual(mrml.slice_index_of_view(red, ct), top)

            self.delayDisplay("Lesion prediction with stability")
            seed = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "seed")
            seed.AddControlPointWorld(*flip_lps_ras(lesions[0].center_lps))
            roi = logic.showPatch(ct, seed)
            size = [0.0] * 3
            roi.GetSizeWorld(size)
            self.assertEqual(size, [50.0, 50.0, 50.0])
            lesionResult = logic.predictLesion(ct, seed, lesionBundle, stability=5, device="cpu")
            self.assertEqual(lesionResult.stability["n"], 5)

            self.delayDisplay("Key-slice annotation and export")
            notes = logic.keySliceAnnotations(node)
            notes.mark(top)
            box = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "lesion box")
            box.SetCenterWorld(*flip_lps_ras(lesions[0].center_lps))
            box.SetSizeWorld(20.0, 20.0, 1.0)
            notes.add_box(box, lesion_type=4)
            exported = notes.export(os.path.join(folder, "keys.csv"))
            self.assertTrue(os.path.exists(exported))

            self.delayDisplay("Batch API")
            batch = logic.runBatch([node], caseBundle, device="cpu")
            self.assertEqual(list(batch.predictions.status), ["ok"])

            self.delayDisplay("Batch in the background, through the module's job runner")
            widget = slicer.modules.clear.widgetRepresentation().self()
            job = widget.startBatch({"case 1": node}, caseBundle, device="cpu", tables="keep")
            while widget._job is not None:  # the widget's timer polls the job and fills the tables
                slicer.app.processEvents()
            self.assertEqual(list(job.result.predictions.case), ["case 1"])
            self.assertEqual(job.result.predictions_node.GetNumberOfRows(), 1)
        logging.info("CLEAR self-test passed")
        self.delayDisplay("Test passed")
