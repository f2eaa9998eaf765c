"""Loop closure against a prebuilt map: the map stores each place's ORB features (build-map --local-features).

RTAB-Map's ``rtabmap_loop`` sequence: a map of the first traverse (frames 0..39) is built with
``vpr-ros build-map``; frames of the revisit (40..83, whose ground-truth partners are in the first
traverse) are the queries. With local features in the map, the loop-closure detector and node
verify a revisit geometrically; without them they say that they cannot.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from vpr_ros.core.errors import MapError
from vpr_ros.core.geometry import Features, OrbExtractor
from vpr_ros.core.loop_closure import (
    DEFAULT_MIN_INLIERS,
    NO_MAP_FEATURES,
    LoopClosureConfig,
    LoopClosureDetector,
    map_feature_lookup,
)
from vpr_ros.core.mapdb import PlaceMap
from vpr_ros.data.places import load_rtabmap_loop

FIRST_TRAVERSE = 40  # frames 0..39; 40..83 revisit them (gt_loop_matrix.txt)
QUERIES = (50, 60, 70)
QUERY_STAMP = 1000.0  # map entries of an image folder have stamp 0: far outside the exclusion window


def _features(rng: np.random.Generator, n: int) -> Features:
    return Features(rng.random((n, 2), dtype=np.float32) * 100, rng.integers(0, 256, (n, 32), dtype=np.uint8),
                    (120, 160))


def test_map_keeps_local_features_through_save_and_load(tmp_path):
    rng = np.random.default_rng(0)
    pmap = PlaceMap(4)
    pmap.add(np.eye(4, dtype=np.float32)[:1])  # before local features were enabled: none for it
    with pytest.raises(MapError, match="keeps no local features; call enable_local_features"):
        pmap.add(np.eye(4, dtype=np.float32)[1:2], features=[_features(rng, 3)])
    pmap.enable_local_features({"kind": "orb", "n_features": 1000, "max_image_side": 640})
    f1, f3 = _features(rng, 7), _features(rng, 0)
    pmap.add(np.eye(4, dtype=np.float32)[1:4], features=[f1, None, f3])
    with pytest.raises(MapError, match="2 local features for 1 descriptors"):
        pmap.add(np.eye(4, dtype=np.float32)[:1], features=[f1, f1])
    path = pmap.save(tmp_path / "m")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["local_features"]["config"] == {"kind": "orb", "n_features": 1000, "max_image_side": 640}
    for mmap in (False, True):
        back = PlaceMap.load(path, mmap=mmap)
        assert back.local_features(0) is None and back.local_features(2) is None
        got = back.local_features(1)
        assert np.array_equal(got.points, f1.points) and np.array_equal(got.descriptors, f1.descriptors)
        assert got.size == (120, 160) and len(back.local_features(3)) == 0
    # the features file is checked like the others
    feat = path / manifest["local_features"]["file"]["name"]
    feat.write_bytes(feat.read_bytes()[:-10])
    with pytest.raises(MapError, match="checksum mismatch for map data file .*features-"):
        PlaceMap.load(path)
    # a map that keeps none
    plain = PlaceMap(4)
    plain.add(np.eye(4, dtype=np.float32)[:1])
    back = PlaceMap.load(plain.save(tmp_path / "plain"))
    assert back.local_features_config is None and back.local_features(0) is None


# --------------------------------------------------------------------------- rtabmap_loop


@pytest.fixture(scope="module")
def loop(rtabmap_dir, tmp_path_factory):
    """The sequence, and two maps of its first traverse built by `vpr-ros build-map`: with and without
    local features."""
    from vpr_ros.cli.main import main

    rtab = load_rtabmap_loop(rtabmap_dir)
    records, gt = rtab.database, rtab.truth_matrix()
    first = tmp_path_factory.mktemp("first_traverse")
    for i, rec in enumerate(records[:FIRST_TRAVERSE]):
        shutil.copy(rec.path, first / f"{i:03d}{rec.path.suffix}")  # sorted name order = frame order
    maps = tmp_path_factory.mktemp("loop_maps")
    base = ["build-map", "--images", str(first), "--device", "cpu"]
    assert main([*base, "--local-features", "--out", str(maps / "with")]) == 0
    assert main([*base, "--out", str(maps / "without")]) == 0
    return records, gt | gt.T, maps / "with.vprmap", maps / "without.vprmap"


@pytest.fixture(scope="module")
def student():
    from vpr_ros.core.extract import DescriptorExtractor
    from vpr_ros.core.models import resolve_model

    return DescriptorExtractor(resolve_model(None), device="cpu")  # the packaged student, as build-map used


def _candidates(pmap: PlaceMap, student, image: np.ndarray) -> list[tuple[int, float, float]]:
    res = pmap.query(student([image]), 5)[0]
    return [(int(i), float(e.stamp), float(s))
            for i, e, s in zip(res.ids, res.entries, res.scores, strict=True)]


def test_prebuilt_map_with_local_features_verifies_a_revisit(loop, student):
    records, gt, with_features, _ = loop
    pmap = PlaceMap.load(with_features)
    assert pmap.local_features_config["kind"] == "orb" and len(pmap) == FIRST_TRAVERSE
    # every place has its features (ORB finds none in frame 18, a dark frame)
    counts = [len(pmap.local_features(i)) for i in pmap.ids]
    assert sum(n > 100 for n in counts) >= 35, counts
    detector = LoopClosureDetector(LoopClosureConfig())  # the node's defaults: verification, >= 25 inliers
    orb = OrbExtractor()
    verified = []
    revisits = range(FIRST_TRAVERSE, len(records), 2)
    for q in revisits:
        image = records[q].load()
        det = detector.check_candidates(q, QUERY_STAMP, _candidates(pmap, student, image), orb(image),
                                        lookup=map_feature_lookup(pmap))
        for c in det.closures:
            assert c.verified and c.inliers >= DEFAULT_MIN_INLIERS and c.has_transform
            assert gt[q, c.match_id], (q, c.match_id)  # a true revisit, never a wrong place
            verified.append((q, c.match_id, c.inliers))
    # measured: 19 of the 22 revisit queries verified (27..207 inliers with the general student; 27..335
    # with the LoQI student), every one a true loop
    assert len(verified) >= 15, verified  # the map verifies revisits this detector never saw


def test_prebuilt_map_without_local_features_says_it_cannot_verify(loop, student):
    records, _, _, without = loop
    pmap = PlaceMap.load(without)
    assert pmap.local_features_config is None
    detector = LoopClosureDetector(LoopClosureConfig())
    image = records[QUERIES[1]].load()
    det = detector.check_candidates(QUERIES[1], QUERY_STAMP, _candidates(pmap, student, image),
                                    OrbExtractor()(image), lookup=map_feature_lookup(pmap))
    assert det.candidates and not det.closures
    assert {c.reason for c in det.candidates} == {NO_MAP_FEATURES}
    assert "build-map --local-features" in NO_MAP_FEATURES


# --------------------------------------------------------------------------- the node


def _run_node(map_dir: Path, records, student, queries) -> tuple[object, list]:
    """A loop-closure node on ``map_dir``: each query's image, then its PlaceMatch from the map."""
    pytest.importorskip("ros_support")
    from rclpy.qos import QoSProfile, qos_profile_sensor_data
    from ros_support import fresh_namespace
    from sensor_msgs.msg import Image
    from std_msgs.msg import Header
    from vpr_ros_msgs.msg import LoopClosure, PlaceCandidate, PlaceMatch

    from vpr_ros.ros.conversions import float_to_stamp, rgb_to_image_msg
    from vpr_ros.ros.loop_closure_node import LoopClosureNode
    from vpr_ros.ros.runner import InProcessGraph

    ns = fresh_namespace()
    pmap = PlaceMap.load(map_dir)
    closures: list = []
    with InProcessGraph() as graph:
        node = graph.create(LoopClosureNode, "loop_closure_map", params={
            "map_path": str(map_dir), "match_topic": f"{ns}/match", "image_topic": f"{ns}/image",
            "loop_closure_topic": f"{ns}/loop", "diagnostics_period_s": 0.0})
        probe = graph.add(graph.node("loop_map_probe"))
        sub = probe.create_subscription(LoopClosure, f"{ns}/loop", closures.append, QoSProfile(depth=100))
        img_pub = probe.create_publisher(Image, f"{ns}/image", qos_profile_sensor_data)
        match_pub = probe.create_publisher(PlaceMatch, f"{ns}/match", QoSProfile(depth=100))
        assert graph.wait_matched([img_pub, match_pub], [sub], 30.0), "probe and node not matched"
        for k, q in enumerate(queries):
            image = records[q].load()
            header = Header(stamp=float_to_stamp(QUERY_STAMP + k), frame_id="camera")
            msg = rgb_to_image_msg(image, "rgb8", header)
            seen = node.images_in
            for _ in range(10):  # best effort: resend until the node has the image
                img_pub.publish(msg)
                if graph.wait_for(lambda s=seen: node.images_in > s, 2.0):
                    break
            assert node.images_in > seen, "image never reached the node"
            cands = [PlaceCandidate(entry_id=i, score=s, stamp=float_to_stamp(st))
                     for i, st, s in _candidates(pmap, student, image)]
            match_pub.publish(PlaceMatch(header=header, query_id=k, model="m", matches=cands))
            assert graph.wait_for(lambda n=k + 1: node.matches_done >= n, 60.0), "PlaceMatch not processed"
        n_closures = node.closures_published
        assert graph.wait_for(lambda: len(closures) >= n_closures, 30.0)
        diag = node.diagnostics()
    return diag, closures


@pytest.mark.ros
def test_node_verifies_against_the_prebuilt_map(loop, student, ros_env):
    records, gt, with_features, without = loop
    diag, closures = _run_node(with_features, records, student, QUERIES)
    assert len(closures) >= 2, diag
    for c in closures:
        q = QUERIES[c.query_id]
        assert c.verified and c.inliers >= DEFAULT_MIN_INLIERS and gt[q, c.match_id], (q, c.match_id)
    diag, closures = _run_node(without, records, student, QUERIES[:1])
    assert closures == [] and diag["rejected_no_map_features"] >= 1, diag
