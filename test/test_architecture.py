"""The three rooms and their one-way doors: ros -> core <- training.

core never imports rclpy, ROS message packages, vpr_ros.ros or vpr_ros.training;
training never imports rclpy or vpr_ros.ros.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "vpr_ros"
ROS_MODULES = ("rclpy", "sensor_msgs", "std_msgs", "geometry_msgs", "nav_msgs", "vpr_ros_msgs",
               "builtin_interfaces", "launch", "launch_ros", "diagnostic_msgs")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # resolve relative imports against the file's package
                parts = path.relative_to(PKG.parent).with_suffix("").parts[: -node.level]
                base = ".".join(parts)
                names.add(f"{base}.{node.module}" if node.module else base)
            elif node.module:
                names.add(node.module)
    return names


def _violations(room: str, forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for path in sorted((PKG / room).rglob("*.py")):
        for name in _imports(path):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(PKG.parent)} imports {name}")
    return bad


def test_core_imports_nothing_from_ros_or_training():
    assert _violations("core", (*ROS_MODULES, "vpr_ros.ros", "vpr_ros.training")) == []


def test_training_imports_nothing_from_ros():
    if not (PKG / "training").is_dir():
        pytest.skip("no training package yet")
    assert _violations("training", (*ROS_MODULES, "vpr_ros.ros")) == []


def test_every_core_module_imports_with_rclpy_unavailable():
    modules = sorted(
        ".".join(p.relative_to(PKG.parent).with_suffix("").parts)
        for p in (PKG / "core").rglob("*.py") if p.name != "__init__.py"
    )
    code = (
        "import sys, importlib\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {ROS_MODULES!r}: raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print('ok', len(sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")
