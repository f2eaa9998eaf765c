"""The vpr_ros node graph, described once: camera -> [transmitter] -> localizer -> [loop closure].

Its nodes (name, executable, class), the wiring of their topic parameters, how a ROS 2 params file
and ``--set`` / launch-argument values become each node's parameters, and the launch arguments;
launch/localize.launch.py, the in-process runner, replay and the demo all build the graph from here.
Importing it needs no rclpy: a node's module (with its ``PARAMS`` specs) is imported on first use.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from vpr_ros.core.config_file import load_yaml, parse_value
from vpr_ros.core.errors import ConfigError
from vpr_ros.core.fileio import display_path
from vpr_ros.paths import weights_file

__all__ = [
    "KEEP_FILE",
    "LAUNCH_PARAMS",
    "NODES",
    "SWITCHES",
    "WIRES",
    "GraphNode",
    "LaunchArgument",
    "Wire",
    "active_nodes",
    "apply_launch_arguments",
    "apply_sets",
    "graph_node",
    "launch_arguments",
    "load_params_file",
    "node_values",
    "param_specs",
    "typed_value",
    "wire",
    "wired_params",
]

Params = dict[str, dict[str, Any]]


@dataclass(frozen=True)
class GraphNode:
    """One node of the graph.

    ``name`` is the ROS node name and its section of the params file; ``executable`` the console
    script (setup.py) that the launch file starts; ``module``/``cls`` the class the in-process runner
    constructs. An optional node has a ``switch``: the launch argument that adds it (the runner's
    ``--transmitter`` / ``--loop-closure``), described by ``switch_help``.
    """

    name: str
    executable: str
    module: str
    cls: str
    switch: str | None = None
    switch_help: str = ""

    def node_class(self) -> type:
        """The node's class (imports its module, and so rclpy)."""
        return getattr(importlib.import_module(self.module), self.cls)


#: The graph's nodes in start order (a producer before its consumers).
NODES: tuple[GraphNode, ...] = (
    GraphNode("transmitter", "transmitter_node", "vpr_ros.ros.transmitter_node", "TransmitterNode",
              "use_transmitter", "run the transmitter (simulated thin link) between camera and localizer"),
    GraphNode("localizer", "localizer_node", "vpr_ros.ros.localizer_node", "LocalizerNode"),
    GraphNode("loop_closure", "loop_closure_node", "vpr_ros.ros.loop_closure_node", "LoopClosureNode",
              "use_loop_closure", "run the loop-closure node on the localizer's matches"),
)
_BY_NAME = {n.name: n for n in NODES}
#: The switches of the optional nodes, in node order.
SWITCHES: tuple[str, ...] = tuple(n.switch for n in NODES if n.switch)
#: Parameters rclpy declares on every node itself.
ROS_OWN = ("use_sim_time",)


def graph_node(name: str) -> GraphNode:
    """The node called ``name``; :class:`ConfigError` lists the graph's nodes otherwise."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ConfigError(f"unknown node {name!r}; nodes: {', '.join(_BY_NAME)}") from None


def active_nodes(*, use_transmitter: bool = False, use_loop_closure: bool = False) -> tuple[GraphNode, ...]:
    """The nodes that run with these switches, in start order."""
    on = {"use_transmitter": use_transmitter, "use_loop_closure": use_loop_closure}
    return tuple(n for n in NODES if n.switch is None or on[n.switch])


@cache
def param_specs(name: str) -> dict[str, Any]:
    """The ``PARAMS`` (:class:`~vpr_ros.ros.node_kit.ParamSpec`) of node ``name`` by parameter name.

    Imports the node's module (rclpy, and for the localizer torch); empty when it cannot be imported,
    in which case values are passed on unchecked.
    """
    node = _BY_NAME.get(name)
    if node is None:
        return {}
    try:
        module = importlib.import_module(node.module)
    except ImportError:
        return {}
    return {s.name: s for s in getattr(module, "PARAMS", ())}


# --------------------------------------------------------------------------- wiring


@dataclass(frozen=True)
class Wire:
    """``node.param`` takes the value of ``source`` (``"other_node.param"``) or the fixed ``value``.

    ``when``: the switch under which the wire applies (None: always). ``rule``: ``"unset"`` wires
    only a parameter the node's own section leaves unset, ``"empty"`` also one set to ``""``,
    ``"always"`` overrides the section. A wired value beats a ``/**`` one. ``derive``: a function of the
    source's value giving the wired value (None from it: the parameter stays unset, at its default).
    """

    node: str
    param: str
    source: str | None = None
    value: Any = None
    when: str | None = None
    rule: str = "unset"
    derive: Callable[[Any], Any] | None = None


def card_score_threshold(weights: Any) -> float | None:
    """The loop-closure score threshold on the card of the localizer's ``weights`` (None: no card value;
    the loop-closure node keeps its default). Read from the checkpoint's ``.json`` sidecar when it has one
    (``write_card`` keeps both; no torch), else from the checkpoint."""
    path = weights_file(str(weights))
    if path is None:
        return None
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        try:
            value = (json.loads(sidecar.read_text()).get("card") or {}).get("loop_closure", {}).get(
                "score_threshold")
        except (ValueError, AttributeError):
            value = None
        if value is not None:
            return float(value)
    card = importlib.import_module("vpr_ros.core.models.card")  # torch: only for a checkpoint without sidecar
    return card.loop_score_threshold(path)


#: How the nodes' topics connect, applied in this order. With the transmitter it reads the camera
#: (the localizer's image settings) and the localizer reads its output and labels matches from its
#: stats; the loop-closure node reads the localizer's matches, the images the localizer reads, and
#: verifies against the localizer's map (its stored local features).
WIRES: tuple[Wire, ...] = (
    Wire("transmitter", "image_topic", "localizer.image_topic", when="use_transmitter"),
    Wire("transmitter", "image_transport", "localizer.image_transport", when="use_transmitter"),
    Wire("localizer", "image_topic", "transmitter.output_topic", when="use_transmitter", rule="always"),
    Wire("localizer", "image_transport", value="raw", when="use_transmitter", rule="always"),
    Wire("localizer", "transmission_stats_topic", "transmitter.stats_topic", when="use_transmitter",
         rule="empty"),
    Wire("loop_closure", "match_topic", "localizer.match_topic"),
    Wire("loop_closure", "image_topic", "localizer.image_topic"),
    Wire("loop_closure", "image_transport", "localizer.image_transport"),
    Wire("loop_closure", "map_path", "localizer.map_path"),
    # descriptor similarities are on each model's own scale: the threshold is on the weights' card
    Wire("loop_closure", "score_threshold", "localizer.weights", derive=card_score_threshold),
)


def wired_params(name: str, *, derived: bool = True) -> tuple[str, ...]:
    """The parameters of node ``name`` that :data:`WIRES` may set (``derived=False``: only those that
    take another parameter's value as it is, such as topics)."""
    return tuple(dict.fromkeys(w.param for w in WIRES if w.node == name and (derived or w.derive is None)))


def _source_value(params: Params, source: str) -> Any:
    """``node.param``'s value: its section's, else the ``/**`` one, else the parameter's default."""
    node, _, param = source.partition(".")
    for section in (params.get(node, {}), params.get("*", {})):
        if param in section:
            return section[param]
    spec = param_specs(node).get(param)
    if spec is None:
        raise ConfigError(f"cannot wire the graph: the default of {source} is unknown (is rclpy installed?)")
    return spec.default


def wire(params: Params, *, use_transmitter: bool) -> Params:
    """A copy of ``params`` (per node name, ``*`` for ``/**``) with :data:`WIRES` applied.

    Values the params file leaves unset come from the source node's parameter defaults.
    """
    out = {k: dict(v) for k, v in params.items()}
    on = {None: True, "use_transmitter": use_transmitter}
    for w in WIRES:
        if not on.get(w.when, False):
            continue
        section = out.get(w.node, {})
        if w.rule == "unset" and w.param in section or w.rule == "empty" and section.get(w.param, "") != "":
            continue
        value = w.value if w.source is None else _source_value(out, w.source)
        if w.derive is not None:
            value = w.derive(value)
            if value is None:
                continue
        out.setdefault(w.node, {})[w.param] = value
    return out


# --------------------------------------------------------------------------- params files and values


def _flatten(prefix: str, value: Any, out: dict[str, Any], where: str) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out, where)
    elif value is None:
        raise ConfigError(f"{where}: parameter {prefix!r} has no value")
    else:
        out[prefix] = value


def load_params_file(path: str | Path) -> Params:
    """Parameters per node name from a ROS 2 params file; ``/**`` entries go to every node (key ``*``).

    Nested mappings under ``ros__parameters`` become dotted names, as ROS 2 reads them.
    """
    path = Path(path)
    data = load_yaml(path, what="params file")
    if not data:
        raise ConfigError(f"params file {path}: empty; expected a mapping of node names")
    out: Params = {}
    for key, body in data.items():
        name = str(key).strip("/") if key != "/**" else "*"
        if not isinstance(body, dict) or not isinstance(body.get("ros__parameters"), dict):
            raise ConfigError(f"params file {path}: {key!r} has no 'ros__parameters' mapping")
        params: dict[str, Any] = {}
        _flatten("", body["ros__parameters"], params, f"params file {path}, node {key}")
        out.setdefault(name, {}).update(params)
    return out


def _known(specs: Mapping[str, Any], param: str) -> bool:
    return not specs or param in specs or param in ROS_OWN or param.startswith("qos_overrides.")


def typed_value(spec: Any, text: str, where: str) -> Any:
    """``text`` as a value of ``spec``'s type (a YAML scalar when ``spec`` is None)."""
    if spec is None:
        return parse_value(text, where=where)
    if spec.type is str:
        return text
    if spec.type is bool:
        v = parse_value(text, where=where)
        if not isinstance(v, bool):
            raise ConfigError(f"{where}: expected true or false")
        return v
    try:
        return spec.type(text)
    except ValueError:
        raise ConfigError(f"{where}: expected {spec.type.__name__}") from None


def apply_sets(params: Params, sets: Iterable[str]) -> Params:
    """Apply ``node.param=value`` overrides (typed by the node's parameter specs when known)."""
    out = {k: dict(v) for k, v in params.items()}
    for item in sets:
        key, eq, text = item.partition("=")
        node, dot, param = key.strip().partition(".")
        if not eq or not dot or not node or not param:
            raise ConfigError(f"--set {item!r}: expected NODE.PARAM=VALUE, e.g. localizer.top_k=3")
        try:  # ROS strings are UTF-8: a Latin-1 file name from the command line cannot be passed on
            item.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError(f"--set {display_path(item)}: not valid UTF-8 text (ROS parameters are UTF-8 "
                              "strings); rename the file or folder") from None
        node = "*" if node == "/**" else node
        if node != "*" and node not in _BY_NAME:  # a typo would otherwise be ignored silently
            raise ConfigError(f"--set {item!r}: unknown node {node!r}; nodes: {', '.join(_BY_NAME)} "
                              "(or * for all)")
        specs = param_specs(node)
        if not _known(specs, param):
            raise ConfigError(f"unknown parameter(s) for node {node!r}: {param} (--set {item!r}); known: "
                              f"{', '.join(sorted(specs))}")
        where = f"--set {key.strip()}={text}"
        out.setdefault(node, {})[param] = typed_value(specs.get(param), text.strip(), where)
    return out


def node_values(name: str, params: Params) -> dict[str, Any]:
    """Parameter values of node ``name``: the ``/**`` ones it declares, then its own section's.

    A name its specs do not declare is a :class:`ConfigError` (a typo would otherwise be ignored);
    integers given for float parameters are widened.
    """
    specs = param_specs(name)
    own = params.get(name, {})
    merged = {k: v for k, v in params.get("*", {}).items() if not specs or k in specs or k in ROS_OWN}
    merged.update(own)
    unknown = sorted(k for k in own if not _known(specs, k))
    if unknown:
        raise ConfigError(f"unknown parameter(s) for node {name!r}: {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(specs))}")
    return {k: specs[k].coerce(v) if k in specs else v for k, v in merged.items()}


# --------------------------------------------------------------------------- launch arguments


#: Launch arguments that set one node parameter each (an argument left empty keeps the params file's value).
LAUNCH_PARAMS: tuple[tuple[str, str], ...] = (
    ("camera_topic", "localizer.image_topic"),
    ("image_transport", "localizer.image_transport"),
    ("weights", "localizer.weights"),
    ("model", "localizer.model"),
    ("input_size", "localizer.input_size"),
    ("device", "localizer.device"),
    ("backend", "localizer.backend"),
    ("precision", "localizer.precision"),
    ("threads", "localizer.threads"),
    ("map_path", "localizer.map_path"),
    ("mode", "localizer.mode"),
    ("odom_topic", "localizer.odom_topic"),
    ("top_k", "localizer.top_k"),
    ("match_topic", "localizer.match_topic"),
    ("tx_mode", "transmitter.mode"),
    ("jpeg_quality", "transmitter.jpeg_quality"),
    ("scale", "transmitter.scale"),
    ("qp", "transmitter.qp"),
    ("gop", "transmitter.gop"),
    ("kbps", "transmitter.kbps"),
    ("fps", "transmitter.fps"),
    ("bitrate_codec", "transmitter.bitrate_codec"),
)
#: What a launch argument left empty means, appended to the parameter's description.
KEEP_FILE = " [not given: the params file's value]"
LOG_LEVELS = ("debug", "info", "warn", "error", "fatal")


@dataclass(frozen=True)
class LaunchArgument:
    """One argument of launch/localize.launch.py; ``target`` is the ``node.param`` it sets, if any."""

    name: str
    default: str
    description: str
    choices: tuple[str, ...] | None = None
    target: str | None = None


def _model_names() -> tuple[str, ...]:
    """The registered model names, as the core registers them."""
    registry = importlib.import_module("vpr_ros.core.models")  # torch: loaded when arguments are declared
    return tuple(registry.list_models())


def launch_arguments(params_file: str = "") -> list[LaunchArgument]:
    """Every launch argument, in ``--show-args`` order; ``params_file`` is that argument's default.

    Descriptions, types and choices of the parameter arguments are the nodes' parameter specs;
    ``model`` offers the registered models. Choice lists include ``""`` (keep the file's value).
    """
    out = [LaunchArgument("params_file", params_file, "ROS 2 params file with "
                          f"{'/'.join(n.name for n in NODES)} sections")]
    for arg, target in LAUNCH_PARAMS:
        node, _, param = target.partition(".")
        spec = param_specs(node)[param]
        choices = spec.choices or (_model_names() if target == "localizer.model" else None)
        limits = f"; {spec.type.__name__} in {spec.limits}" if not choices and spec.limits else ""
        out.append(LaunchArgument(arg, "", f"{node} {param}: {spec.description}{limits}{KEEP_FILE}",
                                  ("", *choices) if choices else None, target))
    out += [LaunchArgument(n.switch, "false", n.switch_help, ("true", "false")) for n in NODES if n.switch]
    out += [LaunchArgument("namespace", "", "namespace of every node"),
            LaunchArgument("log_level", "info", "ROS log level of the nodes", LOG_LEVELS)]
    return out


def apply_launch_arguments(params: Params, values: Mapping[str, str]) -> Params:
    """``params`` with the non-empty parameter arguments of ``values`` (argument -> text) applied."""
    out = {k: dict(v) for k, v in params.items()}
    for arg, target in LAUNCH_PARAMS:
        text = values.get(arg) or ""
        if not text:
            continue
        node, _, param = target.partition(".")
        spec = param_specs(node).get(param)
        out.setdefault(node, {})[param] = typed_value(spec, text, f"launch argument {arg}:={text!r}")
    return out
