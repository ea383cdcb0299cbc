"""Offering load in one event loop: hand messages to C connections, closed loop or open loop.

Two ways to offer load:

* **Closed loop** (no ``rate``): C connections, each keeping ``depth``
  transactions in flight so that with PIPELINING the next envelope rides with
  the previous message's content (one round trip per message). Throughput is
  whatever the server (or the client) sustains.
* **Open loop** (``rate`` messages/s, optionally ramped up from 0 over
  ``ramp`` seconds): message *i* is *due* at a fixed, precomputed time. Due
  messages wait for a free slot on one of the C connections. Every latency is
  measured from the message's **intended** send time, not from when a
  connection got around to it, so a stalled server shows up as a latency
  spike for every message it delayed instead of disappearing from the
  figures (the "coordinated omission" HdrHistogram's author describes).

Either runs for a count (``messages``) or a duration (``duration``), or both
(whichever ends first). ``_Source`` decides which message goes next and when
(both loops); ``_Driver`` keeps one connection's slots full; :func:`run_load`
opens the connections and assembles the report. The timestamps and counts
come from :mod:`fastmta.load.measure` (``_TimedConnection``, ``_Recorder``:
package-internal, shared only by these two modules).

Everything is bounded: an overall timeout, per-reply timeouts, and a cap on
consecutive connection failures per connection slot, so a server that is
down, refuses, tarpits or answers garbage yields a report, never a hang.
"""

from __future__ import annotations

import asyncio
import math
import ssl
import time
from collections import deque
from collections.abc import Callable
from time import perf_counter

from fastmta.errors import ConnectError
from fastmta.load.measure import _Msg, _Recorder, _TimedConnection
from fastmta.load.report import LoadResult, Progress
from fastmta.load.spec import LoadSpec
from fastmta.load.workload import Workload
from fastmta.smtp.connection import SessionRefused, Timeouts
from fastmta.smtp.protocol import TLSPolicy, TransactionResult


class _Source:
    """Hands out message indexes: at once (closed loop) or when due (open loop)."""

    def __init__(self, spec: LoadSpec, t0: float, loop: asyncio.AbstractEventLoop) -> None:
        self.spec = spec
        self.t0 = t0
        self.loop = loop
        self.limit = spec.messages if spec.messages is not None else 1 << 62
        self.stop_at = t0 + spec.duration if spec.duration is not None else math.inf
        self.next = 0  # next index to hand out
        self.released = 0  # open loop: indexes below this are due
        self.finished = False  # nothing more will be released
        self.hungry: deque[_Driver] = deque()  # connections with a free slot, waiting for a due message
        self.work = asyncio.Event()
        rate = spec.rate or 1.0
        self.rate = rate
        self.ramp = spec.ramp
        self.ramp_messages = rate * spec.ramp / 2  # messages due during the linear ramp 0 -> rate

    def offset(self, i: int) -> float:
        """Seconds after t0 at which message *i* is due (open loop)."""
        if i < self.ramp_messages:
            # Rate grows linearly over the ramp: due count n(t) = rate t^2 / (2 ramp).
            return math.sqrt(2 * self.ramp * i / self.rate)
        return self.ramp + (i - self.ramp_messages) / self.rate

    def claim(self, now: float) -> int:
        """The next index to send now, or -1."""
        i = self.next
        if self.spec.rate is not None:
            if i < self.released:
                self.next = i + 1
                return i
            return -1
        if self.finished:
            return -1
        if i >= self.limit or now >= self.stop_at:
            self.finish()
            return -1
        self.next = i + 1
        return i

    def intended(self, i: int, now: float) -> float:
        return self.t0 + self.offset(i) if self.spec.rate is not None else now

    @property
    def exhausted(self) -> bool:
        if self.spec.rate is not None:
            return self.finished and self.next >= self.released
        return self.finished or self.next >= self.limit or perf_counter() >= self.stop_at

    @property
    def unsent(self) -> int:
        if self.spec.rate is not None:
            return self.released - self.next
        return max(0, self.limit - self.next) if self.spec.messages is not None and self.spec.duration is None else 0

    def finish(self) -> None:
        if not self.finished:
            self.finished = True
            self.work.set()
            self.loop.call_soon(self.wake)  # not from inside a claim: drivers must not re-enter

    def wake(self) -> None:
        """Give due messages to waiting connections, one each in turn."""
        hungry = self.hungry
        while hungry and (self.next < self.released or self.finished):
            driver = hungry.popleft()
            driver.waiting = False
            driver.top_up(1)
        if self.next < self.released:
            self.work.set()  # more due than free slots: wake workers that have no connection yet

    async def wait_for_work(self) -> None:
        while not (self.next < self.released or self.finished or self.spec.rate is None):
            self.work.clear()
            await self.work.wait()

    async def schedule(self) -> None:
        """Open loop: release messages at their due times until the count or the duration ends."""
        i = 0
        while i < self.limit:
            due = self.t0 + self.offset(i)
            if due >= self.stop_at:
                break
            now = perf_counter()
            if due > now:
                # At least 1 ms: uvloop's timers count whole milliseconds, so a
                # shorter sleep returns at once and the scheduler would spin.
                # Messages due within that millisecond go out together.
                await asyncio.sleep(max(due - now, 0.001))
                now = perf_counter()
            while i < self.limit:
                due = self.t0 + self.offset(i)
                if due > now or due >= self.stop_at:
                    break
                i += 1
            self.released = i
            self.wake()
        self.finish()


class _Driver:
    """One connection's share of the work: keep ``depth`` transactions in flight.

    Driven by future callbacks rather than one await per message: the next
    transaction is queued from the completion callback, in the same loop
    iteration that read the reply, so it rides in the same write.
    """

    def __init__(self, conn: _TimedConnection, source: _Source, recorder: _Recorder, workload: Workload) -> None:
        self.conn = conn
        self.source = source
        self.recorder = recorder
        self.workload = workload
        self.depth = source.spec.depth
        self.limit = source.spec.messages_per_connection or 1 << 62
        self.inflight = 0
        self.sent = 0
        self.waiting = False
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def top_up(self, max_new: int = 1 << 30) -> None:
        conn = self.conn
        source = self.source
        taken = 0
        while self.inflight < self.depth and self.sent < self.limit and taken < max_new and conn.is_usable:
            now = perf_counter()
            i = source.claim(now)
            if i < 0:
                break
            msg = _Msg(i, source.intended(i, now), now)
            self.recorder.sent(msg)
            conn.send_timed(self.workload.transaction(i, msg), msg, self.finished)
            self.inflight += 1
            self.sent += 1
            taken += 1
        can_send = conn.is_usable and self.sent < self.limit
        if self.inflight == 0 and (not can_send or source.exhausted):
            if not self.done.done():
                self.done.set_result(None)
        elif can_send and self.inflight < self.depth and not source.exhausted and not self.waiting:
            self.waiting = True
            source.hungry.append(self)

    def finished(self, result: TransactionResult) -> None:
        self.inflight -= 1
        msg: _Msg = result.transaction.tag  # type: ignore[assignment]
        msg.done = True
        self.recorder.record(result, perf_counter())
        self.top_up()


async def run_load(
    spec: LoadSpec,
    progress: Callable[[Progress], None] | None = None,
    progress_interval: float = 0.5,
) -> LoadResult:
    """Run the load described by *spec*; always returns a report within its timeout (+ a few seconds)."""
    spec.check()
    workload = Workload(spec)
    timeouts = Timeouts.uniform(spec.reply_timeout)
    loop = asyncio.get_running_loop()
    if spec.start_at is not None:
        await asyncio.sleep(max(0.0, spec.start_at - time.time()))
    started = perf_counter()
    cpu_started = time.process_time()
    source = _Source(spec, started, loop)
    if spec.open_loop:
        # The rate is judged after the ramp, up to the last due time.
        last_due = source.offset(spec.messages - 1) + 1 / source.rate if spec.messages is not None else math.inf
        end = min(spec.duration if spec.duration is not None else math.inf, last_due)
        window = (started + spec.ramp, started + max(end, spec.ramp))
    else:
        window = (started, started)
    recorder = _Recorder(spec, started, window)
    recorder.result.workload = {
        "size": str(spec.size), "recipients": spec.recipients, "domains": spec.domains, "depth": spec.depth,
        "messages_per_connection": spec.messages_per_connection, "pipelining": spec.pipelining,
        "bdat": spec.use_bdat, "starttls": spec.tls.value, "body": workload.describe(),
    }
    connections: set[_TimedConnection] = set()
    # Built once: loading the CA store takes tens of milliseconds, which would
    # otherwise be charged to every connection's "connect" phase.
    tls_context = _insecure_tls() if spec.tls is not TLSPolicy.NEVER else None

    async def worker() -> None:
        failures = 0
        while True:
            await source.wait_for_work()
            if source.exhausted:
                return
            t_open = perf_counter()
            try:
                conn = await _TimedConnection.open(
                    spec.host, spec.port, helo_name=spec.helo_name, source_address=spec.source_address,
                    timeouts=timeouts, pipelining=spec.pipelining, use_bdat=spec.use_bdat, tls=spec.tls,
                    tls_context=tls_context,
                )
            except ConnectError as exc:
                recorder.connect_failed(str(exc.reply) if isinstance(exc, SessionRefused) else str(exc))
                failures += 1
                if failures >= spec.max_connect_failures:
                    return
                await asyncio.sleep(min(0.05 * 2**failures, 1.0))
                continue
            assert isinstance(conn, _TimedConnection)
            recorder.session(t_open, conn, perf_counter())
            failures = 0
            connections.add(conn)
            driver = _Driver(conn, source, recorder, workload)
            driver.top_up()
            try:
                await driver.done
            finally:
                connections.discard(conn)
                await conn.quit()

    async def reporter() -> None:
        assert progress is not None
        while True:
            await asyncio.sleep(progress_interval)
            progress(recorder.progress(perf_counter(), cpu_started))

    reporter_task = asyncio.ensure_future(reporter()) if progress is not None else None
    scheduler = asyncio.ensure_future(source.schedule()) if spec.open_loop else None
    n_workers = spec.connections if spec.messages is None else min(spec.connections, max(spec.messages, 1))
    workers = [asyncio.ensure_future(worker()) for _ in range(n_workers)]
    try:
        done, pending = await asyncio.wait(workers, timeout=max(0.0, spec.effective_timeout()))
        if pending:
            recorder.result.timed_out = True
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=5.0)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                exc = task.exception()
                recorder.errors[f"{type(exc).__name__}: {exc}"] += 1
    finally:
        for extra in (reporter_task, scheduler):
            if extra is not None:
                extra.cancel()
        for conn in list(connections):
            conn.close()  # whatever is still open after the grace period: in-flight messages fail
    await asyncio.sleep(0)  # let the aborted transactions' callbacks record their outcome
    recorder.result.messages_unsent = source.unsent
    return recorder.finish(started, cpu_started)


def _insecure_tls() -> ssl.SSLContext:
    """Load tests talk to test servers with self-signed certificates: encrypt, do not verify."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx
