"""File-level helpers shared by the dataset readers: image listing, required folders and files, CSV tables
of positions, and latitude/longitude to local metres."""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from vpr_ros.core.errors import DatasetError

log = logging.getLogger(__name__)

#: File suffixes treated as images by the readers (case-insensitive).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")

#: Mean Earth radius (IUGG, metres), for latitude/longitude to local metres.
EARTH_RADIUS_M = 6_371_008.8

#: CSV column names: image key, metric coordinate pairs, geographic pairs (lower-case).
KEY_COLUMNS = ("name", "path", "key", "file", "image")
METRIC_COLUMNS = (("x", "y"), ("east", "north"), ("easting", "northing"), ("utm_east", "utm_north"))
GEO_COLUMNS = (("lat", "lon"), ("latitude", "longitude"), ("lat", "lng"))


def natural_key(name: str) -> tuple:
    """Sort key that orders digit runs by value (``2.jpg`` before ``10.jpg``)."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def list_images(folder: Path) -> list[Path]:
    """The image files directly in ``folder`` (:data:`IMAGE_SUFFIXES`), in numeric-aware name order."""
    try:
        files = [p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    except OSError as exc:  # missing or unreadable folder
        raise DatasetError(f"{folder}: cannot list images ({exc.strerror or exc})") from None
    return sorted(files, key=lambda p: natural_key(p.name))


def require_dir(path: Path, what: str) -> Path:
    """``path`` if it is a folder, else DatasetError naming it and what was expected there."""
    if not path.is_dir():
        raise DatasetError(f"{path}: missing folder; expected {what}")
    return path


def require_file(path: Path, what: str) -> Path:
    """``path`` if it is a file, else DatasetError naming it and what was expected there."""
    if not path.is_file():
        raise DatasetError(f"{path}: missing file; expected {what}")
    return path


# --------------------------------------------------------------------------- CSV plumbing


@contextlib.contextmanager
def open_csv(path: Path) -> Iterator[tuple[Any, list[str], list[str]]]:
    """``with open_csv(path) as (reader, lower-case columns, header)``; errors name the file."""
    require_file(path, "a CSV file with a header row")
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


def column(cols: list[str], names: Iterable[str]) -> int | None:
    """Index of the first of ``names`` among ``cols`` (None when absent)."""
    return next((cols.index(n) for n in names if n in cols), None)


def csv_rows(reader: Any, path: Path, width: int) -> Iterable[tuple[int, list[str]]]:
    """(line number, row) of the non-blank rows; a row of another width than the header is an error."""
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
    with open_csv(path) as (reader, cols, header):
        key_col = column(cols, KEY_COLUMNS)
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
        for line, row in csv_rows(reader, path, len(cols)):
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


# --------------------------------------------------------------------------- geographic coordinates


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


def to_metres(groups: list[list[tuple[float, float]]], kind: str,
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
