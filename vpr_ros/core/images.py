"""Image loading and validation.

The core's one image convention: a C-contiguous ``numpy.uint8`` array of shape
``(H, W, 3)`` in RGB order. Everything that enters the core (files, ROS messages,
decoded video frames) passes through :func:`as_rgb8`, so bad input is rejected once,
here, with a reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from .errors import ImageError

#: Frames larger than this (pixels) are refused rather than risking memory exhaustion.
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
    """Read an image file into an RGB uint8 array, or raise :class:`ImageError` saying why."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such image file")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: empty file")
    data = np.fromfile(path, dtype=np.uint8)
    return decode_image(data, name=str(path))


def decode_image(data: bytes | np.ndarray, *, name: str = "image") -> np.ndarray:
    """Decode encoded image bytes (JPEG, PNG, ...) into an RGB uint8 array."""
    buf = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    if buf.size == 0:
        raise ImageError(f"{name}: empty image data")
    decoded = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
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


def save_image(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write an RGB uint8 image; the format follows the file suffix."""
    path = Path(path)
    ok, buf = cv2.imencode(path.suffix or ".png", np.ascontiguousarray(image[:, :, ::-1]))
    if not ok:
        raise ImageError(f"{path}: encoding failed")
    buf.tofile(path)
