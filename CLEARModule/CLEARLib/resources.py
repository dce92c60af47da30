"""The module's run-time resources (CLEARModule/Resources/: model catalog, Slicer-side requirements).

They sit beside the module in the source tree and, as MODULE_PYTHON_RESOURCES, in every Slicer build and
install, so there is one place to look.
"""

from __future__ import annotations

from pathlib import Path

RESOURCES = Path(__file__).resolve().parents[1] / "Resources"


def module_resource(name: str) -> Path:
    path = RESOURCES / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: a resource of the CLEAR module is missing; reinstall the extension")
    return path
