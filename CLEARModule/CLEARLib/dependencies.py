"""Which of CLEAR's Python requirements are missing in this interpreter (e.g. inside Slicer).

Only reports; the Slicer module asks the user once and installs with slicer.util.pip_install, and
torch comes from the PyTorch extension. Nothing here imports the packages it checks.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
from pathlib import Path

from .resources import module_resource

_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*?)\s*$")


def requirements_path() -> Path:
    return module_resource("requirements.txt")


def read_requirements(path: str | os.PathLike | None = None) -> list[str]:
    lines = Path(path or requirements_path()).read_text().splitlines()
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


def missing_requirements(requirements: list[str] | None = None) -> list[str]:
    """Requirements that are not installed or whose installed version is outside the range."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # without packaging, presence is all that can be checked
        Requirement = None
    missing = []
    for text in requirements if requirements is not None else read_requirements():
        name = _REQUIREMENT.match(text).group(1)
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(text)
            continue
        if Requirement is not None and not Requirement(text).specifier.contains(version, prereleases=True):
            missing.append(text)
    return missing


def torch_available() -> bool:
    try:
        importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True
