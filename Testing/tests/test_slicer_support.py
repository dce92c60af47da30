"""Model catalog downloads and dependency checks (what the Slicer module builds on)."""

from __future__ import annotations

import json

import pytest

from CLEARLib.catalog import Catalog, catalog_entry_for, fetch, load_catalog
from CLEARLib.dependencies import missing_requirements, read_requirements
from CLEARLib.errors import CLEARInputError


def test_catalog_download_is_verified_and_cached(tmp_path, tiny_case_bundle):
    entry = catalog_entry_for(tiny_case_bundle, url=tiny_case_bundle.resolve().as_uri())
    assert entry.kind == "case" and entry.labels == ["liver", "lung", "bone"] and entry.size > 0
    catalog_path = tmp_path / "models.json"
    catalog_path.write_text(json.dumps({"catalog_version": 1, "models": [entry.model_dump()]}))
    catalog = load_catalog(catalog_path)
    seen = []
    cached = fetch(catalog.entry(entry.name), cache_dir=tmp_path / "cache", progress=lambda f, m: seen.append(f))
    assert cached.read_bytes() == tiny_case_bundle.read_bytes() and seen[-1] == 1.0
    assert fetch(catalog.entry(entry.name), cache_dir=tmp_path / "cache") == cached  # no second download
    tampered = entry.model_copy(update={"sha256": "0" * 64, "version": "9"})
    with pytest.raises(CLEARInputError, match="does not match the catalog"):
        fetch(tampered, cache_dir=tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [cached.name]  # nothing half-written
    with pytest.raises(CLEARInputError, match="no model 'other'"):
        catalog.entry("other")


def test_catalog_entries_stay_in_the_cache_and_downloads_stop_at_their_size(tmp_path, tiny_case_bundle):
    entry = catalog_entry_for(tiny_case_bundle, url=tiny_case_bundle.resolve().as_uri())
    escaping = {**entry.model_dump(), "name": "../../outside"}
    (tmp_path / "bad.json").write_text(json.dumps({"catalog_version": 1, "models": [escaping]}))
    with pytest.raises(CLEARInputError, match="bad.json: invalid model catalog"):
        load_catalog(tmp_path / "bad.json")
    short = entry.model_copy(update={"size": 1000})  # the file is larger than the catalog says
    with pytest.raises(CLEARInputError, match=f"download of {entry.name} exceeds its 1000 bytes"):
        fetch(short, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_shipped_catalog_and_requirements_are_valid():
    assert isinstance(load_catalog(), Catalog)
    requirements = read_requirements()
    assert any(r.startswith("timm") for r in requirements) and not any(r.startswith("torch") for r in requirements)
    assert missing_requirements(requirements) == []  # this environment has them all
    assert missing_requirements(["timm>=999"]) == ["timm>=999"]
    assert missing_requirements(["surely-not-a-package-clear"]) == ["surely-not-a-package-clear"]


def test_requirements_are_what_the_module_imports():
    """requirements.txt lists every third-party package the module imports that Slicer and the PyTorch extension
    do not provide, and nothing it does not use (plugins used through another package are named)."""
    import ast
    import sys
    from pathlib import Path

    module = Path(__file__).resolve().parents[2] / "CLEARModule"
    imported = set()
    for path in [module / "CLEAR.py", *(module / "CLEARLib").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    from_slicer = {
        "slicer",
        "vtk",
        "qt",
        "ctk",
        "numpy",
        "SimpleITK",
        "pydicom",
        "PyTorchUtils",
        "packaging",
        "SampleData",
    }
    from_pytorch_extension = {"torch", "torchvision"}
    optional = {"mamba_ssm"}  # VMamba's CUDA kernel where it is installed; the torch path runs without it
    third_party = imported - set(sys.stdlib_module_names) - from_slicer - from_pytorch_extension - optional
    third_party -= {"CLEARLib"}
    import_name = {"pylibjpeg-openjpeg": "openjpeg", "pillow": "PIL"}
    listed = {import_name.get(name, name) for name in (r.split(">")[0].split("<")[0] for r in read_requirements())}
    plugins = {"onnx", "pylibjpeg", "openjpeg"}  # used by torch.onnx and pydicom, never imported by name
    assert third_party <= listed, f"imported but not in requirements.txt: {sorted(third_party - listed)}"
    assert listed - plugins <= third_party, f"listed but never imported: {sorted(listed - plugins - third_party)}"


def test_host_and_torch_checks(monkeypatch):
    from CLEARLib import dependencies

    assert dependencies.host_problem((5, 10), (3, 12)) is None
    assert "needs 3D Slicer 5.10 or later" in dependencies.host_problem((5, 8), (3, 9))
    assert "this is Slicer 5.8 with Python 3.9" in dependencies.host_problem((5, 8), (3, 9))
    assert dependencies.torch_problem() is None  # the torch of this environment is recent enough
    monkeypatch.setattr(dependencies, "MIN_TORCH", "99.0")
    assert "CLEAR needs PyTorch 99.0 or later" in dependencies.torch_problem()


def test_the_install_cannot_replace_torch(tmp_path):
    """pip under CLEAR's constraints refuses a request that would change the installed torch, instead of
    replacing the torch Slicer has loaded."""
    import importlib.metadata
    import subprocess
    import sys

    from CLEARLib.dependencies import needs_restart, pip_arguments

    arguments = pip_arguments(["torch==0.1"], tmp_path / "constraints.txt")
    pins = (tmp_path / "constraints.txt").read_text().splitlines()
    assert f"torch=={importlib.metadata.version('torch')}" in pins
    assert f"numpy=={importlib.metadata.version('numpy')}" in pins
    refused = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", *arguments],
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0 and "torch" in refused.stderr
    assert needs_restart(["pandas>=2"]) and not needs_restart(["surely-not-a-package-clear>=1"])


def test_a_cancelled_download_leaves_nothing_in_the_cache(tmp_path, tiny_case_bundle):
    from CLEARLib.errors import CLEARCancelled

    entry = catalog_entry_for(tiny_case_bundle, url=tiny_case_bundle.resolve().as_uri())
    with pytest.raises(CLEARCancelled):
        fetch(entry, cache_dir=tmp_path / "cache", cancel=lambda: True)
    assert list((tmp_path / "cache").iterdir()) == []
    assert fetch(entry, cache_dir=tmp_path / "cache", cancel=lambda: False).exists()
