"""Per-image CPU latency of SciceVPR (DINOv2 ViT-S/14, ViT-B/14 at 224x224) against the StructVPR MobileNetV2
student at 240x320, batch 1, as ratios measured in one run.

The models are timed in alternation (a shuffled order per repeat) on a ready input tensor under
``torch.inference_mode``; a ratio is taken per repeat against the StructVPR call of the same repeat, and the
median over repeats is reported, so load from other processes on a shared machine affects all models alike.
Random weights (the arithmetic does not depend on them). The 1-minute load average is printed before and
after.

    python bench/scicevpr_latency.py [--repeats 15] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from vpr_ros.core.models import create_model

MODELS = [  # label, registry name, config, (H, W)
    ("StructVPR MobileNetV2 (448-d)", "structvpr_mobilenetv2", {}, (240, 320)),
    ("SciceVPR ViT-S/14 (5376-d)", "scicevpr_dinov2", {"arch": "vits14"}, (224, 224)),
    ("SciceVPR ViT-B/14 (10752-d)", "scicevpr_dinov2", {"arch": "vitb14"}, (224, 224)),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load0 = os.getloadavg()[0]
    runs = []
    for label, name, cfg, size in MODELS:
        model = create_model(name, **cfg).eval()
        runs.append((label, model, torch.randn(1, 3, *size)))
    times: dict[str, list[float]] = {label: [] for label, _, _ in runs}
    with torch.inference_mode():
        for _, model, x in runs:
            for _ in range(args.warmup):
                model(x)
        rng = random.Random(0)
        for _ in range(args.repeats):
            for label, model, x in rng.sample(runs, len(runs)):
                t0 = time.perf_counter()
                model(x)
                times[label].append(time.perf_counter() - t0)
    base = MODELS[0][0]
    print(f"CPU: {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} thread(s), batch 1, "
          f"{args.repeats} repeats; 1-min load average {load0:.2f} before, {os.getloadavg()[0]:.2f} after")
    print("| model | input | median ms/image | min ms | ratio to StructVPR (median of per-repeat ratios) |")
    print("|---|---|---|---|---|")
    for (label, _, _, size) in MODELS:
        ratios = [t / b for t, b in zip(times[label], times[base], strict=True)]
        print(f"| {label} | {size[0]}x{size[1]} | {1e3 * statistics.median(times[label]):.1f} | "
              f"{1e3 * min(times[label]):.1f} | {statistics.median(ratios):.2f} |")


if __name__ == "__main__":
    main()
