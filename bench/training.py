"""Training throughput: one LoQI distillation step versus a bare student step, same batch.

Variants (timed in alternation, Adam + grad-clip 1.0 step included in each, data already in memory):

``bare``
    student forward (descriptors) on the low-quality batch + ``MSE`` to a fixed target + backward.
``loqi``
    :class:`vpr_ros.training.methods.loqi.LoQI` with ICKD + MSE + triplet (``vpr_ros/training/losses.py``):
    frozen teacher forward (no grad) on the high-quality batch, student ``forward_features`` +
    aggregation on the low-quality batch, the three losses, backward: the step of ``loss.cache_teacher:
    false``.
``loqi_cached_teacher``
    the same ``LoQI`` module with its :class:`~vpr_ros.training.methods.loqi.TeacherCache` and the images' ids
    (``loss.cache_teacher: true``, what the engine calls), every image of the batch already cached: the
    step of an image drawn before (epochs after the first; small training sets).
``loqi_cache_cold``
    the same with new image ids at every step (every image a miss, the cache growing): the step of
    images drawn for the first time (a first epoch).
``loqi_dense_ickd``
    the LoQI step as first written, with the dense C x C ICKD of both sides
    (:func:`vpr_ros.training.losses.channel_correlation`), for the ICKD speed-up.

Batch: ``B`` tuples of ``T = 2 + negatives`` real Nordland images (query winter, positive
summer, negatives summer); high quality = the frames, low quality = JPEG quality 10 of them
(the recipe's degradation). Samples/s counts tuples. Expected ratio without a cache:
(student F + B) / (student F + B + teacher F) ~ 3/4 when backward ~ 2 forwards.

    python bench/training.py [--sizes 32x64,240x320] [--batch 4] [--negatives 3] [--repeats 7]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings

import _common as C  # first: sets sys.path and TORCH_HOME
import numpy as np
import torch
import torch.nn.functional as F

from vpr_ros.core.images import load_image
from vpr_ros.core.models import create_model
from vpr_ros.core.models.registry import Preprocess
from vpr_ros.core.preprocess import to_tensor_batch
from vpr_ros.core.transmission import TransmissionConfig, Transmitter

NAME = "training"


def batch_images(b: int, negatives: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(high-quality, low-quality) images of b tuples (query, positive, negatives...) in tuple order."""
    root = C.SHARED / "data" / "nordland_64x32"
    names = sorted(p.name for p in (root / "summer").glob("*.png"))[100:3400]
    rng = np.random.default_rng(0)
    hq = []
    for i in range(b):
        q = 300 * i + 50
        negs = rng.choice([j for j in range(len(names)) if abs(j - q) > 50], negatives, replace=False)
        hq.append(load_image(root / "winter" / names[q]))
        hq.append(load_image(root / "summer" / names[q + 1]))
        hq += [load_image(root / "summer" / names[j]) for j in negs]
    tx = Transmitter(TransmissionConfig.parse("jpeg:10"))
    lq = [tx.process(im).image for im in hq]
    return hq, lq


def run_size(size_text: str, args: argparse.Namespace, hq_imgs: list, lq_imgs: list) -> list[dict]:
    """Time the variants at one input size; returns the table rows."""
    from vpr_ros.training.losses import channel_correlation, mse_loss, triplet_loss
    from vpr_ros.training.methods.loqi import LoQI, LossConfig, forward_outputs

    b, t = args.batch, 2 + args.negatives
    rows = []
    size = tuple(int(v) for v in size_text.split("x"))
    pre = Preprocess(input_size=size)
    hq = to_tensor_batch(hq_imgs, pre).view(b, t, 3, *size)
    lq = to_tensor_batch(lq_imgs, pre).view(b, t, 3, *size)
    ids = torch.arange(b * t).view(b, t)  # the batch's images, all distinct
    torch.manual_seed(0)
    teacher = create_model("structvpr_mobilenetv2", pretrained=True, preprocess=pre)
    cfg = LossConfig()
    names = ("bare", "loqi", "loqi_cached_teacher", "loqi_cache_cold", "loqi_dense_ickd")
    students = {k: copy.deepcopy(teacher) for k in names}
    loqi = {k: LoQI(students[k], copy.deepcopy(teacher), cfg).train() for k in names if k != "bare"}
    loqi["loqi_cached_teacher"].teacher_cache = loqi["loqi_cached_teacher"].make_teacher_cache()
    students["bare"].train()
    with torch.no_grad():
        target = torch.randn_like(forward_outputs(teacher.eval(), hq.flatten(0, 1), maps=False, desc=True)[1])
    opts = {k: torch.optim.Adam(m.parameters(), lr=1e-4) for k, m in students.items()}

    def step(name: str, loss_fn) -> None:
        model, opt = students[name], opts[name]
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    def bare_loss() -> torch.Tensor:
        return F.mse_loss(students["bare"](lq.flatten(0, 1)), target)

    def loqi_loss() -> torch.Tensor:
        return loqi["loqi"](hq, lq)["loss"]

    def cached_loss() -> torch.Tensor:  # the engine's call with loss.cache_teacher: true
        return loqi["loqi_cached_teacher"](hq, lq, ids)["loss"]

    m_cold, drawn = loqi["loqi_cache_cold"], [0]
    m_cold.teacher_cache = m_cold.make_teacher_cache()

    def cold_loss() -> torch.Tensor:  # every image new to the (growing) cache, as in a first epoch
        drawn[0] += 1
        return m_cold(hq, lq, ids + drawn[0] * b * t)["loss"]

    def dense_ickd_loss() -> torch.Tensor:  # LoQI.forward as first written (dense C x C correlations)
        m = loqi["loqi_dense_ickd"]
        s_maps, s_desc = forward_outputs(m.student, lq.flatten(0, 1), maps=True, desc=True)
        with torch.no_grad():
            t_maps, t_desc = forward_outputs(m.teacher, hq.flatten(0, 1), maps=True, desc=True)
        pairs = zip(s_maps, t_maps, strict=True)
        diffs = [channel_correlation(sm) - channel_correlation(tm) for sm, tm in pairs]
        ickd = torch.stack([df.pow(2).sum(dim=(1, 2)).mean() / df.shape[1] for df in diffs]).mean()
        d = s_desc.view(b, t, -1)
        return (cfg.ickd_weight * ickd + cfg.alpha * mse_loss(s_desc, t_desc)
                + cfg.beta * triplet_loss(d[:, 0], d[:, 1], d[:, 2:], cfg.margin))

    steps = args.steps or (10 if size[0] * size[1] <= 64 * 128 else 2)
    fns = {"bare": bare_loss, "loqi": loqi_loss, "loqi_cached_teacher": cached_loss,
           "loqi_cache_cold": cold_loss, "loqi_dense_ickd": dense_ickd_loss}

    def measure(name: str):
        def run() -> float:
            t0 = time.perf_counter()
            for _ in range(steps):
                step(name, fns[name])
            return (time.perf_counter() - t0) / steps  # seconds per step
        return run

    variants = {k: measure(k) for k in fns}
    for fn in variants.values():
        fn()  # warm-up (fills the teacher cache of loqi_cached_teacher)
    cache = loqi["loqi_cached_teacher"].teacher_cache
    cache_kb = cache.nbytes / len(cache) / 1024
    print(f"{size[0]}x{size[1]}, {b} tuples x {t} images: teacher cache {cache_kb:.1f} KiB/image",
          file=sys.stderr)
    res = C.interleaved(variants, args.repeats)
    for name, secs in res.items():
        ratio = C.paired_ratio(res["bare"], secs)  # throughput ratio = bare time / variant time
        row = {"variant": name, "size": f"{size[1]}x{size[0]}", "tuples": b, "images_per_tuple": t,
               "step_ms": 1000 * C.median(secs), "samples_per_s": b / C.median(secs),
               "throughput_vs_bare": ratio}
        if name == "loqi_cached_teacher":
            row["cache_kib_per_image"] = cache_kb
        rows.append(row)
        print(f"  {name:20s} {row['step_ms']:8.1f} ms/step  {row['samples_per_s']:7.2f} tuples/s  "
              f"x{ratio:.2f} of bare throughput", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="32x64,240x320", help="HxW list (32x64: the recipe's Nordland size)")
    ap.add_argument("--batch", type=int, default=4, help="tuples per step (the recipe uses 4)")
    ap.add_argument("--negatives", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=0, help="steps per measurement (0: by size)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    mach = C.machine("torch", "numpy")
    print("machine:", mach)
    hq_imgs, lq_imgs = batch_images(args.batch, args.negatives)
    rows = []
    with C.LoadSampler() as load:
        for size_text in args.sizes.split(","):
            rows += run_size(size_text, args, hq_imgs, lq_imgs)
    summary = load.summary()
    print()
    print(C.describe_machine(mach, summary))
    print(C.table(rows, ["variant", "size", "tuples", "images_per_tuple", "step_ms", "samples_per_s",
                         "throughput_vs_bare"],
                  ["variant", "W×H", "tuples/step", "images/tuple", "ms/step", "tuples/s",
                   "throughput ÷ bare"]))
    if not args.no_record:
        C.record(NAME, {"machine": mach, "load": summary, "repeats": args.repeats, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
