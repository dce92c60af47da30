"""Models: slice encoders (MambaOut, ViT with conv stem, VMamba), the FMCIB lesion encoder, ABMIL and heads."""

from .abmil import (
    ABMIL,
    TASKS,
    ABMILEnsemble,
    LinearHead,
    attention_columns,
    attention_of_labels,
    label_attention,
    probabilities,
)
from .encoders import (
    IMAGENET_SPEC,
    create_encoder,
    encoder_entry,
    list_encoders,
    register_encoder,
    sincos_2d_position_embedding,
)
from .selective_scan import cuda_kernel_available, selective_scan, selective_scan_torch

__all__ = [
    "ABMIL",
    "ABMILEnsemble",
    "IMAGENET_SPEC",
    "TASKS",
    "LinearHead",
    "attention_columns",
    "attention_of_labels",
    "create_encoder",
    "cuda_kernel_available",
    "encoder_entry",
    "label_attention",
    "list_encoders",
    "probabilities",
    "register_encoder",
    "selective_scan",
    "selective_scan_torch",
    "sincos_2d_position_embedding",
]
