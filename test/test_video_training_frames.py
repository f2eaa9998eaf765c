"""Video links in training: a lone frame is sent as a live stream sends most frames, inter-coded (a P-frame
predicted from the frame before it); intra-only (every frame a keyframe) is the ``gop:1`` option."""

from __future__ import annotations

import numpy as np

from vpr_ros.core.transmission import TransmissionConfig, degrade_image, degrade_sequence, predecessor_frame
from vpr_ros.training.data import Degrader


def _frame(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, 64 * 32 * 3).reshape(32, 64, 3)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def test_video_training_frames_are_inter_coded_and_intra_is_an_option():
    frame = _frame()
    inter = degrade_image(frame, TransmissionConfig.parse("h264:40"))
    assert not inter.keyframe
    # the second frame of the stream (synthetic predecessor, then the frame), byte for byte
    images, sizes = degrade_sequence([predecessor_frame(frame), frame], TransmissionConfig.parse("h264:40"))
    assert np.array_equal(inter.image, images[1]) and inter.nbytes == sizes[1]
    intra = degrade_image(frame, TransmissionConfig.parse("h264:40+gop:1"))
    assert intra.keyframe and not np.array_equal(intra.image, inter.image)
    # with the real frames before it (the last gop - 1 of them), the same as that stream's last frame
    prev = [np.roll(frame, k, axis=1) for k in (3, 2, 1)]  # a slow pan (noise frames would be scene cuts)
    got = degrade_image(frame, TransmissionConfig.parse("h264:40+gop:3"), previous=prev)
    want, _ = degrade_sequence([*prev[-2:], frame], TransmissionConfig.parse("h264:40+gop:3"))
    assert not got.keyframe and np.array_equal(got.image, want[-1])
    # JPEG is unchanged: one image
    assert degrade_image(frame, TransmissionConfig.parse("jpeg:10")).keyframe


def test_training_degrader_sends_inter_coded_frames():
    frame = _frame(4)
    via_degrader = Degrader(["h264:40"])(frame, np.random.default_rng(0))
    assert np.array_equal(via_degrader, degrade_image(frame, TransmissionConfig.parse("h264:40")).image)
    intra = Degrader(["h264:40+gop:1"])(frame, np.random.default_rng(0))
    assert not np.array_equal(via_degrader, intra)
