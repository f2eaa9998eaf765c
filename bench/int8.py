"""Static int8 (calibrated) ONNX export of a student against its fp32 export: latency and cross-domain R@1.

The int8 model is :func:`vpr_ros.core.backends.quantize_int8` of the checkpoint (ONNX Runtime static
quantization, QDQ, int8 weights per channel, uint8 activations with min-max ranges), calibrated on
``--calibration`` images of the general recipe's training pool (training/general_student.yaml: none of
the study's test images). Measured in one run:

* latency of one 320x240 frame (batch 1) through the ONNX Runtime backend, fp32 and int8, on
  ``--threads`` intra-op threads (2 by default), timed in alternation (``_common.interleaved``); ratio
  int8 / fp32 per repeat, median over repeats;
* R@1 of both on the cross-domain table (:mod:`vpr_ros.studies.cross_domain`: every study set, the standard
  links; the fp32 numbers come from the study's cache when it has them).

``--export`` writes the int8 model beside the checkpoint as ``<stem>.int8.onnx`` (the backend finds it by
the model's hash: ``precision: int8`` with backend onnx); ship it only if it loses <= 1 point of R@1.

    python bench/int8.py --weights vpr_ros/weights/structvpr_mobilenetv2_general.pt [--export]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import _common as C  # first: sets sys.path and TORCH_HOME
import numpy as np

from vpr_ros.core.backends import CALIBRATIONS, default_cache_dir, make_backend, quantize_int8
from vpr_ros.core.models import DEFAULT_WEIGHTS, load_model
from vpr_ros.studies import cross_domain
from vpr_ros.studies.accuracy import StudyConfig

NAME = "int8"
RECIPE = C.REPO / "training" / "general_student.yaml"
MAX_LOSS = 0.01  # ship int8 when it loses at most 1 point of R@1 on every set and link


def calibration_images(n: int, received: float = 0.0) -> list[np.ndarray]:
    """``n`` images spread evenly over the general recipe's training pool (no test images); a share
    ``received`` of them sent through a random link of the recipe's mix first (deployment inputs)."""
    from vpr_ros.training.methods.general import METHOD, build_pool, pair_rng, receive

    recipe = METHOD.load(RECIPE)
    train, _ = build_pool(recipe.data)
    pick = np.unique(np.linspace(0, len(train.records) - 1, n).round().astype(int))
    out = []
    for i in pick:
        image = train.records[int(i)].load()
        rng = pair_rng(1234, int(i), 0)
        out.append(receive(image, recipe.links.draw(rng)) if rng.random() < received else image)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    ap.add_argument("--calibration", type=int, default=200, help="calibration images")
    ap.add_argument("--calibrate", choices=CALIBRATIONS, default="minmax", help="activation-range method")
    ap.add_argument("--received", type=float, default=0.0,
                    help="share of the calibration images sent through a random link of the recipe first")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--runs", type=int, default=20, help="frames per repeat and variant")
    ap.add_argument("--export", action="store_true", help="write <weights stem>.int8.onnx beside the weights")
    ap.add_argument("--out", type=Path, default=C.REPO / "results" / "accuracy", help="study cache folder")
    ap.add_argument("--no-recall", action="store_true", help="latency only")
    args = ap.parse_args(argv)
    machine = C.machine("torch", "onnxruntime")
    model = load_model(args.weights)
    size = model.preprocess.input_size
    target = (args.weights.with_suffix(".int8.onnx") if args.export  # where the backend looks for it
              else default_cache_dir() / f"{args.weights.stem}.int8.onnx")
    t0 = time.perf_counter()
    quantize_int8(model, calibration_images(args.calibration, args.received), target,
                  calibrate=args.calibrate)
    print(f"int8 export {target} ({target.stat().st_size / 2**20:.1f} MiB) in "
          f"{time.perf_counter() - t0:.0f} s, calibrated ({args.calibrate}) on {args.calibration} pool "
          f"images, {args.received:g} of them received through a random link", file=sys.stderr)

    frame = C.camera_frames((240, 320), 1)[0]  # a 320x240 camera frame, resized by the backend to `size`
    backends = {p: make_backend(model, "onnx", device="cpu", precision=p, max_batch=1, threads=args.threads)
                for p in ("fp32", "int8")}
    for b in backends.values():
        for _ in range(5):
            b([frame])

    def timer(b):
        def run() -> float:
            t = time.perf_counter()
            for _ in range(args.runs):
                b([frame])
            return (time.perf_counter() - t) / args.runs * 1000
        return run

    with C.LoadSampler() as load:
        ms = C.interleaved({p: timer(b) for p, b in backends.items()}, args.repeats)
    latency = {p: {"median_ms": C.median(v), "p90_ms": C.pct(v, 90)} for p, v in ms.items()}
    ratio = C.paired_ratio(ms["int8"], ms["fp32"])
    print(f"\n{args.weights.name} at {size[0]}x{size[1]}, batch 1, {args.threads} threads: fp32 "
          f"{latency['fp32']['median_ms']:.1f} ms, int8 {latency['int8']['median_ms']:.1f} ms, "
          f"int8/fp32 = {ratio:.2f}")

    recall: dict = {}
    verdict = None
    if not args.no_recall:
        cfg = StudyConfig(out=args.out, page=None, progress=True)
        for p in ("fp32", "int8"):
            cx = cross_domain.CrossConfig(checkpoints=[args.weights], backend="onnx", precision=p,
                                          write_cards=False)
            raw = cross_domain.evaluate(cfg, cx)
            key = next(c.key for c in raw["_cols"] if c.card is not None)
            recall[p] = {s: {lb: v["R@1"] for lb, v in links.items() if "R@1" in v}
                         for s, links in raw["results"][key].items()}
        rows, worst = [], 0.0
        for s, links in recall["fp32"].items():
            for lb, v in links.items():
                d = recall["int8"][s][lb] - v
                worst = min(worst, d)
                rows.append({"set": s, "link": lb, "fp32": 100 * v, "int8": 100 * recall["int8"][s][lb],
                             "diff": 100 * d})
        print("\n" + C.table(rows, ["set", "link", "fp32", "int8", "diff"],
                             ["set", "link", "fp32 R@1", "int8 R@1", "int8 - fp32 (points)"]))
        verdict = worst >= -MAX_LOSS - 1e-9
        print(f"\nlargest R@1 loss {-100 * worst:.1f} points: int8 {'ships' if verdict else 'does not ship'} "
              f"as an option (limit {100 * MAX_LOSS:g} point)")
    C.record(NAME, {"machine": machine, "load": load.summary(), "weights": args.weights.name,
                    "input_size": list(size), "threads": args.threads, "calibrate": args.calibrate,
                    "calibration_received": args.received, "latency": latency,
                    "int8_over_fp32": ratio, "recall_at_1": recall, "ships": verdict,
                    "int8_file": str(target), "int8_mib": target.stat().st_size / 2**20})
    return 0


if __name__ == "__main__":
    sys.exit(main())
