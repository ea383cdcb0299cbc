"""Limits shared by every site one [sites] pattern matches (fastmta.delivery.provider_limits).

Each Microsoft 365 tenant is a site of its own (its own MX host): without a shared cap, a list over many
tenants opens max_connections to each, all to one provider. Here six sites (six sink addresses) match one
pattern.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from fastmta.delivery.config import config_from_dict
from fastmta.delivery.engine import Engine
from fastmta.delivery.limits import ThrottleConfig
from fastmta.delivery.provider_limits import GRANT_TIME, ProviderLimits, SharedConnections
from fastmta.sink import SinkServer
from fastmta.sink.config import FaultConfig, ListenerConfig, SinkConfig

Run = Callable[[Coroutine[Any, Any, Any]], Any]
SITES = 6
BODY = b"From: a@sender.test\r\nTo: x@y.test\r\nSubject: tenants\r\n\r\nhello\r\n"


async def tenant_sink(delay: float) -> tuple[SinkServer, list[str]]:
    faults = FaultConfig(delays=(("eod", delay),)) if delay else None
    sink = SinkServer(SinkConfig(listeners=tuple(
        ListenerConfig(host=f"127.0.0.{i + 2}", port=0, faults=faults) for i in range(SITES)), starttls=False))
    return sink, [f"{h}:{p}" for h, p in await sink.start()]


def engine_config(addresses: list[str], pattern: dict[str, Any]) -> Any:
    return config_from_dict({
        "routing": {"static": {f"t{i}.test": [a] for i, a in enumerate(addresses)}},
        "smtp": {"tls": "never"},
        "sites": {"127.0.0.*": {"max_connections": 3, "max_messages_per_connection": 4, "pipeline_depth": 1,
                                "adaptive": {"enabled": False}, **pattern}},
    })


async def send_all(engine: Engine, n: int) -> int:
    """Submit *n* messages over the sites and drain; the most connections open at once (every site's pool
    counted by itself, sampled every 5 ms: the sink's own count can see a closing one beside its successor)."""
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, sum(q.connections for q in engine._dispatch.queues.values()))
            await asyncio.sleep(0.005)

    watcher = asyncio.ensure_future(watch())
    try:
        for i in range(n):
            await engine.submit(BODY, "a@sender.test", [f"r{i}@t{i % SITES}.test"])
        assert await engine.drain(60)
    finally:
        watcher.cancel()
    return peak


def test_connections_to_all_sites_of_a_pattern_are_capped_together(run: Run) -> None:
    async def main() -> None:
        sink, addresses = await tenant_sink(0.02)
        try:
            cfg = engine_config(addresses, {"provider_max_connections": 4})
            async with Engine(cfg) as engine:
                peak = await send_all(engine, 240)
                assert engine.counts["delivered"] == 240
            assert peak == 4 and sink.stats.max_concurrent_connections <= 5  # (a closing one beside its successor)
        finally:
            await sink.close()
        # The same without the shared cap: each site opens its own 3.
        sink, addresses = await tenant_sink(0.02)
        try:
            async with Engine(engine_config(addresses, {})) as engine:
                peak = await send_all(engine, 240)
            assert peak > 4 and sink.stats.max_concurrent_connections > 4
        finally:
            await sink.close()

    run(main())


def test_a_rate_shared_by_the_sites_of_a_pattern(run: Run) -> None:
    async def main() -> None:
        sink, addresses = await tenant_sink(0.0)
        try:
            cfg = engine_config(addresses, {"provider_rate": ["60/s"]})
            async with Engine(cfg) as engine:
                start = time.monotonic()
                await send_all(engine, 120 + 60)  # the first second's 60 go at once (the burst)
                took = time.monotonic() - start
            assert engine.counts["delivered"] == 180
            assert took >= 1.7, took  # 120 beyond the burst at 60 a second, over six sites together
        finally:
            await sink.close()

    run(main())


def test_the_shared_cap_is_per_source_and_group() -> None:
    limits = ProviderLimits()
    cfg = ThrottleConfig(provider_max_connections=2)
    a = limits.lease("ip1", "*.outlook.com", cfg, None)
    b = limits.lease("ip1", "*.outlook.com", cfg, None)
    other_source = limits.lease("ip2", "*.outlook.com", cfg, None)
    assert a is b and isinstance(a, SharedConnections) and other_source is not a
    uncapped = limits.lease("ip1", "gmail", ThrottleConfig(), None)  # no cap configured: counted only
    assert isinstance(uncapped, SharedConnections) and uncapped.cap is None
    assert a.wait(0.0) == 0.0 and b.wait(0.0) == 0.0  # two "go"s, counted before their connections start
    assert a.wait(0.0) > 0 and other_source.wait(0.0) == 0.0
    a.started()
    b.started()
    assert a.wait(0.5) > 0
    a.closed()
    assert b.wait(0.5) == 0.0
    # A "go" whose connection never starts (the machine's connection budget said no) stops counting.
    assert b.wait(0.6) > 0 and b.wait(0.5 + GRANT_TIME + 0.1) == 0.0
    with pytest.raises(ValueError):
        ThrottleConfig(provider_rate=["fast"])


def test_a_reload_changes_the_group_s_cap_and_rates_for_the_sites_that_hold_them() -> None:
    limits = ProviderLimits()
    lease = limits.lease("ip1", "outlook", ThrottleConfig(), None)  # no cap yet: counted only
    [rates] = limits.limiters("ip1", "outlook", ThrottleConfig())
    assert all(lease.wait(0.0) == 0.0 for _ in range(10)) and rates.wait(0.0, 5) == 0.0
    limits.retune("ip1", "outlook", ThrottleConfig(provider_max_connections=1, provider_rate=["1/s"]))
    assert lease.wait(5.0) == 0.0 and lease.wait(5.0) > 0  # the same object the busy sites hold
    rates.take(5.0)
    assert rates.wait(5.0) > 0
    # A site made after the reload brings the group's cap too (its idle siblings were made again).
    assert limits.lease("ip1", "outlook", ThrottleConfig(provider_max_connections=3), None) is lease and lease.cap == 3


def test_a_go_the_cluster_refuses_is_given_back() -> None:
    class FullCluster:
        def wait(self, now: float) -> float:
            return 0.25

        def started(self) -> None: ...

        def closed(self) -> None: ...

    limits = ProviderLimits()
    cfg = ThrottleConfig(provider_max_connections=2)
    site_a = limits.lease("ip1", "g", cfg, FullCluster())
    for _ in range(4):
        assert site_a.wait(0.0) > 0  # the cluster's lease is full: polled
    assert limits.lease("ip1", "g", cfg, None).wait(0.0) == 0.0  # another site of the group is not starved
