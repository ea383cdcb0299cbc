"""Pure-Python twin of ``_client.pyx``: the transaction half of the client state machine.

:class:`ProtocolCore` owns what happens once per message: matching replies to
the commands that caused them, queueing transactions, writing envelopes (all
of them at once with PIPELINING), the content after ``354``, RSET between
transactions and the QUIT behind the last one. Session set-up (greeting,
EHLO/HELO, STARTTLS) happens a few times per connection and lives once, in
:class:`fastmta.smtp.protocol.ClientProtocol`, a subclass of whichever core
``fastmta.smtp.protocol`` picked; the core calls its ``_on_session_reply`` for
every reply that does not belong to a transaction.

This twin is the test oracle and the fallback (``FASTMTA_NO_EXTENSIONS=1``):
every test of the client protocol runs against both.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from fastmta.errors import ProtocolError
from fastmta.smtp.model import (
    Body,
    Event,
    Extensions,
    Phase,
    SessionFailed,
    SessionState,
    Transaction,
    TransactionDone,
    TransactionResult,
)
from fastmta.smtp.reply import Reply, ReplyParser

__all__ = ["ProtocolCore", "ReplyParser"]


@dataclass(slots=True, eq=False)  # compared by identity: two equal envelopes are still two transactions
class _Txn:
    result: TransactionResult
    use_bdat: bool = False
    rcpt_sent: int = 0
    # What goes after DATA: the transaction's, or its 7-bit form (no 8BITMIME); set by _begin.
    body: Body = field(init=False)
    behind_dot: bool = False  # its MAIL went right behind another transaction's end of data

    @property
    def any_rcpt_accepted(self) -> bool:
        return any(r is not None and r.is_positive for r in self.result.rcpt_replies)


class ProtocolCore:
    """Transactions over one SMTP session; subclassed by ``ClientProtocol``."""

    def __init__(self, pipelining: bool, use_bdat: bool) -> None:
        self.allow_pipelining = pipelining
        self.allow_bdat = use_bdat
        self.extensions = Extensions()
        self.tls_active = False
        self._parser = ReplyParser()
        # Complete replies taken so far: the connection restarts its reply timer
        # only when this moves, so a peer trickling bytes cannot extend it.
        self.replies_received = 0
        self._state = SessionState.GREETING
        self._out = bytearray()
        self._events: list[Event] = []
        # FIFO of (phase, transaction or None, recipient index): one per reply we await.
        self._expect: deque[tuple[Phase, _Txn | None, int]] = deque([(Phase.GREETING, None, 0)])
        self._unsent = 0  # of them, how many (the last) await commands still in _out, not yet written
        self._content_out: list[TransactionResult] = []  # transactions whose content is in _out
        self._queue: deque[_Txn] = deque()  # accepted by start_transaction, envelope not yet sent
        self._active: deque[_Txn] = deque()  # envelope sent, final reply pending
        # The transaction whose envelope is out but whose content is not; while it
        # exists nothing else may be written (the server is between MAIL and DATA).
        self._open: _Txn | None = None
        self._rset_needed = False
        self._rset_waiting = False  # without PIPELINING: an RSET written, its reply not in yet
        self._bdat_active = 0  # BDAT transactions in self._active
        self._quit_requested = False
        # Replies to a MAIL sent right behind an end of data (RFC 2920): some servers drop such
        # commands; the connection waits less for the first one (SMTPConnection, Timeouts.mail_after_data).
        self.dot_mails_answered = 0

    # --- queries ------------------------------------------------------------

    @property
    def awaited_behind_dot(self) -> bool:
        """Whether the oldest reply awaited is to a MAIL sent right behind an end of data."""
        if not self._expect:
            return False
        phase, txn, _ = self._expect[0]
        return phase is Phase.MAIL and txn is not None and txn.behind_dot

    @property
    def waiting_for(self) -> Phase | None:
        """The phase of the oldest reply we wait for (selects the timeout)."""
        return self._expect[0][0] if self._expect else None

    @property
    def is_ready(self) -> bool:
        return self._state == SessionState.READY

    @property
    def is_closed(self) -> bool:
        return self._state == SessionState.CLOSED

    @property
    def accepts_transactions(self) -> bool:
        """False once QUIT is queued or the session ended: start_transaction would refuse."""
        return self._state < SessionState.CLOSING

    @property
    def in_flight(self) -> int:
        """Transactions accepted and not yet finished."""
        return len(self._queue) + len(self._active)

    @property
    def pipelining(self) -> bool:
        return self.allow_pipelining and self.extensions.pipelining

    # --- input and output ---------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the server; return the events they caused.

        Raises ProtocolError on garbage or an unsolicited reply; the events of the replies before it
        are then :meth:`abort`'s to return.
        """
        try:
            replies = self._parser.feed(data)
        except ProtocolError as exc:
            self._take(exc.replies)  # what the server said before the garbage stands
            raise
        self._take(replies)
        return self._drain()

    def _take(self, replies: list[Reply]) -> None:
        self.replies_received += len(replies)
        for reply in replies:
            if len(self._expect) <= self._unsent:
                if reply.code == 421:  # the server closing (an idle timeout) whatever it was sent: no garbage
                    self._fail_session(reply, self._expect[0][0] if self._expect else Phase.QUIT)
                    break
                # Nothing written awaits a reply. A reply credited to a command still unwritten (the next
                # transaction's, begun by the reply before it in the same read) shifted every later reply
                # by one: a refused message recorded delivered, an accepted one bounced (on BDAT, where no
                # reply looks out of place).
                raise ProtocolError(f"unsolicited reply: {reply}" if not self._expect
                                    else f"reply before its command was sent: {reply}")
            phase, txn, index = self._expect.popleft()
            if reply.code == 421 and phase is not Phase.QUIT:
                # 421: the server is closing the channel (RFC 5321 3.8). Whatever
                # command it answers, the session is over.
                self._fail_session(reply, phase)
                break
            if txn is None:
                self._on_session_reply(reply, phase)
                if phase is Phase.RSET and self._rset_waiting:
                    self._rset_waiting = False
                    self._pump()
            else:
                if not _fits_phase(reply.code, phase):
                    raise ProtocolError(f"reply {reply.code} to {phase.value}: not a reply that command can have")
                self._on_txn_reply(reply, phase, txn, index)

    def start_transaction(self, transaction: Transaction) -> list[Event]:
        """Queue a transaction; its result arrives later as TransactionDone."""
        if self._state >= SessionState.CLOSING:
            raise ProtocolError("session is closing; no new transactions")
        self._queue.append(_Txn(TransactionResult(transaction, rcpt_replies=[None] * len(transaction.recipients))))
        if self._state == SessionState.READY:
            self._pump()
        return self._drain()

    def data_to_send(self) -> bytes:
        """Bytes to write now; everything produced since the last call, in one write."""
        if not self._out:
            return b""
        out = bytes(self._out)
        self._out.clear()
        self._unsent = 0
        for result in self._content_out:  # handed out now (set earlier, a failure before the write said "may
            result.content_sent = True  # have been delivered" of a message the server never saw)
        self._content_out.clear()
        return out

    # --- for the session half (ClientProtocol) --------------------------------

    def _on_session_reply(self, reply: Reply, phase: Phase) -> None:
        raise NotImplementedError  # ClientProtocol handles greeting, EHLO, STARTTLS, RSET, QUIT

    def _drain(self) -> list[Event]:
        events = self._events
        self._events = []
        return events

    def _send(self, line: bytes, phase: Phase) -> None:
        """Write a session command (EHLO, STARTTLS, QUIT, ...) and await its reply."""
        self._out += line
        self._expect.append((phase, None, 0))
        self._unsent += 1

    def _set_extensions(self, extensions: Extensions) -> None:
        self.extensions = extensions

    def _fail_session(self, reply: Reply, phase: Phase) -> None:
        self._state = SessionState.CLOSED
        self._expect.clear()
        self._unsent = 0
        self._content_out.clear()
        self._open = None
        pending = list(self._active) + list(self._queue)
        self._active.clear()
        self._bdat_active = 0
        self._queue.clear()
        for txn in pending:
            txn.result.error = reply
            txn.result.error_phase = phase
            self._events.append(TransactionDone(txn.result))
        self._events.append(SessionFailed(reply, phase))

    def _pump(self) -> None:
        """Write the next queued envelopes if the session allows it now."""
        while self._queue and self._state == SessionState.READY and self._open is None:
            if not self.pipelining and (self._active or self._rset_waiting):
                return  # lock-step: one transaction (or the RSET before it) at a time
            if self._bdat_active:
                return  # a BDAT transaction's outcome decides whether RSET is needed
            if self._rset_needed and not self.pipelining:
                # The next MAIL waits for RSET's reply (RFC 5321 4.1.4, RFC 2920 3): Exim and
                # OpenSMTPD end a session that sends both in one write when it never offered PIPELINING.
                self._rset_needed = False
                self._rset_waiting = True
                self._send(b"RSET\r\n", Phase.RSET)
                return
            self._begin(self._queue.popleft())
        self._maybe_quit()

    def _maybe_quit(self) -> None:
        if self._quit_requested and self._state == SessionState.READY and not self._queue and self._open is None:
            if not self.pipelining and (self._active or self._rset_waiting):
                return
            self._state = SessionState.CLOSING
            self._send(b"QUIT\r\n", Phase.QUIT)

    # --- transactions -------------------------------------------------------

    def _expect_txn(self, line: bytes, phase: Phase, txn: _Txn, index: int = 0) -> None:
        self._out += line
        self._expect.append((phase, txn, index))
        self._unsent += 1

    def _begin(self, txn: _Txn) -> None:
        """Write the envelope of *txn* (all of it if pipelining), or refuse it locally."""
        t = txn.result.transaction
        ext = self.extensions
        utf8 = t.needs_smtputf8
        if utf8 and not ext.smtputf8:
            self._finish_local(txn, Reply.local(553, "5.6.7", "non-ASCII address and the server does not offer SMTPUTF8"))
            return
        use_bdat = self.allow_bdat and ext.chunking
        body = t.body
        if not ext.eightbitmime and body.eight_bit:
            body = body.seven_bit  # RFC 6152 3: never 8-bit octets to a server that did not offer 8BITMIME
        txn.body = body
        size = body.size
        if ext.size and size > ext.size:
            self._finish_local(txn, Reply.local(552, "5.3.4", f"message size {size} exceeds the server's SIZE limit {ext.size}"))
            return
        txn.use_bdat = use_bdat
        # Another transaction still awaits its final reply: this MAIL rides behind its end of data
        # (_pump begins one only once no DATA awaits its 354, and never behind a BDAT).
        txn.behind_dot = txn.result.behind_dot = bool(self._active)
        self._bdat_active += use_bdat
        if self._rset_needed:
            self._send(b"RSET\r\n", Phase.RSET)
            self._rset_needed = False
        params = b""
        if ext.size is not None:
            params += b" SIZE=%d" % size
        if body.eight_bit and ext.eightbitmime:
            params += b" BODY=8BITMIME"
        if utf8:
            params += b" SMTPUTF8"
        if t.dsn is not None and "DSN" in ext.keywords:  # RFC 3461: only to a server that offers DSN
            params += t.dsn.mail
        self._active.append(txn)
        self._expect_txn(b"MAIL FROM:<" + t.sender.encode() + b">" + params + b"\r\n", Phase.MAIL, txn)
        if self.pipelining:
            for i in range(len(t.recipients)):
                self._send_rcpt(txn, i)
            self._send_data_command(txn)

    def _send_rcpt(self, txn: _Txn, index: int) -> None:
        t = txn.result.transaction
        dsn = t.dsn.rcpts[index] if t.dsn is not None and "DSN" in self.extensions.keywords else b""
        self._expect_txn(b"RCPT TO:<" + t.recipients[index].encode() + b">" + dsn + b"\r\n", Phase.RCPT, txn, index)
        txn.rcpt_sent = index + 1

    def _send_data_command(self, txn: _Txn) -> None:
        if txn.use_bdat:
            payload = txn.body.bdat_wire
            self._expect_txn(b"BDAT %d LAST\r\n" % len(payload), Phase.BDAT, txn)
            self._out += payload
            self._content_out.append(txn.result)
        else:
            self._expect_txn(b"DATA\r\n", Phase.DATA, txn)
            self._open = txn

    def _on_txn_reply(self, reply: Reply, phase: Phase, txn: _Txn, index: int) -> None:
        result = txn.result
        if phase is Phase.MAIL:
            result.mail_reply = reply
            if txn.behind_dot:
                self.dot_mails_answered += 1
            if not self.pipelining:
                if reply.is_positive:
                    self._send_rcpt(txn, 0)
                else:
                    self._finish(txn)
        elif phase is Phase.RCPT:
            result.rcpt_replies[index] = reply
            if not self.pipelining and result.mail_reply is not None and result.mail_reply.is_positive:
                if txn.rcpt_sent < len(result.rcpt_replies):
                    self._send_rcpt(txn, txn.rcpt_sent)
                elif txn.any_rcpt_accepted:
                    self._send_data_command(txn)
                else:
                    self._rset_needed = True
                    self._finish(txn)
        elif phase is Phase.DATA:
            result.data_reply = reply
            self._open = None
            if reply.code == 354:
                # Content, dot and (via _pump) the next envelope: one write.
                if txn.any_rcpt_accepted:
                    self._out += txn.body.data_wire
                    self._content_out.append(result)
                else:
                    self._out += b".\r\n"  # a broken server said 354 with no recipients: end it empty
                self._expect.append((Phase.END_OF_DATA, txn, 0))
                self._unsent += 1
            else:
                if result.mail_reply is not None and result.mail_reply.is_positive:
                    self._rset_needed = True
                self._finish(txn)
        else:  # END_OF_DATA or BDAT
            result.final_reply = reply
            if phase is Phase.BDAT and not reply.is_positive and result.mail_reply is not None and result.mail_reply.is_positive:
                self._rset_needed = True
            self._finish(txn)
        self._pump()

    def _finish(self, txn: _Txn) -> None:
        active = self._active
        if active and active[0] is txn:  # replies come in order: nearly always the oldest
            active.popleft()
            self._bdat_active -= txn.use_bdat
        elif txn in active:
            active.remove(txn)
            self._bdat_active -= txn.use_bdat
        self._events.append(TransactionDone(txn.result))

    def _finish_local(self, txn: _Txn, reply: Reply) -> None:
        txn.result.error = reply
        txn.result.error_phase = Phase.MAIL
        self._events.append(TransactionDone(txn.result))


def _fits_phase(code: int, phase: Phase) -> bool:
    """Can a transaction command have this reply (RFC 5321 4.3.2)? DATA: 354 or a failure; the others: no 3yz.

    A server that says 250 to DATA has not taken the content, which was then never sent, and the
    recipient was recorded delivered; a 3yz elsewhere was taken for a bounce; an extra reply line
    shifts every later reply by one, and the first DATA it reaches shows it. Each is a protocol error:
    the session ends and its transactions are retried.
    """
    if phase is Phase.DATA:
        return code == 354 or code >= 400
    return code // 100 != 3
