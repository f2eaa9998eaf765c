"""Descriptor extraction speed per backend, resolution and batch size, as ratios to the bare model.

Baseline ("bare"): the unmodified ``torchvision.models.mobilenet_v2().features`` in eager mode
(contiguous NCHW, ``torch.inference_mode``) on an already preprocessed tensor. Note it runs all 19
feature layers including the 320->1280 head convolution, which the StructVPR student drops
(student: features[:18] + multi-level GMP), so it does ~6% more arithmetic than the student.

Variants (the student, through :mod:`vpr_ros.core.backends`, from RGB uint8 frames — preprocessing
(resize + normalise into reused buffers) included, as a node pays it):
``torch_eager`` (contiguous NCHW), ``torch_cl`` (channels_last, the default), ``onnx`` (ONNX
Runtime, CPU provider, intra-op threads = usable cores, no spinning); ``@1t`` variants run with one
intra-op thread (torch.set_num_threads(1) around the call / ORT threads=1) — on cores shared
with other busy processes torch's spinning OpenMP pool collapses with 2 threads, one thread does
not. ``--model-only`` adds the backends' model call alone on a ready tensor. All are timed in
alternation; ratio = variant ms / bare ms of the same repeat (median over repeats; < 1 means
faster than the bare model).

    python bench/extraction.py [--repeats 9] [--sizes 240x320,480x640] [--batches 1,8]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import _common as C  # first: sets sys.path and TORCH_HOME
import numpy as np
import torch

from vpr_ros.core.backends import make_backend
from vpr_ros.core.images import load_image
from vpr_ros.core.models import create_model
from vpr_ros.core.models.registry import Preprocess
from vpr_ros.core.preprocess import to_tensor_batch

NAME = "extraction"


def frames(n: int) -> list[np.ndarray]:
    """Real camera frames: RTAB-Map corridor (512x384) and KITTI (640x194), alternating."""
    rtab = sorted((C.SHARED / "data" / "rtabmap_loop" / "images").glob("*.jpg"))
    kitti = sorted((C.SHARED / "data" / "kitti_first300" / "00" / "image_0").glob("*.jpg"))
    paths = [p for pair in zip(rtab, kitti, strict=False) for p in pair][:n]
    if len(paths) < n:
        sys.exit(f"need {n} frames from {C.SHARED}/data (rtabmap_loop, kitti_first300)")
    return [load_image(p) for p in paths]


def bare_features() -> torch.nn.Module:
    from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

    try:
        net = mobilenet_v2(weights=MobileNet_V2_Weights.IMAGENET1K_V1)
    except Exception:  # offline without the file: same arithmetic, random weights
        net = mobilenet_v2(weights=None)
    return net.features.eval()


def timer(fn, iters: int, per: int):
    """A measurement: ms per image over ``iters`` calls of ``fn`` (each describing ``per`` images)."""
    def measure() -> float:
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) * 1000.0 / (iters * per)
    return measure


def one_thread(measure):
    """The same measurement with torch limited to one intra-op thread (restored afterwards)."""
    def run() -> float:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return measure()
        finally:
            torch.set_num_threads(before)
    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--sizes", default="240x320,480x640", help="HxW list")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--images-per-measure", type=int, default=8, help="images described per measurement")
    ap.add_argument("--model-only", action="store_true", help="also time the backends' model call alone")
    ap.add_argument("--spin", action="store_true", help="also time onnx with spinning intra-op threads")
    ap.add_argument("--no-one-thread", action="store_true",
                    help="skip the one-thread variants (bare@1t, torch_cl@1t, onnx@1t)")
    ap.add_argument("--cache-dir", default=str(C.REPO / ".cache" / "onnx"))
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    warnings.simplefilter("ignore")
    mach = C.machine("torch", "torchvision", "onnxruntime", "numpy", "cv2")
    print("machine:", mach)
    images = frames(max(batches + [args.images_per_measure]))
    torch.manual_seed(0)
    base = create_model("structvpr_mobilenetv2", pretrained=True).eval()
    bare = bare_features()
    rows = []
    with C.LoadSampler() as load:
        for size in sizes:
            student = create_model("structvpr_mobilenetv2", preprocess=Preprocess(input_size=size)).eval()
            student.load_state_dict(base.state_dict())
            backends = {
                "torch_eager": make_backend(student, "torch", device="cpu", channels_last=False, max_batch=8),
                "torch_cl": make_backend(create_model_copy(student), "torch", device="cpu", max_batch=8),
                "onnx": make_backend(student, "onnx", device="cpu", cache_dir=args.cache_dir, max_batch=8),
            }
            if not args.no_one_thread:
                backends["onnx@1t"] = make_backend(student, "onnx", device="cpu", cache_dir=args.cache_dir,
                                                   max_batch=8, threads=1)
            if args.spin:
                backends["onnx_spin"] = make_backend(student, "onnx", device="cpu", cache_dir=args.cache_dir,
                                                     max_batch=8, spin=True)
            for b in batches:
                n_iter = max(1, args.images_per_measure // b)
                batch = images[:b]
                x = to_tensor_batch(batch, Preprocess(input_size=size)).contiguous()

                def run_bare(x=x) -> None:
                    with torch.inference_mode():
                        bare(x)

                variants = {"bare": timer(run_bare, n_iter, b)}
                if not args.no_one_thread:
                    variants["bare@1t"] = one_thread(timer(run_bare, n_iter, b))
                for name, be in backends.items():
                    variants[name] = timer(lambda be=be, batch=batch: be(batch), n_iter, b)
                    if name in ("torch_cl",) and not args.no_one_thread:
                        variants[f"{name}@1t"] = one_thread(variants[name])
                    if args.model_only:
                        xin = be._buffers_for(b, size).fill(batch)
                        variants[f"{name}/model"] = timer(lambda be=be, xin=xin: be.run(xin), n_iter, b)
                for fn in variants.values():  # warm-up: kernels, memory plans, caches
                    fn()
                print(f"{size[0]}x{size[1]} batch {b}:", file=sys.stderr)
                res = C.interleaved(variants, args.repeats, seed=b)
                for name, ms in res.items():
                    row = {"variant": name, "size": f"{size[1]}x{size[0]}", "batch": b,
                           "ms_per_image": C.median(ms), "ms_p10": C.pct(ms, 10), "ms_p90": C.pct(ms, 90),
                           "ratio_vs_bare": C.paired_ratio(ms, res["bare"]),
                           "speedup_vs_bare": 1.0 / C.paired_ratio(ms, res["bare"])}
                    if "bare@1t" in res:
                        row["ratio_vs_bare_1t"] = C.paired_ratio(ms, res["bare@1t"])
                    rows.append(row)
                    print(f"  {name:18s} {row['ms_per_image']:7.1f} ms/img  "
                          f"x{row['ratio_vs_bare']:.2f} of bare", flush=True)
    summary = load.summary()
    print()
    print(C.describe_machine(mach, summary))
    print(C.table(rows, ["variant", "size", "batch", "ms_per_image", "ms_p10", "ms_p90", "ratio_vs_bare",
                         "ratio_vs_bare_1t"],
                  ["variant", "W×H", "batch", "ms/img (median)", "p10", "p90", "time ÷ bare",
                   "time ÷ bare@1t"]))
    if not args.no_record:
        C.record(NAME, {"machine": mach, "load": summary, "repeats": args.repeats, "rows": rows})
    return 0


def create_model_copy(model):
    import copy

    return copy.deepcopy(model)


if __name__ == "__main__":
    sys.exit(main())
