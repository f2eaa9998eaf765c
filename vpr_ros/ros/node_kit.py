"""Shared plumbing of the vpr_ros nodes.

* :class:`ParamSpec` / :func:`declare_params`: every parameter declared with a
  ``ParameterDescriptor`` (description, integer / floating-point range, read-only flag,
  allowed choices), checked at start (bad configuration raises :class:`ConfigError`, the
  node refuses to start) and on runtime set (:func:`set_parameters_callback` rejects an
  invalid value with a reason).
* :class:`DropOldestQueue`: the bounded queue between a thin subscription callback and the
  worker thread; when full the oldest item is dropped and counted.
* :class:`ReasonCounter`: counts rejected inputs by reason and logs each reason throttled.
* :class:`LatencyWindow` and :func:`diagnostic_status`: the numbers nodes publish on
  ``/diagnostics``.
* :func:`run_node`: the body of each node's ``main()``.
"""

from __future__ import annotations

import collections
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
    ParameterType,
    SetParametersResult,
)
from rclpy.exceptions import (
    InvalidParameterTypeException,
    InvalidParameterValueException,
    ParameterException,
)
from rclpy.executors import Executor, ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter

from vpr_ros.core.errors import ConfigError, VprError

__all__ = [
    "ConfigError",
    "DropOldestQueue",
    "LatencyWindow",
    "ParamSpec",
    "ReasonCounter",
    "SWITCH_INTERVAL_S",
    "declare_params",
    "diagnostic_status",
    "publish_diagnostics",
    "run_node",
    "set_parameters_callback",
    "spec_table",
]

_TYPES: dict[type, int] = {
    bool: ParameterType.PARAMETER_BOOL,
    int: ParameterType.PARAMETER_INTEGER,
    float: ParameterType.PARAMETER_DOUBLE,
    str: ParameterType.PARAMETER_STRING,
}
_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a floating-point number (e.g. 1.0)",
               str: "a string"}


@dataclass(frozen=True)
class ParamSpec:
    """One node parameter: name, default (its type is the parameter's type) and constraints.

    ``low``/``high`` bound numbers (inclusive); ``choices`` restrict strings; ``read_only``
    parameters cannot change after start (topics, model, map, mode).
    """

    name: str
    default: bool | int | float | str
    description: str
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] | None = None
    read_only: bool = False

    @property
    def type(self) -> type:
        return type(self.default)

    def descriptor(self) -> ParameterDescriptor:
        """The ``rcl_interfaces/ParameterDescriptor`` announced for this parameter."""
        d = ParameterDescriptor(name=self.name, type=_TYPES[self.type], description=self.description,
                                read_only=self.read_only)
        if self.type is int and (self.low is not None or self.high is not None):
            lo = int(self.low) if self.low is not None else -(2**63)
            hi = int(self.high) if self.high is not None else 2**63 - 1
            d.integer_range = [IntegerRange(from_value=lo, to_value=hi, step=1)]
        elif self.type is float and (self.low is not None or self.high is not None):
            lo = float(self.low) if self.low is not None else -1.0e308
            hi = float(self.high) if self.high is not None else 1.0e308
            d.floating_point_range = [FloatingPointRange(from_value=lo, to_value=hi, step=0.0)]
        if self.choices:
            d.additional_constraints = "one of: " + ", ".join(self.choices)
        return d

    def check(self, value: Any) -> str | None:
        """Why ``value`` is not acceptable, or None when it is."""
        typ = self.type
        ok_type = isinstance(value, typ) and not (typ is not bool and isinstance(value, bool))
        if not ok_type:
            return f"parameter {self.name!r} must be {_TYPE_WORDS[typ]}, got {value!r}"
        if typ in (int, float):
            if typ is float and not np.isfinite(value):
                return f"parameter {self.name!r} must be finite, got {value!r}"
            if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
                return f"parameter {self.name!r} = {value!r} is outside {_range_text(self)}"
        if self.choices and value not in self.choices:
            return f"parameter {self.name!r} = {value!r} is not one of: {', '.join(self.choices)}"
        return None

    @property
    def limits(self) -> str:
        """The allowed values in words: the choices, the range ``[low, high]``, or ``""``."""
        if self.choices:
            return ", ".join(self.choices)
        return _range_text(self) if self.low is not None or self.high is not None else ""

    def coerce(self, value: Any) -> Any:
        """Loosen a params-file value to this type where it is lossless (int -> float)."""
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value


def _range_text(spec: ParamSpec) -> str:
    """``[low, high]``; integer parameters' bounds in full digits (``[1, 67108864]``)."""
    def bound(v: float | None, missing: str) -> str:
        if v is None:
            return missing
        return str(int(v)) if spec.type is int else f"{v:g}"

    return f"[{bound(spec.low, '-inf')}, {bound(spec.high, 'inf')}]"


def declare_params(node: Node, specs: Sequence[ParamSpec]) -> dict[str, Any]:
    """Declare ``specs`` on ``node`` and return their values; :class:`ConfigError` names a bad one."""
    values: dict[str, Any] = {}
    for spec in specs:
        try:
            param = node.declare_parameter(spec.name, spec.default, spec.descriptor())
        except InvalidParameterTypeException as exc:
            raise ConfigError(f"{node.get_name()}: parameter {spec.name!r} must be {_TYPE_WORDS[spec.type]} "
                              f"({exc})") from None
        except InvalidParameterValueException as exc:
            raise ConfigError(f"{node.get_name()}: parameter {spec.name!r} must be in "
                              f"{_range_text(spec)} ({exc})") from None
        except ParameterException as exc:
            raise ConfigError(f"{node.get_name()}: parameter {spec.name!r}: {exc}") from None
        value = param.value
        reason = spec.check(value)
        if reason is not None:
            raise ConfigError(f"{node.get_name()}: {reason}")
        values[spec.name] = value
    return values


def set_parameters_callback(
    specs: Sequence[ParamSpec],
    current: Callable[[], dict[str, Any]],
    apply: Callable[[dict[str, Any]], str | None],
) -> Callable[[list[Parameter]], SetParametersResult]:
    """An ``add_on_set_parameters_callback`` handler.

    Each changed value is checked against its spec, then ``apply`` receives the full new set
    of values (current ones updated) and returns a reason to reject, or None after applying.
    """
    by_name = {s.name: s for s in specs}

    def callback(params: list[Parameter]) -> SetParametersResult:
        values = dict(current())
        for p in params:
            spec = by_name.get(p.name)
            if spec is None:
                continue  # e.g. use_sim_time: rclpy's own
            if spec.read_only:
                return SetParametersResult(successful=False,
                                           reason=f"parameter {p.name!r} is read-only (set it at start)")
            reason = spec.check(p.value)
            if reason is not None:
                return SetParametersResult(successful=False, reason=reason)
            values[p.name] = p.value
        try:
            reason = apply(values)
        except (ConfigError, ValueError) as exc:
            reason = str(exc)
        if reason:
            return SetParametersResult(successful=False, reason=reason)
        return SetParametersResult(successful=True)

    return callback


def spec_table(specs: Iterable[ParamSpec]) -> str:
    """A markdown table of parameters (used for docs/ros.md)."""
    rows = ["| parameter | type | default | range / choices | runtime | description |",
            "|---|---|---|---|---|---|"]
    for s in specs:
        text = s.description.replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
        rows.append(f"| `{s.name}` | {s.type.__name__} | `{s.default!r}` | {s.limits} | "
                    f"{'no' if s.read_only else 'yes'} | {text} |")
    return "\n".join(rows)


# --------------------------------------------------------------------------- main


#: GIL switch interval of processes that run nodes (Python's default is 5 ms). A node's worker
#: releases the GIL at every numpy/OpenCV/ONNX/faiss call and must win it back from the executor
#: thread; 0.5 ms keeps it from waiting behind DDS callbacks (bench/README.md, section 2).
SWITCH_INTERVAL_S = 5e-4


def run_node(node_factory: Callable[[], Node], args: list[str] | None, name: str,
             executor_factory: Callable[[], Executor] = SingleThreadedExecutor,
             switch_interval: float | None = SWITCH_INTERVAL_S) -> int:
    """Spin the node ``node_factory()`` makes until shutdown: the body of a node's ``main()``.

    The nodes' callbacks only queue work for their own worker thread, so one executor thread
    suffices: a ``MultiThreadedExecutor`` measured up to 4x slower at high frame rates on a
    quiet 2-core machine (its dispatch threads contend for the GIL with the worker).
    ``switch_interval`` (s) is set with ``sys.setswitchinterval`` while the node runs (None:
    Python's default).
    A :class:`VprError` from ``node_factory`` (bad configuration) prints one line
    ``<name>: error: ...`` to stderr and returns 2; Ctrl-C or an external shutdown returns 0
    after the node is destroyed.
    """
    previous = sys.getswitchinterval()
    if switch_interval is not None:
        sys.setswitchinterval(switch_interval)
    try:
        return _run_node(node_factory, args, name, executor_factory)
    finally:
        sys.setswitchinterval(previous)


def _run_node(node_factory: Callable[[], Node], args: list[str] | None, name: str,
              executor_factory: Callable[[], Executor]) -> int:
    try:
        with rclpy.init(args=args):
            try:
                node = node_factory()
            except VprError as exc:
                print(f"{name}: error: {exc}", file=sys.stderr)
                return 2
            executor = executor_factory()
            executor.add_node(node)
            try:
                executor.spin()
            finally:
                executor.shutdown()
                node.destroy_node()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    return 0


# --------------------------------------------------------------------------- queue


class DropOldestQueue:
    """A bounded FIFO: :meth:`put` never blocks; when full the oldest item is dropped and counted."""

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"queue size must be >= 1, got {maxsize}")
        self._items: collections.deque = collections.deque()
        self._maxsize = int(maxsize)
        self._cond = threading.Condition()
        self._closed = False
        self.dropped = 0

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    @property
    def maxsize(self) -> int:
        return self._maxsize

    def put(self, item: Any) -> bool:
        """Append ``item``; return True when an older item had to be dropped for it."""
        with self._cond:
            if self._closed:
                return False
            dropped = False
            while len(self._items) >= self._maxsize:
                self._items.popleft()
                self.dropped += 1
                dropped = True
            self._items.append(item)
            self._cond.notify()
            return dropped

    def get_batch(self, max_items: int, timeout: float | None = None) -> list[Any]:
        """Wait up to ``timeout`` s for an item; return up to ``max_items`` of the oldest ones."""
        with self._cond:
            if not self._items and not self._closed:
                self._cond.wait(timeout)
            n = min(max(1, int(max_items)), len(self._items))
            return [self._items.popleft() for _ in range(n)]

    def close(self) -> None:
        """Wake the consumer; further puts are ignored."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed


# --------------------------------------------------------------------------- counters


class ReasonCounter:
    """Counts events by reason; :meth:`add` logs the first of each reason, then at most every ``period`` s."""

    def __init__(self, log: Callable[[str], None], period: float = 5.0) -> None:
        self._log = log
        self._period = float(period)
        self._lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()
        self._last_log: dict[str, float] = {}
        self._suppressed: collections.Counter[str] = collections.Counter()

    def add(self, reason: str, detail: str) -> None:
        """Count one rejection of ``reason`` and log it (throttled)."""
        with self._lock:
            self.counts[reason] += 1
        self.log_throttled(reason, detail, prefix="rejected frame")

    def log_throttled(self, reason: str, detail: str, prefix: str = "ignored") -> None:
        """Log ``detail`` under ``reason`` at most once per period, without counting it."""
        now = time.monotonic()
        with self._lock:
            last = self._last_log.get(reason)
            if last is not None and now - last < self._period:
                self._suppressed[reason] += 1
                return
            more = self._suppressed.pop(reason, 0)
            self._last_log[reason] = now
        suffix = f" ({more} more '{reason}' since the last report)" if more else ""
        self._log(f"{prefix} [{reason}]: {detail}{suffix}")

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.counts.values())


class LatencyWindow:
    """The last ``size`` latencies (ms) and event times, for percentiles and rates."""

    def __init__(self, size: int = 500) -> None:
        self._lat: collections.deque[float] = collections.deque(maxlen=size)
        self._times: collections.deque[float] = collections.deque(maxlen=size)
        self._lock = threading.Lock()
        self.count = 0

    def add(self, latency_ms: float) -> None:
        with self._lock:
            self._lat.append(float(latency_ms))
            self._times.append(time.monotonic())
            self.count += 1

    def percentiles(self, *qs: float) -> list[float]:
        with self._lock:
            data = np.asarray(self._lat, dtype=np.float64)
        if data.size == 0:
            return [float("nan")] * len(qs)
        return [float(v) for v in np.percentile(data, qs)]

    def rate(self, horizon: float = 5.0) -> float:
        """Events per second over the last ``horizon`` seconds."""
        now = time.monotonic()
        with self._lock:
            n = sum(1 for t in self._times if now - t <= horizon)
        return n / horizon


def diagnostic_status(name: str, hardware_id: str, values: dict[str, Any], *,
                      warn: str | None = None, error: str | None = None) -> DiagnosticStatus:
    """A ``DiagnosticStatus``: level ERROR/WARN with its message when given, else OK."""
    if error:
        level, message = DiagnosticStatus.ERROR, error
    elif warn:
        level, message = DiagnosticStatus.WARN, warn
    else:
        level, message = DiagnosticStatus.OK, "ok"
    kv = []
    for k, v in values.items():
        text = f"{v:.3f}" if isinstance(v, float) else str(v)
        kv.append(KeyValue(key=str(k), value=text))
    return DiagnosticStatus(level=level, name=name, message=message, hardware_id=hardware_id, values=kv)


def publish_diagnostics(node: Node, publisher: Any, values: dict[str, Any], *,
                        warn: str | None = None, error: str | None = None) -> None:
    """Publish one ``DiagnosticArray`` with ``node``'s :func:`diagnostic_status`, stamped now."""
    arr = DiagnosticArray()
    arr.header.stamp = node.get_clock().now().to_msg()
    arr.status = [diagnostic_status(f"vpr_ros: {node.get_name()}", node.get_fully_qualified_name(),
                                    values, warn=warn, error=error)]
    publisher.publish(arr)
