"""Where a slice encoder runs: torch (any device, fp32 or CPU bf16) or ONNX Runtime (CPU, fp32).

ONNX Runtime runs the same network, with the same weights, faster on CPUs than eager torch (its graph
optimiser fuses the convolutions, norms and GELUs that eager torch runs one by one), so on the CPU it is
the default whenever it is installed. Each encoder is exported once per weights hash and cached; the
first batch of every predictor is run through both runtimes and the ONNX model is used only when the
two agree (`ONNX_MAX_REL_DIFF`), otherwise CLEAR stays on torch and says why.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..catalog import cache_root
from ..errors import CLEARInputError
from ..files import write_atomic
from ..models import encoder_entry
from .runtime import autocast, cpu_has_native_bf16

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnxruntime")
PRECISIONS = ("fp32", "bf16")
# Largest accepted max|onnx - torch| / max|torch| on the verification batch.
ONNX_MAX_REL_DIFF = 1e-4
ONNX_OPSET = 17
_ONNX_FORMAT = 1  # bump when the export recipe changes, so cached files from older recipes are not reused


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def max_rel_diff(output: np.ndarray, reference: np.ndarray) -> float:
    """max |output - reference| / max |reference|: one number for a whole batch of embeddings."""
    scale = float(np.abs(reference).max())
    return float(np.abs(output - reference).max()) / (scale if scale > 0 else 1.0)


def onnx_cache_dir() -> Path:
    """Beside the model cache (CLEAR_CACHE, default ~/.cache/clear)."""
    return cache_root() / "onnx"


def onnx_cache_key(architecture: str, kwargs: dict, weights_sha256: str, input_size: int, channels: int) -> str:
    """Everything the exported graph depends on: the network, its weights, its input shape and the recipe."""
    described = json.dumps(
        {
            "architecture": architecture,
            "kwargs": kwargs,
            "weights_sha256": weights_sha256,
            "input": [channels, input_size, input_size],
            "opset": ONNX_OPSET,
            "format": _ONNX_FORMAT,
            "torch": torch.__version__.split("+")[0],
        },
        sort_keys=True,
    )
    return hashlib.sha256(described.encode()).hexdigest()


def export_onnx(encoder: nn.Module, path: Path, input_size: int, channels: int) -> Path:
    """Export an encoder ([B, C, S, S] -> [B, D], dynamic batch) to `path`, atomically."""
    buffer = io.BytesIO()
    example = torch.zeros(2, channels, input_size, input_size)
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter: it needs no onnxscript (one dependency fewer inside Slicer) and exports
        # MambaOut and the ViT in 2-5 s. Its deprecation notice is for developers, not users; if a future
        # torch drops it, the export fails and CLEAR runs torch, saying why. Tracer warnings are about
        # shape checks that become constants, which is right: the input size of a bundle is fixed.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            encoder.eval().cpu(),
            (example,),
            buffer,
            input_names=["pixels"],
            output_names=["features"],
            dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}},
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    return write_atomic(path, buffer.getvalue())


class OnnxEncoder:
    """An exported slice encoder in an ONNX Runtime CPU session: torch tensor in, torch tensor out."""

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        # Without pre-planned memory patterns the peak stays ~40% lower at batch 8 for about 5% of speed.
        options.enable_mem_pattern = False
        # Idle ORT threads must not spin: between batches torch's threads window and resize the next one.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = path
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(pixels.detach().cpu().numpy(), dtype=np.float32)
        (features,) = self.session.run(["features"], {"pixels": array})
        return torch.from_numpy(features)


class SliceEncoderRunner:
    """Runs a bundle's slice encoder on batches of instances with the chosen backend and precision.

    `backend`: "auto" (ONNX Runtime on the CPU when installed and fp32, else torch), "torch" or
    "onnxruntime" (CPU only). `precision`: "fp32" (default) or "bf16", which on the CPU needs native
    bf16 (AVX-512 BF16 or AMX) and runs torch autocast; on CUDA, torch autocast is always used.
    The ONNX model is verified on the first batch against torch; `self.backend` says what runs,
    `self.fallback_reason` why ONNX Runtime is not used when it was wanted, `self.verified_rel_diff`
    the measured difference.
    """

    def __init__(self, bundle, device: torch.device, backend: str = "auto", precision: str = "fp32"):
        if backend not in BACKENDS:
            raise CLEARInputError(f"unknown backend {backend!r}: use {', '.join(BACKENDS)}")
        if precision not in PRECISIONS:
            raise CLEARInputError(f"unknown precision {precision!r}: use {', '.join(PRECISIONS)}")
        if device.type != "cpu" and backend == "onnxruntime":
            raise CLEARInputError("the onnxruntime backend runs on the CPU; use --device cpu or --backend torch")
        if device.type == "cpu" and precision == "bf16" and not cpu_has_native_bf16():
            raise CLEARInputError(
                "bf16 needs a CPU with AVX-512 BF16 or AMX (this one has neither, so bf16 would be slower "
                "than fp32); use --precision fp32"
            )
        if backend == "onnxruntime" and precision != "fp32":
            raise CLEARInputError("the onnxruntime backend runs fp32; use --backend torch for bf16")
        self.bundle = bundle
        self.device = device
        self.precision = precision
        self.encoder = bundle.encoder
        self.fallback_reason: str | None = None
        self.verified_rel_diff: float | None = None
        self._onnx: OnnxEncoder | None = None
        self._verify_pending = False
        wants_onnx = backend == "onnxruntime" or (backend == "auto" and device.type == "cpu" and precision == "fp32")
        self.backend = "torch"
        if wants_onnx:
            self._start_onnx(required=backend == "onnxruntime")
        self.channels_last = device.type == "cuda" or precision == "bf16"
        if self.channels_last:
            self.encoder.to(memory_format=torch.channels_last)

    def _start_onnx(self, required: bool) -> None:
        if not onnxruntime_available():
            return self._fall_back("onnxruntime is not installed", required)
        manifest = self.bundle.manifest
        unsupported = encoder_entry(manifest.encoder.architecture).onnx_unsupported
        if unsupported:
            return self._fall_back(f"{manifest.encoder.architecture}: {unsupported}", required)
        spec = self.bundle.input_spec
        encoder = manifest.encoder
        key = onnx_cache_key(encoder.architecture, encoder.kwargs, encoder.weights_sha256, spec.size, spec.channels)
        path = onnx_cache_dir() / f"{manifest.encoder.architecture}-{key[:32]}.onnx"
        try:
            if not path.exists():
                log.info("exporting %s to ONNX (once per weights): %s", manifest.encoder.architecture, path)
                export_onnx(self.encoder, path, spec.size, spec.channels)
            self._onnx = OnnxEncoder(path)
        except Exception as exc:  # any exporter or runtime failure leaves torch, which always works
            return self._fall_back(f"ONNX export or load failed ({type(exc).__name__}: {exc})", required)
        self.backend = "onnxruntime"
        self._verify_pending = True

    def _fall_back(self, reason: str, required: bool) -> None:
        self.fallback_reason = reason
        self.backend = "torch"
        self._onnx = None
        self._verify_pending = False
        if required:
            log.warning("onnxruntime backend not used, running torch: %s", reason)
        else:
            log.info("onnxruntime backend not used, running torch: %s", reason)

    def _torch(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast(self.device, self.precision):
            return self.encoder(pixels).float()

    def __call__(self, pixels: torch.Tensor) -> np.ndarray:
        """Embeddings [B, D] float32 for normalised pixels [B, C, S, S]."""
        if self._onnx is None:
            return self._torch(pixels).cpu().numpy()
        output = self._onnx(pixels).numpy()
        if self._verify_pending:
            self._verify_pending = False
            reference = self._torch(pixels).cpu().numpy()
            self.verified_rel_diff = max_rel_diff(output, reference)
            if not np.isfinite(self.verified_rel_diff) or self.verified_rel_diff > ONNX_MAX_REL_DIFF:
                self._fall_back(
                    f"ONNX Runtime differs from torch by {self.verified_rel_diff:.2e} (limit {ONNX_MAX_REL_DIFF:.0e})",
                    required=True,
                )
                return reference
            log.info("onnxruntime verified against torch: max relative difference %.2e", self.verified_rel_diff)
        return output

    def describe(self) -> dict:
        """What ran, for result files and logs."""
        precision = self.precision
        if self.device.type == "cuda":  # CUDA always autocasts
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        info = {"backend": self.backend, "precision": precision, "device": str(self.device)}
        if self.verified_rel_diff is not None:
            info["onnx_max_rel_diff"] = self.verified_rel_diff
        if self.fallback_reason:
            info["fallback_reason"] = self.fallback_reason
        return info
