"""Tests of the faiss-backed place map (vpr_ros.core.mapdb)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import faiss
import numpy as np
import pytest

from vpr_ros.core.errors import MapError
from vpr_ros.core.mapdb import (
    FORMAT_NAME,
    MANIFEST_NAME,
    MapEntry,
    PlaceMap,
    QueryResult,
    UnknownEntryError,
    map_path,
    scaled_ef_search,
    set_search_threads,
)

REPO = Path(__file__).resolve().parents[1]

# Small ivfpq settings that train in well under a second on 2 cores.
IVFPQ = {"nlist": 32, "m": 16, "nbits": 6, "nprobe": 16}


@pytest.fixture(autouse=True, scope="module")
def _one_omp_thread():
    """faiss' OpenMP threads spin badly on a shared 2-core box; one thread keeps the file fast."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, d: int, clusters: int, seed: int = 0, noise: float = 0.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, d))
    x = centers[rng.integers(0, clusters, n)] + noise * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def some_entries(n: int, start: int = 0) -> list[MapEntry]:
    out = []
    for i in range(start, start + n):
        out.append(
            MapEntry(
                stamp=1_700_000_000.0 + 0.1 * i,
                frame_id=f"cam{i % 3}",
                source=f"bag/image_raw#{i} ü",
                position=None if i % 4 == 0 else (float(i), -0.5 * i, 0.25),
                orientation=None if i % 5 == 0 else (0.0, 0.0, np.sin(i / 10), np.cos(i / 10)),
            )
        )
    return out


def built(kind: str, n: int = 300, d: int = 32, **params) -> tuple[PlaceMap, np.ndarray]:
    x = unit(n, d, seed=1)
    pmap = PlaceMap(d, kind, model="mobilenetv2_gem", **params)
    pmap.add(x[: n // 2], some_entries(n // 2))
    pmap.add(x[n // 2 :], some_entries(n - n // 2, start=n // 2))
    return pmap, x


def assert_same_map(a: PlaceMap, b: PlaceMap, queries: np.ndarray, k: int = 10) -> None:
    assert len(a) == len(b) and a.dim == b.dim and a.model == b.model and a.next_id == b.next_id
    assert a.index_kind == b.index_kind and a.active_index == b.active_index and a.params == b.params
    np.testing.assert_array_equal(a.ids, b.ids)
    assert a.entries() == b.entries()
    sa, ia = a.search(queries, k)
    sb, ib = b.search(queries, k)
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_array_equal(sa, sb)


# ---------------------------------------------------------------------------- search correctness


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_flat_topk_matches_numpy_brute_force(metric):
    x, q = unit(500, 48, seed=2), unit(40, 48, seed=3)
    pmap = PlaceMap(48, metric=metric)
    ids = pmap.add(x)
    np.testing.assert_array_equal(ids, np.arange(500))
    if metric == "ip":
        full = q @ x.T
        order = np.argsort(-full, axis=1)[:, :7]
    else:
        full = ((q[:, None, :] - x[None, :, :]) ** 2).sum(-1)
        order = np.argsort(full, axis=1)[:, :7]
    scores, got = pmap.search(q, 7)
    assert scores.dtype == np.float32 and got.dtype == np.int64 and got.shape == (40, 7)
    np.testing.assert_array_equal(got, order)
    np.testing.assert_allclose(scores, np.take_along_axis(full, order, axis=1), rtol=1e-5, atol=1e-5)
    results = pmap.query(q, k=7)
    assert len(results) == 40 and all(isinstance(r, QueryResult) for r in results)
    for r, want in zip(results, order, strict=True):
        np.testing.assert_array_equal(r.ids, want)
        assert [e.id for e in r.entries] == want.tolist()


def test_single_vector_query_and_add():
    x = unit(20, 16)
    pmap = PlaceMap(16)
    assert pmap.add(x[0]).tolist() == [0]
    pmap.add(x[1:])
    (res,) = pmap.query(x[5])
    assert res.ids[0] == 5 and res.scores[0] == pytest.approx(1.0, abs=1e-5)
    assert len(res) == 5
    assert pmap.add(np.empty((0, 16), np.float32)).shape == (0,) and len(pmap) == 20


def test_float64_and_noncontiguous_input_accepted():
    x = unit(30, 8).astype(np.float64)
    pmap = PlaceMap(8)
    pmap.add(np.asfortranarray(x))
    _, ids = pmap.search(x[::3], 1)
    np.testing.assert_array_equal(ids[:, 0], np.arange(0, 30, 3))
    np.testing.assert_allclose(pmap.descriptors(), x, atol=1e-7)


def test_incremental_add_keeps_ids():
    x = unit(90, 24, seed=4)
    pmap = PlaceMap(24, "hnsw")
    first = pmap.add(x[:30], some_entries(30))
    second = pmap.add(x[30:60])
    assert first.tolist() == list(range(30)) and second.tolist() == list(range(30, 60))
    before = pmap.query(x[:30], k=1)
    pmap.add(x[60:])
    after = pmap.query(x[:30], k=1)
    assert [r.ids[0] for r in before] == [r.ids[0] for r in after] == list(range(30))
    assert pmap.entry(7) == MapEntry(
        id=7, **{k: v for k, v in vars(some_entries(1, 7)[0]).items() if k != "id"}
    )
    assert pmap.entry(45) == MapEntry(id=45)
    assert pmap.next_id == 90


def test_ids_continue_after_save_and_load(tmp_path):
    pmap, x = built("flat", n=50)
    pmap.save(tmp_path / "m")
    loaded = PlaceMap.load(tmp_path / "m")
    assert loaded.add(unit(5, 32, seed=9)).tolist() == [50, 51, 52, 53, 54]
    assert loaded.entry(51).id == 51 and loaded.entry(3) == pmap.entry(3)


def test_metadata_round_trip_with_none_fields(tmp_path):
    entries = some_entries(12)
    entries.append(MapEntry(frame_id="", source="", position=None, orientation=None))
    pmap = PlaceMap(8, model="m")
    pmap.add(unit(13, 8), entries)
    assert entries[0].id == -1, "the caller's entries must not be modified"
    saved = pmap.entries()
    for i, (e, s) in enumerate(zip(entries, saved, strict=True)):
        assert s.id == i
        assert (s.stamp, s.frame_id, s.source) == (e.stamp, e.frame_id, e.source)
        assert s.position == (None if e.position is None else tuple(e.position))
        assert s.orientation == (None if e.orientation is None else tuple(e.orientation))
    assert saved[0].position is None and saved[1].position == (1.0, -0.5, 0.25)
    pmap.save(tmp_path / "meta")
    assert PlaceMap.load(tmp_path / "meta").entries() == saved


def test_unknown_id_is_map_error_and_key_error():
    pmap = PlaceMap(4)
    pmap.add(unit(3, 4))
    with pytest.raises(UnknownEntryError, match="no place with id 3"):
        pmap.entry(3)
    with pytest.raises(KeyError):
        pmap.entry(-1)
    assert issubclass(UnknownEntryError, MapError)


def test_empty_map_query_and_k_clamping():
    pmap = PlaceMap(16)
    q = unit(3, 16)
    results = pmap.query(q, k=5)
    assert len(results) == 3 and all(len(r) == 0 and r.entries == [] for r in results)
    scores, ids = pmap.search(q, 4)
    assert ids.shape == (3, 4) and (ids == -1).all() and np.isneginf(scores).all()
    assert pmap.descriptors().shape == (0, 16)

    pmap.add(q)
    results = pmap.query(q[0], k=10)
    assert len(results) == 1 and sorted(results[0].ids.tolist()) == [0, 1, 2]
    scores, ids = pmap.search(q[:1], 5)
    assert ids[0, :3].tolist() != [-1, -1, -1] and ids[0, 3:].tolist() == [-1, -1]
    assert np.isneginf(scores[0, 3:]).all()
    with pytest.raises(MapError, match="k must be a positive integer"):
        pmap.query(q, k=0)


def test_queries_and_saves_from_other_threads_while_adding(tmp_path):
    x = unit(2000, 16, seed=13)
    pmap = PlaceMap(16)  # exact, so every self-query must come back first
    pmap.add(x[:100])
    done = threading.Event()
    problems: list[str] = []

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not done.is_set():
            i = int(rng.integers(0, 100))
            (res,) = pmap.query(x[i], k=3)
            if res.ids[0] != i or res.entries[0].id != i:
                problems.append(f"query {i} gave {res.ids.tolist()}")

    def saver() -> None:
        while not done.is_set():
            pmap.save(tmp_path / "live")

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(2)] + [
        threading.Thread(target=saver)
    ]
    for t in threads:
        t.start()
    try:
        for start in range(100, 2000, 100):
            pmap.add(x[start : start + 100])
    finally:
        done.set()
        for t in threads:
            t.join(timeout=60)
    assert not problems, problems[:5]
    assert len(pmap) == 2000
    pmap.save(tmp_path / "live")
    assert len(PlaceMap.load(tmp_path / "live")) == 2000


# ---------------------------------------------------------------------------- input validation


def test_wrong_dimension_is_refused():
    pmap = PlaceMap(448, model="mobilenetv2_gem")
    with pytest.raises(MapError, match="descriptor dimension 512 does not match the map's 448"):
        pmap.add(np.zeros((2, 512), np.float32))
    pmap.add(unit(2, 448))
    with pytest.raises(MapError, match="descriptor dimension 512 does not match the map's 448"):
        pmap.query(np.zeros(512, np.float32))
    with pytest.raises(MapError, match="shape"):
        pmap.add(np.zeros((2, 2, 448), np.float32))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_descriptors_are_refused(bad):
    pmap = PlaceMap(8)
    x = unit(4, 8)
    x[2, 3] = bad
    with pytest.raises(MapError, match="NaN or infinite"):
        pmap.add(x)
    assert len(pmap) == 0 and pmap.next_id == 0
    pmap.add(unit(4, 8))
    with pytest.raises(MapError, match="NaN or infinite"):
        pmap.search(x, 2)


def test_bad_dtypes_and_entries_are_refused():
    pmap = PlaceMap(4)
    with pytest.raises(MapError, match="float"):
        pmap.add(np.ones((2, 4), np.int32))
    with pytest.raises(MapError, match="float"):
        pmap.add([["a", "b", "c", "d"]])
    with pytest.raises(MapError, match="3 entries for 2 descriptors"):
        pmap.add(unit(2, 4), [MapEntry(), MapEntry(), MapEntry()])
    with pytest.raises(MapError, match="position"):
        pmap.add(unit(1, 4), [MapEntry(position=(1.0, 2.0))])
    with pytest.raises(MapError, match="orientation"):
        pmap.add(unit(1, 4), [MapEntry(orientation=(0.0, 0.0, np.nan, 1.0))])
    with pytest.raises(MapError, match="MapEntry"):
        pmap.add(unit(1, 4), [{"stamp": 1.0}])
    assert len(pmap) == 0


def test_bad_construction_arguments():
    with pytest.raises(MapError, match="unknown index kind"):
        PlaceMap(8, "lsh")
    with pytest.raises(MapError, match="unknown parameter"):
        PlaceMap(8, "hnsw", efsearch=10)
    with pytest.raises(MapError, match="must divide"):
        PlaceMap(30, "ivfpq", m=8)
    with pytest.raises(MapError, match="min_train"):
        PlaceMap(32, "ivfpq", nlist=64, min_train=10)
    with pytest.raises(MapError, match="metric"):
        PlaceMap(8, metric="cosine")
    with pytest.raises(MapError, match="dimension"):
        PlaceMap(0)


# ---------------------------------------------------------------------------- index kinds, save/load


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_save_load_round_trip(tmp_path, kind):
    pmap, x = built(kind, n=400, M=16, efSearch=80) if kind == "hnsw" else built(kind, n=400)
    target = pmap.save(tmp_path / "place")
    assert target == tmp_path / "place.vprmap" == map_path(tmp_path / "place")
    names = sorted(p.name for p in target.iterdir() if not p.name.startswith("."))
    assert len(names) == 3 and names[2] == MANIFEST_NAME
    assert names[0].startswith("entries-") and names[1].startswith("index-")
    manifest = json.loads((target / MANIFEST_NAME).read_text())
    assert manifest["format"] == FORMAT_NAME and manifest["dim"] == 32 and manifest["count"] == 400
    assert manifest["model"] == "mobilenetv2_gem" and manifest["index"]["kind"] == kind
    assert manifest["files"]["index"]["name"] == names[1]

    loaded = PlaceMap.load(target, expected_dim=32, expected_model="mobilenetv2_gem")
    assert_same_map(pmap, loaded, unit(25, 32, seed=7))
    np.testing.assert_array_equal(loaded.descriptors(), x)
    if kind == "hnsw":
        assert loaded.params["efSearch"] == 80 and loaded.params["M"] == 16


def test_hnsw_recall_against_exact():
    x, q = unit(2000, 32, seed=5), unit(100, 32, seed=6)
    pmap = PlaceMap(32, "hnsw")
    pmap.add(x)
    scores, ids = pmap.search(q, 5)
    exact = np.argmax(q @ x.T, axis=1)
    assert np.mean(ids[:, 0] == exact) >= 0.9
    # hnsw reports real inner products (higher is better), like the flat index
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", q, x[ids]), rtol=1e-5, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 0).all()


def test_ivfpq_buffers_until_trained_then_recall_and_round_trip(tmp_path):
    d = 32
    x = clustered(4000, d, clusters=50, seed=0)
    noise = 0.1 * np.random.default_rng(3).standard_normal((300, d)).astype(np.float32)
    q = x[:300] + noise
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    pmap = PlaceMap(d, "ivfpq", model="m", **IVFPQ)
    assert pmap.params["min_train"] == 39 * 64

    # below min_train: vectors wait in an exact flat buffer; searches are exact
    pmap.add(x[:1000], some_entries(1000))
    assert pmap.active_index == "flat" and len(pmap) == 1000
    _, ids = pmap.search(q, 3)
    np.testing.assert_array_equal(ids, np.argsort(-(q @ x[:1000].T), axis=1)[:, :3])
    pmap.save(tmp_path / "buffered")
    buffered = PlaceMap.load(tmp_path / "buffered")
    assert buffered.active_index == "flat" and buffered.index_kind == "ivfpq"
    assert_same_map(pmap, buffered, q)

    # the add that reaches min_train trains on everything so far
    buffered.add(x[1000:], some_entries(3000, start=1000))
    assert buffered.active_index == "ivfpq" and len(buffered) == 4000
    exact = np.argsort(-(q @ x.T), axis=1)[:, :10]
    _, ids = buffered.search(q, 10)
    recall10 = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact, strict=True)])
    nn_in_top10 = np.mean([e[0] in a for a, e in zip(ids, exact, strict=True)])
    assert recall10 >= 0.6 and nn_in_top10 >= 0.9, (recall10, nn_in_top10)
    with pytest.raises(MapError, match="cannot be read back"):
        buffered.descriptors()

    buffered.save(tmp_path / "trained")
    trained = PlaceMap.load(tmp_path / "trained")
    assert trained.active_index == "ivfpq" and trained.params == buffered.params
    assert_same_map(buffered, trained, q)
    assert trained.entry(1234) == buffered.entry(1234)


def test_auto_switches_from_flat_to_hnsw(tmp_path):
    x = unit(120, 16, seed=8)
    pmap = PlaceMap(16, "auto", threshold=100)
    pmap.add(x[:99])
    assert pmap.active_index == "flat"
    pmap.add(x[99:])
    assert pmap.active_index == "hnsw" and pmap.index_kind == "auto"
    np.testing.assert_array_equal(pmap.descriptors(), x)
    np.testing.assert_array_equal(pmap.search(x, 1)[1][:, 0], np.arange(120))
    pmap.save(tmp_path / "auto")
    assert PlaceMap.load(tmp_path / "auto").active_index == "hnsw"


def test_auto_default_threshold_is_30k():
    assert PlaceMap(16, "auto").params["threshold"] == 30_000
    assert PlaceMap(16, "auto", threshold=500).params["threshold"] == 500


def test_scaled_ef_search_formula():
    assert [scaled_ef_search(n) for n in (0, 10_000, 300_000, 333_334, 1_000_000, 2_500_000)] == \
        [128, 128, 128, 129, 384, 960]


def test_search_threads_are_set_per_thread():
    """OpenMP thread counts are per thread: a worker must set its own (the main thread's is untouched)."""
    main_before = faiss.omp_get_max_threads()
    seen = {}

    def worker() -> None:
        set_search_threads(0)  # 0: keep the default
        seen["default"] = faiss.omp_get_max_threads()
        set_search_threads(1)
        seen["set"] = faiss.omp_get_max_threads()

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen["set"] == 1 and seen["default"] >= 1
    assert faiss.omp_get_max_threads() == main_before


def test_hnsw_ef_search_grows_with_the_map_unless_given(tmp_path, monkeypatch):
    """efSearch follows the map size when built, after each add and on load; an explicit value wins."""
    import vpr_ros.core.mapdb as mapdb

    monkeypatch.setattr(mapdb, "scaled_ef_search", lambda n: 100 + n)  # visible growth at test sizes
    x = unit(150, 16, seed=9)
    pmap = PlaceMap(16, "hnsw")
    assert pmap.params["efSearch"] is None
    pmap.add(x[:40])
    assert pmap.ef_search == 140
    pmap.add(x[40:100])
    assert pmap.ef_search == 200
    target = pmap.save(tmp_path / "scaled")
    assert json.loads((target / MANIFEST_NAME).read_text())["index"]["params"]["efSearch"] is None
    loaded = PlaceMap.load(target)
    assert loaded.ef_search == 200 and loaded.params == pmap.params
    assert PlaceMap.load(target, mmap=True).ef_search == 200
    loaded.add(x[100:])
    assert loaded.ef_search == 250

    fixed = PlaceMap(16, "hnsw", efSearch=80)
    fixed.add(x)
    assert fixed.ef_search == 80
    assert PlaceMap.load(fixed.save(tmp_path / "fixed")).ef_search == 80

    auto = PlaceMap(16, "auto", threshold=50)
    auto.add(x[:49])
    assert auto.active_index == "flat" and auto.ef_search is None
    auto.add(x[49:60])  # the rebuild as HNSW
    assert auto.active_index == "hnsw" and auto.ef_search == 160
    with pytest.raises(MapError, match="efSearch must be an integer"):
        PlaceMap(16, "hnsw", efSearch=0)


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_mmap_load_gives_identical_results(tmp_path, kind):
    pmap, _ = built(kind, n=600)
    target = pmap.save(tmp_path / kind)
    q = unit(30, 32, seed=11)
    plain = PlaceMap.load(target)
    mapped = PlaceMap.load(target, mmap=True)
    assert_same_map(plain, mapped, q)
    np.testing.assert_array_equal(plain.descriptors(), mapped.descriptors())
    assert mapped.read_only and not plain.read_only
    index_file = target / json.loads((target / MANIFEST_NAME).read_text())["files"]["index"]["name"]
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert str(index_file) in maps.read_text(), "the index file should be memory-mapped"
    with pytest.raises(MapError, match="read-only"):
        mapped.add(q)
    assert len(mapped) == len(plain)
    # a memory-mapped map can still be saved elsewhere, and over its own directory
    assert_same_map(plain, PlaceMap.load(mapped.save(tmp_path / "copy")), q)
    mapped.save(target)
    assert_same_map(plain, PlaceMap.load(target), q)
    assert_same_map(plain, mapped, q)


def test_mmap_load_of_ivfpq_reads_into_memory(tmp_path):
    pmap = PlaceMap(32, "ivfpq", **{**IVFPQ, "min_train": 2500})
    pmap.add(clustered(3000, 32, 40, seed=1), some_entries(3000))
    assert pmap.active_index == "ivfpq"
    target = pmap.save(tmp_path / "pq")
    mapped = PlaceMap.load(target, mmap=True)
    assert not mapped.read_only
    q = unit(30, 32, seed=11)
    assert_same_map(pmap, mapped, q)
    mapped.add(q)
    assert_same_map(mapped, PlaceMap.load(mapped.save(tmp_path / "pq2")), q)


def test_suffix_is_added_and_repeated_saves_leave_two_data_files(tmp_path):
    pmap = PlaceMap(8)
    for i in range(4):
        pmap.add(unit(10, 8, seed=i))
        pmap.save(tmp_path / "walk")
    target = tmp_path / "walk.vprmap"
    data = sorted(p.name for p in target.iterdir() if p.suffix in (".faiss", ".npz"))
    assert len(data) == 2 and not any(p.name.startswith(".tmp-") for p in target.iterdir())
    assert len(PlaceMap.load(tmp_path / "walk")) == len(PlaceMap.load(target)) == 40


# ---------------------------------------------------------------------------- load errors


@pytest.fixture()
def saved(tmp_path) -> Path:
    pmap, _ = built("flat", n=100)
    return pmap.save(tmp_path / "saved")


def _manifest(target: Path) -> dict:
    return json.loads((target / MANIFEST_NAME).read_text())


def _write_manifest(target: Path, manifest: dict) -> None:
    (target / MANIFEST_NAME).write_text(json.dumps(manifest))


def test_missing_path(tmp_path):
    with pytest.raises(MapError, match=f"no place map at {tmp_path / 'nowhere.vprmap'}"):
        PlaceMap.load(tmp_path / "nowhere")
    (tmp_path / "empty.vprmap").mkdir()
    with pytest.raises(MapError, match="manifest.json is missing"):
        PlaceMap.load(tmp_path / "empty.vprmap")


@pytest.mark.parametrize("which", ["index", "entries"])
def test_truncated_data_file_is_a_checksum_error(saved, which):
    data = saved / _manifest(saved)["files"][which]["name"]
    raw = data.read_bytes()
    data.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(MapError, match="checksum mismatch") as err:
        PlaceMap.load(saved)
    assert data.name in str(err.value) and "truncated or corrupt" in str(err.value)


def test_corrupt_byte_is_a_checksum_error(saved):
    data = saved / _manifest(saved)["files"]["index"]["name"]
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(MapError, match="checksum mismatch"):
        PlaceMap.load(saved)


def test_missing_data_file(saved):
    (saved / _manifest(saved)["files"]["entries"]["name"]).unlink()
    with pytest.raises(MapError, match="is missing"):
        PlaceMap.load(saved)


def _tamper(manifest: dict, how: str) -> dict | str:
    if how == "not json":
        return '{"format": "vpr_ros.map", '
    if how == "other format":
        manifest["format"] = "some.other.map"
    elif how == "count up":
        manifest["count"] += 1
    elif how == "count down":
        manifest["count"] -= 1
    elif how == "dim":
        manifest["dim"] = 64
    elif how == "sha":
        manifest["files"]["index"]["sha256"] = "0" * 64
    elif how == "path escape":
        manifest["files"]["index"]["name"] = "../../index-deadbeef.faiss"
    elif how == "missing field":
        del manifest["next_id"]
    elif how == "bad param":
        manifest["index"]["params"] = {"efSearch": 10}
    elif how == "kind mismatch":
        manifest["index"]["kind"] = manifest["index"]["active"] = "hnsw"
        manifest["index"]["params"] = {"M": 32, "efConstruction": 40, "efSearch": 64}
    elif how == "metric":
        manifest["metric"] = "l2"
    elif how == "list":
        return "[1, 2, 3]"
    return manifest


TAMPER_MESSAGES = {
    "not json": "cannot read map manifest",
    "other format": "not a vpr_ros place map",
    "count up": "count 101 / next_id 100 are inconsistent",
    "count down": "array 'ids' has shape",
    "dim": "does not match|expected shape",
    "sha": "checksum mismatch",
    "path escape": "malformed",
    "missing field": "next_id",
    "bad param": "unknown parameter",
    "kind mismatch": "IndexFlatIP",
    "metric": "metric",
    "list": "not a vpr_ros place map",
}


@pytest.mark.parametrize("how", sorted(TAMPER_MESSAGES))
def test_tampered_manifest_is_refused(saved, how):
    tampered = _tamper(_manifest(saved), how)
    (saved / MANIFEST_NAME).write_text(tampered if isinstance(tampered, str) else json.dumps(tampered))
    with pytest.raises(MapError, match=TAMPER_MESSAGES[how]):
        PlaceMap.load(saved)


@pytest.mark.parametrize("version", [2, 0, "1", None])
def test_unknown_format_version(saved, version):
    manifest = _manifest(saved)
    manifest["format_version"] = version
    _write_manifest(saved, manifest)
    with pytest.raises(MapError, match="format version"):
        PlaceMap.load(saved)


def test_expected_dim_and_model_mismatch(saved):
    with pytest.raises(MapError, match=r"32-dimensional.*but 448 were expected"):
        PlaceMap.load(saved, expected_dim=448)
    with pytest.raises(MapError, match=r"'mobilenetv2_gem'.*'resnet50_netvlad'"):
        PlaceMap.load(saved, expected_model="resnet50_netvlad")
    assert len(PlaceMap.load(saved, expected_dim=32, expected_model="mobilenetv2_gem")) == 100


def test_save_over_a_file_is_refused(tmp_path):
    (tmp_path / "x.vprmap").write_text("not a directory")
    with pytest.raises(MapError, match="not a directory|cannot create"):
        PlaceMap(4).save(tmp_path / "x")


# ---------------------------------------------------------------------------- crash safety


def test_leftover_files_of_an_uncommitted_save_are_harmless(tmp_path):
    old, x = built("flat", n=60)
    target = old.save(tmp_path / "crash")
    # a later save that crashed after writing its data files but before the manifest
    newer = PlaceMap.load(target)
    newer.add(unit(40, 32, seed=12), some_entries(40, start=60))
    other = newer.save(tmp_path / "other")
    for p in other.iterdir():
        if p.suffix in (".faiss", ".npz"):
            shutil.copy(p, target / p.name)
    (target / ".tmp-999-deadbeef.faiss").write_bytes(b"half a write")
    loaded = PlaceMap.load(target)
    assert_same_map(old, loaded, x[:10])
    # the next successful save removes what no manifest references
    newer.save(target)
    data = [p for p in target.iterdir() if p.suffix in (".faiss", ".npz")]
    assert len(data) == 2 and not (target / ".tmp-999-deadbeef.faiss").exists()
    assert len(PlaceMap.load(target)) == 100


def batch_like(i: int, n: int, d: int) -> tuple[np.ndarray, list[MapEntry]]:
    """The same batches the child processes generate."""
    x = np.random.default_rng(i).standard_normal((n, d)).astype(np.float32)
    return x, [MapEntry(stamp=float(i), source=f"batch{i}/{j}") for j in range(n)]


CHILD_PRELUDE = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from vpr_ros.core.mapdb import MapEntry, PlaceMap

    def batch(i, n, d):
        x = np.random.default_rng(i).standard_normal((n, d)).astype(np.float32)
        return x, [MapEntry(stamp=float(i), source=f"batch{i}/{j}") for j in range(n)]
    """
)


def _child(code: str, *args: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.Popen(
        [sys.executable, "-c", CHILD_PRELUDE + textwrap.dedent(code), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _check_batches(target: Path, n: int, d: int) -> int:
    """Load the map and check it holds whole batches 0..b-1 exactly; return b."""
    pmap = PlaceMap.load(target)
    assert len(pmap) % n == 0 and len(pmap) > 0
    batches = len(pmap) // n
    expected = np.concatenate([np.random.default_rng(i).standard_normal((n, d)) for i in range(batches)])
    np.testing.assert_array_equal(pmap.descriptors(), expected.astype(np.float32))
    entries = pmap.entries()
    assert [e.source for e in entries[::n]] == [f"batch{i}/0" for i in range(batches)]
    assert entries[-1].source == f"batch{batches - 1}/{n - 1}" and pmap.next_id == len(pmap)
    return batches


# os.replace calls in a save: 1 index file, 2 entries file, 3 manifest (the commit point)
@pytest.mark.parametrize("crash_at", ["before:1", "before:2", "before:3", "after:3"])
def test_sigkill_at_each_step_of_save(tmp_path, crash_at):
    target = tmp_path / "step.vprmap"
    pmap = PlaceMap(16)
    for i in range(2):
        x, e = batch_like(i, 50, 16)
        pmap.add(x, e)
    pmap.save(target)
    child = _child(
        """
        when, at = sys.argv[2].split(":")
        pmap = PlaceMap.load(sys.argv[1])
        pmap.add(*batch(2, 50, 16))
        real_replace, calls = os.replace, []
        def replace(src, dst):
            calls.append(dst)
            if when == "before" and len(calls) == int(at):
                os.kill(os.getpid(), signal.SIGKILL)
            real_replace(src, dst)
            if when == "after" and len(calls) == int(at):
                os.kill(os.getpid(), signal.SIGKILL)
        os.replace = replace
        pmap.save(sys.argv[1])
        print("save finished without a crash")
        """,
        str(target),
        crash_at,
    )
    out, err = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL, (child.returncode, out, err)
    assert _check_batches(target, 50, 16) == (3 if crash_at == "after:3" else 2)
    # the map stays writable: the next save succeeds and tidies the leftovers
    again = PlaceMap.load(target)
    again.add(unit(1, 16))
    again.save(target)
    assert len([p for p in target.iterdir() if p.suffix in (".faiss", ".npz")]) == 2


def test_sigkill_at_random_moments_during_a_loop_of_saves(tmp_path):
    """A real writer killed with SIGKILL at random times: the map on disk always loads whole."""
    target = tmp_path / "loop.vprmap"
    n, d = 3000, 128  # about 1.5 MB a batch, so saves take a good share of the loop
    rng = np.random.default_rng(2024)
    loop = """
        target = sys.argv[1]
        exists = os.path.exists(os.path.join(target, "manifest.json"))
        pmap = PlaceMap.load(target) if exists else PlaceMap(128)
        i = len(pmap) // 3000
        while True:
            pmap.add(*batch(i, 3000, 128))
            pmap.save(target)
            print(i, flush=True)
            i += 1
        """
    deadline = time.monotonic() + 8.0
    committed, rounds = 0, 0
    while rounds < 4 and time.monotonic() < deadline:
        child = _child(loop, str(target))
        try:
            line = child.stdout.readline()  # one save committed in this round
            assert line.strip().isdigit(), child.stderr.read()
            time.sleep(float(rng.uniform(0.0, 0.25)))
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait(timeout=30)
            child.stdout.close()
            child.stderr.close()
        batches = _check_batches(target, n, d)
        assert batches >= max(committed, int(line) + 1)
        committed = batches
        rounds += 1
    assert rounds >= 2 and committed >= rounds
