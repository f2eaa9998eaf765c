"""The one `vpr-ros` command line: one argparse tree over runtime, training, study and ROS subcommands."""

from vpr_ros.cli.main import main

__all__ = ["main"]
