"""The localizer node on a real rclpy/DDS graph with real Nordland and KITTI frames.

Frames go out as real ``sensor_msgs/Image`` / ``CompressedImage`` messages, matches come back
as ``vpr_ros_msgs/PlaceMatch``; they must equal the offline pipeline on the same frames. The
model is the ImageNet-initialised student at native input size (fast on CPU), loaded once and
shared in-process by the nodes of the module; one test lets the node build it from parameters.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys

import cv2
import numpy as np
import pytest

pytest.importorskip("ros_support")  # rclpy and the built messages, or skip saying which is missing

from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import Point, Pose, Quaternion
from nav_msgs.msg import Odometry
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, qos_profile_sensor_data
from ros_support import REPO, ROS_TESTS, T0, fresh_namespace, run_node_main, stamp_key, unique
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header
from vpr_ros_msgs.msg import PlaceMatch, TransmissionStats
from vpr_ros_msgs.srv import SaveMap

from vpr_ros.core.errors import ConfigError, MapError, ModelError, VprError
from vpr_ros.core.images import decode_image
from vpr_ros.core.localizer import build_extractor
from vpr_ros.core.mapdb import PlaceMap
from vpr_ros.data.places import load_kitti, load_nordland
from vpr_ros.eval.offline import map_from_records
from vpr_ros.ros.conversions import float_to_stamp, rgb_to_compressed_msg, rgb_to_image_msg
from vpr_ros.ros.localizer_node import LocalizerNode
from vpr_ros.ros.runner import InProcessGraph

pytestmark = ROS_TESTS


@pytest.fixture(scope="module")
def model(torch_home):
    return build_extractor("imagenet", "", "native", "cpu", 16)


@pytest.fixture(scope="module")
def nordland(nordland_dir):
    return load_nordland(nordland_dir, every=40)


@pytest.fixture(scope="module")
def summer_map(model, nordland, tmp_path_factory):
    """The Nordland summer map saved as the node loads it, and the winter frames' offline results."""
    ext, label = model
    place_map, _, _ = map_from_records(ext, nordland.database, model=label, progress=False)
    path = place_map.save(tmp_path_factory.mktemp("maps") / "summer")
    queries = [r.load() for r in nordland.queries]
    offline = place_map.query(ext(queries), 5)
    return path, queries, offline


def topics() -> dict[str, str]:
    ns = fresh_namespace()
    return {"image_topic": f"{ns}/camera/image", "match_topic": f"{ns}/place_match"}


def header(i: int, frame: str = "camera") -> Header:
    return Header(stamp=float_to_stamp(T0 + 0.1 * i), frame_id=frame)


class Probe:
    """A test node: publishes frames, collects PlaceMatch by stamp and the localizer's diagnostics."""

    def __init__(self, graph: InProcessGraph, tp: dict[str, str], compressed: bool = False) -> None:
        self.node = graph.add(graph.node(unique("probe")))
        self.matches: dict[float, PlaceMatch] = {}
        self.diag: dict[str, dict[str, str]] = {}
        self.match_sub = self.node.create_subscription(PlaceMatch, tp["match_topic"], self._on_match,
                                                       QoSProfile(depth=1000))
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, QoSProfile(depth=100))
        base = tp["image_topic"]
        self.raw = self.node.create_publisher(Image, base, qos_profile_sensor_data)
        self.jpeg = self.node.create_publisher(CompressedImage, f"{base}/compressed", qos_profile_sensor_data)
        self.pub = self.jpeg if compressed else self.raw
        self.match_topic = tp["match_topic"]

    def _on_match(self, msg: PlaceMatch) -> None:
        self.matches.setdefault(stamp_key(msg.header.stamp), msg)  # the first answer: a resend repeats it

    def _on_diag(self, msg: DiagnosticArray) -> None:
        for st in msg.status:
            self.diag[st.name] = {kv.key: kv.value for kv in st.values}

    def wait_connected(self, graph: InProcessGraph, timeout: float = 30.0) -> None:
        """Frames and matches flow: the image publisher and the match subscription are matched."""
        ok = graph.wait_matched([self.pub], [self.match_sub], timeout)
        assert ok, f"localizer and probe not matched within {timeout} s"


def localizer(graph: InProcessGraph, model, **params) -> LocalizerNode:
    ext, label = model
    params.setdefault("diagnostics_period_s", 0.2)
    return graph.create(LocalizerNode, unique("localizer"), params=params, extractor=ext, label=label)


def stamp_of(i: int) -> float:
    return round(T0 + 0.1 * i, 3)


# --------------------------------------------------------------------------- matches == offline


def test_place_matches_equal_offline_pipeline(model, summer_map):
    path, queries, offline = summer_map
    tp = topics()
    with InProcessGraph() as graph:
        node = localizer(graph, model, map_path=str(path), queue_size=200, max_batch=16, top_k=5, **tp)
        probe = Probe(graph, tp)
        probe.wait_connected(graph)
        msgs = [rgb_to_image_msg(im, "rgb8", header(i)) for i, im in enumerate(queries)]
        graph.publish_paced(probe.pub, msgs, lambda: node.frames_in)
        assert graph.wait_for(lambda: len(probe.matches) == len(queries), 30.0), \
            f"{len(probe.matches)} of {len(queries)} PlaceMatch received"
        assert node.localizer.batches < len(queries), "frames queued while the model ran were never batched"

    agree = 0
    for i, off in enumerate(offline):
        got = probe.matches[stamp_of(i)]
        assert got.header.frame_id == "camera" and got.query_id == i + 1
        assert got.model == model[1] and got.latency_ms > 0
        ids = [c.entry_id for c in got.matches]
        scores = np.array([c.score for c in got.matches])
        np.testing.assert_allclose(scores, off.scores, atol=1e-4)
        gaps = np.diff(off.scores)
        if len(gaps) and abs(gaps[0]) > 1e-4:  # no near-tie at the top: the same top-1 place
            assert ids[0] == int(off.ids[0])
        agree += ids == [int(x) for x in off.ids]
        assert got.matches[0].source == off.entries[0].source or abs(gaps[0]) <= 1e-4
    assert agree >= len(offline) - 2, f"top-5 lists equal for only {agree} of {len(offline)} frames"


def test_top1_right_where_offline_is_right(model, summer_map, nordland):
    """Recall through the graph (top-1 within the ground-truth tolerance) equals recall offline."""
    path, queries, offline = summer_map
    positives = nordland.positives()
    by_source = {str(r.path): i for i, r in enumerate(nordland.database)}
    tp = topics()
    with InProcessGraph() as graph:
        node = localizer(graph, model, map_path=str(path), queue_size=200, top_k=1, **tp)
        probe = Probe(graph, tp)
        probe.wait_connected(graph)
        msgs = [rgb_to_image_msg(im, "bgr8", header(i)) for i, im in enumerate(queries)]  # another encoding
        graph.publish_paced(probe.pub, msgs, lambda: node.frames_in)
        assert graph.wait_for(lambda: len(probe.matches) == len(queries), 30.0)
    right_offline = [by_source[o.entries[0].source] in positives[i] for i, o in enumerate(offline)]
    right_graph = [by_source[probe.matches[stamp_of(i)].matches[0].source] in positives[i]
                   for i in range(len(queries))]
    assert sum(right_offline) > 0
    assert right_graph == right_offline


def test_compressed_input(model, summer_map):
    path, queries, _ = summer_map
    ext, _ = model
    frames = queries[:24]
    msgs = [rgb_to_compressed_msg(im, "jpeg", 60, header(i)) for i, im in enumerate(frames)]
    decoded = [decode_image(bytes(m.data)) for m in msgs]
    offline = PlaceMap.load(path).query(ext(decoded), 3)
    tp = topics()
    with InProcessGraph() as graph:
        node = localizer(graph, model, map_path=str(path), image_transport="compressed", top_k=3,
                         queue_size=50, **tp)
        probe = Probe(graph, tp, compressed=True)
        probe.wait_connected(graph)
        graph.publish_paced(probe.pub, msgs, lambda: node.frames_in)
        assert graph.wait_for(lambda: len(probe.matches) == len(frames), 20.0), \
            f"{len(probe.matches)} matches; {node.diagnostics()}"
    for i, off in enumerate(offline):
        got = probe.matches[stamp_of(i)]
        np.testing.assert_allclose([c.score for c in got.matches], off.scores, atol=1e-4)
        assert got.matches[0].entry_id == int(off.ids[0])


def test_repeated_stamp_answered_again_but_never_a_second_place(model, nordland, tmp_path):
    """A resent frame (same stamp) gets a PlaceMatch again, is counted, and adds no duplicate keyframe."""
    frames = [r.load() for r in nordland.queries[:2]]
    tp = topics()
    with InProcessGraph() as graph:
        node = localizer(graph, model, map_path=str(tmp_path / "both"), mode="both", keyframe_every=1,
                         save_on_shutdown=False, **tp)
        probe = Probe(graph, tp)
        probe.wait_connected(graph)
        msgs = [rgb_to_image_msg(frames[i], "rgb8", header(i)) for i in (0, 0, 1)]
        graph.publish_paced(probe.pub, msgs, lambda: node.frames_in, window=1)
        assert graph.wait_for(lambda: node.frames_ok == 3, 30.0), node.diagnostics()
        diag = node.diagnostics()
    assert diag["repeated_stamp"] == 1 and diag["out_of_order"] == 0
    assert node.localizer.keyframes_added == 2 and len(node.place_map) == 2  # frames 0 and 1, not 0 twice
    assert [e.stamp for e in node.place_map.entries()] == pytest.approx([T0, T0 + 0.1])


def test_frame_whose_stats_are_late_gets_the_links_current_label(model, summer_map):
    """Stats (reliable) and images (best effort) race: a frame whose own TransmissionStats have not arrived
    is labelled with the link's latest mode, not the empty parameter default."""
    path, queries, _ = summer_map
    tp = topics()
    stats_topic = tp["image_topic"] + "_stats"
    with InProcessGraph() as graph:
        node = localizer(graph, model, map_path=str(path), transmission_stats_topic=stats_topic, **tp)
        probe = Probe(graph, tp)
        stats_pub = probe.node.create_publisher(TransmissionStats, stats_topic, QoSProfile(depth=10))
        probe.wait_connected(graph)
        assert graph.wait_matched([stats_pub], timeout=30.0)
        stats_pub.publish(TransmissionStats(header=header(0), mode="jpeg_q10"))  # frame 0's stats only
        assert graph.wait_for(lambda: node._link_label == "jpeg_q10", 10.0)
        graph.publish_paced(probe.pub, [rgb_to_image_msg(queries[i], "rgb8", header(i)) for i in (0, 1)],
                            lambda: node.frames_in)
        assert graph.wait_for(lambda: len(probe.matches) == 2, 30.0), node.diagnostics()
    assert probe.matches[stamp_of(0)].degradation == "jpeg_q10"  # its own stats
    assert probe.matches[stamp_of(1)].degradation == "jpeg_q10"  # stats not (yet) sent: the link's mode


# --------------------------------------------------------------------------- bounded queue


def test_queue_overflow_drops_oldest_and_counts(model, summer_map):
    path, _, _ = summer_map
    rng = np.random.default_rng(0)
    # 384x384 noise at native size: far slower than the publisher, so the 2-frame queue overflows
    frames = [rng.integers(0, 255, (384, 384, 3), dtype=np.uint8) for _ in range(16)]
    tp = topics()
    with InProcessGraph() as graph:
        node = localizer(graph, model, map_path=str(path), queue_size=2, max_batch=1, **tp)
        probe = Probe(graph, tp)
        probe.wait_connected(graph)
        graph.publish_paced(probe.pub, [rgb_to_image_msg(f, "rgb8", header(i)) for i, f in enumerate(frames)],
                            lambda: node.frames_in)
        assert graph.wait_for(lambda: node.frames_ok + node._queue.dropped == len(frames), 30.0)
        assert graph.wait_for(lambda: stamp_of(len(frames) - 1) in probe.matches, 10.0), \
            "the newest frame was not processed"
        name = f"vpr_ros: {node.get_name()}"
        final = {"queue_drops": str(node._queue.dropped), "frames_processed": str(node.frames_ok)}
        assert graph.wait_for(lambda: final.items() <= probe.diag.get(name, {}).items(), 5.0)
        diag = probe.diag[name]
    dropped = node._queue.dropped
    assert node.frames_in == len(frames) and dropped > 0
    assert int(diag["frames_processed"]) + int(diag["queue_drops"]) == len(frames)
    got = sorted(probe.matches)
    assert len(got) == len(frames) - dropped
    # drop-oldest: every frame published after the last dropped one was processed
    missing = sorted(set(stamp_of(i) for i in range(len(frames))) - set(got))
    assert all(s in got for s in (stamp_of(i) for i in range(len(frames))) if s > missing[-1])


# --------------------------------------------------------------------------- bad input


def _bad_raw() -> list[tuple[str, Image]]:
    good = np.full((32, 64, 3), 128, np.uint8)
    out = []
    m = rgb_to_image_msg(good, "rgb8", header(1))
    m.encoding = "bayer_rggb8"
    out.append(("unsupported_encoding", m))
    m = rgb_to_image_msg(good, "rgb8", header(2))
    m.step = 64 * 3 + 7  # step says padded rows, data is not
    out.append(("size_mismatch", m))
    m = rgb_to_image_msg(good, "rgb8", header(3))
    m.data = m.data[:-100]
    out.append(("size_mismatch", m))
    out.append(("empty", Image(header=header(4), height=0, width=0, encoding="rgb8", step=0)))
    nan = np.full((8, 8), np.nan, np.float32)
    out.append(("nan", Image(header=header(5), height=8, width=8, encoding="32FC1", step=32,
                             data=nan.tobytes())))
    out.append(("too_large", Image(header=header(6), height=20000, width=20000, encoding="rgb8",
                                   step=60000, data=b"\x00" * 16)))
    return out


def _bad_compressed() -> list[tuple[str, CompressedImage]]:
    good = rgb_to_compressed_msg(np.full((32, 64, 3), 90, np.uint8), "jpeg", 80, header(1))
    out = [("empty", CompressedImage(header=header(2), format="jpeg"))]
    out.append(("corrupt", CompressedImage(header=header(3), format="jpeg", data=bytes(good.data)[:40])))
    out.append(("corrupt", CompressedImage(header=header(4), format="jpeg", data=b"not an image at all")))
    ihdr = b"\x00\x00\x00\x0dIHDR" + (60000).to_bytes(4, "big") * 2 + b"\x08\x02\x00\x00\x00"
    png = b"\x89PNG\r\n\x1a\n" + ihdr  # a header claiming 60000x60000 pixels
    out.append(("too_large", CompressedImage(header=header(5), format="png", data=png)))
    out.append(("unsupported_encoding", CompressedImage(header=header(6), format="16UC1; compressedDepth png",
                                                        data=bytes(good.data))))
    return out


@pytest.mark.parametrize("transport", ["raw", "compressed"])
def test_bad_input_rejected_counted_node_survives(model, summer_map, transport):
    path, queries, offline = summer_map
    bad = _bad_raw() if transport == "raw" else _bad_compressed()
    tp = topics()
    with InProcessGraph() as graph:
        node = localizer(graph, model, map_path=str(path), image_transport=transport, queue_size=50,
                         max_pixels=4096 * 4096, **tp)
        probe = Probe(graph, tp, compressed=transport == "compressed")
        probe.wait_connected(graph)
        graph.publish_paced(probe.pub, [m for _, m in bad], lambda: node.frames_in)
        # out of order: stamp 0.0 s after stamps up to 0.6 s; counted, still localised
        late = (rgb_to_image_msg(queries[0], "rgb8", header(0)) if transport == "raw"
                else rgb_to_compressed_msg(queries[0], "png", header=header(0)))
        good = (rgb_to_image_msg(queries[1], "rgb8", header(10)) if transport == "raw"
                else rgb_to_compressed_msg(queries[1], "png", header=header(10)))
        graph.publish_paced(probe.pub, [late, good], lambda: node.frames_in)
        assert graph.wait_for(lambda: stamp_of(10) in probe.matches, 15.0), "no PlaceMatch after bad input"
        assert stamp_of(0) in probe.matches  # the out-of-order frame was still localised
        name = f"vpr_ros: {node.get_name()}"
        assert graph.wait_for(lambda: probe.diag.get(name, {}).get("rejected_total") == str(len(bad)), 5.0)
        diag = probe.diag[name]
        alive = node._worker.is_alive()
    expected: dict[str, int] = {}
    for reason, _ in bad:
        expected[reason] = expected.get(reason, 0) + 1
    for reason, n in expected.items():
        assert diag[f"rejected_{reason}"] == str(n), (reason, diag)
    assert diag["out_of_order"] == "1" and diag["frames_processed"] == "2"
    assert alive
    assert probe.matches[stamp_of(10)].matches[0].entry_id == int(offline[1].ids[0])


# --------------------------------------------------------------------------- mapping mode


def _quaternion(r: np.ndarray) -> tuple[float, float, float, float]:
    """(x, y, z, w) of a rotation matrix (Shepperd's method, w >= 0)."""
    w = math.sqrt(max(0.0, 1.0 + r[0, 0] + r[1, 1] + r[2, 2])) / 2.0
    x = math.copysign(math.sqrt(max(0.0, 1.0 + r[0, 0] - r[1, 1] - r[2, 2])) / 2.0, r[2, 1] - r[1, 2])
    y = math.copysign(math.sqrt(max(0.0, 1.0 - r[0, 0] + r[1, 1] - r[2, 2])) / 2.0, r[0, 2] - r[2, 0])
    z = math.copysign(math.sqrt(max(0.0, 1.0 - r[0, 0] - r[1, 1] + r[2, 2])) / 2.0, r[1, 0] - r[0, 1])
    return x, y, z, w


def test_mapping_mode_kitti_odometry_save_service_and_reload(model, kitti_dir, tmp_path):
    records = load_kitti(kitti_dir, "00").database[:24]
    poses = np.loadtxt(kitti_dir / "00" / "poses_official_first300.txt")[:24].reshape(-1, 3, 4)
    every = 4
    target = tmp_path / "kitti_map"
    tp = topics()
    odom_topic = tp["image_topic"].rsplit("/", 2)[0] + "/odom"
    with InProcessGraph() as graph:
        node = localizer(graph, model, map_path=str(target), mode="map", keyframe_every=every, queue_size=100,
                         odom_topic=odom_topic, odom_tolerance_s=0.05, require_pose=True, **tp)
        probe = Probe(graph, tp)
        odom_pub = probe.node.create_publisher(Odometry, odom_topic, QoSProfile(depth=100))
        client = probe.node.create_client(SaveMap, f"/{node.get_name()}/save_map")
        assert graph.wait_matched([odom_pub, probe.pub], timeout=30.0)
        assert graph.wait_for(client.service_is_ready, 30.0)
        for i, pose in enumerate(poses):  # odometry 10 ms after each frame's stamp, within tolerance
            x, y, z, w = _quaternion(pose[:, :3])
            msg = Odometry(header=Header(stamp=float_to_stamp(T0 + 0.1 * i + 0.01), frame_id="odom"))
            t = pose[:, 3]
            msg.pose.pose = Pose(position=Point(x=float(t[0]), y=float(t[1]), z=float(t[2])),
                                 orientation=Quaternion(x=x, y=y, z=z, w=w))
            odom_pub.publish(msg)
        assert graph.wait_for(lambda: len(node.localizer.odometry) == len(poses), 10.0)
        # the grey KITTI camera as mono8, at a quarter of the 640 px width (CPU time on shared cores)
        msgs = [rgb_to_image_msg(cv2.resize(r.load()[:, :, 0], (160, 48), interpolation=cv2.INTER_AREA),
                                 "mono8", header(i, "camera_left")) for i, r in enumerate(records)]
        graph.publish_paced(probe.pub, msgs, lambda: node.frames_in)
        n_kf = len(range(0, len(records), every))
        assert graph.wait_for(lambda: node.frames_ok == len(records), 60.0)
        assert not probe.matches  # mode map publishes no PlaceMatch
        saved_to = tmp_path / "via_service"
        future = client.call_async(SaveMap.Request(path=str(saved_to)))
        assert graph.wait_for(future.done, 20.0)
        res = future.result()
    assert res.success and res.entries == n_kf, res.message
    assert node.localizer.keyframes_added == n_kf and node.localizer.keyframes_without_pose == 0
    for where in (saved_to, target):  # the service's path, and map_path written on shutdown
        loaded = PlaceMap.load(where)
        assert len(loaded) == n_kf and loaded.model == model[1]
        for j, entry in enumerate(loaded.entries()):
            i = j * every
            assert entry.frame_id == "odom"
            assert entry.stamp == pytest.approx(T0 + 0.1 * i, abs=1e-6)
            np.testing.assert_allclose(entry.position, poses[i][:, 3], atol=1e-9)
            np.testing.assert_allclose(entry.orientation, _quaternion(poses[i][:, :3]), atol=1e-9)


# --------------------------------------------------------------------------- configuration


# --------------------------------------------------------------------------- backends


def test_onnx_backend_from_parameters_matches_torch(summer_map, torch_home, tmp_path, monkeypatch):
    """backend=onnx (the node builds the model and exports it): the offline torch top-1 on real frames."""
    monkeypatch.setenv("VPR_ROS_CACHE", str(tmp_path / "cache"))  # a fresh export, not a stale one
    path, queries, offline = summer_map
    frames = queries[:20]
    tp = topics()
    with InProcessGraph() as graph:
        node = graph.create(LocalizerNode, unique("localizer_onnx"), params={
            "map_path": str(path), "weights": "imagenet", "input_size": "native", "device": "cpu",
            "backend": "onnx", "threads": 1, "queue_size": 50, "top_k": 5, **tp})
        assert node.extractor.backend.kind == "onnx" and node.extractor.backend.threads == 1
        assert node.diagnostics()["backend"] == "onnx fp32"
        assert list((tmp_path / "cache" / "onnx").glob("*.onnx")), "the ONNX export was not cached"
        probe = Probe(graph, tp)
        probe.wait_connected(graph)
        msgs = [rgb_to_image_msg(im, "rgb8", header(i)) for i, im in enumerate(frames)]
        graph.publish_paced(probe.pub, msgs, lambda: node.frames_in)
        assert graph.wait_for(lambda: len(probe.matches) == len(frames), 30.0), \
            f"{len(probe.matches)} of {len(frames)} PlaceMatch received"
    for i, off in enumerate(offline[: len(frames)]):
        got = probe.matches[stamp_of(i)]
        assert got.model == "structvpr_mobilenetv2@imagenet"  # the map's label: same weights, any backend
        np.testing.assert_allclose([c.score for c in got.matches], off.scores, atol=1e-3)
        if off.scores[0] - off.scores[1] > 1e-3:  # no near-tie: the same place first
            assert got.matches[0].entry_id == int(off.ids[0]), i


def test_fp16_on_cpu_refused_with_the_reason(summer_map, torch_home):
    path, _, _ = summer_map
    with InProcessGraph() as graph:
        with pytest.raises(ModelError, match="fp16 needs a CUDA device"):
            graph.create(LocalizerNode, "localizer_fp16", params={
                "map_path": str(path), "weights": "imagenet", "input_size": "native", "device": "cpu",
                "precision": "fp16"})
        assert not graph.nodes


def test_main_refuses_unknown_backend_in_one_line(summer_map, torch_home):
    path, _, _ = summer_map
    out, errors = run_node_main("localizer_node", {"map_path": path, "backend": "tensorrt"}, timeout=120,
                                TORCH_HOME=str(torch_home))
    assert out.returncode == 2, out.stderr
    assert errors == ["localizer_node: error: localizer: parameter 'backend' = 'tensorrt' is not one of: "
                      "auto, torch, onnx"], out.stderr


def test_main_spins_single_threaded_with_short_switch_interval(monkeypatch):
    """Node main()s: a SingleThreadedExecutor, a 0.5 ms GIL switch interval while running, restored after."""
    import inspect

    from rclpy.executors import SingleThreadedExecutor

    from vpr_ros.ros import node_kit as ros_params

    assert inspect.signature(ros_params.run_node).parameters["executor_factory"].default \
        is SingleThreadedExecutor
    seen = []

    def factory():
        seen.append(sys.getswitchinterval())
        raise ConfigError("stop here")

    before = sys.getswitchinterval()
    assert ros_params.run_node(factory, [], "probe_node") == 2
    assert seen == [pytest.approx(ros_params.SWITCH_INTERVAL_S)] and sys.getswitchinterval() == before


@pytest.mark.parametrize("params, error, words", [
    ({"map_path": ""}, ConfigError, "map_path' is required"),
    ({"backend": "tensorrt"}, ConfigError, "'backend' = 'tensorrt' is not one of: auto, torch, onnx"),
    ({"precision": "fp8"}, ConfigError, "'precision' = 'fp8' is not one of: fp32, fp16, int8"),
    ({"threads": -1}, ConfigError, "threads"),
    ({"faiss_threads": 1000}, ConfigError, "faiss_threads"),
    ({"top_k": 0}, ConfigError, "top_k"),
    ({"top_k": "5"}, ConfigError, "must be an integer"),
    ({"min_score": 2.0}, ConfigError, "min_score"),
    ({"mode": "fly"}, ConfigError, "not one of: localize, map, both"),
    ({"image_transport": "theora"}, ConfigError, "image_transport"),
    ({"queue_size": -1}, ConfigError, "queue_size"),
    ({"index": "lsh", "mode": "map"}, ConfigError, "index"),
])
def test_invalid_parameters_refuse_to_start(model, summer_map, params, error, words):
    path, _, _ = summer_map
    with InProcessGraph() as graph, pytest.raises(error, match=words):
        localizer(graph, model, **{"map_path": str(path), **params})


def test_bad_maps_and_weights_refuse_to_start(model, summer_map, tmp_path):
    path, _, _ = summer_map
    other_dim = PlaceMap(16, model=model[1])
    other_dim.add(np.eye(16, dtype=np.float32)[:2])
    other_model = PlaceMap(model[0].dim, model="netvlad_vgg16@default")
    corrupt = tmp_path / "corrupt.vprmap"
    import shutil

    shutil.copytree(path, corrupt)
    npz = next(corrupt.glob("entries-*.npz"))
    npz.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])
    bad_weights = tmp_path / "garbage.pt"
    bad_weights.write_bytes(b"this is not a checkpoint")
    cases = [
        ({"map_path": str(tmp_path / "missing")}, MapError, "no place map at"),
        ({"map_path": str(corrupt)}, MapError, "checksum mismatch"),
        ({"map_path": str(other_dim.save(tmp_path / "d16"))}, MapError, "holds 16-dimensional"),
        ({"map_path": str(other_model.save(tmp_path / "netvlad"))}, MapError, "built with model"),
    ]
    with InProcessGraph() as graph:
        for params, error, words in cases:
            with pytest.raises(error, match=words):
                localizer(graph, model, **params)
        # the model is built from parameters here (no shared extractor)
        for weights, words in ((str(tmp_path / "nope.pt"), "does not exist"),
                               (str(bad_weights), "not a readable vpr_ros checkpoint")):
            with pytest.raises(ModelError, match=words):
                graph.create(LocalizerNode, "localizer_w", params={"map_path": str(path), "weights": weights})
        with pytest.raises(VprError, match="unknown device"):
            graph.create(LocalizerNode, "localizer_d", params={"map_path": str(path), "weights": "imagenet",
                                                                "device": "tpu"})
        assert not graph.nodes  # nothing half-started was left behind


def test_runtime_parameter_changes_validated(model, summer_map):
    path, _, _ = summer_map
    with InProcessGraph() as graph:
        node = localizer(graph, model, map_path=str(path), **topics())
        res = node.set_parameters([Parameter("top_k", value=0)])[0]
        assert not res.successful and "top_k" in res.reason
        res = node.set_parameters([Parameter("mode", value="map")])[0]
        assert not res.successful and "read-only" in res.reason
        res = node.set_parameters([Parameter("top_k", value=3), Parameter("degradation", value="jpeg_q10")])
        assert all(r.successful for r in res)
        assert node._values["top_k"] == 3 and node._values["degradation"] == "jpeg_q10"


def test_main_prints_one_line_and_exits_2(tmp_path, torch_home):
    """``localizer_node`` with a missing map: exit status 2 and one 'error:' line naming the map."""
    missing = tmp_path / "nowhere"
    params = {"map_path": missing, "weights": "imagenet", "input_size": "native"}
    out, errors = run_node_main("localizer_node", params, timeout=120, TORCH_HOME=str(torch_home))
    assert out.returncode == 2, out.stderr
    assert errors == [f"localizer_node: error: no place map at {missing}.vprmap (mode 'localize' needs one; "
                      "build it with `vpr-ros build-map` or run with mode: map)"], out.stderr


def test_node_main_serves_then_saves_map_on_sigint(nordland_dir, torch_home, tmp_path, monkeypatch):
    """``localizer_node`` as its own process (mode both): PlaceMatch over DDS, SIGINT saves the map."""
    monkeypatch.setenv("FASTDDS_BUILTIN_TRANSPORTS", "LARGE_DATA")  # images between processes
    tp = topics()
    target = tmp_path / "main_map"
    env = {**os.environ, "TORCH_HOME": str(torch_home), "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}
    cmd = [sys.executable, "-m", "vpr_ros.ros.localizer_node", "--ros-args", "-p", f"map_path:={target}",
           "-p", "mode:=both", "-p", "weights:=imagenet", "-p", "input_size:=native", "-p", "device:=cpu",
           "-p", f"image_topic:={tp['image_topic']}", "-p", f"match_topic:={tp['match_topic']}"]
    frames = [r.load() for r in load_nordland(nordland_dir, every=300).queries][:4]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        with InProcessGraph() as graph:
            probe = Probe(graph, tp)
            probe.wait_connected(graph, 120.0)  # another process: model load under load takes a while
            for i, frame in enumerate(frames):
                # best effort, and the node's reader side is not observable from here: resend until
                # answered (a repeated stamp is answered again but never becomes a second place)
                msg = rgb_to_image_msg(frame, "rgb8", header(i))
                answered = graph.send_until(lambda m=msg: probe.pub.publish(m),
                                            lambda i=i: stamp_of(i) in probe.matches, 60.0)
                assert answered, f"frame {i} unanswered"
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert f"saved {len(frames)} places to {target}.vprmap" in out
    assert len(PlaceMap.load(target)) == len(frames)
    assert [len(probe.matches[stamp_of(i)].matches) for i in range(len(frames))] == [0, 1, 2, 3]
