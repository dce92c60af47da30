"""Model bundles: manifest.json + safetensors weights, in a folder or a .zip; strict loading, never unpickled."""

from .manifest import SCHEMA_VERSION, Manifest, manifest_schema
from .store import Bundle, load_bundle, load_state_strict, read_manifest, save_bundle, tensors_sha256

__all__ = [
    "SCHEMA_VERSION",
    "Bundle",
    "Manifest",
    "load_bundle",
    "load_state_strict",
    "manifest_schema",
    "read_manifest",
    "save_bundle",
    "tensors_sha256",
]
