"""Print condensed markdown tables of the latest run of each benchmark in ``bench/results.json``
(what bench/README.md shows). ``--run N`` picks an older run (0 = first, -1 = latest).

    python bench/report.py [extraction|node_e2e|retrieval|reduction|training ...] [--run -1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict

import _common as C


def load_line(run: dict) -> str:
    return f"_{run['time']}, argv `{' '.join(run.get('argv', [])) or '(defaults)'}`: " + \
        C.describe_machine(run["machine"], run.get("load")) + "_"


def extraction(run: dict) -> str:
    rows = defaultdict(dict)
    for r in run["rows"]:
        rows[(r["size"], r["batch"])][r["variant"]] = r
    names = ["torch_eager", "torch_cl", "onnx", "torch_cl@1t", "onnx@1t"]
    out = []
    for (size, batch), v in rows.items():
        row = {"size": size, "batch": batch, "bare": v["bare"]["ms_per_image"],
               "bare1t": v.get("bare@1t", {}).get("ms_per_image")}
        for n in names:
            if n in v:
                row[n] = f"{v[n]['ms_per_image']:.3g} (×{v[n]['ratio_vs_bare']:.2f})"
        out.append(row)
    return C.table(out, ["size", "batch", "bare", "bare1t", *names],
                   ["W×H", "batch", "bare ms/img", "bare@1t", *[f"{n} ms (÷ bare)" for n in names]])


def node_e2e(run: dict) -> str:
    out = []
    for r in run["rows"]:
        out.append({**r, "run": r.get("run", 0)})
    return C.table(out, ["backend", "run", "offered_hz", "sustained_hz", "p50_ms", "p99_ms", "drops", "sent",
                         "node_rss_mib", "node_cpu_ms_per_frame", "node_cpu_cores", "node_vs_bare_backend",
                         "bare_backend_hz", "bare_eager_hz"],
                   ["config", "run", "offered Hz", "sustained Hz", "p50 ms", "p99 ms", "drops", "sent",
                    "RSS MiB", "node CPU ms/frame", "node cores", "node max ÷ bare loop", "bare loop Hz",
                    "bare eager Hz"])


def node_summary(run: dict) -> str:
    by = defaultdict(list)
    for r in run["rows"]:
        by[(r["backend"], r.get("run", 0))].append(r)
    agg = defaultdict(list)
    for (cfg, _), phases in by.items():
        ok30 = [p for p in phases if p["offered_hz"] == 30]
        clean = [p["sustained_hz"] for p in phases if p["drops"] <= 0.01 * p["sent"]]
        agg[cfg].append({"max": phases[0]["node_max_hz"], "ratio": phases[0]["node_vs_bare_backend"],
                         "bare": phases[0]["bare_backend_hz"], "eager": phases[0]["bare_eager_hz"],
                         "clean": max(clean) if clean else 0.0,
                         "p50_30": ok30[0]["p50_ms"] if ok30 else None,
                         "p99_30": ok30[0]["p99_ms"] if ok30 else None,
                         "cpu_30": ok30[0].get("node_cpu_ms_per_frame") if ok30 else None,
                         "bare_cpu": phases[0].get("bare_backend_cpu_ms"),
                         "rss": max(p["node_rss_mib"] or 0 for p in phases)})
    out = []
    for cfg, runs in agg.items():
        def med(k: str, runs: list = runs) -> float | None:
            vals = [r[k] for r in runs if r[k] is not None]
            return statistics.median(vals) if vals else None
        out.append({"cfg": cfg, "runs": len(runs), **{k: med(k) for k in runs[0]},
                    "per_run": " / ".join(f"{r['max']:.0f}" for r in runs)})
    return C.table(out, ["cfg", "runs", "clean", "max", "per_run", "bare", "ratio", "eager", "p50_30",
                         "p99_30", "cpu_30", "bare_cpu", "rss"],
                   ["config", "runs", "highest rate with ≤1% drops, Hz", "node max Hz (median)", "per run",
                    "bare loop Hz", "node max ÷ bare loop", "bare eager Hz", "p50 ms @30 Hz", "p99 ms @30 Hz",
                    "node CPU ms/frame @30 Hz", "bare loop CPU ms/frame", "max RSS MiB"])


def retrieval(run: dict) -> str:
    out = [r for r in run["rows"] if r["index"] == "flat" or r["index"].startswith(("hnsw", "ivfpq"))]
    return C.table(out, ["N", "index", "build_s", "p50_ms", "p99_ms", "recall1", "recall10", "index_mib",
                         "rss_mib"],
                   ["N", "index / search setting", "build s", "p50 ms", "p99 ms", "R@1 vs exact", "R@10",
                    "index MiB", "RSS +MiB"])


def reduction(run: dict) -> str:
    return C.table(run["rows"], ["dataset", "variant", "dim", "recall1", "d_recall1", "recall5", "d_recall5",
                                 "explained", "bytes_per_entry", "flat_vs_full"],
                   ["dataset", "variant", "dim", "R@1", "ΔR@1", "R@5", "ΔR@5", "explained var", "bytes/entry",
                    "flat search ÷ full"])


def training(run: dict) -> str:
    return C.table(run["rows"], ["variant", "size", "tuples", "images_per_tuple", "step_ms", "samples_per_s",
                                 "throughput_vs_bare"],
                   ["variant", "W×H", "tuples/step", "images/tuple", "ms/step", "tuples/s",
                    "throughput ÷ bare"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*",
                    default=["extraction", "node_e2e", "retrieval", "reduction", "training"])
    ap.add_argument("--run", type=int, default=-1)
    args = ap.parse_args()
    data = json.loads(C.RESULTS.read_text())
    for name in args.names:
        if name not in data:
            print(f"## {name}: no runs recorded\n")
            continue
        run = data[name][args.run]
        print(f"## {name}\n\n{load_line(run)}\n")
        if name == "node_e2e":
            print(node_summary(run) + "\n")
        print(globals()[name](run) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
