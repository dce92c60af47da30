"""Which of CLEAR's Python requirements are missing in this interpreter (e.g. inside Slicer), and how to install
them without touching what Slicer and the PyTorch extension installed.

The Slicer module asks the user once and installs with slicer.util.pip_install; torch comes from the PyTorch
extension. pip resolves like any pip: timm or monai could upgrade torch under a running Slicer, so the
install is constrained to the torch, torchvision and numpy that are installed. Nothing here imports the
packages it checks.
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


# What CLEAR needs of its host: Slicer 5.10 ships Python 3.12 (5.8 ships 3.9, which CLEAR does not run on).
MIN_SLICER = (5, 10)
MIN_PYTHON = (3, 11)
MIN_TORCH = "2.4"
PROTECTED = ("torch", "torchvision", "numpy")  # never upgraded or replaced by CLEAR's install


def host_problem(slicer_version: tuple[int, int], python_version: tuple[int, int]) -> str | None:
    """Why this Slicer cannot run CLEAR, or None."""
    if tuple(slicer_version) < MIN_SLICER or tuple(python_version) < MIN_PYTHON:
        have = f"Slicer {slicer_version[0]}.{slicer_version[1]} with Python {python_version[0]}.{python_version[1]}"
        return (
            f"CLEAR needs 3D Slicer {MIN_SLICER[0]}.{MIN_SLICER[1]} or later (Python {MIN_PYTHON[0]}."
            f"{MIN_PYTHON[1]}+); this is {have}. Install a current Slicer from download.slicer.org."
        )
    return None


def torch_problem() -> str | None:
    """Why the installed torch cannot run CLEAR (missing, or older than MIN_TORCH), or None."""
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "PyTorch is not installed: install the 'PyTorch' extension from the Extensions Manager"
    if _version_tuple(version) < _version_tuple(MIN_TORCH):
        return (
            f"CLEAR needs PyTorch {MIN_TORCH} or later; {version} is installed. Install a newer one with the "
            "PyTorch extension (PyTorch Utils module), then restart Slicer"
        )
    return None


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def protected_constraints() -> list[str]:
    """`name==version` of the installed packages pip must not touch."""
    pins = []
    for name in PROTECTED:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return pins


def pip_arguments(missing: list[str], constraints_file: str | os.PathLike) -> list[str]:
    """pip install arguments for `missing`, constrained so that torch, torchvision and numpy stay as they
    are (writes `constraints_file`): a requirement that needs another torch fails with pip's message instead
    of replacing the torch Slicer has loaded."""
    Path(constraints_file).write_text("".join(pin + "\n" for pin in protected_constraints()))
    return ["--constraint", str(constraints_file), *missing]


def needs_restart(installed: list[str]) -> bool:
    """Whether a package just installed or upgraded was imported already (Slicer must restart to load it)."""
    import sys

    names = {_REQUIREMENT.match(text).group(1).lower().replace("_", "-") for text in installed}
    owners = importlib.metadata.packages_distributions()  # top-level module -> distributions
    for module in {name.split(".")[0] for name in list(sys.modules)}:
        if any(dist.lower().replace("_", "-") in names for dist in owners.get(module, ())):
            return True
    return False
