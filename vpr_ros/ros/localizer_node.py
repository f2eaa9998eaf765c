"""Localizer node: describes camera frames with the VPR student and matches them against a place map.

Data path: the subscription callback stamps the receipt time and queues the message (bounded,
drop-oldest, counted); a worker thread takes up to ``max_batch`` queued frames, decodes them,
describes them in one forward pass and queries the :class:`~vpr_ros.core.mapdb.PlaceMap`, then
publishes one ``vpr_ros_msgs/PlaceMatch`` per frame (header = the image's; ``latency_ms`` from
receipt to publish). A slow model therefore never blocks the executor nor grows memory.

Modes: ``localize`` (query a saved map), ``map`` (add keyframes, no PlaceMatch), ``both``.
Keyframes are every ``keyframe_every``-th good frame, or any frame whose best score is below
``novelty_threshold``, with the pose of the odometry message (``odom_topic``) nearest in time
within ``odom_tolerance_s``. The map is saved atomically by the ``~/save_map`` service and on
shutdown.

Bad input (unsupported encoding, step/size mismatch, empty, corrupt compressed data, NaN float
images, frames over ``max_pixels``) is rejected, logged throttled with the reason and counted
on ``/diagnostics``. A stamp earlier than the previous frame's is counted as ``out_of_order``
and the frame is still localised (the result carries its own stamp) but never becomes a
keyframe, so map stamps stay monotonic (a bag restart keeps localising instead of going
silent). A frame repeating the previous frame's stamp (a resend) is counted as
``repeated_stamp``, answered again, and never becomes a second keyframe.

Speed: ``backend`` picks the inference backend (``auto``, the default: ``onnx`` on CPU, ``torch`` on
CUDA; ``torch`` eager channels_last, or ``onnx``: ONNX Runtime, 2-5x faster on CPU), ``precision``
fp32/fp16 (fp16 needs CUDA) or int8 (onnx on CPU, a calibrated export), ``threads`` the
backend's intra-op threads; the worker sets faiss to ``faiss_threads`` OpenMP threads (1 by
default: single-query search gains nothing from more, and OpenMP spin-waits collapse on busy
shared cores). ``main`` spins a ``SingleThreadedExecutor`` (callbacks only queue) with a
0.5 ms GIL switch interval (see :func:`vpr_ros.ros.node_kit.run_node`).

Sequence matching (``sequence_length`` > 0; :mod:`vpr_ros.core.sequence`, docs/sequence.md): each
frame's top ``sequence_candidates`` places go into a rolling buffer and a SeqSLAM-style line search
over the last ``sequence_length`` frames (velocities ``sequence_v_min``..``sequence_v_max`` map
places per step) gives the sequence match, published beside the single-frame one in the same
PlaceMatch (``sequence_*`` fields). Steps are frames, or with ``odom_topic`` and
``sequence_step_m`` > 0 the signed travelled distance divided by ``sequence_step_m`` (a frame
without odometry in ``odom_tolerance_s`` counts one step). Out-of-order and repeated-stamp frames
get no sequence result. Changing a ``sequence_*`` parameter at runtime empties the buffer.

Bad configuration (missing/corrupt map in localize mode, missing/corrupt weights, a map whose
descriptors came from other weights, input size or dimension, invalid parameters) raises
:class:`~vpr_ros.core.errors.ConfigError` / another ``VprError`` from the constructor:
``main`` prints the one-line reason and exits with status 2.
"""

from __future__ import annotations

import bisect
import collections
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import Point, Pose, Quaternion
from nav_msgs.msg import Odometry
from rclpy.node import Node
from rclpy.qos import QoSProfile, qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image

from vpr_ros.core.backends import BACKENDS, PRECISIONS
from vpr_ros.core.errors import ConfigError, MapError, ModelError, VprError
from vpr_ros.core.extract import DescriptorExtractor
from vpr_ros.core.fileio import confined_path, display_path
from vpr_ros.core.images import ImageRejected, decode_image_msg
from vpr_ros.core.mapdb import INDEX_KINDS, MapEntry, PlaceMap, QueryResult, map_path, set_search_threads
from vpr_ros.core.models import DEFAULT_WEIGHTS, parse_size, resolve_model
from vpr_ros.core.models.resolve import DEFAULT_MODEL, PACKAGED
from vpr_ros.core.provenance import descriptor_source, source_mismatch
from vpr_ros.core.sequence import SequenceConfig, SequenceMatcher, SequenceResult, signed_step
from vpr_ros.ros.conversions import float_to_stamp, stamp_to_float
from vpr_ros.ros.node_kit import (
    DropOldestQueue,
    LatencyWindow,
    ParamSpec,
    ReasonCounter,
    declare_params,
    publish_diagnostics,
    run_node,
    set_parameters_callback,
)

__all__ = ["MODES", "PARAMS", "LocalizerNode", "build_extractor", "check_map_model", "main", "map_warning",
           "model_label", "open_map"]

NODE_NAME = "localizer"
MODES = ("localize", "map", "both")

PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec("image_topic", "camera/image_raw", "camera topic (base name)", read_only=True),
    ParamSpec("image_transport", "raw", "raw: sensor_msgs/Image on image_topic; compressed: "
              "CompressedImage on <image_topic>/compressed", choices=("raw", "compressed"), read_only=True),
    ParamSpec("match_topic", "vpr/place_match", "vpr_ros_msgs/PlaceMatch output topic", read_only=True),
    ParamSpec("odom_topic", "", "nav_msgs/Odometry giving keyframe poses in map modes (empty: no poses)",
              read_only=True),
    ParamSpec("transmission_stats_topic", "", "TransmissionStats topic; its mode labels matches of the same "
              "stamp, or the link's latest mode until those stats arrive (empty: use the degradation "
              "parameter)", read_only=True),
    ParamSpec("weights", "default", "checkpoint path; 'default' = packaged student (ImageNet-initialised "
              "model when it is not built); 'general' / 'loqi' / 'structvpr' = a packaged student by name "
              "(vpr-ros models); 'imagenet' = ImageNet-initialised model", read_only=True),
    ParamSpec("model", "", "registered model name (empty: the checkpoint's, or structvpr_mobilenetv2)",
              read_only=True),
    ParamSpec("input_size", "", "preprocessing size HxW (e.g. 240x320), 'native', or empty for the model's",
              read_only=True),
    ParamSpec("device", "auto", "auto (CUDA when present), cpu, cuda or cuda:N", read_only=True),
    ParamSpec("backend", "auto", "inference backend: auto (onnx on CPU, torch on CUDA), torch (eager, "
              "channels_last) or onnx (ONNX Runtime, exported once and cached; fastest on CPU)",
              choices=BACKENDS, read_only=True),
    ParamSpec("precision", "fp32", "fp32, fp16 (CUDA only: torch half precision, onnx via TensorRT) or int8 "
              "(onnx on CPU, a calibrated export: bench/int8.py)",
              choices=PRECISIONS, read_only=True),
    ParamSpec("threads", 0, "intra-op threads of the backend (torch: process-wide; onnx: its session); "
              "0 = library default (all cores). torch wants 1 on cores shared with busy processes",
              low=0, high=256, read_only=True),
    ParamSpec("faiss_threads", 1, "OpenMP threads of the map search in the worker (0 = faiss default); "
              "1 suits single-frame queries", low=0, high=256, read_only=True),
    ParamSpec("map_path", "", "place map (.vprmap directory); required. Map modes start empty when missing",
              read_only=True),
    ParamSpec("mode", "localize", "localize (query only), map (add keyframes, no PlaceMatch) or both",
              choices=MODES, read_only=True),
    ParamSpec("index", "flat", "faiss index kind of a new map", choices=INDEX_KINDS, read_only=True),
    ParamSpec("top_k", 5, "candidates per PlaceMatch", low=1, high=100),
    ParamSpec("min_score", -1.0, "candidates scoring below this are left out (cosine similarity)",
              low=-1.0, high=1.0),
    ParamSpec("queue_size", 10, "frames waiting for the model; the oldest is dropped when full",
              low=1, high=1000, read_only=True),
    ParamSpec("max_batch", 8, "queued frames described together in one forward pass", low=1, high=256),
    ParamSpec("keyframe_every", 1, "map modes: every N-th good frame becomes a keyframe (0: novelty only)",
              low=0, high=1_000_000),
    ParamSpec("novelty_threshold", -1.0, "map modes: a frame whose best score is below this becomes a "
              "keyframe (-1: off)", low=-1.0, high=1.0),
    ParamSpec("odom_tolerance_s", 0.05, "largest |odometry stamp - image stamp| for a keyframe pose (s)",
              low=0.0, high=60.0),
    ParamSpec("require_pose", False,
              "map modes with odom_topic: skip keyframes without odometry in tolerance"),
    ParamSpec("save_on_shutdown", True, "map modes: save the map to map_path when the node stops"),
    ParamSpec("source", "", "source label of new keyframes (empty: the image topic)"),
    ParamSpec("degradation", "", "PlaceMatch.degradation when no TransmissionStats labels the frame"),
    ParamSpec("max_pixels", 4096 * 4096, "larger frames are rejected", low=1, high=8192 * 8192),
    ParamSpec("diagnostics_period_s", 1.0, "period of /diagnostics messages (0 = none)", low=0.0,
              high=3600.0, read_only=True),
    ParamSpec("log_throttle_s", 5.0, "a rejected-frame reason is logged at most once per this many seconds",
              low=0.0, high=3600.0),
    ParamSpec("sequence_length", 0, "frames pooled by sequence matching (SeqSLAM-style; "
              "PlaceMatch.sequence_*); 0 = off", low=0, high=1000),
    ParamSpec("sequence_v_min", 0.8, "slowest sequence velocity, map places per step (0 or negative: stops "
              "or reversing)", low=-10.0, high=10.0),
    ParamSpec("sequence_v_max", 1.25, "fastest sequence velocity, map places per step (>= sequence_v_min)",
              low=-10.0, high=10.0),
    ParamSpec("sequence_reverse", False, "also search backwards lines (velocities -v_max..-v_min)"),
    ParamSpec("sequence_candidates", 50, "top-K places of each frame kept for sequence matching",
              low=1, high=1000),
    ParamSpec("sequence_min_score", -1000.0, "a best sequence score below this (z-score units) reports the "
              "single-frame result as the sequence result (-1000: never)", low=-1000.0, high=1000.0),
    ParamSpec("sequence_step_m", 0.0, "with odom_topic: map place spacing in metres; steps are then signed "
              "travelled distance / this (0: one step per frame)", low=0.0, high=1e6),
)

#: Parameters that configure the sequence matcher (a change empties its buffer).
SEQUENCE_PARAMS = tuple(p.name for p in PARAMS if p.name.startswith("sequence_"))


# --------------------------------------------------------------------------- model and map


def sequence_matcher(values: dict[str, Any]) -> SequenceMatcher | None:
    """The sequence matcher the ``sequence_*`` parameters describe (None when off); ConfigError if invalid."""
    if values["sequence_length"] <= 0:
        return None
    config = SequenceConfig(length=int(values["sequence_length"]), v_min=float(values["sequence_v_min"]),
                            v_max=float(values["sequence_v_max"]),
                            candidates=int(values["sequence_candidates"]),
                            min_score=float(values["sequence_min_score"]),
                            reverse=bool(values["sequence_reverse"]))
    return SequenceMatcher(config)


def model_label(weights: str, name: str) -> str:
    """The name stored in maps the node builds: ``<model>@<weights>`` (default, imagenet or file stem)."""
    if weights == "default":
        tag = "default" if DEFAULT_WEIGHTS.is_file() else "imagenet"
    elif weights == "imagenet":
        tag = "imagenet"
    else:
        tag = Path(weights).stem
    return f"{name}@{tag}"


def build_extractor(weights: str = "default", model: str = "", input_size: str | tuple | None = "",
                    device: str = "auto", batch_size: int = 8, *, backend: str = "auto",
                    precision: str = "fp32", threads: int = 0) -> tuple[DescriptorExtractor, str]:
    """Resolve the model as the node does; return the extractor and its :func:`model_label`.

    ``input_size``: "" keeps the model's, "native", "HxW", or an (H, W) tuple / None.
    ``backend`` / ``precision`` / ``threads`` (0 = the library's default) select how the model
    runs (:func:`vpr_ros.core.backends.make_backend`); the label does not depend on them.
    Raises :class:`ConfigError` / :class:`ModelError` with the reason.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; expected one of: {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; expected one of: {', '.join(PRECISIONS)}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ConfigError(f"threads must be an integer >= 0 (0 = library default), got {threads!r}")
    if isinstance(input_size, str):
        size = "keep" if not input_size.strip() else parse_size(input_size.strip())
    else:
        size = input_size
    weights = (weights or "default").strip()
    try:
        if weights == "default":
            net = resolve_model(None, model or None, input_size=size)
        elif weights == "imagenet":
            net = resolve_model(None, model or DEFAULT_MODEL, input_size=size)
        elif weights in PACKAGED:  # a packaged student by its card's key (vpr-ros models)
            net = resolve_model(weights, model or None, input_size=size)
        else:
            if not Path(weights).is_file():
                raise ModelError(f"weights file {weights} does not exist")
            net = resolve_model(weights, model or None, input_size=size)
    except VprError:
        raise
    except Exception as exc:  # torchvision download attempts offline, unreadable files, ...
        raise ModelError(f"cannot build the model (weights {weights!r}, model {model!r}): "
                         f"{type(exc).__name__}: {exc}") from None
    options = {"threads": threads} if threads else {}
    ext = DescriptorExtractor(net, device=device, batch_size=batch_size, backend=backend, precision=precision,
                              **options)
    return ext, model_label(weights, net.name)


def check_map_model(map_model: str, label: str) -> str | None:
    """Why a map built by ``map_model`` cannot be queried with descriptors of ``label``, or None.

    Maps record ``<model>`` (``vpr-ros build-map``) or ``<model>@<weights>`` (this node, the demo);
    the model must agree, and the weights too when the map names them.
    """
    if not map_model:
        return None
    base, _, tag = map_model.partition("@")
    name, _, our_tag = label.partition("@")
    if base != name:
        return f"the map was built with model {map_model!r} but this node runs {label!r}"
    if tag and tag != our_tag:
        return f"the map was built with weights {tag!r} of {base} but this node runs weights {our_tag!r}"
    return None


def _no_map(target: Path) -> str:
    return (f"no place map at {target} (mode 'localize' needs one; build it with `vpr-ros build-map` "
            "or run with mode: map)")


def open_map(path: str, mode: str, dim: int, label: str, index: str,
             source: dict[str, Any] | None = None) -> tuple[PlaceMap, bool]:
    """Load the map at ``path`` (refusing another model/weights/dimension), or start one in map modes.

    ``source``: this node's :func:`~vpr_ros.core.provenance.descriptor_source`, recorded in a new map
    and compared with a loaded map's (a map that records none is checked by its model label only).
    Returns the map and whether it was loaded from disk.
    """
    if not path:
        raise ConfigError("parameter 'map_path' is required (the .vprmap directory to query or build)")
    target = map_path(Path(path).expanduser())
    if not target.exists() and mode != "localize":
        return PlaceMap(dim, index, model=label, descriptor_source=source), False
    if not target.exists():
        raise MapError(_no_map(target))
    pmap = PlaceMap.load(target, expected_dim=dim)
    if pmap.descriptor_source is not None and source is not None:
        reason = source_mismatch(pmap.descriptor_source, source)
    else:
        reason = check_map_model(pmap.model, label)
    if reason:
        raise MapError(f"map {target}: {reason}")
    return pmap, True


def map_warning(pmap: PlaceMap, label: str) -> str | None:
    """What to warn about a loaded map whose weights cannot be checked; None when they were."""
    if pmap.descriptor_source is not None:
        return None
    named = f"names model {pmap.model!r} but" if pmap.model else "names no model and"
    return (f"{named} does not record which weights made its descriptors (saved by an older vpr_ros); "
            f"assuming {label}. Rebuild it (vpr-ros build-map) to have the weights checked")


# --------------------------------------------------------------------------- node


@dataclass
class _Frame:
    """A queued message with what the callback knew about it."""

    msg: Image | CompressedImage
    received: float  # time.monotonic() at the callback
    query_id: int
    out_of_order: bool  # stamp not newer than the previous frame's: never a keyframe


class LocalizerNode(Node):
    """Visual place recognition against a place map; see the module docstring.

    ``extractor`` (with its ``label``) may be passed in-process to share one loaded model
    (demo, tests); the ``weights``/``model``/``input_size``/``device``/``backend``/``precision``/
    ``threads`` parameters are then not used to build one.
    """

    def __init__(self, node_name: str = NODE_NAME, *, extractor: DescriptorExtractor | None = None,
                 label: str | None = None, **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        try:
            self._setup(extractor, label)
        except BaseException:
            self.destroy_node()
            raise

    # ------------------------------------------------------------------ setup

    def _setup(self, extractor: DescriptorExtractor | None, label: str | None) -> None:
        self._closed = True  # until the worker runs
        self._values = declare_params(self, PARAMS)
        v = self._values
        log = self.get_logger()
        if not v["map_path"]:
            raise ConfigError(f"{self.get_name()}: parameter 'map_path' is required "
                              "(the .vprmap directory to query or build)")
        target = map_path(Path(v["map_path"]).expanduser())
        if v["mode"] == "localize" and not target.exists():  # cheap checks before loading the model
            raise MapError(_no_map(target))
        if extractor is None:
            t0 = time.perf_counter()
            extractor, label = build_extractor(v["weights"], v["model"], v["input_size"], v["device"],
                                               v["max_batch"], backend=v["backend"], precision=v["precision"],
                                               threads=v["threads"])
            b = extractor.backend
            if extractor.preprocess.input_size:  # fixed input shape: every batch size once, the largest
                # twice, before the first frame, so the backend's memory (ONNX Runtime's arena: +200 MB
                # at 320x240, batch 8) is taken now, not when a backlog first forms hours later
                for n in (v["max_batch"], *range(v["max_batch"], 0, -1)):  # (bench/soak.py: RSS flat)
                    b.warmup(batch=n)
            log.info(f"model {label} ({extractor.dim}-d) on {extractor.device}, backend {b.kind} "
                     f"{b.precision}, input {extractor.preprocess.input_size or 'native'}, "
                     f"{time.perf_counter() - t0:.1f} s")
        self.extractor = extractor
        self.label = label or extractor.model.name
        self.place_map, loaded = open_map(v["map_path"], v["mode"], extractor.dim, self.label, v["index"],
                                          descriptor_source(extractor))
        self._map_target = target
        warning = map_warning(self.place_map, self.label) if loaded else None
        if warning:
            log.warning(f"map {self._map_target} {warning}")
        self._mapping = v["mode"] in ("map", "both")
        self._publishing = v["mode"] in ("localize", "both")
        try:
            self._sequence = sequence_matcher(v)
        except ConfigError as exc:
            raise ConfigError(f"{self.get_name()}: {exc}") from None
        self._sequence_pose: tuple | None = None  # odometry pose of the last sequence step
        self.sequence_fallbacks = 0
        self.sequence_no_pose = 0

        self._queue = DropOldestQueue(v["queue_size"])
        self._rejects = ReasonCounter(lambda m: self.get_logger().warning(m), v["log_throttle_s"])
        self._latency = LatencyWindow()
        self.frames_in = 0
        self.frames_ok = 0
        self.publish_failed = 0  # processed frames whose PlaceMatch could not be published
        self.out_of_order = 0
        self.repeated_stamp = 0
        self.keyframes_added = 0
        self.keyframes_without_pose = 0
        self.odom_rejected = 0
        self._batch_accounted = 0
        self.batches = 0
        self._good_count = 0
        self._last_stamp: float | None = None
        self._odom: list[tuple[float, tuple, tuple, str]] = []  # sorted by stamp
        self._odom_lock = threading.Lock()
        self._labels: collections.OrderedDict[tuple[int, int], str] = collections.OrderedDict()
        self._link_label = ""  # the newest TransmissionStats mode: the link's current setting
        self._busy = threading.Lock()  # held while a batch is in flight (shutdown waits for it)

        from vpr_ros_msgs.msg import PlaceCandidate, PlaceMatch
        from vpr_ros_msgs.srv import SaveMap

        self._match_t, self._cand_t = PlaceMatch, PlaceCandidate
        reliable = QoSProfile(depth=10)
        self._match_pub = self.create_publisher(PlaceMatch, v["match_topic"], reliable)
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", reliable)
        if v["image_transport"] == "compressed":
            topic, msg_type = f"{v['image_topic'].rstrip('/')}/compressed", CompressedImage
        else:
            topic, msg_type = v["image_topic"], Image
        self.input_topic = topic
        self._sub = self.create_subscription(msg_type, topic, self._on_image, qos_profile_sensor_data)
        if v["odom_topic"]:
            self.create_subscription(Odometry, v["odom_topic"], self._on_odom, QoSProfile(depth=50))
        if v["transmission_stats_topic"]:
            from vpr_ros_msgs.msg import TransmissionStats

            self.create_subscription(TransmissionStats, v["transmission_stats_topic"], self._on_stats,
                                     QoSProfile(depth=50))
        self.create_service(SaveMap, "~/save_map", self._on_save_map)
        self.add_on_set_parameters_callback(set_parameters_callback(PARAMS, lambda: self._values,
                                                                    self._apply))
        if v["diagnostics_period_s"] > 0:
            self.create_timer(v["diagnostics_period_s"], self._publish_diagnostics)
        self._worker = threading.Thread(target=self._run, name="localizer-worker", daemon=True)
        self._closed = False
        self._worker.start()
        log.info(f"{v['mode']}: {topic} -> {v['match_topic'] if self._publishing else '(no matches)'}; map "
                 f"{self._map_target} ({len(self.place_map)} places, "
                 f"{'loaded' if loaded else 'new'})")

    def _apply(self, values: dict[str, Any]) -> str | None:
        if any(values[k] != self._values[k] for k in SEQUENCE_PARAMS):
            self._sequence = sequence_matcher(values)  # ConfigError -> rejected with its reason
            self._sequence_pose = None
        self._rejects._period = float(values["log_throttle_s"])
        self._values = values
        return None

    # ------------------------------------------------------------------ callbacks (thin)

    def _on_image(self, msg: Image | CompressedImage) -> None:
        received = time.monotonic()
        self.frames_in += 1
        stamp = stamp_to_float(msg.header.stamp)
        late = self._last_stamp is not None and stamp <= self._last_stamp
        if late and stamp == self._last_stamp:
            self.repeated_stamp += 1
        elif late:
            self.out_of_order += 1
        else:
            self._last_stamp = stamp
        self._queue.put(_Frame(msg, received, self.frames_in, late))

    def _on_odom(self, msg: Odometry) -> None:
        p, q = msg.pose.pose.position, msg.pose.pose.orientation
        item = (stamp_to_float(msg.header.stamp), (p.x, p.y, p.z), (q.x, q.y, q.z, q.w), msg.header.frame_id)
        if not np.isfinite([*item[1], *item[2]]).all():  # would poison every keyframe near its stamp
            self.odom_rejected += 1
            self._rejects.log_throttled("odom_nan", f"odometry at stamp {item[0]:.3f}: NaN/inf in its pose")
            return
        with self._odom_lock:
            if self._odom and item[0] < self._odom[-1][0]:
                bisect.insort(self._odom, item, key=lambda o: o[0])
            else:
                self._odom.append(item)
            if len(self._odom) > 2000:
                del self._odom[:1000]

    def _on_stats(self, msg: Any) -> None:
        self._labels[(msg.header.stamp.sec, msg.header.stamp.nanosec)] = msg.mode
        self._link_label = msg.mode
        while len(self._labels) > 256:
            self._labels.popitem(last=False)

    def _on_save_map(self, request: Any, response: Any) -> Any:
        try:
            path, n = self.save_map(self.service_target(request.path) if request.path else None)
        except (MapError, ConfigError, OSError) as exc:
            response.success, response.message, response.entries = False, str(exc), 0
            self.get_logger().error(f"save_map failed: {exc}")
            return response
        response.success, response.message, response.entries = True, f"saved {n} places to {path}", int(n)
        self.get_logger().info(response.message)
        return response

    # ------------------------------------------------------------------ worker

    def _run(self) -> None:
        set_search_threads(self._values["faiss_threads"])  # OpenMP thread counts are per thread: set here
        while not self._queue.closed:
            batch = self._queue.get_batch(self._values["max_batch"], timeout=0.2)
            if not batch:
                continue
            with self._busy:
                try:
                    self._process(batch)
                except Exception as exc:  # keep the node alive whatever one batch does
                    lost = len(batch) - self._batch_accounted  # frames not yet counted either way
                    for _ in range(lost):
                        self._rejects.add("internal", f"{type(exc).__name__}: {exc}")
                    if not lost:
                        self._rejects.log_throttled("internal", f"after a batch: {type(exc).__name__}: {exc}")

    def _process(self, batch: list[_Frame]) -> None:
        v = self._values
        frames, images = [], []
        self._batch_accounted = 0  # frames of this batch already counted (rejected or processed)
        for f in batch:
            try:
                images.append(decode_image_msg(f.msg, name=self._sub.topic_name, max_pixels=v["max_pixels"]))
                frames.append(f)
            except ImageRejected as exc:
                stamp = stamp_to_float(f.msg.header.stamp)
                self._rejects.add(exc.reason.value, f"frame {f.query_id} (stamp {stamp:.3f}): {exc.detail}")
                self._batch_accounted += 1
        if not frames:
            return
        descriptors = self.extractor(images)
        self.batches += 1
        k = v["top_k"]
        # one matcher for the whole batch (a runtime change swaps it); map mode publishes no PlaceMatch
        sequence = self._sequence if self._publishing else None
        steps: list[SequenceResult | None] = [None] * len(frames)
        if sequence is not None:
            results, steps = self._match_sequence(frames, descriptors, k, sequence)
        elif self._mapping:
            results = []
            for f, d in zip(frames, descriptors, strict=True):
                result = self.place_map.query(d, k)[0]
                results.append(result)
                self._maybe_add_keyframe(f, d, result)
        else:
            results = self.place_map.query(descriptors, k)
        self.frames_ok += len(frames)
        self._batch_accounted += len(frames)
        for i, (f, result) in enumerate(zip(frames, results, strict=True)):
            if not self._publishing:  # map mode: latency = receipt to keyframe decision
                self._latency.add((time.monotonic() - f.received) * 1000.0)
                continue
            try:
                msg = self._place_match(f, result, steps[i])
                msg.latency_ms = float((time.monotonic() - f.received) * 1000.0)
                self._match_pub.publish(msg)
            except Exception as exc:  # counted per frame: the frame was described, its match is lost
                self.publish_failed += 1
                self._rejects.log_throttled("publish", f"PlaceMatch of frame {f.query_id} not published: "
                                            f"{type(exc).__name__}: {exc}", prefix="failed")
                continue
            self._latency.add(msg.latency_ms)

    def _place_match(self, frame: _Frame, result: QueryResult, sequence: SequenceResult | None = None) -> Any:
        v = self._values
        header = frame.msg.header
        # the stats of this frame's stamp; when they have not arrived yet (their topic is reliable, the
        # image's best effort: either may come first), the link's current mode, then the parameter
        stamp_key = (header.stamp.sec, header.stamp.nanosec)
        label = self._labels.get(stamp_key) or self._link_label or v["degradation"]
        cands = [self._candidate(eid, score, entry)
                 for eid, score, entry in zip(result.ids, result.scores, result.entries, strict=True)
                 if float(score) >= v["min_score"]]
        msg = self._match_t(header=header, query_id=int(frame.query_id), model=display_path(self.label),
                            matches=cands, degradation=display_path(label))
        if sequence is not None:  # min_score is a cosine threshold: it does not apply to sequence scores
            n = min(v["top_k"], len(sequence.ids))
            msg.sequence_frames = int(sequence.frames)
            msg.sequence_matches = [self._candidate(eid, score, self.place_map.entry(int(eid)))
                                    for eid, score in zip(sequence.ids[:n], sequence.scores[:n], strict=True)]
            msg.sequence_score = float(sequence.score)
            msg.sequence_velocity = float(sequence.velocity)
            msg.sequence_fallback = bool(sequence.fallback)
        return msg

    def _candidate(self, eid: Any, score: Any, entry: MapEntry) -> Any:
        """A PlaceCandidate of map entry ``eid`` (plain Python scalars: numpy ones would not serialise)."""
        # string fields must be valid UTF-8: a map built from Latin-1 file names holds surrogates
        cand = self._cand_t(entry_id=int(eid), score=float(score), source=display_path(entry.source))
        try:
            cand.stamp = float_to_stamp(entry.stamp)
        except ValueError:
            pass
        if entry.position is not None:
            cand.has_pose = True
            cand.pose = Pose(position=Point(x=float(entry.position[0]), y=float(entry.position[1]),
                                            z=float(entry.position[2])))
            if entry.orientation is not None:
                x, y, z, w = (float(c) for c in entry.orientation)
                cand.pose.orientation = Quaternion(x=x, y=y, z=z, w=w)
            cand.pose_frame_id = display_path(entry.frame_id)
        return cand

    def _match_sequence(self, frames: list[_Frame], descriptors: np.ndarray, k: int,
                        sequence: SequenceMatcher) -> tuple[list[QueryResult], list[SequenceResult | None]]:
        """Single-frame results (top ``k``) and sequence results of a batch, from one top-K search each.

        Map modes search frame by frame (a keyframe added for one frame is a place for the next).
        """
        kk = max(k, sequence.config.candidates)
        results: list[QueryResult] = []
        steps: list[SequenceResult | None] = []
        batch = None if self._mapping else self.place_map.search(descriptors, kk)
        for i, (f, d) in enumerate(zip(frames, descriptors, strict=True)):
            scores, ids = self.place_map.search(d[None, :], kk) if batch is None else (batch[0][i:i + 1],
                                                                                     batch[1][i:i + 1])
            keep = ids[0] >= 0
            ids, scores = ids[0][keep], scores[0][keep]
            result = QueryResult(ids[:k].copy(), scores[:k].copy(),
                                 [self.place_map.entry(int(e)) for e in ids[:k]])
            step = None
            if not f.out_of_order:  # a late or resent frame would break the buffer's time order
                step = sequence.push(ids, scores, self._sequence_position(f, sequence))
                self.sequence_fallbacks += int(step.fallback and len(step.ids) > 0)
            results.append(result)
            steps.append(step)
            if self._mapping:
                self._maybe_add_keyframe(f, d, result)
        return results, steps

    def _sequence_position(self, frame: _Frame, sequence: SequenceMatcher) -> float | None:
        """The frame's step position: signed travelled distance / sequence_step_m, or None (one step)."""
        v = self._values
        if v["sequence_step_m"] <= 0 or not v["odom_topic"]:
            return None
        odom = self._odom_at(stamp_to_float(frame.msg.header.stamp), v["odom_tolerance_s"])
        if odom is None:
            self.sequence_no_pose += 1
            return None
        previous, self._sequence_pose = self._sequence_pose, (odom[1], odom[2])
        if previous is None or sequence.position is None:
            return None
        return sequence.position + signed_step(previous[0], odom[1], odom[2]) / v["sequence_step_m"]

    def _maybe_add_keyframe(self, frame: _Frame, descriptor: np.ndarray, result: QueryResult) -> None:
        v = self._values
        self._good_count += 1
        if frame.out_of_order:
            return
        every = v["keyframe_every"]
        best = float(result.scores[0]) if len(result) else None
        novel = best is None or best < v["novelty_threshold"]
        if not ((every > 0 and (self._good_count - 1) % every == 0) or novel):
            return
        header = frame.msg.header
        stamp = stamp_to_float(header.stamp)
        entry = MapEntry(stamp=stamp, frame_id=header.frame_id, source=v["source"] or self.input_topic)
        if v["odom_topic"]:
            odom = self._odom_at(stamp, v["odom_tolerance_s"])
            if odom is None:
                self.keyframes_without_pose += 1
                if v["require_pose"]:
                    return
            else:
                entry.position, entry.orientation, entry.frame_id = odom[1], odom[2], odom[3]
        self.place_map.add(descriptor[None, :], [entry])
        self.keyframes_added += 1

    def _odom_at(self, stamp: float, tolerance: float) -> tuple | None:
        """The odometry sample nearest to ``stamp`` within ``tolerance`` seconds, or None."""
        with self._odom_lock:
            if not self._odom:
                return None
            i = bisect.bisect_left(self._odom, stamp, key=lambda o: o[0])
            near = [self._odom[j] for j in (i - 1, i) if 0 <= j < len(self._odom)]
        best = min(near, key=lambda o: abs(o[0] - stamp))
        return best if abs(best[0] - stamp) <= tolerance else None

    # ------------------------------------------------------------------ map, diagnostics, shutdown

    def service_target(self, requested: str) -> Path:
        """Where a ``~/save_map`` request may write: inside the folder of ``map_path`` only.

        The request comes from anyone on the ROS graph, so ``..``, absolute paths elsewhere and
        symbolic links out of that folder are refused (:class:`ConfigError`).
        """
        try:
            return confined_path(self._map_target.parent, map_path(requested))
        except ValueError as exc:  # ConfigError, or a name that cannot take the .vprmap suffix
            raise ConfigError(f"save_map: refused path {requested!r}: {exc}") from None

    def save_map(self, path: str | Path | None = None) -> tuple[Path, int]:
        """Save the map atomically to ``path`` (default ``map_path``); return where and how many places."""
        target = self.place_map.save(Path(path).expanduser() if path else self._map_target)
        return target, len(self.place_map)

    def diagnostics(self) -> dict[str, Any]:
        """Counters as published on /diagnostics."""
        p50, p95 = self._latency.percentiles(50, 95)
        rejects = self._rejects.snapshot()
        out: dict[str, Any] = {
            "mode": self._values["mode"],
            "model": self.label,
            "device": str(self.extractor.device),
            "backend": f"{self.extractor.backend.kind} {self.extractor.backend.precision}",
            "frames_received": self.frames_in,
            "frames_processed": self.frames_ok,
            "publish_failed": self.publish_failed,
            "rate_hz": self._latency.rate(),
            "latency_p50_ms": p50,
            "latency_p95_ms": p95,
            "queue_size": len(self._queue),
            "queue_drops": self._queue.dropped,
            "batches": self.batches,
            "mean_batch": self.frames_ok / self.batches if self.batches else 0.0,
            "rejected_total": sum(rejects.values()),
            "out_of_order": self.out_of_order,
            "repeated_stamp": self.repeated_stamp,
            "map_size": len(self.place_map),
            "keyframes_added": self.keyframes_added,
            "keyframes_without_pose": self.keyframes_without_pose,
            "odom_rejected": self.odom_rejected,
            "sequence_length": self._values["sequence_length"],
            "sequence_fallbacks": self.sequence_fallbacks,
            "sequence_no_pose": self.sequence_no_pose,
        }
        out.update({f"rejected_{k}": n for k, n in sorted(rejects.items())})
        return out

    def _publish_diagnostics(self) -> None:
        values = self.diagnostics()
        warn = None
        if values["queue_drops"] or values["rejected_total"] or values["out_of_order"] or self.publish_failed:
            warn = (f"{values['queue_drops']} dropped, {values['rejected_total']} rejected, "
                    f"{values['out_of_order']} out of order, {self.publish_failed} matches not published")
        error = None if self._worker.is_alive() or self._closed else "localizer worker stopped"
        publish_diagnostics(self, self._diag_pub, values, warn=warn, error=error)

    def close(self) -> None:
        """Stop the worker (after its batch in flight) and, in map modes, save the map. Idempotent."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self._queue.close()
        self._worker.join(timeout=30.0)
        if self._mapping and self._values["save_on_shutdown"]:
            with self._busy:
                try:
                    path, n = self.save_map()
                    self._final_log(f"saved {n} places to {path}")
                except (MapError, OSError) as exc:
                    self._final_log(f"saving the map on shutdown failed: {exc}", error=True)

    def _final_log(self, text: str, error: bool = False) -> None:
        """Log during shutdown: to stderr once the context is gone (/rosout cannot take it then)."""
        if self.context.ok():
            (self.get_logger().error if error else self.get_logger().info)(text)
        else:
            level = "ERROR" if error else "INFO"
            print(f"[{level}] [{self.get_name()}]: {text}", file=sys.stderr, flush=True)

    def destroy_node(self) -> None:
        self.close()
        super().destroy_node()


def main(args: list[str] | None = None) -> int:
    """``ros2 run vpr_ros localizer_node [--ros-args ...]``; exit status 2 on bad configuration."""
    return run_node(LocalizerNode, args, "localizer_node")


if __name__ == "__main__":
    sys.exit(main())
