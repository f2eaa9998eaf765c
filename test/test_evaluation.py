"""Metrics (hand-computed cases), result tables/JSON, and the plot functions."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from vpr_ros.data.places import load_rtabmap_loop
from vpr_ros.eval.metrics import (
    RECALL_NS,
    EvalResult,
    format_table,
    load_results_json,
    loop_closure_pr,
    precision_recall,
    recall_at_n,
    save_results_json,
)
from vpr_ros.eval.plots import (
    plot_match_montage,
    plot_pr_curves,
    plot_recall_curves,
    plot_recall_vs_bytes,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# --------------------------------------------------------------------------- recall@N


def test_recall_hand_case_with_excluded_query_and_n_beyond_k():
    predictions = np.array([[3, 1, 2], [0, 4, 5], [7, 8, 9], [2, 2, 2]])
    positives = [np.array([1]), np.array([5, 6]), np.array([], dtype=int), np.array([6])]
    r = recall_at_n(predictions, positives, ns=(1, 2, 3, 5))
    # q0 hits at rank 1, q1 at rank 2, q2 has no positive (excluded), q3 never hits.
    assert r == pytest.approx({1: 0.0, 2: 1 / 3, 3: 2 / 3, 5: 2 / 3})
    assert r.n_queries == 3
    assert r.n_without_positive == 1
    assert r.first_hit.tolist() == [1, 2, -1, -1]


def test_recall_default_ns_and_perfect_top1():
    predictions = np.array([[0, 5], [1, 5], [2, 0]])
    r = recall_at_n(predictions, [np.array([0]), np.array([1, 2]), np.array([2])])
    assert tuple(r) == RECALL_NS
    assert all(v == 1.0 for v in r.values())
    assert r.n_without_positive == 0


def test_recall_ignores_negative_padding():
    predictions = np.array([[-1, -1], [-1, 4]])
    r = recall_at_n(predictions, [np.array([0, 1]), np.array([4])], ns=(1, 2))
    assert r == {1: 0.0, 2: 0.5}


@pytest.mark.parametrize(
    "preds, positives, ns",
    [
        (np.zeros((2, 3), dtype=int), [np.array([0])], RECALL_NS),  # row count mismatch
        (np.zeros(3, dtype=int), [np.array([0])] * 3, RECALL_NS),  # not 2-D
        (np.zeros((1, 3)), [np.array([0])], RECALL_NS),  # float indices
        (np.zeros((1, 3), dtype=int), [np.array([0])], (0, 1)),  # N < 1
        (np.zeros((2, 3), dtype=int), [np.array([], dtype=int)] * 2, RECALL_NS),  # no positives at all
    ],
)
def test_recall_rejects_bad_input(preds, positives, ns):
    with pytest.raises(ValueError):
        recall_at_n(preds, positives, ns=ns)


# --------------------------------------------------------------------------- precision-recall


def test_precision_recall_hand_case():
    c = precision_recall(np.array([0.6, 0.9, 0.5, 0.8, 0.7]), np.array([1, 1, 0, 1, 0]))
    # sorted by score: .9 ok, .8 ok, .7 wrong, .6 ok, .5 wrong; 3 positives
    assert c.thresholds.tolist() == [0.9, 0.8, 0.7, 0.6, 0.5]
    assert c.precision == pytest.approx([1, 1, 2 / 3, 3 / 4, 3 / 5])
    assert c.recall == pytest.approx([1 / 3, 2 / 3, 2 / 3, 1, 1])
    assert c.average_precision == pytest.approx(1 / 3 + 1 / 3 + 1 / 3 * 3 / 4)
    assert c.recall_at_100_precision == pytest.approx(2 / 3)
    assert c.best_f1 == pytest.approx(6 / 7)
    assert c.best_f1_threshold == 0.6
    assert c.n_positives == 3


def test_precision_recall_with_unrecallable_positives_and_ties():
    c = precision_recall([0.9, 0.8, 0.7, 0.6, 0.5], [1, 1, 0, 1, 0], n_positives=6)
    assert c.recall == pytest.approx([1 / 6, 2 / 6, 2 / 6, 3 / 6, 3 / 6])
    assert c.average_precision == pytest.approx(1 / 6 + 1 / 6 + 1 / 6 * 3 / 4)
    tied = precision_recall([0.5, 0.5, 0.2], [True, False, True])
    assert tied.thresholds.tolist() == [0.5, 0.2]  # equal scores are one threshold
    assert tied.precision == pytest.approx([0.5, 2 / 3])
    assert tied.recall_at_100_precision == 0.0


@pytest.mark.parametrize(
    "scores, correct, kw",
    [
        ([], [], {}),
        ([0.1, float("nan")], [1, 0], {}),
        ([0.1, 0.2], [1], {}),
        ([0.1, 0.2], [0, 0], {}),
        ([0.1, 0.2], [1, 1], {"n_positives": 1}),
    ],
)
def test_precision_recall_rejects_bad_input(scores, correct, kw):
    with pytest.raises(ValueError):
        precision_recall(np.array(scores), np.array(correct), **kw)


def test_loop_closure_pr_tiny_sequence():
    n = 8
    sim = np.zeros((n, n))
    gt = np.zeros((n, n), dtype=bool)
    gt[1, 6] = True  # given upper-triangular: must be read symmetrically
    gt[7, 2] = True
    sim[6, 1] = 0.9  # frame 6: correct loop
    sim[7, 2], sim[7, 4] = 0.4, 0.6  # frame 7 has a loop but its best candidate is wrong
    sim[5, 0] = 0.7  # frame 5 has no loop: accepted match is a false positive
    sim[3, 0], sim[4, 1] = 0.1, 0.2
    sim[7, 6] = sim[6, 5] = 0.99  # inside the exclusion window: ignored
    c = loop_closure_pr(sim, gt, exclude_window=2)
    assert c.query_indices.tolist() == [3, 4, 5, 6, 7]
    assert c.match_indices.tolist() == [0, 1, 0, 1, 4]
    assert c.correct.tolist() == [False, False, False, True, False]
    assert c.n_positives == 2
    assert c.precision == pytest.approx([1, 1 / 2, 1 / 3, 1 / 4, 1 / 5])
    assert c.recall == pytest.approx([0.5] * 5)
    assert c.average_precision == pytest.approx(0.5)
    assert c.recall_at_100_precision == pytest.approx(0.5)
    with pytest.raises(ValueError):
        loop_closure_pr(sim[:3, :3], gt[:3, :3], exclude_window=2)
    with pytest.raises(ValueError):
        loop_closure_pr(sim, gt[:7, :7])


def test_loop_closure_pr_on_rtabmap_with_oracle_similarity(rtabmap_dir):
    gt = load_rtabmap_loop(rtabmap_dir).truth_matrix()
    rng = np.random.default_rng(0)
    sim = (gt | gt.T).astype(float) + 0.01 * rng.random(gt.shape)
    c = loop_closure_pr(sim, gt, exclude_window=10)
    assert c.n_positives == 44  # frames 41..84 close loops
    assert c.average_precision == pytest.approx(1.0)
    assert c.recall_at_100_precision == pytest.approx(1.0)
    shuffled = loop_closure_pr(rng.random(gt.shape), gt, exclude_window=10)
    assert shuffled.average_precision < 0.5


# --------------------------------------------------------------------------- results, tables, JSON


def _results() -> list[EvalResult]:
    return [
        EvalResult("nordland", "mobilenet", "jpeg_q90", {1: 0.5, 5: 0.75, 10: 0.8, 20: 0.9}, 100, 1, 4800.0),
        EvalResult("nordland", "mobilenet", "jpeg_q10", {1: 0.25, 5: 0.5, 10: 0.6, 20: 0.7}, 100, 1, 900.0),
        EvalResult("ie_tower", "raw", "none", {1: 0.125, 5: float("nan")}, 8, 0, None, {"note": "x"}),
    ]


def test_eval_result_from_recall_and_table():
    r = recall_at_n(np.array([[0, 1], [3, 2]]), [np.array([0]), np.array([2])], ns=(1, 2))
    res = EvalResult.from_recall("toy", "model", "blur", r, bytes_per_frame=12345.0, seed=3)
    assert res.recalls == {1: 0.5, 2: 1.0} and res.n_queries == 2 and res.extra == {"seed": 3}
    table = format_table(_results())
    lines = table.splitlines()
    assert len(lines) == 2 + 3
    assert len({len(line) for line in lines}) == 1  # aligned
    assert "R@1" in lines[0] and "bytes/frame" in lines[0]
    assert "nordland / mobilenet / jpeg_q90" in lines[2] and " 50.0 " in lines[2] and "4,800" in lines[2]
    assert lines[4].count(" - ") >= 3  # NaN recall, missing N and missing bytes shown as '-'


def test_save_results_json_round_trip_and_atomic(tmp_path):
    path = tmp_path / "deep" / "results.json"
    save_results_json(_results(), path)
    data = json.loads(path.read_text())
    assert data["results"][2]["recalls"]["5"] is None  # NaN written as null (strict JSON)
    assert data["results"][0]["bytes_per_frame"] == 4800.0
    back = load_results_json(path)
    assert back[0] == _results()[0]
    assert back[2].recalls[1] == 0.125 and math.isnan(back[2].recalls[5])
    save_results_json(_results()[:1], path)  # overwrite in place
    assert len(load_results_json(path)) == 1
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temp files left


# --------------------------------------------------------------------------- plots


def _assert_png(path):
    assert path.is_file()
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 2000


def test_plot_recall_curves_and_bytes(tmp_path):
    _assert_png(plot_recall_curves(_results(), tmp_path / "a" / "recall.png"))
    _assert_png(plot_recall_vs_bytes(_results(), tmp_path / "b" / "bytes.png"))
    with pytest.raises(ValueError):
        plot_recall_vs_bytes(_results()[2:], tmp_path / "none.png")  # no bytes/frame anywhere
    with pytest.raises(ValueError):
        plot_recall_curves([], tmp_path / "empty.png")


def test_plot_pr_curves(tmp_path):
    c = precision_recall([0.9, 0.8, 0.7, 0.6, 0.5], [1, 1, 0, 1, 0])
    curves = {"toy": c, "other": precision_recall([0.3, 0.2], [0, 1])}
    out = plot_pr_curves(curves, tmp_path / "pr" / "pr.png")
    _assert_png(out)


def test_plot_match_montage(tmp_path):
    rng = np.random.default_rng(1)

    def img():
        return rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)

    queries = [img() for _ in range(3)]
    db = [[img(), img()], [img(), img()], [img()]]
    flags = [[True, False], [False, False], [True]]
    out = plot_match_montage(queries, db, flags, tmp_path / "m" / "montage.png", titles=["a", "b", "c"],
                             max_rows=2)
    _assert_png(out)
    with pytest.raises(ValueError):
        plot_match_montage(queries, db, [[True], [False, False], [True]], tmp_path / "bad.png")
