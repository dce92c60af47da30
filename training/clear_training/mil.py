"""Weakly supervised ABMIL on extracted slice features: held-out test set, patient-level stratified
k-fold cross-validation (or nested CV), a fresh model per fold, metrics with bootstrap CIs, plots,
attention per case, and the fold ensemble exported as a case bundle.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.model_selection import StratifiedGroupKFold

from CLEARLib.errors import CLEARInputError
from CLEARLib.files import (
    check_output_folder,
    jsonable,
    remove_stale_temporaries,
    staged_outputs,
    write_atomic,
    write_csv,
    write_json,
)
from CLEARLib.inference.runtime import autocast, resolve_device
from CLEARLib.models import ABMIL, ABMILEnsemble, attention_columns, attention_of_labels, probabilities
from CLEARLib.outputs import attention_plot_png, figure_png
from CLEARLib.progress import report, scaled

from .config import MilConfig, MilData
from .extract import feature_file, read_features
from .metrics import bootstrap_ci, per_label_metrics

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ config
class Bags:
    """All cases' features in memory (float16), targets, and patient ids."""

    @classmethod
    def from_arrays(cls, features, y, patients, case_ids, task: str, labels: list[str], meta=None) -> Bags:
        """Bags held in memory already (e.g. for benchmarks); features: list of [N_i, D] float16 tensors."""
        bags = cls.__new__(cls)
        bags.task, bags.labels = task, list(labels)
        bags.features = list(features)
        bags.y = np.asarray(y)
        bags.patients, bags.case_ids = np.asarray(patients).astype(str), np.asarray(case_ids).astype(str)
        bags.meta = meta or [
            {"slice_index": np.arange(len(f)), "window": np.array(["lung"] * len(f)), "z_mm": np.arange(len(f)) * 1.0}
            for f in bags.features
        ]
        bags.encoder_sha256, bags.windows, bags.dim = None, ["lung"], int(bags.features[0].shape[1])
        return bags

    def __init__(self, config: MilData):
        table = pd.read_csv(config.table, dtype={config.case_column: str, config.patient_column: str})
        for column in [config.case_column, config.patient_column] + (
            [config.label_column] if config.task == "multiclass" else config.labels
        ):
            if column not in table:
                raise CLEARInputError(f"no column {column!r}", config.table)
        self.task, self.labels = config.task, list(config.labels)
        features, kept, meta = [], [], []
        encoder_sha = None
        for row in table.itertuples(index=False):
            case = str(getattr(row, config.case_column))
            path = feature_file(config.features, case)
            if not path.exists():
                log.warning("%s: no feature file, case left out", case)
                continue
            data = read_features(path, config.windows)
            if len(data["feats"]) == 0:
                log.warning("%s: no instances of windows %s, case left out", case, config.windows)
                continue
            sha = data["attrs"].get("encoder_weights_sha256")
            if encoder_sha is None:
                encoder_sha = sha
            elif sha != encoder_sha:
                raise CLEARInputError(f"features of another encoder ({sha}) than the others ({encoder_sha})", path)
            features.append(torch.from_numpy(data["feats"]))
            meta.append({k: data[k] for k in ("slice_index", "window", "z_mm")})
            kept.append(row)
        if not features:
            raise CLEARInputError(f"no feature files for the cases of {config.table}", config.features)
        frame = pd.DataFrame(kept, columns=table.columns)
        self.case_ids = frame[config.case_column].astype(str).to_numpy()
        self.patients = frame[config.patient_column].astype(str).to_numpy()
        if config.task == "multiclass":
            classes = {name: i for i, name in enumerate(config.labels)}
            unknown = sorted(set(frame[config.label_column].astype(str)) - set(classes))
            if unknown:
                raise CLEARInputError(f"classes {unknown} not in labels {config.labels}", config.table)
            self.y = frame[config.label_column].astype(str).map(classes).to_numpy()
        else:
            self.y = frame[config.labels].to_numpy(dtype=np.float32)
        self.features, self.meta = features, meta
        self.encoder_sha256 = encoder_sha
        self.windows = sorted(set(np.concatenate([m["window"] for m in meta])))
        self.dim = int(features[0].shape[1])

    def __len__(self) -> int:
        return len(self.features)

    def strata(self) -> np.ndarray:
        """One discrete label per case for stratified splits (multilabel: its rarest positive label)."""
        if self.task == "multiclass":
            return self.y.astype(int)
        frequency = self.y.mean(0)
        return np.array([int(np.argmin(np.where(r > 0, frequency, np.inf))) if r.any() else -1 for r in self.y])

    @cached_property
    def window_index(self) -> list[torch.Tensor]:
        """Each case's instances' windows as indices into `windows`, made once rather than at every batch."""
        position = {w: k for k, w in enumerate(self.windows)}
        return [torch.as_tensor([position[str(w)] for w in m["window"]], dtype=torch.long) for m in self.meta]

    def batch(self, index: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Padded features [B, N_max, D] float32, mask [B, N_max], targets, and each instance's window as an
        index into `windows` [B, N_max]."""
        lengths = [len(self.features[i]) for i in index]
        x = torch.zeros(len(index), max(lengths), self.dim)
        mask = torch.zeros(len(index), max(lengths), dtype=torch.bool)
        windows = torch.zeros(len(index), max(lengths), dtype=torch.long)
        for row, i in enumerate(index):
            x[row, : lengths[row]] = self.features[i].float()
            mask[row, : lengths[row]] = True
            windows[row, : lengths[row]] = self.window_index[i]
        y = torch.as_tensor(self.y[index])
        return x.to(device), mask.to(device), y.to(device), windows.to(device)


def read_test_patients(path: Path) -> set[str]:
    """The patients marked "test" in a split file (prepare-deeplesion's <store>-splits.csv)."""
    table = pd.read_csv(path, dtype={"patient_id": str})
    if not {"patient_id", "split"} <= set(table.columns):
        raise CLEARInputError("a split file needs the columns patient_id and split", path)
    patients = set(table.loc[table.split == "test", "patient_id"])
    if not patients:
        raise CLEARInputError("no patient is marked 'test'", path)
    return patients


def _check_test_not_pretrained(test_patients: set[str], store: Path) -> None:
    from .data.store import SliceStore

    seen = sorted(test_patients & set(SliceStore(store).index.patient_id))
    if seen:
        raise CLEARInputError(
            f"{len(seen)} test patients were in the pretraining store {store} (e.g. {', '.join(seen[:5])}): "
            "the encoder has seen them; use the store's split file as data.test_split"
        )


def _cv_fits(n_patients: int, folds: int) -> bool:
    """Folds need a patient each, in the whole set and in what is left when one fold is held out."""
    return n_patients >= folds and n_patients - int(np.ceil(n_patients / folds)) >= folds


def check_cohort_size(bags: Bags, data: MilData) -> None:
    """Refuse, before anything is drawn or written, folds and test fractions the cohort's patients cannot
    fill, saying what would work (scikit-learn would stop halfway with an error about n_splits)."""
    total = len(set(bags.patients))
    if data.nested:
        ok, what = _cv_fits(total, data.folds), f"nested cross-validation with {data.folds} folds"
    elif data.test_split is not None:
        rest = len(set(bags.patients) - read_test_patients(data.test_split))
        ok, what = rest >= data.folds, f"{data.folds} folds among the {rest} patients outside the fixed test set"
    elif data.test_fraction > 0:
        groups = max(2, round(1 / data.test_fraction))
        ok = total >= groups and total - int(np.ceil(total / groups)) >= data.folds
        what = f"a test fraction of {data.test_fraction} ({groups} patient groups) and then {data.folds} folds"
    else:
        ok, what = total >= data.folds, f"{data.folds} folds"
    if ok:
        return
    strata = pd.Series(bags.strata()).groupby(bags.patients).first().value_counts().sort_index()
    names = {-1: "no label", **dict(enumerate(bags.labels))}
    per_class = ", ".join(f"{names.get(int(k), k)}: {v}" for k, v in strata.items())
    workable = [k for k in range(min(total, 10), 1, -1) if _cv_fits(total, k)]
    advice = (
        f"with {total} patients use data.nested: true and data.folds: {workable[0]} (every patient is tested once)"
        if workable
        else f"{total} patients are too few to cross-validate"
    )
    raise CLEARInputError(f"{total} patients ({per_class}) are too few for {what}; {advice}", data.table)


def make_splits(bags: Bags, data: MilData, seed: int) -> pd.DataFrame:
    """Patient-level, label-stratified: a test set (unless nested), then `folds` validation folds.

    With `data.test_split` the test set is exactly that file's test patients (DeepLesion: the patients
    held out of pretraining, as the paper evaluates), and the folds are drawn from the other cases.
    With `data.repeats` > 1 the folds are drawn again for each further repeat r, around the same test set,
    into column `draw_column(r)` (`split` holds the first draw).
    """
    split = np.full(len(bags), "", dtype=object)
    draws = [split]
    strata, groups = bags.strata(), bags.patients
    if data.nested:
        folds = StratifiedGroupKFold(n_splits=data.folds, shuffle=True, random_state=seed)
        for k, (_, held) in enumerate(folds.split(np.zeros(len(bags)), strata, groups)):
            split[held] = f"outer{k}"
    else:
        if data.test_split is not None:
            test_patients = read_test_patients(data.test_split)
            is_test = np.isin(groups, sorted(test_patients))
            if not is_test.any():
                raise CLEARInputError(
                    f"none of the {len(test_patients)} test patients of {data.test_split} is in {data.table}; "
                    "patient IDs must be written the same way in both (e.g. 000123)"
                )
            split[is_test] = "test"
        elif data.test_fraction > 0:
            n_splits = max(2, round(1 / data.test_fraction))
            outer = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
            train_idx, test_idx = next(outer.split(np.zeros(len(bags)), strata, groups))
            split[test_idx] = "test"
        rest = np.flatnonzero(split != "test")
        draws = [split.copy() for _ in range(data.repeats)]
        for repeat, drawn in enumerate(draws):
            inner = StratifiedGroupKFold(n_splits=data.folds, shuffle=True, random_state=seed + 1 + repeat)
            for k, (_, val) in enumerate(inner.split(np.zeros(len(rest)), strata[rest], groups[rest])):
                drawn[rest[val]] = f"fold{k}"
        split = draws[0]
    if data.pretrain_store is not None:
        tested = (split == "test") | np.char.startswith(split.astype(str), "outer")
        _check_test_not_pretrained(set(groups[tested]), data.pretrain_store)
    frame = pd.DataFrame({"case_id": bags.case_ids, "patient_id": bags.patients})
    for repeat, drawn in enumerate(draws):
        frame[draw_column(repeat)] = drawn
    return frame


def draw_column(repeat: int) -> str:
    """The column of `make_splits`'s frame that holds draw `repeat` of the folds."""
    return "split" if repeat == 0 else f"split_{repeat}"


# ---------------------------------------------------------------------------------------- training
def _loss(logits, y, task, weights=None):
    """`weights`: None, or class-balance weights (multiclass: per class; BCE: pos_weight per label)."""
    if task == "multiclass":
        return F.cross_entropy(logits, y.long(), weight=weights)
    return F.binary_cross_entropy_with_logits(logits, y.float(), pos_weight=weights)


def class_balance_weights(bags: Bags, index: np.ndarray, device) -> torch.Tensor:
    """From the training cases: BCE pos_weight = negatives / positives per label; cross-entropy weight
    = n / (n_classes * count) per class (scikit-learn's "balanced"). A label or class absent from the
    training cases gets weight 1."""
    y = bags.y[index]
    if bags.task == "multiclass":
        counts = np.bincount(y.astype(int), minlength=len(bags.labels)).astype(np.float64)
        weights = np.where(counts > 0, len(y) / (len(bags.labels) * np.maximum(counts, 1)), 1.0)
    else:
        positives = y.sum(0).astype(np.float64)
        weights = np.where(positives > 0, (len(y) - positives) / np.maximum(positives, 1), 1.0)
    return torch.tensor(weights, dtype=torch.float32, device=device)


def _predict(model, bags: Bags, index, device, batch_size: int, weights=None):
    """Probabilities, attention per bag and mean loss (weighted as in training), in `index` order."""
    model.eval()
    index = np.asarray(index)
    order = np.argsort([len(bags.features[i]) for i in index], kind="stable")
    probs, attention, loss_sum = [None] * len(index), [None] * len(index), 0.0
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            where = order[start : start + batch_size]
            x, mask, y, windows = bags.batch(index[where], device)
            if isinstance(model, ABMILEnsemble):  # averaged probabilities: no logits, no loss
                p, att = model(x, mask, windows)
            else:
                logits, att = model(x, mask, windows)
                loss_sum += float(_loss(logits.float(), y, bags.task, weights)) * len(where)
                p = probabilities(logits.float(), bags.task)
            p = p.float().cpu().numpy()
            for row, position in enumerate(where):
                probs[position] = p[row]
                attention[position] = att[row, : int(mask[row].sum())].cpu().numpy()
    prob = np.stack(probs) if probs else np.zeros((0, len(bags.labels)))
    return prob, attention, loss_sum / max(len(index), 1)


def length_bucketed_batches(bags: Bags, index: np.ndarray, batch_size: int, rng) -> list[np.ndarray]:
    """Shuffled batches whose bags have similar lengths (sorted within chunks of 8 batches), so that
    padding, and the compute spent on it, stays small; the batch order is shuffled again."""
    order = rng.permutation(index)
    lengths = np.array([len(bags.features[i]) for i in order])
    batches = []
    chunk = 8 * batch_size
    for start in range(0, len(order), chunk):
        part = order[start : start + chunk][np.argsort(lengths[start : start + chunk], kind="stable")]
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def abmil_kwargs(config: MilConfig, bags: Bags) -> dict:
    """The ABMIL arguments of a config on these bags: `model.label_windows` becomes the windows each output reads
    (every window of the bags for a label it does not name)."""
    kwargs = config.model.model_dump(exclude={"label_windows"})
    chosen = config.model.label_windows
    if chosen is None:
        return kwargs
    unknown_labels = sorted(set(chosen) - set(bags.labels))
    unknown_windows = sorted({w for names in chosen.values() for w in names} - set(bags.windows))
    if unknown_labels or unknown_windows:
        raise CLEARInputError(
            f"model.label_windows names labels {unknown_labels} not among {bags.labels} or windows "
            f"{unknown_windows} not among the features' {bags.windows}",
            config.data.features,
        )
    label_windows = [chosen.get(label, bags.windows) for label in bags.labels]
    return {**kwargs, "windows": bags.windows, "label_windows": label_windows}


def train_fold(
    bags: Bags, train_idx, val_idx, config: MilConfig, seed: int, device, progress=None
) -> tuple[ABMIL, dict]:
    """A fresh ABMIL trained on train_idx with early stopping on val_idx's loss; the best state is kept."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    n_out = len(bags.labels)
    model = ABMIL(bags.dim, n_out, **abmil_kwargs(config, bags)).to(device)
    # With weight_decay 0 this is exactly Adam (the authors' optimiser).
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay)
    weights = class_balance_weights(bags, train_idx, device) if config.train.class_balanced else None
    best, best_state, since, history = float("inf"), None, 0, []
    for epoch in range(config.train.epochs):
        model.train()
        total = 0.0
        for part in length_bucketed_batches(bags, train_idx, config.train.batch_size, rng):
            x, mask, y, windows = bags.batch(part, device)
            with autocast(device, "auto", enabled=config.train.amp):
                logits, _ = model(x, mask, windows)
            loss = _loss(logits.float(), y, bags.task, weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(part)
        _, _, val_loss = _predict(model, bags, val_idx, device, config.train.batch_size, weights)
        history.append({"epoch": epoch, "train_loss": total / len(train_idx), "val_loss": val_loss})
        log.info("epoch %d: train loss %.4f, validation loss %.4f", epoch, history[-1]["train_loss"], val_loss)
        report(progress, (epoch + 1) / config.train.epochs, f"epoch {epoch + 1} validation loss {val_loss:.4f}")
        if val_loss < best - 1e-6:
            best, best_state, since = val_loss, copy.deepcopy(model.state_dict()), 0
        else:
            since += 1
            if since >= config.train.patience:
                report(progress, 1.0, f"stopped early after epoch {epoch + 1} (best validation loss {best:.4f})")
                break
    model.load_state_dict(best_state)
    return model.eval(), {"best_val_loss": best, "epochs_run": len(history), "history": history}


def _target_frame(bags: Bags, index) -> dict:
    if bags.task == "multiclass":
        return {"target": [bags.labels[int(v)] for v in bags.y[index]]}
    return {f"target_{label}": bags.y[index, j].astype(int) for j, label in enumerate(bags.labels)}


def _prediction_frame(bags: Bags, index, prob, source: str) -> pd.DataFrame:
    frame = pd.DataFrame({"case_id": bags.case_ids[index], "patient_id": bags.patients[index], "model": source})
    for key, value in _target_frame(bags, index).items():
        frame[key] = value
    for j, label in enumerate(bags.labels):
        frame[f"p_{label}"] = prob[:, j]
    return frame


def _plot_curves(y, prob, task, labels, out: Path) -> None:
    from matplotlib.figure import Figure
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

    from .metrics import label_matrix

    truth = label_matrix(y, task, len(labels))
    for kind in ("roc", "pr"):
        fig = Figure(figsize=(5, 5), dpi=100)
        ax = fig.add_subplot()
        for j, label in enumerate(labels):
            if len(np.unique(truth[:, j])) < 2:
                continue
            if kind == "roc":
                fpr, tpr, _ = roc_curve(truth[:, j], prob[:, j])
                ax.plot(fpr, tpr, label=f"{label} (AUC {roc_auc_score(truth[:, j], prob[:, j]):.3f})")
            else:
                precision, recall, _ = precision_recall_curve(truth[:, j], prob[:, j])
                average = average_precision_score(truth[:, j], prob[:, j])
                ax.plot(recall, precision, label=f"{label} (AP {average:.3f})")
        if kind == "roc":
            ax.plot([0, 1], [0, 1], color="0.7", linestyle=":")
        ax.set_xlabel("false positive rate" if kind == "roc" else "recall")
        ax.set_ylabel("true positive rate" if kind == "roc" else "precision")
        ax.set_title("ROC" if kind == "roc" else "precision-recall")
        ax.legend(fontsize=7)
        fig.tight_layout()
        write_atomic(out / f"{kind}.png", figure_png(fig))


def run_mil(config: MilConfig, bags: Bags | None = None, progress=None) -> dict:
    """The whole study: splits, folds, evaluation, outputs and export (bags: preloaded, optional).

    Outputs appear in run.out_dir only when the run succeeds (a failed run leaves nothing new there)."""
    started = time.perf_counter()
    device = resolve_device(config.run.device)
    bags = bags if bags is not None else Bags(config.data)
    check_cohort_size(bags, config.data)  # before anything is computed or written
    abmil_kwargs(config, bags)  # likewise: label_windows must name the bags' labels and windows
    check_output_folder(config.run.out_dir)
    remove_stale_temporaries(Path(config.run.out_dir).parent)
    encoder_bundle = _export_encoder(config, bags)
    with staged_outputs(config.run.out_dir) as stage:
        metrics = _run_mil(config, bags, device, stage, encoder_bundle, progress)
        metrics["seconds"] = time.perf_counter() - started
        write_json(stage / "metrics.json", jsonable(metrics))
    if encoder_bundle is not None:
        metrics["bundle"] = str(Path(config.run.out_dir) / _bundle_name(config))
    return metrics


def _export_encoder(config: MilConfig, bags: Bags):
    """The encoder bundle to export with, checked before training: it must be the features' encoder."""
    if not config.export.encoder_bundle:
        return None
    from CLEARLib.bundle import load_bundle

    bundle = load_bundle(config.export.encoder_bundle)
    if bundle.manifest.encoder.weights_sha256 != bags.encoder_sha256:
        raise CLEARInputError(
            "its encoder is not the one the features were extracted with", config.export.encoder_bundle
        )
    return bundle


def _bundle_name(config: MilConfig) -> str:
    return f"{config.export.name or config.run.name}.zip"


def _design(data: MilData) -> str:
    if data.nested:
        return f"nested cross-validation, {data.folds} outer folds"
    test = f"test fraction {data.test_fraction}" if data.test_split is None else f"fixed test split {data.test_split}"
    drawn = f" drawn {data.repeats} times" if data.repeats > 1 else ""
    return f"{test} then {data.folds} validation folds{drawn}, ensemble of the fold models"


def _protocol(bags: Bags, splits: pd.DataFrame, config: MilConfig) -> dict:
    """How the study was made: cases, patients and classes, the splits and the training settings."""
    strata = pd.Series(bags.strata()).groupby(bags.patients).first()
    names = {-1: "no label", **dict(enumerate(bags.labels))}
    data = config.data
    return {
        "n_cases": len(bags),
        "n_patients": len(strata),
        "patients_per_stratum": {names.get(int(k), str(k)): int(v) for k, v in strata.value_counts().items()},
        "split_sizes": {str(k): int(v) for k, v in splits.split.value_counts().sort_index().items()},
        "design": _design(data),
        "grouped_by": data.patient_column,
        "model": config.model.model_dump(),
        "train": config.train.model_dump(),
        "seed": config.run.seed,
    }


def _run_mil(config: MilConfig, bags: Bags, device, out: Path, encoder_bundle, progress) -> dict:
    splits = make_splits(bags, config.data, config.run.seed)
    write_csv(out / "splits.csv", splits)
    labels, task = bags.labels, bags.task
    fold_names = sorted({s for s in splits.split if s.startswith(("fold", "outer"))})
    # (repeat, k, fold): a repeat's fold models are named repeat<r>-fold<k> from the second repeat on
    runs = [(r, k, fold) for r in range(config.data.repeats) for k, fold in enumerate(fold_names)]
    members, fold_reports, predictions = [], [], []
    evaluation_index, evaluation_prob, evaluation_attention = [], [], []
    for i, (repeat, k, fold) in enumerate(runs):
        column = draw_column(repeat)
        name = fold if repeat == 0 else f"repeat{repeat}-{fold}"
        held = np.flatnonzero(splits[column] == fold)
        if config.data.nested:
            # Outer fold = test; one inner fold of the rest validates early stopping.
            rest = np.flatnonzero(splits.split != name)
            inner = StratifiedGroupKFold(n_splits=config.data.folds, shuffle=True, random_state=config.run.seed + k)
            tr, va = next(inner.split(np.zeros(len(rest)), bags.strata()[rest], bags.patients[rest]))
            train_idx, val_idx, test_idx = rest[tr], rest[va], held
        else:
            val_idx = held
            train_idx = np.flatnonzero((splits[column] != fold) & (splits[column] != "test"))
            test_idx = np.flatnonzero(splits[column] == "test")
        fold_progress = scaled(progress, i / len(runs), (i + 1) / len(runs), f"{name}: ")
        seed = config.run.seed + 100 * k + 1000 * repeat
        model, fold_report = train_fold(bags, train_idx, val_idx, config, seed, device, fold_progress)
        val_prob, _, _ = _predict(model, bags, val_idx, device, config.train.batch_size)
        fold_report["validation"] = per_label_metrics(_targets(bags, val_idx), val_prob, task, labels)
        predictions.append(_prediction_frame(bags, val_idx, val_prob, f"{name}-validation"))
        if len(test_idx):
            test_prob, test_att, _ = _predict(model, bags, test_idx, device, config.train.batch_size)
            fold_report["test"] = per_label_metrics(_targets(bags, test_idx), test_prob, task, labels)
            predictions.append(_prediction_frame(bags, test_idx, test_prob, f"{name}-test"))
            if config.data.nested:
                evaluation_index.append(test_idx)
                evaluation_prob.append(test_prob)
                evaluation_attention += test_att
        fold_reports.append({"fold": name, **fold_report})
        members.append(model.state_dict())
    ensemble = ABMILEnsemble(bags.dim, len(labels), len(members), task, **abmil_kwargs(config, bags)).to(device)
    for target, state in zip(ensemble.members, members, strict=True):
        target.load_state_dict(state)
    if not config.data.nested:
        test_idx = np.flatnonzero(splits.split == "test")
        if len(test_idx):
            prob, att, _ = _predict(ensemble, bags, test_idx, device, config.train.batch_size)
            evaluation_index, evaluation_prob, evaluation_attention = [test_idx], [prob], att
            predictions.append(_prediction_frame(bags, test_idx, prob, "ensemble-test"))
    metrics = {"task": task, "labels": labels, "n_cases": len(bags), "protocol": _protocol(bags, splits, config)}
    metrics["folds"] = fold_reports
    if evaluation_index:
        index, prob = np.concatenate(evaluation_index), np.concatenate(evaluation_prob)
        y = _targets(bags, index)
        key = "nested_cv" if config.data.nested else "ensemble_test"
        metrics[key] = per_label_metrics(y, prob, task, labels)
        if config.evaluation.bootstrap:
            metrics[f"{key}_ci95"] = bootstrap_ci(y, prob, task, labels, config.evaluation.bootstrap, config.run.seed)
        _plot_curves(y, prob, task, labels, out)
        _write_attention(bags, index, prob, evaluation_attention, config, out)
    metrics["across_folds"] = _across_folds(fold_reports, labels, "test")
    write_csv(out / "predictions.csv", pd.concat(predictions, ignore_index=True))
    report(progress, 1.0, f"{len(runs)} fold models trained")
    if encoder_bundle is not None:
        export_ensemble(ensemble.cpu(), bags, config, metrics, encoder_bundle, out / _bundle_name(config))
    return metrics


def _targets(bags: Bags, index) -> np.ndarray:
    return bags.y[index]


def _across_folds(reports, labels, key) -> dict:
    out = {}
    for label in labels:
        values = [r[key][label]["auroc"] for r in reports if key in r and not np.isnan(r[key][label]["auroc"])]
        if values:
            out[label] = {"auroc_mean": float(np.mean(values)), "auroc_sd": float(np.std(values)), "n": len(values)}
    return out


def _write_attention(bags: Bags, index, prob, attention, config: MilConfig, out: Path) -> None:
    frames = []
    for i, att in zip(index, attention, strict=True):
        meta = bags.meta[i]
        frames.append(
            pd.DataFrame(
                {
                    "case_id": bags.case_ids[i],
                    "slice_index": meta["slice_index"],
                    "window": meta["window"],
                    "z_mm": meta["z_mm"],
                    **attention_columns(att, bags.labels),
                }
            )
        )
    table = pd.concat(frames, ignore_index=True)
    write_csv(out / "attention.csv", table)
    plots = out / "attention_plots"
    for j, label in enumerate(bags.labels):
        for rank in np.argsort(-prob[:, j])[: config.evaluation.attention_plots]:
            case = bags.case_ids[index[rank]]
            rows = attention_of_labels(table[table.case_id == case], [label])  # the curve of this label's attention
            png = attention_plot_png(rows, title=f"{case}: p({label}) = {prob[rank, j]:.2f}")
            write_atomic(plots / f"{label}_{case}.png", png)


def export_ensemble(ensemble: ABMILEnsemble, bags: Bags, config: MilConfig, metrics: dict, encoder_bundle, path):
    """The fold ensemble on top of the encoder the features came from, as a case bundle."""
    from CLEARLib.bundle import save_bundle

    windows = [w for w in encoder_bundle.windows if w.name in bags.windows]
    summary = {k: metrics[k] for k in ("ensemble_test", "nested_cv", "across_folds") if k in metrics}
    return save_bundle(
        path,
        name=config.export.name or config.run.name,
        version=config.export.version,
        kind="case",
        encoder=encoder_bundle.encoder,
        head=ensemble,
        labels=bags.labels,
        task=bags.task,
        windows=windows,
        input_spec=encoder_bundle.input_spec,
        description=f"ABMIL ensemble of {len(ensemble.members)} fold models on {encoder_bundle.manifest.name}",
        metrics=jsonable(summary),
        provenance={"mil_config": json.loads(config.model_dump_json()), "n_cases": len(bags)},
    )
