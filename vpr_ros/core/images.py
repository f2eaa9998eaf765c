"""Image loading, decoding and validation: files, encoded bytes and ``sensor_msgs`` image layouts.

The core's one image convention: a C-contiguous ``numpy.uint8`` array of shape ``(H, W, 3)`` in RGB
order. Everything that enters the core (files, ROS messages of rclpy or rosbags, decoded video frames)
passes through :func:`as_rgb8`; image messages are decoded by :func:`decode_image_msg` alone, which
rejects a bad one with an :class:`ImageRejected` carrying a :class:`RejectReason`.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from vpr_ros.core.errors import ImageError
from vpr_ros.core.fileio import display_path, write_file_checked

#: Frames larger than this (pixels, 67.1 M) are refused rather than risking memory exhaustion:
#: arrays by :func:`as_rgb8`, encoded PNG/JPEG/BMP data from its header before decoding.
MAX_PIXELS = 8192 * 8192


def as_rgb8(image: np.ndarray, *, bgr: bool = False, name: str = "image") -> np.ndarray:
    """Return ``image`` as a contiguous uint8 RGB ``(H, W, 3)`` array.

    Accepts grayscale ``(H, W)`` / ``(H, W, 1)``, 3-channel and 4-channel (alpha dropped)
    arrays of dtype uint8, uint16 (scaled down) or float in [0, 1]. ``bgr=True`` means
    the channels are in OpenCV's BGR order. Raises :class:`ImageError` otherwise.
    """
    if not isinstance(image, np.ndarray):
        raise ImageError(f"{name}: expected a numpy array, got {type(image).__name__}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim not in (2, 3):
        raise ImageError(f"{name}: unsupported shape {image.shape}; expected (H, W) or (H, W, C)")
    h, w = image.shape[:2]
    if h == 0 or w == 0:
        raise ImageError(f"{name}: zero-size frame {w}x{h}")
    if h * w > MAX_PIXELS:
        raise ImageError(f"{name}: frame {w}x{h} exceeds the {MAX_PIXELS}-pixel limit")
    if image.ndim == 3 and image.shape[2] not in (3, 4):
        raise ImageError(f"{name}: unsupported channel count {image.shape[2]}; expected 1, 3 or 4")
    image = _to_uint8(image, name)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.shape[2] == 4:
        image = image[:, :, :3]
    if bgr:
        image = image[:, :, ::-1]
    return np.ascontiguousarray(image)


def _to_uint8(image: np.ndarray, name: str) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        return (image >> 8).astype(np.uint8)
    if np.issubdtype(image.dtype, np.floating):
        if not np.isfinite(image).all():
            raise ImageError(f"{name}: float image contains NaN or infinite values")
        return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    raise ImageError(f"{name}: unsupported dtype {image.dtype}; expected uint8, uint16 or float")


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file into an RGB uint8 array, or raise :class:`ImageError` saying why.

    Only regular files are opened (a FIFO would block, a device never ends), and PNG, JPEG and
    BMP files larger than :data:`MAX_PIXELS` are refused from their header, before decoding.
    """
    path = Path(path)
    name = display_path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ImageError(f"{name}: no such image file") from None
    except OSError as exc:
        raise ImageError(f"{name}: cannot read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"{name}: not a regular file ({_file_kind(st.st_mode)})")
    if st.st_size == 0:
        raise ImageError(f"{name}: empty file")
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise ImageError(f"{name}: cannot read ({exc.strerror or exc})") from None
    return decode_image(data, name=name)


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a file"


def encoded_size(data: bytes | np.ndarray) -> tuple[int, int] | None:
    """(width, height) from the header of PNG (IHDR), JPEG (SOF) or BMP data, without decoding;
    None when the format is another or the header is incomplete."""
    arr = data if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)
    view = memoryview(np.ascontiguousarray(arr, dtype=np.uint8).reshape(-1))
    head = bytes(view[:32])
    if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) >= 24 and head[12:16] == b"IHDR":
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if head[:2] == b"BM" and len(head) >= 26:
        if int.from_bytes(head[14:18], "little") == 12:  # BITMAPCOREHEADER: 16-bit sides
            return int.from_bytes(head[18:20], "little"), int.from_bytes(head[20:22], "little")
        w = int.from_bytes(head[18:22], "little", signed=True)
        h = int.from_bytes(head[22:26], "little", signed=True)  # negative: rows stored top-down
        return abs(w), abs(h)
    if head[:2] != b"\xff\xd8":
        return None
    return _jpeg_sof_size(view)


def _jpeg_sof_size(data: memoryview) -> tuple[int, int] | None:
    """Walk the JPEG marker segments up to the first SOFn; (width, height) from it."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            i += 2
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 9 > n:
                return None
            return int.from_bytes(data[i + 7 : i + 9], "big"), int.from_bytes(data[i + 5 : i + 7], "big")
        i += 2 + length
    return None


def check_encoded_size(data: bytes | np.ndarray, *, name: str = "image",
                       max_pixels: int = MAX_PIXELS) -> None:
    """Raise :class:`ImageError` when the header of encoded ``data`` claims more than ``max_pixels``
    pixels or a zero side (PNG, JPEG, BMP; other formats pass and are checked after decoding)."""
    size = encoded_size(data)
    if size is None:
        return
    w, h = size
    if w == 0 or h == 0:
        raise ImageError(f"{name}: zero-size image {w}x{h} in its header")
    if w * h > max_pixels:
        raise ImageError(f"{name}: image {w}x{h} exceeds the {max_pixels}-pixel limit "
                         "(read from its header; not decoded)")


def decode_image(data: bytes | np.ndarray, *, name: str = "image") -> np.ndarray:
    """Decode encoded image bytes (JPEG, PNG, ...) into an RGB uint8 array.

    The header's size is checked against :data:`MAX_PIXELS` first (:func:`check_encoded_size`),
    so a small file claiming a huge image is refused without allocating it.
    """
    buf = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    if buf.size == 0:
        raise ImageError(f"{name}: empty image data")
    check_encoded_size(buf, name=name)
    try:
        decoded = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:  # OpenCV's own limits and decoder failures
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ImageError(f"{name}: not a decodable image ({reason})") from None
    if decoded is None:
        raise ImageError(f"{name}: not a decodable image (corrupt or unsupported format)")
    # OpenCV decodes colour images as BGR(A); grayscale stays 2-D.
    return as_rgb8(decoded, bgr=decoded.ndim == 3, name=name)


def encode_png(image: np.ndarray) -> bytes:
    """Losslessly encode an RGB uint8 image as PNG bytes."""
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image[:, :, ::-1]))
    if not ok:
        raise ImageError("PNG encoding failed")
    return buf.tobytes()


def save_image(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write an RGB uint8 image (the format follows the file suffix) atomically, checking that the
    whole file was written; :class:`~vpr_ros.core.errors.OutputError` on a full disk or any other
    write failure, with the previous file (if any) left as it was and no partial file."""
    path = Path(path)
    try:
        ok, buf = cv2.imencode(path.suffix or ".png", np.ascontiguousarray(image[:, :, ::-1]))
    except cv2.error as exc:
        raise ImageError(f"{display_path(path)}: encoding failed ({exc})") from None
    if not ok:
        raise ImageError(f"{display_path(path)}: encoding failed")
    return write_file_checked(path, buf.tobytes())


# --------------------------------------------------------------------------- image messages


class RejectReason(StrEnum):
    """Why an image message was rejected; the value is the key nodes count it under
    (``rejected_<reason>`` on ``/diagnostics``)."""

    UNSUPPORTED_ENCODING = "unsupported_encoding"  # unknown raw encoding, or a compressedDepth payload
    EMPTY = "empty"  # zero width/height, or no data bytes
    SIZE_MISMATCH = "size_mismatch"  # step too short, data not step*height bytes, odd YUV width
    TOO_LARGE = "too_large"  # over max_pixels (raw: from width*height; compressed: from the header)
    NAN = "nan"  # a float image holding NaN or infinity
    CORRUPT = "corrupt"  # compressed bytes that do not decode
    INVALID = "invalid"  # anything else (e.g. data that is not a byte sequence)


class ImageRejected(ImageError):
    """An image message that cannot be used; :attr:`reason` says why, the message names the source."""

    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(message)
        self.reason = RejectReason(reason)
        self.detail = message


@dataclass(frozen=True)
class _Layout:
    """Pixel layout of one ``sensor_msgs/Image`` encoding."""

    dtype: str  # numpy base type; byte order comes from is_bigendian
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

#: ``sensor_msgs/Image`` encodings :func:`decode_raw` accepts (case-insensitive).
RAW_ENCODINGS: tuple[str, ...] = tuple(_LAYOUTS)


def _message_bytes(data: object, name: str) -> np.ndarray:
    """A message's ``uint8[]`` field (bytes, ``array.array('B')``, numpy array, list) as a flat uint8 array,
    without a copy where possible."""
    try:
        return np.frombuffer(memoryview(data), dtype=np.uint8)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        try:
            return np.asarray(data, dtype=np.uint8).reshape(-1)
        except (TypeError, ValueError):
            raise ImageRejected(RejectReason.INVALID,
                                f"{name}: data is not a byte sequence ({type(data).__name__})") from None


def decode_raw(encoding: str, height: int, width: int, step: int, is_bigendian: bool | int, data: Any, *,
               name: str = "image", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """RGB uint8 ``(H, W, 3)`` of the fields of a raw ``sensor_msgs/Image`` (never sharing ``data``'s memory).

    Supports :data:`RAW_ENCODINGS`, honours ``step`` (row padding) and ``is_bigendian``. 16-bit images keep
    their high byte; float images are clipped to [0, 1]; 8UC3/8UC4 are taken as BGR(A). Checks run
    cheapest first, so a frame over ``max_pixels`` is refused before its data is touched. Raises
    :class:`ImageRejected`.
    """
    encoding = str(encoding).strip()
    layout = _LAYOUTS.get(encoding.lower())
    if layout is None:
        raise ImageRejected(RejectReason.UNSUPPORTED_ENCODING, f"{name}: encoding {encoding!r} is not "
                            f"supported; supported: {', '.join(_LAYOUTS)}")
    h, w, step = int(height), int(width), int(step)
    buf = _message_bytes(data, name)
    if h <= 0 or w <= 0:
        raise ImageRejected(RejectReason.EMPTY, f"{name}: empty frame {w}x{h} with {buf.size} bytes")
    if h * w > max_pixels:
        raise ImageRejected(RejectReason.TOO_LARGE, f"{name}: frame {w}x{h} exceeds max_pixels {max_pixels}")
    if buf.size == 0:
        raise ImageRejected(RejectReason.EMPTY, f"{name}: empty frame {w}x{h} with 0 bytes")
    row_bytes = w * layout.bytes_per_pixel
    if step < row_bytes:
        raise ImageRejected(RejectReason.SIZE_MISMATCH,
                            f"{name}: step {step} is less than width*bytes_per_pixel = {w}*"
                            f"{layout.bytes_per_pixel} = {row_bytes} for {encoding}")
    if buf.size != step * h:
        raise ImageRejected(RejectReason.SIZE_MISMATCH, f"{name}: data has {buf.size} bytes, expected "
                            f"step*height = {step}*{h} = {step * h}")
    if layout.yuv is not None and w % 2:
        raise ImageRejected(RejectReason.SIZE_MISMATCH, f"{name}: {encoding} needs an even width, got {w}")

    rows = buf.reshape(h, step)[:, :row_bytes]
    if layout.yuv is not None:
        return cv2.cvtColor(np.ascontiguousarray(rows).reshape(h, w, 2), layout.yuv)
    dtype = np.dtype(layout.dtype).newbyteorder(">" if is_bigendian else "<")
    pixels = np.ascontiguousarray(rows).view(dtype).reshape(h, w, layout.channels)
    if dtype.itemsize > 1 and not dtype.isnative:
        pixels = pixels.astype(dtype.newbyteorder("="))
    if dtype.kind == "f" and not np.isfinite(pixels).all():
        raise ImageRejected(RejectReason.NAN, f"{name}: float image contains NaN or infinite values")
    try:
        rgb = as_rgb8(pixels, bgr=layout.bgr, name=name)
    except ImageError as exc:
        raise ImageRejected(RejectReason.INVALID, str(exc)) from None
    return rgb.copy() if np.may_share_memory(rgb, buf) else rgb


def decode_compressed(fmt: str, data: Any, *, name: str = "compressed image",
                      max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """RGB uint8 ``(H, W, 3)`` of the fields of a ``sensor_msgs/CompressedImage`` (JPEG, PNG, ...).

    The payload's own magic bytes decide the codec; ``fmt`` only refuses the ``compressedDepth`` transport.
    A PNG/JPEG/BMP header claiming more than ``max_pixels`` is refused before decoding. Raises
    :class:`ImageRejected`.
    """
    buf = _message_bytes(data, name)
    if buf.size == 0:
        raise ImageRejected(RejectReason.EMPTY, f"{name}: compressed image with no data")
    if "compresseddepth" in str(fmt).replace(" ", "").lower():
        raise ImageRejected(RejectReason.UNSUPPORTED_ENCODING,
                            f"{name}: compressed format {fmt!r} is not an image")
    size = encoded_size(buf)
    if size is not None and size[0] * size[1] > max_pixels:
        raise ImageRejected(RejectReason.TOO_LARGE,
                            f"{name}: compressed frame {size[0]}x{size[1]} exceeds max_pixels {max_pixels}")
    try:
        rgb = decode_image(buf, name=name)
    except ImageError as exc:
        raise ImageRejected(RejectReason.CORRUPT, str(exc)) from None
    if rgb.shape[0] * rgb.shape[1] > max_pixels:
        raise ImageRejected(RejectReason.TOO_LARGE,
                            f"{name}: frame {rgb.shape[1]}x{rgb.shape[0]} exceeds max_pixels {max_pixels}")
    return rgb


def decode_image_msg(msg: Any, *, name: str = "image", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """RGB uint8 ``(H, W, 3)`` of a ``sensor_msgs/Image`` or ``CompressedImage`` of rclpy or rosbags
    (a message with a ``format`` field is compressed); :class:`ImageRejected` says why not."""
    if hasattr(msg, "format"):
        return decode_compressed(msg.format, msg.data, name=name, max_pixels=max_pixels)
    return decode_raw(msg.encoding, msg.height, msg.width, msg.step, msg.is_bigendian, msg.data,
                      name=name, max_pixels=max_pixels)
