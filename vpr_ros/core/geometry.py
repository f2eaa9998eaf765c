"""Two-view geometric verification of loop-closure candidates: ORB features, ratio test, RANSAC.

A candidate pair (query image, earlier image) is accepted when enough ORB matches agree with one
epipolar geometry. :func:`verify_pair` estimates the essential matrix (``model="essential"``, points
normalised by each image's camera matrix, so the two images may differ in size) or the fundamental
matrix (``model="fundamental"``, pixel coordinates, no camera needed for the inlier count) with RANSAC,
then ``cv2.recoverPose`` keeps the inliers in front of both cameras and gives the relative pose.

Pose convention (that of ``vpr_ros_msgs/LoopClosure``): ``rotation`` / ``translation`` form
``T_match_query``, the pose of the query camera expressed in the match camera frame, in the camera
optical convention (x right, y down, z forward): a point ``X_q`` in query camera coordinates is
``X_m = R @ X_q + t`` in match camera coordinates. From two monocular views the translation is a unit
vector (direction only); the rotation is metric. With little baseline (a revisit from the same spot)
the rotation stays good but the translation direction is poorly constrained.

Memory: :class:`Features` (keypoint coordinates + 32-byte ORB descriptors, about 40 bytes per keypoint)
is what a detector keeps per frame, never the image; :class:`FeatureCache` bounds how many it keeps.
A place map can store them per place (``vpr-ros build-map --local-features``) so that loop closures
against a map built in another session can be verified too.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field

import cv2
import numpy as np

from vpr_ros.core.errors import ConfigError
from vpr_ros.core.images import as_rgb8

VERIFICATION_MODELS = ("essential", "fundamental")
#: Robust estimator: OpenCV's USAC with MAGSAC++ scoring. About 5x faster than classic RANSAC with the
#: 5-point solver on low-inlier (non-loop) pairs (15 vs 77 ms on rtabmap_loop) and deterministic.
_ROBUST = cv2.USAC_MAGSAC
#: Inliers a loop-closure pair needs (the operating point chosen on rtabmap_loop; docs/loop_closure.md).
DEFAULT_VERIFY_MIN_INLIERS = 25


@dataclass(frozen=True)
class VerificationConfig:
    """Settings of feature extraction and two-view verification.

    ``camera_matrix``: ``(fx, fy, cx, cy)`` in pixels of the images as received; None assumes a pinhole
    camera with horizontal field of view ``assumed_hfov_deg`` and the principal point at the centre.
    ``max_image_side``: larger images are downscaled for ORB (keypoints are reported in the original
    pixel coordinates). ``ransac_threshold_px``: epipolar distance (pixels) of an inlier.
    """

    n_features: int = 1000
    ratio: float = 0.8
    ransac_threshold_px: float = 1.0
    confidence: float = 0.999
    model: str = "essential"
    min_inliers: int = DEFAULT_VERIFY_MIN_INLIERS
    camera_matrix: tuple[float, float, float, float] | None = None
    assumed_hfov_deg: float = 60.0
    max_image_side: int = 640

    def __post_init__(self) -> None:
        if self.camera_matrix is not None:
            object.__setattr__(self, "camera_matrix", tuple(float(v) for v in self.camera_matrix))
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid setting."""
        if self.model not in VERIFICATION_MODELS:
            raise ConfigError(f"verification model must be one of {VERIFICATION_MODELS}, got {self.model!r}")
        if not 50 <= int(self.n_features) <= 20000:
            raise ConfigError(f"n_features must be in 50..20000, got {self.n_features}")
        if not 0.0 < self.ratio <= 1.0:
            raise ConfigError(f"ratio (Lowe's ratio test) must be in (0, 1], got {self.ratio}")
        if not (math.isfinite(self.ransac_threshold_px) and 0.0 < self.ransac_threshold_px <= 20.0):
            raise ConfigError(f"ransac_threshold_px must be in (0, 20], got {self.ransac_threshold_px}")
        if not 0.5 <= self.confidence < 1.0:
            raise ConfigError(f"confidence must be in [0.5, 1), got {self.confidence}")
        if int(self.min_inliers) < 5:
            raise ConfigError(f"min_inliers must be >= 5 (five points fix an essential matrix), "
                              f"got {self.min_inliers}")
        if self.camera_matrix is not None:
            k = self.camera_matrix
            if len(k) != 4 or not all(math.isfinite(v) for v in k) or k[0] <= 0 or k[1] <= 0:
                raise ConfigError(f"camera_matrix must be (fx, fy, cx, cy) with fx, fy > 0, got {k}")
        if not 10.0 <= self.assumed_hfov_deg <= 170.0:
            raise ConfigError(f"assumed_hfov_deg must be in 10..170, got {self.assumed_hfov_deg}")
        if int(self.max_image_side) < 64:
            raise ConfigError(f"max_image_side must be >= 64, got {self.max_image_side}")


@dataclass
class Features:
    """ORB features of one image: ``points`` (N, 2) float32 pixel coordinates in the image as given,
    ``descriptors`` (N, 32) uint8, and the image ``size`` (H, W)."""

    points: np.ndarray
    descriptors: np.ndarray
    size: tuple[int, int]

    def __len__(self) -> int:
        return len(self.points)

    @property
    def nbytes(self) -> int:
        return int(self.points.nbytes + self.descriptors.nbytes)


@dataclass
class Verification:
    """Outcome of :func:`verify_pair`. ``matches``: putative matches after the ratio test;
    ``inliers``: RANSAC inliers in front of both cameras; ``rotation`` (3x3) and unit ``translation`` (3,)
    are ``T_match_query`` (None when no model was found); ``reason`` says why a pair failed."""

    verified: bool
    inliers: int
    matches: int
    rotation: np.ndarray | None = None
    translation: np.ndarray | None = None
    reason: str = ""

    @property
    def has_transform(self) -> bool:
        return self.rotation is not None and self.translation is not None


def camera_matrix(config: VerificationConfig, size: tuple[int, int]) -> np.ndarray:
    """3x3 camera matrix for an image of ``size`` = (H, W): the configured one, else the assumed pinhole."""
    if config.camera_matrix is not None:
        fx, fy, cx, cy = config.camera_matrix
    else:
        h, w = size
        fx = fy = 0.5 * w / math.tan(math.radians(config.assumed_hfov_deg) / 2)
        cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


class OrbExtractor:
    """Image -> :class:`Features` (grayscale ORB, downscaled to ``max_image_side`` first)."""

    def __init__(self, config: VerificationConfig | None = None) -> None:
        self.config = config or VerificationConfig()
        self._orb = cv2.ORB_create(nfeatures=int(self.config.n_features))

    @property
    def settings(self) -> dict[str, object]:
        """What the features are made with, as maps that store them record it."""
        return {"kind": "orb", "n_features": int(self.config.n_features),
                "max_image_side": int(self.config.max_image_side)}

    def __call__(self, image: np.ndarray) -> Features:
        rgb = as_rgb8(image, name="verification image")
        h, w = rgb.shape[:2]
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        scale = min(1.0, self.config.max_image_side / max(h, w))
        if scale < 1.0:
            gray = cv2.resize(gray, (max(1, round(w * scale)), max(1, round(h * scale))),
                              interpolation=cv2.INTER_AREA)
        keypoints, desc = self._orb.detectAndCompute(gray, None)
        if desc is None or not keypoints:
            return Features(np.empty((0, 2), np.float32), np.empty((0, 32), np.uint8), (h, w))
        pts = np.array([kp.pt for kp in keypoints], dtype=np.float32)
        if scale < 1.0:  # back to the pixel grid of the image as given
            pts = (pts + 0.5) / scale - 0.5
        return Features(pts, np.ascontiguousarray(desc, dtype=np.uint8), (h, w))


def _ratio_matches(a: np.ndarray, b: np.ndarray, ratio: float) -> np.ndarray:
    """(M, 2) index pairs (into a, into b) that pass Lowe's ratio test and are mutually unique in b."""
    if len(a) < 2 or len(b) < 2:
        return np.empty((0, 2), dtype=np.int64)
    knn = cv2.BFMatcher(cv2.NORM_HAMMING).knnMatch(a, b, k=2)
    best: dict[int, tuple[float, int]] = {}
    for pair in knn:
        if len(pair) == 2 and pair[0].distance < ratio * pair[1].distance:
            m = pair[0]
            if m.trainIdx not in best or m.distance < best[m.trainIdx][0]:
                best[m.trainIdx] = (m.distance, m.queryIdx)
    return np.array([(q, t) for t, (_, q) in best.items()], dtype=np.int64).reshape(-1, 2)


def _normalise(points: np.ndarray, k: np.ndarray) -> np.ndarray:
    return ((points - k[:2, 2]) / np.array([k[0, 0], k[1, 1]])).astype(np.float64)


def verify_pair(
    query: Features,
    match: Features,
    config: VerificationConfig | None = None,
    *,
    k_query: np.ndarray | None = None,
    k_match: np.ndarray | None = None,
) -> Verification:
    """Check that ``query`` and ``match`` see the same scene; estimate ``T_match_query``.

    ``k_query`` / ``k_match``: 3x3 camera matrices (default :func:`camera_matrix` of each image's size).
    ``verified`` is ``inliers >= config.min_inliers``. Pairs with fewer putative matches than
    ``min_inliers`` are rejected before RANSAC (inliers 0); otherwise the inlier count and transform are
    returned even when the pair fails, so callers can sweep thresholds above ``min_inliers`` afterwards.
    """
    cfg = config or VerificationConfig()
    kq = camera_matrix(cfg, query.size) if k_query is None else np.asarray(k_query, dtype=np.float64)
    km = camera_matrix(cfg, match.size) if k_match is None else np.asarray(k_match, dtype=np.float64)
    pairs = _ratio_matches(query.descriptors, match.descriptors, cfg.ratio)
    n = len(pairs)
    need = max(8, int(cfg.min_inliers))
    if n < need:  # cannot reach min_inliers: skip RANSAC (the costly part)
        return Verification(False, 0, n, reason=f"{n} putative matches, fewer than {need}")
    pq = query.points[pairs[:, 0]].astype(np.float64)
    pm = match.points[pairs[:, 1]].astype(np.float64)
    nq, nm = _normalise(pq, kq), _normalise(pm, km)
    if cfg.model == "essential":
        focal = 0.25 * (kq[0, 0] + kq[1, 1] + km[0, 0] + km[1, 1])
        e, mask = cv2.findEssentialMat(nq, nm, np.eye(3), method=_ROBUST, prob=cfg.confidence,
                                       threshold=cfg.ransac_threshold_px / focal)
    else:
        f, mask = cv2.findFundamentalMat(pq, pm, _ROBUST, cfg.ransac_threshold_px, cfg.confidence)
        e = None if f is None or f.shape != (3, 3) else km.T @ f @ kq  # E = K_m^T F K_q
    if e is None or mask is None or e.shape[0] < 3:
        return Verification(False, 0, n, reason="RANSAC found no epipolar model")
    e = e[:3]  # findEssentialMat may stack several solutions; the first is the robust estimator's best
    mask = (mask.ravel() > 0).astype(np.uint8)
    count, r, t, _ = cv2.recoverPose(e, nq, nm, np.eye(3), mask=mask.copy())
    inliers = int(count)
    r, t = _refine_pose(nq, nm, mask, r, t, cfg, kq, km)
    t = np.asarray(t, dtype=np.float64).ravel()
    norm = float(np.linalg.norm(t))
    rotation, translation = (np.asarray(r, dtype=np.float64), t / norm) if norm > 0 else (None, None)
    ok = inliers >= int(cfg.min_inliers)
    reason = "" if ok else f"{inliers} inliers < min_inliers {cfg.min_inliers}"
    return Verification(ok, inliers, n, rotation, translation, reason)


def _refine_pose(nq: np.ndarray, nm: np.ndarray, mask: np.ndarray, r: np.ndarray, t: np.ndarray,
                 cfg: VerificationConfig, kq: np.ndarray, km: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Re-estimate the essential matrix on the inliers at half the threshold; keep the first pose when that
    fails. Cheap (the inlier set is nearly clean) and on KITTI it makes the pose right (rotation < 2 deg,
    translation direction < 10 deg) in about 85 % of pairs instead of 75 %; the inlier count is unchanged."""
    idx = np.nonzero(mask)[0]
    if len(idx) < 8:
        return r, t
    focal = 0.25 * (kq[0, 0] + kq[1, 1] + km[0, 0] + km[1, 1])
    e2, m2 = cv2.findEssentialMat(nq[idx], nm[idx], np.eye(3), method=_ROBUST, prob=cfg.confidence,
                                  threshold=0.5 * cfg.ransac_threshold_px / focal)
    if e2 is None or m2 is None or e2.shape[0] < 3:
        return r, t
    tight = np.zeros_like(mask)
    tight[idx[m2.ravel() > 0]] = 1
    count, r2, t2, _ = cv2.recoverPose(e2[:3], nq, nm, np.eye(3), mask=tight)
    return (r2, t2) if count >= 8 else (r, t)


def rotation_to_quaternion(r: np.ndarray) -> tuple[float, float, float, float]:
    """Unit quaternion ``(x, y, z, w)`` of a 3x3 rotation matrix, with ``w >= 0``."""
    m = np.asarray(r, dtype=np.float64)
    if m.shape != (3, 3):
        raise ValueError(f"rotation must be 3x3, got {m.shape}")
    # Largest-component method: numerically stable for every rotation angle.
    tr = float(np.trace(m))
    candidates = [tr, m[0, 0], m[1, 1], m[2, 2]]
    i = int(np.argmax(candidates))
    if i == 0:
        s = 2.0 * math.sqrt(max(1.0 + tr, 1e-12))
        q = ((m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s, 0.25 * s)
    elif i == 1:
        s = 2.0 * math.sqrt(max(1.0 + m[0, 0] - m[1, 1] - m[2, 2], 1e-12))
        q = (0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s, (m[2, 1] - m[1, 2]) / s)
    elif i == 2:
        s = 2.0 * math.sqrt(max(1.0 + m[1, 1] - m[0, 0] - m[2, 2], 1e-12))
        q = ((m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s, (m[0, 2] - m[2, 0]) / s)
    else:
        s = 2.0 * math.sqrt(max(1.0 + m[2, 2] - m[0, 0] - m[1, 1], 1e-12))
        q = ((m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s, (m[1, 0] - m[0, 1]) / s)
    arr = np.asarray(q)
    arr /= np.linalg.norm(arr)
    if arr[3] < 0:
        arr = -arr
    return float(arr[0]), float(arr[1]), float(arr[2]), float(arr[3])


def quaternion_to_rotation(q: tuple[float, float, float, float]) -> np.ndarray:
    """3x3 rotation matrix of a quaternion ``(x, y, z, w)`` (normalised first)."""
    x, y, z, w = (float(v) for v in q)
    n = math.sqrt(x * x + y * y + z * z + w * w)
    if n == 0:
        raise ValueError("zero quaternion")
    x, y, z, w = x / n, y / n, z / n, w / n
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def rotation_angle_deg(r: np.ndarray) -> float:
    """Rotation angle (degrees) of a 3x3 rotation matrix."""
    c = (float(np.trace(r)) - 1.0) / 2.0
    return math.degrees(math.acos(min(1.0, max(-1.0, c))))


@dataclass
class FeatureCache:
    """At most ``capacity`` :class:`Features` by key (frame id or stamp), the oldest insertion evicted first.

    ``evicted`` counts evictions, so a caller can tell "never seen" from "seen but dropped".
    """

    capacity: int = 5000
    evicted: int = 0
    _items: OrderedDict = field(default_factory=OrderedDict, repr=False)

    def __post_init__(self) -> None:
        if int(self.capacity) < 1:
            raise ConfigError(f"feature cache capacity must be >= 1, got {self.capacity}")

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def put(self, key: Hashable, features: Features) -> None:
        self._items[key] = features
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
            self.evicted += 1

    def get(self, key: Hashable) -> Features | None:
        return self._items.get(key)

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self._items.values())
