"""Where the extension-level files (CLEARExtension/: model catalog, Slicer requirements) are found:
in a Slicer build or install they are copied next to the module (Resources/CLEARExtension/, see
CLEARModule/CMakeLists.txt); in a source checkout they are read from CLEARExtension/ itself."""

from __future__ import annotations

from pathlib import Path

_LIB = Path(__file__).resolve().parent


def extension_file(name: str) -> Path:
    candidates = [_LIB.parent / "Resources" / "CLEARExtension" / name, _LIB.parents[1] / "CLEARExtension" / name]
    for path in candidates:
        if path.exists():
            return path
    raise FileNotFoundError(f"{name} not found; looked in {', '.join(str(p.parent) for p in candidates)}")
