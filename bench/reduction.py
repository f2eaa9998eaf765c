"""Recall cost of PCA reduction (:mod:`vpr_ros.core.reduction`) on real descriptors of the student.

Datasets (real images through ``structvpr_mobilenetv2``; ``--weights`` a checkpoint, default the
ImageNet-initialised student):

``nordland_winter``  Nordland summer map, winter queries (every ``--every``-th frame; a match is
                     within +-2 frames of the 10x-subsampled sequence), the recipe's 32x64 input.
``nordland_jpeg10``  Nordland summer map, the same summer places as queries sent as JPEG quality
                     10 (the transmitted low-quality query of LoQI), +-2 frames.
``ie_tower``         IE tower gallery / queries (same area label = match), 180x320 input.

For each: recall@1/5 of the full 448-d descriptors and of PCA to k dims (fit on the map only,
plain and whitened, outputs L2-normalised), explained variance, bytes per map entry, and exact
(flat) search time per query, full vs reduced, measured in alternation.

    python bench/reduction.py [--dims 256,128,64,32] [--weights path.pt] [--every 2]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import _common as C  # first: sets sys.path and TORCH_HOME
import numpy as np

from vpr_ros.core.extract import DescriptorExtractor
from vpr_ros.core.models import parse_size, resolve_model
from vpr_ros.core.reduction import PCA
from vpr_ros.core.transmission import TransmissionConfig, Transmitter
from vpr_ros.data.places import load_dataset
from vpr_ros.eval.metrics import recall_at_n

NAME = "reduction"


def describe(ext: DescriptorExtractor, records, transform=None) -> np.ndarray:
    return ext.extract_stream(records, load=lambda r: r.load(), transform=transform, total=len(records),
                              progress=False).descriptors


def recall(q: np.ndarray, db: np.ndarray, positives) -> dict[int, float]:
    top = np.argsort(-(q @ db.T), axis=1)[:, :5]
    r = recall_at_n(top, positives)
    return {1: float(r[1]), 5: float(r[5])}


def flat_ms(q: np.ndarray, db: np.ndarray) -> float:
    import faiss

    idx = faiss.IndexFlatIP(db.shape[1])
    idx.add(np.ascontiguousarray(db, np.float32))
    q = np.ascontiguousarray(q, np.float32)
    t0 = time.perf_counter()
    for i in range(len(q)):
        idx.search(q[i : i + 1], 5)
    return (time.perf_counter() - t0) * 1000 / len(q)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", default="256,128,64,32")
    ap.add_argument("--weights", default=None, help="checkpoint (.pt); default: ImageNet-initialised student")
    ap.add_argument("--every", type=int, default=2, help="use every N-th Nordland place")
    ap.add_argument("--datasets", default="nordland_winter,nordland_jpeg10,ie_tower")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    import faiss

    faiss.omp_set_num_threads(1)  # one query per call; see bench/retrieval.py
    mach = C.machine("torch", "faiss", "numpy")
    print("machine:", mach)
    dims = [int(d) for d in args.dims.split(",")]
    rows = []
    with C.LoadSampler() as load:
        for name in args.datasets.split(","):
            if name.startswith("nordland"):
                ds = load_dataset("nordland", C.SHARED / "data" / "nordland_64x32", every=args.every)
                size = parse_size("32x64")
            else:
                ds = load_dataset("ie_tower", C.SHARED / "data" / "ie_tower")
                size = parse_size("180x320")
            model = resolve_model(args.weights, None if args.weights else "structvpr_mobilenetv2",
                                  input_size=size)
            ext = DescriptorExtractor(model, device="cpu", batch_size=64, backend="onnx",
                                      cache_dir=str(C.REPO / ".cache" / "onnx"))
            t0 = time.perf_counter()
            db = describe(ext, ds.database)
            positives = ds.positives()
            if name == "nordland_jpeg10":  # the map's own places as low-quality queries
                tx = Transmitter(TransmissionConfig.parse("jpeg:10"))
                q = describe(ext, ds.database, transform=lambda im, tx=tx: tx.process(im).image)
                idx = np.arange(len(ds.database))
                positives = [idx[np.abs(idx - i) <= 2] for i in idx]
            else:
                q = describe(ext, ds.queries)
            assert len(db) == len(ds.database) and len(q) == len(positives), "skipped images"
            print(f"{name}: {len(db)} map, {len(q)} queries described in {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr, flush=True)
            full = recall(q, db, positives)
            variants = {"full": (q, db)}
            fitted = {}
            for k in dims:
                for white in (False, True):
                    pca = PCA.fit(db, k, whiten=white)
                    label = f"pca{k}{'w' if white else ''}"
                    variants[label] = (pca(q), pca(db))
                    fitted[label] = pca
            times = C.interleaved({k: (lambda v=v: flat_ms(*v)) for k, v in variants.items()}, 3,
                                  progress=False)
            for label, (qq, dd) in variants.items():
                r = full if label == "full" else recall(qq, dd, positives)
                pca = fitted.get(label)
                rows.append({
                    "dataset": name, "variant": label, "dim": dd.shape[1], "map": len(dd), "queries": len(qq),
                    "recall1": r[1], "recall5": r[5], "d_recall1": r[1] - full[1],
                    "d_recall5": r[5] - full[5],
                    "explained": pca.explained_variance_ratio if pca else 1.0,
                    "bytes_per_entry": 4 * dd.shape[1], "flat_ms": C.median(times[label]),
                    "flat_vs_full": C.paired_ratio(times[label], times["full"]),
                })
                print(f"  {label:8s} R@1 {r[1]:.3f} ({r[1] - full[1]:+.3f})  "
                      f"R@5 {r[5]:.3f} ({r[5] - full[5]:+.3f})", flush=True)
    summary = load.summary()
    print()
    print(C.describe_machine(mach, summary))
    print(C.table(rows, ["dataset", "variant", "dim", "recall1", "d_recall1", "recall5", "d_recall5",
                         "explained", "bytes_per_entry", "flat_vs_full"],
                  ["dataset", "variant", "dim", "R@1", "ΔR@1", "R@5", "ΔR@5", "explained var",
                   "bytes/entry", "flat search ÷ full"]))
    if not args.no_record:
        C.record(NAME, {"machine": mach, "load": summary, "weights": args.weights or "imagenet",
                        "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
