"""Localizer node: the ROS adapter of :class:`vpr_ros.core.localizer.Localizer` (model, map, keyframe
policy, matching); it declares the parameters, queues camera frames and publishes the matches.

Data path: the subscription callback stamps the receipt time, orders the stamp
(:meth:`~vpr_ros.core.localizer.Localizer.classify`) and queues the message (bounded, drop-oldest,
counted); a worker thread takes up to ``max_batch`` queued frames, decodes them and has the
localizer describe them in one forward pass and match them, then publishes one
``vpr_ros_msgs/PlaceMatch`` per frame (header = the image's; ``latency_ms`` from receipt to
publish). A slow model therefore never blocks the executor nor grows memory.

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

import collections
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import Point, Pose, Quaternion
from nav_msgs.msg import Odometry
from rclpy.node import Node
from rclpy.qos import QoSProfile, qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image

from vpr_ros.core.backends import BACKENDS, PRECISIONS
from vpr_ros.core.errors import ConfigError, MapError
from vpr_ros.core.extract import DescriptorExtractor
from vpr_ros.core.fileio import confined_path, display_path
from vpr_ros.core.images import ImageRejected, decode_image_msg
from vpr_ros.core.localizer import (
    MODES,
    Frame,
    LocalizationResult,
    Localizer,
    LocalizerConfig,
    Match,
    ModelConfig,
    StampOrder,
)
from vpr_ros.core.localizer import Pose as FramePose
from vpr_ros.core.mapdb import INDEX_KINDS, PlaceMap, map_path, set_search_threads
from vpr_ros.core.sequence import SequenceConfig
from vpr_ros.core.timeline import to_seconds
from vpr_ros.ros.conversions import float_to_stamp
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

__all__ = ["PARAMS", "LocalizerNode", "localizer_config", "main", "model_config"]

NODE_NAME = "localizer"

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


def localizer_config(values: dict[str, Any], input_topic: str) -> LocalizerConfig:
    """The :class:`LocalizerConfig` the parameters describe; ConfigError if invalid.

    ``input_topic``: the source label of keyframes when the ``source`` parameter is empty.
    """
    v = values
    sequence = None
    if v["sequence_length"] > 0:
        sequence = SequenceConfig(length=int(v["sequence_length"]), v_min=float(v["sequence_v_min"]),
                                  v_max=float(v["sequence_v_max"]), candidates=int(v["sequence_candidates"]),
                                  min_score=float(v["sequence_min_score"]),
                                  reverse=bool(v["sequence_reverse"]))
    return LocalizerConfig(map_path=v["map_path"], mode=v["mode"], index=v["index"], top_k=v["top_k"],
                           min_score=v["min_score"], keyframe_every=v["keyframe_every"],
                           novelty_threshold=v["novelty_threshold"], odometry=bool(v["odom_topic"]),
                           odom_tolerance_s=v["odom_tolerance_s"], require_pose=v["require_pose"],
                           source=v["source"] or input_topic, sequence=sequence,
                           sequence_step_m=v["sequence_step_m"])


def model_config(values: dict[str, Any]) -> ModelConfig:
    """The :class:`ModelConfig` the parameters describe (batches of ``max_batch`` frames)."""
    return ModelConfig(weights=values["weights"], model=values["model"], input_size=values["input_size"],
                       device=values["device"], backend=values["backend"], precision=values["precision"],
                       threads=values["threads"], batch_size=values["max_batch"])


@dataclass
class _Frame:
    """A queued message with what the callback knew about it."""

    msg: Image | CompressedImage
    received: float  # time.monotonic() at the callback
    query_id: int
    order: StampOrder  # a late stamp is never a keyframe nor a sequence step


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
        if v["image_transport"] == "compressed":
            topic, msg_type = f"{v['image_topic'].rstrip('/')}/compressed", CompressedImage
        else:
            topic, msg_type = v["image_topic"], Image
        self.input_topic = topic
        try:
            config = localizer_config(v, topic)
        except ConfigError as exc:
            raise ConfigError(f"{self.get_name()}: {exc}") from None
        self.localizer = Localizer(config, model=model_config(v), extractor=extractor, label=label)
        loc = self.localizer
        if loc.model_note:
            log.info(loc.model_note)
        if loc.map_warning:
            log.warning(f"map {loc.map_target} {loc.map_warning}")

        self._queue = DropOldestQueue(v["queue_size"])
        self._rejects = ReasonCounter(lambda m: self.get_logger().warning(m), v["log_throttle_s"])
        self._latency = LatencyWindow()
        self.frames_in = 0
        self.publish_failed = 0  # processed frames whose PlaceMatch could not be published
        self._batch_accounted = 0
        self._labels: collections.OrderedDict[tuple[int, int], str] = collections.OrderedDict()
        self._link_label = ""  # the newest TransmissionStats mode: the link's current setting
        self._busy = threading.Lock()  # held while a batch is in flight (shutdown waits for it)

        # the package's own messages, built by `make setup`: a plain environment imports this module without
        from vpr_ros_msgs.msg import PlaceCandidate, PlaceMatch
        from vpr_ros_msgs.srv import SaveMap

        self._match_t, self._cand_t = PlaceMatch, PlaceCandidate
        reliable = QoSProfile(depth=10)
        self._match_pub = self.create_publisher(PlaceMatch, v["match_topic"], reliable)
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", reliable)
        self._sub = self.create_subscription(msg_type, topic, self._on_image, qos_profile_sensor_data)
        if v["odom_topic"]:
            self.create_subscription(Odometry, v["odom_topic"], self._on_odom, QoSProfile(depth=50))
        if v["transmission_stats_topic"]:
            from vpr_ros_msgs.msg import TransmissionStats  # built by `make setup`; see above

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
        publishing = config.matching
        log.info(f"{v['mode']}: {topic} -> {v['match_topic'] if publishing else '(no matches)'}; map "
                 f"{loc.map_target} ({len(loc.place_map)} places, "
                 f"{'loaded' if loc.map_loaded else 'new'})")

    def _apply(self, values: dict[str, Any]) -> str | None:
        self.localizer.reconfigure(localizer_config(values, self.input_topic))  # ConfigError: rejected
        self._rejects._period = float(values["log_throttle_s"])
        self._values = values
        return None

    @property
    def extractor(self) -> DescriptorExtractor:
        return self.localizer.extractor

    @property
    def label(self) -> str:
        return self.localizer.label

    @property
    def place_map(self) -> PlaceMap:
        return self.localizer.place_map

    @property
    def frames_ok(self) -> int:
        """Frames decoded and matched."""
        return self.localizer.frames

    # ------------------------------------------------------------------ callbacks (thin)

    def _on_image(self, msg: Image | CompressedImage) -> None:
        received = time.monotonic()
        self.frames_in += 1
        order = self.localizer.classify(to_seconds(msg.header.stamp))
        self._queue.put(_Frame(msg, received, self.frames_in, order))

    def _on_odom(self, msg: Odometry) -> None:
        p, q = msg.pose.pose.position, msg.pose.pose.orientation
        stamp = to_seconds(msg.header.stamp)
        pose = FramePose((p.x, p.y, p.z), (q.x, q.y, q.z, q.w), msg.header.frame_id)
        if not self.localizer.add_odometry(stamp, pose):
            self._rejects.log_throttled("odom_nan", f"odometry at stamp {stamp:.3f}: NaN/inf in its pose")

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
        frames, inputs = [], []
        self._batch_accounted = 0  # frames of this batch already counted (rejected or processed)
        for f in batch:
            header = f.msg.header
            try:
                image = decode_image_msg(f.msg, name=self._sub.topic_name,
                                         max_pixels=self._values["max_pixels"])
            except ImageRejected as exc:
                stamp = to_seconds(header.stamp)
                self._rejects.add(exc.reason.value, f"frame {f.query_id} (stamp {stamp:.3f}): {exc.detail}")
                self._batch_accounted += 1
                continue
            frames.append(f)
            inputs.append(Frame(to_seconds(header.stamp), image, header.frame_id, order=f.order))
        if not frames:
            return
        results = self.localizer.process_batch(inputs)
        self._batch_accounted += len(frames)
        for f, result in zip(frames, results, strict=True):
            if not self.localizer.config.matching:  # map mode: latency = receipt to keyframe decision
                self._latency.add((time.monotonic() - f.received) * 1000.0)
                continue
            try:
                msg = self._place_match(f, result)
                msg.latency_ms = float((time.monotonic() - f.received) * 1000.0)
                self._match_pub.publish(msg)
            except Exception as exc:  # counted per frame: the frame was described, its match is lost
                self.publish_failed += 1
                self._rejects.log_throttled("publish", f"PlaceMatch of frame {f.query_id} not published: "
                                            f"{type(exc).__name__}: {exc}", prefix="failed")
                continue
            self._latency.add(msg.latency_ms)

    def _place_match(self, frame: _Frame, result: LocalizationResult) -> Any:
        header = frame.msg.header
        # the stats of this frame's stamp; when they have not arrived yet (their topic is reliable, the
        # image's best effort: either may come first), the link's current mode, then the parameter
        stamp_key = (header.stamp.sec, header.stamp.nanosec)
        label = self._labels.get(stamp_key) or self._link_label or self._values["degradation"]
        msg = self._match_t(header=header, query_id=int(frame.query_id), model=display_path(self.label),
                            matches=[self._candidate(m) for m in result.matches],
                            degradation=display_path(label))
        sequence = result.sequence
        if sequence is not None:  # min_score is a cosine threshold: it does not apply to sequence scores
            msg.sequence_frames = int(sequence.frames)
            msg.sequence_matches = [self._candidate(m) for m in result.sequence_matches]
            msg.sequence_score = float(sequence.score)
            msg.sequence_velocity = float(sequence.velocity)
            msg.sequence_fallback = bool(sequence.fallback)
        return msg

    def _candidate(self, match: Match) -> Any:
        """A PlaceCandidate of ``match`` (plain Python scalars: numpy ones would not serialise)."""
        entry = match.entry
        # string fields must be valid UTF-8: a map built from Latin-1 file names holds surrogates
        cand = self._cand_t(entry_id=match.id, score=match.score, source=display_path(entry.source))
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

    # ------------------------------------------------------------------ map, diagnostics, shutdown

    def service_target(self, requested: str) -> Path:
        """Where a ``~/save_map`` request may write: inside the folder of ``map_path`` only.

        The request comes from anyone on the ROS graph, so ``..``, absolute paths elsewhere and
        symbolic links out of that folder are refused (:class:`ConfigError`).
        """
        try:
            return confined_path(self.localizer.map_target.parent, map_path(requested))
        except ValueError as exc:  # ConfigError, or a name that cannot take the .vprmap suffix
            raise ConfigError(f"save_map: refused path {requested!r}: {exc}") from None

    def save_map(self, path: str | Path | None = None) -> tuple[Path, int]:
        """Save the map atomically to ``path`` (default ``map_path``); return where and how many places."""
        return self.localizer.save_map(path)

    def diagnostics(self) -> dict[str, Any]:
        """Counters as published on /diagnostics."""
        loc = self.localizer
        p50, p95 = self._latency.percentiles(50, 95)
        rejects = self._rejects.snapshot()
        out: dict[str, Any] = {
            "mode": self._values["mode"],
            "model": self.label,
            "device": str(self.extractor.device),
            "backend": f"{self.extractor.backend.kind} {self.extractor.backend.precision}",
            "frames_received": self.frames_in,
            "frames_processed": loc.frames,
            "publish_failed": self.publish_failed,
            "rate_hz": self._latency.rate(),
            "latency_p50_ms": p50,
            "latency_p95_ms": p95,
            "queue_size": len(self._queue),
            "queue_drops": self._queue.dropped,
            "batches": loc.batches,
            "mean_batch": loc.frames / loc.batches if loc.batches else 0.0,
            "rejected_total": sum(rejects.values()),
            "out_of_order": loc.out_of_order,
            "repeated_stamp": loc.repeated_stamp,
            "map_size": len(loc.place_map),
            "keyframes_added": loc.keyframes_added,
            "keyframes_without_pose": loc.keyframes_without_pose,
            "odom_rejected": loc.odom_rejected,
            "sequence_length": self._values["sequence_length"],
            "sequence_fallbacks": loc.sequence_fallbacks,
            "sequence_no_pose": loc.sequence_no_pose,
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
        if self.localizer.config.mapping and self._values["save_on_shutdown"]:
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
