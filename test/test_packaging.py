"""package.xml and setup.py against what the package imports.

Every third-party module the package imports at run time (vpr_ros/core, data, eval, ros, cli, paths and
the launch files) must map to a dependency: a rosdep key declared in package.xml, or, where
rosdistro has no key, a pip requirement documented in docs/colcon.md. Optional features import
their module inside a function (a clear error when it is missing) and are not exec_depends.

The rosdep keys were checked against ros/rosdistro ``rosdep/python.yaml`` and ``rosdep/base.yaml``
(commit 8468e88, Aug 2026) with ``rosdep install --simulate`` for ubuntu:noble and debian:bookworm
(docs/colcon.md); ROS packages (rclpy, message packages, launch) resolve by name from the kilted
distribution.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: Import name -> rosdep key (the one place this mapping is kept).
ROSDEP_KEYS: dict[str, str] = {
    "numpy": "python3-numpy",
    "cv2": "python3-opencv",
    "yaml": "python3-yaml",
    "tqdm": "python3-tqdm",
    "matplotlib": "python3-matplotlib",
    "faiss": "python3-faiss",
    "torch": "python3-torch",
    "torchvision": "python3-torchvision",
    "rosbags": "python3-rosbags-pip",
    # ROS 2 packages: the key is the package name
    **{name: name for name in (
        "rclpy", "rcl_interfaces", "builtin_interfaces", "std_msgs", "sensor_msgs", "geometry_msgs",
        "nav_msgs", "diagnostic_msgs", "launch", "launch_ros", "ament_index_python", "vpr_ros_msgs")},
}
#: Imports without a rosdep key: the pip requirement docs/colcon.md tells users to install.
PIP_ONLY: dict[str, str] = {"av": "av>=12"}
#: Optional features (imported inside functions only): import -> rosdep key, or None when pip-only.
OPTIONAL: dict[str, str | None] = {
    "onnxruntime": "python3-onnxruntime-pip",
    "onnx": None,
    "timm": "python3-timm-pip",
    "transformers": "python3-transformers-pip",
}
#: Keys of <test_depend> entries (not imports of the package).
TEST_KEYS = {"python3-pytest"}


def _runtime_sources() -> list[Path]:
    pkg = REPO / "vpr_ros"
    rooms = ("core", "data", "eval", "ros", "cli")  # what `vpr-ros` and the nodes run; not training, studies
    files = [pkg / "paths.py", *(f for room in rooms for f in sorted((pkg / room).rglob("*.py")))]
    return [*files, *sorted((REPO / "launch").glob("*.launch.py"))]


def _third_party_imports() -> dict[str, dict[str, list[str]]]:
    """Top-level third-party module -> {"module": [files], "function": [files]} by where it is imported."""
    std = set(sys.stdlib_module_names) | {"__future__"}
    found: dict[str, dict[str, list[str]]] = {}

    def visit(node: ast.AST, where: str, path: str) -> None:
        for child in ast.iter_child_nodes(node):
            scope = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
            inner = "function" if isinstance(child, scope) else where
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and not child.level and child.module:
                names = [child.module]
            for name in names:
                top = name.split(".")[0]
                if top not in std and top != "vpr_ros":
                    found.setdefault(top, {"module": [], "function": []})[where].append(path)
            visit(child, inner, path)

    for path in _runtime_sources():
        visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)), "module",
              str(path.relative_to(REPO)))
    return found


def _package_xml() -> dict[str, set[str]]:
    root = ET.parse(REPO / "package.xml").getroot()
    out: dict[str, set[str]] = {}
    for tag in ("depend", "exec_depend", "build_depend", "test_depend", "buildtool_depend"):
        out[tag] = {(e.text or "").strip() for e in root.findall(tag)}
    return out


def test_every_runtime_import_has_a_dependency() -> None:
    deps = _package_xml()
    runtime = deps["depend"] | deps["exec_depend"]
    problems = []
    for name, where in sorted(_third_party_imports().items()):
        files = sorted(set(where["module"] + where["function"]))
        if name in ROSDEP_KEYS:
            if ROSDEP_KEYS[name] not in runtime:
                problems.append(f"{name} (imported by {files[0]}): package.xml lacks "
                                f"<exec_depend>{ROSDEP_KEYS[name]}</exec_depend>")
        elif name in PIP_ONLY:
            continue  # documented (test_pip_only_requirements_are_documented)
        elif name in OPTIONAL:
            if where["module"]:
                problems.append(f"optional {name} is imported at module level by "
                                f"{sorted(set(where['module']))}; import it where the feature is used")
        else:
            problems.append(f"{name} (imported by {files[0]}) has no dependency entry: add it to "
                            "ROSDEP_KEYS (with a rosdep key in package.xml), PIP_ONLY or OPTIONAL")
    assert not problems, "\n".join(problems)


def test_package_xml_declares_only_known_keys_that_are_used() -> None:
    deps = _package_xml()
    runtime = deps["depend"] | deps["exec_depend"]
    imported = set(_third_party_imports())
    needed = {ROSDEP_KEYS[n] for n in imported if n in ROSDEP_KEYS}
    unknown = sorted(runtime - set(ROSDEP_KEYS.values()))
    assert not unknown, f"package.xml keys with no import mapped to them (unresolvable or stale): {unknown}"
    unused = sorted(runtime - needed)
    assert not unused, f"package.xml exec_depends that nothing imports: {unused}"
    assert deps["test_depend"] <= TEST_KEYS, deps["test_depend"]
    for name in PIP_ONLY:
        assert not any(k.startswith(f"python3-{name}") for k in runtime), \
            f"{name} has no rosdep key; it must not be an exec_depend"


def test_pip_only_requirements_are_documented_and_in_setup_py() -> None:
    doc = (REPO / "docs" / "colcon.md").read_text(encoding="utf-8")
    setup = (REPO / "setup.py").read_text(encoding="utf-8")
    for name, requirement in PIP_ONLY.items():
        assert re.search(rf"pip install [^\n]*{re.escape(requirement)}", doc), \
            f"docs/colcon.md does not give the pip fallback for {name}: pip install {requirement!r}"
        assert f'"{requirement}"' in setup, f"setup.py install_requires lacks {requirement!r}"
    for name, key in ROSDEP_KEYS.items():
        if key.startswith("python3-"):
            assert f"`{key}`" in doc, f"docs/colcon.md's rosdep table lacks {key} ({name})"


def test_setup_py_builds_without_warnings() -> None:
    tree = ast.parse((REPO / "setup.py").read_text(encoding="utf-8"))
    keywords = {kw.arg for node in ast.walk(tree) if isinstance(node, ast.Call) for kw in node.keywords}
    assert "tests_require" not in keywords  # not a setuptools option any more: warns on every build
    proc = subprocess.run([sys.executable, "setup.py", "--version"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "0.1.0"
    assert "Unknown distribution option" not in proc.stderr, proc.stderr

