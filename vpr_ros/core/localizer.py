"""The ROS-free localizer: resolves the model, opens or starts the place map, matches frames (single-frame
and sequence) and decides which frames become keyframes; the ROS localizer node only adapts it.

Modes: ``localize`` (query a saved map), ``map`` (add keyframes; no matches are reported), ``both``.
Keyframes are every ``keyframe_every``-th frame, or any frame whose best score is below
``novelty_threshold``, with the frame's pose: the one passed in, or the odometry sample
(:meth:`Localizer.add_odometry`) nearest in time within ``odom_tolerance_s``.

Stamp order (:meth:`Localizer.classify`): a stamp earlier than the previous frame's is out of order,
one equal to it repeated (a resend). Both are still matched (the result carries their own stamp) but
never become keyframes nor sequence steps, so map stamps stay monotonic and the sequence buffer in
time order.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vpr_ros.core.backends import BACKENDS, PRECISIONS
from vpr_ros.core.errors import ConfigError, MapError, ModelError, VprError
from vpr_ros.core.extract import DescriptorExtractor
from vpr_ros.core.mapdb import INDEX_KINDS, MapEntry, PlaceMap, QueryResult, map_path
from vpr_ros.core.models import DEFAULT_WEIGHTS, parse_size, resolve_model
from vpr_ros.core.models.resolve import DEFAULT_MODEL, PACKAGED
from vpr_ros.core.provenance import descriptor_source, source_mismatch
from vpr_ros.core.sequence import SequenceConfig, SequenceMatcher, SequenceResult, signed_step
from vpr_ros.core.timeline import NearestStampBuffer, seconds_to_ns

__all__ = ["MODES", "Frame", "LocalizationResult", "Localizer", "LocalizerConfig", "Match", "ModelConfig",
           "Pose", "StampOrder", "build_extractor", "check_map_model", "map_warning", "model_label",
           "open_map"]

MODES = ("localize", "map", "both")

#: Odometry samples kept for pose look-ups (the oldest is dropped when full).
ODOMETRY_CAPACITY = 2000


# --------------------------------------------------------------------------- model and map


def model_label(weights: str, name: str) -> str:
    """The name stored in maps the localizer builds: ``<model>@<weights>`` (default, imagenet, file stem)."""
    if weights == "default":
        tag = "default" if DEFAULT_WEIGHTS.is_file() else "imagenet"
    elif weights == "imagenet":
        tag = "imagenet"
    else:
        tag = Path(weights).stem
    return f"{name}@{tag}"


def build_extractor(weights: str = "default", model: str = "", input_size: str | tuple | None = "",
                    device: str = "auto", batch_size: int = 8, *, backend: str = "auto",
                    precision: str = "fp32", threads: int = 0) -> tuple[DescriptorExtractor, str]:
    """Resolve the model as the localizer does; return the extractor and its :func:`model_label`.

    ``input_size``: "" keeps the model's, "native", "HxW", or an (H, W) tuple / None.
    ``backend`` / ``precision`` / ``threads`` (0 = the library's default) select how the model
    runs (:func:`vpr_ros.core.backends.make_backend`); the label does not depend on them.
    Raises :class:`ConfigError` / :class:`ModelError` with the reason.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; expected one of: {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; expected one of: {', '.join(PRECISIONS)}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ConfigError(f"threads must be an integer >= 0 (0 = library default), got {threads!r}")
    if isinstance(input_size, str):
        size = "keep" if not input_size.strip() else parse_size(input_size.strip())
    else:
        size = input_size
    weights = (weights or "default").strip()
    try:
        if weights == "default":
            net = resolve_model(None, model or None, input_size=size)
        elif weights == "imagenet":
            net = resolve_model(None, model or DEFAULT_MODEL, input_size=size)
        elif weights in PACKAGED:  # a packaged student by its card's key (vpr-ros models)
            net = resolve_model(weights, model or None, input_size=size)
        else:
            if not Path(weights).is_file():
                raise ModelError(f"weights file {weights} does not exist")
            net = resolve_model(weights, model or None, input_size=size)
    except VprError:
        raise
    except Exception as exc:  # torchvision download attempts offline, unreadable files, ...
        raise ModelError(f"cannot build the model (weights {weights!r}, model {model!r}): "
                         f"{type(exc).__name__}: {exc}") from None
    options = {"threads": threads} if threads else {}
    ext = DescriptorExtractor(net, device=device, batch_size=batch_size, backend=backend, precision=precision,
                              **options)
    return ext, model_label(weights, net.name)


def check_map_model(map_model: str, label: str) -> str | None:
    """Why a map built by ``map_model`` cannot be queried with descriptors of ``label``, or None.

    Maps record ``<model>`` (``vpr-ros build-map``) or ``<model>@<weights>`` (the localizer, the demo);
    the model must agree, and the weights too when the map names them.
    """
    if not map_model:
        return None
    base, _, tag = map_model.partition("@")
    name, _, our_tag = label.partition("@")
    if base != name:
        return f"the map was built with model {map_model!r} but this node runs {label!r}"
    if tag and tag != our_tag:
        return f"the map was built with weights {tag!r} of {base} but this node runs weights {our_tag!r}"
    return None


def _no_map(target: Path) -> str:
    return (f"no place map at {target} (mode 'localize' needs one; build it with `vpr-ros build-map` "
            "or run with mode: map)")


def _map_mismatch(pmap: PlaceMap, label: str, source: dict[str, Any] | None) -> str | None:
    """Why ``pmap`` cannot be queried by the extractor of ``label`` / ``source``, or None."""
    if pmap.descriptor_source is not None and source is not None:
        return source_mismatch(pmap.descriptor_source, source)
    return check_map_model(pmap.model, label)


def open_map(path: str, mode: str, dim: int, label: str, index: str,
             source: dict[str, Any] | None = None) -> tuple[PlaceMap, bool]:
    """Load the map at ``path`` (refusing another model/weights/dimension), or start one in map modes.

    ``source``: the extractor's :func:`~vpr_ros.core.provenance.descriptor_source`, recorded in a new map
    and compared with a loaded map's (a map that records none is checked by its model label only).
    Returns the map and whether it was loaded from disk.
    """
    if not path:
        raise ConfigError("parameter 'map_path' is required (the .vprmap directory to query or build)")
    target = map_path(Path(path).expanduser())
    if not target.exists() and mode != "localize":
        return PlaceMap(dim, index, model=label, descriptor_source=source), False
    if not target.exists():
        raise MapError(_no_map(target))
    pmap = PlaceMap.load(target, expected_dim=dim)
    reason = _map_mismatch(pmap, label, source)
    if reason:
        raise MapError(f"map {target}: {reason}")
    return pmap, True


def map_warning(pmap: PlaceMap, label: str) -> str | None:
    """What to warn about a loaded map whose weights cannot be checked; None when they were."""
    if pmap.descriptor_source is not None:
        return None
    named = f"names model {pmap.model!r} but" if pmap.model else "names no model and"
    return (f"{named} does not record which weights made its descriptors (saved by an older vpr_ros); "
            f"assuming {label}. Rebuild it (vpr-ros build-map) to have the weights checked")


# --------------------------------------------------------------------------- configuration and results


@dataclass(frozen=True)
class ModelConfig:
    """How to build the extractor when none is passed in (see :func:`build_extractor`)."""

    weights: str = "default"
    model: str = ""
    input_size: str = ""
    device: str = "auto"
    backend: str = "auto"
    precision: str = "fp32"
    threads: int = 0
    batch_size: int = 8
    warmup: bool = True  # run every batch size once before the first frame (fixed input sizes only)


@dataclass(frozen=True)
class LocalizerConfig:
    """Settings of a :class:`Localizer` (module docstring).

    ``odometry``: frames are expected to carry a pose (passed in, or from :meth:`Localizer.add_odometry`):
    keyframes without one are counted, skipped with ``require_pose``, and ``sequence_step_m`` > 0 spaces
    sequence steps by travelled distance. ``min_score`` filters :attr:`LocalizationResult.matches`
    (cosine similarity); ``sequence`` None turns sequence matching off.
    """

    map_path: str = ""
    mode: str = "localize"
    index: str = "flat"
    top_k: int = 5
    min_score: float = -1.0
    keyframe_every: int = 1
    novelty_threshold: float = -1.0
    odometry: bool = False
    odom_tolerance_s: float = 0.05
    require_pose: bool = False
    source: str = ""
    sequence: SequenceConfig | None = None
    sequence_step_m: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode {self.mode!r} is not one of: {', '.join(MODES)}")
        if self.index not in INDEX_KINDS:
            raise ConfigError(f"index {self.index!r} is not one of: {', '.join(INDEX_KINDS)}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ConfigError(f"top_k must be an integer >= 1, got {self.top_k!r}")
        if self.keyframe_every < 0:
            raise ConfigError(f"keyframe_every must be >= 0, got {self.keyframe_every}")
        if self.odom_tolerance_s < 0 or self.sequence_step_m < 0:
            raise ConfigError("odom_tolerance_s and sequence_step_m must be >= 0")

    @property
    def mapping(self) -> bool:
        """Whether frames may become keyframes (modes map and both)."""
        return self.mode in ("map", "both")

    @property
    def matching(self) -> bool:
        """Whether matches are reported (modes localize and both)."""
        return self.mode in ("localize", "both")


@dataclass(frozen=True)
class Pose:
    """A frame's pose: position (x, y, z), orientation quaternion (x, y, z, w) and its frame."""

    position: tuple[float, float, float]
    orientation: tuple[float, float, float, float] | None = None
    frame_id: str = ""


class StampOrder(enum.Enum):
    """A frame's stamp against the newest one seen before it."""

    NEW = "new"
    OUT_OF_ORDER = "out_of_order"
    REPEATED = "repeated"

    @property
    def late(self) -> bool:
        """Not newer than the previous frame: never a keyframe nor a sequence step."""
        return self is not StampOrder.NEW


@dataclass
class Frame:
    """One image to localise. ``order``: as classified on receipt; None classifies it when processed."""

    stamp: float
    image: np.ndarray
    frame_id: str = ""
    pose: Pose | None = None
    order: StampOrder | None = None


@dataclass(frozen=True)
class Match:
    """A map place a frame matched: its id, score and entry."""

    id: int
    score: float
    entry: MapEntry


@dataclass
class LocalizationResult:
    """What :meth:`Localizer.process` found for one frame.

    ``query``: the top ``top_k`` single-frame neighbours (unfiltered); ``matches``: those scoring at
    least ``min_score``; ``sequence``: the sequence match (None when off, in map mode, or for a late
    frame) and ``sequence_matches`` its top ``top_k`` places (sequence scores, not filtered);
    ``keyframe``: the entry added to the map for this frame, or None.
    """

    stamp: float
    order: StampOrder
    query: QueryResult
    matches: list[Match]
    sequence: SequenceResult | None = None
    sequence_matches: list[Match] = field(default_factory=list)
    keyframe: MapEntry | None = None


# --------------------------------------------------------------------------- localizer


class Localizer:
    """Matches frames against a place map and grows it in map modes; see the module docstring.

    ``extractor`` (with its ``label``) and ``place_map`` may be passed already loaded; otherwise they are
    built from ``model`` and opened from ``config.map_path`` (in map modes a missing map starts
    empty). Bad configuration raises :class:`ConfigError` / :class:`MapError` / :class:`ModelError`.
    :meth:`classify` may run on another thread than :meth:`process_batch` (one thread each).
    """

    def __init__(self, config: LocalizerConfig, *, model: ModelConfig | None = None,
                 extractor: DescriptorExtractor | None = None, label: str | None = None,
                 place_map: PlaceMap | None = None) -> None:
        self.config = config
        self.map_target = map_path(Path(config.map_path).expanduser()) if config.map_path else None
        if place_map is None and self.map_target is None:
            raise ConfigError("parameter 'map_path' is required (the .vprmap directory to query or build)")
        if place_map is None and config.mode == "localize" and not self.map_target.exists():
            raise MapError(_no_map(self.map_target))  # before the (slow) model is built
        #: What building the model took (None when an extractor was passed in), for the caller's log.
        self.model_note: str | None = None
        if extractor is None:
            t0 = time.perf_counter()
            extractor, label = self._build_extractor(model or ModelConfig())
            b = extractor.backend
            self.model_note = (f"model {label} ({extractor.dim}-d) on {extractor.device}, backend {b.kind} "
                               f"{b.precision}, input {extractor.preprocess.input_size or 'native'}, "
                               f"{time.perf_counter() - t0:.1f} s")
        self.extractor = extractor
        self.label = label or extractor.model.name
        source = descriptor_source(extractor)
        if place_map is None:
            place_map, self.map_loaded = open_map(config.map_path, config.mode, extractor.dim, self.label,
                                                  config.index, source)
        else:  # the caller's map: checked against the extractor; map_loaded = read from map_path here
            self.map_loaded = False
            if place_map.dim != extractor.dim:
                raise MapError(f"the map holds {place_map.dim}-d descriptors, the model {extractor.dim}-d")
            reason = _map_mismatch(place_map, self.label, source)
            if reason:
                raise MapError(f"map {self.map_target or '(in memory)'}: {reason}")
        self.place_map = place_map
        #: Why the loaded map's weights could not be checked (None when they were or the map is new).
        self.map_warning = map_warning(place_map, self.label) if self.map_loaded else None
        self._sequence = SequenceMatcher(config.sequence) if config.sequence is not None else None
        self._sequence_pose: Pose | None = None  # pose of the last sequence step
        self._odometry: NearestStampBuffer[Pose] = NearestStampBuffer(ODOMETRY_CAPACITY)
        self._last_stamp: float | None = None
        self._good_count = 0  # frames considered for keyframes (the keyframe_every count)
        self.frames = 0
        self.batches = 0
        self.out_of_order = 0
        self.repeated_stamp = 0
        self.keyframes_added = 0
        self.keyframes_without_pose = 0
        self.odom_rejected = 0
        self.sequence_fallbacks = 0
        self.sequence_no_pose = 0

    @staticmethod
    def _build_extractor(model: ModelConfig) -> tuple[DescriptorExtractor, str]:
        ext, label = build_extractor(model.weights, model.model, model.input_size, model.device,
                                     model.batch_size, backend=model.backend, precision=model.precision,
                                     threads=model.threads)
        if model.warmup and ext.preprocess.input_size:
            # fixed input shape: every batch size once, the largest twice, before the first frame, so the
            # backend's memory (ONNX Runtime's arena: +200 MB at 320x240, batch 8) is taken now, not when a
            # backlog first forms hours later (bench/soak.py: RSS flat)
            for n in (model.batch_size, *range(model.batch_size, 0, -1)):
                ext.backend.warmup(batch=n)
        return ext, label

    @property
    def odometry(self) -> NearestStampBuffer[Pose]:
        """The odometry poses kept for look-ups, by stamp in nanoseconds (``len()`` counts them)."""
        return self._odometry

    def reconfigure(self, config: LocalizerConfig) -> None:
        """Apply new runtime settings; a changed sequence setting empties the sequence buffer.

        ``mode``, ``index`` and ``map_path`` are fixed at construction.
        """
        old = self.config
        for name in ("mode", "index", "map_path"):
            if getattr(config, name) != getattr(old, name):
                raise ConfigError(f"{name} cannot change while the localizer runs")
        if (config.sequence, config.sequence_step_m) != (old.sequence, old.sequence_step_m):
            self._sequence = SequenceMatcher(config.sequence) if config.sequence is not None else None
            self._sequence_pose = None
        self.config = config

    # ------------------------------------------------------------------ inputs

    def classify(self, stamp: float) -> StampOrder:
        """Order ``stamp`` against the newest stamp so far (counted); a new one becomes the newest."""
        if self._last_stamp is not None and stamp <= self._last_stamp:
            if stamp == self._last_stamp:
                self.repeated_stamp += 1
                return StampOrder.REPEATED
            self.out_of_order += 1
            return StampOrder.OUT_OF_ORDER
        self._last_stamp = stamp
        return StampOrder.NEW

    def add_odometry(self, stamp: float, pose: Pose) -> bool:
        """Keep an odometry pose for frames near ``stamp``; False (counted) when it holds NaN/inf."""
        values = [stamp, *pose.position, *(pose.orientation or ())]
        if not np.isfinite(values).all():  # would poison every keyframe near its stamp
            self.odom_rejected += 1
            return False
        self._odometry.put(seconds_to_ns(stamp), pose)
        return True

    # ------------------------------------------------------------------ matching

    def process(self, stamp: float, image: np.ndarray, pose: Pose | None = None,
                frame_id: str = "") -> LocalizationResult:
        """Localise one frame (and add it as a keyframe when the policy says so)."""
        return self.process_batch([Frame(stamp, image, frame_id, pose)])[0]

    def process_batch(self, frames: Sequence[Frame]) -> list[LocalizationResult]:
        """Localise frames in order with one forward pass; results in the same order."""
        if not frames:
            return []
        cfg = self.config
        sequence = self._sequence if cfg.matching else None  # one matcher for the batch
        orders = [f.order if f.order is not None else self.classify(f.stamp) for f in frames]
        descriptors = self.extractor([f.image for f in frames])
        self.batches += 1
        k = cfg.top_k
        kk = max(k, sequence.config.candidates) if sequence is not None else k
        # map modes search frame by frame: a keyframe added for one frame is a place for the next
        batch: Any = None
        if not cfg.mapping:
            pmap = self.place_map
            batch = pmap.query(descriptors, k) if sequence is None else pmap.search(descriptors, kk)
        results = []
        for i, (frame, order, d) in enumerate(zip(frames, orders, descriptors, strict=True)):
            if sequence is None:
                query = self.place_map.query(d, k)[0] if batch is None else batch[i]
            else:  # one search of the larger of top_k and the matcher's candidates serves both
                scores, ids = self.place_map.search(d[None, :], kk) if batch is None else (batch[0][i:i + 1],
                                                                                         batch[1][i:i + 1])
                keep = ids[0] >= 0
                ids, scores = ids[0][keep], scores[0][keep]
                query = QueryResult(ids[:k].copy(), scores[:k].copy(),
                                    [self.place_map.entry(int(e)) for e in ids[:k]])
            result = LocalizationResult(frame.stamp, order, query, self._matches(query, cfg.min_score))
            if sequence is not None and not order.late:  # a late or resent frame would break time order
                step = sequence.push(ids, scores, self._sequence_position(frame, sequence))
                self.sequence_fallbacks += int(step.fallback and len(step.ids) > 0)
                n = min(k, len(step.ids))
                result.sequence = step
                result.sequence_matches = [Match(int(e), float(s), self.place_map.entry(int(e)))
                                           for e, s in zip(step.ids[:n], step.scores[:n], strict=True)]
            if cfg.mapping:
                result.keyframe = self._maybe_add_keyframe(frame, order, d, query)
            results.append(result)
        self.frames += len(frames)
        return results

    @staticmethod
    def _matches(query: QueryResult, min_score: float) -> list[Match]:
        return [Match(int(e), float(s), entry)
                for e, s, entry in zip(query.ids, query.scores, query.entries, strict=True)
                if float(s) >= min_score]

    def _sequence_position(self, frame: Frame, sequence: SequenceMatcher) -> float | None:
        """The frame's step position: signed travelled distance / sequence_step_m, or None (one step)."""
        cfg = self.config
        if cfg.sequence_step_m <= 0 or not cfg.odometry:
            return None
        pose = self._pose(frame)
        if pose is None:
            self.sequence_no_pose += 1
            return None
        previous, self._sequence_pose = self._sequence_pose, pose
        if previous is None or sequence.position is None:
            return None
        return sequence.position + signed_step(previous.position, pose.position,
                                               pose.orientation) / cfg.sequence_step_m

    def _pose(self, frame: Frame) -> Pose | None:
        """The frame's own pose, else the odometry pose nearest its stamp within tolerance."""
        if frame.pose is not None:
            return frame.pose
        tolerance = seconds_to_ns(self.config.odom_tolerance_s)
        found = self._odometry.nearest(seconds_to_ns(frame.stamp), tolerance)
        return None if found is None else found[1]

    def _maybe_add_keyframe(self, frame: Frame, order: StampOrder, descriptor: np.ndarray,
                            query: QueryResult) -> MapEntry | None:
        cfg = self.config
        self._good_count += 1
        if order.late:
            return None
        every = cfg.keyframe_every
        best = float(query.scores[0]) if len(query) else None
        novel = best is None or best < cfg.novelty_threshold
        if not ((every > 0 and (self._good_count - 1) % every == 0) or novel):
            return None
        entry = MapEntry(stamp=frame.stamp, frame_id=frame.frame_id, source=cfg.source)
        if cfg.odometry or frame.pose is not None:
            pose = self._pose(frame)
            if pose is None:
                self.keyframes_without_pose += 1
                if cfg.require_pose:
                    return None
            else:
                entry.position, entry.orientation = pose.position, pose.orientation
                entry.frame_id = pose.frame_id
        entry.id = int(self.place_map.add(descriptor[None, :], [entry])[0])
        self.keyframes_added += 1
        return entry

    # ------------------------------------------------------------------ map

    def save_map(self, path: str | Path | None = None) -> tuple[Path, int]:
        """Save the map atomically to ``path`` (default ``map_path``); return where and how many places."""
        target = Path(path).expanduser() if path else self.map_target
        if target is None:
            raise ConfigError("save_map: no path given and the localizer has no map_path")
        return self.place_map.save(target), len(self.place_map)

