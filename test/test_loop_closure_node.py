"""The loop-closure node on a real rclpy/DDS graph with RTAB-Map's real loop sequence.

Frames go out as real ``sensor_msgs/Image`` messages and, after each, a real ``vpr_ros_msgs/PlaceMatch``
whose candidates are what the localizer in ``both`` mode would send: the frame's best earlier frames by
descriptor (ImageNet-initialised student, faiss place map). The node must publish ``LoopClosure`` for
the revisits and none for the first traverse. The full chain with the real localizer node runs in
``test_replay.py``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("ros_support")  # rclpy and the built messages, or skip saying which is missing

from rcl_interfaces.msg import SetParametersResult
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, qos_profile_sensor_data
from ros_support import ROS_TESTS, T0, fresh_namespace, run_node_main, unique
from sensor_msgs.msg import Image
from std_msgs.msg import Header
from vpr_ros_msgs.msg import LoopClosure, PlaceCandidate, PlaceMatch

from vpr_ros.core.errors import ConfigError
from vpr_ros.core.extract import DescriptorExtractor
from vpr_ros.core.loop_closure import DEFAULT_MIN_INLIERS
from vpr_ros.core.mapdb import PlaceMap
from vpr_ros.core.models import resolve_model
from vpr_ros.core.timeline import to_seconds
from vpr_ros.data.places import load_rtabmap_loop
from vpr_ros.ros.conversions import float_to_stamp, rgb_to_image_msg
from vpr_ros.ros.loop_closure_node import LoopClosureNode
from vpr_ros.ros.runner import InProcessGraph

pytestmark = ROS_TESTS
EVERY = 2  # every 2nd frame of the 84: 42 frames, revisits still 5 GT frames wide


@pytest.fixture(scope="module")
def sequence(rtabmap_dir, torch_home):
    """Frames (1 Hz stamps by original index), ground truth, and the PlaceMatch candidates of each frame."""
    rtab = load_rtabmap_loop(rtabmap_dir)
    records, gt = rtab.database, rtab.truth_matrix()
    idx = list(range(0, len(records), EVERY))
    images = [records[i].load() for i in idx]
    ext = DescriptorExtractor(resolve_model(None, "structvpr_mobilenetv2"), device="cpu")
    desc = ext(images)
    place_map = PlaceMap(desc.shape[1])
    cands: list[list[tuple[int, float]]] = []
    for d in desc:  # query the map of earlier frames, then add the frame (localizer "both")
        if len(place_map):
            res = place_map.query(d[None], 5)[0]
            cands.append([(int(i), float(s)) for i, s in zip(res.ids, res.scores, strict=True)])
        else:
            cands.append([])
        place_map.add(d[None])
    return idx, images, gt | gt.T, cands


def stamp(i: int) -> float:
    return T0 + float(i)


def topics() -> dict[str, str]:
    ns = fresh_namespace()
    return {"image_topic": f"{ns}/camera/image", "match_topic": f"{ns}/place_match",
            "loop_closure_topic": f"{ns}/loop_closure"}


def place_match(k: int, idx: list[int], cands: list[tuple[int, float]]) -> PlaceMatch:
    i = idx[k]
    return PlaceMatch(header=Header(stamp=float_to_stamp(stamp(i)), frame_id="camera"), query_id=k,
                      model="structvpr_mobilenetv2@imagenet",
                      matches=[PlaceCandidate(entry_id=int(e), score=float(s),
                                              stamp=float_to_stamp(stamp(idx[e]))) for e, s in cands])


def run_graph(sequence, **params) -> tuple[LoopClosureNode, list[LoopClosure], dict]:
    idx, images, _, cands = sequence
    tp = topics()
    params = {**tp, "diagnostics_period_s": 0.0, **params}
    received: list[LoopClosure] = []
    with InProcessGraph() as graph:
        node = graph.create(LoopClosureNode, unique("loop_closure"), params=params)
        probe = graph.add(graph.node(unique("probe")))
        img_pub = probe.create_publisher(Image, tp["image_topic"], qos_profile_sensor_data)
        match_pub = probe.create_publisher(PlaceMatch, tp["match_topic"], QoSProfile(depth=100))
        closures = probe.create_subscription(LoopClosure, tp["loop_closure_topic"], received.append,
                                             QoSProfile(depth=200))
        verify = params.get("geometric_verification", True)
        assert graph.wait_matched([match_pub, img_pub] if verify else [match_pub], [closures], 30.0)
        for k in range(len(idx)):
            if verify:  # best effort: resend until the node has it (a repeat only refreshes its cache)
                msg = rgb_to_image_msg(images[k], "rgb8", Header(stamp=float_to_stamp(stamp(idx[k])),
                                                                 frame_id="camera"))
                assert graph.send_until(lambda m=msg: img_pub.publish(m), lambda k=k: node.images_in > k,
                                        60.0, resend_every=5.0), f"image {k} not received"
            match_pub.publish(place_match(k, idx, cands[k]))
        assert graph.wait_for(lambda: node.matches_done == len(idx), 60.0), node.diagnostics()
        expected = node.closures_published
        assert graph.wait_for(lambda: len(received) == expected, 10.0)
        diag = node.diagnostics()
    return node, received, diag


def test_publishes_verified_loop_closures_for_real_revisits(sequence):
    idx, _, gt, cands = sequence
    node, got, diag = run_graph(sequence)
    assert diag["images_received"] >= len(idx) and diag["queue_drops"] == 0
    assert len(got) >= 12, diag  # 22 frames revisit; most must close a loop
    for lc in got:
        q, m = idx[lc.query_id], idx[lc.match_id]
        assert gt[q, m], f"false loop closure {q + 1}.jpg -> {m + 1}.jpg"
        assert lc.verified and lc.inliers >= DEFAULT_MIN_INLIERS and lc.has_transform
        assert to_seconds(lc.query_stamp) == pytest.approx(stamp(q))
        assert to_seconds(lc.match_stamp) == pytest.approx(stamp(m))
        assert stamp(q) - stamp(m) > 10.0 and lc.header.frame_id == "camera"
        r, t = lc.relative_transform.rotation, lc.relative_transform.translation
        assert math.isclose(r.x ** 2 + r.y ** 2 + r.z ** 2 + r.w ** 2, 1.0, rel_tol=1e-5)
        assert math.isclose(t.x ** 2 + t.y ** 2 + t.z ** 2, 1.0, rel_tol=1e-5)
    assert len({lc.query_id for lc in got}) == len(got)  # max_closures = 1
    assert min(idx[lc.query_id] for lc in got) >= 40  # nothing in the first traverse
    # descriptor-only top-1 would have closed false loops: verification did reject some candidates
    assert diag.get("rejected_not_verified", 0) > 0
    assert "rejected_no_match_features" not in diag and "rejected_no_query_features" not in diag


def test_without_verification_closures_are_unverified(sequence):
    idx, _, gt, _ = sequence
    _, got, diag = run_graph(sequence, geometric_verification=False, score_threshold=0.96, top_k=1)
    assert got and diag["images_received"] == 0
    assert all(not lc.verified and lc.inliers == 0 and not lc.has_transform for lc in got)
    assert all(lc.score >= 0.96 for lc in got)
    assert all(stamp(idx[lc.query_id]) - stamp(idx[lc.match_id]) > 10.0 for lc in got)


def test_bad_configuration_refuses_to_start_and_runtime_changes_are_checked():
    tp = topics()
    with InProcessGraph() as graph:
        for params, words in [({"top_k": 2, "max_closures": 3}, "max_closures"),
                              ({"camera_fx": 400.0}, "camera_cx"),
                              ({"camera_cy": 100.0}, "camera_fx"),
                              ({"min_inliers": 2}, "min_inliers"),
                              ({"verification_model": "homography"}, "verification_model")]:
            with pytest.raises(ConfigError, match=words):
                graph.create(LoopClosureNode, unique("lc"), params={**tp, **params})
        node = graph.create(LoopClosureNode, unique("lc"), params=tp)
        res: list[SetParametersResult] = node.set_parameters([Parameter("score_threshold", value=1.5)])
        assert not res[0].successful and "score_threshold" in res[0].reason
        res = node.set_parameters([Parameter("max_closures", value=9)])
        assert not res[0].successful and "max_closures" in res[0].reason
        res = node.set_parameters([Parameter("top_k", value=8), Parameter("min_inliers", value=40)])
        assert all(r.successful for r in res)
        assert node.detector.config.top_k == 8 and node.detector.config.min_inliers == 40
        res = node.set_parameters([Parameter("match_topic", value="/other")])
        assert not res[0].successful and "read-only" in res[0].reason


def test_feature_cache_nearest_and_bounded():
    from vpr_ros.core.geometry import Features
    from vpr_ros.core.timeline import NearestStampBuffer

    f = [Features(np.zeros((i + 1, 2), np.float32), np.zeros((i + 1, 32), np.uint8), (10, 10))
         for i in range(4)]
    cache: NearestStampBuffer[Features] = NearestStampBuffer(3)
    for i, ns in enumerate((1000, 3000, 2000, 4000)):
        cache.put(ns, f[i])
    assert len(cache) == 3 and cache.evicted == 1 and cache.nearest(1000, 10) is None
    assert cache.nearest(2004, 10) == (2000, f[2]) and cache.nearest(2996, 10) == (3000, f[1])
    assert cache.nearest(2500, 10) is None


def test_main_exits_2_with_the_reason(tmp_path):
    out, errors = run_node_main("loop_closure_node", {"top_k": 2, "max_closures": 3},
                                ROS_LOG_DIR=str(tmp_path))
    assert out.returncode == 2, out.stderr
    assert errors == ["loop_closure_node: error: loop_closure: max_closures (3) must not exceed top_k (2)"]
