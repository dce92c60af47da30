"""Leaks and scene growth of the batch API over a synthetic cohort, in a real slicer-core MRML scene. Prints JSON.

Usage: python benchmarks/batch_cohort.py [--cases 100] [--calls 5] [--encoder mambaout_femto] [--size 64]

The cohort (NIfTI files of small phantoms, every fifth one a volume node) runs as `--calls` run_batch calls
through one loaded CasePredictor, as an analyst reusing it from the console would. Reported: seconds per
case, RSS growth per case after the first call (the first one loads ONNX Runtime and warms caches) and MRML
nodes added per case (two tables per call with tables="keep", none with "replace").
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import slicer
import torch
from _memory import rss_mb

from CLEARLib import mrml
from CLEARLib.batch import run_batch
from CLEARLib.bundle import save_bundle
from CLEARLib.inference import CasePredictor
from CLEARLib.io import write_volume
from CLEARLib.models import ABMIL, create_encoder
from CLEARLib.phantom import make_phantom
from CLEARLib.preprocess import InputSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=100)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--encoder", default="mambaout_femto")
    parser.add_argument("--size", type=int, default=64, help="encoder input size (px)")
    parser.add_argument("--tables", default="replace", choices=["replace", "keep"])
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="clear-batch-bench-"))
    torch.manual_seed(0)
    encoder = create_encoder(args.encoder)
    bundle = save_bundle(
        folder / "case.zip", name="batch benchmark", kind="case", encoder=encoder,
        head=ABMIL(encoder.num_features, 3), labels=["a", "b", "c"], task="multilabel",
        windows=["abdomen", "lung"], input_spec=InputSpec(size=args.size),
    )  # fmt: skip
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    inputs = []
    for i in range(args.cases):
        volume, _ = make_phantom((24, 96, 96), (3.0, 3.0, 5.0), seed=i)
        if i % 5 == 4:
            inputs.append(mrml.node_from_volume(volume, scene, name=f"node{i:03d}"))
        else:
            inputs.append(write_volume(volume, folder / f"P{i:03d}" / "ct.nii.gz"))
    predictor = CasePredictor(bundle, device="cpu")
    per_call = max(1, args.cases // args.calls)
    calls = []
    for start in range(0, args.cases, per_call):
        nodes_before, rss_before = scene.GetNumberOfNodes(), rss_mb("VmRSS")
        started = time.perf_counter()
        result = run_batch(inputs[start : start + per_call], predictor, scene=scene, progress=None, tables=args.tables)
        calls.append(
            {
                "cases": len(result.predictions),
                "ok": int((result.predictions.status == "ok").sum()),
                "seconds": time.perf_counter() - started,
                "rss_growth_mb": rss_mb("VmRSS") - rss_before,
                "nodes_added": scene.GetNumberOfNodes() - nodes_before,
            }
        )
    later = calls[1:] or calls
    later_cases = sum(c["cases"] for c in later)
    print(
        json.dumps(
            {
                "cases": args.cases,
                "calls": len(calls),
                "encoder": args.encoder,
                "input_size": args.size,
                "tables": args.tables,
                "seconds_per_case": round(sum(c["seconds"] for c in calls) / args.cases, 4),
                "rss_growth_mb_per_case_after_first_call": round(
                    sum(c["rss_growth_mb"] for c in later) / later_cases, 4
                ),
                "nodes_added_per_case": round(sum(c["nodes_added"] for c in calls) / args.cases, 4),
                "all_ok": all(c["ok"] == c["cases"] for c in calls),
                "per_call": [{k: round(v, 3) if isinstance(v, float) else v for k, v in c.items()} for c in calls],
                "rss_mb_end": round(rss_mb("VmRSS"), 1),
                "numpy": np.__version__,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
