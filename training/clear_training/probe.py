"""Lesion features and linear probes (the FMCIB protocol): features at seed points, a logistic
regression with cross-validated regularisation, bootstrap CIs, a paired permutation test between two
feature sets, and export of the probe as the linear head of a lesion bundle.

Seed table CSV: `image_path, coordX, coordY, coordZ` (LPS mm) and optionally `label`, `case_id`.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import torch
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from .metrics import bootstrap_probe, paired_permutation_test, probe_metrics


def extract_lesion_features(bundle, seeds_csv: str | os.PathLike, out: str | os.PathLike, device="auto") -> dict:
    """4096-d features of every seed (one HDF5: feats, case_id, label), volumes read once each."""
    from CLEARLib.inference import LesionPredictor
    from CLEARLib.io import read_ct, read_seed_table

    seeds = read_seed_table(seeds_csv)
    predictor = LesionPredictor(bundle, device=device)
    feats, kept, failed = [], [], []
    for path, rows in seeds.groupby("image_path", sort=False):
        try:
            volume = read_ct(path)
        except Exception as exc:  # report and carry on
            failed += [{"row": int(i), "error": str(exc)} for i in rows.index]
            continue
        for i, row in rows.iterrows():
            try:
                result = predictor.predict(volume, (row.coordX, row.coordY, row.coordZ), coord="LPS")
            except Exception as exc:
                failed.append({"row": int(i), "error": str(exc)})
                continue
            feats.append(result.features)
            kept.append(i)
    if not feats:
        raise ValueError(f"{seeds_csv}: no seed could be scored ({failed[:3]})")
    table = seeds.loc[kept].reset_index(drop=True)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("feats", data=np.stack(feats).astype(np.float32))
        f.create_dataset("row", data=np.asarray(kept, dtype=np.int64))
        if "label" in table:
            f.create_dataset("label", data=table.label.astype(str).to_numpy().astype("S"))
        if "case_id" in table:
            f.create_dataset("case_id", data=table.case_id.astype(str).to_numpy().astype("S"))
        f.attrs["encoder_weights_sha256"] = predictor.bundle.manifest.encoder.weights_sha256
        f.attrs["bundle"] = predictor.bundle.manifest.name
    os.replace(tmp, out)
    return {"features": str(out), "seeds": len(kept), "failed": failed}


def load_probe_data(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict]:
    with h5py.File(path, "r") as f:
        if "label" not in f:
            raise ValueError(f"{path}: no labels; the seed table needs a label column for probing")
        return f["feats"][:], f["label"][:].astype(str), dict(f.attrs)


def _inner_folds(y: np.ndarray, folds: int, seed: int) -> StratifiedKFold:
    smallest_class = int(np.unique(y, return_counts=True)[1].min())
    return StratifiedKFold(n_splits=min(folds, smallest_class), shuffle=True, random_state=seed)


def fit_probe(x: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0, trials: int = 0):
    """Standardise + logistic regression. Regularisation by inner cross-validation: a grid of C
    (LogisticRegressionCV), or with `trials` > 0 an optuna search over C and class weighting (the
    FMCIB protocol's parameter search). The penalty stays L2: FMCIB saw no gain from feature
    selection, and L1/elastic-net need the saga solver, far slower on 4,096 features."""
    inner = _inner_folds(y, folds, seed)
    if trials <= 0:
        logistic = LogisticRegressionCV(Cs=10, cv=inner, max_iter=5000, scoring="neg_log_loss", random_state=seed)
        return make_pipeline(StandardScaler(), logistic).fit(x, y)
    best = _optuna_search(x, y, inner, seed, trials)
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, **best)).fit(x, y)


def _optuna_search(x, y, inner, seed: int, trials: int) -> dict:
    try:
        import optuna
    except ImportError as exc:
        raise ImportError("the probe's parameter search needs optuna: pip install 'clear-ct[probe]'") from exc

    def objective(trial) -> float:
        params = {
            "C": trial.suggest_float("C", 1e-5, 1e2, log=True),
            "class_weight": trial.suggest_categorical("class_weight", [None, "balanced"]),
        }
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, **params))
        return float(cross_val_score(model, x, y, cv=inner, scoring="neg_log_loss").mean())

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(objective, n_trials=trials)
    return study.best_params


def evaluate_probe(x, y, folds: int = 5, seed: int = 0, n_boot: int = 1000, trials: int = 0) -> dict:
    """Out-of-fold probabilities (outer CV around the inner parameter search), metrics and bootstrap CIs."""
    classes = np.unique(y)
    y_index = np.searchsorted(classes, y)
    outer = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    prob = np.zeros((len(y), len(classes)))
    for train, test in outer.split(x, y_index):
        model = fit_probe(x[train], y[train], folds, seed, trials)
        prob[test] = model.predict_proba(x[test])
    return {
        "classes": classes.tolist(),
        "metrics": probe_metrics(y_index, prob),
        "ci95": bootstrap_probe(y_index, prob, n_boot, seed),
        "probabilities": prob,
        "y": y_index,
    }


def compare_probes(x_a, x_b, y, folds: int = 5, seed: int = 0, n_perm: int = 2000, trials: int = 0) -> dict:
    """Paired permutation test of two feature sets' out-of-fold AUCs on the same cases."""
    a = evaluate_probe(x_a, y, folds, seed, n_boot=0, trials=trials)
    b = evaluate_probe(x_b, y, folds, seed, n_boot=0, trials=trials)
    return {
        "a": a["metrics"],
        "b": b["metrics"],
        **paired_permutation_test(a["y"], a["probabilities"], b["probabilities"], n_perm, seed),
    }


def export_probe(model, classes, lesion_bundle, out, name: str) -> Path:
    """The fitted probe as the linear head of a lesion bundle (scaler folded into the weights)."""
    from CLEARLib.bundle import load_bundle, save_bundle
    from CLEARLib.models import LinearHead

    scaler, logistic = model[0], model[-1]
    weight = logistic.coef_ / scaler.scale_[None, :]
    bias = logistic.intercept_ - (logistic.coef_ * (scaler.mean_ / scaler.scale_)[None, :]).sum(1)
    bundle = load_bundle(lesion_bundle)
    head = LinearHead(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.fc.weight.copy_(torch.from_numpy(weight).float())
        head.fc.bias.copy_(torch.from_numpy(bias).float())
    binary = len(classes) == 2
    return save_bundle(
        out,
        name=name,
        kind="lesion",
        encoder=bundle.encoder,
        head=head,
        labels=[str(classes[1])] if binary else [str(c) for c in classes],
        task="binary" if binary else "multiclass",
        description=f"linear probe on {bundle.manifest.name} features",
        provenance={
            "probe": "logistic regression on standardised features, regularisation by inner cross-validation",
            "C": np.atleast_1d(logistic.C_ if hasattr(logistic, "C_") else logistic.C).tolist(),
            "class_weight": logistic.class_weight,
        },
    )
