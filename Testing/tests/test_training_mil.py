"""Feature extraction, ABMIL cross-validation with metrics and export, probes and statistics."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml

from clear_training.config import ConfigError, MilConfig, load_config
from clear_training.extract import extract, feature_file, read_features, write_features
from clear_training.mil import run_mil
from CLEARLib.bundle import load_bundle, save_bundle
from CLEARLib.errors import CLEARInputError
from CLEARLib.inference import CasePredictor
from CLEARLib.io import write_volume
from CLEARLib.phantom import make_phantom


def test_extract_writes_one_file_per_case_skips_done_and_reports_failures(tmp_path, tiny_case_bundle):
    rows = []
    for i in range(3):
        volume, _ = make_phantom((8 + i, 32, 32), (6.0, 6.0, 10.0), seed=i)
        rows.append({"case_id": f"c{i}", "path": str(write_volume(volume, tmp_path / f"c{i}.nrrd"))})
    np.savez_compressed(tmp_path / "chest.npz", ct=make_phantom((6, 30, 30), (1, 1, 1), seed=9)[0].hu)
    rows += [{"case_id": "chest", "path": str(tmp_path / "chest.npz")}, {"case_id": "bad", "path": "nope.nii.gz"}]
    pd.DataFrame(rows).to_csv(tmp_path / "cohort.csv", index=False)
    out = tmp_path / "features"
    # Two ranks share the cohort: every rank takes every second case.
    r0 = extract(tiny_case_bundle, tmp_path / "cohort.csv", out, device="cpu", rank=0, world_size=2)
    r1 = extract(tiny_case_bundle, tmp_path / "cohort.csv", out, device="cpu", rank=1, world_size=2)
    assert sorted(r0["done"] + r1["done"]) == ["c0", "c1", "c2", "chest"]
    assert [f["case_id"] for f in r0["failed"] + r1["failed"]] == ["bad"]
    data = read_features(out / "c1.h5")
    assert data["feats"].dtype == np.float16 and data["feats"].shape == (2 * 9, 32)
    assert list(data["window"][:2]) == ["abdomen", "lung"] and data["slice_index"][-1] == 8
    sha = load_bundle(tiny_case_bundle).manifest.encoder.weights_sha256
    assert data["attrs"]["encoder_weights_sha256"] == sha and data["attrs"]["encoder"] == "mambaout_femto"
    assert json.loads(data["attrs"]["windows"])[0]["name"] == "abdomen"
    volume, _ = make_phantom((9, 32, 32), (6.0, 6.0, 10.0), seed=1)
    embeddings, _ = CasePredictor(tiny_case_bundle, device="cpu").encode(volume)
    np.testing.assert_allclose(data["feats"].astype(np.float32), embeddings, atol=1e-2, rtol=1e-2)
    again = extract(tiny_case_bundle, tmp_path / "cohort.csv", out, device="cpu", rank=0, world_size=1)
    assert sorted(again["skipped"]) == ["c0", "c1", "c2", "chest"] and again["done"] == []
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    # The same weights with other windows make other features: nothing is reused.
    bundle = load_bundle(tiny_case_bundle)
    same = {"encoder": bundle.encoder, "head": bundle.head, "labels": bundle.labels, "task": bundle.manifest.task}
    lung_only = save_bundle(tmp_path / "lung.zip", name="lung only", kind="case", windows=["lung"], **same)
    other = extract(lung_only, tmp_path / "cohort.csv", out, device="cpu", rank=0, world_size=1)
    assert sorted(other["done"]) == ["c0", "c1", "c2", "chest"] and other["skipped"] == []
    assert list(read_features(out / "c1.h5")["window"][:2]) == ["lung", "lung"]


def test_case_ids_that_differ_only_in_odd_characters_keep_their_own_features(tmp_path, tiny_case_bundle):
    ids = ["LUNG1/001", "LUNG1_001", "case 1", "case_1"]
    rows = []
    for i, case in enumerate(ids):
        volume, _ = make_phantom((6 + i, 32, 32), (6.0, 6.0, 10.0), seed=i)
        rows.append({"case_id": case, "path": str(write_volume(volume, tmp_path / f"v{i}.nrrd"))})
    pd.DataFrame(rows).to_csv(tmp_path / "cohort.csv", index=False)
    report = extract(tiny_case_bundle, tmp_path / "cohort.csv", tmp_path / "f", device="cpu", rank=0, world_size=1)
    assert report["done"] == ids and report["skipped"] == []
    for i, case in enumerate(ids):
        data = read_features(feature_file(tmp_path / "f", case))
        assert data["attrs"]["case_id"] == case and data["slice_index"][-1] == 5 + i
    # Two ranks (as under torchrun) take alternate cases; no two of them write one file.
    reports = [
        extract(tiny_case_bundle, tmp_path / "cohort.csv", tmp_path / "g", device="cpu", rank=r, world_size=2)
        for r in (0, 1)
    ]
    assert sorted(reports[0]["done"] + reports[1]["done"]) == sorted(ids)
    assert len({feature_file(tmp_path / "g", case) for case in ids}) == len(list((tmp_path / "g").glob("*.h5"))) == 4


def _synthetic_cohort(root, n_cases=150, dim=16, seed=0):
    """Cases of 60-120 slices; label j is present when some 2-4 slices carry lesion type j, whose
    features stand out by +4 along direction j from the case's own baseline. Every case has a random
    baseline along each direction (as scans differ in contrast and anatomy), so averaging all slices
    cannot tell positives from negatives: the model has to find the lesion slices."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(2, dim))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    rows, lesion_slices = [], {}
    for i in range(n_cases):
        n = int(rng.integers(60, 121))
        feats = rng.normal(size=(n, dim)).astype(np.float32)
        feats += (rng.uniform(-1.0, 1.0, size=2) @ directions).astype(np.float32)  # case baseline
        labels = rng.random(2) < 0.45
        marked = {}
        for j in np.flatnonzero(labels):
            where = rng.choice(n, size=int(rng.integers(2, 5)), replace=False)
            feats[where] += 4.0 * directions[j]
            marked[["liver", "lung"][j]] = set(where.tolist())
        case = f"case{i:03d}"
        lesion_slices[case] = marked
        write_features(
            root / "features" / f"{case}.h5",
            feats,
            {"slice_index": np.arange(n), "window": ["lung"] * n, "z_mm": np.arange(n) * 2.5},
            {"encoder_weights_sha256": "synthetic", "encoder": "synthetic"},
        )
        rows.append({"case_id": case, "patient_id": f"p{i // 2:03d}", "liver": int(labels[0]), "lung": int(labels[1])})
    (root / "features").mkdir(exist_ok=True)
    pd.DataFrame(rows).to_csv(root / "clinical.csv", index=False)
    return lesion_slices


def _mil_config(root, **data):
    cfg = {
        "run": {"name": "mil", "out_dir": str(root / "mil"), "seed": 0, "device": "cpu"},
        "data": {
            "features": str(root / "features"),
            "table": str(root / "clinical.csv"),
            "task": "multilabel",
            "labels": ["liver", "lung"],
            "folds": 3,
            **data,
        },
        "model": {"hidden_dim": 64, "attention_dim": 32, "dropout": 0.0},
        "train": {"lr": 1e-2, "weight_decay": 0.0, "batch_size": 16, "epochs": 200, "patience": 40},
        "evaluation": {"bootstrap": 50, "attention_plots": 2},
    }
    path = root / "mil.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_config(path, model=MilConfig)


def test_abmil_cross_validation_learns_and_attends_to_lesion_slices(tmp_path):
    lesion_slices = {case: set().union(*by_label.values()) for case, by_label in _synthetic_cohort(tmp_path).items()}
    metrics = run_mil(_mil_config(tmp_path))
    test = metrics["ensemble_test"]
    assert test["liver"]["auroc"] > 0.8 and test["lung"]["auroc"] > 0.8, test  # chance is 0.5
    ci = metrics["ensemble_test_ci95"]["liver"]["auroc"]
    assert ci[0] <= test["liver"]["auroc"] <= ci[1]
    splits = pd.read_csv(tmp_path / "mil" / "splits.csv")
    # Patient-level: both cases of a patient are always in the same split.
    assert (splits.groupby("patient_id").split.nunique() == 1).all()
    assert set(splits.split) == {"test", "fold0", "fold1", "fold2"}
    attention = pd.read_csv(tmp_path / "mil" / "attention.csv")
    predictions = pd.read_csv(tmp_path / "mil" / "predictions.csv")
    positives = predictions[
        (predictions.model == "ensemble-test") & ((predictions.target_liver + predictions.target_lung) > 0)
    ]
    masses, top_is_lesion = [], []
    for case in positives.case_id:
        rows = attention[attention.case_id == case]
        masses.append(rows[rows.slice_index.isin(lesion_slices[case])].attention.sum())
        top_is_lesion.append(int(rows.slice_index.iloc[rows.attention.argmax()]) in lesion_slices[case])
    # Lesion slices are ~3% of a case; most of the attention goes to them, and the most attended
    # slice of a positive case is nearly always one of them.
    assert np.mean(masses) > 0.5, masses
    assert np.mean(top_is_lesion) > 0.9, top_is_lesion
    for name in ("roc.png", "pr.png", "metrics.json"):
        assert (tmp_path / "mil" / name).exists()
    assert len(list((tmp_path / "mil" / "attention_plots").glob("*.png"))) == 4
    assert len(metrics["folds"]) == 3 and all(f["epochs_run"] >= 1 for f in metrics["folds"])
    protocol = json.loads((tmp_path / "mil" / "metrics.json").read_text())["protocol"]
    assert protocol["n_patients"] == splits.patient_id.nunique() and protocol["grouped_by"] == "patient_id"
    assert protocol["split_sizes"] == splits.split.value_counts().to_dict()
    assert protocol["train"]["epochs"] == 200 and "3 validation folds" in protocol["design"]


def test_per_label_attention_puts_each_labels_attention_on_its_own_lesions(tmp_path):
    lesion_slices = _synthetic_cohort(tmp_path)
    config = _mil_config(tmp_path)
    config.model.per_label_attention = True
    config.evaluation.bootstrap = 0
    metrics = run_mil(config)
    assert all(metrics["ensemble_test"][label]["auroc"] > 0.8 for label in ("liver", "lung")), metrics["ensemble_test"]
    attention = pd.read_csv(tmp_path / "mil" / "attention.csv")
    assert {"attention", "attention:liver", "attention:lung"} <= set(attention.columns)
    sums = attention.groupby("case_id")[["attention", "attention:liver", "attention:lung"]].sum()
    np.testing.assert_allclose(sums.to_numpy(), 1.0, atol=1e-4)
    tested = set(pd.read_csv(tmp_path / "mil" / "splits.csv").query("split == 'test'").case_id)
    hits = []
    for case in sorted(tested):
        rows = attention[attention.case_id == case]
        for label, slices in lesion_slices[case].items():
            # each label's most attended slice is one of that label's lesion slices, not the other's
            hits.append(int(rows.slice_index.iloc[rows[f"attention:{label}"].argmax()]) in slices)
    assert len(hits) >= 10 and np.mean(hits) > 0.9, hits


def test_repeated_cross_validation_redraws_the_folds_around_one_test_set_and_ensembles_every_fold_model(tmp_path):
    _synthetic_cohort(tmp_path, n_cases=60, seed=2)
    once = _mil_config(tmp_path)
    once.train.epochs, once.evaluation.bootstrap, once.evaluation.attention_plots = 5, 0, 0
    once.run.out_dir = tmp_path / "once"
    once.export.encoder_bundle = None
    first = run_mil(once)
    repeated = once.model_copy(deep=True)
    repeated.run.out_dir, repeated.data.repeats = tmp_path / "repeated", 3
    metrics = run_mil(repeated)
    splits = pd.read_csv(tmp_path / "repeated" / "splits.csv")
    draws = [splits[c] for c in ("split", "split_1", "split_2")]
    # One test set; each draw splits the other patients into the 3 folds, patient by patient, and the draws differ.
    assert all((draw == "test").equals(draws[0] == "test") for draw in draws)
    for column in ("split", "split_1", "split_2"):
        assert set(splits[column]) == {"test", "fold0", "fold1", "fold2"}
        assert (splits.groupby("patient_id")[column].nunique() == 1).all()
    assert not draws[0].equals(draws[1]) and not draws[1].equals(draws[2])
    # The first draw is the unrepeated study's, fold models and all; the ensemble holds all nine.
    assert draws[0].equals(pd.read_csv(tmp_path / "once" / "splits.csv").split)
    names = [f["fold"] for f in metrics["folds"]]
    assert names == ["fold0", "fold1", "fold2"] + [f"repeat{r}-fold{k}" for r in (1, 2) for k in range(3)]
    for a, b in zip(first["folds"], metrics["folds"][:3], strict=True):
        assert a["best_val_loss"] == b["best_val_loss"]
    assert metrics["folds"][3]["best_val_loss"] != metrics["folds"][0]["best_val_loss"]
    assert "drawn 3 times" in metrics["protocol"]["design"] and metrics["across_folds"]["liver"]["n"] == 9
    predictions = pd.read_csv(tmp_path / "repeated" / "predictions.csv")
    tested = predictions[predictions.model.str.endswith("-test")]
    test = tested.pivot(index="case_id", columns="model", values="p_liver")
    members = test[[f"{name}-test" for name in names]].to_numpy()
    np.testing.assert_allclose(test["ensemble-test"].to_numpy(), members.mean(axis=1), atol=1e-5)
    with pytest.raises(ConfigError, match="repeats"):
        _mil_config(tmp_path, nested=True, repeats=2)


def test_nested_cross_validation_for_small_cohorts(tmp_path):
    _synthetic_cohort(tmp_path, n_cases=40, seed=1)
    metrics = run_mil(_mil_config(tmp_path, nested=True, folds=4))
    assert "nested_cv" in metrics and "ensemble_test" not in metrics
    predictions = pd.read_csv(tmp_path / "mil" / "predictions.csv")
    tested = predictions[predictions.model.str.endswith("-test")]
    assert sorted(tested.case_id) == sorted(pd.read_csv(tmp_path / "clinical.csv").case_id)  # each case once


def _real_features(root, bundle, labels_of) -> None:
    """Real features of 12 small phantom CTs through `bundle` in root/features, their table (labels_of(i) gives
    case i's label columns) in root/clinical.csv."""
    rows, clinical = [], []
    for i in range(12):
        volume, _ = make_phantom((6, 32, 32), (6.0, 6.0, 10.0), seed=i, noise_hu=5.0 + i)
        rows.append({"case_id": f"c{i}", "path": str(write_volume(volume, root / f"c{i}.nrrd"))})
        clinical.append({"case_id": f"c{i}", "patient_id": f"p{i}", **labels_of(i)})
    pd.DataFrame(rows).to_csv(root / "cohort.csv", index=False)
    pd.DataFrame(clinical).to_csv(root / "clinical.csv", index=False)
    extract(bundle, root / "cohort.csv", root / "features", device="cpu", rank=0, world_size=1)


def test_mil_exports_an_ensemble_bundle_the_engine_runs(tmp_path, tiny_case_bundle, phantom):
    _real_features(tmp_path, tiny_case_bundle, lambda i: {"stage": "high" if i % 2 else "low"})
    cfg = {
        "run": {"name": "stage", "out_dir": str(tmp_path / "out"), "device": "cpu"},
        "data": {
            "features": str(tmp_path / "features"),
            "table": str(tmp_path / "clinical.csv"),
            "task": "multiclass",
            "labels": ["low", "high"],
            "label_column": "stage",
            "folds": 2,
            "test_fraction": 0.25,
            "windows": ["lung"],
        },
        "model": {"hidden_dim": 16, "attention_dim": 8},
        "train": {"epochs": 2, "batch_size": 4},
        "evaluation": {"bootstrap": 10, "attention_plots": 1},
        "export": {"encoder_bundle": str(tiny_case_bundle)},
    }
    (tmp_path / "stage.yaml").write_text(yaml.safe_dump(cfg))
    metrics = run_mil(load_config(tmp_path / "stage.yaml", model=MilConfig))
    bundle = load_bundle(metrics["bundle"])
    assert bundle.manifest.head.type == "abmil_ensemble" and bundle.manifest.head.kwargs["n_members"] == 2
    assert [w.name for w in bundle.windows] == ["lung"] and bundle.labels == ["low", "high"]
    volume, _ = phantom
    result = CasePredictor(bundle, device="cpu").predict(volume)
    assert sum(result.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert set(result.attention.window) == {"lung"}


def test_label_windows_reach_the_exported_bundle_and_the_engine_honours_them(tmp_path, tiny_case_bundle, phantom):
    _real_features(tmp_path, tiny_case_bundle, lambda i: {"liver": i % 2, "lung": (i // 2) % 2})
    cfg = {
        "run": {"name": "organs", "out_dir": str(tmp_path / "out"), "device": "cpu"},
        "data": {
            "features": str(tmp_path / "features"),
            "table": str(tmp_path / "clinical.csv"),
            "task": "multilabel",
            "labels": ["liver", "lung"],
            "folds": 2,
            "test_fraction": 0.25,
        },
        "model": {"hidden_dim": 16, "attention_dim": 8, "per_label_attention": True},
        "train": {"epochs": 2, "batch_size": 4},
        "evaluation": {"bootstrap": 0, "attention_plots": 0},
        "export": {"encoder_bundle": str(tiny_case_bundle)},
    }
    config_path = tmp_path / "organs.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="per_label_attention"):
        overrides = ["model.per_label_attention=false", "model.label_windows={liver: [abdomen]}"]
        load_config(config_path, overrides, MilConfig)
    with pytest.raises(CLEARInputError, match=r"labels \['bone'\]"):
        run_mil(load_config(config_path, ["model.label_windows={bone: [abdomen]}"], MilConfig))
    metrics = run_mil(load_config(config_path, ["model.label_windows={liver: [abdomen]}"], MilConfig))
    bundle = load_bundle(metrics["bundle"])
    assert bundle.manifest.head.kwargs["label_windows"] == [["abdomen"], ["abdomen", "lung"]]
    volume, _ = phantom
    result = CasePredictor(bundle, device="cpu").predict(volume)
    liver = result.attention["attention:liver"]
    assert (liver[result.attention.window == "lung"] == 0).all()
    assert liver[result.attention.window == "abdomen"].sum() == pytest.approx(1.0, abs=1e-5)
    assert (result.attention["attention:lung"][result.attention.window == "lung"] > 0).all()
    rescored = CasePredictor(bundle, device="cpu").rescore(result)
    assert rescored.probabilities == pytest.approx(result.probabilities)


def test_mil_config_errors(tmp_path):
    (tmp_path / "bad.yaml").write_text(
        yaml.safe_dump(
            {
                "run": {"name": "x", "out_dir": "o"},
                "data": {"features": "f", "table": "t.csv", "task": "multiclass", "labels": ["a"]},
            }
        )
    )
    with pytest.raises(ConfigError, match="multiclass needs label_column"):
        load_config(tmp_path / "bad.yaml", model=MilConfig)
    assert h5py is not None


def test_shipped_mil_configs_validate():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "training" / "configs"
    configs = sorted(folder.glob("mil_*.yaml")) + sorted((folder / "authors").glob("mil_*.yaml"))
    assert len(configs) == 3
    for path in configs:
        config = load_config(path, model=MilConfig)
        assert config.train.lr == 1e-4 and config.train.batch_size == 128 and config.train.epochs == 32
        assert config.train.patience == 8 and config.data.folds == 5
        if "lesion_location" in path.name:  # DeepLesion: the pretraining hold-out is the test set
            assert config.data.test_split.name == "deeplesion-store-splits.csv" and config.data.pretrain_store
        else:  # staging on a small cohort: nested cross-validation, as the paper does
            assert config.data.nested and config.data.test_split is None
        if path.parent.name == "authors":
            model, train = config.model, config.train
            assert model.attention_dim == 256 and model.dropout == 0.5 and model.dropout_before_activation
            assert train.weight_decay == 0.0 and train.class_balanced


def _slice_store(path, patients):
    from clear_training.data.store import SliceRecord, SliceStoreWriter

    writer = SliceStoreWriter(path, size=8, source="test")
    for patient in patients:
        record = SliceRecord(case_id=f"{patient}_01", patient_id=patient, slice_index=0, z_mm=0.0, spacing=(1, 1, 1))
        writer.add_case(np.zeros((1, 8, 8), np.int16), [record])
    return writer.close()


def test_deeplesion_test_set_is_the_pretraining_holdout(tmp_path):
    from clear_training.mil import Bags, make_splits

    _synthetic_cohort(tmp_path, n_cases=40)  # patients p000..p019, two cases each
    patients = [f"p{i:03d}" for i in range(20)]
    held_out = {"p001", "p004", "p007", "p010", "p013"}
    splits_csv = tmp_path / "store-splits.csv"  # what prepare-deeplesion writes beside its store
    pd.DataFrame({"patient_id": patients, "split": ["test" if p in held_out else "pretrain" for p in patients]}).to_csv(
        splits_csv, index=False
    )
    pretrained = [p for p in patients if p not in held_out]
    config = _mil_config(
        tmp_path, test_split=str(splits_csv), pretrain_store=str(_slice_store(tmp_path / "s", pretrained))
    )
    splits = make_splits(Bags(config.data), config.data, seed=0)
    assert set(splits.patient_id[splits.split == "test"]) == held_out  # exactly the hold-out, not a new draw
    assert sorted(set(splits.split) - {"test"}) == ["fold0", "fold1", "fold2"]
    # A test patient in the store the encoder was pretrained on stops the run, naming it.
    leaky = _mil_config(tmp_path, pretrain_store=str(_slice_store(tmp_path / "leaky", pretrained + ["p004"])))
    leaky.data.test_split = splits_csv
    with pytest.raises(ValueError, match=r"1 test patients were in the pretraining store .*p004"):
        make_splits(Bags(leaky.data), leaky.data, seed=0)
    # A random test split over a store of every patient is refused for the same reason.
    drawn = _mil_config(tmp_path, test_fraction=0.2, pretrain_store=str(_slice_store(tmp_path / "all", patients)))
    with pytest.raises(ValueError, match="test patients were in the pretraining store"):
        make_splits(Bags(drawn.data), drawn.data, seed=0)
    with pytest.raises(Exception, match="cannot use a fixed test_split"):
        _mil_config(tmp_path, test_split=str(splits_csv), nested=True)


def test_authors_abmil_head_and_class_balanced_loss(tmp_path):
    import torch
    import torch.nn.functional as F

    from clear_training.mil import Bags, _loss, class_balance_weights
    from CLEARLib.bundle import save_bundle
    from CLEARLib.models import ABMIL, create_encoder

    head = ABMIL(16, 3, hidden_dim=8, attention_dim=4, dropout=0.5, dropout_before_activation=True)
    assert [type(m).__name__ for m in head.head] == ["LayerNorm", "Linear", "Dropout", "SiLU", "Linear"]
    assert [type(m).__name__ for m in ABMIL(16, 3, dropout=0.5).head][2:4] == ["SiLU", "Dropout"]
    # The head's order travels in the bundle manifest and comes back on loading.
    encoder = create_encoder("mambaout_femto", depths=(1, 1, 1, 1), dims=(8, 16, 24, 32))
    head = ABMIL(encoder.num_features, 2, hidden_dim=8, attention_dim=4, dropout=0.5, dropout_before_activation=True)
    path = save_bundle(
        tmp_path / "b.zip",
        name="b",
        kind="case",
        encoder=encoder,
        head=head,
        labels=["a", "b"],
        task="multilabel",
        windows=["lung"],
    )
    loaded = load_bundle(path).head
    assert loaded.dropout_before_activation and [type(m).__name__ for m in loaded.head][2] == "Dropout"
    # Class balance from the training cases: BCE pos_weight = negatives / positives per label.
    y = np.array([[1, 0], [0, 0], [0, 1], [0, 0], [1, 0], [0, 0]], dtype=np.float32)
    bags = Bags.from_arrays(
        [torch.zeros(2, 4)] * 6, y, [f"p{i}" for i in range(6)], [f"c{i}" for i in range(6)], "multilabel", ["a", "b"]
    )
    weights = class_balance_weights(bags, np.arange(6), "cpu")
    torch.testing.assert_close(weights, torch.tensor([4 / 2, 5 / 1]))
    logits, target = torch.randn(6, 2), torch.from_numpy(y)
    by_hand = -(weights * target * F.logsigmoid(logits) + (1 - target) * F.logsigmoid(-logits)).mean()
    torch.testing.assert_close(_loss(logits, target, "multilabel", weights), by_hand)
    # Cross-entropy: scikit-learn's "balanced" class weights, n / (n_classes * count).
    classes = Bags.from_arrays(
        [torch.zeros(2, 4)] * 4, np.array([0, 0, 0, 1]), list("pqrs"), list("wxyz"), "multiclass", ["lo", "hi"]
    )
    torch.testing.assert_close(class_balance_weights(classes, np.arange(4), "cpu"), torch.tensor([4 / 6, 4 / 2]))


def test_a_stopped_run_leaves_nothing_new_and_keeps_the_previous_outputs(tmp_path):
    _synthetic_cohort(tmp_path, n_cases=40, seed=2)
    config = _mil_config(tmp_path, folds=3)
    out = tmp_path / "mil"
    out.mkdir()
    (out / "metrics.json").write_text('{"from": "the previous run"}')
    seen = []

    def stop_in_the_second_fold(fraction, message):
        seen.append(message)
        if message.startswith("fold1"):
            raise KeyboardInterrupt  # Ctrl-C

    with pytest.raises(KeyboardInterrupt):
        run_mil(config, progress=stop_in_the_second_fold)
    assert any(m.startswith("fold0: epoch") for m in seen)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".mil")]  # no staging folder left
    assert [p.name for p in out.iterdir()] == ["metrics.json"]
    assert json.loads((out / "metrics.json").read_text()) == {"from": "the previous run"}


def test_cohort_size_is_checked_before_anything_runs_or_is_written(tmp_path):
    _synthetic_cohort(tmp_path, n_cases=8)  # 4 patients, two cases each
    config = _mil_config(tmp_path, folds=5)  # test fraction 0.2: 5 patient groups for 4 patients
    with pytest.raises(ValueError, match=r"4 patients \(.*\) are too few .*data.nested: true and data.folds: 2"):
        run_mil(config)
    assert not (tmp_path / "mil").exists()  # no partial outputs
    nested_too_many = _mil_config(tmp_path, nested=True, folds=3)
    with pytest.raises(ValueError, match="nested cross-validation with 3 folds"):
        run_mil(nested_too_many)
    from clear_training.mil import Bags, check_cohort_size

    workable = _mil_config(tmp_path, nested=True, folds=2)
    check_cohort_size(Bags(workable.data), workable.data)  # what the message proposed is accepted


def test_a_full_disk_stops_extraction_cleanly_and_a_rerun_after_freeing_space_finishes(tmp_path, tiny_case_bundle):
    """A 52 KiB tmpfs holds three feature files: the fourth write fails with ENOSPC. The run stops with a
    message (not HDF5's destructor errors and a segfault at exit), keeps the finished files and the report,
    leaves no temporary file, and after the folder grows, the same command finishes the rest."""
    import subprocess
    import sys

    full = tmp_path / "full"
    full.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=52k", "tmpfs", str(full)], capture_output=True).returncode:
        pytest.skip("a size-limited folder needs mount (root)")
    try:
        rows = []
        for i in range(6):
            volume, _ = make_phantom((40, 64, 64), (3.0, 3.0, 5.0), seed=i)
            rows.append({"case_id": f"c{i}", "path": str(write_volume(volume, tmp_path / f"c{i}.nrrd"))})
        pd.DataFrame(rows).to_csv(tmp_path / "cohort.csv", index=False)
        cohort, out = str(tmp_path / "cohort.csv"), str(full / "features")
        command = [sys.executable, "-m", "clear_training.cli", "extract", "--model", str(tiny_case_bundle),
                   "--cohort", cohort, "--out", out, "--device", "cpu"]  # fmt: skip
        first = subprocess.run(command, capture_output=True, text=True)
        assert first.returncode == 1, first.stderr  # a run error, not a crash (139)
        assert "no space left on the device of" in first.stderr and "Traceback" not in first.stderr
        report = json.loads((full / "features" / "extract-report-rank0.json").read_text())
        written = sorted(p.name for p in (full / "features").glob("*.h5"))
        assert [f"{c}.h5" for c in report["done"]] == written and len(written) >= 2
        assert report["failed"][0]["error"] == "no space left" and len(report["not_started"]) >= 1
        assert not [p for p in (full / "features").iterdir() if p.name.startswith(".")]
        subprocess.run(["mount", "-o", "remount,size=1m", str(full)], check=True)
        second = subprocess.run(command, capture_output=True, text=True)
        assert second.returncode == 0, second.stderr
        report = json.loads((full / "features" / "extract-report-rank0.json").read_text())
        assert report["skipped"] == [c.removesuffix(".h5") for c in written] and len(report["done"]) == 6 - len(written)
    finally:
        subprocess.run(["umount", str(full)], capture_output=True)


@pytest.mark.parametrize("task", ["multilabel", "multiclass"])
def test_metrics_match_sklearn(task):
    """CLEAR's AUROC, AP and F1 (written out for the bootstrap's speed) against scikit-learn's on the same
    inputs: small and larger cohorts, tied scores, and a bootstrap's resampled cases."""
    from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

    from clear_training.metrics import bootstrap_ci, label_matrix, per_label_metrics

    rng = np.random.default_rng(0)
    labels = ["a", "b", "c"]
    compared = 0
    for n in (5, 12, 40, 300):
        for decimals in (1, 2, 8):  # rounding makes ties
            if task == "multiclass":
                y = rng.integers(0, 3, n)
                prob = rng.dirichlet(np.ones(3), n).round(decimals)
                predicted = np.eye(3, dtype=int)[prob.argmax(1)]
            else:
                y = rng.integers(0, 2, (n, 3))
                prob = rng.random((n, 3)).round(decimals)
                predicted = (prob >= 0.5).astype(int)
            truth = label_matrix(y, task, 3)
            ours = per_label_metrics(y, prob, task, labels)
            for j, label in enumerate(labels):
                t, p = truth[:, j], prob[:, j]
                assert ours[label]["f1"] == pytest.approx(f1_score(t, predicted[:, j], zero_division=0))
                if 0 < t.sum() < n:
                    assert ours[label]["auroc"] == pytest.approx(roc_auc_score(t, p), abs=1e-12)
                    assert ours[label]["auprc"] == pytest.approx(average_precision_score(t, p), abs=1e-12)
                    compared += 1
                else:
                    assert np.isnan(ours[label]["auroc"]) and np.isnan(ours[label]["auprc"])
    assert compared >= 30
    # The bootstrap's intervals are the percentiles of scikit-learn's metrics over the same draws.
    y = rng.integers(0, 2, (16, 3)) if task == "multilabel" else rng.integers(0, 3, 16)
    prob = rng.random((16, 3)).round(1)
    ci = bootstrap_ci(y, prob, task, labels, n_boot=50, seed=3)
    draws, truth = np.random.default_rng(3), label_matrix(y, task, 3)
    aurocs = []
    for _ in range(50):
        idx = draws.integers(0, 16, 16)
        t, p = truth[idx, 0], prob[idx, 0]
        aurocs.append(roc_auc_score(t, p) if 0 < t.sum() < 16 else np.nan)
    assert ci["a"]["auroc"] == pytest.approx([np.nanpercentile(aurocs, 2.5), np.nanpercentile(aurocs, 97.5)])
