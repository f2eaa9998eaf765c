"""Run the vpr_ros graph in one process: the same nodes and the same params file as the launch file.

``vpr-ros localize --params config/localize.yaml [--set localizer.top_k=3] [--transmitter]
[--loop-closure]`` reads a ROS 2 params file (``node_name: {ros__parameters: {...}}``, ``/**``
for every node), starts the nodes in one ``SingleThreadedExecutor`` (their callbacks only queue
work for each node's worker thread) with the nodes' 0.5 ms GIL switch interval, as each node's
``main()`` does, and stops them cleanly on Ctrl-C / SIGTERM (workers stopped, the map saved in
map modes). This is how the graph runs where ``ros2 launch`` is not installed (the PyPI-wheel
ROS of this project's venv).

:class:`InProcessGraph` is the reusable part (tests and the demo use it): a private rclpy
context with an executor spinning in a background thread, nodes added to it, and an orderly
shutdown.
"""

from __future__ import annotations

import importlib
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import rclpy
from rclpy.context import Context
from rclpy.executors import Executor, ExternalShutdownException, MultiThreadedExecutor, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.signals import SignalHandlerOptions

from vpr_ros.core.config_file import load_yaml, parse_value
from vpr_ros.core.errors import ConfigError, VprError
from vpr_ros.core.fileio import display_path
from vpr_ros.ros.node_kit import SWITCH_INTERVAL_S

__all__ = [
    "EXECUTORS",
    "NODES",
    "InProcessGraph",
    "apply_sets",
    "load_params_file",
    "node_class",
    "run_graph",
    "wire_graph",
]

#: Node name -> (module, class) of the graph's nodes, in start order.
NODES: dict[str, tuple[str, str]] = {
    "transmitter": ("vpr_ros.ros.transmitter_node", "TransmitterNode"),
    "localizer": ("vpr_ros.ros.localizer_node", "LocalizerNode"),
    "loop_closure": ("vpr_ros.ros.loop_closure_node", "LoopClosureNode"),
}


# --------------------------------------------------------------------------- params files


def _flatten(prefix: str, value: Any, out: dict[str, Any], where: str) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out, where)
    elif value is None:
        raise ConfigError(f"{where}: parameter {prefix!r} has no value")
    else:
        out[prefix] = value


def load_params_file(path: str | Path) -> dict[str, dict[str, Any]]:
    """Parameters per node name from a ROS 2 params file; ``/**`` entries go to every node (key ``*``).

    Nested mappings under ``ros__parameters`` become dotted names, as ROS 2 reads them.
    """
    path = Path(path)
    data = load_yaml(path, what="params file")
    if not data:
        raise ConfigError(f"params file {path}: empty; expected a mapping of node names")
    out: dict[str, dict[str, Any]] = {}
    for key, body in data.items():
        name = str(key).strip("/") if key != "/**" else "*"
        if not isinstance(body, dict) or not isinstance(body.get("ros__parameters"), dict):
            raise ConfigError(f"params file {path}: {key!r} has no 'ros__parameters' mapping")
        params: dict[str, Any] = {}
        _flatten("", body["ros__parameters"], params, f"params file {path}, node {key}")
        out.setdefault(name, {}).update(params)
    return out


def node_class(name: str) -> type[Node] | None:
    """The node class for a graph node name; None when its module is not installed."""
    module, cls = NODES[name]
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError):
        return None


def _specs(name: str) -> dict[str, Any]:
    module = NODES.get(name, (None,))[0]
    if module is None:
        return {}
    try:
        return {s.name: s for s in getattr(importlib.import_module(module), "PARAMS", ())}
    except ImportError:
        return {}


def _typed(spec: Any, text: str) -> Any:
    if spec is None:
        return parse_value(text, where="--set")
    if spec.type is str:
        return text
    if spec.type is bool:
        v = parse_value(text, where=f"--set {spec.name}")
        if not isinstance(v, bool):
            raise ConfigError(f"--set {spec.name}={text}: expected true or false")
        return v
    try:
        return spec.type(text)
    except ValueError:
        raise ConfigError(f"--set {spec.name}={text}: expected {spec.type.__name__}") from None


def apply_sets(params: dict[str, dict[str, Any]], sets: Iterable[str]) -> dict[str, dict[str, Any]]:
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
        if node != "*" and node not in NODES:  # a typo would otherwise be ignored silently
            raise ConfigError(f"--set {item!r}: unknown node {node!r}; nodes: {', '.join(NODES)} "
                              "(or * for all)")
        specs = _specs(node)
        if specs and param not in specs and param not in _ROS_OWN and not param.startswith("qos_overrides."):
            raise ConfigError(f"unknown parameter(s) for node {node!r}: {param} (--set {item!r}); known: "
                              f"{', '.join(sorted(specs))}")
        out.setdefault(node, {})[param] = _typed(specs.get(param), text.strip())
    return out


def wire_graph(params: dict[str, dict[str, Any]], *, use_transmitter: bool) -> dict[str, dict[str, Any]]:
    """Connect the nodes as the launch file does.

    With the transmitter, it reads the camera (``localizer.image_topic``) and the localizer
    reads the transmitter's output; the localizer labels matches from the transmitter's stats.
    The loop-closure node reads the localizer's matches and the images the localizer reads,
    and verifies against the localizer's map (its stored local features), unless its section
    names others.
    """
    out = {k: dict(v) for k, v in params.items()}
    from vpr_ros.ros.localizer_node import PARAMS as LOC
    from vpr_ros.ros.transmitter_node import PARAMS as TX

    loc_d = {s.name: s.default for s in LOC}
    tx_d = {s.name: s.default for s in TX}
    loc = out.setdefault("localizer", {})
    if use_transmitter:
        tx = out.setdefault("transmitter", {})
        tx.setdefault("image_topic", loc.get("image_topic", loc_d["image_topic"]))
        tx.setdefault("image_transport", loc.get("image_transport", loc_d["image_transport"]))
        loc["image_topic"] = tx.get("output_topic", tx_d["output_topic"])
        loc["image_transport"] = "raw"
        if not loc.get("transmission_stats_topic"):
            loc["transmission_stats_topic"] = tx.get("stats_topic", tx_d["stats_topic"])
    lc = out.setdefault("loop_closure", {})
    for key in ("match_topic", "image_topic", "image_transport", "map_path"):
        lc.setdefault(key, loc.get(key, loc_d[key]))
    return out


_ROS_OWN = ("use_sim_time",)


def overrides_for(name: str, params: dict[str, dict[str, Any]]) -> list[Parameter]:
    """``parameter_overrides`` for node ``name``: ``/**`` values, then its own (ints widened to floats).

    For nodes whose parameter specs are known, a name they do not declare is a
    :class:`ConfigError` (a typo would otherwise be ignored silently); ``/**`` values go only
    to the nodes that declare them.
    """
    specs = _specs(name)
    own = params.get(name, {})
    merged = {k: v for k, v in params.get("*", {}).items() if not specs or k in specs or k in _ROS_OWN}
    merged.update(own)
    if specs:
        unknown = sorted(k for k in own if k not in specs and k not in _ROS_OWN
                         and not k.startswith("qos_overrides."))
        if unknown:
            raise ConfigError(f"unknown parameter(s) for node {name!r}: {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(specs))}")
    return [Parameter(k, value=specs[k].coerce(v) if k in specs else v) for k, v in merged.items()]


# --------------------------------------------------------------------------- in-process graph


EXECUTORS = ("single", "multi")


class InProcessGraph:
    """Nodes of one private rclpy context, spun by an executor in a background thread.

    ``executor``: ``"single"`` (default, a ``SingleThreadedExecutor`` as the nodes' ``main()``
    use) or ``"multi"`` (a ``MultiThreadedExecutor`` of ``num_threads``). Use as a context
    manager; leaving it shuts the executor down, then destroys the nodes in reverse order (their
    ``close()`` stops workers and saves maps), then the context.
    """

    def __init__(self, args: Sequence[str] | None = None, *, executor: str = "single",
                 num_threads: int | None = None) -> None:
        if executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
        self.context = Context()
        self._args = list(args) if args is not None else None
        self._kind = executor
        self._num_threads = num_threads
        self.nodes: list[Node] = []
        self.executor: Executor | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> InProcessGraph:
        rclpy.init(args=self._args, context=self.context, signal_handler_options=SignalHandlerOptions.NO)
        if self._kind == "multi":
            self.executor = MultiThreadedExecutor(num_threads=self._num_threads, context=self.context)
        else:
            self.executor = SingleThreadedExecutor(context=self.context)
        self._thread = threading.Thread(target=self._spin, name="vpr-executor", daemon=True)
        self._thread.start()
        return self

    def _spin(self) -> None:
        assert self.executor is not None
        try:
            self.executor.spin()
        except ExternalShutdownException:
            pass

    def __enter__(self) -> InProcessGraph:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add(self, node: Node) -> Node:
        """Spin ``node`` (created with ``context=graph.context``)."""
        assert self.executor is not None, "start() the graph first"
        self.nodes.append(node)
        self.executor.add_node(node)
        return node

    def create(self, cls: Callable[..., Node], name: str | None = None, params: dict[str, Any] | None = None,
               **kwargs: Any) -> Node:
        """Construct ``cls(name, context=..., parameter_overrides=params, **kwargs)`` and spin it."""
        overrides = [Parameter(k, value=v) for k, v in (params or {}).items()]
        args = (name,) if name else ()
        node = cls(*args, context=self.context, parameter_overrides=overrides, **kwargs)
        return self.add(node)

    def node(self, name: str) -> Node:
        """A test/probe node in this context (not spun until :meth:`add`-ed)."""
        return rclpy.create_node(name, context=self.context)

    @staticmethod
    def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
        """Poll ``predicate`` until true or ``timeout`` seconds pass; return its last value."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                return bool(predicate())
            time.sleep(interval)
        return True

    def readers_matched(self, topic: str, min_publishers: int = 1) -> bool:
        """True when every subscription of this graph's nodes on ``topic`` is matched to a writer.

        ``topic`` is a fully qualified name (``publisher.topic_name``). Matching is DDS's
        reader-writer match, reported by each side separately: a publisher counting a
        subscription (``get_subscription_count``) does not yet mean that the subscription
        accepts its samples, and discovery (``count_publishers``) means neither.
        """
        subs = [s for n in self.nodes for s in n.subscriptions if s.topic_name == topic]
        return all(s.get_publisher_count() >= min_publishers for s in subs)

    def topic_matched(self, topic: str) -> bool:
        """True when ``topic`` has publishers and subscriptions in this graph, all matched both ways."""
        pubs = [p for n in self.nodes for p in n.publishers if p.topic_name == topic]
        subs = [s for n in self.nodes for s in n.subscriptions if s.topic_name == topic]
        return (bool(pubs) and bool(subs) and all(p.get_subscription_count() >= len(subs) for p in pubs)
                and all(s.get_publisher_count() >= len(pubs) for s in subs))

    def all_matched(self) -> bool:
        """True when every topic with both a publisher and a subscription in this graph is matched."""
        pubs = {p.topic_name for n in self.nodes for p in n.publishers}
        subs = {s.topic_name for n in self.nodes for s in n.subscriptions}
        return all(self.topic_matched(t) for t in pubs & subs)

    def wait_matched(self, publishers: Iterable[Any] = (), subscriptions: Iterable[Any] = (),
                     timeout: float = 30.0) -> bool:
        """Wait until each of ``publishers`` is matched both ways and each of ``subscriptions`` has a writer.

        A publisher is matched when it counts a matched subscription and every subscription on
        its topic in this graph counts a matched publisher; a subscription (e.g. a probe's
        reply topic) when it counts a matched publisher. Samples sent before that are lost.
        """
        pubs, subs = list(publishers), list(subscriptions)

        def ready() -> bool:
            return (all(p.get_subscription_count() > 0 and self.readers_matched(p.topic_name) for p in pubs)
                    and all(s.get_publisher_count() > 0 for s in subs))

        return self.wait_for(ready, timeout)

    @staticmethod
    def send_until(send: Callable[[], None], done: Callable[[], bool], timeout: float,
                   resend_every: float = 2.0) -> bool:
        """Call ``send()`` until ``done()``, again every ``resend_every`` s: delivery over best effort.

        For a peer whose reader side cannot be observed (another process), or QoS that may drop
        a sample under load. The receiver must tolerate repeats (same stamp). Returns ``done()``.
        """
        deadline = time.monotonic() + timeout
        while True:
            send()
            resend_at = min(time.monotonic() + resend_every, deadline)
            while time.monotonic() < resend_at:
                if done():
                    return True
                time.sleep(0.005)
            if time.monotonic() >= deadline:
                return bool(done())

    @staticmethod
    def publish_paced(publisher: Any, messages: Iterable[Any], received: Callable[[], int], *,
                      window: int = 3, interval: float = 0.0, timeout: float = 10.0) -> int:
        """Publish ``messages`` keeping at most ``window`` of them not yet ``received()`` by the node.

        Best-effort (sensor-data) subscriptions keep only a few samples, so an unpaced burst
        loses frames before any callback runs; this is flow control, not a slowdown of the node.
        Returns how many were published; raises TimeoutError if the receiver stalls.
        """
        start = received()
        sent = 0
        for msg in messages:
            deadline = time.monotonic() + timeout
            while sent - (received() - start) >= window:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"receiver took {received() - start} of {sent} messages "
                                       f"in {timeout} s")
                time.sleep(0.001)
            publisher.publish(msg)
            sent += 1
            if interval:
                time.sleep(interval)
        return sent

    def stop(self) -> None:
        """Stop spinning, destroy the nodes (newest first), shut the context down. Idempotent."""
        if self.executor is not None:
            self.executor.shutdown(timeout_sec=10.0)
        if self._thread is not None:
            self._thread.join(timeout=10.0)
        while self.nodes:
            node = self.nodes.pop()
            try:
                node.destroy_node()
            except Exception as exc:  # report, but keep closing the others
                print(f"vpr_ros: error while closing node {node.get_name()}: {exc}", file=sys.stderr)
        self.executor = None
        self._thread = None
        if self.context.ok():
            rclpy.try_shutdown(context=self.context)


def run_graph(params_file: str | Path, sets: Sequence[str] = (), *, use_transmitter: bool = False,
              use_loop_closure: bool = False, duration: float | None = None,
              ros_args: Sequence[str] | None = None) -> int:
    """Start the graph from ``params_file`` and run until Ctrl-C / SIGTERM (or ``duration`` s).

    Returns a process exit status: 0 after a clean stop, 2 when a node refuses its configuration.
    """
    params = wire_graph(apply_sets(load_params_file(params_file), sets), use_transmitter=use_transmitter)
    wanted = ["localizer"]
    if use_transmitter:
        wanted.insert(0, "transmitter")
    if use_loop_closure:
        wanted.append("loop_closure")
    classes = {}
    for name in wanted:
        cls = node_class(name)
        if cls is None:
            module, attr = NODES[name]
            raise ConfigError(f"node {name!r} is not available ({module}.{attr} cannot be imported)")
        classes[name] = cls

    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    args = ["--ros-args", *ros_args] if ros_args else None
    switch = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    try:
        with InProcessGraph(args) as graph:
            for name in wanted:
                graph.add(classes[name](name, context=graph.context,
                                        parameter_overrides=overrides_for(name, params)))
            print(f"vpr-ros localize: running {', '.join(wanted)} from {params_file} "
                  f"(Ctrl-C to stop)", flush=True)
            deadline = None if duration is None else time.monotonic() + duration
            while not stop.is_set():
                if deadline is not None and time.monotonic() >= deadline:
                    break
                stop.wait(0.1)
            print("vpr-ros localize: stopping", flush=True)
    finally:
        sys.setswitchinterval(switch)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("vpr-ros localize: stopped cleanly", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vpr_ros.ros.runner --params FILE ...`` (same options as ``vpr-ros localize``)."""
    import argparse

    from vpr_ros.cli.ros import add_localize_args

    p = argparse.ArgumentParser(prog="vpr_ros.ros.runner", description=__doc__.splitlines()[0])
    add_localize_args(p)
    a = p.parse_args(argv)
    try:
        return run_graph(a.params, a.set or (), use_transmitter=a.transmitter,
                         use_loop_closure=a.loop_closure, duration=a.duration)
    except VprError as exc:
        print(f"vpr_ros.ros.runner: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
