"""Validated YAML configs: every problem is reported, with its key, before any compute is spent."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from CLEARLib.errors import CLEARInputError
from CLEARLib.io.deeplesion import lesion_type_code
from CLEARLib.models import list_encoders
from CLEARLib.preprocess import resolve_windows


class ConfigError(CLEARInputError):
    """A config file that cannot be used; the message names the file and every bad key."""


class StrictModel(BaseModel):
    """The base of every config section: unknown keys are errors, reported with their path."""

    model_config = ConfigDict(extra="forbid")


class RunConfig(StrictModel):
    """What every run has: a name, an output folder, a seed and a device."""

    name: str
    out_dir: Path
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"


class TrainingRunConfig(RunConfig):
    """A run of the distributed trainer (pretraining, lesion models): epochs, checkpoints, logs."""

    epochs: int = Field(100, ge=1)
    warmup_epochs: float = Field(10, ge=0)
    checkpoint_every_steps: int | None = Field(None, ge=1, description="also checkpoint within an epoch")
    log_every_steps: int = Field(20, ge=1)
    max_steps: int | None = Field(
        None, ge=1, description="stop after this many steps in all (a short trial); the bundle is exported as usual"
    )
    resume_with_other_world_size: bool = Field(
        False,
        description="resume a checkpoint written by another number of processes (the global batch stays, the "
        "per-rank random draws change, so the run is no longer exact)",
    )


class DataConfig(StrictModel):
    store: Path
    windows: list[str] = Field(default_factory=lambda: ["abdomen", "lung"])
    image_size: int = Field(224, ge=16)
    crop_scale: tuple[float, float] = (0.2, 1.0)
    lesion_context: tuple[float, float] = (1.5, 4.0)
    augmentations: Literal["clear", "moco_v3"] = Field(
        "clear",
        description="clear: CT window jitter, contrast, gamma, blur (p blur_p), noise, both views alike; moco_v3: "
        "the authors' (MoCo v3's) asymmetric colour augmentations: brightness/contrast jitter (p 0.8), blur p 1.0 "
        "and 0.1, solarisation p 0 and 0.2, horizontal flips",
    )
    key_slice_fraction: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="LeCL: this share of every batch is drawn from the key slices (cycling through them), the rest "
        "from the other slices, an epoch being one pass over those; default: all slices drawn alike, as the paper",
    )
    blur_p: float = Field(
        0.5,
        ge=0,
        le=1,
        description="clear augmentations: probability of the Gaussian blur of each view (0 keeps findings of a few "
        "pixels, as on a small demo input, in both views)",
    )
    lesion_crop_px: tuple[float, float] | None = Field(
        None,
        description="the authors' LeCL crop: side uniform in [low, high) pixels of the stored slice, centred on the "
        "box centre (their code: [145, 512)); default: lesion_context times the box's longer side",
    )

    lesion_windows: dict[str, str] | None = Field(
        None,
        description="LeCL: key slices whose lesions are of these types (DeepLesion names or codes) are shown in the "
        "window each type is read in, e.g. {liver: abdomen, lung: lung}; every other slice gets one of `windows` at "
        "random, as by default",
    )

    @field_validator("windows")
    @classmethod
    def _windows(cls, value):
        resolve_windows(value)
        return value

    @model_validator(mode="after")
    def _lesion_windows(self):
        names = [window.name for window in resolve_windows(self.windows)]
        for lesion_type, window in (self.lesion_windows or {}).items():
            lesion_type_code(lesion_type)  # ValueError says which types exist
            if window not in names:
                raise ValueError(f"lesion_windows: {lesion_type!r} -> {window!r}, which is not one of windows {names}")
        return self

    def lesion_window_index(self) -> dict[int, int]:
        """data.lesion_windows as DeepLesion type code -> index into `windows`."""
        names = [window.name for window in resolve_windows(self.windows)]
        return {lesion_type_code(t): names.index(w) for t, w in (self.lesion_windows or {}).items()}


class ModelConfig(StrictModel):
    encoder: str
    encoder_kwargs: dict = Field(default_factory=dict)
    dim: int = Field(256, ge=8)
    mlp_dim: int = Field(4096, ge=8)
    projector_layers: int | None = Field(
        None, ge=1, description="default: the encoder registry's (MoCo v3: 3 for ViT, 2 otherwise)"
    )
    predictor_layers: int = Field(2, ge=1)
    predictor_last_bn: bool = Field(True, description="predictor ends in BatchNorm(affine=False) (MoCo v3 ViT)")
    mlp_norm: Literal["batchnorm", "none"] = "batchnorm"

    @field_validator("encoder")
    @classmethod
    def _encoder(cls, value):
        if value not in list_encoders("slice"):
            raise ValueError(f"unknown slice encoder {value!r}; one of {list_encoders('slice')}")
        return value


class MethodConfig(StrictModel):
    name: Literal["moco", "lecl"]
    lam: float = Field(0.0, ge=0, description="LeCL weight of the key-slice term (paper: 0, 1, 3, 5)")
    loss_variant: Literal["paper", "public"] = "paper"
    tau: float = Field(0.2, gt=0)
    momentum: float = Field(0.99, ge=0, lt=1)
    momentum_schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="cosine: from `momentum` to 1 over training (MoCo v3); constant (the authors' default)"
    )


class OptimConfig(StrictModel):
    name: Literal["adamw", "lars", "sgd"] = "adamw"
    lr: float = Field(1e-4, gt=0, description="base learning rate per 256 images; scaled by batch_size / 256")
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas (MoCo v3's ViT; the authors: 0.9, 0.999)")
    batch_size: int = Field(2048, ge=2, description="global batch over all ranks")
    amp: bool = True


class PretrainConfig(StrictModel):
    run: TrainingRunConfig
    data: DataConfig
    model: ModelConfig
    method: MethodConfig
    optim: OptimConfig

    @model_validator(mode="after")
    def _consistent(self):
        if self.run.warmup_epochs >= self.run.epochs:
            raise ValueError("run.warmup_epochs must be smaller than run.epochs")
        if self.method.name == "moco" and self.method.lam:
            raise ValueError("method.lam applies to lecl only")
        if self.method.name == "moco" and self.data.lesion_windows:
            raise ValueError("data.lesion_windows applies to lecl only (MoCo has no key slices)")
        return self


# --------------------------------------------------------------------- 3D lesion model (FMCIB recipe)
class LesionData(StrictModel):
    seeds: Path
    cache_dir: Path
    margin: int = Field(10, ge=0, le=20, description="voxels cached around the 50 mm patch (translations)")
    negatives_per_seed: int = Field(4, ge=1)
    label_column: str = "label"


class LesionModel(StrictModel):
    encoder_kwargs: dict = Field(default_factory=dict, description="fmcib_resnet50 overrides (tests: tiny nets)")
    hidden_dim: int = 2048
    projection_dim: int = 128
    init_bundle: Path | None = Field(None, description="fine-tuning: start from this lesion bundle's encoder")


class LesionMethod(StrictModel):
    loss: Literal["ntxent", "fmcib"] = "ntxent"
    temperature: float = Field(0.1, gt=0)
    crop_scale: tuple[float, float] = (0.5, 1.0)


class LesionPretrainConfig(StrictModel):
    run: TrainingRunConfig
    data: LesionData
    model: LesionModel = LesionModel()
    method: LesionMethod = LesionMethod()
    optim: OptimConfig = OptimConfig(name="lars", lr=0.3, weight_decay=1e-6, batch_size=64)


# ------------------------------------------------------------------------------------ ABMIL studies
class MilData(StrictModel):
    features: Path
    table: Path
    case_column: str = "case_id"
    patient_column: str = "patient_id"
    task: Literal["multilabel", "multiclass", "binary"]
    labels: list[str] = Field(min_length=1, description="label columns (multilabel/binary) or class names")
    label_column: str | None = Field(None, description="multiclass: the column holding the class name")
    windows: list[str] | None = Field(None, description="use only these windows' instances (default: all)")
    test_fraction: float = Field(0.2, ge=0, lt=1)
    test_split: Path | None = Field(
        None,
        description="DeepLesion: the pretraining hold-out that prepare-deeplesion saved (<store>-splits.csv); its "
        "test patients are the test set (test_fraction is not used) and the folds come from the rest",
    )
    pretrain_store: Path | None = Field(
        None, description="the slice store the encoder was pretrained on: a test patient found in it stops the run"
    )
    folds: int = Field(5, ge=2)
    nested: bool = Field(False, description="small cohorts: outer folds are the test sets, no separate test set")
    repeats: int = Field(
        1,
        ge=1,
        description="repeated cross-validation: the validation folds are drawn this many times around the same test "
        "set, and every repeat's fold models join the exported ensemble",
    )

    @model_validator(mode="after")
    def _task(self):
        if self.task == "multiclass" and (not self.label_column or len(self.labels) < 2):
            raise ValueError("multiclass needs label_column and at least two class names in labels")
        if self.task == "binary" and len(self.labels) != 1:
            raise ValueError("binary needs exactly one label column")
        if self.nested and self.test_split is not None:
            raise ValueError("nested cross-validation draws its own test sets; it cannot use a fixed test_split")
        if self.nested and self.repeats > 1:
            raise ValueError("repeats redraws the validation folds around one test set, which nested runs have not")
        return self


class MilModel(StrictModel):
    hidden_dim: int = 256
    attention_dim: int = 128
    gated: bool = False
    dropout: float = Field(0.25, ge=0, lt=1)
    dropout_before_activation: bool = Field(False, description="the authors' head: Linear -> Dropout -> SiLU")
    per_label_attention: bool = Field(
        False,
        description="one attention per label, each label's logit from its own pooled vector (CLAM's multi-branch "
        "form); the paper's ABMIL shares one attention",
    )
    label_windows: dict[str, list[str]] | None = Field(
        None,
        description="with per_label_attention: label -> the windows whose instances that label's attention reads "
        "(e.g. liver: [abdomen], lung: [lung]); labels not named read every window",
    )

    @model_validator(mode="after")
    def _label_windows(self):
        if self.label_windows is not None and not self.per_label_attention:
            raise ValueError("label_windows needs per_label_attention: true")
        return self


class MilTrain(StrictModel):
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    batch_size: int = Field(128, ge=1, description="bags per batch (padded, with masks)")
    epochs: int = Field(32, ge=1)
    patience: int = Field(8, ge=1, description="early stopping: epochs without validation-loss improvement")
    class_balanced: bool = Field(
        False,
        description="weight the loss by class balance of the training cases (the authors' code): BCE positives by "
        "negatives/positives per label; cross-entropy classes by inverse frequency",
    )
    amp: bool = Field(
        True, description="bf16 autocast where the hardware has fast bf16 (CUDA, or CPUs with AVX512-BF16/AMX)"
    )


class MilEvaluation(StrictModel):
    bootstrap: int = Field(1000, ge=0)
    attention_plots: int = Field(5, ge=0, description="attention-curve PNGs for the top cases of each label")


class MilExport(StrictModel):
    encoder_bundle: Path | None = Field(None, description="the bundle the features came from")
    name: str | None = None
    version: str = "0.1.0"


class MilConfig(StrictModel):
    run: RunConfig
    data: MilData
    model: MilModel = MilModel()
    train: MilTrain = MilTrain()
    evaluation: MilEvaluation = MilEvaluation()
    export: MilExport = MilExport()


# -------------------------------------------------------------------------------------------- data


def _set(data: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {key} is not a section")
    node[keys[-1]] = value


def load_config(path: str | os.PathLike, overrides: list[str] | None = None, model=PretrainConfig):
    """Read YAML, apply `key.sub=value` overrides (values parsed as YAML), validate; relative paths in
    the file are resolved against the file's folder."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as exc:
        raise ConfigError("no such config file", path) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", path) from exc
    if not isinstance(data, dict):
        raise ConfigError("a config is a mapping of sections", path)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: use key.sub=value")
        key, value = item.split("=", 1)
        _set(data, key, yaml.safe_load(value))
    try:
        config = model.model_validate(data)
    except ValidationError as exc:
        problems = "\n".join(f"  {'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid config\n{problems}", path) from exc
    return _resolve_paths(config, path.parent)


def _resolve_paths(config, base: Path):
    for section in config.__class__.model_fields:
        part = getattr(config, section)
        if isinstance(part, BaseModel):
            for name in part.__class__.model_fields:
                value = getattr(part, name)
                if isinstance(value, Path) and not value.is_absolute():
                    setattr(part, name, (base / value).resolve())
    return config
