"""Case inference cost on this machine: encoder throughput, whole-case stages, peak memory, and the
ratio to a one-slice-at-a-time loop. Prints JSON.

Usage: python benchmarks/encode_case.py [--slices 300] [--encoder mambaout_tiny] [--throughput-instances 32]
Random weights: speed and memory do not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _memory import reset_peak_rss, rss_mb

from CLEARLib.bundle import save_bundle
from CLEARLib.inference import CasePredictor
from CLEARLib.io import read_ct, write_volume
from CLEARLib.models import ABMIL, create_encoder
from CLEARLib.phantom import make_phantom
from CLEARLib.preprocess import InputSpec, resolve_windows

ENCODERS = ("mambaout_tiny", "vit_conv_base", "vmamba_tiny")


def throughput(name: str, n: int, batch: int) -> dict:
    model = create_encoder(name).eval()
    x = torch.randn(batch, 3, 224, 224)
    with torch.inference_mode():
        model(x[:2])  # warm-up
        start = time.perf_counter()
        done = 0
        while done < n:
            model(x)
            done += batch
        seconds = time.perf_counter() - start
    return {
        "instances_per_s": round(done / seconds, 2),
        "batch": batch,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
    }


def one_slice_at_a_time(volume, bundle_dir, windows) -> float:
    """The public code's way: each slice, each window, windowed, resized and encoded alone."""
    predictor = CasePredictor(bundle_dir, device="cpu", batch_size=1)
    encoder, spec = predictor.bundle.encoder, predictor.bundle.input_spec
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    start = time.perf_counter()
    embeddings = []
    with torch.inference_mode():
        for k in range(volume.shape[0]):
            for w in windows:
                s = torch.from_numpy(volume.hu[k].astype(np.float32))
                s = ((s.clamp(w.low, w.high) - w.low) / (w.high - w.low))[None, None]
                s = torch.nn.functional.interpolate(s, size=(spec.size, spec.size), mode="bilinear", antialias=True)
                embeddings.append(encoder((s.expand(-1, 3, -1, -1) - mean) / std))
        feats = torch.cat(embeddings)
        predictor.bundle.head(feats)
    return time.perf_counter() - start


def measure_case(bundle_dir: str, ct_path: str, batch_size: int, queue) -> None:
    """Runs in a fresh process, so that its peak memory is the case's alone (plus the imports)."""
    baseline = rss_mb("VmRSS")
    reset_peak_rss()
    predictor = CasePredictor(bundle_dir, device="cpu", batch_size=batch_size)
    start = time.perf_counter()
    result = predictor.predict(ct_path)
    wall = time.perf_counter() - start
    queue.put(
        {
            "wall_s": wall,
            "timings": result.timings,
            "instances": len(result.attention),
            "rss_after_imports_mb": baseline,
            "peak_rss_mb": rss_mb("VmHWM"),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--encoder", default="mambaout_tiny")
    parser.add_argument("--throughput-instances", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--skip-loop", action="store_true", help="skip the one-slice-at-a-time comparison")
    args = parser.parse_args()
    torch.manual_seed(0)
    report = {"torch_threads": torch.get_num_threads(), "encoders": {}}
    for name in ENCODERS:
        batch = 8 if name == "vmamba_tiny" else 16
        n = min(args.throughput_instances, batch) if name == "vmamba_tiny" else args.throughput_instances
        report["encoders"][name] = throughput(name, n, batch)

    with tempfile.TemporaryDirectory() as tmp:
        encoder = create_encoder(args.encoder)
        windows = resolve_windows(["abdomen", "lung"])
        bundle_dir = save_bundle(
            Path(tmp) / "bundle",
            name="bench",
            kind="case",
            encoder=encoder,
            head=ABMIL(encoder.num_features, 8),
            labels=[f"c{i}" for i in range(8)],
            task="multilabel",
            windows=windows,
            input_spec=InputSpec(size=224),
        )
        model_mb = sum(t.numel() * t.element_size() for t in encoder.state_dict().values()) / 2**20
        del encoder
        volume, _ = make_phantom(shape_zyx=(args.slices, 512, 512), spacing_xyz=(0.7, 0.7, 1.5), seed=0)
        ct_path = write_volume(volume, Path(tmp) / "ct.nrrd")
        del volume
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        child = context.Process(target=measure_case, args=(str(bundle_dir), str(ct_path), args.batch_size, queue))
        child.start()
        measured = queue.get()
        child.join()
        wall, t = measured["wall_s"], measured["timings"]
        volume = read_ct(ct_path)
        volume_mb = volume.hu.nbytes / 2**20
        report["case"] = {
            "encoder": args.encoder,
            "slices": args.slices,
            "instances": measured["instances"],
            "batch_size": args.batch_size,
            "wall_s": round(wall, 2),
            "stages_s": {k: round(v, 3) for k, v in t.items()},
            "preprocess_plus_mil_fraction_of_encode": round((t["preprocess"] + t["mil"]) / t["encode"], 4),
            "int16_volume_mb": round(volume_mb, 1),
            "model_mb": round(model_mb, 1),
            "rss_after_imports_mb": round(measured["rss_after_imports_mb"], 1),
            "peak_rss_mb": round(measured["peak_rss_mb"], 1),
            "peak_above_imports_mb": round(measured["peak_rss_mb"] - measured["rss_after_imports_mb"], 1),
            "budget_3x_volume_plus_model_mb": round(3 * volume_mb + model_mb, 1),
        }
        if not args.skip_loop:
            loop_s = one_slice_at_a_time(volume, bundle_dir, windows)
            report["case"]["one_slice_at_a_time_s"] = round(loop_s, 2)
            report["case"]["speedup_vs_one_slice_at_a_time"] = round(loop_s / (wall - t.get("read", 0)), 2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
