"""Replay scoring (vpr_ros.eval.replay) on hand-made frames, answers and ground truth, without ROS."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vpr_ros.core.errors import DatasetError
from vpr_ros.eval.replay import (
    Candidate,
    Closure,
    distance_positives,
    load_loop_matrix,
    loop_matrix_positives,
    nearest_positions,
    plot_replay,
    score_replay,
)

S = 1_000_000_000  # ns per second


def ids(arrays) -> list[list[int]]:
    return [sorted(int(v) for v in a) for a in arrays]


def test_nearest_positions_within_the_gap():
    stamps = np.array([0.95, 1.10, 2.15, 2.90, 3.05, 4.50])
    xy = np.array([[0, 0], [1, 0], [2, 0], [3, 0], [4, 0], [5, 0]], dtype=float)
    got = nearest_positions([1 * S, 2 * S, 3 * S, 4 * S], stamps, xy, max_gap_s=0.2)
    # 1.0: 0.95 is 0.05 away (1.10: 0.10); 2.0: 2.15 is 0.15 away; 3.0: 3.05 is 0.05 away (2.90: 0.10);
    # 4.0: the nearest, 4.50, is 0.5 > 0.2 away
    assert [None if p is None else p.tolist() for p in got] == [[0, 0], [2, 0], [4, 0], None]


def test_distance_positives_by_hand():
    entry_ids = [10, 11, 12, 13]
    entry_xy = np.array([[0, 0], [1.5, 0], [np.nan, np.nan], [4, 3]])  # entry 12 has no pose
    got = distance_positives([np.array([0.0, 0.0]), np.array([2.0, 0.0]), np.array([4.0, 0.0]), None],
                             entry_ids, entry_xy, radius=2.0)
    # (0,0): distances 0, 1.5, -, 5; (2,0): 2 (the radius counts), 0.5, -, sqrt(4 + 9) = 3.6;
    # (4,0): 4, 2.5, -, 3; no position: nothing
    assert ids(got) == [[10, 11], [10, 11], [], []]


def test_loop_matrix_positives_map_entries_to_frames_by_stamp():
    frames = [10 * S, 20 * S, 30 * S]
    gt = np.array([[0, 1, 1], [1, 0, 0], [1, 0, 0]], dtype=bool)
    # entry 6 is 0.5 ms from frame 1 (the same frame); entry 7 is 2 ms from frame 2 (no frame)
    got = loop_matrix_positives(gt, frames, [5, 6, 7], [10.0, 20.0005, 30.002])
    # frame 0 loops with frames 1 (entry 6) and 2 (no entry); frames 1 and 2 loop with frame 0 (entry 5)
    assert ids(got) == [[6], [5], [5]]


def test_load_loop_matrix_symmetrises_and_names_bad_files(tmp_path):
    good = tmp_path / "gt.txt"
    good.write_text("0 0 1\n0 0 0\n0 0 0\n")
    assert load_loop_matrix(good, 3).astype(int).tolist() == [[0, 0, 1], [0, 0, 0], [1, 0, 0]]
    with pytest.raises(DatasetError, match=r"gt\.txt: \(3, 3\) matrix, but the bag has 4 frames"):
        load_loop_matrix(good, 4)
    bad = tmp_path / "bad.txt"
    bad.write_text("0 x\n1 0\n")
    with pytest.raises(DatasetError, match=r"bad\.txt: not a 0/1 loop matrix"):
        load_loop_matrix(bad, 2)


def localize_case():
    """4 published frames; frames 0-2 have a positive, frame 2 is never answered, frame 3 has no positive."""
    frames = [1 * S, 2 * S, 3 * S, 4 * S]
    positives = [np.array([10]), np.array([11]), np.array([12, 13]), np.array([], dtype=np.int64)]
    answers = {
        1 * S: [Candidate(10, 0.9, 0.0), Candidate(11, 0.5, 0.0)],  # right at rank 1
        2 * S: [Candidate(12, 0.8, 0.0), Candidate(11, 0.7, 0.0)],  # right at rank 2
        4 * S: [Candidate(10, 0.6, 0.0)],  # no positive: not in recall, a wrong top-1 in the PR curve
    }
    return frames, answers, positives


def test_score_localize_recall_pr_and_loop_closures_by_hand():
    frames, answers, positives = localize_case()
    closures = [Closure(1 * S, 10, True),  # frame 0, right
                Closure(2 * S, 12, True),  # frame 1, wrong
                Closure(9 * S, 11, False)]  # no published frame has this stamp: wrong
    score = score_replay(frames, answers, positives, top_k=5, closures=closures, ground_truth="distance")
    r = score.summary
    assert r["queries_with_positive"] == 3 and r["exclusion_window_s"] == 0.0
    # R@1 = frame 0 / 3 frames with a positive; R@5 = frames 0 and 1 / 3 (N = 10, 20 exceed top_k 5)
    assert r["recall"] == pytest.approx({"1": 1 / 3, "5": 2 / 3})
    # top-1 scores 0.9 (right), 0.8 (wrong), 0.6 (wrong), 3 positives: precision 1, 1/2, 1/3 at recall 1/3
    # AP = (1/3 - 0) * 1 = 1/3; F1 at 0.9 = 2 * 1 * (1/3) / (4/3) = 0.5, the best
    assert r["top1_pr"] == pytest.approx({"average_precision": 1 / 3, "recall_at_100_precision": 1 / 3,
                                          "best_f1": 0.5, "best_f1_threshold": 0.9})
    # 1 of 3 closures right; 1 of the 3 frames with a positive got a right closure
    assert r["loop_closures"] == {"published": 3, "correct": 1, "precision": pytest.approx(1 / 3),
                                  "recall": pytest.approx(1 / 3), "verified": 2,
                                  "wrong_pairs_frame_entry": [[1, 12], [None, 11]]}
    json.dumps(r, allow_nan=False)  # the summary is report-ready
    assert score.recall.n_queries == 3 and score.top1_pr.n_positives == 3


def test_score_top_k_limits_ns_and_loop_closure_run_without_closures():
    frames, answers, positives = localize_case()
    r = score_replay(frames, answers, positives, top_k=1, closures=[]).summary
    assert r["recall"] == pytest.approx({"1": 1 / 3})  # only N <= top_k
    assert r["loop_closures"] == {"published": 0, "correct": 0, "precision": None, "recall": 0.0}
    assert "loop_closures" not in score_replay(frames, answers, positives, top_k=1).summary  # no node ran


def test_score_slam_revisit_window_by_hand():
    """A SLAM run: the map entries are the frames; only entries older than the window count."""
    frames = [10 * S, 20 * S, 30 * S]
    entry_stamps = {0: 10.0, 1: 20.0, 2: 30.0}
    positives = [np.array([2]), np.array([], dtype=np.int64), np.array([0])]  # frames 0 and 2 loop
    answers = {30 * S: [Candidate(1, 0.95, 20.0), Candidate(0, 0.9, 10.0)]}
    r = score_replay(frames, answers, positives, top_k=5, entry_stamps=entry_stamps, revisit_window_s=15.0)
    # window 15 s: frame 0 (t 10) loses entry 2 (t 30, not older than -5); frame 2 (t 30) keeps entry 0
    # (t 10 < 15) and its candidate 1 (t 20 >= 15) is dropped, so entry 0 is its top-1: R@1 = 1/1
    assert r.summary["queries_with_positive"] == 1 and r.summary["exclusion_window_s"] == 15.0
    assert r.summary["recall"] == pytest.approx({"1": 1.0, "5": 1.0})
    # without the window: 2 frames with a positive; frame 0 unanswered, frame 2 right at rank 2
    r = score_replay(frames, answers, positives, top_k=5)
    assert r.summary["recall"] == pytest.approx({"1": 0.0, "5": 0.5})
    with pytest.raises(ValueError, match="entry_stamps"):
        score_replay(frames, answers, positives, top_k=5, revisit_window_s=15.0)


def test_score_without_any_positive_says_so():
    frames = [1 * S, 2 * S]
    none = [np.array([], dtype=np.int64)] * 2
    score = score_replay(frames, {1 * S: [Candidate(3, 0.5, 0.0)]}, none, top_k=5,
                         closures=[Closure(S, 3, True)])
    assert score.summary["recall"] is None and "no query has a positive" in score.summary["note"]
    assert score.recall is None and score.top1_pr is None and "loop_closures" not in score.summary
    with pytest.raises(ValueError, match="1 positive lists for 2 frames"):
        score_replay(frames, {}, none[:1], top_k=5)


def test_plot_replay_writes_the_measured_plots(tmp_path):
    frames, answers, positives = localize_case()
    paths = plot_replay(score_replay(frames, answers, positives, top_k=5, ground_truth="distance"), tmp_path,
                        "model", name="bag")
    assert set(paths) == {"recall_plot", "pr_plot"}
    assert all((tmp_path / name).is_file() for name in ("recall_at_n.png", "pr.png"))
    none = [np.array([], dtype=np.int64)] * 4
    assert plot_replay(score_replay(frames, answers, none, top_k=5), tmp_path / "none", "model") == {}
