"""Lesion features and linear probes (the FMCIB protocol): features at seed points, a logistic
regression with cross-validated regularisation, bootstrap CIs, a paired permutation test between two
feature sets, and export of the probe as the linear head of a lesion bundle.

Seed table CSV: `image_path, coordX, coordY, coordZ` (LPS mm) and optionally `label`, `case_id`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold, StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from CLEARLib.errors import CLEARInputError
from CLEARLib.files import hdf5_writer
from CLEARLib.progress import report

from .metrics import bootstrap_probe, paired_permutation_test, probe_metrics


def extract_lesion_features(
    bundle, seeds_csv: str | os.PathLike, out: str | os.PathLike, device="auto", progress=None
) -> dict:
    """4096-d features of every seed (one HDF5: feats, case_id, label), volumes read once each."""
    from CLEARLib.inference import LesionPredictor
    from CLEARLib.inference.lesion import seed_table_features
    from CLEARLib.io import read_seed_table

    seeds = read_seed_table(seeds_csv)
    predictor = LesionPredictor(bundle, device=device)
    table, feats, failed = seed_table_features(predictor, seeds, progress=progress)
    if not len(table):
        raise CLEARInputError(f"no seed could be scored ({failed[:3]})", seeds_csv)
    kept = list(table.index)
    table = table.reset_index(drop=True)
    with hdf5_writer(out) as f:
        f.create_dataset("feats", data=feats.astype(np.float32))
        f.create_dataset("row", data=np.asarray(kept, dtype=np.int64))
        if "label" in table:
            f.create_dataset("label", data=table.label.astype(str).to_numpy().astype("S"))
        if "case_id" in table:
            f.create_dataset("case_id", data=table.case_id.astype(str).to_numpy().astype("S"))
        f.create_dataset("image_path", data=table.image_path.astype(str).to_numpy().astype("S"))
        f.attrs["encoder_weights_sha256"] = predictor.bundle.manifest.encoder.weights_sha256
        f.attrs["bundle"] = predictor.bundle.manifest.name
    return {"features": str(out), "seeds": len(kept), "failed": failed}


@dataclass
class ProbeData:
    """Features of one extract-lesions file: x [n, D], labels y [n], and the patient of each seed (groups),
    so that cross-validation never puts one patient's lesions on both sides."""

    x: np.ndarray
    y: np.ndarray
    groups: np.ndarray | None
    grouped_by: str | None
    attrs: dict


def load_probe_data(path: str | os.PathLike) -> ProbeData:
    with h5py.File(path, "r") as f:
        if "label" not in f:
            raise CLEARInputError("no labels; the seed table needs a label column for probing", path)
        grouped_by = next((key for key in ("case_id", "image_path") if key in f), None)
        groups = f[grouped_by][:].astype(str) if grouped_by else None
        return ProbeData(f["feats"][:], f["label"][:].astype(str), groups, grouped_by, dict(f.attrs))


# LogisticRegressionCV's default grid, searched with GridSearchCV: same protocol, a stable API and grouped folds.
C_GRID = np.logspace(-4, 4, 10)


def _folds(y: np.ndarray, groups: np.ndarray | None, folds: int, seed: int, what: str):
    """Stratified folds, grouped by patient when groups are known; too few per class is bad input."""
    classes = np.unique(y)
    if len(classes) < 2:
        raise CLEARInputError(f"a probe needs two classes; all {len(y)} seeds are {classes[0]!r}")
    smallest = _smallest_class(y, groups)
    if smallest < folds:
        unit = "patients" if groups is not None else "cases"
        per_class = ", ".join(f"{c}: {_smallest_class(y[y == c], None if groups is None else groups[y == c])}"
                              for c in classes)  # fmt: skip
        advice = f"use --folds {smallest}" if smallest >= 2 else "add cases of the smaller class"
        raise CLEARInputError(f"{what} with {folds} folds needs {folds} {unit} per class ({per_class}); {advice}")
    if groups is None:
        return StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)


def fit_probe(x: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0, trials: int = 0, groups=None):
    """Standardise + logistic regression. Regularisation by inner cross-validation: a grid of C, or with
    `trials` > 0 an optuna search over C and class weighting (the FMCIB protocol's parameter search). The
    penalty stays L2: FMCIB saw no gain from feature selection, and L1/elastic-net need the saga solver,
    far slower on 4,096 features. The inner folds use at most the patients each class has in `x`."""
    inner_n = min(folds, _smallest_class(y, groups))
    inner = _folds(y, groups, inner_n, seed, "the inner parameter search")
    splits = list(inner.split(x, y, groups))
    if trials <= 0:
        search = GridSearchCV(
            make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)),
            {"logisticregression__C": C_GRID},
            cv=splits,
            scoring="neg_log_loss",
        )
        return search.fit(x, y).best_estimator_
    best = _optuna_search(x, y, splits, seed, trials)
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, **best)).fit(x, y)


def _smallest_class(y, groups) -> int:
    if groups is None:
        return int(np.unique(y, return_counts=True)[1].min())
    return min(len(np.unique(groups[y == label])) for label in np.unique(y))


def _optuna_search(x, y, splits, seed: int, trials: int) -> dict:
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
        return float(cross_val_score(model, x, y, cv=splits, scoring="neg_log_loss").mean())

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(objective, n_trials=trials)
    return study.best_params


def evaluate_probe(
    x, y, folds: int = 5, seed: int = 0, n_boot: int = 1000, trials: int = 0, groups=None, progress=None
) -> dict:
    """Out-of-fold probabilities (outer CV around the inner parameter search), metrics, bootstrap CIs, and
    how they were made: n, class counts, folds, grouping, the search and the parameters each fold chose."""
    classes, counts = np.unique(y, return_counts=True)
    y_index = np.searchsorted(classes, y)
    outer = _folds(y, groups, folds, seed, "the probe's cross-validation")
    prob = np.zeros((len(y), len(classes)))
    chosen = []
    for k, (train, test) in enumerate(outer.split(x, y_index, groups)):
        model = fit_probe(x[train], y[train], folds, seed, trials, None if groups is None else groups[train])
        prob[test] = model.predict_proba(x[test])
        params = model[-1].get_params()
        chosen.append({"fold": k, "C": float(params["C"]), "class_weight": params["class_weight"]})
        report(progress, (k + 1) / folds, f"fold {k + 1}/{folds}")
    return {
        "classes": classes.tolist(),
        "metrics": probe_metrics(y_index, prob),
        "ci95": bootstrap_probe(y_index, prob, n_boot, seed),
        "protocol": {
            "n": int(len(y)),
            "class_counts": {str(c): int(n) for c, n in zip(classes, counts, strict=True)},
            "patients": None if groups is None else int(len(np.unique(groups))),
            "folds": folds,
            "grouped_by_patient": groups is not None,
            "search": f"optuna, {trials} trials over C and class weighting"
            if trials > 0
            else f"grid of {len(C_GRID)} C values ({C_GRID[0]:g}..{C_GRID[-1]:g}) by inner cross-validation",
            "chosen": chosen,
            "bootstrap": n_boot,
            "seed": seed,
        },
        "probabilities": prob,
        "y": y_index,
    }


def compare_probes(
    x_a, x_b, y, folds: int = 5, seed: int = 0, n_perm: int = 2000, trials: int = 0, groups=None
) -> dict:
    """Paired permutation test of two feature sets' out-of-fold AUCs on the same cases (same folds)."""
    a = evaluate_probe(x_a, y, folds, seed, n_boot=0, trials=trials, groups=groups)
    b = evaluate_probe(x_b, y, folds, seed, n_boot=0, trials=trials, groups=groups)
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
            "C": [float(logistic.C)],
            "class_weight": logistic.class_weight,
        },
    )
