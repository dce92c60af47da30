"""Project rules that keep CLEAR easy to change: Slicer packaging lists every file; the engine stays GUI-free."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENGINE = ROOT / "CLEARModule" / "CLEARLib"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_module_cmake_lists_every_engine_file():
    cmake = (ROOT / "CLEARModule" / "CMakeLists.txt").read_text()
    block = re.search(r"set\(MODULE_PYTHON_SCRIPTS(.*?)\)", cmake, re.S).group(1)
    listed = {line.strip() for line in block.splitlines() if line.strip()} - {"${MODULE_NAME}.py"}
    present = {str(p.relative_to(ROOT / "CLEARModule")) for p in ENGINE.rglob("*.py")}
    assert listed == present
    assert (ROOT / "CLEARModule" / "CLEAR.py").exists()
    assert "WITH_GENERIC_TESTS" in cmake


def test_extension_cmake_has_metadata_and_module():
    cmake = (ROOT / "CMakeLists.txt").read_text()
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        assert re.search(rf"set\(EXTENSION_{key} \"[^\"]+\"\)", cmake), key
    assert "add_subdirectory(CLEARModule)" in cmake


def test_engine_never_imports_gui_or_training():
    for path in ENGINE.rglob("*.py"):
        imported = _imports(path)
        assert not imported & {"qt", "ctk", "slicer", "clear_training"}, (path, imported)
