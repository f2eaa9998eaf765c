"""Tests of the transmission simulator on real KITTI frames (320 px wide, odd height 97)."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from vpr_ros.core.errors import ImageError, TransmissionError
from vpr_ros.core.images import decode_image, load_image
from vpr_ros.core.transmission import (
    TransmissionConfig,
    TransmittedFrame,
    Transmitter,
    degrade_image,
    degrade_sequence,
    encode_jpeg,
    psnr,
)

N_FRAMES = 20


@pytest.fixture(scope="module")
def frames(kitti_dir: Path) -> list[np.ndarray]:
    """The first 20 frames of KITTI 00, downscaled to 320x97 RGB."""
    files = sorted((kitti_dir / "00" / "image_0").glob("*.jpg"))[:N_FRAMES]
    assert len(files) == N_FRAMES
    out = []
    for f in files:
        img = load_image(f)
        out.append(np.ascontiguousarray(cv2.resize(img, (320, 97), interpolation=cv2.INTER_AREA)))
    return out


def run(frames: list[np.ndarray], spec: str) -> tuple[list[TransmittedFrame], dict, float]:
    """Send frames as one stream; return the frames, stats and mean PSNR."""
    tx = Transmitter(TransmissionConfig.parse(spec))
    outs = [tx.process(f) for f in frames]
    return outs, tx.stats, float(np.mean([psnr(f, o.image) for f, o in zip(frames, outs, strict=True)]))


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "label"),
    [
        ("none", "none"),
        ("jpeg:10", "jpeg_q10"),
        ("resize:0.25", "res_0.25"),
        ("h264:40", "h264_qp40"),
        ("h265:40", "h265_qp40"),
        ("kbps:200@10", "kbps200@10fps"),
        ("kbps:200", "kbps200@10fps"),
        ("kbps:200@10:h264", "kbps200@10fps_h264"),
        ("KBPS:64.5@7.5:h265+gop:5", "kbps64.5@7.5fps_h265_gop5"),
        ("jpeg:10+resize:0.5", "jpeg_q10_res_0.5"),
        ("h264:40+gop:10+preset:ultrafast+resize:0.5+noup", "h264_qp40_gop10_ultrafast_res_0.5_noup"),
        ("resize:0.5+upscale:false", "res_0.5_noup"),
    ],
)
def test_parse_label_round_trip(spec: str, label: str) -> None:
    cfg = TransmissionConfig.parse(spec)
    assert cfg.label == label
    assert TransmissionConfig.parse(label) == cfg
    assert TransmissionConfig.from_dict(cfg.to_dict()) == cfg


def test_parse_fields() -> None:
    cfg = TransmissionConfig.parse("kbps:200@5:h264")
    assert (cfg.mode, cfg.kbps, cfg.fps, cfg.bitrate_codec) == ("bitrate", 200.0, 5.0, "h264")
    assert cfg.budget_bytes == pytest.approx(200 * 1000 / 8 / 5)
    assert cfg.video_codec == "h264"
    cfg = TransmissionConfig.parse("h265:45+resize:0.5")
    assert (cfg.mode, cfg.qp, cfg.scale, cfg.video_codec) == ("h265", 45, 0.5, "h265")
    assert TransmissionConfig.parse("jpeg:10").video_codec is None
    assert TransmissionConfig.parse("resize:0.25") == TransmissionConfig(mode="resize", scale=0.25)


def test_labels_differ_when_outputs_differ() -> None:
    specs = [
        "none",
        "jpeg:10",
        "jpeg:11",
        "resize:0.5",
        "resize:0.5+noup",
        "h264:40",
        "h265:40",
        "h264:40+gop:10",
        "h264:40+preset:fast",
        "kbps:200@10",
        "kbps:200@5",
        "kbps:200@10:h264",
    ]
    labels = [TransmissionConfig.parse(s).label for s in specs]
    assert len(set(labels)) == len(labels)


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("", "empty"),
        ("jpeg", "needs a value"),
        ("jpeg:", "needs a value"),
        ("jpeg:0", "1..100"),
        ("jpeg:101", "1..100"),
        ("jpeg:10.5", "not an integer"),
        ("jpeg:abc", "not an integer"),
        ("resize:0", "(0, 1]"),
        ("resize:1.5", "(0, 1]"),
        ("resize:nan", "not a number"),
        ("h264:52", "0..51"),
        ("h264:-1", "qp must be in 0..51, got -1"),
        ("h266:30", "unknown part 'h266'"),
        ("kbps:0@10", "kbps must be > 0"),
        ("kbps:200@0", "fps must be a positive"),
        ("kbps:200@10:vp9", "bitrate_codec"),
        ("jpeg:10+h264:30", "two transmission modes"),
        ("jpeg:10+gop:5+gop:6", "gop given twice"),
        ("h264:30+preset:turbo", "unknown preset"),
        ("h264:30+gop:0", "gop"),
        ("none+resize:0.5", "use mode 'resize'"),
        ("foo", "unknown part 'foo'"),
        ("jpeg:10+", "empty part"),
    ],
)
def test_bad_specs(spec: str, needle: str) -> None:
    with pytest.raises(TransmissionError, match="bad transmission spec|empty transmission spec") as err:
        TransmissionConfig.parse(spec)
    assert needle in str(err.value)


def test_parse_rejects_non_string() -> None:
    with pytest.raises(TransmissionError, match="must be a string"):
        TransmissionConfig.parse(10)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"mode": "webp"}, "unknown transmission mode"),
        ({"mode": "jpeg", "jpeg_quality": 0}, "jpeg_quality"),
        ({"mode": "jpeg", "jpeg_quality": True}, "jpeg_quality must be an integer"),
        ({"mode": "h264", "qp": 30.5}, "qp must be an integer"),
        ({"mode": "h264", "qp": 60}, "qp must be in 0..51"),
        ({"mode": "resize", "scale": -0.5}, "scale"),
        ({"mode": "resize", "scale": float("inf")}, "scale"),
        ({"mode": "resize", "scale": 0.5, "upscale": "maybe"}, "upscale"),
        ({"mode": "bitrate"}, "needs a budget"),
        ({"mode": "bitrate", "kbps": 0.5, "bitrate_codec": "h264"}, ">= 1 kbps"),
        ({"mode": "h264", "fps": float("nan")}, "fps"),
        ({"mode": "h264", "gop": 0}, "gop"),
    ],
)
def test_config_validation(kwargs: dict, needle: str) -> None:
    with pytest.raises(TransmissionError) as err:
        TransmissionConfig(**kwargs)
    assert needle in str(err.value)


def test_from_dict() -> None:
    cfg = TransmissionConfig.from_dict({"mode": "h264", "qp": 40.0, "scale": 1, "upscale": "false"})
    assert cfg == TransmissionConfig(mode="h264", qp=40, upscale=False)
    assert isinstance(cfg.qp, int) and isinstance(cfg.scale, float)
    assert TransmissionConfig.from_dict({}) == TransmissionConfig()
    with pytest.raises(TransmissionError, match="quality, speed"):
        TransmissionConfig.from_dict({"mode": "jpeg", "speed": 1, "quality": 5})
    with pytest.raises(TransmissionError, match="mapping"):
        TransmissionConfig.from_dict(["jpeg"])  # type: ignore[arg-type]
    with pytest.raises(TransmissionError, match="mode must be a string"):
        TransmissionConfig.from_dict({"mode": 3})


# --- still-image modes -----------------------------------------------------------------------


def test_none_is_identity(frames: list[np.ndarray]) -> None:
    out = degrade_image(frames[0], TransmissionConfig())
    assert np.array_equal(out.image, frames[0])
    assert out.nbytes == frames[0].nbytes and out.payload is None and out.keyframe
    assert not np.shares_memory(out.image, frames[0])  # the receiver's copy, not the sender's frame


def test_jpeg_bytes_and_psnr_fall_with_quality(frames: list[np.ndarray]) -> None:
    results = {q: run(frames[:5], f"jpeg:{q}") for q in (90, 50, 10)}
    sizes = [results[q][1]["mean_bytes"] for q in (90, 50, 10)]
    quals = [results[q][2] for q in (90, 50, 10)]
    assert sizes[0] > sizes[1] > sizes[2]
    assert quals[0] > quals[1] > quals[2]
    assert quals[2] < 30.0  # q10 is visibly degraded
    out = results[10][0][0]
    assert out.quality == 10 and out.keyframe and out.bitstream is None
    # The payload is a standalone JPEG that decodes to exactly what the receiver saw.
    assert out.payload is not None and out.payload[:2] == b"\xff\xd8" and out.nbytes == len(out.payload)
    assert np.array_equal(decode_image(out.payload), out.image)


@pytest.mark.parametrize(("scale", "small"), [(0.5, (49, 160)), (0.25, (24, 80))])
def test_resize_restores_size(frames: list[np.ndarray], scale: float, small: tuple[int, int]) -> None:
    frame = frames[0]
    out = degrade_image(frame, TransmissionConfig(mode="resize", scale=scale))
    assert out.image.shape == frame.shape and out.image.dtype == np.uint8
    assert out.nbytes == small[0] * small[1] * 3
    assert 15.0 < psnr(frame, out.image) < 40.0
    kept = degrade_image(frame, TransmissionConfig(mode="resize", scale=scale, upscale=False))
    assert kept.image.shape == (*small, 3)
    expected = cv2.resize(frame, (small[1], small[0]), interpolation=cv2.INTER_AREA)
    assert np.array_equal(kept.image, expected)


def test_resize_quarter_worse_than_half(frames: list[np.ndarray]) -> None:
    half, quarter = run(frames[:3], "resize:0.5"), run(frames[:3], "resize:0.25")
    assert quarter[1]["total_bytes"] * 4 == pytest.approx(half[1]["total_bytes"], rel=0.05)
    assert quarter[2] < half[2]


def test_jpeg_combined_with_resize(frames: list[np.ndarray]) -> None:
    out = degrade_image(frames[0], TransmissionConfig.parse("jpeg:50+resize:0.5"))
    assert out.image.shape == frames[0].shape
    assert out.payload is not None and decode_image(out.payload).shape == (49, 160, 3)


# --- video modes -----------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["h264", "h265"])
def test_video_qp_trades_bytes_for_quality(frames: list[np.ndarray], codec: str) -> None:
    low_q, high_q = run(frames, f"{codec}:30"), run(frames, f"{codec}:50")
    outs, stats, quality = low_q
    assert all(o.image.shape == frames[0].shape and o.image.dtype == np.uint8 for o in outs)
    assert stats["frames"] == N_FRAMES and stats["total_bytes"] == sum(o.nbytes for o in outs)
    assert outs[0].keyframe and stats["keyframes"] < N_FRAMES // 2
    assert outs[1].nbytes < outs[0].nbytes  # P-frames cost less than the keyframe
    assert all(o.payload is None and o.bitstream is not None and len(o.bitstream) == o.nbytes for o in outs)
    assert high_q[1]["total_bytes"] < stats["total_bytes"] / 3
    assert high_q[2] < quality - 5.0
    assert 28.0 < quality < 40.0
    assert stats["mean_quality"] == pytest.approx(30, abs=3)
    assert stats["kbps"] == pytest.approx(stats["mean_bytes"] * 8 * 10 / 1000)


@pytest.mark.parametrize("codec", ["h264", "h265"])
def test_video_gop(frames: list[np.ndarray], codec: str) -> None:
    outs, stats, _ = run(frames[:12], f"{codec}:35+gop:5")
    assert [i for i, o in enumerate(outs) if o.keyframe] == [0, 5, 10]
    assert stats["keyframes"] == 3


@pytest.mark.parametrize("spec", ["h264:35", "h265:35", "kbps:150@10:h264", "kbps:150@10:h265"])
def test_video_deterministic(frames: list[np.ndarray], spec: str) -> None:
    first, second = run(frames[:8], spec)[0], run(frames[:8], spec)[0]
    for a, b in zip(first, second, strict=True):
        assert a.bitstream == b.bitstream
        assert np.array_equal(a.image, b.image)
    tx = Transmitter(TransmissionConfig.parse(spec))
    for f in frames[:3]:
        tx.process(f)
    tx.reset()
    assert tx.stats["frames"] == 0
    again = [tx.process(f) for f in frames[:8]]
    assert [o.bitstream for o in again] == [o.bitstream for o in first]


@pytest.mark.parametrize("codec", ["h264", "h265"])
def test_video_odd_and_tiny_sizes(frames: list[np.ndarray], codec: str) -> None:
    crop = np.ascontiguousarray(frames[0][10:43, 21:122])  # 33x101
    tx = Transmitter(TransmissionConfig(mode=codec, qp=10))
    out = tx.process(crop)
    assert out.image.shape == crop.shape
    assert psnr(crop, out.image) > 35.0  # padded and cropped back in place, not shifted
    for shape in [(1, 1, 3), (3, 5, 3), (15, 9, 3)]:
        tiny = np.full(shape, 77, np.uint8)
        got = tx.process(tiny)
        assert got.image.shape == shape and got.keyframe
        assert np.abs(got.image.astype(int) - 77).max() <= 3


@pytest.mark.parametrize("codec", ["h264", "h265"])
def test_video_size_change_restarts_stream(frames: list[np.ndarray], codec: str) -> None:
    small = [np.ascontiguousarray(cv2.resize(f, (160, 49), interpolation=cv2.INTER_AREA)) for f in frames[:6]]
    stream = frames[:3] + small[3:6] + frames[6:8]
    tx = Transmitter(TransmissionConfig(mode=codec, qp=30))
    outs = [tx.process(f) for f in stream]
    assert [o.image.shape for o in outs] == [f.shape for f in stream]
    assert [o.keyframe for o in outs] == [True, False, False, True, False, False, True, False]
    assert tx.stats["restarts"] == 2
    assert all(psnr(f, o.image) > 28.0 for f, o in zip(stream, outs, strict=True))


def test_video_with_resize(frames: list[np.ndarray]) -> None:
    outs, stats, quality = run(frames[:5], "h264:30+resize:0.5")
    full = run(frames[:5], "h264:30")
    assert outs[0].image.shape == frames[0].shape
    assert stats["total_bytes"] < full[1]["total_bytes"] and quality < full[2]
    kept = degrade_image(frames[0], TransmissionConfig.parse("h264:30+resize:0.5+noup"))
    assert kept.image.shape == (49, 160, 3)


# --- bitrate mode ----------------------------------------------------------------------------


def test_bitrate_jpeg_fits_each_frame(frames: list[np.ndarray]) -> None:
    cfg = TransmissionConfig.parse("kbps:200@10")
    budget = cfg.budget_bytes
    assert budget == 2500
    tx = Transmitter(cfg)
    outs = [tx.process(f) for f in frames[:8]]
    for frame, out in zip(frames[:8], outs, strict=True):
        assert out.nbytes <= budget
        q = int(out.quality)
        assert 1 <= q < 100 and len(encode_jpeg(frame, q + 1)) > budget  # the highest quality that fits
    assert tx.stats["over_budget"] == 0
    assert 0.8 * budget < tx.stats["mean_bytes"] <= budget
    assert tx.stats["kbps"] <= 200


def test_bitrate_jpeg_over_budget_counted(frames: list[np.ndarray]) -> None:
    tx = Transmitter(TransmissionConfig.parse("kbps:8@10"))  # 100 bytes/frame: not even q1 fits
    outs = [tx.process(f) for f in frames[:3]]
    assert all(o.quality == 1 and o.nbytes > 100 for o in outs)
    assert tx.stats["over_budget"] == 3


@pytest.mark.parametrize("codec", ["h264", "h265"])
def test_bitrate_video_meets_budget(frames: list[np.ndarray], codec: str) -> None:
    tight, tight_stats, tight_q = run(frames, f"kbps:60@10:{codec}")
    loose, loose_stats, loose_q = run(frames, f"kbps:250@10:{codec}")
    for stats, kbps in ((tight_stats, 60), (loose_stats, 250)):
        assert stats["kbps"] == pytest.approx(kbps, rel=0.2)
        assert stats["budget_bytes"] == pytest.approx(kbps * 1000 / 8 / 10)
        assert stats["over_budget"] == 0
    assert loose_q > tight_q + 3.0
    assert tight_stats["mean_quality"] > loose_stats["mean_quality"]  # the encoder raised the QP


# --- helpers and bad input -------------------------------------------------------------------


def test_degrade_sequence_and_image(frames: list[np.ndarray]) -> None:
    cfg = TransmissionConfig.parse("h264:40")
    images, sizes = degrade_sequence(iter(frames[:4]), cfg)
    outs = run(frames[:4], "h264:40")[0]
    assert sizes == [o.nbytes for o in outs]
    assert all(np.array_equal(a, o.image) for a, o in zip(images, outs, strict=True))
    single = degrade_image(frames[0], TransmissionConfig.parse("h264:40+gop:1"))  # intra-only
    assert single.keyframe and np.array_equal(single.image, images[0])  # the stream's first frame
    assert not degrade_image(frames[1], cfg).keyframe  # gop 30: inter-coded (test_video_training_frames.py)


def test_accepts_grey_and_float_frames(frames: list[np.ndarray]) -> None:
    grey = frames[0][:, :, 0]
    out = degrade_image(grey, TransmissionConfig.parse("jpeg:90"))
    assert out.image.shape == (97, 320, 3)
    as_float = degrade_image(grey.astype(np.float32) / 255.0, TransmissionConfig.parse("jpeg:90"))
    assert np.array_equal(as_float.image, out.image)


@pytest.mark.parametrize("spec", ["jpeg:50", "h264:30", "h265:30", "kbps:100@10"])
@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((0, 5, 3), np.uint8),
        np.zeros((4, 0), np.uint8),
        np.zeros((4, 4, 3), np.int32),
        np.full((4, 4, 3), np.nan, np.float32),
        np.zeros((4, 4, 2), np.uint8),
        [[1, 2], [3, 4]],
    ],
    ids=["empty", "zero-width", "int32", "nan", "2-channel", "list"],
)
def test_bad_frames_raise_image_error(spec: str, bad: object) -> None:
    tx = Transmitter(TransmissionConfig.parse(spec))
    with pytest.raises(ImageError):
        tx.process(bad)  # type: ignore[arg-type]
    assert tx.stats["frames"] == 0


def test_transmitter_needs_config() -> None:
    with pytest.raises(TransmissionError, match="TransmissionConfig"):
        Transmitter("jpeg:10")  # type: ignore[arg-type]


def test_psnr() -> None:
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    assert psnr(a, b) == math.inf
    b[0, 0, 0] = 255
    assert psnr(a, b) == pytest.approx(10 * math.log10(48))
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(a, a[:2])


def test_received_image_is_the_frame_itself_without_a_link():
    from vpr_ros.core.transmission import TransmissionConfig, degrade_image, received_image

    frame = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    assert received_image(frame, TransmissionConfig(mode="none")) is frame  # no encoding, no copy
    jpeg = TransmissionConfig(mode="jpeg", jpeg_quality=10)
    got = received_image(frame, jpeg)
    assert got.shape == frame.shape and not np.array_equal(got, frame)
    assert np.array_equal(got, degrade_image(frame, jpeg).image)
