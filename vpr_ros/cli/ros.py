"""``vpr-ros`` subcommands of the ROS layer (registered lazily by :mod:`vpr_ros.cli.main`).

``vpr-ros localize``: run the localizer graph in-process from a ROS 2 params file (see
:mod:`vpr_ros.ros.runner`). The bag replay / dataset-to-bag subcommands of
:mod:`vpr_ros.ros.replay` are registered here too when that module is present.
"""

from __future__ import annotations

import argparse
import importlib
import logging
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_PARAMS = Path("config/localize.yaml")


def add_localize_args(p: argparse.ArgumentParser) -> None:
    """Options of ``vpr-ros localize`` (shared with ``python -m vpr_ros.ros.runner``)."""
    p.add_argument("--params", type=Path, default=DEFAULT_PARAMS,
                   help="ROS 2 params file (node_name: {ros__parameters: ...}); default config/localize.yaml")
    p.add_argument("--set", action="append", metavar="NODE.PARAM=VALUE",
                   help="override one parameter, repeatable (e.g. localizer.map_path=maps/run1.vprmap)")
    p.add_argument("--transmitter", action="store_true",
                   help="start the transmitter node between the camera and the localizer")
    p.add_argument("--loop-closure", action="store_true", help="start the loop-closure node")
    p.add_argument("--duration", type=float, default=None,
                   help="stop after this many seconds (default: run until Ctrl-C / SIGTERM)")


def cmd_localize(args: argparse.Namespace) -> int:
    from vpr_ros.ros.runner import run_graph

    return run_graph(args.params, args.set or (), use_transmitter=args.transmitter,
                     use_loop_closure=args.loop_closure, duration=args.duration)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ROS subcommands to ``vpr-ros``."""
    p = sub.add_parser("localize", help="run the localizer graph in-process (no ros2 launch needed)",
                       description="Start the vpr_ros nodes in one process from a ROS 2 params file; "
                                   "Ctrl-C or SIGTERM stops them cleanly (the map is saved in map modes).")
    add_localize_args(p)
    p.set_defaults(func=cmd_localize)
    try:
        replay = importlib.import_module("vpr_ros.ros.replay")
    except ImportError as exc:
        log.debug("vpr_ros.ros.replay unavailable: %s", exc)
        return
    replay.register(sub)
