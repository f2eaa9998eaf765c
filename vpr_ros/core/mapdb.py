"""The place map: global image descriptors in a faiss index, with per-place metadata.

A :class:`PlaceMap` holds one descriptor per place plus a :class:`MapEntry` (stamp, frame,
source, pose) and answers nearest-neighbour queries. Ids are assigned by the map, start at
0, only ever grow and survive save/load.

Index kinds
-----------
``"flat"``
    Exact search (``IndexFlatIP`` / ``IndexFlatL2``). The default.
``"hnsw"``
    ``IndexHNSWFlat``; params ``M`` (32), ``efConstruction`` (40), ``efSearch`` (default None:
    scaled with the map, :func:`scaled_ef_search` = ``max(128, ceil(384 * n / 1e6))``, set
    when the index is built or loaded and after every add; an explicit value always wins).
    Measured on 448-d descriptors (bench/README.md): R@1 vs exact 0.99 at 100k with 128,
    0.984 at 1M with 384 (2 ms/query on one core); the old fixed 64 gave 0.97 / 0.91. Maps
    saved before efSearch was scaled recorded ``efSearch: 64`` and keep it.
``"ivfpq"``
    ``IndexIVFPQ``; params ``nlist`` (256), ``m`` (sub-quantizers; default the largest divisor
    of ``dim`` not above ``min(64, dim // 8)``), ``nbits`` (8), ``nprobe`` (16) and
    ``min_train`` (default ``39 * max(nlist, 2**nbits)``). The index needs training, so until
    the map holds ``min_train`` vectors they are kept in an exact flat buffer (searches are
    exact meanwhile); the add that reaches ``min_train`` trains on every vector so far and
    moves them into the IVF-PQ index. Stored vectors cannot be read back (PQ is lossy).
``"auto"``
    Flat until the map holds ``threshold`` vectors (default 30 000), then the add that
    reaches it rebuilds the map as HNSW (params ``M``, ``efConstruction``, ``efSearch``).
    Exact single-query search costs ~2.4 ms at 30k but ~13 ms at 100k on one core; the
    rebuild at 30k takes a few seconds.

Scores are what faiss returns: inner products for ``metric="ip"`` (cosine similarity for
L2-normalised descriptors; higher is better), squared L2 distances for ``metric="l2"``
(lower is better). Missing neighbours have id ``-1`` and score ``-inf`` (ip) / ``+inf`` (l2).

On-disk format
--------------
A map is a directory ``<name>.vprmap/`` (the suffix is appended when missing) holding
``manifest.json``, ``index-<sha8>.faiss`` (``faiss.write_index``) and ``entries-<sha8>.npz``
(plain numpy arrays, read with ``allow_pickle=False``). The manifest records both data files
with their sha256 and size; :meth:`PlaceMap.load` verifies them before faiss sees a byte.
:meth:`PlaceMap.save` writes content-addressed data files, then replaces the manifest (the
commit point) and only then deletes the files the old manifest used, so a crash at any
moment leaves the previous complete map loadable. One writer per map directory at a time
(a ``flock`` on ``<dir>/.lock`` serialises concurrent savers).

The manifest's optional ``descriptor_source`` records which weights made the descriptors
(model, ``weights_id``, input size, dimension; :mod:`vpr_ros.core.provenance`); maps saved
before it existed load without it (:attr:`PlaceMap.descriptor_source` is None).

Local features (optional, :meth:`PlaceMap.enable_local_features`): ORB keypoints and
descriptors of each place's image (:class:`vpr_ros.core.geometry.Features`, about 40 bytes per
keypoint), what geometric verification of a loop closure against the map needs. They are saved
in ``features-<sha8>.npz`` (``counts`` per row, -1 for a place without features; ``points``,
``descriptors``, ``sizes``), recorded and verified like the other data files, with the settings
that made them under the manifest's ``local_features``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import math
import os
import re
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from vpr_ros.core.errors import MapError
from vpr_ros.core.geometry import Features

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INDEX_KINDS",
    "MAP_SUFFIX",
    "MapEntry",
    "PlaceMap",
    "QueryResult",
    "UnknownEntryError",
    "map_path",
    "scaled_ef_search",
    "set_search_threads",
]

FORMAT_NAME = "vpr_ros.map"
FORMAT_VERSION = 1
MAP_SUFFIX = ".vprmap"
MANIFEST_NAME = "manifest.json"
INDEX_KINDS = ("flat", "hnsw", "ivfpq", "auto")
METRICS = ("ip", "l2")

_INDEX_FILE_RE = re.compile(r"index-[0-9a-f]{8,64}\.faiss")
_ENTRIES_FILE_RE = re.compile(r"entries-[0-9a-f]{8,64}\.npz")
_FEATURES_FILE_RE = re.compile(r"features-[0-9a-f]{8,64}\.npz")
_TMP_PREFIX = ".tmp-"
_HASH_CHUNK = 1 << 20

_HNSW_DEFAULTS: dict[str, Any] = {"M": 32, "efConstruction": 40, "efSearch": None}  # None: scaled
_DEFAULTS: dict[str, dict[str, Any]] = {
    "flat": {},
    "hnsw": dict(_HNSW_DEFAULTS),
    "ivfpq": {"nlist": 256, "m": None, "nbits": 8, "nprobe": 16, "min_train": None},
    "auto": {"threshold": 30_000, **_HNSW_DEFAULTS},
}
#: Parameters whose default None means "chosen by the map" (not filled in, saved as null).
_AUTO_PARAMS = frozenset({"efSearch"})


def set_search_threads(n: int) -> None:
    """faiss OpenMP threads for the searches *the calling thread* makes; ``n <= 0`` keeps the default.

    OpenMP's thread count is a per-thread setting: call this in the thread that searches (a
    node's worker), not only in the main thread. One thread suits single-query search, and on
    cores shared with busy processes a multi-threaded search can be ~40x slower (spin-waits).
    """
    if n > 0:
        faiss.omp_set_num_threads(int(n))


def scaled_ef_search(n: int) -> int:
    """HNSW ``efSearch`` for a map of ``n`` vectors: ``max(128, ceil(384 * n / 1e6))``.

    128 keeps recall@1 vs exact search >= 0.98 up to ~300k 448-d descriptors, 384 reaches
    0.984 at 1M (bench/README.md, section 3); search time grows about linearly with it.
    """
    return max(128, math.ceil(384 * max(0, int(n)) / 1_000_000))


class UnknownEntryError(MapError, KeyError):
    """An id that is not in the map."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


@dataclass
class MapEntry:
    """Metadata of one place. ``id`` is assigned by the map (``-1`` until then)."""

    id: int = -1
    stamp: float = 0.0
    frame_id: str = ""
    source: str = ""
    position: tuple[float, float, float] | None = None
    orientation: tuple[float, float, float, float] | None = None


@dataclass
class QueryResult:
    """One query's neighbours, best first: ``ids`` int64, ``scores`` float32, ``entries``."""

    ids: np.ndarray
    scores: np.ndarray
    entries: list[MapEntry] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


def map_path(path: str | os.PathLike[str]) -> Path:
    """The directory a map saved under ``path`` lives in (``.vprmap`` appended when missing)."""
    p = Path(path)
    return p if p.name.endswith(MAP_SUFFIX) else p.with_name(p.name + MAP_SUFFIX)


class _Grow:
    """An append-only numpy column with amortised O(1) appends."""

    def __init__(self, dtype: type, tail: tuple[int, ...] = (), data: np.ndarray | None = None) -> None:
        self._tail = tail
        if data is None:
            data = np.empty((0, *tail), dtype)
        self._buf = np.ascontiguousarray(data, dtype=dtype)
        self._n = len(data)

    def __len__(self) -> int:
        return self._n

    def view(self) -> np.ndarray:
        return self._buf[: self._n]

    def extend(self, rows: np.ndarray) -> None:
        need = self._n + len(rows)
        if need > len(self._buf):
            cap = max(need, 2 * len(self._buf), 64)
            buf = np.empty((cap, *self._tail), self._buf.dtype)
            buf[: self._n] = self._buf[: self._n]
            self._buf = buf
        self._buf[self._n : need] = rows
        self._n = need


class _RWLock:
    """Many readers (search, query, save) or one writer (add); waiting writers go first."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting_writers += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def _int_param(kind: str, name: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise MapError(f"index {kind!r}: parameter {name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _resolve_params(kind: str, dim: int, params: dict[str, Any]) -> dict[str, Any]:
    if kind not in _DEFAULTS:
        raise MapError(f"unknown index kind {kind!r}; expected one of {', '.join(INDEX_KINDS)}")
    unknown = sorted(set(params) - set(_DEFAULTS[kind]))
    if unknown:
        allowed = ", ".join(_DEFAULTS[kind]) or "none"
        raise MapError(f"index {kind!r}: unknown parameter(s) {', '.join(unknown)} (allowed: {allowed})")
    out = {**_DEFAULTS[kind], **{k: v for k, v in params.items() if v is not None}}
    if kind == "ivfpq":
        if out["m"] is None:
            cap = max(1, min(64, dim // 8))
            out["m"] = max(m for m in range(1, cap + 1) if dim % m == 0)
        for name in ("nlist", "m", "nbits", "nprobe"):
            out[name] = _int_param(kind, name, out[name])
        if dim % out["m"]:
            raise MapError(f"index 'ivfpq': m={out['m']} must divide the descriptor dimension {dim}")
        if out["nbits"] > 16:
            raise MapError(f"index 'ivfpq': nbits must be <= 16, got {out['nbits']}")
        floor = max(out["nlist"], 2 ** out["nbits"])
        if out["min_train"] is None:
            out["min_train"] = 39 * floor
        out["min_train"] = _int_param(kind, "min_train", out["min_train"], low=floor)
    else:
        for name in out:
            if out[name] is None and name in _AUTO_PARAMS:
                continue
            out[name] = _int_param(kind, name, out[name])
    return out


def _faiss_metric(metric: str) -> int:
    return faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class PlaceMap:
    """A faiss-backed map of place descriptors with per-place :class:`MapEntry` metadata.

    ``dim`` is the descriptor length, ``model`` the name of the model that produced the
    descriptors (checked by :meth:`load` against ``expected_model``), ``index`` one of
    :data:`INDEX_KINDS` with its ``index_params`` (see the module docstring), ``metric``
    ``"ip"`` (inner product, default) or ``"l2"``. Thread-safe: searches and saves run
    concurrently; :meth:`add` waits for them and excludes them.
    """

    def __init__(
        self, dim: int, index: str = "flat", *, model: str = "", metric: str = "ip",
        descriptor_source: dict[str, Any] | None = None, **index_params: Any
    ) -> None:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise MapError(f"descriptor dimension must be a positive integer, got {dim!r}")
        if metric not in METRICS:
            raise MapError(f"unknown metric {metric!r}; expected 'ip' or 'l2'")
        if not isinstance(model, str):
            raise MapError(f"model must be a string, got {type(model).__name__}")
        self.dim = int(dim)
        self.model = model
        self.metric = metric
        #: Which weights made the descriptors (:func:`~vpr_ros.core.provenance.descriptor_source`), or None.
        self.descriptor_source = _check_source(descriptor_source, "descriptor_source")
        self.index_kind = index
        self._params = _resolve_params(index, self.dim, dict(index_params))
        self._lock = _RWLock()
        self._read_only = False
        self._active = "hnsw" if index == "hnsw" else "flat"
        self._index = self._new_index(self._active)
        self._ids = _Grow(np.int64)
        self._stamps = _Grow(np.float64)
        self._positions = _Grow(np.float64, (3,))
        self._orientations = _Grow(np.float64, (4,))
        self._frame_ids: list[str] = []
        self._sources: list[str] = []
        self._next_id = 0
        self._created = _now()
        self._features: list[Any] | None = None  # Features | None per row; None: no local features kept
        self._features_config: dict[str, Any] | None = None

    # ------------------------------------------------------------------ properties

    def __len__(self) -> int:
        return len(self._ids)

    def __repr__(self) -> str:
        return (
            f"PlaceMap(dim={self.dim}, index={self.index_kind!r}, active={self._active!r}, "
            f"model={self.model!r}, metric={self.metric!r}, size={len(self)})"
        )

    @property
    def active_index(self) -> str:
        """The index in use now: ``"flat"``, ``"hnsw"`` or ``"ivfpq"`` (auto/untrained ivfpq start flat)."""
        return self._active

    @property
    def params(self) -> dict[str, Any]:
        """The index parameters with defaults filled in (``efSearch`` None: scaled with the map)."""
        return dict(self._params)

    @property
    def ef_search(self) -> int | None:
        """The HNSW ``efSearch`` in use now (None while the active index is not HNSW)."""
        return int(self._index.hnsw.efSearch) if self._active == "hnsw" else None

    @property
    def read_only(self) -> bool:
        """True for memory-mapped maps (``load(mmap=True)``): the index lives in the file, so no add."""
        return self._read_only

    @property
    def next_id(self) -> int:
        """The id the next added place will get."""
        return self._next_id

    @property
    def ids(self) -> np.ndarray:
        """All ids, in storage order (the row order of :meth:`descriptors`)."""
        with self._lock.read():
            return self._ids.view().copy()

    # ------------------------------------------------------------------ index construction

    def _new_index(self, kind: str) -> faiss.Index:
        metric = _faiss_metric(self.metric)
        p = self._params
        if kind == "flat":
            return faiss.IndexFlatIP(self.dim) if self.metric == "ip" else faiss.IndexFlatL2(self.dim)
        if kind == "hnsw":
            idx = faiss.IndexHNSWFlat(self.dim, p["M"], metric)
            idx.hnsw.efConstruction = p["efConstruction"]
            idx.hnsw.efSearch = p["efSearch"] or scaled_ef_search(0)
            return idx
        quantizer = faiss.IndexFlatIP(self.dim) if self.metric == "ip" else faiss.IndexFlatL2(self.dim)
        idx = faiss.IndexIVFPQ(quantizer, self.dim, p["nlist"], p["m"], p["nbits"], metric)
        idx.nprobe = p["nprobe"]
        return idx

    def _apply_search_params(self) -> None:
        """Search settings of the active index (after a build, a load and every add)."""
        if self._active == "hnsw":
            self._index.hnsw.efSearch = self._params["efSearch"] or scaled_ef_search(self._index.ntotal)
        elif self._active == "ivfpq":
            self._index.nprobe = self._params["nprobe"]

    def _all_vectors(self) -> np.ndarray:
        n = self._index.ntotal
        if n == 0:
            return np.empty((0, self.dim), np.float32)
        return self._index.reconstruct_n(0, n)

    def _build(self, kind: str, x: np.ndarray) -> faiss.Index:
        """A new index of ``kind`` holding ``x`` (rows in storage order)."""
        idx = self._new_index(kind)
        if kind == "ivfpq":
            p = self._params
            cap = 256 * max(p["nlist"], 2 ** p["nbits"])
            train = x
            if len(x) > cap:
                rows = np.sort(np.random.default_rng(0).choice(len(x), cap, replace=False))
                train = x[rows]
            idx.train(train)
        idx.add(x)
        return idx

    def _index_add(self, x: np.ndarray) -> None:
        """Add ``x`` to the index, switching index kind when a threshold is reached."""
        total = self._index.ntotal + len(x)
        target = None
        if self.index_kind == "ivfpq" and self._active == "flat" and total >= self._params["min_train"]:
            target = "ivfpq"
        elif self.index_kind == "auto" and self._active == "flat" and total >= self._params["threshold"]:
            target = "hnsw"
        if target is None:
            self._index.add(x)
        else:
            new = self._build(target, np.concatenate([self._all_vectors(), x]))
            self._index, self._active = new, target
        self._apply_search_params()  # efSearch grows with the map unless it was given

    # ------------------------------------------------------------------ validation

    def _check_descriptors(self, descriptors: Any, what: str = "descriptors") -> np.ndarray:
        try:
            x = np.asarray(descriptors)
        except (TypeError, ValueError) as exc:
            raise MapError(f"{what}: not an array: {exc}") from exc
        if not np.issubdtype(x.dtype, np.floating):
            raise MapError(f"{what}: expected a float array, got dtype {x.dtype}")
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2:
            raise MapError(f"{what}: expected shape (N, {self.dim}) or ({self.dim},), got {x.shape}")
        if x.shape[1] != self.dim:
            raise MapError(
                f"descriptor dimension {x.shape[1]} does not match the map's {self.dim} "
                f"(model {self.model or 'unnamed'}); were they made by another model?"
            )
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            bad = int((~np.isfinite(x)).any(axis=1).sum())
            raise MapError(f"{what}: {bad} row(s) contain NaN or infinite values")
        return x

    @staticmethod
    def _check_k(k: Any) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise MapError(f"k must be a positive integer, got {k!r}")
        return int(k)

    @staticmethod
    def _vector(value: Any, n: int, what: str, i: int) -> np.ndarray:
        if value is None:
            return np.full(n, np.nan)
        try:
            v = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise MapError(f"entries[{i}].{what}: expected {n} numbers or None, got {value!r}") from exc
        if v.shape != (n,) or not np.isfinite(v).all():
            raise MapError(f"entries[{i}].{what}: expected {n} finite numbers or None, got {value!r}")
        return v

    def _columns(self, entries: Sequence[MapEntry] | None, n: int) -> tuple:
        if entries is None:
            return (np.zeros(n), np.full((n, 3), np.nan), np.full((n, 4), np.nan), [""] * n, [""] * n)
        if isinstance(entries, MapEntry):
            entries = [entries]
        entries = list(entries)
        if len(entries) != n:
            raise MapError(f"got {len(entries)} entries for {n} descriptors; they must pair one to one")
        stamps = np.zeros(n)
        pos = np.empty((n, 3))
        ori = np.empty((n, 4))
        frames, sources = [], []
        for i, e in enumerate(entries):
            if not isinstance(e, MapEntry):
                raise MapError(f"entries[{i}]: expected a MapEntry, got {type(e).__name__}")
            try:
                stamps[i] = float(e.stamp)
            except (TypeError, ValueError) as exc:
                raise MapError(f"entries[{i}].stamp: expected a number, got {e.stamp!r}") from exc
            if not math.isfinite(stamps[i]):
                raise MapError(f"entries[{i}].stamp must be finite, got {e.stamp!r}")
            pos[i] = self._vector(e.position, 3, "position", i)
            ori[i] = self._vector(e.orientation, 4, "orientation", i)
            for name, value, out in (("frame_id", e.frame_id, frames), ("source", e.source, sources)):
                if not isinstance(value, str):
                    raise MapError(f"entries[{i}].{name}: expected a string, got {type(value).__name__}")
                out.append(value)
        return stamps, pos, ori, frames, sources

    # ------------------------------------------------------------------ public API

    def add(self, descriptors: np.ndarray, entries: Sequence[MapEntry] | None = None, *,
            features: Sequence[Any] | None = None) -> np.ndarray:
        """Add ``(N, dim)`` (or one ``(dim,)``) descriptors with optional entries; return their ids.

        ``features``: one :class:`~vpr_ros.core.geometry.Features` (or None) per row, kept when the
        map keeps local features (:meth:`enable_local_features`). The entries' ``id`` fields are
        ignored (the map assigns ids); the caller's objects are not modified. Either every row is
        added or, on error, none.
        """
        x = self._check_descriptors(descriptors)
        n = len(x)
        stamps, pos, ori, frames, sources = self._columns(entries, n)
        feats = self._check_features(features, n)
        with self._lock.write():
            if self._read_only:
                raise MapError(
                    "this map was loaded with mmap=True and is read-only; load it without mmap to add"
                )
            ids = np.arange(self._next_id, self._next_id + n, dtype=np.int64)
            if n == 0:
                return ids
            self._index_add(x)
            self._ids.extend(ids)
            self._stamps.extend(stamps)
            self._positions.extend(pos)
            self._orientations.extend(ori)
            self._frame_ids.extend(frames)
            self._sources.extend(sources)
            if self._features is not None:
                self._features.extend(feats)
            self._next_id += n
            return ids

    # ------------------------------------------------------------------ local features

    def enable_local_features(self, config: dict[str, Any]) -> None:
        """Keep local features from now on; ``config`` names what made them (e.g. ``{"kind": "orb",
        "n_features": 1000, "max_image_side": 640}``). Places added before have none."""
        if not isinstance(config, dict) or not all(isinstance(k, str) for k in config):
            raise MapError(f"local feature settings must be a mapping of names, got {config!r}")
        with self._lock.write():
            if self._features is None:
                self._features = [None] * len(self)
            self._features_config = dict(config)

    @property
    def local_features_config(self) -> dict[str, Any] | None:
        """The settings of the stored local features; None when the map keeps none."""
        return None if self._features_config is None else dict(self._features_config)

    def local_features(self, id: int) -> Any:
        """The :class:`~vpr_ros.core.geometry.Features` of place ``id``; None when the map keeps no
        local features or has none for it. :class:`UnknownEntryError` for an id not in the map."""
        with self._lock.read():
            row = self._row(int(id))
            return None if self._features is None else self._features[row]

    def _check_features(self, features: Sequence[Any] | None, n: int) -> list[Any]:
        if features is None:
            return [None] * n

        features = list(features)
        if len(features) != n:
            raise MapError(f"got {len(features)} local features for {n} descriptors; "
                           "they must pair one to one")
        if self._features_config is None:
            raise MapError("this map keeps no local features; call enable_local_features() first")
        for i, f in enumerate(features):
            if f is not None and not (isinstance(f, Features) and f.points.shape == (len(f), 2)
                                      and f.descriptors.shape == (len(f), 32)
                                      and f.descriptors.dtype == np.uint8):
                raise MapError(f"features[{i}]: expected ORB Features ((K, 2) points, (K, 32) uint8 "
                               f"descriptors) or None, got {f!r:.80}")
        return features

    def _search_rows(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores (Q, k) float32 and storage rows (Q, k) int64, -1 for missing."""
        missing = -np.inf if self.metric == "ip" else np.inf
        if self._index.ntotal == 0 or len(x) == 0:
            return np.full((len(x), k), missing, np.float32), np.full((len(x), k), -1, np.int64)
        scores, rows = self._index.search(x, k)
        scores = np.asarray(scores, np.float32)
        rows = np.asarray(rows, np.int64)
        scores[rows < 0] = missing
        return scores, rows

    def search(self, descriptors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw top-``k``: ``(scores (Q, k) float32, ids (Q, k) int64)``; missing neighbours get id -1."""
        x = self._check_descriptors(descriptors, "query descriptors")
        k = self._check_k(k)
        with self._lock.read():
            scores, rows = self._search_rows(x, k)
            ids = np.full(rows.shape, -1, np.int64)
            found = rows >= 0
            ids[found] = self._ids.view()[rows[found]]
        return scores, ids

    def query(self, descriptors: np.ndarray, k: int = 5) -> list[QueryResult]:
        """Top-``k`` places for each query row, best first; one :class:`QueryResult` per query.

        ``k`` larger than the map is clamped; an empty map gives empty results.
        """
        x = self._check_descriptors(descriptors, "query descriptors")
        k = self._check_k(k)
        with self._lock.read():
            kk = min(k, len(self))
            if kk == 0:
                empty = [QueryResult(np.empty(0, np.int64), np.empty(0, np.float32), []) for _ in x]
                return empty
            scores, rows = self._search_rows(x, kk)
            out = []
            for s, r in zip(scores, rows, strict=True):
                keep = r >= 0
                r = r[keep]
                out.append(
                    QueryResult(self._ids.view()[r].copy(), s[keep].copy(), [self._entry_at(i) for i in r])
                )
            return out

    def _entry_at(self, row: int) -> MapEntry:
        pos = self._positions.view()[row]
        ori = self._orientations.view()[row]
        return MapEntry(
            id=int(self._ids.view()[row]),
            stamp=float(self._stamps.view()[row]),
            frame_id=self._frame_ids[row],
            source=self._sources[row],
            position=None if np.isnan(pos).any() else tuple(float(v) for v in pos),
            orientation=None if np.isnan(ori).any() else tuple(float(v) for v in ori),
        )

    def _row(self, id: int) -> int:
        ids = self._ids.view()
        row = int(np.searchsorted(ids, id))
        if row >= len(ids) or ids[row] != id:
            raise UnknownEntryError(f"no place with id {id} in the map ({len(ids)} places)")
        return row

    def entry(self, id: int) -> MapEntry:
        """The metadata of place ``id``; :class:`UnknownEntryError` (a MapError and KeyError) if absent."""
        with self._lock.read():
            return self._entry_at(self._row(int(id)))

    def entries(self) -> list[MapEntry]:
        """Every place's metadata, in storage order."""
        with self._lock.read():
            return [self._entry_at(i) for i in range(len(self))]

    def descriptors(self) -> np.ndarray:
        """All stored descriptors ``(N, dim)`` float32, rows in :attr:`ids` order (not for trained ivfpq)."""
        with self._lock.read():
            if self._active == "ivfpq":
                raise MapError("an ivfpq map stores compressed codes; its descriptors cannot be read back")
            return self._all_vectors()

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Save atomically to the directory ``path`` (``.vprmap`` appended if missing); return it.

        Data files are written to temporary names, fsynced and renamed to content-addressed
        names; then ``manifest.json`` is replaced (the commit point), the directory fsynced and
        files no longer referenced removed. A crash leaves the previous map loadable.
        """
        target = map_path(path)
        with self._lock.read():
            try:
                target.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise MapError(f"cannot create map directory {target}: {exc}") from exc
            if not target.is_dir():
                raise MapError(f"cannot save map: {target} exists and is not a directory")
            try:
                with open(target / ".lock", "a") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                    self._save_locked(target)
            except OSError as exc:  # disk full, ...: the manifest was not replaced
                raise MapError(f"cannot save map to {target}: {exc}; the map saved there before (if any) "
                               "is unchanged") from None
        return target

    def _save_locked(self, target: Path) -> None:
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp_index = target / f"{_TMP_PREFIX}{tag}.faiss"
        tmp_entries = target / f"{_TMP_PREFIX}{tag}.npz"
        tmp_manifest = target / f"{_TMP_PREFIX}{tag}.json"
        tmp_features = target / f"{_TMP_PREFIX}{tag}-features.npz"
        try:
            try:
                faiss.write_index(self._index, str(tmp_index))
            except RuntimeError as exc:  # faiss reports I/O errors (a full disk) as RuntimeError
                text = str(exc)
                raise OSError(text[text.rfind("failed: ") + 8 :] if "failed: " in text else text) from None
            _fsync_path(tmp_index)
            with open(tmp_entries, "wb") as f:
                np.savez(
                    f,
                    ids=self._ids.view(),
                    stamps=self._stamps.view(),
                    positions=self._positions.view(),
                    orientations=self._orientations.view(),
                    frame_ids=np.array(self._frame_ids, dtype=np.str_).reshape(-1),
                    sources=np.array(self._sources, dtype=np.str_).reshape(-1),
                )
                f.flush()
                os.fsync(f.fileno())
            files = {
                "index": self._commit_data_file(tmp_index, target, "index", ".faiss"),
                "entries": self._commit_data_file(tmp_entries, target, "entries", ".npz"),
            }
            local = None
            if self._features is not None:
                self._write_features(tmp_features)
                local = {"config": self._features_config,
                         "file": self._commit_data_file(tmp_features, target, "features", ".npz")}
            _fsync_path(target)  # data file names durable before the manifest refers to them
            now = _now()
            manifest = {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "dim": self.dim,
                "model": self.model,
                "metric": self.metric,
                "index": {"kind": self.index_kind, "active": self._active, "params": self._params},
                "count": len(self),
                "next_id": self._next_id,
                "created": self._created,
                "updated": now,
                "files": files,
                "faiss_version": getattr(faiss, "__version__", ""),
            }
            if self.descriptor_source is not None:
                manifest["descriptor_source"] = self.descriptor_source
            if local is not None:
                manifest["local_features"] = local
            with open(tmp_manifest, "w", encoding="utf-8") as f:
                json.dump(manifest, f, indent=2)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp_manifest, target / MANIFEST_NAME)  # the commit point
            _fsync_path(target)
        finally:
            for tmp in (tmp_index, tmp_entries, tmp_manifest, tmp_features):
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
        keep = {MANIFEST_NAME, ".lock", files["index"]["name"], files["entries"]["name"]}
        if local is not None:
            keep.add(local["file"]["name"])
        for p in target.iterdir():
            name = p.name
            stale = (
                _INDEX_FILE_RE.fullmatch(name)
                or _ENTRIES_FILE_RE.fullmatch(name)
                or _FEATURES_FILE_RE.fullmatch(name)
                or name.startswith(_TMP_PREFIX)
            )
            if stale and name not in keep:
                with contextlib.suppress(OSError):
                    p.unlink()

    @staticmethod
    def _commit_data_file(tmp: Path, target: Path, stem: str, ext: str) -> dict[str, Any]:
        """Rename a written, fsynced temp file to its content-addressed name; return its manifest record."""
        digest = _sha256(tmp)
        size = tmp.stat().st_size
        for n in (8, 16, 64):  # a longer name on the (unlikely) clash with different content
            name = f"{stem}-{digest[:n]}{ext}"
            final = target / name
            if not final.exists() or (final.stat().st_size == size and _sha256(final) == digest):
                break
        os.replace(tmp, final)
        return {"name": name, "sha256": digest, "size": size}

    def _write_features(self, path: Path) -> None:
        """The local features as ``counts`` (-1: none for the row), ``points``, ``descriptors``, ``sizes``."""
        feats = self._features or []
        counts = np.array([-1 if f is None else len(f) for f in feats], dtype=np.int64)
        have = [f for f in feats if f is not None and len(f)]
        points = np.concatenate([f.points for f in have]) if have else np.empty((0, 2), np.float32)
        desc = np.concatenate([f.descriptors for f in have]) if have else np.empty((0, 32), np.uint8)
        sizes = np.array([(0, 0) if f is None else f.size for f in feats], dtype=np.int64).reshape(-1, 2)
        with open(path, "wb") as f:
            np.savez(f, counts=counts, points=points.astype(np.float32), descriptors=desc.astype(np.uint8),
                     sizes=sizes)
            f.flush()
            os.fsync(f.fileno())

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        mmap: bool = False,
        expected_dim: int | None = None,
        expected_model: str | None = None,
    ) -> PlaceMap:
        """Load a map saved by :meth:`save`, verifying the manifest and both files' sha256.

        ``mmap=True`` memory-maps a flat/HNSW index file (faiss ``IO_FLAG_MMAP | IO_FLAG_MMAP_IFC``;
        the first alone does not map flat storage) instead of reading it into RAM; such a map is
        :attr:`read_only`. A trained ivfpq index is always read into RAM (its codes are compact).
        ``expected_dim`` / ``expected_model`` refuse a map made for other descriptors.
        Raises :class:`MapError` for anything missing, corrupt, truncated or mismatched.
        """
        target = map_path(path)
        if not target.is_dir():
            raise MapError(f"no place map at {target}: directory does not exist")
        mpath = target / MANIFEST_NAME
        if not mpath.is_file():
            raise MapError(f"{target} is not a complete place map: {MANIFEST_NAME} is missing")
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MapError(f"cannot read map manifest {mpath}: {exc}") from exc
        m = _Manifest(manifest, mpath)

        if expected_dim is not None and int(expected_dim) != m.dim:
            raise MapError(
                f"map {target} holds {m.dim}-dimensional descriptors but {expected_dim} were expected"
            )
        if expected_model is not None and expected_model != m.model:
            raise MapError(
                f"map {target} was built with model {m.model!r} but model {expected_model!r} was expected"
            )
        try:
            pmap = cls(m.dim, m.kind, model=m.model, metric=m.metric, **m.params)
        except MapError as exc:
            raise MapError(f"map manifest {mpath} is invalid: {exc}") from exc
        if m.active not in _active_kinds(m.kind):
            raise MapError(f"map manifest {mpath}: index {m.kind!r} cannot be active as {m.active!r}")

        index_file = _verified_file(target, m.files["index"], mpath)
        entries_file = _verified_file(target, m.files["entries"], mpath)
        columns = _read_entries(entries_file, m.count)
        ids = columns["ids"]
        if len(ids) and (np.any(np.diff(ids) <= 0) or ids[0] < 0 or ids[-1] >= m.next_id):
            raise MapError(f"{entries_file}: ids are not increasing, or not below next_id {m.next_id}")

        # IO_FLAG_MMAP alone does not map flat storage in faiss 1.15; IO_FLAG_MMAP_IFC does. A trained
        # ivfpq index is read into RAM: its codes are compact, and faiss' IVF mmap opens the file
        # read-write and writes an index that refers to it (not self-contained) on save.
        use_mmap = bool(mmap) and m.active in ("flat", "hnsw")
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_MMAP_IFC if use_mmap else 0
        try:
            index = faiss.read_index(str(index_file), flags)
        except RuntimeError as exc:
            raise MapError(f"faiss cannot read the index file {index_file}: {exc}") from exc
        want = {"flat": faiss.IndexFlat, "hnsw": faiss.IndexHNSWFlat, "ivfpq": faiss.IndexIVFPQ}[m.active]
        if not isinstance(index, want):
            raise MapError(f"{index_file} holds a {type(index).__name__}, the manifest says {m.active!r}")
        if index.d != m.dim or index.ntotal != m.count or index.metric_type != _faiss_metric(m.metric):
            raise MapError(
                f"{index_file} does not match its manifest: dim {index.d} vs {m.dim}, "
                f"count {index.ntotal} vs {m.count}, metric type {index.metric_type} vs {m.metric!r}"
            )

        pmap._index = index
        pmap._active = m.active
        pmap._apply_search_params()
        pmap._ids = _Grow(np.int64, (), ids)
        pmap._stamps = _Grow(np.float64, (), columns["stamps"])
        pmap._positions = _Grow(np.float64, (3,), columns["positions"])
        pmap._orientations = _Grow(np.float64, (4,), columns["orientations"])
        pmap._frame_ids = columns["frame_ids"].tolist()
        pmap._sources = columns["sources"].tolist()
        pmap._next_id = m.next_id
        pmap._created = m.created
        pmap.descriptor_source = m.descriptor_source
        if m.local_features is not None:
            features_file = _verified_file(target, m.local_features["file"], mpath)
            pmap._features = _read_features(features_file, m.count)
            pmap._features_config = m.local_features["config"]
        pmap._read_only = use_mmap
        return pmap


_SOURCE_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str,), "weights_id": (str,), "input_size": (list, str), "dim": (int,)}


def _check_source(source: Any, what: str) -> dict[str, Any] | None:
    """A copy of a descriptor source record after checking its keys and types; None stays None."""
    if source is None:
        return None
    if not isinstance(source, dict) or set(source) != set(_SOURCE_TYPES):
        raise MapError(f"{what} must be a mapping with the keys {', '.join(_SOURCE_TYPES)}, got {source!r}")
    for key, types in _SOURCE_TYPES.items():
        value = source[key]
        if not isinstance(value, types) or isinstance(value, bool):
            raise MapError(f"{what}: {key!r} has the wrong type ({value!r})")
    size = source["input_size"]
    if isinstance(size, list) and (len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size)):
        raise MapError(f"{what}: input_size must be [height, width] or 'native', got {size!r}")
    if isinstance(size, str) and size != "native":
        raise MapError(f"{what}: input_size must be [height, width] or 'native', got {size!r}")
    return {"model": source["model"], "weights_id": source["weights_id"],
            "input_size": size if isinstance(size, str) else [int(v) for v in size],
            "dim": int(source["dim"])}


def _active_kinds(kind: str) -> tuple[str, ...]:
    return {"flat": ("flat",), "hnsw": ("hnsw",), "ivfpq": ("flat", "ivfpq"), "auto": ("flat", "hnsw")}[kind]


class _Manifest:
    """The validated fields of a manifest.json."""

    def __init__(self, raw: Any, path: Path) -> None:
        def bad(why: str) -> MapError:
            return MapError(f"map manifest {path} is invalid: {why}")

        if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
            found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            raise MapError(f"{path} is not a vpr_ros place map (format {found!r}, expected {FORMAT_NAME!r})")
        version = raw.get("format_version")
        if isinstance(version, bool) or not isinstance(version, int) or version != FORMAT_VERSION:
            raise MapError(
                f"{path}: unknown map format version {version!r}; this vpr_ros reads version {FORMAT_VERSION}"
                + (
                    " (the map was written by a newer vpr_ros)"
                    if isinstance(version, int) and version > 1
                    else ""
                )
            )

        def get(key: str, typ: type | tuple[type, ...], src: dict = raw) -> Any:
            value = src.get(key)
            if not isinstance(value, typ) or (isinstance(value, bool) and typ is not bool):
                raise bad(f"field {key!r} is missing or not of type {getattr(typ, '__name__', typ)}")
            return value

        self.dim = get("dim", int)
        self.model = get("model", str)
        self.metric = get("metric", str)
        index = get("index", dict)
        self.kind = get("kind", str, index)
        self.active = get("active", str, index)
        self.params = get("params", dict, index)
        if self.kind not in INDEX_KINDS:
            raise bad(f"unknown index kind {self.kind!r}")
        self.count = get("count", int)
        self.next_id = get("next_id", int)
        if self.count < 0 or self.next_id < self.count:
            raise bad(f"count {self.count} / next_id {self.next_id} are inconsistent")
        self.created = raw.get("created") if isinstance(raw.get("created"), str) else _now()
        try:
            self.descriptor_source = _check_source(raw.get("descriptor_source"), "field 'descriptor_source'")
        except MapError as exc:
            raise bad(str(exc)) from None
        self.local_features = None
        if "local_features" in raw:
            local = get("local_features", dict)
            config, rec = get("config", dict, local), get("file", dict, local)
            name, digest, size = get("name", str, rec), get("sha256", str, rec), get("size", int, rec)
            if not _FEATURES_FILE_RE.fullmatch(name) or not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise bad(f"local_features file record {rec!r} is malformed")
            self.local_features = {"config": config, "file": {"name": name, "sha256": digest, "size": size}}
        files = get("files", dict)
        self.files = {}
        for key, regex in (("index", _INDEX_FILE_RE), ("entries", _ENTRIES_FILE_RE)):
            rec = get(key, dict, files)
            name, digest, size = get("name", str, rec), get("sha256", str, rec), get("size", int, rec)
            if not regex.fullmatch(name) or not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise bad(f"{key} file record {rec!r} is malformed")
            self.files[key] = {"name": name, "sha256": digest, "size": size}


def _verified_file(target: Path, rec: dict[str, Any], mpath: Path) -> Path:
    path = target / rec["name"]
    if not path.is_file():
        raise MapError(f"map data file {path} named in {mpath} is missing")
    size = path.stat().st_size
    digest = _sha256(path)
    if digest != rec["sha256"]:
        raise MapError(
            f"checksum mismatch for map data file {path}: sha256 {digest[:16]}... but the manifest "
            f"records {rec['sha256'][:16]}... (size {size} bytes, manifest {rec['size']}); "
            "the file is truncated or corrupt"
        )
    if size != rec["size"]:
        raise MapError(f"map data file {path} is {size} bytes but its manifest records {rec['size']}")
    return path


def _read_entries(path: Path, count: int) -> dict[str, np.ndarray]:
    shapes = {
        "ids": ((count,), "i"),
        "stamps": ((count,), "f"),
        "positions": ((count, 3), "f"),
        "orientations": ((count, 4), "f"),
        "frame_ids": ((count,), "U"),
        "sources": ((count,), "U"),
    }
    out: dict[str, np.ndarray] = {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            for key, (shape, kind) in shapes.items():
                if key not in npz.files:
                    raise MapError(f"map entries file {path} lacks the array {key!r}")
                arr = npz[key]
                if arr.shape != shape or arr.dtype.kind != kind:
                    raise MapError(
                        f"map entries file {path}: array {key!r} has shape {arr.shape} dtype {arr.dtype}, "
                        f"expected shape {shape} kind {kind!r}"
                    )
                out[key] = arr
    except MapError:
        raise
    except (OSError, ValueError, EOFError, KeyError) as exc:
        raise MapError(f"cannot read map entries file {path}: {exc}") from exc
    out["ids"] = out["ids"].astype(np.int64)
    return out


def _read_features(path: Path, count: int) -> list[Any]:
    """Per-row :class:`~vpr_ros.core.geometry.Features` (views into the file's arrays) or None."""

    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = {"counts", "points", "descriptors", "sizes"} - set(npz.files)
            if missing:
                raise MapError(f"map features file {path} lacks the array(s) {', '.join(sorted(missing))}")
            counts, points, desc, sizes = npz["counts"], npz["points"], npz["descriptors"], npz["sizes"]
    except MapError:
        raise
    except (OSError, ValueError, EOFError, KeyError) as exc:
        raise MapError(f"cannot read map features file {path}: {exc}") from exc
    total = int(counts[counts > 0].sum()) if counts.ndim == 1 else -1
    if (counts.shape != (count,) or counts.dtype.kind != "i" or (counts < -1).any()
            or sizes.shape != (count, 2) or points.shape != (total, 2) or points.dtype != np.float32
            or desc.shape != (total, 32) or desc.dtype != np.uint8):
        raise MapError(f"map features file {path} does not match its map of {count} places: counts "
                       f"{counts.shape}, points {points.shape} {points.dtype}, descriptors {desc.shape} "
                       f"{desc.dtype}, sizes {sizes.shape}")
    out: list[Any] = []
    start = 0
    for n, (h, w) in zip(counts.tolist(), sizes.tolist(), strict=True):
        if n < 0:
            out.append(None)
            continue
        out.append(Features(points[start : start + n], desc[start : start + n], (int(h), int(w))))
        start += n
    return out
