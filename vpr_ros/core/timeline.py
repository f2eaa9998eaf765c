"""Time stamps: the one ``(sec, nanosec)`` stamp type, its conversions to seconds and nanoseconds, and
the one bounded nearest-stamp buffer.

Nanoseconds (``int``) are exact and are what buffers key on; float seconds are for arithmetic and
display. Every function here takes anything with ``sec`` and ``nanosec`` attributes (a
``builtin_interfaces/Time`` of rclpy or rosbags, or :class:`Stamp`), so the core never imports ROS.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Sequence
from typing import Generic, NamedTuple, Protocol, TypeVar

__all__ = [
    "NS_PER_S",
    "NearestStampBuffer",
    "Stamp",
    "StampLike",
    "nearest_index",
    "ns_to_seconds",
    "seconds_to_ns",
    "to_ns",
    "to_seconds",
]

NS_PER_S = 1_000_000_000
_INT32 = 2**31

T = TypeVar("T")


class StampLike(Protocol):
    """Anything with integer ``sec`` and ``nanosec`` (``builtin_interfaces/Time``, :class:`Stamp`)."""

    sec: int
    nanosec: int


class Stamp(NamedTuple):
    """A ``builtin_interfaces/Time``-shaped stamp: ``sec`` (int32, may be negative) and
    ``0 <= nanosec < 10**9``."""

    sec: int
    nanosec: int

    @classmethod
    def from_ns(cls, ns: int) -> Stamp:
        """The stamp of ``ns`` nanoseconds; :class:`ValueError` outside the int32 seconds range."""
        sec, nanosec = divmod(int(ns), NS_PER_S)
        if not -_INT32 <= sec < _INT32:
            raise ValueError(f"stamp {ns} ns is outside the int32 seconds range of builtin_interfaces/Time")
        return cls(sec, nanosec)

    @classmethod
    def from_seconds(cls, t: float) -> Stamp:
        """The stamp of ``t`` seconds, rounded to the nearest nanosecond (a carry goes into ``sec``)."""
        return cls.from_ns(seconds_to_ns(t))

    @property
    def ns(self) -> int:
        return to_ns(self)

    @property
    def seconds(self) -> float:
        return to_seconds(self)


def to_ns(stamp: StampLike) -> int:
    """Nanoseconds of a ``(sec, nanosec)`` stamp, exact."""
    return int(stamp.sec) * NS_PER_S + int(stamp.nanosec)


def to_seconds(stamp: StampLike) -> float:
    """Seconds of a ``(sec, nanosec)`` stamp as a float (about 0.2 us resolution at today's epoch)."""
    return float(stamp.sec) + float(stamp.nanosec) * 1e-9


def ns_to_seconds(ns: int) -> float:
    """Seconds of ``ns`` nanoseconds; equal to :func:`to_seconds` of the same instant."""
    sec, nanosec = divmod(int(ns), NS_PER_S)
    return float(sec) + float(nanosec) * 1e-9


def seconds_to_ns(t: float) -> int:
    """Nanoseconds of ``t`` seconds, rounded to the nearest nanosecond; :class:`ValueError` when not finite.

    Whole seconds and the fraction are converted apart, so large epoch stamps keep their nanoseconds
    (``t * 1e9`` alone would round them to 256 ns).
    """
    t = float(t)
    if not math.isfinite(t):
        raise ValueError(f"stamp must be finite, got {t}")
    sec = math.floor(t)
    return int(sec) * NS_PER_S + round((t - sec) * 1e9)


def nearest_index(sorted_stamps: Sequence[float] | Sequence[int], stamp: float,
                  tolerance: float) -> int | None:
    """Index of the element of ascending ``sorted_stamps`` nearest to ``stamp`` if at most ``tolerance``
    away (ties: the earlier one), else None. Works on lists and 1-D numpy arrays alike."""
    i = bisect.bisect_left(sorted_stamps, stamp)
    best, best_d = None, None
    for j in (i - 1, i):
        if 0 <= j < len(sorted_stamps):
            d = abs(sorted_stamps[j] - stamp)
            if d <= tolerance and (best_d is None or d < best_d):
                best, best_d = j, d
    return best


class NearestStampBuffer(Generic[T]):
    """The last ``capacity`` values by stamp (int ns): nearest-stamp lookup within a tolerance.

    When full, the value with the oldest (smallest) stamp is dropped and counted in :attr:`evicted`;
    a value older than everything in a full buffer is therefore dropped at once. A repeated stamp
    replaces its value. Thread-safe: callbacks may insert while a worker looks up.
    """

    def __init__(self, capacity: int) -> None:
        if int(capacity) < 1:
            raise ValueError(f"buffer capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self.evicted = 0
        self._stamps: list[int] = []  # ascending
        self._values: dict[int, T] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._stamps)

    def put(self, stamp_ns: int, value: T) -> None:
        """Insert ``value`` at ``stamp_ns`` (any order), dropping the oldest stamps beyond ``capacity``."""
        stamp_ns = int(stamp_ns)
        with self._lock:
            if stamp_ns not in self._values:
                bisect.insort(self._stamps, stamp_ns)
            self._values[stamp_ns] = value
            while len(self._stamps) > self.capacity:
                del self._values[self._stamps.pop(0)]
                self.evicted += 1

    def nearest(self, stamp_ns: int, tolerance_ns: int) -> tuple[int, T] | None:
        """``(stamp_ns, value)`` nearest to ``stamp_ns`` if at most ``tolerance_ns`` away (ties: the
        earlier stamp), else None."""
        with self._lock:
            i = nearest_index(self._stamps, int(stamp_ns), tolerance_ns)
            if i is None:
                return None
            key = self._stamps[i]
            return key, self._values[key]

    def values(self) -> list[T]:
        """The values in stamp order (a copy)."""
        with self._lock:
            return [self._values[k] for k in self._stamps]

    def clear(self) -> None:
        with self._lock:
            self._stamps.clear()
            self._values.clear()
