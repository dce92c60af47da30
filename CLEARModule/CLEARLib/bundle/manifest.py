"""The model-bundle manifest (`manifest.json`), validated with pydantic; its JSON schema is `manifest_schema()`.

A bundle is a directory or .zip with `manifest.json` and one safetensors file whose sha256 the
manifest records. Tensors are named `encoder.*` and `head.*`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputSpecModel(_Strict):
    size: int = Field(ge=8, le=4096)
    channels: int = Field(default=3, ge=1, le=16)
    mean: list[float]
    std: list[float]

    @model_validator(mode="after")
    def _per_channel(self):
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean and std need {self.channels} values each (one per channel)")
        if min(self.std) <= 0:
            raise ValueError("std must be positive")
        return self


class EncoderSpec(_Strict):
    architecture: str = Field(description="registered encoder name, e.g. mambaout_tiny or fmcib_resnet50")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="builder arguments beyond the defaults")
    feature_dim: int = Field(ge=1)
    input: InputSpecModel | None = Field(default=None, description="slice encoders only")
    weights_sha256: str = Field(description="sha256 over the encoder tensors (names, dtypes, shapes, bytes)")


class WindowSpec(_Strict):
    name: str
    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self):
        if not self.low < self.high:
            raise ValueError(f"window {self.name!r}: low ({self.low}) must be below high ({self.high})")
        return self


class CasePreprocessing(_Strict):
    windows: list[WindowSpec] = Field(min_length=1)
    instance_order: Literal["slice-major"] = "slice-major"
    resize: Literal["bilinear-antialias"] = "bilinear-antialias"


class LesionPreprocessing(_Strict):
    patch_size: int = Field(50, ge=8, le=256)
    spacing_mm: float = Field(1.0, gt=0, le=10)
    intensity: Literal["(HU+1024)/3072"] = "(HU+1024)/3072"
    outside_hu: float = -1024.0


class HeadSpec(_Strict):
    type: Literal["abmil", "abmil_ensemble", "linear"]
    kwargs: dict[str, Any] = Field(default_factory=dict)
    n_outputs: int = Field(ge=1)


class WeightsFile(_Strict):
    # A plain file name inside the bundle: never a path that leads out of it.
    file: str = Field("weights.safetensors", pattern=r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Manifest(_Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    name: str = Field(min_length=1)
    version: str = "0.1.0"
    kind: Literal["case", "lesion"]
    description: str = ""
    encoder: EncoderSpec
    preprocessing: CasePreprocessing | LesionPreprocessing
    head: HeadSpec | None = None
    labels: list[str] = Field(default_factory=list)
    task: Literal["multilabel", "multiclass", "binary"] | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    provenance: dict[str, Any] = Field(default_factory=dict)
    weights: WeightsFile

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if self.kind == "case":
            if not isinstance(self.preprocessing, CasePreprocessing):
                raise ValueError("a case bundle needs preprocessing.windows")
            if self.encoder.input is None:
                raise ValueError("a case bundle needs encoder.input (size, mean, std)")
            if self.head is not None and self.head.type not in ("abmil", "abmil_ensemble"):
                raise ValueError("a case bundle's head is abmil or abmil_ensemble")
        else:
            if not isinstance(self.preprocessing, LesionPreprocessing):
                raise ValueError("a lesion bundle needs lesion preprocessing (patch_size, spacing_mm)")
            if self.head is not None and self.head.type != "linear":
                raise ValueError("a lesion bundle's head is linear")
        if self.head is None:
            if self.labels or self.task:
                raise ValueError("labels and task need a head")
            return self
        if self.task is None or not self.labels:
            raise ValueError("a bundle with a head needs labels and a task")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be distinct: {self.labels}")
        expected = 1 if self.task == "binary" else len(self.labels)
        if self.task == "binary" and len(self.labels) != 1:
            raise ValueError("a binary task has one label (the positive class)")
        if self.task == "multiclass" and len(self.labels) < 2:
            raise ValueError("a multiclass task needs at least two labels")
        if self.head.n_outputs != expected:
            raise ValueError(f"head has {self.head.n_outputs} outputs; {self.task} with {self.labels} needs {expected}")
        return self


def manifest_schema() -> dict:
    return Manifest.model_json_schema()
