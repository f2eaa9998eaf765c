"""Dataset loaders and ground truth: synthetic layouts in tmp_path and the real shared data."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest

from vpr_ros.core.errors import DatasetError
from vpr_ros.core.images import save_image
from vpr_ros.data.places import (
    GroundTruth,
    ImageRecord,
    PlaceDataset,
    load_dataset,
    load_ie_tower,
    load_image_folder,
    load_kitti,
    load_nordland,
    load_rtabmap_loop,
    load_tokyo_pair,
    parse_utm_name,
)

# --------------------------------------------------------------------------- UTM names


@pytest.mark.parametrize(
    "name, expected",
    [
        ("@0543256.96@4178906.70@10@S@37.7542@-122.5101@xyz@@@@@@@@.jpg", (543256.96, 4178906.70)),
        ("some/dir/@500000@-12.5@33@T@.png", (500000.0, -12.5)),
        ("@1e3@2e3@10@S@0@0@@.jpg", (1000.0, 2000.0)),
    ],
)
def test_parse_utm_name_valid(name, expected):
    assert parse_utm_name(name) == pytest.approx(expected)


@pytest.mark.parametrize(
    "name",
    ["image.jpg", "", "@1.0@2.0.jpg", "@abc@4178906.70@10@S@.jpg", "@nan@1@10@S@.jpg", "x@1@2@10@S@.jpg"],
)
def test_parse_utm_name_invalid(name):
    with pytest.raises(DatasetError):
        parse_utm_name(name)


# --------------------------------------------------------------------------- ground truth vs brute force


def _rec(i: int, **kw) -> ImageRecord:
    return ImageRecord(path=Path(f"/nowhere/{i}.png"), name=f"{i}.png", **kw)


def test_distance_ground_truth_matches_brute_force():
    rng = np.random.default_rng(0)
    db_xy = rng.uniform(-150, 150, (600, 2))
    q_xy = rng.uniform(-160, 160, (250, 2))
    q_xy[0] = db_xy[0] + [25.0, 0.0]  # exactly on the radius: counts
    db = [_rec(i, position=tuple(p)) for i, p in enumerate(db_xy)]
    qs = [_rec(i, position=tuple(p)) for i, p in enumerate(q_xy)]
    got = GroundTruth("distance", radius_m=25.0).positives(db, qs)
    dist = np.linalg.norm(q_xy[:, None] - db_xy[None], axis=2)
    for i, pos in enumerate(got):
        assert pos.tolist() == np.nonzero(dist[i] <= 25.0)[0].tolist()
    assert 0 in got[0].tolist()
    assert sum(len(p) for p in got) > 250  # non-trivial case


def test_frame_ground_truth_matches_brute_force_within_sequences():
    rng = np.random.default_rng(1)
    seqs = [None, "a", "b"]
    db = [_rec(i, frame_index=int(rng.integers(0, 60)), sequence=seqs[i % 3]) for i in range(300)]
    qs = [_rec(i, frame_index=int(rng.integers(0, 60)), sequence=seqs[(i // 2) % 3]) for i in range(100)]
    qs.append(_rec(100, frame_index=5, sequence="unknown"))
    got = GroundTruth("frame", tolerance=2).positives(db, qs)
    for q, pos in zip(qs, got, strict=True):
        expect = [j for j, d in enumerate(db)
                  if d.sequence == q.sequence and abs(d.frame_index - q.frame_index) <= 2]
        assert pos.tolist() == expect
    assert got[-1].size == 0


def test_label_ground_truth_and_validation():
    db = [_rec(i, label=lab) for i, lab in enumerate(["a", "b", "a", "c"])]
    qs = [_rec(0, label="a"), _rec(1, label="z")]
    got = GroundTruth("label").positives(db, qs)
    assert [p.tolist() for p in got] == [[0, 2], []]
    with pytest.raises(ValueError):
        GroundTruth("nearest")
    with pytest.raises(ValueError):
        GroundTruth("distance", radius_m=0)
    with pytest.raises(DatasetError, match="no position"):
        GroundTruth("distance").positives([_rec(0)], [_rec(1, position=(0.0, 0.0))])
    with pytest.raises(DatasetError, match="no frame index"):
        GroundTruth("frame").positives([_rec(0)], [_rec(1, frame_index=3)])


def test_place_dataset_subset_and_summary():
    db = [_rec(i, frame_index=i) for i in range(20)]
    qs = [_rec(i, frame_index=i) for i in range(20)]
    ds = PlaceDataset("toy", db, qs, GroundTruth("frame", tolerance=0), skipped=[("x.png", "dark: mean 0")])
    small = ds.subsample(every=3, limit=4)
    assert [r.frame_index for r in small.database] == [0, 3, 6, 9]
    assert [r.frame_index for r in small.queries] == [0, 3, 6, 9]
    assert [p.tolist() for p in small.positives()] == [[0], [1], [2], [3]]
    assert len(ds.database) == 20  # original untouched
    assert ds.summary().startswith("toy: 20 database, 20 queries") and "1 dark" in ds.summary()
    with pytest.raises(ValueError):
        ds.subsample(every=0)


# --------------------------------------------------------------------------- the one place-set type


def test_distance_relation_hand_computed():
    # database A (0, 0), B (3, 4), C (10, 0); queries q0 (0, 0), q1 (8, 0); radius 5 m:
    # q0: |A| = 0, |B| = sqrt(9 + 16) = 5 (on the radius: counts), |C| = 10        -> positives {A, B}
    # q1: |A| = 8, |B| = sqrt(25 + 16) = 6.40, |C| = 2                            -> positives {C}
    # near (never negatives) within 7 m: q0 {A, B} (C at 10); q1 {B, C} (B at 6.40 <= 7, A at 8 > 7)
    db = [_rec(i, position=p) for i, p in enumerate([(0.0, 0.0), (3.0, 4.0), (10.0, 0.0)])]
    qs = [_rec(10 + i, position=p) for i, p in enumerate([(0.0, 0.0), (8.0, 0.0)])]
    ds = PlaceDataset("hand", db, qs, GroundTruth("distance", radius_m=5.0, negatives_beyond=7.0))
    assert [p.tolist() for p in ds.positives()] == [[0, 1], [2]]
    assert [n.tolist() for n in ds.near()] == [[0, 1], [1, 2]]
    assert [e.tolist() for e in ds.excluded()] == [[], []]  # separate records: nothing ignored
    assert ds.truth_matrix().tolist() == [[True, True, False], [False, False, True]]
    assert ds.ground_truth.describe() == "distance <= 5 m, negatives beyond 7 m"
    # without negatives_beyond, near is the positives
    plain = PlaceDataset("hand", db, qs, GroundTruth("distance", radius_m=5.0))
    assert [n.tolist() for n in plain.near()] == [[0, 1], [2]]
    # a subset of the queries keeps each query's rows; a subset of the database recomputes them
    assert [p.tolist() for p in ds.subset(queries=[1]).positives()] == [[2]]
    assert [p.tolist() for p in ds.subset(database=[2, 1]).positives()] == [[1], [0]]
    with pytest.raises(ValueError, match="negatives_beyond"):
        GroundTruth("distance", radius_m=5.0, negatives_beyond=4.0)  # nearer than the positives


def test_single_traverse_ignores_itself_and_its_neighbours_in_time():
    # one bag: frames at 0, 1, 2 s at x = 0, 1, 2 m, and a revisit at 100 s at x = 0.5 m; radius 3 m,
    # frames of the same traverse less than 10 s apart are not revisits
    xs, stamps = [0.0, 1.0, 2.0, 0.5], [0.0, 1.0, 2.0, 100.0]
    recs = [_rec(i, position=(x, 0.0), stamp=t, sequence="bag")
            for i, (x, t) in enumerate(zip(xs, stamps, strict=True))]
    ds = PlaceDataset("bag", recs, recs, GroundTruth("distance", radius_m=3.0, min_time_gap_s=10.0))
    # all four lie within 3 m of each other; frame 0 ignores itself and frames 1, 2 (1 and 2 s away)
    assert ds.excluded()[0].tolist() == [0, 1, 2] and ds.positives()[0].tolist() == [3]
    # the revisit (98+ s later) ignores only itself: the first pass is its positive
    assert ds.excluded()[3].tolist() == [3] and ds.positives()[3].tolist() == [0, 1, 2]
    assert ds.near()[0].tolist() == [0, 1, 2, 3]  # ignored frames are never negatives either


def test_split_by_place_hand_computed():
    # frames 0..19, blocks of 5: blocks 1 and 3 (val_every 2, offset 1) validate -> frames 5-9, 15-19;
    # training keeps blocks 0 and 2 minus frames within 1 of a validation frame (4, 10, 14)
    recs = [_rec(i, frame_index=i) for i in range(20)]
    ds = PlaceDataset("frames", recs, list(recs), GroundTruth("frame", tolerance=1))

    class Split:
        block, val_every, val_offset, gap = 5.0, 2, 1, 1.0

    train, val = ds.split_by_place(Split())
    assert [r.frame_index for r in train.queries] == [0, 1, 2, 3, 11, 12, 13]
    assert [r.frame_index for r in train.database] == [0, 1, 2, 3, 11, 12, 13]
    assert [r.frame_index for r in val.queries] == [5, 6, 7, 8, 9, 15, 16, 17, 18, 19]
    assert (train.name, val.name) == ("frames/train", "frames/val")
    # frame 3's positives within +-1 frame: 2 (itself is ignored: the same record), not the dropped 4
    assert train.positives()[3].tolist() == [2]


def test_one_type_one_argument_order():
    """Every place set is a PlaceDataset(name, database, queries, ground_truth); the relation always takes
    (database, queries); every reader returns the one type; the former parallel types are gone."""
    import dataclasses
    import inspect

    from vpr_ros.data import formats, places
    from vpr_ros.studies import accuracy
    from vpr_ros.training import data as training_data

    assert [f.name for f in dataclasses.fields(PlaceDataset)][:4] == ["name", "database", "queries",
                                                                     "ground_truth"]
    for method in (GroundTruth.positives, GroundTruth.relate):
        assert list(inspect.signature(method).parameters)[1:3] == ["database", "queries"]
    readers = [places.load_nordland, places.load_ie_tower, places.load_rtabmap_loop, places.load_kitti,
               places.load_tokyo_pair, places.load_image_folder, places.load_dataset, formats.load_vprbench,
               formats.load_aligned, formats.load_positions, formats.load_msls, formats.load_format,
               training_data.nordland_places, training_data.folder_places, training_data.bag_places,
               training_data.build_places]
    for reader in readers:
        assert inspect.signature(reader).return_annotation == "PlaceDataset", reader.__name__
    assert not hasattr(training_data, "PlaceSet") and not hasattr(training_data, "Relation")
    assert not hasattr(accuracy, "StudySet")


def test_tokyo_pair(shared_dir):
    ds = load_tokyo_pair(shared_dir / "data" / "tokyo_pair")
    assert [p.tolist() for p in ds.positives()] == [[0]] and ds.ground_truth.describe() == "one positive pair"
    with pytest.raises(DatasetError, match="db_tokyo.jpg: missing file"):
        load_tokyo_pair(shared_dir / "data" / "rtabmap_loop")


# --------------------------------------------------------------------------- image folder layout


def _write_images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(names):
        save_image(folder / n, np.full((8, 8, 3), i * 20, dtype=np.uint8))


def _utm(e: float, n: float) -> str:
    return f"@{e:.2f}@{n:.2f}@10@S@37.0@-122.0@@@@@@@@.jpg"


def test_image_folder_with_utm_names(tmp_path):
    _write_images(tmp_path / "database", [_utm(500000, 4e6), _utm(500010, 4e6), _utm(500100, 4e6)])
    _write_images(tmp_path / "queries", [_utm(500003, 4000004), _utm(500200, 4000000)])
    (tmp_path / "database" / "notes.txt").write_text("not an image")
    ds = load_image_folder(tmp_path, radius_m=20)
    assert len(ds.database) == 3 and len(ds.queries) == 2
    assert ds.queries[0].position == pytest.approx((500003.0, 4000004.0))
    assert [p.tolist() for p in ds.positives()] == [[0, 1], []]
    assert ds.database[0].load().shape == (8, 8, 3)
    assert load_dataset("folder", tmp_path, radius_m=20).positives()[0].tolist() == [0, 1]


@pytest.mark.parametrize("header, key", [("name,east,north", "name"), ("path,x,y", "path")])
def test_image_folder_with_csv(tmp_path, header, key):
    _write_images(tmp_path / "database", ["d0.png", "d1.png"])
    _write_images(tmp_path / "queries", ["q0.png"])

    def k(sub, n):
        return n if key == "name" else f"{sub}/{n}"

    rows = [f"{k('database', 'd0.png')},0,0", f"{k('database', 'd1.png')},100,0",
            f"{k('queries', 'q0.png')},95,3"]
    csv_path = tmp_path / "pos.csv"
    csv_path.write_text(header + "\n" + "\n".join(rows) + "\n")
    ds = load_image_folder(tmp_path, positions_csv=csv_path, radius_m=10)
    assert ds.database[1].position == (100.0, 0.0)
    assert [p.tolist() for p in ds.positives()] == [[1]]


def test_image_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="missing folder"):
        load_image_folder(tmp_path / "absent")
    _write_images(tmp_path / "database", [_utm(0, 0)])
    with pytest.raises(DatasetError, match="queries"):
        load_image_folder(tmp_path)  # no queries folder
    (tmp_path / "queries").mkdir()
    with pytest.raises(DatasetError, match="no images .* expected the query images"):
        load_image_folder(tmp_path)
    _write_images(tmp_path / "queries", ["plain.png"])
    with pytest.raises(DatasetError, match="plain.png"):
        load_image_folder(tmp_path)  # neither @utm@ name nor CSV
    bad = tmp_path / "bad.csv"
    bad.write_text("name,east,north\nplain.png,1,2\nother.png,abc,3\n")
    with pytest.raises(DatasetError, match="line 3"):
        load_image_folder(tmp_path, positions_csv=bad)
    bad.write_text("name,east,north\nplain.png,1,2\nother.png,3\n")
    with pytest.raises(DatasetError, match="line 3"):
        load_image_folder(tmp_path, positions_csv=bad)
    bad.write_text("file,alt,heading\nplain.png,1,2\n")
    with pytest.raises(DatasetError, match="header"):
        load_image_folder(tmp_path, positions_csv=bad)
    bad.write_text("name,east,north\nplain.png,1,2\n")
    with pytest.raises(DatasetError, match="no position for database/"):
        load_image_folder(tmp_path, positions_csv=bad)
    with pytest.raises(DatasetError, match="missing file"):
        load_image_folder(tmp_path, positions_csv=tmp_path / "nope.csv")
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("tokyo", tmp_path)


# --------------------------------------------------------------------------- Nordland (real)


@pytest.fixture(scope="module")
def nordland(nordland_dir) -> PlaceDataset:
    return load_nordland(nordland_dir)


def test_nordland_counts_and_dropped_frames(nordland, nordland_dir):
    # README: 3576 frames per season; summer 00010..00170 black; winter 17 identical frames at the
    # start and 15 at the end (a still video, not black): the first of each run is kept.
    dark = [(Path(p), r) for p, r in nordland.skipped if r.startswith("dark")]
    frozen = [(Path(p), r) for p, r in nordland.skipped if r.startswith("frozen")]
    assert [p.name for p, _ in dark] == [f"images-{n:05d}.png" for n in range(10, 171, 10)]
    assert all(p.parent.name == "summer" for p, _ in dark)
    assert len(frozen) == 16 + 14 and all(p.parent.name == "winter" for p, _ in frozen)
    assert len(nordland.database) == 3576 - 17
    assert len(nordland.queries) == 3576 - 30
    assert nordland.database[0].name == "images-00180.png" and nordland.database[0].frame_index == 17
    assert nordland.ground_truth.kind == "frame" and nordland.ground_truth.tolerance == 2


def test_nordland_frame_alignment_matches_gt_pairs(nordland, nordland_dir):
    db_frame = {r.name: r.frame_index for r in nordland.database}
    q_frame = {r.name: r.frame_index for r in nordland.queries}
    with open(nordland_dir / "gt_pairs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3576
    for row in rows:
        s, w = Path(row["summer"]).name, Path(row["winter"]).name
        if s in db_frame and w in q_frame:
            assert db_frame[s] == q_frame[w] == int(row["index"])
    positives = nordland.positives()
    db_names = [r.name for r in nordland.database]
    for qi in (100, 1000, 3000):
        assert nordland.queries[qi].name in [db_names[j] for j in positives[qi]]
        assert len(positives[qi]) == 5  # +/-2 frames
    no_pos = [nordland.queries[i].name for i, p in enumerate(positives) if len(p) == 0]
    assert no_pos == ["images-00010.png"]  # its summer neighbours are all black


def test_nordland_every_limit_and_no_filtering(nordland_dir):
    small = load_nordland(nordland_dir, limit=30)
    assert len(small.database) == 13 and len(small.queries) == 14  # 17 dark / 16 frozen among 30
    raw = load_nordland(nordland_dir, drop_dark=False, drop_frozen=False, every=5, limit=20)
    assert len(raw.database) == len(raw.queries) == 20 and raw.skipped == []
    assert [r.frame_index for r in raw.queries[:3]] == [0, 5, 10]
    assert [p.tolist() for p in raw.positives()[:3]] == [[0], [1], [2]]
    with pytest.raises(DatasetError, match="autumn"):
        load_nordland(nordland_dir, query_season="autumn")


# --------------------------------------------------------------------------- IE tower (real)


def _ie_rows(root: Path) -> list[dict[str, str]]:
    with open(root / "dataset.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_ie_tower_split_and_area_ground_truth(ie_tower_dir):
    ds = load_ie_tower(ie_tower_dir)
    assert len(ds.database) == 2373 and len(ds.queries) == 504
    rows = {Path(r["image_path"]).name: r for r in _ie_rows(ie_tower_dir)}
    assert len({rows[r.name]["label"] for r in ds.database}) == 25
    positives = ds.positives()
    assert all(len(p) > 0 for p in positives)  # every query's floor/area is in the gallery
    rng = np.random.default_rng(0)
    for qi in rng.choice(len(ds.queries), 25, replace=False):
        q = rows[ds.queries[qi].name]
        expect = [j for j, d in enumerate(ds.database)
                  if rows[d.name]["label"] == q["label"] and rows[d.name]["area"] == q["area"]]
        assert positives[qi].tolist() == expect


def test_ie_tower_floor_and_clip_modes(ie_tower_dir):
    area = load_ie_tower(ie_tower_dir).positives()
    floor = load_ie_tower(ie_tower_dir, ground_truth="floor").positives()
    clip_ds = load_ie_tower(ie_tower_dir, ground_truth="clip", tolerance=1)
    clip = clip_ds.positives()
    for a, f, c in zip(area, floor, clip, strict=True):
        assert set(c) <= set(a) <= set(f)
    assert sum(map(len, floor)) > sum(map(len, area)) > sum(map(len, clip)) > 0
    q = clip_ds.queries[7]
    for j in clip[7]:
        d = clip_ds.database[j]
        assert d.sequence == q.sequence and abs(d.frame_index - q.frame_index) <= 1
    assert len(load_ie_tower(ie_tower_dir, every=4, limit=50).queries) == 50


def test_ie_tower_csv_errors(tmp_path):
    (tmp_path / "frames" / "floor3").mkdir(parents=True)
    save_image(tmp_path / "frames" / "floor3" / "f03_hall_frame_000001.jpg", np.zeros((4, 4, 3), np.uint8))
    header = "image_path,label,split,device,lighting,area,section,floor_range\n"
    good = "frames/floor3/f03_hall_frame_000001.jpg,floor3,gallery,,,hallway,above-ground,lowrise\n"
    cases = {
        "frames/floor3/f03_hall_frame_000001.jpg,floor3,query,,,hallway\n": "line 3",  # short row
        "frames/floor3/f03_hall_frame_000001.jpg,floor3,train,,,hallway,a,b\n": "line 3",  # bad split
        "frames/floor3/f03_hall_frame_000009.jpg,floor3,query,,,hallway,a,b\n": "does not exist",
    }
    for row, message in cases.items():
        (tmp_path / "dataset.csv").write_text(header + good + row)
        with pytest.raises(DatasetError, match=message):
            load_ie_tower(tmp_path)
    (tmp_path / "dataset.csv").write_text(header + good)
    with pytest.raises(DatasetError, match="no query images"):
        load_ie_tower(tmp_path)
    (tmp_path / "dataset.csv").unlink()
    with pytest.raises(DatasetError, match="dataset.csv"):
        load_ie_tower(tmp_path)


# --------------------------------------------------------------------------- RTAB-Map loop, KITTI (real)


def test_rtabmap_loop(rtabmap_dir):
    rtab = load_rtabmap_loop(rtabmap_dir)
    records, gt = rtab.database, rtab.truth_matrix()
    assert rtab.queries is records  # a single traverse
    assert [r.name for r in records[:3]] == ["1.jpg", "2.jpg", "3.jpg"]  # numeric, not lexical order
    assert records[-1].name == "84.jpg" and records[-1].frame_index == 83
    assert gt.shape == (84, 84) and gt.dtype == bool
    assert int(gt.sum()) == 228  # README: 228 loop pairs
    assert not np.triu(gt).any()  # lower-triangular: row i (newer) closes a loop with column j (older)
    rows = np.nonzero(gt.any(axis=1))[0]
    assert rows.min() == 40 and rows.max() == 83 and len(rows) == 44  # frames 41..84 revisit
    assert np.nonzero(gt.any(axis=0))[0].max() == 45  # ... frames 1..46
    ii, jj = np.nonzero(gt)
    assert (ii - jj > 20).all()


def test_rtabmap_bad_matrix(tmp_path):
    _write_images(tmp_path / "images", ["1.jpg", "2.jpg"])
    (tmp_path / "gt_loop_matrix.txt").write_text("0 0\n1 0\n0 0\n")
    with pytest.raises(DatasetError, match="2 x 2"):
        load_rtabmap_loop(tmp_path)
    (tmp_path / "gt_loop_matrix.txt").write_text("0 0\n2 0\n")
    with pytest.raises(DatasetError, match="line 2"):
        load_rtabmap_loop(tmp_path)


@pytest.mark.parametrize("sequence, length_m", [("00", 216.2), ("05", 231.3)])
def test_kitti_positions(kitti_dir, sequence, length_m):
    kitti = load_kitti(kitti_dir, sequence)
    records = kitti.database
    assert kitti.queries is records and kitti.name == f"kitti{sequence}"
    assert len(records) == 300
    assert re.fullmatch(r"0{6}\.(png|jpg)", records[0].name) and records[299].frame_index == 299
    xy = np.array([r.position for r in records])
    assert np.abs(xy[0]).max() < 1e-6  # frame 0 is the origin
    travelled = np.linalg.norm(np.diff(xy, axis=0), axis=1).sum()
    assert travelled == pytest.approx(length_m, rel=0.01)  # README: trajectory length (planar x, z here)
    with pytest.raises(DatasetError, match="sequence 02"):
        load_kitti(kitti_dir, "02")
