"""The TTL cache under the resolver: expiry, LRU bound, single-flight, cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from fastmta.delivery.dns_cache import TTLCache

Run = Callable[[Coroutine[Any, Any, Any]], Any]


class FakeClock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def test_entries_expire_on_the_clock() -> None:
    clock = FakeClock()
    cache: TTLCache[str, int] = TTLCache(10, clock)
    assert cache.put("a", 1, 5) == 55.0
    assert cache.get("a") == (1, 55.0)
    clock.now = 54.9
    assert cache.get("a") == (1, 55.0)
    clock.now = 55.0
    assert cache.get("a") is None
    assert len(cache) == 0  # the expired entry is gone, not just hidden


def test_zero_ttl_is_not_stored() -> None:
    cache: TTLCache[str, int] = TTLCache(10, FakeClock())
    cache.put("a", 1, 0)
    assert cache.get("a") is None and len(cache) == 0


def test_least_recently_used_goes_first() -> None:
    cache: TTLCache[str, int] = TTLCache(2, FakeClock())
    cache.put("a", 1, 60)
    cache.put("b", 2, 60)
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("c", 3, 60)
    assert cache.get("b") is None
    assert cache.get("a") == (1, 110.0) and cache.get("c") == (3, 110.0)
    assert cache.stats.evictions == 1


def test_bad_size_is_refused() -> None:
    with pytest.raises(ValueError):
        TTLCache(0)


def test_concurrent_callers_share_one_load(run: Run) -> None:
    async def main() -> None:
        cache: TTLCache[str, str] = TTLCache(10)
        loads = 0
        gate = asyncio.Event()

        async def load() -> tuple[str, float]:
            nonlocal loads
            loads += 1
            await gate.wait()
            return "value", 60

        waiters = [asyncio.create_task(cache.get_or_load("k", load)) for _ in range(100)]
        await asyncio.sleep(0)
        gate.set()
        results = await asyncio.wait_for(asyncio.gather(*waiters), 5)
        assert loads == 1
        assert {v for v, _ in results} == {"value"}
        assert (cache.stats.misses, cache.stats.joined) == (1, 99)
        await cache.get_or_load("k", load)
        assert loads == 1 and cache.stats.hits == 1

    run(main())


def test_a_cancelled_caller_does_not_cancel_the_others(run: Run) -> None:
    async def main() -> None:
        cache: TTLCache[str, int] = TTLCache(10)
        gate = asyncio.Event()

        async def load() -> tuple[int, float]:
            await gate.wait()
            return 42, 60

        first = asyncio.create_task(cache.get_or_load("k", load))
        second = asyncio.create_task(cache.get_or_load("k", load))
        await asyncio.sleep(0)
        first.cancel()  # the caller that started the load gives up
        await asyncio.sleep(0)
        gate.set()
        assert (await asyncio.wait_for(second, 5))[0] == 42
        assert first.cancelled()
        assert cache.get("k") is not None  # and the answer was kept for later callers

    run(main())


def test_a_failed_load_reaches_every_waiter_and_is_not_cached(run: Run) -> None:
    async def main() -> None:
        cache: TTLCache[str, int] = TTLCache(10)
        calls = 0

        async def failing() -> tuple[int, float]:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.01)
            raise RuntimeError("servfail")

        results = await asyncio.gather(
            *(cache.get_or_load("k", failing) for _ in range(5)), return_exceptions=True
        )
        assert calls == 1
        assert all(isinstance(r, RuntimeError) and str(r) == "servfail" for r in results)

        async def healed() -> tuple[int, float]:
            return 7, 60

        assert (await cache.get_or_load("k", healed))[0] == 7

    run(main())


def test_aclose_cancels_loads_in_flight(run: Run) -> None:
    async def main() -> None:
        cache: TTLCache[str, int] = TTLCache(10)
        started = asyncio.Event()

        async def forever() -> tuple[int, float]:
            started.set()
            await asyncio.sleep(3600)
            return 0, 0

        waiter = asyncio.create_task(cache.get_or_load("k", forever))
        await asyncio.wait_for(started.wait(), 5)
        await asyncio.wait_for(cache.aclose(), 5)
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(waiter, 5)

    run(main())
