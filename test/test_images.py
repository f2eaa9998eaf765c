"""The core's single image gate: every accepted layout, every rejection with its reason."""

from __future__ import annotations

import numpy as np
import pytest

from vpr_ros.core.errors import ImageError
from vpr_ros.core.images import MAX_PIXELS, as_rgb8, decode_image, encode_png, load_image, save_image


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
