"""The default student on a CUDA GPU: latency of torch fp32 / fp16 against ONNX Runtime on CPU cores of the
same machine, agreement with the CPU reference, and corridor R@1 through the standard links.

Variants (RGB uint8 frames in, preprocessing included, as a node pays it; ``make_backend``):
``cpu_onnx`` ONNX Runtime, CPU provider, ``--threads`` intra-op threads (2: the robot computer this project
is measured on; what ``backend: auto`` runs without a GPU); ``cuda_fp32`` torch on the GPU (channels_last;
what ``auto`` runs with one) and ``cuda_fp16`` (``precision: fp16``). Every repeat times each variant in a
shuffled order; ratios are per repeat, medians over repeats. Results: bench/README.md section 8.

Accuracy: the RTAB-Map corridor (84 real frames) described by each variant against torch fp32 on the CPU
(max |difference|, minimum cosine), and R@1 of the study's corridor split (frames 1-40 the map, 41-84 the
queries) clean and through each standard link of the cross-domain study (links run once, on the CPU).

    python bench/gpu.py [--weights default] [--sizes 240x320,480x640] [--batches 1,32] [--repeats 9]
"""

from __future__ import annotations

import argparse
import sys
import time

import _common as C  # first: sets sys.path and TORCH_HOME
import cv2
import numpy as np
import torch

from vpr_ros.core.backends import make_backend
from vpr_ros.core.images import load_image
from vpr_ros.core.models import parse_size, resolve_model
from vpr_ros.core.transmission import STANDARD_LINKS, TransmissionConfig, Transmitter
from vpr_ros.data.places import load_rtabmap_loop, rtabmap_revisit
from vpr_ros.eval.metrics import recall_at_n

NAME = "gpu"


def corridor(shared):
    """The study's corridor split and its frames (RGB uint8, as read)."""
    ds = rtabmap_revisit(load_rtabmap_loop(shared / "data" / "rtabmap_loop"))
    return ds, [load_image(r.path) for r in ds.database], [load_image(r.path) for r in ds.queries]


def r_at_1(db_desc: np.ndarray, q_desc: np.ndarray, positives) -> float:
    top = np.argmax(q_desc @ db_desc.T, axis=1)[:, None]
    return 100.0 * recall_at_n(top, positives, ns=(1,))[1]


def agreement(a: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    cos = np.sum(a * ref, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(ref, axis=1))
    return float(np.abs(a - ref).max()), float(cos.min())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default="default", help="a packaged key, a checkpoint, or a model name")
    ap.add_argument("--sizes", default="240x320,480x640", help="HxW list the model runs at")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime CPU threads")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--runs", type=int, default=20, help="calls per repeat and variant (batch 1)")
    ap.add_argument("--device", default="cuda", help="cpu only checks the script (no fp16 variant)")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    machine = C.machine("torch", "onnxruntime")
    model = resolve_model(args.weights)
    print(f"{args.weights}: {model.name} at {model.preprocess.input_size}, GPU {machine.get('cuda')}",
          file=sys.stderr)

    def gpu_variants(m, batch: int = 32) -> dict:
        out = {"cpu_onnx": make_backend(m, "onnx", device="cpu", threads=args.threads, max_batch=batch),
               "cuda_fp32": make_backend(m, "torch", device=args.device, max_batch=batch)}
        if args.device.startswith("cuda"):
            out["cuda_fp16"] = make_backend(m, "torch", device=args.device, precision="fp16", max_batch=batch)
        return out

    # --- accuracy at the model's own input size
    ds, db, qs = corridor(C.SHARED)
    positives = ds.positives()
    ref = make_backend(model, "torch", device="cpu", channels_last=False)
    variants = gpu_variants(model)
    frames = db + qs  # the study sends the whole sequence through the link, in order
    backends = {"cpu_torch": ref, **variants}
    clean = {k: b(frames) for k, b in backends.items()}
    agree = {k: dict(zip(("max_abs", "min_cos"), agreement(clean[k], clean["cpu_torch"]), strict=True))
             for k in variants}
    db_desc = {k: d[: len(db)] for k, d in clean.items()}  # the map as recorded, described once
    recall: dict[str, dict[str, float]] = {}
    for spec in STANDARD_LINKS:
        tx = Transmitter(TransmissionConfig.parse(spec))  # the study's stream: the whole sequence, in order
        rq = [tx.process(im).image for im in frames][len(db):]  # the queries as received
        recall[spec] = {k: r_at_1(db_desc[k], b(rq), positives) for k, b in backends.items()}
    print("\nagreement with torch fp32 on the CPU (84 corridor frames):")
    for k, a in agree.items():
        print(f"  {k:10s} max |diff| {a['max_abs']:.2e}  min cos {a['min_cos']:.6f}")
    names = list(backends)
    print(C.table([{"link": lb, **{k: f"{v[k]:.1f}" for k in names}} for lb, v in recall.items()],
                  ["link", *names]))

    # --- latency per size and batch
    rows = []
    frame = cv2.resize(qs[0], (640, 480), interpolation=cv2.INTER_AREA)  # a 640x480 camera frame
    for size in [parse_size(s) for s in args.sizes.split(",")]:
        m = resolve_model(args.weights, input_size=size)
        for batch in [int(b) for b in args.batches.split(",")]:
            bs = gpu_variants(m, batch)
            images = [frame] * batch
            runs = max(2, args.runs // batch)
            for b in bs.values():
                for _ in range(3):
                    b(images)

            def timer(b, images=images, runs=runs, batch=batch):
                def run() -> float:
                    t = time.perf_counter()
                    for _ in range(runs):
                        b(images)  # returns numpy: the GPU work is done when it returns
                    return (time.perf_counter() - t) / (runs * batch) * 1000
                return run

            ms = C.interleaved({k: timer(b) for k, b in bs.items()}, args.repeats, progress=False)
            row = {"size": f"{size[0]}x{size[1]}", "batch": batch,
                   **{f"{k}_ms": C.median(v) for k, v in ms.items()},
                   "fp32_vs_cpu": C.paired_ratio(ms["cuda_fp32"], ms["cpu_onnx"])}
            if "cuda_fp16" in ms:
                row["fp16_vs_fp32"] = C.paired_ratio(ms["cuda_fp16"], ms["cuda_fp32"])
            rows.append(row)
            print(f"  {row['size']} batch {batch}: done", file=sys.stderr)
    print("\nms per image (median over repeats) and paired ratios:")
    print(C.table([{k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
                  list(rows[0])))
    if not args.no_record:
        C.record(NAME, {"machine": machine, "weights": args.weights, "threads": args.threads,
                        "agreement": agree, "corridor_r1": recall, "latency": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
