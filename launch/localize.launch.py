"""Launch the vpr_ros graph: camera -> [transmitter] -> localizer -> [loop closure].

    ros2 launch vpr_ros localize.launch.py map_path:=/data/maps/route.vprmap
    ros2 launch vpr_ros localize.launch.py camera_topic:=front/image_raw mode:=map \
        odom_topic:=odom map_path:=~/maps/new.vprmap
    ros2 launch vpr_ros localize.launch.py namespace:=robot1 map_path:=~/maps/site.vprmap
    ros2 launch vpr_ros localize.launch.py use_transmitter:=true tx_mode:=jpeg jpeg_quality:=10 \
        use_loop_closure:=true

The nodes, their wiring and the launch arguments (descriptions and choices from the nodes'
parameter specs) are those of :mod:`vpr_ros.ros.graph`, shared with ``vpr-ros localize``. Every
node reads its section of ``params_file`` (default: ``config/localize.yaml`` of the installed
package, ``/**`` values included); a launch argument left empty keeps the file's value, and a
parameter the node does not declare fails the launch. Topic names are relative: with
``namespace:=robot1`` the graph reads /robot1/camera/image_raw and publishes /robot1/vpr/place_match.
"""

from __future__ import annotations

import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument, LogInfo, OpaqueFunction, Shutdown
from launch.events.process import ProcessExited
from launch.launch_context import LaunchContext
from launch.launch_description import LaunchDescription
from launch_ros.actions import Node

from vpr_ros.ros import graph

PACKAGE = "vpr_ros"
TRUE = ("true", "1", "yes", "on")


class RequiredNodeFailed(RuntimeError):
    """A node of the graph exited with a non-zero status while the launch was running."""


def _required_exit(event: ProcessExited, context: LaunchContext) -> list:
    """``on_exit`` of every node: the graph is useless without any of them, so shut it down.

    A node that exits while the launch is not shutting down ends the launch; a non-zero status
    is raised, which LaunchService logs and turns into a non-zero exit of ``ros2 launch``.
    """
    if context.is_shutdown:  # stopped by the launch itself (Ctrl-C, another node's exit)
        return []
    if event.returncode != 0:
        raise RequiredNodeFailed(f"required node {event.process_name} exited with status {event.returncode}; "
                                 "shutting the graph down")
    return [Shutdown(reason=f"required node {event.process_name} exited")]


def _graph(context: LaunchContext) -> list:
    """The graph's nodes, each with its params-file section, launch arguments and wiring applied."""
    arg = context.launch_configurations.get
    params_file = os.path.expanduser(arg("params_file"))
    switches = {name: arg(name).lower() in TRUE for name in graph.SWITCHES}
    params = graph.apply_launch_arguments(graph.load_params_file(params_file),
                                          {name: arg(name) for name, _ in graph.LAUNCH_PARAMS})
    params = graph.wire(params, use_transmitter=switches["use_transmitter"])
    nodes = graph.active_nodes(**switches)
    common = {"package": PACKAGE, "namespace": arg("namespace"), "output": "screen", "emulate_tty": True,
              "arguments": ["--ros-args", "--log-level", arg("log_level")], "on_exit": _required_exit}
    actions: list = [LogInfo(msg=f"vpr_ros: params {params_file}; " + ", ".join(
        f"{n.name} {'on' if switches[n.switch] else 'off'}" for n in graph.NODES if n.switch))]
    actions += [Node(executable=n.executable, name=n.name, parameters=[graph.node_values(n.name, params)],
                     **common) for n in nodes]
    return actions


def generate_launch_description() -> LaunchDescription:
    default_params = os.path.join(get_package_share_directory(PACKAGE), "config", "localize.yaml")
    args = [DeclareLaunchArgument(a.name, default_value=a.default, description=a.description,
                                  **({"choices": list(a.choices)} if a.choices else {}))
            for a in graph.launch_arguments(default_params)]
    return LaunchDescription([*args, OpaqueFunction(function=_graph)])
