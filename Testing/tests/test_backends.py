"""Slice-encoder backends: ONNX Runtime on the CPU, verified against torch, cached, with fallbacks."""

import json
import logging
import os
import stat
import sys

import numpy as np
import pytest
import torch
from conftest import TINY_MAMBAOUT

from CLEARLib.bundle import load_bundle, save_bundle
from CLEARLib.cli import main as clear_ct
from CLEARLib.errors import CLEARInputError
from CLEARLib.files import write_json
from CLEARLib.inference import CasePredictor
from CLEARLib.inference.backends import (
    ONNX_MAX_REL_DIFF,
    SliceEncoderRunner,
    export_onnx,
    max_rel_diff,
    onnx_cache_dir,
)
from CLEARLib.inference.runtime import cpu_has_native_bf16
from CLEARLib.io import write_volume
from CLEARLib.models import ABMIL, create_encoder
from CLEARLib.preprocess import InputSpec

pytest.importorskip("onnxruntime", reason="onnxruntime is a dependency; these tests need it installed")


def _case_bundle(path, seed: int, architecture="mambaout_femto", **kwargs):
    torch.manual_seed(seed)
    encoder = create_encoder(architecture, **(kwargs or TINY_MAMBAOUT))
    return save_bundle(
        path,
        name=f"{architecture}-{seed}",
        kind="case",
        encoder=encoder,
        head=ABMIL(encoder.num_features, 2, hidden_dim=16, attention_dim=8),
        labels=["a", "b"],
        task="multilabel",
        windows=["abdomen", "lung"],
        input_spec=InputSpec(size=32),
    )


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CLEAR_CACHE", str(tmp_path / "cache"))
    return onnx_cache_dir()


def test_onnxruntime_gives_the_features_of_torch(tiny_case_bundle, phantom, fresh_cache):
    volume, _ = phantom
    on_onnx = CasePredictor(tiny_case_bundle, device="cpu", backend="auto")
    on_torch = CasePredictor(tiny_case_bundle, device="cpu", backend="torch")
    first, second = on_onnx.predict(volume), on_torch.predict(volume)
    assert first.runtime["backend"] == "onnxruntime" and second.runtime["backend"] == "torch"
    assert first.runtime["onnx_max_rel_diff"] <= ONNX_MAX_REL_DIFF
    assert max_rel_diff(first.embeddings, second.embeddings) <= ONNX_MAX_REL_DIFF
    for label in first.labels:
        assert first.probabilities[label] == pytest.approx(second.probabilities[label], abs=1e-4)
    np.testing.assert_allclose(first.attention.attention, second.attention.attention, atol=1e-5)
    assert len(list(fresh_cache.glob("*.onnx"))) == 1


def test_export_is_cached_by_weights(tmp_path, phantom, fresh_cache, caplog):
    volume, _ = phantom
    bundle = _case_bundle(tmp_path / "one", seed=1)
    CasePredictor(bundle, device="cpu").predict(volume)
    (exported,) = fresh_cache.glob("*.onnx")
    stamp = exported.stat().st_mtime_ns
    caplog.clear()
    again = CasePredictor(load_bundle(bundle), device="cpu").predict(volume)
    assert again.runtime["backend"] == "onnxruntime"
    assert exported.stat().st_mtime_ns == stamp
    assert not [r for r in caplog.records if "exporting" in r.getMessage()]
    # Other weights of the same architecture get their own file.
    CasePredictor(_case_bundle(tmp_path / "two", seed=2), device="cpu").predict(volume)
    assert len(list(fresh_cache.glob("*.onnx"))) == 2
    # Cached files get the permissions of a normal file, so a shared cache stays readable.
    mode = stat.S_IMODE(exported.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


def test_a_cached_model_that_disagrees_with_torch_is_not_used(tmp_path, phantom, fresh_cache, caplog):
    """A stale or foreign file under the cache key: the first-batch check catches it and torch runs."""
    volume, _ = phantom
    bundle = _case_bundle(tmp_path / "one", seed=1)
    CasePredictor(bundle, device="cpu").predict(volume)
    (exported,) = fresh_cache.glob("*.onnx")
    torch.manual_seed(99)
    export_onnx(create_encoder("mambaout_femto", **TINY_MAMBAOUT), exported, 32, 3)  # other weights, same key
    predictor = CasePredictor(bundle, device="cpu", backend="onnxruntime")
    result = predictor.predict(volume)
    reference = CasePredictor(bundle, device="cpu", backend="torch").predict(volume)
    assert result.runtime["backend"] == "torch"
    assert "differs from torch" in result.runtime["fallback_reason"]
    assert result.runtime["onnx_max_rel_diff"] > ONNX_MAX_REL_DIFF
    np.testing.assert_array_equal(result.embeddings, reference.embeddings)
    assert any(r.levelno == logging.WARNING and "differs from torch" in r.getMessage() for r in caplog.records)


def test_an_unreadable_cached_model_falls_back_to_torch(tmp_path, phantom, fresh_cache):
    volume, _ = phantom
    bundle = _case_bundle(tmp_path / "one", seed=1)
    CasePredictor(bundle, device="cpu").predict(volume)
    (exported,) = fresh_cache.glob("*.onnx")
    exported.write_bytes(b"not an onnx model")
    result = CasePredictor(bundle, device="cpu").predict(volume)
    assert result.runtime["backend"] == "torch"
    assert "ONNX export or load failed" in result.runtime["fallback_reason"]


def test_without_onnxruntime_torch_runs(tiny_case_bundle, phantom, fresh_cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import onnxruntime` sees when it is absent
    volume, _ = phantom
    result = CasePredictor(tiny_case_bundle, device="cpu").predict(volume)
    assert result.runtime["backend"] == "torch"
    assert result.runtime["fallback_reason"] == "onnxruntime is not installed"
    assert not list(fresh_cache.glob("*.onnx"))


def test_vmamba_stays_on_torch_and_says_why(tmp_path, fresh_cache):
    bundle = _case_bundle(tmp_path / "vm", seed=0, architecture="vmamba_tiny", depths=(1, 1), dims=(8, 16))
    runner = SliceEncoderRunner(load_bundle(bundle), torch.device("cpu"), backend="auto")
    assert runner.backend == "torch"
    assert "vmamba_tiny" in runner.fallback_reason and "1e-4" in runner.fallback_reason
    assert runner(torch.randn(2, 3, 32, 32)).shape == (2, 16)


def test_bad_backend_choices_are_refused(tiny_case_bundle):
    with pytest.raises(CLEARInputError, match="unknown backend"):
        CasePredictor(tiny_case_bundle, device="cpu", backend="tensorrt")
    with pytest.raises(CLEARInputError, match="unknown precision"):
        CasePredictor(tiny_case_bundle, device="cpu", precision="fp16")


def test_cpu_bf16_is_explicit_and_only_where_native(tiny_case_bundle, phantom):
    volume, _ = phantom
    if not cpu_has_native_bf16():
        with pytest.raises(CLEARInputError, match="AVX-512 BF16 or AMX"):
            CasePredictor(tiny_case_bundle, device="cpu", precision="bf16")
        return
    with pytest.raises(CLEARInputError, match="runs fp32"):
        CasePredictor(tiny_case_bundle, device="cpu", backend="onnxruntime", precision="bf16")
    bf16 = CasePredictor(tiny_case_bundle, device="cpu", precision="bf16").predict(volume)
    fp32 = CasePredictor(tiny_case_bundle, device="cpu", backend="torch").predict(volume)
    assert bf16.runtime == {"backend": "torch", "precision": "bf16", "device": "cpu"}
    assert 0 < max_rel_diff(bf16.embeddings, fp32.embeddings) < 5e-2


def test_clear_ct_predict_agrees_across_backends(tiny_case_bundle, phantom, tmp_path, fresh_cache):
    volume, _ = phantom
    ct = write_volume(volume, tmp_path / "ct.nrrd")
    outputs = {}
    for backend in ("torch", "onnxruntime"):
        out = tmp_path / backend
        argv = ["predict", str(ct), "--model", str(tiny_case_bundle), "--out", str(out), "--backend", backend]
        assert clear_ct(argv) == 0
        outputs[backend] = json.loads((out / "predictions.json").read_text())
    assert outputs["onnxruntime"]["runtime"]["backend"] == "onnxruntime"
    assert outputs["torch"]["runtime"]["backend"] == "torch"
    for label, p in outputs["torch"]["probabilities"].items():
        assert outputs["onnxruntime"]["probabilities"][label] == pytest.approx(p, abs=1e-4)


def test_atomic_writes_keep_normal_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        path = write_json(tmp_path / "result.json", {"a": 1})
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
