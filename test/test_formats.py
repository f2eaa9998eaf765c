"""Standard dataset formats (vprbench, aligned, positions, msls): the safe .npy reader, each reader on
fixtures written here (well-formed and malformed), and ``vpr-ros eval --format`` end to end on the
shared Nordland frames converted to each format at test time."""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from numpy.lib import format as npy_format

from vpr_ros.cli.main import FORMAT_CHOICES, main
from vpr_ros.core.errors import DatasetError
from vpr_ros.core.images import save_image
from vpr_ros.core.mapdb import PlaceMap
from vpr_ros.core.safe_npy import load_npy
from vpr_ros.data.files import EARTH_RADIUS_M, haversine_m, latlon_to_local
from vpr_ros.data.formats import (
    FORMATS,
    load_aligned,
    load_format,
    load_msls,
    load_positions,
    load_vprbench,
    read_pairs,
)

RNG = np.random.default_rng(0)


def _img(path: Path) -> Path:
    save_image(path, RNG.integers(0, 256, (8, 12, 3), dtype=np.uint8))
    return path


def _folder(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        _img(folder / n)


def _gt_object_array(rows: list) -> np.ndarray:
    arr = np.empty((len(rows), 2), dtype=object)
    for i, (q, refs) in enumerate(rows):
        arr[i, 0], arr[i, 1] = q, refs
    return arr


def _save_npy_protocol(path: Path, arr: np.ndarray, protocol: int) -> None:
    """An object-array .npy whose pickle uses ``protocol`` (np.save picks one itself)."""
    with open(path, "wb") as f:
        npy_format.write_array_header_1_0(f, npy_format.header_data_from_array_1_0(arr))
        pickle.dump(arr, f, protocol=protocol)


def _positives(ds) -> list[list[int]]:
    return [p.tolist() for p in ds.positives()]


# --------------------------------------------------------------------------- safe .npy reader


@pytest.mark.parametrize("protocol", [0, 2, 3, 4, 5])
def test_load_npy_reads_vprbench_object_arrays_of_every_protocol(tmp_path, protocol):
    fortran = np.asfortranarray(np.array([[3, 4], [5, 6]], dtype=">i4"))
    arr = _gt_object_array([(0, [1, 2]), (1, np.array([3, 4], dtype=np.int64)), (np.int64(2), []),
                            (3, fortran), (4, np.int32(7))])
    path = tmp_path / "gt.npy"
    _save_npy_protocol(path, arr, protocol)
    got = load_npy(path)
    assert got.shape == (5, 2) and got.dtype == object
    assert got[0, 1] == [1, 2] and got[2, 0] == 2 and got[2, 1] == [] and got[4, 1] == 7
    np.testing.assert_array_equal(got[1, 1], [3, 4])
    assert got[3, 1].dtype == np.dtype(">i4")
    np.testing.assert_array_equal(got[3, 1], [[3, 4], [5, 6]])


def test_load_npy_numeric_array_and_np_save(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(6, dtype=np.int16).reshape(2, 3))
    np.testing.assert_array_equal(load_npy(tmp_path / "a.npy"), [[0, 1, 2], [3, 4, 5]])
    np.save(tmp_path / "gt.npy", _gt_object_array([(0, [0]), (1, [0, 1])]))  # np.save's own protocol
    assert load_npy(tmp_path / "gt.npy")[1, 1] == [0, 1]


class _Payload:
    """Unpickling this runs ``os.mkdir(target)``: proof that a loader executed file content."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (str(self.target),))


def test_load_npy_refuses_a_code_payload_without_running_it(tmp_path):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "ground_truth_new.npy"
    np.save(path, _gt_object_array([(0, [1]), (1, _Payload(marker))]))
    with pytest.raises(DatasetError, match=r"ground_truth_new\.npy: refused: global .*mkdir is not allowed"):
        load_npy(path)
    assert not marker.exists()
    np.load(path, allow_pickle=True)  # the payload is live: numpy's unpickler runs it
    assert marker.is_dir()


@pytest.mark.parametrize("content, reason", [
    (b"", "not a valid .npy file"),
    (b"not an npy file at all", "not a valid .npy file"),
])
def test_load_npy_rejects_non_npy_bytes(tmp_path, content, reason):
    path = tmp_path / "bad.npy"
    path.write_bytes(content)
    with pytest.raises(DatasetError, match=f"bad.npy: {reason}"):
        load_npy(path)


def test_load_npy_rejects_truncated_and_foreign_objects(tmp_path):
    full = tmp_path / "full.npy"
    np.save(full, _gt_object_array([(0, [1, 2]), (1, [3])]))
    cut = tmp_path / "cut.npy"
    cut.write_bytes(full.read_bytes()[:-20])
    with pytest.raises(DatasetError, match="cut.npy: corrupt object array"):
        load_npy(cut)
    dicts = tmp_path / "dict.npy"
    np.save(dicts, _gt_object_array([(0, {"refs": [1]})]))
    with pytest.raises(DatasetError, match="dict.npy: refused: pickle opcode EMPTY_DICT is not allowed"):
        load_npy(dicts)
    with pytest.raises(DatasetError, match="missing.npy: cannot read"):
        load_npy(tmp_path / "missing.npy")


# --------------------------------------------------------------------------- vprbench


def _vprbench(root: Path, n_ref: int = 12, n_query: int = 4) -> Path:
    _folder(root / "ref", [f"{i}.png" for i in range(n_ref)])
    _folder(root / "query", [f"{i}.png" for i in range(n_query)])
    return root


def test_vprbench_npy_ground_truth_in_numeric_name_order(tmp_path):
    root = _vprbench(tmp_path / "set")
    np.save(root / "ground_truth_new.npy",
            _gt_object_array([(0, [10, 2]), (1, np.array([11])), (3, [])]))  # query 2 not listed
    ds = load_vprbench(root)
    # index = rank in numeric-aware order: 2.png is index 2, 10.png index 10 (not "10" < "2")
    assert [r.name for r in ds.database][:3] == ["0.png", "1.png", "2.png"]
    assert ds.database[10].name == "10.png"
    assert _positives(ds) == [[2, 10], [11], [], []]
    assert ds.ground_truth.describe() == "listed pairs"
    # a subset keeps listed pairs of what remains: every 2nd image keeps ref 2 and 10 (now 1 and 5)
    assert _positives(ds.subsample(2)) == [[1, 5], []]


@pytest.mark.parametrize("name, text", [
    ("ground_truth.json", json.dumps([[0, [10, 2]], [1, [11]], [3, []]])),
    ("ground_truth.json", json.dumps({"0": [2, 10], "1": 11, "3": []})),
    ("ground_truth.csv", "query,ref\n0,2 10\n1,11\n3,\n"),
    ("ground_truth.csv", "query_index,ref_indices\n0,2\n0,10\n1,\"11\"\n3,\"\"\n"),
])
def test_vprbench_json_and_csv_ground_truth(tmp_path, name, text):
    root = _vprbench(tmp_path / "set")
    (root / name).write_text(text)
    assert _positives(load_vprbench(root)) == [[2, 10], [11], [], []]


def test_vprbench_explicit_ground_truth_file(tmp_path):
    root = _vprbench(tmp_path / "set")
    (tmp_path / "mine.json").write_text("[[1, [5]]]")
    assert _positives(load_vprbench(root, ground_truth=tmp_path / "mine.json")) == [[], [5], [], []]


@pytest.mark.parametrize("gt_name, content, message", [
    ("ground_truth_new.npy", b"\x93NUMPY garbage", r"ground_truth_new\.npy: npy format version 32\.103"),
    ("ground_truth_new.npy", b"\x93NUMPY\x01\x00garbage", r"ground_truth_new\.npy: not a valid \.npy file"),
    ("ground_truth.json", "[[0, [1]], [7, [1]]]",
     r"ground_truth\.json: query index 7 out of range \(.*query has 4"),
    ("ground_truth.json", "[[0, [1, 12]]]",
     r"ground_truth\.json: query 0: reference index 12 out of range \(.*ref has 12"),
    ("ground_truth.json", "[[0, [1]], [-1, [1]]]", "query index -1 out of range"),
    ("ground_truth.json", "[[0, [1.5]]]", r"entry 0 \(query 0\): reference index 1\.5 is not an integer"),
    ("ground_truth.json", "[[\"a\", [1]]]", "entry 0: query index 'a' is not an integer"),
    ("ground_truth.json", "[[0, 1, 2]]",
     r"entry 0 is \[0, 1, 2\]; expected \[query_index, \[ref_indices\]\]"),
    ("ground_truth.json", "{\"zero\": [1]}", "key 'zero' is not a query index"),
    ("ground_truth.json", "[[0, [1]", "not valid JSON"),
    ("ground_truth.csv", "q,r\n0,1\n", r"header \['q', 'r'\] lacks a query column"),
    ("ground_truth.csv", "query,ref\n0,one\n", r"line 2: query '0' or refs 'one' are not integer indices"),
])
def test_vprbench_malformed_ground_truth(tmp_path, gt_name, content, message):
    root = _vprbench(tmp_path / "set")
    path = root / gt_name
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    with pytest.raises(DatasetError, match=message):
        load_vprbench(root)


def test_vprbench_npy_of_wrong_shape(tmp_path):
    root = _vprbench(tmp_path / "set")
    np.save(root / "ground_truth_new.npy", np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(DatasetError, match=r"array of shape \(2, 3\); expected rows"):
        load_vprbench(root)
    np.save(root / "ground_truth_new.npy", np.array([[0, 4], [1, 5]]))  # plain ints: one ref per query
    assert _positives(load_vprbench(root)) == [[4], [5], [], []]


def test_vprbench_missing_parts(tmp_path):
    with pytest.raises(DatasetError, match=r"nowhere: missing folder"):
        load_vprbench(tmp_path / "nowhere")
    root = tmp_path / "set"
    _folder(root / "ref", ["0.png"])
    with pytest.raises(DatasetError, match=r"set/query: missing folder; expected the VPR-Bench query images"):
        load_vprbench(root)
    (root / "query").mkdir()
    with pytest.raises(DatasetError, match=r"set: no ground truth; expected one of ground_truth_new\.npy"):
        load_vprbench(root)
    (root / "ground_truth.json").write_text("[]")
    with pytest.raises(DatasetError, match=r"set/query: no images .* expected the query images"):
        load_vprbench(root)


# --------------------------------------------------------------------------- aligned


def test_aligned_frame_tolerance(tmp_path):
    names = ["f2.png", "f10.png", "f1.png", "f30.png"]  # numeric-aware order: f1 f2 f10 f30
    _folder(tmp_path / "set" / "database", names)
    _folder(tmp_path / "set" / "queries", [f"q{i}.png" for i in range(4)])
    ds = load_aligned(tmp_path / "set", tolerance=1)
    assert [r.name for r in ds.database] == ["f1.png", "f2.png", "f10.png", "f30.png"]
    # |i - j| <= 1: q0 -> 0,1; q1 -> 0,1,2; q2 -> 1,2,3; q3 -> 2,3
    assert _positives(ds) == [[0, 1], [0, 1, 2], [1, 2, 3], [2, 3]]
    assert _positives(load_aligned(tmp_path / "set", tolerance=0)) == [[0], [1], [2], [3]]


def test_aligned_folder_pairs_and_errors(tmp_path):
    root = tmp_path / "set"
    with pytest.raises(DatasetError, match="set: missing folder"):
        load_aligned(root)
    _folder(root / "ref", ["a.png", "b.png", "c.png"])
    with pytest.raises(DatasetError, match=r"set: no database and query folders; expected one of ref/ \+ "):
        load_aligned(root)
    _folder(root / "query", ["a.png", "b.png"])
    with pytest.raises(DatasetError, match=r"ref/ has 3 images but query/ has 2"):
        load_aligned(root)
    _img(root / "query" / "c.png")
    assert len(load_aligned(root).queries) == 3  # ref/ + query/ is the first pair looked for
    with pytest.raises(DatasetError, match="tolerance must be a non-negative integer"):
        load_aligned(root, tolerance=-1)
    empty = tmp_path / "empty"
    (empty / "database").mkdir(parents=True)
    (empty / "queries").mkdir()
    with pytest.raises(DatasetError, match=r"empty/database: no images"):
        load_aligned(empty)


# --------------------------------------------------------------------------- positions


def test_positions_metric_csv_and_radius(tmp_path):
    root = tmp_path / "set"
    _folder(root / "database", ["d0.png", "d1.png", "d2.png"])
    _folder(root / "queries", ["q0.png", "q1.png"])
    (root / "positions.csv").write_text(
        "name,x,y\nd0.png,0,0\ndatabase/d1.png,10,0\nd2.png,30,0\nq0.png,5,0\nq1.png,0,26\nother.png,1,1\n")
    ds = load_positions(root)
    assert ds.database[1].position == (10.0, 0.0) and ds.queries[1].position == (0.0, 26.0)
    # q0 (5,0): distances 5, 5, 25 -> all within 25 m (inclusive); q1 (0,26): 26, 27.9, 39.7 -> none
    assert _positives(ds) == [[0, 1, 2], []]
    # radius 20: q0 keeps d0, d1 (5 m each), loses d2 (25 m)
    assert _positives(load_positions(root, radius_m=20)) == [[0, 1], []]


def test_positions_lat_lon_are_converted_to_metres(tmp_path):
    root = tmp_path / "set"
    _folder(root / "ref", ["d0.png", "d1.png"])
    _folder(root / "query", ["q0.png"])
    (root / "gps.csv").write_text("image,lat,lon\nd0.png,45.0,7.0\nd1.png,45.0002,7.0\nq0.png,45.0,7.0003\n")
    ds = load_positions(root, positions=root / "gps.csv")
    d0, d1, q0 = ds.database[0].position, ds.database[1].position, ds.queries[0].position
    # north: 0.0002 deg = 6371008.8 m * pi / 180 * 0.0002 = 22.2390 m
    assert math.dist(d0, d1) == pytest.approx(22.2390, abs=1e-3)
    # east: 0.0003 deg * (pi / 180) * 6371008.8 m * cos(45.0000667 deg) = 33.3585 m * 0.707106 = 23.5881 m
    assert math.dist(d0, q0) == pytest.approx(23.5881, abs=1e-3)
    # q0 within 25 m of d0 only: to d1 sqrt(23.588^2 + 22.239^2) = 32.42 m
    assert math.dist(d1, q0) == pytest.approx(32.418, abs=1e-2)
    assert _positives(ds) == [[0]]


def test_local_projection_agrees_with_haversine():
    rng = np.random.default_rng(1)
    for lat0, lon0 in ((60.0, 10.0), (-33.9, 151.2), (0.5, 179.99)):  # Oslo-ish, Sydney, the antimeridian
        lat = lat0 + rng.uniform(-0.02, 0.02, 40)  # about +/- 2 km
        lon = lon0 + rng.uniform(-0.03, 0.03, 40)
        lon = (lon + 180) % 360 - 180
        xy, _ = latlon_to_local(lat, lon)
        for i, j in zip(range(0, 40, 2), range(1, 40, 2), strict=True):
            true = haversine_m(lat[i], lon[i], lat[j], lon[j])
            assert math.dist(xy[i], xy[j]) == pytest.approx(true, rel=1e-3)
    assert haversine_m(0, 0, 1, 0) == pytest.approx(EARTH_RADIUS_M * math.pi / 180)


def test_positions_from_utm_file_names(tmp_path):
    root = tmp_path / "set"
    _folder(root / "database", ["@500000@4000000@10@S@.png", "@500040@4000000@10@S@.png"])
    _folder(root / "queries", ["@500010@4000010@10@S@.png"])
    ds = load_positions(root)
    assert ds.queries[0].position == (500010.0, 4000010.0)
    assert _positives(ds) == [[0]]  # 14.1 m and 31.6 m away


@pytest.mark.parametrize("csv_text, message", [
    ("name,east\nd0.png,1\n", r"positions\.csv: header \['name', 'east'\] lacks columns"),
    ("file_name,x,y\nd0.png,1,2\n", "lacks columns; expected a key"),
    ("name,x,y\nd0.png,1,abc\n", r"positions\.csv, line 2: coordinates '1', 'abc' are not numbers"),
    ("name,x,y\nd0.png,1,nan\n", "line 2: coordinates 1.0, nan are not finite"),
    ("name,lat,lon\nd0.png,91,0\n", "line 2: latitude 91.0 / longitude 0.0 out of range"),
    ("name,x,y\nd0.png,1,2\nd0.png,1,2\n", "line 3: 'd0.png' listed twice"),
    ("name,x,y\nd0.png,1\n", "line 2: 2 fields, expected 3"),
    ("", r"positions\.csv: empty CSV"),
    ("name,x,y\nd0.png,1,2\n", r"positions\.csv: no position for queries/q0\.png"),
])
def test_positions_malformed_csv(tmp_path, csv_text, message):
    root = tmp_path / "set"
    _folder(root / "database", ["d0.png"])
    _folder(root / "queries", ["q0.png"])
    (root / "positions.csv").write_text(csv_text)
    with pytest.raises(DatasetError, match=message):
        load_positions(root)


def test_positions_without_csv_or_utm_names(tmp_path):
    root = tmp_path / "set"
    _folder(root / "database", ["d0.png"])
    _folder(root / "queries", ["q0.png"])
    with pytest.raises(DatasetError, match=r"database/d0\.png: no position: .* or give a positions CSV"):
        load_positions(root)
    with pytest.raises(DatasetError, match=r"gps\.csv: missing file"):
        load_positions(root, positions=root / "gps.csv")
    with pytest.raises(DatasetError, match="radius must be a positive number"):
        load_positions(root, radius_m=0)


# --------------------------------------------------------------------------- msls


def _msls_city(root: Path, db: dict[str, tuple], q: dict[str, tuple], csv_name: str, cols: str) -> Path:
    for role, rows in (("database", db), ("query", q)):
        folder = root / role
        _folder(folder / "images", [f"{k}.jpg" for k in rows])
        lines = [f",key,{cols}"] + [f"{i},{k},{a},{b}" for i, (k, (a, b)) in enumerate(rows.items())]
        (folder / csv_name).write_text("\n".join(lines) + "\n")
    return root


def test_msls_postprocessed_utm(tmp_path):
    city = _msls_city(tmp_path / "train_val" / "zurich",
                      {"k2": (465000.0, 5247000.0), "k1": (465100.0, 5247000.0)},
                      {"qa": (465020.0, 5247000.0)}, "postprocessed.csv", "easting,northing")
    ds = load_msls(city)
    assert ds.name == "msls_zurich"
    assert [r.name for r in ds.database] == ["k2.jpg", "k1.jpg"]  # CSV row order
    assert _positives(ds) == [[0]]  # 20 m and 80 m away
    with pytest.raises(DatasetError, match=r"train_val: holds several cities; pass one city folder"):
        load_msls(tmp_path / "train_val")


def test_msls_raw_lat_lon_share_one_origin(tmp_path):
    # database and query CSVs are projected about one origin, so 0.0001 deg of latitude = 11.12 m apart
    city = _msls_city(tmp_path / "city", {"d": (47.3700, 8.5400)}, {"q": (47.3701, 8.5400)}, "raw.csv",
                      "lat,lon")
    ds = load_msls(city)
    assert math.dist(ds.database[0].position, ds.queries[0].position) == pytest.approx(11.1195, abs=1e-3)
    assert _positives(ds) == [[0]] and _positives(load_msls(city, radius_m=10)) == [[]]


def test_msls_malformed(tmp_path):
    city = _msls_city(tmp_path / "city", {"d": (1.0, 2.0)}, {"q": (1.0, 2.0)}, "postprocessed.csv",
                      "easting,northing")
    (city / "query" / "images" / "q.jpg").unlink()
    with pytest.raises(DatasetError, match=r"query/postprocessed\.csv: no image .*q\.jpg for key 'q'"):
        load_msls(city)
    (city / "query" / "postprocessed.csv").unlink()
    with pytest.raises(DatasetError, match="need the same positions CSV, one of postprocessed.csv, raw.csv"):
        load_msls(city)
    shutil.rmtree(city / "query")
    with pytest.raises(DatasetError, match=r"city/query: missing folder"):
        load_msls(city)
    with pytest.raises(DatasetError, match=r"city/database/postprocessed\.csv: no rows"):
        (city / "query").mkdir()
        (city / "query" / "postprocessed.csv").write_text(",key,easting,northing\n")
        (city / "database" / "postprocessed.csv").write_text(",key,easting,northing\n")
        load_msls(city)


# --------------------------------------------------------------------------- dispatch and CLI errors


def test_format_names_and_options():
    assert FORMAT_CHOICES == FORMATS
    with pytest.raises(DatasetError, match="unknown format 'kitti'"):
        load_format("kitti", ".")
    with pytest.raises(DatasetError, match="the tolerance option applies to --format aligned, not positions"):
        load_format("positions", ".", tolerance=2)
    with pytest.raises(DatasetError, match="the radius option applies to --format positions / msls, not "
                                           "vprbench"):
        load_format("vprbench", ".", radius_m=10)


def test_read_pairs_unknown_suffix(tmp_path):
    (tmp_path / "gt.txt").write_text("0 1")
    with pytest.raises(DatasetError, match=r"gt\.txt: unknown ground-truth file type '\.txt'"):
        read_pairs(tmp_path / "gt.txt")


@pytest.mark.parametrize("argv, message", [
    (["--format", "vprbench"], r"ground_truth_new\.npy: refused: global .*mkdir is not allowed"),
    (["--format", "aligned", "--radius", "5"], "--format positions / msls, not aligned"),
    (["--dataset", "folder", "--tolerance", "1"],
     "--tolerance, --radius, --ground-truth and --positions need --format"),
    (["--format", "aligned", "--limit", "-3"], "--every/--limit: limit must be >= 1"),
])
def test_eval_format_errors_are_one_line(tmp_path, capsys, argv, message):
    root = _vprbench(tmp_path / "set", n_ref=3, n_query=3)
    np.save(root / "ground_truth_new.npy", _gt_object_array([(0, _Payload(tmp_path / "ran"))]))
    rc = main(["eval", "--root", str(root), *argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("vpr-ros eval: error: ")
    assert re.search(message, err[0]), err[0]
    assert not (tmp_path / "ran").exists()
    assert not (tmp_path / "out" / "results.json").exists()


# --------------------------------------------------------------------------- end to end on shared Nordland

N_PLACES = 24
SPACING_M = 20.0  # converted places 20 m apart: a 25 m radius is +/-1 place, like --tolerance 1


@pytest.fixture(scope="module")
def nordland_formats(nordland_dir, tmp_path_factory) -> dict[str, list[str]]:
    """The same 24 Nordland places (summer = database, winter = queries, 400 frames apart) written in each
    format, with ground truth "+/-1 place" in each; returns the eval arguments per format."""
    base = tmp_path_factory.mktemp("formats")
    names = sorted(p.name for p in (nordland_dir / "summer").iterdir())[300:300 + 40 * N_PLACES:40]
    assert len(names) == N_PLACES
    args = {}
    vb = base / "vprbench"
    aligned = base / "aligned"
    pos = base / "positions"
    city = base / "msls" / "nordland"
    lines = ["name,lat,lon"]
    msls_rows = {"database": [",key,easting,northing"], "query": [",key,easting,northing"]}
    for i, n in enumerate(names):
        for season, vb_dir, al_dir, pos_dir, role in (("summer", "ref", "database", "database", "database"),
                                                      ("winter", "query", "queries", "queries", "query")):
            src = nordland_dir / season / n
            for dst in (vb / vb_dir / f"{i}.png", aligned / al_dir / f"{i:03d}.png",
                        pos / pos_dir / f"{pos_dir[0]}{i}.png", city / role / "images" / f"k{i}.png"):
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
            lines.append(f"{pos_dir[0]}{i}.png,{60.0 + i * SPACING_M / (EARTH_RADIUS_M * math.pi / 180):.9f},"
                         "10.0")
            msls_rows[role].append(f"{i},k{i},{500000 + i * SPACING_M},{6650000}")
    np.save(vb / "ground_truth_new.npy",
            _gt_object_array([(i, [j for j in (i - 1, i, i + 1) if 0 <= j < N_PLACES])
                              for i in range(N_PLACES)]))
    (pos / "positions.csv").write_text("\n".join(lines) + "\n")
    for role, rows in msls_rows.items():
        (city / role / "postprocessed.csv").write_text("\n".join(rows) + "\n")
    args["vprbench"] = ["--format", "vprbench", "--root", str(vb)]
    args["aligned"] = ["--format", "aligned", "--root", str(aligned), "--tolerance", "1"]
    args["positions"] = ["--format", "positions", "--root", str(pos), "--radius", "25"]
    args["msls"] = ["--format", "msls", "--root", str(city)]
    return args


@pytest.fixture(scope="module")
def nordland_runs(nordland_formats, torch_home, tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("eval")
    runs = {}
    for fmt, argv in nordland_formats.items():
        rc = main(["eval", *argv, "--model", "structvpr_mobilenetv2", "--input-size", "64x128", "--device",
                   "cpu", "--threads", "1", "--degrade", "none", "--degrade", "jpeg:10",
                   "--out", str(out / fmt)])
        assert rc == 0, fmt
        runs[fmt] = json.loads((out / fmt / "results.json").read_text())
        runs[fmt]["_out"] = out / fmt
    return runs


def test_eval_each_format_writes_results_json(nordland_runs):
    for fmt, data in nordland_runs.items():
        results = data["results"]
        assert [r["degradation"] for r in results] == ["none", "jpeg_q10"], fmt
        assert all(r["n_queries"] == N_PLACES and r["n_without_positive"] == 0 for r in results), fmt
        assert results[1]["bytes_per_frame"] < results[0]["bytes_per_frame"], fmt  # per link
        ds = data["dataset"]
        assert len(ds["database"]) == len(ds["queries"]) == N_PLACES, fmt
        # +/-1 place everywhere: the first and last query have 2 positives, the others 3
        assert [len(p) for p in ds["positives"]] == [2] + [3] * (N_PLACES - 2) + [2], fmt
        assert set(data["per_query"]) == {"none", "jpeg_q10"}, fmt
        for r in results:
            rows = data["per_query"][r["degradation"]]
            assert [q["query"] for q in rows] == list(range(N_PLACES)), fmt
            for q in rows:
                assert len(q["top_k"]) == len(q["scores"]) == 20, fmt  # K = max recall N
                assert q["scores"] == sorted(q["scores"], reverse=True), fmt
                pos = set(ds["positives"][q["query"]])
                hits = [k for k, p in enumerate(q["top_k"]) if p in pos]
                assert q["first_correct"] == (hits[0] if hits else -1), fmt
            # recall@N in results equals the fraction of per-query first_correct < N
            for n, recall in r["recalls"].items():
                got = sum(0 <= q["first_correct"] < int(n) for q in rows) / len(rows)
                assert recall == pytest.approx(got), (fmt, n)
        assert (data["_out"] / "recall_at_n.png").stat().st_size > 1000, fmt


def test_eval_formats_agree_on_the_same_places(nordland_runs):
    """The four conversions hold the same images and equivalent ground truth: same rankings, same recalls."""
    ref = nordland_runs["aligned"]
    assert ref["dataset"]["ground_truth"] == "frame index +/-1"
    assert nordland_runs["vprbench"]["dataset"]["ground_truth"] == "listed pairs"
    assert nordland_runs["positions"]["dataset"]["ground_truth"] == "distance <= 25 m"
    for fmt in ("vprbench", "positions", "msls"):
        data = nordland_runs[fmt]
        assert data["dataset"]["positives"] == ref["dataset"]["positives"], fmt
        for label in ("none", "jpeg_q10"):
            assert ([q["top_k"] for q in data["per_query"][label]]
                    == [q["top_k"] for q in ref["per_query"][label]]), (fmt, label)
        assert [r["recalls"] for r in data["results"]] == [r["recalls"] for r in ref["results"]], fmt


def test_build_map_with_format_keeps_positions(nordland_formats, torch_home, tmp_path, capsys):
    rc = main(["build-map", *nordland_formats["positions"], "--model", "structvpr_mobilenetv2",
               "--input-size", "64x128", "--device", "cpu", "--threads", "1", "--out", str(tmp_path / "m")])
    assert rc == 0 and f"{N_PLACES} entries" in capsys.readouterr().out
    entries = PlaceMap.load(tmp_path / "m.vprmap").entries()
    assert len(entries) == N_PLACES
    # lat/lon became metres: consecutive places 20 m apart, north of each other
    steps = [math.dist(a.position[:2], b.position[:2]) for a, b in zip(entries, entries[1:], strict=False)]
    assert steps == pytest.approx([SPACING_M] * (N_PLACES - 1), abs=1e-3)
