"""The engine end to end: Engine -> DNS on loopback -> fastmta sinks on loopback.

Everything counted here is counted where it happens: connections and
messages at the sink, lookups at the DNS server.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest

from dnsserver import DNSServer
from fastmta.delivery.config import Config, config_from_dict
from fastmta.delivery.engine import Engine, EngineClosed
from fastmta.errors import ConfigError, InputError
from fastmta.queue.records import Outcome, Status
from fastmta.sink import SinkServer
from fastmta.sink.config import FaultConfig, ListenerConfig, PhaseFault, SinkConfig

Run = Callable[[Coroutine[Any, Any, Any]], Any]

BODY = b"From: a@sender.test\r\nTo: x@y.test\r\nSubject: engine test\r\n\r\nhello\r\n.dot line\r\n"

ZONE = """
pref        MX 10 mx1.pref
pref        MX 20 mx2.pref
mx1.pref    A  127.0.0.12
mx2.pref    A  127.0.0.13
down        MX 10 mx1.down
down        MX 20 mx2.down
mx1.down    A  127.0.0.14
mx2.down    A  127.0.0.13
nullmx      MX 0 .
shared-a    MX 10 mx.shared
shared-b    MX 10 mx.shared
mx.shared   A  127.0.0.12
flaky       MX 10 mx.flaky
mx.flaky    A  127.0.0.12
slow        MX 10 mx.slow
mx.slow     A  127.0.0.15
"""


@pytest.fixture
def ns() -> Iterator[DNSServer]:
    with DNSServer({"example.test": ZONE}, default_ttl=300) as server:
        yield server
        assert server.errors == []


async def start_sink(host: str, port: int = 0, faults: FaultConfig | None = None, **kw: Any) -> SinkServer:
    sink = SinkServer(SinkConfig(listeners=(ListenerConfig(host=host, port=port, faults=faults),), **kw))
    await sink.start()
    return sink


def engine_config(ns: DNSServer | None, port: int, **sections: Any) -> Config:
    data: dict[str, Any] = {
        "routing": {"smtp_port": port},
        "queue": {"retry_initial": 0.2, "retry_jitter": 0.0, "retry_max": 1.0, "host_down_time": 30},
        "smtp": {"tls": "never", "timeouts": {"connect": 5, "greeting": 5, "ehlo": 5, "mail": 5, "rcpt": 5,
                                              "data": 5, "end_of_data": 5, "rset": 5, "quit": 2}},
    }
    if ns is not None:
        data["dns"] = {"nameservers": [ns.nameserver], "timeout": 2.0}
    # These tests are about routing, pools and retries: the adaptive throttle
    # (tested on its own and in the throttling tests) would only slow them.
    sites = sections.pop("sites", {"*": {}})
    data["sites"] = {pattern: {"adaptive": {"enabled": False}, **cfg} for pattern, cfg in sites.items()}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return config_from_dict(data)


async def deliver_all(engine: Engine, rcpts: list[str], per_message: int = 1) -> list[Outcome]:
    ids = []
    for i in range(0, len(rcpts), per_message):
        ids.append(await engine.submit(BODY, "sender@sender.test", rcpts[i : i + per_message]))
    results = await asyncio.wait_for(asyncio.gather(*(engine.result(i) for i in ids)), 30)
    return [o for r in results for o in r]


# ----------------------------------------------------------------- DNS routing


class Producer:
    """Submits one message per address in the background; *submitted* counts those accepted so far."""

    def __init__(self, engine: Engine, body: bytes, addresses: list[str]) -> None:
        self.submitted = 0
        self.task = asyncio.ensure_future(self._run(engine, body, addresses))

    async def _run(self, engine: Engine, body: bytes, addresses: list[str]) -> None:
        for address in addresses:
            await engine.submit(body, "s@sender.test", [address])
            self.submitted += 1


async def wait_count(engine: Engine, status: str, n: int, timeout: float) -> None:
    """Until engine.counts[status] == n, or *timeout* seconds (checked every 0.1 s)."""
    for _ in range(int(timeout * 10)):
        if engine.counts[status] == n:
            return
        await asyncio.sleep(0.1)


def test_mx_preference_then_fall_over_when_first_refuses(run: Run, ns: DNSServer) -> None:
    async def main() -> None:
        primary = await start_sink("127.0.0.12")
        port = primary.addresses[0][1]
        secondary = await start_sink("127.0.0.13", port)
        try:
            async with Engine(engine_config(ns, port), rng=random.Random(1)) as engine:
                # Both up: everything goes to the preferred MX.
                out = await deliver_all(engine, [f"u{i}@pref.example.test" for i in range(20)])
                assert {o.status for o in out} == {Status.DELIVERED}
                assert {o.mx_host for o in out} == {"mx1.pref.example.test"}
                assert primary.stats.messages == 20 and secondary.stats.messages == 0
                # mx1.down (127.0.0.14) has nothing listening: refused, so mx2 takes it.
                out = await deliver_all(engine, [f"u{i}@down.example.test" for i in range(5)])
                assert {o.status for o in out} == {Status.DELIVERED}
                assert {(o.mx_host, o.mx_ip) for o in out} == {("mx2.down.example.test", "127.0.0.13")}
                assert secondary.stats.messages == 5
        finally:
            await primary.close()
            await secondary.close()

    run(main())


def test_null_mx_and_nxdomain_bounce_without_a_connection(run: Run, ns: DNSServer) -> None:
    async def main() -> None:
        sink = await start_sink("127.0.0.12")
        try:
            async with Engine(engine_config(ns, sink.addresses[0][1])) as engine:
                out = await deliver_all(engine, ["a@nullmx.example.test", "b@nosuch.example.test"])
        finally:
            await sink.close()
        by = {o.recipient: o for o in out}
        assert by["a@nullmx.example.test"].status is Status.BOUNCED
        assert (by["a@nullmx.example.test"].reply.code, by["a@nullmx.example.test"].reply.enhanced) == (556, "5.1.10")
        assert by["b@nosuch.example.test"].status is Status.BOUNCED
        assert by["b@nosuch.example.test"].reply.code == 550
        assert all(o.attempts == 1 for o in out)
        assert sink.stats.connections == 0

    run(main())


def test_servfail_defers_then_delivers_when_the_zone_heals(run: Run, ns: DNSServer) -> None:
    async def main() -> list[Outcome]:
        sink = await start_sink("127.0.0.12")
        ns.servfail("flaky.example.test", "MX")
        seen: list[Outcome] = []
        try:
            async with Engine(engine_config(ns, sink.addresses[0][1])) as engine:

                async def watch() -> None:
                    async for o in engine.outcomes():
                        seen.append(o)
                        if o.status is Status.DEFERRED:
                            ns.heal()

                watcher = asyncio.ensure_future(watch())
                await asyncio.sleep(0)
                out = await deliver_all(engine, ["x@flaky.example.test"])
                watcher.cancel()
        finally:
            await sink.close()
        assert out[0].status is Status.DELIVERED and out[0].attempts == 2
        return seen

    seen = run(main())
    assert [o.status for o in seen] == [Status.DEFERRED, Status.DELIVERED]
    assert seen[0].reply.code == 451 and seen[0].reply.enhanced == "4.4.3"


def test_one_lookup_per_domain_per_ttl_and_shared_sites(run: Run, ns: DNSServer) -> None:
    async def main() -> tuple[list[Outcome], list[dict[str, Any]]]:
        sink = await start_sink("127.0.0.12")
        try:
            async with Engine(engine_config(ns, sink.addresses[0][1])) as engine:
                rcpts = [f"u{i}@shared-{'ab'[i % 2]}.example.test" for i in range(200)]
                out = await deliver_all(engine, rcpts)
                return out, engine.queue_stats()
        finally:
            await sink.close()

    out, queues = run(main())
    assert Counter(o.status for o in out) == {Status.DELIVERED: 200}
    assert ns.count("shared-a.example.test", "MX") == 1
    assert ns.count("shared-b.example.test", "MX") == 1
    assert ns.count("mx.shared.example.test", "A") == 1
    # Both domains are hosted by mx.shared: one site, one ready queue.
    assert {o.site for o in out} == {"mx.shared.example.test"}
    assert len(queues) == 1


# ----------------------------------------------------------------- pools


def test_connection_limit_and_reuse_counted_at_the_sink(run: Run) -> None:
    async def main() -> tuple[SinkServer, list[Outcome]]:
        sink = await start_sink("127.0.0.12")
        cfg = engine_config(None, 25, routing={"static": {"*": [f"127.0.0.12:{sink.addresses[0][1]}"]}},
                            sites={"*": {"max_connections": 3, "max_messages_per_connection": 40}})
        try:
            async with Engine(cfg) as engine:
                out = await deliver_all(engine, [f"u{i}@d{i % 7}.test" for i in range(300)])
        finally:
            await sink.close()
        return sink, out

    sink, out = run(main())
    assert Counter(o.status for o in out) == {Status.DELIVERED: 300}
    assert sink.stats.max_concurrent_connections <= 3
    assert sink.stats.messages == 300
    assert sink.stats.messages / sink.stats.connections >= 20  # reused, up to 40 each
    assert sink.stats.connections >= 300 // 40


def test_recipients_of_one_message_at_one_site_share_a_transaction(run: Run) -> None:
    async def main() -> SinkServer:
        sink = await start_sink("127.0.0.12")
        cfg = engine_config(None, 25, routing={"static": {"*": [f"127.0.0.12:{sink.addresses[0][1]}"]}},
                            sites={"*": {"max_recipients_per_transaction": 50}})
        try:
            async with Engine(cfg) as engine:
                # 120 recipients over 4 domains of one site: 3 transactions (50 + 50 + 20).
                out = await deliver_all(engine, [f"u{i}@d{i % 4}.test" for i in range(120)], per_message=120)
                assert Counter(o.status for o in out) == {Status.DELIVERED: 120}
        finally:
            await sink.close()
        return sink

    sink = run(main())
    assert sink.stats.messages == 3 and sink.stats.recipients == 120


def test_a_tarpitting_site_does_not_stall_the_others(run: Run, ns: DNSServer) -> None:
    async def main() -> None:
        fast = await start_sink("127.0.0.12")
        port = fast.addresses[0][1]
        # The slow site answers MAIL after 20 s: far longer than this test.
        slow = await start_sink("127.0.0.15", port, FaultConfig(delays=(("mail", 20.0),)))
        try:
            async with Engine(engine_config(ns, port, sites={"*": {"max_connections": 2}})) as engine:
                slow_ids = [await engine.submit(BODY, "s@sender.test", [f"s{i}@slow.example.test"]) for i in range(50)]
                t0 = time.monotonic()
                out = await deliver_all(engine, [f"u{i}@pref.example.test" for i in range(400)])
                elapsed = time.monotonic() - t0
                assert Counter(o.status for o in out) == {Status.DELIVERED: 400}
                assert elapsed < 10, elapsed
                assert not any(engine.result(i).done() for i in slow_ids)  # still stuck at the tarpit
                assert slow.stats.max_concurrent_connections <= 2
                # Shutdown is bounded even though the tarpit never answers.
                t1 = time.monotonic()
                await engine.close(timeout=0.5)
                assert time.monotonic() - t1 < 3.0
                assert engine.unfinished == 50
        finally:
            await fast.close()
            await slow.close()

    run(main())


def test_close_does_not_wait_for_a_greeting_when_nothing_is_left_to_carry(run: Run) -> None:
    # Found by a fault-injection attack: one connection of a site stuck before the greeting (a tarpit)
    # while the others delivered everything in 0.3 s held `fastmta send`'s exit for close's 30 s.
    async def main() -> None:
        sink = await start_sink("127.0.0.12")
        held: list[asyncio.StreamWriter] = []

        async def front(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if not held:  # the first connection: accepted, never greeted
                held.append(writer)
                await reader.read()
                return
            up_r, up_w = await asyncio.open_connection(*sink.addresses[0][:2])

            async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                while data := await src.read(65536):
                    dst.write(data)
                dst.close()

            await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer), return_exceptions=True)

        server = await asyncio.start_server(front, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        cfg = engine_config(None, 25, routing={"static": {"*": [f"127.0.0.1:{port}"]}},
                            smtp={"tls": "never", "timeouts": {"greeting": 60}}, sites={"*": {"max_connections": 2}})
        try:
            engine = Engine(cfg)
            await engine.start()
            out = await deliver_all(engine, [f"u{i}@a.example.test" for i in range(20)])
            assert Counter(o.status for o in out) == {Status.DELIVERED: 20} and held  # one connection is held
            t0 = time.monotonic()
            await engine.close(timeout=30)
            assert time.monotonic() - t0 < 5 and engine.unfinished == 0
        finally:
            for writer in held:
                writer.close()
            server.close()
            await sink.close()

    run(main())


# ----------------------------------------------------------------- sources


def test_egress_sources_bind_their_addresses(run: Run) -> None:
    async def main() -> SinkServer:
        sink = await start_sink("127.0.0.12")
        cfg = engine_config(
            None, 25, routing={"static": {"*": [f"127.0.0.12:{sink.addresses[0][1]}"]}},
            sources=[{"name": "a", "address": "127.0.0.21", "ehlo_name": "a.sender.test", "weight": 1},
                     {"name": "b", "address": "127.0.0.22", "ehlo_name": "b.sender.test", "weight": 3}],
            sites={"*": {"max_connections": 2}},
        )
        try:
            async with Engine(cfg, rng=random.Random(5)) as engine:
                out = await deliver_all(engine, [f"u{i}@d.test" for i in range(400)])
                assert Counter(o.status for o in out) == {Status.DELIVERED: 400}
                assert {o.source_ip for o in out} == {"127.0.0.21", "127.0.0.22"}
        finally:
            await sink.close()
        return sink

    sink = run(main())
    per_ip = sink.stats.per_ip
    assert set(per_ip) == {"127.0.0.21", "127.0.0.22"}
    a, b = per_ip["127.0.0.21"].messages, per_ip["127.0.0.22"].messages
    assert a + b == 400 and 2 < b / a < 4.5  # weights 1:3
    # Limits are per source: each source had its own 2 connections.
    assert sink.stats.max_concurrent_connections <= 4


def test_egress_pools_keep_their_mail_on_their_sources(run: Run) -> None:
    """PowerMTA's virtual-mta-pool, KumoMTA's egress_pool: transactional mail never leaves from the marketing
    addresses, nor the other way round. A message's pool: its meta's "pool", else its sender domain's
    (routing.pool_by_sender), else the default pool (the sources without pools)."""
    async def main() -> SinkServer:
        sink = await start_sink("127.0.0.12")
        cfg = engine_config(
            None, 25, routing={"static": {"*": [f"127.0.0.12:{sink.addresses[0][1]}"]},
                               "pool_by_sender": {"News.Sender.test": "marketing"}},
            sources=[{"name": "tx", "address": "127.0.0.21"},
                     {"name": "m1", "address": "127.0.0.22", "pools": ["marketing"]},
                     {"name": "m2", "address": "127.0.0.23", "pools": ["marketing", "bulk"]}],
        )
        try:
            async with Engine(cfg, rng=random.Random(5)) as engine:
                ids = {}
                for i in range(60):
                    ids[await engine.submit(BODY, "app@sender.test", [f"t{i}@d.test"])] = {"127.0.0.21"}
                    ids[await engine.submit(BODY, "news@news.sender.test", [f"n{i}@d.test"])] = {
                        "127.0.0.22", "127.0.0.23"}
                    ids[await engine.submit(BODY, "app@sender.test", [f"b{i}@d.test"], meta={"pool": "bulk"})] = {
                        "127.0.0.23"}
                with pytest.raises(InputError, match="meta.pool: no source is in pool 'bulkk'"):
                    await engine.submit(BODY, "app@sender.test", ["x@d.test"], meta={"pool": "bulkk"})
                seen: dict[str, set[str]] = {}
                for mid, allowed in ids.items():
                    for o in await asyncio.wait_for(engine.result(mid), 30):
                        assert o.status is Status.DELIVERED and o.source_ip in allowed, (o.recipient, o.source_ip)
                        seen.setdefault(o.recipient[0], set()).add(o.source_ip or "")
                assert seen == {"t": {"127.0.0.21"}, "n": {"127.0.0.22", "127.0.0.23"}, "b": {"127.0.0.23"}}
                assert {o.source for mid in ids for o in await engine.result(mid)} == {"tx", "m1", "m2"}
        finally:
            await sink.close()
        return sink

    run(main())


def test_pool_configuration_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="pool_by_sender.*no source is in pool 'bulk'"):
        config_from_dict({"sources": [{"name": "a"}], "routing": {"pool_by_sender": {"x.test": "bulk"}}})
    with pytest.raises(ConfigError, match="none is in the default pool"):
        config_from_dict({"sources": [{"name": "a", "pools": ["marketing"]}]})
    with pytest.raises(ConfigError, match="pool name"):
        config_from_dict({"sources": [{"name": "a", "pools": ["two words"]}]})
    cfg = config_from_dict({"sources": [{"name": "a"}, {"name": "b", "pools": ["default", "marketing"]}]})
    from fastmta.delivery.source_config import source_pools
    assert source_pools(cfg.sources) == {"default": ["a", "b"], "marketing": ["b"]}


# ----------------------------------------------------------------- retries


def test_transient_then_permanent_replies(run: Run) -> None:
    async def main() -> list[Outcome]:
        faults = FaultConfig(replies=(PhaseFault("rcpt", 0.5, 451),), unknown_recipients=("gone*",))
        sink = await start_sink("127.0.0.12", faults=faults, seed=3)
        cfg = engine_config(None, 25, routing={"static": {"*": [f"127.0.0.12:{sink.addresses[0][1]}"]}})
        try:
            async with Engine(cfg) as engine:
                return await deliver_all(engine, [f"u{i}@d.test" for i in range(40)] + ["gone1@d.test"])
        finally:
            await sink.close()

    out = run(main())
    by = {o.recipient: o for o in out}
    assert by["gone1@d.test"].status is Status.BOUNCED and by["gone1@d.test"].reply.enhanced == "5.1.1"
    delivered = [o for o in out if o.recipient != "gone1@d.test"]
    assert all(o.status is Status.DELIVERED for o in delivered)
    assert max(o.attempts for o in delivered) > 1  # some needed retries


def test_max_lifetime_expires(run: Run) -> None:
    async def main() -> list[Outcome]:
        sink = await start_sink("127.0.0.12", faults=FaultConfig(replies=(PhaseFault("rcpt", 1.0, 450),)))
        cfg = engine_config(None, 25, routing={"static": {"*": [f"127.0.0.12:{sink.addresses[0][1]}"]}},
                            queue={"max_lifetime": 1.0})
        try:
            async with Engine(cfg) as engine:
                return await deliver_all(engine, ["x@d.test"])
        finally:
            await sink.close()

    out = run(main())
    assert out[0].status is Status.EXPIRED and out[0].reply.code == 450
    assert out[0].attempts >= 2


# ----------------------------------------------------------------- API


def test_submit_rejects_injection_and_applies_backpressure(run: Run) -> None:
    async def main() -> None:
        sink = await start_sink("127.0.0.12", faults=FaultConfig(delays=(("mail", 0.3),)))
        cfg = engine_config(None, 25, routing={"static": {"*": [f"127.0.0.12:{sink.addresses[0][1]}"]}},
                            queue={"max_queued_recipients": 10})
        try:
            async with Engine(cfg) as engine:
                with pytest.raises(InputError):
                    await engine.submit(BODY, "s@sender.test", ["evil@d.test>\r\nRCPT TO:<x@y"])
                with pytest.raises(InputError):
                    await engine.submit(BODY, "s\n@sender.test", ["ok@d.test"])
                producer = Producer(engine, BODY, [f"u{i}@d.test" for i in range(40)])
                await asyncio.sleep(0.15)
                assert producer.submitted <= 10  # waiting for room, not growing the queue
                assert engine.unfinished <= 10
                await asyncio.wait_for(producer.task, 30)
                assert await engine.drain(30)
                assert engine.counts["delivered"] == 40
        finally:
            await sink.close()

    run(main())


def test_close_reports_unfinished_work(run: Run) -> None:
    async def main() -> None:
        sink = await start_sink("127.0.0.12", faults=FaultConfig(replies=(PhaseFault("rcpt", 1.0, 450),)))
        cfg = engine_config(None, 25, routing={"static": {"*": [f"127.0.0.12:{sink.addresses[0][1]}"]}},
                            queue={"retry_initial": 60})
        try:
            engine = Engine(cfg)
            async with engine:
                mid = await engine.submit(BODY, "s@sender.test", ["x@d.test"])
                fut = engine.result(mid)
                assert not await engine.drain(1.0)
            assert engine.unfinished == 1
            with pytest.raises(EngineClosed):
                await fut
        finally:
            await sink.close()

    run(main())


def test_backpressure_by_bytes_bounds_the_bodies_in_memory(run: Run) -> None:
    async def main() -> None:
        sink = await start_sink("127.0.0.12", faults=FaultConfig(delays=(("mail", 0.3),)))
        big = BODY + b"x" * 100_000 + b"\r\n"
        cfg = engine_config(None, 25, routing={"static": {"*": [f"127.0.0.12:{sink.addresses[0][1]}"]}},
                            queue={"max_queued_recipients": 1000, "max_queued_bytes": 700_000})
        try:
            async with Engine(cfg) as engine:
                producer = Producer(engine, big, [f"u{i}@d.test" for i in range(12)])
                await asyncio.sleep(0.15)
                # Each 100 KB message counts twice (raw + wire form): 3 fit in 700 KB.
                assert producer.submitted == 3
                await asyncio.wait_for(producer.task, 30)
                assert await engine.drain(30)
                assert engine.counts["delivered"] == 12
        finally:
            await sink.close()

    run(main())


def test_read_ahead_bounds_untried_recipients_not_deferred_ones(run: Run) -> None:
    """[queue] max_untried_recipients: submit() waits for untried recipients, never for deferred ones."""
    async def main() -> None:
        down = await start_sink("127.0.0.12", faults=FaultConfig(replies=(PhaseFault("rcpt", 1.0, 450),)))
        slow = await start_sink("127.0.0.13", faults=FaultConfig(delays=(("mail", 0.3),)))
        cfg = engine_config(None, 25, routing={"static": {"down.test": [f"127.0.0.12:{down.addresses[0][1]}"],
                                                          "*": [f"127.0.0.13:{slow.addresses[0][1]}"]}},
                            queue={"max_untried_recipients": 10, "retry_initial": 60})
        try:
            async with Engine(cfg) as engine:
                for i in range(10):
                    await engine.submit(BODY, "s@sender.test", [f"d{i}@down.test"])
                await wait_count(engine, "deferred", 10, timeout=10)  # all ten tried and deferred
                assert engine.counts["deferred"] == 10
                producer = Producer(engine, BODY, [f"u{i}@ok.test" for i in range(40)])
                await asyncio.sleep(0.15)
                # Ten deferred recipients take no room; ten untried ones fill it.
                assert producer.submitted == 10
                await asyncio.wait_for(producer.task, 30)
                await wait_count(engine, "delivered", 40, timeout=30)
                assert engine.counts["delivered"] == 40
                assert engine.unfinished == 10  # the deferred ones wait for their retry
        finally:
            await down.close()
            await slow.close()

    run(main())


def test_warmup_quota_overflows_to_a_warm_source_and_persists(run: Run, tmp_path: Any) -> None:
    from fastmta.queue.spool import Spool

    async def main() -> SinkServer:
        sink = await start_sink("127.0.0.12")
        cfg = engine_config(
            None, 25, routing={"static": {"*": [f"127.0.0.12:{sink.addresses[0][1]}"]}},
            sources=[{"name": "new", "address": "127.0.0.31", "weight": 1000,
                      "warmup": {"schedule": [5, 10], "overflow": True}},
                     {"name": "warm", "address": "127.0.0.32", "weight": 1}],
        )
        try:
            for run_no in range(2):  # a second run the same day: the quota is already used
                spool = Spool(tmp_path / "queue")
                try:
                    async with Engine(cfg, rng=random.Random(run_no), spool=spool) as engine:
                        out = await deliver_all(engine, [f"r{run_no}-{i}@d.test" for i in range(20)])
                        assert Counter(o.status for o in out) == {Status.DELIVERED: 20}
                finally:
                    await spool.close()
        finally:
            await sink.close()
        return sink

    sink = run(main())
    per_ip = sink.stats.per_ip
    # The new source sent its 5 of the day (over both runs: the state was
    # persisted), everything else overflowed to the warm one.
    assert per_ip["127.0.0.31"].messages == 5
    assert per_ip["127.0.0.32"].messages == 35
    assert (tmp_path / "queue" / "warmup.json").exists()


# ----------------------------------------------------------------- review regressions


def test_a_site_refusing_every_connection_still_ends_its_recipients(run: Run) -> None:
    async def main() -> list[Outcome]:
        sink = await start_sink("127.0.0.12", faults=FaultConfig(replies=(PhaseFault("connect", 1.0, 421),)))
        cfg = engine_config(None, 25, routing={"static": {"*": [f"127.0.0.12:{sink.addresses[0][1]}"]}},
                            queue={"max_lifetime": 2.0})
        try:
            async with Engine(cfg) as engine:
                return await deliver_all(engine, [f"u{i}@d.test" for i in range(5)])
        finally:
            await sink.close()

    out = run(main())  # deliver_all itself fails the test after 30 s
    assert [o.status for o in out] == [Status.EXPIRED] * 5
    assert all(o.reply.code == 421 for o in out)


def test_a_slow_static_rate_does_not_reconnect_in_a_loop(run: Run) -> None:
    async def main() -> SinkServer:
        sink = await start_sink("127.0.0.12")
        cfg = engine_config(None, 25, routing={"static": {"*": [f"127.0.0.12:{sink.addresses[0][1]}"]}},
                            sites={"*": {"rate": ["2/s"], "idle_timeout": 0.2}})
        try:
            async with Engine(cfg) as engine:
                for i in range(6):
                    await engine.submit(BODY, "s@sender.test", [f"u{i}@d.test"])
                assert await engine.drain(15)
        finally:
            await sink.close()
        return sink

    sink = run(main())
    assert sink.stats.messages == 6
    # The pace (2/s) is longer than the idle timeout: connections close between
    # messages, but one per message at most, never a storm.
    assert sink.stats.connections <= 15  # the window's first fan-out, then about one per message


def test_slow_down_replies_without_an_adaptive_throttle_take_the_retry_schedule(run: Run) -> None:
    async def main() -> tuple[SinkServer, list[Outcome]]:
        faults = FaultConfig(replies=(PhaseFault("rcpt", 1.0, 450, "4.7.28 unusual rate of mail, slow down"),))
        sink = await start_sink("127.0.0.12", faults=faults)
        cfg = engine_config(None, 25, routing={"static": {"*": [f"127.0.0.12:{sink.addresses[0][1]}"]}},
                            queue={"max_lifetime": 2.0, "retry_initial": 0.5})
        try:
            async with Engine(cfg) as engine:
                out = await deliver_all(engine, ["x@d.test"])
        finally:
            await sink.close()
        return sink, out

    sink, out = run(main())
    assert out[0].status is Status.EXPIRED
    assert sink.stats.transactions <= 6  # backed off, not re-sent in a loop


def test_the_last_try_happens_at_the_queue_lifetime_not_a_retry_interval_early(run: Run) -> None:
    # Retries every 2 s, lifetime 3 s: tries at 0 and 2, then one more just
    # before 3 s (not an expiry at 2 s because the next retry would land at 4).
    async def main() -> tuple[list[Outcome], float]:
        sink = await start_sink("127.0.0.12", faults=FaultConfig(replies=(PhaseFault("rcpt", 1.0, 450),)))
        cfg = engine_config(None, 25, routing={"static": {"*": [f"127.0.0.12:{sink.addresses[0][1]}"]}},
                            queue={"max_lifetime": 3.0, "retry_initial": 2.0, "retry_max": 2.0, "retry_jitter": 0.0})
        try:
            async with Engine(cfg) as engine:
                t0 = asyncio.get_running_loop().time()
                out = await deliver_all(engine, ["x@d.test"])
                return out, asyncio.get_running_loop().time() - t0
        finally:
            await sink.close()

    out, elapsed = run(main())
    assert out[0].status is Status.EXPIRED and out[0].attempts == 3, out[0]
    assert 2.7 <= elapsed <= 3.5, elapsed


def test_a_recipient_given_twice_gets_one_copy_and_one_record(run: Run) -> None:
    # Found by attacks on serve and pickup: HTTP, pickup files and submit() sent a recipient named twice
    # (or with its domain in another case, or with the root's trailing dot) twice, a record each. Postfix keeps one.
    async def main() -> None:
        sink = await start_sink("127.0.0.13")
        cfg = engine_config(None, 25, routing={"static": {"*": [f"127.0.0.13:{sink.addresses[0][1]}"]}})
        try:
            async with Engine(cfg) as engine:
                mid = await engine.submit(BODY, "a@s.test", ["Dup@d.test", "b@d.test", "Dup@D.TEST.", "Dup@d.test",
                                                             "dup@d.test"])  # a local part's case is its own
                outcomes = await engine.result(mid)
            assert sorted(o.recipient for o in outcomes) == ["Dup@d.test", "b@d.test", "dup@d.test"]
            assert (sink.stats.messages, sink.stats.recipients) == (1, 3)
        finally:
            await sink.close()

    run(main())


def test_submit_refuses_wrong_types_and_smuggled_headers_at_once(run: Run) -> None:
    async def main() -> None:
        sink = await start_sink("127.0.0.12")
        cfg = engine_config(None, 25, routing={"static": {"*": [f"127.0.0.12:{sink.addresses[0][1]}"]}})
        try:
            async with Engine(cfg) as engine:
                with pytest.raises(TypeError, match="bytes"):
                    await engine.submit("Subject: str\r\n\r\nbody\r\n", "a@s.test", ["b@d.test"])  # type: ignore[arg-type]
                with pytest.raises(TypeError, match="one string"):
                    await engine.submit(BODY, "a@s.test", "b@d.test")
                with pytest.raises(InputError, match="bare CR"):
                    await engine.submit(b"Subject: a\rBcc: victim@x.test\r\n\r\nbody\r\n", "a@s.test", ["b@d.test"])
                # A first line folded under no header continued the one put before it (serve's Received:
                # a client wrote "(authenticated sender: ceo@...)" into our trace).
                for fold in (b" ", b"\t"):
                    with pytest.raises(InputError, match="folded continuation"):
                        await engine.submit(fold + b"(authenticated sender: ceo@x.test)\r\nSubject: a\r\n\r\nb\r\n",
                                            "a@s.test", ["b@d.test"])
                # Nothing was accepted, and the engine goes on.
                [o] = await engine.result(await engine.submit(BODY, "a@s.test", ["b@d.test"]))
                assert o.status is Status.DELIVERED
            assert sink.stats.messages == 1
        finally:
            await sink.close()

    run(main())
