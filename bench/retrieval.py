"""Place-map retrieval at scale: flat / HNSW / IVF-PQ through :class:`vpr_ros.core.mapdb.PlaceMap`.

Data: synthetic 448-d descriptors (the student's dimension), L2-normalised, clustered and
anisotropic like real ones: cluster centres and within-cluster offsets are drawn with a
decaying spectrum (std of component i ~ i^-0.75) in a random rotation, ``N / 200`` clusters.
Queries are database points moved by noise as large as the within-cluster spread (a revisit,
not a duplicate), so the exact top-1 has close competitors (the median top-1/top-2 score gap is
printed). Recall@1 is measured against exact search (IndexFlatIP) on the same map.

Per size: build time (``PlaceMap.add`` in 100k chunks), single-query top-10 latency p50/p99
(``PlaceMap.search``, one query per call, as a localizer asks; faiss with one OpenMP thread while
querying unless ``--search-threads``), recall@1 and @10 versus exact,
and memory (RSS growth of the process while the index was built, and the index's own bytes).
HNSW is swept over ``efSearch`` on each built index (M and efConstruction from ``--hnsw``; the sweep
always includes PlaceMap's own default for N, :func:`~vpr_ros.core.mapdb.scaled_ef_search`), IVF-PQ over
``nprobe`` (``nlist`` = sqrt(N) rounded to a power of two — 4 sqrt(N) makes the k-means training
take tens of minutes on 2 cores at 300k —, m = 56 sub-quantizers of 8 dims, 8 bits; trained on
PlaceMap's sample of at most 256 max(nlist, 256) vectors). Query rounds alternate between indexes
so all see the same load.

    python bench/retrieval.py                 # 1k, 10k, 30k, 100k, 300k
    python bench/retrieval.py --full          # ... and 1M (about 6 GB of RAM, tens of minutes)
    python bench/retrieval.py --sizes 1000,10000 --queries 300
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time

import _common as C  # first: sets sys.path
import faiss
import numpy as np

from vpr_ros.core.mapdb import PlaceMap, scaled_ef_search

NAME = "retrieval"
DIM = 448


def make_data(n: int, n_queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(database (n, 448), queries (n_queries, 448)), float32, L2-normalised; see the module doc."""
    rng = np.random.default_rng(seed)
    rot, _ = np.linalg.qr(rng.standard_normal((DIM, DIM)))
    rot = rot.astype(np.float32)
    spec = (np.arange(1, DIM + 1, dtype=np.float32) ** -0.75)
    spec /= np.linalg.norm(spec)
    k = max(8, n // 200)
    centres = rng.standard_normal((k, DIM), dtype=np.float32) * spec
    spread = 0.6
    db = np.empty((n, DIM), np.float32)
    chunk = 100_000
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        z = centres[rng.integers(0, k, m)] + spread * rng.standard_normal((m, DIM), dtype=np.float32) * spec
        db[s : s + m] = z @ rot.T
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    src = rng.choice(n, n_queries, replace=False)
    q = db[src] @ rot  # back to the spectral frame to add noise of the same shape, then rotate again
    q = (q + spread * rng.standard_normal((n_queries, DIM), dtype=np.float32) * spec) @ rot.T
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return np.ascontiguousarray(db), np.ascontiguousarray(q.astype(np.float32))


def ivf_params(n: int) -> dict[str, int]:
    nlist = 2 ** max(4, round(math.log2(math.sqrt(n))))
    return {"nlist": nlist, "m": 56, "nbits": 8, "min_train": min(n, 39 * nlist)}


def index_bytes(kind: str, n: int, params: dict) -> int:
    if kind == "flat":
        return 4 * DIM * n
    if kind == "hnsw":  # vectors + level-0 links (2M int32) + upper levels (~M/(M-1) share)
        return 4 * DIM * n + int(n * 2 * params["M"] * 4 * 1.07)
    return n * (params["m"] * params["nbits"] // 8 + 8) + 4 * DIM * params["nlist"] + 4 * DIM * 256


def build(kind: str, db: np.ndarray, params: dict) -> tuple[PlaceMap, float, float]:
    gc.collect()
    rss0 = C.rss_mb()
    t0 = time.perf_counter()
    pmap = PlaceMap(DIM, kind, model="synthetic", **params)
    for s in range(0, len(db), 100_000):
        pmap.add(db[s : s + 100_000])
    return pmap, time.perf_counter() - t0, C.rss_mb() - rss0


def timed_search(pmap: PlaceMap, q: np.ndarray, k: int = 10) -> tuple[np.ndarray, list[float]]:
    ids = np.empty((len(q), k), np.int64)
    lat = []
    for i in range(len(q)):
        t0 = time.perf_counter()
        _, ids[i] = pmap.search(q[i : i + 1], k)
        lat.append((time.perf_counter() - t0) * 1000.0)
    return ids, lat


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000,30000,100000,300000")
    ap.add_argument("--full", action="store_true", help="add 1,000,000 entries")
    ap.add_argument("--queries", type=int, default=1000, help="queries per size (recall and latency)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating latency rounds over the queries")
    ap.add_argument("--hnsw", default="16:40,32:40,32:100",
                    help="HNSW indexes to build as M:efConstruction (PlaceMap's default is 32:40)")
    ap.add_argument("--flat-queries", type=int, default=100,
                    help="queries timed on the flat index from 100k entries up (it is exact and slow)")
    ap.add_argument("--ef-search", default="16,32,64,128,256")
    ap.add_argument("--nprobe", default="8,16,32,64")
    ap.add_argument("--search-threads", type=int, default=1,
                    help="faiss OpenMP threads while querying (default 1: one query per call, and on shared "
                         "cores 2 OpenMP threads make a 10k flat search 40x slower); 0 = faiss default")
    ap.add_argument("--build-threads", type=int, default=1,
                    help="faiss OpenMP threads while building (default 1: on shared cores IVF-PQ training "
                         "took 3x longer with 2 threads); 0 = faiss default")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")] + ([1_000_000] if args.full else [])
    default_threads = faiss.omp_get_max_threads()
    mach = C.machine("faiss", "numpy")
    mach["faiss_threads"] = {"search": args.search_threads or default_threads,
                             "build": args.build_threads or default_threads}
    print("machine:", mach)
    rows = []
    with C.LoadSampler() as load:
        for n in sizes:
            nq = min(args.queries, n)
            t0 = time.perf_counter()
            db, q = make_data(n, nq, seed=n)
            exact_idx = faiss.IndexFlatIP(DIM)
            exact_idx.add(db)
            exact_scores, exact = exact_idx.search(q, 10)
            del exact_idx
            gap = float(np.median(exact_scores[:, 0] - exact_scores[:, 1]))
            print(f"\nN={n}: data + exact top-10 in {time.perf_counter() - t0:.1f} s; median top1-top2 score "
                  f"gap {gap:.4f}, median top-1 score {np.median(exact_scores[:, 0]):.3f}", flush=True)
            maps: dict[str, tuple[PlaceMap, dict]] = {}
            builds: dict[str, tuple[float, float, dict]] = {}
            specs = [("flat", "flat", {})]
            for spec in args.hnsw.split(","):
                m, efc = (int(v) for v in spec.split(":"))
                specs.append((f"hnsw_M{m}_efc{efc}", "hnsw", {"M": m, "efConstruction": efc, "efSearch": 64}))
            if n >= 10_000:
                specs.append(("ivfpq", "ivfpq", ivf_params(n)))
            faiss.omp_set_num_threads(args.build_threads or default_threads)
            for label, kind, params in specs:
                pmap, secs, rss = build(kind, db, params)
                print(f"  built {label:10s} ({pmap.active_index}) in {secs:7.1f} s, RSS +{rss:.0f} MiB",
                      flush=True)
                maps[label] = (pmap, params)
                builds[label] = (secs, rss, pmap.params)
            # search-time settings to sweep on each built index
            settings: list[tuple[str, str, str, int | None]] = [("flat", "flat", "", None)]
            for label in maps:
                if label.startswith("hnsw"):
                    efs = sorted({int(e) for e in args.ef_search.split(",")} | {scaled_ef_search(n)})
                    settings += [(f"{label}/ef{e}", label, "efSearch", e) for e in efs]
                elif label == "ivfpq":
                    settings += [(f"ivfpq/np{p}", label, "nprobe", int(p)) for p in args.nprobe.split(",")
                                 if int(p) <= maps[label][0].params["nlist"]]
            faiss.omp_set_num_threads(args.search_threads or default_threads)
            lat: dict[str, list[float]] = {s[0]: [] for s in settings}
            found: dict[str, np.ndarray] = {}
            for r in range(args.rounds):
                order = settings[r % len(settings):] + settings[: r % len(settings)]
                for name, label, knob, value in order:
                    pmap = maps[label][0]
                    if knob == "efSearch":
                        pmap._index.hnsw.efSearch = value  # sweep on the built index (bench only)
                    elif knob == "nprobe":
                        pmap._index.nprobe = value
                    qq = q[: args.flat_queries] if label == "flat" and n >= 100_000 else q
                    ids, t = timed_search(pmap, qq)
                    lat[name] += t
                    found[name] = ids
                print(f"  latency round {r + 1}/{args.rounds} (load {C.loadavg()[0]})", file=sys.stderr,
                      flush=True)
            flat_p50 = C.pct(lat["flat"], 50)
            for name, label, knob, value in settings:
                secs, rss, params = builds[label]
                kind = "flat" if label == "flat" else ("ivfpq" if label == "ivfpq" else "hnsw")
                row = {
                    "N": n, "index": name, "build_s": secs, "rss_mib": rss,
                    "index_mib": index_bytes(kind, n, params) / 2**20,
                    "p50_ms": C.pct(lat[name], 50), "p99_ms": C.pct(lat[name], 99),
                    "p50_vs_flat": C.pct(lat[name], 50) / flat_p50,
                    "recall1": float((found[name][:, 0] == exact[: len(found[name]), 0]).mean()),
                    "recall10": float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found[name], exact,
                                                                                          strict=False)])),
                    "params": {k: v for k, v in params.items() if v is not None}
                    | ({knob: value} if knob else {}),
                    "placemap_default_ef": knob == "efSearch" and value == scaled_ef_search(n),
                }
                rows.append(row)
                print(f"  {name:16s} p50 {row['p50_ms']:7.3f} ms  p99 {row['p99_ms']:7.3f} ms  "
                      f"R@1 {row['recall1']:.3f}  R@10 {row['recall10']:.3f}", flush=True)
            del maps, db, q
            gc.collect()
    summary = load.summary()
    print()
    print(C.describe_machine(mach, summary))
    print(C.table(rows, ["N", "index", "build_s", "p50_ms", "p99_ms", "p50_vs_flat", "recall1", "recall10",
                         "index_mib", "rss_mib"],
                  ["N", "index", "build s", "p50 ms", "p99 ms", "p50 ÷ flat", "R@1 vs exact", "R@10",
                   "index MiB", "RSS +MiB"]))
    if not args.no_record:
        C.record(NAME, {"machine": mach, "load": summary, "queries": args.queries, "rounds": args.rounds,
                        "sizes": sizes, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
