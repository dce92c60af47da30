"""Preprocessing: HU windows and lazy slice instances for 2D encoders; FMCIB lesion patches for the 3D encoder."""

from .lesion import (
    extract_lesion_patch,
    fmcib_grid,
    fmcib_reference_patch,
    lesion_patch_centre,
    normalize_hu,
    seed_to_lps,
)
from .slices import WINDOWS, InputSpec, InstanceBatch, SliceInstances, Window, resolve_window, resolve_windows

__all__ = [
    "WINDOWS",
    "InputSpec",
    "InstanceBatch",
    "SliceInstances",
    "Window",
    "extract_lesion_patch",
    "fmcib_grid",
    "fmcib_reference_patch",
    "lesion_patch_centre",
    "normalize_hu",
    "resolve_window",
    "resolve_windows",
    "seed_to_lps",
]
