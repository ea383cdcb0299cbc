"""SMTP replies: the record and an incremental, bounded parser.

The parser accepts what real servers send, not just what RFC 5321 allows:
a comma instead of a space after the code on the final line (seen from
Gmail), a bare code with no text, and LF-only line endings. It refuses what
would make it hang or grow without bound: over-long lines, replies with too
many lines, continuation lines whose code differs from the first line, and
lines that are not replies at all.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from fastmta.errors import ProtocolError, Scope

#: RFC 5321 says 512 octets; real servers send longer, so be generous but bounded.
MAX_LINE = 8192
MAX_LINES = 256

_ENHANCED = re.compile(rb"^([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")


class Reply(NamedTuple):
    """One complete SMTP reply.

    ``lines`` are the texts after ``<code>[- ]`` on each line, enhanced status
    code included, exactly as the server sent them. ``enhanced`` is the RFC
    3463 code of the first line when its class matches the reply's.

    A NamedTuple rather than a frozen dataclass: it is created for every
    reply on the hot path, and tuple construction is several times cheaper.
    """

    code: int
    lines: tuple[str, ...]
    enhanced: str | None = None

    @property
    def text(self) -> str:
        """All lines joined by a space, each without its enhanced code."""
        if self.enhanced is None:
            return " ".join(self.lines)
        prefix = self.enhanced
        return " ".join(
            line[len(prefix):].lstrip() if line.startswith(prefix) else line for line in self.lines
        )

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def __str__(self) -> str:
        return f"{self.code} {' / '.join(self.lines)}".rstrip()

    @classmethod
    def local(cls, code: int, enhanced: str, text: str) -> Reply:
        """A reply made up locally (timeouts, connection errors, DNS results)."""
        return cls(code, (f"{enhanced} {text}",), enhanced)


def _enhanced_of(code: int, first_text: bytes) -> str | None:
    if first_text[1:2] != b".":  # cheap pre-check: most replies without one fail here
        return None
    m = _ENHANCED.match(first_text)
    if m is None or int(m.group(1)) != code // 100:
        return None
    return m.group(0).decode("ascii")


def _decode(text: bytes) -> str:
    # Replies should be ASCII; SMTPUTF8 servers may send UTF-8; anything else
    # is kept visible rather than rejected.
    return text.decode("utf-8", "backslashreplace")


class ReplyParser:
    """Feed bytes in, take complete replies out. No I/O, bounded memory."""

    __slots__ = ("_buf", "_code", "_first_text", "_lines")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._code: int | None = None
        self._lines: list[str] = []
        self._first_text = b""

    @property
    def pending(self) -> bool:
        """True when part of a reply (a partial line or continuation) is buffered."""
        return bool(self._buf) or self._code is not None

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete line held back."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Reply]:
        """Add *data*; return the replies it completed, in order.

        Raises ``ProtocolError`` on garbage; the parser is then unusable,
        just like the connection it came from.
        """
        buf = self._buf
        buf += data
        out: list[Reply] = []
        start = 0
        try:
            while True:
                nl = buf.find(b"\n", start)
                if nl < 0:
                    break
                line = bytes(buf[start:nl])
                start = nl + 1
                if line.endswith(b"\r"):
                    line = line[:-1]
                reply = self._line(line)
                if reply is not None:
                    out.append(reply)
            if start:
                del buf[:start]
            if len(buf) > MAX_LINE:
                raise ProtocolError(f"reply line longer than {MAX_LINE} octets", scope=Scope.SESSION)
        except ProtocolError as exc:
            # The replies before the garbage go with it (a 250 to an end of data was dropped with the
            # line after it, and the message sent again): the caller takes them, then fails the session.
            exc.replies = out
            raise
        return out

    def _line(self, line: bytes) -> Reply | None:
        if len(line) > MAX_LINE:
            raise ProtocolError(f"reply line longer than {MAX_LINE} octets")
        head = line[:3]
        if len(head) < 3 or not head.isdigit():
            raise ProtocolError(f"not an SMTP reply line: {line[:80]!r}")
        code = int(head)
        if not 200 <= code <= 599:
            raise ProtocolError(f"reply code out of range: {line[:80]!r}")
        sep = line[3:4]
        if sep == b"-":
            final = False
        elif sep in (b" ", b"", b","):
            # b"," : Gmail has been seen ending multi-line replies "550,5.1.1 ..."
            final = True
        else:
            raise ProtocolError(f"bad separator after reply code: {line[:80]!r}")
        text = line[4:]
        if self._code is None:
            if final:
                # Fast path: a single-line reply (nearly all of them).
                return Reply(code, (_decode(text),), _enhanced_of(code, text))
            self._code = code
            self._first_text = text
        elif code != self._code:
            # RFC 5321 4.2.1 wants one code per reply, yet postscreen greets a client on a block list
            # "220-..." then "521 5.3.2 ...". As Postfix's own client reads it, the last code is the
            # reply's (the refusal), its enhanced code from the first line with that code; as a protocol
            # error the mail was retried for five days, 42 connections in 80 s.
            self._code = code
            self._first_text = text
        if len(self._lines) >= MAX_LINES:
            raise ProtocolError(f"reply longer than {MAX_LINES} lines")
        self._lines.append(_decode(text))
        if not final:
            return None
        reply = Reply(code, tuple(self._lines), _enhanced_of(code, self._first_text))
        self._code = None
        self._lines = []
        self._first_text = b""
        return reply
