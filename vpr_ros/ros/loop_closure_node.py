"""Loop-closure node: turns the localizer's place matches into verified SLAM loop closures.

Subscribes to ``vpr_ros_msgs/PlaceMatch`` (``match_topic``, the localizer's output) and, with
``geometric_verification``, to the camera images the localizer describes (``image_topic``). Each
image's ORB keypoints + descriptors (never the image) go into a bounded cache keyed by stamp
(``feature_cache_size`` frames, oldest stamp dropped first; about 40 kB per frame at 1000 features). For
each PlaceMatch the core :class:`~vpr_ros.core.loop_closure.LoopClosureDetector` keeps the candidates
older than ``exclusion_window_s`` with ``score >= score_threshold``, the ``top_k`` best, verifies them
best first (ORB matches, RANSAC on the essential or fundamental matrix, ``min_inliers``) and the node
publishes one ``vpr_ros_msgs/LoopClosure`` per accepted candidate (at most ``max_closures`` per query),
with ``T_match_query`` (rotation + unit translation) when verification estimated it.

The query image normally arrives before its PlaceMatch (the localizer needs time to describe it); a
PlaceMatch whose image features are not there yet waits up to ``image_wait_s``. Candidates that are
places of a prebuilt map (``map_path``, the localizer's map when the launch file or the runner starts
the graph) are verified with the ORB features the map stores (``vpr-ros build-map --local-features``).
A candidate whose features are nowhere (a map without local features, never seen by this node, or
evicted) cannot be verified and is not published: verification is never skipped silently. Rejections
are counted by reason on ``/diagnostics`` (``rejected_no_map_features`` for places of a map that
stores none; the node also says so once at start).

With ``candidate_source: sequence`` the candidates are the PlaceMatch's sequence result
(``sequence_matches``, published by a localizer with ``sequence_length`` > 0) and the threshold is
``sequence_score_threshold`` in the sequence score's z-score units; a PlaceMatch without a sequence
result (or with ``sequence_fallback``) uses its single-frame ``matches`` and ``score_threshold``.
The LoopClosure's ``score`` is then the sequence score.

Callbacks only queue; one worker thread extracts features, verifies and publishes, so slow
verification never blocks the executor. Thresholds can be changed at runtime (validated); bad
configuration makes the constructor raise :class:`~vpr_ros.core.errors.ConfigError` and ``main``
exits with status 2.
"""

from __future__ import annotations

import collections
import dataclasses
import sys
import threading
import time
from pathlib import Path
from typing import Any

from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import Quaternion, Transform, Vector3
from rclpy.node import Node
from rclpy.qos import QoSProfile, qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from vpr_ros.core.errors import ConfigError, MapError
from vpr_ros.core.geometry import VERIFICATION_MODELS, Features, OrbExtractor, VerificationConfig
from vpr_ros.core.images import ImageRejected, decode_image_msg
from vpr_ros.core.loop_closure import (
    DEFAULT_EXCLUSION_WINDOW_S,
    DEFAULT_MIN_INLIERS,
    DEFAULT_SCORE_THRESHOLD,
    DEFAULT_TOP_K,
    MAX_CLOSURES_REACHED,
    NO_MAP_FEATURES,
    NO_MATCH_FEATURES,
    NO_QUERY_FEATURES,
    Detection,
    FeatureLookup,
    LoopCandidate,
    LoopClosureConfig,
    LoopClosureDetector,
    map_feature_lookup,
)
from vpr_ros.core.mapdb import PlaceMap, map_path
from vpr_ros.core.timeline import NearestStampBuffer, seconds_to_ns, to_ns, to_seconds
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

__all__ = ["PARAMS", "LoopClosureNode", "config_from_params", "loop_closure_msg", "main"]

NODE_NAME = "loop_closure"

PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec("enabled", True, "detect loop closures (false: inputs are ignored, nothing is published)"),
    ParamSpec("match_topic", "vpr/place_match",
              "vpr_ros_msgs/PlaceMatch input (the localizer's match_topic)", read_only=True),
    ParamSpec("image_topic", "camera/image_raw",
              "images for geometric verification: the topic the localizer describes (base name)",
              read_only=True),
    ParamSpec("image_transport", "raw", "raw: sensor_msgs/Image on image_topic; compressed: CompressedImage "
              "on <image_topic>/compressed", choices=("raw", "compressed"), read_only=True),
    ParamSpec("loop_closure_topic", "vpr/loop_closure", "vpr_ros_msgs/LoopClosure output", read_only=True),
    ParamSpec("exclusion_window_s", DEFAULT_EXCLUSION_WINDOW_S, "candidates must be more than this many "
              "seconds older than the query (recent frames always look alike)", low=0.0, high=1e6),
    ParamSpec("score_threshold", DEFAULT_SCORE_THRESHOLD, "minimum descriptor similarity of a candidate "
              "(cosine; model-specific, chosen by `vpr-ros loop-eval`: the launch file and the runner set "
              "the one on the card of the localizer's weights when it is not given)", low=-1.0, high=1.0),
    ParamSpec("top_k", DEFAULT_TOP_K, "best candidates of a PlaceMatch that are checked", low=1, high=100),
    ParamSpec("max_closures", 1, "loop closures published per query at most (<= top_k)", low=1, high=100),
    ParamSpec("geometric_verification", True, "accept a candidate only if ORB matches agree with one "
              "epipolar geometry (RANSAC) with at least min_inliers inliers", read_only=True),
    ParamSpec("min_inliers", DEFAULT_MIN_INLIERS, "RANSAC inliers a verified loop closure needs",
              low=5, high=100_000),
    ParamSpec("verification_model", "essential", "essential (calibrated, gives the relative pose) or "
              "fundamental (uncalibrated inlier count)", choices=VERIFICATION_MODELS),
    ParamSpec("camera_fx", 0.0, "focal length x (px) of the images as received; 0: assume "
              "assumed_hfov_deg", low=0.0, high=1e6),
    ParamSpec("camera_fy", 0.0, "focal length y (px); 0 with camera_fx: fy = fx", low=0.0, high=1e6),
    ParamSpec("camera_cx", 0.0, "principal point x (px); 0: image centre", low=0.0, high=1e6),
    ParamSpec("camera_cy", 0.0, "principal point y (px); 0: image centre", low=0.0, high=1e6),
    ParamSpec("assumed_hfov_deg", 60.0, "horizontal field of view assumed when camera_fx is 0",
              low=10.0, high=170.0),
    ParamSpec("n_features", 1000, "ORB features per image", low=50, high=20000, read_only=True),
    ParamSpec("ratio", 0.8, "Lowe's ratio test of ORB matches", low=0.05, high=1.0),
    ParamSpec("ransac_threshold_px", 1.0, "epipolar error (px) of a RANSAC inlier", low=0.05, high=20.0),
    ParamSpec("max_image_side", 640, "images are downscaled to this longest side for ORB", low=64, high=8192,
              read_only=True),
    ParamSpec("feature_cache_size", 5000, "frames whose ORB features are kept for verification (about "
              "40 kB each at 1000 features; older matches cannot be verified)", low=1, high=1_000_000,
              read_only=True),
    ParamSpec("stamp_tolerance_s", 0.001, "largest stamp difference between a PlaceMatch/candidate stamp and "
              "the image whose features it uses", low=0.0, high=1.0),
    ParamSpec("image_wait_s", 1.0, "how long a PlaceMatch waits for its query image's features", low=0.0,
              high=60.0),
    ParamSpec("queue_size", 200, "images and matches waiting for the worker; the oldest is dropped when full",
              low=1, high=100_000, read_only=True),
    ParamSpec("max_pixels", 4096 * 4096, "larger images are rejected", low=1, high=8192 * 8192),
    ParamSpec("diagnostics_period_s", 1.0, "period of /diagnostics messages (0 = none)", low=0.0,
              high=3600.0, read_only=True),
    ParamSpec("log_throttle_s", 5.0, "a rejection reason is logged at most once per this many seconds",
              low=0.0, high=3600.0),
    ParamSpec("candidate_source", "single", "PlaceMatch result giving the candidates: single (matches, "
              "score_threshold) or sequence (sequence_matches, sequence_score_threshold; single when a "
              "PlaceMatch has no sequence result)", choices=("single", "sequence")),
    ParamSpec("sequence_score_threshold", 0.25, "candidate_source sequence: minimum sequence score (z-score "
              "units of PlaceMatch.sequence_matches)", low=-1000.0, high=1000.0),
    ParamSpec("map_path", "", "prebuilt place map whose stored local features (vpr-ros build-map "
              "--local-features) verify candidates that are its places; the localizer's map_path when "
              "started by the launch file or the runner; empty: none", read_only=True),
)


def config_from_params(v: dict[str, Any]) -> LoopClosureConfig:
    """The core detector configuration of parameter values; :class:`ConfigError` says what is wrong."""
    fx, fy, cx, cy = (float(v[k]) for k in ("camera_fx", "camera_fy", "camera_cx", "camera_cy"))
    camera = None
    if fx > 0:
        camera = (fx, fy or fx, cx, cy) if cx > 0 and cy > 0 else None
        if camera is None:
            raise ConfigError("camera_fx is set but camera_cx / camera_cy are not: give the full pinhole "
                              "(fx, fy, cx, cy) or leave camera_fx at 0 to assume assumed_hfov_deg")
    elif fy > 0 or cx > 0 or cy > 0:
        raise ConfigError("camera_fy / camera_cx / camera_cy are set but camera_fx is 0")
    if int(v["max_closures"]) > int(v["top_k"]):
        raise ConfigError(f"max_closures ({v['max_closures']}) must not exceed top_k ({v['top_k']})")
    ver = VerificationConfig(n_features=int(v["n_features"]), ratio=float(v["ratio"]),
                             ransac_threshold_px=float(v["ransac_threshold_px"]),
                             model=str(v["verification_model"]), min_inliers=int(v["min_inliers"]),
                             camera_matrix=camera, assumed_hfov_deg=float(v["assumed_hfov_deg"]),
                             max_image_side=int(v["max_image_side"]))
    return LoopClosureConfig(exclusion_window_s=float(v["exclusion_window_s"]),
                             score_threshold=float(v["score_threshold"]), top_k=int(v["top_k"]),
                             max_closures=int(v["max_closures"]),
                             geometric_verification=bool(v["geometric_verification"]), verification=ver)


def _sequence_detector(config: LoopClosureConfig) -> LoopClosureDetector:
    """The detector of sequence candidates: ``config`` without its cosine threshold (the node applies
    ``sequence_score_threshold`` to the sequence scores before)."""
    return LoopClosureDetector(dataclasses.replace(config, score_threshold=-1.0), feature_capacity=1)


def loop_closure_msg(msg_type: type, cand: LoopCandidate, header: Header) -> Any:
    """A ``vpr_ros_msgs/LoopClosure`` of an accepted candidate (plain Python scalars throughout)."""
    out = msg_type(header=header, query_id=int(cand.query_id), query_stamp=float_to_stamp(cand.query_stamp),
                   match_id=int(cand.match_id), match_stamp=float_to_stamp(cand.match_stamp),
                   score=float(cand.score), verified=bool(cand.verified), inliers=int(cand.inliers),
                   has_transform=bool(cand.has_transform))
    if cand.has_transform:
        qx, qy, qz, qw = cand.quaternion
        t = cand.translation
        out.relative_transform = Transform(translation=Vector3(x=float(t[0]), y=float(t[1]), z=float(t[2])),
                                           rotation=Quaternion(x=float(qx), y=float(qy), z=float(qz),
                                                               w=float(qw)))
    return out


class LoopClosureNode(Node):
    """Verified loop closures from PlaceMatch + images; see the module docstring."""

    def __init__(self, node_name: str = NODE_NAME, **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        self._closed = True
        try:
            self._setup()
        except BaseException:
            self.destroy_node()
            raise

    def _setup(self) -> None:
        self._values = declare_params(self, PARAMS)
        v = self._values
        try:
            config = config_from_params(v)
        except ConfigError as exc:
            raise ConfigError(f"{self.get_name()}: {exc}") from None
        self.detector = LoopClosureDetector(config, feature_capacity=1)
        self._sequence_detector = _sequence_detector(config)
        self._orb = OrbExtractor(config.verification)
        self.features: NearestStampBuffer[Features] = NearestStampBuffer(v["feature_cache_size"])
        self.place_map = self._open_map(v["map_path"]) if config.geometric_verification else None
        self._map_lookup = None if self.place_map is None else map_feature_lookup(self.place_map)
        self._queue = DropOldestQueue(v["queue_size"])
        self._pending: collections.deque[tuple[float, Any]] = collections.deque()
        self._rejects = ReasonCounter(lambda m: self.get_logger().info(m), v["log_throttle_s"])
        self._verify_ms = LatencyWindow()
        self._lock = threading.Lock()  # guards detector/config swaps against the worker
        self.images_in = 0
        self.matches_in = 0
        self.matches_done = 0
        self.sequence_queries = 0  # PlaceMatches whose candidates came from the sequence result
        self.candidates_checked = 0
        self.closures_published = 0
        self.image_rejects = 0
        self.images_out_of_order = 0
        self._last_image_ns: int | None = None

        from vpr_ros_msgs.msg import LoopClosure, PlaceMatch  # built package: PARAMS import without it

        self._loop_t = LoopClosure
        reliable = QoSProfile(depth=100)
        self._pub = self.create_publisher(LoopClosure, v["loop_closure_topic"], reliable)
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", QoSProfile(depth=10))
        self.create_subscription(PlaceMatch, v["match_topic"], self._on_match, QoSProfile(depth=100))
        self.image_input = ""
        if config.geometric_verification:
            if v["image_transport"] == "compressed":
                topic, msg_type = f"{v['image_topic'].rstrip('/')}/compressed", CompressedImage
            else:
                topic, msg_type = v["image_topic"], Image
            self.image_input = topic
            self.create_subscription(msg_type, topic, self._on_image, qos_profile_sensor_data)
        self.add_on_set_parameters_callback(
            set_parameters_callback(PARAMS, lambda: self._values, self._apply))
        if v["diagnostics_period_s"] > 0:
            self.create_timer(v["diagnostics_period_s"], self._publish_diagnostics)
        self._worker = threading.Thread(target=self._run, name="loop-closure-worker", daemon=True)
        self._closed = False
        self._worker.start()
        ver = (f"verified (>= {config.min_inliers} inliers, {config.verification.model}) with images from "
               f"{self.image_input}" if config.geometric_verification else "NOT verified")
        self.get_logger().info(
            f"{v['match_topic']} -> {v['loop_closure_topic']}: window {config.exclusion_window_s:g} s, "
            f"score >= {config.score_threshold:g}, top {config.top_k}, {ver}")

    def _open_map(self, path: str) -> PlaceMap | None:
        """The prebuilt map whose local features verify its places (None: no map yet, or none given)."""
        if not path:
            return None
        target = map_path(Path(path).expanduser())
        log = self.get_logger()
        if not target.exists():
            log.info(f"no map at {target} yet: candidates are verified with the images this node sees")
            return None
        try:
            pmap = PlaceMap.load(target, mmap=True)  # read-only here: the localizer owns the map
        except MapError as exc:
            raise MapError(f"{self.get_name()}: {exc}") from None
        if pmap.local_features_config is None:
            log.warning(f"map {target} stores no local features: loop closures to its {len(pmap)} places "
                        "cannot be verified geometrically and are not published; rebuild it with "
                        "`vpr-ros build-map --local-features`")
        else:
            have = sum(pmap.local_features(i) is not None for i in pmap.ids)
            log.info(f"map {target}: local features of {have} of {len(pmap)} places verify loop closures "
                     "to them")
        return pmap

    def _lookup(self, tol_ns: int) -> FeatureLookup:
        """Features of a candidate: from the images this node saw, else from the prebuilt map."""
        def lookup(c: LoopCandidate) -> Features | str | None:
            seen = self._features_near(seconds_to_ns(c.match_stamp), max(tol_ns, 1000))
            if seen is not None or self._map_lookup is None:
                return seen
            return self._map_lookup(c)

        return lookup

    def _features_near(self, stamp_ns: int, tol_ns: int) -> Features | None:
        """The cached features of the image nearest to ``stamp_ns``, if within ``tol_ns``."""
        hit = self.features.nearest(stamp_ns, tol_ns)
        return None if hit is None else hit[1]

    def _apply(self, values: dict[str, Any]) -> str | None:
        config = config_from_params(values)  # ConfigError -> rejected with its message
        with self._lock:
            self.detector = LoopClosureDetector(config, feature_capacity=1)
            self._sequence_detector = _sequence_detector(config)
            self._values = values
        self._rejects._period = float(values["log_throttle_s"])
        return None

    # ------------------------------------------------------------------ callbacks (thin)

    def _on_image(self, msg: Image | CompressedImage) -> None:
        if self._values["enabled"]:
            self.images_in += 1
            stamp = to_ns(msg.header.stamp)
            if self._last_image_ns is not None and stamp < self._last_image_ns:
                self.images_out_of_order += 1  # still cached: features are looked up by stamp
            else:
                self._last_image_ns = stamp
            self._queue.put(("image", msg))

    def _on_match(self, msg: Any) -> None:
        if self._values["enabled"]:
            self.matches_in += 1
            self._queue.put(("match", msg))

    # ------------------------------------------------------------------ worker

    def _run(self) -> None:
        while not self._queue.closed:
            items = self._queue.get_batch(32, timeout=0.05)
            for kind, msg in items:
                try:
                    if kind == "image":
                        self._add_image(msg)
                    else:
                        self._pending.append((time.monotonic() + self._values["image_wait_s"], msg))
                except Exception as exc:  # keep the node alive whatever one message does
                    self._rejects.add("internal", f"{type(exc).__name__}: {exc}")
            try:
                self._flush_pending()
            except Exception as exc:
                self._rejects.add("internal", f"{type(exc).__name__}: {exc}")

    def _add_image(self, msg: Image | CompressedImage) -> None:
        try:
            rgb = decode_image_msg(msg, name=self.image_input, max_pixels=self._values["max_pixels"])
        except ImageRejected as exc:
            self.image_rejects += 1
            self._rejects.add(f"image_{exc.reason.value}", exc.detail)
            return
        self.features.put(to_ns(msg.header.stamp), self._orb(rgb))

    def _flush_pending(self) -> None:
        """Process waiting matches in arrival order: when their query features exist, or at their deadline."""
        tol = seconds_to_ns(self._values["stamp_tolerance_s"])
        verify = self.detector.config.geometric_verification
        now = time.monotonic()
        while self._pending:
            deadline, msg = self._pending[0]
            query = self._features_near(to_ns(msg.header.stamp), tol) if verify else None
            if verify and query is None and now < deadline:
                return
            self._pending.popleft()
            self._process(msg, query)

    def _process(self, msg: Any, query: Features | None) -> None:
        v = self._values
        tol = seconds_to_ns(v["stamp_tolerance_s"])
        use_sequence = (v["candidate_source"] == "sequence" and msg.sequence_frames > 0
                        and not msg.sequence_fallback)
        with self._lock:
            detector = self._sequence_detector if use_sequence else self.detector
        self.sequence_queries += int(use_sequence)
        source = msg.matches if not use_sequence else [  # sequence threshold applied here, in z-score units
            c for c in msg.sequence_matches if float(c.score) >= v["sequence_score_threshold"]]
        candidates = [(int(c.entry_id), to_seconds(c.stamp), float(c.score)) for c in source]
        t0 = time.perf_counter()
        det = detector.check_candidates(
            int(msg.query_id), to_seconds(msg.header.stamp), candidates, query,
            lookup=self._lookup(tol))
        if detector.config.geometric_verification and det.candidates:
            self._verify_ms.add((time.perf_counter() - t0) * 1000.0)
        self.matches_done += 1
        self.candidates_checked += len(det.candidates)
        self._count_rejections(det)
        header = Header(stamp=self.get_clock().now().to_msg(), frame_id=msg.header.frame_id)
        for cand in det.closures:
            self._pub.publish(loop_closure_msg(self._loop_t, cand, header))
            self.closures_published += 1

    def _count_rejections(self, det: Detection) -> None:
        for c in det.candidates:
            if c.accepted or c.reason == MAX_CLOSURES_REACHED:
                continue
            key = {NO_QUERY_FEATURES: "no_query_features", NO_MATCH_FEATURES: "no_match_features",
                   NO_MAP_FEATURES: "no_map_features"}.get(c.reason, "not_verified")
            self._rejects.add(key, f"query {c.query_id} -> entry {c.match_id} (score {c.score:.3f}): "
                                   f"{c.reason}")

    # ------------------------------------------------------------------ diagnostics, shutdown

    def diagnostics(self) -> dict[str, Any]:
        """Counters as published on /diagnostics."""
        p50, p95 = self._verify_ms.percentiles(50, 95)
        out: dict[str, Any] = {
            "images_received": self.images_in,
            "images_out_of_order": self.images_out_of_order,
            "matches_received": self.matches_in,
            "matches_processed": self.matches_done,
            "sequence_queries": self.sequence_queries,
            "candidates_checked": self.candidates_checked,
            "loop_closures": self.closures_published,
            "queue_drops": self._queue.dropped,
            "pending_matches": len(self._pending),
            "feature_cache_frames": len(self.features),
            "feature_cache_evicted": self.features.evicted,
            "verify_p50_ms": p50,
            "verify_p95_ms": p95,
        }
        out.update({f"rejected_{k}": n for k, n in sorted(self._rejects.snapshot().items())})
        return out

    def _publish_diagnostics(self) -> None:
        values = self.diagnostics()
        warn = f"{values['queue_drops']} inputs dropped" if values["queue_drops"] else None
        error = None if self._worker.is_alive() or self._closed else "loop-closure worker stopped"
        publish_diagnostics(self, self._diag_pub, values, warn=warn, error=error)

    def close(self) -> None:
        """Stop the worker after the message in hand. Idempotent."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self._queue.close()
        self._worker.join(timeout=30.0)

    def destroy_node(self) -> None:
        self.close()
        super().destroy_node()


def main(args: list[str] | None = None) -> int:
    """``ros2 run vpr_ros loop_closure_node [--ros-args ...]``; exit status 2 on bad configuration."""
    return run_node(LoopClosureNode, args, "loop_closure_node")


if __name__ == "__main__":
    sys.exit(main())
