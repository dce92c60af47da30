"""A real CasePredictor run through CLEARLib.jobs.BackgroundJob, polled as the Slicer widget polls it.

For ../shared/tools/slicer-gil-host/run, which calls start() and then poll() every timer tick while holding
the GIL between ticks, as Slicer's main thread does:

    ../shared/tools/slicer-gil-host/run --python .venv/bin/python --tick-ms 10 --mode both \
        benchmarks/slicer_job_runner.py

Environment: CLEAR_JOB_SLICES (default 60) slices of a synthetic CT; CLEAR_JOB_ENCODER (default
mambaout_femto); CLEAR_JOB_POLL_S (default 0.085, the widget's wait per tick). CLEAR_JOB_CASES=N (N > 0)
runs a cohort of N such CTs as the module's background batch instead (CLEARLib.batch.start_batch, in a
slicer-core scene whose tables each poll fills, as the widget's timer does).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from CLEARLib.bundle import save_bundle
from CLEARLib.inference import CasePredictor
from CLEARLib.jobs import BackgroundJob
from CLEARLib.models import ABMIL, create_encoder
from CLEARLib.phantom import make_phantom

SLICES = int(os.environ.get("CLEAR_JOB_SLICES", 60))
ENCODER = os.environ.get("CLEAR_JOB_ENCODER", "mambaout_femto")
POLL_S = float(os.environ.get("CLEAR_JOB_POLL_S", 0.085))
CASES = int(os.environ.get("CLEAR_JOB_CASES", 0))

torch.manual_seed(0)
_folder = tempfile.mkdtemp(prefix="clear-job-")
_encoder = create_encoder(ENCODER)
_bundle = save_bundle(
    Path(_folder) / "case.zip",
    name="job benchmark",
    kind="case",
    encoder=_encoder,
    head=ABMIL(_encoder.num_features, 2),
    labels=["a", "b"],
    task="multilabel",
    windows=["abdomen", "lung"],
)
_predictor = CasePredictor(_bundle, device="cpu", backend="torch")
_volume, _ = make_phantom((SLICES, 256, 256), (1.2, 1.2, 5.0), seed=0)
_state: dict = {}


def start():
    _state["started"] = time.perf_counter()
    if CASES:
        import slicer

        from CLEARLib import mrml
        from CLEARLib.batch import start_batch

        scene = slicer.vtkMRMLScene()
        slicer.mrmlScene = scene
        nodes = {f"case{i}": mrml.node_from_volume(_volume, scene, f"case{i}") for i in range(CASES)}
        _state["job"] = start_batch(nodes, _predictor, scene=scene)
        return
    _state["job"] = BackgroundJob(lambda progress, cancel: _predictor.predict(_volume, progress, cancel)).start()


def poll() -> bool:
    return _state["job"].poll(wait_s=POLL_S)


def result():
    job = _state["job"]
    if CASES:
        batch = job.result
        return {
            "encoder": ENCODER,
            "cases": CASES,
            "instances_per_case": 2 * SLICES,
            "error": None if job.error is None else str(job.error),
            "ok": int((batch.predictions.status == "ok").sum()) if batch is not None else 0,
            "table_rows": batch.predictions_node.GetNumberOfRows() if batch is not None else 0,
            "poll_wait_s": POLL_S,
        }
    return {
        "encoder": ENCODER,
        "instances": 2 * SLICES,
        "error": None if job.error is None else str(job.error),
        "encode_s": round(job.result.timings.get("encode", float("nan")), 3) if job.result else None,
        "poll_wait_s": POLL_S,
    }
