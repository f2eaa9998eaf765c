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

Evaluation of the detector (precision-recall, the choice of these defaults) is
:mod:`vpr_ros.eval.loop_closure`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
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
from vpr_ros.core.mapdb import PlaceMap, UnknownEntryError

# --------------------------------------------------------------------------- configuration

#: The operating point chosen by ``vpr-ros loop-eval`` on rtabmap_loop (see docs/loop_closure.md):
#: the highest recall at precision 1.0 for the default model, clean and degraded links alike.
DEFAULT_EXCLUSION_WINDOW_S = 10.0
DEFAULT_SCORE_THRESHOLD = 0.96  # the general student at 240x320 (LoQI 32x64: 0.85)
DEFAULT_TOP_K = 5
DEFAULT_MIN_INLIERS = DEFAULT_VERIFY_MIN_INLIERS


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


def map_feature_lookup(place_map: PlaceMap, *, stamp_tolerance_s: float = 0.001) -> FeatureLookup:
    """Look candidates up in a prebuilt :class:`~vpr_ros.core.mapdb.PlaceMap` by entry id.

    Returns the place's stored ORB features; :data:`NO_MAP_FEATURES` for a place of the map that has
    none; None for an id the map does not hold, or whose stamp differs from the candidate's by more
    than ``stamp_tolerance_s`` (the candidate came from another map).
    """

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
