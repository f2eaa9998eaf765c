"""The ROS subcommands of ``vpr-ros``: ``localize`` (the graph in-process), ``replay`` (a bag through the
real nodes, scored), ``make-bag`` (a shared dataset as a rosbag2 bag) and ``loop-eval`` (loop-closure
precision-recall); each turns its arguments into one library call."""

from __future__ import annotations

import argparse
from pathlib import Path

from vpr_ros.core.errors import VprError
from vpr_ros.core.fileio import display_path

DEFAULT_PARAMS = Path("config/localize.yaml")
#: ``vpr_ros.data.dataset_bags.BAG_DATASETS`` (spelled out: building the parser must stay light).
BAG_DATASETS = ("kitti", "nordland", "rtabmap_loop")


# --------------------------------------------------------------------------- commands


def cmd_localize(args: argparse.Namespace) -> int:
    # rclpy and the node modules load only when a ROS command runs
    from vpr_ros.ros.runner import run_graph

    return run_graph(args.params, args.set or (), use_transmitter=args.transmitter,
                     use_loop_closure=args.loop_closure, duration=args.duration)


def cmd_make_bag(args: argparse.Namespace) -> int:
    # rosbags and the dataset readers load only when this command runs
    from vpr_ros.data.dataset_bags import make_dataset_bag

    info = make_dataset_bag(args.dataset, args.root, args.out, storage=args.storage,
                            compressed=args.compressed, jpeg_quality=args.jpeg_quality,
                            image_topic=args.image_topic,
                            position_topic=args.position_topic, sequence=args.sequence, season=args.season,
                            every=args.every, limit=args.limit, rate_hz=args.rate_hz)
    where = f", positions on {info['position_topic']}" if info["position_topic"] else ", no positions"
    print(f"bag {display_path(info['bag'])} ({info['storage']}): {info['frames']} {info['dataset']} "
          f"frames on {info['image_topic']} ({info['image_type']}) at {info['rate_hz']:g} Hz, "
          f"{info['duration_s']:.1f} s{where}")
    if info["dropped"]:  # Nordland's filters: say which frames are not in the bag and why
        kinds: dict[str, int] = {}
        for _, reason in info["dropped"]:
            kinds[reason.split(":")[0]] = kinds.get(reason.split(":")[0], 0) + 1
        path, reason = info["dropped"][0]
        print(f"{len(info['dropped'])} selected frames left out ("
              f"{', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}; the first, {display_path(path)}: "
              f"{reason})")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    # rclpy, the nodes and torch load only when a ROS command runs
    from vpr_ros.ros.replay import ReplayConfig, replay_failure, run_replay

    cfg = ReplayConfig(
        bag=Path(args.bag), map_path=Path(args.map), out_dir=Path(args.out), image_topic=args.image_topic,
        position_topic=args.position_topic, rate=args.rate, fast=args.fast,
        record=Path(args.record) if args.record else None, mode=args.mode, loop_closure=args.loop_closure,
        gt_matrix=Path(args.gt_matrix) if args.gt_matrix else None, radius=args.radius, top_k=args.top_k,
        weights=args.weights, model=args.model or "", input_size=args.input_size or "", device=args.device,
        params_file=Path(args.params) if args.params else None, sets=list(args.set or []),
        namespace=args.namespace, timeout_s=args.timeout)
    r = run_replay(cfg)
    print(f"replayed {r['frames_published']} frames ({r['pace']}) in {r['wall_s']:.1f} s: "
          f"{r['place_matches']} PlaceMatch, map {r['map_size']} places")
    if r.get("latency_ms"):
        print(f"latency p50 {r['latency_ms']['p50']:.1f} ms, p95 {r['latency_ms']['p95']:.1f} ms")
    if r.get("recall"):
        rec = ", ".join(f"R@{n} {100 * v:.1f}%" for n, v in r["recall"].items())
        print(f"recall ({r['ground_truth']}): {rec}")
    if r.get("loop_closures"):
        lc = r["loop_closures"]
        prec = "-" if lc["precision"] is None else f"{lc['precision']:.3f}"
        print(f"loop closures: {lc['published']} published, precision {prec}, recall {lc['recall']:.3f}")
    print(f"report {display_path(r['report'])}" + (f", recorded {display_path(r['record'])}"
                                                   if r.get("record") else ""))
    failure = replay_failure(r)
    if failure:
        raise VprError(f"{failure}; report {display_path(r['report'])}")
    return 0


def cmd_loop_eval(args: argparse.Namespace) -> int:
    # torch and the models load only when this command runs
    from vpr_ros.eval.loop_closure import evaluate_loop_closure

    models = None
    if args.weights:
        models = [("structvpr_imagenet", None)] + [(Path(w).stem, w) for w in args.weights]
    r = evaluate_loop_closure(args.root, args.out, models=models, degradations=args.degrade or
                              ("none", "jpeg:10", "h264:40"), device=args.device)
    print(f"{'model':22s} {'link':12s} {'bytes':>8s} {'AP':>6s} {'R@P1':>6s} {'AP ver':>6s} {'R@P1 ver':>8s}")
    for name, m in r["models"].items():
        for cond, c in m["conditions"].items():
            key = f"top{r['defaults_in_code']['top_k']}_min{r['defaults_in_code']['min_inliers']}"
            ver = c["verified"].get(key) or next(iter(c["verified"].values()), {})
            base = c["descriptor_only"]
            print(f"{name:22s} {cond:12s} {c['bytes_per_frame']:8.0f} {base['average_precision']:6.3f} "
                  f"{base['recall_at_100_precision']:6.3f} {ver.get('average_precision', 0):6.3f} "
                  f"{ver.get('recall_at_100_precision', 0):8.3f}")
        op = m["operating_point"]
        per = ", ".join(f"{k} P {v['precision']:.2f} R {v['recall']:.2f}"
                        for k, v in op["per_condition"].items())
        print(f"  operating point: top_k {op['top_k']}, min_inliers {op['min_inliers']}, "
              f"score_threshold {op['score_threshold']:.4f} -> {per}")
    if args.write_card:
        from vpr_ros.core.models.card import write_card
        from vpr_ros.eval.loop_closure import card_entry

        for m in r["models"].values():
            if m["weights"]:
                changed = write_card(m["weights"], {"loop_closure": card_entry(m["operating_point"])})
                print(f"{m['weights']}: card {'updated' if changed else 'unchanged'}")
    s = r["shipped"]
    print(f"\nshipped ({s['model']}): exclusion_window_s {s['exclusion_window_s']:g}, score_threshold "
          f"{s['score_threshold']:.4f}, top_k {s['top_k']}, geometric_verification true, min_inliers "
          f"{s['min_inliers']}\nreport {r['json']}")
    return 0


# --------------------------------------------------------------------------- parsers


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``localize``, ``make-bag``, ``replay`` and ``loop-eval`` to ``vpr-ros``."""
    p = sub.add_parser("localize", help="run the localizer graph in-process (no ros2 launch needed)",
                       description="Start the vpr_ros nodes in one process from a ROS 2 params file; "
                                   "Ctrl-C or SIGTERM stops them cleanly (the map is saved in map modes).")
    p.add_argument("--params", type=Path, default=DEFAULT_PARAMS,
                   help="ROS 2 params file (node_name: {ros__parameters: ...}); default config/localize.yaml")
    p.add_argument("--set", action="append", metavar="NODE.PARAM=VALUE",
                   help="override one parameter, repeatable (e.g. localizer.map_path=maps/run1.vprmap)")
    p.add_argument("--transmitter", action="store_true",
                   help="start the transmitter node between the camera and the localizer")
    p.add_argument("--loop-closure", action="store_true", help="start the loop-closure node")
    p.add_argument("--duration", type=float, default=None,
                   help="stop after this many seconds (default: run until Ctrl-C / SIGTERM)")
    p.set_defaults(func=cmd_localize)

    p = sub.add_parser("make-bag", help="write a shared dataset as a rosbag2 bag (images + Odometry)")
    p.add_argument("--dataset", required=True, choices=BAG_DATASETS, help="which shared dataset")
    p.add_argument("--root", required=True, type=Path, help="dataset folder (../shared/data/<name>)")
    p.add_argument("--out", required=True, type=Path, help="new bag folder (e.g. kitti00.mcap)")
    p.add_argument("--storage", default="mcap", choices=["mcap", "sqlite3"], help="rosbag2 storage plugin")
    p.add_argument("--compressed", action="store_true", help="JPEG CompressedImage on <topic>/compressed")
    p.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality with --compressed")
    p.add_argument("--image-topic", default="/camera/image_raw", help="image topic to write")
    p.add_argument("--position-topic", default="/odom", help="nav_msgs/Odometry topic (kitti, nordland)")
    p.add_argument("--sequence", default="00", help="KITTI sequence")
    p.add_argument("--season", default="winter", choices=["summer", "winter"], help="Nordland season")
    p.add_argument("--every", type=int, default=1, help="every N-th frame (stamps keep the original timing)")
    p.add_argument("--limit", type=int, default=None, help="at most this many frames")
    p.add_argument("--rate-hz", type=float, default=None,
                   help="frame rate (default: kitti 10, nordland 0.1, rtabmap_loop 1)")
    p.set_defaults(func=cmd_make_bag)

    p = sub.add_parser("replay", help="replay a bag through the real localizer (+ loop closure), score it")
    p.add_argument("--bag", required=True, help="rosbag2 folder (or ROS 1 .bag file)")
    p.add_argument("--map", required=True, help="place map (.vprmap); --mode map/both create it when missing")
    p.add_argument("--image-topic", default=None, help="image topic of the bag (default: its only one)")
    p.add_argument("--position-topic", default=None, help="Odometry/NavSatFix topic (default: its only one)")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--rate", type=float, default=1.0, help="playback speed, x bag rate (default 1.0)")
    pace.add_argument("--fast", action="store_true", help="as fast as the nodes go (flow control)")
    p.add_argument("--record", default=None, help="record PlaceMatch / LoopClosure to this new bag")
    p.add_argument("--out", default="results/replay", help="folder for report.json and plots")
    p.add_argument("--mode", default="localize", choices=["localize", "map", "both"], help="localizer mode")
    p.add_argument("--loop-closure", action="store_true", help="run the loop-closure node too")
    p.add_argument("--gt-matrix", default=None, help="N x N 0/1 loop matrix over the bag's frames")
    p.add_argument("--radius", type=float, default=25.0, help="distance ground truth radius (m)")
    p.add_argument("--top-k", type=int, default=10, help="candidates per PlaceMatch")
    p.add_argument("--weights", default="default", help="default | imagenet | checkpoint.pt")
    p.add_argument("--model", default="", help="registered model name (empty: the checkpoint's)")
    p.add_argument("--input-size", default="", help="HxW, 'native', or empty for the model's own")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--params", default=None, help="ROS 2 params file (config/localize.yaml) for the nodes")
    p.add_argument("--set", action="append", metavar="NODE.PARAM=VALUE", help="override one node parameter")
    p.add_argument("--namespace", default=None, help="topic namespace (default: a private one per run)")
    p.add_argument("--timeout", type=float, default=30.0, help="wait for one frame's result (s, --fast)")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("loop-eval", help="loop-closure precision-recall on rtabmap_loop (clean, JPEG, H.264)")
    p.add_argument("--root", required=True, type=Path, help="the rtabmap_loop folder")
    p.add_argument("--out", default="results/loop", type=Path, help="folder for the report and plots")
    p.add_argument("--weights", action="append", help="extra checkpoint(s) to evaluate besides ImageNet")
    p.add_argument("--degrade", action="append", help="link specs (default none, jpeg:10, h264:40)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--write-card", action="store_true",
                   help="record each --weights checkpoint's operating point on its model card (the launch "
                        "file and the runner give the loop-closure node its score_threshold)")
    p.set_defaults(func=cmd_loop_eval)
