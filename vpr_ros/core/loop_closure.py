"""Loop-closure detection for SLAM from global place descriptors, with optional geometric verification.

:class:`LoopClosureDetector` takes frames in time order, ``add(frame_id, stamp, descriptor, image)``,
and for each returns a :class:`Detection`: the candidates it considered and the loop closures it
accepts. A candidate is a past frame

* outside the temporal exclusion window: ``query_stamp - match_stamp > exclusion_window_s`` and more
  than ``exclusion_window_frames`` frames back (recent frames always look alike; they are odometry's job),
* with descriptor similarity ``score >= score_threshold`` (cosine of L2-normalised descriptors),
* among the ``top_k`` best such frames.

With ``geometric_verification`` the candidates are checked best score first (ORB matches + RANSAC on
the essential or fundamental matrix, :mod:`vpr_ros.core.geometry`) and a candidate is accepted only with
at least ``min_inliers`` inliers; the accepted closure carries the relative pose ``T_match_query``
(rotation + unit translation). At most ``max_closures`` are accepted per query. Without verification the
best ``max_closures`` candidates are accepted as they are.

The detector keeps descriptors and, for verification, each frame's ORB keypoints + descriptors (never
the images) in a :class:`~vpr_ros.core.geometry.FeatureCache` of bounded size.
:meth:`LoopClosureDetector.check_candidates` applies the same rules to candidates retrieved elsewhere
(the ROS node gets them from the localizer's ``PlaceMatch``). Candidates that are places of a
prebuilt map are verified with the ORB features the map stores (``vpr-ros build-map
--local-features``; :func:`map_feature_lookup`); a map without them cannot verify its places and
says so in the candidate's ``reason`` (:data:`NO_MAP_FEATURES`).

The second half of the module evaluates detection on a sequence with a loop ground truth (RTAB-Map's
``rtabmap_loop`` set): precision-recall with and without verification, under transmission degradations,
and the choice of the operating point that is shipped as the node's default parameters.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from vpr_ros.core.errors import ConfigError
from vpr_ros.core.geometry import (
    DEFAULT_VERIFY_MIN_INLIERS,
    FeatureCache,
    Features,
    OrbExtractor,
    VerificationConfig,
    rotation_to_quaternion,
    verify_pair,
)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- configuration

#: The operating point chosen by ``vpr-ros loop-eval`` on rtabmap_loop (see docs/loop_closure.md):
#: the highest recall at precision 1.0 for the default model, clean and degraded links alike.
DEFAULT_EXCLUSION_WINDOW_S = 10.0
DEFAULT_SCORE_THRESHOLD = 0.85
DEFAULT_TOP_K = 5
DEFAULT_MIN_INLIERS = DEFAULT_VERIFY_MIN_INLIERS

#: Sweeps of :func:`choose_operating_point`: candidates verified per query, inlier thresholds.
TOP_K_GRID = (1, 3, 5)
MIN_INLIERS_GRID = (15, 20, 25, 30, 40, 50)
#: ``min_inliers`` must exceed the worst false pair's inlier count by this factor.
INLIER_MARGIN = 1.25
#: Candidates this many frames from a ground-truth loop partner are "near misses", not clear false pairs.
NEAR_FRAMES = 2


@dataclass(frozen=True)
class LoopClosureConfig:
    """Candidate selection and verification rules (see the module docstring)."""

    exclusion_window_s: float = DEFAULT_EXCLUSION_WINDOW_S
    exclusion_window_frames: int = 0
    score_threshold: float = DEFAULT_SCORE_THRESHOLD
    top_k: int = DEFAULT_TOP_K
    max_closures: int = 1
    geometric_verification: bool = True
    verification: VerificationConfig = field(default_factory=VerificationConfig)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def min_inliers(self) -> int:
        return int(self.verification.min_inliers)

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid setting."""
        if not (math.isfinite(self.exclusion_window_s) and self.exclusion_window_s >= 0):
            raise ConfigError(f"exclusion_window_s must be a finite number >= 0, "
                              f"got {self.exclusion_window_s}")
        if int(self.exclusion_window_frames) < 0:
            raise ConfigError(f"exclusion_window_frames must be >= 0, got {self.exclusion_window_frames}")
        if not (math.isfinite(self.score_threshold) and -1.0 <= self.score_threshold <= 1.0):
            raise ConfigError(f"score_threshold must be a cosine similarity in [-1, 1], "
                              f"got {self.score_threshold}")
        if not 1 <= int(self.top_k) <= 100:
            raise ConfigError(f"top_k must be in 1..100, got {self.top_k}")
        if not 1 <= int(self.max_closures) <= int(self.top_k):
            raise ConfigError(f"max_closures must be in 1..top_k ({self.top_k}), got {self.max_closures}")
        if not isinstance(self.verification, VerificationConfig):
            raise ConfigError("verification must be a VerificationConfig")
        self.verification.validate()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["verification"] = asdict(self.verification)
        return d


# --------------------------------------------------------------------------- records


@dataclass
class LoopCandidate:
    """One (query, earlier frame) pair considered for a loop closure.

    ``rotation`` (3x3) / ``translation`` (unit 3-vector) are ``T_match_query`` in the camera optical
    convention when verification estimated them. ``accepted`` marks a published loop closure;
    ``reason`` says why a candidate was not accepted.
    """

    query_id: int
    query_stamp: float
    match_id: int
    match_stamp: float
    score: float
    verified: bool = False
    inliers: int = 0
    matches: int = 0
    rotation: np.ndarray | None = None
    translation: np.ndarray | None = None
    accepted: bool = False
    reason: str = ""

    @property
    def has_transform(self) -> bool:
        return self.rotation is not None and self.translation is not None

    @property
    def quaternion(self) -> tuple[float, float, float, float] | None:
        """``(x, y, z, w)`` of ``rotation``, or None."""
        return None if self.rotation is None else rotation_to_quaternion(self.rotation)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record (rotation as a quaternion)."""
        return {
            "query_id": int(self.query_id), "query_stamp": float(self.query_stamp),
            "match_id": int(self.match_id), "match_stamp": float(self.match_stamp),
            "score": float(self.score), "verified": bool(self.verified), "inliers": int(self.inliers),
            "matches": int(self.matches), "accepted": bool(self.accepted), "reason": self.reason,
            "rotation_xyzw": list(self.quaternion) if self.rotation is not None else None,
            "translation_unit": None if self.translation is None else [float(v) for v in self.translation],
        }


@dataclass
class Detection:
    """What one query produced: every ``candidate`` considered (best score first) and the ``closures``
    accepted among them."""

    query_id: int
    query_stamp: float
    candidates: list[LoopCandidate] = field(default_factory=list)

    @property
    def closures(self) -> list[LoopCandidate]:
        return [c for c in self.candidates if c.accepted]


#: A candidate's ORB features; None when unknown, or a string saying why it cannot be verified.
FeatureLookup = Callable[[LoopCandidate], Features | str | None]

#: ``LoopCandidate.reason`` of candidates that could not be verified for lack of image features.
NO_QUERY_FEATURES = "no image features for the query"
NO_MATCH_FEATURES = "no image features for the match (never seen, or evicted from the feature cache)"
MAX_CLOSURES_REACHED = "max_closures reached"
NO_MAP_FEATURES = ("cannot verify geometrically: the map stores no local features for this place (build "
                   "the map with `vpr-ros build-map --local-features`)")


def map_feature_lookup(place_map: Any, *, stamp_tolerance_s: float = 0.001) -> FeatureLookup:
    """Look candidates up in a prebuilt :class:`~vpr_ros.core.mapdb.PlaceMap` by entry id.

    Returns the place's stored ORB features; :data:`NO_MAP_FEATURES` for a place of the map that has
    none; None for an id the map does not hold, or whose stamp differs from the candidate's by more
    than ``stamp_tolerance_s`` (the candidate came from another map).
    """
    from vpr_ros.core.mapdb import UnknownEntryError

    def lookup(cand: LoopCandidate) -> Features | str | None:
        try:
            entry = place_map.entry(cand.match_id)
        except UnknownEntryError:
            return None
        if abs(float(entry.stamp) - float(cand.match_stamp)) > stamp_tolerance_s:
            return None
        features = place_map.local_features(cand.match_id)
        return NO_MAP_FEATURES if features is None else features

    return lookup


# --------------------------------------------------------------------------- detector


class LoopClosureDetector:
    """Online loop-closure detector; feed frames in time order with :meth:`add`.

    ``feature_capacity``: how many frames' ORB features are kept for verification (oldest dropped
    first; a candidate whose features were dropped cannot be verified and is rejected). ``extractor``:
    the ORB extractor (default one built from ``config.verification``).
    """

    def __init__(self, config: LoopClosureConfig | None = None, *, feature_capacity: int = 5000,
                 extractor: OrbExtractor | None = None) -> None:
        self.config = config or LoopClosureConfig()
        self.config.validate()
        self.features = FeatureCache(feature_capacity)
        self._orb = extractor
        self._desc: np.ndarray | None = None
        self._ids: list[int] = []
        self._stamps = np.empty(0, dtype=np.float64)
        self._n = 0
        self._known: set[int] = set()

    def __len__(self) -> int:
        return self._n

    @property
    def orb(self) -> OrbExtractor:
        if self._orb is None:
            self._orb = OrbExtractor(self.config.verification)
        return self._orb

    def describe_geometry(self, image: np.ndarray) -> Features:
        """ORB features of an image, as the detector stores them."""
        return self.orb(image)

    # ----------------------------------------------------------------- online use

    def add(self, frame_id: int, stamp: float, descriptor: np.ndarray, image: np.ndarray | None = None, *,
            features: Features | None = None, verify_all: bool = False) -> Detection:
        """Detect loop closures of a new frame against the frames before it, then remember it.

        ``descriptor``: the frame's L2-normalised global descriptor. ``image`` (or precomputed
        ``features``) is needed for geometric verification; only its ORB features are kept.
        ``verify_all`` verifies every candidate (for evaluation) instead of stopping at ``max_closures``.
        Raises ValueError when frames come out of time order, an id repeats or the descriptor is bad.
        """
        frame_id, stamp = int(frame_id), float(stamp)
        if not math.isfinite(stamp):
            raise ValueError(f"frame {frame_id}: stamp must be finite, got {stamp}")
        if self._n and stamp < self._stamps[self._n - 1]:
            raise ValueError(f"frame {frame_id}: stamp {stamp:.6f} is older than the previous frame's "
                             f"{self._stamps[self._n - 1]:.6f}; frames must come in time order")
        if frame_id in self._known:
            raise ValueError(f"frame id {frame_id} was already added")
        q = self._check_descriptor(descriptor)
        if features is None and image is not None and self.config.geometric_verification:
            features = self.describe_geometry(image)
        candidates = self._retrieve(q, stamp)
        detection = self.check_candidates(
            frame_id, stamp, [(self._ids[r], float(self._stamps[r]), s) for r, s in candidates],
            features, lookup=lambda c: self.features.get(c.match_id), verify_all=verify_all,
            apply_window=False)
        self._append(frame_id, stamp, q)
        if features is not None:
            self.features.put(frame_id, features)
        return detection

    def _check_descriptor(self, descriptor: np.ndarray) -> np.ndarray:
        q = np.asarray(descriptor, dtype=np.float32).ravel()
        if q.size == 0 or not np.isfinite(q).all():
            raise ValueError("descriptor must be a non-empty finite vector")
        if self._desc is not None and q.size != self._desc.shape[1]:
            raise ValueError(f"descriptor has {q.size} dimensions, the detector holds "
                             f"{self._desc.shape[1]}-d ones")
        return q

    def _append(self, frame_id: int, stamp: float, q: np.ndarray) -> None:
        if self._desc is None:
            self._desc = np.empty((64, q.size), dtype=np.float32)
            self._stamps = np.empty(64, dtype=np.float64)
        if self._n == len(self._desc):
            self._desc = np.concatenate([self._desc, np.empty_like(self._desc)])
            self._stamps = np.concatenate([self._stamps, np.empty_like(self._stamps)])
        self._desc[self._n] = q
        self._stamps[self._n] = stamp
        self._ids.append(frame_id)
        self._known.add(frame_id)
        self._n += 1

    def _retrieve(self, q: np.ndarray, stamp: float) -> list[tuple[int, float]]:
        """(row, score) of the top-k eligible past frames with score >= threshold, best first."""
        cfg = self.config
        n_eligible = self._n - int(cfg.exclusion_window_frames)
        if n_eligible <= 0:
            return []
        # Stamps are non-decreasing, so the eligible frames are a prefix of the stored ones.
        n_time = int(np.searchsorted(self._stamps[: self._n], stamp - cfg.exclusion_window_s, side="left"))
        n_eligible = min(n_eligible, n_time)
        if n_eligible <= 0:
            return []
        scores = self._desc[:n_eligible] @ q
        k = min(int(cfg.top_k), n_eligible)
        top = np.argpartition(-scores, k - 1)[:k] if k < n_eligible else np.arange(n_eligible)
        top = top[np.lexsort((top, -scores[top]))]  # best score first, older frame first on ties
        return [(int(r), float(scores[r])) for r in top if scores[r] >= cfg.score_threshold]

    # ----------------------------------------------------------------- shared rules

    def check_candidates(
        self,
        query_id: int,
        query_stamp: float,
        candidates: Sequence[tuple[int, float, float]],
        query_features: Features | None,
        *,
        lookup: FeatureLookup,
        verify_all: bool = False,
        apply_window: bool = True,
    ) -> Detection:
        """Apply window, threshold, top-k and verification to externally retrieved candidates.

        ``candidates``: ``(match_id, match_stamp, score)`` in any order. ``lookup`` returns the ORB
        features of a candidate's frame (None when unknown). ``apply_window`` enforces the time window
        (the frame-count window needs the detector's own frame sequence and applies only in :meth:`add`).
        """
        cfg = self.config
        query_stamp = float(query_stamp)
        kept = []
        for match_id, match_stamp, score in candidates:
            if not math.isfinite(score) or score < cfg.score_threshold:
                continue
            if apply_window and not query_stamp - float(match_stamp) > cfg.exclusion_window_s:
                continue
            kept.append((float(score), int(match_id), float(match_stamp)))
        kept.sort(key=lambda c: (-c[0], c[2], c[1]))
        det = Detection(int(query_id), query_stamp)
        det.candidates = [LoopCandidate(int(query_id), query_stamp, mid, mstamp, score)
                          for score, mid, mstamp in kept[: cfg.top_k]]
        accepted = 0
        for cand in det.candidates:
            if accepted >= cfg.max_closures and not verify_all:
                cand.reason = MAX_CLOSURES_REACHED
                continue
            if cfg.geometric_verification:
                self._verify(cand, query_features, lookup)
                ok = cand.verified
            else:
                ok = True
            if ok and accepted < cfg.max_closures:
                cand.accepted = True
                accepted += 1
            elif ok:
                cand.reason = MAX_CLOSURES_REACHED
        return det

    def _verify(self, cand: LoopCandidate, query_features: Features | None, lookup: FeatureLookup) -> None:
        if query_features is None:
            cand.reason = NO_QUERY_FEATURES
            return
        match_features = lookup(cand)
        if match_features is None or isinstance(match_features, str):
            cand.reason = match_features or NO_MATCH_FEATURES
            return
        v = verify_pair(query_features, match_features, self.config.verification)
        cand.verified, cand.inliers, cand.matches = v.verified, v.inliers, v.matches
        cand.rotation, cand.translation, cand.reason = v.rotation, v.translation, v.reason


# --------------------------------------------------------------------------- evaluation


@dataclass
class SequenceRun:
    """Per-query detections of a whole sequence (all top-k candidates verified), for post-hoc sweeps."""

    detections: list[Detection]
    gt: np.ndarray  # (N, N) bool, symmetric
    exclusion_window_frames: int
    seconds: dict[str, float] = field(default_factory=dict)

    def positives(self) -> int:
        """Queries whose ground truth has a loop among their eligible (windowed) frames."""
        w = self.exclusion_window_frames
        return int(sum(bool(self.gt[d.query_id, : max(0, d.query_id - w)].any()) for d in self.detections))


def run_sequence(
    descriptors: np.ndarray,
    features: Sequence[Features] | None,
    gt: np.ndarray,
    *,
    exclusion_window_frames: int = 10,
    top_k: int = 10,
    verification: VerificationConfig | None = None,
    rate_hz: float = 1.0,
) -> SequenceRun:
    """Run the detector over a sequence (frame i has id i, stamp i / rate_hz) with no score threshold,
    verifying every top-k candidate when ``features`` are given. The time window is disabled; the
    frame window ``exclusion_window_frames`` applies, as in ``evaluation.loop_closure_pr``."""
    g = np.asarray(gt).astype(bool)
    g = g | g.T
    verify = features is not None
    cfg = LoopClosureConfig(exclusion_window_s=0.0, exclusion_window_frames=exclusion_window_frames,
                            score_threshold=-1.0, top_k=top_k, max_closures=1, geometric_verification=verify,
                            verification=verification or VerificationConfig())
    det = LoopClosureDetector(cfg, feature_capacity=max(1, len(descriptors)))
    out = []
    t0 = time.perf_counter()
    for i, d in enumerate(descriptors):
        out.append(det.add(i, i / rate_hz, d, features=features[i] if verify else None, verify_all=True))
    return SequenceRun(out, g, exclusion_window_frames, {"detect_s": time.perf_counter() - t0})


def decisions(run: SequenceRun, *, top_k: int,
              min_inliers: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per query with a decision: (query index, match index, score), and whether the match is a true loop.

    The decision is what the detector would publish with ``score_threshold`` at -1: the best-score
    candidate among the first ``top_k`` that has at least ``min_inliers`` inliers (None: no verification,
    the top-1 candidate). Returns ``(pairs (M, 2), scores (M,), correct (M,))``.
    """
    pairs, scores, correct = [], [], []
    for d in run.detections:
        for c in d.candidates[:top_k]:
            if min_inliers is None or c.inliers >= min_inliers:
                pairs.append((c.query_id, c.match_id))
                scores.append(c.score)
                correct.append(bool(run.gt[c.query_id, c.match_id]))
                break
    return (np.asarray(pairs, dtype=np.int64).reshape(-1, 2), np.asarray(scores, dtype=np.float64),
            np.asarray(correct, dtype=bool))


def operating_stats(run: SequenceRun, *, top_k: int, min_inliers: int | None, score_threshold: float) -> dict:
    """Precision / recall / counts of the detector at one operating point on one sequence run."""
    pairs, scores, correct = decisions(run, top_k=top_k, min_inliers=min_inliers)
    acc = scores >= score_threshold
    tp, fp = int((acc & correct).sum()), int((acc & ~correct).sum())
    n_pos = run.positives()
    wrong = pairs[acc & ~correct]
    return {"precision": tp / (tp + fp) if tp + fp else 1.0, "recall": tp / n_pos if n_pos else 0.0,
            "true_positives": tp, "false_positives": fp, "positives": n_pos,
            "false_pairs_1based": [[int(a) + 1, int(b) + 1] for a, b in wrong]}


def pr_curve(run: SequenceRun, *, top_k: int, min_inliers: int | None):
    """:class:`~vpr_ros.eval.metrics.PRCurve` over the score threshold (None when nothing is detected)."""
    from vpr_ros.eval.metrics import precision_recall

    pairs, scores, correct = decisions(run, top_k=top_k, min_inliers=min_inliers)
    if len(scores) == 0:
        return None
    curve = precision_recall(scores, correct, n_positives=max(run.positives(), int(correct.sum()), 1))
    curve.query_indices, curve.match_indices = pairs[:, 0], pairs[:, 1]
    return curve


def _between(low: float, high: float) -> float:
    """The midpoint of (low, high], rounded to 4 decimals when that stays inside the interval."""
    mid = 0.5 * (low + high)
    r = round(mid, 4)
    return r if low < r <= high else mid


def max_false_inliers(runs: dict[str, SequenceRun], *, near_frames: int = NEAR_FRAMES) -> int:
    """The most inliers any clearly wrong candidate reached in any run (the verifier's worst false pair).

    Candidates within ``near_frames`` frames of one of the query's ground-truth loop partners are left
    out: the ground truth marks a band of about five frames per revisit, and the frames just outside it
    show the same place (they verify with a correct relative pose), so they say nothing about the
    verifier's false-positive margin. They still count as false in every precision figure.
    """
    worst = 0
    for r in runs.values():
        for d in r.detections:
            partners = np.nonzero(r.gt[d.query_id])[0]
            for c in d.candidates:
                if r.gt[c.query_id, c.match_id]:
                    continue
                if partners.size and np.abs(partners - c.match_id).min() <= near_frames:
                    continue
                worst = max(worst, int(c.inliers))
    return worst


def choose_operating_point(
    runs: dict[str, SequenceRun],
    *,
    top_ks: Sequence[int] = TOP_K_GRID,
    min_inliers_grid: Sequence[int] = MIN_INLIERS_GRID,
    inlier_margin: float = INLIER_MARGIN,
) -> dict[str, Any]:
    """The (top_k, min_inliers, score_threshold) with the best worst-case recall at precision 1.0 over all
    ``runs`` (one per link condition).

    ``min_inliers`` must be at least ``inlier_margin`` times the inliers of the worst false pair seen in
    any run (:func:`max_false_inliers`), so precision does not hang on a single inlier. The threshold sits
    halfway between the highest-scoring false decision of any run and the next true one above it; with no
    false decision it is the lowest true decision score rounded down to 0.01. Ties go to the larger mean
    recall, then more inliers (safer), then fewer candidates (less verification work per frame).
    """
    worst = max_false_inliers(runs)
    allowed = [m for m in min_inliers_grid if m >= inlier_margin * worst] or [max(min_inliers_grid)]
    best: tuple | None = None
    for k in top_ks:
        for m in allowed:
            per = [decisions(r, top_k=k, min_inliers=m) for r in runs.values()]
            fp_scores = np.concatenate([s[~c] for _, s, c in per])
            tp_scores = np.concatenate([s[c] for _, s, c in per])
            if fp_scores.size:
                top_fp = float(fp_scores.max())
                above = tp_scores[tp_scores > top_fp]
                tau = _between(top_fp, float(above.min())) if above.size else math.nextafter(top_fp, 2.0)
            elif tp_scores.size:
                tau = math.floor(float(tp_scores.min()) * 100) / 100
            else:
                tau = 1.0
            recalls = [operating_stats(r, top_k=k, min_inliers=m, score_threshold=tau)["recall"]
                       for r in runs.values()]
            key = (min(recalls), float(np.mean(recalls)), m, -k)
            if best is None or key > best[0]:
                best = (key, {"top_k": k, "min_inliers": m, "score_threshold": float(tau)})
    assert best is not None
    point = best[1]
    point["max_false_inliers"] = worst
    point["per_condition"] = {name: operating_stats(r, top_k=point["top_k"], min_inliers=point["min_inliers"],
                                                    score_threshold=point["score_threshold"])
                              for name, r in runs.items()}
    return point


# --------------------------------------------------------------------------- rtabmap_loop evaluation

LOOP_EVAL_DEGRADATIONS = ("none", "jpeg:10", "h264:40")


def describe_sequence(extractor, images: Sequence[np.ndarray]) -> np.ndarray:
    """Global descriptors (N, D) of a sequence of RGB images."""
    return extractor(list(images))


def evaluate_loop_closure(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    models: Sequence[tuple[str, Any]] | None = None,
    degradations: Sequence[str] = LOOP_EVAL_DEGRADATIONS,
    exclusion_window_frames: int = 10,
    max_top_k: int = max(TOP_K_GRID),
    verification: VerificationConfig | None = None,
    device: str = "cpu",
    ship_model: str | None = None,
) -> dict[str, Any]:
    """Loop-closure precision-recall on RTAB-Map's ``rtabmap_loop`` sequence; writes JSON and plots.

    ``models``: ``(label, weights)`` pairs for :func:`~vpr_ros.core.models.resolve_model` (weights None =
    ImageNet-initialised ``structvpr_mobilenetv2``); default: that model, plus the packaged student when
    its weights exist. Each degradation sends the whole sequence through one simulated link
    (:class:`~vpr_ros.core.transmission.Transmitter`), as a robot streaming to a remote SLAM back end
    would. The operating point is chosen on ``ship_model`` (default: the model ``resolve_model()`` picks
    by default) over all degradations together.
    """
    from vpr_ros.core.extract import DescriptorExtractor
    from vpr_ros.core.models import DEFAULT_WEIGHTS, resolve_model
    from vpr_ros.core.transmission import TransmissionConfig, Transmitter
    from vpr_ros.data.places import load_rtabmap_loop
    from vpr_ros.eval.metrics import loop_closure_pr
    from vpr_ros.eval.plots import plot_pr_curves

    vcfg = verification or VerificationConfig()
    # Verify with the lowest inlier threshold of the sweep; higher ones are applied afterwards.
    sweep_cfg = replace(vcfg, min_inliers=min(MIN_INLIERS_GRID))
    records, gt = load_rtabmap_loop(root)
    images = [r.load() for r in records]
    if models is None:
        models = [("structvpr_imagenet", None)]
        if DEFAULT_WEIGHTS.is_file():
            models.append(("structvpr_loqi", str(DEFAULT_WEIGHTS)))
    if ship_model is None:
        ship_model = "structvpr_loqi" if any(m == "structvpr_loqi" for m, _ in models) else models[0][0]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    configs = [TransmissionConfig.parse(s) for s in degradations]
    orb = OrbExtractor(vcfg)
    received: dict[str, tuple[list[np.ndarray], float]] = {}
    for cfg in configs:
        tx = Transmitter(cfg)
        frames = [tx.process(im).image for im in images]
        received[cfg.label] = (frames, float(tx.stats["mean_bytes"]))
    feats = {label: [orb(im) for im in frames] for label, (frames, _) in received.items()}
    report: dict[str, Any] = {
        "dataset": str(root), "frames": len(records), "gt_loop_pairs": int(np.asarray(gt).sum()),
        "exclusion_window_frames": exclusion_window_frames, "verification": asdict(vcfg),
        "models": {}, "plots": {},
    }
    all_runs: dict[str, dict[str, SequenceRun]] = {}
    for label, weights in models:
        model = resolve_model(weights, None if weights else "structvpr_mobilenetv2")
        ext = DescriptorExtractor(model, device=device)
        runs: dict[str, SequenceRun] = {}
        mrep: dict[str, Any] = {"weights": weights, "conditions": {}}
        summary: dict[str, Any] = {}
        for cfg in configs:
            frames, mean_bytes = received[cfg.label]
            t0 = time.perf_counter()
            desc = describe_sequence(ext, frames)
            t_desc = time.perf_counter() - t0
            run = run_sequence(desc, feats[cfg.label], gt, exclusion_window_frames=exclusion_window_frames,
                               top_k=max_top_k, verification=sweep_cfg)
            run.seconds["describe_s"] = t_desc
            runs[cfg.label] = run
            base = loop_closure_pr(desc @ desc.T, gt, exclude_window=exclusion_window_frames)
            curves = {"descriptor only": base}
            cond = {"bytes_per_frame": mean_bytes, "positives": run.positives(),
                    "descriptor_only": _curve_summary(base), "verified": {}}
            summary[f"{cfg.label}: descriptor only"] = base
            for m in sorted({min(MIN_INLIERS_GRID), DEFAULT_MIN_INLIERS, max(MIN_INLIERS_GRID)}):
                c = pr_curve(run, top_k=DEFAULT_TOP_K, min_inliers=m)
                if c is not None:
                    curves[f"verified top-{DEFAULT_TOP_K}, >= {m} inliers"] = c
                    cond["verified"][f"top{DEFAULT_TOP_K}_min{m}"] = _curve_summary(c)
                    if m == DEFAULT_MIN_INLIERS:
                        summary[f"{cfg.label}: verified (defaults)"] = c
            mrep["conditions"][cfg.label] = cond
            name = f"pr_{label}_{cfg.label}.png"
            plot_pr_curves(curves, out / name, title=f"rtabmap_loop loop closure: {label}, {cfg.label}")
            report["plots"][f"{label}/{cfg.label}"] = name
            log.info("%s / %s: descriptor-only AP %.3f R@100P %.3f", label, cfg.label,
                     base.average_precision, base.recall_at_100_precision)
        name = f"pr_{label}_summary.png"
        plot_pr_curves(summary, out / name, title=f"rtabmap_loop loop closure: {label}, links compared")
        report["plots"][f"{label}/summary"] = name
        mrep["operating_point"] = choose_operating_point(runs)
        report["models"][label] = mrep
        all_runs[label] = runs
    ship = report["models"][ship_model]["operating_point"]
    report["shipped"] = {"model": ship_model, "exclusion_window_s": DEFAULT_EXCLUSION_WINDOW_S,
                         "top_k": ship["top_k"], "min_inliers": ship["min_inliers"],
                         "score_threshold": ship["score_threshold"], "geometric_verification": True}
    report["defaults_in_code"] = {"score_threshold": DEFAULT_SCORE_THRESHOLD, "top_k": DEFAULT_TOP_K,
                                  "min_inliers": DEFAULT_MIN_INLIERS}
    # How the shipped (code default) point does on every model and condition.
    report["at_defaults"] = {
        label: {cond: operating_stats(run, top_k=DEFAULT_TOP_K, min_inliers=DEFAULT_MIN_INLIERS,
                                      score_threshold=DEFAULT_SCORE_THRESHOLD)
                for cond, run in runs.items()}
        for label, runs in all_runs.items()}
    text = json.dumps(report, indent=2, default=json_default, allow_nan=False)
    (out / "loop_closure.json").write_text(text + "\n", encoding="utf-8")
    report["json"] = str(out / "loop_closure.json")
    return report


def _curve_summary(c) -> dict[str, Any]:
    return {"average_precision": c.average_precision, "recall_at_100_precision": c.recall_at_100_precision,
            "best_f1": c.best_f1, "best_f1_threshold": c.best_f1_threshold, "n_positives": c.n_positives,
            "n_decisions": int(len(c.scores))}


def json_default(obj: Any) -> Any:
    """``json.dumps`` ``default=``: numpy scalars and arrays as Python values, paths as strings."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def with_overrides(config: LoopClosureConfig, **kw: Any) -> LoopClosureConfig:
    """A copy of ``config`` with top-level or ``verification`` fields replaced (unknown keys raise)."""
    top = {k: v for k, v in kw.items() if k in LoopClosureConfig.__dataclass_fields__}
    ver = {k: v for k, v in kw.items() if k in VerificationConfig.__dataclass_fields__}
    unknown = set(kw) - set(top) - set(ver)
    if unknown:
        raise ConfigError(f"unknown loop-closure setting(s): {', '.join(sorted(unknown))}")
    if ver:
        top["verification"] = replace(config.verification, **ver)
    return replace(config, **top)
