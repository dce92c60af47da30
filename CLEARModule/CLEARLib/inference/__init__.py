"""Inference: whole cases (slice encoder + ABMIL) and lesion seeds (FMCIB 3D ResNet50); one code path for all."""

from .case import CasePredictor, CaseResult
from .lesion import STABILITY_VARIANCE_VOXELS, LesionPredictor, LesionResult
from .runtime import resolve_device

__all__ = [
    "STABILITY_VARIANCE_VOXELS",
    "CasePredictor",
    "CaseResult",
    "LesionPredictor",
    "LesionResult",
    "resolve_device",
]
