"""Saving and loading model bundles: manifest + safetensors, checked strictly, never unpickled."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from .. import __version__
from ..errors import CLEARInputError
from ..files import publish_bundle
from ..models import ABMIL, ABMILEnsemble, LinearHead, create_encoder, encoder_entry
from ..preprocess.slices import InputSpec, Window, resolve_windows
from .manifest import (
    SCHEMA_VERSION,
    CasePreprocessing,
    EncoderSpec,
    HeadSpec,
    InputSpecModel,
    LesionPreprocessing,
    Manifest,
    WeightsFile,
    WindowSpec,
)

MANIFEST = "manifest.json"
_HEADS = {"abmil": ABMIL, "abmil_ensemble": ABMILEnsemble, "linear": LinearHead}
# Which encoders each bundle kind runs: case bundles run slice encoders, lesion bundles lesion encoders.
ENCODER_KIND = {"case": "slice", "lesion": "lesion"}


@dataclass
class Bundle:
    """A loaded bundle: its manifest, the encoder and the head (None for encoder-only bundles)."""

    manifest: Manifest
    encoder: nn.Module
    head: nn.Module | None
    path: Path | None = None

    @property
    def kind(self) -> str:
        return self.manifest.kind

    @property
    def labels(self) -> list[str]:
        return list(self.manifest.labels)

    @property
    def windows(self) -> tuple[Window, ...]:
        return tuple(Window(w.name, w.low, w.high) for w in self.manifest.preprocessing.windows)

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec.from_dict(self.manifest.encoder.input.model_dump())

    def to(self, device) -> Bundle:
        self.encoder.to(device)
        if self.head is not None:
            self.head.to(device)
        return self


def tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    """Content hash of named tensors, independent of file layout: names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _head_from_spec(spec: HeadSpec, feature_dim: int) -> nn.Module:
    return _HEADS[spec.type](feature_dim, spec.n_outputs, **spec.kwargs)


def _head_kwargs(head: nn.Module) -> dict:
    if isinstance(head, ABMILEnsemble):
        return {"n_members": len(head.members), "task": head.task, **_head_kwargs(head.members[0])}
    if isinstance(head, ABMIL):
        return {
            "hidden_dim": head.encoder[0].out_features,
            "attention_dim": head.attention_V.out_features,
            "gated": head.attention_U is not None,
            "dropout": float(head.encoder[2].p),
            "dropout_before_activation": bool(head.dropout_before_activation),
            "per_label_attention": head.attention_branches > 1,
            **({"windows": head.windows, "label_windows": head.label_windows} if head.label_windows else {}),
        }
    if isinstance(head, LinearHead):
        return {}
    raise TypeError(f"unsupported head {type(head).__name__}")


def _head_type(head: nn.Module) -> str:
    return {ABMILEnsemble: "abmil_ensemble", ABMIL: "abmil", LinearHead: "linear"}[type(head)]


def save_bundle(
    path: str | os.PathLike,
    *,
    name: str,
    kind: str,
    encoder: nn.Module,
    head: nn.Module | None = None,
    labels: list[str] | None = None,
    task: str | None = None,
    windows=None,
    input_spec: InputSpec | None = None,
    description: str = "",
    version: str = "0.1.0",
    metrics: dict | None = None,
    provenance: dict | None = None,
) -> Path:
    """Write a bundle to `path` (a directory, or a file ending in .zip), atomically.

    `encoder` must come from `create_encoder` (its registry name and arguments are recorded).
    """
    path = Path(path)
    architecture = getattr(encoder, "encoder_name", None)
    if architecture is None:
        raise ValueError("encoder must be built with CLEARLib.models.create_encoder")
    entry = encoder_entry(architecture)
    if entry.kind != ENCODER_KIND[kind]:
        raise ValueError(f"{architecture} is a {entry.kind} encoder, not for a {kind} bundle")
    encoder_state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    head_state = {} if head is None else {f"head.{k}": v for k, v in head.state_dict().items()}
    tensors = {k: v.detach().cpu().contiguous() for k, v in {**encoder_state, **head_state}.items()}
    weights = save_safetensors_bytes(tensors, metadata={"format": "pt", "clear_version": __version__})
    spec = input_spec or entry.input_spec
    if kind == "case":
        preprocessing = CasePreprocessing(
            windows=[WindowSpec(name=w.name, low=w.low, high=w.high) for w in resolve_windows(windows or ())]
        )
    else:
        preprocessing = LesionPreprocessing()
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        name=name,
        version=version,
        kind=kind,
        description=description,
        encoder=EncoderSpec(
            architecture=architecture,
            kwargs=dict(getattr(encoder, "encoder_kwargs", {})),
            feature_dim=encoder.num_features,
            input=InputSpecModel(**spec.to_dict()) if kind == "case" else None,
            weights_sha256=tensors_sha256({k[len("encoder.") :]: v for k, v in encoder_state.items()}),
        ),
        preprocessing=preprocessing,
        head=None
        if head is None
        else HeadSpec(type=_head_type(head), kwargs=_head_kwargs(head), n_outputs=head.n_outputs),
        labels=list(labels or []),
        task=task,
        metrics=metrics or {},
        provenance={"clear_version": __version__, **(provenance or {})},
        weights=WeightsFile(sha256=hashlib.sha256(weights).hexdigest()),
    )
    manifest_text = manifest.model_dump_json(indent=2)

    def build(target: Path):
        if path.suffix.lower() == ".zip":
            with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED) as zf:
                zf.writestr(MANIFEST, manifest_text)
                zf.writestr(manifest.weights.file, weights)
        else:
            target.mkdir()
            (target / MANIFEST).write_text(manifest_text)
            (target / manifest.weights.file).write_bytes(weights)

    return publish_bundle(build, path)


_MAX_MANIFEST_BYTES = 1 << 20
_MAX_WEIGHTS_BYTES = 8 << 30
_MAX_COMPRESSION_RATIO = 20


def _read_members(path: Path) -> tuple[bytes, Callable[[str], bytes]]:
    if path.is_dir():
        manifest_path = path / MANIFEST
        if not manifest_path.exists():
            raise CLEARInputError(f"no {MANIFEST} in the bundle folder", path)
        if manifest_path.stat().st_size > _MAX_MANIFEST_BYTES:
            raise CLEARInputError(f"{MANIFEST} is larger than {_MAX_MANIFEST_BYTES} bytes", path)

        def read_file(name: str) -> bytes:
            member = path / name
            if not member.is_file():  # a device such as /dev/zero, or a pipe, would never end
                raise FileNotFoundError(name)
            if member.stat().st_size > _MAX_WEIGHTS_BYTES:
                raise CLEARInputError(f"{name} is larger than {_MAX_WEIGHTS_BYTES} bytes", path)
            return member.read_bytes()

        return manifest_path.read_bytes(), read_file
    if not zipfile.is_zipfile(path):
        raise CLEARInputError("a bundle is a folder or a .zip holding manifest.json and safetensors weights", path)
    with zipfile.ZipFile(path) as zf:
        infos = {i.filename: i for i in zf.infolist() if not i.is_dir()}
    manifests = [n for n in infos if n.rsplit("/", 1)[-1] == MANIFEST]
    if len(manifests) != 1:
        raise CLEARInputError(f"the zip holds {len(manifests)} {MANIFEST} files; a bundle has exactly one", path)
    prefix = manifests[0][: -len(MANIFEST)]

    def read(name: str, limit: int = _MAX_WEIGHTS_BYTES) -> bytes:
        """One member, and only when it is needed; sizes checked before anything is inflated."""
        info = infos.get(prefix + name)
        if info is None:
            raise KeyError(name)
        # Weights barely compress (CLEAR stores them uncompressed): a high ratio or a huge size is a bomb.
        if info.file_size > limit or info.file_size > _MAX_COMPRESSION_RATIO * max(info.compress_size, 1):
            raise CLEARInputError(
                f"{name} would inflate to {info.file_size} bytes from {info.compress_size}; refused", path
            )
        with zipfile.ZipFile(path) as zf:
            return zf.read(info)

    return read(MANIFEST, _MAX_MANIFEST_BYTES), read


def read_manifest(path: str | os.PathLike) -> Manifest:
    path = Path(path)
    if not path.exists():
        raise CLEARInputError("no such bundle", path)
    raw, _ = _read_members(path)
    return _parse_manifest(raw, path)


def _parse_manifest(raw: bytes, path: Path) -> Manifest:
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CLEARInputError(f"{MANIFEST} is not valid JSON: {exc}", path) from exc
    except RecursionError as exc:  # thousands of nested brackets
        raise CLEARInputError(f"{MANIFEST} nests too deeply to be a manifest", path) from exc
    if not isinstance(data, dict):
        raise CLEARInputError(f"{MANIFEST} must hold a JSON object", path)
    if data.get("schema_version") != SCHEMA_VERSION:
        raise CLEARInputError(
            f"unknown bundle schema_version {data.get('schema_version')!r}; this CLEAR reads version {SCHEMA_VERSION}",
            path,
        )
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'manifest'}: {e['msg']}" for e in exc.errors())
        raise CLEARInputError(f"invalid {MANIFEST}: {problems}", path) from exc


def load_state_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str, path) -> None:
    """load_state_dict(strict=True), with missing, unexpected and mis-shaped tensors named in one clear error."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k} {tuple(state[k].shape)} (model {tuple(expected[k].shape)})"
        for k in sorted(set(expected) & set(state))
        if state[k].shape != expected[k].shape
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if items:
            shown = ", ".join(items[:5]) + (f", ... ({len(items)} in all)" if len(items) > 5 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CLEARInputError(f"{what} weights do not fit the model: " + "; ".join(problems), path)
    module.load_state_dict(state, strict=True)


def _build_checked(build, state: dict[str, torch.Tensor], what: str, path) -> nn.Module:
    """Build a module from manifest arguments, first without memory (torch's meta device): arguments that do
    not build it, or that would build far more parameters than the weights file holds (a manifest asking for
    a 9 GB model), are bad input before anything is allocated. Smaller mismatches are named tensor by tensor
    by load_state_strict."""
    available = sum(t.numel() for t in state.values())
    try:
        with torch.device("meta"):
            needed = sum(t.numel() for t in build().state_dict().values())
    except NotImplementedError:  # a model whose initialisation copies data cannot be built on meta
        needed = None
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CLEARInputError(f"{what} do not build the model: {exc}", path) from exc
    if needed is not None and needed > 4 * available + 1_000_000:
        raise CLEARInputError(f"{what} build {needed} values but the weights file holds {available}", path)
    try:
        return build()
    except (TypeError, ValueError, RuntimeError) as exc:  # RuntimeError: out of memory, among others
        raise CLEARInputError(f"{what} do not build the model: {exc}", path) from exc


def _check_tensors(tensors: dict[str, torch.Tensor], path) -> None:
    """Weights with NaN or infinite values would give NaN predictions with a clean exit: refused."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise CLEARInputError(f"tensor {name} has {bad} non-finite values (NaN or infinite)", path)


def load_bundle(path: str | os.PathLike, device: str | torch.device = "cpu") -> Bundle:
    """Load and verify a bundle (schema, checksum, every tensor name and shape). Models are in eval mode."""
    path = Path(path)
    if not path.exists():
        raise CLEARInputError("no such bundle", path)
    raw, read = _read_members(path)
    manifest = _parse_manifest(raw, path)
    try:
        weights = read(manifest.weights.file)
    except (FileNotFoundError, KeyError) as exc:
        raise CLEARInputError(f"weights file {manifest.weights.file} is missing from the bundle", path) from exc
    actual = hashlib.sha256(weights).hexdigest()
    if actual != manifest.weights.sha256:
        raise CLEARInputError(
            f"checksum mismatch for {manifest.weights.file}: manifest says {manifest.weights.sha256}, file is {actual}",
            path,
        )
    try:
        tensors = load_safetensors_bytes(weights)
    except (SafetensorError, ValueError) as exc:
        raise CLEARInputError(f"{manifest.weights.file} is not a valid safetensors file: {exc}", path) from exc
    try:
        entry = encoder_entry(manifest.encoder.architecture)
    except KeyError as exc:
        raise CLEARInputError(str(exc.args[0]), path) from exc
    if entry.kind != ENCODER_KIND[manifest.kind]:
        raise CLEARInputError(f"{entry.name} is a {entry.kind} encoder, but the bundle kind is {manifest.kind}", path)
    encoder_state = {k[len("encoder.") :]: v for k, v in tensors.items() if k.startswith("encoder.")}
    head_state = {k[len("head.") :]: v for k, v in tensors.items() if k.startswith("head.")}
    kwargs = manifest.encoder.kwargs
    encoder = _build_checked(
        lambda: create_encoder(manifest.encoder.architecture, **kwargs),
        encoder_state,
        f"encoder.kwargs {kwargs} of {manifest.encoder.architecture}",
        path,
    )
    if encoder.num_features != manifest.encoder.feature_dim:
        raise CLEARInputError(
            f"encoder gives {encoder.num_features} features, manifest says {manifest.encoder.feature_dim}", path
        )
    other = sorted(k for k in tensors if not k.startswith(("encoder.", "head.")))
    if other:
        raise CLEARInputError(f"unexpected tensors outside encoder.* and head.*: {', '.join(other[:5])}", path)
    load_state_strict(encoder, encoder_state, "encoder", path)
    _check_tensors(tensors, path)
    if tensors_sha256(encoder_state) != manifest.encoder.weights_sha256:
        raise CLEARInputError(
            "the encoder's tensors do not match the manifest's encoder.weights_sha256 (which resumable features "
            "and re-scoring trust); the bundle was altered after it was written",
            path,
        )
    head = None
    if manifest.head is not None:
        spec, feature_dim = manifest.head, manifest.encoder.feature_dim
        what = f"head {spec.type} {spec.kwargs}"
        head = _build_checked(lambda: _head_from_spec(spec, feature_dim), head_state, what, path)
        load_state_strict(head, head_state, "head", path)
    elif head_state:
        raise CLEARInputError(f"head tensors ({', '.join(sorted(head_state)[:3])}) but no head in the manifest", path)
    bundle = Bundle(manifest, encoder.eval(), None if head is None else head.eval(), path)
    return bundle.to(device)
