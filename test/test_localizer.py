"""The ROS-free :class:`~vpr_ros.core.localizer.Localizer` on real Nordland frames.

The model is the ImageNet-initialised student at the frames' native 32x64 size (fast on CPU), loaded
once for the module. Five summer frames 500 places apart are distinct places to it (cosine similarity
at most 0.84 between them); the same frame with +-2 grey levels of noise scores about 0.996.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from vpr_ros.core.errors import ConfigError, MapError
from vpr_ros.core.images import load_image
from vpr_ros.core.localizer import (
    Frame,
    Localizer,
    LocalizerConfig,
    ModelConfig,
    Pose,
    StampOrder,
    build_extractor,
)
from vpr_ros.core.mapdb import PlaceMap
from vpr_ros.core.sequence import SequenceConfig

T0 = 1_700_000_000.0
PLACES = (1000, 1500, 2000, 2500, 3000)  # summer frame numbers, far apart


@pytest.fixture(scope="module")
def model(torch_home):
    return build_extractor("imagenet", "", "native", "cpu", 8, backend="torch", threads=1)


@pytest.fixture(scope="module")
def frames(nordland_dir) -> list[np.ndarray]:
    return [load_image(nordland_dir / "summer" / f"images-{n:05d}.png") for n in PLACES]


def near_duplicate(image: np.ndarray) -> np.ndarray:
    """``image`` with +-2 grey levels of noise: the same place seen again."""
    noise = np.random.default_rng(0).integers(-2, 3, image.shape)
    return np.clip(image.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def localizer(model, tmp_path, **options) -> Localizer:
    ext, label = model
    options.setdefault("map_path", str(tmp_path / "places"))
    return Localizer(LocalizerConfig(**options), extractor=ext, label=label)


def test_novel_frames_become_keyframes_near_duplicates_do_not(model, frames, tmp_path):
    loc = localizer(model, tmp_path, mode="map", keyframe_every=0, novelty_threshold=0.95)
    first = loc.process(T0, frames[0])
    assert first.keyframe is not None and first.keyframe.id == 0  # an empty map: everything is novel
    again = loc.process(T0 + 1, near_duplicate(frames[0]))
    assert again.keyframe is None and again.query.scores[0] > 0.95
    other = loc.process(T0 + 2, frames[1])
    assert other.keyframe is not None and other.query.scores[0] < 0.95
    assert len(loc.place_map) == 2 and loc.keyframes_added == 2 and loc.frames == 3
    assert [e.stamp for e in loc.place_map.entries()] == [T0, T0 + 2]


def test_every_nth_frame_is_a_keyframe_with_novelty_off(model, frames, tmp_path):
    # keyframe_every 2: frames 1, 3, 5 of 5 ((count - 1) % 2 == 0), though frame 3 repeats frame 1's place
    loc = localizer(model, tmp_path, mode="map", keyframe_every=2, novelty_threshold=-1.0)
    images = [frames[0], frames[1], frames[0], frames[2], frames[3]]
    added = [loc.process(T0 + i, im).keyframe is not None for i, im in enumerate(images)]
    assert added == [True, False, True, False, True]
    assert len(loc.place_map) == 3


def test_a_map_frame_matches_its_own_place(model, frames, tmp_path):
    ext, label = model
    pmap = PlaceMap(ext.dim, model=label)
    pmap.add(ext(frames))
    loc = Localizer(LocalizerConfig(top_k=3, min_score=0.9), extractor=ext, label=label, place_map=pmap)
    results = loc.process_batch([Frame(T0 + i, near_duplicate(im)) for i, im in enumerate(frames)])
    assert [r.query.ids[0] for r in results] == list(range(len(frames)))
    assert all(len(r.query) == 3 for r in results)
    # min_score 0.9 keeps only the place itself (other places score at most 0.84)
    assert [[m.id for m in r.matches] for r in results] == [[i] for i in range(len(frames))]
    assert loc.batches == 1 and loc.frames == len(frames)
    assert len(pmap) == len(frames)  # localize mode never adds


def test_repeated_stamp_is_answered_but_not_added_twice(model, frames, tmp_path):
    loc = localizer(model, tmp_path, mode="both", keyframe_every=1)
    first = loc.process(T0, frames[0])
    resent = loc.process(T0, frames[0])
    late = loc.process(T0 - 5, frames[1])
    assert (first.order, resent.order, late.order) == (StampOrder.NEW, StampOrder.REPEATED,
                                                        StampOrder.OUT_OF_ORDER)
    assert resent.keyframe is None and late.keyframe is None
    assert resent.matches[0].id == 0 and resent.matches[0].score == pytest.approx(1.0, abs=1e-5)
    assert len(loc.place_map) == 1 and loc.keyframes_added == 1
    assert (loc.repeated_stamp, loc.out_of_order) == (1, 1)


def test_keyframes_take_the_nearest_odometry_pose(model, frames, tmp_path):
    loc = localizer(model, tmp_path, mode="map", odometry=True, odom_tolerance_s=0.05)
    assert loc.add_odometry(T0 - 0.03, Pose((1.0, 0.0, 0.0), (0.0, 0.0, 0.0, 1.0), "odom"))
    assert loc.add_odometry(T0 + 0.02, Pose((2.0, 0.0, 0.0), (0.0, 0.0, 0.0, 1.0), "odom"))
    assert not loc.add_odometry(T0 + 0.01, Pose((math.nan, 0.0, 0.0)))  # counted, not kept
    assert loc.odom_rejected == 1 and len(loc.odometry) == 2
    near = loc.process(T0, frames[0]).keyframe  # |0.02| < |-0.03|: the second pose
    assert near.position == (2.0, 0.0, 0.0) and near.frame_id == "odom"
    far = loc.process(T0 + 1.0, frames[1]).keyframe  # nearest odometry 0.98 s away > 0.05
    assert far is not None and far.position is None and loc.keyframes_without_pose == 1
    strict = localizer(model, tmp_path, map_path=str(tmp_path / "strict"), mode="map", odometry=True,
                       require_pose=True)
    assert strict.process(T0, frames[0]).keyframe is None and len(strict.place_map) == 0


def test_map_mode_save_and_load_round_trip(model, frames, tmp_path):
    builder = localizer(model, tmp_path, mode="map", source="camera", novelty_threshold=0.95)
    for i, im in enumerate(frames):
        builder.process(T0 + i, im, pose=Pose((float(i), 0.0, 0.0), (0.0, 0.0, 0.0, 1.0), "map"))
    target, n = builder.save_map()
    assert target == tmp_path / "places.vprmap" and n == len(frames)
    ext, label = model
    loaded = Localizer(LocalizerConfig(map_path=str(tmp_path / "places"), min_score=0.9), extractor=ext,
                       label=label)
    assert loaded.map_loaded and loaded.map_warning is None and len(loaded.place_map) == len(frames)
    assert [(e.stamp, e.position, e.source) for e in loaded.place_map.entries()] == [
        (T0 + i, (float(i), 0.0, 0.0), "camera") for i in range(len(frames))]
    hit = loaded.process(T0 + 10, near_duplicate(frames[3]))
    assert [m.id for m in hit.matches] == [3] and hit.matches[0].entry.position == (3.0, 0.0, 0.0)


def test_localize_mode_without_a_map_fails_before_building_the_model(tmp_path):
    missing = tmp_path / "nothing"
    with pytest.raises(MapError, match=f"no place map at {missing}.vprmap"):
        Localizer(LocalizerConfig(map_path=str(missing)), model=ModelConfig(weights=str(tmp_path / "no.pt")))


def test_sequence_matching_follows_consecutive_places(model, nordland_dir, tmp_path):
    ext, label = model
    names = [nordland_dir / "summer" / f"images-{n:05d}.png" for n in range(2000, 2100, 10)]
    pmap = PlaceMap(ext.dim, model=label)
    pmap.add(ext([load_image(p) for p in names]))
    seq = SequenceConfig(length=3, v_min=1.0, v_max=1.0, candidates=5)
    loc = Localizer(LocalizerConfig(sequence=seq), extractor=ext, label=label, place_map=pmap)
    results = [loc.process(T0 + i, near_duplicate(load_image(names[4 + i]))) for i in range(3)]
    assert [r.sequence.frames for r in results] == [1, 2, 3]
    assert [r.sequence_matches[0].id for r in results] == [4, 5, 6]
    resent = loc.process(T0 + 2, load_image(names[6]))
    assert resent.sequence is None and resent.order is StampOrder.REPEATED
    loc.reconfigure(LocalizerConfig(sequence=SequenceConfig(length=4, v_min=1.0, v_max=1.0, candidates=5)))
    assert loc.process(T0 + 3, load_image(names[7])).sequence.frames == 1  # a new setting empties the buffer
    with pytest.raises(ConfigError, match="mode cannot change"):
        loc.reconfigure(LocalizerConfig(mode="both"))
