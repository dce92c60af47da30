"""Lesion features at seeds, linear probes with CIs and permutation tests, export; survival statistics."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from clear_training.cli import main as train_main
from clear_training.metrics import paired_permutation_test, probe_metrics
from clear_training.probe import evaluate_probe, export_probe, extract_lesion_features, fit_probe
from clear_training.stats import embedding_plot, survival_analysis
from CLEARLib.inference import LesionPredictor
from CLEARLib.io import write_volume
from CLEARLib.phantom import Lesion, make_phantom


def test_lesion_features_and_probe_export(tmp_path, tiny_lesion_bundle):
    rows = []
    rng = np.random.default_rng(0)
    for i in range(16):
        hu = 150 if i % 2 else -50  # "malignant" lesions dense, "benign" ones not
        lesion = Lesion("liver", (float(rng.uniform(-20, 20)), float(rng.uniform(-20, 20)), 0.0), 10.0, hu)
        volume, _ = make_phantom((20, 48, 48), (3.0, 3.0, 4.0), lesions=[lesion], seed=i)
        path = write_volume(volume, tmp_path / f"ct{i}.nrrd")
        rows.append(
            {
                "image_path": path.name,
                "coordX": lesion.center_lps[0],
                "coordY": lesion.center_lps[1],
                "coordZ": 0.0,
                "label": "malignant" if i % 2 else "benign",
                "case_id": f"c{i}",
            }
        )
    rows.append({"image_path": "missing.nrrd", "coordX": 0, "coordY": 0, "coordZ": 0, "label": "benign"})
    outside = {**rows[0], "coordX": 5000.0, "case_id": "outside"}  # a seed off its image, beside good ones
    rows.insert(1, outside)
    pd.DataFrame(rows).to_csv(tmp_path / "seeds.csv", index=False)
    report = extract_lesion_features(tiny_lesion_bundle, tmp_path / "seeds.csv", tmp_path / "feats.h5", device="cpu")
    assert report["seeds"] == 16 and [f["row"] for f in report["failed"]] == [2, 18]
    assert "outside" in report["failed"][0]["error"] and "no such file" in report["failed"][1]["error"]
    from clear_training.probe import load_probe_data

    data = load_probe_data(tmp_path / "feats.h5")
    x, y = data.x, data.y
    assert x.shape == (16, 64) and set(y) == {"benign", "malignant"}
    assert data.grouped_by == "case_id" and len(set(data.groups)) == 16
    result = evaluate_probe(x, y, folds=4, n_boot=50, groups=data.groups)
    assert set(result["metrics"]) == {"balanced_accuracy", "map", "auc"}
    protocol = result["protocol"]
    assert protocol["n"] == 16 and protocol["class_counts"] == {"benign": 8, "malignant": 8}
    assert protocol["grouped_by_patient"] and len(protocol["chosen"]) == 4 and "grid of 10 C" in protocol["search"]
    model = fit_probe(x, y, folds=4)
    bundle_path = export_probe(model, result["classes"], tiny_lesion_bundle, tmp_path / "probe.zip", "probe")
    # The exported head reproduces the sklearn probe on the same features.
    predictor = LesionPredictor(bundle_path, device="cpu")
    volume_path = tmp_path / "ct1.nrrd"
    seed = (rows[2]["coordX"], rows[2]["coordY"], 0.0)
    lesion_result = predictor.predict(str(volume_path), seed)
    expected = model.predict_proba(lesion_result.features[None].astype(np.float64))[0, 1]
    assert lesion_result.probabilities["malignant"] == pytest.approx(expected, abs=1e-4)
    assert predictor.bundle.manifest.task == "binary"


def test_probe_parameter_search_with_optuna(tmp_path, tiny_lesion_bundle):
    pytest.importorskip("optuna")
    from CLEARLib.bundle import load_bundle

    # Imbalanced classes (1 in 5 positive) separated along one direction of a 64-d feature space,
    # the dimension of the tiny lesion bundle so that the searched probe can be exported as its head.
    rng = np.random.default_rng(3)
    y = np.where(rng.random(120) < 0.2, "malignant", "benign")
    x = rng.normal(size=(120, 64)) + 3.0 * (y == "malignant")[:, None] * np.eye(64)[0]
    result = evaluate_probe(x, y, folds=3, n_boot=20, trials=6)
    assert result["metrics"]["auc"] > 0.8
    model = fit_probe(x, y, folds=3, seed=1, trials=6)
    again = fit_probe(x, y, folds=3, seed=1, trials=6)
    chosen = model[-1].get_params()
    assert 1e-5 <= chosen["C"] <= 1e2 and chosen["class_weight"] in (None, "balanced")
    assert chosen["C"] == again[-1].get_params()["C"]  # the seeded search is reproducible
    path = export_probe(model, result["classes"], tiny_lesion_bundle, tmp_path / "optuna.zip", "probe")
    bundle = load_bundle(path)
    assert bundle.manifest.provenance["C"] == [chosen["C"]]
    with torch.no_grad():
        logits = bundle.head(torch.from_numpy(x[:10]).float())[:, 0]
    assert np.allclose(torch.sigmoid(logits).numpy(), model.predict_proba(x[:10])[:, 1], atol=1e-4)


def test_probe_cv_keeps_each_patient_on_one_side_checks_sizes_and_warns_nothing():
    import warnings

    from clear_training.probe import _folds
    from CLEARLib.errors import CLEARInputError

    rng = np.random.default_rng(0)
    patients = np.repeat([f"p{i}" for i in range(20)], 3)  # three lesions per patient
    y = np.where(np.repeat(np.arange(20) % 2, 3) == 1, "malignant", "benign")
    x = rng.normal(size=(60, 8)) + 2.0 * (y == "malignant")[:, None]
    for train, test in _folds(y, patients, 5, 0, "cv").split(x, y, patients):
        assert not set(patients[train]) & set(patients[test])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no library warnings for the user to decode
        result = evaluate_probe(x, y, folds=5, n_boot=20, groups=patients)
    assert result["protocol"]["patients"] == 20 and result["metrics"]["auc"] > 0.9
    with pytest.raises(
        CLEARInputError, match=r"needs 12 patients per class \(benign: 10, malignant: 10\); use --folds 10"
    ):
        evaluate_probe(x, y, folds=12, n_boot=0, groups=patients)


def test_probe_metrics_and_permutation_test_by_hand():
    y = np.array([0, 0, 1, 1, 0, 1])
    perfect = np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.3, 0.7], [0.6, 0.4], [0.2, 0.8]])
    m = probe_metrics(y, perfect)
    assert m == {"balanced_accuracy": 1.0, "map": 1.0, "auc": 1.0}
    rng = np.random.default_rng(0)
    y_big = rng.integers(0, 2, 200)
    good = np.stack([1 - (0.3 * y_big + 0.7 * rng.random(200)), 0.3 * y_big + 0.7 * rng.random(200)], 1)
    noise = rng.random((200, 2))
    strong = paired_permutation_test(y_big, good, noise, n_perm=200)
    same = paired_permutation_test(y_big, good, good, n_perm=200)
    assert strong["p_value"] < 0.05 and strong["auc_difference"] > 0.1
    assert same["p_value"] == 1.0 and same["auc_difference"] == 0.0


def test_survival_statistics_and_embedding(tmp_path):
    rng = np.random.default_rng(1)
    score = rng.normal(size=120)
    time = rng.exponential(scale=np.exp(-1.2 * score) * 10)  # higher score, shorter survival
    event = (rng.random(120) < 0.8).astype(int)
    table = pd.DataFrame({"score": score, "time": time, "event": event, "age": rng.normal(60, 8, 120)})
    out = survival_analysis(table, "score", "time", "event", tmp_path, covariates=["age"])
    assert out["logrank_p"] < 0.01 and out["cox"]["score"]["hazard_ratio"] > 1.5
    assert out["cox"]["score"]["ci95"][0] > 1.0 and 0.5 < out["concordance"] <= 1.0
    assert (tmp_path / "km_score.png").read_bytes()[:4] == b"\x89PNG"
    features = np.concatenate([rng.normal(0, 1, (30, 8)), rng.normal(4, 1, (30, 8))])
    coords = embedding_plot(features, ["a"] * 30 + ["b"] * 30, tmp_path / "tsne.png")
    assert coords.shape == (60, 2) and (tmp_path / "tsne.png").exists()


def test_cox_separation_is_reported_and_penalised_and_km_shows_numbers_at_risk(tmp_path):
    from matplotlib.figure import Figure

    from clear_training.stats import _numbers_at_risk

    rng = np.random.default_rng(0)
    time = rng.uniform(1, 20, 40)
    table = pd.DataFrame({"score": -3 * time, "time": time, "event": 1})  # the score orders every death
    out = survival_analysis(table, "score", "time", "event", tmp_path)
    assert out["cox_penalizer"] == 0.1 and "complete separation" in out["cox_note"]
    assert 1.0 < out["cox"]["score"]["hazard_ratio"] < 10  # not 1e33
    ax = Figure().add_subplot()
    ax.plot([0, 20], [1, 0])
    ax.set_xticks([0, 10, 20])
    durations = pd.Series([2.0, 5.0, 12.0, 15.0, 20.0])
    high = pd.Series([True, True, False, False, True])
    _numbers_at_risk(ax, durations, (("high", high), ("low", ~high)), "days")
    shown = [t.get_text() for t in ax.texts]
    assert shown[:2] == ["at risk", "high"] and shown[2:5] == ["3", "1", "1"]  # high risk at 0, 10, 20 days
    assert shown[5:9] == ["low", "2", "2", "0"] and shown[-1] == "days"


def test_training_cli_stages(tmp_path, capsys):
    rng = np.random.default_rng(2)
    pd.DataFrame(
        {"score": rng.normal(size=50), "time": rng.exponential(5, 50), "event": rng.integers(0, 2, 50)}
    ).to_csv(tmp_path / "surv.csv", index=False)
    assert train_main(["stats", "--survival", str(tmp_path / "surv.csv"), "--out-dir", str(tmp_path / "s")]) == 0
    assert "logrank_p" in json.loads(capsys.readouterr().out)["survival"]
    assert train_main(["mil", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "no such config file" in capsys.readouterr().err
