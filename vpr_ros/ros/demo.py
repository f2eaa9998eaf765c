"""The ROS part of ``vpr-ros demo``: a place set's query frames through a real in-process ROS 2 graph.

camera (this module, real ``sensor_msgs/Image`` messages) -> transmitter node -> localizer node
-> ``PlaceMatch`` back here, against a map of the set's database images. Two runs over the same query
frames: the link at full quality (``mode: none``), then at JPEG q=10 (a runtime parameter change of the
transmitter). Recall@1/5
through the graph and the end-to-end latency are compared with the offline pipeline on the same
frames (same model, same map, same degradation): the graph must give the same matches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, qos_profile_sensor_data
from sensor_msgs.msg import Image
from std_msgs.msg import Header
from vpr_ros_msgs.msg import PlaceMatch, TransmissionStats

from vpr_ros.core.extract import DescriptorExtractor
from vpr_ros.core.fileio import atomic_write_text
from vpr_ros.core.localizer import build_extractor
from vpr_ros.core.mapdb import PlaceMap, map_path
from vpr_ros.core.transmission import TransmissionConfig, Transmitter
from vpr_ros.data.places import PlaceDataset
from vpr_ros.eval.metrics import recall_at_n
from vpr_ros.eval.offline import map_from_records
from vpr_ros.ros import graph as node_graph
from vpr_ros.ros.conversions import float_to_stamp, rgb_to_image_msg
from vpr_ros.ros.runner import InProcessGraph

__all__ = ["run_graph_demo"]

K = 5


@dataclass
class _Run:
    """One pass of the query frames through the graph and offline."""

    label: str
    config: TransmissionConfig
    graph_ids: np.ndarray = field(default_factory=lambda: np.empty((0, K), np.int64))
    offline_ids: np.ndarray = field(default_factory=lambda: np.empty((0, K), np.int64))
    e2e_ms: list[float] = field(default_factory=list)
    node_ms: list[float] = field(default_factory=list)
    bytes_per_frame: float = 0.0
    received: int = 0
    degradation: str = ""


def _size_arg(input_size: str | tuple | None) -> str | tuple | None:
    return "" if input_size is None else input_size


def _database_map(ext: DescriptorExtractor, label: str, ds: PlaceDataset,
                  cache: Path) -> tuple[PlaceMap, np.ndarray]:
    """Load the cached map of the database images when it matches this model, else build and save it.

    Returns the map and, per map id, the database record index (from the entries' source paths).
    """
    place_map = None
    if map_path(cache).exists():
        try:
            place_map = PlaceMap.load(cache, expected_dim=ext.dim, expected_model=label)
            print(f"  reusing map {map_path(cache)} ({len(place_map)} places)")
        except Exception as exc:  # stale cache: rebuild it
            print(f"  rebuilding map ({exc})")
            place_map = None
    if place_map is None:
        place_map, _, _ = map_from_records(ext, ds.database, model=label, progress=False)
        path = place_map.save(cache)
        print(f"  built map {path} ({len(place_map)} places)")
    index = {str(r.path): i for i, r in enumerate(ds.database)}
    db_of_id = np.full(place_map.next_id, -1, np.int64)
    for entry in place_map.entries():
        db_of_id[entry.id] = index.get(entry.source, -1)
    return place_map, db_of_id


def _offline(ext: DescriptorExtractor, place_map: PlaceMap, frames: Sequence[np.ndarray],
             config: TransmissionConfig) -> np.ndarray:
    """Top-K map ids of each frame sent through the link and described offline."""
    tx = Transmitter(config)
    received = [tx.process(f).image for f in frames]
    _, ids = place_map.search(ext(received), K)
    return ids


def _recall(ids: np.ndarray, db_of_id: np.ndarray, positives: list[np.ndarray]) -> dict[int, float]:
    preds = np.where(ids >= 0, db_of_id[np.clip(ids, 0, None)], -1)
    r = recall_at_n(preds, positives, ns=(1, 5))
    return {1: float(r[1]), 5: float(r[5])}


def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def _plot(runs: list[_Run], recalls: dict[str, dict[str, dict[int, float]]], path: Path) -> Path:

    fig = Figure(figsize=(10.0, 4.0), dpi=110)
    ax1, ax2 = fig.subplots(1, 2)
    hi = max((max(r.e2e_ms) for r in runs if r.e2e_ms), default=1.0)
    bins = np.linspace(0.0, hi * 1.05, 30)
    for r in runs:
        ax1.hist(r.e2e_ms, bins=bins, alpha=0.55, label=f"{r.label} (p50 {_pct(r.e2e_ms, 50):.0f} ms, "
                                                          f"p95 {_pct(r.e2e_ms, 95):.0f} ms)")
    ax1.set_xlabel("end-to-end latency: camera publish -> PlaceMatch received (ms)")
    ax1.set_ylabel("frames")
    ax1.legend(fontsize="small")
    ax1.set_title("Latency through the ROS graph")
    x = np.arange(len(runs))
    width = 0.2
    for j, (n, where) in enumerate(((1, "graph"), (1, "offline"), (5, "graph"), (5, "offline"))):
        vals = [100 * recalls[r.label][where][n] for r in runs]
        ax2.bar(x + (j - 1.5) * width, vals, width, label=f"R@{n} {where}")
    ax2.set_xticks(x, [r.label for r in runs])
    ax2.set_ylabel("recall (%)")
    ax2.set_ylim(0, 100)
    ax2.legend(fontsize="small")
    ax2.set_title("Recall: graph vs offline")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=fig.dpi)
    return path


def _graph_runs(ext: DescriptorExtractor, label: str, map_dir: Path, frames: list[np.ndarray],
                runs: list[_Run], rate_hz: float) -> None:
    """Send ``frames`` through transmitter + localizer once per run; fill graph ids and latencies."""


    ns = f"/vpr_demo_{uuid.uuid4().hex[:8]}"
    params = node_graph.wire({  # camera -> transmitter -> localizer, wired as the launch file does
        "transmitter": {"output_topic": f"{ns}/link/image", "stats_topic": f"{ns}/link/stats",
                        "queue_size": 100, **_tx_params(runs[0].config)},
        "localizer": {"image_topic": f"{ns}/camera/image_raw", "match_topic": f"{ns}/place_match",
                      "map_path": str(map_dir), "queue_size": 200, "max_batch": 16, "top_k": K},
    }, use_transmitter=True)
    with InProcessGraph() as graph:
        tx = graph.add_graph_nodes(params, node_graph.active_nodes(use_transmitter=True),
                                   extra={"localizer": {"extractor": ext, "label": label}})["transmitter"]
        probe = graph.add(graph.node("demo_camera"))
        matches: dict[int, tuple[Any, float]] = {}
        stats: dict[int, int] = {}

        def on_match(m: Any) -> None:
            matches[m.header.stamp.sec] = (m, time.monotonic())

        probe.create_subscription(PlaceMatch, f"{ns}/place_match", on_match, QoSProfile(depth=1000))
        probe.create_subscription(TransmissionStats, f"{ns}/link/stats",
                                  lambda m: stats.__setitem__(m.header.stamp.sec, m.frame_bytes),
                                  QoSProfile(depth=1000))
        pub = probe.create_publisher(Image, f"{ns}/camera/image_raw", qos_profile_sensor_data)
        topics = [f"{ns}/{t}" for t in ("camera/image_raw", "link/image", "link/stats", "place_match")]
        # matched, not only discovered: a sample sent before DDS matches both ends is lost
        if not graph.wait_for(lambda: all(graph.topic_matched(t) for t in topics), 60.0):
            raise RuntimeError("the demo graph did not connect within 60 s")
        period = 1.0 / rate_hz
        for r_i, run in enumerate(runs):
            if r_i:
                res = tx.set_parameters([graph_param(k, v) for k, v in _tx_params(run.config).items()])
                if not all(x.successful for x in res):
                    raise RuntimeError(f"transmitter refused {run.label}: {[x.reason for x in res]}")
            base = 1000 * (r_i + 1)  # stamp seconds of this run's frames
            sent_at: dict[int, float] = {}
            start = tx.frames_in
            t_next = time.monotonic()
            for i, frame in enumerate(frames):
                # flow control: best-effort QoS keeps few samples
                if not graph.wait_for(lambda i=i, s=start: i - (tx.frames_in - s) < 3, 30.0, interval=0.001):
                    raise RuntimeError(f"the transmitter took {tx.frames_in - start} of {i} frames in 30 s")
                t_next = max(t_next + period, time.monotonic()) if i else time.monotonic()
                time.sleep(max(0.0, t_next - time.monotonic()))
                msg = rgb_to_image_msg(frame, "rgb8", Header(stamp=float_to_stamp(base + i),
                                                              frame_id="camera"))
                sent_at[base + i] = time.monotonic()
                pub.publish(msg)
            graph.wait_for(lambda b=base: all(b + i in matches for i in range(len(frames))), 60.0)
            ids = np.full((len(frames), K), -1, np.int64)
            for i in range(len(frames)):
                got = matches.get(base + i)
                if got is None:
                    continue
                m, t_recv = got
                run.received += 1
                run.degradation = m.degradation
                for j, c in enumerate(m.matches[:K]):
                    ids[i, j] = c.entry_id
                run.e2e_ms.append((t_recv - sent_at[base + i]) * 1000.0)
                run.node_ms.append(float(m.latency_ms))
            run.graph_ids = ids
            sizes = [stats[base + i] for i in range(len(frames)) if base + i in stats]
            run.bytes_per_frame = float(np.mean(sizes)) if sizes else float("nan")


def graph_param(name: str, value: Any) -> Any:

    return Parameter(name, value=value)


def _tx_params(config: TransmissionConfig) -> dict[str, Any]:
    d = config.to_dict()
    return {k: d[k] for k in ("mode", "jpeg_quality", "scale", "upscale", "qp")}


def run_graph_demo(*, dataset: PlaceDataset, out_dir: str | os.PathLike, weights: str | None = None,
                   input_size: str | tuple | None = "128x256", max_frames: int = 80, rate_hz: float = 10.0,
                   quality: int = 10, backend: str = "auto", precision: str = "fp32",
                   threads: int = 0) -> dict[str, Path]:
    """Recall@1/5 and latency through the ROS graph at full quality and at JPEG ``quality``.

    The map holds ``dataset``'s database images; its queries, thinned to at most ``max_frames`` (every
    k-th), are the camera frames, so the run stays near a minute on two CPU cores. Writes
    ``graph_demo.json`` and ``graph_demo.png`` (latency histogram, recall graph vs offline) under
    ``out_dir``. ``backend`` / ``precision`` / ``threads``: how the model runs (the localizer's parameters).
    """

    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not os.environ.get("HOME") and not os.environ.get("ROS_LOG_DIR"):
        os.environ["ROS_LOG_DIR"] = str(out / "ros_log")
    t_start = time.perf_counter()
    step = max(1, math.ceil(len(dataset.queries) / max(1, max_frames)))
    ds = dataclasses.replace(dataset, queries=dataset.queries[::step])
    print("\nROS graph demo: camera -> transmitter -> localizer -> PlaceMatch "
          f"({ds.name}: {len(ds.database)} map images, {len(ds.queries)} query frames)")
    ext, label = build_extractor(weights or "default", "", _size_arg(input_size), "auto", 16, backend=backend,
                                 precision=precision, threads=threads)
    size = ext.preprocess.input_size
    size_tag = "native" if size is None else f"{size[0]}x{size[1]}"
    print(f"  model {label} ({ext.dim}-d) on {ext.device}, backend {backend} {precision}, input {size_tag}")
    ident = hashlib.sha1("\n".join(str(r.path) for r in ds.database).encode()).hexdigest()[:8]
    cache = out / f"{ds.name}_{len(ds.database)}_{ident}_{label.replace('@', '_')}_{size_tag}"
    place_map, db_of_id = _database_map(ext, label, ds, cache)
    frames = [r.load() for r in ds.queries]
    positives = ds.positives()
    runs = [_Run("full quality", TransmissionConfig(mode="none")),
            _Run(f"JPEG q={quality}", TransmissionConfig(mode="jpeg", jpeg_quality=quality))]
    for run in runs:
        run.offline_ids = _offline(ext, place_map, frames, run.config)
    t_graph = time.perf_counter()
    _graph_runs(ext, label, map_path(cache), frames, runs, rate_hz)
    graph_s = time.perf_counter() - t_graph

    recalls: dict[str, dict[str, dict[int, float]]] = {}
    summary: list[dict[str, Any]] = []
    print(f"\n  {'link':14s} {'bytes/frame':>11s} {'R@1 graph':>9s} {'R@1 off':>8s} {'R@5 graph':>9s} "
          f"{'R@5 off':>8s} {'same top-1':>10s} {'same top-5':>10s} {'e2e p50/p95 ms':>15s}")
    for run in runs:
        rec = {"graph": _recall(run.graph_ids, db_of_id, positives),
               "offline": _recall(run.offline_ids, db_of_id, positives)}
        recalls[run.label] = rec
        same1 = int((run.graph_ids[:, 0] == run.offline_ids[:, 0]).sum())
        same5 = int((run.graph_ids == run.offline_ids).all(axis=1).sum())
        n = len(frames)
        g, o = rec["graph"], rec["offline"]
        print(f"  {run.label:14s} {run.bytes_per_frame:11.0f} {100 * g[1]:8.1f}% {100 * o[1]:7.1f}% "
              f"{100 * g[5]:8.1f}% {100 * o[5]:7.1f}% {same1:>5d}/{n:<4d} {same5:>5d}/{n:<4d} "
              f"{_pct(run.e2e_ms, 50):7.0f}/{_pct(run.e2e_ms, 95):.0f}")
        summary.append({
            "link": run.label, "transmission": run.config.label, "degradation_label": run.degradation,
            "frames": n, "place_matches_received": run.received, "bytes_per_frame": run.bytes_per_frame,
            "recall_graph": rec["graph"], "recall_offline": rec["offline"],
            "same_top1": same1, "same_top5": same5,
            "latency_e2e_ms": {"p50": _pct(run.e2e_ms, 50), "p95": _pct(run.e2e_ms, 95)},
            "latency_node_ms": {"p50": _pct(run.node_ms, 50), "p95": _pct(run.node_ms, 95)},
        })
    agree = all(s["same_top1"] == s["frames"] == s["place_matches_received"] for s in summary)
    verdict = ("graph and offline agree: same top-1 place for every frame" if agree
               else "WARNING: the graph and the offline evaluation disagree on some frames (see JSON)")
    print(f"  {verdict}")
    result = {
        "dataset": ds.name, "query_every": step, "database": len(ds.database), "queries": len(frames),
        "model": label, "input_size": size_tag, "device": str(ext.device), "backend": backend,
        "rate_hz": rate_hz,
        "runs": summary, "agree": agree, "graph_seconds": graph_s,
        "total_seconds": time.perf_counter() - t_start,
    }
    paths = {"ros_graph_json": out / "graph_demo.json"}
    atomic_write_text(paths["ros_graph_json"], json.dumps(result, indent=2) + "\n")
    paths["ros_graph_plot"] = _plot(runs, recalls, out / "graph_demo.png")
    print(f"  graph part took {result['total_seconds']:.0f} s")
    return paths
