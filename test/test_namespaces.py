"""Namespaces and remapping: default topic names are relative, so ``namespace:=robot1`` moves the graph.

Two graphs from config/localize.yaml (transmitter -> localizer -> loop closure, wired as the launch
file does) run side by side in the namespaces /robot1 and /robot2, each namespaced the way
``ros2 launch ... namespace:=robotN`` does it (``--ros-args -r __ns:=/robotN``); robot2 also
remaps its camera (``-r camera/image_raw:=front/image_raw``). A probe outside both sends frames to
each robot and checks that each answers on its own PlaceMatch topic only.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from typing import Any

import pytest
import yaml

pytest.importorskip("ros_support")  # rclpy and the built messages, or skip saying which is missing

from rclpy.qos import QoSProfile, qos_profile_sensor_data
from ros_support import REPO, ROS_TESTS, T0, stamp_key
from sensor_msgs.msg import Image
from std_msgs.msg import Header
from vpr_ros_msgs.msg import PlaceMatch

from vpr_ros.core.localizer import build_extractor
from vpr_ros.data.places import load_nordland
from vpr_ros.eval.offline import map_from_records
from vpr_ros.ros import graph as node_graph
from vpr_ros.ros import localizer_node as localizer
from vpr_ros.ros import loop_closure_node as loop_closure
from vpr_ros.ros import transmitter_node as transmitter
from vpr_ros.ros.conversions import float_to_stamp, rgb_to_image_msg
from vpr_ros.ros.localizer_node import LocalizerNode
from vpr_ros.ros.runner import InProcessGraph

pytestmark = ROS_TESTS
CONFIG = REPO / "config" / "localize.yaml"
LAUNCH = REPO / "launch" / "localize.launch.py"
GRAPH = REPO / "vpr_ros" / "ros" / "graph.py"
#: Topics every node uses by ROS convention, outside any namespace.
GLOBAL_TOPICS = {"/diagnostics", "/rosout", "/parameter_events"}


def _topic_defaults(module: Any) -> dict[str, str]:
    return {s.name: s.default for s in module.PARAMS if s.name.endswith("_topic") and s.default}


# --------------------------------------------------------------------------- names (no graph)


def test_default_topics_are_relative_everywhere():
    absolute = []
    for module in (localizer, transmitter, loop_closure):
        absolute += [f"{module.__name__}.{k}={v}" for k, v in _topic_defaults(module).items()
                     if v.startswith("/")]
    config = yaml.safe_load(CONFIG.read_text())
    for node, body in config.items():
        absolute += [f"config {node}.{k}={v}" for k, v in body["ros__parameters"].items()
                     if k.endswith("_topic") and isinstance(v, str) and v.startswith("/")]
    for path in (LAUNCH, GRAPH):  # topic names the launch file or the graph wiring might fall back to
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("/") \
                    and "/" in node.value[1:] and " " not in node.value:
                absolute.append(f"{path.name} {node.value}")
    assert not absolute, f"absolute topic names ignore namespace:= and remapping: {absolute}"


# --------------------------------------------------------------------------- two graphs side by side


@pytest.fixture(scope="module")
def model(torch_home):
    return build_extractor("imagenet", "", "native", "cpu", 8)


@pytest.fixture(scope="module")
def site(model, nordland_dir, tmp_path_factory):
    ext, label = model
    ds = load_nordland(nordland_dir, every=200)
    place_map, _, _ = map_from_records(ext, ds.database, model=label, progress=False)
    path = place_map.save(tmp_path_factory.mktemp("ns_maps") / "site")
    return path, [r.load() for r in ds.queries[:2]]


def _robot_graph(ns: str, model, map_dir, remaps: tuple[str, ...] = ()) -> InProcessGraph:
    ext, label = model
    sets = [f"localizer.map_path={map_dir}", "localizer.diagnostics_period_s=0.0",
            "transmitter.diagnostics_period_s=0.0"]
    params = node_graph.wire(node_graph.apply_sets(node_graph.load_params_file(CONFIG), sets),
                             use_transmitter=True)
    args = ["--ros-args", "-r", f"__ns:=/{ns}"]
    for rule in remaps:
        args += ["-r", rule]
    graph = InProcessGraph(args).start()
    try:
        graph.add_graph_nodes(params, node_graph.active_nodes(use_transmitter=True, use_loop_closure=True),
                              extra={"localizer": {"extractor": ext, "label": label}})
    except BaseException:
        graph.stop()
        raise
    return graph


def _resolved_topics(graph: InProcessGraph) -> set[str]:
    out = set()
    for node in graph.nodes:
        out |= {p.topic_name for p in node.publishers} | {s.topic_name for s in node.subscriptions}
    return out


def test_two_namespaced_graphs_answer_only_in_their_namespace(model, site):
    map_dir, frames = site
    robot1 = _robot_graph("robot1", model, map_dir)
    robot2 = _robot_graph("robot2", model, map_dir, remaps=("camera/image_raw:=front/image_raw",))
    probe_graph = InProcessGraph().start()
    try:
        cameras = (("robot1", robot1, "camera/image_raw"), ("robot2", robot2, "front/image_raw"))
        for ns, graph, camera in cameras:
            names = _resolved_topics(graph)
            assert f"/{ns}/{camera}" in names and f"/{ns}/vpr/place_match" in names, names
            assert f"/{ns}/vpr/transmitted/image" in names and f"/{ns}/vpr/loop_closure" in names, names
            assert all(n.startswith(f"/{ns}/") or n in GLOBAL_TOPICS for n in names), names

        probe = probe_graph.add(probe_graph.node("ns_probe"))
        got: dict[str, list[float]] = {"robot1": [], "robot2": [], "": []}

        def collect(key: str) -> Callable[[PlaceMatch], None]:
            return lambda m: got[key].append(stamp_key(m.header.stamp))

        subs = {key: probe.create_subscription(PlaceMatch, f"/{key}/vpr/place_match".replace("//", "/"),
                                               collect(key), QoSProfile(depth=100))
                for key in got}
        pubs = {"robot1": probe.create_publisher(Image, "/robot1/camera/image_raw", qos_profile_sensor_data),
                "robot2": probe.create_publisher(Image, "/robot2/front/image_raw", qos_profile_sensor_data)}
        # matched: the probe's camera publishers reach each transmitter, each localizer's matches reach
        # the probe; the un-namespaced match topic has no publisher at all
        assert InProcessGraph.wait_for(lambda: all(p.get_subscription_count() >= 1 for p in pubs.values())
                     and all(subs[k].get_publisher_count() >= 1 for k in ("robot1", "robot2")),
                     30.0), "probe and robots not matched"
        assert subs[""].get_publisher_count() == 0
        assert pubs["robot1"].get_subscription_count() == 1 and pubs["robot2"].get_subscription_count() == 1

        sent: dict[str, list[float]] = {"robot1": [], "robot2": []}
        for i, frame in enumerate(frames):
            for j, key in enumerate(("robot1", "robot2")):
                stamp = T0 + 10 * i + j
                msg = rgb_to_image_msg(frame, "rgb8", Header(stamp=float_to_stamp(stamp), frame_id="cam"))
                sent[key].append(round(stamp, 3))
                assert InProcessGraph.send_until(lambda m=msg, k=key: pubs[k].publish(m),
                                   lambda s=sent[key][-1], k=key: s in got[k], 60.0), (key, got)
        for key in ("robot1", "robot2"):
            assert set(got[key]) == set(sent[key]), (key, got)  # only its own frames (resends repeat them)
        assert got[""] == []
        loc1, loc2 = (next(n for n in g.nodes if isinstance(n, LocalizerNode)) for g in (robot1, robot2))
        assert loc1.frames_in >= len(frames) and loc2.frames_in >= len(frames)
    finally:
        probe_graph.stop()
        robot2.stop()
        robot1.stop()
