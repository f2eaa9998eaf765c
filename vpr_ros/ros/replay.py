"""Bag replay through the real nodes: :func:`run_replay` publishes a bag to the in-process graph and scores
what comes back (``vpr-ros replay``, :mod:`vpr_ros.cli.ros`).

``vpr-ros replay --bag B --map M``: the bag's camera frames (and Odometry, for keyframe poses in map
modes) are published in bag order to a real :class:`~vpr_ros.ros.localizer_node.LocalizerNode` (and, with
``--loop-closure``, a :class:`~vpr_ros.ros.loop_closure_node.LoopClosureNode`) running in-process on a
private rclpy context, at bag rate (``--rate`` times real time) or as fast as the nodes go (``--fast``:
flow control, each frame waits for its result). Odometry is published up to 1 s of bag time ahead of the
images, so the localizer has a keyframe's pose when it describes the frame. The outputs (``PlaceMatch``,
``LoopClosure``) are collected, optionally recorded to a rosbag2 bag (``--record``), and scored:

* distance ground truth (default): a map entry is correct within ``--radius`` of the query position (the
  bag's Odometry / NavSatFix nearest the image stamp); the map's entries need poses (a map built by
  replaying a bag with odometry in ``--mode map``);
* ``--gt-matrix F``: an N x N 0/1 loop matrix over the bag's frames in order (RTAB-Map's
  ``gt_loop_matrix.txt``), for SLAM runs (``--mode both``) whose map entries are the bag's own frames.

In ``--mode both`` candidates less than the exclusion window old are ignored when scoring (the frames
just before a query are trivially similar). The report (``report.json``, ``recall_at_n.png``, ``pr.png``)
gives recall@N, the top-1 precision-recall curve, latency, drops and the loop-closure precision/recall.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from nav_msgs.msg import Odometry
from rclpy.qos import QoSProfile, qos_profile_sensor_data
from rclpy.serialization import deserialize_message, serialize_message
from rosbags.rosbag2 import StoragePlugin, Writer
from sensor_msgs.msg import CompressedImage, Image, NavSatFix
from vpr_ros_msgs.msg import LoopClosure, PlaceMatch

from vpr_ros.core.errors import ConfigError, DatasetError
from vpr_ros.core.fileio import atomic_write_text, check_output_dir, display_path
from vpr_ros.core.localizer import build_extractor
from vpr_ros.core.loop_closure import DEFAULT_EXCLUSION_WINDOW_S
from vpr_ros.core.timeline import to_ns, to_seconds
from vpr_ros.data.bags import COMPRESSED_TYPE, IMAGE_TYPE, NAVSAT_TYPE, ODOMETRY_TYPE, bag_topics, open_reader
from vpr_ros.data.dataset_bags import read_positions, vpr_typestore
from vpr_ros.eval.metrics import json_default
from vpr_ros.eval.replay import (
    Candidate,
    Closure,
    ReplayScore,
    distance_positives,
    load_loop_matrix,
    loop_matrix_positives,
    nearest_positions,
    plot_replay,
    score_replay,
)
from vpr_ros.ros import graph as node_graph
from vpr_ros.ros.runner import InProcessGraph

log = logging.getLogger(__name__)

__all__ = ["ReplayConfig", "replay_failure", "run_replay"]

MATCH_TOPIC = "/vpr/place_match"
LOOP_TOPIC = "/vpr/loop_closure"
#: Position messages are published this far ahead of the images (bag time), see :func:`run_replay`.
POSITION_LEAD_NS = 1_000_000_000


@dataclass
class ReplayConfig:
    """Options of :func:`run_replay` (the ``vpr-ros replay`` arguments)."""

    bag: Path
    map_path: Path
    out_dir: Path = Path("results/replay")
    image_topic: str | None = None  # None: the bag's only image topic
    position_topic: str | None = None  # None: the bag's only Odometry/NavSatFix topic ("" = none)
    rate: float = 1.0
    fast: bool = False
    record: Path | None = None
    mode: str = "localize"
    loop_closure: bool = False
    gt_matrix: Path | None = None
    radius: float = 25.0
    top_k: int = 10
    weights: str = "default"
    model: str = ""
    input_size: str = ""
    device: str = "auto"
    params_file: Path | None = None
    sets: list[str] = field(default_factory=list)
    namespace: str | None = None  # None: a fresh private one (/vpr_replay_<hex>); "" = the bag's names
    timeout_s: float = 30.0
    max_position_gap_s: float = 0.2
    extractor: Any = None  # an in-process (extractor, label) pair to reuse (tests, notebooks)

    def validate(self) -> None:
        if not (math.isfinite(self.rate) and self.rate > 0):
            raise ConfigError(f"--rate must be a positive number, got {self.rate}")
        if self.mode not in ("localize", "map", "both"):
            raise ConfigError(f"--mode must be localize, map or both, got {self.mode!r}")
        if self.loop_closure and self.mode == "map":
            raise ConfigError("--loop-closure needs PlaceMatch messages: use --mode both or localize")
        if not (math.isfinite(self.radius) and self.radius > 0):
            raise ConfigError(f"--radius must be a positive number of metres, got {self.radius}")
        if not 1 <= self.top_k <= 100:
            raise ConfigError(f"--top-k must be in 1..100, got {self.top_k}")
        if not self.bag.exists():
            raise DatasetError(f"{self.bag}: bag not found")
        if self.record is not None and self.record.exists():
            raise ConfigError(f"{self.record}: already exists; --record writes a new bag")


# --------------------------------------------------------------------------- bag input


@dataclass
class _BagInput:
    image_conn: Any
    position_conn: Any | None
    base_topic: str  # image topic without /compressed
    compressed: bool


def _pick_connections(reader: Any, cfg: ReplayConfig) -> _BagInput:

    conns = list(reader.connections)
    listing = ", ".join(f"{c.topic} ({c.msgtype})" for c in conns) or "none"
    images = [c for c in conns if c.msgtype in (IMAGE_TYPE, COMPRESSED_TYPE)]
    if cfg.image_topic:
        images = [c for c in images if c.topic == cfg.image_topic]
        if not images:
            raise DatasetError(f"{cfg.bag}: no image topic {cfg.image_topic!r}; topics: {listing}")
    elif len(images) != 1:
        raise DatasetError(f"{cfg.bag}: {len(images)} image topics; pick one with --image-topic ({listing})")
    image = images[0]
    positions = [c for c in conns if c.msgtype in (ODOMETRY_TYPE, NAVSAT_TYPE)]
    if cfg.position_topic:
        positions = [c for c in positions if c.topic == cfg.position_topic]
        if not positions:
            raise DatasetError(f"{cfg.bag}: no Odometry/NavSatFix topic {cfg.position_topic!r}; "
                               f"topics: {listing}")
    elif cfg.position_topic == "" or len(positions) != 1:
        positions = []
    compressed = image.msgtype == COMPRESSED_TYPE
    base = image.topic
    if compressed and base.endswith("/compressed"):
        base = base[: -len("/compressed")]
    return _BagInput(image, positions[0] if positions else None, base, compressed)


# --------------------------------------------------------------------------- recording


def write_record(path: Path, place_matches: Sequence[Any], closures: Sequence[Any],
                 storage: str = "mcap") -> Path:
    """Write node outputs to a new rosbag2 bag: PlaceMatch on /vpr/place_match at its image stamp,
    LoopClosure on /vpr/loop_closure at its query stamp (so they line up with the input bag's time)."""


    ts = vpr_typestore()
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3

    with Writer(path, version=9, storage_plugin=plugin) as writer:
        mc = writer.add_connection(MATCH_TOPIC, "vpr_ros_msgs/msg/PlaceMatch", typestore=ts)
        lc = writer.add_connection(LOOP_TOPIC, "vpr_ros_msgs/msg/LoopClosure", typestore=ts)
        rows = [(to_ns(m.header.stamp), 0, i, m) for i, m in enumerate(place_matches)]
        rows += [(to_ns(c.query_stamp), 1, i, c) for i, c in enumerate(closures)]
        for t_ns, kind, _, msg in sorted(rows, key=lambda r: r[:3]):
            writer.write(mc if kind == 0 else lc, t_ns, serialize_message(msg))
    return path


# --------------------------------------------------------------------------- replay


def _bag_messages(reader: Any, connection: Any, bag: Path) -> Iterator[tuple[Any, int, bytes]]:
    """``reader.messages`` of one connection; a read error mid-bag is a :class:`DatasetError`."""
    messages = reader.messages(connections=[connection])
    while True:
        try:
            item = next(messages)
        except StopIteration:
            return
        except Exception as exc:  # truncated chunk, corrupt database page, ...
            raise DatasetError(f"{bag}: bag is truncated or corrupt ({type(exc).__name__}: {exc})") from None
        yield item


def _deserialize(raw: bytes, msg_type: type, bag: Path) -> Any:
    """A bag message as ``msg_type``; bytes that do not deserialise are a :class:`DatasetError`."""

    try:
        return deserialize_message(raw, msg_type)
    except Exception as exc:
        raise DatasetError(f"{bag}: corrupt {msg_type.__name__} message in the bag "
                           f"({type(exc).__name__}: {exc})") from None


class _Collector:
    """The probe's subscriptions: PlaceMatch by image stamp, LoopClosure in arrival order."""

    def __init__(self) -> None:
        self.matches: dict[int, Any] = {}
        self.order: list[Any] = []
        self.closures: list[Any] = []

    def on_match(self, msg: Any) -> None:
        self.matches[to_ns(msg.header.stamp)] = msg
        self.order.append(msg)

    def on_closure(self, msg: Any) -> None:
        self.closures.append(msg)


def _node_params(cfg: ReplayConfig) -> dict[str, dict[str, Any]]:
    params = node_graph.load_params_file(cfg.params_file) if cfg.params_file else {}
    return node_graph.apply_sets(params, cfg.sets)


def run_replay(cfg: ReplayConfig) -> dict[str, Any]:
    """Replay ``cfg.bag`` through the real nodes; write the report (and ``cfg.record``); return the report."""


    cfg.validate()
    check_output_dir(cfg.out_dir)  # an unwritable --out is found before the replay, not after it
    params = _node_params(cfg)
    ns = f"/vpr_replay_{uuid.uuid4().hex[:8]}" if cfg.namespace is None else cfg.namespace.rstrip("/")
    reader = open_reader(cfg.bag, vpr_typestore())  # DatasetError naming the bag and why
    try:
        inp = _pick_connections(reader, cfg)
        if cfg.extractor is not None:
            ext, label = cfg.extractor
        else:
            loc_file = {**params.get("*", {}), **params.get("localizer", {})}  # backend settings of --params
            ext, label = build_extractor(cfg.weights, cfg.model, cfg.input_size, cfg.device, 8,
                                         backend=str(loc_file.get("backend", "auto")),
                                         precision=str(loc_file.get("precision", "fp32")),
                                         threads=int(loc_file.get("threads", 0)))

        img_type = CompressedImage if inp.compressed else Image
        pos_type = None
        if inp.position_conn is not None:
            pos_type = Odometry if inp.position_conn.msgtype.endswith("Odometry") else NavSatFix
        loc_params = {
            "image_topic": f"{ns}{inp.base_topic}",
            "image_transport": "compressed" if inp.compressed else "raw",
            "match_topic": f"{ns}{MATCH_TOPIC}", "map_path": str(cfg.map_path), "mode": cfg.mode,
            "top_k": cfg.top_k, "diagnostics_period_s": 0.0, "weights": cfg.weights, "device": cfg.device,
            "odom_topic": f"{ns}{inp.position_conn.topic}" if pos_type is Odometry else "",
        }
        # the replay's own topics beat the params file; the loop-closure node is wired to the localizer
        # (a score_threshold the params file gives is kept: the weights' card gives it otherwise)
        lc_file = {k: v for k, v in params.get("loop_closure", {}).items()
                   if k not in node_graph.wired_params("loop_closure", derived=False)}
        params = node_graph.wire({**params, "localizer": {**params.get("localizer", {}), **loc_params},
                                  "loop_closure": {**lc_file, "loop_closure_topic": f"{ns}{LOOP_TOPIC}",
                                                   "diagnostics_period_s": 0.0}}, use_transmitter=False)
        coll = _Collector()
        published: list[int] = []  # image stamps (ns) in bag order
        t_start = time.perf_counter()
        with InProcessGraph() as graph:
            made = graph.add_graph_nodes(params, node_graph.active_nodes(use_loop_closure=cfg.loop_closure),
                                         extra={"localizer": {"extractor": ext, "label": label}})
            loc, lc = made["localizer"], made.get("loop_closure")
            probe = graph.add(graph.node(f"vpr_replay_{uuid.uuid4().hex[:6]}"))
            img_pub = probe.create_publisher(img_type, loc.input_topic, qos_profile_sensor_data)
            pos_pub = None
            if pos_type is not None:
                pos_pub = probe.create_publisher(pos_type, f"{ns}{inp.position_conn.topic}",
                                                 QoSProfile(depth=100))
            publishing = cfg.mode != "map"
            if publishing:
                probe.create_subscription(PlaceMatch, f"{ns}{MATCH_TOPIC}", coll.on_match,
                                          QoSProfile(depth=1000))
            if lc is not None:
                probe.create_subscription(LoopClosure, f"{ns}{LOOP_TOPIC}", coll.on_closure,
                                          QoSProfile(depth=1000))
            # matched both ways, not only discovered: a sample sent before that is lost
            topics = [img_pub.topic_name] + ([pos_pub.topic_name] if pos_type is Odometry else [])
            topics += [f"{ns}{MATCH_TOPIC}"] if publishing or lc is not None else []
            topics += [f"{ns}{LOOP_TOPIC}"] if lc is not None else []
            ready = graph.wait_for(lambda: all(graph.topic_matched(t) for t in topics), 60.0)
            if not ready:
                raise ConfigError("replay: the nodes' topics did not match within 60 s "
                                  "(is DDS discovery confined to loopback?)")
            # Positions are small: read them first and publish each ahead of the images it belongs to, so
            # the localizer has a keyframe's odometry before it describes the frame (also in --fast runs).
            positions = ([(t, bytes(raw)) for _, t, raw in _bag_messages(reader, inp.position_conn, cfg.bag)]
                         if pos_pub is not None else [])
            next_pos = 0
            t0_bag = None
            wall0 = time.perf_counter()
            lost = 0
            for _, t_ns, raw in _bag_messages(reader, inp.image_conn, cfg.bag):
                if not cfg.fast:
                    t0_bag = t_ns if t0_bag is None else t0_bag
                    delay = wall0 + (t_ns - t0_bag) * 1e-9 / cfg.rate - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                while next_pos < len(positions) and positions[next_pos][0] <= t_ns + POSITION_LEAD_NS:
                    pos_pub.publish(_deserialize(positions[next_pos][1], pos_type, cfg.bag))
                    next_pos += 1
                msg = _deserialize(bytes(raw), img_type, cfg.bag)
                published.append(to_ns(msg.header.stamp))
                img_pub.publish(msg)
                if cfg.fast and not _wait_frame(graph, loc, coll, len(published), publishing, cfg.timeout_s):
                    lost += 1
            _drain(graph, loc, lc, coll, publishing, cfg.timeout_s, len(published))
            wall = time.perf_counter() - wall0
            loc_diag = loc.diagnostics()
            lc_diag = lc.diagnostics() if lc is not None else None
            entries = loc.place_map.entries()
            map_size = len(loc.place_map)
        # leaving the graph saved the map in map modes
        bag_span = (published[-1] - published[0]) * 1e-9 if len(published) > 1 else 0.0
    finally:
        reader.close()

    report: dict[str, Any] = {
        "bag": str(cfg.bag), "map": str(cfg.map_path), "mode": cfg.mode, "model": label,
        "image_topic": inp.image_conn.topic,
        "position_topic": inp.position_conn.topic if inp.position_conn else None,
        "pace": "fast" if cfg.fast else f"{cfg.rate:g}x bag rate", "frames_published": len(published),
        "place_matches": len(coll.order), "fast_mode_timeouts": lost, "map_size": map_size,
        # best-effort camera QoS: frames DDS dropped before the localizer's callback (it cannot count those)
        "lost_in_transport": max(0, len(published) - int(loc_diag["frames_received"])),
        "frames_without_result": len(published) - (len(coll.order) if publishing
                                                   else int(loc_diag["frames_processed"])),
        "publish_failed": int(loc_diag.get("publish_failed", 0)),
        "wall_s": wall, "bag_span_s": bag_span, "realtime_factor": bag_span / wall if wall > 0 else None,
        "setup_s": time.perf_counter() - t_start - wall, "localizer": loc_diag, "loop_closure_node": lc_diag,
    }
    lat = np.array([m.latency_ms for m in coll.order], dtype=np.float64)
    if lat.size:
        report["latency_ms"] = {"p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)),
                                "max": float(lat.max())}
    score = _score(cfg, published, coll, entries, params) if publishing and coll.order else None
    if score is not None:
        report.update(score.summary)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if score is not None:
        report.update(plot_replay(score, out, label, name=Path(cfg.bag).name))
    if cfg.record is not None:
        write_record(cfg.record, coll.order, coll.closures)
        report["record"] = str(cfg.record)
    # strict JSON: a statistic of zero samples (no frames, no latencies) is null, never NaN
    plain = json.loads(json.dumps(report, default=json_default))
    text = json.dumps(_finite(plain), indent=2, allow_nan=False)
    atomic_write_text(out / "report.json", text + "\n")
    report["report"] = str(out / "report.json")
    return report


def _finite(obj: Any) -> Any:
    """``obj`` with every NaN / infinite float replaced by None (recursively)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def replay_failure(report: dict[str, Any]) -> str | None:
    """Why a finished replay did not do its job (no image frames; frames but no PlaceMatch), or None."""
    frames = int(report["frames_published"])
    if frames == 0:
        return f"{display_path(report['bag'])}: no image message on {report['image_topic']}; nothing replayed"
    if report["mode"] != "map" and int(report["place_matches"]) == 0:
        loc = report.get("localizer") or {}
        return (f"{frames} frames replayed but no PlaceMatch came back (localizer: "
                f"{loc.get('frames_processed', 0)} processed, {loc.get('rejected_total', 0)} rejected, "
                f"{loc.get('publish_failed', 0)} not published; lost in transport "
                f"{report.get('lost_in_transport', 0)})")
    return None


def _wait_frame(graph: Any, loc: Any, coll: _Collector, sent: int, publishing: bool, timeout: float) -> bool:
    """Fast mode: wait until the localizer has finished frame ``sent`` (and its PlaceMatch arrived)."""
    def done() -> bool:
        if _finished(loc) < sent:
            return False
        return not publishing or len(coll.order) >= loc.frames_ok - loc.publish_failed

    return graph.wait_for(done, timeout, interval=0.002)


def _finished(loc: Any) -> int:
    d = loc.diagnostics()
    return int(d["frames_processed"] + d["rejected_total"] + d["queue_drops"])


#: How long the last frames may still be in transit to the localizer (one lost by best effort never comes).
TRANSIT_GRACE_S = 10.0


def _drain(graph: Any, loc: Any, lc: Any, coll: _Collector, publishing: bool, timeout: float,
           published: int) -> None:
    """Wait for the frames in flight, then for the loop-closure node to finish the matches it got."""
    graph.wait_for(lambda: loc.frames_in >= published, min(timeout, TRANSIT_GRACE_S))
    graph.wait_for(lambda: _finished(loc) >= loc.frames_in, timeout)
    if publishing:
        graph.wait_for(lambda: len(coll.order) >= loc.frames_ok - loc.publish_failed, timeout)
    if lc is not None:
        graph.wait_for(lambda: lc.matches_done >= lc.matches_in and not lc._pending, timeout)
        graph.wait_for(lambda: len(coll.closures) >= lc.closures_published, 5.0)


# --------------------------------------------------------------------------- scoring


def _score(cfg: ReplayConfig, published: list[int], coll: _Collector, entries: list[Any],
           params: dict[str, dict[str, Any]]) -> ReplayScore:
    """The collected messages as plain data, with the ground truth ``cfg`` names, scored by
    :func:`~vpr_ros.eval.replay.score_replay`."""
    entry_ids = [int(e.id) for e in entries]
    if cfg.gt_matrix is not None:
        gt = load_loop_matrix(cfg.gt_matrix, len(published))
        positives = loop_matrix_positives(gt, published, entry_ids, [float(e.stamp) for e in entries])
        gt_kind = f"loop matrix {cfg.gt_matrix}"
    else:
        pos_topic = cfg.position_topic
        if not pos_topic:
            pos = [t for t, ty in bag_topics(cfg.bag).items() if ty.endswith(("Odometry", "NavSatFix"))]
            if len(pos) != 1:
                raise DatasetError(f"{cfg.bag}: distance ground truth needs one position topic (found "
                                   f"{pos}); pass --position-topic, or --gt-matrix")
            pos_topic = pos[0]
        if all(e.position is None for e in entries):
            raise DatasetError(f"map {cfg.map_path} has no entry poses: build it with `vpr-ros replay --mode "
                               "map` from a bag with odometry, or score with --gt-matrix")
        entry_xy = np.array([e.position[:2] if e.position is not None else (np.nan, np.nan) for e in entries],
                            dtype=np.float64)
        ps, pxy = read_positions(cfg.bag, pos_topic)
        positives = distance_positives(nearest_positions(published, ps, pxy, cfg.max_position_gap_s),
                                       entry_ids, entry_xy, cfg.radius)
        gt_kind = f"distance <= {cfg.radius:g} m ({pos_topic})"
    window = None  # SLAM runs: a frame's own recent keyframes are no revisit
    if cfg.mode == "both":
        window = float(params.get("loop_closure", {}).get("exclusion_window_s", DEFAULT_EXCLUSION_WINDOW_S))
    answers = {stamp: [Candidate(int(c.entry_id), float(c.score), to_seconds(c.stamp)) for c in msg.matches]
               for stamp, msg in coll.matches.items()}
    closures = ([Closure(to_ns(c.query_stamp), int(c.match_id), bool(c.verified)) for c in coll.closures]
                if cfg.loop_closure else None)
    return score_replay(published, answers, positives, top_k=cfg.top_k,
                        entry_stamps={int(e.id): float(e.stamp) for e in entries}, revisit_window_s=window,
                        closures=closures, ground_truth=gt_kind)

if __name__ == "__main__":
    raise SystemExit("moved: use `vpr-ros replay ...` (or make-bag, loop-eval)")
