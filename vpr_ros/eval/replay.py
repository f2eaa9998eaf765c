"""Scoring of a bag replay: recall@N, top-1 precision-recall and loop-closure precision/recall of what the
localizer and loop-closure nodes answered, from plain data (frame stamps, matched map ids, positions).

The ROS side (:mod:`vpr_ros.ros.replay`) publishes the bag and collects the messages; this module
turns them, with a ground truth, into the report. Ground truth is per published frame, the map entries
that count as correct: within a radius of the frame's position (:func:`nearest_positions`,
:func:`distance_positives`) or marked in a frame x frame loop matrix (:func:`loop_matrix_positives`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from vpr_ros.core.errors import DatasetError
from vpr_ros.core.timeline import nearest_index, ns_to_seconds, seconds_to_ns
from vpr_ros.eval.metrics import RECALL_NS, EvalResult, PRCurve, RecallResult, precision_recall, recall_at_n
from vpr_ros.eval.plots import plot_pr_curves, plot_recall_curves

#: A map entry is the frame a loop-matrix row refers to when their stamps are this close (ns).
ENTRY_FRAME_TOLERANCE_NS = 999_999
#: Wrong loop closures listed in the report.
MAX_WRONG_PAIRS = 20


class Candidate(NamedTuple):
    """One retrieved map entry of a frame's answer (a ``PlaceCandidate``)."""

    entry_id: int
    score: float
    stamp_s: float  # the map entry's stamp


class Closure(NamedTuple):
    """One published loop closure (a ``LoopClosure``): the query frame's stamp and the matched entry."""

    query_stamp_ns: int
    match_id: int
    verified: bool


@dataclass
class ReplayScore:
    """:func:`score_replay`'s result: ``summary`` holds the report's JSON-ready keys; ``recall`` and
    ``top1_pr`` the curves behind them, for :func:`plot_replay` (None when not measured)."""

    summary: dict[str, Any]
    recall: RecallResult | None = None
    top1_pr: PRCurve | None = None


# --------------------------------------------------------------------------- ground truth


def nearest_positions(frame_stamps_ns: Sequence[int], position_stamps_s: np.ndarray, positions: np.ndarray,
                      max_gap_s: float) -> list[np.ndarray | None]:
    """Per frame, the position (row of ``positions``) whose stamp in ascending ``position_stamps_s`` is
    nearest to the frame's, or None when the nearest is more than ``max_gap_s`` away."""
    out: list[np.ndarray | None] = []
    for t_ns in frame_stamps_ns:
        j = nearest_index(position_stamps_s, ns_to_seconds(t_ns), max_gap_s)
        out.append(None if j is None else np.asarray(positions[j], dtype=np.float64))
    return out


def distance_positives(query_positions: Sequence[np.ndarray | None], entry_ids: Sequence[int],
                       entry_positions: np.ndarray, radius: float) -> list[np.ndarray]:
    """Per frame, the ids of the entries within ``radius`` of its position (none for a frame without
    one). ``entry_positions``: (M, 2), NaN rows for entries without a pose (never correct)."""
    ids = np.asarray(entry_ids, dtype=np.int64)
    epos = np.asarray(entry_positions, dtype=np.float64).reshape(len(ids), -1)
    out = []
    for qpos in query_positions:
        if qpos is None:
            out.append(np.empty(0, dtype=np.int64))
            continue
        d = np.linalg.norm(epos - np.asarray(qpos, dtype=np.float64), axis=1)
        out.append(ids[np.nan_to_num(d, nan=np.inf) <= radius])
    return out


def load_loop_matrix(path: str | os.PathLike, n_frames: int) -> np.ndarray:
    """An N x N 0/1 loop matrix over a bag's frames (RTAB-Map's ``gt_loop_matrix.txt``), symmetrised.

    Raises :class:`DatasetError` naming the file when it does not read as numbers or is not
    ``n_frames`` x ``n_frames``.
    """
    try:
        gt = np.loadtxt(path, dtype=np.float64, ndmin=2).astype(bool)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: not a 0/1 loop matrix ({exc})") from None
    if gt.shape != (n_frames, n_frames):
        raise DatasetError(f"{path}: {gt.shape} matrix, but the bag has {n_frames} frames")
    return gt | gt.T


def loop_matrix_positives(gt: np.ndarray, frame_stamps_ns: Sequence[int], entry_ids: Sequence[int],
                          entry_stamps_s: Sequence[float]) -> list[np.ndarray]:
    """Per frame i, the ids of the entries that are frames j with ``gt[i, j]``.

    An entry is the published frame with the same stamp (within 1 ms; SLAM runs map the bag's own
    frames); an entry that is no published frame is never correct.
    """
    frames = np.asarray(frame_stamps_ns, dtype=np.int64)
    ids = np.asarray(entry_ids, dtype=np.int64)
    entry_frame = np.array([-1 if (k := nearest_index(frames, seconds_to_ns(s), ENTRY_FRAME_TOLERANCE_NS))
                            is None else k for s in entry_stamps_s], dtype=np.int64)
    known = entry_frame >= 0
    return [ids[known & gt[qi, np.clip(entry_frame, 0, None)]] for qi in range(len(frames))]


# --------------------------------------------------------------------------- scoring


def score_replay(
    frame_stamps_ns: Sequence[int],
    answers: Mapping[int, Sequence[Candidate]],
    positives: Sequence[np.ndarray],
    *,
    top_k: int,
    entry_stamps: Mapping[int, float] | None = None,
    revisit_window_s: float | None = None,
    closures: Sequence[Closure] | None = None,
    ground_truth: str = "",
) -> ReplayScore:
    """Score the answers to the published frames against ``positives``.

    ``frame_stamps_ns``: the published image stamps, in publishing order (frame i is query i).
    ``answers``: image stamp -> that frame's candidates, best first; a frame without an answer is a miss.
    ``positives``: per frame, the correct entry ids. ``revisit_window_s`` (SLAM runs, whose map grows
    from the same frames): only entries older than the frame by more than this count, as positives
    (by ``entry_stamps``: id -> stamp s) and as candidates. ``closures``: the loop closures published
    (None: no loop-closure node ran). ``ground_truth`` describes it in the report.

    Recall@N over the frames with a positive (frames without an answer count as misses), for N in
    1, 5, 10, 20 up to ``top_k``; top-1 precision-recall over the answered frames' best scores, with
    those frames as the positives; loop closures: precision = correct / published, recall = frames
    with a positive that got a correct closure / frames with a positive.
    """
    window = revisit_window_s
    if window is not None and entry_stamps is None:
        raise ValueError("revisit_window_s needs entry_stamps")
    if len(positives) != len(frame_stamps_ns):
        raise ValueError(f"{len(positives)} positive lists for {len(frame_stamps_ns)} frames")
    k = int(top_k)
    preds, kept_positives, top_scores, top_ok = [], [], [], []
    for qi, s_ns in enumerate(frame_stamps_ns):
        t_q = ns_to_seconds(s_ns)
        pos = np.asarray(positives[qi], dtype=np.int64)
        cands = list(answers.get(int(s_ns), ()))
        if window is not None:
            pos = np.array([e for e in pos if entry_stamps[int(e)] < t_q - window], dtype=np.int64)
            cands = [c for c in cands if c.stamp_s < t_q - window]
        row = [int(c.entry_id) for c in cands[:k]]
        preds.append(row + [-1] * (k - len(row)))
        kept_positives.append(pos)
        if cands:
            top_scores.append(float(cands[0].score))
            top_ok.append(int(cands[0].entry_id) in set(pos.tolist()))
    n_pos = sum(bool(len(p)) for p in kept_positives)
    summary: dict[str, Any] = {"ground_truth": ground_truth,
                               "exclusion_window_s": 0.0 if window is None else float(window),
                               "queries_with_positive": n_pos}
    if n_pos == 0:
        summary["recall"] = None
        summary["note"] = "no query has a positive map entry under this ground truth"
        return ReplayScore(summary)
    ns = tuple(n for n in RECALL_NS if n <= k) or (1,)
    rec = recall_at_n(np.asarray(preds, dtype=np.int64).reshape(len(preds), k), kept_positives, ns)
    summary["recall"] = {str(n): float(v) for n, v in rec.items()}  # string keys, as in report.json
    score = ReplayScore(summary, recall=rec)
    if top_scores:
        pr = precision_recall(np.asarray(top_scores), np.asarray(top_ok),
                              n_positives=max(n_pos, int(np.sum(top_ok)), 1))
        summary["top1_pr"] = {"average_precision": pr.average_precision,
                              "recall_at_100_precision": pr.recall_at_100_precision, "best_f1": pr.best_f1,
                              "best_f1_threshold": pr.best_f1_threshold}
        score.top1_pr = pr
    if closures:
        summary["loop_closures"] = _score_closures(frame_stamps_ns, closures, kept_positives, n_pos)
    elif closures is not None:
        summary["loop_closures"] = {"published": 0, "correct": 0, "precision": None, "recall": 0.0}
    return score


def _score_closures(frame_stamps_ns: Sequence[int], closures: Sequence[Closure],
                    positives: Sequence[np.ndarray], n_pos: int) -> dict[str, Any]:
    frame_of = {int(s): i for i, s in enumerate(frame_stamps_ns)}
    pos_sets = [set(p.tolist()) for p in positives]
    correct, hit, wrong = 0, set(), []
    for c in closures:
        qi = frame_of.get(int(c.query_stamp_ns))
        if qi is not None and int(c.match_id) in pos_sets[qi]:
            correct += 1
            hit.add(qi)
        else:
            wrong.append([qi, int(c.match_id)])
    return {"published": len(closures), "correct": correct, "precision": correct / len(closures),
            "recall": len(hit) / n_pos, "verified": sum(bool(c.verified) for c in closures),
            "wrong_pairs_frame_entry": wrong[:MAX_WRONG_PAIRS]}


def plot_replay(score: ReplayScore, out: str | os.PathLike, label: str, *, name: str = "") -> dict[str, str]:
    """Write ``recall_at_n.png`` and ``pr.png`` (those measured) into ``out``; returns the report's
    ``recall_plot`` / ``pr_plot`` paths."""
    out = Path(out)
    paths: dict[str, str] = {}
    if score.recall is not None:
        ev = EvalResult.from_recall(name, label, "", score.recall)
        paths["recall_plot"] = str(plot_recall_curves(
            [ev], out / "recall_at_n.png", title=f"Replay recall@N ({score.summary['ground_truth']})"))
    if score.top1_pr is not None:
        paths["pr_plot"] = str(plot_pr_curves({f"top-1 {label}": score.top1_pr}, out / "pr.png",
                                              title="Replay top-1 precision-recall"))
    return paths
