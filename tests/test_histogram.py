"""The HDR-style histogram: percentiles against known inputs, bucket layout, merge, serialization."""

from __future__ import annotations

import math
import random

import pytest

from fastmta.load.histogram import Histogram, index_of, value_range


def exact_percentile(values: list[int], q: float) -> int:
    """Nearest-rank percentile of a sorted list: the reference the histogram approximates."""
    return values[max(1, math.ceil(q / 100 * len(values))) - 1]


def test_small_values_are_exact() -> None:
    h = Histogram()
    for v in range(1, 101):
        h.record(v)
    assert (h.count, h.min, h.max, h.mean) == (100, 1, 100, 50.5)
    assert h.percentile(50) == 50
    assert h.percentile(90) == 90
    assert h.percentile(99) == 99
    assert h.percentile(99.9) == 100
    assert h.percentile(100) == 100
    assert h.percentile(0) == 1
    assert h.percentiles((50, 90, 99, 99.9)) == {50: 50, 90: 90, 99: 99, 99.9: 100}


def test_uniform_range_within_relative_precision() -> None:
    h = Histogram()
    values = list(range(1, 100_001))
    for v in values:
        h.record(v)
    for q in (50, 90, 99, 99.9):
        want = exact_percentile(values, q)
        got = h.percentile(q)
        # Never below the true value, at most 1/128 above it.
        assert want <= got <= want * (1 + 1 / 128), (q, want, got)
    assert h.percentile(50) == 50_175  # the top of the sub-bucket [49,920, 50,175] (256-wide) holding 50,000
    assert h.max == 100_000 and h.percentile(100) == 100_000


def test_bimodal_tail_is_not_hidden() -> None:
    # 990 fast replies (1 ms) and 10 stalls (2 s): p99 is still fast, p99.9 sees the stall.
    h = Histogram()
    h.record(1_000, 990)
    h.record(2_000_000, 10)
    p = h.percentiles((50, 99, 99.9))
    assert 1_000 <= p[50] <= 1_008 and 1_000 <= p[99] <= 1_008
    assert p[99.9] == 2_000_000  # clamped to the exact recorded max
    assert h.count == 1000 and h.min == 1_000


def test_random_inputs_match_the_exact_percentiles() -> None:
    rng = random.Random(7)
    values = sorted(int(rng.lognormvariate(8, 1.5)) for _ in range(20_000))
    h = Histogram()
    for v in values:
        h.record(v)
    for q in (1, 25, 50, 75, 90, 99, 99.9, 99.99):
        want = exact_percentile(values, q)
        got = h.percentile(q)
        assert want <= got <= max(want * (1 + 1 / 128), want + 1), (q, want, got)


def test_index_layout_is_contiguous_and_monotonic() -> None:
    previous_high = -1
    for index in range(index_of(1 << 40) + 1):
        low, high = value_range(index)
        assert low == previous_high + 1, index  # no gaps, no overlaps
        assert index_of(low) == index and index_of(high) == index
        assert high - low <= max(0, low) / 128
        previous_high = high


def test_merge_equals_recording_everything() -> None:
    rng = random.Random(3)
    values = [rng.randrange(0, 10_000_000) for _ in range(5_000)]
    whole, a, b = Histogram(), Histogram(), Histogram()
    for i, v in enumerate(values):
        whole.record(v)
        (a if i % 3 else b).record(v)
    merged = Histogram.merged([a, Histogram(), b])
    assert merged.to_dict() == whole.to_dict()
    assert merged.percentiles((50, 99)) == whole.percentiles((50, 99))


def test_serialization_round_trip_and_check() -> None:
    h = Histogram()
    for v in (0, 5, 300, 70_000, 70_001, 9_999_999):
        h.record(v)
    data = h.to_dict()
    again = Histogram.from_dict(data)
    assert again.to_dict() == data and again.percentile(50) == h.percentile(50)
    data["count"] += 1
    with pytest.raises(ValueError):
        Histogram.from_dict(data)


def test_empty_and_edge_cases() -> None:
    h = Histogram()
    assert h.percentile(99) == 0 and h.mean == 0.0 and h.percentiles((50, 99)) == {50: 0, 99: 0}
    h.record(-5)  # a clock stepping backwards records 0, not an invalid index
    assert h.min == 0 and h.max == 0 and h.percentile(100) == 0
    h.record_seconds(0.0015)
    assert h.max == 1_500
    with pytest.raises(ValueError):
        h.percentile(101)
