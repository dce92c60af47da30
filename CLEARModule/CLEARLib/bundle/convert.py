"""Converters from foreign checkpoints to bundles. Checkpoints are read with torch.load(weights_only=True):
tensors and plain containers only, never arbitrary pickled objects.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors_file

from ..catalog import sha256_of
from ..errors import CLEARInputError
from ..models import create_encoder, encoder_entry
from .store import load_state_strict, save_bundle

# Heads that pretraining puts on the encoder (projector, predictor, classifier); never part of an encoder.
_TRAINING_HEAD_PREFIXES = ("head.", "fc.", "projector.", "predictor.")
# timm MambaOut's ImageNet classifier: the MLP after the pooled norm. CLEAR's embedding is the pooled norm.
_MAMBAOUT_CLASSIFIER_PREFIXES = ("head.pre_logits.", "head.fc.")


def _load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise CLEARInputError("no such checkpoint file", path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CLEARInputError(
            f"cannot read the checkpoint with torch.load(weights_only=True) (it may hold pickled objects, "
            f"which CLEAR never loads): {str(exc).strip().splitlines()[0]}",
            path,
        ) from exc
    if not isinstance(checkpoint, dict):
        raise CLEARInputError(f"expected a dict checkpoint, got {type(checkpoint).__name__}", path)
    return checkpoint


def _tensors_only(state: dict, path: Path) -> dict[str, torch.Tensor]:
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CLEARInputError(f"non-tensor entries in the state dict: {', '.join(map(str, bad[:5]))}", path)
    return state


def _state_dict_of(checkpoint: dict, path: Path, keys=("state_dict", "model")) -> dict:
    """The state dict inside a training checkpoint (the first of `keys` present), or the checkpoint itself."""
    state = next((checkpoint[k] for k in keys if k in checkpoint), checkpoint)
    if not isinstance(state, dict):
        raise CLEARInputError("the checkpoint's state dict is not a dict", path)
    return state


def _save_slice_encoder(out, encoder, architecture: str, name: str, windows, input_size: int, description: str,
                        provenance: dict) -> Path:  # fmt: skip
    """An encoder-only case bundle of converted weights, with the encoder's own normalisation at `input_size`."""
    return save_bundle(
        out,
        name=name,
        kind="case",
        encoder=encoder,
        windows=windows,
        input_spec=encoder_entry(architecture).spec_at(input_size),
        description=description,
        provenance=provenance,
    )


def fmcib_trunk_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The trunk weights of FMCIB's `model_weights.torch`: `trunk_state_dict`, or `state_dict` with `model.trunk.`."""
    path = Path(path)
    checkpoint = _load_checkpoint(path)
    if "trunk_state_dict" in checkpoint:
        return _tensors_only(dict(checkpoint["trunk_state_dict"]), path)
    if "state_dict" in checkpoint:
        prefix = "model.trunk."
        state = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
        if not state:
            raise CLEARInputError(f"state_dict holds no '{prefix}*' tensors; is this an FMCIB checkpoint?", path)
        return _tensors_only(state, path)
    raise CLEARInputError(
        f"neither 'trunk_state_dict' nor 'state_dict' in the checkpoint (keys: {', '.join(list(checkpoint)[:8])})",
        path,
    )


def convert_fmcib(
    weights: str | os.PathLike, out: str | os.PathLike, name: str = "fmcib-foundation", provenance: dict | None = None
) -> Path:
    """FMCIB's published foundation weights into a lesion bundle (features only), every key matched.
    `provenance` adds to what the manifest records (where the file came from, its sha256, its license)."""
    encoder = create_encoder("fmcib_resnet50")
    load_state_strict(encoder.trunk, fmcib_trunk_state(weights), "FMCIB trunk", weights)
    return save_bundle(
        out,
        name=name,
        kind="lesion",
        encoder=encoder,
        description="FMCIB foundation model (Pai et al. 2024): 4096-d lesion features from a 50 mm patch",
        provenance={"converted_from": Path(weights).name, "converter": "fmcib", **(provenance or {})},
    )


def moco_encoder_state(path: str | os.PathLike, encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base encoder of a MoCo v3 / CLEAR pretraining checkpoint, keyed for `encoder`.

    Accepts `state_dict`, `model` or a bare state dict; keeps `module.base_encoder.*` (or
    `base_encoder.*`), drops the momentum encoder and the projector/predictor heads.
    """
    path = Path(path)
    state = _state_dict_of(_load_checkpoint(path), path)
    for prefix in ("module.base_encoder.", "base_encoder."):
        base = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if base:
            break
    else:
        raise CLEARInputError("no 'module.base_encoder.*' or 'base_encoder.*' tensors in the checkpoint", path)
    expected = set(encoder.state_dict())
    # CLEAR's wrappers hold the network as `.model`; MoCo checkpoints name its tensors without that prefix.
    wrapped = all(k.startswith("model.") for k in expected)
    renamed = {(f"model.{k}" if wrapped and not k.startswith("model.") else k): v for k, v in base.items()}
    dropped = [k for k in renamed if k not in expected and k.split("model.", 1)[-1].startswith(_TRAINING_HEAD_PREFIXES)]
    return _tensors_only({k: v for k, v in renamed.items() if k not in dropped}, path)


def convert_moco(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    architecture: str,
    name: str | None = None,
    windows=("abdomen", "lung"),
    input_size: int = 224,
    encoder_kwargs: dict | None = None,
) -> Path:
    """A MoCo v3 / CLEAR pretraining checkpoint into an encoder-only case bundle (features, no head)."""
    entry = encoder_entry(architecture)
    if entry.kind != "slice":
        raise ValueError(f"{architecture} is not a slice encoder")
    encoder = create_encoder(architecture, **entry.build_kwargs(encoder_kwargs, input_size))
    load_state_strict(encoder, moco_encoder_state(checkpoint, encoder), f"{architecture} encoder", checkpoint)
    return _save_slice_encoder(
        out,
        encoder,
        architecture,
        name or f"{architecture}-{Path(checkpoint).stem}",
        windows,
        input_size,
        f"{architecture} slice encoder from a contrastive pretraining checkpoint (no head)",
        {"converted_from": Path(checkpoint).name, "converter": "moco"},
    )


def mambaout_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], list[str]]:
    """MambaOut weights in timm's layout, without the ImageNet classifier: (state, dropped key names).

    Reads timm's `model.safetensors` (safetensors, no pickle) or a torch checkpoint in timm's or the
    original MambaOut repository's layout (`model`/`state_dict` wrappers, `downsample_layers.*`,
    `stages.i.j.*`), renamed by timm's own `checkpoint_filter_fn`.
    """
    from timm.models.mambaout import checkpoint_filter_fn

    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise CLEARInputError("no such weights file", path)
        try:
            state = load_safetensors_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CLEARInputError(f"not a valid safetensors file: {exc}", path) from exc
    else:
        state = _state_dict_of(_load_checkpoint(path), path)
    state = checkpoint_filter_fn(_tensors_only(dict(state), path), None)
    dropped = sorted(k for k in state if k.startswith(_MAMBAOUT_CLASSIFIER_PREFIXES))
    return {k: v for k, v in state.items() if k not in dropped}, dropped


def convert_mambaout(
    weights: str | os.PathLike,
    out: str | os.PathLike,
    architecture: str = "mambaout_tiny",
    name: str | None = None,
    windows=("abdomen", "lung"),
    input_size: int = 224,
    encoder_kwargs: dict | None = None,
    provenance: dict | None = None,
) -> Path:
    """MambaOut weights (timm's ImageNet `mambaout_*.in1k` files, or the original repository's
    checkpoints) into an encoder-only case bundle: the classifier's keys are dropped by name, every
    other key must match the encoder exactly. ImageNet normalisation, as the weights were trained."""
    if not architecture.startswith("mambaout_"):
        raise CLEARInputError(f"{architecture} is not a MambaOut encoder; use one of mambaout_femto ... mambaout_base")
    encoder_entry(architecture)
    state, dropped = mambaout_state(weights)
    return _convert_foreign(weights, state, dropped, out, architecture, "mambaout", name, windows, input_size,
                            encoder_kwargs, provenance)  # fmt: skip


# Official VMamba (MzeroMiko/VMamba) names -> CLEAR's VSSM names. Older checkpoints' names are first
# brought to the current ones, as the official `VSSM._load_from_state_dict` does.
_VMAMBA_LEGACY = (
    (r"^patch_embed\.proj\.", "patch_embed.0."),
    (r"^patch_embed\.norm\.", "patch_embed.2."),
    (r"\.ln_1\.", ".norm."),
    (r"\.self_attention\.", ".op."),
    (r"^norm\.", "classifier.norm."),
    (r"^head\.", "classifier.head."),
)
_VMAMBA_RENAMES = (
    (r"^patch_embed\.2\.", "patch_norm."),
    (r"^layers\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2."),
    (r"^layers\.(\d+)\.downsample\.1\.", r"downsamples.\1.conv."),
    (r"^layers\.(\d+)\.downsample\.3\.", r"downsamples.\1.norm."),
    (r"^classifier\.norm\.", "norm."),
)


def vmamba_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], list[str]]:
    """An official VMamba checkpoint (`model` or `state_dict` wrapper, or bare) in CLEAR's names, without
    the ImageNet classifier: (state, dropped key names)."""
    import re

    path = Path(path)
    state = _tensors_only(dict(_state_dict_of(_load_checkpoint(path), path, keys=("model", "state_dict"))), path)
    renamed, dropped = {}, []
    for key, value in state.items():
        for pattern, replacement in _VMAMBA_LEGACY + _VMAMBA_RENAMES:
            key = re.sub(pattern, replacement, key)
        if key.startswith("classifier.head."):
            dropped.append(key)
            continue
        renamed[key] = value
    return renamed, sorted(dropped)


def convert_vmamba(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    architecture: str = "vmamba_v2",
    name: str | None = None,
    windows=("abdomen", "lung"),
    input_size: int = 224,
    encoder_kwargs: dict | None = None,
) -> Path:
    """An official VMamba checkpoint (MzeroMiko/VMamba, `VSSM()` layout) into an encoder-only case bundle:
    renamed to CLEAR's modules, the classifier dropped by name, every other key strict."""
    if not architecture.startswith("vmamba"):
        raise CLEARInputError(f"{architecture} is not a VMamba encoder; use vmamba_v2 or vmamba_tiny")
    encoder_entry(architecture)
    state, dropped = vmamba_state(checkpoint)
    return _convert_foreign(checkpoint, state, dropped, out, architecture, "vmamba", name, windows, input_size,
                            encoder_kwargs)  # fmt: skip


def _convert_foreign(source, state, dropped, out, architecture, converter, name, windows, input_size, encoder_kwargs,
                     provenance=None):  # fmt: skip
    """Published weights already renamed to the encoder's network (`.model` inside CLEAR's wrapper), their
    classifier dropped: load every key strictly and save the encoder-only bundle, recording the source."""
    source = Path(source)
    encoder = create_encoder(architecture, **(encoder_kwargs or {}))
    load_state_strict(encoder, {f"model.{k}": v for k, v in state.items()}, f"{architecture} encoder", source)
    return _save_slice_encoder(
        out,
        encoder,
        architecture,
        name or f"{architecture}-{source.stem}",
        windows,
        input_size,
        f"{architecture} slice encoder from {source.name} (pooled, normed features; no head)",
        {
            "converted_from": source.name,
            "source_sha256": sha256_of(source),
            "converter": converter,
            "dropped_classifier_keys": dropped,
            **(provenance or {}),
        },
    )
