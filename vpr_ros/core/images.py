"""Image loading and validation.

The core's one image convention: a C-contiguous ``numpy.uint8`` array of shape
``(H, W, 3)`` in RGB order. Everything that enters the core (files, ROS messages,
decoded video frames) passes through :func:`as_rgb8`, so bad input is rejected once,
here, with a reason.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

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
