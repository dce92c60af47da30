"""Classification metrics from probabilities (never from thresholded predictions), with bootstrap CIs."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score, balanced_accuracy_score, roc_auc_score


def _one_hot(y: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros((len(y), n), dtype=int)
    out[np.arange(len(y)), y.astype(int)] = 1
    return out


def label_matrix(y: np.ndarray, task: str, n_labels: int) -> np.ndarray:
    """Targets as a [cases, labels] 0/1 matrix (multiclass one-vs-rest)."""
    return _one_hot(y, n_labels) if task == "multiclass" else np.asarray(y, dtype=int).reshape(len(y), -1)


def per_label_metrics(y: np.ndarray, prob: np.ndarray, task: str, labels: list[str]) -> dict:
    """AUROC, AUPRC and F1 per label (NaN when a label has one class only)."""
    truth = label_matrix(y, task, len(labels))
    if task == "multiclass":
        predicted = _one_hot(prob.argmax(1), len(labels))
    else:
        predicted = (prob >= 0.5).astype(int)
    out = {}
    for j, label in enumerate(labels):
        t, p = truth[:, j], prob[:, j]
        both = 0 < t.sum() < len(t)
        out[label] = {
            "auroc": _auroc(t, p) if both else float("nan"),
            "auprc": _average_precision(t, p) if both else float("nan"),
            "f1": _f1(t, predicted[:, j]),
            "positives": int(t.sum()),
        }
    return out


# AUROC, AP and F1 written out rather than taken from scikit-learn: its input checks cost about 1.5 ms a call,
# and a bootstrap calls them n_boot x labels x 3 times (1,000 draws of 2 labels: 9 s, the demo's slowest step
# after training; these: 0.25 s). They equal scikit-learn's values, ties included (test_metrics_match_sklearn).
def _auroc(t: np.ndarray, p: np.ndarray) -> float:
    """Mann-Whitney U over n_pos x n_neg, tied scores counted half (average ranks)."""
    ranks = rankdata(p)
    n_pos = int(t.sum())
    return float((ranks[t == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (len(t) - n_pos)))


def _average_precision(t: np.ndarray, p: np.ndarray) -> float:
    """sum over distinct thresholds, highest first, of (recall gained) x precision there."""
    order = np.argsort(-p, kind="stable")
    scores, hits = p[order], t[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # the last case of each distinct score
    tps = np.cumsum(hits)[last]
    precision = tps / (last + 1)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _f1(t: np.ndarray, predicted: np.ndarray) -> float:
    tp = int(np.sum((t == 1) & (predicted == 1)))
    wrong = int(np.sum(t != predicted))
    return 2 * tp / (2 * tp + wrong) if tp + wrong else 0.0


def bootstrap_ci(y, prob, task, labels, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """Percentile bootstrap (resampling cases) of every per-label metric: {label: {metric: [lo, hi]}}."""
    rng = np.random.default_rng(seed)
    n = len(y)
    samples = {label: {"auroc": [], "auprc": [], "f1": []} for label in labels}
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        m = per_label_metrics(np.asarray(y)[idx], prob[idx], task, labels)
        for label in labels:
            for key in ("auroc", "auprc", "f1"):
                samples[label][key].append(m[label][key])
    return {
        label: {
            key: [float(np.nanpercentile(v, 100 * alpha / 2)), float(np.nanpercentile(v, 100 * (1 - alpha / 2)))]
            for key, v in metrics.items()
        }
        for label, metrics in samples.items()
    }


def probe_metrics(y: np.ndarray, prob: np.ndarray) -> dict:
    """Balanced accuracy, mAP and AUC (macro one-vs-rest) of class probabilities [n, K]."""
    y = np.asarray(y, dtype=int)
    k = prob.shape[1]
    truth = _one_hot(y, k)
    if k == 2:
        auc = roc_auc_score(y, prob[:, 1])
        ap = average_precision_score(y, prob[:, 1])
    else:
        auc = roc_auc_score(truth, prob, average="macro", multi_class="ovr")
        ap = average_precision_score(truth, prob, average="macro")
    return {"balanced_accuracy": float(balanced_accuracy_score(y, prob.argmax(1))), "map": float(ap), "auc": float(auc)}


def bootstrap_probe(y, prob, n_boot: int = 1000, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    y = np.asarray(y, dtype=int)
    draws = {"balanced_accuracy": [], "map": [], "auc": []}
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        if len(np.unique(y[idx])) < prob.shape[1]:
            continue
        for key, value in probe_metrics(y[idx], prob[idx]).items():
            draws[key].append(value)
    return {key: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for key, v in draws.items() if v}


def paired_permutation_test(y, prob_a, prob_b, n_perm: int = 2000, seed: int = 0) -> dict:
    """Two models scored on the same cases: is their AUC difference more than chance? Each case's two
    predictions are swapped at random; p = share of permutations with |difference| >= observed."""
    rng = np.random.default_rng(seed)
    observed = probe_metrics(y, prob_a)["auc"] - probe_metrics(y, prob_b)["auc"]
    count = 0
    for _ in range(n_perm):
        swap = rng.random(len(y)) < 0.5
        a = np.where(swap[:, None], prob_b, prob_a)
        b = np.where(swap[:, None], prob_a, prob_b)
        diff = probe_metrics(y, a)["auc"] - probe_metrics(y, b)["auc"]
        count += abs(diff) >= abs(observed) - 1e-12
    return {"auc_difference": float(observed), "p_value": float((count + 1) / (n_perm + 1)), "permutations": n_perm}
