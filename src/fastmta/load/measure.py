"""Measuring a load run: per-phase timestamps on each connection, and the recorder that counts outcomes.

What is measured (microseconds, in :class:`~fastmta.load.histogram.Histogram`\\ s):

=============  ===============================================================
``queue``      open loop: intended send time -> handed to a connection
``connect``    TCP connect (``connection_made``)
``greeting``   connected -> the server's greeting was read
``ehlo``       greeting -> session ready (EHLO, and STARTTLS + EHLO if used)
``envelope``   handed to the connection -> the 354 to DATA (MAIL, RCPTs, DATA)
``end_of_data`` 354 -> the reply to the final dot (BDAT: hand-over -> reply)
``message``    intended send time (closed loop: hand-over) -> final outcome
=============  ===============================================================

The connection only reports a transaction's final result, so the phase
boundaries inside a session are observed from outside: ``_TimedConnection``
overrides the public ``asyncio.Protocol`` callbacks of
:class:`~fastmta.smtp.connection.SMTPConnection`, stamps the clock when the TCP
connection is made, and after each read looks at which reply the protocol now
waits for (``ClientProtocol.waiting_for``). When that becomes END_OF_DATA, the
oldest unfinished transaction has just had its 354. Replies are FIFO on one
connection, so the oldest unfinished transaction is the one concerned. With
pipelining and ``depth`` > 1, a transaction's "envelope" includes the time it
waited behind the previous message on the same connection: that is when its
envelope could be written.

``_Recorder`` turns those timestamps and each transaction's result into the
counts, histograms and time series of a :class:`~fastmta.load.report.LoadResult`.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import Counter, deque
from time import perf_counter

from fastmta.load.histogram import Histogram
from fastmta.load.report import Interval, LoadResult, Progress
from fastmta.load.spec import LoadSpec
from fastmta.smtp.connection import ResultCallback, SMTPConnection, Timeouts
from fastmta.smtp.protocol import ClientProtocol, Phase, Transaction, TransactionResult


class _Msg:
    """Per-message timestamps (perf_counter seconds), carried as the transaction's tag."""

    __slots__ = ("done", "index", "intended", "t_env", "t_send")

    def __init__(self, index: int, intended: float, t_send: float) -> None:
        self.index = index
        self.intended = intended
        self.t_send = t_send
        self.t_env = 0.0
        self.done = False


class _TimedConnection(SMTPConnection):
    """An SMTPConnection that stamps session and transaction phase boundaries.

    Only public ``asyncio.Protocol`` callbacks and ``ClientProtocol.waiting_for``
    are used; see the module docstring for why this identifies the 354.
    """

    def __init__(
        self,
        protocol: ClientProtocol,
        timeouts: Timeouts,
        loop: asyncio.AbstractEventLoop,
        tls_context: ssl.SSLContext | None,
        server_hostname: str | None,
    ) -> None:
        super().__init__(protocol, timeouts, loop, tls_context, server_hostname)
        self.t_connected = 0.0
        self.t_greeting = 0.0
        self.timed: deque[_Msg] = deque()  # sent on this connection, oldest first

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t_connected = perf_counter()
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        # The time of the read, taken first: the completion callbacks and the
        # write of the content run inside super().data_received(), and are
        # not part of the wait for the 354.
        now = perf_counter()
        super().data_received(data)
        waiting = self.protocol.waiting_for
        if not self.t_greeting and waiting is not Phase.GREETING:
            self.t_greeting = now
        timed = self.timed
        while timed and timed[0].done:
            timed.popleft()
        if timed and waiting is Phase.END_OF_DATA and not timed[0].t_env:
            timed[0].t_env = now

    def send_timed(self, transaction: Transaction, msg: _Msg, on_done: ResultCallback) -> None:
        self.timed.append(msg)
        self.send_with_callback(transaction, on_done)


def _decisive_code(res: TransactionResult) -> int:
    if res.error is not None and res.final_reply is None:
        return res.error.code
    for reply in (res.mail_reply, *res.rcpt_replies, res.data_reply, res.final_reply):
        if reply is not None and not reply.is_positive:
            return reply.code
    return res.final_reply.code if res.final_reply is not None else 451


class _Recorder:
    """Counts outcomes and records latencies; everything a report needs."""

    def __init__(self, spec: LoadSpec, t0: float, window: tuple[float, float]) -> None:
        self.spec = spec
        self.t0 = t0
        self.inv_interval = 1.0 / spec.interval
        self.window_start, self.window_end = window
        self.result = LoadResult(
            target=f"{spec.host}:{spec.port}", messages_requested=spec.messages,
            mode="open" if spec.open_loop else "closed", connections=spec.connections,
            duration_s=spec.duration, rate_target=spec.rate, ramp_s=spec.ramp, interval_s=spec.interval,
        )
        self.replies: Counter[int] = Counter()
        self.errors: Counter[str] = Counter()
        self.by_code: Counter[int] = Counter()
        h = self.result.histograms
        self.h_queue, self.h_env, self.h_eod = h["queue"], h["envelope"], h["end_of_data"]
        self.series = self.result.series

    def interval(self, now: float) -> Interval:
        k = int((now - self.t0) * self.inv_interval)
        series = self.series
        if k >= len(series):
            series.extend(Interval() for _ in range(k + 1 - len(series)))
        return series[k if k >= 0 else 0]

    def sent(self, msg: _Msg) -> None:
        self.interval(msg.t_send).sent += 1
        if self.spec.open_loop:
            self.h_queue.record(int((msg.t_send - msg.intended) * 1e6))

    def session(self, t_open: float, conn: _TimedConnection, t_ready: float) -> None:
        h = self.result.histograms
        self.result.connections_opened += 1
        if conn.t_connected:
            h["connect"].record(int((conn.t_connected - t_open) * 1e6))
            if conn.t_greeting:
                h["greeting"].record(int((conn.t_greeting - conn.t_connected) * 1e6))
                h["ehlo"].record(int((t_ready - conn.t_greeting) * 1e6))

    def connect_failed(self, reason: str) -> None:
        self.result.connect_failures += 1
        self.errors[reason] += 1

    def record(self, res: TransactionResult, now: float) -> None:
        r = self.result
        r.messages_attempted += 1
        msg: _Msg = res.transaction.tag  # type: ignore[assignment]
        if res.error is not None and res.final_reply is None:
            self.errors[str(res.error)] += 1
        accepted = 0
        replies = self.replies
        for reply in res.recipient_replies():
            replies[reply.code] += 1
            if 200 <= reply.code < 300:
                accepted += 1
        r.recipients_accepted += accepted
        r.recipients_refused += len(res.transaction.recipients) - accepted
        iv = self.interval(now)
        iv.completed += 1
        if accepted:
            r.messages_accepted += 1
            iv.accepted += 1
        else:
            r.messages_failed += 1
            iv.failed += 1
            self.by_code[_decisive_code(res)] += 1
        iv.latency.record(int((now - msg.intended) * 1e6))
        if msg.t_env:
            self.h_env.record(int((msg.t_env - msg.t_send) * 1e6))
            if res.final_reply is not None:
                self.h_eod.record(int((now - msg.t_env) * 1e6))
        elif res.final_reply is not None:  # BDAT: no 354 to split at
            self.h_eod.record(int((now - msg.t_send) * 1e6))
        if self.window_start <= now <= self.window_end:
            r.completed_in_window += 1

    def finish(self, started: float, cpu_started: float) -> LoadResult:
        r = self.result
        r.elapsed_s = perf_counter() - started
        r.cpu_s = time.process_time() - cpu_started
        r.replies = {str(k): v for k, v in sorted(self.replies.items())}
        r.errors = dict(self.errors)
        r.errors_by_code = {str(k): v for k, v in sorted(self.by_code.items())}
        r.histograms["message"] = Histogram.merged(iv.latency for iv in r.series)
        r.rate_window_s = max(0.0, self.window_end - self.window_start) if self.spec.open_loop else 0.0
        r.derive()
        return r

    def progress(self, now: float, cpu_started: float) -> Progress:
        r = self.result
        k = int((now - self.t0) * self.inv_interval) - 1  # the last full interval
        last = self.series[k] if 0 <= k < len(self.series) else None
        if last is None and self.series:
            last = self.series[-1]
        pct = last.latency.percentiles((50.0, 99.0)) if last is not None else {50.0: 0, 99.0: 0}
        classes: Counter[str] = Counter()
        for code, n in self.replies.items():
            classes[f"{code // 100}xx"] += n
        return Progress(
            elapsed_s=now - self.t0, sent=sum(iv.sent for iv in self.series), completed=r.messages_attempted,
            accepted=r.messages_accepted, failed=r.messages_failed, requested=self.spec.messages,
            sent_per_s=(last.sent * self.inv_interval) if last is not None else 0.0, reply_classes=dict(classes),
            p50_ms=pct[50.0] / 1e3, p99_ms=pct[99.0] / 1e3, connect_failures=r.connect_failures,
            latency=last.latency if last is not None else None,
        )

