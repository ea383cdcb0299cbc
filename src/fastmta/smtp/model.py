"""The records of an SMTP client session: phases, envelopes, results, events.

Shared by both implementations of the client state machine (the compiled
``_client`` and its pure-Python twin ``_client_ref``) and by everything that
drives them; ``fastmta.smtp.protocol`` re-exports all of it. A leaf module: it
imports nothing that imports it back.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum, IntEnum

from fastmta.errors import InputError
from fastmta.message import core, downgrade
from fastmta.smtp.dsn_params import EnvelopeDsn
from fastmta.smtp.reply import Reply


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
    AUTH = "auth"


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

    __slots__ = ("_bdat_wire", "_data_wire", "_eight_bit", "_seven_bit", "_size", "_utf8_headers", "raw")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self._data_wire: bytes | None = None
        self._bdat_wire: bytes | None = None
        self._eight_bit: bool | None = None
        self._utf8_headers: bool | None = None
        self._size: int | None = None
        self._seven_bit: Body | None = None

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
    def size(self) -> int:
        """The size RFC 1870 means (``SIZE=``, a server's limit): CRLF lines, without the dot-stuffing
        or the ending ``.\r\n`` (counting them bounced a message that fitted: found against Exim).
        From the wire form at hand, without making the other."""
        if self._size is None:
            if self._bdat_wire is not None:
                self._size = len(self._bdat_wire)
            else:
                wire = self.data_wire  # every stuffed dot follows a CRLF (or starts it); the last is the end's
                self._size = len(wire) - 3 - (wire.count(b"\r\n.") - 1 + wire.startswith(b"."))
        return self._size

    @property
    def eight_bit(self) -> bool:
        if self._eight_bit is None:
            self._eight_bit = not self.raw.isascii()
        return self._eight_bit

    @property
    def seven_bit(self) -> Body:
        """This body as it may go to a server that did not offer 8BITMIME (itself if its body is 7-bit).

        Its 8-bit MIME parts re-encoded (:mod:`fastmta.message.downgrade`); made
        once, on the first transaction that needs it, and kept with the body.
        """
        if self._seven_bit is None:
            converted = downgrade.seven_bit(self.raw) if self.eight_bit else self.raw
            self._seven_bit = self if converted is self.raw else Body(converted)
        return self._seven_bit

    @property
    def utf8_headers(self) -> bool:
        """Raw UTF-8 in the header section (RFC 6532): the message must go with SMTPUTF8."""
        if self._utf8_headers is None:
            if not self.eight_bit:
                self._utf8_headers = False
            else:
                end = _END_OF_HEADERS.search(self.raw)
                self._utf8_headers = not self.raw[: end.start() if end else len(self.raw)].isascii()
        return self._utf8_headers

    def __len__(self) -> int:
        return len(self.raw)


_FORBIDDEN_IN_ADDRESS = re.compile(r"[\x00-\x1f\x7f<>]")
_END_OF_HEADERS = re.compile(rb"\r?\n\r?\n")


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
    #: DSN parameters (RFC 3461) to pass on when the server offers DSN: what goes after MAIL FROM's
    #: path, and after each recipient's (``fastmta.smtp.dsn_params.envelope_dsn``). None: none asked.
    dsn: EnvelopeDsn | None = None

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
        """A UTF-8 address in the envelope, or raw UTF-8 in the headers (RFC 6531, RFC 6532)."""
        return not (self.sender.isascii() and all(r.isascii() for r in self.recipients)) or self.body.utf8_headers


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
    behind_dot: bool = False  # its MAIL went right behind another transaction's end of data (RFC 2920)
    content_sent: bool = False  # its content and end of data went out (a lost session may have delivered it)

    def recipient_replies(self) -> list[Reply]:
        """The reply that decides each recipient's fate, in recipient order."""
        return [reply for reply, _ in self.recipient_results()]

    def recipient_results(self) -> list[tuple[Reply, Phase]]:
        """(deciding reply, the phase it answered) per recipient, in order.

        The phase matters to classification: "550 user unknown" after the
        content (end of data) is a content filter, not a missing mailbox.
        """
        mail = self.mail_reply
        out: list[tuple[Reply, Phase]] = []
        for rcpt_reply in self.rcpt_replies:
            if mail is not None and not mail.is_positive:
                out.append((mail, Phase.MAIL))
            elif rcpt_reply is None:
                out.append(self._fallback())
            elif not rcpt_reply.is_positive:
                out.append((rcpt_reply, Phase.RCPT))
            elif self.final_reply is not None:
                out.append((self.final_reply, Phase.END_OF_DATA))
            elif self.data_reply is not None and self.data_reply.code != 354:
                out.append((self.data_reply, Phase.DATA))
            else:
                out.append(self._fallback())
        return out

    def _fallback(self) -> tuple[Reply, Phase]:
        # Made only when needed: recipient_results runs once per message.
        return self.error or Reply.local(451, "4.4.0", "no reply received"), self.error_phase or Phase.MAIL

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


@dataclass(slots=True)
class TransactionDone:
    # Not frozen, unlike the other events: one is made per message, and a
    # frozen dataclass's __init__ (object.__setattr__ per field) costs several
    # times more.

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


class SessionState(IntEnum):
    """Where the session is; an int so the compiled state machine keeps it in a C field."""

    GREETING = 0
    HANDSHAKE = 1  # EHLO/HELO/STARTTLS in progress
    TLS = 2  # waiting for the caller to finish the TLS handshake
    READY = 3
    CLOSING = 4
    CLOSED = 5
