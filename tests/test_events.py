"""The webhook outbox against a real HTTP receiver (aiohttp) on loopback.

Every wait is bounded (``until``), every receiver is stopped, and what is
asserted is what the receiver counted: records, order, batches, batch ids.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import web

from fastmta.queue.records import Outcome, Status
from fastmta.serve.events import EventOutbox, WebhookEndpoint
from fastmta.smtp.reply import Reply

Run = Callable[[Coroutine[Any, Any, Any]], Any]


class Receiver:
    """A webhook receiver: answers from *script* (then 200), after *delay* seconds."""

    def __init__(self, script: list[int] | None = None, delay: float = 0.0) -> None:
        self.script = list(script or [])
        self.delay = delay
        self.received: list[tuple[int, dict[str, str], list[dict[str, Any]]]] = []  # (answer, headers, events)
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        events = (await request.json())["events"]
        status = self.script.pop(0) if self.script else 200
        self.received.append((status, dict(request.headers), events))
        if self.delay:
            await asyncio.sleep(self.delay)
        headers = {"Retry-After": "0"} if status in (429, 503) else {}
        return web.Response(status=status, headers=headers)

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def accepted(self) -> list[dict[str, Any]]:
        """Events in 2xx-answered requests, in arrival order."""
        return [e for status, _, events in self.received if 200 <= status < 300 for e in events]

    def batch_ids(self) -> list[str]:
        return [h["X-Fastmta-Batch-Id"] for _, h, _ in self.received]


async def until(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def record(i: int, status: str = "delivered") -> dict[str, Any]:
    return {"message_id": f"m{i}", "recipient": f"u{i}@d.test", "status": status, "code": 250, "n": i}


def endpoint(url: str, **kw: Any) -> WebhookEndpoint:
    kw.setdefault("max_batch_delay", 0.05)
    kw.setdefault("initial_backoff", 0.05)
    kw.setdefault("max_backoff", 0.2)
    kw.setdefault("timeout", 5.0)
    return WebhookEndpoint(url=url, **kw)


def rows_in(directory: Path) -> int:
    with sqlite3.connect(directory / "events.sqlite") as db:
        return int(db.execute("SELECT count(*) FROM events").fetchone()[0])


def test_batches_shape_headers_and_order(run: Run, tmp_path: Path) -> None:
    async def main() -> None:
        rx = await Receiver().start()
        ep = endpoint(rx.url, batch_size=100, max_batch_delay=0.3, token="s3cret", headers={"X-Tenant": "t1"})
        outbox = EventOutbox(tmp_path, [ep])
        try:
            for i in range(250):
                outbox.put(record(i))
            await outbox.start()
            await until(lambda: len(rx.accepted()) == 250, what="250 events")
        finally:
            await outbox.close(timeout=2)
            await rx.stop()
        assert [len(ev) for _, _, ev in rx.received] == [100, 100, 50]
        events = rx.accepted()
        assert [e["n"] for e in events] == list(range(250))
        assert all(e["recipient"] == f"u{e['n']}@d.test" and e["status"] == "delivered" for e in events)
        ids = [e["event_id"] for e in events]
        assert len(set(ids)) == 250 and all(i.startswith(outbox.outbox_id + "-") for i in ids)
        _, headers, batch = rx.received[0]
        assert headers["Authorization"] == "Bearer s3cret" and headers["X-Tenant"] == "t1"
        assert headers["Content-Type"] == "application/json"
        first, last = batch[0]["event_id"].rsplit("-", 1)[1], batch[-1]["event_id"].rsplit("-", 1)[1]
        assert headers["X-Fastmta-Batch-Id"] == f"{outbox.outbox_id}-{first}-{last}"
        st = outbox.stats()[ep.label]
        assert (st.sent, st.batches, st.failed_attempts, st.backlog) == (250, 3, 0, 0)

    run(main())


def test_outcomes_from_the_engine_listener_and_odd_records(run_uvloop: Run, tmp_path: Path) -> None:
    async def main() -> None:
        rx = await Receiver().start()
        outbox = EventOutbox(tmp_path, [endpoint(rx.url)])
        await outbox.start()
        try:
            outcome = Outcome("m1", "a@b.test", Status.BOUNCED, Reply(550, "5.1.1", "no such user"), 1, 10.0, 11.0,
                              site="b.test", category="invalid_recipient", bounce="hard")
            outbox.on_outcome(outcome)
            outbox.put({})  # an empty record is still an event
            outbox.put({"status": "complaint", "event_id": "theirs"})  # ours replaces theirs
            outbox.put({"status": "x", "bad": object()})  # cannot be JSON: refused and counted, not raised
            await until(lambda: len(rx.accepted()) == 3, what="3 events")
        finally:
            await outbox.close(timeout=2)
            await rx.stop()
        first, empty, complaint = rx.accepted()
        assert first["status"] == "bounced" and first["code"] == 550 and first["category"] == "invalid_recipient"
        assert set(empty) == {"event_id"} and complaint["event_id"].startswith(outbox.outbox_id)
        assert outbox.refused == 1

    run_uvloop(main())


def test_endpoint_down_then_up_gets_everything_once_in_order(run: Run, tmp_path: Path) -> None:
    async def main() -> None:
        rx = await Receiver().start()
        await rx.stop()  # its port now refuses connections
        ep = endpoint(rx.url, batch_size=64)
        outbox = EventOutbox(tmp_path, [ep])
        await outbox.start()
        try:
            for i in range(300):
                outbox.put(record(i))
            await until(lambda: outbox.stats()[ep.label].failed_attempts >= 2, what="failed attempts")
            st = outbox.stats()[ep.label]
            assert st.last_error and st.sent == 0 and outbox.backlog() == {ep.label: 300}
            await rx.start()  # same port
            await until(lambda: len(rx.accepted()) == 300, what="300 events")
        finally:
            await outbox.close(timeout=2)
            await rx.stop()
        assert [e["n"] for e in rx.accepted()] == list(range(300))
        assert outbox.backlog() == {ep.label: 0}
        assert rows_in(tmp_path) == 0  # acknowledged by the only endpoint: deleted

    run(main())


def test_server_errors_then_success_retry_the_same_batch(run_uvloop: Run, tmp_path: Path) -> None:
    async def main() -> None:
        rx = await Receiver(script=[500, 503, 401, 429]).start()
        ep = endpoint(rx.url, batch_size=50)
        outbox = EventOutbox(tmp_path, [ep])
        await outbox.start()
        try:
            for i in range(120):
                outbox.put(record(i))
            await until(lambda: len(rx.accepted()) == 120, what="120 events")
        finally:
            await outbox.close(timeout=2)
            await rx.stop()
        assert [e["n"] for e in rx.accepted()] == list(range(120))
        ids = rx.batch_ids()
        # The failed batch was offered 5 times under one id: a receiver can de-duplicate.
        assert ids[:5] == [ids[0]] * 5 and len(set(ids)) == 3
        st = outbox.stats()[ep.label]
        assert (st.failed_attempts, st.rejected, st.sent, st.batches) == (4, 1, 120, 3)

    run_uvloop(main())


def test_413_halves_the_batch(run_uvloop: Run, tmp_path: Path) -> None:
    async def main() -> None:
        rx = await Receiver(script=[413]).start()
        outbox = EventOutbox(tmp_path, [endpoint(rx.url, batch_size=40)])
        await outbox.start()
        try:
            for i in range(40):
                outbox.put(record(i))
            await until(lambda: len(rx.accepted()) == 40, what="40 events")
        finally:
            await outbox.close(timeout=2)
            await rx.stop()
        assert [len(ev) for _, _, ev in rx.received] == [40, 20, 20]

    run_uvloop(main())


def test_restart_delivers_what_was_pending(run: Run, tmp_path: Path) -> None:
    async def main() -> None:
        rx = await Receiver().start()
        ep = endpoint(rx.url)
        first = EventOutbox(tmp_path, [ep])
        await first.start()
        for i in range(50):
            first.put(record(i))
        await until(lambda: len(rx.accepted()) == 50, what="the first 50")
        await rx.stop()
        for i in range(50, 120):
            first.put(record(i))
        await first.close(timeout=0.3)  # the endpoint is down: they stay on disk
        assert rows_in(tmp_path) == 70
        await rx.start()
        again = EventOutbox(tmp_path, [ep])  # a new process, the same directory
        again.put(record(120))  # before start(): kept in order after the stored ones
        await again.start()
        try:
            await until(lambda: len(rx.accepted()) == 121, what="everything")
        finally:
            await again.close(timeout=2)
            await rx.stop()
        assert [e["n"] for e in rx.accepted()] == list(range(121))
        assert len({e["event_id"] for e in rx.accepted()}) == 121  # ids continue, never reused
        assert again.stats()[ep.label].sent == 121  # kept across the restart
        assert rows_in(tmp_path) == 0

    run(main())


def test_a_second_outbox_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    outbox = EventOutbox(tmp_path, [])
    with pytest.raises(RuntimeError, match="in use"):
        EventOutbox(tmp_path, [])
    asyncio.run(outbox.close())
    EventOutbox(tmp_path, [])  # free again


def test_a_slow_endpoint_does_not_block_put_or_the_loop(run_uvloop: Run, tmp_path: Path) -> None:
    async def main() -> None:
        rx = await Receiver(delay=1.0).start()
        ep = endpoint(rx.url, batch_size=100, timeout=10.0)
        outbox = EventOutbox(tmp_path, [ep])
        await outbox.start()
        lag = 0.0
        try:
            t0 = time.perf_counter()
            for i in range(5000):
                outbox.put(record(i))
            put_time = time.perf_counter() - t0
            for _ in range(20):  # while the receiver sits on a request
                t = time.perf_counter()
                await asyncio.sleep(0.01)
                lag = max(lag, time.perf_counter() - t - 0.01)
            assert len(rx.accepted()) < 5000  # the receiver is still sitting on them
            t0 = time.perf_counter()
            await outbox.close(timeout=0.5)  # bounded, whatever the endpoint does
            close_time = time.perf_counter() - t0
        finally:
            await rx.stop()
        assert put_time < 0.5, put_time  # ~15 µs each would already be slow; typically ~3 µs
        assert lag < 0.2, lag
        assert close_time < 3.0, close_time
        assert rows_in(tmp_path) >= 4900  # the unsent ones wait on disk

    run_uvloop(main())


def test_two_endpoints_have_independent_cursors_and_filters(run: Run, tmp_path: Path) -> None:
    async def main() -> None:
        up = await Receiver().start()
        down = await Receiver().start()
        await down.stop()
        bounces = await Receiver().start()
        a, b = endpoint(up.url, name="a"), endpoint(down.url, name="b", batch_size=30)
        c = endpoint(bounces.url, name="bounces", statuses=["bounced", "expired"])
        outbox = EventOutbox(tmp_path, [a, b, c])
        await outbox.start()
        try:
            for i in range(100):
                outbox.put(record(i, "bounced" if i % 10 == 3 else "delivered"))
            await until(lambda: len(up.accepted()) == 100 and len(bounces.accepted()) == 10, what="a and c")
            await until(lambda: outbox.backlog()["bounces"] == 0, what="c skips what it does not want")
            assert outbox.backlog() == {"a": 0, "b": 100, "bounces": 0}
            await down.start()
            await until(lambda: len(down.accepted()) == 100, what="b")
            await until(lambda: rows_in(tmp_path) == 0, timeout=5, what="rows deleted once all have them")
        finally:
            await outbox.close(timeout=2)
            for rx in (up, down, bounces):
                await rx.stop()
        assert [e["n"] for e in up.accepted()] == list(range(100))
        assert [e["n"] for e in down.accepted()] == list(range(100))
        assert [e["n"] for e in bounces.accepted()] == list(range(3, 100, 10))
        assert {k: s.sent for k, s in outbox.stats().items()} == {"a": 100, "b": 100, "bounces": 10}

    run(main())


@pytest.mark.parametrize("limit", ["max_rows", "max_age"])
def test_a_refusing_endpoint_cannot_fill_the_disk(
    run_uvloop: Run, tmp_path: Path, caplog: pytest.LogCaptureFixture, limit: str
) -> None:
    async def main() -> None:
        rx = await Receiver(script=[400] * 1000).start()
        ep = endpoint(rx.url, name="bad")
        caps: dict[str, Any] = {"max_rows": 50} if limit == "max_rows" else {"max_age": 0.3}
        outbox = EventOutbox(tmp_path, [ep], **caps)
        await outbox.start()
        try:
            for i in range(200):
                outbox.put(record(i))
            await until(lambda: outbox.stats()["bad"].dropped >= 150, timeout=5, what="drops")
            st = outbox.stats()["bad"]
            assert st.rejected >= 1 and st.sent == 0 and st.last_error == "HTTP 400"
            assert rows_in(tmp_path) <= 50
        finally:
            await outbox.close(timeout=0.2)
            await rx.stop()
        assert any("deleted unsent" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
        reopened = EventOutbox(tmp_path, [ep])  # the count is kept: never silently forgotten
        assert reopened.stats()["bad"].dropped == outbox.stats()["bad"].dropped
        await reopened.close()

    with caplog.at_level(logging.WARNING, logger="fastmta.serve.events"):
        run_uvloop(main())


def test_endpoint_config_from_toml_values() -> None:
    ep = msgspec.convert({"url": "https://user:pw@hooks.example/in?key=secret", "batch_size": 10}, WebhookEndpoint)
    assert ep.label == "https://hooks.example/in" and ep.max_backoff == 300.0
    for bad in ({"url": "ftp://x/"}, {"url": "http://h/", "batch_size": 0}, {"url": "http://h/", "typo": 1},
                {"url": "http://h/", "headers": {"X-A": "b\r\nInjected: 1"}}):
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert(bad, WebhookEndpoint)
    with pytest.raises(ValueError, match="distinct names"):
        EventOutbox(Path("/nonexistent-never-created"), [ep, ep])


def test_an_outcome_on_disk_always_has_its_event_stored(run_uvloop: Run, tmp_path: Path) -> None:
    # Found by kill -9 against fastmta serve: the outbox stored its records every flush_interval (50 ms),
    # while the outcomes went to the journal in their own batches; killed in between, the outcomes were
    # on disk (never delivered again) and their events gone for good. Now the spool's writer stores the
    # pending events before each journal batch. The interval here is long, so the window is certain:
    # the database is read as a crash would leave it (no close).
    from fastmta.delivery.config import config_from_dict
    from fastmta.delivery.engine import Engine
    from fastmta.queue.spool import Spool
    from fastmta.sink import SinkServer

    async def main() -> tuple[int, list[dict[str, Any]]]:
        rx = await Receiver().start()
        await rx.stop()  # the endpoint is down: nothing is acknowledged, every event stays in the database
        async with SinkServer() as sink:
            host, port = sink.addresses[0]
            spool = Spool(tmp_path / "queue")
            outbox = EventOutbox(tmp_path / "events", [endpoint(rx.url)], flush_interval=30.0)
            await outbox.start()
            cfg = config_from_dict({"routing": {"static": {"*": [f"{host}:{port}"]}}, "smtp": {"tls": "never"}})
            try:
                async with Engine(cfg, spool=spool) as engine:
                    engine.add_listener(outbox.on_outcome)
                    spool.before_commit.append(outbox.before_journal)
                    ids = [await engine.submit(b"Subject: x\r\n\r\nhi\r\n", "s@a.test", [f"r{i}@b.test"])
                           for i in range(40)]
                    delivered = [o for i in ids for o in await asyncio.wait_for(engine.result(i), 20)]
                    await spool.sync()  # the outcomes are on disk now
                    with sqlite3.connect(tmp_path / "events" / "events.sqlite") as db:  # what a crash leaves
                        stored = [msgspec.json.decode(b) for (b,) in db.execute("SELECT body FROM events ORDER BY id")]
            finally:
                await outbox.close(timeout=0.2)
                await spool.close()
        return len(delivered), stored

    n, stored = run_uvloop(main())
    assert n == 40
    assert sorted(e["recipient"] for e in stored if e["status"] == "delivered") == sorted(f"r{i}@b.test" for i in range(40))


def test_events_stored_for_the_journal_keep_their_order_when_a_write_fails(run: Run, tmp_path: Path) -> None:
    # A batch the database refused goes back to memory; a later batch stored for the next journal write
    # must wait for it (a sender's cursor moves past every id below what it read: stored first, the
    # earlier ones would never be sent).
    class FailsOnce:
        def __init__(self, db: sqlite3.Connection) -> None:
            self.db, self.failed = db, False

        def executemany(self, sql: str, rows: Any) -> Any:
            if not self.failed:
                self.failed = True
                raise sqlite3.OperationalError("disk I/O error")
            return self.db.executemany(sql, rows)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.db, name)

    async def main() -> list[int]:
        rx = await Receiver().start()
        outbox = EventOutbox(tmp_path, [endpoint(rx.url)], flush_interval=0.5)
        await outbox.start()
        outbox._db = FailsOnce(outbox._db)  # type: ignore[assignment]
        try:
            for i in range(10):
                outbox.put(record(i))
            first = outbox.before_journal()
            for i in range(10, 20):
                outbox.put(record(i))
            second = outbox.before_journal()
            assert first is not None and second is not None
            await asyncio.wait_for(asyncio.wrap_future(second), 5)
            await until(lambda: len(rx.accepted()) == 20, what="all 20")
        finally:
            await outbox.close(timeout=2)
            await rx.stop()
        return [e["n"] for e in rx.accepted()]

    assert run(main()) == list(range(20))
