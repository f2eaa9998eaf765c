"""Sequence matching (vpr_ros.core.sequence): formulas on tiny matrices worked by hand, the streaming
matcher against the dense reference, and stop-and-go on real Nordland frames."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vpr_ros.core.errors import ConfigError
from vpr_ros.core.sequence import (
    SequenceConfig,
    SequenceMatcher,
    contrast_normalise,
    dense_sequence_scores,
    match_stream,
    signed_step,
    velocities,
)

# ---------------------------------------------------------------- contrast enhancement


def test_contrast_normalise_whole_column_by_hand():
    # [1, 2, 3, 4]: mean 2.5; population variance (1.5^2 + 0.5^2 + 0.5^2 + 1.5^2) / 4 = 1.25
    out = contrast_normalise(np.array([1.0, 2.0, 3.0, 4.0]))
    std = math.sqrt(1.25)
    np.testing.assert_allclose(out, [-1.5 / std, -0.5 / std, 0.5 / std, 1.5 / std], atol=1e-12)


def test_contrast_normalise_local_window_by_hand():
    # window 3 over [1, 2, 4, 8] (clipped at the ends):
    #   place 0: {1, 2}     mean 1.5,  std 0.5                          -> (1 - 1.5) / 0.5 = -1
    #   place 1: {1, 2, 4}  mean 7/3,  var 21/3 - 49/9 = 14/9           -> (2 - 7/3) / sqrt(14/9)
    #   place 2: {2, 4, 8}  mean 14/3, var 84/3 - 196/9 = 56/9         -> (4 - 14/3) / sqrt(56/9)
    #   place 3: {4, 8}     mean 6,    std 2                            -> (8 - 6) / 2 = 1
    out = contrast_normalise(np.array([1.0, 2.0, 4.0, 8.0]), window=3)
    expected = [-1.0, (2 - 7 / 3) / math.sqrt(14 / 9), (4 - 14 / 3) / math.sqrt(56 / 9), 1.0]
    np.testing.assert_allclose(out, expected, atol=1e-12)
    # rows of a matrix are normalised independently; a flat neighbourhood gives 0, not NaN
    both = contrast_normalise(np.array([[1.0, 2.0, 4.0, 8.0], [5.0, 5.0, 5.0, 5.0]]), window=3)
    np.testing.assert_allclose(both[0], expected, atol=1e-12)
    assert np.all(both[1] == 0.0)
    with pytest.raises(ConfigError):
        contrast_normalise(np.ones(4), window=0)


# ---------------------------------------------------------------- velocities and line scores


def test_velocities_step_keeps_far_ends_one_place_apart():
    # span 19 (L = 20): ceil(0.45 * 19 = 8.55) + 1 = 10 values, step 0.45 / 9 = 0.05
    v = velocities(0.8, 1.25, 19)
    np.testing.assert_allclose(v, [0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15, 1.2, 1.25], atol=1e-12)
    assert np.max(np.diff(v)) * 19 <= 1.0 + 1e-9
    np.testing.assert_allclose(velocities(0.8, 1.25, 4), [0.8, 1.025, 1.25])  # ceil(1.8) + 1 = 3
    np.testing.assert_allclose(velocities(0.8, 1.25, 0), [1.025])  # one frame: one line
    np.testing.assert_allclose(velocities(1.0, 1.0, 10), [1.0])
    assert len(velocities(0.0, 10.0, 100, cap=16)) == 16


def test_dense_line_scores_by_hand():
    # 3 frames (oldest first) x 5 places, already normalised; the robot moves one place per frame.
    s = np.array([[1.0, 0, 0, 0, 0],
                  [0, 1.0, 0, 0, 0],
                  [0, 0, 1.0, 0, 0]])
    scores, best_v = dense_sequence_scores(s, [1.0], floor=-1.0)
    # end j, v = 1: points t2 -> j, t1 -> j - 1, t0 -> j - 2; before place 0 the floor (-1):
    #   j=0: (0 + -1 + -1) / 3 = -2/3;  j=1: (0 + 0 + -1) / 3 = -1/3;  j=2: (1 + 1 + 1) / 3 = 1
    #   j=3: (0 + 0 + 0) / 3 = 0;       j=4: 0
    np.testing.assert_allclose(scores, [-2 / 3, -1 / 3, 1.0, 0.0, 0.0], atol=1e-12)
    assert np.all(best_v == 1.0)
    # with v = 0 as well: a standing line through column j scores the column mean, 1/3 for j = 0..2
    scores, best_v = dense_sequence_scores(s, [0.0, 1.0], floor=-1.0)
    np.testing.assert_allclose(scores, [1 / 3, 1 / 3, 1.0, 0.0, 0.0], atol=1e-12)
    np.testing.assert_array_equal(best_v, [0.0, 0.0, 1.0, 0.0, 0.0])  # ties keep the first velocity
    # positions: the middle frame was at the same place as the newest (stopped): shifts 2 and 0
    scores, _ = dense_sequence_scores(s, [1.0], positions=[0.0, 2.0, 2.0], floor=-1.0)
    # j=2: t2 -> 2 (1), t1 -> 2 (0), t0 -> 0 (1): 2/3
    assert scores[2] == pytest.approx(2 / 3)


def test_streaming_scores_by_hand_beat_a_wrong_single_frame():
    # top-2 per frame; z-score over the two candidates: (s - mean) / std -> [+1, -1], floor -1
    #   frame 0: ids [0, 3] scores [0.9, 0.5]: mean 0.7,  std 0.2
    #   frame 1: ids [1, 4] scores [0.8, 0.6]: mean 0.7,  std 0.1
    #   frame 2: ids [0, 2] scores [0.7, 0.6]: mean 0.65, std 0.05  (its single-frame best, 0, is wrong)
    m = SequenceMatcher(SequenceConfig(length=3, v_min=1.0, v_max=1.0, candidates=2, track=False))
    m.push([0, 3], [0.9, 0.5])
    m.push([1, 4], [0.8, 0.6])
    r = m.push([0, 2], [0.7, 0.6])
    # end 2: t2 place 2 -> -1, t1 place 1 -> +1, t0 place 0 -> +1: mean 1/3
    # end 0: t2 place 0 -> +1, t1 place -1 -> floor -1, t0 place -2 -> floor -1: mean -1/3
    assert r.ids.tolist() == [2, 0]
    np.testing.assert_allclose(r.scores, [1 / 3, -1 / 3], atol=1e-6)
    assert r.single_ids.tolist() == [0, 2] and r.single_scores[0] == pytest.approx(0.7)
    assert r.frames == 3 and r.velocity == 1.0 and not r.fallback
    assert r.support == pytest.approx(1.0)  # all three points of the winning line were candidates
    assert r.best == 2 and r.score == pytest.approx(1 / 3)


def test_streaming_equals_dense_reference_when_k_is_the_whole_map():
    rng = np.random.default_rng(3)
    n_places, n_frames, length = 40, 25, 8
    sim = rng.normal(0.0, 0.1, (n_frames, n_places))
    sim[np.arange(n_frames), 5 + np.arange(n_frames)] += 0.5  # the true place advances 1 per frame
    m = SequenceMatcher(SequenceConfig(length=length, candidates=n_places))
    for t in range(n_frames):
        order = np.argsort(-sim[t])
        r = m.push(order, sim[t][order])
        rows = contrast_normalise(sim[max(0, t - length + 1) : t + 1])  # whole-column z-score
        dense, _ = dense_sequence_scores(rows, velocities(0.8, 1.25, len(rows) - 1), floor=rows.min(1))
        np.testing.assert_allclose(r.scores, np.sort(dense)[::-1], atol=1e-5)
        assert r.best == int(np.argmax(dense)) == 5 + t


def test_tracking_keeps_the_line_through_a_frame_that_misses_it():
    # every frame's top-3 holds the true place 10 + t, except frame 6 whose candidates are all wrong
    m = SequenceMatcher(SequenceConfig(length=5, candidates=3, track=True))
    m_off = SequenceMatcher(SequenceConfig(length=5, candidates=3, track=False))
    for t in range(8):
        ids = [40 + t, 50 + t, 60 + t] if t == 6 else [10 + t, 30 + t, 70 - t]
        scores = [0.9, 0.8, 0.7]
        r, r_off = m.push(ids, scores), m_off.push(ids, scores)
    assert r.best == 17  # frame 7 (its own top-1 is right as well)
    # at frame 6 itself: with tracking the continuation 16 is scored and wins
    m2 = SequenceMatcher(SequenceConfig(length=5, candidates=3, track=True))
    m2_off = SequenceMatcher(SequenceConfig(length=5, candidates=3, track=False))
    for t in range(7):
        ids = [40 + t, 50 + t, 60 + t] if t == 6 else [10 + t, 30 + t, 70 - t]
        r, r_off = m2.push(ids, [0.9, 0.8, 0.7]), m2_off.push(ids, [0.9, 0.8, 0.7])
    assert r.best == 16 and 16 not in r_off.ids.tolist()


# ---------------------------------------------------------------- positions, stops, reversal, fallback


def test_stopped_frames_replace_the_last_buffered_one():
    m = SequenceMatcher(SequenceConfig(length=4, candidates=2, min_step=0.5))
    m.push([0, 9], [0.9, 0.1], position=0.0)
    m.push([1, 9], [0.9, 0.1], position=1.0)
    r = m.push([1, 8], [0.9, 0.1], position=1.2)  # moved 0.2 < min_step: replaces the frame at 1.0
    assert len(m) == 2 and r.frames == 2
    m.push([1, 8], [0.9, 0.1], position=1.4)
    r = m.push([2, 8], [0.9, 0.1], position=1.6)  # 0.6 from the buffered 1.0: a new frame
    assert len(m) == 3 and r.best == 2


def test_signed_odometry_positions_follow_a_reversal():
    # forward over places 0..5, then back to 2; positions = signed travelled distance (1 m per place)
    path = [0, 1, 2, 3, 4, 5, 4, 3, 2]
    m = SequenceMatcher(SequenceConfig(length=6, candidates=2))
    for p in path:
        r = m.push([p, 20 + p], [0.9, 0.2], position=float(p))
    # buffered positions 3, 4, 5, 4, 3, 2: in position space the line of velocity 1 ending at place 2
    # goes back through every frame's own place (2 - round(v * (2 - x_t)) = x_t)
    assert r.best == 2 and r.support == pytest.approx(1.0)
    assert signed_step((0, 0, 0), (3, 4, 0), (0, 0, 0, 1)) == pytest.approx(5.0)
    assert signed_step((0, 0, 0), (3, 4, 0), (0, 0, 1, 0)) == pytest.approx(-5.0)  # facing -x: backwards
    assert signed_step((1, 1, 1), (1, 1, 1), (0, 0, 0, 1)) == 0.0
    assert signed_step((0, 0, 0), (-2, 0, 0)) == pytest.approx(2.0)  # no orientation: forward


def test_reverse_option_finds_a_backwards_line():
    # the robot drives backwards through the map (place 20 - t) with frame counting
    fwd = SequenceMatcher(SequenceConfig(length=6, candidates=2, track=False))
    both = SequenceMatcher(SequenceConfig(length=6, candidates=2, track=False, reverse=True))
    for t in range(6):
        ids, scores = ([20 - t, 3 * t + 1] if t < 5 else [30, 20 - t]), [0.9, 0.5]
        r_f, r_b = fwd.push(ids, scores), both.push(ids, scores)
    assert r_b.best == 15 and r_b.velocity < 0  # the last frame's top-1 (30) is wrong
    assert r_f.best != 15


def test_fallback_reports_the_single_frame_result():
    m = SequenceMatcher(SequenceConfig(length=3, candidates=2, min_score=5.0))  # z-scores never reach 5
    r = m.push([7, 3], [0.6, 0.4])
    assert r.fallback and r.ids.tolist() == [7, 3] and r.scores[0] == pytest.approx(0.6)
    empty = m.push([-1, -1], [-np.inf, -np.inf])  # nothing retrieved
    assert empty.fallback and empty.best == -1 and math.isnan(empty.score)


def test_match_stream_and_bad_inputs():
    ids = np.array([[0, 5], [1, 5], [2, 5]])
    scores = np.array([[0.9, 0.1], [0.9, 0.1], [0.9, 0.1]])
    out_ids, out_scores = match_stream(ids, scores, SequenceConfig(length=3, candidates=2), k=3)
    assert out_ids[:, 0].tolist() == [0, 1, 2] and out_ids.shape == (3, 3)
    assert np.isfinite(out_scores[:, 0]).all()
    m = SequenceMatcher(SequenceConfig(length=2, candidates=2))
    with pytest.raises(ValueError, match="duplicate"):
        m.push([1, 1], [0.5, 0.4])
    with pytest.raises(ValueError, match="shape"):
        m.push([1, 2], [0.5])
    with pytest.raises(ValueError, match="finite"):
        m.push([1, 2], [0.5, 0.4], position=math.nan)
    for bad in ({"length": 0}, {"v_min": 2.0, "v_max": 1.0}, {"candidates": 0}, {"min_step": -1.0},
                {"v_max": math.inf}, {"min_score": math.nan}):
        with pytest.raises(ConfigError):
            SequenceConfig(**bad)


# ---------------------------------------------------------------- real frames: stop-and-go


#: per 100-frame block of held-out places: forward 0..40, stop 15 frames, reverse to 25, stop 10 frames,
#: forward to 99 (place offsets within the block)
_PATTERN = list(range(0, 41)) + [40] * 15 + list(range(39, 24, -1)) + [25] * 10 + list(range(26, 100))
_SEGMENTS = ["forward"] * 41 + ["stop"] * 15 + ["reverse"] * 15 + ["stop"] * 10 + ["forward"] * 74


@pytest.fixture(scope="module")
def nordland_similarities(nordland_dir):
    """Held-out Nordland places, winter queries through JPEG q10, the Nordland LoQI student: (S, truth)."""
    from vpr_ros.core.extract import DescriptorExtractor
    from vpr_ros.core.models import resolve_model
    from vpr_ros.core.models.resolve import PACKAGED
    from vpr_ros.core.transmission import TransmissionConfig, Transmitter
    from vpr_ros.data.places import load_nordland
    from vpr_ros.studies.accuracy import held_out_split, is_held_out

    split = held_out_split()
    if split is None or not PACKAGED["loqi"].is_file():
        pytest.skip("needs the packaged LoQI student and its place split")
    import torch

    ds = load_nordland(nordland_dir)
    db = [r for r in ds.database if is_held_out(r.frame_index, split)]
    qs = [r for r in ds.queries if is_held_out(r.frame_index, split)]
    threads = torch.get_num_threads()
    try:  # one thread: on busy shared cores OpenMP's spinning workers make 2 threads far slower
        ext = DescriptorExtractor(resolve_model("loqi"), device="cpu", batch_size=64, threads=1)
        tx = Transmitter(TransmissionConfig.parse("jpeg:10"))
        q = ext([tx.process(r.load()).image for r in qs])
        sim = q @ ext([r.load() for r in db]).T
    finally:
        torch.set_num_threads(threads)
    frames_db = np.array([r.frame_index for r in db])
    frames_q = np.array([r.frame_index for r in qs])
    return sim, np.abs(frames_q[:, None] - frames_db[None, :]) <= 2  # the study's +-2 frames


def _top(sim: np.ndarray, k: int = 50) -> tuple[np.ndarray, np.ndarray]:
    ids = np.argsort(-sim, 1)[:, :k]
    return ids, np.take_along_axis(sim, ids, 1)


def test_stop_and_go_on_nordland_loses_nothing_against_single_frames(nordland_similarities):
    sim, truth = nordland_similarities
    blocks = len(sim) // 100
    rows = np.concatenate([b * 100 + np.array(_PATTERN) for b in range(blocks)])
    segments = np.array(_SEGMENTS * blocks)
    ids, scores = _top(sim[rows])
    hit = truth[rows]

    def hits(pred: np.ndarray) -> np.ndarray:
        return hit[np.arange(len(rows)), pred]

    single = hits(ids[:, 0])
    along_track = rows.astype(float)  # odometry: signed travelled distance, one place per unit
    odometry = hits(match_stream(ids, scores, SequenceConfig(length=20), positions=along_track)[0][:, 0])
    counted = hits(match_stream(ids, scores, SequenceConfig(length=20))[0][:, 0])
    both_ways = hits(match_stream(ids, scores, SequenceConfig(length=20, reverse=True))[0][:, 0])
    # with odometry (signed distance in places), or counting frames with the mirrored velocities too,
    # no kind of motion loses against single frames
    for seg in ("forward", "stop", "reverse"):
        mask = segments == seg
        assert odometry[mask].mean() >= single[mask].mean(), seg
        assert both_ways[mask].mean() >= single[mask].mean(), seg
    assert odometry.mean() >= 3 * single.mean()
    # without odometry, over the whole stop-and-go run, still far ahead of single frames
    assert counted.mean() >= 2 * single.mean()
    # and on the plain forward stream the L = 20 target holds: R@1 >= 60 % and >= 3x single-frame
    ids_all, scores_all = _top(sim)
    seq = truth[np.arange(len(sim)), match_stream(ids_all, scores_all, SequenceConfig(length=20))[0][:, 0]]
    single_all = truth[np.arange(len(sim)), ids_all[:, 0]]
    assert seq.mean() >= 0.6 and seq.mean() >= 3 * single_all.mean()


# ---------------------------------------------------------------- vpr-ros eval --sequence-length


def test_eval_sequence_lengths_table_json_and_plot(nordland_dir, torch_home, tmp_path, capsys):
    import json

    from vpr_ros.cli.main import main

    out = tmp_path / "eval"
    rc = main(["eval", "--dataset", "nordland", "--root", str(nordland_dir), "--every", "20",
               "--limit", "80", "--model", "structvpr_mobilenetv2", "--input-size", "32x64",
               "--device", "cpu", "--threads", "1", "--degrade", "none", "--degrade", "jpeg:10",
               "--sequence-length", "1", "5", "--sequence-length", "10", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "R@1 (%) against sequence length" in text and "L=10" in text
    results = json.loads((out / "results.json").read_text())["results"]
    for r in results:
        seq = r["extra"]["sequence"]
        assert set(seq["recall_at_1"]) == {"1", "5", "10"} and (seq["v_min"], seq["v_max"]) == (0.8, 1.25)
        # L = 1 is the single frame: the same R@1 as the plain evaluation
        assert seq["recall_at_1"]["1"] == pytest.approx(r["recalls"]["1"])
    assert (out / "recall_vs_sequence_length.png").stat().st_size > 1000
    # bad values: argparse refuses a length of 0 (exit 2); an empty velocity range is one error line
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--sequence-length", "0", "--out", str(tmp_path / "x")])
    assert exc.value.code == 2 and "sequence length in 1..1000" in capsys.readouterr().err
    rc = main(["eval", "--dataset", "nordland", "--root", str(nordland_dir), "--sequence-length", "5",
               "--sequence-velocity", "2", "1", "--out", str(tmp_path / "y")])
    err = capsys.readouterr().err.strip().splitlines()  # refused before any image is read
    assert rc == 2 and err == ["vpr-ros eval: error: --sequence-velocity: VMIN 2.0 is above VMAX 1.0"]
    assert not (tmp_path / "y").exists()
