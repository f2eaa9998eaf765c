"""Sequence matching in the ROS nodes, on a real rclpy/DDS graph with real Nordland frames.

The localizer (packaged student) localises winter frames of one held-out 100-place block against the
summer map with ``sequence_length`` > 0: every PlaceMatch must carry the single-frame result and the
sequence result, the latter equal to the offline matcher on the same candidates. With odometry the
sequence advances by travelled distance (a stop adds no step). The loop-closure node takes its
candidates from the sequence result when asked to.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("ros_support")  # rclpy and the built messages, or skip saying which is missing

from geometry_msgs.msg import Point, Pose, Quaternion
from nav_msgs.msg import Odometry
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile
from ros_support import ROS_TESTS, T0, fresh_namespace, stamp_key, unique
from sensor_msgs.msg import Image
from std_msgs.msg import Header
from vpr_ros_msgs.msg import LoopClosure, PlaceCandidate, PlaceMatch

from vpr_ros.core.localizer import build_extractor
from vpr_ros.core.sequence import SequenceConfig, match_stream
from vpr_ros.data.places import load_nordland
from vpr_ros.eval.offline import map_from_records
from vpr_ros.ros.conversions import float_to_stamp, rgb_to_image_msg
from vpr_ros.ros.localizer_node import LocalizerNode
from vpr_ros.ros.loop_closure_node import LoopClosureNode
from vpr_ros.ros.runner import InProcessGraph

pytestmark = ROS_TESTS
BLOCK = range(200, 300)  # one block of places held out from the packaged student's training
LENGTH, CANDIDATES = 10, 30


@pytest.fixture(scope="module")
def student():
    import torch

    from vpr_ros.core.models.resolve import PACKAGED

    if not PACKAGED["loqi"].is_file():
        pytest.skip("needs the packaged Nordland LoQI student")
    threads = torch.get_num_threads()  # one thread (process-wide) for this module: on busy shared cores
    try:  # OpenMP's spinning workers make 2 threads several times slower; restored afterwards
        yield build_extractor("loqi", "", "", "cpu", 16, threads=1)  # Nordland's own student
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def block(student, nordland_dir, tmp_path_factory):
    """The block's summer map (saved), its winter frames, their offline top-K and the +-2 frame truth."""
    ext, label = student
    ds = load_nordland(nordland_dir)
    db = [r for r in ds.database if r.frame_index in BLOCK]
    qs = [r for r in ds.queries if r.frame_index in BLOCK]
    place_map, _, _ = map_from_records(ext, db, model=label, progress=False)
    path = place_map.save(tmp_path_factory.mktemp("maps") / "summer_block")
    frames = [r.load() for r in qs]
    scores, ids = place_map.search(ext(frames), CANDIDATES)
    truth = np.abs(np.array([r.frame_index for r in qs])[:, None]
                   - np.array([r.frame_index for r in db])[None, :]) <= 2
    return path, frames, ids, scores, truth


def _topics() -> dict[str, str]:
    ns = fresh_namespace()
    return {"image_topic": f"{ns}/camera/image", "match_topic": f"{ns}/place_match"}


def _localizer(graph: InProcessGraph, student, **params) -> LocalizerNode:
    ext, label = student
    params = {"diagnostics_period_s": 0.0, "queue_size": 200, "sequence_length": LENGTH,
              "sequence_candidates": CANDIDATES, **params}
    return graph.create(LocalizerNode, unique("localizer"), params=params, extractor=ext, label=label)


def _frame(image: np.ndarray, i: int) -> Image:
    return rgb_to_image_msg(image, "rgb8", Header(stamp=float_to_stamp(T0 + 0.1 * i), frame_id="camera"))


def _collect(graph: InProcessGraph, topic: str) -> tuple[dict[float, PlaceMatch], object]:
    probe = graph.add(graph.node(unique("probe")))
    got: dict[float, PlaceMatch] = {}
    sub = probe.create_subscription(PlaceMatch, topic, lambda m: got.setdefault(stamp_key(m.header.stamp), m),
                                    QoSProfile(depth=1000))
    return got, (probe, sub)


def test_place_match_carries_single_frame_and_sequence_results(student, block):
    from rclpy.qos import qos_profile_sensor_data

    path, frames, ids, scores, truth = block
    offline, offline_scores = match_stream(ids, scores, SequenceConfig(length=LENGTH, candidates=CANDIDATES))
    tp = _topics()
    with InProcessGraph() as graph:
        node = _localizer(graph, student, map_path=str(path), top_k=5, **tp)
        got, (probe, sub) = _collect(graph, tp["match_topic"])
        pub = probe.create_publisher(Image, tp["image_topic"], qos_profile_sensor_data)
        assert graph.wait_matched([pub], [sub], 30.0), "localizer and probe not matched"
        graph.publish_paced(pub, [_frame(im, i) for i, im in enumerate(frames)], lambda: node.frames_in)
        assert graph.wait_for(lambda: len(got) == len(frames), 60.0), f"{len(got)} of {len(frames)} matches"

        # the declared parameter: described, ranged, validated at runtime
        desc = node.describe_parameter("sequence_length")
        assert "sequence" in desc.description and desc.integer_range[0].to_value == 1000
        res = node.set_parameters([Parameter("sequence_v_min", value=2.0)])  # above sequence_v_max 1.25
        assert not res[0].successful and "velocity range is empty" in res[0].reason
        res = node.set_parameters([Parameter("sequence_length", value=0)])
        assert res[0].successful
        graph.publish_paced(pub, [_frame(frames[0], len(frames))], lambda: node.frames_in)
        assert graph.wait_for(lambda: len(got) == len(frames) + 1, 30.0)
        off = got[stamp_key(float_to_stamp(T0 + 0.1 * len(frames)))]
        assert off.sequence_frames == 0 and list(off.sequence_matches) == [] and len(off.matches) == 5
        diag = node.diagnostics()

    single_hits, seq_hits, agree = [], [], 0
    for i in range(len(frames)):
        msg = got[stamp_key(float_to_stamp(T0 + 0.1 * i))]
        assert msg.sequence_frames == min(i + 1, LENGTH)
        assert len(msg.matches) == 5 and len(msg.sequence_matches) == 5 and not msg.sequence_fallback
        assert msg.matches[0].entry_id == ids[i][0] or abs(msg.matches[0].score - msg.matches[1].score) < 1e-4
        assert msg.sequence_score == pytest.approx(msg.sequence_matches[0].score)
        assert math.isfinite(msg.sequence_velocity) and 0.8 <= msg.sequence_velocity <= 1.25
        agree += msg.sequence_matches[0].entry_id == offline[i, 0]
        assert msg.sequence_score == pytest.approx(offline_scores[i, 0], abs=1e-3)
        single_hits.append(truth[i, msg.matches[0].entry_id])
        seq_hits.append(truth[i, msg.sequence_matches[0].entry_id])
    assert agree >= 0.95 * len(frames)  # the same matcher as offline (near ties aside)
    assert np.mean(seq_hits) > np.mean(single_hits)
    assert diag["sequence_length"] == 0 and diag["sequence_fallbacks"] == 0


def test_odometry_spaces_the_sequence_by_travelled_distance(student, block):
    from rclpy.qos import qos_profile_sensor_data

    path, frames, *_ = block
    # forward 5 m, stopped for 3 frames, forward 3 m, then 2 m backwards (facing +x throughout)
    xs = [0, 1, 2, 3, 4, 5, 5, 5, 5, 6, 7, 8, 7, 6]
    expected = [1, 2, 3, 4, 5, 6, 6, 6, 6, 7, 8, 9, 10, 11]  # a stop replaces the last buffered frame
    tp = _topics()
    odom_topic = tp["image_topic"].rsplit("/", 2)[0] + "/odom"
    with InProcessGraph() as graph:
        node = _localizer(graph, student, map_path=str(path), odom_topic=odom_topic, sequence_step_m=1.0,
                          sequence_length=20, **tp)
        got, (probe, sub) = _collect(graph, tp["match_topic"])
        pub = probe.create_publisher(Image, tp["image_topic"], qos_profile_sensor_data)
        odom_pub = probe.create_publisher(Odometry, odom_topic, QoSProfile(depth=100))
        assert graph.wait_matched([pub, odom_pub], [sub], 30.0)
        for i, x in enumerate(xs):  # odometry 10 ms after each frame's stamp (odom_tolerance_s 0.05)
            msg = Odometry(header=Header(stamp=float_to_stamp(T0 + 0.1 * i + 0.01), frame_id="odom"))
            msg.pose.pose = Pose(position=Point(x=float(x)), orientation=Quaternion(w=1.0))
            odom_pub.publish(msg)
        assert graph.wait_for(lambda: len(node.localizer.odometry) == len(xs), 10.0), "odometry not received"
        graph.publish_paced(pub, [_frame(frames[x], i) for i, x in enumerate(xs)], lambda: node.frames_in)
        assert graph.wait_for(lambda: len(got) == len(xs), 60.0), f"{len(got)} of {len(xs)} matches"
        no_pose = node.localizer.sequence_no_pose
    filled = [got[stamp_key(float_to_stamp(T0 + 0.1 * i))].sequence_frames for i in range(len(xs))]
    assert filled == expected and no_pose == 0


def test_loop_closure_takes_sequence_candidates_when_asked(ros_env):
    ns = fresh_namespace()
    tp = {"match_topic": f"{ns}/place_match", "loop_closure_topic": f"{ns}/loop_closure"}
    old = float_to_stamp(T0)

    def match(i: int, *, seq_score: float, fallback: bool = False, frames: int = 10) -> PlaceMatch:
        return PlaceMatch(header=Header(stamp=float_to_stamp(T0 + 100.0 + i), frame_id="camera"), query_id=i,
                          matches=[PlaceCandidate(entry_id=1, score=0.99, stamp=old)],
                          sequence_frames=frames, sequence_fallback=fallback, sequence_score=seq_score,
                          sequence_matches=[PlaceCandidate(entry_id=7, score=seq_score, stamp=old)])

    received: list[LoopClosure] = []
    with InProcessGraph() as graph:
        node = graph.create(LoopClosureNode, unique("loop_closure"),
                            params={**tp, "geometric_verification": False, "diagnostics_period_s": 0.0,
                                    "candidate_source": "sequence", "sequence_score_threshold": 0.25})
        probe = graph.add(graph.node(unique("probe")))
        pub = probe.create_publisher(PlaceMatch, tp["match_topic"], QoSProfile(depth=100))
        sub = probe.create_subscription(LoopClosure, tp["loop_closure_topic"], received.append,
                                        QoSProfile(depth=100))
        assert graph.wait_matched([pub], [sub], 30.0)
        pub.publish(match(1, seq_score=0.6))  # sequence candidate 7 passes 0.25
        pub.publish(match(2, seq_score=0.1))  # below the sequence threshold: no closure (not the single one)
        pub.publish(match(3, seq_score=0.6, fallback=True))  # fallback: the single-frame candidate 1
        pub.publish(match(4, seq_score=0.6, frames=0))  # no sequence result: single-frame candidate 1
        assert graph.wait_for(lambda: node.matches_done == 4 and len(received) == 3, 30.0), node.diagnostics()
        queries = node.sequence_queries
    by_query = {lc.query_id: lc for lc in received}
    assert sorted(by_query) == [1, 3, 4] and queries == 2
    assert by_query[1].match_id == 7 and by_query[1].score == pytest.approx(0.6)
    assert by_query[3].match_id == 1 and by_query[4].match_id == 1
    assert by_query[4].score == pytest.approx(0.99)
