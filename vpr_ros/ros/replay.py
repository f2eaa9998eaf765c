"""Bag replay through the real nodes, dataset bags, and the loop-closure evaluation: ``vpr-ros`` subcommands.

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

``vpr-ros make-bag``: shared datasets -> rosbag2 (:mod:`vpr_ros.data.dataset_bags`). ``vpr-ros loop-eval``:
loop-closure precision-recall on ``rtabmap_loop`` (:func:`vpr_ros.eval.loop_closure.evaluate_loop_closure`).
"""

from __future__ import annotations

import argparse
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

from vpr_ros.core.errors import ConfigError, DatasetError, VprError
from vpr_ros.core.fileio import atomic_write_text, check_output_dir, display_path

log = logging.getLogger(__name__)

__all__ = ["ReplayConfig", "register", "run_replay"]

MATCH_TOPIC = "/vpr/place_match"
LOOP_TOPIC = "/vpr/loop_closure"
RECALL_NS = (1, 5, 10, 20)
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
    from vpr_ros.data.bags import COMPRESSED_TYPE, IMAGE_TYPE, NAVSAT_TYPE, ODOMETRY_TYPE

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
    from rclpy.serialization import serialize_message
    from rosbags.rosbag2 import StoragePlugin, Writer

    from vpr_ros.data.dataset_bags import vpr_typestore

    ts = vpr_typestore()
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3

    def ns(stamp: Any) -> int:
        return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)

    with Writer(path, version=9, storage_plugin=plugin) as writer:
        mc = writer.add_connection(MATCH_TOPIC, "vpr_ros_msgs/msg/PlaceMatch", typestore=ts)
        lc = writer.add_connection(LOOP_TOPIC, "vpr_ros_msgs/msg/LoopClosure", typestore=ts)
        rows = [(ns(m.header.stamp), 0, i, m) for i, m in enumerate(place_matches)]
        rows += [(ns(c.query_stamp), 1, i, c) for i, c in enumerate(closures)]
        for t_ns, kind, _, msg in sorted(rows, key=lambda r: r[:3]):
            writer.write(mc if kind == 0 else lc, t_ns, serialize_message(msg))
    return path


# --------------------------------------------------------------------------- replay


def _stamp_ns(stamp: Any) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


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
    from rclpy.serialization import deserialize_message

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
        self.matches[_stamp_ns(msg.header.stamp)] = msg
        self.order.append(msg)

    def on_closure(self, msg: Any) -> None:
        self.closures.append(msg)


def _node_params(cfg: ReplayConfig) -> dict[str, dict[str, Any]]:
    from vpr_ros.ros.runner import apply_sets, load_params_file

    params = load_params_file(cfg.params_file) if cfg.params_file else {}
    return apply_sets(params, cfg.sets)


def run_replay(cfg: ReplayConfig) -> dict[str, Any]:
    """Replay ``cfg.bag`` through the real nodes; write the report (and ``cfg.record``); return the report."""
    from rclpy.qos import QoSProfile, qos_profile_sensor_data

    from vpr_ros.data.bags import open_reader
    from vpr_ros.data.dataset_bags import vpr_typestore
    from vpr_ros.ros.localizer_node import LocalizerNode, build_extractor
    from vpr_ros.ros.runner import InProcessGraph, overrides_for

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
        from nav_msgs.msg import Odometry
        from sensor_msgs.msg import CompressedImage, Image, NavSatFix
        from vpr_ros_msgs.msg import LoopClosure, PlaceMatch

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
        lc_params = {"match_topic": f"{ns}{MATCH_TOPIC}", "image_topic": loc_params["image_topic"],
                     "image_transport": loc_params["image_transport"],
                     "loop_closure_topic": f"{ns}{LOOP_TOPIC}", "diagnostics_period_s": 0.0}
        coll = _Collector()
        published: list[int] = []  # image stamps (ns) in bag order
        t_start = time.perf_counter()
        with InProcessGraph() as graph:
            from rclpy.parameter import Parameter

            loc_over = {p.name: p.value for p in overrides_for("localizer", params)}
            loc_over.update(loc_params)
            loc = graph.add(LocalizerNode("localizer", context=graph.context, extractor=ext, label=label,
                                          parameter_overrides=[Parameter(k, value=v)
                                                               for k, v in loc_over.items()]))
            lc = None
            if cfg.loop_closure:
                from vpr_ros.ros.loop_closure_node import LoopClosureNode

                lc_over = {p.name: p.value for p in overrides_for("loop_closure", params)}
                lc_over.update(lc_params)
                lc = graph.add(LoopClosureNode("loop_closure", context=graph.context,
                                               parameter_overrides=[Parameter(k, value=v)
                                                                    for k, v in lc_over.items()]))
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
                published.append(_stamp_ns(msg.header.stamp))
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
    if publishing and coll.order:
        report.update(_score(cfg, published, coll, entries, params))
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report.update(_plots(report, out, label))
    if cfg.record is not None:
        write_record(cfg.record, coll.order, coll.closures)
        report["record"] = str(cfg.record)
    from vpr_ros.eval.metrics import json_default

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
           params: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from vpr_ros.core.loop_closure import DEFAULT_EXCLUSION_WINDOW_S
    from vpr_ros.data.dataset_bags import read_positions
    from vpr_ros.eval.metrics import EvalResult, precision_recall, recall_at_n

    window = 0.0
    if cfg.mode == "both":
        window = float(params.get("loop_closure", {}).get("exclusion_window_s", DEFAULT_EXCLUSION_WINDOW_S))
    frame_stamps = np.asarray(published, dtype=np.int64)
    entry_ids = np.array([e.id for e in entries], dtype=np.int64)
    entry_stamps = np.array([e.stamp for e in entries], dtype=np.float64)
    if cfg.gt_matrix is not None:
        gt = np.loadtxt(cfg.gt_matrix, dtype=np.float64).astype(bool)
        if gt.shape != (len(published), len(published)):
            raise DatasetError(f"{cfg.gt_matrix}: {gt.shape} matrix, but the bag has {len(published)} frames")
        gt = gt | gt.T
        # map entries -> bag frames by stamp (entries are the bag's own keyframes in SLAM runs)
        j = np.clip(np.searchsorted(frame_stamps, np.round(entry_stamps * 1e9).astype(np.int64)), 0,
                    len(published) - 1)
        entry_frame = np.full(len(entries), -1, dtype=np.int64)
        for e, (jj, s) in enumerate(zip(j, entry_stamps * 1e9, strict=True)):
            near = [k for k in (jj - 1, jj) if 0 <= k < len(published)]
            k = min(near, key=lambda k, s=s: abs(frame_stamps[k] - s))
            if abs(frame_stamps[k] - s) < 1e6:  # within 1 ms
                entry_frame[e] = k
        gt_kind = f"loop matrix {cfg.gt_matrix}"

        def positive(qi: int, qpos: Any) -> np.ndarray:
            ok = (entry_frame >= 0) & gt[qi, np.clip(entry_frame, 0, None)]
            return entry_ids[ok]
        qpos_all: list[Any] = [None] * len(published)
    else:
        pos_topic = report_topic = cfg.position_topic
        if not pos_topic:
            from vpr_ros.data.bags import bag_topics

            pos = [t for t, ty in bag_topics(cfg.bag).items() if ty.endswith(("Odometry", "NavSatFix"))]
            if len(pos) != 1:
                raise DatasetError(f"{cfg.bag}: distance ground truth needs one position topic (found "
                                   f"{pos}); pass --position-topic, or --gt-matrix")
            pos_topic = report_topic = pos[0]
        if not _has_position(entries):
            raise DatasetError(f"map {cfg.map_path} has no entry poses: build it with `vpr-ros replay --mode "
                               "map` from a bag with odometry, or score with --gt-matrix")
        ps, pxy = read_positions(cfg.bag, pos_topic)
        epos = np.array([e.position[:2] if e.position is not None else (np.nan, np.nan) for e in entries])
        qpos_all = []
        for s in frame_stamps * 1e-9:
            k = int(np.searchsorted(ps, s))
            cand = [c for c in (k - 1, k) if 0 <= c < len(ps)]
            best = min(cand, key=lambda c: abs(ps[c] - s))
            qpos_all.append(pxy[best] if abs(ps[best] - s) <= cfg.max_position_gap_s else None)
        gt_kind = f"distance <= {cfg.radius:g} m ({report_topic})"

        def positive(qi: int, qpos: Any) -> np.ndarray:
            if qpos is None:
                return np.empty(0, dtype=np.int64)
            d = np.linalg.norm(epos - qpos, axis=1)
            return entry_ids[np.nan_to_num(d, nan=np.inf) <= cfg.radius]

    k = cfg.top_k
    preds, positives, top_scores, top_ok = [], [], [], []
    n_pos_queries = 0
    by_id = {int(i): float(s) for i, s in zip(entry_ids, entry_stamps, strict=True)}
    frame_of = {int(s): i for i, s in enumerate(published)}
    for qi, s_ns in enumerate(published):
        msg = coll.matches.get(int(s_ns))
        t_q = s_ns * 1e-9
        pos = positive(qi, qpos_all[qi])
        if cfg.mode == "both":  # only entries old enough to count as a revisit
            pos = np.array([e for e in pos if by_id[int(e)] < t_q - window], dtype=np.int64)
        cands = []
        if msg is not None:
            cands = [(int(c.entry_id), float(c.score)) for c in msg.matches
                     if not (cfg.mode == "both" and stamp_s(c.stamp) >= t_q - window)]
        row = [c[0] for c in cands[:k]] + [-1] * (k - len(cands[:k]))
        preds.append(row)
        positives.append(pos)
        n_pos_queries += bool(len(pos))
        if cands:
            top_scores.append(cands[0][1])
            top_ok.append(cands[0][0] in set(pos.tolist()))
    out: dict[str, Any] = {"ground_truth": gt_kind, "exclusion_window_s": window,
                           "queries_with_positive": n_pos_queries}
    if n_pos_queries == 0:
        out["recall"] = None
        out["note"] = "no query has a positive map entry under this ground truth"
        return out
    ns = tuple(n for n in RECALL_NS if n <= k) or (1,)
    rec = recall_at_n(np.asarray(preds, dtype=np.int64), positives, ns)
    out["recall"] = {str(n): float(v) for n, v in rec.items()}  # string keys, as in report.json
    out["_eval"] = EvalResult.from_recall(Path(cfg.bag).name, "", "", rec)
    if top_scores:
        n_pr = max(n_pos_queries, int(np.sum(top_ok)), 1)
        pr = precision_recall(np.asarray(top_scores), np.asarray(top_ok), n_positives=n_pr)
        out["top1_pr"] = {"average_precision": pr.average_precision,
                          "recall_at_100_precision": pr.recall_at_100_precision, "best_f1": pr.best_f1,
                          "best_f1_threshold": pr.best_f1_threshold}
        out["_pr"] = pr
    if coll.closures:
        pos_sets = {qi: set(p.tolist()) for qi, p in enumerate(positives)}
        correct, hit = 0, set()
        wrong_pairs = []
        for c in coll.closures:
            qi = frame_of.get(_stamp_ns(c.query_stamp))
            ok = qi is not None and int(c.match_id) in pos_sets.get(qi, set())
            correct += ok
            if ok:
                hit.add(qi)
            else:
                wrong_pairs.append([qi, int(c.match_id)])
        out["loop_closures"] = {"published": len(coll.closures), "correct": correct,
                                "precision": correct / len(coll.closures), "recall": len(hit) / n_pos_queries,
                                "verified": sum(bool(c.verified) for c in coll.closures),
                                "wrong_pairs_frame_entry": wrong_pairs[:20]}
    elif cfg.loop_closure:
        out["loop_closures"] = {"published": 0, "correct": 0, "precision": None, "recall": 0.0}
    return out


def stamp_s(stamp: Any) -> float:
    return float(stamp.sec) + float(stamp.nanosec) * 1e-9


def _has_position(entries: list[Any]) -> bool:
    return any(e.position is not None for e in entries)


def _plots(report: dict[str, Any], out: Path, label: str) -> dict[str, Any]:
    from vpr_ros.eval.plots import plot_pr_curves, plot_recall_curves

    paths: dict[str, Any] = {}
    ev = report.pop("_eval", None)
    pr = report.pop("_pr", None)
    if ev is not None:
        ev.model = label
        paths["recall_plot"] = str(plot_recall_curves([ev], out / "recall_at_n.png",
                                                      title=f"Replay recall@N ({report['ground_truth']})"))
    if pr is not None:
        paths["pr_plot"] = str(plot_pr_curves({f"top-1 {label}": pr}, out / "pr.png",
                                              title="Replay top-1 precision-recall"))
    return paths


# --------------------------------------------------------------------------- CLI


def cmd_make_bag(args: argparse.Namespace) -> int:
    from vpr_ros.data.dataset_bags import make_dataset_bag

    info = make_dataset_bag(args.dataset, args.root, args.out, storage=args.storage,
                            compressed=args.compressed, jpeg_quality=args.jpeg_quality,
                            image_topic=args.image_topic,
                            position_topic=args.position_topic, sequence=args.sequence, season=args.season,
                            every=args.every, limit=args.limit, rate_hz=args.rate_hz)
    where = f", positions on {info['position_topic']}" if info["position_topic"] else ", no positions"
    print(f"bag {display_path(info['bag'])} ({info['storage']}): {info['frames']} {info['dataset']} "
          f"frames on {info['image_topic']} ({info['image_type']}) at {info['rate_hz']:g} Hz, "
          f"{info['duration_s']:.1f} s{where}")
    if info["dropped"]:  # Nordland's filters: say which frames are not in the bag and why
        kinds: dict[str, int] = {}
        for _, reason in info["dropped"]:
            kinds[reason.split(":")[0]] = kinds.get(reason.split(":")[0], 0) + 1
        path, reason = info["dropped"][0]
        print(f"{len(info['dropped'])} selected frames left out ("
              f"{', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}; the first, {display_path(path)}: "
              f"{reason})")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    cfg = ReplayConfig(
        bag=Path(args.bag), map_path=Path(args.map), out_dir=Path(args.out), image_topic=args.image_topic,
        position_topic=args.position_topic, rate=args.rate, fast=args.fast,
        record=Path(args.record) if args.record else None, mode=args.mode, loop_closure=args.loop_closure,
        gt_matrix=Path(args.gt_matrix) if args.gt_matrix else None, radius=args.radius, top_k=args.top_k,
        weights=args.weights, model=args.model or "", input_size=args.input_size or "", device=args.device,
        params_file=Path(args.params) if args.params else None, sets=list(args.set or []),
        namespace=args.namespace, timeout_s=args.timeout)
    r = run_replay(cfg)
    print(f"replayed {r['frames_published']} frames ({r['pace']}) in {r['wall_s']:.1f} s: "
          f"{r['place_matches']} PlaceMatch, map {r['map_size']} places")
    if r.get("latency_ms"):
        print(f"latency p50 {r['latency_ms']['p50']:.1f} ms, p95 {r['latency_ms']['p95']:.1f} ms")
    if r.get("recall"):
        rec = ", ".join(f"R@{n} {100 * v:.1f}%" for n, v in r["recall"].items())
        print(f"recall ({r['ground_truth']}): {rec}")
    if r.get("loop_closures"):
        lc = r["loop_closures"]
        prec = "-" if lc["precision"] is None else f"{lc['precision']:.3f}"
        print(f"loop closures: {lc['published']} published, precision {prec}, recall {lc['recall']:.3f}")
    print(f"report {display_path(r['report'])}" + (f", recorded {display_path(r['record'])}"
                                                   if r.get("record") else ""))
    failure = replay_failure(r)
    if failure:
        raise VprError(f"{failure}; report {display_path(r['report'])}")
    return 0


def cmd_loop_eval(args: argparse.Namespace) -> int:
    from vpr_ros.eval.loop_closure import evaluate_loop_closure

    models = None
    if args.weights:
        models = [("structvpr_imagenet", None)] + [(Path(w).stem, w) for w in args.weights]
    r = evaluate_loop_closure(args.root, args.out, models=models, degradations=args.degrade or
                              ("none", "jpeg:10", "h264:40"), device=args.device)
    print(f"{'model':22s} {'link':12s} {'bytes':>8s} {'AP':>6s} {'R@P1':>6s} {'AP ver':>6s} {'R@P1 ver':>8s}")
    for name, m in r["models"].items():
        for cond, c in m["conditions"].items():
            key = f"top{r['defaults_in_code']['top_k']}_min{r['defaults_in_code']['min_inliers']}"
            ver = c["verified"].get(key) or next(iter(c["verified"].values()), {})
            base = c["descriptor_only"]
            print(f"{name:22s} {cond:12s} {c['bytes_per_frame']:8.0f} {base['average_precision']:6.3f} "
                  f"{base['recall_at_100_precision']:6.3f} {ver.get('average_precision', 0):6.3f} "
                  f"{ver.get('recall_at_100_precision', 0):8.3f}")
        op = m["operating_point"]
        per = ", ".join(f"{k} P {v['precision']:.2f} R {v['recall']:.2f}"
                        for k, v in op["per_condition"].items())
        print(f"  operating point: top_k {op['top_k']}, min_inliers {op['min_inliers']}, "
              f"score_threshold {op['score_threshold']:.4f} -> {per}")
    s = r["shipped"]
    print(f"\nshipped ({s['model']}): exclusion_window_s {s['exclusion_window_s']:g}, score_threshold "
          f"{s['score_threshold']:.4f}, top_k {s['top_k']}, geometric_verification true, min_inliers "
          f"{s['min_inliers']}\nreport {r['json']}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``make-bag``, ``replay`` and ``loop-eval`` to ``vpr-ros``."""
    from vpr_ros.data.dataset_bags import BAG_DATASETS

    p = sub.add_parser("make-bag", help="write a shared dataset as a rosbag2 bag (images + Odometry)")
    p.add_argument("--dataset", required=True, choices=BAG_DATASETS)
    p.add_argument("--root", required=True, type=Path, help="dataset folder (../shared/data/<name>)")
    p.add_argument("--out", required=True, type=Path, help="new bag folder (e.g. kitti00.mcap)")
    p.add_argument("--storage", default="mcap", choices=["mcap", "sqlite3"])
    p.add_argument("--compressed", action="store_true", help="JPEG CompressedImage on <topic>/compressed")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--image-topic", default="/camera/image_raw")
    p.add_argument("--position-topic", default="/odom", help="nav_msgs/Odometry topic (kitti, nordland)")
    p.add_argument("--sequence", default="00", help="KITTI sequence")
    p.add_argument("--season", default="winter", choices=["summer", "winter"], help="Nordland season")
    p.add_argument("--every", type=int, default=1, help="every N-th frame (stamps keep the original timing)")
    p.add_argument("--limit", type=int, default=None, help="at most this many frames")
    p.add_argument("--rate-hz", type=float, default=None,
                   help="frame rate (default: kitti 10, nordland 0.1, rtabmap_loop 1)")
    p.set_defaults(func=cmd_make_bag)

    p = sub.add_parser("replay", help="replay a bag through the real localizer (+ loop closure), score it")
    p.add_argument("--bag", required=True)
    p.add_argument("--map", required=True, help="place map (.vprmap); --mode map/both create it when missing")
    p.add_argument("--image-topic", default=None, help="image topic of the bag (default: its only one)")
    p.add_argument("--position-topic", default=None, help="Odometry/NavSatFix topic (default: its only one)")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--rate", type=float, default=1.0, help="playback speed, x bag rate (default 1.0)")
    pace.add_argument("--fast", action="store_true", help="as fast as the nodes go (flow control)")
    p.add_argument("--record", default=None, help="record PlaceMatch / LoopClosure to this new bag")
    p.add_argument("--out", default="results/replay", help="folder for report.json and plots")
    p.add_argument("--mode", default="localize", choices=["localize", "map", "both"], help="localizer mode")
    p.add_argument("--loop-closure", action="store_true", help="run the loop-closure node too")
    p.add_argument("--gt-matrix", default=None, help="N x N 0/1 loop matrix over the bag's frames")
    p.add_argument("--radius", type=float, default=25.0, help="distance ground truth radius (m)")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--weights", default="default", help="default | imagenet | checkpoint.pt")
    p.add_argument("--model", default="")
    p.add_argument("--input-size", default="", help="HxW, 'native', or empty for the model's own")
    p.add_argument("--device", default="auto")
    p.add_argument("--params", default=None, help="ROS 2 params file (config/localize.yaml) for the nodes")
    p.add_argument("--set", action="append", metavar="NODE.PARAM=VALUE", help="override one node parameter")
    p.add_argument("--namespace", default=None, help="topic namespace (default: a private one per run)")
    p.add_argument("--timeout", type=float, default=30.0, help="wait for one frame's result (s, --fast)")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("loop-eval", help="loop-closure precision-recall on rtabmap_loop (clean, JPEG, H.264)")
    p.add_argument("--root", required=True, type=Path, help="the rtabmap_loop folder")
    p.add_argument("--out", default="results/loop", type=Path)
    p.add_argument("--weights", action="append", help="extra checkpoint(s) to evaluate besides ImageNet")
    p.add_argument("--degrade", action="append", help="link specs (default none, jpeg:10, h264:40)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_loop_eval)


def _main(argv: Sequence[str] | None = None) -> int:  # pragma: no cover - python -m vpr_ros.ros.replay
    parser = argparse.ArgumentParser(prog="vpr_ros.ros.replay")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    try:
        return int(args.func(args) or 0)
    except VprError as exc:
        print(f"vpr_ros.ros.replay {args.command}: error: {exc}")
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_main())
