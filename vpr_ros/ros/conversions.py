"""Conversions between ROS 2 image/time messages and the core's numpy conventions.

Images enter the core as C-contiguous ``uint8`` RGB ``(H, W, 3)`` arrays (see
:func:`vpr_ros.core.images.as_rgb8`). Every bad message is rejected with an
:class:`~vpr_ros.core.errors.ImageError` that says why: unknown encoding, inconsistent
``step``/``data`` sizes, zero-size or oversized frames, NaN in float images, corrupt
compressed payloads. Arrays returned here never share memory with the message.
"""

from __future__ import annotations

import array
import math
from dataclasses import dataclass

import cv2
import numpy as np
from builtin_interfaces.msg import Time
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from vpr_ros.core.errors import ImageError
from vpr_ros.core.images import MAX_PIXELS, as_rgb8, decode_image

__all__ = [
    "SUPPORTED_ENCODINGS",
    "compressed_msg_to_rgb",
    "float_to_stamp",
    "image_msg_to_rgb",
    "rgb_to_compressed_msg",
    "rgb_to_image_msg",
    "stamp_to_float",
]


@dataclass(frozen=True)
class _Layout:
    """Pixel layout of one ``sensor_msgs/Image`` encoding."""

    dtype: str  # numpy base type, byte order added from is_bigendian
    channels: int
    bgr: bool = False  # colour channels in B, G, R order
    yuv: int | None = None  # cv2 YUV 4:2:2 -> RGB conversion code (2 bytes per pixel)

    @property
    def bytes_per_pixel(self) -> int:
        return 2 if self.yuv is not None else np.dtype(self.dtype).itemsize * self.channels


_LAYOUTS: dict[str, _Layout] = {
    "rgb8": _Layout("u1", 3),
    "bgr8": _Layout("u1", 3, bgr=True),
    "rgba8": _Layout("u1", 4),
    "bgra8": _Layout("u1", 4, bgr=True),
    "rgb16": _Layout("u2", 3),
    "bgr16": _Layout("u2", 3, bgr=True),
    "rgba16": _Layout("u2", 4),
    "bgra16": _Layout("u2", 4, bgr=True),
    "mono8": _Layout("u1", 1),
    "mono16": _Layout("u2", 1),
    "8uc1": _Layout("u1", 1),
    "8uc3": _Layout("u1", 3, bgr=True),  # OpenCV convention
    "8uc4": _Layout("u1", 4, bgr=True),
    "16uc1": _Layout("u2", 1),
    "32fc1": _Layout("f4", 1),
    "64fc1": _Layout("f8", 1),
    # ROS "yuv422" is UYVY byte order (U0 Y0 V0 Y1); "yuv422_yuy2" is YUYV (Y0 U0 Y1 V0).
    "yuv422": _Layout("u1", 2, yuv=cv2.COLOR_YUV2RGB_UYVY),
    "uyvy": _Layout("u1", 2, yuv=cv2.COLOR_YUV2RGB_UYVY),
    "yuv422_yuy2": _Layout("u1", 2, yuv=cv2.COLOR_YUV2RGB_YUY2),
    "yuyv": _Layout("u1", 2, yuv=cv2.COLOR_YUV2RGB_YUY2),
}

#: Encodings :func:`image_msg_to_rgb` accepts (case-insensitive).
SUPPORTED_ENCODINGS: tuple[str, ...] = tuple(_LAYOUTS)

_OUT_CHANNELS = {"rgb8": 3, "bgr8": 3, "mono8": 1}
_COMPRESSED_FORMATS = {"jpeg": ".jpg", "jpg": ".jpg", "png": ".png"}


def _as_bytes(data: object, name: str) -> np.ndarray:
    """View a message's ``uint8[]`` field as a flat uint8 array (no copy where possible)."""
    try:
        return np.frombuffer(memoryview(data), dtype=np.uint8)  # array.array('B') / bytes
    except TypeError:
        try:
            return np.asarray(data, dtype=np.uint8).reshape(-1)
        except (TypeError, ValueError) as exc:
            raise ImageError(f"{name}: data is not a byte sequence ({type(data).__name__})") from exc


def _check_size(h: int, w: int, name: str) -> None:
    if h == 0 or w == 0:
        raise ImageError(f"{name}: zero-size frame {w}x{h}")
    if h * w > MAX_PIXELS:
        raise ImageError(f"{name}: frame {w}x{h} exceeds the {MAX_PIXELS}-pixel limit")


def image_msg_to_rgb(msg: Image, *, name: str = "image") -> np.ndarray:
    """Convert a ``sensor_msgs/Image`` to a contiguous uint8 RGB ``(H, W, 3)`` array.

    Supports the encodings in :data:`SUPPORTED_ENCODINGS`; honours ``step`` (row padding)
    and ``is_bigendian``. 16-bit images keep their high byte; float images are clipped to
    [0, 1] and rejected if they hold NaN/inf; 8UC3/8UC4 are taken as BGR(A).
    """
    encoding = msg.encoding.strip()
    layout = _LAYOUTS.get(encoding.lower())
    if layout is None:
        raise ImageError(f"{name}: unsupported encoding {encoding!r}; supported: {', '.join(_LAYOUTS)}")
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    _check_size(h, w, name)
    row_bytes = w * layout.bytes_per_pixel
    if step < row_bytes:
        raise ImageError(f"{name}: step {step} is less than width*bytes_per_pixel = {w}*"
                         f"{layout.bytes_per_pixel} = {row_bytes} for {encoding}")
    buf = _as_bytes(msg.data, name)
    if buf.size != step * h:
        raise ImageError(f"{name}: data has {buf.size} bytes, expected step*height = {step}*{h} = {step * h}")
    if layout.yuv is not None and w % 2:
        raise ImageError(f"{name}: {encoding} needs an even width, got {w}")

    rows = buf.reshape(h, step)[:, :row_bytes]
    if layout.yuv is not None:
        packed = np.ascontiguousarray(rows).reshape(h, w, 2)
        return cv2.cvtColor(packed, layout.yuv)

    dtype = np.dtype(layout.dtype).newbyteorder(">" if msg.is_bigendian else "<")
    pixels = np.ascontiguousarray(rows).view(dtype).reshape(h, w, layout.channels)
    if dtype.itemsize > 1 and not dtype.isnative:
        pixels = pixels.astype(dtype.newbyteorder("="))
    rgb = as_rgb8(pixels, bgr=layout.bgr, name=name)
    if np.may_share_memory(rgb, buf):
        rgb = rgb.copy()
    return rgb


def compressed_msg_to_rgb(msg: CompressedImage, *, name: str = "compressed image") -> np.ndarray:
    """Decode a ``sensor_msgs/CompressedImage`` (JPEG, PNG, ...) to uint8 RGB ``(H, W, 3)``.

    The payload's own magic bytes decide the codec; ``format`` is only checked for the
    unsupported ``compressedDepth`` transport. Corrupt data raises :class:`ImageError`.
    """
    if "compresseddepth" in msg.format.replace(" ", "").lower():
        raise ImageError(f"{name}: unsupported format {msg.format!r} (compressedDepth is not an image)")
    return decode_image(_as_bytes(msg.data, name), name=name)


def rgb_to_image_msg(rgb: np.ndarray, encoding: str = "rgb8", header: Header | None = None) -> Image:
    """Build a ``sensor_msgs/Image`` (``rgb8``, ``bgr8`` or ``mono8``) from an RGB array.

    ``rgb`` may be anything :func:`~vpr_ros.core.images.as_rgb8` accepts; a 2-D uint8
    array is written to ``mono8`` unchanged. ``header`` defaults to an empty Header.
    """
    if encoding not in _OUT_CHANNELS:
        raise ImageError(f"unsupported output encoding {encoding!r}; "
                         f"expected one of {', '.join(_OUT_CHANNELS)}")
    if encoding == "mono8" and isinstance(rgb, np.ndarray) and rgb.ndim == 2 and rgb.dtype == np.uint8:
        _check_size(*rgb.shape, name="image")
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


def stamp_to_float(stamp: Time) -> float:
    """Seconds since the epoch of a ``builtin_interfaces/Time`` (or anything with sec/nanosec)."""
    return float(stamp.sec) + float(stamp.nanosec) * 1e-9


def float_to_stamp(t: float) -> Time:
    """A ``builtin_interfaces/Time`` for ``t`` seconds, rounded to the nearest nanosecond."""
    t = float(t)
    if not math.isfinite(t):
        raise ValueError(f"stamp must be finite, got {t}")
    sec = math.floor(t)
    nanosec = round((t - sec) * 1e9)
    if nanosec >= 1_000_000_000:
        sec, nanosec = sec + 1, nanosec - 1_000_000_000
    if not -(2**31) <= sec < 2**31:
        raise ValueError(f"stamp {t} s is outside the int32 seconds range of builtin_interfaces/Time")
    return Time(sec=int(sec), nanosec=int(nanosec))
