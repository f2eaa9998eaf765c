"""The one `vpr-ros` command line: one argparse tree over runtime, training, study and ROS subcommands."""
