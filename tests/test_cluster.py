"""[cluster] against a real redis-server (tests/redisproc.py): shared GCRA limits, leases, degraded mode.

Small figures throughout (a few hundred tokens per second, a few seconds):
the machine running these has two cores and may be busy.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from fastmta.delivery.cluster.degraded import Health
from fastmta.delivery.cluster.gcra import GcraStore, SharedLimiter
from fastmta.delivery.cluster.leases import LeaseGate, LeaseStore
from fastmta.delivery.cluster.node import redis_client
from fastmta.delivery.config import config_from_dict
from fastmta.delivery.engine import Engine, Status
from fastmta.delivery.ratelimit import parse_rate
from fastmta.sink import ListenerConfig, SinkConfig, SinkServer
from redisproc import RedisProc, have_redis, redis_server

pytestmark = pytest.mark.skipif(not have_redis(), reason="redis-server is not installed (Debian: redis-server)")


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisProc]:
    with redis_server() as r:
        yield r


def _key(name: str) -> str:
    return f"test:{name}:{time.monotonic_ns()}"


def _limiter(url: str, key: str, rate: str, *, batch: float, burst: int, nodes: int = 1) -> tuple[SharedLimiter, Any]:
    client = redis_client(url, 0.3)
    health = Health(client.ping, 0.2, nodes)
    return SharedLimiter(GcraStore(client), key, parse_rate(rate), batch=batch, burst=burst, health=health), client


async def _consume(lim: SharedLimiter, seconds: float) -> int:
    """Take single tokens as fast as the limiter allows for *seconds*; how many were taken."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    taken = 0
    while (now := loop.time()) < end:
        wait = lim.wait(now)
        if wait > 0:
            await asyncio.sleep(min(wait, end - now))
            continue
        lim.take(now)
        taken += 1
        await asyncio.sleep(0)
    return taken


def test_redis_fixture_is_ours(redis: RedisProc) -> None:
    async def main() -> dict[str, Any]:
        client = redis_client(redis.url, 1.0)
        try:
            info: dict[str, Any] = await client.info("server")
            return info
        finally:
            await client.aclose()

    assert asyncio.run(main())["process_id"] == redis.pid


def test_gcra_script_burst_then_rate_in_microseconds(redis: RedisProc) -> None:
    async def main() -> list[tuple[int, float]]:
        client = redis_client(redis.url, 1.0)
        store, key = GcraStore(client), _key("gcra")
        try:
            out = [await store.take(key, 10_000, 5, 3)]  # 100/s, burst 5: 3 of 3
            out.append(await store.take(key, 10_000, 5, 4))  # 2 left of the burst: all or nothing
            await asyncio.sleep(out[-1][1])
            out.append(await store.take(key, 10_000, 5, 4))  # they are there
            out.append(await store.take(key, 10_000, 5, 9))  # more than the burst: the burst at most
            return out
        finally:
            await client.aclose()

    (a, _), (b, wait), (c, _), (d, _) = asyncio.run(main())
    assert (a, b, c) == (3, 0, 4) and d <= 5
    assert 0.015 < wait <= 0.021  # two intervals of 10 ms, less the time already spent: sub-second precision


def test_two_nodes_sharing_a_key_stay_within_the_rate(redis: RedisProc) -> None:
    rate, seconds = 200, 3.0

    async def main() -> tuple[int, int, int]:
        key = _key("shared")
        (a, ca), (b, cb) = (_limiter(redis.url, key, f"{rate}/s", batch=0.05, burst=20) for _ in range(2))
        try:
            na, nb = await asyncio.gather(_consume(a, seconds), _consume(b, seconds))
        finally:
            await ca.aclose()
            await cb.aclose()
        return na, nb, a.store.calls + b.store.calls

    na, nb, calls = asyncio.run(main())
    total = na + nb
    assert rate * seconds * 0.95 <= total <= rate * seconds * 1.05, (na, nb)
    assert min(na, nb) > total * 0.25  # both got a share
    # Batches of 10 (0.05 s at 200/s). Both nodes want twice what the key allows, so about every other
    # call is refused (the other node took the batch first): ~0.2 calls per token, never one per token.
    assert calls / total <= 0.25


def test_batches_keep_redis_off_the_per_message_path(redis: RedisProc) -> None:
    async def main() -> tuple[int, int]:
        lim, client = _limiter(redis.url, _key("batch"), "100/s", batch=0.2, burst=20)
        try:
            n = await _consume(lim, 2.0)
        finally:
            await client.aclose()
        return n, lim.store.calls

    n, calls = asyncio.run(main())
    assert 180 <= n <= 222
    assert calls / n <= 0.06  # goal 0.05: one call per 20 tokens (+ the first)


def _gate(url: str, key: str, node: str, cap: int, ttl: float) -> tuple[LeaseGate, Any]:
    client = redis_client(url, 0.3)
    return LeaseGate(LeaseStore(client), key, node, cap, ttl, Health(client.ping, 0.2, 1)), client


async def _open(gate: LeaseGate, want: int, seconds: float) -> int:
    """Open up to *want* connections through *gate* within *seconds*; how many it allowed."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    opened = 0
    while opened < want and (now := loop.time()) < end:
        wait = gate.wait(now)
        if wait > 0:
            await asyncio.sleep(min(wait, end - now))
            continue
        gate.started()
        opened += 1
    return opened


def test_leases_cap_connections_across_nodes_and_a_crashed_node_s_expire(redis: RedisProc) -> None:
    async def main() -> tuple[int, int, int, int, int]:
        key = _key("leases")
        (a, ca), (b, cb) = _gate(redis.url, key, "a", 3, 0.6), _gate(redis.url, key, "b", 3, 0.6)
        try:
            got_a = await _open(a, 2, 1.0)
            got_b = await _open(b, 3, 0.5)  # only one left
            size = await ca.zcard(key)
            b.closed()  # b closes its connection: a may take the lease
            got_a2 = await _open(a, 1, 0.5)
            # a "crashes": it stops renewing without giving anything back; its leases expire after the TTL
            assert a._renewer is not None
            a._renewer.cancel()
            got_b2 = await _open(b, 3, 2.0)
            return got_a, got_b, size, got_a2, got_b2
        finally:
            await b.aclose()
            await ca.aclose()
            await cb.aclose()

    got_a, got_b, size, got_a2, got_b2 = asyncio.run(main())
    assert (got_a, got_b, size, got_a2) == (2, 1, 3, 1)
    assert got_b2 == 3  # a's three leases expired


def test_degraded_mode_goes_on_at_limit_over_nodes_and_rejoins(redis: RedisProc) -> None:
    async def main() -> tuple[int, int, int, bool, bool, int]:
        lim, client = _limiter(redis.url, _key("degraded"), "100/s", batch=0.1, burst=10, nodes=2)
        try:
            healthy = await _consume(lim, 1.0)
            redis.kill()
            down = await _consume(lim, 2.0)  # at most what it held, then 100/2 per second
            was_degraded = lim.health.degraded
            redis.restart()
            await asyncio.sleep(0.5)  # the probe (every 0.2 s) sees Redis again
            rejoined = not lim.health.degraded
            granted = lim.granted
            after = await _consume(lim, 1.0)
            assert lim.granted > granted  # tokens come from Redis again
            return healthy, down, after, was_degraded, rejoined, lim.health.episodes
        finally:
            await client.aclose()

    healthy, down, after, was_degraded, rejoined, episodes = asyncio.run(main())
    assert was_degraded and rejoined and episodes == 1
    assert 90 <= healthy <= 115
    assert 80 <= down <= 100 + 10  # 50/s for 2 s, plus a burst and what was held: delivery went on
    assert 85 <= after <= 115


def test_engine_keeps_a_shared_limit_and_the_connection_cap(redis: RedisProc) -> None:
    """Two engines (two nodes) with one [cluster]: 40 msgs/s and 2 connections to the site between them."""

    async def main() -> tuple[list[Status], float, int, list[dict[str, Any]]]:
        sink = SinkServer(SinkConfig(listeners=(ListenerConfig("127.0.0.1", 0),), starttls=False))
        host, port = (await sink.start())[0]
        prefix = _key("engine") + ":"
        cfgs = [
            config_from_dict({
                "routing": {"static": {"*": [f"{host}:{port}"]}}, "smtp": {"tls": "never"},
                "sites": {"*": {"adaptive": {"enabled": False}}},
                "cluster": {"redis": redis.url, "node": f"n{i}", "prefix": prefix, "batch": 0.1,
                            "max_connections_per_site": 2, "limit": [{"scope": "site", "rate": "40/s", "burst": 4}]},
            })
            for i in range(2)
        ]
        try:
            async with Engine(cfgs[0]) as e1, Engine(cfgs[1]) as e2:
                t0 = time.monotonic()
                ids = [(e, await e.submit(b"Subject: x\r\n\r\nhi\r\n", "s@a.test", [f"u{i}@b.test"]))
                       for i in range(60) for e in ((e1, e2)[i % 2],)]  # fmt: skip
                outs = await asyncio.wait_for(asyncio.gather(*(e.result(i) for e, i in ids)), 30)
                took = time.monotonic() - t0
                assert e1.cluster is not None and e2.cluster is not None
                states = [e1.cluster.state(), e2.cluster.state()]
        finally:
            await sink.close()
        return [o.status for out in outs for o in out], took, sink.stats.max_concurrent_connections, states

    statuses, took, max_conns, states = asyncio.run(main())
    assert statuses == [Status.DELIVERED] * 60
    assert took >= (60 - 4) / 40 * 0.95  # the shared 40/s, not 40/s per node
    assert max_conns <= 2
    assert not any(s["degraded"] for s in states)


def test_events_go_to_a_redis_stream_in_batches_for_consumer_groups(redis: RedisProc) -> None:
    from fastmta.serve.events_redis import RedisStreamSink

    async def main() -> tuple[int, int, int, list[Any]]:
        key = _key("events")
        sink = RedisStreamSink(redis.url, key=key, flush_interval=0.02, batch=100, retry=0.1)
        reader = redis_client(redis.url, 1.0)
        try:
            await sink.start()
            for i in range(250):
                sink.put({"message_id": f"m{i}", "status": "delivered"})
            await asyncio.sleep(0.5)
            first = await reader.xlen(key)
            trips = sink.round_trips
            await reader.xgroup_create(key, "g", id="0")
            entries = await reader.xreadgroup("g", "c1", {key: ">"}, count=2)
        finally:
            await sink.close()
            await reader.aclose()
        return first, trips, sink.sent, entries

    first, trips, sent, entries = asyncio.run(main())
    assert first == sent == 250 and trips <= 5
    fields = entries[0][1][0][1]
    assert fields[b"status"] == b"delivered" and b'"message_id":"m0"' in fields[b"record"]


# --- contention: reservations served in turn (issue 17, GCRA fairness) ------------------------------------------


def test_gcra_reservations_queue_up_to_the_horizon(redis: RedisProc) -> None:
    async def main() -> list[tuple[int, float, float]]:
        client = redis_client(redis.url, 1.0)
        store, key = GcraStore(client), _key("reserve")
        try:
            # 100/s, burst 5, batches of 5, reservations due within 120 ms
            return [await store.reserve(key, 10_000, 5, 5, 120_000) for _ in range(4)]
        finally:
            await client.aclose()

    (a, due_a, _), (b, due_b, _), (c, due_c, _), (d, due_d, next_d) = asyncio.run(main())
    assert (a, b, c, d) == (5, 5, 5, 0)  # the fourth would be due in 150 ms: past the horizon, refused
    assert due_a == 0 and 0.035 < due_b <= 0.050 and 0.085 < due_c <= 0.100 and due_d == 0
    assert 0.015 < next_d <= 0.030  # when it would be due within the horizon: no polling


@pytest.mark.parametrize("nodes", [2, 3])
def test_contending_nodes_take_turns_one_round_trip_per_batch(redis: RedisProc, nodes: int) -> None:
    rate, batch, seconds = 500, 0.2, 2.5
    burst = int(rate * batch) * nodes  # default_burst: a batch per node

    async def main() -> tuple[list[int], int, int]:
        key = _key(f"contend{nodes}")
        pairs = [_limiter(redis.url, key, f"{rate}/s", batch=batch, burst=burst, nodes=nodes) for _ in range(nodes)]
        try:
            taken = await asyncio.gather(*(_consume(lim, seconds) for lim, _ in pairs))
        finally:
            for _, client in pairs:
                await client.aclose()
        return list(taken), sum(lim.store.calls for lim, _ in pairs), sum(lim.granted for lim, _ in pairs)

    taken, calls, granted = asyncio.run(main())
    total = sum(taken)
    assert rate * seconds * 0.9 <= total <= rate * seconds + burst, taken  # the shared limit, with its burst
    assert min(taken) >= total / nodes * 0.6, taken  # every node gets about its share: none starves
    assert calls / total <= 0.05, (calls, total)  # goal: <= 0.05 round trips per token (here ~0.012)
    assert granted == calls * int(rate * batch)  # no round trip wasted on a refusal: every one brought a batch


def test_small_batches_under_contention_cost_one_round_trip_each(redis: RedisProc) -> None:
    """Batches of 10 (0.05 s at 200/s), two nodes wanting twice the key: about one call per batch, not two."""
    rate, seconds = 200, 2.0

    async def main() -> tuple[list[int], int]:
        key = _key("small")
        pairs = [_limiter(redis.url, key, f"{rate}/s", batch=0.05, burst=20) for _ in range(2)]
        try:
            taken = await asyncio.gather(*(_consume(lim, seconds) for lim, _ in pairs))
        finally:
            for _, client in pairs:
                await client.aclose()
        return list(taken), sum(lim.store.calls for lim, _ in pairs)

    taken, calls = asyncio.run(main())
    total = sum(taken)
    assert rate * seconds * 0.9 <= total <= rate * seconds + 20 and min(taken) >= total * 0.35, taken
    assert calls <= total / 10 + 4, (calls, total)  # ~0.1 per token (was ~0.2: every other call refused)
