"""Transmitter node: sends camera frames through the simulated thin link and republishes what arrives.

Subscribes to ``image_topic`` (``sensor_msgs/Image``, or ``CompressedImage`` on
``<image_topic>/compressed`` with ``image_transport: compressed``), runs every frame through a
core :class:`~vpr_ros.core.transmission.Transmitter` (JPEG, resize, H.264/H.265 constant QP, or a
bit-rate budget) and publishes, with the original header:

* ``<output_topic>/compressed`` (``CompressedImage``): the real JPEG payload, in modes that
  produce one (``jpeg``, ``bitrate`` with ``bitrate_codec: jpeg``); the decoded ``Image`` is then
  also published on ``<output_topic>`` while anyone subscribes to it;
* ``<output_topic>`` (``Image``, rgb8): the decoded frame in the other modes;
* ``stats_topic`` (``vpr_ros_msgs/TransmissionStats``): bytes on the link and the recent bit rate;
* ``/diagnostics``: frames, drops, rejects by reason, bytes per frame.

The subscription callback only queues the message (bounded, drop-oldest, counted); a worker
thread encodes, so a slow encoder never blocks the executor. Transmission settings may be
changed at runtime (validated; the stream restarts with a keyframe).
"""

from __future__ import annotations

import collections
import sys
import threading
from typing import Any

from diagnostic_msgs.msg import DiagnosticArray
from rclpy.node import Node
from rclpy.qos import QoSProfile, qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image

from vpr_ros.core.errors import ConfigError, TransmissionError, VprError
from vpr_ros.core.images import ImageRejected, decode_image_msg
from vpr_ros.core.timeline import to_seconds
from vpr_ros.core.transmission import BITRATE_CODECS, MODES, PRESETS, TransmissionConfig, Transmitter
from vpr_ros.ros.conversions import rgb_to_compressed_msg, rgb_to_image_msg
from vpr_ros.ros.node_kit import (
    DropOldestQueue,
    ParamSpec,
    ReasonCounter,
    declare_params,
    publish_diagnostics,
    run_node,
    set_parameters_callback,
)

__all__ = ["PARAMS", "TransmitterNode", "main"]

NODE_NAME = "transmitter"

#: The transmission settings (the fields of :class:`TransmissionConfig`), changeable at runtime.
TX_PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec("mode", "jpeg", "link model: none, jpeg, resize, h264, h265 or bitrate", choices=MODES),
    ParamSpec("jpeg_quality", 75, "JPEG quality (mode jpeg)", low=1, high=100),
    ParamSpec("scale", 1.0, "resolution factor applied before the codec (mode resize, or any codec)",
              low=1e-3, high=1.0),
    ParamSpec("upscale", True, "resize the received frame back to the input size"),
    ParamSpec("qp", 30, "constant quantiser of h264/h265", low=0, high=51),
    ParamSpec("gop", 30, "keyframe interval of h264/h265 (frames)", low=1, high=10000),
    ParamSpec("preset", "veryfast", "x264/x265 preset", choices=PRESETS),
    ParamSpec("kbps", 0.0, "mode bitrate: link budget in kbit/s (> 0)", low=0.0, high=1.0e6),
    ParamSpec("fps", 10.0, "frame rate the budget and the bit rate refer to (Hz)", low=1e-3, high=1000.0),
    ParamSpec("bitrate_codec", "jpeg", "codec whose quality mode bitrate adapts", choices=BITRATE_CODECS),
)

PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec("image_topic", "camera/image_raw", "input camera topic (base name)", read_only=True),
    ParamSpec("image_transport", "raw", "input transport: raw (Image on image_topic) or compressed "
              "(CompressedImage on <image_topic>/compressed)", choices=("raw", "compressed"), read_only=True),
    ParamSpec("output_topic", "vpr/transmitted/image", "degraded frames: Image here, JPEG payloads on "
              "<output_topic>/compressed", read_only=True),
    ParamSpec("stats_topic", "vpr/transmission_stats", "vpr_ros_msgs/TransmissionStats topic",
              read_only=True),
    *TX_PARAMS,
    ParamSpec("queue_size", 5, "frames waiting for the encoder; the oldest is dropped when full",
              low=1, high=1000, read_only=True),
    ParamSpec("stats_window", 30, "frames the published bit rate is averaged over", low=1, high=10000),
    ParamSpec("max_pixels", 4096 * 4096, "larger frames are rejected", low=1, high=8192 * 8192),
    ParamSpec("diagnostics_period_s", 1.0, "period of /diagnostics messages (0 = none)", low=0.0,
              high=3600.0, read_only=True),
    ParamSpec("log_throttle_s", 5.0, "a rejected-frame reason is logged at most once per this many seconds",
              low=0.0, high=3600.0),
)


def config_from_params(values: dict[str, Any]) -> TransmissionConfig:
    """The :class:`TransmissionConfig` named by the node's transmission parameters."""
    return TransmissionConfig.from_dict({p.name: values[p.name] for p in TX_PARAMS})


class TransmitterNode(Node):
    """Re-encodes each camera frame as the configured link would; see the module docstring."""

    def __init__(self, node_name: str = NODE_NAME, **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        try:
            self._setup()
        except BaseException:
            self.destroy_node()
            raise

    def _setup(self) -> None:
        self._closed = True  # until the worker runs
        self._values = declare_params(self, PARAMS)
        v = self._values
        try:
            config = config_from_params(v)
        except TransmissionError as exc:
            raise ConfigError(f"{self.get_name()}: invalid transmission settings: {exc}") from None
        self._tx_lock = threading.Lock()
        self._tx = Transmitter(config)
        self._queue = DropOldestQueue(v["queue_size"])
        self._rejects = ReasonCounter(lambda m: self.get_logger().warning(m), v["log_throttle_s"])
        self._recent: collections.deque[tuple[float, int]] = collections.deque(maxlen=v["stats_window"])
        self.frames_in = 0
        self.frames_out = 0
        self.out_of_order = 0
        self._last_stamp: float | None = None
        self.bytes_out = 0

        out = v["output_topic"].rstrip("/")
        reliable = QoSProfile(depth=10)
        self._image_pub = self.create_publisher(Image, out, qos_profile_sensor_data)
        self._jpeg_pub = self.create_publisher(CompressedImage, f"{out}/compressed", qos_profile_sensor_data)
        from vpr_ros_msgs.msg import TransmissionStats  # built package: PARAMS import without it

        self._stats_type = TransmissionStats
        self._stats_pub = self.create_publisher(TransmissionStats, v["stats_topic"], reliable)
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", reliable)
        if v["image_transport"] == "compressed":
            topic, msg_type = f"{v['image_topic'].rstrip('/')}/compressed", CompressedImage
        else:
            topic, msg_type = v["image_topic"], Image
        self._sub = self.create_subscription(msg_type, topic, self._on_image, qos_profile_sensor_data)
        self.add_on_set_parameters_callback(set_parameters_callback(PARAMS, lambda: self._values,
                                                                    self._apply))
        if v["diagnostics_period_s"] > 0:
            self.create_timer(v["diagnostics_period_s"], self._publish_diagnostics)
        self._worker = threading.Thread(target=self._run, name="transmitter-worker", daemon=True)
        self._closed = False
        self._worker.start()
        self.get_logger().info(f"transmitting {topic} as {config.label} -> {out} (+ /compressed), "
                               f"stats on {v['stats_topic']}")

    # ------------------------------------------------------------------ parameters

    @property
    def config(self) -> TransmissionConfig:
        with self._tx_lock:
            return self._tx.config

    def _apply(self, values: dict[str, Any]) -> str | None:
        try:
            config = config_from_params(values)
        except TransmissionError as exc:
            return str(exc)
        with self._tx_lock:
            if config.label != self._tx.config.label:  # the label names every setting that changes output
                self._tx = Transmitter(config)  # a new stream: video modes restart with a keyframe
                self.get_logger().info(f"transmission now {config.label}")
        if values["stats_window"] != self._recent.maxlen:
            self._recent = collections.deque(self._recent, maxlen=values["stats_window"])
        self._rejects._period = float(values["log_throttle_s"])
        self._values = values
        return None

    # ------------------------------------------------------------------ data path

    def _on_image(self, msg: Image | CompressedImage) -> None:
        self.frames_in += 1
        stamp = to_seconds(msg.header.stamp)
        if self._last_stamp is not None and stamp < self._last_stamp:
            self.out_of_order += 1  # still sent: the link forwards what the camera gives it
        else:
            self._last_stamp = stamp
        self._queue.put(msg)

    def _run(self) -> None:
        while not self._queue.closed:
            for msg in self._queue.get_batch(1, timeout=0.2):
                try:
                    self._send(msg)
                except ImageRejected as exc:
                    self._rejects.add(exc.reason.value, exc.detail)
                except (TransmissionError, VprError) as exc:
                    self._rejects.add("encoder", str(exc))
                except Exception as exc:  # keep the node alive whatever one frame does
                    self._rejects.add("internal", f"{type(exc).__name__}: {exc}")

    def _send(self, msg: Image | CompressedImage) -> None:
        rgb = decode_image_msg(msg, name=self._sub.topic_name, max_pixels=self._values["max_pixels"])
        with self._tx_lock:
            tx = self._tx
            sent = tx.process(rgb)
        config = tx.config
        header = msg.header
        stamp = to_seconds(header.stamp)
        self._recent.append((stamp, sent.nbytes))
        stats = self._stats_type(header=header, frame_bytes=int(sent.nbytes),
                                 bitrate_kbps=float(self._bitrate_kbps(config.fps)), mode=config.label)
        self._stats_pub.publish(stats)
        if sent.payload is not None:
            cmsg = rgb_to_compressed_msg(sent.payload, "jpeg", header=header)
            cmsg.format = "rgb8; jpeg compressed bgr8"  # as image_transport's compressed plugin writes it
            self._jpeg_pub.publish(cmsg)
            if self._image_pub.get_subscription_count() > 0:
                self._image_pub.publish(rgb_to_image_msg(sent.image, "rgb8", header=header))
        else:
            self._image_pub.publish(rgb_to_image_msg(sent.image, "rgb8", header=header))
        self.frames_out += 1
        self.bytes_out += int(sent.nbytes)

    def _bitrate_kbps(self, fps: float) -> float:
        """Mean bytes per frame over the window times the frame rate (from the stamps when they advance)."""
        recent = list(self._recent)
        if not recent:
            return 0.0
        mean = sum(b for _, b in recent) / len(recent)
        steps = [b[0] - a[0] for a, b in zip(recent, recent[1:], strict=False)]
        forward = [d for d in steps if d > 0]  # a stamp going back (bag restart, reordering) is skipped
        rate = len(forward) / sum(forward) if forward else fps
        return mean * 8.0 * rate / 1000.0

    # ------------------------------------------------------------------ diagnostics and shutdown

    def diagnostics(self) -> dict[str, Any]:
        """Counters as published on /diagnostics."""
        rejects = self._rejects.snapshot()
        out: dict[str, Any] = {
            "mode": self.config.label,
            "frames_received": self.frames_in,
            "frames_sent": self.frames_out,
            "bytes_per_frame": self.bytes_out / self.frames_out if self.frames_out else 0.0,
            "queue_size": len(self._queue),
            "queue_drops": self._queue.dropped,
            "rejected_total": sum(rejects.values()),
            "out_of_order": self.out_of_order,
        }
        out.update({f"rejected_{k}": n for k, n in sorted(rejects.items())})
        return out

    def _publish_diagnostics(self) -> None:
        values = self.diagnostics()
        warn = "frames dropped or rejected" if values["queue_drops"] or values["rejected_total"] else None
        error = None if self._worker.is_alive() or self._closed else "encoder worker stopped"
        publish_diagnostics(self, self._diag_pub, values, warn=warn, error=error)

    def close(self) -> None:
        """Stop the worker (pending frames are dropped). Idempotent."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self._queue.close()
        self._worker.join(timeout=5.0)

    def destroy_node(self) -> None:
        self.close()
        super().destroy_node()


def main(args: list[str] | None = None) -> int:
    """``ros2 run vpr_ros transmitter_node [--ros-args ...]``; exit status 2 on bad configuration."""
    return run_node(TransmitterNode, args, "transmitter_node")


if __name__ == "__main__":
    sys.exit(main())
