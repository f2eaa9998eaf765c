"""Sequence matching: a SeqSLAM-style search over the stream of query-to-map similarities.

A robot sees places in order, so the evidence of its last L frames can be pooled: the place it is
at now is the end of a straight line through the (query x map) similarity matrix, whose slope is
the robot's speed relative to the map's. This follows SeqSLAM (M. Milford and G. Wyeth, *SeqSLAM:
Visual route-based navigation for sunny summer days and stormy winter nights*, ICRA 2012, Sec. III),
written for similarities (higher is better) instead of image differences:

* **contrast enhancement** -- SeqSLAM normalises each query's difference vector locally,
  ``D^_i = (D_i - mean_l) / std_l`` with the mean and standard deviation of the ``R_window``
  templates around template ``i``. Here ``S^_t[i] = (S_t[i] - mean) / std`` over a neighbourhood
  of places: :func:`contrast_normalise` uses a window of places on a dense column (``window=None``:
  the whole column); the streaming :class:`SequenceMatcher` uses the frame's own ``K`` retrieved
  candidates (with ``K = N`` that is the whole-column z-score). A window of 10 places, as in the
  paper, suppresses the true peak on densely sampled maps (neighbouring places look alike; see
  docs/sequence.md for the numbers).
* **sequence search** -- the score of ending at place ``j`` with velocity ``v`` (map places per
  query step) is the *mean* of ``S^`` along the line ``k_t = j - round(v (x_T - x_t))`` over the
  buffered frames ``t`` (SeqSLAM: ``S = sum_t D^t_k`` with ``k = s + V (d_s - T + t)``, minimised);
  the sequence score of ``j`` is the best over ``v`` in ``[v_min, v_max]``, and the match is the
  best ``j``. The mean (not the sum) keeps scores comparable while the buffer fills; rounding the
  shift ``v (x_T - x_t)`` once per frame makes all lines of one velocity parallel.

Choices beyond the paper (docs/sequence.md measures them):

* Streaming: a rolling buffer of the last ``L`` frames' top-``K`` candidates (ids + similarities),
  so a frame costs ``O(L K V)`` work, independent of the map size -- never an N x L matrix. A place
  that is not among a frame's ``K`` candidates gets that frame's *floor*, the normalised ``K``-th
  similarity (an upper bound of its value); so does a line point before the map's first place.
* Velocities: ``n_v = ceil((v_max - v_min) * span) + 1`` evenly spaced values, ``span`` = the
  buffer's extent in steps, so the far ends of neighbouring lines are at most one place apart.
  ``v_min`` may be 0 or negative; ``reverse`` also tries the mirrored range ``[-v_max, -v_min]``.
* Positions ``x_t``: the frame count by default, or a progress measure such as the signed travelled
  distance divided by the map's place spacing (odometry; :func:`signed_step`). A frame less than
  ``min_step`` from the last buffered frame replaces it: a stopped robot does not flood the buffer
  with one place, and a reversing one moves back along the line.
* Candidate ends: the newest frame's ``K`` candidates plus the continuation of the previous
  sequence match along each velocity (``track``), so one bad frame does not lose a good track.
* Fallback: a best sequence score below ``min_score`` reports the single-frame result instead.

Map places must be numbered along the route (maps built from an ordered run by ``build-map`` or by
the localizer's map mode are); a line across a jump in the numbering simply scores low.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from vpr_ros.core.errors import ConfigError

__all__ = [
    "SequenceConfig",
    "SequenceMatcher",
    "SequenceResult",
    "contrast_normalise",
    "dense_sequence_scores",
    "match_stream",
    "signed_step",
    "velocities",
]

#: Key stride of the buffer's flat look-up table: ``slot * _STRIDE + place id``.
_STRIDE = 1 << 40


@dataclass(frozen=True)
class SequenceConfig:
    """Settings of :class:`SequenceMatcher` (module docstring).

    ``length``: frames in a sequence (``L``; 1 = single frame). ``v_min`` / ``v_max``: velocity
    range in map places per query step. ``candidates``: ``K``, the top-K of each frame kept in the
    buffer. ``min_score``: a best sequence score below this (in contrast-normalised units) falls
    back to the single-frame result (``-inf``: never). ``min_step``: positions closer than this to
    the previous buffered frame replace it (0: every frame is buffered). ``track``: also try the
    continuation of the previous match. ``reverse``: also try velocities in ``[-v_max, -v_min]``.
    ``max_velocities``: cap on ``n_v`` (per direction).
    """

    length: int = 10
    v_min: float = 0.8
    v_max: float = 1.25
    candidates: int = 50
    min_score: float = -math.inf
    min_step: float = 0.5
    track: bool = True
    reverse: bool = False
    max_velocities: int = 64

    def __post_init__(self) -> None:
        if isinstance(self.length, bool) or not isinstance(self.length, int) or self.length < 1:
            raise ConfigError(f"sequence length must be an integer >= 1, got {self.length!r}")
        for name in ("v_min", "v_max", "min_step"):
            if not math.isfinite(float(getattr(self, name))):
                raise ConfigError(f"sequence {name} must be finite, got {getattr(self, name)!r}")
        if self.v_min > self.v_max:
            raise ConfigError(f"sequence velocity range is empty: v_min {self.v_min} > v_max {self.v_max}")
        if isinstance(self.candidates, bool) or not isinstance(self.candidates, int) or self.candidates < 1:
            raise ConfigError(f"sequence candidates must be an integer >= 1, got {self.candidates!r}")
        if self.min_step < 0:
            raise ConfigError(f"sequence min_step must be >= 0, got {self.min_step}")
        if math.isnan(self.min_score):
            raise ConfigError("sequence min_score must not be NaN")
        if self.max_velocities < 1:
            raise ConfigError(f"sequence max_velocities must be >= 1, got {self.max_velocities}")


@dataclass
class SequenceResult:
    """The sequence match of the newest frame, and its single-frame match.

    ``ids`` / ``scores``: candidate end places by sequence score, best first (mean contrast-
    normalised similarity along the best line); ``velocity``: the best line's velocity for
    ``ids[0]``; ``frames``: buffered frames the score pooled; ``fallback``: True when the best
    sequence score was below ``min_score`` and ``ids`` / ``scores`` are the single-frame ones
    (similarities then). ``single_ids`` / ``single_scores``: the frame's own top-K (similarities).
    """

    ids: np.ndarray
    scores: np.ndarray
    velocity: float
    frames: int
    fallback: bool
    single_ids: np.ndarray
    single_scores: np.ndarray
    support: float = 0.0

    @property
    def best(self) -> int:
        """The matched place id (-1 when there is none)."""
        return int(self.ids[0]) if len(self.ids) else -1

    @property
    def score(self) -> float:
        """The matched place's score (NaN when there is none)."""
        return float(self.scores[0]) if len(self.scores) else math.nan


def velocities(v_min: float, v_max: float, span: float, cap: int = 64) -> np.ndarray:
    """The velocities tried: ``ceil((v_max - v_min) * span) + 1`` evenly spaced (at most ``cap``).

    ``span`` is the buffer's extent in query steps, so the far ends of two neighbouring lines are
    at most one place apart. Example: ``velocities(0.8, 1.25, 19)`` -> 10 values, step 0.05.
    """
    n = 1 if v_max <= v_min else int(math.ceil((v_max - v_min) * max(float(span), 0.0) - 1e-9)) + 1
    n = max(1, min(n, int(cap)))
    return np.array([0.5 * (v_min + v_max)]) if n == 1 and v_max > v_min else np.linspace(v_min, v_max, n)


def contrast_normalise(column: np.ndarray, window: int | None = None, eps: float = 1e-6) -> np.ndarray:
    """SeqSLAM contrast enhancement of similarity columns: ``(S - local mean) / local std``.

    ``column``: ``(N,)`` or ``(Q, N)`` similarities of queries to the N map places, in route order.
    ``window``: places in the neighbourhood of place ``i`` (``[i - window // 2, i + window // 2]``,
    clipped to the map); None = the whole column. A standard deviation below ``eps`` counts as
    ``eps`` (a flat neighbourhood has no contrast to enhance).
    """
    s = np.asarray(column, dtype=np.float64)
    flat = s.ndim == 1
    s = np.atleast_2d(s)
    if window is None:
        out = (s - s.mean(1, keepdims=True)) / np.maximum(s.std(1, keepdims=True), eps)
        return out[0] if flat else out
    if window < 1:
        raise ConfigError(f"contrast window must be >= 1 place, got {window}")
    n = s.shape[1]
    half = int(window) // 2
    c1 = np.concatenate([np.zeros((len(s), 1)), np.cumsum(s, 1)], 1)
    c2 = np.concatenate([np.zeros((len(s), 1)), np.cumsum(s * s, 1)], 1)
    lo = np.clip(np.arange(n) - half, 0, n)
    hi = np.clip(np.arange(n) + half + 1, 0, n)
    cnt = hi - lo
    mean = (c1[:, hi] - c1[:, lo]) / cnt
    var = np.maximum((c2[:, hi] - c2[:, lo]) / cnt - mean * mean, 0.0)
    out = (s - mean) / np.maximum(np.sqrt(var), eps)
    return out[0] if flat else out


def dense_sequence_scores(normalised: np.ndarray, vels: Sequence[float],
                          positions: Sequence[float] | None = None,
                          floor: float | Sequence[float] = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Sequence scores of every end place for the last row of a dense normalised matrix (reference).

    ``normalised``: ``(n, N)`` contrast-normalised similarities of the last ``n`` frames, oldest
    first; ``positions``: their positions (default ``0..n-1``); ``floor``: the value of a line point
    outside the map (one per frame, or one for all). Returns ``(scores (N,), best velocity (N,))``:
    ``score[j] = max_v mean_t S^_t[j - round(v (x_last - x_t))]``. O(n N V); for tests and
    offline checks -- :class:`SequenceMatcher` is the streaming form.
    """
    s = np.asarray(normalised, dtype=np.float64)
    n, big_n = s.shape
    x = np.arange(n, dtype=np.float64) if positions is None else np.asarray(positions, np.float64)
    fl = np.broadcast_to(np.asarray(floor, np.float64), (n,))
    ends = np.arange(big_n)
    best = np.full(big_n, -np.inf)
    best_v = np.zeros(big_n)
    for v in vels:
        places = ends[:, None] - np.rint(v * (x[-1] - x)).astype(np.int64)[None, :]  # (N, n)
        inside = (places >= 0) & (places < big_n)
        vals = np.where(inside, s[np.arange(n)[None, :], np.clip(places, 0, big_n - 1)], fl[None, :])
        score = vals.mean(1)
        better = score > best
        best[better], best_v[better] = score[better], v
    return best, best_v


def signed_step(p0: Sequence[float], p1: Sequence[float], q1: Sequence[float] | None = None) -> float:
    """Distance from position ``p0`` to ``p1``, negative when the robot moved backwards.

    The sign is that of the displacement along the forward (x) axis of orientation ``q1``
    (quaternion x, y, z, w of the newer pose; REP 103: x forward); without ``q1`` the distance is
    taken as forward. Example: ``signed_step((0, 0, 0), (-2, 0, 0), (0, 0, 0, 1)) == -2.0``.
    """
    d = np.asarray(p1, np.float64)[:3] - np.asarray(p0, np.float64)[:3]
    dist = float(np.linalg.norm(d))
    if q1 is None or dist == 0.0:
        return dist
    x, y, z, w = (float(c) for c in q1)
    forward = np.array([1 - 2 * (y * y + z * z), 2 * (x * y + w * z), 2 * (x * z - w * y)])  # R @ e_x
    return -dist if float(forward @ d) < 0 else dist


@dataclass
class _Slot:
    position: float
    floor: float


@dataclass
class SequenceMatcher:
    """Streaming sequence matcher: :meth:`push` one frame's top-K, get the sequence match.

    Not thread-safe (one caller, e.g. the localizer's worker). :meth:`reset` forgets the buffer
    (e.g. after a map change or a jump in time).
    """

    config: SequenceConfig = field(default_factory=SequenceConfig)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Empty the buffer."""
        length, k = self.config.length, self.config.candidates
        self._keys = np.full(length * k, 0, np.int64)
        self._vals = np.zeros(length * k, np.float64)
        self._slots: list[_Slot | None] = [None] * length
        self._order: list[int] = []  # slots, oldest first
        self._last_best: int | None = None
        self._max_id = -1  # largest place id seen: tracked ends beyond it are not places
        self._last_position: float | None = None  # of the last pushed frame
        self._last_match_position: float | None = None  # buffered position of the last match
        for slot in range(length):
            self._clear(slot)

    def __len__(self) -> int:
        return len(self._order)

    @property
    def position(self) -> float | None:
        """The position of the last pushed frame (None before the first)."""
        return self._last_position

    def _clear(self, slot: int) -> None:
        k = self.config.candidates
        base = slot * _STRIDE
        self._keys[slot * k : (slot + 1) * k] = base + _STRIDE - 1 - np.arange(k, 0, -1)  # sorted pads
        self._vals[slot * k : (slot + 1) * k] = 0.0

    def _store(self, slot: int, ids: np.ndarray, normalised: np.ndarray) -> None:
        k = self.config.candidates
        self._clear(slot)
        order = np.argsort(ids, kind="stable")
        n = len(ids)
        self._keys[slot * k : slot * k + n] = slot * _STRIDE + ids[order]
        self._vals[slot * k : slot * k + n] = normalised[order]

    def push(self, ids: np.ndarray, scores: np.ndarray, position: float | None = None) -> SequenceResult:
        """Add the newest frame (its top-K map ids and similarities, best first) and match.

        ``position``: the frame's progress (default: the previous position + 1). Ids < 0 (missing
        neighbours) and non-finite scores are ignored; only the first ``candidates`` are used.
        """
        cfg = self.config
        ids = np.asarray(ids, np.int64).reshape(-1)
        scores = np.asarray(scores, np.float64).reshape(-1)
        if ids.shape != scores.shape:
            raise ValueError(f"ids {ids.shape} and scores {scores.shape} differ in shape")
        keep = (ids >= 0) & np.isfinite(scores)
        ids, scores = ids[keep][: cfg.candidates], scores[keep][: cfg.candidates]
        if len(ids) and len(np.unique(ids)) != len(ids):
            raise ValueError("duplicate ids in one frame's candidates")
        if position is None:
            position = 0.0 if self._last_position is None else self._last_position + 1.0
        position = float(position)
        if not math.isfinite(position):
            raise ValueError(f"position must be finite, got {position}")
        single_ids, single_scores = ids.copy(), scores.astype(np.float32)
        if len(ids) == 0:  # nothing retrieved: the frame carries no evidence
            return SequenceResult(ids, scores.astype(np.float32), 0.0, len(self._order), True, single_ids,
                                  single_scores)
        self._last_position = position

        # contrast enhancement over the frame's candidate neighbourhood (module docstring)
        mean = float(scores.mean())
        std = max(float(scores.std()), 1e-6)
        normalised = (scores - mean) / std
        floor = float(normalised.min())

        last = self._slots[self._order[-1]] if self._order else None
        if last is not None and cfg.min_step > 0 and abs(position - last.position) < cfg.min_step:
            slot = self._order[-1]  # not moved: the newest frame replaces the last buffered one,
            position = last.position  # which keeps its position so slow progress still adds up
        elif len(self._order) < cfg.length:
            slot = len(self._order)
            self._order.append(slot)
        else:
            slot = self._order.pop(0)
            self._order.append(slot)
        self._slots[slot] = _Slot(position, floor)
        self._store(slot, ids, normalised)
        self._max_id = max(self._max_id, int(ids.max()))
        return self._match(ids, single_ids, single_scores, position)

    def _match(self, ids: np.ndarray, single_ids: np.ndarray, single_scores: np.ndarray,
               position: float) -> SequenceResult:
        cfg = self.config
        order = self._order
        n = len(order)
        slots = np.array(order, np.int64)
        dx = position - np.array([self._slots[s].position for s in order])  # (n,) steps back
        floors = np.array([self._slots[s].floor for s in order])
        vels = velocities(cfg.v_min, cfg.v_max, float(np.abs(dx).max()), cfg.max_velocities)
        if cfg.reverse:
            vels = np.concatenate([-vels[::-1], vels])
        ends = ids
        if cfg.track and self._last_best is not None and self._last_match_position is not None:
            ahead = self._last_best + np.rint(vels * (position - self._last_match_position)).astype(np.int64)
            ends = np.concatenate([ids, ahead[(ahead >= 0) & (ahead <= self._max_id)]])
        ends = np.unique(ends)
        # A line's point in frame t is its end minus the shift round(v * dx_t), the same for every end,
        # so the look-ups are done once per distinct (frame, shift) pair ...
        shifts = np.rint(vels[:, None] * dx[None, :]).astype(np.int64)  # (V, n)
        lo = int(shifts.min())
        code = np.arange(n)[None, :] * (int(shifts.max()) - lo + 1) + (shifts - lo)
        pairs, inverse = np.unique(code, return_inverse=True)
        pair_t = pairs // (int(shifts.max()) - lo + 1)
        pair_shift = pairs % (int(shifts.max()) - lo + 1) + lo
        places = ends[None, :] - pair_shift[:, None]  # (P, E)
        keys = slots[pair_t][:, None] * _STRIDE + np.clip(places, 0, _STRIDE - 2)
        at = np.minimum(np.searchsorted(self._keys, keys), len(self._keys) - 1)
        found = (self._keys[at] == keys) & (places >= 0)
        vals = np.where(found, self._vals[at], floors[pair_t][:, None])  # (P, E)
        # ... and each line's mean is a 0/1 selection of n pairs: (V, P) @ (P, E) / n.
        select = np.zeros((len(vels), len(pairs)))
        select[np.repeat(np.arange(len(vels)), n), inverse.reshape(-1)] = 1.0 / n
        line = select @ vals  # (V, E)
        best_v = line.argmax(0)
        score = line[best_v, np.arange(len(ends))]
        rank = np.argsort(-score, kind="stable")
        seq_ids, seq_scores = ends[rank], score[rank].astype(np.float32)
        top_v = int(best_v[rank[0]])
        velocity = float(vels[top_v])
        support = float(select[top_v] @ found[:, rank[0]])
        fallback = bool(seq_scores[0] < cfg.min_score)
        self._last_best = int(single_ids[0]) if fallback else int(seq_ids[0])
        self._last_match_position = position
        if fallback:
            return SequenceResult(single_ids, single_scores, velocity, n, True, single_ids, single_scores,
                                  support)
        return SequenceResult(seq_ids, seq_scores, velocity, n, False, single_ids, single_scores, support)


def match_stream(ids: np.ndarray, scores: np.ndarray, config: SequenceConfig,
                 positions: Sequence[float] | None = None, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Run a :class:`SequenceMatcher` over a whole stream: ``(Q, K)`` top-K ids and similarities.

    Returns ``(ids (Q, k), scores (Q, k))`` of the sequence matches, -1 / NaN where fewer than
    ``k`` places were scored. ``positions``: per frame (default: frame count).
    """
    ids = np.asarray(ids)
    scores = np.asarray(scores)
    matcher = SequenceMatcher(config)
    out_ids = np.full((len(ids), k), -1, np.int64)
    out_scores = np.full((len(ids), k), np.nan, np.float32)
    for t in range(len(ids)):
        res = matcher.push(ids[t], scores[t], None if positions is None else positions[t])
        n = min(k, len(res.ids))
        out_ids[t, :n], out_scores[t, :n] = res.ids[:n], res.scores[:n]
    return out_ids, out_scores

