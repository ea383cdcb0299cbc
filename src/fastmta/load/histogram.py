"""An HDR-style latency histogram: fixed relative precision, constant-time record, exact merge.

Values are non-negative integers (the load generator records microseconds).
Like HdrHistogram, the value range is split into power-of-two *buckets*, each
cut into the same number of linear *sub-buckets*, so that every value is kept
to within a fixed relative error whatever its magnitude: a 40 µs reply and a
40 s tarpit are both resolved to better than 1 %, and no upper bound has to be
guessed in advance. With ``SIGNIFICANT_BITS = 8`` values below 256 are exact
and larger ones lose at most 1/128 (0.78 %).

Index layout (one flat list of counts, no per-bucket objects): for a value
``v`` with ``b = max(0, v.bit_length() - 8)``, the index is
``(b << 7) + (v >> b)``. For ``b = 0`` that is ``v`` itself (0..255); each
further power of two adds 128 indexes, whose ``v >> b`` lies in 128..255, so
the indexes are contiguous and increase with the value.

Percentiles use the nearest-rank definition (the smallest recorded value such
that at least q % of all values are <= it) and report the *highest value
equivalent* to the chosen sub-bucket, clamped to the exact recorded min and
max, as HdrHistogram does: the result is never below the true percentile and
exceeds it by at most the relative precision.

Histograms merge by adding counts, which is how ``fastmta load --workers N``
combines its processes and how per-interval histograms add up to the total.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

SIGNIFICANT_BITS = 8
_HALF_SHIFT = SIGNIFICANT_BITS - 1  # 128 sub-buckets per power of two above the first bucket
_FIRST = 1 << SIGNIFICANT_BITS  # values below this are stored exactly


def index_of(value: int) -> int:
    """The counts index of *value* (>= 0)."""
    b = value.bit_length() - SIGNIFICANT_BITS
    if b <= 0:
        return value
    return (b << _HALF_SHIFT) + (value >> b)


def value_range(index: int) -> tuple[int, int]:
    """The lowest and highest value that map to *index* (inclusive)."""
    if index < _FIRST:
        return index, index
    b = (index >> _HALF_SHIFT) - 1
    mantissa = index - (b << _HALF_SHIFT)
    low = mantissa << b
    return low, low + (1 << b) - 1


class Histogram:
    """Counts of non-negative integer values with ~0.8 % relative precision."""

    __slots__ = ("count", "counts", "max", "min", "total")

    def __init__(self) -> None:
        # Grown on demand: a run whose latencies stay in milliseconds never
        # allocates the indexes of hours.
        self.counts: list[int] = []
        self.count = 0
        self.total = 0  # sum of recorded values, for the mean
        self.min = 0
        self.max = 0

    def record(self, value: int, n: int = 1) -> None:
        """Record *value* (clamped at 0) *n* times."""
        if value < 0:
            value = 0  # a clock step backwards must not corrupt the index arithmetic
        b = value.bit_length() - SIGNIFICANT_BITS
        i = value if b <= 0 else (b << _HALF_SHIFT) + (value >> b)
        counts = self.counts
        if i >= len(counts):
            counts.extend([0] * (i + 1 - len(counts)))
        counts[i] += n
        if self.count == 0 or value < self.min:
            self.min = value
        if value > self.max:
            self.max = value
        self.count += n
        self.total += value * n

    def record_seconds(self, seconds: float) -> None:
        """Record a duration given in seconds, as integer microseconds."""
        self.record(int(seconds * 1e6))

    def merge(self, other: Histogram) -> None:
        """Add *other*'s counts to this histogram (exact: same bucket layout)."""
        if other.count == 0:
            return
        if len(other.counts) > len(self.counts):
            self.counts.extend([0] * (len(other.counts) - len(self.counts)))
        counts = self.counts
        for i, c in enumerate(other.counts):
            if c:
                counts[i] += c
        self.min = other.min if self.count == 0 else min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.count += other.count
        self.total += other.total

    @classmethod
    def merged(cls, histograms: Iterable[Histogram]) -> Histogram:
        h = cls()
        for other in histograms:
            h.merge(other)
        return h

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def percentile(self, q: float) -> int:
        """The nearest-rank *q*-th percentile (0 < q <= 100); 0 when empty."""
        if not 0 <= q <= 100:
            raise ValueError(f"percentile must be within 0..100, got {q}")
        if self.count == 0:
            return 0
        if q == 0:
            return self.min
        rank = max(1, math.ceil(q / 100 * self.count))
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank:
                return max(self.min, min(value_range(i)[1], self.max))
        return self.max  # unreachable: the counts add up to self.count

    def percentiles(self, qs: Iterable[float]) -> dict[float, int]:
        """Several percentiles in one pass over the counts."""
        wanted = sorted(set(qs))
        out: dict[float, int] = {}
        if self.count == 0:
            return {q: 0 for q in wanted}
        ranks = [(q, max(1, math.ceil(q / 100 * self.count))) for q in wanted]
        k = 0
        seen = 0
        for i, c in enumerate(self.counts):
            if not c:
                continue
            seen += c
            while k < len(ranks) and seen >= ranks[k][1]:
                out[ranks[k][0]] = max(self.min, min(value_range(i)[1], self.max))
                k += 1
            if k == len(ranks):
                break
        return out

    def nonzero(self) -> Iterator[tuple[int, int]]:
        """(index, count) of every non-empty sub-bucket, in value order."""
        return ((i, c) for i, c in enumerate(self.counts) if c)

    # --- serialization (process boundaries, JSON) ---------------------------

    def to_dict(self) -> dict[str, Any]:
        """A compact, JSON-safe form: only the non-empty sub-buckets."""
        return {
            "count": self.count,
            "total": self.total,
            "min": self.min,
            "max": self.max,
            "buckets": [[i, c] for i, c in self.nonzero()],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Histogram:
        h = cls()
        buckets: list[list[int]] = data["buckets"]
        if buckets:
            h.counts = [0] * (max(i for i, _ in buckets) + 1)
            for i, c in buckets:
                h.counts[i] += c
        h.count = int(data["count"])
        h.total = int(data["total"])
        h.min = int(data["min"])
        h.max = int(data["max"])
        if sum(c for _, c in buckets) != h.count:
            raise ValueError("histogram buckets do not add up to its count")
        return h

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        if not self.count:
            return "Histogram(empty)"
        p = self.percentiles((50, 99))
        return f"Histogram(n={self.count}, min={self.min}, p50={p[50]}, p99={p[99]}, max={self.max})"
