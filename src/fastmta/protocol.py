"""Sans-IO SMTP client protocol (RFC 5321, RFC 2920 PIPELINING, RFC 3030 CHUNKING).

No sockets, no clocks, no event loop. The caller (``connection.py``, or a test)
feeds the bytes it read to :meth:`ClientProtocol.receive_data`, gets events
back, and writes whatever :meth:`ClientProtocol.data_to_send` returns. Modelled
on h11's split between protocol state and I/O.

How commands are paced (the reason this module exists; aiosmtplib cannot
pipeline):

* With PIPELINING, ``MAIL``, every ``RCPT`` and ``DATA`` go out in one write,
  and one read usually brings all their replies. When the ``354`` arrives, the
  message content, its terminating dot *and the next queued transaction's
  envelope* go out in one write, so a reused connection costs one round trip
  per message in the steady state (Postfix's smtp client does the same).
* With CHUNKING (and ``use_bdat``), ``BDAT <n> LAST`` and the content ride in
  the same write as the envelope: one round trip per message, no ``354``.
* Without PIPELINING every command waits for the previous reply (lock-step).

Every reply is matched to the command that caused it through a FIFO of
expectations, so a reply can never be credited to the wrong recipient. A reply
that arrives when nothing was asked, or bytes that are not a reply, raise
:class:`~fastmta.errors.ProtocolError`; the caller then calls :meth:`abort`.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

from fastmta import core
from fastmta.errors import InputError, ProtocolError
from fastmta.reply import Reply, ReplyParser


class Phase(str, Enum):
    """What a reply answers; also the key of the per-phase timeouts."""

    GREETING = "greeting"
    EHLO = "ehlo"
    HELO = "helo"
    STARTTLS = "starttls"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"
    END_OF_DATA = "end_of_data"
    BDAT = "bdat"
    RSET = "rset"
    QUIT = "quit"


class TLSPolicy(str, Enum):
    NEVER = "never"  # never send STARTTLS
    OPPORTUNISTIC = "opportunistic"  # use it when offered; carry on in clear if refused
    REQUIRED = "required"  # fail the session when it is not offered or refused


@dataclass(frozen=True, slots=True)
class Extensions:
    """What the server offered in its EHLO reply."""

    pipelining: bool = False
    size: int | None = None  # None: no SIZE; 0: SIZE without a limit
    eightbitmime: bool = False
    smtputf8: bool = False
    chunking: bool = False
    starttls: bool = False
    enhancedstatuscodes: bool = False
    keywords: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, reply: Reply) -> Extensions:
        keywords: dict[str, str] = {}
        for line in reply.lines[1:]:  # the first line is the server's name and greeting
            word, _, params = line.strip().partition(" ")
            if word:
                keywords[word.upper()] = params.strip()
        size: int | None = None
        if "SIZE" in keywords:
            raw = keywords["SIZE"]
            size = int(raw) if raw.isdigit() else 0
        return cls(
            pipelining="PIPELINING" in keywords,
            size=size,
            eightbitmime="8BITMIME" in keywords,
            smtputf8="SMTPUTF8" in keywords,
            chunking="CHUNKING" in keywords,
            starttls="STARTTLS" in keywords,
            enhancedstatuscodes="ENHANCEDSTATUSCODES" in keywords,
            keywords=keywords,
        )


class Body:
    """A message's content with its two wire forms computed once and cached.

    A load test or a campaign sends the same bytes many times; encoding them
    (CRLF normalization, dot-stuffing) once per body instead of once per
    transaction keeps that work off the hot path.
    """

    __slots__ = ("raw", "_data_wire", "_bdat_wire", "_eight_bit")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self._data_wire: bytes | None = None
        self._bdat_wire: bytes | None = None
        self._eight_bit: bool | None = None

    @property
    def data_wire(self) -> bytes:
        """Dot-stuffed, CRLF, terminated by ``.\\r\\n``: ready to follow a 354."""
        if self._data_wire is None:
            self._data_wire = core.to_wire(self.raw)
        return self._data_wire

    @property
    def bdat_wire(self) -> bytes:
        """CRLF-normalized, not stuffed: the payload of ``BDAT n LAST``."""
        if self._bdat_wire is None:
            self._bdat_wire = core.normalize_crlf(self.raw)
        return self._bdat_wire

    @property
    def eight_bit(self) -> bool:
        if self._eight_bit is None:
            self._eight_bit = not self.raw.isascii()
        return self._eight_bit

    def __len__(self) -> int:
        return len(self.raw)


_FORBIDDEN_IN_ADDRESS = re.compile(r"[\x00-\x1f\x7f<>]")


def check_address(address: str, what: str) -> None:
    # An address goes inside <...> on a command line: a CR, LF or NUL would end
    # the command and let the rest be read as a new one (SMTP injection), and
    # angle brackets would end the path early. Reject them; never "clean" them.
    bad = _FORBIDDEN_IN_ADDRESS.search(address)
    if bad is not None:
        raise InputError(f"{what} address {address!r} contains a forbidden character {bad.group()!r}")
    if len(address) > 512:
        raise InputError(f"{what} address longer than 512 characters")


@dataclass(slots=True)
class Transaction:
    """One envelope and its content. ``tag`` is the caller's, carried through."""

    sender: str
    recipients: Sequence[str]
    body: Body
    tag: object = None

    def __post_init__(self) -> None:
        if not self.recipients:
            raise InputError("a transaction needs at least one recipient")
        check_address(self.sender, "sender")
        for rcpt in self.recipients:
            if not rcpt:
                raise InputError("empty recipient address")
            check_address(rcpt, "recipient")

    @property
    def needs_smtputf8(self) -> bool:
        return not (self.sender.isascii() and all(r.isascii() for r in self.recipients))


@dataclass(slots=True)
class TransactionResult:
    """What the server said to each part of one transaction.

    ``error`` is set when the session ended (421, lost connection, timeout,
    protocol error) or the client refused to send (SIZE, SMTPUTF8) before every
    reply was in; recipients without a reply of their own take it.
    """

    transaction: Transaction
    mail_reply: Reply | None = None
    rcpt_replies: list[Reply | None] = field(default_factory=list)
    data_reply: Reply | None = None  # the 354 (or refusal) to DATA; None with BDAT
    final_reply: Reply | None = None  # the reply to the end of data or BDAT LAST
    error: Reply | None = None
    error_phase: Phase | None = None  # what the session was waiting for when ``error`` happened

    def recipient_replies(self) -> list[Reply]:
        """The reply that decides each recipient's fate, in recipient order."""
        return [reply for reply, _ in self.recipient_results()]

    def recipient_results(self) -> list[tuple[Reply, Phase]]:
        """(deciding reply, the phase it answered) per recipient, in order.

        The phase matters to classification: "550 user unknown" after the
        content (end of data) is a content filter, not a missing mailbox.
        """
        fallback = self.error or Reply.local(451, "4.4.0", "no reply received")
        fallback_phase = self.error_phase or Phase.MAIL
        mail = self.mail_reply
        out: list[tuple[Reply, Phase]] = []
        for rcpt_reply in self.rcpt_replies:
            if mail is not None and not mail.is_positive:
                out.append((mail, Phase.MAIL))
            elif rcpt_reply is None:
                out.append((fallback, fallback_phase))
            elif not rcpt_reply.is_positive:
                out.append((rcpt_reply, Phase.RCPT))
            elif self.final_reply is not None:
                out.append((self.final_reply, Phase.END_OF_DATA))
            elif self.data_reply is not None and self.data_reply.code != 354:
                out.append((self.data_reply, Phase.DATA))
            else:
                out.append((fallback, fallback_phase))
        return out

    @property
    def delivered(self) -> list[str]:
        """Recipients the server took responsibility for."""
        rcpts = self.transaction.recipients
        return [rcpts[i] for i, r in enumerate(self.recipient_replies()) if r.code // 100 == 2]


# --- events -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ready:
    """The session can carry mail (greeting, EHLO/HELO and STARTTLS are done)."""

    extensions: Extensions
    ehlo_reply: Reply


@dataclass(frozen=True, slots=True)
class StartTLS:
    """The server said 220 to STARTTLS: upgrade the transport, then call ``tls_established``."""


@dataclass(frozen=True, slots=True)
class TransactionDone:
    result: TransactionResult


@dataclass(frozen=True, slots=True)
class SessionFailed:
    """The session cannot carry mail any more; queued transactions were failed too."""

    reply: Reply
    phase: Phase


@dataclass(frozen=True, slots=True)
class Closed:
    """The server answered QUIT."""

    reply: Reply


Event = Ready | StartTLS | TransactionDone | SessionFailed | Closed


class _State(str, Enum):
    GREETING = "greeting"
    HANDSHAKE = "handshake"  # EHLO/HELO/STARTTLS in progress
    TLS = "tls"  # waiting for the caller to finish the TLS handshake
    READY = "ready"
    CLOSING = "closing"
    CLOSED = "closed"


@dataclass(slots=True)
class _Txn:
    result: TransactionResult
    use_bdat: bool
    rcpt_sent: int = 0

    @property
    def any_rcpt_accepted(self) -> bool:
        return any(r is not None and r.is_positive for r in self.result.rcpt_replies)


class ClientProtocol:
    """The client side of one SMTP session, as a state machine over bytes."""

    def __init__(
        self,
        helo_name: str,
        *,
        pipelining: bool = True,
        use_bdat: bool = True,
        tls: TLSPolicy = TLSPolicy.NEVER,
    ) -> None:
        if any(ch < " " or ch == "\x7f" for ch in helo_name) or not helo_name:
            raise InputError(f"invalid EHLO name {helo_name!r}")
        self.helo_name = helo_name
        self.allow_pipelining = pipelining
        self.allow_bdat = use_bdat
        self.tls_policy = tls
        self.tls_active = False
        self.extensions = Extensions()
        self._parser = ReplyParser()
        self._state = _State.GREETING
        self._out = bytearray()
        self._events: list[Event] = []
        # FIFO of (phase, transaction or None, recipient index): one per reply we await.
        self._expect: deque[tuple[Phase, _Txn | None, int]] = deque([(Phase.GREETING, None, 0)])
        self._queue: deque[_Txn] = deque()  # accepted by start_transaction, envelope not yet sent
        self._active: deque[_Txn] = deque()  # envelope sent, final reply pending
        # The transaction whose envelope is out but whose content is not; while it
        # exists nothing else may be written (the server is between MAIL and DATA).
        self._open: _Txn | None = None
        self._rset_needed = False
        self._bdat_active = 0  # BDAT transactions in self._active

    # --- queries ------------------------------------------------------------

    @property
    def waiting_for(self) -> Phase | None:
        """The phase of the oldest reply we wait for (selects the timeout)."""
        return self._expect[0][0] if self._expect else None

    @property
    def is_ready(self) -> bool:
        return self._state is _State.READY

    @property
    def is_closed(self) -> bool:
        return self._state is _State.CLOSED

    @property
    def in_flight(self) -> int:
        """Transactions accepted and not yet finished."""
        return len(self._queue) + len(self._active)

    @property
    def pipelining(self) -> bool:
        return self.allow_pipelining and self.extensions.pipelining

    # --- input --------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the server; return the events they caused.

        Raises ProtocolError on garbage or an unsolicited reply.
        """
        for reply in self._parser.feed(data):
            if not self._expect:
                raise ProtocolError(f"unsolicited reply: {reply}")
            phase, txn, index = self._expect.popleft()
            if reply.code == 421 and phase is not Phase.QUIT:
                # 421: the server is closing the channel (RFC 5321 3.8). Whatever
                # command it answers, the session is over.
                self._fail_session(reply, phase)
                break
            self._on_reply(reply, phase, txn, index)
        return self._drain()

    def start_transaction(self, transaction: Transaction) -> list[Event]:
        """Queue a transaction; its result arrives later as TransactionDone."""
        if self._state in (_State.CLOSING, _State.CLOSED):
            raise ProtocolError("session is closing; no new transactions")
        txn = _Txn(TransactionResult(transaction, rcpt_replies=[None] * len(transaction.recipients)), False)
        self._queue.append(txn)
        if self._state is _State.READY:
            self._pump()
        return self._drain()

    def tls_established(self) -> list[Event]:
        """The caller finished the TLS handshake: say EHLO again (RFC 3207)."""
        if self._state is not _State.TLS:
            raise ProtocolError("tls_established() without a pending STARTTLS")
        self.tls_active = True
        self.extensions = Extensions()
        self._state = _State.HANDSHAKE
        self._send(b"EHLO " + self._helo_bytes() + b"\r\n", Phase.EHLO)
        return self._drain()

    def quit(self) -> list[Event]:
        """Say QUIT after everything already queued (pipelined behind it if possible)."""
        if self._state in (_State.CLOSING, _State.CLOSED):
            return self._drain()
        self._quit_requested = True
        self._maybe_quit()
        return self._drain()

    def abort(self, reply: Reply, phase: Phase | None = None) -> list[Event]:
        """The connection failed (lost, timeout, protocol error): fail what is pending."""
        if self._state is not _State.CLOSED:
            self._fail_session(reply, phase or self.waiting_for or Phase.QUIT)
        return self._drain()

    # --- output -------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Bytes to write now; everything produced since the last call, in one write."""
        if not self._out:
            return b""
        out = bytes(self._out)
        self._out.clear()
        return out

    # --- internals ----------------------------------------------------------

    _quit_requested = False

    def _drain(self) -> list[Event]:
        events = self._events
        self._events = []
        return events

    def _send(self, line: bytes, phase: Phase, txn: _Txn | None = None, index: int = 0) -> None:
        self._out += line
        self._expect.append((phase, txn, index))

    def _on_reply(self, reply: Reply, phase: Phase, txn: _Txn | None, index: int) -> None:
        if txn is not None:
            self._on_txn_reply(reply, phase, txn, index)
            return
        if phase is Phase.GREETING:
            if reply.code == 220:
                self._state = _State.HANDSHAKE
                self._send(b"EHLO " + self._helo_bytes() + b"\r\n", Phase.EHLO)
            else:
                self._fail_session(reply, phase)
        elif phase is Phase.EHLO:
            if reply.is_positive:
                self.extensions = Extensions.parse(reply)
                self._after_hello(reply)
            elif reply.code in (500, 501, 502, 504, 550) and not self.tls_active:
                # An old server that does not know EHLO: fall back to HELO (RFC 5321 4.1.4).
                self._send(b"HELO " + self._helo_bytes() + b"\r\n", Phase.HELO)
            else:
                self._fail_session(reply, phase)
        elif phase is Phase.HELO:
            if reply.is_positive:
                self.extensions = Extensions()
                self._after_hello(reply)
            else:
                self._fail_session(reply, phase)
        elif phase is Phase.STARTTLS:
            if reply.code == 220:
                self._state = _State.TLS
                self._events.append(StartTLS())
            elif self.tls_policy is TLSPolicy.REQUIRED:
                self._fail_session(reply, phase)
            else:
                self._become_ready(reply)
        elif phase is Phase.RSET:
            pass  # nothing depends on it; a failing RSET shows up on the next MAIL
        elif phase is Phase.QUIT:
            self._state = _State.CLOSED
            self._events.append(Closed(reply))

    def _helo_bytes(self) -> bytes:
        return self.helo_name.encode("idna") if not self.helo_name.isascii() else self.helo_name.encode("ascii")

    def _after_hello(self, reply: Reply) -> None:
        want_tls = self.tls_policy is not TLSPolicy.NEVER and not self.tls_active
        if want_tls and self.extensions.starttls:
            self._send(b"STARTTLS\r\n", Phase.STARTTLS)
        elif want_tls and self.tls_policy is TLSPolicy.REQUIRED:
            self._fail_session(Reply.local(530, "5.7.10", "STARTTLS required but not offered by the server"), Phase.EHLO)
        else:
            self._become_ready(reply)

    def _become_ready(self, reply: Reply) -> None:
        self._state = _State.READY
        self._events.append(Ready(self.extensions, reply))
        self._pump()

    def _pump(self) -> None:
        """Write the next queued envelopes if the session allows it now."""
        while self._queue and self._state is _State.READY and self._open is None:
            if not self.pipelining and self._active:
                return  # lock-step: one transaction at a time
            if self._bdat_active:
                return  # a BDAT transaction's outcome decides whether RSET is needed
            txn = self._queue.popleft()
            if not self._begin(txn):
                continue
        self._maybe_quit()

    def _begin(self, txn: _Txn) -> bool:
        """Write the envelope of *txn* (all of it if pipelining). False if refused locally."""
        t = txn.result.transaction
        ext = self.extensions
        utf8 = t.needs_smtputf8
        if utf8 and not ext.smtputf8:
            self._finish_local(txn, Reply.local(553, "5.6.7", "non-ASCII address and the server does not offer SMTPUTF8"))
            return False
        use_bdat = self.allow_bdat and ext.chunking
        size = len(t.body.bdat_wire if use_bdat else t.body.data_wire)
        if ext.size and size > ext.size:
            self._finish_local(txn, Reply.local(552, "5.3.4", f"message size {size} exceeds the server's SIZE limit {ext.size}"))
            return False
        txn.use_bdat = use_bdat
        self._bdat_active += use_bdat
        if self._rset_needed:
            self._send(b"RSET\r\n", Phase.RSET)
            self._rset_needed = False
        params = []
        if ext.size is not None:
            params.append(b" SIZE=%d" % size)
        if t.body.eight_bit and ext.eightbitmime:
            params.append(b" BODY=8BITMIME")
        if utf8:
            params.append(b" SMTPUTF8")
        self._active.append(txn)
        self._send(b"MAIL FROM:<" + t.sender.encode() + b">" + b"".join(params) + b"\r\n", Phase.MAIL, txn)
        if self.pipelining:
            for i in range(len(t.recipients)):
                self._send_rcpt(txn, i)
            self._send_data_command(txn)
        return True

    def _send_rcpt(self, txn: _Txn, index: int) -> None:
        rcpt = txn.result.transaction.recipients[index]
        self._send(b"RCPT TO:<" + rcpt.encode() + b">\r\n", Phase.RCPT, txn, index)
        txn.rcpt_sent = index + 1

    def _send_data_command(self, txn: _Txn) -> None:
        if txn.use_bdat:
            payload = txn.result.transaction.body.bdat_wire
            self._send(b"BDAT %d LAST\r\n" % len(payload), Phase.BDAT, txn)
            self._out += payload
        else:
            self._send(b"DATA\r\n", Phase.DATA, txn)
            self._open = txn

    def _on_txn_reply(self, reply: Reply, phase: Phase, txn: _Txn, index: int) -> None:
        result = txn.result
        if phase is Phase.MAIL:
            result.mail_reply = reply
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
                    self._out += result.transaction.body.data_wire
                else:
                    self._out += b".\r\n"  # a broken server said 354 with no recipients: end it empty
                self._expect.append((Phase.END_OF_DATA, txn, 0))
            else:
                if result.mail_reply is not None and result.mail_reply.is_positive:
                    self._rset_needed = True
                self._finish(txn)
        elif phase in (Phase.END_OF_DATA, Phase.BDAT):
            result.final_reply = reply
            if phase is Phase.BDAT and not reply.is_positive and result.mail_reply is not None and result.mail_reply.is_positive:
                self._rset_needed = True
            self._finish(txn)
        self._pump()

    def _finish(self, txn: _Txn) -> None:
        if txn in self._active:
            self._active.remove(txn)
            self._bdat_active -= txn.use_bdat
        self._events.append(TransactionDone(txn.result))

    def _finish_local(self, txn: _Txn, reply: Reply) -> None:
        txn.result.error = reply
        txn.result.error_phase = Phase.MAIL
        self._events.append(TransactionDone(txn.result))

    def _maybe_quit(self) -> None:
        if self._quit_requested and self._state is _State.READY and not self._queue and self._open is None:
            if not self.pipelining and self._active:
                return
            self._state = _State.CLOSING
            self._send(b"QUIT\r\n", Phase.QUIT)

    def _fail_session(self, reply: Reply, phase: Phase) -> None:
        self._state = _State.CLOSED
        self._expect.clear()
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
