"""The asyncio shell around the sans-IO client protocol.

One :class:`SMTPConnection` is one TCP connection to one server. It owns the
socket, the per-phase timeouts and the STARTTLS upgrade; every SMTP decision
is made by :class:`fastmta.smtp.protocol.ClientProtocol`. It is an
``asyncio.Protocol`` rather than a pair of streams: the hot path then costs one
callback per read and one ``write`` per pipelined group, with no intermediate
buffering or per-line awaits.

Several transactions may be in flight at once (``send()`` returns an awaitable
per transaction; ``send_with_callback()`` calls back from inside the read that
finished it, for callers that queue the next message right there, like
``fastmta load``); the protocol decides when each part is written, which is
how one connection gets one round trip per message.
"""

from __future__ import annotations

import asyncio
import errno
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Union, cast

from fastmta.errors import ConnectError, LocalShortage, ProtocolError
from fastmta.smtp.protocol import (
    ClientProtocol,
    Closed,
    Credentials,
    Event,
    Extensions,
    Phase,
    Ready,
    SessionFailed,
    StartTLS,
    TLSPolicy,
    Transaction,
    TransactionDone,
    TransactionResult,
)
from fastmta.smtp.reply import Reply

#: Connect errors that say this machine is short of something, not that the receiver failed.
_LOCAL_SHORTAGES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

#: Called with a transaction's result, from inside the read that completed it.
ResultCallback = Callable[[TransactionResult], None]
_Waiter = Union["asyncio.Future[TransactionResult]", ResultCallback]

#: Seconds a TLS connection being closed waits for the peer's close_notify before it is dropped.
TLS_CLOSE_GRACE = 2.0


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds to wait for each reply. Defaults: RFC 5321 section 4.5.3.2.

    ``data_block`` bounds how long a write may stay blocked by a server that
    stops reading (RFC 5321's "data block" timeout).
    """

    connect: float = 60.0
    greeting: float = 300.0
    ehlo: float = 300.0
    starttls: float = 120.0
    mail: float = 300.0
    rcpt: float = 300.0
    data: float = 120.0
    data_block: float = 180.0
    end_of_data: float = 600.0
    rset: float = 120.0
    quit: float = 60.0
    #: The reply to a MAIL pipelined right behind the end of DATA (RFC 2920), until the connection
    #: has answered one: some servers (chasquid) drop commands that
    #: arrive with the end of data and never answer them, and waiting ``mail`` (300 s) for that
    #: stalled the site. Cut short, the session fails at MAIL, the site gets one transaction at a time
    #: (``fastmta.delivery.batch.one_at_a_time``) and the message goes again at once. A server merely
    #: slower than this at MAIL costs a connection and its pipelining after the dot, nothing else.
    mail_after_data: float = 15.0

    def for_phase(self, phase: Phase) -> float:
        if phase is Phase.HELO or phase is Phase.AUTH:
            return self.ehlo
        if phase is Phase.BDAT:
            return self.end_of_data
        return cast(float, getattr(self, phase.value))

    def by_phase(self) -> dict[Phase, float]:
        """Every phase's timeout, for a dict lookup on the hot path."""
        return {phase: self.for_phase(phase) for phase in Phase}

    @classmethod
    def uniform(cls, seconds: float) -> Timeouts:
        """Every phase the same (tests, load generation)."""
        return cls(*([seconds] * 12))


class SMTPConnection(asyncio.Protocol):
    """A client SMTP session over asyncio. Create with :meth:`open`."""

    def __init__(
        self,
        protocol: ClientProtocol,
        timeouts: Timeouts,
        loop: asyncio.AbstractEventLoop,
        tls_context: ssl.SSLContext | None,
        server_hostname: str | None,
    ) -> None:
        self.protocol = protocol
        self.timeouts = timeouts
        self._loop = loop
        self._tls_context = tls_context
        self._server_hostname = server_hostname
        self._transport: asyncio.Transport | None = None
        self._ready: asyncio.Future[Extensions] = loop.create_future()
        self._closed: asyncio.Future[None] = loop.create_future()
        # id(transaction) -> (transaction, future or callback); the protocol reports results by transaction.
        self._waiters: dict[int, tuple[Transaction, _Waiter]] = {}
        self._woke_futures = False
        # Inside send_with_callback: a transaction refused on the spot (SIZE,
        # SMTPUTF8) is reported soon, not from within the call, or a caller
        # that queues the next one from its callback would recurse without end.
        self._in_send = False
        self._reading = False  # inside data_received's handling of a read
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # when self._timer fires
        self._deadline = 0.0
        self._deadline_replies = -1  # protocol.replies_received when the deadline was set
        self._guarding_mail = False  # the deadline is Timeouts.mail_after_data's
        self._write_paused = False
        self._write_paused_since = 0.0
        self._tls_handshake = False
        self._phase_timeouts = timeouts.by_phase()
        self._flush_scheduled = False
        self.failure: Reply | None = None
        #: The reply to the last EHLO (or HELO) of the session, once ready.
        self.ehlo_reply: Reply | None = None
        self.transactions = 0  # finished on this connection, for reuse limits
        self.peer: tuple[str, int] | None = None
        self.local: tuple[str, int] | None = None
        #: Run on the TLS session once STARTTLS completes: why the peer is refused, or None (DANE).
        self.tls_check: Callable[[ssl.SSLObject], str | None] | None = None

    # --- opening ------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        host: str,
        port: int = 25,
        *,
        helo_name: str = "localhost",
        source_address: str | None = None,
        timeouts: Timeouts | None = None,
        pipelining: bool = True,
        use_bdat: bool = True,
        tls: TLSPolicy = TLSPolicy.NEVER,
        tls_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        credentials: Credentials | None = None,
        tls_check: Callable[[ssl.SSLObject], str | None] | None = None,
    ) -> SMTPConnection:
        """Connect, read the greeting, say EHLO (and STARTTLS); return when ready.

        Raises ConnectError when the connection cannot be made, and
        ``SessionRefused`` (a ConnectError carrying the reply) when the server
        refuses the session (e.g. 421 or 554 greeting).
        """
        loop = asyncio.get_running_loop()
        timeouts = timeouts or Timeouts()
        if credentials is not None and credentials.tls_context is not None:
            tls_context = credentials.tls_context  # a relay's login: its certificate verified
        if tls is not TLSPolicy.NEVER and tls_context is None:
            tls_context = ssl.create_default_context()
        proto = ClientProtocol(helo_name, pipelining=pipelining, use_bdat=use_bdat, tls=tls, credentials=credentials)
        conn = cls(proto, timeouts, loop, tls_context, server_hostname or host)
        conn.tls_check = tls_check
        local_addr = (source_address, 0) if source_address else None
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: conn, host, port, local_addr=local_addr),
                timeouts.connect,
            )
        except TimeoutError as exc:
            raise ConnectError(f"connect to {host}:{port} timed out after {timeouts.connect:g}s") from exc
        except OSError as exc:
            # asyncio's message ("Connect call failed ...") hides the reason; errno has it.
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            kind = LocalShortage if exc.errno in _LOCAL_SHORTAGES else ConnectError
            raise kind(f"connect to {host}:{port} failed: {reason}") from exc
        try:
            await conn._ready
        except BaseException:
            conn.close()
            raise
        return conn

    # --- public API -----------------------------------------------------------

    @property
    def extensions(self) -> Extensions:
        return self.protocol.extensions

    @property
    def greeting(self) -> Reply | None:
        """The server's greeting (its banner), once received."""
        return self.protocol.greeting

    @property
    def is_usable(self) -> bool:
        return self.failure is None and self.protocol.is_ready and self._transport is not None

    @property
    def in_flight(self) -> int:
        return self.protocol.in_flight

    def send(self, transaction: Transaction) -> asyncio.Future[TransactionResult]:
        """Queue *transaction*; the future resolves to its result (never raises for SMTP failures)."""
        fut: asyncio.Future[TransactionResult] = self._loop.create_future()
        if not self._accepting():
            fut.set_result(self._refused(transaction))
            return fut
        self._waiters[id(transaction)] = (transaction, fut)
        self._handle(self.protocol.start_transaction(transaction))
        self._flush_soon()
        return fut

    def send_with_callback(self, transaction: Transaction, on_done: ResultCallback) -> None:
        """Queue *transaction*; call ``on_done(result)`` when it is finished.

        The callback runs inside the read that completed the transaction (no
        future, no extra loop iteration), and whatever it queues on this
        connection goes out in the same write: what a load generator wants.
        If the connection is already gone, ``on_done`` is called soon, never
        from inside this call.
        """
        if not self._accepting():
            self._loop.call_soon(on_done, self._refused(transaction))
            return
        self._waiters[id(transaction)] = (transaction, on_done)
        self._in_send = True
        try:
            self._handle(self.protocol.start_transaction(transaction))
        finally:
            self._in_send = False
        if not self._reading:  # from a result callback: data_received flushes right after
            self._flush_soon()

    def _accepting(self) -> bool:
        # Not after a failure, a lost transport or QUIT (the protocol would refuse it).
        return self.failure is None and self._transport is not None and self.protocol.accepts_transactions

    def _refused(self, transaction: Transaction) -> TransactionResult:
        return _failed(transaction, self.failure or Reply.local(451, "4.4.2", "connection is closed"))

    async def quit(self) -> None:
        """Say QUIT after what is queued, wait for the reply (bounded), close."""
        if self._transport is not None and self.failure is None and not self.protocol.is_closed:
            self._handle(self.protocol.quit())
            self._flush()
            try:
                await asyncio.wait_for(asyncio.shield(self._closed), self.timeouts.quit + 1)
            except TimeoutError:
                pass
        self.close()

    def close(self) -> None:
        """Drop the connection at once; pending transactions fail as transient."""
        self._close_transport()
        self._abort(Reply.local(451, "4.4.2", "connection closed by client"))

    def _close_transport(self) -> None:
        """Close the transport; over TLS, abort it unless the peer answers our close_notify soon.

        asyncio and uvloop wait up to 30 s for the peer's close_notify, the TCP
        connection open meanwhile. Exim, after its 421 "too many messages in
        this connection", sends none: each such session held one of its
        per-host connection slots for 30 s, and new connections were refused
        (50 of 300 messages expired where plain text delivered all in 1 s).
        """
        transport = self._transport
        if transport is None or transport.is_closing():
            return  # closed before (over TLS, its drop scheduled then): asyncio's TLS transport fails after
        tls = transport.get_extra_info("ssl_object") is not None
        transport.close()
        if tls:
            self._loop.call_later(TLS_CLOSE_GRACE, self._abort_if_open, transport)

    def tls_session(self) -> tuple[str, str] | None:
        """(TLS version, cipher) of the session now, or None in clear (for the accounting record)."""
        ssl_object = self._transport.get_extra_info("ssl_object") if self._transport is not None else None
        if ssl_object is None:
            return None
        cipher = ssl_object.cipher()
        return ssl_object.version() or "", cipher[0] if cipher else ""

    def _abort_if_open(self, transport: asyncio.Transport) -> None:
        if self._transport is transport:  # connection_lost has not come: the peer is not closing
            transport.abort()

    # --- asyncio.Protocol -----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self.peer = transport.get_extra_info("peername")
        self.local = transport.get_extra_info("sockname")
        self._arm()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.protocol.receive_data(data)
        except ProtocolError as exc:
            self._fail(Reply.local(451, "4.5.0", f"protocol error: {exc}"))
            return
        self._woke_futures = False
        self._reading = True
        try:
            self._handle(events)
        finally:
            self._reading = False
        if self._woke_futures:
            # Not written yet: the callers woken by these futures usually queue
            # the next transaction in this same loop iteration, and it then
            # rides in the same segment (one write per message instead of two).
            self._flush_soon()
        else:
            self._flush()  # callbacks have already queued theirs

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.protocol.is_closed:
            why = f": {exc}" if exc else ""
            if self._tls_handshake:
                # The TLS layer tears the connection down when the handshake fails
                # (bad certificate, no common cipher); say so, not "connection lost".
                self._abort(Reply.local(451, "4.7.5", f"TLS handshake failed{why}"))
            else:
                self._abort(Reply.local(451, "4.4.2", f"connection lost{why}"))
        if not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True
        self._write_paused_since = self._loop.time()
        self._arm()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._arm()

    # --- internals ----------------------------------------------------------

    def _flush_soon(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        data = self.protocol.data_to_send()
        if data and self._transport is not None and self.failure is None:
            self._transport.write(data)
        self._arm()

    def _handle(self, events: list[Event]) -> None:
        # Results are handed out after every event of the batch is taken in:
        # a callback may close the connection or queue more, and must find
        # the others' real results already claimed (not failed by the close)
        # and a session failure later in the batch already known.
        done: list[tuple[_Waiter, TransactionResult]] = []
        for event in events:
            if isinstance(event, TransactionDone):
                self.transactions += 1
                waiter = self._waiters.pop(id(event.result.transaction), None)
                if waiter is not None:
                    done.append((waiter[1], event.result))
            elif isinstance(event, Ready):
                self.ehlo_reply = event.ehlo_reply
                if not self._ready.done():
                    self._ready.set_result(event.extensions)
            elif isinstance(event, StartTLS):
                self._loop.create_task(self._start_tls())
            elif isinstance(event, SessionFailed):
                self.failure = event.reply
                if not self._ready.done():
                    self._ready.set_exception(SessionRefused(event.reply, event.phase))
                if self._transport is not None:
                    # Be polite when the server is still listening (not after 421), and only on a transport
                    # still open: one the peer reset mid-handshake raises on write (uvloop), and the waiters
                    # below were then never resolved.
                    if (event.reply.code != 421 and not event.reply.lines[0].startswith("4.4.")
                            and not self._transport.is_closing()):
                        self._transport.write(b"QUIT\r\n")
                    self._close_transport()
            elif isinstance(event, Closed):
                self._close_transport()
                if not self._closed.done():
                    self._closed.set_result(None)
        for claimed, result in done:
            self._resolve(claimed, result)

    def _resolve(self, waiter: _Waiter, result: TransactionResult) -> None:
        if isinstance(waiter, asyncio.Future):
            if not waiter.done():
                waiter.set_result(result)
                self._woke_futures = True
            return
        if self._in_send:
            self._loop.call_soon(waiter, result)
            return
        try:
            waiter(result)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:  # the caller's bug must not leave this session half-updated
            self._loop.call_exception_handler({
                "message": "exception in a transaction callback", "exception": exc, "protocol": self,
            })

    async def _start_tls(self) -> None:
        assert self._transport is not None and self._tls_context is not None
        self._tls_handshake = True
        try:
            new_transport = await asyncio.wait_for(
                self._loop.start_tls(self._transport, self, self._tls_context, server_hostname=self._server_hostname),
                self.timeouts.starttls,
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            self._fail(Reply.local(451, "4.7.5", f"TLS handshake failed: {str(exc) or type(exc).__name__}"))
            return
        finally:
            self._tls_handshake = False
        if new_transport is None:
            self._fail(Reply.local(451, "4.7.5", "TLS handshake failed: transport closed"))
            return
        self._transport = new_transport
        ssl_object = new_transport.get_extra_info("ssl_object")
        why = None if self.tls_check is None else (
            self.tls_check(ssl_object) if ssl_object is not None else "no TLS session to check")
        if why is not None:
            # Refused before anything is said over it (DANE: the certificate is not the one the DNS names).
            new_transport.write(b"QUIT\r\n")
            self._abort(Reply.local(451, "4.7.5", f"TLS peer refused: {why}"))
            self._close_transport()
            return
        self._handle(self.protocol.tls_established())
        self._flush()

    def _arm(self) -> None:
        """Keep one timer for the oldest awaited reply.

        A reply's deadline runs from the moment it became the oldest one
        awaited (the previous reply completed, or the command went out to an
        idle connection) and covers the *whole* reply: bytes that do not
        complete a reply do not extend it, so a peer trickling one byte a
        second cannot hold the connection. The deadline is a float stored on
        the hot path; the timer handle is re-created only when it would fire
        late (a shorter phase timeout than the one it was armed for) or when
        it fires early (the deadline moved on).
        """
        phase = self.protocol.waiting_for
        if phase is None and not self._write_paused:
            self._deadline = 0.0
            self._deadline_replies = -1
            return
        if self._write_paused:
            self._deadline = self._write_paused_since + self.timeouts.data_block
            self._deadline_replies = -1  # once writable again, the reply deadline starts afresh
        elif phase is not None:
            replies = self.protocol.replies_received
            if replies != self._deadline_replies or not self._deadline:
                timeout = self._phase_timeouts[phase]
                # A MAIL right behind an end of data, before this connection has answered one: see
                # Timeouts.mail_after_data. (Never over CHUNKING nor without PIPELINING: nothing
                # rides behind a dot there; nor a MAIL on an idle connection.)
                self._guarding_mail = (phase is Phase.MAIL and not self.protocol.dot_mails_answered
                                       and self.protocol.awaited_behind_dot)
                if self._guarding_mail:
                    timeout = min(timeout, self.timeouts.mail_after_data)
                self._deadline = self._loop.time() + timeout
                self._deadline_replies = replies
        if not self._deadline:
            return
        if self._timer is not None and self._deadline < self._timer_at:
            self._timer.cancel()
            self._timer = None
        if self._timer is None:
            self._timer_at = self._deadline
            self._timer = self._loop.call_at(self._deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if not self._deadline or self._transport is None:
            return
        now = self._loop.time()
        if now < self._deadline:
            self._timer_at = self._deadline
            self._timer = self._loop.call_at(self._deadline, self._on_timer)
            return
        phase = self.protocol.waiting_for
        if self._write_paused:
            what, seconds = "data block write", self.timeouts.data_block
        elif self._guarding_mail:
            what, seconds = "mail sent after the last transaction (commands pipelined after DATA dropped?)", \
                self.timeouts.mail_after_data
        else:
            what = phase.value if phase else "reply"
            seconds = self.timeouts.for_phase(phase) if phase else 0.0
        self._fail(Reply.local(451, "4.4.2", f"timeout after {seconds:g}s waiting for {what}"))

    def _fail(self, reply: Reply) -> None:
        self._abort(reply)
        if self._transport is not None:
            self._transport.abort()

    def _abort(self, reply: Reply) -> None:
        if self.failure is None:
            self.failure = reply
        self._handle(self.protocol.abort(reply))
        # The protocol failed everything it knew of; anything left is resolved here
        # so that no caller ever waits forever.
        waiters = list(self._waiters.values())
        self._waiters.clear()
        for transaction, waiter in waiters:
            self._resolve(waiter, _failed(transaction, reply))
        if not self._ready.done():
            self._ready.set_exception(SessionRefused(reply, self.protocol.waiting_for or Phase.GREETING))
            self._ready.exception()  # mark retrieved: open() may already be gone


def _failed(transaction: Transaction, error: Reply) -> TransactionResult:
    """The result of a transaction that never got its own replies."""
    return TransactionResult(transaction, rcpt_replies=[None] * len(transaction.recipients), error=error)


class SessionRefused(ConnectError):
    """The server refused or broke the session before it could carry mail."""

    def __init__(self, reply: Reply, phase: Phase) -> None:
        super().__init__(f"{phase.value}: {reply}", transient=not reply.is_permanent)
        self.reply = reply
        self.phase = phase
