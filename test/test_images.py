"""The core's single image gate: every accepted layout, every rejection with its reason, for arrays,
files, encoded bytes and the fields of ``sensor_msgs`` image messages."""

from __future__ import annotations

import re

import numpy as np
import pytest

from vpr_ros.core.errors import ImageError
from vpr_ros.core.images import (
    MAX_PIXELS,
    ImageRejected,
    RejectReason,
    as_rgb8,
    decode_compressed,
    decode_image,
    decode_image_msg,
    decode_raw,
    encode_png,
    load_image,
    save_image,
)


def test_layouts_become_rgb8():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert as_rgb8(gray).shape == (3, 4, 3) and (as_rgb8(gray)[:, :, 1] == gray).all()
    bgra = np.zeros((2, 2, 4), np.uint8)
    bgra[..., 0] = 200  # blue in BGR order
    assert as_rgb8(bgra, bgr=True)[0, 0].tolist() == [0, 0, 200]
    assert as_rgb8(np.full((2, 2), 65535, np.uint16)).max() == 255
    assert as_rgb8(np.full((2, 2, 1), 0.5, np.float32))[0, 0, 0] == 128


@pytest.mark.parametrize(("array", "reason"), [
    (np.zeros((0, 5), np.uint8), "zero-size"),
    (np.zeros((5, 5, 2), np.uint8), "channel count"),
    (np.zeros((2, 2, 2, 2), np.uint8), "unsupported shape"),
    (np.zeros((5, 5), np.int32), "unsupported dtype"),
    (np.array([[np.nan]], np.float32), "NaN"),
    ("not an array", "expected a numpy array"),
])
def test_rejections_name_the_problem(array, reason):
    with pytest.raises(ImageError, match=reason):
        as_rgb8(array)


def test_huge_frames_are_refused_without_allocating():
    huge = np.lib.stride_tricks.as_strided(np.zeros(1, np.uint8), shape=(MAX_PIXELS + 1, 1), strides=(0, 0))
    with pytest.raises(ImageError, match="pixel limit"):
        as_rgb8(huge)


def test_files_round_trip_and_bad_files(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (7, 9, 3), np.uint8)
    save_image(tmp_path / "a.png", rgb)
    assert np.array_equal(load_image(tmp_path / "a.png"), rgb)
    assert np.array_equal(decode_image(encode_png(rgb)), rgb)
    (tmp_path / "e.jpg").write_bytes(b"")
    (tmp_path / "c.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.raises(ImageError, match="empty file"):
        load_image(tmp_path / "e.jpg")
    with pytest.raises(ImageError, match="not a decodable image"):
        load_image(tmp_path / "c.jpg")
    with pytest.raises(ImageError, match="no such image file"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="empty image data"):
        decode_image(b"")


# --------------------------------------------------------------------------- image messages


def _raw(rgb: np.ndarray, **fields):
    """Fields of an rgb8 ``sensor_msgs/Image`` holding ``rgb`` (step 3 * width), overridden by ``fields``."""
    h, w = rgb.shape[:2]
    base = {"encoding": "rgb8", "height": h, "width": w, "step": 3 * w, "is_bigendian": 0,
            "data": rgb.tobytes()}
    return {**base, **fields}


def _rejected(fn, *args, **kwargs) -> ImageRejected:
    with pytest.raises(ImageRejected) as exc:
        fn(*args, **kwargs)
    return exc.value


def test_raw_fields_decode_with_padding_and_byte_order():
    rgb = np.random.default_rng(1).integers(0, 256, (3, 4, 3), np.uint8)
    padded = np.zeros((3, 4 * 3 + 2), np.uint8)  # step 14 = 4 px * 3 B + 2 padding bytes
    padded[:, :12] = rgb.reshape(3, 12)
    out = decode_raw(**_raw(rgb, step=14, data=padded.tobytes()))
    assert np.array_equal(out, rgb) and out.flags.c_contiguous
    # mono16 big-endian 0x1234 -> high byte 0x12 = 18 in all three channels
    out = decode_raw("mono16", 1, 2, 4, 1, b"\x12\x34\x12\x34")
    assert out.tolist() == [[[18, 18, 18], [18, 18, 18]]]
    # the same bytes little-endian are 0x3412 -> 0x34 = 52
    assert decode_raw("mono16", 1, 2, 4, 0, b"\x12\x34\x12\x34")[0, 0].tolist() == [52, 52, 52]
    data = bytearray(rgb.tobytes())
    out = decode_raw(**_raw(rgb, data=data))
    data[0] ^= 0xFF  # the result never shares memory with the message
    assert out[0, 0, 0] == rgb[0, 0, 0]


@pytest.mark.parametrize(("fields", "reason", "words"), [
    ({"encoding": "bayer_rggb8"}, RejectReason.UNSUPPORTED_ENCODING,
     "encoding 'bayer_rggb8' is not supported"),
    ({"height": 0, "width": 0, "step": 0, "data": b""}, RejectReason.EMPTY, "empty frame 0x0 with 0 bytes"),
    ({"data": b""}, RejectReason.EMPTY, "empty frame 4x2 with 0 bytes"),
    # step 11 < width 4 * 3 bytes per pixel = 12
    ({"step": 11}, RejectReason.SIZE_MISMATCH, r"step 11 is less than width\*bytes_per_pixel = 4\*3 = 12"),
    # 2 rows * step 12 = 24 bytes expected, 20 given (truncated)
    ({"data": bytes(20)}, RejectReason.SIZE_MISMATCH,
     r"data has 20 bytes, expected step\*height = 12\*2 = 24"),
    ({"encoding": "yuv422", "width": 3, "step": 6, "data": bytes(12)}, RejectReason.SIZE_MISMATCH,
     "yuv422 needs an even width, got 3"),
    # 4 * 2 = 8 pixels > 7
    ({"max_pixels": 7}, RejectReason.TOO_LARGE, "frame 4x2 exceeds max_pixels 7"),
    ({"encoding": "32FC1", "step": 16, "data": np.array([0.5] * 7 + [np.nan], "<f4").tobytes()},
     RejectReason.NAN, "float image contains NaN or infinite values"),
    ({"data": object()}, RejectReason.INVALID, "data is not a byte sequence"),
])
def test_raw_rejections_are_typed(fields, reason, words):
    rgb = np.zeros((2, 4, 3), np.uint8)
    args = _raw(rgb, **fields)
    err = _rejected(decode_raw, name="/cam", **args)
    assert err.reason is reason and isinstance(err, ImageError)
    assert str(err).startswith("/cam: ") and re.search(words, err.detail), err.detail


def test_oversized_raw_frame_is_refused_before_its_data():
    # 20000 x 20000 = 4e8 pixels claimed with 16 data bytes: too large, not a size mismatch
    err = _rejected(decode_raw, "rgb8", 20000, 20000, 60000, 0, bytes(16), max_pixels=1_000_000)
    assert err.reason is RejectReason.TOO_LARGE
    assert "frame 20000x20000 exceeds max_pixels 1000000" in err.detail


def test_compressed_fields_decode_and_reject():
    rgb = np.random.default_rng(2).integers(0, 256, (5, 6, 3), np.uint8)
    png = encode_png(rgb)
    assert np.array_equal(decode_compressed("png", png), rgb)
    assert np.array_equal(decode_compressed("rgb8; png compressed bgr8", np.frombuffer(png, np.uint8)), rgb)
    cases = [
        (("jpeg", b""), RejectReason.EMPTY, "compressed image with no data"),
        (("16UC1; compressedDepth png", png), RejectReason.UNSUPPORTED_ENCODING,
         "compressed format '16UC1; compressedDepth png' is not an image"),
        (("jpeg", b"\xff\xd8\xff\xe0 not a jpeg"), RejectReason.CORRUPT, "not a decodable image"),
        (("png", png[: len(png) // 2]), RejectReason.CORRUPT, "not a decodable image"),  # truncated
    ]
    for args, reason, words in cases:
        err = _rejected(decode_compressed, *args, name="/cam/compressed")
        assert err.reason is reason and words in err.detail and err.detail.startswith("/cam/compressed: ")
    # PNG header of 6 x 5 = 30 pixels against max_pixels 29: refused from the header
    err = _rejected(decode_compressed, "png", png, max_pixels=29)
    assert err.reason is RejectReason.TOO_LARGE and "compressed frame 6x5 exceeds max_pixels 29" in err.detail


def test_rosbags_messages_use_the_same_decoder():
    rosbags_typesys = pytest.importorskip("rosbags.typesys")
    ts = rosbags_typesys.get_typestore(rosbags_typesys.Stores.ROS2_HUMBLE)
    t = ts.types
    header = t["std_msgs/msg/Header"](stamp=t["builtin_interfaces/msg/Time"](sec=1, nanosec=2), frame_id="c")
    rgb = np.random.default_rng(3).integers(0, 256, (2, 3, 3), np.uint8)
    image = t["sensor_msgs/msg/Image"]
    raw = image(header=header, height=2, width=3, encoding="bgr8", is_bigendian=0, step=9,
                data=np.ascontiguousarray(rgb[:, :, ::-1]).reshape(-1))
    assert np.array_equal(decode_image_msg(raw), rgb)
    comp = t["sensor_msgs/msg/CompressedImage"](header=header, format="png",
                                                data=np.frombuffer(encode_png(rgb), np.uint8))
    assert np.array_equal(decode_image_msg(comp), rgb)
    bad = image(header=header, height=2, width=3, encoding="rgb8", is_bigendian=0, step=9,
                data=np.zeros(17, np.uint8))  # 2 * 9 = 18 bytes expected
    assert _rejected(decode_image_msg, bad).reason is RejectReason.SIZE_MISMATCH


def test_reject_reasons_are_the_published_counter_keys():
    # nodes publish rejected_<reason>: these strings are public
    assert [r.value for r in RejectReason] == ["unsupported_encoding", "empty", "size_mismatch", "too_large",
                                               "nan", "corrupt", "invalid"]
    assert f"rejected_{RejectReason.NAN}" == "rejected_nan"
