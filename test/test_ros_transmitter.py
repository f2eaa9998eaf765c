"""The transmitter node on a real rclpy/DDS graph with real KITTI frames.

What comes out of the node must be exactly what the core Transmitter makes of the same frames
in the same order (the simulator is deterministic): JPEG payloads byte for byte, H.264 frame
sizes and decoded pixels; stamps are the input's.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("ros_support")  # rclpy and the built messages, or skip saying which is missing

from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from ros_support import ROS_TESTS, T0, fresh_namespace, run_node_main, stamp_key, unique
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header
from vpr_ros_msgs.msg import TransmissionStats

from vpr_ros.core.errors import ConfigError
from vpr_ros.core.images import decode_image_msg
from vpr_ros.core.transmission import TransmissionConfig, Transmitter
from vpr_ros.data.places import load_kitti
from vpr_ros.ros.conversions import float_to_stamp, rgb_to_image_msg
from vpr_ros.ros.runner import InProcessGraph
from vpr_ros.ros.transmitter_node import TransmitterNode

pytestmark = ROS_TESTS
BEST_EFFORT = QoSProfile(depth=200, reliability=ReliabilityPolicy.BEST_EFFORT)


@pytest.fixture(scope="module")
def frames(kitti_dir):
    return [r.load() for r in load_kitti(kitti_dir, "05").database[:12]]


class Probe:
    """Publishes camera frames; collects the transmitter's outputs keyed by stamp."""

    def __init__(self, graph: InProcessGraph, ns: str) -> None:
        self.node = graph.add(graph.node(unique("probe")))
        self.images: dict[float, Image] = {}
        self.jpegs: dict[float, CompressedImage] = {}
        self.stats: dict[float, TransmissionStats] = {}
        self.pub = self.node.create_publisher(Image, f"{ns}/camera/image", qos_profile_sensor_data)
        self.subs = [
            self.node.create_subscription(typ, f"{ns}/{topic}", lambda m, into=into: into.__setitem__(
                stamp_key(m.header.stamp), m), qos)
            for typ, topic, into, qos in (
                (Image, "link/image", self.images, BEST_EFFORT),
                (CompressedImage, "link/image/compressed", self.jpegs, BEST_EFFORT),
                (TransmissionStats, "link/stats", self.stats, QoSProfile(depth=200)))]

    def send(self, graph: InProcessGraph, node: TransmitterNode, frames, first: int = 0) -> list[float]:
        msgs = [rgb_to_image_msg(f, "rgb8", Header(stamp=float_to_stamp(T0 + 0.1 * (first + i)),
                                                   frame_id="cam")) for i, f in enumerate(frames)]
        graph.publish_paced(self.pub, msgs, lambda: node.frames_in)
        return [round(T0 + 0.1 * (first + i), 3) for i in range(len(frames))]


def start(graph: InProcessGraph, **params) -> tuple[TransmitterNode, Probe]:
    ns = fresh_namespace()
    params = {"image_topic": f"{ns}/camera/image", "output_topic": f"{ns}/link/image",
              "stats_topic": f"{ns}/link/stats", "queue_size": 100, **params}
    node = graph.create(TransmitterNode, unique("transmitter"), params=params)
    probe = Probe(graph, ns)
    assert graph.wait_matched([probe.pub], probe.subs, 30.0), "transmitter and probe not matched"
    return node, probe


def test_jpeg_payloads_sizes_and_stamps(frames):
    core = Transmitter(TransmissionConfig(mode="jpeg", jpeg_quality=10))
    expected = [core.process(f) for f in frames]
    with InProcessGraph() as graph:
        node, probe = start(graph, mode="jpeg", jpeg_quality=10)
        stamps = probe.send(graph, node, frames)
        assert graph.wait_for(lambda: len(probe.stats) == len(frames) and len(probe.jpegs) == len(frames)
                              and len(probe.images) == len(frames), 20.0), node.diagnostics()
    for s, exp in zip(stamps, expected, strict=True):
        jpeg, stats = probe.jpegs[s], probe.stats[s]
        assert bytes(jpeg.data) == exp.payload  # the real payload, byte for byte
        assert jpeg.format == "rgb8; jpeg compressed bgr8" and jpeg.header.frame_id == "cam"
        assert stats.frame_bytes == len(exp.payload) and stats.mode == "jpeg_q10"
        # the decoded Image goes out too while someone subscribes to it
        np.testing.assert_array_equal(decode_image_msg(probe.images[s]), exp.image)
    sizes = np.array([len(e.payload) for e in expected])
    raw = frames[0].nbytes
    assert sizes.max() < raw / 10  # q=10 JPEG of a 640x193 frame: a few kB against 370 kB raw
    last = probe.stats[stamps[-1]]
    assert last.bitrate_kbps == pytest.approx(sizes.mean() * 8 * 10.0 / 1000, rel=1e-3)  # 10 Hz stamps


def test_h264_sizes_pixels_and_stamps(frames):
    core = Transmitter(TransmissionConfig(mode="h264", qp=35, gop=5))
    expected = [core.process(f) for f in frames]
    with InProcessGraph() as graph:
        node, probe = start(graph, mode="h264", qp=35, gop=5)
        stamps = probe.send(graph, node, frames)
        assert graph.wait_for(lambda: len(probe.stats) == len(frames) and len(probe.images) == len(frames),
                              30.0), node.diagnostics()
    assert not probe.jpegs  # video modes publish decoded frames only
    sizes = [probe.stats[s].frame_bytes for s in stamps]
    assert sizes == [e.nbytes for e in expected]
    assert sizes[0] > 2 * np.median(sizes[1:5])  # keyframe, then P-frames
    assert sizes[5] > 2 * np.median(sizes[1:5])  # gop 5: the next keyframe
    for s, exp in zip(stamps, expected, strict=True):
        img = probe.images[s]
        assert img.encoding == "rgb8" and (img.height, img.width) == exp.image.shape[:2]
        np.testing.assert_array_equal(decode_image_msg(img), exp.image)
        assert probe.stats[s].mode == "h264_qp35_gop5"


def test_runtime_reconfiguration(frames):
    with InProcessGraph() as graph:
        node, probe = start(graph, mode="jpeg", jpeg_quality=10)
        low = probe.send(graph, node, frames[:3])
        assert graph.wait_for(lambda: len(probe.stats) == 3, 10.0)
        res = node.set_parameters([Parameter("jpeg_quality", value=90)])[0]
        assert res.successful
        high = probe.send(graph, node, frames[:3], first=3)
        assert graph.wait_for(lambda: len(probe.stats) == 6, 10.0)
        bad = node.set_parameters([Parameter("mode", value="bitrate")])[0]  # kbps is still 0
        assert not bad.successful and "kbps" in bad.reason
        bad = node.set_parameters([Parameter("mode", value="warp")])[0]
        assert not bad.successful and "not one of" in bad.reason
        bad = node.set_parameters([Parameter("jpeg_quality", value=101)])[0]
        assert not bad.successful
        ok = node.set_parameters([Parameter("kbps", value=200.0), Parameter("mode", value="bitrate")])
        assert all(r.successful for r in ok) and node.config.label == "kbps200@10fps"
    for a, b in zip(low, high, strict=True):
        assert probe.stats[b].frame_bytes > 3 * probe.stats[a].frame_bytes
        assert probe.stats[a].mode == "jpeg_q10" and probe.stats[b].mode == "jpeg_q90"


def test_bad_frames_counted_node_keeps_running(frames):
    with InProcessGraph() as graph:
        node, probe = start(graph, mode="h264", qp=30)
        bad = [Image(header=Header(stamp=float_to_stamp(T0)), height=4, width=4, encoding="rgb8", step=12,
                     data=b"\x00" * 5),
               Image(header=Header(stamp=float_to_stamp(T0 + 0.1)), height=4, width=4, encoding="weird8",
                     step=4, data=b"\x00" * 16),
               Image(header=Header(stamp=float_to_stamp(T0 + 0.2)), encoding="rgb8")]
        graph.publish_paced(probe.pub, bad, lambda: node.frames_in)
        stamps = probe.send(graph, node, frames[:2], first=3)
        assert graph.wait_for(lambda: all(s in probe.stats for s in stamps), 20.0), node.diagnostics()
        diag = node.diagnostics()
    assert diag["rejected_size_mismatch"] == 1 and diag["rejected_unsupported_encoding"] == 1
    assert diag["rejected_empty"] == 1 and diag["frames_sent"] == 2 and diag["rejected_total"] == 3


@pytest.mark.parametrize("params, words", [
    ({"mode": "bitrate"}, "kbps must be > 0"),
    ({"jpeg_quality": 0}, "jpeg_quality"),
    ({"mode": "h266"}, "not one of"),
    ({"scale": 0.5, "mode": "none"}, "use mode 'resize'"),
    ({"preset": "instant"}, "preset"),
])
def test_bad_configuration_refuses_to_start(params, words):
    with InProcessGraph() as graph, pytest.raises(ConfigError, match=words):
        graph.create(TransmitterNode, "transmitter_bad", params=params)


def test_main_prints_one_line_and_exits_2():
    out, errors = run_node_main("transmitter_node", {"mode": "bitrate"})
    assert out.returncode == 2, out.stderr
    assert len(errors) == 1 and errors[0].startswith("transmitter_node: error: transmitter: invalid "
                                                     "transmission settings: mode 'bitrate' needs a budget")
