"""Robustness suite: bad inputs to the nodes and the CLI, and kill -9 while saving state.

* **Nodes** (real rclpy/DDS, real messages): each bad camera frame goes to the localizer, the
  transmitter and the loop-closure node at once (raw ``Image`` to one trio, ``CompressedImage``
  to another). Every node must log the reason on ``/rosout``, count it on ``/diagnostics``
  (``rejected_<reason>``; the loop-closure node ``rejected_image_<reason>``) and answer the good
  frame sent right after (PlaceMatch / TransmissionStats / cached features). The localizer's
  accounting stays exact: received = processed + queue drops + rejected.
* **CLI** (``vpr_ros.cli.main.main``, what ``vpr-ros`` runs): a bad map, checkpoint, bag or parameter
  exits with status 2 and one ``vpr-ros <command>: error: ...`` line naming the problem, no
  traceback.
* **Crash safety**: training processes killed with SIGKILL inside a checkpoint commit and at
  random moments, repeatedly: the last checkpoint always loads, its step never goes back, the
  training log keeps every step up to it, and resuming ends exactly as an unbroken run would.

docs/robustness.md maps every bad input to where it is caught and to its test here.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml

from vpr_ros.core.mapdb import PlaceMap
from vpr_ros.core.models import load_model, read_checkpoint

REPO = Path(__file__).resolve().parents[1]
T0 = 1_700_000_000.0
_stamps = itertools.count(1)  # every frame of the module gets a later stamp than the one before


def next_stamp() -> float:
    return T0 + 0.1 * next(_stamps)


# --------------------------------------------------------------------------- bad frames


@dataclass(frozen=True)
class Case:
    """A bad frame: its transport, the reason it is counted under, and words of the logged reason."""

    transport: str  # raw | compressed
    reason: str  # rejected_<reason>; "out_of_order" frames are counted but still used
    words: str


CASES: dict[str, Case] = {
    "wrong_encoding": Case("raw", "unsupported_encoding", "encoding 'bayer_rggb8' is not supported"),
    "step_too_small": Case("raw", "size_mismatch", "step 189 is less than width*bytes_per_pixel = 64*3"),
    "data_shorter_than_step_x_height": Case(
        "raw", "size_mismatch", "data has 6044 bytes, expected step*height = 192*32 = 6144"
    ),
    "odd_width_yuv422": Case("raw", "size_mismatch", "yuv422 needs an even width, got 63"),
    "empty_frame": Case("raw", "empty", "empty frame 0x0 with 0 bytes"),
    "nan_float_image": Case("raw", "nan", "float image contains NaN or infinite values"),
    "inf_float64_image": Case("raw", "nan", "float image contains NaN or infinite values"),
    "huge_frame": Case("raw", "too_large", "frame 20000x20000 exceeds max_pixels 1000000"),
    "out_of_order_stamp": Case("raw", "out_of_order", ""),
    "empty_payload": Case("compressed", "empty", "compressed image with no data"),
    "truncated_jpeg": Case("compressed", "corrupt", "not a decodable image"),
    "garbage_payload": Case("compressed", "corrupt", "not a decodable image"),
    "compressed_depth": Case(
        "compressed", "unsupported_encoding", "compressed format '16UC1; compressedDepth png' is not an image"
    ),
    "huge_png_header": Case("compressed", "too_large", "compressed frame 60000x60000 exceeds max_pixels"),
    "huge_jpeg_header": Case("compressed", "too_large", "compressed frame 50000x40000 exceeds max_pixels"),
}


def _jpeg(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 80])
    assert ok
    return buf.tobytes()


def _with_sof_size(jpeg: bytes, width: int, height: int) -> bytes:
    """The JPEG with its SOF0 header claiming ``width`` x ``height`` (the entropy data is unchanged)."""
    i = 2
    while jpeg[i + 1] != 0xC0:  # walk the marker segments to the baseline SOF
        i += 2 + int.from_bytes(jpeg[i + 2 : i + 4], "big")
    return jpeg[: i + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + jpeg[i + 9 :]


def bad_message(name: str, stamp: float, good: np.ndarray) -> Any:
    """The ``sensor_msgs`` message of bad input ``name`` (``good`` is a valid 32x64 RGB frame)."""
    from sensor_msgs.msg import CompressedImage, Image
    from std_msgs.msg import Header

    from vpr_ros.ros.conversions import float_to_stamp, rgb_to_image_msg

    header = Header(stamp=float_to_stamp(stamp), frame_id="camera")
    raw = rgb_to_image_msg(good, "rgb8", header)  # 64x32 rgb8: step 192, 6144 bytes
    if name == "wrong_encoding":
        raw.encoding = "bayer_rggb8"
    elif name == "step_too_small":
        raw.step = 64 * 3 - 3
    elif name == "data_shorter_than_step_x_height":
        raw.data = bytes(raw.data)[:-100]
    elif name == "odd_width_yuv422":
        raw = Image(header=header, height=32, width=63, encoding="yuv422", step=126, data=bytes(126 * 32))
    elif name == "empty_frame":
        raw = Image(header=header, height=0, width=0, encoding="rgb8", step=0)
    elif name in ("nan_float_image", "inf_float64_image"):
        dtype, enc = (np.float32, "32FC1") if name == "nan_float_image" else (np.float64, "64FC1")
        arr = np.full((8, 8), 0.5, dtype)
        arr[3, 4] = np.nan if name == "nan_float_image" else np.inf
        raw = Image(header=header, height=8, width=8, encoding=enc, step=8 * arr.itemsize, data=arr.tobytes())
    elif name == "huge_frame":  # the header claims 400 Mpx; the data is tiny (never touched)
        raw = Image(header=header, height=20000, width=20000, encoding="rgb8", step=60000, data=b"\x00" * 16)
    elif name == "out_of_order_stamp":
        raw.header = Header(stamp=float_to_stamp(T0 - 100.0), frame_id="camera")
    else:
        jpeg = _jpeg(good)
        payload, fmt = {
            "empty_payload": (b"", "jpeg"),
            "truncated_jpeg": (jpeg[: len(jpeg) * 3 // 5], "jpeg"),
            "garbage_payload": (np.random.default_rng(7).integers(0, 256, 3000, np.uint8).tobytes(), "jpeg"),
            "compressed_depth": (jpeg, "16UC1; compressedDepth png"),
            "huge_png_header": (
                b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR"
                + (60000).to_bytes(4, "big") * 2
                + b"\x08\x02\x00\x00\x00",
                "png",
            ),
            "huge_jpeg_header": (_with_sof_size(jpeg, 50000, 40000), "jpeg"),
        }[name]
        return CompressedImage(header=header, format=fmt, data=payload)
    return raw


def good_message(transport: str, stamp: float, good: np.ndarray) -> Any:
    from std_msgs.msg import Header

    from vpr_ros.ros.conversions import float_to_stamp, rgb_to_compressed_msg, rgb_to_image_msg

    header = Header(stamp=float_to_stamp(stamp), frame_id="camera")
    if transport == "raw":
        return rgb_to_image_msg(good, "rgb8", header)
    return rgb_to_compressed_msg(good, "jpeg", 90, header)


# --------------------------------------------------------------------------- the graph


class Rig:
    """One graph for the module: a localizer, a transmitter and a loop-closure node on the raw camera
    topic, three more on the compressed one, and a probe collecting PlaceMatch, TransmissionStats,
    /diagnostics and /rosout."""

    def __init__(self, graph: Any, model: tuple[Any, str], map_dir: Path, tmp: Path) -> None:
        from rcl_interfaces.msg import Log
        from rclpy.qos import QoSProfile, qos_profile_sensor_data
        from ros_support import fresh_namespace, stamp_key, unique
        from sensor_msgs.msg import CompressedImage, Image
        from vpr_ros_msgs.msg import PlaceMatch, TransmissionStats

        from vpr_ros.ros.localizer_node import LocalizerNode
        from vpr_ros.ros.loop_closure_node import LoopClosureNode
        from vpr_ros.ros.transmitter_node import TransmitterNode

        self.graph = graph
        ext, label = model
        ns = fresh_namespace()
        common = {"diagnostics_period_s": 0.1, "log_throttle_s": 0.0, "max_pixels": 1_000_000}
        self.nodes: dict[str, dict[str, Any]] = {}
        self.matches: dict[float, Any] = {}
        self.stats: dict[float, Any] = {}
        self.diag: dict[str, dict[str, str]] = {}
        self.logs: list[Any] = []
        self.probe = graph.add(graph.node(unique("robustness_probe")))
        self.pub: dict[str, Any] = {}
        for transport, msg_type in (("raw", Image), ("compressed", CompressedImage)):
            cam = f"{ns}/{transport}/camera"
            topics = {"image_topic": cam, "image_transport": transport}
            out = f"{ns}/{transport}"
            self.nodes[transport] = {
                "localizer": graph.create(LocalizerNode, unique(f"loc_{transport}"), extractor=ext,
                                          label=label, params={**common, **topics, "map_path": str(map_dir),
                                                               "top_k": 3, "queue_size": 50,
                                                               "match_topic": f"{out}/match"}),
                "transmitter": graph.create(TransmitterNode, unique(f"tx_{transport}"), params={
                    **common, **topics, "mode": "jpeg", "jpeg_quality": 30, "queue_size": 50,
                    "output_topic": f"{out}/link", "stats_topic": f"{out}/stats"}),
                "loop_closure": graph.create(LoopClosureNode, unique(f"lc_{transport}"), params={
                    **common, **topics, "match_topic": f"{out}/match", "loop_closure_topic": f"{out}/loop"}),
            }
            topic = cam if transport == "raw" else f"{cam}/compressed"
            self.pub[transport] = self.probe.create_publisher(msg_type, topic, qos_profile_sensor_data)
            for msg_type_out, name, into in ((PlaceMatch, "match", self.matches),
                                             (TransmissionStats, "stats", self.stats)):
                def keep(m: Any, into: dict = into) -> None:
                    into[stamp_key(m.header.stamp)] = m

                self.probe.create_subscription(msg_type_out, f"{out}/{name}", keep, QoSProfile(depth=1000))
        from diagnostic_msgs.msg import DiagnosticArray

        self.probe.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, QoSProfile(depth=200))
        self.probe.create_subscription(Log, "/rosout", self.logs.append, QoSProfile(depth=1000))
        ready = graph.wait_for(lambda: all(p.get_subscription_count() >= 3 for p in self.pub.values())
                               and graph.all_matched(), 60.0)
        assert ready, "nodes and probe not matched within 60 s"
        self.stamp_key = stamp_key
        self.tmp = tmp

    def _on_diag(self, msg: Any) -> None:
        for st in msg.status:
            self.diag[st.name] = {kv.key: kv.value for kv in st.values}

    def published(self, node: Any) -> dict[str, str]:
        return self.diag.get(f"vpr_ros: {node.get_name()}", {})

    def logged(self, node: Any, text: str) -> bool:
        return any(log.name.endswith(node.get_name()) and text in log.msg for log in list(self.logs))


@pytest.fixture(scope="module")
def frame(kitti_dir) -> np.ndarray:
    from vpr_ros.core.images import load_image

    path = sorted((kitti_dir / "05" / "image_0").glob("*.jpg"))[40]
    return cv2.resize(load_image(path), (64, 32), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def rig(ros_env, torch_home, kitti_dir, frame, tmp_path_factory):
    pytest.importorskip("ros_support")
    from vpr_ros.core.images import load_image
    from vpr_ros.core.localizer import build_extractor
    from vpr_ros.ros.runner import InProcessGraph

    model = build_extractor("imagenet", "", "native", "cpu", 8)
    paths = sorted((kitti_dir / "05" / "image_0").glob("*.jpg"))[:60:6]
    images = [cv2.resize(load_image(p), (64, 32), interpolation=cv2.INTER_AREA) for p in paths]
    place_map = PlaceMap(model[0].dim, model=model[1])
    place_map.add(model[0](images))
    tmp = tmp_path_factory.mktemp("robustness")
    map_dir = place_map.save(tmp / "kitti05")
    with InProcessGraph() as graph:
        yield Rig(graph, model, map_dir, tmp)


def _counter(values: dict[str, Any], key: str) -> int:
    return int(values.get(key, 0))


@pytest.mark.ros
@pytest.mark.parametrize("name", list(CASES))
def test_bad_frame_rejected_counted_logged_and_nodes_keep_answering(rig, frame, name):
    case = CASES[name]
    trio = rig.nodes[case.transport]
    loc, tx, lc = trio["localizer"], trio["transmitter"], trio["loop_closure"]
    keys = {
        "localizer": f"rejected_{case.reason}",
        "transmitter": f"rejected_{case.reason}",
        "loop_closure": f"rejected_image_{case.reason}",
    }
    if case.reason == "out_of_order":
        keys = {
            "localizer": "out_of_order",
            "transmitter": "out_of_order",
            "loop_closure": "images_out_of_order",
        }
    before = {role: node.diagnostics() for role, node in trio.items()}
    bad = bad_message(name, next_stamp(), frame)  # out_of_order_stamp: replaced by one 100 s before T0
    good_stamp = next_stamp()
    rig.graph.publish_paced(
        rig.pub[case.transport],
        [bad, good_message(case.transport, good_stamp, frame)],
        lambda: min(loc.frames_in, tx.frames_in, lc.images_in),
    )
    key = round(good_stamp, 3)
    # each node answers the good frame sent after the bad one
    assert rig.graph.wait_for(lambda: key in rig.matches and key in rig.stats, 15.0), (
        f"no PlaceMatch / TransmissionStats after {name}: {loc.diagnostics()} {tx.diagnostics()}"
    )
    cached = before["loop_closure"]["feature_cache_frames"] + (2 if case.reason == "out_of_order" else 1)
    # /diagnostics shows the counter one up, and the frame's fate
    expect = {role: _counter(before[role], keys[role]) + 1 for role in trio}

    def published_all() -> bool:
        return (
            all(_counter(rig.published(node), keys[role]) == expect[role] for role, node in trio.items())
            and _counter(rig.published(lc), "feature_cache_frames") == cached
            and _counter(rig.published(loc), "frames_processed") == loc.frames_ok
        )

    assert rig.graph.wait_for(published_all, 10.0), {role: rig.published(n) for role, n in trio.items()}
    loc_diag, tx_diag = rig.published(loc), rig.published(tx)
    rejected = 0 if case.reason == "out_of_order" else 1
    assert _counter(loc_diag, "rejected_total") == before["localizer"]["rejected_total"] + rejected
    assert _counter(tx_diag, "rejected_total") == before["transmitter"]["rejected_total"] + rejected
    # exact accounting: every frame the localizer received was processed, dropped or rejected
    assert _counter(loc_diag, "frames_received") == (
        _counter(loc_diag, "frames_processed")
        + _counter(loc_diag, "queue_drops")
        + _counter(loc_diag, "rejected_total")
    )
    if case.reason == "out_of_order":  # still localised, with its own stamp
        assert rig.graph.wait_for(lambda: rig.stamp_key(bad.header.stamp) in rig.matches, 5.0)
    else:  # the reason, as an operator sees it on /rosout
        for role, node in trio.items():
            text = f"rejected frame [{keys[role][len('rejected_') :]}]: "
            assert rig.graph.wait_for(
                lambda n=node, t=text: rig.logged(n, t) and rig.logged(n, case.words), 5.0
            ), (role, case.words, [log.msg for log in rig.logs if log.name.endswith(node.get_name())][-3:])
    assert all(node._worker.is_alive() for node in trio.values())


@pytest.mark.ros
def test_nan_odometry_is_ignored_and_keyframes_keep_their_poses(rig, frame):
    """A NaN pose on the odometry topic is logged, counted, and never reaches a map entry (it used to fail
    every keyframe batch near its stamp)."""
    from geometry_msgs.msg import Point, Pose
    from nav_msgs.msg import Odometry
    from rclpy.qos import QoSProfile, qos_profile_sensor_data
    from ros_support import fresh_namespace, unique
    from sensor_msgs.msg import Image
    from std_msgs.msg import Header

    from vpr_ros.ros.conversions import float_to_stamp
    from vpr_ros.ros.localizer_node import LocalizerNode

    ns = fresh_namespace()
    shared = rig.nodes["raw"]["localizer"]
    params = {"image_topic": f"{ns}/camera", "mode": "map", "map_path": str(rig.tmp / "odom_map"),
              "odom_topic": f"{ns}/odom", "odom_tolerance_s": 0.05, "require_pose": True,
              "log_throttle_s": 0.0, "diagnostics_period_s": 0.1, "save_on_shutdown": False}
    loc = rig.graph.create(LocalizerNode, unique("loc_map"), extractor=shared.extractor, label=shared.label,
                           params=params)
    odom = rig.probe.create_publisher(Odometry, f"{ns}/odom", QoSProfile(depth=10))
    cam = rig.probe.create_publisher(Image, f"{ns}/camera", qos_profile_sensor_data)
    assert rig.graph.wait_matched([odom, cam], timeout=30.0)
    stamps = [next_stamp() for _ in range(2)]
    for s, x in ((stamps[0], float("nan")), (stamps[0] + 0.01, 1.0), (stamps[1] + 0.01, 2.0)):
        msg = Odometry(header=Header(stamp=float_to_stamp(s), frame_id="odom"))
        msg.pose.pose = Pose(position=Point(x=x, y=0.0, z=0.0))
        odom.publish(msg)
    core = loc.localizer
    assert rig.graph.wait_for(lambda: core.odom_rejected == 1 and len(core.odometry) == 2, 5.0)
    rig.graph.publish_paced(cam, [good_message("raw", s, frame) for s in stamps], lambda: loc.frames_in)
    assert rig.graph.wait_for(lambda: core.keyframes_added == 2, 15.0), loc.diagnostics()
    assert rig.graph.wait_for(lambda: rig.published(loc).get("odom_rejected") == "1", 5.0)
    assert rig.logged(loc, "ignored [odom_nan]: odometry at stamp") and rig.logged(loc, "NaN/inf in its pose")
    entries = loc.place_map.entries()
    assert [e.position[0] for e in entries] == [1.0, 2.0]  # the finite poses within tolerance
    assert loc.diagnostics()["rejected_total"] == 0


# --------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def bad_files(kitti_dir, tmp_path_factory, torch_home) -> dict[str, Path]:
    """A small KITTI bag and its map, plus broken copies: truncated map, 16-d map, corrupt checkpoint,
    truncated MCAP bag, SQLite bag corrupt in the middle."""
    pytest.importorskip("rosbags")
    from vpr_ros.core.localizer import build_extractor
    from vpr_ros.data.dataset_bags import make_dataset_bag

    tmp = tmp_path_factory.mktemp("bad_files")
    bag = make_dataset_bag("kitti", kitti_dir, tmp / "k.mcap", limit=6)["bag"]
    sqlite = make_dataset_bag("kitti", kitti_dir, tmp / "k.db3", storage="sqlite3", limit=6)["bag"]
    ext, label = build_extractor("imagenet", "", "native", "cpu", 8)
    good = PlaceMap(ext.dim, model=label)
    good.add(np.eye(ext.dim, dtype=np.float32)[:3])
    out = {"bag": Path(bag), "map": good.save(tmp / "good")}
    trunc = tmp / "trunc.vprmap"
    shutil.copytree(out["map"], trunc)
    index = next(trunc.glob("index-*"))
    os.truncate(index, index.stat().st_size // 2)
    out["truncated_map"] = trunc
    d16 = PlaceMap(16, model=label)
    d16.add(np.eye(16, dtype=np.float32)[:2])
    out["map_16d"] = d16.save(tmp / "d16")
    out["corrupt_checkpoint"] = tmp / "corrupt.pt"
    out["corrupt_checkpoint"].write_bytes(b"PK\x03\x04" + bytes(range(256)) * 8)
    out["truncated_bag"] = tmp / "trunc.mcap"
    shutil.copytree(bag, out["truncated_bag"])
    mcap = next(out["truncated_bag"].glob("*.mcap"))
    os.truncate(mcap, mcap.stat().st_size // 2)
    out["corrupt_bag"] = tmp / "mid.db3"
    shutil.copytree(sqlite, out["corrupt_bag"])
    db = next(out["corrupt_bag"].glob("*.db3"))
    raw = bytearray(db.read_bytes())
    mid = len(raw) // 2
    raw[mid : mid + 5000] = bytes(b ^ 0x5A for b in raw[mid : mid + 5000])
    db.write_bytes(bytes(raw))
    out["missing_map"] = tmp / "nowhere"
    out["tmp"] = tmp
    return out


def run_cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    from vpr_ros.cli.main import main

    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return rc, [line for line in err.splitlines() if ": error: " in line]


CONFIG = REPO / "config" / "localize.yaml"


def _localize(files: dict[str, Path], map_key: str, *sets: str) -> list[Any]:
    argv: list[Any] = ["localize", "--params", CONFIG, "--duration", "1"]
    for s in (f"localizer.map_path={files[map_key]}", "localizer.weights=imagenet",
              "localizer.input_size=native", "localizer.device=cpu", *sets):
        argv += ["--set", s]
    return argv


def _replay(files: dict[str, Path], bag_key: str, map_key: str, *extra: str) -> list[Any]:
    return ["replay", "--bag", files[bag_key], "--map", files[map_key], "--out", files["tmp"] / "replay",
            *"--weights imagenet --input-size native --device cpu --fast".split(), *extra]


CLI_CASES = {
    "missing_map": (
        lambda f: _localize(f, "missing_map"),
        "vpr-ros localize: error: no place map at {missing_map}.vprmap",
    ),
    "truncated_map": (
        lambda f: _replay(f, "bag", "truncated_map"),
        "vpr-ros replay: error: checksum mismatch for map data file {truncated_map}/index-",
    ),
    "descriptor_dimension_mismatch": (
        lambda f: _localize(f, "map_16d"),
        "vpr-ros localize: error: map {map_16d} holds 16-dimensional descriptors but 448 were expected",
    ),
    "corrupt_checkpoint": (
        lambda f: ["build-map", "--images", REPO, "--weights", f["corrupt_checkpoint"], "--out", f["tmp"]],
        "vpr-ros build-map: error: {corrupt_checkpoint}: not a readable vpr_ros checkpoint",
    ),
    "corrupt_checkpoint_as_node_weights": (
        lambda f: _localize(f, "map", f"localizer.weights={f['corrupt_checkpoint']}"),
        "vpr-ros localize: error: {corrupt_checkpoint}: not a readable vpr_ros checkpoint",
    ),
    "invalid_parameter": (
        lambda f: _localize(f, "map", "localizer.max_pixels=0"),
        "vpr-ros localize: error: localizer: parameter 'max_pixels' must be in [1, 67108864]",
    ),
    "invalid_option": (
        lambda f: _replay(f, "bag", "map", "--top-k", "0"),
        "vpr-ros replay: error: --top-k must be in 1..100, got 0",
    ),
    "truncated_bag": (
        lambda f: _replay(f, "truncated_bag", "map"),
        "vpr-ros replay: error: {truncated_bag}: not a readable bag",
    ),
    "bag_corrupt_mid_read": (
        lambda f: _replay(f, "corrupt_bag", "map"),
        "vpr-ros replay: error: {corrupt_bag}: bag is truncated or corrupt",
    ),
}


@pytest.mark.ros
@pytest.mark.usefixtures("ros_env")
@pytest.mark.parametrize("name", list(CLI_CASES))
def test_cli_bad_input_exits_2_with_one_clear_line(bad_files, capsys, name):
    argv, expected = CLI_CASES[name]
    rc, errors = run_cli(argv(bad_files), capsys)
    assert rc == 2
    assert len(errors) == 1 and errors[0].startswith(expected.format(**bad_files)), errors


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the file starts like a pickle
def test_training_resume_from_corrupt_checkpoint_exits_2(nordland_dir, tmp_path, capsys):
    from test_training import tiny_recipe

    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"\x80\x04garbage, not a zip")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny_recipe(nordland_dir, run)))
    rc, errors = run_cli(["train", "--config", tmp_path / "r.yaml", "--resume"], capsys)
    assert rc == 2 and len(errors) == 1, errors
    assert errors[0].startswith(f"vpr-ros train: error: {run / 'last.pt'}: not a readable vpr_ros checkpoint")


# --------------------------------------------------------------------------- crash safety: training


def _train_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


# The training CLI with os.replace wrapped: SIGKILL right before the rename that commits the
# checkpoint number KILL_AT of this process (its temporary file is complete but not yet last.pt).
KILL_INSIDE_COMMIT = textwrap.dedent(
    """
    import os, signal, sys
    kill_at, real_replace, commits = int(sys.argv[1]), os.replace, []
    def replace(src, dst):
        if str(dst).endswith("last.pt"):
            commits.append(dst)
            if len(commits) == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)
    os.replace = replace
    from vpr_ros.cli.train import main
    sys.exit(main(sys.argv[2:]))
    """
)


def _check_run(run: Path, at_least: int) -> int:
    """The checkpoint loads, its step is >= ``at_least``, and train.csv holds every step up to it once."""
    import csv

    ckpt = read_checkpoint(run / "last.pt")
    assert ckpt["kind"] == "training" and {"optimizer", "scheduler", "rng"} <= set(ckpt)
    step = int(ckpt["step"])
    assert step >= at_least, f"checkpoint went back from step {at_least} to {step}"
    assert load_model(run / "last.pt").descriptor_dim == 448
    with open(run / "train.csv", newline="") as f:
        logged = [int(r["step"]) for r in csv.DictReader(f)]
    assert logged == list(range(1, len(logged) + 1)) and len(logged) >= step, (step, logged)
    return step


def test_sigkill_during_training_checkpoints_loses_nothing_committed(nordland_dir, torch_home, tmp_path):
    """Killed inside a checkpoint commit, then at random moments (a checkpoint every step): after each
    kill the last checkpoint loads and nothing before it is lost; the resumed run finishes all steps,
    each logged once, and no temporary file of a killed write is left."""
    from test_training import tiny_recipe

    total = 10
    run = tmp_path / "run"
    (tmp_path / "r.yaml").write_text(
        yaml.safe_dump(tiny_recipe(nordland_dir, run, max_steps=total, ckpt_every=1))
    )
    train = ["train", "--config", str(tmp_path / "r.yaml")]
    # 1. killed inside the 3rd commit: last.pt is still the 2nd checkpoint
    child = subprocess.run(
        [sys.executable, "-c", KILL_INSIDE_COMMIT, "3", *train],
        env=_train_env(),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    step = _check_run(run, 2)
    assert step == 2
    # 2. killed at random moments, resuming each time
    rng = np.random.default_rng(11)
    kills = 0
    cmd = [sys.executable, "-m", "vpr_ros.cli", *train, "--resume"]
    for _ in range(2):
        proc = subprocess.Popen(
            cmd, env=_train_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO
        )
        try:
            deadline = time.monotonic() + 120
            while proc.poll() is None and time.monotonic() < deadline:  # until it checkpointed once more
                if read_checkpoint(run / "last.pt")["step"] > step:
                    break
                time.sleep(0.02)
            time.sleep(float(rng.uniform(0.0, 0.4)))
            proc.send_signal(signal.SIGKILL)
        finally:
            _, err = proc.communicate(timeout=60)
        if proc.returncode != -signal.SIGKILL:  # it finished before the kill
            assert proc.returncode == 0, err[-2000:]
            break
        kills += 1
        step = _check_run(run, step + 1)
        assert step < total
    assert kills >= 2
    done = subprocess.run(cmd, env=_train_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _check_run(run, total) == total
    assert not list(run.glob(".last.pt.*.tmp")), "temporary checkpoint files of killed runs were left behind"
