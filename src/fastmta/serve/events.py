"""A durable webhook outbox: every accounting record, POSTed to HTTP endpoints in batches.

Why an outbox: a webhook that is down, slow or broken must neither lose
records nor slow delivery down. :meth:`EventOutbox.put` (called from the
engine's delivery path, see :meth:`EventOutbox.on_outcome`) only encodes the
record and appends it to a list: about 2 µs. A flusher task writes that list
to SQLite (``directory/events.sqlite``, WAL) in one transaction every
``flush_interval`` (50 ms) or ``flush_records`` records, on the outbox's own
worker thread, so the event loop never waits on the disk.

Each endpoint has a sender task and a *cursor*: the id of the last record it
acknowledged with a 2xx. It reads the records after its cursor in id order,
POSTs them as ``{"events": [...]}`` and moves the cursor only after a 2xx, so
every endpoint gets every record (matching its ``statuses`` filter) in order,
at least once, whatever the others do. A record is deleted once every
endpoint's cursor is past it. A new endpoint starts at the newest record (no
replay of history); the cursor of an endpoint no longer configured is
forgotten (and logged), so it cannot pin the table forever.

De-duplication: each event carries ``"event_id": "<outbox id>-<n>"`` (unique
for the life of the database, never reused), and each request the header
``X-Fastmta-Batch-Id: <outbox id>-<first n>-<last n>``, the same on every retry
of the same batch. A receiver that keeps the ids it has seen gets every
record exactly once. (A record's own ``event_id`` key, if any, is replaced.)

What a crash can lose: no outcome's record whose outcome is on disk. ``serve``
hooks :meth:`EventOutbox.before_journal` to the spool, whose writer stores the
pending records before each journal batch (the engine puts an outcome's record
in the same call that queues its journal record); an outcome not yet journaled
is delivered again after a restart, and makes a new record. The one exception:
a database that cannot be written in time (locked by another process, a disk
that stalls) is waited for ``commit.HOOK_WAIT`` once, then the journal goes on
without it for ``commit.HOOK_SKIP`` (logged): mail keeps flowing, and a crash in
that time may lose those events. Other records (what came back: complaints,
unsubscribes) wait at most ``flush_interval``, or the next journal batch. A
committed transaction survives a process crash. With ``fsync=False`` (SQLite's
``synchronous=NORMAL``, the default) a power loss or kernel crash may also
roll back the transactions since the last WAL checkpoint; ``fsync=True``
(``synchronous=FULL``) syncs every transaction instead. Every record is also
in the accounting file, and the outcome itself in the spool journal.

Failures: a connection error, a timeout, a 5xx, a 408 or a 429 is retried
after an exponential backoff (``initial_backoff`` doubling up to
``max_backoff``, ±20 % jitter; a ``Retry-After`` in seconds is honoured up to
``max_backoff``). Any other 4xx is counted as ``rejected``, logged as an
error and retried the same way: it is almost always the endpoint's
configuration (a wrong token or path) that an operator fixes, and dropping
the records would lose them for good. A 413 halves the batch first. What
bounds the disk is the outbox-wide ``max_rows`` and ``max_age``: the oldest
records beyond them are deleted even if an endpoint has not acknowledged
them, and each such endpoint's ``dropped`` count grows (kept in the database
across restarts, in :meth:`EventOutbox.stats` and the metrics, and logged as
an error each time): loudly, never silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import random
import secrets
import sqlite3
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import msgspec

from fastmta.errors import DamagedFile
from fastmta.queue.records import Outcome
from fastmta.serve.webhooks import EndpointStats, WebhookEndpoint

__all__ = ["EndpointStats", "EventOutbox", "WebhookEndpoint"]

log = logging.getLogger("fastmta.serve.events")

T = TypeVar("T")

#: Statuses that mean "try again later", not "this request is wrong".
_TRANSIENT_4XX = frozenset({408, 429})


class _Row(msgspec.Struct, array_like=True, frozen=True):
    id: int
    at: float
    body: bytes


class _Sender:
    """One endpoint's cursor, counters and task (loop thread only)."""

    def __init__(self, endpoint: WebhookEndpoint, acked: int, sent: int, dropped: int) -> None:
        self.endpoint = endpoint
        self.key = endpoint.label
        self.acked = acked
        self.statuses = tuple(endpoint.statuses) if endpoint.statuses is not None else None
        self.stats = EndpointStats(sent=sent, dropped=dropped)
        self.limit = endpoint.batch_size  # halved by a 413
        self.failures = 0  # consecutive
        self.wake = asyncio.Event()  # new records were stored
        self.task: asyncio.Task[None] | None = None
        headers = {"Content-Type": "application/json", "User-Agent": "fastmta", **endpoint.headers}
        if endpoint.token is not None:
            headers["Authorization"] = f"Bearer {endpoint.token}"
        self.headers = headers
        self.timeout = aiohttp.ClientTimeout(total=endpoint.timeout)


class EventOutbox:
    """Records in, batched HTTP POSTs out, through ``directory/events.sqlite``.

    Use from one event loop: :meth:`put` any time (before :meth:`start` too),
    ``await start()`` to begin sending, ``await close()`` at the end (after
    the engine is closed, so its last outcomes are in).
    """

    def __init__(
        self,
        directory: Path,
        endpoints: Sequence[WebhookEndpoint],
        *,
        max_rows: int = 1_000_000,
        max_age: float = 7 * 86400.0,
        flush_interval: float = 0.05,
        flush_records: int = 2000,
        fsync: bool = False,
    ) -> None:
        labels = [e.label for e in endpoints]
        if len(set(labels)) != len(labels):
            raise ValueError(f"webhook endpoints need distinct names (give each a name): {labels}")
        if max_rows < 1 or max_age <= 0 or flush_interval <= 0 or flush_records < 1:
            raise ValueError("max_rows, max_age, flush_interval and flush_records must be positive")
        self.directory = Path(directory)
        self.max_rows = max_rows
        self.max_age = max_age
        self.flush_interval = flush_interval
        self.flush_records = flush_records
        #: Records put() could not encode, or got after close() (each logged).
        self.refused = 0
        #: Records dropped from memory because the database could not be written (logged).
        self.unstored = 0
        self._encode = msgspec.json.Encoder().encode
        self._pending: list[tuple[int, float, str | None, bytes]] = []
        self._closed = False
        self._closing = False
        self._started = False
        self._wake: asyncio.Event | None = None
        self._stop: asyncio.Event | None = None
        self._flushed = asyncio.Event()  # set once the final flush is done
        self._flusher: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dropped_below = 0  # records up to this id were dropped from memory (the database failing)
        self._quiet_until = 0.0  # worker thread: no "cannot store" line before this (monotonic)
        self._session: aiohttp.ClientSession | None = None
        self._rng = random.Random()
        # One thread owns every SQLite call after __init__: ordered, and off the loop.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="fastmta-events")
        self._fsync = fsync
        self._db, self._lock_fd, self.outbox_id, last_id, cursors = self._open(endpoints)
        self._last_id = last_id  # the newest id given out (memory included)
        self._stored_id = last_id  # the newest id in the database (worker thread)
        self._senders = [_Sender(e, *cursors[e.label]) for e in endpoints]

    # --- opening (the constructor's thread; nothing else runs yet) ------------------------

    def _open(
        self, endpoints: Sequence[WebhookEndpoint]
    ) -> tuple[sqlite3.Connection, int, str, int, dict[str, tuple[int, int, int]]]:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o770)
        # Another process sending the same records would only duplicate them: refuse.
        lock_fd = os.open(self.directory / "events.lock", os.O_RDWR | os.O_CREAT, 0o660)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock_fd)
            raise RuntimeError(f"{self.directory}: the event outbox is in use by another process") from None
        path = self.directory / "events.sqlite"
        # Created here so it is never world-readable; SQLite gives -wal/-shm the same mode.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o660))
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={'FULL' if self._fsync else 'NORMAL'}")
            db.executescript("""
                CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, at REAL NOT NULL, status TEXT, body BLOB NOT NULL);
                CREATE TABLE IF NOT EXISTS cursors (endpoint TEXT PRIMARY KEY, acked INTEGER NOT NULL,
                                                    sent INTEGER NOT NULL DEFAULT 0, dropped INTEGER NOT NULL DEFAULT 0);
                CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            """)
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            outbox_id = meta.get("outbox_id") or secrets.token_hex(6)
            top = db.execute("SELECT max(id) FROM events").fetchone()[0] or 0
            last_id = max(int(meta.get("last_id", 0)), top)
            known = {k: (a, s, d) for k, a, s, d in db.execute("SELECT endpoint, acked, sent, dropped FROM cursors")}
            wanted = {e.label for e in endpoints}
            db.execute("BEGIN")
            db.execute("INSERT OR REPLACE INTO meta VALUES ('outbox_id', ?), ('last_id', ?)", (outbox_id, str(last_id)))
            for key in sorted(set(known) - wanted):
                log.warning("event outbox %s: endpoint %r is no longer configured; its cursor is removed", path, key)
                db.execute("DELETE FROM cursors WHERE endpoint = ?", (key,))
            for key in sorted(wanted - set(known)):
                db.execute("INSERT INTO cursors (endpoint, acked) VALUES (?, ?)", (key, last_id))
                known[key] = (last_id, 0, 0)
            db.execute("COMMIT")
        except BaseException as exc:
            db.close()
            os.close(lock_fd)
            if isinstance(exc, sqlite3.DatabaseError):
                raise DamagedFile(f"{path}: {exc} (the webhook outbox; move it aside to start afresh: "
                                  "events not yet delivered are then not sent)") from None
            raise
        return db, lock_fd, outbox_id, last_id, {k: known[k] for k in wanted}

    # --- taking records (loop thread) ----------------------------------------------------

    def put(self, record: dict[str, Any]) -> None:
        """Queue *record* for every endpoint. Never raises, never waits."""
        if self._closed:
            self.refused += 1
            log.error("event outbox closed: record %s not queued", record.get("message_id"))
            return
        if "event_id" in record:  # ours is spliced in when sent
            record = {k: v for k, v in record.items() if k != "event_id"}
        try:
            blob = self._encode(record)
        except (TypeError, ValueError, OverflowError) as exc:
            self.refused += 1
            log.error("event outbox: record %s cannot be encoded as JSON: %s", record.get("message_id"), exc)
            return
        status = record.get("status")
        self._last_id += 1
        self._pending.append((self._last_id, time.time(), status if isinstance(status, str) else None, blob))
        n = len(self._pending)
        if (n == 1 or n >= self.flush_records) and self._wake is not None:
            self._wake.set()  # the first starts the flush_interval clock; a full batch goes now

    def before_journal(self) -> Future[None] | None:
        """A spool hook (``Spool.before_commit``): store the records put so far before the journal batch.

        The engine puts an outcome's record here in the same call that queues its
        journal record, so every outcome in the batch has its event stored first:
        a crash can no longer leave an outcome on disk without its event (a kill -9
        lost the events of the last ``flush_interval``, outcomes journaled). The
        spool's writer thread waits for this insert, not the event loop.
        """
        if not self._pending or self._closing or self._loop is None:
            return None
        batch, self._pending = self._pending, []
        return self._executor.submit(self._insert_or_return, batch, self._loop, self._dropped_below)

    def on_outcome(self, outcome: Outcome) -> None:
        """An :meth:`Engine.add_listener` callback: queue the outcome's accounting record."""
        self.put(outcome.as_record())

    # --- introspection --------------------------------------------------------------------

    def backlog(self) -> dict[str, int]:
        """Records each endpoint has not acknowledged yet, by endpoint label."""
        return {s.key: max(0, self._last_id - s.acked) for s in self._senders}

    def stats(self) -> dict[str, EndpointStats]:
        """Each endpoint's counters, by endpoint label (backlog filled in)."""
        for s in self._senders:
            s.stats.backlog = max(0, self._last_id - s.acked)
        return {s.key: s.stats for s in self._senders}

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        if self._closed:
            raise RuntimeError("event outbox is closed")
        self._started = True
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._session = aiohttp.ClientSession()
        self._flusher = asyncio.create_task(self._flush_loop(), name="fastmta-events-flush")
        for s in self._senders:
            s.task = asyncio.create_task(self._send_loop(s), name=f"fastmta-events-{s.key}")

    async def close(self, timeout: float = 10.0) -> None:
        """Store every record, give the senders up to *timeout* seconds to send them, stop.

        What is not acknowledged by then stays in the database for the next start.
        """
        if self._closed or self._closing:
            return
        self._closing = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            if self._flusher is not None:
                assert self._wake is not None and self._stop is not None
                self._wake.set()
                for s in self._senders:
                    s.wake.set()  # no more waiting for a full batch
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._flushed.wait()), max(0.0, deadline - loop.time()))
                tasks = [s.task for s in self._senders if s.task is not None]
                if tasks:
                    await asyncio.wait(tasks, timeout=max(0.0, deadline - loop.time()))
                self._stop.set()
                for t in [*tasks, self._flusher]:
                    t.cancel()
                await asyncio.gather(*tasks, self._flusher, return_exceptions=True)
            self._closed = True
            # Whatever is still in memory (the flusher was cut short, or never ran),
            # then delete what every endpoint has (the next start begins small).
            # Batches the journal's hook handed the worker are done, and any that failed is back in
            # memory (its _return ran on this loop) before what is in memory is taken.
            await self._run(lambda: None)
            await asyncio.sleep(0)
            await self._run(self._store_final, self._take_pending())
            await self._upkeep_now()
        finally:
            self._closed = True
            if self._session is not None:
                await self._session.close()
            await self._run(self._db.close)
            self._executor.shutdown(wait=True)
            os.close(self._lock_fd)

    async def __aenter__(self) -> EventOutbox:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # --- storing (flusher task on the loop, SQL on the worker thread) ------------------------

    async def _flush_loop(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        next_upkeep = loop.time() + 1.0
        retry_at, retry = 0.0, 0.0  # after a failed write
        while not self._closing:
            now = loop.time()
            if now >= next_upkeep:
                next_upkeep = now + 1.0
                await self._upkeep_now()
                continue
            if not self._pending:
                wait = next_upkeep - now
            elif len(self._pending) >= self.flush_records:
                wait = 0.0
            else:  # the oldest record waits at most flush_interval
                wait = self._pending[0][1] + self.flush_interval - time.time()
            wait = min(max(wait, retry_at - now), next_upkeep - now)
            if wait > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
                continue
            if await self._flush_pending():
                retry_at, retry = 0.0, 0.0
            else:
                retry = min(5.0, max(0.1, retry * 2))
                retry_at = loop.time() + retry
        # Closing: one last write (close() tries once more if this fails), then
        # the senders finish what is stored.
        await self._flush_pending()
        self._flushed.set()
        for s in self._senders:
            s.wake.set()  # a sender waiting for records learns there will be none

    async def _flush_pending(self) -> bool:
        """Write what put() queued; False (and kept, in order) if the database cannot be written."""
        if not self._pending:
            return True
        batch, self._pending = self._pending, []
        try:
            await self._run(self._insert, batch, self._dropped_below)
        except (sqlite3.Error, OSError) as exc:
            self._return(batch)
            log.error("event outbox %s: cannot store records: %s", self.directory, exc)
            return False
        self._wake_senders()
        return True

    def _return(self, batch: list[tuple[int, float, str | None, bytes]]) -> None:
        """Loop thread: *batch* could not be stored; back into memory, in id order, for the next try."""
        self._pending = sorted(batch + self._pending, key=lambda row: row[0])
        excess = len(self._pending) - self.max_rows  # memory is bounded too
        if excess > 0:
            self._dropped_below = self._pending[excess - 1][0]
            del self._pending[:excess]
            self.unstored += excess
            log.error("event outbox: %d records dropped from memory (the database cannot be written)", excess)
        if self._wake is not None:
            self._wake.set()  # the flusher's retry clock

    def _wake_senders(self) -> None:
        for s in self._senders:
            s.wake.set()

    def _insert_or_return(
        self, batch: list[tuple[int, float, str | None, bytes]], loop: asyncio.AbstractEventLoop, dropped_below: int,
    ) -> None:
        """Worker thread, for :meth:`before_journal`: store *batch*, or hand it back to the loop (never raises)."""
        try:
            self._insert(batch, dropped_below)
        except Exception as exc:  # whatever it is, the records go back to memory: never lost here
            now = time.monotonic()
            if now >= self._quiet_until:  # one line in 10 s: this runs before every journal batch
                self._quiet_until = now + 10.0
                log.error("event outbox %s: cannot store records (kept in memory, tried again): %s", self.directory, exc)
            loop.call_soon_threadsafe(self._return, batch)
            return
        loop.call_soon_threadsafe(self._wake_senders)

    async def _upkeep_now(self) -> None:
        try:
            filters = {s.key: s.statuses for s in self._senders}
            self._apply_cut(await self._run(self._upkeep, time.time(), filters))
        except (sqlite3.Error, OSError) as exc:
            log.error("event outbox %s: upkeep failed: %s", self.directory, exc)

    def _insert(self, batch: list[tuple[int, float, str | None, bytes]], dropped_below: int = 0) -> None:
        """Worker thread: append *batch* in one transaction.

        Ids go in without a gap: a sender's cursor moves past every id below the
        ones it read, so a batch whose predecessor failed (and went back to
        memory) must wait for it, not be stored first. (The one gap allowed:
        records up to *dropped_below*, dropped from memory by its bound.)
        """
        expected = max(self._stored_id, dropped_below) + 1
        if batch[0][0] != expected:
            raise sqlite3.OperationalError(f"records {expected}..{batch[0][0] - 1} are not stored yet")
        db = self._db
        db.execute("BEGIN")
        try:
            db.executemany("INSERT INTO events (id, at, status, body) VALUES (?, ?, ?, ?)", batch)
            db.execute("UPDATE meta SET value = ? WHERE key = 'last_id'", (str(batch[-1][0]),))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._stored_id = batch[-1][0]

    def _take_pending(self) -> list[tuple[int, float, str | None, bytes]]:
        batch, self._pending = self._pending, []
        return batch

    def _store_final(self, batch: list[tuple[int, float, str | None, bytes]]) -> None:
        """Worker thread, at close: store *batch* (what was in memory), or count it as unstored."""
        if batch:
            try:
                self._insert(batch, self._dropped_below)
            except (sqlite3.Error, OSError) as exc:
                self.unstored += len(batch)
                log.error("event outbox %s: %d records could not be stored at close: %s", self.directory, len(batch), exc)

    def _upkeep(self, now: float, filters: dict[str, tuple[str, ...] | None]) -> dict[str, tuple[int, int]]:
        """Worker thread: enforce max_rows / max_age, delete what every endpoint has acknowledged.

        Returns {endpoint: (new cursor, records dropped)} for the endpoints a cut passed.
        """
        db = self._db
        cursors = dict(db.execute("SELECT endpoint, acked FROM cursors").fetchall())
        low = min(cursors.values(), default=self._stored_id)
        # Ids are dense, so the table holds at most stored_id - low rows that matter.
        cut = self._stored_id - self.max_rows
        # Expired rows are the oldest: walk from the start until one is young enough.
        old = now - self.max_age
        for rid, at in db.execute("SELECT id, at FROM events WHERE id > ? ORDER BY id", (low,)):
            if at >= old:
                break
            cut = max(cut, rid)
        moved: dict[str, tuple[int, int]] = {}
        db.execute("BEGIN")
        try:
            for key, acked in cursors.items():
                if acked >= cut:
                    continue
                sql, args = "SELECT count(*) FROM events WHERE id > ? AND id <= ?", [acked, cut]
                statuses = filters.get(key)
                if statuses is not None:
                    sql += f" AND status IN ({','.join('?' * len(statuses))})"
                    args += statuses
                n = int(db.execute(sql, args).fetchone()[0])
                db.execute("UPDATE cursors SET acked = ?, dropped = dropped + ? WHERE endpoint = ?", (cut, n, key))
                moved[key] = (cut, n)
                cursors[key] = cut
            floor = min(cursors.values(), default=self._stored_id)
            db.execute("DELETE FROM events WHERE id <= ?", (floor,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return moved

    def _apply_cut(self, moved: dict[str, tuple[int, int]]) -> None:
        for s in self._senders:
            if s.key in moved:
                cut, n = moved[s.key]
                s.acked = max(s.acked, cut)
                s.stats.dropped += n
                if n:
                    log.error("event outbox: %d records for webhook %s were deleted unsent (max_rows=%d, max_age=%gs)",
                              n, s.key, self.max_rows, self.max_age)

    # --- sending (one task per endpoint) ---------------------------------------------------------

    def _read(self, after: int, limit: int, statuses: tuple[str, ...] | None) -> tuple[list[_Row], int]:
        """Worker thread: up to *limit* rows after *after*, and the id the cursor may move to once they are sent."""
        if statuses is None:
            rows = self._db.execute("SELECT id, at, body FROM events WHERE id > ? ORDER BY id LIMIT ?", (after, limit))
        else:
            marks = ",".join("?" * len(statuses))
            rows = self._db.execute(
                f"SELECT id, at, body FROM events WHERE id > ? AND status IN ({marks}) ORDER BY id LIMIT ?",
                (after, *statuses, limit),
            )
        out = [_Row(*r) for r in rows]
        # A short read saw every row up to what is stored (those not matching the filter are skipped too).
        return out, (out[-1].id if len(out) == limit else self._stored_id)

    def _ack(self, key: str, acked: int, sent: int) -> None:
        """Worker thread: move the endpoint's cursor (never back: an upkeep cut may have passed it)."""
        self._db.execute("UPDATE cursors SET acked = max(acked, ?), sent = sent + ? WHERE endpoint = ?", (acked, sent, key))

    async def _send_loop(self, s: _Sender) -> None:
        assert self._stop is not None
        ep = s.endpoint
        while True:
            try:
                s.wake.clear()
                rows, upto = await self._run(self._read, s.acked, s.limit, s.statuses)
                if not rows:
                    if upto > s.acked:  # only records this endpoint does not want
                        await self._run(self._ack, s.key, upto, 0)
                        s.acked = max(s.acked, upto)
                    if self._closing and self._flushed.is_set():
                        return  # all sent
                    await s.wake.wait()
                    continue
                if len(rows) < s.limit and not self._closing:
                    wait = min(ep.max_batch_delay, rows[0].at + ep.max_batch_delay - time.time())  # clock steps
                    if wait > 0:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(s.wake.wait(), wait)
                        continue  # read again: more may have come
                delay = await self._post(s, rows)
                if delay is None:
                    await self._run(self._ack, s.key, upto, len(rows))
                    s.acked = max(s.acked, upto)
                    continue
            except Exception as exc:  # the task must not die: log, wait, try again
                log.exception("event outbox: webhook %s: %s", s.key, exc)
                delay = 1.0
            # Wait out the backoff; only close() cuts it short (new records must not).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            if self._stop.is_set():
                return

    async def _post(self, s: _Sender, rows: list[_Row]) -> float | None:
        """POST one batch; None when acknowledged, else the seconds to wait before trying again."""
        assert self._session is not None
        ep = s.endpoint
        prefix = f'{{"event_id":"{self.outbox_id}-'.encode()
        parts = [
            prefix + b"%d" % r.id + (b'",' + r.body[1:] if len(r.body) > 2 else b'"}')
            for r in rows
        ]
        body = b'{"events":[' + b",".join(parts) + b"]}"
        headers = {**s.headers, "X-Fastmta-Batch-Id": f"{self.outbox_id}-{rows[0].id}-{rows[-1].id}"}
        retry_after: float | None = None
        try:
            async with self._session.post(ep.url, data=body, headers=headers, timeout=s.timeout,
                                          allow_redirects=False) as resp:
                status = resp.status
                if status in (429, 503):
                    retry_after = _seconds(resp.headers.get("Retry-After"))
                await resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return self._failed(s, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, False, None)
        if 200 <= status < 300:
            if s.failures:
                log.info("webhook %s: delivering again after %d failed attempts", s.key, s.failures)
            s.failures = 0
            s.stats.sent += len(rows)
            s.stats.batches += 1
            s.stats.last_success_at = time.time()
            if s.limit < ep.batch_size:
                s.limit = min(ep.batch_size, s.limit * 2)  # grow back after a 413
            return None
        if status == 413 and s.limit > 1:
            s.limit = max(1, len(rows) // 2)
            log.warning("webhook %s: 413 for %d records; batches of %d now", s.key, len(rows), s.limit)
            return 0.0
        rejected = 400 <= status < 500 and status not in _TRANSIENT_4XX
        return self._failed(s, f"HTTP {status}", rejected, retry_after)

    def _failed(self, s: _Sender, error: str, rejected: bool, retry_after: float | None) -> float:
        ep = s.endpoint
        s.failures += 1
        s.stats.failed_attempts += 1
        s.stats.rejected += rejected
        s.stats.last_error = error
        s.stats.last_error_at = time.time()
        delay = min(ep.max_backoff, ep.initial_backoff * 2.0 ** min(s.failures - 1, 60))
        delay *= 0.8 + 0.4 * self._rng.random()
        if retry_after is not None:
            delay = max(delay, min(retry_after, ep.max_backoff))
        # The first failure of a run, then every 10th: a webhook down for a day must not flood the log.
        level = logging.ERROR if rejected else logging.WARNING
        log.log(level if s.failures % 10 == 1 else logging.DEBUG,
                "webhook %s: %s (%s); attempt %d, retry in %.1fs", s.key, error,
                "the endpoint refuses the request: check its URL and credentials" if rejected else "will retry",
                s.failures, delay)
        return delay


def _seconds(value: str | None) -> float | None:
    """A Retry-After in seconds (the HTTP-date form is rare for webhooks: ignored)."""
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None
