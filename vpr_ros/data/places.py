"""Place-recognition datasets: image records, ground truth, and loaders for the supported layouts.

A :class:`PlaceDataset` is a database (the map) and a set of queries, plus a :class:`GroundTruth`
that decides which database images count as a correct match for each query. Loaders never
read pixels except where a dataset needs it (Nordland's dark / frozen frame filter); images
are read later with :meth:`ImageRecord.load`.

Loaders for the shared development data (see ``shared/README.md``): :func:`load_nordland`,
:func:`load_ie_tower`, :func:`load_rtabmap_loop`, :func:`load_kitti`; and
:func:`load_image_folder` for any ``database/`` + ``queries/`` folder with UTM or CSV positions.
"""

from __future__ import annotations

import csv
import math
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from vpr_ros.core.errors import DatasetError
from vpr_ros.core.fileio import display_path
from vpr_ros.core.images import load_image

#: File suffixes treated as images by the folder loaders (case-insensitive).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")

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
    """How a query's true database matches are decided: by distance (metres) or by frame-index tolerance.

    * ``"distance"``: database images within ``radius_m`` (Euclidean, planar ``position``) of the query.
    * ``"frame"``: database images of the same ``sequence`` with ``|frame_index - query's| <= tolerance``.
    * ``"label"``: database images with the same ``label`` as the query (place classes, e.g. IE tower).
    * ``"pairs"``: the database images listed for the query in ``pairs`` (query path -> database paths),
      as in VPR-Bench's ground-truth files.
    """

    kind: str
    radius_m: float = 25.0
    tolerance: int = 2
    pairs: dict[Path, frozenset[Path]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in GT_KINDS:
            raise ValueError(f"unknown ground-truth kind {self.kind!r}; expected one of {GT_KINDS}")
        if self.kind == "distance" and not (math.isfinite(self.radius_m) and self.radius_m > 0):
            raise ValueError(f"radius_m must be a positive finite number, got {self.radius_m}")
        if self.kind == "frame" and (int(self.tolerance) != self.tolerance or self.tolerance < 0):
            raise ValueError(f"tolerance must be a non-negative integer, got {self.tolerance}")
        if self.kind == "pairs" and self.pairs is None:
            raise ValueError("pairs ground truth needs the pairs mapping (query path -> database paths)")

    def describe(self) -> str:
        """Short human-readable form, e.g. ``"distance <= 25 m"``."""
        if self.kind == "distance":
            return f"distance <= {self.radius_m:g} m"
        if self.kind == "frame":
            return f"frame index +/-{self.tolerance}"
        if self.kind == "pairs":
            return "listed pairs"
        return "same label"

    def positives(self, database: Sequence[ImageRecord], queries: Sequence[ImageRecord]) -> list[np.ndarray]:
        """Per query, the sorted database indices (int64) that count as a correct match."""
        if self.kind == "distance":
            return _positives_distance(database, queries, float(self.radius_m))
        if self.kind == "frame":
            return _positives_frame(database, queries, int(self.tolerance))
        if self.kind == "pairs":
            return _positives_pairs(database, queries, self.pairs or {})
        return _positives_label(database, queries)


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


@dataclass
class PlaceDataset:
    """A database, its queries, the ground truth relating them, and what was skipped while loading."""

    name: str
    database: list[ImageRecord]
    queries: list[ImageRecord]
    ground_truth: GroundTruth
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def positives(self) -> list[np.ndarray]:
        """Per query, the sorted database indices that count as correct."""
        return self.ground_truth.positives(self.database, self.queries)

    def subset(self, every: int = 1, limit: int | None = None) -> PlaceDataset:
        """A smaller copy for quick runs: every ``every``-th database and query record, then at most
        ``limit`` of each. Positives are recomputed from the ground truth on what remains, so queries
        whose matches were cut away simply have none (evaluation excludes and counts them)."""
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be >= 1 or None, got {limit}")
        return replace(
            self,
            database=self.database[::every][:limit],
            queries=self.queries[::every][:limit],
            skipped=list(self.skipped),
        )

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


def _require_nonempty(dataset: PlaceDataset, where: Path) -> PlaceDataset:
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


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{path}: missing folder; expected {what}")
    return path


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DatasetError(f"{path}: missing file; expected {what}")
    return path


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _natural_key(name: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


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


#: Accepted CSV headers of :func:`load_image_folder`: a key column and a pair of coordinate columns.
CSV_KEY_COLUMNS = ("name", "path")
CSV_COORD_COLUMNS = (("east", "north"), ("utm_east", "utm_north"), ("x", "y"))


def _read_positions_csv(path: Path) -> dict[str, tuple[float, float]]:
    """Read ``key -> (east, north)`` from a positions CSV (see :func:`load_image_folder`)."""
    _require_file(path, "a positions CSV with columns name,east,north or path,x,y")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise DatasetError(f"{path}: empty positions CSV; expected a header such as name,east,north")
        cols = [h.strip().lower() for h in header]
        key_col = next((cols.index(k) for k in CSV_KEY_COLUMNS if k in cols), None)
        coord = next(((cols.index(a), cols.index(b)) for a, b in CSV_COORD_COLUMNS
                      if a in cols and b in cols), None)
        if key_col is None or coord is None:
            raise DatasetError(
                f"{path}: header {header} not understood; expected a key column (name or path) and "
                "coordinate columns (east,north / utm_east,utm_north / x,y)")
        table: dict[str, tuple[float, float]] = {}
        for row in reader:
            line = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(cols):
                raise DatasetError(
                    f"{path}, line {line}: {len(row)} fields, expected {len(cols)} like the header")
            key = row[key_col].strip().replace("\\", "/")
            try:
                xy = (float(row[coord[0]]), float(row[coord[1]]))
            except ValueError:
                raise DatasetError(f"{path}, line {line}: coordinates {row[coord[0]]!r}, {row[coord[1]]!r} "
                                   "are not numbers") from None
            if not (key and math.isfinite(xy[0]) and math.isfinite(xy[1])):
                raise DatasetError(f"{path}, line {line}: empty key or non-finite coordinates")
            if key in table:
                raise DatasetError(f"{path}, line {line}: {key!r} listed twice")
            table[key] = xy
    return table


def load_image_folder(
    root: str | Path,
    *,
    database: str = "database",
    queries: str = "queries",
    positions_csv: str | Path | None = None,
    radius_m: float = 25.0,
) -> PlaceDataset:
    """Load ``root/<database>/*`` and ``root/<queries>/*`` (jpg, jpeg, png, bmp) with distance ground truth.

    Positions come from ``positions_csv`` when given, else from ``@utm_east@utm_north@...`` file names
    (:func:`parse_utm_name`). The CSV has a header row with a key column, ``name`` or ``path``, and a
    coordinate pair, ``east,north``, ``utm_east,utm_north`` or ``x,y`` (metres; extra columns ignored,
    header case-insensitive). A key is matched first as the path relative to ``root`` (e.g.
    ``database/img1.jpg``), then as the bare file name; every image needs a position.
    """
    root = _require_dir(Path(root), "a dataset folder holding database/ and queries/ image folders")
    table = _read_positions_csv(Path(positions_csv)) if positions_csv is not None else None
    parts: dict[str, list[ImageRecord]] = {}
    for role, sub in (("database", database), ("queries", queries)):
        folder = _require_dir(root / sub, f"the {role} images of {root}")
        records = []
        for p in _list_images(folder):
            if table is not None:
                rel = p.relative_to(root).as_posix()
                pos = table.get(rel, table.get(p.name))
                if pos is None:
                    raise DatasetError(f"{positions_csv}: no position for {rel} (keys are the file name or "
                                       "the path relative to the dataset root)")
            else:
                try:
                    pos = parse_utm_name(p.name)
                except DatasetError as e:
                    raise DatasetError(f"{p}: no position: {e}; name files @utm_east@utm_north@... "
                                       "or pass positions_csv") from None
            records.append(ImageRecord(path=p, name=p.name, position=pos))
        parts[role] = records
    ds = PlaceDataset(name=root.name, database=parts["database"], queries=parts["queries"],
                      ground_truth=GroundTruth("distance", radius_m=radius_m))
    return _require_nonempty(ds, root)


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
    root = _require_dir(Path(root), "the Nordland folder holding one sub-folder per season")
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    seasons = {}
    for role, season in (("database", database_season), ("queries", query_season)):
        folder = _require_dir(root / season, f"the {season} images of Nordland ({role})")
        files = {p.name: p for p in _list_images(folder)}
        if not files:
            raise DatasetError(f"{folder}: no images; expected {season} frames such as images-00010.png")
        seasons[role] = files
    names = sorted(set(seasons["database"]) | set(seasons["queries"]), key=_natural_key)
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
    return _require_nonempty(ds, root)


# --------------------------------------------------------------------------- IE tower

IE_TOWER_GT = ("area", "floor", "clip")
_IE_NAME = re.compile(r"^(?P<clip>.+)_frame_(?P<frame>\d+)\.[A-Za-z]+$")


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
    ``every`` / ``limit`` are applied as :meth:`PlaceDataset.subset`.
    """
    if ground_truth not in IE_TOWER_GT:
        raise ValueError(f"unknown IE tower ground truth {ground_truth!r}; expected one of {IE_TOWER_GT}")
    root = _require_dir(Path(root), "the IE tower folder holding dataset.csv and frames/")
    csv_path = _require_file(root / csv_name, "the IE tower index (image_path,label,split,...,area,...)")
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
    gt = GroundTruth("frame", tolerance=tolerance) if ground_truth == "clip" else GroundTruth("label")
    ds = PlaceDataset(name=f"ie_tower_{ground_truth}", database=parts["gallery"], queries=parts["query"],
                      ground_truth=gt)
    _require_nonempty(ds, root)
    return ds.subset(every, limit) if (every != 1 or limit is not None) else ds


# --------------------------------------------------------------------------- RTAB-Map loop closure, KITTI


def load_rtabmap_loop(root: str | Path) -> tuple[list[ImageRecord], np.ndarray]:
    """RTAB-Map's loop-closure sequence: records in frame order (``images/1.jpg`` ...) and the
    ``(N, N)`` bool ground-truth matrix (``gt[i, j]``: frame i closes a loop with frame j)."""
    root = _require_dir(Path(root), "the rtabmap_loop folder holding images/ and gt_loop_matrix.txt")
    folder = _require_dir(root / "images", "the sequence frames 1.jpg ... N.jpg")
    gt_path = _require_file(root / "gt_loop_matrix.txt", "the N x N 0/1 loop-closure matrix")
    files = [p for p in _list_images(folder) if p.stem.isdigit()]
    files.sort(key=lambda p: int(p.stem))
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
    records = [ImageRecord(path=p, name=p.name, frame_index=i) for i, p in enumerate(files)]
    return records, np.array(rows, dtype=bool)


def load_kitti(root: str | Path, sequence: str = "00") -> list[ImageRecord]:
    """KITTI odometry frames ``root/<sequence>/image_0/*`` with planar positions ``(x, z)`` of each camera
    pose translation (metres, frame-0 camera coordinates). Poses are read from the first file found of
    ``root/<sequence>/poses_official_first300.txt``, ``root/<sequence>/poses.txt``,
    ``root/poses/<sequence>.txt``; line i is frame i (12 floats, row-major 3x4 [R|t])."""
    root = _require_dir(Path(root), "the KITTI odometry folder holding one sub-folder per sequence")
    seq_dir = _require_dir(root / sequence, f"KITTI sequence {sequence} (image_0/ and a poses file)")
    folder = _require_dir(seq_dir / "image_0", f"the left grey camera frames of sequence {sequence}")
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
    files = [p for p in _list_images(folder) if p.stem.isdigit()]
    files.sort(key=lambda p: int(p.stem))
    if not files:
        raise DatasetError(f"{folder}: no frames named by number (000000.png, ...)")
    records = []
    for p in files:
        i = int(p.stem)
        if i >= len(positions):
            raise DatasetError(f"{pose_path}: {len(positions)} poses, no pose for frame {p.name}")
        records.append(ImageRecord(path=p, name=p.name, position=positions[i], frame_index=i,
                                   sequence=sequence))
    return records


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
