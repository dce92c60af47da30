"""Case inference: CT -> slice instances -> frozen encoder -> embeddings -> ABMIL -> probabilities + attention.

The one code path behind the Slicer module, the Python-console batch API and `clear-ct predict`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import torch

from ..bundle import Bundle, load_bundle
from ..errors import CLEARInputError
from ..io import CTVolume, read_ct
from ..models.abmil import attention_columns, attention_of_labels, head_probabilities, reads_windows
from ..preprocess import SliceInstances
from ..progress import ProgressCallback, report
from .backends import SliceEncoderRunner
from .runtime import StageTimer, check_cancel, default_batch_size, resolve_device, run_batches


@dataclass
class CaseResult:
    probabilities: dict[str, float]
    # slice_index, window, z_mm, attention: one row per instance; a head with per-label attention adds
    # attention:<label> for each label, and `attention` is their mean
    attention: pd.DataFrame
    embeddings: np.ndarray  # [n_instances, feature_dim] float32, rows in attention's order
    labels: list[str]
    task: str
    bundle_name: str
    encoder_sha256: str
    timings: dict[str, float] = field(default_factory=dict)
    runtime: dict = field(default_factory=dict)  # backend, precision, device (and ONNX verification) that ran

    def top_slices(self, k: int = 5, window: str | None = None, label: str | None = None) -> pd.DataFrame:
        """The k instances with the highest attention (optionally of one window, and of one label's attention
        where the head has per-label attention: `attention` then holds that label's), highest first."""
        if label is not None:
            return self.for_labels(label).top_slices(k, window)
        table = self.attention if window is None else self.attention[self.attention.window == window]
        return table.sort_values("attention", ascending=False, kind="stable").head(k).reset_index(drop=True)

    def for_labels(self, labels) -> CaseResult:
        """This result with its `attention` column replaced by the mean attention of `labels` (each label's own
        where the head has per-label attention; the shared attention, unchanged, otherwise): what the attention
        plot, the heat overlay and the top slices then show."""
        labels = [labels] if isinstance(labels, str) else list(labels)
        unknown = sorted(set(labels) - set(self.labels))
        if not labels or unknown:
            raise ValueError(f"labels {unknown or labels} are not among this result's labels {self.labels}")
        return replace(self, attention=attention_of_labels(self.attention, labels))

    @property
    def per_label_attention(self) -> bool:
        return any(column.startswith("attention:") for column in self.attention.columns)

    def to_dict(self) -> dict:
        return {
            "bundle": self.bundle_name,
            "task": self.task,
            "probabilities": self.probabilities,
            "top_slices": self.top_slices(5).to_dict(orient="records"),
            **(
                {
                    "top_slices_by_label": {
                        label: self.top_slices(5, label=label).to_dict("records") for label in self.labels
                    }
                }
                if self.per_label_attention
                else {}
            ),
            "n_instances": int(len(self.attention)),
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
            "runtime": self.runtime,
        }


class CasePredictor:
    """Runs a case bundle on CT volumes. Load once, predict many times.

    `device`: "auto" (CUDA when present), "cpu", "gpu"/"cuda". `batch_size`: instances per encoder
    batch; by default 8 on the CPU (larger batches are no faster there) and sized from free memory
    on CUDA; halved on out-of-memory. `backend`: "auto" (ONNX Runtime on the CPU when installed,
    verified against torch on the first batch; torch otherwise), "torch" or "onnxruntime".
    `precision`: "fp32" or "bf16" (CUDA always autocasts; bf16 on the CPU needs AVX-512 BF16 or AMX).
    """

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike,
        device="auto",
        batch_size: int | None = None,
        backend: str = "auto",
        precision: str = "fp32",
    ):
        self.device = resolve_device(device)
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        if self.bundle.kind != "case":
            raise CLEARInputError(f"a {self.bundle.kind} bundle cannot score whole cases", self.bundle.path)
        self.bundle.to(self.device)
        self.runner = SliceEncoderRunner(self.bundle, self.device, backend=backend, precision=precision)
        spec = self.bundle.input_spec
        per_item_mb = 3 * spec.size * spec.size * 4 * 40 / 2**20  # activations ~40x the input, measured on MambaOut-T
        self.batch_size = batch_size or default_batch_size(self.device, per_item_mb, cpu_default=8)

    @property
    def labels(self) -> list[str]:
        return self.bundle.labels

    def encode(self, volume: CTVolume, progress: ProgressCallback | None = None, cancel=None, timer=None):
        """Embeddings [n_instances, D] and the instance table (slice_index, window, z_mm)."""
        timer = timer or StageTimer(self.device)
        instances = SliceInstances(
            volume, self.bundle.windows, self.bundle.input_spec, batch_size=self.batch_size, device=self.device
        )
        embeddings = np.empty((len(instances), self.bundle.manifest.encoder.feature_dim), dtype=np.float32)

        def make_batch(start, stop):
            with timer("preprocess"):
                return instances.batch(start, stop).pixels

        def run_model(pixels):
            with timer("encode"):
                return self.runner(pixels)

        for start, stop, output in run_batches(
            len(instances), self.batch_size, make_batch, run_model, progress, cancel, "encoding instance", self.device
        ):
            embeddings[start:stop] = output
        return embeddings, instances.table()

    def score(self, embeddings: np.ndarray, table: dict | pd.DataFrame, timer=None):
        """ABMIL on precomputed embeddings: (probabilities, attention array)."""
        if self.bundle.head is None:
            raise CLEARInputError("this bundle has no head (an encoder only); it gives features, not predictions")
        timer = timer or StageTimer(self.device)
        head = self.bundle.head
        with timer("mil"), torch.inference_mode():
            features = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32)).to(self.device)
            windows = head.window_index(np.asarray(table["window"])).to(self.device) if reads_windows(head) else None
            probs, attention = head_probabilities(head, features, self.bundle.manifest.task, window_index=windows)
        return probs.float().cpu().numpy(), attention.float().cpu().numpy()

    def predict(
        self, volume: CTVolume | str | os.PathLike, progress: ProgressCallback | None = None, cancel=None
    ) -> CaseResult:
        timer = StageTimer(self.device)
        if not isinstance(volume, CTVolume):
            with timer("read"):
                volume = read_ct(volume)
        report(progress, 0.0, "preparing slices")
        embeddings, table = self.encode(volume, progress, cancel, timer)
        check_cancel(cancel)
        return self._result(embeddings, table, timer.seconds)

    def rescore(self, result: CaseResult) -> CaseResult:
        """Score another result's embeddings with this bundle's head, without re-encoding.

        Only valid when both bundles share the encoder (same weights), which is checked.
        """
        if result.encoder_sha256 != self.bundle.manifest.encoder.weights_sha256:
            raise CLEARInputError(
                f"embeddings come from another encoder ({result.bundle_name}); re-scoring needs the same weights",
                self.bundle.path,
            )
        return self._result(result.embeddings, result.attention[["slice_index", "window", "z_mm"]], {})

    def _result(self, embeddings, table, timings) -> CaseResult:
        timer = StageTimer(self.device)
        probs, attention = self.score(embeddings, table, timer)
        frame = pd.DataFrame({k: np.asarray(v) for k, v in dict(table).items()})[["slice_index", "window", "z_mm"]]
        manifest = self.bundle.manifest
        labels = list(manifest.labels)
        for name, column in attention_columns(attention, labels).items():
            frame[name] = column
        return CaseResult(
            probabilities={label: float(p) for label, p in zip(labels, probs, strict=True)},
            attention=frame,
            embeddings=embeddings,
            labels=labels,
            task=manifest.task,
            bundle_name=manifest.name,
            encoder_sha256=manifest.encoder.weights_sha256,
            timings={**timings, **timer.seconds},
            runtime=self.runner.describe(),
        )
