"""launch/localize.launch.py: required nodes, launch arguments.

``launch`` / ``launch_ros`` have no PyPI wheels, so most checks read the launch file's syntax
tree; the run of the real launch file skips unless launch_ros and an ament install of vpr_ros
(colcon, docs/colcon.md) are importable.
"""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch" / "localize.launch.py"
TREE = ast.parse(LAUNCH.read_text(encoding="utf-8"), filename=str(LAUNCH))


def _functions() -> dict[str, ast.FunctionDef]:
    return {n.name: n for n in TREE.body if isinstance(n, ast.FunctionDef)}


def _dict_keys(name: str) -> dict[str, ast.expr]:
    """Keys -> values of every dict literal assigned to ``name`` in the module."""
    out: dict[str, ast.expr] = {}
    for node in ast.walk(TREE):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict) \
                and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            out.update({k.value: v for k, v in zip(node.value.keys, node.value.values, strict=True)
                        if isinstance(k, ast.Constant)})
    return out


def _calls(name: str) -> list[ast.Call]:
    return [n for n in ast.walk(TREE) if isinstance(n, ast.Call)
            and isinstance(n.func, ast.Name) and n.func.id == name]


# --------------------------------------------------------------------------- required nodes


def test_every_node_is_required():
    """Each Node gets on_exit (directly or through its **kwargs dict): a dead node ends the launch."""
    nodes = _calls("Node")
    assert len(nodes) == 3  # transmitter, localizer, loop closure
    handlers = set()
    for call in nodes:
        kw = {k.arg: k.value for k in call.keywords if k.arg}
        for k in call.keywords:
            if k.arg is None and isinstance(k.value, ast.Name):
                kw.update(_dict_keys(k.value.id))
        assert "on_exit" in kw, f"Node at line {call.lineno} has no on_exit: the launch outlives it"
        assert isinstance(kw["on_exit"], ast.Name), ast.dump(kw["on_exit"])
        handlers.add(kw["on_exit"].id)
    assert len(handlers) == 1
    fn = _functions()[handlers.pop()]
    # a failure raises (LaunchService then exits non-zero), a clean exit still shuts the graph down,
    # and exits caused by the launch's own shutdown are left alone
    assert any(isinstance(n, ast.Raise) for n in ast.walk(fn)), "a failed node must make the launch fail"
    assert any(isinstance(n, ast.Attribute) and n.attr == "returncode" for n in ast.walk(fn))
    assert any(isinstance(n, ast.Attribute) and n.attr == "is_shutdown" for n in ast.walk(fn))
    assert any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "Shutdown"
               for n in ast.walk(fn))


def _launch_env() -> dict[str, str]:
    pytest.importorskip("launch_ros", reason="launch/launch_ros have no PyPI wheels (docs/ros.md: checked by "
                                             "hand from their sources)")
    from ament_index_python.packages import PackageNotFoundError, get_package_share_directory

    try:
        get_package_share_directory("vpr_ros")
    except PackageNotFoundError:
        pytest.skip("vpr_ros is not installed in an ament prefix (colcon build, docs/colcon.md)")
    return {**os.environ, "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST"}


RUN_LAUNCH = """
import sys
from launch import LaunchDescription, LaunchService
from launch.actions import IncludeLaunchDescription
from launch.launch_description_sources import PythonLaunchDescriptionSource
ls = LaunchService()
ls.include_launch_description(LaunchDescription([IncludeLaunchDescription(
    PythonLaunchDescriptionSource(sys.argv[1]), launch_arguments=[a.split(":=", 1) for a in sys.argv[2:]])]))
sys.exit(ls.run())
"""


@pytest.mark.ros
def test_launch_fails_when_the_localizer_dies(tmp_path, ros_env):
    env = _launch_env()
    args = [f"params_file:={REPO / 'config' / 'localize.yaml'}", f"map_path:={tmp_path / 'none.vprmap'}",
            "use_transmitter:=true"]
    proc = subprocess.Popen([sys.executable, "-c", RUN_LAUNCH, str(LAUNCH), *args], text=True, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path,
                            start_new_session=True)  # its own process group: the nodes can be stopped too
    try:
        log, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # the launch outlived its localizer: stop it and its nodes
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"the launch was still running 120 s after the localizer died:\n{log}")
    assert proc.returncode != 0, log  # the localizer refused to start (no map): the launch failed
    assert "required node localizer_node" in log and "exited with status 2" in log, log
    # and the rest of the graph was stopped, not left running (before: the launch ran on until Ctrl-C)
    assert "[transmitter_node-1]: process has finished cleanly" in log, log
