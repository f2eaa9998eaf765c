"""The rooms of vpr_ros and their one-way doors, checked on the source (docs/architecture.md draws them).

    paths  <-  core  <-  data  <-  eval  <-  training  <-  studies  <-  cli
                  ^        ^         ^                                    |
                  +------- ros ------+------------------------------------+

* core (what a robot runs) imports only core and paths; no ROS anywhere outside ros/;
* nothing imports studies/ or cli/ (the command line and scripts call them);
* no import cycles between modules, counting imports inside functions too;
* imports inside functions only for optional or heavy third-party packages (and the CLI's lazy
  subcommands), never to dodge a cycle; every module opens with a docstring.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "vpr_ros"
ROS_MODULES = ("rclpy", "sensor_msgs", "std_msgs", "geometry_msgs", "nav_msgs", "vpr_ros_msgs",
               "builtin_interfaces", "launch", "launch_ros", "diagnostic_msgs", "rosidl_runtime_py")
#: room -> the rooms it may import (itself included); ``vpr_ros`` is the top package (its version).
DOORS: dict[str, set[str]] = {
    "paths": {"paths"},
    "core": {"core", "paths"},
    "data": {"data", "core", "paths"},
    "eval": {"eval", "data", "core", "paths"},
    "training": {"training", "eval", "data", "core", "paths"},
    "studies": {"studies", "training", "eval", "data", "core", "paths"},
    "ros": {"ros", "eval", "data", "core", "paths"},
    "cli": {"cli", "ros", "studies", "training", "eval", "data", "core", "paths"},
}
#: Third-party packages a function may import lazily: optional extras or heavy to import.
LAZY_OK = {"torch", "torchvision", "onnx", "onnxruntime", "timm", "transformers", "matplotlib", "tensorboard",
           "av", "rosbags", "PIL", "tqdm", "faiss", "cv2", "scipy", *ROS_MODULES}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> list[tuple[str, bool, int]]:
    """(imported module, inside a function?, line) for every import of ``path``; ``from p import m``
    counts as importing submodule ``p.m`` when that is a module of the package."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    parents: dict[ast.AST, ast.AST] = {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}

    def in_function(node: ast.AST) -> bool:
        while node in parents:
            node = parents[node]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                return True
        return False

    out = []
    package = ".".join(path.relative_to(PKG.parent).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, in_function(node), node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub if sub in MODULES else base, in_function(node), node.lineno))
    return out


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "vpr_ros" else None


def test_every_room_imports_only_through_its_doors():
    bad = []
    for module, path in MODULES.items():
        room = _room(module)
        if room is None:
            continue
        for name, _, line in _imports(path):
            target = _room(name)
            if target is not None and target not in DOORS[room]:
                bad.append(f"{path.relative_to(PKG.parent)}:{line} ({room}) imports {name} ({target})")
            if room != "ros" and name.split(".")[0] in ROS_MODULES:
                bad.append(f"{path.relative_to(PKG.parent)}:{line} imports {name}: only ros/ may use ROS")
    assert bad == []


def test_doors_table_covers_every_room():
    rooms = {_room(m) for m in MODULES} - {None, "weights"}
    assert rooms <= set(DOORS), rooms - set(DOORS)
    for room, allowed in DOORS.items():  # nothing but the CLI may import studies/ or cli/
        assert room in ("cli", "studies") or not allowed & {"studies", "cli"}, room
    assert "cli" not in DOORS["studies"]


def test_no_import_cycles():
    graph = {m: {n for n, _, _ in _imports(p) if n in MODULES and n != m} for m, p in MODULES.items()}
    for pkg in list(graph):  # a package's __init__ is not an edge target for its own submodules' imports
        graph[pkg] -= {pkg}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == []


def test_function_level_imports_are_only_for_heavy_or_optional_packages():
    bad = []
    for module, path in MODULES.items():
        for name, inside, line in _imports(path):
            if not inside:
                continue
            top = name.split(".")[0]
            if top == "vpr_ros":
                if _room(module) != "cli":  # the CLI imports a subcommand's modules when it runs
                    bad.append(f"{path.relative_to(PKG.parent)}:{line} imports {name} inside a function")
            elif top not in LAZY_OK:
                bad.append(f"{path.relative_to(PKG.parent)}:{line} imports {name} inside a function")
    assert bad == []


def test_every_module_opens_with_a_docstring():
    missing = [str(p.relative_to(PKG.parent)) for p in MODULES.values()
               if not ast.get_docstring(ast.parse(p.read_text(encoding="utf-8")))]
    assert missing == []


HISTORY = re.compile(r"\b[Ii]ssue\s*#?\d+|\bformerly\b|\bmoved (?:here )?from\b|\bwas renamed\b")


def test_comments_and_docstrings_say_what_not_history():
    bad = []
    for path in MODULES.values():
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if HISTORY.search(line):
                bad.append(f"{path.relative_to(PKG.parent)}:{i}: {line.strip()}")
    assert bad == []


def test_every_core_module_imports_with_rclpy_unavailable():
    modules = sorted(m for m in MODULES if _room(m) in ("core", "data", "eval", "paths"))
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


def test_cli_help_is_light():
    """`vpr-ros --help` answers without importing torch or rclpy (subcommands import what they need)."""
    code = ("import sys, contextlib, io\n"
            "from vpr_ros.cli.main import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try: main(['--help'])\n"
            "    except SystemExit: pass\n"
            "print(sorted(m for m in ('torch', 'rclpy') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
