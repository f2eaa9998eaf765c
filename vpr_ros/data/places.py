"""The one place-set type, :class:`PlaceDataset` (database, queries, ground-truth relation), and the readers
of the shared datasets that return it.

A :class:`GroundTruth` decides, per query, which database images show the same place (positives), which
are too close to serve as negatives (near), and which must be ignored (the query's own record and its
traverse's neighbours in time). Evaluation, training and the studies all use this one type. Readers:
:func:`load_nordland`, :func:`load_ie_tower`, :func:`load_rtabmap_loop`, :func:`load_kitti`,
:func:`load_tokyo_pair` and :func:`load_image_folder`; :mod:`.formats` reads the standard layouts.
Readers never read pixels except where a dataset needs it (Nordland's dark / frozen frame filter).
"""

from __future__ import annotations

import csv
import math
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np

from vpr_ros.core.errors import DatasetError
from vpr_ros.core.fileio import display_path
from vpr_ros.core.images import load_image
from vpr_ros.data.files import (
    list_images,
    natural_key,
    read_positions_csv,
    require_dir,
    require_file,
    to_metres,
)

#: Ground-truth kinds understood by :class:`GroundTruth`.
GT_KINDS = ("distance", "frame", "label", "pairs")


@dataclass
class ImageRecord:
    """One image of a dataset and what is known about where it was taken.

    ``label`` is a place class (used by ``GroundTruth(kind="label")``); ``sequence`` names the
    traverse or clip that ``frame_index`` counts within (frame tolerance only matches records of
    the same ``sequence``; ``None`` is one shared sequence, as in frame-aligned Nordland).
    """

    path: Path
    name: str
    position: tuple[float, float] | None = None
    frame_index: int | None = None
    stamp: float | None = None
    label: str | None = None
    sequence: str | None = None

    def load(self) -> np.ndarray:
        """Read the image as contiguous uint8 RGB (raises ImageError naming the path)."""
        return load_image(self.path)


@dataclass
class GroundTruth:
    """Which database images are a query's positives, which are near it, and which are ignored.

    Positives by ``kind``:

    * ``"distance"``: database images within ``radius_m`` (Euclidean, planar ``position``) of the query.
    * ``"frame"``: database images of the same ``sequence`` with ``|frame_index - query's| <= tolerance``.
    * ``"label"``: database images with the same ``label`` as the query (place classes, e.g. IE tower).
    * ``"pairs"``: the database images listed for the query in ``pairs`` (query path -> database paths),
      as in VPR-Bench's ground-truth files or a loop-closure matrix.

    Near (never negatives): within ``negatives_beyond`` (metres or frames, distance and frame kinds; None:
    the positives). Ignored (neither positive nor negative): the query's own record when the database
    holds it, and records of the query's ``sequence`` whose stamps are less than ``min_time_gap_s`` apart
    (a single traverse: its neighbours in time are not revisits). ``text`` replaces :meth:`describe`'s
    wording in reports.
    """

    kind: str
    radius_m: float = 25.0
    tolerance: int = 2
    pairs: dict[Path, frozenset[Path]] | None = field(default=None, repr=False)
    negatives_beyond: float | None = None
    min_time_gap_s: float = 0.0
    text: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in GT_KINDS:
            raise ValueError(f"unknown ground-truth kind {self.kind!r}; expected one of {GT_KINDS}")
        if self.kind == "distance" and not (math.isfinite(self.radius_m) and self.radius_m > 0):
            raise ValueError(f"radius_m must be a positive finite number, got {self.radius_m}")
        if self.kind == "frame" and (int(self.tolerance) != self.tolerance or self.tolerance < 0):
            raise ValueError(f"tolerance must be a non-negative integer, got {self.tolerance}")
        if self.kind == "pairs" and self.pairs is None:
            raise ValueError("pairs ground truth needs the pairs mapping (query path -> database paths)")
        if self.negatives_beyond is not None:
            if self.kind not in ("distance", "frame"):
                raise ValueError(f"negatives_beyond applies to distance and frame ground truth, "
                                 f"not {self.kind}")
            if not (math.isfinite(self.negatives_beyond) and self.negatives_beyond >= self._threshold):
                raise ValueError(f"negatives_beyond must be finite and >= the positive threshold "
                                 f"{self._threshold:g}, got {self.negatives_beyond}")
        if not (math.isfinite(self.min_time_gap_s) and self.min_time_gap_s >= 0):
            raise ValueError(f"min_time_gap_s must be a non-negative number, got {self.min_time_gap_s}")

    @property
    def _threshold(self) -> float:
        return float(self.radius_m) if self.kind == "distance" else float(self.tolerance)

    def describe(self) -> str:
        """Short human-readable form, e.g. ``"distance <= 25 m"`` (``text`` when given)."""
        if self.text:
            return self.text
        unit = {"distance": "m", "frame": "frames"}.get(self.kind, "")
        text = {"distance": f"distance <= {self.radius_m:g} m", "frame": f"frame index +/-{self.tolerance}",
                "pairs": "listed pairs", "label": "same label"}[self.kind]
        if self.negatives_beyond is not None:
            text += f", negatives beyond {self.negatives_beyond:g} {unit}"
        if self.min_time_gap_s > 0:
            text += f", same-traverse frames < {self.min_time_gap_s:g} s apart ignored"
        return text

    def positives(self, database: Sequence[ImageRecord], queries: Sequence[ImageRecord]) -> list[np.ndarray]:
        """Per query, the sorted database indices (int64) that match by ``kind`` (before exclusions)."""
        return self._within(database, queries, self._threshold)

    def _within(self, database: Sequence[ImageRecord], queries: Sequence[ImageRecord],
                threshold: float) -> list[np.ndarray]:
        if self.kind == "distance":
            return _positives_distance(database, queries, threshold)
        if self.kind == "frame":
            return _positives_frame(database, queries, int(threshold))
        if self.kind == "pairs":
            return _positives_pairs(database, queries, self.pairs or {})
        return _positives_label(database, queries)

    def relate(self, database: Sequence[ImageRecord], queries: Sequence[ImageRecord]
               ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        """(positives, near, excluded): per query, sorted database indices. Excluded indices are taken
        out of the positives and added to near (so they are never negatives either)."""
        pos = self.positives(database, queries)
        beyond = self.negatives_beyond
        near = pos if beyond is None else self._within(database, queries, beyond)
        excl = _exclusions(database, queries, self.min_time_gap_s)
        pos = [np.setdiff1d(p, e, assume_unique=True) if len(e) else p
               for p, e in zip(pos, excl, strict=True)]
        near = [np.union1d(n, e) if len(e) else n for n, e in zip(near, excl, strict=True)]
        return pos, near, excl


def _positions(records: Sequence[ImageRecord], role: str) -> np.ndarray:
    out = np.empty((len(records), 2), dtype=np.float64)
    for i, rec in enumerate(records):
        if rec.position is None:
            raise DatasetError(f"{role} image {rec.path} has no position; distance ground truth needs one")
        out[i] = rec.position
    if not np.isfinite(out).all():
        bad = int(np.nonzero(~np.isfinite(out).all(axis=1))[0][0])
        rec = records[bad]
        raise DatasetError(f"{role} image {rec.path} has a non-finite position {rec.position}")
    return out


def _positives_distance(
    database: Sequence[ImageRecord], queries: Sequence[ImageRecord], radius: float
) -> list[np.ndarray]:
    db = _positions(database, "database")
    qs = _positions(queries, "query")
    result: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * len(qs)
    if len(db) == 0 or len(qs) == 0:
        return result
    # Uniform grid with cell size = radius: a query's neighbours lie in its 3x3 block of cells.
    # Queries are processed per cell, each cell's candidates with one broadcast distance computation.
    origin = np.minimum(db.min(axis=0), qs.min(axis=0))
    db_cell = np.floor((db - origin) / radius).astype(np.int64)
    q_cell = np.floor((qs - origin) / radius).astype(np.int64)
    buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, (cx, cy) in enumerate(db_cell.tolist()):
        buckets[(cx, cy)].append(i)
    bucket_arrays = {k: np.asarray(v, dtype=np.int64) for k, v in buckets.items()}
    q_groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, (cx, cy) in enumerate(q_cell.tolist()):
        q_groups[(cx, cy)].append(i)
    r2 = radius * radius
    for (cx, cy), q_idx in q_groups.items():
        parts = [bucket_arrays[c] for dx in (-1, 0, 1) for dy in (-1, 0, 1)
                 if (c := (cx + dx, cy + dy)) in bucket_arrays]
        if not parts:
            continue
        cand = np.sort(np.concatenate(parts))
        q_idx_arr = np.asarray(q_idx)
        d2 = ((qs[q_idx_arr, None, :] - db[None, cand, :]) ** 2).sum(axis=2)
        within = d2 <= r2
        for row, qi in enumerate(q_idx):
            result[qi] = cand[within[row]]
    return result


def _frame_indices(records: Sequence[ImageRecord], role: str) -> np.ndarray:
    out = np.empty(len(records), dtype=np.int64)
    for i, rec in enumerate(records):
        if rec.frame_index is None:
            raise DatasetError(f"{role} image {rec.path} has no frame index; frame ground truth needs one")
        out[i] = rec.frame_index
    return out


def _positives_frame(
    database: Sequence[ImageRecord], queries: Sequence[ImageRecord], tolerance: int
) -> list[np.ndarray]:
    db_frames = _frame_indices(database, "database")
    q_frames = _frame_indices(queries, "query")
    groups: dict[str | None, list[int]] = defaultdict(list)
    for i, rec in enumerate(database):
        groups[rec.sequence].append(i)
    index: dict[str | None, tuple[np.ndarray, np.ndarray]] = {}
    for seq, members in groups.items():
        members_arr = np.asarray(members, dtype=np.int64)
        order = np.argsort(db_frames[members_arr], kind="stable")
        index[seq] = (db_frames[members_arr][order], members_arr[order])
    result: list[np.ndarray] = []
    for rec, frame in zip(queries, q_frames, strict=True):
        if rec.sequence not in index:
            result.append(np.empty(0, dtype=np.int64))
            continue
        frames, members = index[rec.sequence]
        lo = np.searchsorted(frames, frame - tolerance, side="left")
        hi = np.searchsorted(frames, frame + tolerance, side="right")
        result.append(np.sort(members[lo:hi]))
    return result


def _positives_label(database: Sequence[ImageRecord], queries: Sequence[ImageRecord]) -> list[np.ndarray]:
    for role, records in (("database", database), ("query", queries)):
        for rec in records:
            if rec.label is None:
                raise DatasetError(f"{role} image {rec.path} has no label; label ground truth needs one")
    groups: dict[str, list[int]] = defaultdict(list)
    for i, rec in enumerate(database):
        groups[rec.label].append(i)  # type: ignore[index]
    arrays = {k: np.asarray(v, dtype=np.int64) for k, v in groups.items()}
    empty = np.empty(0, dtype=np.int64)
    return [arrays.get(rec.label, empty) for rec in queries]  # type: ignore[arg-type]


def _positives_pairs(database: Sequence[ImageRecord], queries: Sequence[ImageRecord],
                     pairs: dict[Path, frozenset[Path]]) -> list[np.ndarray]:
    index = {rec.path: i for i, rec in enumerate(database)}
    return [np.array(sorted(index[p] for p in pairs.get(rec.path, ()) if p in index), dtype=np.int64)
            for rec in queries]


def _exclusions(database: Sequence[ImageRecord], queries: Sequence[ImageRecord],
                gap: float) -> list[np.ndarray]:
    """Per query: its own record in the database (by identity) and, with ``gap`` > 0, the database
    records of its sequence whose stamps are less than ``gap`` seconds from its own."""
    ident = {id(r): i for i, r in enumerate(database)}
    index: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if gap > 0:
        by_seq: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(database):
            if r.sequence is not None and r.stamp is not None:
                by_seq[r.sequence].append(i)
        for seq, members in by_seq.items():
            arr = np.asarray(members, dtype=np.int64)
            stamps = np.asarray([database[i].stamp for i in arr], dtype=np.float64)
            order = np.argsort(stamps, kind="stable")
            index[seq] = (stamps[order], arr[order])
    out = []
    for q in queries:
        ex: list[int] = []
        if id(q) in ident:
            ex.append(ident[id(q)])
        if q.sequence in index and q.stamp is not None:
            stamps, members = index[q.sequence]
            lo = np.searchsorted(stamps, q.stamp - gap, side="right")
            hi = np.searchsorted(stamps, q.stamp + gap, side="left")
            ex.extend(members[lo:hi].tolist())
        out.append(np.unique(np.asarray(ex, dtype=np.int64)))
    return out


class PlaceSplit(Protocol):
    """How :meth:`PlaceDataset.split_by_place` cuts places (e.g. the training config's ``data.split``).

    Blocks of ``block`` frames (frame ground truth) or ``block`` metres (grid cells, otherwise); a block is
    validation when its number modulo ``val_every`` is ``val_offset``; training records within ``gap``
    frames / metres of a validation record are dropped."""

    block: float
    val_every: int
    val_offset: int
    gap: float


@dataclass
class PlaceDataset:
    """A database, its queries, the ground truth relating them, and what was skipped while loading.

    The records are shared, not copied, by the derived sets (:meth:`subset`, :meth:`subsample`,
    :meth:`split_by_place`); the relation (:meth:`positives`, :meth:`near`, :meth:`excluded`) is computed
    once on first use, so treat a set as immutable and derive a new one to change it. A single traverse
    (bags, a KITTI sequence) has the same list as ``database`` and ``queries``. ``title`` and ``notes``
    are for reports.
    """

    name: str
    database: list[ImageRecord]
    queries: list[ImageRecord]
    ground_truth: GroundTruth
    skipped: list[tuple[str, str]] = field(default_factory=list)
    title: str = ""
    notes: str = ""
    _relation: tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]] | None = field(
        default=None, init=False, repr=False, compare=False)

    def _related(self) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        if self._relation is None:
            self._relation = self.ground_truth.relate(self.database, self.queries)
        return self._relation

    def positives(self) -> list[np.ndarray]:
        """Per query, the sorted database indices that count as a correct match."""
        return self._related()[0]

    def near(self) -> list[np.ndarray]:
        """Per query, the sorted database indices that must not serve as its negatives."""
        return self._related()[1]

    def excluded(self) -> list[np.ndarray]:
        """Per query, the sorted database indices left out of retrieval (its own record, its traverse's
        neighbours in time); empty when database and queries are separate records."""
        return self._related()[2]

    def truth_matrix(self) -> np.ndarray:
        """``(len(queries), len(database))`` bool matrix of :meth:`positives`."""
        out = np.zeros((len(self.queries), len(self.database)), dtype=bool)
        for i, p in enumerate(self.positives()):
            out[i, p] = True
        return out

    def subset(self, *, queries: Sequence[int] | None = None, database: Sequence[int] | None = None,
               name: str | None = None) -> PlaceDataset:
        """The set restricted to some query / database indices (None: all), relation recomputed."""
        qs = self.queries if queries is None else [self.queries[int(i)] for i in queries]
        db = self.database if database is None else [self.database[int(i)] for i in database]
        out = replace(self, name=name or self.name, queries=qs, database=db, skipped=list(self.skipped))
        if database is None and queries is not None and self._relation is not None:
            # a query's relation depends only on it and the database: reuse the computed rows
            out._relation = tuple([part[int(i)] for i in queries] for part in self._relation)  # type: ignore[assignment]
        return out

    def subsample(self, every: int = 1, limit: int | None = None) -> PlaceDataset:
        """A smaller copy for quick runs: every ``every``-th database and query record, then at most
        ``limit`` of each. Positives are recomputed from the ground truth on what remains, so queries
        whose matches were cut away simply have none (evaluation excludes and counts them)."""
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be >= 1 or None, got {limit}")
        n_db, n_q = len(self.database[::every][:limit]), len(self.queries[::every][:limit])
        return self.subset(queries=range(0, n_q * every, every), database=range(0, n_db * every, every))

    def with_positive_queries(self, limit: int | None = None) -> PlaceDataset:
        """Only the queries that have a positive; at most ``limit`` of them, evenly spaced."""
        keep = [i for i, p in enumerate(self.positives()) if len(p) > 0]
        if limit is not None and len(keep) > limit:
            keep = [keep[int(j)] for j in np.linspace(0, len(keep) - 1, limit).round().astype(int)]
        return self.subset(queries=keep)

    def split_by_place(self, split: PlaceSplit) -> tuple[PlaceDataset, PlaceDataset]:
        """(train, val) by place: frame blocks (frame ground truth) or spatial grid cells (otherwise).

        Every record, query or database, goes to the side of its block; training records within
        ``split.gap`` of a validation record are dropped. Raises DatasetError when a side is left
        without a query that has a positive.
        """
        by_frame = self.ground_truth.kind == "frame"
        unit = "frames" if by_frame else "m"
        q_xy, d_xy = _split_coords(self.queries, by_frame), _split_coords(self.database, by_frame)
        q_val, d_val = _val_flags(q_xy, by_frame, split), _val_flags(d_xy, by_frame, split)
        val_xy = np.concatenate([q_xy[q_val], d_xy[d_val]])
        q_train = ~q_val & ~_near_any(q_xy, val_xy, split.gap)
        d_train = ~d_val & ~_near_any(d_xy, val_xy, split.gap)
        train = self.subset(queries=np.nonzero(q_train)[0], database=np.nonzero(d_train)[0],
                            name=f"{self.name}/train")
        val = self.subset(queries=np.nonzero(q_val)[0], database=np.nonzero(d_val)[0],
                          name=f"{self.name}/val")
        for side in (train, val):
            if not side.queries or not side.database or not any(len(p) for p in side.positives()):
                raise DatasetError(
                    f"{side.name}: the split (blocks of {split.block:g} {unit}, every {split.val_every}th "
                    f"from {split.val_offset}, gap {split.gap:g} {unit}) leaves {len(side.queries)} queries "
                    f"and {len(side.database)} database images with no usable positive pair; "
                    "change data.split"
                )
        return train, val

    def summary(self) -> str:
        """One line: name, sizes, ground truth, queries without a positive, skipped records by reason."""
        no_pos = sum(1 for p in self.positives() if len(p) == 0)
        text = (f"{self.name}: {len(self.database)} database, {len(self.queries)} queries, "
                f"ground truth {self.ground_truth.describe()}, {no_pos} queries without a positive")
        if self.skipped:
            reasons: dict[str, int] = defaultdict(int)
            for _, reason in self.skipped:
                reasons[reason.split(":")[0]] += 1
            text += ", skipped " + ", ".join(f"{n} {r}" for r, n in sorted(reasons.items()))
        return text


def _split_coords(records: Sequence[ImageRecord], by_frame: bool) -> np.ndarray:
    if by_frame:
        return np.asarray([r.frame_index for r in records], dtype=np.float64)
    return np.asarray([r.position for r in records], dtype=np.float64).reshape(-1, 2)


def _val_flags(coords: np.ndarray, by_frame: bool, split: PlaceSplit) -> np.ndarray:
    if by_frame:
        ids = np.floor_divide(coords.astype(np.int64), max(1, int(split.block)))
    else:
        cells = np.floor(coords / split.block).astype(np.int64)
        ids = np.abs(cells[:, 0] * 73856093 ^ cells[:, 1] * 19349663)  # spatial hash of the grid cell
    return (ids % split.val_every) == split.val_offset


def _near_any(points: np.ndarray, others: np.ndarray, gap: float) -> np.ndarray:
    """Per point, whether any of ``others`` lies within ``gap`` (1-D frames or 2-D positions)."""
    out = np.zeros(len(points), dtype=bool)
    if len(others) == 0 or len(points) == 0:
        return out
    if points.ndim == 1:
        srt = np.sort(others)
        j = (np.clip(np.searchsorted(srt, points), 1, len(srt) - 1) if len(srt) > 1
             else np.zeros(len(points), int))
        d = np.minimum(np.abs(points - srt[j]), np.abs(points - srt[np.maximum(j - 1, 0)]))
        return d <= gap
    for s in range(0, len(points), 2048):
        d2 = ((points[s : s + 2048, None, :] - others[None, :, :]) ** 2).sum(-1)
        out[s : s + 2048] = (d2 <= gap * gap).any(axis=1)
    return out


def require_nonempty(dataset: PlaceDataset, where: Path) -> PlaceDataset:
    """``dataset`` if it has database and query images, else DatasetError saying what the filters dropped."""
    for role, records in (("database", dataset.database), ("query", dataset.queries)):
        if records:
            continue
        why = ""
        if dataset.skipped:  # say what the filters dropped, e.g. Nordland summer's black first frames
            reasons: dict[str, int] = defaultdict(int)
            for _, reason in dict(dataset.skipped).items():  # a file listed once even if both roles read it
                reasons[reason.split(":")[0]] += 1
            path, reason = dataset.skipped[0]
            counts = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items()))
            why = (f": every selected frame was dropped ({counts}; the first, {display_path(path)}: "
                   f"{reason}); select other frames")
        raise DatasetError(f"{display_path(where)}: dataset {dataset.name!r} has no {role} images{why}")
    return dataset


# --------------------------------------------------------------------------- image folders, UTM names


def parse_utm_name(name: str) -> tuple[float, float]:
    """UTM (east, north) in metres from a gmberton/VPR-methods-evaluation file name.

    The format is ``@utm_east@utm_north@zone@letter@lat@lon@...@.jpg``: the name starts with ``@``
    and its first two ``@``-separated fields are finite numbers. Raises DatasetError otherwise.
    """
    base = Path(name).name
    fields = base.split("@")
    if len(fields) < 4 or fields[0] != "":
        raise DatasetError(f"{name!r}: not a '@utm_east@utm_north@zone@letter@...' file name")
    try:
        east, north = float(fields[1]), float(fields[2])
    except ValueError:
        raise DatasetError(
            f"{name!r}: UTM east/north fields {fields[1]!r}, {fields[2]!r} are not numbers") from None
    if not (math.isfinite(east) and math.isfinite(north)):
        raise DatasetError(f"{name!r}: UTM east/north must be finite, got {east}, {north}")
    return east, north


def positioned_records(root: Path, folders: Sequence[tuple[str, Path]], positions_csv: Path | None,
                       ) -> list[list[ImageRecord]]:
    """Records of the images in each ``(role, folder)``, with a position each and their index in the
    folder as frame index. Positions come from ``positions_csv`` (:func:`~.files.read_positions_csv`;
    keys are the path relative to ``root``, then the bare file name; lat/lon converted to metres), else
    from ``@utm_east@utm_north@...`` file names (:func:`parse_utm_name`)."""
    table, kind = read_positions_csv(positions_csv) if positions_csv is not None else ({}, "metric")
    files, coords = [], []
    for role, folder in folders:
        role_files = list_images(folder)
        if not role_files:
            raise DatasetError(f"{folder}: no images (.jpg/.jpeg/.png/.bmp); expected the {role} images")
        role_coords = []
        for p in role_files:
            if positions_csv is not None:
                rel = p.relative_to(root).as_posix()
                pos = table.get(rel, table.get(p.name))
                if pos is None:
                    raise DatasetError(f"{positions_csv}: no position for {rel} (keys are the file name or "
                                       f"the path relative to {root})")
            else:
                try:
                    pos = parse_utm_name(p.name)
                except DatasetError as exc:
                    raise DatasetError(f"{p}: no position: {exc}; name files @utm_east@utm_north@... or give "
                                       "a positions CSV") from None
            role_coords.append(pos)
        files.append(role_files)
        coords.append(role_coords)
    coords = to_metres(coords, kind, positions_csv if positions_csv is not None else root)
    return [[ImageRecord(path=p, name=p.name, position=xy, frame_index=i)
             for i, (p, xy) in enumerate(zip(fs, cs, strict=True))]
            for fs, cs in zip(files, coords, strict=True)]


def load_image_folder(
    root: str | Path,
    *,
    database: str = "database",
    queries: str = "queries",
    positions_csv: str | Path | None = None,
    radius_m: float = 25.0,
) -> PlaceDataset:
    """Load ``root/<database>/*`` and ``root/<queries>/*`` (jpg, jpeg, png, bmp) with distance ground truth.

    Positions as :func:`positioned_records` reads them: from ``positions_csv`` when given (a key column,
    ``name`` or ``path``, and a coordinate pair such as ``east,north``, ``x,y`` or ``lat,lon``), else from
    ``@utm_east@utm_north@...`` file names; every image needs a position.
    """
    root = require_dir(Path(root), "a dataset folder holding database/ and queries/ image folders")
    folders = [(role, require_dir(root / sub, f"the {role} images of {root}"))
               for role, sub in (("database", database), ("query", queries))]
    db, qs = positioned_records(root, folders, None if positions_csv is None else Path(positions_csv))
    ds = PlaceDataset(name=root.name, database=db, queries=qs,
                      ground_truth=GroundTruth("distance", radius_m=radius_m))
    return require_nonempty(ds, root)


# --------------------------------------------------------------------------- Nordland


def _is_dark(image: np.ndarray, threshold: float) -> bool:
    return float(image.mean()) < threshold


def load_nordland(
    root: str | Path,
    *,
    database_season: str = "summer",
    query_season: str = "winter",
    tolerance: int = 2,
    drop_dark: bool = True,
    drop_frozen: bool = True,
    dark_threshold: float = 3.0,
    every: int = 1,
    limit: int | None = None,
) -> PlaceDataset:
    """Nordland, one season as database and another as queries, frame-aligned by file name.

    ``frame_index`` is the rank of a file name in the (natural) sorted union of both seasons' names,
    so the same name is the same place; ground truth is ``|frame_index difference| <= tolerance``.
    ``every`` / ``limit`` pick places before filtering: frame indices divisible by ``every``, then the
    first ``limit`` of those. Filtering, each listed in ``skipped`` with its reason:

    * ``drop_dark``: near-black frames, mean intensity < ``dark_threshold`` (0-255). In the 64x32 copy
      these are summer's first 17 (mean 0.2); the darkest real frames (tunnels) have mean >= 6.
    * ``drop_frozen``: a frame pixel-identical to the previous frame of its season (the video stood
      still); the first of each run is kept. Winter's first 17 and last 15 frames are such runs.
    """
    root = require_dir(Path(root), "the Nordland folder holding one sub-folder per season")
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    seasons = {}
    for role, season in (("database", database_season), ("queries", query_season)):
        folder = require_dir(root / season, f"the {season} images of Nordland ({role})")
        files = {p.name: p for p in list_images(folder)}
        if not files:
            raise DatasetError(f"{folder}: no images; expected {season} frames such as images-00010.png")
        seasons[role] = files
    names = sorted(set(seasons["database"]) | set(seasons["queries"]), key=natural_key)
    frame_of = {n: i for i, n in enumerate(names)}
    chosen = [n for n in names if frame_of[n] % every == 0][:limit]
    skipped: list[tuple[str, str]] = []
    parts: dict[str, list[ImageRecord]] = {}
    for role, season in (("database", database_season), ("queries", query_season)):
        records: list[ImageRecord] = []
        previous: tuple[str, np.ndarray] | None = None
        for n in chosen:
            path = seasons[role].get(n)
            if path is None:
                continue
            if drop_dark or drop_frozen:
                image = load_image(path)
                if drop_dark and _is_dark(image, dark_threshold):
                    reason = f"dark: mean intensity {image.mean():.1f} < {dark_threshold:g}"
                    skipped.append((str(path), reason))
                    previous = (n, image)
                    continue
                if drop_frozen and previous is not None and np.array_equal(previous[1], image):
                    skipped.append((str(path), f"frozen: identical to {season}/{previous[0]}"))
                    continue
                previous = (n, image)
            records.append(ImageRecord(path=path, name=n, frame_index=frame_of[n], sequence=None))
        parts[role] = records
    ds = PlaceDataset(name=f"nordland_{database_season}_{query_season}", database=parts["database"],
                      queries=parts["queries"], ground_truth=GroundTruth("frame", tolerance=tolerance),
                      skipped=skipped)
    return require_nonempty(ds, root)


# --------------------------------------------------------------------------- IE tower

IE_TOWER_GT = ("area", "floor", "clip")
_IE_NAME = re.compile(r"^(?P<clip>.+)_frame_(?P<frame>\d+)\.[A-Za-z]+$")


def nordland_sample(root: str | Path, every: int = 3, max_places: int = 80) -> PlaceDataset:
    """Every ``every``-th Nordland place (summer map, winter queries), thinned further to about
    ``max_places`` places (the demo's graph run)."""
    total = len([p for p in (Path(root) / "summer").iterdir() if p.suffix.lower() == ".png"])
    return load_nordland(root, every=max(1, int(every), math.ceil(total / max(1, max_places))))


def load_ie_tower(
    root: str | Path,
    *,
    ground_truth: str = "area",
    tolerance: int = 1,
    csv_name: str = "dataset.csv",
    every: int = 1,
    limit: int | None = None,
) -> PlaceDataset:
    """IE tower (indoor office tower) from ``dataset.csv``: ``split`` gallery -> database, query -> queries.

    The data has no poses, only labels, so the ground truth is one of:

    * ``"area"`` (default): same floor (``label``) and same ``area`` (e.g. floor7/hallway). A place in
      this building is an area on a floor; floors look alike, so the same area on another floor is wrong.
    * ``"floor"``: same floor only (upstream's floor-classification metric; lenient).
    * ``"clip"``: same video clip and frame numbers (1 fps) within ``tolerance`` (strict, place-level).

    Queries and gallery come from the same videos 1 s apart, so this is an easy near-duplicate test.
    ``every`` / ``limit`` are applied as :meth:`PlaceDataset.subsample`.
    """
    if ground_truth not in IE_TOWER_GT:
        raise ValueError(f"unknown IE tower ground truth {ground_truth!r}; expected one of {IE_TOWER_GT}")
    root = require_dir(Path(root), "the IE tower folder holding dataset.csv and frames/")
    csv_path = require_file(root / csv_name, "the IE tower index (image_path,label,split,...,area,...)")
    required = ("image_path", "label", "split", "area")
    parts: dict[str, list[ImageRecord]] = {"gallery": [], "query": []}
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in required if c not in header]
        if missing:
            raise DatasetError(
                f"{csv_path}: header lacks columns {missing}; expected at least {list(required)}")
        col = {c: header.index(c) for c in required}
        for row in reader:
            line = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise DatasetError(f"{csv_path}, line {line}: {len(row)} fields, expected {len(header)}")
            rel, floor, split, area = (row[col[c]].strip() for c in required)
            if split not in parts:
                raise DatasetError(f"{csv_path}, line {line}: split {split!r}, expected 'gallery' or 'query'")
            if not (rel and floor and area):
                raise DatasetError(f"{csv_path}, line {line}: empty image_path, label or area")
            m = _IE_NAME.match(Path(rel).name)
            if m is None:
                raise DatasetError(f"{csv_path}, line {line}: file name {Path(rel).name!r} is not "
                                   "'<clip>_frame_<n>.jpg'")
            path = root / rel
            if not path.is_file():
                raise DatasetError(f"{csv_path}, line {line}: image {path} does not exist")
            clip = f"{floor}/{m['clip']}"
            label = {"area": f"{floor}/{area}", "floor": floor, "clip": clip}[ground_truth]
            parts[split].append(ImageRecord(path=path, name=Path(rel).name, frame_index=int(m["frame"]),
                                            label=label, sequence=clip))
    gt = (GroundTruth("frame", tolerance=tolerance) if ground_truth == "clip"
          else GroundTruth("label",
                           text={"area": "same floor and area", "floor": "same floor"}[ground_truth]))
    ds = PlaceDataset(name=f"ie_tower_{ground_truth}", database=parts["gallery"], queries=parts["query"],
                      ground_truth=gt)
    require_nonempty(ds, root)
    return ds.subsample(every, limit) if (every != 1 or limit is not None) else ds


# --------------------------------------------------------------------------- RTAB-Map loop, KITTI, Tokyo


def load_rtabmap_loop(root: str | Path) -> PlaceDataset:
    """RTAB-Map's loop-closure sequence as a single traverse: every frame is a database image and a query
    (``images/1.jpg`` ... in frame order), positives as ``gt_loop_matrix.txt`` lists them.

    The matrix is ``(N, N)`` 0/1 and lower-triangular: row i (newer frame) lists the older frames j it
    closes a loop with; :meth:`PlaceDataset.truth_matrix` gives it back as read (loop-closure scoring
    symmetrises it)."""
    root = require_dir(Path(root), "the rtabmap_loop folder holding images/ and gt_loop_matrix.txt")
    folder = require_dir(root / "images", "the sequence frames 1.jpg ... N.jpg")
    gt_path = require_file(root / "gt_loop_matrix.txt", "the N x N 0/1 loop-closure matrix")
    files = sorted((p for p in list_images(folder) if p.stem.isdigit()), key=lambda p: int(p.stem))
    if not files:
        raise DatasetError(f"{folder}: no images named by frame number (1.jpg, 2.jpg, ...)")
    rows = []
    for line_no, line in enumerate(gt_path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        tokens = line.split()
        if any(t not in ("0", "1") for t in tokens):
            raise DatasetError(f"{gt_path}, line {line_no}: values must be 0 or 1")
        rows.append([t == "1" for t in tokens])
    n = len(files)
    if len(rows) != n or any(len(r) != n for r in rows):
        raise DatasetError(f"{gt_path}: expected a {n} x {n} matrix (one row and column per image), got "
                           f"{len(rows)} rows of lengths {sorted({len(r) for r in rows})}")
    matrix = np.array(rows, dtype=bool)
    pairs = {files[i]: frozenset(files[j] for j in np.nonzero(matrix[i])[0]) for i in range(n)}
    records = [ImageRecord(path=p, name=p.name, frame_index=i) for i, p in enumerate(files)]
    return PlaceDataset(name="rtabmap_loop", database=records, queries=records,
                        ground_truth=GroundTruth("pairs", pairs=pairs, text="RTAB-Map's loop matrix"))


def rtabmap_revisit(ds: PlaceDataset) -> PlaceDataset:
    """The corridor sequence as a map and its revisit (the study's recall split): frames 1 .. N/2 - 2
    (1-40 of 84) are the database, the rest (41-84, the second pass) the queries."""
    n = len(ds.database)
    half = n // 2 - 2
    return ds.subset(database=range(half), queries=range(half, n))


def load_kitti(root: str | Path, sequence: str = "00", *, radius_m: float = 10.0) -> PlaceDataset:
    """KITTI odometry frames ``root/<sequence>/image_0/*`` as a single traverse (every frame a database
    image and a query; positives within ``radius_m``, the query's own frame excluded), with planar
    positions ``(x, z)`` of each camera pose translation (metres, frame-0 camera coordinates).

    Poses are read from the first file found of ``root/<sequence>/poses_official_first300.txt``,
    ``root/<sequence>/poses.txt``, ``root/poses/<sequence>.txt``; line i is frame i (12 floats,
    row-major 3x4 [R|t])."""
    root = require_dir(Path(root), "the KITTI odometry folder holding one sub-folder per sequence")
    seq_dir = require_dir(root / sequence, f"KITTI sequence {sequence} (image_0/ and a poses file)")
    folder = require_dir(seq_dir / "image_0", f"the left grey camera frames of sequence {sequence}")
    candidates = [seq_dir / "poses_official_first300.txt", seq_dir / "poses.txt",
                  root / "poses" / f"{sequence}.txt"]
    pose_path = next((p for p in candidates if p.is_file()), None)
    if pose_path is None:
        raise DatasetError(f"{seq_dir}: no poses file; expected one of {[str(p) for p in candidates]}")
    positions = []
    for line_no, line in enumerate(pose_path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            values = [float(v) for v in line.split()]
        except ValueError:
            raise DatasetError(f"{pose_path}, line {line_no}: not a list of numbers") from None
        if len(values) != 12:
            raise DatasetError(f"{pose_path}, line {line_no}: {len(values)} values, expected 12 (3x4 pose)")
        positions.append((values[3], values[11]))
    files = sorted((p for p in list_images(folder) if p.stem.isdigit()), key=lambda p: int(p.stem))
    if not files:
        raise DatasetError(f"{folder}: no frames named by number (000000.png, ...)")
    records = []
    for p in files:
        i = int(p.stem)
        if i >= len(positions):
            raise DatasetError(f"{pose_path}: {len(positions)} poses, no pose for frame {p.name}")
        records.append(ImageRecord(path=p, name=p.name, position=positions[i], frame_index=i,
                                   sequence=sequence))
    return PlaceDataset(name=f"kitti{sequence}", database=records, queries=records,
                        ground_truth=GroundTruth("distance", radius_m=radius_m))


def load_tokyo_pair(root: str | Path) -> PlaceDataset:
    """The Tokyo 24/7 pair: ``db_tokyo.jpg`` (database) and ``query_tokyo.jpg``, each other's match."""
    root = require_dir(Path(root), "the tokyo_pair folder holding db_tokyo.jpg and query_tokyo.jpg")
    db = require_file(root / "db_tokyo.jpg", "the Tokyo 24/7 database image")
    q = require_file(root / "query_tokyo.jpg", "the Tokyo 24/7 query image")
    return PlaceDataset(name="tokyo_pair", database=[ImageRecord(path=db, name=db.name)],
                        queries=[ImageRecord(path=q, name=q.name)],
                        ground_truth=GroundTruth("pairs", pairs={q: frozenset({db})},
                                                 text="one positive pair"))


# --------------------------------------------------------------------------- dispatch

_LOADERS = {"nordland": load_nordland, "ie_tower": load_ie_tower, "folder": load_image_folder}


def load_dataset(name_or_path: str, root: str | Path, **kw) -> PlaceDataset:
    """Load a dataset by kind: ``"nordland"``, ``"ie_tower"`` or ``"folder"`` (an image folder) at ``root``;
    keyword arguments go to the loader. Raises DatasetError for an unknown kind."""
    key = str(name_or_path).strip().lower().replace("-", "_")
    key = {"ietower": "ie_tower", "image_folder": "folder"}.get(key, key)
    if key not in _LOADERS:
        raise DatasetError(f"unknown dataset {name_or_path!r}; expected one of {sorted(_LOADERS)}")
    return _LOADERS[key](root, **kw)
