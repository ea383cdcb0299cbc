"""A bounded TTL cache with single-flight loading, for DNS answers.

Why single-flight: a campaign hands the scheduler thousands of recipients
at a domain nobody has looked up yet. Without it each would start its own
query; with it the first starts one load and every other caller awaits that
same load. The load runs in a task of its own and callers await it through
``asyncio.shield``, so a caller that gives up (its own timeout, a shutdown)
cancels only its wait, never the lookup the others are waiting for.

Why a clock parameter: TTL tests run on a fake clock instead of sleeping.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["CacheStats", "Clock", "TTLCache"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

Clock = Callable[[], float]


@dataclass(slots=True)
class CacheStats:
    hits: int = 0
    misses: int = 0  # loads started
    joined: int = 0  # callers that joined a load already in flight
    evictions: int = 0  # dropped to stay within maxsize


class TTLCache(Generic[K, V]):
    """LRU-bounded mapping of key -> (value, expiry) with single-flight loads."""

    __slots__ = ("_clock", "_data", "_inflight", "_maxsize", "stats")

    def __init__(self, maxsize: int, clock: Clock = time.monotonic) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self._data: OrderedDict[K, tuple[V, float]] = OrderedDict()
        self._inflight: dict[K, asyncio.Task[tuple[V, float]]] = {}
        self._maxsize = maxsize
        self._clock = clock
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._data)

    @property
    def clock(self) -> Clock:
        return self._clock

    def get(self, key: K) -> tuple[V, float] | None:
        """``(value, expires_at)`` when fresh, else None (an expired entry is dropped)."""
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry[1] <= self._clock():
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return entry

    def put(self, key: K, value: V, ttl: float) -> float:
        """Store *value* for *ttl* seconds (not at all when ttl <= 0); return its expiry."""
        expires = self._clock() + ttl
        if ttl <= 0:
            self._data.pop(key, None)
            return expires
        self._data[key] = (value, expires)
        self._data.move_to_end(key)
        while len(self._data) > self._maxsize:
            self._data.popitem(last=False)
            self.stats.evictions += 1
        return expires

    def discard(self, key: K) -> None:
        self._data.pop(key, None)

    def clear(self) -> None:
        self._data.clear()

    async def get_or_load(
        self, key: K, load: Callable[[], Awaitable[tuple[V, float]]]
    ) -> tuple[V, float]:
        """The fresh entry for *key*, loading it at most once at a time.

        *load* returns ``(value, ttl)``; the value is cached for ttl seconds.
        An exception from *load* reaches every caller waiting on that load
        and is not cached (the next call loads again).
        """
        entry = self.get(key)
        if entry is not None:
            self.stats.hits += 1
            return entry
        task = self._inflight.get(key)
        if task is None:
            self.stats.misses += 1
            task = asyncio.get_running_loop().create_task(self._load(key, load))
            self._inflight[key] = task
            task.add_done_callback(functools.partial(self._done, key))
        else:
            self.stats.joined += 1
        return await asyncio.shield(task)

    async def _load(self, key: K, load: Callable[[], Awaitable[tuple[V, float]]]) -> tuple[V, float]:
        value, ttl = await load()
        return value, self.put(key, value, ttl)

    def _done(self, key: K, task: asyncio.Task[tuple[V, float]]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        # Mark the exception retrieved: when every waiter was cancelled
        # nobody else will, and asyncio would log it as lost.
        if not task.cancelled():
            task.exception()

    async def aclose(self) -> None:
        """Cancel loads in flight and wait for them to end."""
        tasks = list(self._inflight.values())
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
