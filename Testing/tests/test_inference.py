"""Case and lesion inference end to end on synthetic CT with tiny real bundles; the CLI on top."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_MAMBAOUT

from CLEARLib.bundle import load_bundle, save_bundle
from CLEARLib.cli import main
from CLEARLib.errors import CLEARCancelled, CLEARInputError
from CLEARLib.inference import STABILITY_VARIANCE_VOXELS, CasePredictor, LesionPredictor
from CLEARLib.inference.runtime import run_batches
from CLEARLib.io import write_volume
from CLEARLib.models import ABMIL, create_encoder
from CLEARLib.preprocess import SliceInstances, extract_lesion_patch


def test_case_prediction_end_to_end(phantom, tiny_case_bundle):
    volume, _ = phantom
    result = CasePredictor(tiny_case_bundle, device="cpu").predict(volume)
    n = volume.shape[0] * 2
    assert list(result.attention.columns) == ["slice_index", "window", "z_mm", "attention"]
    assert len(result.attention) == n and result.embeddings.shape == (n, 32)
    assert result.attention.attention.sum() == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(result.attention.z_mm.to_numpy(), np.repeat(volume.slice_positions_mm, 2), atol=1e-9)
    assert set(result.probabilities) == {"liver", "lung", "bone"}
    assert all(0.0 < p < 1.0 for p in result.probabilities.values())
    assert {"preprocess", "encode", "mil"} <= set(result.timings)
    top = result.top_slices(3, window="lung")
    assert list(top.window) == ["lung"] * 3 and top.attention.is_monotonic_decreasing


def test_case_prediction_equals_one_slice_at_a_time(phantom, tiny_case_bundle):
    """The batched pipeline gives what a slice-by-slice loop through the same bundle gives."""
    volume, _ = phantom
    bundle = load_bundle(tiny_case_bundle)
    result = CasePredictor(bundle, device="cpu", batch_size=13).predict(volume)
    instances = SliceInstances(volume, bundle.windows, bundle.input_spec, batch_size=1)
    with torch.no_grad():
        one_by_one = torch.cat([bundle.encoder(b.pixels) for b in instances])
        logits, attention = bundle.head(one_by_one)
    np.testing.assert_allclose(result.embeddings, one_by_one.numpy(), atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(result.attention.attention, attention.numpy(), atol=1e-6, rtol=1e-4)
    np.testing.assert_allclose(list(result.probabilities.values()), torch.sigmoid(logits).numpy(), atol=1e-6)


def test_case_prediction_is_deterministic_on_cpu(phantom, tiny_case_bundle):
    volume, _ = phantom
    predictor = CasePredictor(tiny_case_bundle, device="cpu")
    first, second = predictor.predict(volume), predictor.predict(volume)
    np.testing.assert_array_equal(first.embeddings, second.embeddings)
    assert first.probabilities == second.probabilities


def test_progress_and_cancel(phantom, tiny_case_bundle):
    volume, _ = phantom
    predictor = CasePredictor(tiny_case_bundle, device="cpu", batch_size=8)
    seen = []
    predictor.predict(volume, progress=lambda f, m: seen.append(f))
    assert seen[0] == 0.0 and seen[-1] == 1.0 and seen == sorted(seen) and len(seen) > 3
    calls = []

    def cancel_after_two_batches():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(CLEARCancelled):
        predictor.predict(volume, cancel=cancel_after_two_batches)
    assert len(calls) == 3  # stopped at the first check after the request
    import threading

    event = threading.Event()
    event.set()
    with pytest.raises(CLEARCancelled):
        predictor.predict(volume, cancel=event)


def test_out_of_memory_halves_the_batch():
    sizes = []

    def run_model(batch):
        if len(batch) > 4:
            raise torch.OutOfMemoryError("CUDA out of memory (batch too large)")
        sizes.append(len(batch))
        return batch

    items = list(range(19))
    out = list(run_batches(19, 16, lambda a, b: items[a:b], run_model, None, None, "x", torch.device("cpu")))
    assert [o for _, _, chunk in out for o in chunk] == items
    assert max(sizes) == 4


def test_rescoring_with_another_head_on_the_same_encoder(phantom, tiny_case_bundle, tmp_path):
    volume, _ = phantom
    bundle = load_bundle(tiny_case_bundle)
    torch.manual_seed(5)
    other = save_bundle(
        tmp_path / "stage",
        name="stage",
        kind="case",
        encoder=bundle.encoder,
        head=ABMIL(32, 2, hidden_dim=16, attention_dim=8, gated=True),
        labels=["low", "high"],
        task="multiclass",
        windows=bundle.windows,
        input_spec=bundle.input_spec,
    )
    first = CasePredictor(bundle, device="cpu").predict(volume)
    staging = CasePredictor(other, device="cpu")
    rescored = staging.rescore(first)
    direct = staging.predict(volume)
    assert rescored.probabilities == pytest.approx(direct.probabilities, abs=1e-6)
    assert sum(rescored.probabilities.values()) == pytest.approx(1.0)
    different = save_bundle(
        tmp_path / "other-encoder",
        name="other",
        kind="case",
        encoder=create_encoder("mambaout_femto", **TINY_MAMBAOUT),
        head=ABMIL(32, 1),
        labels=["x"],
        task="binary",
        windows=bundle.windows,
        input_spec=bundle.input_spec,
    )
    with pytest.raises(CLEARInputError, match="another encoder"):
        CasePredictor(different, device="cpu").rescore(first)


def test_a_bundle_with_per_label_attention_gives_each_label_its_own_curve(
    phantom, tiny_case_bundle, tiny_per_label_bundle
):
    volume, _ = phantom
    loaded = load_bundle(tiny_per_label_bundle)
    assert loaded.manifest.head.kwargs["per_label_attention"] is True
    assert loaded.head.attention_branches == 3
    result = CasePredictor(loaded, device="cpu").predict(volume)
    table, labels = result.attention, ["liver", "lung", "bone"]
    columns = [f"attention:{label}" for label in labels]
    assert result.per_label_attention and {"attention", *columns} <= set(table.columns)
    for column in ("attention", *columns):
        assert table[column].sum() == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(table["attention"], table[columns].mean(axis=1), rtol=1e-6)
    with torch.no_grad():
        logits, attention = loaded.head(torch.from_numpy(result.embeddings))
    np.testing.assert_allclose(table[columns].to_numpy(), attention.numpy(), atol=1e-6)
    assert [result.probabilities[k] for k in labels] == pytest.approx(torch.sigmoid(logits).tolist(), abs=1e-6)
    top_lung = result.top_slices(1, label="lung").iloc[0]
    assert top_lung["attention:lung"] == pytest.approx(table["attention:lung"].max())
    # one label's view: its curve in `attention`, the rest as it was
    lung = result.for_labels("lung")
    np.testing.assert_allclose(lung.attention["attention"], table["attention:lung"])
    where = ["slice_index", "window"]
    assert lung.top_slices(3)[where].equals(result.top_slices(3, label="lung")[where])
    assert lung.probabilities == result.probabilities and result.attention is table  # the original unchanged
    both = result.for_labels(["liver", "lung"])
    np.testing.assert_allclose(both.attention["attention"], table[columns[:2]].mean(axis=1), rtol=1e-6)
    with pytest.raises(ValueError, match="not among"):
        result.for_labels("spleen")
    # a shared-attention bundle has one column, and a label's view of it is that one
    shared = CasePredictor(tiny_case_bundle, device="cpu").predict(volume)
    assert not shared.per_label_attention
    np.testing.assert_allclose(shared.for_labels("bone").attention["attention"], shared.attention["attention"])


def test_encoder_only_bundle_cannot_predict(phantom, tiny_case_bundle, tmp_path):
    volume, _ = phantom
    bundle = load_bundle(tiny_case_bundle)
    headless = save_bundle(
        tmp_path / "enc",
        name="enc",
        kind="case",
        encoder=bundle.encoder,
        windows=["lung"],
        input_spec=bundle.input_spec,
    )
    predictor = CasePredictor(headless, device="cpu")
    embeddings, table = predictor.encode(volume)
    assert embeddings.shape == (volume.shape[0], 32) and list(table["window"][:2]) == ["lung", "lung"]
    with pytest.raises(CLEARInputError, match="no head"):
        predictor.predict(volume)


def test_wrong_bundle_kind_is_refused(tiny_case_bundle, tiny_lesion_bundle):
    with pytest.raises(CLEARInputError, match="cannot score lesion seeds"):
        LesionPredictor(tiny_case_bundle, device="cpu")
    with pytest.raises(CLEARInputError, match="cannot score whole cases"):
        CasePredictor(tiny_lesion_bundle, device="cpu")


# ----------------------------------------------------------------------------------------- lesion
def test_lesion_prediction_at_a_seed(big_lesion_phantom, tiny_lesion_bundle):
    volume, lesion = big_lesion_phantom
    predictor = LesionPredictor(tiny_lesion_bundle, device="cpu")
    result = predictor.predict(volume, lesion.center_lps)
    bundle = predictor.bundle
    patch = torch.from_numpy(extract_lesion_patch(volume, lesion.center_lps))[None, None]
    with torch.no_grad():
        expected = bundle.encoder(patch)[0]
        probs = torch.softmax(bundle.head(expected[None]), -1)[0]
    np.testing.assert_allclose(result.features, expected.numpy(), atol=1e-5, rtol=1e-4)
    assert result.probabilities == pytest.approx(dict(zip(["benign", "malignant"], probs.tolist(), strict=True)))
    ras = np.asarray(lesion.center_lps) * [-1, -1, 1]
    np.testing.assert_array_equal(predictor.predict(volume, ras, coord="RAS").features, result.features)


def test_seed_stability(big_lesion_phantom, tiny_lesion_bundle):
    volume, lesion = big_lesion_phantom
    predictor = LesionPredictor(tiny_lesion_bundle, device="cpu", batch_size=16)
    result = predictor.predict(volume, lesion.center_lps, stability=60, random_state=1)
    stability = result.stability
    assert stability["n"] == 60 and stability["sd_mm"] == pytest.approx(np.sqrt(STABILITY_VARIANCE_VOXELS))
    offsets = stability["seeds_lps"] - np.asarray(lesion.center_lps)
    assert offsets.shape == (60, 3) and 2.8 < offsets.std() < 5.2
    assert set(stability["mean"]) == {"benign", "malignant"}
    assert all(0 <= s < 0.5 for s in stability["std"].values())
    again = predictor.predict(volume, lesion.center_lps, stability=60, random_state=1)
    assert again.stability["mean"] == stability["mean"]


def test_stability_without_a_head_reports_feature_stability(big_lesion_phantom, tmp_path):
    """FMCIB's published model has no head: stability is then about its features."""
    volume, lesion = big_lesion_phantom
    from conftest import TINY_LESION

    headless = save_bundle(
        tmp_path / "feat", name="feat", kind="lesion", encoder=create_encoder("fmcib_resnet50", **TINY_LESION)
    )
    predictor = LesionPredictor(headless, device="cpu")
    assert predictor.predict(volume, lesion.center_lps).probabilities == {}
    result = predictor.predict(volume, lesion.center_lps, stability=8, random_state=3)
    stability = result.stability
    assert "mean" not in stability and stability["n"] == 8
    # By hand from the features of the same seeds.
    drawn = predictor.features(volume, stability["seeds_lps"])
    reference = result.features
    cosine = drawn @ reference / (np.linalg.norm(drawn, axis=1) * np.linalg.norm(reference))
    assert stability["feature_cosine_mean"] == pytest.approx(cosine.mean(), rel=1e-5)
    assert stability["feature_cosine_min"] == pytest.approx(cosine.min(), rel=1e-5)
    mean = drawn.mean(0)
    kept = np.abs(mean) > 0
    np.testing.assert_allclose(stability["feature_cv"][kept], (drawn.std(0) / np.abs(mean))[kept], rtol=1e-4)
    assert 0 < stability["feature_cosine_min"] <= stability["feature_cosine_mean"] <= 1
    assert "feature_cv" not in result.to_dict()["stability"]  # the array goes to feature_cv.npy, not JSON


# -------------------------------------------------------------------------------------------- CLI
def test_cli_predict_writes_results(tmp_path, phantom, tiny_case_bundle, capsys):
    volume, _ = phantom
    ct = write_volume(volume, tmp_path / "ct.nii.gz")
    out = tmp_path / "results"
    command = ["predict", str(ct), "--model", str(tiny_case_bundle), "--out", str(out), "--device", "cpu"]
    assert main([*command, "--no-slice-view"]) == 0  # the slice view (slicer-core): test_render.py
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["probabilities"]) == {"liver", "lung", "bone"}
    assert sorted(p.name for p in out.iterdir()) == [
        "attention.csv",
        "attention.png",
        "predictions.csv",
        "predictions.json",
        "top_slices.png",
    ]
    assert (out / "top_slices.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    attention = pd.read_csv(out / "attention.csv")
    assert len(attention) == 2 * volume.shape[0] and attention.attention.sum() == pytest.approx(1, abs=1e-5)
    assert (out / "attention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(pd.read_csv(out / "predictions.csv").label) == ["liver", "lung", "bone"]


def test_cli_predict_draws_one_labels_attention_when_asked(tmp_path, phantom, tiny_per_label_bundle, capsys):
    volume, _ = phantom
    ct = write_volume(volume, tmp_path / "ct.nii.gz")
    command = ["predict", str(ct), "--model", str(tiny_per_label_bundle), "--device", "cpu", "--no-slice-view"]
    assert main([*command, "--out", str(tmp_path / "all")]) == 0
    summary = json.loads(capsys.readouterr().out)
    result = CasePredictor(tiny_per_label_bundle, device="cpu").predict(volume)
    for label in ("liver", "lung", "bone"):
        expected = result.top_slices(5, label=label)
        assert [row["slice_index"] for row in summary["top_slices_by_label"][label]] == list(expected.slice_index)
    assert main([*command, "--out", str(tmp_path / "lung"), "--attention-of", "lung"]) == 0
    capsys.readouterr()
    attention = pd.read_csv(tmp_path / "lung" / "attention.csv")
    assert {"attention", "attention:liver", "attention:lung", "attention:bone"} <= set(attention.columns)
    for picture in ("attention.png", "top_slices.png"):  # drawn from the lung label's attention, not the mean
        assert (tmp_path / "lung" / picture).read_bytes() != (tmp_path / "all" / picture).read_bytes()
    assert main([*command, "--out", str(tmp_path / "x"), "--attention-of", "spleen"]) == 2
    assert "--attention-of spleen: the bundle's labels are ['liver', 'lung', 'bone']" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_attention_is_shown_as_a_multiple_of_uniform(tiny_case_bundle, phantom):
    from CLEARLib.outputs import attention_plot_png, relative_attention

    volume, _ = phantom
    result = CasePredictor(tiny_case_bundle, device="cpu").predict(volume)
    relative = relative_attention(result.attention)
    assert relative.mean() == pytest.approx(1.0, abs=1e-5)  # 1 = what every instance gets when all are equal
    np.testing.assert_allclose(relative, result.attention.attention * 2 * volume.shape[0], rtol=1e-6)
    assert attention_plot_png(result.attention, "t", lesion_z_mm=[0.0], top_k=3)[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_lesion_and_errors(tmp_path, big_lesion_phantom, tiny_lesion_bundle, capsys):
    volume, lesion = big_lesion_phantom
    ct = write_volume(volume, tmp_path / "ct.nrrd")
    ras = ",".join(str(v) for v in np.asarray(lesion.center_lps) * [-1, -1, 1])
    args = ["lesion", str(ct), "--model", str(tiny_lesion_bundle), "--seed", ras, "--coord", "ras"]
    assert main([*args, "--stability", "4", "--device", "cpu", "--out", str(tmp_path / "o")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["stability"]["n"] == 4 and summary["feature_dim"] == 16 * 4  # bottleneck expansion
    assert summary["seed_lps"] == pytest.approx(list(lesion.center_lps))
    assert (tmp_path / "o" / "lesion.json").exists()
    far = ["lesion", str(ct), "--model", str(tiny_lesion_bundle), "--seed", "0,0,5000"]
    assert main(far) == 2
    assert "outside the image" in capsys.readouterr().err
    assert main(["predict", str(ct), "--model", str(tmp_path / "none.zip")]) == 2
    assert "no such bundle" in capsys.readouterr().err
