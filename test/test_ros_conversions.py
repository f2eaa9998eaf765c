"""sensor_msgs Image/CompressedImage <-> numpy, on real rclpy message objects (no DDS): the core decoder
(:func:`vpr_ros.core.images.decode_image_msg`) and the message builders of ``vpr_ros.ros.conversions``."""

from __future__ import annotations

import array

import numpy as np
import pytest

sensor_msgs = pytest.importorskip("sensor_msgs.msg",
                                  reason="needs the ROS 2 Python messages (ros-sensor-msgs)")

import cv2  # noqa: E402
from builtin_interfaces.msg import Time  # noqa: E402
from rclpy.serialization import deserialize_message, serialize_message  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402
from std_msgs.msg import Header  # noqa: E402

from vpr_ros.core.errors import ImageError  # noqa: E402
from vpr_ros.core.images import (  # noqa: E402
    MAX_PIXELS,
    RAW_ENCODINGS,
    ImageRejected,
    RejectReason,
    decode_image_msg,
)
from vpr_ros.core.timeline import to_seconds  # noqa: E402
from vpr_ros.ros.conversions import (  # noqa: E402
    float_to_stamp,
    ns_to_stamp,
    rgb_to_compressed_msg,
    rgb_to_image_msg,
)

H, W = 6, 10


@pytest.fixture()
def rgb() -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, (H, W, 3), dtype=np.uint8)


@pytest.fixture()
def gray() -> np.ndarray:
    return np.random.default_rng(8).integers(0, 256, (H, W), dtype=np.uint8)


def make_msg(pixels: np.ndarray, encoding: str, *, pad: int = 0, bigendian: bool = False) -> Image:
    """An Image whose data is ``pixels`` written row by row, each row followed by ``pad`` bytes."""
    h, w = pixels.shape[:2]
    dtype = pixels.dtype.newbyteorder(">" if bigendian else "<")
    rows = np.ascontiguousarray(pixels.astype(dtype)).view(np.uint8).reshape(h, -1)
    padded = np.full((h, rows.shape[1] + pad), 0xAB, dtype=np.uint8)
    padded[:, : rows.shape[1]] = rows
    msg = Image(height=h, width=w, encoding=encoding, is_bigendian=int(bigendian), step=padded.shape[1])
    msg.data = array.array("B", padded.tobytes())
    return msg


def expand(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


# ---------------------------------------------------------------- Image -> RGB, every encoding


@pytest.mark.parametrize("pad", [0, 5])
@pytest.mark.parametrize(
    ("encoding", "layout"),
    [("rgb8", "rgb"), ("bgr8", "bgr"), ("8UC3", "bgr"),
     ("rgba8", "rgba"), ("bgra8", "bgra"), ("8UC4", "bgra")],
)
def test_colour_8bit(rgb, encoding, layout, pad):
    alpha = np.full((H, W, 1), 99, np.uint8)
    pixels = {"rgb": rgb, "bgr": rgb[:, :, ::-1], "rgba": np.concatenate([rgb, alpha], 2),
              "bgra": np.concatenate([rgb[:, :, ::-1], alpha], 2)}[layout]
    out = decode_image_msg(make_msg(pixels, encoding, pad=pad))
    assert out.dtype == np.uint8 and out.shape == (H, W, 3) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize("pad", [0, 3])
@pytest.mark.parametrize("encoding", ["rgb16", "bgr16", "rgba16", "bgra16"])
@pytest.mark.parametrize("bigendian", [False, True])
def test_colour_16bit(rgb, encoding, pad, bigendian):
    wide = rgb.astype(np.uint16) * 257
    if encoding.startswith("bgr"):
        wide = wide[:, :, ::-1]
    if "a" in encoding[3:]:
        wide = np.concatenate([wide, np.full((H, W, 1), 65535, np.uint16)], 2)
    out = decode_image_msg(make_msg(wide, encoding, pad=pad, bigendian=bigendian))
    np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize("encoding", ["mono8", "8UC1"])
def test_mono8(gray, encoding):
    np.testing.assert_array_equal(decode_image_msg(make_msg(gray, encoding, pad=2)), expand(gray))


@pytest.mark.parametrize("encoding", ["mono16", "16UC1"])
@pytest.mark.parametrize("bigendian", [False, True])
@pytest.mark.parametrize("pad", [0, 4])
def test_mono16_keeps_high_byte(gray, encoding, bigendian, pad):
    wide = gray.astype(np.uint16) * 256 + 0x7F  # low byte must not leak into the result
    out = decode_image_msg(make_msg(wide, encoding, pad=pad, bigendian=bigendian))
    np.testing.assert_array_equal(out, expand(gray))


def test_mono16_endianness_matters(gray):
    wide = gray.astype(np.uint16) * 256
    msg = make_msg(wide, "mono16", bigendian=True)
    msg.is_bigendian = 0  # same bytes read as little-endian -> high byte is the old low byte (0)
    assert decode_image_msg(msg).max() == 0


@pytest.mark.parametrize(("encoding", "dtype"), [("32FC1", np.float32), ("64FC1", np.float64)])
@pytest.mark.parametrize("bigendian", [False, True])
def test_float_scaled_and_clipped(gray, encoding, dtype, bigendian):
    values = (gray / 255.0).astype(dtype)
    values[0, 0], values[0, 1] = -3.0, 7.5  # clipped to 0 and 1
    expected = expand(gray)
    expected[0, 0], expected[0, 1] = 0, 255
    out = decode_image_msg(make_msg(values, encoding, pad=4, bigendian=bigendian))
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_float_nan_rejected(gray, bad):
    values = (gray / 255.0).astype(np.float32)
    values[2, 3] = bad
    with pytest.raises(ImageError, match="NaN or infinite"):
        decode_image_msg(make_msg(values, "32FC1"))


@pytest.mark.parametrize(
    ("encoding", "to_yuv"),
    [("yuv422", cv2.COLOR_RGB2YUV_UYVY), ("uyvy", cv2.COLOR_RGB2YUV_UYVY),
     ("yuv422_yuy2", cv2.COLOR_RGB2YUV_YUY2), ("yuyv", cv2.COLOR_RGB2YUV_YUY2)],
)
def test_yuv422(rgb, encoding, to_yuv):
    pairs = np.repeat(rgb[:, ::2], 2, axis=1)  # equal colour per pixel pair: survives 4:2:2 subsampling
    packed = cv2.cvtColor(pairs, to_yuv)
    assert packed.shape == (H, W, 2)
    out = decode_image_msg(make_msg(packed, encoding, pad=6))
    assert np.abs(out.astype(int) - pairs.astype(int)).max() <= 6


def test_yuv422_byte_order():
    # U Y0 V Y1 with neutral chroma: a dark and a bright grey pixel.
    uyvy = np.array([[[128, 50], [128, 200]]], np.uint8)
    out = decode_image_msg(make_msg(uyvy, "yuv422"))
    assert out[0, 0, 0] < 60 < 190 < out[0, 1, 0]
    assert np.ptp(out[0, 0]) <= 1 and np.ptp(out[0, 1]) <= 1
    yuyv = uyvy[:, :, ::-1].copy()  # Y0 U Y1 V
    np.testing.assert_array_equal(decode_image_msg(make_msg(yuyv, "yuv422_yuy2")), out)


def test_every_supported_encoding_is_tested():
    tested = {"rgb8", "bgr8", "8uc3", "rgba8", "bgra8", "8uc4", "rgb16", "bgr16", "rgba16", "bgra16",
              "mono8", "8uc1", "mono16", "16uc1", "32fc1", "64fc1", "yuv422", "uyvy", "yuv422_yuy2", "yuyv"}
    assert set(RAW_ENCODINGS) == tested


def test_result_owns_its_memory(rgb):
    msg = make_msg(rgb, "rgb8")
    out = decode_image_msg(msg)
    assert out.flags.writeable
    out[:] = 0
    np.testing.assert_array_equal(decode_image_msg(msg), rgb)


def test_after_serialization_round_trip(rgb):
    msg = make_msg(rgb[:, :, ::-1], "bgr8", pad=7)
    msg.header = Header(stamp=Time(sec=12, nanosec=34), frame_id="camera")
    back = deserialize_message(serialize_message(msg), Image)
    np.testing.assert_array_equal(decode_image_msg(back), rgb)


def test_data_as_plain_list(rgb):
    msg = Image(height=H, width=W, encoding="rgb8", step=W * 3, data=rgb.reshape(-1).tolist())
    np.testing.assert_array_equal(decode_image_msg(msg), rgb)


# ---------------------------------------------------------------- Image rejections


def test_reject_unsupported_encoding(rgb):
    msg = make_msg(rgb, "rgb8")
    for encoding in ("bayer_rggb8", "jpeg", "32FC3", ""):
        msg.encoding = encoding
        with pytest.raises(ImageRejected, match="is not supported") as exc:
            decode_image_msg(msg)
        assert exc.value.reason is RejectReason.UNSUPPORTED_ENCODING


def test_reject_step_too_small(rgb):
    msg = make_msg(rgb, "rgb8")
    msg.step = W * 3 - 1
    msg.data = array.array("B", bytes(msg.step * H))
    with pytest.raises(ImageError, match=r"step 29 is less than width\*bytes_per_pixel = 10\*3 = 30"):
        decode_image_msg(msg)


def test_reject_step_too_small_16bit(gray):
    msg = make_msg(gray.astype(np.uint16), "mono16")
    msg.step = W  # one byte per pixel is not enough for mono16
    msg.data = array.array("B", bytes(W * H))
    with pytest.raises(ImageError, match="less than width"):
        decode_image_msg(msg)


@pytest.mark.parametrize("delta", [-1, 1, -60])
def test_reject_data_size_mismatch(rgb, delta):
    msg = make_msg(rgb, "rgb8", pad=2)
    msg.data = array.array("B", bytes(msg.step * H + delta))
    with pytest.raises(ImageError, match=r"expected step\*height = 32\*6 = 192"):
        decode_image_msg(msg)


@pytest.mark.parametrize(("h", "w"), [(0, 10), (10, 0), (0, 0)])
def test_reject_zero_size(h, w):
    msg = Image(height=h, width=w, encoding="rgb8", step=w * 3)
    with pytest.raises(ImageRejected, match=f"empty frame {w}x{h} with 0 bytes") as exc:
        decode_image_msg(msg)
    assert exc.value.reason is RejectReason.EMPTY


def test_reject_pixel_limit_before_touching_data():
    side = int(np.sqrt(MAX_PIXELS)) + 1
    msg = Image(height=side, width=side, encoding="mono8", step=side)  # no data: checked first
    with pytest.raises(ImageRejected, match=f"exceeds max_pixels {MAX_PIXELS}") as exc:
        decode_image_msg(msg)
    assert exc.value.reason is RejectReason.TOO_LARGE


def test_reject_odd_width_yuv():
    msg = make_msg(np.zeros((2, 3, 2), np.uint8), "yuv422")
    with pytest.raises(ImageError, match="even width"):
        decode_image_msg(msg)


def test_error_names_the_source(rgb):
    msg = make_msg(rgb, "bayer_bggr8")
    with pytest.raises(ImageError, match="^/camera/image_raw: "):
        decode_image_msg(msg, name="/camera/image_raw")


# ---------------------------------------------------------------- RGB -> Image


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8"])
def test_rgb_to_image_msg_round_trip(rgb, encoding):
    header = Header(stamp=Time(sec=5, nanosec=6), frame_id="cam")
    msg = rgb_to_image_msg(rgb, encoding, header=header)
    assert (msg.height, msg.width, msg.step, msg.encoding, msg.is_bigendian) == (H, W, W * 3, encoding, 0)
    assert msg.header.frame_id == "cam" and msg.header.stamp.sec == 5
    assert isinstance(msg.data, array.array) and len(msg.data) == H * W * 3
    raw = np.frombuffer(msg.data, np.uint8).reshape(H, W, 3)
    np.testing.assert_array_equal(raw, rgb if encoding == "rgb8" else rgb[:, :, ::-1])
    np.testing.assert_array_equal(decode_image_msg(msg), rgb)


def test_rgb_to_mono8(rgb, gray):
    msg = rgb_to_image_msg(rgb, "mono8")
    assert (msg.step, len(msg.data)) == (W, H * W)
    expected = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    np.testing.assert_array_equal(np.frombuffer(msg.data, np.uint8).reshape(H, W), expected)
    exact = rgb_to_image_msg(gray, "mono8")  # 2-D uint8 input is written unchanged
    np.testing.assert_array_equal(np.frombuffer(exact.data, np.uint8).reshape(H, W), gray)
    np.testing.assert_array_equal(decode_image_msg(exact), expand(gray))


def test_rgb_to_image_msg_accepts_core_inputs(gray):
    msg = rgb_to_image_msg(gray / 255.0, "rgb8")  # float grayscale -> RGB
    np.testing.assert_array_equal(decode_image_msg(msg), expand(gray))
    assert rgb_to_image_msg(np.zeros((2, 2, 3), np.uint8)).header == Header()


def test_rgb_to_image_msg_serializes(rgb):
    msg = rgb_to_image_msg(rgb, "bgr8")
    np.testing.assert_array_equal(decode_image_msg(deserialize_message(serialize_message(msg), Image)), rgb)


def test_rgb_to_image_msg_rejections(rgb):
    with pytest.raises(ImageError, match="unsupported output encoding"):
        rgb_to_image_msg(rgb, "rgba8")
    with pytest.raises(ImageError, match="zero-size"):
        rgb_to_image_msg(np.zeros((0, 4, 3), np.uint8))
    with pytest.raises(ImageError, match="zero-size"):
        rgb_to_image_msg(np.zeros((4, 0), np.uint8), "mono8")
    with pytest.raises(ImageError):
        rgb_to_image_msg(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ImageError):
        rgb_to_image_msg("not an image")


# ---------------------------------------------------------------- CompressedImage


def test_png_round_trip_is_exact(rgb):
    msg = rgb_to_compressed_msg(rgb, "png", header=Header(frame_id="cam"))
    assert msg.format == "rgb8; png compressed bgr8" and msg.header.frame_id == "cam"
    assert bytes(msg.data[:8]) == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_array_equal(decode_image_msg(msg), rgb)


def test_jpeg_round_trip_and_quality():
    # A smooth image so JPEG error is small and size depends on quality.
    y, x = np.mgrid[0:64, 0:96]
    img = np.stack([x * 2, y * 3, (x + y)], axis=2).astype(np.uint8)
    hi = rgb_to_compressed_msg(img, "jpeg", quality=95)
    lo = rgb_to_compressed_msg(img, "jpeg", quality=10)
    assert hi.format == "rgb8; jpeg compressed bgr8"
    assert bytes(hi.data[:2]) == b"\xff\xd8" and len(lo.data) < len(hi.data)
    out = decode_image_msg(deserialize_message(serialize_message(hi), CompressedImage))
    assert out.shape == img.shape and np.abs(out.astype(int) - img.astype(int)).mean() < 2.0


def test_compressed_payload_passthrough(rgb):
    ok, buf = cv2.imencode(".png", rgb[:, :, ::-1].copy())
    assert ok
    msg = rgb_to_compressed_msg(buf.tobytes(), "png")
    assert msg.format == "png" and bytes(msg.data) == buf.tobytes()
    np.testing.assert_array_equal(decode_image_msg(msg), rgb)


def test_compressed_grayscale_png(gray):
    ok, buf = cv2.imencode(".png", gray)
    msg = CompressedImage(format="png", data=array.array("B", buf.tobytes()))
    np.testing.assert_array_equal(decode_image_msg(msg), expand(gray))


def test_corrupt_compressed_rejected(rgb):
    good = rgb_to_compressed_msg(rgb, "jpeg")
    for payload in (b"\xff\xd8\xff\xe0garbage" * 3, bytes(64), bytes(good.data[:20])):
        msg = CompressedImage(format="jpeg", data=array.array("B", payload))
        with pytest.raises(ImageError, match="not a decodable image"):
            decode_image_msg(msg)
    with pytest.raises(ImageError, match="compressed image with no data"):
        decode_image_msg(CompressedImage(format="jpeg"))
    depth = CompressedImage(format="16UC1; compressedDepth png", data=good.data)
    with pytest.raises(ImageError, match="compressedDepth"):
        decode_image_msg(depth)


def test_rgb_to_compressed_rejections(rgb):
    with pytest.raises(ImageError, match="quality"):
        rgb_to_compressed_msg(rgb, "jpeg", quality=0)
    with pytest.raises(ImageError, match="quality"):
        rgb_to_compressed_msg(rgb, "jpeg", quality=101)
    with pytest.raises(ImageError, match="unsupported compressed format"):
        rgb_to_compressed_msg(rgb, "webp2")
    with pytest.raises(ImageError, match="empty"):
        rgb_to_compressed_msg(b"", "jpeg")
    with pytest.raises(ImageError, match="zero-size"):
        rgb_to_compressed_msg(np.zeros((0, 3, 3), np.uint8))


# ---------------------------------------------------------------- stamps


@pytest.mark.parametrize("t", [0.0, 1.5, 1_700_000_000.25, 1e-9, 12.999999999, -2.25])
def test_stamp_round_trip(t):
    stamp = float_to_stamp(t)
    assert isinstance(stamp, Time) and 0 <= stamp.nanosec < 1_000_000_000
    assert to_seconds(stamp) == pytest.approx(t, abs=1e-6)


def test_stamp_exact_and_carry():
    assert float_to_stamp(3.25) == Time(sec=3, nanosec=250_000_000)
    assert float_to_stamp(-0.5) == Time(sec=-1, nanosec=500_000_000)
    assert float_to_stamp(4.9999999999) == Time(sec=5, nanosec=0)
    assert to_seconds(Time(sec=2, nanosec=500_000_000)) == 2.5
    # 1_500_000_000 ns = 1 s + 500_000_000 ns
    assert ns_to_stamp(1_500_000_000) == Time(sec=1, nanosec=500_000_000)
    assert ns_to_stamp(-1) == Time(sec=-1, nanosec=999_999_999)  # -1 ns = -1 s + 999_999_999 ns


def test_stamp_rejections():
    for bad in (float("nan"), float("inf"), 2.0**31, -(2.0**31) - 1):
        with pytest.raises(ValueError):
            float_to_stamp(bad)
