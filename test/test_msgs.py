"""The generated vpr_ros_msgs interfaces: construction, CDR round trips, and a real DDS pub/sub.

Skipped when vpr_ros_msgs has not been built (``python scripts/build_msgs.py``).
"""

from __future__ import annotations

import os
import time
import uuid

import numpy as np
import pytest

pytest.importorskip("rclpy", reason="needs rclpy (pip install 'ros-rclpy[fastrtps]')")
msgs = pytest.importorskip(
    "vpr_ros_msgs.msg", reason="vpr_ros_msgs is not built: run `python scripts/build_msgs.py` in the venv"
)
srvs = pytest.importorskip("vpr_ros_msgs.srv", reason="vpr_ros_msgs is not built")

from builtin_interfaces.msg import Time  # noqa: E402
from geometry_msgs.msg import Point, Pose, Quaternion, Transform, Vector3  # noqa: E402
from rclpy.serialization import deserialize_message, serialize_message  # noqa: E402
from std_msgs.msg import Header  # noqa: E402

LoopClosure = msgs.LoopClosure
PlaceCandidate = msgs.PlaceCandidate
PlaceMatch = msgs.PlaceMatch
TransmissionStats = msgs.TransmissionStats
SaveMap = srvs.SaveMap

U64_MAX = 2**64 - 1


def place_match() -> PlaceMatch:
    """A fully populated PlaceMatch with two candidates."""
    pose = Pose(position=Point(x=1.0, y=-2.0, z=0.5), orientation=Quaternion(x=0.0, y=0.0, z=0.6, w=0.8))
    return PlaceMatch(
        header=Header(stamp=Time(sec=1_700_000_000, nanosec=123_456_789), frame_id="camera_optical"),
        query_id=U64_MAX,
        model="mobilenet_v2_student",
        matches=[
            PlaceCandidate(entry_id=42, score=0.875, stamp=Time(sec=10, nanosec=5), has_pose=True, pose=pose,
                           pose_frame_id="map", source="nordland/summer"),
            PlaceCandidate(entry_id=7, score=0.5, source="bag:run1"),
        ],
        latency_ms=12.5,
        degradation="jpeg q=20",
    )


def roundtrip(msg):
    data = serialize_message(msg)
    assert isinstance(data, bytes) and data
    return deserialize_message(data, type(msg))


def test_place_match_fields_and_roundtrip():
    msg = place_match()
    back = roundtrip(msg)
    assert back == msg
    assert back.query_id == U64_MAX and back.header.frame_id == "camera_optical"
    assert [c.entry_id for c in back.matches] == [42, 7]
    best = back.matches[0]
    assert best.has_pose and best.pose.orientation.w == pytest.approx(0.8) and best.pose_frame_id == "map"
    assert best.stamp == Time(sec=10, nanosec=5) and best.score == pytest.approx(0.875)
    assert back.latency_ms == pytest.approx(12.5) and back.degradation == "jpeg q=20"


def test_place_match_sequence_fields_roundtrip():
    msg = place_match()
    msg.sequence_frames = 20
    msg.sequence_matches = [PlaceCandidate(entry_id=41, score=1.75, source="nordland/summer")]
    msg.sequence_score, msg.sequence_velocity, msg.sequence_fallback = 1.75, 1.25, False  # exact in float32
    back = roundtrip(msg)
    assert back == msg and back.sequence_frames == 20 and [c.entry_id for c in back.sequence_matches] == [41]
    assert back.sequence_score == pytest.approx(1.75) and back.sequence_velocity == 1.25
    assert [c.entry_id for c in back.matches] == [42, 7]  # the single-frame result is kept beside it
    off = PlaceMatch()  # sequence matching off: no frames, no matches
    assert off.sequence_frames == 0 and list(off.sequence_matches) == [] and not off.sequence_fallback


def test_defaults():
    cand = PlaceCandidate()
    assert (cand.entry_id, cand.score, cand.has_pose) == (0, 0.0, False)
    assert cand.source == "" and cand.pose_frame_id == ""
    assert cand.pose.orientation.w == 1.0  # identity quaternion by default
    match = PlaceMatch()
    assert list(match.matches) == [] and match.model == "" and roundtrip(match) == match
    loop = LoopClosure()
    assert not loop.verified and not loop.has_transform and loop.relative_transform.rotation.w == 1.0


def test_loop_closure_roundtrip():
    msg = LoopClosure(
        header=Header(stamp=Time(sec=100, nanosec=1), frame_id="camera"),
        query_id=1234, query_stamp=Time(sec=99, nanosec=999_999_999),
        match_id=17, match_stamp=Time(sec=3, nanosec=0),
        score=0.90625, verified=True, inliers=87, has_transform=True,
        relative_transform=Transform(translation=Vector3(x=0.0, y=0.0, z=1.0),
                                     rotation=Quaternion(x=0.0, y=0.1, z=0.0, w=0.995)),
    )
    back = roundtrip(msg)
    assert back == msg and back.inliers == 87 and back.query_stamp.nanosec == 999_999_999
    assert back.relative_transform.translation.z == 1.0


def test_transmission_stats_roundtrip():
    msg = TransmissionStats(header=Header(frame_id="camera"), frame_bytes=2**40, bitrate_kbps=512.25,
                            mode="h264 crf=35")
    assert roundtrip(msg) == msg


def test_save_map_service_types():
    req = SaveMap.Request(path="/tmp/map.vpr")
    res = SaveMap.Response(success=True, message="saved 3 entries to /tmp/map.vpr", entries=3)
    assert roundtrip(req) == req and roundtrip(res) == res
    assert SaveMap.Request().path == ""  # empty = configured path


def test_field_type_checks():
    # Kilted only checks field types when asked (check_fields=True or ROS_PYTHON_CHECK_FIELDS=1).
    with pytest.raises(AssertionError):
        PlaceCandidate(entry_id=-1, check_fields=True)
    with pytest.raises(AssertionError):
        PlaceMatch(query_id=2**64, check_fields=True)
    with pytest.raises(AssertionError):
        LoopClosure(inliers=2**32, check_fields=True)
    with pytest.raises(AssertionError):
        PlaceMatch(matches=[LoopClosure()], check_fields=True)


def test_numpy_scalars_converted_like_nodes_must():
    # With field checks off (the default) numpy scalars are NOT converted: np.float32 and np.bool_
    # serialize silently as 0.0 / False, np.int64 fails with a SystemError at publish time.
    # Nodes must pass Python int/float/bool, as here.
    ids = np.array([5, 9], dtype=np.int64)
    scores = np.array([0.75, 0.25], dtype=np.float32)
    flags = np.array([True, False])
    cands = [PlaceCandidate(entry_id=int(i), score=float(s), has_pose=bool(f))
             for i, s, f in zip(ids, scores, flags, strict=True)]
    back = roundtrip(PlaceMatch(matches=cands))
    assert [(c.entry_id, c.score, c.has_pose) for c in back.matches] == [(5, 0.75, True), (9, 0.25, False)]


# ---------------------------------------------------------------- DDS


@pytest.fixture()
def ros_context(tmp_path, monkeypatch):
    """An rclpy context confined to this host, torn down after the test."""
    import rclpy

    monkeypatch.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    if not os.environ.get("HOME"):
        monkeypatch.setenv("HOME", str(tmp_path))
    if not os.environ.get("ROS_LOG_DIR"):
        monkeypatch.setenv("ROS_LOG_DIR", str(tmp_path / "ros_log"))
    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        yield context
    finally:
        rclpy.shutdown(context=context)


def _spin_until(executor, done, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        executor.spin_once(timeout_sec=0.05)
    return done()


@pytest.mark.ros
def test_place_match_publish_subscribe(ros_context):
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy

    topic = f"/vpr_test_{uuid.uuid4().hex[:12]}/place_match"  # unique: other test runs may share the host
    qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
    pub_node = rclpy.create_node("vpr_test_pub", context=ros_context)
    sub_node = rclpy.create_node("vpr_test_sub", context=ros_context)
    received: list[PlaceMatch] = []
    sub = sub_node.create_subscription(PlaceMatch, topic, received.append, qos)
    pub = pub_node.create_publisher(PlaceMatch, topic, qos)
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(pub_node)
    executor.add_node(sub_node)
    try:
        # matched on both sides (each side reports its own match), not only discovered
        matched = _spin_until(
            executor, lambda: pub.get_subscription_count() > 0 and sub.get_publisher_count() > 0, 30.0)
        assert matched, "publisher and subscription not matched within 30 s"
        sent = place_match()
        pub.publish(sent)
        assert _spin_until(executor, lambda: bool(received), 10.0), "no PlaceMatch received within 10 s"
        got = received[0]
        assert got is not sent and got == sent
        assert [c.source for c in got.matches] == ["nordland/summer", "bag:run1"]
    finally:
        executor.shutdown()
        pub_node.destroy_node()
        sub_node.destroy_node()


@pytest.mark.ros
def test_save_map_service_call(ros_context):
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    name = f"/vpr_test_{uuid.uuid4().hex[:12]}/save_map"
    server = rclpy.create_node("vpr_test_server", context=ros_context)
    client_node = rclpy.create_node("vpr_test_client", context=ros_context)

    def handle(request: SaveMap.Request, response: SaveMap.Response) -> SaveMap.Response:
        response.success = True
        response.entries = 5
        response.message = f"saved to {request.path or '<configured>'}"
        return response

    server.create_service(SaveMap, name, handle)
    client = client_node.create_client(SaveMap, name)
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(server)
    executor.add_node(client_node)
    try:
        assert _spin_until(executor, client.service_is_ready, 10.0), "service not discovered"
        future = client.call_async(SaveMap.Request(path=""))
        assert _spin_until(executor, future.done, 10.0), "no SaveMap response within 10 s"
        res = future.result()
        assert res.success and res.entries == 5 and res.message == "saved to <configured>"
    finally:
        executor.shutdown()
        server.destroy_node()
        client_node.destroy_node()
