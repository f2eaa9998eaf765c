"""launch/localize.launch.py: required nodes, launch arguments.

``launch`` / ``launch_ros`` have no PyPI wheels, so most checks read the launch file's syntax
tree; the run of the real launch file skips unless launch_ros and an ament install of vpr_ros
(colcon, docs/colcon.md) are importable.
"""

from __future__ import annotations

import ast
import os
import re
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


def _module_value(name: str) -> ast.expr:
    for node in TREE.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
            return node.value
        targets = node.targets if isinstance(node, ast.Assign) else []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return node.value
    raise AssertionError(f"{LAUNCH} defines no {name}")


def _overrides() -> list[tuple[str, str, str, str]]:
    """(argument, node, parameter, description) of the OVERRIDES table."""
    rows = []
    for row in _module_value("OVERRIDES").elts:
        arg, node, param, _, text = row.elts
        rows.append((ast.literal_eval(arg), ast.literal_eval(node), ast.literal_eval(param),
                     ast.literal_eval(text)))
    return rows


# --------------------------------------------------------------------------- arguments


def test_fixed_value_arguments_declare_choices():
    pytest.importorskip("rclpy")
    from vpr_ros.core.models.registry import list_models
    from vpr_ros.ros import localizer_node as localizer
    from vpr_ros.ros import transmitter_node as transmitter

    choices = ast.literal_eval(_module_value("CHOICES"))
    specs = {"localizer": {s.name: s for s in localizer.PARAMS},
             "transmitter": {s.name: s for s in transmitter.PARAMS}}
    fixed = {arg: specs[node][param].choices for arg, node, param, _ in _overrides()
             if specs[node][param].choices}
    assert {"backend", "mode", "tx_mode", "bitrate_codec", "image_transport", "precision"} <= set(fixed)
    for arg, values in fixed.items():
        assert tuple(choices.get(arg, ())) == tuple(values), f"launch argument {arg}: choices {values}"
    # the models a deployed graph can build: the registry as the core fills it (training modules, once
    # imported by other tests, register training-only models such as the StructVPR seg-branch)
    code = "from vpr_ros.core.models.registry import list_models; print(' '.join(list_models()))"
    deployable = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert tuple(choices["model"]) == tuple(deployable.stdout.split())
    assert set(choices["model"]) <= set(list_models())
    assert set(choices) == set(fixed) | {"model"}
    # and the declaration over OVERRIDES passes them (with "" = keep the params file's value)
    declares = [c for c in _calls("DeclareLaunchArgument")
                if any(isinstance(n, ast.Name) and n.id == "CHOICES" for n in ast.walk(c))]
    assert len(declares) == 1


def test_argument_descriptions_say_each_thing_once():
    for arg, _, _, text in _overrides():
        full = f"{text} (empty: params file)"  # what --show-args prints
        assert full.count("empty") == 1, f"{arg}: {full!r}"


def test_docs_name_the_place_candidate_fields():
    fields = [line.split()[1] for line in (REPO / "msgs" / "vpr_ros_msgs" / "msg" / "PlaceCandidate.msg")
              .read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert "entry_id" in fields
    doc = (REPO / "docs" / "ros.md").read_text()
    start = doc.index("`matches` = ")
    sentence = doc[start: doc.index(";", start)]
    named = [w for w in re.findall(r"`([a-z_]+)`", sentence) if w != "matches" and w != "top_k"]
    assert "entry_id" in named and " id," not in sentence, sentence
    assert set(named) <= set(fields), (named, fields)


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
    # and the rest of the graph was stopped, not left running until Ctrl-C
    assert "[transmitter_node-1]: process has finished cleanly" in log, log


def test_launch_arguments_when_launch_is_installed():
    _launch_env()
    import importlib.util

    spec = importlib.util.spec_from_file_location("localize_launch", LAUNCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    declared = {a.name: a for a in mod.generate_launch_description().get_launch_arguments()}
    for name, values in mod.CHOICES.items():
        assert declared[name].choices == ["", *values], name
    assert declared["model"].description.count("empty") == 1, declared["model"].description
