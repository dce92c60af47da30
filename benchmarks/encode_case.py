"""Case inference cost on this machine, per slice-encoder backend: encoder throughput and agreement with
torch fp32, whole-case wall time and stages, peak memory, and a one-slice-at-a-time loop. Prints JSON.

Usage: python benchmarks/encode_case.py [--slices 300] [--encoder mambaout_tiny] [--all] [--skip-loop]
Random weights: speed and memory do not depend on the weights. Backends: torch_fp32 (eager torch),
onnxruntime_fp32 (CLEARLib.inference.backends), torch_bf16 (CPU autocast; only where the CPU has
native bf16, else null with the reason in "notes"). `--all` measures every slice encoder's throughput.
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
from CLEARLib.errors import CLEARInputError
from CLEARLib.inference import CasePredictor
from CLEARLib.inference.backends import max_rel_diff
from CLEARLib.inference.runtime import cpu_has_native_bf16
from CLEARLib.io import read_ct, write_volume
from CLEARLib.models import ABMIL, create_encoder
from CLEARLib.phantom import make_phantom
from CLEARLib.preprocess import InputSpec, resolve_windows

ENCODERS = ("mambaout_tiny", "vit_conv_base", "vmamba_tiny")
# report name -> CasePredictor's (backend, precision)
BACKENDS = {
    "torch_fp32": ("torch", "fp32"),
    "onnxruntime_fp32": ("onnxruntime", "fp32"),
    "torch_bf16": ("torch", "bf16"),
}


def make_bundle(name: str, folder: Path) -> Path:
    torch.manual_seed(0)
    encoder = create_encoder(name)
    return save_bundle(
        folder / name,
        name=f"bench-{name}",
        kind="case",
        encoder=encoder,
        head=ABMIL(encoder.num_features, 8),
        labels=[f"c{i}" for i in range(8)],
        task="multilabel",
        windows=resolve_windows(["abdomen", "lung"]),
        input_spec=InputSpec(size=224),
    )


def backend_throughput(bundle_dir: Path, n: int, batch: int) -> dict:
    """Instances/s of each backend on the same normalised batch, and each one's difference to torch fp32."""
    x = torch.randn(batch, 3, 224, 224)
    rates, diffs, notes, reference = {}, {}, {}, None
    for label, (backend, precision) in BACKENDS.items():
        try:
            runner = CasePredictor(bundle_dir, device="cpu", backend=backend, precision=precision).runner
        except CLEARInputError as exc:
            rates[label], notes[label] = None, str(exc)
            continue
        output = runner(x)  # warm-up; for onnxruntime also the export (or cache) and the check against torch
        if runner.backend != backend:
            rates[label], notes[label] = None, f"fell back to {runner.backend}: {runner.fallback_reason}"
            continue
        start, done = time.perf_counter(), 0
        while done < n:
            runner(x)
            done += batch
        rates[label] = round(done / (time.perf_counter() - start), 2)
        if reference is None:
            reference = output
        else:
            diffs[label] = float(f"{max_rel_diff(output, reference):.2e}")
    return {"instances_per_s": rates, "max_rel_diff": diffs, "notes": notes, "batch": batch}


def one_slice_at_a_time(volume, bundle_dir, windows) -> float:
    """The public code's way: each slice, each window, windowed, resized and encoded alone."""
    predictor = CasePredictor(bundle_dir, device="cpu", batch_size=1, backend="torch")
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


def measure_case(bundle_dir: str, ct_path: str, batch_size: int, backend: str, precision: str, queue) -> None:
    """Runs in a fresh process, so that its peak memory is the case's alone (plus the imports)."""
    baseline = rss_mb("VmRSS")
    reset_peak_rss()
    predictor = CasePredictor(bundle_dir, device="cpu", batch_size=batch_size, backend=backend, precision=precision)
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
            "runtime": result.runtime,
        }
    )


def run_case(bundle_dir, ct_path, batch_size, backend, precision) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(
        target=measure_case, args=(str(bundle_dir), str(ct_path), batch_size, backend, precision, queue)
    )
    child.start()
    measured = queue.get()
    child.join()
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--encoder", default="mambaout_tiny")
    parser.add_argument("--all", action="store_true", help="throughput of every slice encoder, not just --encoder")
    parser.add_argument("--throughput-instances", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8, help="instances per batch (CasePredictor's CPU default)")
    parser.add_argument("--skip-loop", action="store_true", help="skip the one-slice-at-a-time comparison")
    args = parser.parse_args()
    report = {"torch_threads": torch.get_num_threads(), "cpu_native_bf16": cpu_has_native_bf16()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bundle_dir = make_bundle(args.encoder, tmp)
        measured = backend_throughput(bundle_dir, args.throughput_instances, args.batch_size)
        report.update(
            encoder=args.encoder,
            backends=measured["instances_per_s"],
            max_rel_diff=measured["max_rel_diff"],
            notes=measured["notes"],
        )
        if args.all:
            report["encoders"] = {args.encoder: measured}
            for name in ENCODERS:
                if name != args.encoder:
                    n = args.batch_size if name == "vmamba_tiny" else args.throughput_instances
                    report["encoders"][name] = backend_throughput(make_bundle(name, tmp), n, args.batch_size)

        volume, _ = make_phantom(shape_zyx=(args.slices, 512, 512), spacing_xyz=(0.7, 0.7, 1.5), seed=0)
        ct_path = write_volume(volume, tmp / "ct.nrrd")
        volume_mb = volume.hu.nbytes / 2**20
        del volume
        model_mb = sum(f.stat().st_size for f in (tmp / args.encoder).glob("*.safetensors")) / 2**20
        report["case_s"], cases = {}, {}
        for label, (backend, precision) in BACKENDS.items():
            if report["backends"].get(label) is None:
                report["case_s"][label] = None
                continue
            cases[label] = run_case(bundle_dir, ct_path, args.batch_size, backend, precision)
            report["case_s"][label] = round(cases[label]["wall_s"], 2)
        default = f"{CasePredictor(bundle_dir, device='cpu').runner.backend}_fp32"
        report["default_cpu_backend"] = default
        report["default_speedup_vs_torch_fp32"] = round(report["case_s"]["torch_fp32"] / report["case_s"][default], 2)
        chosen, t = cases[default], cases[default]["timings"]
        report["case"] = {
            "backend": default,
            "slices": args.slices,
            "instances": chosen["instances"],
            "batch_size": args.batch_size,
            "wall_s": round(chosen["wall_s"], 2),
            "stages_s": {k: round(v, 3) for k, v in t.items()},
            "read_preprocess_mil_fraction_of_encode": round((t["read"] + t["preprocess"] + t["mil"]) / t["encode"], 4),
            "int16_volume_mb": round(volume_mb, 1),
            "model_mb": round(model_mb, 1),
            "rss_after_imports_mb": round(chosen["rss_after_imports_mb"], 1),
            "peak_rss_mb": round(chosen["peak_rss_mb"], 1),
            "peak_above_imports_mb": round(chosen["peak_rss_mb"] - chosen["rss_after_imports_mb"], 1),
            "budget_3x_volume_plus_model_mb": round(3 * volume_mb + model_mb, 1),
        }
        if not args.skip_loop:
            loop_s = one_slice_at_a_time(read_ct(ct_path), bundle_dir, resolve_windows(["abdomen", "lung"]))
            report["case"]["one_slice_at_a_time_torch_s"] = round(loop_s, 2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
