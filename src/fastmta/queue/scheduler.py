"""When to try again: the retry policy and the due-time queue of deferred work.

The policy is pure (clock and randomness passed in) so it can be tested
without waiting. The queue is a heap keyed by due time with one timer for the
earliest entry, so a million deferred recipients cost one timer, not a
million.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter, capped, within a maximum queue lifetime.

    Attempt n (1-based count of failures so far) waits
    ``min(initial * factor**(n-1), maximum)``, spread by +-``jitter`` so that
    a burst of deferrals does not come back as a burst.
    """

    initial: float = 60.0
    factor: float = 2.0
    maximum: float = 14400.0
    jitter: float = 0.2
    max_lifetime: float = 5 * 86400.0

    def delay(self, failures: int, rng: random.Random) -> float:
        # The exponent is capped: past ~60 doublings any factor has long hit
        # the maximum, and an unbounded one would overflow a float.
        base = min(self.initial * self.factor ** min(max(failures - 1, 0), 64), self.maximum)
        return base * (1.0 + rng.uniform(-self.jitter, self.jitter))


class DueQueue(Generic[T]):
    """Items that become due at a time on the loop clock; ``on_due`` gets them then."""

    def __init__(self, on_due: Callable[[T], None], loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._on_due = on_due
        self._loop = loop or asyncio.get_running_loop()
        self._heap: list[tuple[float, int, T]] = []
        self._seq = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, due: float, item: T) -> None:
        heapq.heappush(self._heap, (due, next(self._seq), item))
        if self._timer is None or due < self._timer_at:
            self._arm()

    def pop_all(self) -> list[T]:
        """Take everything out (shutdown: hand back what is still waiting)."""
        items = [item for _, _, item in sorted(self._heap)]
        self._heap.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return items

    def next_due(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def entries(self) -> list[tuple[float, T]]:
        """Every (due time, item) waiting, in no particular order (to inspect, not to change)."""
        return [(due, item) for due, _, item in self._heap]

    def rebuild(self, keep: Callable[[T], T | None]) -> None:
        """Replace each item by ``keep(item)``, dropping those it returns None for (their due times stay).

        Walks the whole queue: for rare operator actions (take some work out,
        or move it to now), not for the delivery path.
        """
        heap = []
        for due, seq, item in self._heap:
            kept = keep(item)
            if kept is not None:
                heap.append((due, seq, kept))
        heapq.heapify(heap)
        self._heap = heap
        self._arm()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._heap:
            self._timer_at = self._heap[0][0]
            self._timer = self._loop.call_at(self._timer_at, self._fire)

    def _fire(self) -> None:
        self._timer = None
        now = self._loop.time()
        while self._heap and self._heap[0][0] <= now:
            _, _, item = heapq.heappop(self._heap)
            self._on_due(item)
        self._arm()
