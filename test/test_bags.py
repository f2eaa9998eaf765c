"""Image bags without ROS (rosbags): round trips from real KITTI and Nordland frames, positions by
Odometry and NavSatFix, training sets from bags, and clear errors."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from vpr_ros.core.errors import DatasetError
from vpr_ros.core.models.registry import Preprocess
from vpr_ros.data.bags import bag_topics, iter_bag_images, read_image_bag, write_image_bag
from vpr_ros.data.files import EARTH_RADIUS_M
from vpr_ros.data.places import load_kitti, load_nordland
from vpr_ros.training import config_from_dict, train
from vpr_ros.training.config import DataConfig, SplitConfig
from vpr_ros.training.data import Degrader, TupleDataset, bag_places, build_places


@pytest.fixture(scope="module")
def kitti_frames(kitti_dir):
    recs = load_kitti(kitti_dir, "00").database[:12]
    return [(100.0 + 0.1 * i, r.load(), r.position) for i, r in enumerate(recs)]


@pytest.mark.parametrize("storage, compressed", [("mcap", False), ("sqlite3", False), ("mcap", True)])
def test_kitti_round_trip_with_odometry(tmp_path, kitti_frames, storage, compressed):
    path = write_image_bag(
        tmp_path / "kitti", kitti_frames, position_topic="/odom", storage=storage, compressed=compressed
    )
    assert bag_topics(path) == {
        "/camera/image_raw": "sensor_msgs/msg/CompressedImage" if compressed else "sensor_msgs/msg/Image",
        "/odom": "nav_msgs/msg/Odometry",
    }
    frames = read_image_bag(path, "/camera/image_raw", "/odom")
    assert len(frames) == len(kitti_frames)
    for got, (stamp, image, pos) in zip(frames, kitti_frames, strict=True):
        assert got.stamp == pytest.approx(stamp, abs=1e-6)
        assert got.position == pytest.approx(pos, abs=1e-4)
        assert got.image.shape == image.shape and got.image.dtype == np.uint8
        err = np.abs(got.image.astype(int) - image.astype(int))
        assert err.max() == 0 if not compressed else err.mean() < 3.0
    assert len(list(iter_bag_images(path, "/camera/image_raw", every=5))) == 3


def test_pose_matrix_odometry_and_bgr_mono_images(tmp_path):
    pose = np.eye(4)
    pose[:3, :3] = [[0, -1, 0], [1, 0, 0], [0, 0, 1]]  # 90 degrees about z
    pose[:3, 3] = [3.0, -4.0, 1.0]
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    path = write_image_bag(tmp_path / "b", [(1.0, gray, pose)], position_topic="/odom")
    (frame,) = read_image_bag(path, "/camera/image_raw", "/odom")
    assert frame.position == pytest.approx((3.0, -4.0))
    assert np.array_equal(frame.image, np.repeat(gray[:, :, None], 3, axis=2))


def _nordland_navsat(nordland_dir, season: str, start: float, lat0=67.0, lon0=14.0, spacing_m=15.0):
    """40 consecutive Nordland places (frames 300..339) as a drive north at ``spacing_m`` per frame."""
    ds = load_nordland(nordland_dir, database_season="summer", query_season="winter", limit=340)
    recs = [r for r in (ds.database if season == "summer" else ds.queries) if 300 <= r.frame_index < 340]
    for r in recs:
        lat = lat0 + math.degrees((r.frame_index - 300) * spacing_m / EARTH_RADIUS_M)
        yield start + (r.frame_index - 300), r.load(), (lat, lon0)


def test_nordland_navsatfix_bags_make_a_training_set(tmp_path, nordland_dir):
    summer = write_image_bag(
        tmp_path / "summer",
        _nordland_navsat(nordland_dir, "summer", 0.0),
        position_topic="/fix",
        position_kind="navsatfix",
        storage="sqlite3",
    )
    winter = write_image_bag(
        tmp_path / "winter",
        _nordland_navsat(nordland_dir, "winter", 5000.0),
        position_topic="/fix",
        position_kind="navsatfix",
        storage="mcap",
    )
    frames = read_image_bag(summer, "/camera/image_raw", "/fix")
    north = [f.position[1] for f in frames]
    assert frames[0].position == pytest.approx((0.0, 0.0), abs=1e-6)  # local metres about the first fix
    assert np.allclose(np.diff(north), 15.0, atol=0.01)
    places = bag_places(
        [summer, winter], position_topic="/fix", pos_radius_m=16.0, neg_radius_m=60.0, min_time_gap_s=30.0
    )
    assert len(places.database) == len(places.queries) == len(frames) * 2
    n = len(frames)
    for qi, q in enumerate(places.queries):
        pos = places.positives()[qi]
        assert len(pos) > 0
        # revisits come from the other season only; same-bag neighbours are 1 s apart (< 30 s gap)
        assert all(places.database[j].sequence != q.sequence for j in pos)
        assert all(abs(places.database[j].position[1] - q.position[1]) <= 16.0 for j in pos)
        assert qi in places.excluded()[qi] and qi not in pos
    assert n == 40
    data = TupleDataset(
        places,
        preprocess=Preprocess(input_size=(32, 64)),
        degrader=Degrader(["jpeg:10"]),
        negatives=3,
        seed=0,
    )
    item = data[5]
    assert item["hq"].shape == item["lq"].shape == (5, 3, 32, 64)
    assert not torch.equal(item["hq"][0], item["lq"][0])
    train_p, val_p = places.split_by_place(SplitConfig(block=150.0, val_every=2, val_offset=1, gap=20.0))
    val_y = {r.position[1] for r in val_p.database}
    assert all(min(abs(r.position[1] - y) for y in val_y) > 20.0 for r in train_p.database)
    # the same set through the recipe's data section
    cfg = DataConfig(
        kind="bags",
        root=str(tmp_path),
        bags=["summer", "winter"],
        position_topic="/fix",
        pos_radius_m=16.0,
        neg_radius_m=60.0,
    )
    assert len(build_places(cfg).queries) == len(places.queries)
    # and two real LoQI steps on it
    recipe = {
        "data": {
            "kind": "bags",
            "root": str(tmp_path),
            "bags": ["summer", "winter"],
            "position_topic": "/fix",
            "pos_radius_m": 16.0,
            "neg_radius_m": 60.0,
            "negatives": 2,
            "split": {"block": 150.0, "val_every": 2, "val_offset": 1, "gap": 20.0},
        },
        "model": {"input_size": [32, 64], "teacher": "random"},
        "schedule": {"max_steps": 2, "batch_size": 2, "ckpt_every": 1},
        "run": {"dir": str(tmp_path / "run"), "progress": False, "tensorboard": False},
    }
    result = train(config_from_dict(recipe))
    assert result.steps == 2 and {"R@1", "teacher_db/R@1"} <= set(result.metrics)


def test_single_bag_revisit_needs_a_time_gap(tmp_path, kitti_frames):
    lap = [(t, im, pos) for t, im, pos in kitti_frames]
    again = [(t + 60.0, im, pos) for t, im, pos in kitti_frames]  # the same places one minute later
    path = write_image_bag(tmp_path / "loop", lap + again, position_topic="/odom")
    places = bag_places([path], pos_radius_m=1.0, neg_radius_m=5.0, min_time_gap_s=30.0)
    n = len(lap)
    for qi in range(len(places.queries)):
        other = qi + n if qi < n else qi - n
        assert other in places.positives()[qi]  # the same place on the other lap
        assert all((j >= n) != (qi >= n) for j in places.positives()[qi])  # never a neighbour of the same lap
        lap_start = 0 if qi < n else n  # the whole lap lasts 1.2 s < 30 s: all of it is ignored for qi
        assert places.excluded()[qi].tolist() == list(range(lap_start, lap_start + n))


def test_bag_errors(tmp_path, kitti_frames):
    with pytest.raises(DatasetError, match="bag not found"):
        read_image_bag(tmp_path / "nothing", "/camera/image_raw")
    path = write_image_bag(tmp_path / "b", kitti_frames[:3], position_topic="/odom")
    with pytest.raises(
        DatasetError, match=r"no image topic '/cam'.*/camera/image_raw \(sensor_msgs/msg/Image\)"
    ):
        read_image_bag(path, "/cam")
    with pytest.raises(DatasetError, match=r"no position topic '/gps'.*/odom"):
        read_image_bag(path, "/camera/image_raw", "/gps")
    with pytest.raises(DatasetError, match="no bags given"):
        bag_places([])
    # a position topic without messages, and positions too far in time from every image
    empty = write_image_bag(
        tmp_path / "e", [(1.0, f[1], None) for f in kitti_frames[:2]], position_topic="/odom"
    )
    with pytest.raises(DatasetError, match="no usable messages"):
        read_image_bag(empty, "/camera/image_raw", "/odom")
    far = write_image_bag(
        tmp_path / "far", [(1.0, kitti_frames[0][1], None), (9.0, None, (0, 0))], position_topic="/odom"
    )
    with pytest.raises(DatasetError, match="within 0.01 s"):
        read_image_bag(far, "/camera/image_raw", "/odom", max_gap_s=0.01)
    frames = read_image_bag(far, "/camera/image_raw", "/odom", max_gap_s=0.01, require_positions=False)
    assert [f.position for f in frames][0] is None
    # truncated bag: an error, not a crash
    mcap = next(path.glob("*.mcap"))
    os.truncate(mcap, mcap.stat().st_size // 2)
    with pytest.raises(DatasetError, match="not a readable bag|truncated or corrupt"):
        read_image_bag(path, "/camera/image_raw", "/odom")
    with pytest.raises(DatasetError, match="already exists"):
        write_image_bag(path, kitti_frames[:1])


def test_shared_dir_is_not_written(kitti_dir):
    assert not any(Path(kitti_dir).rglob("*.mcap"))
