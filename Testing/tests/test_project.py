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


def _cmake_list(cmake: str, variable: str) -> set[str]:
    block = re.search(rf"set\({variable}(.*?)\)", cmake, re.S).group(1)
    return {line.strip().replace("${MODULE_NAME}", "CLEAR") for line in block.splitlines() if line.strip()}


def test_module_cmake_lists_every_engine_file_and_resource():
    module = ROOT / "CLEARModule"
    cmake = (module / "CMakeLists.txt").read_text()
    scripts = _cmake_list(cmake, "MODULE_PYTHON_SCRIPTS")
    present = {str(p.relative_to(module)) for p in ENGINE.rglob("*.py")} | {"CLEAR.py"}
    assert scripts == present
    resources = _cmake_list(cmake, "MODULE_PYTHON_RESOURCES")
    assert resources == {
        "Resources/Icons/CLEAR.png",
        "Resources/UI/CLEAR.ui",
        "Resources/models.json",
        "Resources/requirements.txt",
    }
    assert all((module / r).is_file() for r in resources)
    assert "configure_file" not in cmake  # resources travel with the module, no copy step
    assert "WITH_GENERIC_TESTS" in cmake


def test_extension_cmake_has_metadata_and_module():
    cmake = (ROOT / "CMakeLists.txt").read_text()
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        assert re.search(rf"set\(EXTENSION_{key} \"[^\"]+\"\)", cmake), key
    assert "add_subdirectory(CLEARModule)" in cmake


def test_engine_never_imports_gui_or_training():
    for path in ENGINE.rglob("*.py"):
        imported = _imports(path)
        # The MRML glue and the slice-view renderer may use the slicer MRML API (slicer-core) and VTK; nothing in
        # CLEARLib uses qt, ctk or training.
        mrml_level = path.name in ("mrml.py", "render.py")
        forbidden = {"qt", "ctk", "clear_training"} | (set() if mrml_level else {"slicer", "vtk"})
        assert not imported & forbidden, (path, imported & forbidden)


def _ui_widgets() -> dict[str, tuple[str, str | None]]:
    """name -> (class, SlicerParameterName) of every widget in CLEAR.ui."""
    import xml.etree.ElementTree as ET

    tree = ET.parse(ROOT / "CLEARModule" / "Resources" / "UI" / "CLEAR.ui")
    widgets = {}
    for w in tree.iter("widget"):
        param = None
        for prop in w.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                param = prop.find("string").text
        widgets[w.get("name")] = (w.get("class"), param)
    return widgets


def test_widget_names_in_clear_py_match_the_ui():
    source = (ROOT / "CLEARModule" / "CLEAR.py").read_text()
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    widgets = _ui_widgets()
    assert used, "CLEAR.py uses no widgets?"
    assert used <= set(widgets), sorted(used - set(widgets))
    passive = {"QLabel", "ctkCollapsibleButton", "qMRMLWidget"}
    unused = [
        name for name, (cls, param) in widgets.items() if cls not in passive and name not in used and param is None
    ]
    assert not unused, f"controls in CLEAR.ui that nothing uses: {unused}"
    # Labels that CLEAR.py writes to exist too; every parameter binding names a parameter-node field.
    tree = ast.parse(source)
    parameter_class = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "CLEARParameterNode")
    fields = {n.target.id for n in parameter_class.body if isinstance(n, ast.AnnAssign)}
    bound = {param for _, param in widgets.values() if param}
    # path fields the widget syncs itself (PATH_FIELDS in CLEAR.py), each with its line edit in the .ui
    synced = ast.literal_eval(re.search(r"^PATH_FIELDS = (\{.*?\})$", source, re.M).group(1))
    assert set(synced.values()) <= set(widgets) and not set(synced) & bound
    assert bound | set(synced) == fields, (sorted(bound - fields), sorted(fields - bound - set(synced)))
