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

import json
import math
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from vpr_ros.core.errors import DatasetError
from vpr_ros.core.safe_npy import load_npy
from vpr_ros.data.files import (
    IMAGE_SUFFIXES,
    column,
    csv_rows,
    list_images,
    open_csv,
    read_positions_csv,
    require_dir,
    require_file,
    to_metres,
)
from vpr_ros.data.places import (
    GroundTruth,
    ImageRecord,
    PlaceDataset,
    positioned_records,
    require_nonempty,
)

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



# --------------------------------------------------------------------------- shared helpers


def find_folders(root: Path) -> tuple[Path, Path]:
    """The (database, queries) folders of ``root``: the first pair of :data:`FOLDER_PAIRS` present."""
    root = require_dir(Path(root), "a dataset folder")
    for db, q in FOLDER_PAIRS:
        if (root / db).is_dir() and (root / q).is_dir():
            return root / db, root / q
    names = ", ".join(f"{db}/ + {q}/" for db, q in FOLDER_PAIRS)
    raise DatasetError(f"{root}: no database and query folders; expected one of {names}")


def _records(files: Iterable[Path]) -> list[ImageRecord]:
    return [ImageRecord(path=p, name=p.name, frame_index=i) for i, p in enumerate(files)]


def _nonempty_folder(folder: Path, role: str) -> list[Path]:
    files = list_images(folder)
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
    root = require_dir(Path(root), "a VPR-Bench folder holding ref/, query/ and ground_truth_new.npy")
    db_dir = require_dir(root / "ref", "the VPR-Bench reference (database) images")
    q_dir = require_dir(root / "query", "the VPR-Bench query images")
    if ground_truth is not None:
        gt_path = require_file(Path(ground_truth), "a ground-truth file (.npy, .json or .csv)")
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
    return require_nonempty(ds, root)


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
    with open_csv(path) as (reader, cols, header):
        q_col = column(cols, ("query", "query_index", "query_id"))
        r_col = column(cols, ("ref", "refs", "ref_index", "ref_indices", "reference", "positives"))
        if q_col is None or r_col is None:
            raise DatasetError(f"{path}: header {header} lacks a query column (query, query_index) and a ref "
                               "column (ref, refs, ref_indices, positives)")
        for line, row in csv_rows(reader, path, len(cols)):
            try:
                q = int(row[q_col].strip())
                refs = [int(t) for t in _SPLIT.split(row[r_col].strip()) if t]
            except ValueError:
                raise DatasetError(f"{path}, line {line}: query {row[q_col]!r} or refs {row[r_col]!r} "
                                   "are not integer indices") from None
            table[q].update(refs)
    return dict(table)


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
    return require_nonempty(ds, Path(root))


# --------------------------------------------------------------------------- positions


def load_positions(root: str | Path, *, positions: str | Path | None = None,
                   radius_m: float = DEFAULT_RADIUS_M) -> PlaceDataset:
    """Two image folders with a position per image; ground truth: within ``radius_m`` metres.

    Positions come from ``positions`` (a CSV, see :func:`~.files.read_positions_csv`), else
    ``root/positions.csv`` when present, else the ``@utm_east@utm_north@...`` file names. CSV keys are
    the file name or the path relative to ``root``; lat/lon are converted to metres
    (:func:`~.files.latlon_to_local`)."""
    root = Path(root)
    db_dir, q_dir = find_folders(root)
    _check_radius(radius_m)
    csv_path = Path(positions) if positions is not None else root / "positions.csv"
    use_csv = positions is not None or csv_path.is_file()
    db, qs = positioned_records(root, [("database", db_dir), ("query", q_dir)], csv_path if use_csv else None)
    ds = PlaceDataset(name=root.name, database=db, queries=qs,
                      ground_truth=GroundTruth("distance", radius_m=float(radius_m)))
    return require_nonempty(ds, root)


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
    root = require_dir(Path(root), "a Mapillary SLS city folder holding database/ and query/")
    _check_radius(radius_m)
    if not (root / "query").is_dir() and any((root / d / "query").is_dir() for d in _subdirs(root)):
        raise DatasetError(f"{root}: holds several cities; pass one city folder, e.g. "
                           f"{root / next(d for d in _subdirs(root) if (root / d / 'query').is_dir())}")
    folders = [require_dir(root / r, f"the Mapillary SLS {r} folder (images/ and a CSV)")
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
    coords = to_metres(coords, kinds.pop(), root)
    parts = [[ImageRecord(path=p, name=p.name, position=xy, frame_index=i)
              for i, (p, xy) in enumerate(zip(fs, cs, strict=True))]
             for fs, cs in zip(files, coords, strict=True)]
    ds = PlaceDataset(name=f"msls_{root.name}", database=parts[0], queries=parts[1],
                      ground_truth=GroundTruth("distance", radius_m=float(radius_m)))
    return require_nonempty(ds, root)


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
