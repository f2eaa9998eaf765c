"""Camera bags without ROS: write and read image (+ position) topics of rosbag2 bags with ``rosbags``.

ROS-free on purpose (never imports rclpy): training builds place sets from recorded bags, tests
build bags from dataset frames, and bag replay tools can share the same decoding.

* :func:`write_image_bag` writes ``sensor_msgs/Image`` (rgb8) or ``sensor_msgs/CompressedImage``
  (JPEG) frames, optionally with ``nav_msgs/Odometry`` or ``sensor_msgs/NavSatFix`` positions, into an
  MCAP or SQLite3 rosbag2 folder.
* :func:`read_image_bag` reads an image topic (Image: rgb8/bgr8/rgba8/bgra8/mono8/mono16;
  CompressedImage: any format OpenCV decodes) and pairs every image with the position message nearest
  in time (Odometry: ``pose.position.x/y``; NavSatFix: latitude/longitude converted to local metres,
  east/north about the first valid fix).
* :func:`iter_bag_images` streams ``(stamp, rgb)`` for replay; :func:`read_positions` reads a position
  topic; :func:`bag_topics` lists topics.

Images are decoded by :func:`vpr_ros.core.images.decode_image_msg`, stamps converted by
:mod:`vpr_ros.core.timeline`: the messages' ``header.stamp`` in seconds (the bag's receive time when the
header stamp is zero). Every problem (missing bag, missing topic, no positions, truncated or corrupt
file) raises :class:`~vpr_ros.core.errors.DatasetError` with a message naming the bag; an image message
that cannot be decoded raises :class:`~vpr_ros.core.images.ImageRejected` naming bag, topic and index.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from vpr_ros.core.errors import DatasetError
from vpr_ros.core.fileio import display_path
from vpr_ros.core.images import as_rgb8, decode_image_msg
from vpr_ros.core.timeline import Stamp, nearest_index, ns_to_seconds, seconds_to_ns, to_ns, to_seconds
from vpr_ros.data.files import latlon_to_local

IMAGE_TYPE = "sensor_msgs/msg/Image"
COMPRESSED_TYPE = "sensor_msgs/msg/CompressedImage"
ODOMETRY_TYPE = "nav_msgs/msg/Odometry"
NAVSAT_TYPE = "sensor_msgs/msg/NavSatFix"
POSITION_KINDS = {"odometry": ODOMETRY_TYPE, "navsatfix": NAVSAT_TYPE}
STORAGES = ("mcap", "sqlite3")


@dataclass
class BagFrame:
    """One image read from a bag: header stamp (s), RGB uint8 image, planar position (m) or None."""

    stamp: float
    image: np.ndarray
    position: tuple[float, float] | None = None


# --------------------------------------------------------------------------- writing


def _rosbags(module: str):
    """Import a ``rosbags`` submodule, or say how to get it (it is an optional dependency)."""
    try:
        return importlib.import_module(f"rosbags.{module}")
    except ImportError as exc:
        raise DatasetError(
            f"reading and writing bags needs the 'rosbags' package (pip install rosbags): {exc}"
        ) from None


def _typestore():
    typesys = _rosbags("typesys")
    return typesys.get_typestore(typesys.Stores.ROS2_HUMBLE)


def _header(ts, stamp: float, frame_id: str):
    sec, nanosec = Stamp.from_seconds(stamp)
    Time = ts.types["builtin_interfaces/msg/Time"]
    return ts.types["std_msgs/msg/Header"](stamp=Time(sec=sec, nanosec=nanosec), frame_id=frame_id)


def _rotation_to_quaternion(r: np.ndarray) -> tuple[float, float, float, float]:
    """(x, y, z, w) of a 3x3 rotation matrix (Shepperd's method)."""
    t = float(np.trace(r))
    if t > 0:
        s = math.sqrt(t + 1.0) * 2
        return ((r[2, 1] - r[1, 2]) / s, (r[0, 2] - r[2, 0]) / s, (r[1, 0] - r[0, 1]) / s, 0.25 * s)
    i = int(np.argmax(np.diag(r)))
    j, k = (i + 1) % 3, (i + 2) % 3
    s = math.sqrt(max(1.0 + r[i, i] - r[j, j] - r[k, k], 1e-12)) * 2
    q = [0.0, 0.0, 0.0]
    q[i] = 0.25 * s
    q[j] = (r[j, i] + r[i, j]) / s
    q[k] = (r[k, i] + r[i, k]) / s
    return q[0], q[1], q[2], (r[k, j] - r[j, k]) / s


def _odometry(ts, stamp: float, frame_id: str, position: Any):
    arr = np.asarray(position, dtype=np.float64)
    quat = (0.0, 0.0, 0.0, 1.0)
    if arr.shape in ((3, 4), (4, 4)):  # a pose matrix [R|t]
        xyz = arr[:3, 3]
        quat = _rotation_to_quaternion(arr[:3, :3])
    elif arr.shape in ((2,), (3,)):
        xyz = np.append(arr, 0.0) if arr.shape == (2,) else arr
    else:
        raise DatasetError(
            f"odometry position must be (x, y), (x, y, z) or a 3x4/4x4 pose, got shape {arr.shape}"
        )
    g = ts.types
    pose = g["geometry_msgs/msg/Pose"](
        position=g["geometry_msgs/msg/Point"](x=float(xyz[0]), y=float(xyz[1]), z=float(xyz[2])),
        orientation=g["geometry_msgs/msg/Quaternion"](x=quat[0], y=quat[1], z=quat[2], w=quat[3]),
    )
    vec = g["geometry_msgs/msg/Vector3"]
    twist = g["geometry_msgs/msg/Twist"](linear=vec(x=0.0, y=0.0, z=0.0), angular=vec(x=0.0, y=0.0, z=0.0))
    return g[ODOMETRY_TYPE](
        header=_header(ts, stamp, "odom"),
        child_frame_id=frame_id,
        pose=g["geometry_msgs/msg/PoseWithCovariance"](pose=pose, covariance=np.zeros(36)),
        twist=g["geometry_msgs/msg/TwistWithCovariance"](twist=twist, covariance=np.zeros(36)),
    )


def _navsatfix(ts, stamp: float, frame_id: str, position: Any):
    vals = [float(v) for v in np.asarray(position, dtype=np.float64).ravel()]
    if len(vals) not in (2, 3):
        raise DatasetError(f"NavSatFix position must be (latitude, longitude[, altitude]), got {vals}")
    lat, lon = vals[0], vals[1]
    if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):
        raise DatasetError(f"NavSatFix latitude/longitude out of range: {lat}, {lon}")
    g = ts.types
    return g[NAVSAT_TYPE](
        header=_header(ts, stamp, frame_id),
        status=g["sensor_msgs/msg/NavSatStatus"](status=0, service=1),
        latitude=lat,
        longitude=lon,
        altitude=vals[2] if len(vals) == 3 else 0.0,
        position_covariance=np.zeros(9),
        position_covariance_type=0,
    )


def write_image_bag(
    path: str | os.PathLike,
    frames: Iterable[tuple[float, np.ndarray, Any]] | Iterable[tuple[float, np.ndarray]],
    *,
    image_topic: str = "/camera/image_raw",
    compressed: bool = False,
    jpeg_quality: int = 90,
    position_topic: str | None = None,
    position_kind: str = "odometry",
    storage: str = "mcap",
    frame_id: str = "camera",
) -> Path:
    """Write ``frames`` into a new rosbag2 folder at ``path`` and return it.

    ``frames`` yields ``(stamp_s, rgb, position)`` (or ``(stamp_s, rgb)``); ``rgb`` is anything
    :func:`~vpr_ros.core.images.as_rgb8` accepts, or None for a position message alone. With
    ``position_topic`` set, a non-None position is written at the same stamp:
    ``position_kind="odometry"`` takes ``(x, y[, z])`` or a 3x4/4x4 pose matrix, ``"navsatfix"`` takes
    ``(latitude, longitude[, altitude])`` in degrees. ``compressed`` writes ``sensor_msgs/CompressedImage``
    JPEG (``jpeg_quality``) instead of raw rgb8 ``Image``. ``storage`` is ``"mcap"`` or ``"sqlite3"``.
    The folder must not exist yet.
    """
    rosbag2 = _rosbags("rosbag2")
    StoragePlugin, Writer = rosbag2.StoragePlugin, rosbag2.Writer
    if storage not in STORAGES:
        raise DatasetError(f"unknown bag storage {storage!r}; expected one of {STORAGES}")
    if position_kind not in POSITION_KINDS:
        raise DatasetError(
            f"unknown position kind {position_kind!r}; expected one of {sorted(POSITION_KINDS)}"
        )
    if not 1 <= int(jpeg_quality) <= 100:
        raise DatasetError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
    path = Path(path)
    if path.exists():
        raise DatasetError(f"{path}: already exists; rosbag2 writes a new folder")
    ts = _typestore()
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    count = 0
    with Writer(path, version=9, storage_plugin=plugin) as writer:
        img_type = COMPRESSED_TYPE if compressed else IMAGE_TYPE
        img_conn = writer.add_connection(image_topic, img_type, typestore=ts)
        pos_conn = (
            writer.add_connection(position_topic, POSITION_KINDS[position_kind], typestore=ts)
            if position_topic
            else None
        )
        for item in frames:
            stamp, image = float(item[0]), item[1]
            position = item[2] if len(item) > 2 else None
            if not math.isfinite(stamp) or stamp < 0:
                raise DatasetError(f"frame {count}: stamp must be a finite non-negative number, got {stamp}")
            t_ns = seconds_to_ns(stamp)
            if image is None:  # a position without an image (e.g. odometry faster than the camera)
                _write_position(writer, pos_conn, ts, position_kind, stamp, frame_id, position, t_ns)
                continue
            rgb = as_rgb8(image, name=f"frame {count}")
            header = _header(ts, stamp, frame_id)
            if compressed:
                ok, buf = cv2.imencode(".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)])
                if not ok:
                    raise DatasetError(f"frame {count}: JPEG encoding failed")
                msg = ts.types[COMPRESSED_TYPE](header=header, format="jpeg", data=buf.ravel())
            else:
                h, w = rgb.shape[:2]
                msg = ts.types[IMAGE_TYPE](
                    header=header,
                    height=h,
                    width=w,
                    encoding="rgb8",
                    is_bigendian=0,
                    step=3 * w,
                    data=rgb.reshape(-1),
                )
            writer.write(img_conn, t_ns, ts.serialize_cdr(msg, img_type))
            _write_position(writer, pos_conn, ts, position_kind, stamp, frame_id, position, t_ns)
            count += 1
    if count == 0:
        raise DatasetError(f"{path}: no images were given; the bag has no image messages")
    return path


def _write_position(
    writer, conn, ts, kind: str, stamp: float, frame_id: str, position: Any, t_ns: int
) -> None:
    if conn is None or position is None:
        return
    msg = (_odometry if kind == "odometry" else _navsatfix)(ts, stamp, frame_id, position)
    writer.write(conn, t_ns, ts.serialize_cdr(msg, POSITION_KINDS[kind]))


# --------------------------------------------------------------------------- reading


def open_reader(path: str | os.PathLike, typestore: Any = None):
    """An opened rosbags ``AnyReader`` of one bag; :class:`DatasetError` saying why it cannot be read
    (missing, a rosbag2 folder without its ``metadata.yaml``, truncated, not a bag)."""
    AnyReader = _rosbags("highlevel").AnyReader
    path = Path(path)
    name = display_path(path)
    if not path.exists():
        raise DatasetError(f"{name}: bag not found (expected a rosbag2 folder or a ROS 1 .bag file)")
    if path.is_dir() and not (path / "metadata.yaml").is_file():
        data = sorted(p.name for p in path.iterdir() if p.suffix in (".db3", ".mcap"))
        what = f"it holds {', '.join(data[:3])}" if data else "and no .db3 / .mcap file"
        raise DatasetError(f"{name}: a rosbag2 folder needs metadata.yaml, which is missing ({what}); "
                           f"`ros2 bag reindex {name}` writes it again")
    try:
        reader = AnyReader([path], default_typestore=typestore or _typestore())
        reader.open()
    except Exception as exc:  # rosbags raises several reader/storage error types
        raise DatasetError(f"{name}: not a readable bag ({type(exc).__name__}: {exc})") from None
    return reader



def bag_topics(path: str | os.PathLike) -> dict[str, str]:
    """``{topic: message type}`` of a bag."""
    path = Path(path)
    reader = open_reader(path)
    try:
        return {c.topic: c.msgtype for c in reader.connections}
    finally:
        reader.close()


def _connections(reader, path: Path, topic: str, allowed: Sequence[str], role: str) -> list:
    conns = [c for c in reader.connections if c.topic == topic]
    if not conns:
        present = ", ".join(f"{c.topic} ({c.msgtype})" for c in reader.connections) or "none"
        raise DatasetError(f"{path}: no {role} topic {topic!r}; topics present: {present}")
    bad = [c.msgtype for c in conns if c.msgtype not in allowed]
    if bad:
        raise DatasetError(f"{path}: topic {topic!r} has type {bad[0]}; expected one of {', '.join(allowed)}")
    return conns


def message_stamp(msg: Any, bag_time_ns: int) -> float:
    """Seconds of a message's ``header.stamp``; its bag receive time when it has no (or a zero) stamp."""
    header = getattr(msg, "header", None)
    if header is not None and to_ns(header.stamp) > 0:
        return to_seconds(header.stamp)
    return ns_to_seconds(bag_time_ns)


def iter_bag_images(
    path: str | os.PathLike, image_topic: str, *, every: int = 1
) -> Iterator[tuple[float, np.ndarray]]:
    """Stream ``(stamp_s, rgb)`` of ``image_topic`` in bag order (every ``every``-th message)."""
    path = Path(path)
    if every < 1:
        raise DatasetError(f"every must be >= 1, got {every}")
    reader = open_reader(path)
    try:
        conns = _connections(reader, path, image_topic, (IMAGE_TYPE, COMPRESSED_TYPE), "image")
        i = 0
        for conn, t_ns, raw in _messages(reader, path, conns):
            if i % every == 0:
                msg = _deserialize(reader, path, raw, conn)
                yield message_stamp(msg, t_ns), decode_image_msg(msg, name=f"{path}:{image_topic}#{i}")
            i += 1
        if i == 0:
            raise DatasetError(f"{path}: topic {image_topic!r} has no messages")
    finally:
        reader.close()


def _messages(reader, path: Path, conns: list) -> Iterator[tuple[Any, int, bytes]]:
    try:
        yield from reader.messages(connections=conns)
    except DatasetError:
        raise
    except Exception as exc:  # truncated chunk, corrupt database page, ...
        raise DatasetError(f"{path}: bag is truncated or corrupt ({type(exc).__name__}: {exc})") from None


def _deserialize(reader, path: Path, raw: bytes, conn) -> Any:
    try:
        return reader.deserialize(raw, conn.msgtype)
    except Exception as exc:
        raise DatasetError(
            f"{path}: cannot decode a {conn.msgtype} message on {conn.topic} ({type(exc).__name__}: {exc})"
        ) from None


def read_positions(path: str | os.PathLike, topic: str, *,
                   typestore: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Ascending stamps (s) and planar positions (N, 2) of an Odometry ``(x, y)`` or NavSatFix (east/north
    metres about the first fix) topic; messages with NaN positions or without a fix are skipped. Only
    the position messages are deserialised."""
    path = Path(path)
    reader = open_reader(path, typestore)
    try:
        conns = _connections(reader, path, topic, (ODOMETRY_TYPE, NAVSAT_TYPE), "position")
        stamps, xy, fixes = [], [], []
        for conn, t_ns, raw in _messages(reader, path, conns):
            msg = _deserialize(reader, path, raw, conn)
            if conn.msgtype == ODOMETRY_TYPE:
                p = msg.pose.pose.position
                if math.isfinite(p.x) and math.isfinite(p.y):
                    stamps.append(message_stamp(msg, t_ns))
                    xy.append((p.x, p.y))
            else:
                ok = msg.status.status >= 0 and math.isfinite(msg.latitude) and math.isfinite(msg.longitude)
                if ok:
                    stamps.append(message_stamp(msg, t_ns))
                    fixes.append((msg.latitude, msg.longitude))
    finally:
        reader.close()
    if fixes:
        arr = np.asarray(fixes, dtype=np.float64)
        xy = latlon_to_local(arr[:, 0], arr[:, 1], (arr[0, 0], arr[0, 1]))[0].tolist()
    if not stamps:
        raise DatasetError(
            f"{path}: position topic {topic!r} has no usable messages "
            "(Odometry with finite x/y, or NavSatFix with a fix)"
        )
    order = np.argsort(np.asarray(stamps), kind="stable")
    return np.asarray(stamps, dtype=np.float64)[order], np.asarray(xy, dtype=np.float64)[order]


def read_image_bag(
    path: str | os.PathLike,
    image_topic: str,
    position_topic: str | None = None,
    *,
    max_gap_s: float = 0.2,
    every: int = 1,
    require_positions: bool = True,
) -> list[BagFrame]:
    """All frames of ``image_topic`` (every ``every``-th), each with the position nearest in time.

    With ``position_topic``, an image whose nearest position message is more than ``max_gap_s``
    seconds away gets ``position=None``; ``require_positions`` makes it an error when no image gets
    a position at all. Positions are planar metres: Odometry ``(x, y)``, NavSatFix ``(east, north)``
    about the first fix.
    """
    path = Path(path)
    if not (math.isfinite(max_gap_s) and max_gap_s >= 0):
        raise DatasetError(f"max_gap_s must be a non-negative number, got {max_gap_s}")
    stamps, xy = read_positions(path, position_topic) if position_topic else (None, None)
    frames = [BagFrame(s, im) for s, im in iter_bag_images(path, image_topic, every=every)]
    if stamps is not None:
        for f in frames:
            k = nearest_index(stamps, f.stamp, max_gap_s)
            if k is not None:
                f.position = (float(xy[k, 0]), float(xy[k, 1]))
        if require_positions and not any(f.position is not None for f in frames):
            raise DatasetError(
                f"{path}: no image on {image_topic!r} has a {position_topic!r} message within {max_gap_s} s "
                f"(images {frames[0].stamp:.3f}..{frames[-1].stamp:.3f} s, positions "
                f"{stamps[0]:.3f}..{stamps[-1]:.3f} s)"
            )
    return frames
