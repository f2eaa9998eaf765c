"""Loop-closure detection (ROS-free): candidate rules, geometric verification on real frames, and
precision-recall on RTAB-Map's real loop sequence."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from vpr_ros.core.errors import ConfigError
from vpr_ros.core.geometry import (
    FeatureCache,
    OrbExtractor,
    VerificationConfig,
    quaternion_to_rotation,
    rotation_angle_deg,
    rotation_to_quaternion,
    verify_pair,
)
from vpr_ros.core.images import load_image
from vpr_ros.core.loop_closure import (
    DEFAULT_MIN_INLIERS,
    DEFAULT_SCORE_THRESHOLD,
    DEFAULT_TOP_K,
    LoopClosureConfig,
    LoopClosureDetector,
    with_overrides,
)
from vpr_ros.data.places import load_rtabmap_loop
from vpr_ros.eval.loop_closure import evaluate_loop_closure


def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v)


def no_verify(**kw) -> LoopClosureConfig:
    base = {"exclusion_window_s": 0.0, "score_threshold": -1.0, "top_k": 5, "geometric_verification": False}
    base.update(kw)
    return LoopClosureConfig(**base)


# --------------------------------------------------------------------------- rules


def test_config_validation_names_the_setting():
    for kw, word in [({"exclusion_window_s": -1.0}, "exclusion_window_s"), ({"top_k": 0}, "top_k"),
                     ({"score_threshold": 1.5}, "score_threshold"), ({"max_closures": 6}, "max_closures"),
                     ({"exclusion_window_frames": -2}, "exclusion_window_frames")]:
        with pytest.raises(ConfigError, match=word):
            LoopClosureConfig(**kw)
    with pytest.raises(ConfigError, match="min_inliers"):
        VerificationConfig(min_inliers=3)
    with pytest.raises(ConfigError, match="model"):
        VerificationConfig(model="homography")
    with pytest.raises(ConfigError, match="camera_matrix"):
        VerificationConfig(camera_matrix=(0.0, 1.0, 2.0, 3.0))
    cfg = with_overrides(LoopClosureConfig(), top_k=3, min_inliers=40)
    assert cfg.top_k == 3 and cfg.min_inliers == 40
    with pytest.raises(ConfigError, match="unknown"):
        with_overrides(cfg, topk=3)


def test_exclusion_window_in_seconds_and_frames():
    d = unit([1, 0, 0])
    det = LoopClosureDetector(no_verify(exclusion_window_s=5.0))
    for i in range(10):  # 1 Hz, identical descriptors: only frames more than 5 s back are candidates
        found = det.add(i, float(i), d)
        # eligible: i - j > 5 s; equal scores rank the older frame first; top_k = 5
        assert [c.match_id for c in found.candidates] == list(range(max(0, i - 5)))[:5]
    det = LoopClosureDetector(no_verify(exclusion_window_frames=3, top_k=100))
    for i in range(8):
        found = det.add(i, 0.1 * i, d)
        assert {c.match_id for c in found.candidates} == set(range(0, max(0, i - 3)))


def test_threshold_top_k_and_ordering():
    det = LoopClosureDetector(no_verify(score_threshold=0.5, top_k=3, max_closures=2))
    vecs = ([1, 0, 0], [0.9, 0.1, 0], [0.1, 1, 0], [0.8, 0.3, 0], [0.95, 0.05, 0], [1, 0, 0])
    base = [unit(v) for v in vecs]
    for i, d in enumerate(base[:-1]):
        det.add(10 + i, float(i), d)
    found = det.add(99, 100.0, base[-1])
    ids = [c.match_id for c in found.candidates]
    scores = [c.score for c in found.candidates]
    assert ids == [10, 14, 11]  # best first; frame 12 (score 0.1) below the threshold; top-3 only
    assert scores == sorted(scores, reverse=True) and min(scores) >= 0.5
    assert [c.match_id for c in found.closures] == [10, 14]  # max_closures=2, no verification
    assert found.candidates[2].reason == "max_closures reached" and not found.candidates[2].accepted
    c = found.closures[0]
    assert (c.query_id, c.query_stamp, c.match_stamp) == (99, 100.0, 0.0) and c.score == pytest.approx(1.0)
    # equal scores: the older frame first
    det = LoopClosureDetector(no_verify(top_k=2))
    for i in range(3):
        det.add(i, float(i), base[0])
    assert [c.match_id for c in det.add(3, 3.0, base[0]).candidates] == [0, 1]


def test_time_order_duplicate_ids_and_descriptor_checks():
    det = LoopClosureDetector(no_verify())
    det.add(0, 5.0, unit([1, 0]))
    with pytest.raises(ValueError, match="time order"):
        det.add(1, 4.0, unit([1, 0]))
    with pytest.raises(ValueError, match="already added"):
        det.add(0, 6.0, unit([1, 0]))
    with pytest.raises(ValueError, match="dimensions"):
        det.add(2, 6.0, unit([1, 0, 0]))
    with pytest.raises(ValueError, match="finite"):
        det.add(3, 6.0, np.array([np.nan, 1.0]))
    assert len(det) == 1


def test_check_candidates_applies_window_threshold_and_top_k():
    det = LoopClosureDetector(no_verify(exclusion_window_s=10.0, score_threshold=0.5, top_k=2))
    cands = [(1, 95.0, 0.99), (2, 50.0, 0.7), (3, 20.0, 0.9), (4, 10.0, 0.4), (5, 5.0, 0.8)]
    found = det.check_candidates(7, 100.0, cands, None, lookup=lambda c: None)
    assert [c.match_id for c in found.candidates] == [3, 5]  # 1 is too recent, 4 below threshold, top-2
    assert [c.match_id for c in found.closures] == [3]


def test_verification_without_features_rejects():
    det = LoopClosureDetector(LoopClosureConfig(exclusion_window_s=0.0, score_threshold=-1.0))
    det.add(0, 0.0, unit([1, 0]))
    found = det.add(1, 1.0, unit([1, 0]))
    assert found.candidates and not found.closures
    assert "no image features" in found.candidates[0].reason


# --------------------------------------------------------------------------- geometry on real frames


@pytest.fixture(scope="module")
def rtabmap(rtabmap_dir):
    rtab = load_rtabmap_loop(rtabmap_dir)
    records, gt = rtab.database, rtab.truth_matrix()
    return records, gt


def test_verification_real_revisit_vs_non_loop(rtabmap):
    records, gt = rtabmap
    assert gt[40, 1]  # 41.jpg revisits 2.jpg
    orb = OrbExtractor()
    feats = {i: orb(records[i].load()) for i in (1, 40, 29, 65, 18, 45)}
    assert len(feats[1]) > 300 and len(feats[40]) > 300
    loop = verify_pair(feats[40], feats[1])
    assert loop.verified and loop.inliers >= 100, loop
    assert loop.has_transform and abs(np.linalg.norm(loop.translation) - 1.0) < 1e-9
    assert abs(np.linalg.det(loop.rotation) - 1.0) < 1e-6
    for q, m in ((65, 29), (45, 18)):  # non-loops that the descriptor ranks first (similar corridors)
        assert not (gt[q, m] or gt[m, q])
        other = verify_pair(feats[q], feats[m])
        assert not other.verified and other.inliers < DEFAULT_MIN_INLIERS, (q, m, other)
        assert other.inliers < loop.inliers / 4
    fund = verify_pair(feats[40], feats[1], VerificationConfig(model="fundamental"))
    assert fund.verified and fund.inliers >= 80


def test_relative_pose_matches_kitti_ground_truth(kitti_dir):
    """T_match_query from two KITTI frames agrees with the official poses (optical frame convention)."""
    seq = kitti_dir / "00"
    poses = np.loadtxt(seq / "poses_official_first300.txt").reshape(-1, 3, 4)
    s = 640 / 1241
    cfg = VerificationConfig(camera_matrix=(718.856 * s, 718.856 * s, 607.1928 * s, 185.2157 * s))
    orb = OrbExtractor(cfg)

    def pose(i: int) -> np.ndarray:
        t = np.eye(4)
        t[:3] = poses[i]
        return t

    rot_err, dir_err = [], []
    for q, m in ((5, 0), (0, 5), (100, 95), (95, 100), (150, 140), (250, 245)):
        fq, fm = (orb(load_image(seq / "image_0" / f"{i:06d}.jpg")) for i in (q, m))
        v = verify_pair(fq, fm, cfg)
        assert v.verified and v.inliers >= 50
        gt = np.linalg.inv(pose(m)) @ pose(q)  # T_match_query
        t_gt = gt[:3, 3] / np.linalg.norm(gt[:3, 3])
        assert np.sign(v.translation[2]) == np.sign(t_gt[2])  # driving forward: query ahead of match (z)
        rot_err.append(rotation_angle_deg(v.rotation.T @ gt[:3, :3]))
        dir_err.append(math.degrees(math.acos(np.clip(v.translation @ t_gt, -1, 1))))
    assert np.median(rot_err) < 1.0 and max(rot_err) < 5.0, rot_err
    assert np.median(dir_err) < 6.0, dir_err


def test_quaternion_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(50):
        q = rng.normal(size=4)
        q /= np.linalg.norm(q)
        r = quaternion_to_rotation(tuple(q))
        back = rotation_to_quaternion(r)
        assert np.allclose(quaternion_to_rotation(back), r, atol=1e-9) and back[3] >= 0
    assert rotation_to_quaternion(np.diag([1.0, -1.0, -1.0])) == pytest.approx((1.0, 0.0, 0.0, 0.0))


def test_feature_cache_is_bounded_and_detector_keeps_no_images(rtabmap):
    records, _ = rtabmap
    orb = OrbExtractor(VerificationConfig(n_features=300))
    cache = FeatureCache(capacity=3)
    for i in range(5):
        cache.put(i, orb(records[i].load()))
    assert len(cache) == 3 and cache.evicted == 2 and cache.get(0) is None and cache.get(4) is not None
    assert cache.nbytes <= 3 * 300 * 40
    cfg = LoopClosureConfig(exclusion_window_s=0.0, score_threshold=-1.0)
    det = LoopClosureDetector(cfg, feature_capacity=2)
    d = unit([1, 0])
    for i in range(3):
        det.add(i, float(i), d, records[i].load())
    found = det.add(3, 3.0, d, records[40].load())
    assert len(det.features) == 2
    assert any("evicted" in c.reason for c in found.candidates if c.match_id == 0)
    assert not any(isinstance(v, np.ndarray) and v.ndim == 3 for v in vars(det).values())


# --------------------------------------------------------------------------- precision-recall on real data


@pytest.mark.slow
def test_loop_pr_on_rtabmap_beats_chance(rtabmap_dir, rtabmap, torch_home, tmp_path):
    _, gt = rtabmap
    report = evaluate_loop_closure(rtabmap_dir, tmp_path, models=[("structvpr_imagenet", None)],
                                   degradations=("none",))
    cond = report["models"]["structvpr_imagenet"]["conditions"]["none"]
    # Chance: a random earlier frame (outside the 10-frame window) is a true loop this often.
    g = gt | gt.T
    chance = np.mean([g[i, : i - 10].mean() for i in range(11, len(g)) if g[i, : i - 10].any()])
    assert chance < 0.2
    assert cond["descriptor_only"]["average_precision"] > chance + 0.5
    at = report["at_defaults"]["structvpr_imagenet"]["none"]
    assert at["precision"] == 1.0 and at["false_positives"] == 0
    assert at["recall"] >= 0.7
    assert cond["verified"][f"top{DEFAULT_TOP_K}_min{DEFAULT_MIN_INLIERS}"]["recall_at_100_precision"] >= 0.7
    assert report["defaults_in_code"] == {"score_threshold": DEFAULT_SCORE_THRESHOLD, "top_k": DEFAULT_TOP_K,
                                          "min_inliers": DEFAULT_MIN_INLIERS}
    saved = json.loads((tmp_path / "loop_closure.json").read_text())
    assert saved["shipped"]["min_inliers"] >= 15
    assert all((tmp_path / p).is_file() for p in saved["plots"].values())
