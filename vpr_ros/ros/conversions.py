"""Builders of the ROS 2 messages the nodes publish: ``sensor_msgs`` images from RGB arrays and
``builtin_interfaces/Time`` from seconds or nanoseconds.

The other direction needs no adapter here: :func:`vpr_ros.core.images.decode_image_msg` decodes image
messages and :mod:`vpr_ros.core.timeline` reads stamps (``to_seconds``, ``to_ns``) of any message.
"""

from __future__ import annotations

import array

import cv2
import numpy as np
from builtin_interfaces.msg import Time
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from vpr_ros.core.errors import ImageError
from vpr_ros.core.images import MAX_PIXELS, as_rgb8
from vpr_ros.core.timeline import Stamp

__all__ = [
    "float_to_stamp",
    "ns_to_stamp",
    "rgb_to_compressed_msg",
    "rgb_to_image_msg",
]

_OUT_CHANNELS = {"rgb8": 3, "bgr8": 3, "mono8": 1}
_COMPRESSED_FORMATS = {"jpeg": ".jpg", "jpg": ".jpg", "png": ".png"}


def rgb_to_image_msg(rgb: np.ndarray, encoding: str = "rgb8", header: Header | None = None) -> Image:
    """Build a ``sensor_msgs/Image`` (``rgb8``, ``bgr8`` or ``mono8``) from an RGB array.

    ``rgb`` may be anything :func:`~vpr_ros.core.images.as_rgb8` accepts; a 2-D uint8
    array is written to ``mono8`` unchanged. ``header`` defaults to an empty Header.
    """
    if encoding not in _OUT_CHANNELS:
        raise ImageError(f"unsupported output encoding {encoding!r}; "
                         f"expected one of {', '.join(_OUT_CHANNELS)}")
    if encoding == "mono8" and isinstance(rgb, np.ndarray) and rgb.ndim == 2 and rgb.dtype == np.uint8:
        h, w = rgb.shape
        if h == 0 or w == 0:
            raise ImageError(f"image: zero-size frame {w}x{h}")
        if h * w > MAX_PIXELS:
            raise ImageError(f"image: frame {w}x{h} exceeds the {MAX_PIXELS}-pixel limit")
        pixels = rgb
    else:
        pixels = as_rgb8(rgb)
        if encoding == "bgr8":
            pixels = pixels[:, :, ::-1]
        elif encoding == "mono8":
            pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY)
    pixels = np.ascontiguousarray(pixels)
    h, w = pixels.shape[:2]
    msg = Image()
    msg.header = header if header is not None else Header()
    msg.height, msg.width = h, w
    msg.encoding = encoding
    msg.is_bigendian = 0
    msg.step = w * _OUT_CHANNELS[encoding]
    msg.data = array.array("B", pixels.tobytes())
    return msg


def rgb_to_compressed_msg(rgb_or_payload: np.ndarray | bytes | bytearray | memoryview, fmt: str = "jpeg",
                          quality: int = 90, header: Header | None = None) -> CompressedImage:
    """Build a ``sensor_msgs/CompressedImage`` from an RGB array or an already encoded payload.

    Arrays are encoded with OpenCV: ``fmt="jpeg"`` at ``quality`` 1..100, or lossless
    ``"png"``; ``format`` is then ``"rgb8; jpeg compressed bgr8"`` as image_transport writes
    it. Bytes are sent as they are with ``format = fmt``.
    """
    fmt = fmt.lower()
    if fmt not in _COMPRESSED_FORMATS:
        raise ImageError(f"unsupported compressed format {fmt!r}; expected jpeg or png")
    msg = CompressedImage()
    msg.header = header if header is not None else Header()
    if isinstance(rgb_or_payload, (bytes, bytearray, memoryview)):
        payload = bytes(rgb_or_payload)
        if not payload:
            raise ImageError("empty compressed payload")
        msg.format = fmt
    else:
        if not 1 <= int(quality) <= 100:
            raise ImageError(f"JPEG quality must be in 1..100, got {quality}")
        bgr = np.ascontiguousarray(as_rgb8(rgb_or_payload)[:, :, ::-1])
        params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if fmt in ("jpeg", "jpg") else []
        ok, buf = cv2.imencode(_COMPRESSED_FORMATS[fmt], bgr, params)
        if not ok:
            raise ImageError(f"{fmt} encoding failed")
        payload = buf.tobytes()
        msg.format = f"rgb8; {'jpeg' if fmt == 'jpg' else fmt} compressed bgr8"
    msg.data = array.array("B", payload)
    return msg


def float_to_stamp(t: float) -> Time:
    """A ``builtin_interfaces/Time`` for ``t`` seconds, rounded to the nearest nanosecond
    (:class:`ValueError` when not finite or outside int32 seconds)."""
    sec, nanosec = Stamp.from_seconds(t)
    return Time(sec=sec, nanosec=nanosec)


def ns_to_stamp(ns: int) -> Time:
    """A ``builtin_interfaces/Time`` for ``ns`` nanoseconds."""
    sec, nanosec = Stamp.from_ns(ns)
    return Time(sec=sec, nanosec=nanosec)
