"""A SIGHUP's new [sites] limits reach a site that is busy (fastmta.delivery.reconfigure).

An operator lowers a provider's connections in the middle of a campaign: the site is busy from its
first message to its last, so "applied once the queue is idle" was never. Found by an operator's
review: max_connections 10 -> 1 on reload left the site on 10.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from fastmta.delivery.engine import Engine
from fastmta.delivery.reconfigure import reconfigure
from fastmta.sink.config import FaultConfig
from test_queue_control import config, start_sink, submit_all, until

Run = Callable[[Coroutine[Any, Any, Any]], Any]


def test_a_busy_site_takes_lowered_limits_at_once(run: Run) -> None:
    async def main() -> None:
        sink, site = await start_sink(FaultConfig(delays=(("eod", 0.02),)))
        limits = {"max_connections": 4, "max_messages_per_connection": 5, "pipeline_depth": 1}
        cfg = config({"busy.test": site}, site=limits)
        try:
            async with Engine(cfg) as engine:
                await submit_all(engine, [f"r{i}@busy.test" for i in range(120)])
                await until(lambda: sink.stats.active_connections == 4, what="4 connections")
                new = config({"busy.test": site}, site={**limits, "max_connections": 1, "rate": ["400/s"]})
                changed = reconfigure(engine, new)
                assert any(c.startswith("sites (retuned while busy") for c in changed), changed
                assert engine.config.sites == new.sites
                # Each connection ends within its 5 messages and only one opens again.
                await until(lambda: sink.stats.active_connections <= 1, timeout=10, what="down to 1")
                at = sink.stats.messages
                for _ in range(20):
                    await asyncio.sleep(0.05)
                    assert sink.stats.active_connections <= 1
                assert sink.stats.messages > at  # still delivering, on one connection
                queue = next(iter(engine._dispatch.queues.values()))
                assert queue.limits.max_connections == queue.configured.max_connections == 1
                assert queue.throttle.window == 1 and queue.throttle.config.rate == ["400/s"]
                assert await engine.drain(30)
                assert engine.counts["delivered"] == 120
        finally:
            await sink.close()

    run(main())


def test_a_raised_limit_is_used_and_what_the_site_taught_is_kept(run: Run) -> None:
    async def main() -> None:
        sink, site = await start_sink(FaultConfig(delays=(("eod", 0.02),)))
        limits = {"max_connections": 1, "max_messages_per_connection": 5, "pipeline_depth": 2}
        cfg = config({"busy.test": site}, site=limits)
        try:
            async with Engine(cfg) as engine:
                await submit_all(engine, [f"r{i}@busy.test" for i in range(120)])
                await until(lambda: sink.stats.messages >= 3, what="busy")
                queue = next(iter(engine._dispatch.queues.values()))
                # As one_at_a_time teaches a site that refuses pipelined envelopes.
                queue.limits = type(queue.limits)(1, 5, queue.limits.max_recipients_per_transaction,
                                                  queue.limits.idle_timeout, 1)
                reconfigure(engine, config({"busy.test": site}, site={**limits, "max_connections": 3}))
                await until(lambda: sink.stats.active_connections == 3, timeout=10, what="3 connections")
                assert queue.limits.max_connections == 3 and queue.limits.pipeline_depth == 1  # learned stays
                assert await engine.drain(30)
                assert engine.counts["delivered"] == 120
        finally:
            await sink.close()

    run(main())


def test_an_idle_site_is_made_again_with_the_new_limits(run: Run) -> None:
    async def main() -> None:
        sink, site = await start_sink()
        cfg = config({"idle.test": site}, site={"max_connections": 4, "idle_timeout": 0.1})
        try:
            async with Engine(cfg) as engine:
                await submit_all(engine, ["a@idle.test"])
                assert await engine.drain(10)
                queue = next(iter(engine._dispatch.queues.values()))
                await until(lambda: not (queue.connections or queue.ready or queue.busy), what="idle")
                changed = reconfigure(engine, config({"idle.test": site}, site={"max_connections": 2}))
                assert changed == ["sites"], changed
                assert engine._dispatch.queues == {}
                await submit_all(engine, ["b@idle.test"])
                assert await engine.drain(10)
                assert next(iter(engine._dispatch.queues.values())).limits.max_connections == 2
        finally:
            await sink.close()

    run(main())


def test_a_reload_lowers_a_busy_group_s_shared_cap_and_sets_a_busy_site_s_tls(run: Run) -> None:
    async def main() -> None:
        sink, site = await start_sink(FaultConfig(delays=(("eod", 0.02),)))
        limits = {"max_connections": 4, "max_messages_per_connection": 5, "pipeline_depth": 1,
                  "provider_max_connections": 3}
        try:
            async with Engine(config({"busy.test": site}, site=limits)) as engine:
                await submit_all(engine, [f"r{i}@busy.test" for i in range(120)])
                await until(lambda: sink.stats.active_connections == 3, what="3 connections (the shared cap)")
                queue = next(iter(engine._dispatch.queues.values()))
                reconfigure(engine, config({"busy.test": site}, site={**limits, "provider_max_connections": 1,
                                                                      "tls": "never"}))
                await until(lambda: sink.stats.active_connections <= 1, timeout=10, what="down to 1")
                for _ in range(10):
                    await asyncio.sleep(0.05)
                    assert sink.stats.active_connections <= 1
                assert queue.tls.value == "never"
                assert await engine.drain(30)
                assert engine.counts["delivered"] == 120
        finally:
            await sink.close()

    run(main())
