"""Per-frame cost of sequence matching (:class:`vpr_ros.core.sequence.SequenceMatcher`) at 1k-100k places.

The goal (issue #18): the matcher adds < 1 ms per frame at 10k places on 2 CPU cores. Each frame is
one ``push`` of its top-K map candidates into the rolling buffer plus the line search, the work the
localizer adds per frame when ``sequence_length`` > 0. Its cost does not depend on the map size by
construction (O(L K V)); the map size enters only through the candidates' id range, which is why it is
measured at 1k, 10k and 100k places anyway. For scale, the single-frame search the node already does
(faiss flat inner product, one query, top-K, 448-d, one thread as the node runs it) is timed in
alternation at the same sizes, and the ratio matcher / search is reported.

Streams are synthetic but shaped like real ones: the true place advances 0.8-1.25 places per frame,
and each frame's K candidates hold it (most frames) among places near it and random places of the
whole map, with descending similarities.

    python bench/sequence.py [--sizes 1000,10000,100000] [--lengths 5,10,20] [--repeats 7]
"""

from __future__ import annotations

import argparse
import time

import _common as C  # first: sets sys.path
import numpy as np

from vpr_ros.core.mapdb import set_search_threads
from vpr_ros.core.sequence import SequenceConfig, SequenceMatcher

NAME = "sequence"
DIM = 448  # the packaged student's descriptor
K = 50  # SequenceConfig.candidates default


def stream(n_places: int, frames: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``frames`` frames of top-``k`` candidates (unique ids) and descending similarities."""
    rng = np.random.default_rng(seed)
    true = np.cumsum(rng.uniform(0.8, 1.25, frames)).astype(np.int64) % n_places
    ids = np.empty((frames, k), np.int64)
    for t in range(frames):
        near = true[t] + rng.integers(-5, 6, k // 4)
        cand = np.unique(np.concatenate([[true[t]] if rng.random() < 0.7 else [], near,
                                         rng.integers(0, n_places, 2 * k)]).astype(np.int64) % n_places)
        cand = cand[rng.permutation(len(cand))][:k]
        ids[t, : len(cand)] = cand
        ids[t, len(cand):] = -1
    scores = -np.sort(-rng.uniform(0.2, 0.9, (frames, k)), axis=1)
    return ids, scores


def time_matcher(length: int, ids: np.ndarray, scores: np.ndarray) -> list[float]:
    """Per-frame seconds of ``push`` over the stream, after a warm-up that fills the buffer."""
    m = SequenceMatcher(SequenceConfig(length=length, candidates=ids.shape[1]))
    for t in range(length):
        m.push(ids[t], scores[t])
    out = []
    for t in range(length, len(ids)):
        t0 = time.perf_counter()
        m.push(ids[t], scores[t])
        out.append(time.perf_counter() - t0)
    return out


def time_search(index, queries: np.ndarray, k: int) -> list[float]:
    out = []
    for i in range(len(queries)):
        q = queries[i : i + 1]
        t0 = time.perf_counter()
        index.search(q, k)
        out.append(time.perf_counter() - t0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--lengths", default="5,10,20")
    ap.add_argument("--frames", type=int, default=300, help="frames per measurement")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    import faiss

    sizes = [int(s) for s in args.sizes.split(",")]
    lengths = [int(s) for s in args.lengths.split(",")]
    set_search_threads(1)
    machine = C.machine("numpy", "faiss")
    rng = np.random.default_rng(0)
    streams, indexes, queries, variants = {}, {}, {}, {}
    for n in sizes:
        streams[n] = stream(n, args.frames + max(lengths), K, seed=n)
        db = rng.standard_normal((n, DIM)).astype(np.float32)
        db /= np.linalg.norm(db, axis=1, keepdims=True)
        indexes[n] = faiss.IndexFlatIP(DIM)
        indexes[n].add(db)
        noise = 0.1 * rng.standard_normal((args.frames, DIM)).astype(np.float32)
        queries[n] = db[rng.integers(0, n, args.frames)] + noise
        variants[f"search@{n}"] = lambda n=n: time_search(indexes[n], queries[n], K)
        for length in lengths:
            variants[f"L{length}@{n}"] = lambda n=n, length=length: time_matcher(length, *streams[n])
    per_frame: dict[str, list[list[float]]] = {k: [] for k in variants}

    def timed(name: str) -> float:
        times = variants[name]()
        per_frame[name].append(times)
        return C.median(times)

    print(f"machine: {machine['cpu']}, {machine['usable_cores']} usable cores, load {C.loadavg()}")
    with C.LoadSampler() as load:
        medians = C.interleaved({k: (lambda k=k: timed(k)) for k in variants}, args.repeats)
    rows = []
    for n in sizes:
        search = medians[f"search@{n}"]
        for length in lengths:
            key = f"L{length}@{n}"
            flat = [t for run in per_frame[key] for t in run]
            rows.append({"places": n, "L": length, "K": K,
                         "ms_p50": 1000 * C.median(medians[key]), "ms_p90": 1000 * C.pct(flat, 90),
                         "search_ms_p50": 1000 * C.median(search),
                         "ratio_to_search": C.paired_ratio(medians[key], search),
                         "goal_1ms": (1000 * C.median(medians[key]) < 1.0) if n == 10_000 else None})
    summary = load.summary()
    print()
    cols = ["places", "L", "K", "ms_p50", "ms_p90", "search_ms_p50", "ratio_to_search", "goal_1ms"]
    heads = ["places", "L", "K", "matcher ms/frame (median)", "p90", "flat search ms (K=50)",
             "matcher / search", "< 1 ms at 10k"]
    print(C.table(rows, cols, heads))
    print("\n" + C.describe_machine(machine, summary))
    C.record(NAME, {"machine": machine, "load": summary, "frames": args.frames, "repeats": args.repeats,
                    "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
