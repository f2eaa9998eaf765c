"""Loop-closure evaluation sweeps (vpr_ros.eval.loop_closure) on a hand-made sequence run."""

from __future__ import annotations

import numpy as np
import pytest

from vpr_ros.core.loop_closure import Detection, LoopCandidate
from vpr_ros.eval.loop_closure import (
    SequenceRun,
    choose_operating_point,
    decisions,
    max_false_inliers,
    operating_stats,
    pr_curve,
    run_sequence,
)


def hand_run() -> SequenceRun:
    """6 frames, loops 4-0 and 5-1, frame window 1. Candidates per query as (match, score, inliers)."""
    gt = np.zeros((6, 6), dtype=bool)
    gt[4, 0] = gt[5, 1] = True
    gt |= gt.T
    table = {2: [(0, 0.5, 10)],
             3: [(1, 0.7, 30), (0, 0.4, 5)],
             4: [(0, 0.9, 60), (2, 0.6, 12)],
             5: [(2, 0.8, 18), (1, 0.75, 40)]}
    dets = []
    for q, cands in table.items():
        d = Detection(q, float(q))
        d.candidates = [LoopCandidate(q, float(q), m, float(m), s, inliers=n) for m, s, n in cands]
        dets.append(d)
    return SequenceRun(dets, gt, exclusion_window_frames=1)


def test_positives_and_decisions_by_hand():
    run = hand_run()
    # queries with a loop more than 1 frame back: 4 (frame 0) and 5 (frame 1)
    assert run.positives() == 2
    pairs, scores, correct = decisions(run, top_k=2, min_inliers=None)  # the top-1 candidate
    assert pairs.tolist() == [[2, 0], [3, 1], [4, 0], [5, 2]]
    assert scores.tolist() == [0.5, 0.7, 0.9, 0.8] and correct.tolist() == [False, False, True, False]
    # >= 20 inliers among the first 2: query 2 has none; query 5 skips frame 2 (18) for frame 1 (40)
    pairs, scores, correct = decisions(run, top_k=2, min_inliers=20)
    assert pairs.tolist() == [[3, 1], [4, 0], [5, 1]] and correct.tolist() == [False, True, True]
    pairs, _, _ = decisions(run, top_k=1, min_inliers=20)  # query 5's first candidate has only 18
    assert pairs.tolist() == [[3, 1], [4, 0]]


def test_operating_stats_by_hand():
    run = hand_run()
    # decisions 0.7 (false), 0.9 (true), 0.75 (true); threshold 0.72 keeps the two true ones
    s = operating_stats(run, top_k=2, min_inliers=20, score_threshold=0.72)
    assert s == {"precision": 1.0, "recall": 1.0, "true_positives": 2, "false_positives": 0, "positives": 2,
                 "false_pairs_1based": []}
    s = operating_stats(run, top_k=2, min_inliers=20, score_threshold=0.7)  # 2 / 3 precise
    assert s["precision"] == pytest.approx(2 / 3) and s["false_pairs_1based"] == [[4, 2]]
    s = operating_stats(run, top_k=2, min_inliers=100, score_threshold=0.0)  # nothing accepted
    assert s["precision"] == 1.0 and s["recall"] == 0.0


def test_pr_curve_by_hand():
    run = hand_run()
    c = pr_curve(run, top_k=2, min_inliers=20)
    # sorted 0.9 T, 0.75 T, 0.7 F over 2 positives: precision 1, 1, 2/3 at recall 1/2, 1, 1; AP = 1
    assert c.precision.tolist() == pytest.approx([1.0, 1.0, 2 / 3]) and c.recall.tolist() == [0.5, 1.0, 1.0]
    assert c.average_precision == pytest.approx(1.0) and c.recall_at_100_precision == 1.0
    assert c.query_indices.tolist() == [3, 4, 5] and c.match_indices.tolist() == [1, 0, 1]
    assert pr_curve(run, top_k=2, min_inliers=100) is None


def test_max_false_inliers_leaves_out_near_misses():
    # false candidates: 2->0 (10), 3->1 (30), 3->0 (5); 4->2 (12) and 5->2 (18) are within 2 frames of
    # the query's loop partner (0, resp. 1), near misses
    assert max_false_inliers({"a": hand_run()}) == 30
    assert max_false_inliers({"a": hand_run()}, near_frames=0) == 30  # 18 and 12 are below 30 anyway


def test_choose_operating_point_by_hand():
    run = hand_run()
    # min_inliers >= 1.25 * 30 = 37.5 -> 40 or 50. top_k 2, 40: decisions 0.9 T, 0.75 T, no false one ->
    # threshold floor(0.75, 0.01) = 0.75, recall 2/2; every other (k, m) recalls only query 4 (1/2)
    op = choose_operating_point({"a": run}, top_ks=(1, 2), min_inliers_grid=(20, 40, 50))
    chosen = (op["top_k"], op["min_inliers"], op["score_threshold"], op["max_false_inliers"])
    assert chosen == (2, 40, 0.75, 30)
    assert op["per_condition"]["a"]["recall"] == 1.0 and op["per_condition"]["a"]["precision"] == 1.0
    # margin 0.5 allows 20: decisions 0.7 F, 0.9 T, 0.75 T; the threshold is halfway between the top false
    # score and the next true one, (0.7 + 0.75) / 2 = 0.725
    op = choose_operating_point({"a": run}, top_ks=(2,), min_inliers_grid=(20,), inlier_margin=0.5)
    assert op["score_threshold"] == pytest.approx(0.725) and op["per_condition"]["a"]["recall"] == 1.0
    assert op["per_condition"]["a"]["false_positives"] == 0


def test_run_sequence_applies_the_frame_window():
    d = np.array([[1, 0], [0, 1], [1, 0], [0.6, 0.8]], dtype=np.float32)
    gt = np.zeros((4, 4), dtype=int)
    gt[1, 3] = 1  # given one way round; the run symmetrises it
    run = run_sequence(d, None, gt, exclusion_window_frames=1, top_k=5)
    assert run.gt[3, 1] and run.positives() == 1
    cands = {det.query_id: [(c.match_id, round(c.score, 6)) for c in det.candidates]
             for det in run.detections}
    # frame 2 sees frame 0 only (frame 1 is inside the window); frame 3 sees 1 (0.8) before 0 (0.6)
    assert cands == {0: [], 1: [], 2: [(0, 1.0)], 3: [(1, 0.8), (0, 0.6)]}
    pairs, _, correct = decisions(run, top_k=1, min_inliers=None)
    assert pairs.tolist() == [[2, 0], [3, 1]] and correct.tolist() == [False, True]
