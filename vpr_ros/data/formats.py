"""Readers for the place-recognition data formats users already have, each giving a :class:`PlaceDataset`.

==============  ===================================================================  ==================
format          layout under ``root``                                                ground truth
==============  ===================================================================  ==================
``vprbench``    ``ref/``, ``query/``, ``ground_truth_new.npy`` (or ``.json``/``.csv``)  listed pairs
``aligned``     two image folders whose sorted files correspond one to one           frame +/- tolerance
``positions``   two image folders + ``positions.csv`` or ``@utm_e@utm_n@...`` names     distance <= radius
``msls``        one Mapillary SLS city: ``{database,query}/images/<key>.jpg`` + CSVs   distance <= radius
==============  ===================================================================  ==================

The two image folders of ``aligned`` and ``positions`` are the first pair present of
:data:`FOLDER_PAIRS` (database first). Images are the files with an image suffix directly in a
folder, in numeric-aware name order (``2.jpg`` before ``10.jpg``); that order is each image's index.
Every reader raises :class:`DatasetError` with one line naming the file and the reason for a
malformed set. docs/evaluation.md shows an example tree and command for each format.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from vpr_ros.core.errors import DatasetError
from vpr_ros.core.safe_npy import load_npy
from vpr_ros.data.places import (
    IMAGE_SUFFIXES,
    GroundTruth,
    ImageRecord,
    PlaceDataset,
    _list_images,
    _natural_key,
    _require_dir,
    _require_file,
    _require_nonempty,
    parse_utm_name,
)

log = logging.getLogger(__name__)

#: Format names accepted by :func:`load_format` (``vpr-ros eval --format``).
FORMATS = ("vprbench", "aligned", "positions", "msls")

#: (database, queries) folder names looked for, in this order, by ``aligned`` and ``positions``.
FOLDER_PAIRS = (("ref", "query"), ("database", "queries"), ("database", "query"), ("db", "queries"))

#: Ground-truth files of the ``vprbench`` format, the first present is read.
VPRBENCH_GT_FILES = ("ground_truth_new.npy", "ground_truth.json", "ground_truth.csv")

#: Default radius (metres) of the distance ground truth, as in Pitts30k, MSLS and Tokyo 24/7.
DEFAULT_RADIUS_M = 25.0
#: Default frame tolerance of ``aligned``.
DEFAULT_TOLERANCE = 2

#: Mean Earth radius (IUGG, metres), for latitude/longitude to local metres.
EARTH_RADIUS_M = 6_371_008.8

#: CSV column names: image key, metric coordinate pairs, geographic pairs (lower-case).
KEY_COLUMNS = ("name", "path", "key", "file", "image")
METRIC_COLUMNS = (("x", "y"), ("east", "north"), ("easting", "northing"), ("utm_east", "utm_north"))
GEO_COLUMNS = (("lat", "lon"), ("latitude", "longitude"), ("lat", "lng"))


# --------------------------------------------------------------------------- shared helpers


def _images(folder: Path) -> list[Path]:
    try:
        files = _list_images(folder)
    except OSError as exc:  # unreadable folder
        raise DatasetError(f"{folder}: cannot list images ({exc.strerror or exc})") from None
    return sorted(files, key=lambda p: _natural_key(p.name))


def find_folders(root: Path) -> tuple[Path, Path]:
    """The (database, queries) folders of ``root``: the first pair of :data:`FOLDER_PAIRS` present."""
    root = _require_dir(Path(root), "a dataset folder")
    for db, q in FOLDER_PAIRS:
        if (root / db).is_dir() and (root / q).is_dir():
            return root / db, root / q
    names = ", ".join(f"{db}/ + {q}/" for db, q in FOLDER_PAIRS)
    raise DatasetError(f"{root}: no database and query folders; expected one of {names}")


def _records(files: Iterable[Path]) -> list[ImageRecord]:
    return [ImageRecord(path=p, name=p.name, frame_index=i) for i, p in enumerate(files)]


def _nonempty_folder(folder: Path, role: str) -> list[Path]:
    files = _images(folder)
    if not files:
        raise DatasetError(f"{folder}: no images (.jpg/.jpeg/.png/.bmp); expected the {role} images")
    return files


# --------------------------------------------------------------------------- VPR-Bench


def load_vprbench(root: str | Path, *, ground_truth: str | Path | None = None) -> PlaceDataset:
    """VPR-Bench: ``root/ref/`` (database), ``root/query/`` and a list of correct matches per query.

    The list is ``ground_truth`` when given, else the first of :data:`VPRBENCH_GT_FILES` in ``root``:

    * ``.npy``: VPR-Bench's object array, one row ``[query_index, [ref_indices]]`` per query (a scalar
      ref index is also accepted), read without unpickling (:func:`vpr_ros.core.safe_npy.load_npy`);
    * ``.json``: a list of ``[query_index, [ref_indices]]`` rows, or an object
      ``{"query_index": [ref_indices]}``;
    * ``.csv``: a header with a ``query`` and a ``ref`` column (also ``query_index``, ``refs``,
      ``ref_indices``, ``positives``); a ref cell holds indices separated by spaces, ``;`` or ``,``;
      several rows of one query add up.

    Indices count images in numeric-aware name order (``0.jpg``, ``1.jpg``, ..., ``10.jpg``). A query
    listed with no refs, or not listed, has no positive (evaluation excludes and counts it).
    """
    root = _require_dir(Path(root), "a VPR-Bench folder holding ref/, query/ and ground_truth_new.npy")
    db_dir = _require_dir(root / "ref", "the VPR-Bench reference (database) images")
    q_dir = _require_dir(root / "query", "the VPR-Bench query images")
    if ground_truth is not None:
        gt_path = _require_file(Path(ground_truth), "a ground-truth file (.npy, .json or .csv)")
    else:
        gt_path = next((root / n for n in VPRBENCH_GT_FILES if (root / n).is_file()), None)
        if gt_path is None:
            raise DatasetError(f"{root}: no ground truth; expected one of {', '.join(VPRBENCH_GT_FILES)}")
    db_files = _nonempty_folder(db_dir, "reference")
    q_files = _nonempty_folder(q_dir, "query")
    table = read_pairs(gt_path)
    pairs: dict[Path, frozenset[Path]] = {}
    for q, refs in table.items():
        if not 0 <= q < len(q_files):
            raise DatasetError(f"{gt_path}: query index {q} out of range ({q_dir} has {len(q_files)} images)")
        bad = [r for r in refs if not 0 <= r < len(db_files)]
        if bad:
            raise DatasetError(f"{gt_path}: query {q}: reference index {bad[0]} out of range ({db_dir} has "
                               f"{len(db_files)} images)")
        pairs[q_files[q]] = frozenset(db_files[r] for r in refs)
    ds = PlaceDataset(name=root.name, database=_records(db_files), queries=_records(q_files),
                      ground_truth=GroundTruth("pairs", pairs=pairs))
    return _require_nonempty(ds, root)


def read_pairs(path: str | Path) -> dict[int, set[int]]:
    """``query index -> reference indices`` from a VPR-Bench ground-truth file (.npy, .json or .csv).

    Ranges are not checked here (:func:`load_vprbench` does, knowing the folders)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        arr = load_npy(path)
        if not (arr.ndim == 1 or (arr.ndim == 2 and arr.shape[1] == 2)):
            raise DatasetError(f"{path}: array of shape {arr.shape}; expected rows "
                               "[query_index, [ref_indices]]")
        return _pairs_from_rows(path, arr if arr.ndim == 1 else [tuple(r) for r in arr])
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DatasetError(f"{path}: not valid JSON ({exc})") from None
        if isinstance(data, dict):
            rows = []
            for key, refs in data.items():
                try:
                    rows.append((int(key), refs))
                except ValueError:
                    raise DatasetError(f"{path}: key {key!r} is not a query index") from None
            return _pairs_from_rows(path, rows)
        if isinstance(data, list):
            return _pairs_from_rows(path, data)
        raise DatasetError(f"{path}: expected a list of [query_index, [ref_indices]] or an object")
    if suffix == ".csv":
        return _pairs_from_csv(path)
    raise DatasetError(f"{path}: unknown ground-truth file type {suffix!r}; expected .npy, .json or .csv")


def _index(value: Any) -> int | None:
    """``value`` as a non-negative-or-any int if it is an integer (not bool, not a fractional float)."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    return None


def _pairs_from_rows(path: Path, rows: Iterable[Any]) -> dict[int, set[int]]:
    table: dict[int, set[int]] = defaultdict(set)
    for i, row in enumerate(rows):
        if isinstance(row, np.ndarray):
            row = row.tolist() if row.dtype != object else list(row)
        if not isinstance(row, (list, tuple)) or len(row) != 2:
            raise DatasetError(f"{path}: entry {i} is {_short(row)}; expected [query_index, [ref_indices]]")
        q = _index(row[0])
        if q is None:
            raise DatasetError(f"{path}: entry {i}: query index {_short(row[0])} is not an integer")
        refs = row[1]
        if isinstance(refs, np.ndarray):
            refs = refs.reshape(-1).tolist()
        elif not isinstance(refs, (list, tuple)):
            refs = [refs]
        listed = table[q]  # a query listed without refs stays listed, with no positive
        for r in refs:
            ri = _index(r)
            if ri is None:
                raise DatasetError(f"{path}: entry {i} (query {q}): reference index {_short(r)} is not "
                                   "an integer")
            listed.add(ri)
    return dict(table)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


_SPLIT = re.compile(r"[\s;,|]+")


def _pairs_from_csv(path: Path) -> dict[int, set[int]]:
    table: dict[int, set[int]] = defaultdict(set)
    with _open_csv(path) as (reader, cols, header):
        q_col = _column(cols, ("query", "query_index", "query_id"))
        r_col = _column(cols, ("ref", "refs", "ref_index", "ref_indices", "reference", "positives"))
        if q_col is None or r_col is None:
            raise DatasetError(f"{path}: header {header} lacks a query column (query, query_index) and a ref "
                               "column (ref, refs, ref_indices, positives)")
        for line, row in _rows(reader, path, len(cols)):
            try:
                q = int(row[q_col].strip())
                refs = [int(t) for t in _SPLIT.split(row[r_col].strip()) if t]
            except ValueError:
                raise DatasetError(f"{path}, line {line}: query {row[q_col]!r} or refs {row[r_col]!r} "
                                   "are not integer indices") from None
            table[q].update(refs)
    return dict(table)


# --------------------------------------------------------------------------- CSV plumbing


@contextlib.contextmanager
def _open_csv(path: Path) -> Iterator[tuple[Any, list[str], list[str]]]:
    """``with _open_csv(path) as (reader, lower-case columns, header)``; errors name the file."""
    _require_file(path, "a CSV file with a header row")
    try:
        f = open(path, newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read CSV ({exc.strerror or exc})") from None
    with f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
        except (UnicodeDecodeError, csv.Error) as exc:
            raise DatasetError(f"{path}: cannot read CSV ({exc})") from None
        if not header:
            raise DatasetError(f"{path}: empty CSV; expected a header row")
        yield reader, [h.strip().lower() for h in header], header


def _column(cols: list[str], names: Iterable[str]) -> int | None:
    return next((cols.index(n) for n in names if n in cols), None)


def _rows(reader: Any, path: Path, width: int) -> Iterable[tuple[int, list[str]]]:
    try:
        for row in reader:
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != width:
                raise DatasetError(f"{path}, line {reader.line_num}: {len(row)} fields, expected {width} "
                                   "like the header")
            yield reader.line_num, row
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path}, line {reader.line_num}: cannot read CSV ({exc})") from None


def read_positions_csv(path: str | Path) -> tuple[dict[str, tuple[float, float]], str]:
    """``key -> (a, b)`` and the kind, ``"metric"`` (x/east, y/north in metres) or ``"geo"`` (lat, lon
    in degrees), from a CSV with a header: a key column (:data:`KEY_COLUMNS`) and one coordinate pair
    (:data:`METRIC_COLUMNS` preferred over :data:`GEO_COLUMNS`). Keys use ``/`` separators."""
    path = Path(path)
    with _open_csv(path) as (reader, cols, header):
        key_col = _column(cols, KEY_COLUMNS)
        pair = next(((cols.index(a), cols.index(b), "metric") for a, b in METRIC_COLUMNS
                     if a in cols and b in cols), None)
        pair = pair or next(((cols.index(a), cols.index(b), "geo") for a, b in GEO_COLUMNS
                             if a in cols and b in cols), None)
        if key_col is None or pair is None:
            raise DatasetError(
                f"{path}: header {header} lacks columns; expected a key ({', '.join(KEY_COLUMNS)}) and "
                "coordinates (x,y / east,north / easting,northing / utm_east,utm_north in metres, "
                "or lat,lon)")
        a_col, b_col, kind = pair
        table: dict[str, tuple[float, float]] = {}
        for line, row in _rows(reader, path, len(cols)):
            key = row[key_col].strip().replace("\\", "/")
            try:
                a, b = float(row[a_col]), float(row[b_col])
            except ValueError:
                raise DatasetError(f"{path}, line {line}: coordinates {row[a_col]!r}, {row[b_col]!r} are not "
                                   "numbers") from None
            if not key:
                raise DatasetError(f"{path}, line {line}: empty {cols[key_col]}")
            if not (math.isfinite(a) and math.isfinite(b)):
                raise DatasetError(f"{path}, line {line}: coordinates {a}, {b} are not finite")
            if kind == "geo" and not (-90.0 <= a <= 90.0 and -180.0 <= b <= 360.0):
                raise DatasetError(f"{path}, line {line}: latitude {a} / longitude {b} out of range")
            if key in table:
                raise DatasetError(f"{path}, line {line}: {key!r} listed twice")
            table[key] = (a, b)
    return table, kind


def latlon_to_local(lat: np.ndarray, lon: np.ndarray, origin: tuple[float, float] | None = None,
                    ) -> tuple[np.ndarray, tuple[float, float]]:
    """Degrees to metres (east, north) about ``origin`` (default: the points' mean, longitudes averaged
    on the circle), by the local equirectangular projection ``east = R cos(lat0) dlon``,
    ``north = R dlat`` with R the mean Earth radius and ``dlon`` wrapped to [-180, 180).

    Distances within a few kilometres of the origin agree with the haversine distance to well under
    0.1 % (test/test_formats.py checks both); returns the positions and the origin used."""
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    if origin is None:
        rad = np.radians(lon)
        lon0 = float(np.degrees(np.arctan2(np.sin(rad).mean(), np.cos(rad).mean())))
        origin = (float(lat.mean()), lon0)
    lat0, lon0 = origin
    dlon = (lon - lon0 + 180.0) % 360.0 - 180.0
    east = EARTH_RADIUS_M * math.cos(math.radians(lat0)) * np.radians(dlon)
    north = EARTH_RADIUS_M * np.radians(lat - lat0)
    return np.stack([east, north], axis=1), origin


def haversine_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in metres on the mean-radius sphere."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(h)))


def _to_metres(groups: list[list[tuple[float, float]]], kind: str,
               where: Path) -> list[list[tuple[float, float]]]:
    """Planar metres for each group of (a, b) coordinates: metric ones as they are, lat/lon projected
    about one origin shared by all groups (so database and queries stay comparable)."""
    if kind == "metric":
        return groups
    flat = np.array([p for g in groups for p in g], dtype=np.float64).reshape(-1, 2)
    xy, origin = latlon_to_local(flat[:, 0], flat[:, 1])
    span = float(np.ptp(xy, axis=0).max()) if len(xy) else 0.0
    log.info("%s: lat/lon converted to metres east/north of %.6f, %.6f (span %.1f km)",
             where, origin[0], origin[1], span / 1000)
    if span > 200_000:
        log.warning("%s: positions span %.0f km; the local projection is meant for one city or region",
                    where, span / 1000)
    out, i = [], 0
    for g in groups:
        out.append([(float(x), float(y)) for x, y in xy[i:i + len(g)]])
        i += len(g)
    return out


# --------------------------------------------------------------------------- aligned traverses


def load_aligned(root: str | Path, *, tolerance: int = DEFAULT_TOLERANCE) -> PlaceDataset:
    """Two traverses whose sorted files correspond: the i-th database image and the i-th query are the
    same place. Ground truth: ``|i - j| <= tolerance`` frames. Both folders must hold as many images."""
    db_dir, q_dir = find_folders(Path(root))
    if int(tolerance) != tolerance or tolerance < 0:
        raise DatasetError(f"tolerance must be a non-negative integer number of frames, got {tolerance}")
    db_files = _nonempty_folder(db_dir, "database")
    q_files = _nonempty_folder(q_dir, "query")
    if len(db_files) != len(q_files):
        raise DatasetError(f"{Path(root)}: {db_dir.name}/ has {len(db_files)} images but {q_dir.name}/ has "
                           f"{len(q_files)}; frame-aligned traverses need one query per database frame")
    ds = PlaceDataset(name=Path(root).name, database=_records(db_files), queries=_records(q_files),
                      ground_truth=GroundTruth("frame", tolerance=int(tolerance)))
    return _require_nonempty(ds, Path(root))


# --------------------------------------------------------------------------- positions


def load_positions(root: str | Path, *, positions: str | Path | None = None,
                   radius_m: float = DEFAULT_RADIUS_M) -> PlaceDataset:
    """Two image folders with a position per image; ground truth: within ``radius_m`` metres.

    Positions come from ``positions`` (a CSV, see :func:`read_positions_csv`), else ``root/positions.csv``
    when present, else the ``@utm_east@utm_north@...`` file names. CSV keys are the file name or the
    path relative to ``root``; lat/lon are converted to metres (:func:`latlon_to_local`)."""
    root = Path(root)
    db_dir, q_dir = find_folders(root)
    _check_radius(radius_m)
    csv_path = Path(positions) if positions is not None else root / "positions.csv"
    use_csv = positions is not None or csv_path.is_file()
    table, kind = read_positions_csv(csv_path) if use_csv else ({}, "metric")
    files, coords = [], []
    for role, folder in (("database", db_dir), ("query", q_dir)):
        role_files = _nonempty_folder(folder, role)
        role_coords = []
        for p in role_files:
            if use_csv:
                rel = p.relative_to(root).as_posix()
                pos = table.get(rel, table.get(p.name))
                if pos is None:
                    raise DatasetError(f"{csv_path}: no position for {rel} (keys are the file name or the "
                                       f"path relative to {root})")
            else:
                try:
                    pos = parse_utm_name(p.name)
                except DatasetError as exc:
                    raise DatasetError(f"{p}: no position: {exc}; name files @utm_east@utm_north@... or give "
                                       "a positions CSV") from None
            role_coords.append(pos)
        files.append(role_files)
        coords.append(role_coords)
    coords = _to_metres(coords, kind, csv_path if use_csv else root)
    parts = _positioned(files, coords)
    ds = PlaceDataset(name=root.name, database=parts[0], queries=parts[1],
                      ground_truth=GroundTruth("distance", radius_m=float(radius_m)))
    return _require_nonempty(ds, root)


def _positioned(files: list[list[Path]], coords: list[list[tuple[float, float]]]) -> list[list[ImageRecord]]:
    """Records per group, each with its position and its index in the group as frame index."""
    return [[ImageRecord(path=p, name=p.name, position=xy, frame_index=i)
             for i, (p, xy) in enumerate(zip(fs, cs, strict=True))]
            for fs, cs in zip(files, coords, strict=True)]


def _check_radius(radius_m: float) -> None:
    if not (isinstance(radius_m, (int, float)) and math.isfinite(radius_m) and radius_m > 0):
        raise DatasetError(f"radius must be a positive number of metres, got {radius_m}")


# --------------------------------------------------------------------------- Mapillary SLS


#: Per-folder CSVs of a Mapillary SLS city, preferred first (UTM metres, then raw lat/lon).
MSLS_CSVS = ("postprocessed.csv", "raw.csv")


def load_msls(root: str | Path, *, radius_m: float = DEFAULT_RADIUS_M) -> PlaceDataset:
    """One Mapillary SLS city (e.g. ``train_val/melbourne``): ``database/`` and ``query/``, each with
    ``images/<key>.jpg`` and a CSV of ``key`` with ``easting,northing`` (``postprocessed.csv``) or
    ``lat,lon`` (``raw.csv``). Ground truth: within ``radius_m`` metres (MSLS's 25 m; its view-direction
    condition is not applied). Records follow the CSV rows; every listed image must exist (``<key>.jpg``,
    or another image suffix)."""
    root = _require_dir(Path(root), "a Mapillary SLS city folder holding database/ and query/")
    _check_radius(radius_m)
    if not (root / "query").is_dir() and any((root / d / "query").is_dir() for d in _subdirs(root)):
        raise DatasetError(f"{root}: holds several cities; pass one city folder, e.g. "
                           f"{root / next(d for d in _subdirs(root) if (root / d / 'query').is_dir())}")
    folders = [_require_dir(root / r, f"the Mapillary SLS {r} folder (images/ and a CSV)")
               for r in ("database", "query")]
    use = next((n for n in MSLS_CSVS if all((f / n).is_file() for f in folders)), None)
    if use is None:
        raise DatasetError(f"{root}: database/ and query/ need the same positions CSV, one of "
                           f"{', '.join(MSLS_CSVS)}")
    files, coords, kinds = [], [], set()
    for folder in folders:
        table, kind = read_positions_csv(folder / use)
        kinds.add(kind)
        if not table:
            raise DatasetError(f"{folder / use}: no rows; expected one row per image")
        images = folder / "images"
        paths = []
        for key in table:
            candidates = [images / key] if Path(key).suffix else [images / (key + s) for s in IMAGE_SUFFIXES]
            p = next((c for c in candidates if c.is_file()), None)
            if p is None:
                raise DatasetError(f"{folder / use}: no image {candidates[0]} for key {key!r}")
            paths.append(p)
        files.append(paths)
        coords.append(list(table.values()))
    if len(kinds) != 1:
        raise DatasetError(f"{root}: database and query CSVs mix metric and lat/lon coordinates")
    coords = _to_metres(coords, kinds.pop(), root)
    parts = _positioned(files, coords)
    ds = PlaceDataset(name=f"msls_{root.name}", database=parts[0], queries=parts[1],
                      ground_truth=GroundTruth("distance", radius_m=float(radius_m)))
    return _require_nonempty(ds, root)


def _subdirs(root: Path) -> list[str]:
    return sorted(d.name for d in root.iterdir() if d.is_dir())


# --------------------------------------------------------------------------- dispatch


def load_format(fmt: str, root: str | Path, *, tolerance: int | None = None, radius_m: float | None = None,
                ground_truth: str | Path | None = None, positions: str | Path | None = None) -> PlaceDataset:
    """Load ``root`` in format ``fmt`` (:data:`FORMATS`). Options that the format does not use are an
    error (``tolerance``: aligned; ``radius_m``: positions, msls; ``ground_truth``: vprbench;
    ``positions``: positions), so a mistyped command fails instead of silently ignoring them."""
    key = str(fmt).strip().lower().replace("-", "").replace("_", "")
    key = {"vpr": "vprbench", "mapillary": "msls", "mapillarysls": "msls"}.get(key, key)
    if key not in FORMATS:
        raise DatasetError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    used = {"tolerance": ("aligned",), "radius": ("positions", "msls"), "ground truth file": ("vprbench",),
            "positions file": ("positions",)}
    given = {"tolerance": tolerance, "radius": radius_m, "ground truth file": ground_truth,
             "positions file": positions}
    for option, value in given.items():
        if value is not None and key not in used[option]:
            raise DatasetError(f"the {option} option applies to --format {' / '.join(used[option])}, "
                               f"not {key}")
    if key == "vprbench":
        return load_vprbench(root, ground_truth=ground_truth)
    if key == "aligned":
        return load_aligned(root, tolerance=DEFAULT_TOLERANCE if tolerance is None else tolerance)
    radius = DEFAULT_RADIUS_M if radius_m is None else radius_m
    if key == "positions":
        return load_positions(root, positions=positions, radius_m=radius)
    return load_msls(root, radius_m=radius)
