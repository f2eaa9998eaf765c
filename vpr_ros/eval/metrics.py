"""Place-recognition metrics: recall@N for retrieval and sequence matching, precision-recall for loop closure,
result tables.

Recalls are fractions in [0, 1] everywhere; tables print them as percentages.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vpr_ros.core.fileio import atomic_write_text
from vpr_ros.core.sequence import SequenceConfig, match_stream

RECALL_NS = (1, 5, 10, 20)


# --------------------------------------------------------------------------- recall@N


class RecallResult(dict):
    """Recall@N as a ``{N: recall}`` dict, plus how it was counted.

    ``n_queries``: queries evaluated (those with at least one positive); ``n_without_positive``:
    queries excluded because the ground truth gives them no positive; ``first_hit``: per input query,
    the rank (0-based) of the first correct prediction, -1 if none in the top K or no positive.
    """

    def __init__(self, recalls: dict[int, float], n_queries: int, n_without_positive: int,
                 first_hit: np.ndarray) -> None:
        super().__init__(recalls)
        self.n_queries = n_queries
        self.n_without_positive = n_without_positive
        self.first_hit = first_hit


def recall_at_n(
    predictions: np.ndarray, positives: Sequence[np.ndarray], ns: Sequence[int] = RECALL_NS
) -> RecallResult:
    """Fraction of queries with a correct database index among their first N predictions.

    ``predictions``: ``(Q, K)`` database indices, best first (negative entries mean "no result").
    ``positives``: per query, the database indices that count as correct. Queries without any
    positive are excluded and counted in ``n_without_positive``. N larger than K uses K.
    Raises ValueError on mismatched shapes or when no query has a positive.
    """
    preds = np.asarray(predictions)
    if preds.ndim != 2:
        raise ValueError(f"predictions must be (Q, K), got shape {preds.shape}")
    if preds.size and not np.issubdtype(preds.dtype, np.integer):
        raise ValueError(f"predictions must be integer indices, got dtype {preds.dtype}")
    if len(positives) != preds.shape[0]:
        raise ValueError(f"{preds.shape[0]} prediction rows but {len(positives)} positive lists")
    ns = tuple(int(n) for n in ns)
    if not ns or min(ns) < 1:
        raise ValueError(f"ns must be positive integers, got {ns}")
    q, k = preds.shape
    first_hit = np.full(q, -1, dtype=np.int64)
    has_pos = np.zeros(q, dtype=bool)
    for i in range(q):
        pos = np.asarray(positives[i])
        if pos.size == 0:
            continue
        has_pos[i] = True
        hits = np.nonzero((preds[i] >= 0) & np.isin(preds[i], pos))[0]
        if hits.size:
            first_hit[i] = hits[0]
    n_eval = int(has_pos.sum())
    if n_eval == 0:
        raise ValueError(f"none of the {q} queries has a positive; recall is undefined")
    evaluated = first_hit[has_pos]
    recalls = {n: float(((evaluated >= 0) & (evaluated < min(n, k))).sum() / n_eval) for n in ns}
    return RecallResult(recalls, n_eval, q - n_eval, first_hit)


def sequence_recall(ids: np.ndarray, scores: np.ndarray, positives: Sequence[np.ndarray],
                    lengths: Sequence[int], *, ns: Sequence[int] = (1, 5),
                    **config: object) -> dict[int, RecallResult]:
    """Recall@N of sequence matching over one query stream, for each sequence length in ``lengths``.

    ``ids`` / ``scores``: ``(Q, K)`` top-K database indices (in route order) and similarities of the
    queries in stream order; ``positives``: per query, the correct database indices (as for
    :func:`recall_at_n`); ``config``: further :class:`~vpr_ros.core.sequence.SequenceConfig` fields
    (``candidates`` defaults to K). Returns ``{L: RecallResult}``; L = 1 is the single frame.
    """
    ids, scores = np.asarray(ids), np.asarray(scores)
    options = {"candidates": int(ids.shape[1]), **config}
    out = {}
    for length in lengths:
        seq, _ = match_stream(ids, scores, SequenceConfig(length=int(length), **options), k=max(ns))
        out[int(length)] = recall_at_n(seq, positives, ns)
    return out


# --------------------------------------------------------------------------- precision-recall


@dataclass
class PRCurve:
    """Precision-recall of thresholded top-1 matches.

    ``thresholds`` are the distinct scores, descending; point i accepts every match with
    ``score >= thresholds[i]``. ``recall`` divides by ``n_positives`` (queries that have a true
    match). ``average_precision`` is sum over points of (R_i - R_{i-1}) * P_i with R_{-1} = 0.
    ``query_indices`` / ``match_indices`` are set by :func:`loop_closure_pr` (the frame and its match).
    """

    precision: np.ndarray
    recall: np.ndarray
    thresholds: np.ndarray
    average_precision: float
    recall_at_100_precision: float
    best_f1: float
    best_f1_threshold: float
    n_positives: int
    scores: np.ndarray
    correct: np.ndarray
    query_indices: np.ndarray | None = None
    match_indices: np.ndarray | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (scalars and the curve as lists)."""
        return {
            "average_precision": self.average_precision,
            "recall_at_100_precision": self.recall_at_100_precision,
            "best_f1": self.best_f1,
            "best_f1_threshold": self.best_f1_threshold,
            "n_positives": self.n_positives,
            "n_predictions": int(len(self.scores)),
            "precision": self.precision.tolist(),
            "recall": self.recall.tolist(),
            "thresholds": self.thresholds.tolist(),
        }


def precision_recall(scores: np.ndarray, correct: np.ndarray, *, n_positives: int | None = None) -> PRCurve:
    """Precision-recall over thresholds on top-1 match scores (higher = more confident).

    ``correct[i]``: whether query i's top-1 match is right. A match accepted while wrong is a false
    positive. ``n_positives``: number of queries that have a true match, the recall denominator
    (default ``correct.sum()``); queries with a true match but a wrong top-1 can never be recalled.
    Raises ValueError for empty, mismatched or non-finite input, or no positives.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    c = np.asarray(correct).ravel()
    if s.shape != c.shape:
        raise ValueError(f"scores ({s.size}) and correct ({c.size}) differ in length")
    if s.size == 0:
        raise ValueError("no scores to threshold")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    c = c.astype(bool)
    n_pos = int(c.sum()) if n_positives is None else int(n_positives)
    if n_pos < int(c.sum()):
        raise ValueError(f"n_positives={n_pos} is less than the {int(c.sum())} correct matches")
    if n_pos == 0:
        raise ValueError("no positives: recall is undefined")
    order = np.argsort(-s, kind="stable")
    s_sorted, c_sorted = s[order], c[order]
    tp = np.cumsum(c_sorted)
    accepted = np.arange(1, s.size + 1)
    # One point per distinct score: the last position of each run of equal (descending) scores.
    last = np.r_[np.nonzero(np.diff(s_sorted))[0], s.size - 1]
    tp, accepted, thresholds = tp[last], accepted[last], s_sorted[last]
    precision = tp / accepted
    recall = tp / n_pos
    ap = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
    perfect = tp == accepted
    r100 = float(recall[perfect].max()) if perfect.any() else 0.0
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    best = int(np.argmax(f1))
    return PRCurve(precision=precision, recall=recall, thresholds=thresholds, average_precision=ap,
                   recall_at_100_precision=r100, best_f1=float(f1[best]),
                   best_f1_threshold=float(thresholds[best]), n_positives=n_pos, scores=s, correct=c)


def loop_closure_pr(similarity: np.ndarray, gt: np.ndarray, *, exclude_window: int = 10) -> PRCurve:
    """Loop-closure precision-recall of a sequence from its full ``(N, N)`` similarity matrix.

    Frame i's candidate is its most similar frame j among those older than the window
    (``j < i - exclude_window``); frames without any candidate are skipped. The match is correct
    when ``gt[i, j]`` or ``gt[j, i]`` is set. Frames whose GT has a loop among their candidates are
    the positives (recall denominator); frames without one are negatives, where any accepted match
    is a false positive.
    """
    sim = np.asarray(similarity, dtype=np.float64)
    g = np.asarray(gt).astype(bool)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"similarity must be square (N, N), got {sim.shape}")
    if g.shape != sim.shape:
        raise ValueError(f"gt shape {g.shape} differs from similarity shape {sim.shape}")
    if exclude_window < 0:
        raise ValueError(f"exclude_window must be >= 0, got {exclude_window}")
    g = g | g.T
    n = sim.shape[0]
    queries, matches, scores, correct = [], [], [], []
    n_pos = 0
    for i in range(exclude_window + 1, n):
        cand = sim[i, : i - exclude_window]
        j = int(np.argmax(cand))
        queries.append(i)
        matches.append(j)
        scores.append(cand[j])
        correct.append(bool(g[i, j]))
        n_pos += bool(g[i, : i - exclude_window].any())
    if not queries:
        raise ValueError(f"sequence of {n} frames has no frame older than the exclusion window "
                         f"{exclude_window}")
    curve = precision_recall(np.array(scores), np.array(correct), n_positives=n_pos)
    curve.query_indices = np.array(queries, dtype=np.int64)
    curve.match_indices = np.array(matches, dtype=np.int64)
    return curve


# --------------------------------------------------------------------------- results and tables


@dataclass
class EvalResult:
    """One evaluation run: dataset ``name``, ``model``, image ``degradation``, and its recall@N."""

    name: str
    model: str
    degradation: str = "none"
    recalls: dict[int, float] = field(default_factory=dict)
    n_queries: int = 0
    n_without_positive: int = 0
    bytes_per_frame: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_recall(cls, name: str, model: str, degradation: str, recall: RecallResult, *,
                    bytes_per_frame: float | None = None, **extra: Any) -> EvalResult:
        """Build from a :func:`recall_at_n` result."""
        return cls(name=name, model=model, degradation=degradation, recalls=dict(recall),
                   n_queries=recall.n_queries, n_without_positive=recall.n_without_positive,
                   bytes_per_frame=bytes_per_frame, extra=dict(extra))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalResult:
        """Inverse of :meth:`to_dict` (recall keys may be strings, as after a JSON round trip)."""
        d = dict(data)
        d["recalls"] = {int(k): (float("nan") if v is None else float(v))
                        for k, v in d.get("recalls", {}).items()}
        return cls(**d)

    @property
    def label(self) -> str:
        """``name / model / degradation`` (empty parts left out)."""
        return " / ".join(p for p in (self.name, self.model, self.degradation) if p)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict of the fields (JSON-ready after :func:`save_results_json`'s cleaning)."""
        return asdict(self)

    def row(self, ns: Sequence[int] = RECALL_NS) -> list[str]:
        """Table cells: label, recall@N in percent per N ('-' when not measured), bytes/frame, queries."""
        cells = [self.label]
        for n in ns:
            r = self.recalls.get(n)
            cells.append("-" if r is None or not math.isfinite(r) else f"{100 * r:.1f}")
        cells.append(_format_bytes(self.bytes_per_frame))
        cells.append(str(self.n_queries))
        return cells


def _format_bytes(b: float | None) -> str:
    if b is None or not math.isfinite(b):
        return "-"
    return f"{b:,.0f}" if b >= 100 else f"{b:.1f}"


def format_table(results: Sequence[EvalResult]) -> str:
    """An aligned plain-text table: label | R@1 R@5 R@10 R@20 (percent) | bytes/frame | queries.

    Columns are the union of the results' N values (the default set when none has any)."""
    ns = sorted({n for r in results for n in r.recalls}) or list(RECALL_NS)
    header = ["dataset / model / degradation", *(f"R@{n}" for n in ns), "bytes/frame", "queries"]
    rows = [header, *(r.row(ns) for r in results)]
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]

    split = 1 + len(ns)

    def fmt(row: list[str]) -> str:
        cells = [cell.rjust(w) for cell, w in zip(row, widths, strict=True)]
        return f"{row[0].ljust(widths[0])} | {' '.join(cells[1:split])} | {' | '.join(cells[split:])}"

    lines = [fmt(header), "-" * len(fmt(header)), *(fmt(r) for r in rows[1:])]
    return "\n".join(lines)


def json_default(obj: Any) -> Any:
    """``json.dumps`` ``default=``: numpy scalars and arrays as Python values, paths as strings."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "to_dict"):
        return _jsonable(obj.to_dict())
    return obj


def save_results_json(results: Sequence[EvalResult | dict[str, Any]], path: str | os.PathLike, *,
                      sections: dict[str, Any] | None = None) -> None:
    """Write ``{"results": [...], **sections}`` atomically (temporary file beside ``path``, then os.replace).

    ``sections``: further top-level keys (e.g. per-query matches); :func:`load_results_json` reads only
    ``results``. NumPy values become plain numbers, non-finite floats become null; parent folders are
    created."""
    if sections and "results" in sections:
        raise ValueError("sections must not replace the 'results' key")
    payload = {"results": [_jsonable(r) for r in results], **_jsonable(dict(sections or {}))}
    atomic_write_text(path, json.dumps(payload, indent=2, allow_nan=False) + "\n")


def load_results_json(path: str | os.PathLike) -> list[EvalResult]:
    """Read results written by :func:`save_results_json`."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return [EvalResult.from_dict(d) for d in data["results"]]
