"""Device choice, mixed precision, batching and cooperative cancel: shared by case and lesion inference."""

from __future__ import annotations

import contextlib
import time

import torch

from ..errors import CLEARCancelled, CLEARRunError, check_cancel  # noqa: F401  (check_cancel: re-exported)
from ..progress import report


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """ "auto" -> CUDA when present, else Apple's MPS when present, else CPU; "gpu" is CUDA or MPS."""
    if isinstance(device, torch.device):
        return device
    name = str(device).lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu")
    if name == "gpu" and not torch.cuda.is_available() and _mps_available():
        return torch.device("mps")
    if name in ("gpu", "cuda") or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise CLEARRunError("a GPU was requested but PyTorch sees no CUDA (or Apple MPS) device")
        return torch.device("cuda" if name == "gpu" else name)
    if name == "mps":
        if not _mps_available():
            raise CLEARRunError("Apple MPS was requested but PyTorch sees no MPS device")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise ValueError(f"unknown device {device!r}: use auto, cpu, gpu, cuda[:N] or mps")


def describe_device(device: str | torch.device = "auto") -> str:
    """What a run on `device` would use, in words for the user: the GPU's name and memory, MPS, or the CPU."""
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        index = resolved.index if resolved.index is not None else torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(index)
        name = torch.cuda.get_device_name(index)
        return f"GPU {index}: {name}, {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB"
    if resolved.type == "mps":
        return "Apple GPU (MPS)"
    return f"CPU, {torch.get_num_threads()} threads (no GPU: expect about a minute per 300-slice CT)"


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX-512 BF16 or AMX); elsewhere bf16 is slow emulation."""
    return bool(
        getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    )


def autocast(device: torch.device, cpu_precision: str = "fp32", enabled: bool = True):
    """The one mixed-precision policy, for inference and training.

    CUDA: bf16 (fp16 where the GPU lacks bf16) autocast. CPU: full precision (deterministic) unless
    `cpu_precision` is "bf16", or "auto" on a CPU with native bf16 (MIL training: 2x on AVX512-BF16);
    emulated bf16 is slower than fp32. `enabled=False` turns autocast off everywhere.
    """
    if not enabled:
        return contextlib.nullcontext()
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    if cpu_precision == "bf16" or (cpu_precision == "auto" and cpu_has_native_bf16()):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def default_batch_size(device: torch.device, per_item_mb: float, cpu_default: int) -> int:
    """On CUDA, half the free memory divided by a measured-once per-item estimate; on CPU a fixed size."""
    if device.type != "cuda":
        return cpu_default
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(1, min(512, free / 2 / (per_item_mb * 2**20))))


class StageTimer:
    """Wall time per named stage; synchronises CUDA so that GPU work is charged to the right stage."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


def run_batches(n_items: int, batch_size: int, make_batch, run_model, progress, cancel, label: str, device):
    """Call run_model(make_batch(start, stop)) over [0, n_items) in batches, halving the batch on CUDA OOM.

    Yields (start, stop, output) in order.
    """
    start = 0
    while start < n_items:
        check_cancel(cancel)
        stop = min(start + batch_size, n_items)
        batch = make_batch(start, stop)
        try:
            output = run_model(batch)
        except torch.OutOfMemoryError:
            if batch_size == 1:
                raise
            del batch
            if device.type == "cuda":
                torch.cuda.empty_cache()
            batch_size = max(1, batch_size // 2)
            continue
        yield start, stop, output
        report(progress, stop / n_items, f"{label} {stop}/{n_items}")
        start = stop
