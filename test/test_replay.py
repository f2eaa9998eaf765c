"""Dataset bags (KITTI, Nordland, rtabmap_loop; MCAP and SQLite3) and bag replay through the real nodes.

The replays run the real localizer (and loop-closure) node on a private rclpy context: Nordland summer
is replayed in map mode to build a map with odometry poses, winter is replayed against it and must score
what the offline pipeline scores; RTAB-Map's loop sequence is replayed in SLAM mode with the loop-closure
node and its recorded outputs must read back from the bag.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vpr_ros.core.errors import DatasetError
from vpr_ros.core.images import load_image
from vpr_ros.core.transmission import psnr
from vpr_ros.data.bags import bag_topics, read_image_bag
from vpr_ros.data.places import load_kitti, load_nordland, load_rtabmap_loop

rosbags = pytest.importorskip("rosbags", reason="needs rosbags (pip install rosbags)")

from vpr_ros.data.dataset_bags import kitti_pose_to_ros, make_dataset_bag  # noqa: E402

# --------------------------------------------------------------------------- make-bag round trips


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_kitti_bag_round_trip(kitti_dir, tmp_path, storage):
    info = make_dataset_bag("kitti", kitti_dir, tmp_path / "k", storage=storage, compressed=True, limit=40,
                            start_s=1000.0)
    assert info["frames"] == 40 and info["image_topic"] == "/camera/image_raw/compressed"
    assert bag_topics(tmp_path / "k") == {"/camera/image_raw/compressed": "sensor_msgs/msg/CompressedImage",
                                           "/odom": "nav_msgs/msg/Odometry"}
    frames = read_image_bag(tmp_path / "k", info["image_topic"], "/odom", max_gap_s=0.0)
    records = load_kitti(kitti_dir, "00").database[:40]
    assert [f.stamp for f in frames] == pytest.approx([1000.0 + 0.1 * i for i in range(40)])  # 10 Hz
    for f, rec in zip(frames[::13], records[::13], strict=True):
        assert psnr(f.image, load_image(rec.path)) > 30  # JPEG q90
    # Odometry in REP 103 axes: x forward = KITTI z, y left = -KITTI x; distances are the camera's
    xy = np.array([f.position for f in frames])
    cam = np.array([r.position for r in records])  # KITTI (x, z)
    np.testing.assert_allclose(xy[:, 0], cam[:, 1], atol=1e-9)
    np.testing.assert_allclose(xy[:, 1], -cam[:, 0], atol=1e-9)
    assert xy[-1, 0] > 20  # the car drives forward ~30 m in 4 s
    pose = np.loadtxt(kitti_dir / "00" / "poses_official_first300.txt")[39].reshape(3, 4)
    ros = kitti_pose_to_ros(pose)
    assert np.allclose(ros[:3, :3] @ ros[:3, :3].T, np.eye(3))
    assert np.linalg.det(ros[:3, :3]) == pytest.approx(1)


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_nordland_bag_round_trip_is_lossless(nordland_dir, tmp_path, storage):
    info = make_dataset_bag("nordland", nordland_dir, tmp_path / "n", storage=storage, season="summer",
                            every=200, start_s=0.0)
    ds = load_nordland(nordland_dir, every=200)
    frames = read_image_bag(tmp_path / "n", "/camera/image_raw", "/odom", max_gap_s=0.0)
    assert info["frames"] == len(ds.database) == len(frames) and info["rate_hz"] == 0.1
    for f, rec in zip(frames, ds.database, strict=True):
        assert np.array_equal(f.image, load_image(rec.path))  # raw rgb8: bit-exact
        assert f.position == (float(rec.frame_index), 0.0)  # x = place index
        assert f.stamp == pytest.approx(10.0 * rec.frame_index)  # 10 s of video between files


def test_rtabmap_bag_and_cli(rtabmap_dir, tmp_path, capsys):
    from vpr_ros.cli.main import main

    assert main(["make-bag", "--dataset", "rtabmap_loop", "--root", str(rtabmap_dir), "--out",
                 str(tmp_path / "r.mcap")]) == 0
    assert "84 rtabmap_loop frames" in capsys.readouterr().out
    assert bag_topics(tmp_path / "r.mcap") == {"/camera/image_raw": "sensor_msgs/msg/Image"}
    frames = read_image_bag(tmp_path / "r.mcap", "/camera/image_raw")
    records = load_rtabmap_loop(rtabmap_dir).database
    assert len(frames) == 84 and frames[1].stamp - frames[0].stamp == pytest.approx(1.0)
    assert np.array_equal(frames[40].image, load_image(records[40].path))
    assert main(["make-bag", "--dataset", "rtabmap_loop", "--root", str(rtabmap_dir), "--out",
                 str(tmp_path / "r.mcap")]) == 2  # never overwrites
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(DatasetError, match="season"):
        make_dataset_bag("nordland", rtabmap_dir, tmp_path / "x", season="autumn")


# --------------------------------------------------------------------------- replay through the nodes

ros = pytest.mark.ros


def _extractor(torch_home, input_size: str):
    from vpr_ros.core.localizer import build_extractor

    return build_extractor("imagenet", "", input_size, "cpu", 8)


@ros
def test_replay_nordland_map_then_localize_equals_offline(ros_env, torch_home, nordland_dir, tmp_path):
    from vpr_ros.eval.metrics import recall_at_n
    from vpr_ros.eval.offline import map_from_records
    from vpr_ros.ros.replay import ReplayConfig, run_replay

    ext = _extractor(torch_home, "native")
    every = 120
    make_dataset_bag("nordland", nordland_dir, tmp_path / "summer", season="summer", every=every)
    make_dataset_bag("nordland", nordland_dir, tmp_path / "winter", season="winter", every=every,
                     storage="sqlite3", compressed=False)
    m = tmp_path / "summer.vprmap"
    built = run_replay(ReplayConfig(bag=tmp_path / "summer", map_path=m, out_dir=tmp_path / "map", mode="map",
                                    fast=True, extractor=ext))
    assert built["map_size"] == built["frames_published"] > 25 and m.is_dir()
    r = run_replay(ReplayConfig(bag=tmp_path / "winter", map_path=m, out_dir=tmp_path / "loc", fast=True,
                                radius=2.0, top_k=5, extractor=ext, record=tmp_path / "out"))
    assert r["frames_without_result"] == 0 and r["place_matches"] == r["frames_published"]
    # the same numbers as the offline pipeline on the same frames (frame tolerance 2 = radius 2)
    ds = load_nordland(nordland_dir, every=every)
    pmap, db_index, _ = map_from_records(ext[0], ds.database, model=ext[1], progress=False)
    _, ids = pmap.search(ext[0]([q.load() for q in ds.queries]), 5)
    offline = recall_at_n(db_index[ids], ds.positives(), (1, 5))
    tol = 1.5 / len(ds.queries)  # at most one query may differ (near-tie reordering)
    assert r["recall"]["1"] == pytest.approx(offline[1], abs=tol), (r["recall"], dict(offline))
    assert r["recall"]["5"] == pytest.approx(offline[5], abs=tol)
    saved = json.loads(Path(r["report"]).read_text())
    assert saved["ground_truth"].startswith("distance <= 2 m") and Path(saved["recall_plot"]).is_file()
    assert Path(saved["pr_plot"]).is_file() and saved["latency_ms"]["p50"] > 0


@ros
def test_replay_rtabmap_slam_with_loop_closure_records_outputs(ros_env, torch_home, rtabmap_dir, tmp_path):
    from vpr_ros.data.dataset_bags import read_messages
    from vpr_ros.ros.replay import ReplayConfig, run_replay

    every = 2  # 42 frames; the loop matrix is subsampled alike
    gt = load_rtabmap_loop(rtabmap_dir).truth_matrix()
    np.savetxt(tmp_path / "gt.txt", gt[::every, ::every].astype(int), fmt="%d")
    make_dataset_bag("rtabmap_loop", rtabmap_dir, tmp_path / "r.mcap", compressed=True, every=every)
    r = run_replay(ReplayConfig(bag=tmp_path / "r.mcap", map_path=tmp_path / "slam", out_dir=tmp_path / "rep",
                                mode="both", loop_closure=True, gt_matrix=tmp_path / "gt.txt", fast=True,
                                record=tmp_path / "out.mcap", extractor=_extractor(torch_home, "")))
    assert r["frames_published"] == r["place_matches"] == r["map_size"] == 42
    lc = r["loop_closures"]
    assert lc["precision"] == 1.0 and lc["recall"] >= 0.6, lc
    assert r["recall"]["1"] >= 0.6 and r["queries_with_positive"] == 22
    out = read_messages(tmp_path / "out.mcap")
    assert len(out["/vpr/place_match"]) == 42 and len(out["/vpr/loop_closure"]) == lc["published"]
    stamps = [t for t, _ in out["/vpr/place_match"]]
    assert stamps == sorted(stamps)
    for t, msg in out["/vpr/loop_closure"]:
        assert msg.verified and msg.inliers >= 25 and msg.has_transform
        assert t == msg.query_stamp.sec * 10**9 + msg.query_stamp.nanosec
        assert msg.query_stamp.sec - msg.match_stamp.sec > 10  # exclusion window
    first = out["/vpr/place_match"][0][1]
    assert first.model == "structvpr_mobilenetv2@imagenet" and first.header.frame_id == "camera"


@ros
def test_replay_at_bag_rate_and_bad_options(ros_env, torch_home, kitti_dir, tmp_path):
    from vpr_ros.core.errors import ConfigError
    from vpr_ros.ros.replay import ReplayConfig, run_replay

    ext = _extractor(torch_home, "native")
    make_dataset_bag("kitti", kitti_dir, tmp_path / "k", limit=30, every=2)  # 5 Hz effective, 5.8 s
    m = tmp_path / "k.vprmap"
    run_replay(ReplayConfig(bag=tmp_path / "k", map_path=m, out_dir=tmp_path / "map", mode="map", fast=True,
                            extractor=ext))
    r = run_replay(ReplayConfig(bag=tmp_path / "k", map_path=m, out_dir=tmp_path / "loc", rate=4.0,
                                radius=3.0, top_k=3, extractor=ext))
    assert r["pace"] == "4x bag rate" and r["bag_span_s"] == pytest.approx(5.8)
    assert r["wall_s"] >= 5.8 / 4 - 0.05 and r["realtime_factor"] <= 4.2
    # every published frame is accounted for: answered, dropped by the localizer's queue policy, or lost
    # by best-effort DDS before the node saw it (rare, under load)
    assert r["place_matches"] + r["localizer"]["queue_drops"] + r["lost_in_transport"] == 30
    assert r["lost_in_transport"] <= 2
    # the same frames as the map: every frame answered in time is right (frames the localizer dropped while
    # busy are misses, as on a robot)
    assert r["recall"]["1"] * 30 >= r["place_matches"] - 1
    with pytest.raises(ConfigError, match="rate"):
        run_replay(ReplayConfig(bag=tmp_path / "k", map_path=m, rate=0.0))
    with pytest.raises(ConfigError, match="loop-closure"):
        run_replay(ReplayConfig(bag=tmp_path / "k", map_path=m, mode="map", loop_closure=True))
    with pytest.raises(DatasetError, match="no image topic"):
        run_replay(ReplayConfig(bag=tmp_path / "k", map_path=m, image_topic="/nope", extractor=ext))
