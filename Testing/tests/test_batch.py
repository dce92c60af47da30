"""The batch API on real MRML scenes (slicer-core): finished cases kept on a stop, case IDs, bad entries as
failed rows, reruns, provenance, progress, and the background job a GUI or console polls."""

from __future__ import annotations

import threading

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from CLEARLib.batch import prepare_batch, run_batch, start_batch
from CLEARLib.bundle import load_bundle
from CLEARLib.inference import CasePredictor
from CLEARLib.io import write_volume
from CLEARLib.phantom import make_phantom

from ctfactory import layout_of, write_dicom_series

slicer = pytest.importorskip("slicer", reason="slicer-core (real MRML scenes and tables) is needed for the batch API")
from CLEARLib import mrml  # noqa: E402  (imports slicer)


@pytest.fixture
def scene():
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    return scene


@pytest.fixture(scope="module")
def predictor(tiny_case_bundle):
    return CasePredictor(tiny_case_bundle, device="cpu")


def _cohort(folder, n: int) -> list:
    """n small CTs at <folder>/P00i/ct.nii.gz, each its own phantom."""
    paths = []
    for i in range(n):
        volume, _ = make_phantom((8, 32, 32), (6.0, 6.0, 10.0), seed=10 + i)
        paths.append(write_volume(volume, folder / f"P{i:03d}" / "ct.nii.gz"))
    return paths


def test_batch_over_paths_and_nodes_with_a_failing_case(tmp_path, scene, predictor):
    first, _ = make_phantom((12, 32, 32), (6.0, 6.0, 10.0), seed=1)
    second, _ = make_phantom((9, 28, 30), (6.0, 6.0, 10.0), seed=2)
    path = write_volume(first, tmp_path / "first.nrrd")
    node = mrml.node_from_volume(second, scene, name="second")
    batch = run_batch([path, node, tmp_path / "missing.nii.gz"], predictor, scene=scene, progress=None)
    frame = batch.predictions
    assert list(frame.case) == ["first", "second", "missing"] and batch.complete
    assert list(frame.status) == ["ok", "ok", "failed"] and "no such file" in frame.error.iloc[2]
    assert {"p_liver", "p_lung", "p_bone"} <= set(frame.columns)
    assert batch.attention.groupby("case").size().to_dict() == {"first": 24, "second": 18}
    np.testing.assert_allclose(batch.attention.groupby("case").attention.sum(), 1.0, atol=1e-5)
    # the attention table says which case and which file each row belongs to
    assert set(batch.attention.source[batch.attention.case == "first"]) == {str(path)}
    table = slicer.util.dataframeFromTable(batch.predictions_node)
    assert list(table.case) == ["first", "second", "missing"]
    assert batch.attention_node.GetNumberOfRows() == 42
    # Saved with the scene: table nodes write through their storage node and read back.
    storage = slicer.vtkMRMLTableStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(tmp_path / "predictions.tsv"))
    assert storage.WriteData(batch.predictions_node)
    reread = scene.AddNewNodeByClass("vtkMRMLTableNode")
    assert storage.ReadData(reread)
    assert reread.GetNumberOfRows() == 3


def test_batch_without_a_scene_names_cases_by_their_paths(tmp_path, tiny_case_bundle):
    paths = _cohort(tmp_path, 2)
    batch = run_batch(paths, tiny_case_bundle, device="cpu", progress=None)
    assert batch.predictions_node is None and list(batch.predictions.status) == ["ok", "ok"]
    # cases are named by what tells them apart, never "ct" twice; the attention table keeps them apart
    assert list(batch.predictions.case) == ["P000/ct", "P001/ct"]
    assert batch.attention.groupby("case").size().to_dict() == {"P000/ct": 16, "P001/ct": 16}


def test_every_bad_entry_is_a_failed_row_and_the_batch_goes_on(tmp_path, scene, predictor):
    (good,) = _cohort(tmp_path, 1)
    volume, _ = make_phantom((8, 32, 32), (6.0, 6.0, 10.0), seed=3)
    data = write_volume(volume, tmp_path / "cut.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])  # a download cut in half
    mask = sitk.GetImageFromArray((volume.hu > 100).astype(np.uint8))
    sitk.WriteImage(mask, str(tmp_path / "mask.nrrd"))
    single = sitk.GetImageFromArray(volume.hu[:1])
    sitk.WriteImage(single, str(tmp_path / "single.nrrd"))
    label_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    markups = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "F")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    mask_node = mrml.node_from_volume(volume, scene, "mask as scalar", array=(volume.hu > 100).astype(np.int16))
    entries = [None, float("nan"), "", label_node, markups, segmentation, mask_node,
               tmp_path / "cut.nii.gz", tmp_path / "mask.nrrd", tmp_path / "single.nrrd", 42, good]  # fmt: skip
    batch = run_batch(entries, predictor, scene=scene, progress=None)
    frame = batch.predictions.set_index("case")
    assert list(batch.predictions.status) == ["failed"] * 11 + ["ok"]
    reasons = dict(zip(batch.predictions.case, batch.predictions.error, strict=True))
    assert reasons["entry 1"] == "empty entry (None)"
    assert "NaN" in reasons["entry 2"] and reasons["entry 3"] == "empty path"
    assert "label map volume" in reasons["entry 4"]
    assert "vtkMRMLMarkupsFiducialNode 'F' is not a CT" in reasons["entry 5"]
    assert "vtkMRMLSegmentationNode 'seg' is not a CT" in reasons["entry 6"]
    assert "looks like a label map or mask" in reasons["mask as scalar"]
    assert "voxel data is incomplete" in reasons["cut"] and "cut.nii.gz" in reasons["cut"]
    assert "looks like a label map or mask" in reasons["mask"]
    assert "at least 2 voxels on every axis" in reasons["single"]
    assert "a int is not a CT" in reasons["entry 11"]
    assert frame.loc["P000/ct", "status"] == "ok" and frame.loc["P000/ct", "source"] == str(good)
    assert batch.predictions_node.GetNumberOfRows() == 12


def test_case_ids_from_dicts_pairs_and_getnodes(tmp_path, scene, predictor):
    paths = _cohort(tmp_path, 2)
    by_id = run_batch({"LUNG1/001": paths[0], "LUNG1_001": paths[1]}, predictor, progress=None)
    assert list(by_id.predictions.case) == ["LUNG1/001", "LUNG1_001"]
    assert by_id.attention.groupby("case").size().to_dict() == {"LUNG1/001": 16, "LUNG1_001": 16}
    pairs = run_batch([("a", paths[0]), ("b", paths[1])], predictor, progress=None)
    assert list(pairs.predictions.case) == ["a", "b"]
    # Nodes read from files, as Slicer loads them: the source is the file, and getNodes' dict is accepted
    for i, path in enumerate(paths):
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"case{i}")
        storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        storage.SetFileName(str(path))
        node.SetAndObserveStorageNodeID(storage.GetID())
        assert storage.ReadData(node)
    nodes = slicer.util.getNodes("case*", scene=scene)
    batch = run_batch(nodes, predictor, scene=scene, progress=None)
    assert list(batch.predictions.case) == ["case0", "case1"] and list(batch.predictions.status) == ["ok", "ok"]
    assert list(batch.predictions.source) == [str(p) for p in paths]
    # the same CT read from its file or its node gives the same answer
    np.testing.assert_allclose(batch.predictions.p_liver, pairs.predictions.p_liver, atol=1e-6)


def test_dicom_series_are_named_by_patient_and_series(tmp_path, predictor):
    volume, _ = make_phantom((8, 32, 32), (6.0, 6.0, 10.0), seed=4)
    for patient in ("1", "2"):  # TCIA-like folders whose last part repeats
        write_dicom_series(layout_of(volume), tmp_path / patient / "1", description=f"CHEST {patient}")
    batch = run_batch([tmp_path / "1" / "1", tmp_path / "2" / "1"], predictor, progress=None)
    # the factory writes one patient ID; the series descriptions tell them apart
    assert list(batch.predictions.case) == ["PHANTOM-001/CHEST 1", "PHANTOM-001/CHEST 2"]
    assert list(batch.predictions.patient_id) == ["PHANTOM-001"] * 2


class _StopAfter:
    """A progress callback that stops the batch once `n` cases have finished: by the cancel event or by
    raising KeyboardInterrupt (Ctrl-C in a console)."""

    def __init__(self, n: int, how: str):
        self.n, self.how, self.event, self.messages = n, how, threading.Event(), []

    def __call__(self, fraction, message):
        self.messages.append(message)
        if sum(": ok" in m for m in self.messages) == self.n and not self.event.is_set():
            self.event.set()
            if self.how == "ctrl-c":
                raise KeyboardInterrupt


@pytest.mark.parametrize("how", ["cancel", "ctrl-c"])
def test_a_stop_keeps_every_finished_case_and_a_rerun_skips_them(tmp_path, scene, predictor, how):
    paths = _cohort(tmp_path / "cohort", 4)
    results = tmp_path / "results.csv"
    stop = _StopAfter(2, how)
    cancel = stop.event if how == "cancel" else None
    stopped = run_batch(paths, predictor, scene=scene, progress=stop, cancel=cancel, results_file=results)
    assert stopped.stopped == ("cancelled" if how == "cancel" else "interrupted") and not stopped.complete
    assert list(stopped.predictions.case) == ["P000/ct", "P001/ct"]
    assert stopped.predictions_node.GetNumberOfRows() == 2 and stopped.attention_node.GetNumberOfRows() == 32
    assert stopped.predictions_node.GetAttribute("CLEAR.status") == f"stopped ({stopped.stopped})"
    on_disk = pd.read_csv(results)
    assert list(on_disk.case) == ["P000/ct", "P001/ct"] and set(on_disk.bundle_sha256) == {
        predictor.bundle.manifest.weights.sha256
    }
    # The rerun computes only the two cases that did not finish, and its result is the whole batch's.
    seen = []
    rerun = run_batch(paths, predictor, scene=scene, progress=lambda f, m: seen.append(m), results_file=results)
    assert rerun.complete and list(rerun.predictions.case) == ["P000/ct", "P001/ct", "P002/ct", "P003/ct"]
    assert seen[0] == "2 of 4 cases done before (results.csv)"
    assert not any("P000/ct" in m or "P001/ct" in m for m in seen)
    full = run_batch(paths, predictor, progress=None)
    probabilities = ["p_liver", "p_lung", "p_bone"]
    np.testing.assert_allclose(rerun.predictions[probabilities], full.predictions[probabilities], atol=1e-6)
    pd.testing.assert_frame_equal(rerun.attention, full.attention, atol=1e-6, check_dtype=False)
    assert len(pd.read_csv(results)) == 4
    # Another bundle's results are not taken over.
    other = load_bundle(predictor.bundle.path)
    other.manifest = other.manifest.model_copy(
        update={"weights": other.manifest.weights.model_copy(update={"sha256": "0" * 64})}
    )
    seen.clear()
    run_batch(paths[:1], CasePredictor(other, device="cpu"), progress=lambda f, m: seen.append(m), results_file=results)
    assert any(": ok" in m for m in seen)


def test_reruns_replace_or_keep_their_tables_which_record_the_run(tmp_path, scene, predictor):
    paths = _cohort(tmp_path, 1)
    first = run_batch(paths, predictor, scene=scene, progress=None)
    again = run_batch(paths, predictor, scene=scene, progress=None)
    assert again.predictions_node is first.predictions_node  # replaced in place: one table of that name
    assert again.predictions_node.GetNumberOfRows() == 1
    assert scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == 2
    kept = run_batch(paths, predictor, scene=scene, progress=None, tables="keep")
    assert kept.predictions_node is not first.predictions_node
    assert kept.predictions_node.GetName() != first.predictions_node.GetName()
    assert scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == 4
    manifest = predictor.bundle.manifest
    for node in (kept.predictions_node, kept.attention_node):
        assert node.GetAttribute("CLEAR.bundle") == manifest.name
        assert node.GetAttribute("CLEAR.bundle_version") == manifest.version
        assert node.GetAttribute("CLEAR.bundle_sha256") == manifest.weights.sha256
        assert node.GetAttribute("CLEAR.status") == "complete" and node.GetAttribute("CLEAR.run_started")
    assert kept.predictions.attrs["bundle_sha256"] == manifest.weights.sha256
    assert kept.attention.attrs["run_finished"] >= kept.attention.attrs["run_started"]
    with pytest.raises(Exception, match="tables must be one of"):
        run_batch(paths, predictor, scene=scene, progress=None, tables="append")


def test_progress_prints_one_line_per_case_with_status_rate_and_time_left(tmp_path, predictor, capsys):
    paths = [*_cohort(tmp_path, 3), tmp_path / "missing.nrrd"]
    run_batch(paths, predictor)  # the default: progress lines on stderr
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("CLEAR batch")]
    assert len(lines) == 4
    assert "1/4 case" in lines[0] and "s left" in lines[0] and "P000/ct: ok liver" in lines[0]
    assert "4/4 case" in lines[3] and "missing: failed: " in lines[3]


def test_background_job_fills_the_tables_as_cases_finish_and_cancel_keeps_them(tmp_path, scene, predictor):
    paths = _cohort(tmp_path, 6)
    # One case may start per poll, so that the cancel after two rows lands before the batch ends however fast
    # the cases run (on a loaded machine several tiny cases once finished within one poll's wait).
    gate, predict = threading.Semaphore(0), predictor.predict
    predictor.predict = lambda *args, **kwargs: gate.acquire() and predict(*args, **kwargs)
    job = start_batch(paths, predictor, scene=scene)
    rows_seen = []
    while not job.poll(wait_s=0.05):  # what the widget's timer does; the tables fill on this thread
        rows_seen.append(job.partial().predictions_node.GetNumberOfRows())
        if rows_seen[-1] >= 2:
            job.cancel()
        gate.release()
    del predictor.predict  # the class's own again
    result = job.result
    assert result.stopped == "cancelled" and 2 <= len(result.predictions) < 6
    assert result.predictions_node.GetNumberOfRows() == len(result.predictions)
    assert result.attention_node.GetNumberOfRows() == len(result.attention) == 16 * len(result.predictions)
    assert job.error is None and not job.cancelled  # a stopped batch is a result, not an error
    assert "cancelled" in job.message
    complete = start_batch(paths[:2], predictor, scene=scene, tables="keep")
    while not complete.poll(wait_s=0.05):
        pass
    assert complete.result.complete and complete.result.predictions_node.GetNumberOfRows() == 2


def test_a_prepared_batch_reads_nothing_before_it_runs(tmp_path, predictor):
    run = prepare_batch([tmp_path / "not yet there.nii.gz"], predictor)
    assert [case.name for case in run.cases] == ["not yet there"] and run.rows == []


def test_per_label_attention_columns_are_kept_and_taken_over_on_a_rerun(tmp_path, tiny_per_label_bundle):
    predictor = CasePredictor(tiny_per_label_bundle, device="cpu")
    paths = _cohort(tmp_path / "cohort", 2)
    results = tmp_path / "results.csv"
    label_columns = ["attention:liver", "attention:lung", "attention:bone"]
    first = run_batch(paths[:1], predictor, progress=None, results_file=results)
    assert set(label_columns) <= set(first.attention.columns)
    on_disk = pd.read_csv(results.with_name("results-attention.csv"))
    assert set(label_columns) <= set(on_disk.columns)
    rerun = run_batch(paths, predictor, progress=None, results_file=results)
    assert list(rerun.predictions.case) == ["P000/ct", "P001/ct"]
    for _, rows in rerun.attention.groupby("case"):  # the case taken over keeps its curves, the new one has its own
        np.testing.assert_allclose(rows[label_columns].sum().to_numpy(), 1.0, atol=1e-5)
