"""The one stamp type and nearest-stamp buffer: conversions and lookups against hand-computed values."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest

from vpr_ros.core.timeline import (
    NS_PER_S,
    NearestStampBuffer,
    Stamp,
    nearest_index,
    ns_to_seconds,
    seconds_to_ns,
    to_ns,
    to_seconds,
)

# ---------------------------------------------------------------- conversions


def test_one_and_a_half_seconds_three_ways():
    # 1.5 s = 1 s + 0.5 * 1e9 ns = (1, 500_000_000) = 1 * 10**9 + 500_000_000 = 1_500_000_000 ns
    assert Stamp.from_seconds(1.5) == Stamp(1, 500_000_000)
    assert seconds_to_ns(1.5) == 1_500_000_000
    assert Stamp.from_ns(1_500_000_000) == (1, 500_000_000)
    assert to_ns(Stamp(1, 500_000_000)) == 1_500_000_000
    assert to_seconds(Stamp(1, 500_000_000)) == 1.5
    assert ns_to_seconds(1_500_000_000) == 1.5
    assert Stamp(1, 500_000_000).ns == 1_500_000_000 and Stamp(1, 500_000_000).seconds == 1.5


def test_any_object_with_sec_and_nanosec():
    msg_stamp = SimpleNamespace(sec=12, nanosec=34)  # the shape of builtin_interfaces/Time
    assert to_ns(msg_stamp) == 12 * NS_PER_S + 34 == 12_000_000_034
    assert to_seconds(msg_stamp) == pytest.approx(12.000000034, abs=1e-15)


def test_rounding_carries_into_seconds():
    # 1.9999999996 s: fraction 0.9999999996 * 1e9 = 999_999_999.6 -> rounds to 10**9 -> (2, 0)
    assert Stamp.from_seconds(1.9999999996) == Stamp(2, 0)
    assert seconds_to_ns(1.9999999996) == 2_000_000_000
    # 1.9999999994 s: 999_999_999.4 -> 999_999_999, no carry
    assert Stamp.from_seconds(1.9999999994) == Stamp(1, 999_999_999)
    # 4.9999999999 s: 999_999_999.9 -> carry -> (5, 0)
    assert Stamp.from_seconds(4.9999999999) == Stamp(5, 0)


def test_negative_stamps_keep_nanosec_positive():
    # -0.5 s = floor -1 s + 0.5 s -> (-1, 500_000_000) = -10**9 + 5 * 10**8 = -500_000_000 ns
    assert Stamp.from_seconds(-0.5) == Stamp(-1, 500_000_000)
    assert seconds_to_ns(-0.5) == -500_000_000
    assert Stamp.from_ns(-500_000_000) == Stamp(-1, 500_000_000)
    assert ns_to_seconds(-500_000_000) == -0.5


def test_epoch_stamps_keep_their_nanoseconds():
    # 1_700_000_000.25 s is exact in binary (0.25 = 2**-2); t * 1e9 alone gives 1.70000000025e18,
    # whose float spacing is 256 ns: the split conversion stays exact.
    assert seconds_to_ns(1_700_000_000.25) == 1_700_000_000 * NS_PER_S + 250_000_000
    # (1_700_000_000, 123_456_789): ns exact, and ns -> seconds equals stamp -> seconds
    s = Stamp(1_700_000_000, 123_456_789)
    assert s.ns == 1_700_000_000_123_456_789
    assert ns_to_seconds(s.ns) == to_seconds(s)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_seconds_are_refused(bad):
    with pytest.raises(ValueError, match="finite"):
        seconds_to_ns(bad)


def test_int32_seconds_range():
    # sec must fit builtin_interfaces/Time's int32: [-2**31, 2**31 - 1]
    assert Stamp.from_seconds(2.0**31 - 1) == Stamp(2**31 - 1, 0)
    assert Stamp.from_seconds(-(2.0**31)) == Stamp(-(2**31), 0)
    for bad in (2.0**31, -(2.0**31) - 1):
        with pytest.raises(ValueError, match="int32"):
            Stamp.from_seconds(bad)


# ---------------------------------------------------------------- nearest lookup


def test_nearest_index_ties_tolerance_and_ends():
    stamps = [10, 20, 30]
    assert nearest_index(stamps, 24, 5) == 1  # |20-24| = 4 < |30-24| = 6
    assert nearest_index(stamps, 26, 5) == 2  # |30-26| = 4
    assert nearest_index(stamps, 25, 5) == 1  # tie 5 = 5: the earlier
    assert nearest_index(stamps, 25, 4) is None  # both 5 away, over 4
    assert nearest_index(stamps, 35, 5) == 2  # exactly at the tolerance counts
    assert nearest_index(stamps, 36, 5) is None
    assert nearest_index(stamps, 4, 6) == 0  # before the first
    assert nearest_index([], 4, 100) is None
    assert nearest_index(np.array([0.0, 0.1, 0.2]), 0.16, 0.05) == 2  # numpy arrays, float seconds


def test_buffer_nearest_within_tolerance():
    buf: NearestStampBuffer[str] = NearestStampBuffer(10)
    for ns, v in ((1000, "a"), (3000, "c"), (2000, "b")):  # any insert order
        buf.put(ns, v)
    assert len(buf) == 3 and buf.values() == ["a", "b", "c"]
    assert buf.nearest(2400, 500) == (2000, "b")
    assert buf.nearest(2500, 500) == (2000, "b")  # tie 500 = 500: the earlier stamp
    assert buf.nearest(2600, 500) == (3000, "c")
    assert buf.nearest(3600, 500) is None  # 600 > 500
    assert buf.nearest(2000, 0) == (2000, "b")  # tolerance 0: exact stamps only
    assert buf.nearest(2001, 0) is None


def test_buffer_drops_oldest_stamps_first():
    buf: NearestStampBuffer[int] = NearestStampBuffer(3)
    for ns in (40, 10, 30, 20):  # 4 into 3: the smallest stamp, 10, goes
        buf.put(ns, ns)
    assert buf.values() == [20, 30, 40] and buf.evicted == 1
    buf.put(5, 5)  # older than all of a full buffer: dropped at once
    assert buf.values() == [20, 30, 40] and buf.evicted == 2
    assert buf.nearest(8, 10) is None
    buf.put(30, -30)  # a repeated stamp replaces, evicts nothing
    assert buf.values() == [20, -30, 40] and buf.evicted == 2 and len(buf) == 3
    buf.clear()
    assert len(buf) == 0 and buf.nearest(30, 100) is None


def test_buffer_capacity_must_be_positive():
    with pytest.raises(ValueError, match=">= 1"):
        NearestStampBuffer(0)


def test_buffer_concurrent_puts_keep_capacity():
    buf: NearestStampBuffer[int] = NearestStampBuffer(100)

    def fill(offset: int) -> None:
        for i in range(500):
            buf.put(offset + 4 * i, i)

    threads = [threading.Thread(target=fill, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # 4 * 500 distinct stamps into 100 places: the newest 100 stay (stamps 1900..1999), 1900 evicted
    assert len(buf) == 100 and buf.evicted == 1900
    assert [k for k, _ in (buf.nearest(s, 0) for s in range(1900, 2000))] == list(range(1900, 2000))
