"""Dataset -> rosbag2 bags, and the bag side of replays (ROS-free: rosbags only, no rclpy).

:func:`make_dataset_bag` writes the shared datasets as a robot would have recorded them, with
:func:`vpr_ros.data.bags.write_image_bag`: ``sensor_msgs/Image`` (rgb8) or ``CompressedImage`` (JPEG)
at a realistic rate, and ``nav_msgs/Odometry`` positions where the dataset has them.

* ``kitti``: one sequence at 10 Hz (KITTI's camera rate); Odometry from the official poses, converted
  from KITTI's camera frame (x right, y down, z forward) to the ROS body convention (REP 103: x forward,
  y left, z up), so Odometry ``(x, y)`` is the ground plane.
* ``nordland``: one season (``winter`` by default) at 0.1 Hz: the 64x32 set keeps every 10th frame of
  the 1 frame-per-second release, so consecutive files are 10 s of video apart. The dataset has no GPS;
  its ground truth is frame alignment, so Odometry ``x`` is the frame index (one unit per place, ``y = 0``)
  and both seasons get the same stamp per place: a distance radius of 2 is the usual +-2 frame tolerance.
* ``rtabmap_loop``: the 84 corridor frames at 1 Hz, no positions (its ground truth is the loop matrix).

:func:`vpr_typestore` registers the ``vpr_ros_msgs`` types with a rosbags typestore from their ``.msg``
files, so replays can record ``PlaceMatch`` / ``LoopClosure`` into bags that any rosbag2 tool reads back
(:func:`read_messages`).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vpr_ros.core.errors import DatasetError
from vpr_ros.core.images import load_image
from vpr_ros.data.bags import (
    COMPRESSED_TYPE,
    IMAGE_TYPE,
    STORAGES,
    open_reader,
    write_image_bag,
)
from vpr_ros.data.bags import read_positions as read_bag_positions
from vpr_ros.data.places import load_kitti, load_nordland, load_rtabmap_loop

__all__ = [
    "BAG_DATASETS",
    "VPR_MSG_TYPES",
    "DatasetFrames",
    "dataset_frames",
    "kitti_pose_to_ros",
    "make_dataset_bag",
    "read_messages",
    "read_positions",
    "vpr_typestore",
]

BAG_DATASETS = ("kitti", "nordland", "rtabmap_loop")
#: Frame rate (Hz) of each dataset in its bags (see the module docstring).
DATASET_RATE_HZ = {"kitti": 10.0, "nordland": 0.1, "rtabmap_loop": 1.0}
DEFAULT_START_S = 1_700_000_000.0
VPR_MSG_TYPES = ("PlaceCandidate", "PlaceMatch", "LoopClosure", "TransmissionStats")

# KITTI camera (x right, y down, z forward) -> ROS body (x forward, y left, z up).
_CAM_TO_ROS = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


def kitti_pose_to_ros(pose: np.ndarray) -> np.ndarray:
    """A KITTI 3x4 camera pose (frame-0 camera coordinates) as a 4x4 pose in REP 103 axes."""
    p = np.asarray(pose, dtype=np.float64).reshape(3, 4)
    out = np.eye(4)
    out[:3, :3] = _CAM_TO_ROS @ p[:, :3] @ _CAM_TO_ROS.T
    out[:3, 3] = _CAM_TO_ROS @ p[:, 3]
    return out


@dataclass
class DatasetFrames:
    """What :func:`dataset_frames` yields from: image paths, stamps (s) and optional positions."""

    name: str
    paths: list[Path]
    stamps: list[float]
    positions: list[Any] | None
    rate_hz: float
    #: (path, reason) of the frames the dataset's filters dropped (Nordland: dark, frozen)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _kitti_poses(seq_dir: Path) -> np.ndarray:
    for name in ("poses_official_first300.txt", "poses.txt"):
        if (seq_dir / name).is_file():
            return np.loadtxt(seq_dir / name, dtype=np.float64).reshape(-1, 3, 4)
    raise DatasetError(f"{seq_dir}: no poses file (poses_official_first300.txt or poses.txt)")


def dataset_frames(dataset: str, root: str | os.PathLike, *, sequence: str = "00", season: str = "winter",
                   every: int = 1, limit: int | None = None, rate_hz: float | None = None,
                   start_s: float = DEFAULT_START_S) -> DatasetFrames:
    """The frames of a shared dataset in recording order, with stamps and positions (module docstring)."""
    if dataset not in BAG_DATASETS:
        raise DatasetError(f"unknown dataset {dataset!r} for a bag; expected one of "
                           f"{', '.join(BAG_DATASETS)}")
    if every < 1 or (limit is not None and limit < 1):
        raise DatasetError(f"every must be >= 1 and limit >= 1, got every={every}, limit={limit}")
    hz = float(rate_hz or DATASET_RATE_HZ[dataset])
    if not (math.isfinite(hz) and hz > 0):
        raise DatasetError(f"rate must be a positive number of frames per second, got {rate_hz}")
    root = Path(root)
    positions: list[Any] | None
    skipped: list[tuple[str, str]] = []
    if dataset == "kitti":
        records = load_kitti(root, sequence).database[::every][:limit]
        poses = _kitti_poses(root / sequence)
        idx = [int(r.frame_index) for r in records]
        positions = [kitti_pose_to_ros(poses[i]) for i in idx]
        name = f"kitti_{sequence}"
    elif dataset == "nordland":
        if season not in ("summer", "winter"):
            raise DatasetError(f"Nordland season must be summer or winter, got {season!r}")
        # the bag holds one season: the other is not needed (its dropped frames must not stop the bag)
        ds = load_nordland(root, database_season=season, query_season=season, every=every, limit=limit)
        records = ds.database
        idx = [int(r.frame_index) for r in records]
        positions = [(float(i), 0.0) for i in idx]
        name = f"nordland_{season}"
        skipped = list(dict(ds.skipped).items())  # both roles read the same season: each file once
    else:
        records = load_rtabmap_loop(root).database
        records = records[::every][:limit]
        idx = [int(r.frame_index) for r in records]
        positions = None
        name = "rtabmap_loop"
    if not records:
        raise DatasetError(f"{root}: no frames selected from {dataset} (every={every}, limit={limit})")
    # Stamps follow the place index, so frames skipped by `every` or filters leave gaps in time.
    stamps = [start_s + i / hz for i in idx]
    return DatasetFrames(name, [r.path for r in records], stamps, positions, hz, skipped)


def make_dataset_bag(dataset: str, root: str | os.PathLike, out: str | os.PathLike, *,
                     storage: str = "mcap", compressed: bool = False, jpeg_quality: int = 90,
                     image_topic: str = "/camera/image_raw", position_topic: str = "/odom",
                     frame_id: str = "camera", **frames_kw: Any) -> dict[str, Any]:
    """Write a dataset into a new rosbag2 folder ``out``; return a summary (topics, frames, span).

    Compressed images go on ``<image_topic>/compressed`` (the image_transport convention the nodes use).
    ``frames_kw`` go to :func:`dataset_frames` (sequence, season, every, limit, rate_hz, start_s).
    """
    if storage not in STORAGES:
        raise DatasetError(f"unknown storage {storage!r}; expected one of {', '.join(STORAGES)}")
    frames = dataset_frames(dataset, root, **frames_kw)
    topic = f"{image_topic.rstrip('/')}/compressed" if compressed else image_topic
    pos_topic = position_topic if frames.positions is not None and position_topic else None

    def gen() -> Iterator[tuple[float, np.ndarray, Any]]:
        for k, (path, stamp) in enumerate(zip(frames.paths, frames.stamps, strict=True)):
            yield stamp, load_image(path), frames.positions[k] if frames.positions is not None else None

    path = write_image_bag(out, gen(), image_topic=topic, compressed=compressed, jpeg_quality=jpeg_quality,
                           position_topic=pos_topic, position_kind="odometry", storage=storage,
                           frame_id=frame_id)
    return {"bag": str(path), "dataset": frames.name, "frames": len(frames.paths), "image_topic": topic,
            "image_type": COMPRESSED_TYPE if compressed else IMAGE_TYPE, "position_topic": pos_topic,
            "rate_hz": frames.rate_hz, "storage": storage,
            "duration_s": frames.stamps[-1] - frames.stamps[0], "dropped": frames.skipped}


# --------------------------------------------------------------------------- vpr_ros_msgs in rosbags


def _msg_dirs() -> list[Path]:
    """Where the vpr_ros_msgs .msg files may be: installed share dirs, then the source tree."""
    prefixes = [Path(sys.prefix)]
    prefixes += [Path(p) for p in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if p]
    dirs = [p / "share" / "vpr_ros_msgs" / "msg" for p in prefixes]
    dirs.append(Path(__file__).resolve().parents[2] / "msgs" / "vpr_ros_msgs" / "msg")
    return dirs


def vpr_typestore():
    """A rosbags typestore (ROS 2 Humble base, as :mod:`vpr_ros.data.bags`) with the vpr_ros_msgs types."""
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore  # optional dependency

    folder = next((d for d in _msg_dirs() if (d / "PlaceMatch.msg").is_file()), None)
    if folder is None:
        raise DatasetError("cannot find the vpr_ros_msgs .msg files (looked in "
                           f"{', '.join(str(d) for d in _msg_dirs())})")
    ts = get_typestore(Stores.ROS2_HUMBLE)
    types: dict = {}
    for name in VPR_MSG_TYPES:
        types.update(get_types_from_msg((folder / f"{name}.msg").read_text(encoding="utf-8"),
                                        f"vpr_ros_msgs/msg/{name}"))
    ts.register(types)
    return ts


def read_messages(path: str | os.PathLike,
                  topics: Sequence[str] | None = None) -> dict[str, list[tuple[int, Any]]]:
    """``{topic: [(bag time ns, message), ...]}`` of a bag, vpr_ros_msgs types included."""
    out: dict[str, list[tuple[int, Any]]] = {}
    with contextlib.closing(open_reader(path, vpr_typestore())) as reader:  # opened: close only
        conns = [c for c in reader.connections if topics is None or c.topic in topics]
        for conn, t_ns, raw in reader.messages(connections=conns):
            out.setdefault(conn.topic, []).append((t_ns, reader.deserialize(raw, conn.msgtype)))
    return out


def read_positions(path: str | os.PathLike, topic: str) -> tuple[np.ndarray, np.ndarray]:
    """:func:`vpr_ros.data.bags.read_positions` of a bag that may also hold vpr_ros_msgs topics."""
    return read_bag_positions(path, topic, typestore=vpr_typestore())
