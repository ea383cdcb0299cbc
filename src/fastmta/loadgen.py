"""Load generation: send generated messages as fast as a server takes them.

The closed-loop first version of ``fastmta load``: C connections, each keeping
``depth`` transactions in flight so that with PIPELINING the next envelope
rides with the previous message's content (one round trip per message). The
same body object is reused for every message, so its wire encoding is
computed once; what remains per message is the protocol work itself, which is
what a load test of the *server* should spend client CPU on.

Everything is bounded: a message count, an overall timeout, and a cap on
consecutive connection failures per worker, so a server that is down,
refuses or tarpits yields a report instead of a hang.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from fastmta.connection import SessionRefused, SMTPConnection, Timeouts
from fastmta.errors import ConnectError
from fastmta.protocol import Body, TLSPolicy, Transaction, TransactionResult


@dataclass(frozen=True, slots=True)
class LoadSpec:
    host: str
    port: int
    messages: int = 10_000
    connections: int = 10
    size: int = 2048
    recipients: int = 1
    domains: int = 1
    timeout: float = 300.0
    depth: int = 2  # transactions in flight per connection
    messages_per_connection: int = 0  # 0: reuse the connection without limit
    pipelining: bool = True
    use_bdat: bool = False
    tls: TLSPolicy = TLSPolicy.NEVER
    helo_name: str = "load.fastmta.test"
    sender: str = "load@fastmta.test"
    source_address: str | None = None
    reply_timeout: float = 30.0
    max_connect_failures: int = 3


@dataclass(slots=True)
class LoadResult:
    """The report. ``messages_per_s`` counts messages accepted by the server."""

    target: str
    messages_requested: int
    messages_attempted: int = 0
    messages_accepted: int = 0
    recipients_accepted: int = 0
    recipients_refused: int = 0
    messages_failed: int = 0
    connections_opened: int = 0
    connect_failures: int = 0
    replies: dict[str, int] = field(default_factory=dict)  # final decisive reply per recipient, by code
    errors: dict[str, int] = field(default_factory=dict)  # session-level failures by reason
    elapsed_s: float = 0.0
    cpu_s: float = 0.0
    messages_per_s: float = 0.0
    cpu_us_per_message: float = 0.0
    timed_out: bool = False
    complete: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_message(size: int, sender: str = "load@fastmta.test", rcpt: str = "rcpt@load.test") -> bytes:
    """A plausible RFC 5322 message of about *size* bytes (at least its headers)."""
    head = (
        f"From: Load Test <{sender}>\r\n"
        f"To: <{rcpt}>\r\n"
        f"Subject: fastmta load test\r\n"
        f"Date: {email.utils.formatdate(localtime=False)}\r\n"
        f"Message-ID: {email.utils.make_msgid(domain='fastmta.test')}\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
    ).encode()
    line = b"The quick brown fox jumps over the lazy dog; 0123456789 abcdefghijklmnopq\r\n"  # 76 + CRLF
    body = bytearray()
    while len(head) + len(body) + len(line) <= size:
        body += line
    rest = size - len(head) - len(body)
    if rest > 2:
        body += b"x" * (rest - 2) + b"\r\n"
    return head + bytes(body)


class _Counters:
    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.next_index = 0
        self.result = LoadResult(target=f"{spec.host}:{spec.port}", messages_requested=spec.messages)
        self.replies: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()

    def claim(self) -> int | None:
        if self.next_index >= self.spec.messages:
            return None
        i = self.next_index
        self.next_index += 1
        return i

    def record(self, res: TransactionResult) -> None:
        r = self.result
        r.messages_attempted += 1
        if res.error is not None and res.final_reply is None:
            self.errors[str(res.error)] += 1
        accepted = 0
        for reply in res.recipient_replies():
            self.replies[str(reply.code)] += 1
            if reply.code // 100 == 2:
                accepted += 1
        r.recipients_accepted += accepted
        r.recipients_refused += len(res.transaction.recipients) - accepted
        if accepted:
            r.messages_accepted += 1
        else:
            r.messages_failed += 1


async def run_load(
    spec: LoadSpec,
    progress: Callable[[LoadResult], None] | None = None,
    progress_interval: float = 0.5,
) -> LoadResult:
    """Run the load described by *spec*; always returns a report within ``spec.timeout`` (+ a little)."""
    if spec.messages < 0 or spec.connections < 1 or spec.recipients < 1 or spec.domains < 1 or spec.depth < 1:
        raise ValueError("messages >= 0, connections, recipients, domains and depth >= 1 are required")
    counters = _Counters(spec)
    body = Body(make_message(spec.size, spec.sender))
    _ = (body.data_wire, body.bdat_wire)  # encode once, before the clock starts
    # Recipients are generated once: r<i>@d<j>.load.test, spread over the domains.
    pool_size = min(max(spec.messages, 1) * spec.recipients, 100_000)
    addresses = [f"r{i}@d{i % spec.domains}.load.test" for i in range(pool_size)]
    timeouts = Timeouts.uniform(spec.reply_timeout)

    def next_transaction(index: int) -> Transaction:
        start = (index * spec.recipients) % pool_size
        rcpts = addresses[start : start + spec.recipients]
        if len(rcpts) < spec.recipients:
            rcpts = rcpts + addresses[: spec.recipients - len(rcpts)]
        return Transaction(spec.sender, rcpts, body, index)

    async def worker() -> None:
        failures = 0
        while counters.next_index < spec.messages:
            try:
                conn = await SMTPConnection.open(
                    spec.host, spec.port, helo_name=spec.helo_name, source_address=spec.source_address,
                    timeouts=timeouts, pipelining=spec.pipelining, use_bdat=spec.use_bdat, tls=spec.tls,
                )
            except ConnectError as exc:
                counters.result.connect_failures += 1
                reason = str(exc.reply) if isinstance(exc, SessionRefused) else str(exc)
                counters.errors[reason] += 1
                failures += 1
                if failures >= spec.max_connect_failures:
                    return
                await asyncio.sleep(min(0.05 * 2**failures, 1.0))
                continue
            failures = 0
            counters.result.connections_opened += 1
            await _drive(conn)

    async def _drive(conn: SMTPConnection) -> None:
        """Keep ``depth`` transactions in flight on *conn* until the work or the connection ends.

        Driven by future callbacks rather than one await per message: the next
        transaction is queued from the completion callback, in the same loop
        iteration that read the reply, so it rides in the same write.
        """
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        inflight = 0
        sent = 0
        limit = spec.messages_per_connection or 1 << 62

        def top_up() -> None:
            nonlocal inflight, sent
            while inflight < spec.depth and sent < limit and conn.is_usable:
                index = counters.claim()
                if index is None:
                    break
                conn.send(next_transaction(index)).add_done_callback(finished)
                inflight += 1
                sent += 1
            if inflight == 0 and not done.done():
                done.set_result(None)

        def finished(fut: asyncio.Future[TransactionResult]) -> None:
            nonlocal inflight
            inflight -= 1
            counters.record(fut.result())
            top_up()

        top_up()
        try:
            await done
        finally:
            await conn.quit()

    async def reporter() -> None:
        while True:
            await asyncio.sleep(progress_interval)
            _finish(counters, started, cpu_started)
            if progress is not None:
                progress(counters.result)

    started = time.perf_counter()
    cpu_started = time.process_time()
    reporter_task = asyncio.ensure_future(reporter()) if progress is not None else None
    workers = [asyncio.ensure_future(worker()) for _ in range(min(spec.connections, max(spec.messages, 1)))]
    try:
        done, pending = await asyncio.wait(workers, timeout=spec.timeout)
        if pending:
            counters.result.timed_out = True
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=5.0)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                exc = task.exception()
                counters.errors[f"{type(exc).__name__}: {exc}"] += 1
    finally:
        if reporter_task is not None:
            reporter_task.cancel()
    _finish(counters, started, cpu_started)
    r = counters.result
    r.complete = not r.timed_out and r.messages_attempted == spec.messages and r.messages_failed == 0
    return r


def _finish(counters: _Counters, started: float, cpu_started: float) -> None:
    r = counters.result
    r.elapsed_s = time.perf_counter() - started
    r.cpu_s = time.process_time() - cpu_started
    r.messages_per_s = r.messages_accepted / r.elapsed_s if r.elapsed_s > 0 else 0.0
    r.cpu_us_per_message = r.cpu_s * 1e6 / r.messages_attempted if r.messages_attempted else 0.0
    r.replies = dict(counters.replies)
    r.errors = dict(counters.errors)
