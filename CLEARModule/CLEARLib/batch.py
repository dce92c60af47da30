"""Batch API for the Python console (Slicer's or plain Python): many CTs through one case bundle.

    from CLEARLib.batch import run_batch
    batch = run_batch({"P001": "/data/P001/ct.nii.gz", "P002": volume_node}, "model.zip", scene=slicer.mrmlScene)
    batch.predictions        # DataFrame: one row per case (status, probabilities, top slice)
    batch.attention          # DataFrame: case, source, slice_index, window, z_mm, attention (+ attention:<label>)
    batch.predictions_node   # table nodes in the scene (saved with it), when a scene is given

Every entry is handled inside the per-case error handling: a case that fails, or an entry that is not a CT
(None, a label map, a markups node, a cut file), is a row with status "failed" and the reason, and the batch
goes on. Each finished case is kept as it completes (in the tables, and in `results_file` when given), so a
stop (Ctrl-C, `cancel`) returns every case that finished, and a rerun with the same results file and bundle
skips them. `start_batch` runs the same batch on a worker thread for a GUI or console that polls.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .errors import CLEARCancelled, CLEARInputError
from .files import write_csv
from .inference import CasePredictor
from .inference.runtime import check_cancel
from .io import read_ct, refuse_label_map
from .io.cohort import case_names, unique_names
from .jobs import BackgroundJob
from .progress import ProgressBar, report

ATTENTION_COLUMNS = ["case", "source", "slice_index", "window", "z_mm", "attention"]


def _attention_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """A case's attention rows in the batch's columns, with the per-label columns of a bundle that has them."""
    return frame[ATTENTION_COLUMNS + [c for c in frame.columns if c.startswith("attention:")]]


_TEXT_COLUMNS = ("case", "source", "status", "error", "patient_id", "series_instance_uid", "top_slices", "top_window")
TABLE_MODES = ("replace", "keep")


@dataclass
class BatchResult:
    predictions: pd.DataFrame
    attention: pd.DataFrame
    predictions_node: object | None = None
    attention_node: object | None = None
    stopped: str = ""  # why the batch ended before its last case ("cancelled", "interrupted"); "" if it did not

    @property
    def complete(self) -> bool:
        return not self.stopped


@dataclass
class _Case:
    item: object  # a path or a volume node (or whatever the caller passed, when `problem` says why not)
    name: str
    source: str
    given_id: bool  # the caller named the case, so a rerun matches it by name as well as by source
    problem: str = ""  # why this entry is not a CT input, found before reading anything

    @property
    def resumable(self) -> bool:
        """A rerun may take this case's earlier result: its source is a file (a node made in a session is not
        the same CT as a node of the same name and ID in another)."""
        return not self.problem and (_is_path(self.item) or not self.source.startswith("Slicer node "))


def _is_volume_node(item) -> bool:
    return hasattr(item, "GetImageData") and hasattr(item, "GetIJKToRASMatrix")


def _is_path(item) -> bool:
    return isinstance(item, (str, os.PathLike)) and bool(os.fspath(item).strip())


def _node_source(node) -> str:
    """The file Slicer read the volume from, else the node's name and ID (a node made in the session)."""
    storage = node.GetStorageNode() if hasattr(node, "GetStorageNode") else None
    file_name = storage.GetFileName() if storage is not None else None
    return file_name or f"Slicer node {node.GetName()} ({node.GetID()})"


def _problem(item) -> str:
    """Why an entry cannot be a case, or "" (paths are checked when read)."""
    if item is None:
        return "empty entry (None)"
    if isinstance(item, float) and math.isnan(item):
        return "empty entry (NaN: an empty table cell?)"
    if _is_path(item):
        return ""
    if isinstance(item, (str, os.PathLike)):
        return "empty path"
    if _is_volume_node(item):
        if item.IsA("vtkMRMLLabelMapVolumeNode"):
            return f"'{item.GetName()}' is a label map volume, not a CT"
        return ""
    if hasattr(item, "GetClassName"):
        name = item.GetName() if hasattr(item, "GetName") else ""
        return f"a {item.GetClassName()} '{name}' is not a CT: pass a scalar volume node or a CT path"
    return f"a {type(item).__name__} is not a CT: pass a scalar volume node or a CT path"


def _entries(inputs) -> list[tuple[str | None, object]]:
    """(case ID or None, input) pairs from a {case_id: input} dict (slicer.util.getNodes() gives one), a list
    of (case_id, input) pairs, or a list of inputs."""
    if isinstance(inputs, dict):
        return [(str(case_id), item) for case_id, item in inputs.items()]
    entries = []
    for entry in inputs:
        if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str):
            entries.append(entry)
        else:
            entries.append((None, entry))
    return entries


def _cases(inputs) -> list[_Case]:
    """Named cases: given IDs as they are; volume nodes by name; paths by their path relative to the folder
    all paths share (CLEARLib.io.cohort); an entry that is not an input by its position. A name given twice
    gets "#2"."""
    entries = _entries(inputs)
    problems = [_problem(item) for _, item in entries]
    paths = [item for (_, item), problem in zip(entries, problems, strict=True) if not problem and _is_path(item)]
    path_names = iter(case_names(paths))
    names, sources = [], []
    for i, ((case_id, item), problem) in enumerate(zip(entries, problems, strict=True)):
        if not problem and _is_path(item):
            derived, source = next(path_names), os.path.abspath(os.fspath(item))
        elif not problem:
            derived, source = item.GetName(), _node_source(item)
        else:
            derived, source = f"entry {i + 1}", repr(item) if not hasattr(item, "GetID") else item.GetID()
        names.append(case_id or derived)
        sources.append(source)
    return [
        _Case(item, name, source, case_id is not None, problem)
        for (case_id, item), name, source, problem in zip(entries, unique_names(names), sources, problems, strict=True)
    ]


def _dicom_name(volume) -> str:
    """A DICOM series' own name: patient ID and series description (or the end of its UID); "" without one."""
    patient = str(volume.meta.get("patient_id") or "").strip()
    if not patient:
        return ""
    series = str(volume.meta.get("series_description") or "").strip()
    return f"{patient}/{series or str(volume.meta.get('series_instance_uid', ''))[-12:]}"


@dataclass
class BatchRun:
    """One batch: its cases, the rows of the cases finished so far, and the scene tables that show them.

    `execute` runs the cases (on any thread; it never touches the scene); `sync_tables` adds finished rows to
    the scene's tables and must run on the scene's (main) thread.
    """

    predictor: CasePredictor
    cases: list[_Case]
    scene: object = None
    top_k: int = 5
    results_file: Path | None = None
    tables: str = "replace"
    table_name: str = "CLEAR batch"
    rows: list[dict] = field(default_factory=list)
    attention: list[pd.DataFrame] = field(default_factory=list)
    stopped: str = ""
    provenance: dict = field(default_factory=dict)
    _synced: int = 0  # rows in the scene's tables, and ok rows among them (each has one attention frame)
    _synced_ok: int = 0
    _synced_provenance: dict = field(default_factory=dict)  # what the tables' attributes say
    _nodes: tuple = (None, None)
    _earlier: tuple = (None, None)  # the results file's rows of cases outside this batch

    def __post_init__(self):
        if self.tables not in TABLE_MODES:
            raise CLEARInputError(f"tables must be one of {TABLE_MODES}, not {self.tables!r}")
        manifest = self.predictor.bundle.manifest
        self.provenance = {
            "bundle": manifest.name,
            "bundle_version": manifest.version,
            "bundle_sha256": manifest.weights.sha256,
            "run_started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "status": "running",
        }
        self.columns = [
            "case", "source", "status", "error", "patient_id", "series_instance_uid",
            *[f"p_{label}" for label in self.predictor.labels],
            "top_slices", "top_window", "top_z_mm", "n_instances",
        ]  # fmt: skip
        if self.scene is not None:
            self._nodes = (self._table_node("predictions"), self._table_node("attention"))

    # ------------------------------------------------------------------------------------------ running
    def execute(self, progress=None, cancel=None) -> BatchResult:
        """Run every case not done yet; a stop (cancel, Ctrl-C) ends the loop and keeps what finished."""
        n = len(self.cases)
        done = self._done_before()
        if done:
            report(progress, len(done) / n, f"{len(done)} of {n} cases done before ({self.results_file.name})")
        try:
            for i, case in enumerate(self.cases):
                if i in done:
                    continue
                check_cancel(cancel)
                status = self._run_case(i, case, progress, cancel)
                report(progress, (i + 1) / n, f"{i + 1}/{n} {case.name}: {status}")
                self._save_results_file()
        except CLEARCancelled:
            self.stopped = "cancelled"
        except KeyboardInterrupt:
            self.stopped = "interrupted"
        finished = len(self.rows)
        self.provenance["status"] = f"stopped ({self.stopped})" if self.stopped else "complete"
        self.provenance["run_finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if self.stopped:
            report(progress, finished / max(n, 1), f"{self.stopped}: {finished} of {n} cases finished and kept")
        else:
            report(progress, 1.0, f"done: {sum(r['status'] == 'ok' for r in self.rows)} of {n} cases ok")
        self._save_results_file()
        return self.result()

    def _run_case(self, i: int, case: _Case, progress, cancel) -> str:
        n = len(self.cases)
        row = {"case": case.name, "source": case.source}
        try:
            if case.problem:
                raise CLEARInputError(case.problem)
            if _is_volume_node(case.item):
                from .mrml import volume_from_node

                volume = volume_from_node(case.item)
                refuse_label_map(volume, case.name)
            else:
                volume = read_ct(os.fspath(case.item))
                if not case.given_id and (name := _dicom_name(volume)):
                    row["case"] = case.name = self._unused_name(name)
            # within a case short of its end: the case's own line (its status) is the one that completes it
            within = (
                (lambda f, m: report(progress, (i + min(f, 0.99)) / n, f"{i + 1}/{n} {case.name}: {m}"))
                if progress
                else None
            )
            result = self.predictor.predict(volume, progress=within, cancel=cancel)
        except (CLEARCancelled, KeyboardInterrupt):
            raise
        except Exception as exc:  # one bad case must not stop the batch
            self.rows.append(self._row({**row, "status": "failed", "error": str(exc)}))
            return f"failed: {exc}"
        read = volume.input_record()
        top = result.top_slices(self.top_k)
        self.attention.append(
            _attention_rows(result.attention.assign(case=row["case"], source=case.source))
        )  # before the row: a reader that sees the row finds its attention
        self.rows.append(
            self._row(
                {
                    **row,
                    "status": "ok",
                    **{key: read.get(key, "") for key in ("patient_id", "series_instance_uid")},
                    **{f"p_{label}": p for label, p in result.probabilities.items()},
                    "top_slices": " ".join(str(int(s)) for s in top.slice_index),
                    "top_window": str(top.window.iloc[0]),
                    "top_z_mm": float(top.z_mm.iloc[0]),
                    "n_instances": int(len(result.attention)),
                }
            )
        )
        return "ok " + " ".join(f"{label} {p:.2f}" for label, p in result.probabilities.items())

    def _unused_name(self, name: str) -> str:
        taken = {case.name for case in self.cases}
        candidate, k = name, 1
        while candidate in taken:
            k += 1
            candidate = f"{name}#{k}"
        return candidate

    def _row(self, values: dict) -> dict:
        """One row with every column: blank text and NaN numbers where a failed case has none."""
        return {c: values.get(c, "" if c in _TEXT_COLUMNS else math.nan) for c in self.columns}

    # ------------------------------------------------------------------------------------------ results file
    def _attention_file(self) -> Path:
        return self.results_file.with_name(self.results_file.stem + "-attention.csv")

    def _done_before(self) -> set[int]:
        """Cases the results file holds as ok with this bundle (by source, and by name where the caller named
        them); their rows and attention are taken over. Failed cases run again."""
        if self.results_file is None or not self.results_file.exists():
            return set()
        try:
            earlier = pd.read_csv(self.results_file, dtype={c: str for c in _TEXT_COLUMNS})
            attention = pd.read_csv(self._attention_file(), dtype={"case": str, "source": str, "window": str})
        except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
            raise CLEARInputError(
                f"cannot read the results file (or its attention file): {exc}", self.results_file
            ) from exc
        missing = {"case", "source", "status", "bundle_sha256"} - set(earlier.columns)
        if missing:
            raise CLEARInputError(f"not a CLEAR batch results file: no column(s) {sorted(missing)}", self.results_file)
        earlier = earlier.fillna({c: "" for c in _TEXT_COLUMNS if c in earlier})
        reusable = earlier[(earlier.status == "ok") & (earlier.bundle_sha256 == self.provenance["bundle_sha256"])]
        by_source = {source: row for source, row in zip(reusable.source, reusable.to_dict("records"), strict=True)}
        done = set()
        for i, case in enumerate(self.cases):
            row = by_source.get(case.source) if case.resumable else None
            if row is None or (case.given_id and row["case"] != case.name):
                continue
            done.add(i)
            old_name = row["case"]
            same_case = (attention.source == case.source) & (attention.case == old_name)
            self.attention.append(_attention_rows(attention[same_case].assign(case=case.name)))
            self.rows.append(self._row({**row, "case": case.name}))
        in_batch = {case.source for case in self.cases}
        self._earlier = (
            earlier[~earlier.source.isin(in_batch)],
            attention[~attention.source.isin(in_batch)],
        )
        return done

    def _save_results_file(self) -> None:
        """The results file and its attention file, rewritten atomically after every case: this batch's rows
        (with the bundle's sha256, which a rerun matches) after the file's rows of other cases."""
        if self.results_file is None:
            return
        rows, attention = self.frames()
        earlier_rows, earlier_attention = self._earlier
        rows = rows.assign(bundle_sha256=self.provenance["bundle_sha256"])
        if earlier_rows is not None:
            rows = pd.concat([earlier_rows, rows], ignore_index=True)
            attention = pd.concat([earlier_attention, attention], ignore_index=True)
        write_csv(self._attention_file(), attention)  # first: a row in the file always has its attention
        write_csv(self.results_file, rows)

    # ------------------------------------------------------------------------------------------ results
    def frames(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        rows = self.rows[: len(self.rows)]  # a snapshot: the worker may append meanwhile
        attention = self.attention[: sum(row["status"] == "ok" for row in rows)]
        predictions = pd.DataFrame(rows, columns=self.columns)
        attention_frame = (
            pd.concat(attention, ignore_index=True) if attention else pd.DataFrame(columns=ATTENTION_COLUMNS)
        )
        for frame in (predictions, attention_frame):
            frame.attrs.update(self.provenance)
        return predictions, attention_frame

    def result(self) -> BatchResult:
        predictions, attention = self.frames()
        return BatchResult(predictions, attention, *self._nodes, stopped=self.stopped)

    # ------------------------------------------------------------------------------------------ scene tables
    def _table_node(self, kind: str):
        """The table of this kind: with tables="replace", an earlier batch's table of the same name is emptied
        and reused; with "keep", a new table gets a unique name beside it."""
        name = f"{self.table_name} {kind}"
        node = self.scene.GetFirstNodeByName(name) if self.tables == "replace" else None
        if node is None or not node.IsA("vtkMRMLTableNode"):
            node = self.scene.AddNewNodeByClass("vtkMRMLTableNode", self.scene.GenerateUniqueName(name))
        node.RemoveAllColumns()
        node.SetAttribute("CLEAR.batch", kind)
        return node

    def sync_tables(self) -> None:
        """Add the rows finished since the last call to the scene's tables and record the run on them."""
        predictions_node, attention_node = self._nodes
        if predictions_node is None:
            return
        from .mrml import append_to_table

        rows = self.rows[: len(self.rows)]  # a snapshot; every ok row's attention was appended before it
        if len(rows) > self._synced:
            new = pd.DataFrame(rows[self._synced :], columns=self.columns)
            n_ok = sum(row["status"] == "ok" for row in rows)
            append_to_table(predictions_node, new)
            if n_ok > self._synced_ok:
                append_to_table(attention_node, pd.concat(self.attention[self._synced_ok : n_ok], ignore_index=True))
            self._synced, self._synced_ok = len(rows), n_ok
        if self.provenance != self._synced_provenance:  # polled every GUI tick: write only what changed
            for node in self._nodes:
                for key, value in self.provenance.items():
                    node.SetAttribute(f"CLEAR.{key}", str(value))
            self._synced_provenance = dict(self.provenance)


def _progress_callback(progress, n_cases: int):
    if progress == "print":
        return ProgressBar("CLEAR batch", total=n_cases, unit="case", line_per_item=True)
    return progress


def prepare_batch(
    inputs,
    bundle,
    device: str = "auto",
    scene=None,
    top_k: int = 5,
    results_file: str | os.PathLike | None = None,
    tables: str = "replace",
    table_name: str = "CLEAR batch",
) -> BatchRun:
    """A batch ready to run (the bundle loaded once; a loaded CasePredictor is reused as it is)."""
    predictor = bundle if isinstance(bundle, CasePredictor) else CasePredictor(bundle, device=device)
    return BatchRun(
        predictor,
        _cases(inputs),
        scene=scene,
        top_k=top_k,
        results_file=Path(results_file) if results_file is not None else None,
        tables=tables,
        table_name=table_name,
    )


def run_batch(
    inputs, bundle, device: str = "auto", scene=None, progress="print", cancel=None, **options
) -> BatchResult:
    """Predict every input on this thread; tables in `scene` when one is given, updated as each case finishes.

    `inputs`: volume nodes and/or CT paths, as a list, a {case_id: input} dict or (case_id, input) pairs.
    `progress`: "print" (a line per case with its status, rate and time left; a bar on a terminal), a
    callback `(fraction, message)`, or None. `cancel`: a threading.Event or a callable; it, or Ctrl-C, stops
    the batch after the current case's batch of slices and returns the cases finished (`result.stopped`).
    `options`: `top_k`, `results_file` (a CSV: finished cases are written as they complete, and a rerun with
    the same bundle skips them), `tables` ("replace" or "keep" earlier tables of the same name), `table_name`.
    """
    run = prepare_batch(inputs, bundle, device=device, scene=scene, **options)
    callback = _progress_callback(progress, len(run.cases))

    def progress_and_tables(fraction, message):
        report(callback, fraction, message)
        if len(run.rows) > run._synced:
            run.sync_tables()  # this thread owns the scene

    try:
        result = run.execute(progress_and_tables, cancel)
    finally:
        if isinstance(callback, ProgressBar):
            callback.close()
    if result.stopped and isinstance(callback, ProgressBar):
        callback.note(f"{result.stopped}; the {len(result.predictions)} finished cases are kept")
    run.sync_tables()
    result.predictions_node, result.attention_node = run._nodes
    return result


class BatchJob(BackgroundJob):
    """A batch on a worker thread. Drive it with `poll(wait_s)` from the thread that owns the scene (the
    Slicer widget's timer, or a loop in a console): each poll hands the worker the GIL for up to `wait_s` and
    adds the cases finished meanwhile to the scene's tables. `partial()` gives the results so far; `cancel()`
    stops after the current batch of slices and `result` holds what finished."""

    def __init__(self, run: BatchRun):
        super().__init__(work=run.execute)
        self.run = run

    def poll(self, wait_s: float = 0.0) -> bool:
        finished = super().poll(wait_s)
        self.run.sync_tables()
        return finished

    def partial(self) -> BatchResult:
        return self.run.result()


def start_batch(inputs, bundle, device: str = "auto", scene=None, **options) -> BatchJob:
    """`run_batch` on a worker thread: returns a started `BatchJob` to poll (see BatchJob)."""
    return BatchJob(prepare_batch(inputs, bundle, device=device, scene=scene, **options)).start()
