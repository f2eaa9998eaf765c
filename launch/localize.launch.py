"""Launch the vpr_ros graph: camera -> [transmitter] -> localizer -> [loop closure].

    ros2 launch vpr_ros localize.launch.py map_path:=/data/maps/route.vprmap
    ros2 launch vpr_ros localize.launch.py camera_topic:=front/image_raw mode:=map \
        odom_topic:=odom map_path:=~/maps/new.vprmap
    ros2 launch vpr_ros localize.launch.py namespace:=robot1 map_path:=~/maps/site.vprmap
    ros2 launch vpr_ros localize.launch.py use_transmitter:=true tx_mode:=jpeg jpeg_quality:=10 \
        use_loop_closure:=true

Every node reads its section of ``params_file`` (default: ``config/localize.yaml`` of the
installed package); a launch argument left empty keeps the file's value. Topic names are
relative: with ``namespace:=robot1`` the graph reads /robot1/camera/image_raw and publishes
/robot1/vpr/place_match. With the transmitter,
the localizer reads the transmitter's output instead of the camera and labels its matches
with the transmitter's mode (as ``vpr-ros localize --transmitter`` does in one process).
"""

from __future__ import annotations

import os

import yaml
from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument, LogInfo, OpaqueFunction, Shutdown
from launch.events.process import ProcessExited
from launch.launch_context import LaunchContext
from launch.launch_description import LaunchDescription
from launch_ros.actions import Node

PACKAGE = "vpr_ros"

#: (launch argument, node, parameter, type, description); "" keeps the params file's value.
OVERRIDES: tuple[tuple[str, str, str, type, str], ...] = (
    ("camera_topic", "localizer", "image_topic", str,
     "camera image topic (base name, e.g. camera/image_raw; relative names follow namespace)"),
    ("image_transport", "localizer", "image_transport", str,
     "raw (sensor_msgs/Image) or compressed (<camera_topic>/compressed)"),
    ("weights", "localizer", "weights", str,
     "model checkpoint (.pt); 'default' = packaged student, 'imagenet' = ImageNet-initialised model"),
    ("model", "localizer", "model", str,
     "registered model name; the checkpoint's when the params file has none"),
    ("input_size", "localizer", "input_size", str, "preprocessing size HxW, or 'native'"),
    ("device", "localizer", "device", str, "auto (GPU when present), cpu, cuda or cuda:N"),
    ("backend", "localizer", "backend", str,
     "inference backend: auto (onnx on CPU, torch on CUDA), torch or onnx"),
    ("precision", "localizer", "precision", str,
     "fp32, fp16 (CUDA only) or int8 (onnx backend, calibrated export)"),
    ("threads", "localizer", "threads", int, "backend intra-op threads (0: library default)"),
    ("map_path", "localizer", "map_path", str, "place map (.vprmap) to query, or to build in map modes"),
    ("mode", "localizer", "mode", str, "localize, map (build the map) or both"),
    ("odom_topic", "localizer", "odom_topic", str, "nav_msgs/Odometry for keyframe poses in map modes"),
    ("top_k", "localizer", "top_k", int, "candidates per PlaceMatch"),
    ("match_topic", "localizer", "match_topic", str, "PlaceMatch output topic"),
    ("tx_mode", "transmitter", "mode", str, "transmission: none, jpeg, resize, h264, h265 or bitrate"),
    ("jpeg_quality", "transmitter", "jpeg_quality", int, "JPEG quality 1..100 (tx_mode jpeg)"),
    ("scale", "transmitter", "scale", float, "resolution factor (0, 1] before the codec"),
    ("qp", "transmitter", "qp", int, "H.264/H.265 constant quantiser 0..51"),
    ("gop", "transmitter", "gop", int, "H.264/H.265 keyframe interval (frames)"),
    ("kbps", "transmitter", "kbps", float, "tx_mode bitrate: link budget in kbit/s"),
    ("fps", "transmitter", "fps", float, "frame rate the bit-rate budget refers to"),
    ("bitrate_codec", "transmitter", "bitrate_codec", str,
     "codec adapted in tx_mode bitrate: jpeg, h264, h265"),
)
#: Launch arguments with a fixed set of values (the nodes' parameter choices and the registered models;
#: test/test_launch.py keeps them equal). "" (keep the params file's value) is always allowed too.
CHOICES: dict[str, tuple[str, ...]] = {
    "image_transport": ("raw", "compressed"),
    "model": ("cricavpr_teacher_dinov2", "gem_mobilenetv2", "netvlad_mobilenetv2", "scicevpr_dinov2",
              "structvpr_mobilenetv2"),
    "backend": ("auto", "torch", "onnx"),
    "precision": ("fp32", "fp16", "int8"),
    "mode": ("localize", "map", "both"),
    "tx_mode": ("none", "jpeg", "resize", "h264", "h265", "bitrate"),
    "bitrate_codec": ("jpeg", "h264", "h265"),
}
SWITCHES: tuple[tuple[str, str, str], ...] = (
    ("use_transmitter", "false", "run the transmitter (simulated thin link) between camera and localizer"),
    ("use_loop_closure", "false", "run the loop-closure node on the localizer's matches"),
)
TRUE = ("true", "1", "yes", "on")


def _node_params(path: str, node: str) -> dict:
    """The node's ``ros__parameters`` (after the ``/**`` ones) from a ROS 2 params file."""
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    out: dict = {}
    for key in ("/**", node, f"/{node}"):
        section = data.get(key)
        if isinstance(section, dict) and isinstance(section.get("ros__parameters"), dict):
            out.update(section["ros__parameters"])
    return out


def _typed(text: str, typ: type, name: str):
    if typ is str:
        return text
    try:
        return typ(text)
    except ValueError:
        raise ValueError(f"launch argument {name}:={text!r} must be {typ.__name__}") from None


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
    arg = context.launch_configurations.get
    params_file = os.path.expanduser(arg("params_file"))
    use_tx = arg("use_transmitter").lower() in TRUE
    use_lc = arg("use_loop_closure").lower() in TRUE
    params = {n: _node_params(params_file, n) for n in ("localizer", "transmitter", "loop_closure")}
    for name, node, param, typ, _ in OVERRIDES:
        value = arg(name)
        if value:
            params[node][param] = _typed(value, typ, name)
    loc, tx = params["localizer"], params["transmitter"]
    if use_tx:  # camera -> transmitter -> localizer (the same wiring as vpr_ros.ros.runner.wire_graph)
        tx.setdefault("image_topic", loc.get("image_topic", "camera/image_raw"))
        tx.setdefault("image_transport", loc.get("image_transport", "raw"))
        loc["image_topic"] = tx.get("output_topic", "vpr/transmitted/image")
        loc["image_transport"] = "raw"
        if not loc.get("transmission_stats_topic"):
            loc["transmission_stats_topic"] = tx.get("stats_topic", "vpr/transmission_stats")
    lc = params["loop_closure"]  # the localizer's matches, the images it reads, its map's local features
    for key, default in (("match_topic", "vpr/place_match"), ("image_topic", "camera/image_raw"),
                         ("image_transport", "raw"), ("map_path", "")):
        lc.setdefault(key, loc.get(key, default))
    common = {"package": PACKAGE, "namespace": arg("namespace"), "output": "screen", "emulate_tty": True,
              "arguments": ["--ros-args", "--log-level", arg("log_level")], "on_exit": _required_exit}
    actions: list = [LogInfo(msg=f"vpr_ros: params {params_file}; transmitter {'on' if use_tx else 'off'}, "
                                 f"loop closure {'on' if use_lc else 'off'}")]
    if use_tx:
        actions.append(Node(executable="transmitter_node", name="transmitter", parameters=[tx], **common))
    actions.append(Node(executable="localizer_node", name="localizer", parameters=[loc], **common))
    if use_lc:
        actions.append(Node(executable="loop_closure_node", name="loop_closure",
                            parameters=[lc], **common))
    return actions


def generate_launch_description() -> LaunchDescription:
    default_params = os.path.join(get_package_share_directory(PACKAGE), "config", "localize.yaml")
    args = [DeclareLaunchArgument(
        "params_file", default_value=default_params,
        description="ROS 2 params file with localizer/transmitter/loop_closure sections")]
    args += [DeclareLaunchArgument(name, default_value="", description=f"{text} (empty: params file)",
                                   **({"choices": ["", *CHOICES[name]]} if name in CHOICES else {}))
             for name, _, _, _, text in OVERRIDES]
    args += [DeclareLaunchArgument(name, default_value=default, description=text, choices=["true", "false"])
             for name, default, text in SWITCHES]
    args += [DeclareLaunchArgument("namespace", default_value="", description="namespace of every node"),
             DeclareLaunchArgument("log_level", default_value="info",
                                   description="ROS log level of the nodes",
                                   choices=["debug", "info", "warn", "error", "fatal"])]
    return LaunchDescription([*args, OpaqueFunction(function=_graph)])
