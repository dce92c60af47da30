"""From CLEAR's own training checkpoints to engine bundles: the trainer's modules are saved directly.

Foreign checkpoints (MoCo v3's, FMCIB's, timm's) go through CLEARLib.bundle.convert instead, which has to
guess key prefixes; CLEAR's checkpoints carry their config, so nothing is guessed here.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from CLEARLib.bundle import load_state_strict, save_bundle
from CLEARLib.errors import CLEARInputError
from CLEARLib.models import LinearHead, create_encoder, encoder_entry

from .trainer import CHECKPOINT_FORMAT


def read_checkpoint(path: str | os.PathLike) -> dict:
    """A CLEAR training checkpoint (never unpickled: tensors and plain data only), checked for its format."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or "config" not in state:
        raise CLEARInputError(
            f"not a CLEAR training checkpoint (no {CHECKPOINT_FORMAT!r} format with its config); "
            "for MoCo v3 or other foreign checkpoints use clear-ct convert",
            path,
        )
    return state


def _module_state(weights: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}


def export_encoder(checkpoint: str | os.PathLike, out: str | os.PathLike, name: str | None = None) -> Path:
    """The base encoder of a MoCo v3 / LeCL pretraining checkpoint as an encoder-only case bundle, with the
    windows and input size it was trained with and its registry normalisation (the training views' own)."""
    state = read_checkpoint(checkpoint)
    config = state["config"]
    architecture, image_size = config["model"]["encoder"], config["data"]["image_size"]
    entry = encoder_entry(architecture)
    encoder = create_encoder(architecture, **entry.build_kwargs(config["model"]["encoder_kwargs"], image_size))
    load_state_strict(encoder, _module_state(state["state_dict"], "base_encoder."), "base encoder", checkpoint)
    method = config["method"]
    trained = f"{method['name']}" + (f", lambda {method['lam']}" if method["name"] == "lecl" else "")
    return save_bundle(
        out,
        name=name or config["run"]["name"],
        kind="case",
        encoder=encoder,
        windows=config["data"]["windows"],
        input_spec=entry.spec_at(image_size),
        description=f"{architecture} pretrained with CLEAR ({trained})",
        provenance={"checkpoint": Path(checkpoint).name, "global_step": state.get("global_step")},
    )


def export_lesion_bundle(checkpoint: str | os.PathLike, out: str | os.PathLike, name: str | None = None) -> Path:
    """A lesion pretraining or fine-tuning checkpoint as a lesion bundle (with its head when fine-tuned)."""
    state = read_checkpoint(checkpoint)
    config = state["config"]
    weights = state["state_dict"]
    encoder = create_encoder("fmcib_resnet50", **config["model"].get("encoder_kwargs", {}))
    load_state_strict(encoder, _module_state(weights, "encoder."), "lesion encoder", checkpoint)
    head, labels, task = None, None, None
    head_state = _module_state(weights, "head.")
    if head_state:
        classes = state.get("classes") or [str(i) for i in range(head_state["fc.weight"].shape[0])]
        head = LinearHead(encoder.num_features, len(classes))
        load_state_strict(head, head_state, "lesion head", checkpoint)
        labels, task = list(classes), "multiclass"
    return save_bundle(
        out,
        name=name or config["run"]["name"],
        kind="lesion",
        encoder=encoder,
        head=head,
        labels=labels,
        task=task,
        description="FMCIB-style lesion model trained with CLEAR (SimCLR pretraining"
        + (", fine-tuned)" if head else ")"),
        provenance={"checkpoint": Path(checkpoint).name, "global_step": state.get("global_step")},
    )
