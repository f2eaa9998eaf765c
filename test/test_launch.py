"""launch/localize.launch.py and the graph it launches (vpr_ros.ros.graph): required nodes, launch
arguments, wiring.

``launch`` / ``launch_ros`` have no PyPI wheels, so the launch file's own checks read its syntax
tree and the graph description it builds from; the run of the real launch file skips unless
launch_ros and an ament install of vpr_ros (colcon, docs/colcon.md) are importable.
"""

from __future__ import annotations

import ast
import json
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


def _graph():
    pytest.importorskip("rclpy")  # the parameter specs live in the node modules
    from vpr_ros.ros import graph

    return graph


#: The launch file's public arguments and defaults ("" = keep the params file's value).
ARGUMENTS = {
    "params_file": None, "camera_topic": "", "image_transport": "", "weights": "", "model": "",
    "input_size": "", "device": "", "backend": "", "precision": "", "threads": "", "map_path": "",
    "mode": "", "odom_topic": "", "top_k": "", "match_topic": "", "tx_mode": "", "jpeg_quality": "",
    "scale": "", "qp": "", "gop": "", "kbps": "", "fps": "", "bitrate_codec": "", "use_transmitter": "false",
    "use_loop_closure": "false", "namespace": "", "log_level": "info",
}


# --------------------------------------------------------------------------- arguments


def test_arguments_and_defaults_are_the_public_ones():
    graph = _graph()
    args = graph.launch_arguments("/share/config/localize.yaml")
    assert [a.name for a in args] == list(ARGUMENTS)
    assert {a.name: a.default for a in args} == {**ARGUMENTS, "params_file": "/share/config/localize.yaml"}
    # the launch file declares exactly these, with their choices
    declares = _calls("DeclareLaunchArgument")
    assert len(declares) == 1
    assert any(isinstance(n, ast.Attribute) and n.attr == "launch_arguments" for n in ast.walk(TREE))
    kw = {k.arg for k in declares[0].keywords}
    assert {"default_value", "description"} <= kw


def test_fixed_value_arguments_declare_choices():
    graph = _graph()
    args = {a.name: a for a in graph.launch_arguments()}
    fixed = {}
    for arg, target in graph.LAUNCH_PARAMS:
        node, _, param = target.partition(".")
        spec = graph.param_specs(node)[param]
        if spec.choices:
            fixed[arg] = spec.choices
            assert args[arg].choices == ("", *spec.choices), arg  # "" keeps the params file's value
    assert {"backend", "mode", "tx_mode", "bitrate_codec", "image_transport", "precision"} <= set(fixed)
    assert {a.name for a in args.values() if a.choices} == set(fixed) | {"model", "use_transmitter",
                                                                          "use_loop_closure", "log_level"}
    # the models a deployed graph can build: the registry as the core fills it (training modules, once
    # imported by other tests, register training-only models such as the StructVPR seg-branch)
    code = ("from vpr_ros.ros.graph import launch_arguments\n"
            "from vpr_ros.core.models.registry import list_models\n"
            "print(' '.join(next(a for a in launch_arguments() if a.name == 'model').choices))\n"
            "print(' '.join(list_models()))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    offered, deployable = out.stdout.splitlines()
    assert offered.split() == deployable.split() and "structvpr_mobilenetv2" in offered.split()


def test_argument_descriptions_say_each_thing_once():
    """A parameter argument's description is its spec's, plus what leaving the argument out means."""
    graph = _graph()
    for a in graph.launch_arguments():
        if a.target is None:
            continue
        node, _, param = a.target.partition(".")
        spec = graph.param_specs(node)[param]
        assert a.description.startswith(f"{node} {param}: {spec.description}"), a.name
        assert a.description.endswith(graph.KEEP_FILE) and a.description.count("params file") == 1, a.name
        assert a.description.count("empty") == spec.description.count("empty") <= 1, a.description
    jpeg = next(a for a in graph.launch_arguments() if a.name == "jpeg_quality")
    assert jpeg.description == ("transmitter jpeg_quality: JPEG quality (mode jpeg); int in [1, 100]"
                                " [not given: the params file's value]")


def test_launch_argument_values_are_typed_by_the_specs():
    graph = _graph()
    from vpr_ros.core.errors import ConfigError

    values = {"top_k": "3", "scale": "0.5", "camera_topic": "", "tx_mode": "h264"}
    params = graph.apply_launch_arguments({"localizer": {"top_k": 5}}, values)
    assert params == {"localizer": {"top_k": 3}, "transmitter": {"scale": 0.5, "mode": "h264"}}
    with pytest.raises(ConfigError, match=r"launch argument top_k:='three': expected int"):
        graph.apply_launch_arguments({}, {"top_k": "three"})


# --------------------------------------------------------------------------- the graph (vpr_ros.ros.graph)


def test_graph_imports_and_wires_without_rclpy():
    """The graph description imports without ROS (or torch); wiring a complete params file needs neither."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('rclpy', 'launch', 'launch_ros', 'torch'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from vpr_ros.ros import graph\n"
        f"p = graph.load_params_file({str(REPO / 'config' / 'localize.yaml')!r})\n"
        "p = graph.wire(p, use_transmitter=True)\n"
        "print(*(p[n]['image_topic'] for n in ('localizer', 'loop_closure', 'transmitter')))\n"
        "print(p['loop_closure']['score_threshold'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["vpr/transmitted/image", "vpr/transmitted/image", "camera/image_raw",
                                  "0.96"]  # the default weights' card, read from its sidecar


def test_graph_nodes_are_the_packaged_executables():
    from vpr_ros.ros.graph import NODES, SWITCHES, active_nodes

    setup = (REPO / "setup.py").read_text()
    for node in NODES:
        assert f'"{node.executable} = {node.module}:main"' in setup, node
    assert [n.name for n in NODES] == ["transmitter", "localizer", "loop_closure"]  # start order
    assert SWITCHES == ("use_transmitter", "use_loop_closure")
    assert [n.name for n in active_nodes()] == ["localizer"]
    everything = active_nodes(use_transmitter=True, use_loop_closure=True)
    assert [n.name for n in everything] == [n.name for n in NODES]
    assert [n.name for n in active_nodes(use_loop_closure=True)] == ["localizer", "loop_closure"]


def test_wiring_rules():
    from vpr_ros.ros.graph import wire

    full = {"localizer": {"image_topic": "cam", "image_transport": "compressed", "match_topic": "m",
                          "map_path": "site.vprmap", "transmission_stats_topic": ""},
            "transmitter": {"output_topic": "link", "stats_topic": "link_stats"}}
    on = wire(full, use_transmitter=True)
    # the transmitter takes the camera settings; the localizer reads the link (decoded: raw) and its stats
    assert on["transmitter"] == {"output_topic": "link", "stats_topic": "link_stats", "image_topic": "cam",
                                 "image_transport": "compressed"}
    assert (on["localizer"]["image_topic"], on["localizer"]["image_transport"]) == ("link", "raw")
    assert on["localizer"]["transmission_stats_topic"] == "link_stats"
    # the loop closure reads what the localizer reads, its matches and its map
    assert on["loop_closure"] == {"match_topic": "m", "image_topic": "link", "image_transport": "raw",
                                  "map_path": "site.vprmap", "score_threshold": 0.96}  # the default's card
    off = wire(full, use_transmitter=False)
    assert off["localizer"] == full["localizer"] and off["transmitter"] == full["transmitter"]
    lc = off["loop_closure"]
    assert (lc["image_topic"], lc["image_transport"]) == ("cam", "compressed")
    # a node's own section beats the wiring ("unset"/"empty" rules), the wiring beats /**
    own = {**full, "localizer": {**full["localizer"], "transmission_stats_topic": "mine"},
           "loop_closure": {"image_topic": "other"}, "*": {"match_topic": "everyone"}}
    w = wire(own, use_transmitter=True)
    assert w["localizer"]["transmission_stats_topic"] == "mine"
    assert w["loop_closure"]["image_topic"] == "other" and w["loop_closure"]["match_topic"] == "m"
    assert full["localizer"]["image_topic"] == "cam"  # the input is not changed


def test_the_loop_closure_threshold_is_the_one_on_the_weights_card(tmp_path):
    """Descriptor similarities are on each model's scale: the loop-closure node gets the score_threshold
    `vpr-ros loop-eval` chose for the localizer's weights (general 0.96, loqi 0.85, KITTI StructVPR 0.93,
    measured on rtabmap_loop), unless its own section sets one."""
    import shutil

    from vpr_ros.core.loop_closure import DEFAULT_SCORE_THRESHOLD
    from vpr_ros.core.models.card import read_card
    from vpr_ros.paths import PACKAGED
    from vpr_ros.ros.graph import wire

    def threshold(params):
        return wire(params, use_transmitter=False).get("loop_closure", {}).get("score_threshold")

    assert threshold({"localizer": {"weights": "loqi"}}) == 0.85
    assert threshold({"localizer": {"weights": "structvpr"}}) == 0.93
    assert threshold({"*": {"weights": "general"}}) == threshold({}) == DEFAULT_SCORE_THRESHOLD == 0.96
    assert threshold({"localizer": {"weights": "imagenet"}}) is None  # no card: the node's default
    assert threshold({"localizer": {"weights": "loqi"}, "loop_closure": {"score_threshold": 0.9}}) == 0.9
    bare = tmp_path / "loqi_copy.pt"  # a checkpoint without its .json sidecar: read from the file
    shutil.copy(PACKAGED["loqi"], bare)
    assert threshold({"localizer": {"weights": str(bare)}}) == 0.85
    for path in PACKAGED.values():  # the sidecar the fast path reads is the checkpoint's card
        sidecar = json.loads(path.with_suffix(".json").read_text())["card"]["loop_closure"]
        assert sidecar == read_card(path).loop_closure


def test_a_card_entry_states_the_operating_point_and_how_it_was_measured():
    from vpr_ros.eval.loop_closure import card_entry

    point = {"top_k": 5, "min_inliers": 25, "score_threshold": 0.9612, "max_false_inliers": 12,
             "per_condition": {"none": {"precision": 1.0, "recall": 0.84}, "jpeg_q10": {"precision": 1.0,
                                                                                      "recall": 0.7727}}}
    assert card_entry(point, date="2026-12-04") == {
        "score_threshold": 0.9612, "top_k": 5, "min_inliers": 25,
        "measured": "vpr-ros loop-eval on rtabmap_loop, 2026-12-04: none P 1.00 R 0.84, "
                    "jpeg_q10 P 1.00 R 0.77"}


def test_wiring_takes_unset_sources_from_the_node_defaults():
    graph = _graph()
    w = graph.wire({"*": {"map_path": "shared.vprmap"}}, use_transmitter=True)
    tx = graph.param_specs("transmitter")
    assert w["transmitter"]["image_topic"] == graph.param_specs("localizer")["image_topic"].default
    assert w["localizer"]["image_topic"] == tx["output_topic"].default == "vpr/transmitted/image"
    assert w["localizer"]["transmission_stats_topic"] == tx["stats_topic"].default
    assert w["loop_closure"]["map_path"] == "shared.vprmap"  # the localizer's value through /**


def test_node_values_merge_common_values_and_refuse_unknown_names():
    graph = _graph()
    from vpr_ros.core.errors import ConfigError

    params = {"*": {"max_pixels": 1000, "use_sim_time": False, "score_threshold": 0.5},
              "localizer": {"min_score": 0, "qos_overrides./x.depth": 3}}
    values = graph.node_values("localizer", params)
    # /** values the node declares (score_threshold is the loop closure's), ints widened for floats
    assert values == {"max_pixels": 1000, "use_sim_time": False, "min_score": 0.0,
                      "qos_overrides./x.depth": 3}
    assert isinstance(values["min_score"], float)
    assert graph.node_values("loop_closure", params)["score_threshold"] == 0.5
    with pytest.raises(ConfigError, match="unknown parameter.*'localizer': top_kk"):
        graph.node_values("localizer", {"localizer": {"top_kk": 3}})


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
    assert nodes, "the launch file starts no Node"
    handlers = set()
    for call in nodes:
        kw = {k.arg: k.value for k in call.keywords if k.arg}
        for k in call.keywords:
            if k.arg is None and isinstance(k.value, ast.Name):
                kw.update(_dict_keys(k.value.id))
        assert "on_exit" in kw, f"Node at line {call.lineno} has no on_exit: the launch outlives it"
        assert isinstance(kw["on_exit"], ast.Name), ast.dump(kw["on_exit"])
        handlers.add(kw["on_exit"].id)
        # every node of the graph comes from vpr_ros.ros.graph (executable and name)
        for key in ("executable", "name"):
            assert isinstance(kw[key], ast.Attribute) and kw[key].attr == key, ast.dump(kw[key])
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
    from vpr_ros.ros import graph

    assert list(declared) == list(ARGUMENTS)
    for a in graph.launch_arguments():
        assert declared[a.name].choices == (list(a.choices) if a.choices else None), a.name
        assert declared[a.name].description.startswith(a.description), a.name  # launch adds the choices
