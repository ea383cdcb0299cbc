"""Accounting records to a Redis Stream: an event sink beside the webhooks (``[cluster]``).

Every record becomes one stream entry (``XADD key MAXLEN ~ N * record <json>
status <status>``), batched: records put within ``flush_interval`` go in one
pipelined round trip. Consumers read with consumer groups (``XREADGROUP``),
so several readers share the stream and each entry is acknowledged once.

:meth:`RedisStreamSink.put` never raises and never waits (the engine's
listener calls it). While Redis is unreachable the records wait in memory,
up to ``max_pending`` (then the oldest are dropped and counted in
``dropped``): the durable record of every outcome is the node's accounting
log and the webhook outbox, not this stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import Any

import msgspec

from fastmta.delivery.cluster.node import redis_client
from fastmta.queue.records import Outcome

log = logging.getLogger("fastmta.serve.events")

__all__ = ["RedisStreamSink"]


class RedisStreamSink:
    """Records in, batched XADDs out. ``put`` any time; ``await start()``; ``await close()`` at the end."""

    def __init__(self, url: str = "", *, key: str = "fastmta:events", maxlen: int = 1_000_000,
                 flush_interval: float = 0.05, batch: int = 1000, max_pending: int = 100_000,
                 retry: float = 1.0, client: Any = None) -> None:  # fmt: skip
        self.client = client if client is not None else redis_client(url, 2.0)
        self.key = key
        self.maxlen = maxlen
        self.flush_interval = flush_interval
        self.batch = batch
        self.retry = retry
        self._pending: deque[tuple[bytes, bytes]] = deque(maxlen=max_pending)
        self._encode = msgspec.json.Encoder().encode
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.sent = 0
        self.dropped = 0
        self.round_trips = 0
        self.failing = False  # the last XADD batch failed (for the metrics)

    def put(self, record: dict[str, Any]) -> None:
        """Queue *record*. Never raises, never waits."""
        try:
            blob = self._encode(record)
        except (TypeError, ValueError, OverflowError) as exc:
            self.dropped += 1
            log.error("redis events: record %s cannot be encoded: %s", record.get("message_id"), exc)
            return
        if len(self._pending) == self._pending.maxlen:
            self.dropped += 1  # the deque drops the oldest
        status = record.get("status")
        self._pending.append((blob, status.encode() if isinstance(status, str) else b""))
        if self._wake is not None and (len(self._pending) == 1 or len(self._pending) >= self.batch):
            self._wake.set()

    def on_outcome(self, outcome: Outcome) -> None:
        """An ``Engine.add_listener`` callback: queue the outcome's accounting record."""
        self.put(outcome.as_record())

    async def start(self) -> None:
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.create_task(self._loop(), name="fastmta-events-redis")

    async def _loop(self) -> None:
        assert self._wake is not None
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
            if len(self._pending) < self.batch and not self._closing:
                await asyncio.sleep(self.flush_interval)
            if not await self.flush():
                if self._closing:
                    return
                await asyncio.sleep(self.retry)

    async def flush(self) -> bool:
        """Send one batch of what waits; False when Redis did not take it (it stays queued)."""
        chunk = [self._pending[i] for i in range(min(self.batch, len(self._pending)))]
        if not chunk:
            return True
        pipe = self.client.pipeline(transaction=False)
        for blob, status in chunk:
            pipe.xadd(self.key, {b"record": blob, b"status": status}, maxlen=self.maxlen, approximate=True)
        try:
            self.round_trips += 1
            await pipe.execute()
        except Exception as exc:
            if not self.failing:
                log.warning("redis events: XADD failed (%s: %s); records wait in memory", type(exc).__name__, exc)
            self.failing = True
            return False
        self.failing = False
        for _ in chunk:
            self._pending.popleft()
        self.sent += len(chunk)
        return True

    async def close(self, timeout: float = 10.0) -> None:
        """Send what waits (for up to *timeout* seconds), then stop and close the client."""
        self._closing = True
        if self._task is not None:
            assert self._wake is not None
            self._wake.set()
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        if self._pending:
            log.warning("redis events: %d record(s) not sent at close", len(self._pending))
        with contextlib.suppress(Exception):
            await self.client.aclose()
