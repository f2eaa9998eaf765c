"""Run the vpr_ros graph in one process: the nodes, params file and wiring of :mod:`vpr_ros.ros.graph`.

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

import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import rclpy
from rclpy.context import Context
from rclpy.executors import Executor, ExternalShutdownException, MultiThreadedExecutor, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.signals import SignalHandlerOptions

from vpr_ros.core.errors import ConfigError
from vpr_ros.ros import graph as node_graph
from vpr_ros.ros.node_kit import SWITCH_INTERVAL_S

__all__ = [
    "EXECUTORS",
    "InProcessGraph",
    "overrides_for",
    "run_graph",
]


def overrides_for(name: str, params: dict[str, dict[str, Any]]) -> list[Parameter]:
    """``parameter_overrides`` for node ``name``: its values of ``params`` (:func:`graph.node_values`)."""
    return [Parameter(k, value=v) for k, v in node_graph.node_values(name, params).items()]


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

    def add_graph_nodes(self, params: dict[str, dict[str, Any]], nodes: Iterable[node_graph.GraphNode],
                        extra: Mapping[str, dict[str, Any]] | None = None) -> dict[str, Node]:
        """Construct and spin ``nodes`` (of :mod:`vpr_ros.ros.graph`) with their values of ``params``.

        ``extra[name]`` are more constructor keywords of that node (e.g. the localizer's ``extractor``).
        A node whose module cannot be imported is a :class:`ConfigError`.
        """
        out: dict[str, Node] = {}
        for gn in nodes:
            try:
                cls = gn.node_class()
            except (ImportError, AttributeError):
                raise ConfigError(f"node {gn.name!r} is not available ({gn.module}.{gn.cls} cannot be "
                                  "imported)") from None
            out[gn.name] = self.add(cls(gn.name, context=self.context, **(extra or {}).get(gn.name, {}),
                                        parameter_overrides=overrides_for(gn.name, params)))
        return out

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
    params = node_graph.wire(node_graph.apply_sets(node_graph.load_params_file(params_file), sets),
                             use_transmitter=use_transmitter)
    nodes = node_graph.active_nodes(use_transmitter=use_transmitter, use_loop_closure=use_loop_closure)
    for gn in nodes:  # a configuration error stops the run before any node starts
        node_graph.node_values(gn.name, params)

    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    args = ["--ros-args", *ros_args] if ros_args else None
    switch = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    try:
        with InProcessGraph(args) as graph:
            graph.add_graph_nodes(params, nodes)
            print(f"vpr-ros localize: running {', '.join(n.name for n in nodes)} from {params_file} "
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


if __name__ == "__main__":
    sys.exit("moved: use `vpr-ros localize ...`")
