"""Seconds of a bootstrap of per-label metrics (AUROC, AP, F1 at 0.5): CLEAR's `bootstrap_ci` against the same
draws scored with scikit-learn's functions, and the largest difference between the two. Prints JSON.

Usage: python benchmarks/bootstrap_metrics.py [--cases 16] [--labels 2] [--draws 1000]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from clear_training.metrics import bootstrap_ci


def sklearn_bootstrap(y, prob, n_boot: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    draws = {j: {"auroc": [], "auprc": [], "f1": []} for j in range(y.shape[1])}
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        for j in range(y.shape[1]):
            t, p = y[idx, j], prob[idx, j]
            both = 0 < t.sum() < len(t)
            draws[j]["auroc"].append(roc_auc_score(t, p) if both else np.nan)
            draws[j]["auprc"].append(average_precision_score(t, p) if both else np.nan)
            draws[j]["f1"].append(f1_score(t, (p >= 0.5).astype(int), zero_division=0))
    return {
        j: {k: [np.nanpercentile(v, 2.5), np.nanpercentile(v, 97.5)] for k, v in d.items()} for j, d in draws.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", type=int, default=16)
    parser.add_argument("--labels", type=int, default=2)
    parser.add_argument("--draws", type=int, default=1000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (args.cases, args.labels))
    prob = np.clip(0.3 * y + rng.random(y.shape) * 0.7, 0, 1).round(2)
    labels = [f"label{j}" for j in range(args.labels)]
    start = time.perf_counter()
    ours = bootstrap_ci(y, prob, "multilabel", labels, args.draws, seed=0)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    reference = sklearn_bootstrap(y, prob, args.draws, seed=0)
    sklearn_s = time.perf_counter() - start
    difference = max(
        abs(a - b)
        for j, label in enumerate(labels)
        for key in ("auroc", "auprc", "f1")
        for a, b in zip(ours[label][key], reference[j][key], strict=True)
    )
    print(
        json.dumps(
            {
                "cases": args.cases,
                "labels": args.labels,
                "draws": args.draws,
                "clear_s": round(ours_s, 3),
                "sklearn_s": round(sklearn_s, 3),
                "speedup": round(sklearn_s / ours_s, 1),
                "max_ci_difference": float(difference),
            }
        )
    )


if __name__ == "__main__":
    main()
