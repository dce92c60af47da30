"""The widget's background job (CLEARLib.jobs), driven headlessly as the widget's timer drives it."""

from __future__ import annotations

import threading
import time

import pytest

from CLEARLib.errors import CLEARCancelled, CLEARInputError
from CLEARLib.inference import CasePredictor
from CLEARLib.jobs import BackgroundJob
from CLEARLib.phantom import make_phantom


def _poll_until_done(job, wait_s=0.01, limit_s=120):
    ticks, deadline = 0, time.monotonic() + limit_s
    while not job.poll(wait_s):
        ticks += 1
        assert time.monotonic() < deadline, "the job did not finish"
    return ticks


def test_a_case_runs_in_the_background_with_progress(tiny_case_bundle):
    volume, _ = make_phantom((12, 32, 32), (6.0, 6.0, 10.0), seed=1)
    predictor = CasePredictor(tiny_case_bundle, device="cpu", batch_size=4)
    seen = []

    def work(progress, cancel):
        return predictor.predict(volume, lambda f, m: (seen.append(f), progress(f, m)), cancel)

    job = BackgroundJob(work).start()
    _poll_until_done(job)
    expected = predictor.predict(volume)
    assert job.error is None and not job.cancelled and job.done
    assert job.result.probabilities == expected.probabilities
    assert job.fraction == 1.0 and seen == sorted(seen) and len(seen) > 3


def test_cancel_stops_within_one_batch(tiny_case_bundle):
    volume, _ = make_phantom((40, 32, 32), (6.0, 6.0, 10.0), seed=2)
    predictor = CasePredictor(tiny_case_bundle, device="cpu", batch_size=2, backend="torch")
    first_batch, resume = threading.Event(), threading.Event()
    batches = []

    def progress(fraction, message):
        batches.append(message)
        if message.startswith("encoding"):
            first_batch.set()
            resume.wait(10)  # hold the worker after its first batch until the cancel is in

    job = BackgroundJob(lambda p, cancel: predictor.predict(volume, progress, cancel)).start()
    assert first_batch.wait(30)
    job.cancel()
    resume.set()
    _poll_until_done(job)
    assert job.cancelled and isinstance(job.error, CLEARCancelled) and job.result is None
    encoded = [m for m in batches if m.startswith("encoding")]
    assert len(encoded) == 1, batches  # the batch after the cancel never ran


def test_errors_reach_the_polling_thread():
    def work(progress, cancel):
        raise CLEARInputError("not a CT", "/data/x.nii.gz")

    job = BackgroundJob(work).start()
    _poll_until_done(job)
    assert isinstance(job.error, CLEARInputError) and "/data/x.nii.gz" in str(job.error) and not job.cancelled


def test_poll_hands_its_wait_to_the_worker():
    job = BackgroundJob(lambda progress, cancel: time.sleep(0.2) or "done").start()
    started = time.monotonic()
    assert not job.poll(0.05)
    assert job.poll(5.0) and job.result == "done"
    assert time.monotonic() - started < 1.0 and job.error is None


def test_log_collector_keeps_what_a_background_run_logged(tiny_case_bundle, phantom):
    """The log panel's source: CLEARLib's records from the worker thread (device, backend check), drained on
    the polling thread."""
    from CLEARLib.inference import CasePredictor
    from CLEARLib.jobs import BackgroundJob, LogCollector

    volume, _ = phantom
    collector = LogCollector().attach()
    try:
        job = BackgroundJob(lambda progress, cancel: CasePredictor(tiny_case_bundle, device="cpu").predict(volume))
        job.start()
        while not job.poll(0.05):
            pass
        collector.note("done: liver 0.5")
        lines = collector.drain()
    finally:
        collector.detach()
    assert job.error is None
    assert any("onnxruntime verified against torch" in line for line in lines), lines
    assert lines[-1].endswith("INFO done: liver 0.5") and collector.drain() == []


def test_device_choice_and_description(monkeypatch):
    import torch

    from CLEARLib.inference import runtime

    assert runtime.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert runtime.describe_device("cpu").startswith(f"CPU, {torch.get_num_threads()} threads")
    if not torch.cuda.is_available():  # where torch sees Apple's GPU, "auto" and "gpu" use it
        monkeypatch.setattr(runtime, "_mps_available", lambda: True)
        assert runtime.resolve_device("auto").type == "mps" and runtime.resolve_device("gpu").type == "mps"
        assert runtime.describe_device("mps") == "Apple GPU (MPS)"
        monkeypatch.setattr(runtime, "_mps_available", lambda: False)
        with pytest.raises(Exception, match="sees no CUDA \\(or Apple MPS\\) device"):
            runtime.resolve_device("gpu")
