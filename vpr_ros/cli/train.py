"""Training subcommands of ``vpr-ros``: ``train`` (any method's recipe), ``export``, ``plot-losses``,
``bag-dataset``.

The project CLI calls :func:`register` with its subparsers; :func:`main` parses these subcommands alone.
``train`` reads the recipe's method from its ``method:`` key (or its sections) through
:mod:`vpr_ros.training.methods`; ``export`` writes the deployed student the way the checkpoint's method
does. Handlers turn arguments into explicit library calls (no argparse namespace reaches library code)
and import the training modules when they run, so building the tree does not import torch.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from vpr_ros.core.errors import VprError
from vpr_ros.core.fileio import display_path

METHOD_NAMES = ("loqi", "general", "scicevpr", "structvpr")  # spelled out: parsing must not import torch


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train``, ``export``, ``plot-losses`` and ``bag-dataset`` to ``subparsers``."""
    p = subparsers.add_parser(
        "train",
        help=f"train a recipe of any method ({', '.join(METHOD_NAMES)})",
        description="Train a recipe (training/*.yaml); its `method:` key picks the method (a recipe without "
        "one is read by its sections). --set overrides keys, --resume continues run.dir.",
    )
    p.add_argument("--config", required=True, help="recipe YAML (see training/*.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set optim.lr=1e-4 --set data.root=/data/nordland",
    )
    p.add_argument("--resume", action="store_true", help="continue from run.dir/last.pt")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--export", metavar="OUT", help="also write the trained student as deployed weights (OUT)")
    p.set_defaults(func=_cmd_train)

    p = subparsers.add_parser("export", help="training checkpoint -> deployed weights (student only)")
    p.add_argument("checkpoint", help="training checkpoint (run.dir/last.pt)")
    p.add_argument("out", help="deployed weights file to write (.pt)")
    p.add_argument(
        "--sidecar",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also write OUT.json describing the training (default: the general student's export does)",
    )
    p.set_defaults(func=_cmd_export)

    p = subparsers.add_parser("plot-losses", help="loss curves of training runs (train.csv) to an image")
    p.add_argument("runs", nargs="+", help="run directories (each holds train.csv)")
    p.add_argument("--out", required=True, help="image to write (.png, .pdf, .svg)")
    p.set_defaults(func=_cmd_plot_losses)

    p = subparsers.add_parser("bag-dataset", help="summarise (and export) the place set of recorded bags")
    p.add_argument("bags", nargs="+", help="rosbag2 folders (or ROS 1 .bag files)")
    p.add_argument("--image-topic", default="/camera/image_raw", help="sensor_msgs/Image topic")
    p.add_argument("--position-topic", default="/odom", help="nav_msgs/Odometry or sensor_msgs/NavSatFix")
    p.add_argument("--max-gap", type=float, default=0.2, help="max image-position time gap (s)")
    p.add_argument("--pos-radius", type=float, default=10.0, help="revisit radius (m)")
    p.add_argument("--neg-radius", type=float, default=25.0, help="negatives beyond this distance (m)")
    p.add_argument(
        "--min-time-gap", type=float, default=30.0, help="same-bag revisits at least this far apart (s)"
    )
    p.add_argument("--every", type=int, default=1, help="keep every n-th image")
    p.add_argument("--out", help="write images/*.png and positions.csv (name,x,y,stamp,sequence) here")
    p.set_defaults(func=_cmd_bag_dataset)


def _cmd_train(args: argparse.Namespace) -> int:
    import torch  # heavy: only a training run needs it

    from vpr_ros.training.methods import load_recipe  # torch: only when training runs

    if args.threads:
        torch.set_num_threads(args.threads)
    method, cfg = load_recipe(args.config, args.overrides)
    result = method.train(cfg, resume=args.resume)
    metrics = "  ".join(f"{k} {100 * v:.1f}" for k, v in result.metrics.items())
    print(f"{result.run_dir}: {method.name}, {result.steps} steps in {result.train_seconds:.1f} s; {metrics}")
    if args.export:
        path = method.export(result.checkpoint, args.export, sidecar=method.sidecar)
        print(f"wrote {path}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from vpr_ros.training.methods import export  # torch: only when exporting

    print(f"wrote {export(args.checkpoint, args.out, sidecar=args.sidecar)}")
    return 0


def _cmd_plot_losses(args: argparse.Namespace) -> int:
    from vpr_ros.training.curves import plot_losses  # matplotlib: only when plotting

    print(f"wrote {plot_losses(args.runs, args.out)}")
    return 0


def _cmd_bag_dataset(args: argparse.Namespace) -> int:
    # runs with the command: keeps `vpr-ros --help` light
    from vpr_ros.core.fileio import check_output_dir, write_file_checked
    from vpr_ros.core.images import save_image
    from vpr_ros.training.data import bag_places

    out = check_output_dir(Path(args.out) / "images").parent if args.out else None  # before reading bags
    places = bag_places(
        args.bags,
        image_topic=args.image_topic,
        position_topic=args.position_topic,
        pos_radius_m=args.pos_radius,
        neg_radius_m=args.neg_radius,
        min_time_gap_s=args.min_time_gap,
        max_gap_s=args.max_gap,
        every=args.every,
    )
    print(places.summary())
    if out is not None:
        # every image is written and checked (disk full: OutputError, exit 2) before positions.csv,
        # the file that makes the folder a dataset, is written last
        table = io.StringIO(newline="")
        w = csv.writer(table)
        w.writerow(["name", "x", "y", "stamp", "sequence"])
        for i, r in enumerate(places.database):
            name = f"images/{r.sequence}_{i:06d}.png"
            save_image(out / name, r.load())
            w.writerow([name, f"{r.position[0]:.3f}", f"{r.position[1]:.3f}", f"{r.stamp:.6f}", r.sequence])
        write_file_checked(out / "positions.csv", table.getvalue().encode("utf-8"))
        print(f"wrote {len(places.database)} images and {display_path(out / 'positions.csv')}")
    return 0


def run_handler(args: argparse.Namespace) -> int:
    """Run a parsed subcommand; library errors print one line and return 2."""
    try:
        return int(args.func(args) or 0)
    except VprError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    """These subcommands alone (``vpr-ros`` holds them too)."""
    parser = argparse.ArgumentParser(prog="vpr-ros", description=__doc__.split("\n")[0])
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_handler(args)
