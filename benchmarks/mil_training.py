"""Wall time and peak memory of a full ABMIL study (held-out test + 5-fold cross-validation, paper
defaults: lr 1e-4, batches of 128 bags, up to 32 epochs, early stopping after 8) on a DeepLesion-sized
synthetic feature set: 4,000 cases of up to 1,400 instances of 576 dimensions. Prints JSON.

Usage: python benchmarks/mil_training.py [--cases 4000] [--max-instances 1400] [--dim 576] [--epochs 32]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time

import numpy as np
import torch
from _memory import reset_peak_rss, rss_mb

from clear_training.config import MilConfig
from clear_training.mil import Bags, run_mil


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", type=int, default=4000)
    parser.add_argument("--max-instances", type=int, default=1400)
    parser.add_argument("--dim", type=int, default=576)
    parser.add_argument("--epochs", type=int, default=32)
    parser.add_argument("--labels", type=int, default=8)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # progress on stderr
    rng = np.random.default_rng(0)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    lengths = rng.integers(args.max_instances // 10, args.max_instances + 1, size=args.cases)
    y = (rng.random((args.cases, args.labels)) < 0.2).astype(np.float32)
    directions = torch.randn(args.labels, args.dim, generator=generator)
    features = []
    for i, n in enumerate(lengths):
        x = torch.randn(int(n), args.dim, generator=generator)
        for j in np.flatnonzero(y[i]):  # a few lesion instances per positive label
            x[torch.randint(int(n), (3,), generator=generator)] += directions[j]
        features.append(x.to(torch.float16))
    build_s = time.perf_counter() - start
    bags = Bags.from_arrays(
        features,
        y,
        [f"p{i // 3}" for i in range(args.cases)],
        [f"c{i}" for i in range(args.cases)],
        "multilabel",
        [f"label{j}" for j in range(args.labels)],
    )
    with tempfile.TemporaryDirectory() as tmp:
        config = MilConfig.model_validate(
            {
                "run": {"name": "bench", "out_dir": tmp, "device": "cpu"},
                "data": {"features": tmp, "table": tmp, "task": "multilabel", "labels": bags.labels},
                "train": {"epochs": args.epochs},
                "evaluation": {"bootstrap": 200, "attention_plots": 0},
            }
        )
        before = rss_mb("VmRSS")
        reset_peak_rss()  # measure the study alone
        start = time.perf_counter()
        metrics = run_mil(config, bags=bags)
        wall = time.perf_counter() - start
        peak = rss_mb("VmHWM")
    print(
        json.dumps(
            {
                "cases": args.cases,
                "instances_total": int(lengths.sum()),
                "instances_per_case_max": int(lengths.max()),
                "dim": args.dim,
                "feature_memory_mb_float16": round(int(lengths.sum()) * args.dim * 2 / 2**20, 1),
                "folds": 5,
                "epochs_run_per_fold": [f["epochs_run"] for f in metrics["folds"]],
                "wall_s_cross_validation": round(wall, 1),
                "seconds_building_synthetic_features": round(build_s, 1),
                "rss_before_mb": round(before, 1),
                "peak_rss_mb": round(peak, 1),
                "peak_above_features_mb": round(peak - before, 1),
                "torch_threads": torch.get_num_threads(),
                "mean_test_auroc": float(np.nanmean([v["auroc"] for v in metrics["ensemble_test"].values()])),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
