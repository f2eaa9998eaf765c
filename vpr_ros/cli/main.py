"""``vpr-ros``: the one command line, a single argparse tree over the runtime, ROS, study and training
subcommands.

Runtime subcommands live here; :mod:`vpr_ros.cli.ros`, :mod:`vpr_ros.cli.study` and
:mod:`vpr_ros.cli.train` register theirs. Each command turns its arguments into explicit library calls and
imports the heavy modules it needs (torch, faiss, rclpy) when it runs, so building the tree stays light.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from vpr_ros import paths
from vpr_ros.cli import ros as ros_commands
from vpr_ros.cli import study as study_commands
from vpr_ros.cli import train as train_commands
from vpr_ros.core.errors import OutputError, VprError
from vpr_ros.core.fileio import check_output_dir, display_path
from vpr_ros.data.files import IMAGE_SUFFIXES
from vpr_ros.data.places import PlaceDataset, nordland_sample

log = logging.getLogger("vpr_ros")

_ROS_MODULES = {"rclpy", "vpr_ros_msgs", "sensor_msgs", "std_msgs", "geometry_msgs", "nav_msgs",
                "diagnostic_msgs", "builtin_interfaces", "rosidl_runtime_py"}
DEMO_DEGRADATIONS = ("none", "jpeg:10", "resize:0.25", "h264:40")
#: Top-K candidates per query kept for sequence matching (``SequenceConfig.candidates``).
SEQUENCE_CANDIDATES = 50
#: ``vpr_ros.core.backends.BACKENDS`` / ``PRECISIONS`` (spelled out: parsing must not import torch).
BACKEND_CHOICES = ("auto", "torch", "onnx")
PRECISION_CHOICES = ("fp32", "fp16", "int8")
#: ``vpr_ros.data.formats.FORMATS`` (spelled out for the same reason).
FORMAT_CHOICES = ("vprbench", "aligned", "positions", "msls")


# --------------------------------------------------------------------------- shared options


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--weights", help="deployed checkpoint (.pt); 'default' = the packaged student")
    g.add_argument("--model", help="registered model name (ImageNet-initialised unless --weights)")
    g.add_argument("--input-size", default=None, help="preprocessing size HxW (e.g. 240x320) or 'native'")
    g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    g.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    g.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                   help="inference backend: auto (onnx on CPU, torch on CUDA), torch (eager) or onnx (ONNX "
                        "Runtime, 2-5x faster on CPU; the export is cached in $VPR_ROS_CACHE/onnx or "
                        "~/.cache/vpr_ros/onnx)")
    g.add_argument("--precision", default="fp32", choices=PRECISION_CHOICES,
                   help="fp16 needs CUDA; int8: onnx on CPU from a calibrated export (bench/int8.py)")
    g.add_argument("--threads", type=_threads, default=0,
                   help="intra-op threads of the backend (0: library default; torch wants 1 on busy "
                        "shared cores)")


def _threads(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0 (0 = library default), got {text!r}")
    return value


def _sequence_length(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 1000:
        raise argparse.ArgumentTypeError(f"expected a sequence length in 1..1000 (1 = single frame), "
                                         f"got {text!r}")
    return value


def _add_sequence_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sequence matching (docs/sequence.md)")
    g.add_argument("--sequence-length", type=_sequence_length, nargs="+", action="extend", metavar="L",
                   help="also score sequence matching over L frames (several: --sequence-length 1 5 10 20, "
                        "or the flag repeated); prints R@1 against L per link and plots it")
    g.add_argument("--sequence-velocity", type=float, nargs=2, metavar=("VMIN", "VMAX"), default=(0.8, 1.25),
                   help="velocity range of the sequence lines, map places per query frame (default 0.8 1.25)")


def _add_dataset_args(p: argparse.ArgumentParser, *, default_name: str | None = None) -> None:
    g = p.add_argument_group("dataset")
    g.add_argument("--dataset", default=default_name, choices=["nordland", "ie_tower", "folder"],
                   help="dataset reader")
    g.add_argument("--root", type=Path, help="dataset folder (for nordland/ie_tower: the shared data folder)")
    g.add_argument("--format", choices=FORMAT_CHOICES, default=None,
                   help="read --root in a standard layout instead of --dataset (docs/evaluation.md): "
                        "vprbench (ref/, query/, ground_truth_new.npy), aligned (two folders, i-th files "
                        "match), positions (two folders + positions.csv or @utm_e@utm_n@ names), msls "
                        "(one Mapillary SLS city)")
    g.add_argument("--tolerance", type=int, default=None,
                   help="--format aligned: correct within +/-N frames (default 2)")
    g.add_argument("--radius", type=float, default=None,
                   help="--format positions/msls: correct within this many metres (default 25)")
    g.add_argument("--ground-truth", type=Path, default=None,
                   help="--format vprbench: ground-truth file (.npy/.json/.csv) instead of the one in --root")
    g.add_argument("--positions", type=Path, default=None,
                   help="--format positions: positions CSV (name,x,y or name,lat,lon) instead of "
                        "--root/positions.csv")
    g.add_argument("--every", type=int, default=1, help="use every N-th image (quick runs)")
    g.add_argument("--limit", type=int, default=None, help="at most this many database/query images")


def _extractor(args: argparse.Namespace):
    # torch loads only for the commands that describe images
    from vpr_ros.core.extract import DescriptorExtractor
    from vpr_ros.core.models import parse_size, resolve_model

    size = "keep" if args.input_size is None else parse_size(args.input_size)
    model = resolve_model(args.weights, args.model, input_size=size)
    options = {"threads": args.threads} if args.threads else {}
    ext = DescriptorExtractor(model, device=args.device, batch_size=args.batch_size, backend=args.backend,
                              precision=args.precision, **options)
    pre = model.preprocess.input_size
    log.info("model %s (%d-d) on %s, backend %s %s, input %s", model.name, model.descriptor_dim, ext.device,
             args.backend, args.precision, "native" if pre is None else f"{pre[0]}x{pre[1]}")
    return ext


def _model_label(args: argparse.Namespace, ext) -> str:
    if args.weights:
        return Path(args.weights).stem if args.weights != "default" else f"{ext.model.name}@default"
    return ext.model.name if args.model else f"{ext.model.name}"


def _dataset(args: argparse.Namespace):
    # the dataset readers (OpenCV) load only for the commands that read a dataset
    from vpr_ros.data.places import load_dataset

    if args.root is None:
        raise VprError("--root is required (the dataset folder)")
    if getattr(args, "format", None):
        from vpr_ros.data.formats import load_format  # runs with the command: keeps `vpr-ros --help` light

        ds = load_format(args.format, args.root, tolerance=args.tolerance, radius_m=args.radius,
                         ground_truth=args.ground_truth, positions=args.positions)
        if args.every != 1 or args.limit is not None:
            try:
                ds = ds.subsample(args.every, args.limit)
            except ValueError as exc:
                raise VprError(f"--every/--limit: {exc}") from None
        log.info("%s", ds.summary())
        return ds
    if any(getattr(args, k, None) is not None for k in ("tolerance", "radius", "ground_truth", "positions")):
        raise VprError("--tolerance, --radius, --ground-truth and --positions need --format")
    kw = {}
    if args.dataset in ("nordland", "ie_tower"):
        kw = {"every": args.every, "limit": args.limit}
    ds = load_dataset(args.dataset, args.root, **kw)
    keep = getattr(args, "frame_filter", None)
    if keep is not None:
        ds = replace(ds, database=[r for r in ds.database if keep(r.frame_index)],
                     queries=[r for r in ds.queries if keep(r.frame_index)])
    if args.dataset == "folder" and (args.every > 1 or args.limit):
        ds = ds.subsample(args.every, args.limit)
    log.info("%s", ds.summary())
    return ds


# --------------------------------------------------------------------------- subcommands


def cmd_models(args: argparse.Namespace) -> int:
    # the model registry imports torch
    from vpr_ros.core.models import DEFAULT_WEIGHTS, get_spec, list_models

    for name in list_models():
        print(f"{name:24s} {get_spec(name).description}")
    state = "present" if DEFAULT_WEIGHTS.is_file() else "not built"
    print(f"\npackaged default weights: {DEFAULT_WEIGHTS} ({state})")
    # runs with the command: keeps `vpr-ros --help` free of torch
    from vpr_ros.core.models.card import format_card, packaged_checkpoints, read_card

    paths = packaged_checkpoints()
    if paths:
        print("\npackaged checkpoints and their model cards (read from each file; --weights PATH):")
    for path in paths:
        is_default = DEFAULT_WEIGHTS.is_file() and path.resolve() == DEFAULT_WEIGHTS.resolve()
        print("\n".join(["", *format_card(read_card(path), default=is_default)]))
    return 0


def _image_files(src: Path) -> list[Path]:
    """The image files under folder ``src`` (searched recursively, sorted); VprError when there are none."""
    if not src.is_dir():
        raise VprError(f"{display_path(src)}: not a folder of images")
    files = sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise VprError(f"{display_path(src)}: no images ({'/'.join(IMAGE_SUFFIXES)}) found")
    return files


def degrade_targets(files: Sequence[Path], src: Path) -> dict[Path, Path]:
    """Output name (relative, ``.png``) of each input: ``a/frame.png`` for ``a/frame.jpg``, unless two
    inputs would share it (``frame.png`` and ``frame.jpg``): then each keeps its suffix,
    ``frame.jpg.png`` and ``frame.png.png``. VprError if names still collide."""
    plain = {f: f.relative_to(src).with_suffix(".png") for f in files}
    counts: dict[Path, int] = {}
    for t in plain.values():
        counts[t] = counts.get(t, 0) + 1
    out = {f: (t if counts[t] == 1 else t.with_name(f.name + ".png")) for f, t in plain.items()}
    seen: dict[Path, Path] = {}
    for f, t in out.items():
        if t in seen:
            raise VprError(f"{display_path(f)} and {display_path(seen[t])} would both be written to "
                           f"{display_path(t)}; rename one of them")
        seen[t] = f
    return out


def cmd_degrade(args: argparse.Namespace) -> int:
    # OpenCV, PyAV and tqdm load only when images are degraded
    from tqdm import tqdm

    # runs with the command: keeps `vpr-ros --help` light
    from vpr_ros.core.images import ImageError, load_image, save_image
    from vpr_ros.core.transmission import TransmissionConfig, Transmitter, budget_summary

    src = Path(args.images)
    files = _image_files(src)
    if args.limit:
        files = files[: args.limit]
    configs = [TransmissionConfig.parse(spec) for spec in args.spec]  # every spec checked before any work
    targets = degrade_targets(files, src)
    out_root = check_output_dir(args.out)
    rows, budgets = [], []
    for cfg in configs:
        tx = Transmitter(cfg)
        out_dir = out_root / cfg.label
        skipped = 0
        for f in tqdm(files, desc=cfg.label, unit="img"):
            try:
                received = tx.process(load_image(f)).image
            except ImageError as exc:
                skipped += 1
                log.warning("skipped %s", exc)
                continue
            try:  # lossless: what arrived, bit for bit
                save_image(out_dir / targets[f], received)
            except OutputError as exc:  # disk full, ...: stop, naming what was written
                raise OutputError(f"{exc}; stopped after {tx.stats['frames'] - 1} of {len(files)} images "
                                  f"of {cfg.label} (each written image is complete)") from None
        st = tx.stats
        if st["frames"] == 0:
            raise VprError(f"{display_path(src)}: none of the {len(files)} images could be read "
                           f"({cfg.label}); see the warnings above")
        rows.append((cfg.label, st["frames"], st["mean_bytes"], st["kbps"], skipped, out_dir))
        summary = budget_summary(cfg.label, st)
        if summary:
            budgets.append(summary)
            if st["over_budget"]:
                log.warning("%s", summary)
    print(f"{'degradation':20s} {'frames':>6s} {'bytes/frame':>12s} {'kbps':>9s} {'skipped':>7s}  folder")
    for label, n, b, kbps, sk, d in rows:
        print(f"{label:20s} {n:6d} {b:12.1f} {kbps:9.1f} {sk:7d}  {display_path(d)}")
    for line in budgets:
        print(line)
    return 0


def cmd_build_map(args: argparse.Namespace) -> int:
    # torch and faiss load only when a map is built
    from vpr_ros.core.mapdb import map_path
    from vpr_ros.core.provenance import describe_source
    from vpr_ros.data.places import ImageRecord
    from vpr_ros.eval.offline import map_from_records

    check_output_dir(map_path(args.out).parent)  # an unwritable --out is found before the images are read
    ext = _extractor(args)
    if args.images:
        files = _image_files(Path(args.images))
        records = [ImageRecord(path=f, name=f.name, frame_index=i) for i, f in enumerate(files)]
    else:
        records = _dataset(args).database
    t0 = time.perf_counter()
    orb = None
    if args.local_features:
        # runs with the command: keeps `vpr-ros --help` light
        from vpr_ros.core.geometry import OrbExtractor

        orb = OrbExtractor()  # the loop-closure node's default ORB settings
    place_map, _, skipped = map_from_records(ext, records, model=ext.model.name, index=args.index,
                                             local_features=orb)
    for i, reason in skipped[:10]:
        print(f"  skipped #{i}: {display_path(reason)}")
    if len(place_map) == 0:  # never replace a map with an empty one
        target = map_path(args.out)
        kept = "left unchanged" if target.exists() else "not written"
        first = f" (first: {display_path(skipped[0][1])})" if skipped else ""
        raise VprError(f"none of the {len(records)} images could be described{first}; the map "
                       f"{display_path(target)} was {kept}")
    path = place_map.save(args.out)
    print(f"map {display_path(path)}: {len(place_map)} entries ({place_map.dim}-d, {place_map.index_kind}), "
          f"{len(skipped)} images skipped, {time.perf_counter() - t0:.1f} s")
    print(f"  descriptors of {describe_source(place_map.descriptor_source)} (recorded in the map)")
    if orb is not None:
        kps = [len(place_map.local_features(i)) for i in place_map.ids]
        print(f"  local features (ORB, for loop-closure verification): {sum(kps)} keypoints, "
              f"{sum(kps) / max(1, len(kps)):.0f} per place")
    return 0


def run_eval(args: argparse.Namespace, specs: Sequence[str]) -> tuple[list, dict]:
    # torch, faiss and the codecs load only when a model is evaluated
    from vpr_ros.core.transmission import TransmissionConfig, budget_summary
    from vpr_ros.eval.metrics import RECALL_NS, format_table
    from vpr_ros.eval.offline import evaluate_dataset, write_report

    configs = [TransmissionConfig.parse(s) for s in specs]  # fail on a bad spec before any work
    lengths = sorted(set(getattr(args, "sequence_length", None) or ()))
    velocity = _sequence_velocity(args) if lengths else (0.0, 0.0)
    check_output_dir(args.out)  # an unwritable --out is found now, not after the whole run
    ds = getattr(args, "place_set", None)
    if ds is None:  # the demo hands a ready set; the other commands name one
        ds = _dataset(args)
    ext = _extractor(args)
    t0 = time.perf_counter()
    k = max(max(RECALL_NS), SEQUENCE_CANDIDATES) if lengths else max(RECALL_NS)
    runs = evaluate_dataset(ds, ext, configs, model_label=_model_label(args, ext), k=k)
    curves = _sequence_eval(runs, ds, lengths, velocity) if lengths else {}
    paths = write_report(runs, ds, args.out)
    print()
    print(format_table([r.result for r in runs]))
    if curves:
        paths.update(_sequence_report(curves, lengths, args.out))
    for r in runs:  # bitrate links: the achieved rate against the budget
        extra = r.result.extra
        line = budget_summary(r.config.label, {
            "kbps": extra["kbps"], "budget_kbps": extra.get("budget_kbps"),
            "budget_bytes": r.config.budget_bytes, "over_budget": extra.get("frames_over_budget", 0),
            "frames": extra.get("frames_sent", 0)})
        if line:
            print(line)
    print(f"\n{display_path(ds.summary())}")
    print(f"evaluated in {time.perf_counter() - t0:.0f} s on {ext.device}")
    return runs, paths


def _sequence_velocity(args: argparse.Namespace) -> tuple[float, float]:
    """``--sequence-velocity`` checked before any work."""
    v_min, v_max = (float(x) for x in args.sequence_velocity)
    if not (math.isfinite(v_min) and math.isfinite(v_max)):
        raise VprError(f"--sequence-velocity: VMIN and VMAX must be finite, got {v_min} {v_max}")
    if not v_min <= v_max:
        raise VprError(f"--sequence-velocity: VMIN {v_min} is above VMAX {v_max}")
    return v_min, v_max


def _sequence_eval(runs: list, ds: Any, lengths: list[int],
                   velocity: tuple[float, float]) -> dict[str, dict[int, float]]:
    """R@1 of sequence matching per link and length, stored in each run's results (``extra``)."""
    from vpr_ros.eval.metrics import sequence_recall  # numpy-heavy metrics load only with --sequence-length

    v_min, v_max = velocity
    positives = ds.positives()
    curves: dict[str, dict[int, float]] = {}
    for run in runs:  # queries in stream order; database indices in route order
        rec = sequence_recall(run.predictions, run.scores, [positives[int(i)] for i in run.query_indices],
                              lengths, v_min=v_min, v_max=v_max)
        curves[run.config.label] = {n: float(r[1]) for n, r in rec.items()}
        run.result.extra["sequence"] = {"v_min": v_min, "v_max": v_max, "candidates": SEQUENCE_CANDIDATES,
                                        "recall_at_1": {str(n): float(r[1]) for n, r in rec.items()},
                                        "recall_at_5": {str(n): float(r[5]) for n, r in rec.items()}}
    return curves


def _sequence_report(curves: dict[str, dict[int, float]], lengths: list[int],
                     out: str | Path) -> dict[str, Path]:
    from vpr_ros.eval.plots import plot_recall_vs_sequence_length  # matplotlib loads only to draw

    print("\nsequence matching, R@1 (%) against sequence length L (L = 1: single frame):")
    print(f"{'link':20s}" + "".join(f"{'L=' + str(n):>8s}" for n in lengths))
    for label, c in curves.items():
        print(f"{label:20s}" + "".join(f"{100 * c[n]:8.1f}" for n in lengths))
    return {"recall_vs_sequence_length": plot_recall_vs_sequence_length(
        curves, Path(out) / "recall_vs_sequence_length.png")}


def cmd_eval(args: argparse.Namespace) -> int:
    _, paths = run_eval(args, args.degrade or ["none"])
    print("\nwritten:")
    for name, p in paths.items():
        print(f"  {name:28s} {display_path(p)}")
    return 0


#: The set ``vpr-ros demo`` runs on by default, per default student (its card key): Nordland's held-out
#: places for the Nordland LoQI student (its own domain), a street it never saw for the general student.
DEMO_SETS = ("nordland", "kitti00", "rtabmap_loop")
DEFAULT_DEMO_SET = {"loqi": "nordland", "general": "kitti00"}


def cmd_demo(args: argparse.Namespace) -> int:
    shared = Path(args.shared) if args.shared else paths.shared_root()
    from vpr_ros.core.models import DEFAULT_WEIGHTS  # the model registry imports torch
    from vpr_ros.core.models.resolve import DEFAULT_KEY
    from vpr_ros.studies import accuracy as study  # Nordland's held-out split, the other sets' protocols

    key = args.set or DEFAULT_DEMO_SET.get(DEFAULT_KEY, "nordland")
    packaged = not args.weights and not args.model and DEFAULT_WEIGHTS.is_file()
    if key == "nordland":
        ds = None
        root = shared / "data" / "nordland_64x32"
        if not root.is_dir():
            raise VprError(f"the demo needs the Nordland data at {root}; pass --shared or set VPR_ROS_SHARED")
        if args.input_size is None and not packaged:
            args.input_size = "128x256"  # ImageNet fallback: a size that suits Nordland's 2:1 frames
        # The places no packaged student trained on (the split recorded with the Nordland LoQI student; the
        # general student's pool leaves out the same ones); any model is evaluated on them, for fair
        # comparisons.
        split = study.held_out_split() if args.places == "held-out" else None
        if args.every is None:
            args.every = 1 if split else 3
        print(f"vpr_ros demo: map from Nordland summer, queries from Nordland winter ({root})")
        if split:
            print(f"  places held out from the packaged students' training: blocks of {split['block']:g} "
                  f"frames, every {split['val_every']:g}th from {split['val_offset']:g} (--places all for "
                  "every place)")
        args.dataset, args.root, args.limit = "nordland", root, None
        args.frame_filter = functools.partial(study.is_held_out, split=split) if split else None
    else:
        try:  # the study's protocol for the set
            ds = study.load_sets(study.StudyConfig(shared=shared, datasets=(key,)))[0]
        except (OSError, VprError) as exc:
            raise VprError(f"the demo needs the {key} data under {shared / 'data'} ({exc}); pass --shared or "
                           "set VPR_ROS_SHARED") from None
        if args.input_size is None and not packaged:
            args.input_size = "240x320"
        print(f"vpr_ros demo: {ds.title}: {len(ds.database)} map images, {len(ds.queries)} queries "
              f"({ds.ground_truth.text})")
    args.place_set = ds
    _, outputs = run_eval(args, args.degrade or list(DEMO_DEGRADATIONS))
    if packaged:  # the card says how the default does in and out of its training domain
        from vpr_ros.core.models.card import format_card, read_card

        print("\nthe packaged default in and out of its training domain (model card, `make study`; "
              "docs/results.md):")
        print("\n".join(format_card(read_card(DEFAULT_WEIGHTS), default=True)))
    if not args.no_ros:
        outputs.update(_demo_ros(args, nordland_sample(root, args.every or 1) if ds is None else ds))
    print("\nplots and results:")
    for name, p in outputs.items():
        print(f"  {name:28s} {p}")
    return 0


def _demo_ros(args: argparse.Namespace, places: PlaceDataset) -> dict[str, Path]:
    """The graph part of the demo on ``places`` (its queries thinned to 80 frames)."""
    try:  # rclpy is optional: without it the demo skips its graph part
        demo = importlib.import_module("vpr_ros.ros.demo")
    except ImportError as exc:
        print(f"\n(ROS graph part skipped: {exc})")
        return {}
    return demo.run_graph_demo(dataset=places, out_dir=Path(args.out) / "ros", weights=args.weights,
                               input_size=args.input_size, backend=args.backend, precision=args.precision,
                               threads=args.threads)


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The whole ``vpr-ros`` argparse tree (each leaf sets ``func``, the command to run)."""
    parser = argparse.ArgumentParser(prog="vpr-ros", description="Visual place recognition over low-quality "
                                     "image links: maps, evaluation, the ROS graph, studies and training.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list registered models")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("degrade", help="write degraded copies of images and report bytes per frame")
    p.add_argument("--images", required=True, help="folder of images (searched recursively, sorted)")
    p.add_argument("--spec", action="append", required=True,
                   help="transmission spec, repeatable: none, jpeg:10, resize:0.25, h264:40, kbps:200@10")
    p.add_argument("--out", required=True, help="output folder (one subfolder per spec)")
    p.add_argument("--limit", type=int, default=None, help="only the first N images (sorted)")
    p.set_defaults(func=cmd_degrade)

    p = sub.add_parser("build-map", help="describe images and write a place map (.vprmap)")
    p.add_argument("--images", help="folder of images (else --dataset/--root database images)")
    _add_dataset_args(p)
    _add_model_args(p)
    p.add_argument("--index", default="flat", choices=["flat", "hnsw", "ivfpq", "auto"],
                   help="search index of the map: flat (exact), hnsw / ivfpq (approximate), auto (flat, HNSW "
                        "from 30 000 places)")
    p.add_argument("--local-features", action="store_true",
                   help="also store each place's ORB features (~40 kB per place), so the loop-closure node "
                        "can verify loop closures against this map geometrically")
    p.add_argument("--out", required=True, help="map path (a .vprmap folder)")
    p.set_defaults(func=cmd_build_map)

    p = sub.add_parser("eval", help="recall@N of a model on a dataset under degradations, with plots")
    _add_dataset_args(p, default_name="nordland")
    _add_model_args(p)
    p.add_argument("--degrade", action="append", help="query degradation spec, repeatable (default none)")
    p.add_argument("--out", default="results/eval", help="folder for results.json and plots")
    _add_sequence_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="a place set at high and low quality (+ the ROS graph)")
    p.add_argument("--shared", help="shared data folder (default $VPR_ROS_SHARED or ../shared)")
    p.add_argument("--set", choices=DEMO_SETS, default=None,
                   help="nordland (winter->summer), kitti00 (a street) or rtabmap_loop (a corridor); "
                        "default: the default student's demo set (Nordland for the LoQI student, KITTI 00 "
                        "for the general one)")
    p.add_argument("--out", default="results/demo", help="folder for results.json and plots")
    p.add_argument("--every", type=int, default=None,
                   help="nordland: use every N-th place (default 1 on held-out places, else 3)")
    p.add_argument("--places", choices=["held-out", "all"], default="held-out",
                   help="nordland: only places the packaged students were not trained on (default), or all")
    p.add_argument("--degrade", action="append", help=f"degradation specs (default {DEMO_DEGRADATIONS})")
    p.add_argument("--no-ros", action="store_true", help="skip the ROS graph part")
    _add_model_args(p)
    _add_sequence_args(p)
    p.set_defaults(func=cmd_demo)

    train_commands.register(sub)
    ros_commands.register(sub)
    study_commands.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader reports CPU-feature probing at INFO
    try:
        return int(args.func(args) or 0)
    except VprError as exc:
        print(f"vpr-ros {args.command}: error: {display_path(str(exc))}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in _ROS_MODULES:
            raise
        print(f"vpr-ros {args.command}: error: this command needs ROS 2 Python packages ({exc.name} is "
              "missing): pip install -c constraints.txt '.[ros]' and run scripts/build_msgs.py, or source "
              "a ROS 2 workspace where vpr_ros_msgs is built (docs/colcon.md)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
