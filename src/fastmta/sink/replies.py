"""The sink's replies in wire form, prepared before any connection needs them.

Two kinds: the fixed protocol replies (``R_*``: syntax errors, sequence
errors, limits; worded alike by every MTA) and :class:`CompiledReply`, a
provider profile's reply template with the listener's hostname filled in
ahead of time. Both exist so the per-connection code in
:mod:`fastmta.sink.connection` and :mod:`fastmta.sink.protocol` only appends
ready bytes: no formatting on the hot path.
"""

from __future__ import annotations

from fastmta.sink.profiles import ReplyTemplate


def format_reply(code: int, enhanced: str, text: str) -> bytes:
    """One single-line reply with its enhanced status code, CRLF-terminated."""
    return f"{code} {enhanced} {text}\r\n".encode("ascii")


# Fixed protocol replies (not provider-specific: every MTA words these alike).
R_OK = format_reply(250, "2.0.0", "Ok")
R_VRFY = format_reply(252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery")
R_HELP = format_reply(214, "2.0.0", "See RFC 5321")
R_STARTTLS = format_reply(220, "2.0.0", "Ready to start TLS")
R_UNKNOWN = format_reply(500, "5.5.2", "Error: command not recognized")
R_BAD_CHARS = format_reply(500, "5.5.2", "Error: bare CR or NUL in command line")
R_TOO_LONG = format_reply(500, "5.5.2", "Error: line too long")
R_EXPN = format_reply(502, "5.5.1", "Error: command not implemented")
R_HELO_FIRST = format_reply(503, "5.5.1", "Error: send HELO/EHLO first")
R_NESTED = format_reply(503, "5.5.1", "Error: nested MAIL command")
R_NEED_MAIL = format_reply(503, "5.5.1", "Error: need MAIL command")
R_NEED_RCPT = format_reply(554, "5.5.1", "Error: no valid recipients")
R_MIXED = format_reply(503, "5.5.1", "Error: DATA and BDAT cannot be mixed in one transaction")
R_TLS_AGAIN = format_reply(503, "5.5.1", "Error: TLS already active")
R_NO_TLS = format_reply(502, "5.5.1", "Error: STARTTLS not available")
R_SESSION_REFUSED = format_reply(503, "5.5.1", "Error: session refused, send QUIT")
R_TOO_MANY_RCPTS = format_reply(452, "4.5.3", "Error: too many recipients")
R_TOO_BIG = format_reply(552, "5.3.4", "Error: message size exceeds fixed limit")
R_CAPTURE_FULL = format_reply(452, "4.3.1", "Error: capture buffer full, try again later")
R_TOO_MANY_ERRORS = format_reply(421, "4.7.0", "Error: too many errors, closing connection")
R_SHUTDOWN = format_reply(421, "4.3.2", "Service shutting down, closing transmission channel")
R_IDLE = format_reply(421, "4.4.2", "Error: timeout exceeded, closing connection")
R_SYN_EHLO = format_reply(501, "5.5.4", "Syntax: EHLO hostname")
R_SYN_MAIL = format_reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
R_SYN_RCPT = format_reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
R_SYN_DATA = format_reply(501, "5.5.4", "Syntax: DATA (no parameters)")
R_SYN_BDAT = format_reply(501, "5.5.4", "Syntax: BDAT size [LAST]")
R_SYN_NOARG = format_reply(501, "5.5.4", "Syntax: no parameters allowed")
R_BAD_SENDER = format_reply(501, "5.1.7", "Bad sender address syntax")
R_BAD_RCPT = format_reply(501, "5.1.3", "Bad recipient address syntax")
R_NEED_UTF8 = format_reply(553, "5.6.7", "Non-ASCII address needs the SMTPUTF8 parameter")
R_BAD_PARAM = format_reply(555, "5.5.4", "Unsupported MAIL/RCPT parameter")
R_BAD_BODY = format_reply(501, "5.5.4", "Syntax: BODY=7BIT or BODY=8BITMIME")
R_BAD_SIZE = format_reply(501, "5.5.4", "Syntax: SIZE=<number>")


class CompiledReply:
    """A reply template prepared for the hot path.

    Static replies are plain bytes; a reply whose only variable is the queue
    id is two bytes objects around it; anything else is rendered in full.
    """

    __slots__ = ("code", "hostname", "post", "pre", "static", "template")

    def __init__(self, template: ReplyTemplate, hostname: str) -> None:
        self.template = template
        self.hostname = hostname
        self.code = template.code
        wire = template.render({"host": hostname})
        self.static: bytes | None = None
        self.pre = self.post = b""
        if b"{" not in wire:
            self.static = wire
        elif wire.count(b"{") == 1 and wire.count(b"{id}") == 1:
            self.pre, _, self.post = wire.partition(b"{id}")

    def make(self, qid: str, ip: str = "", sender: bytes = b"", rcpt: bytes = b"") -> bytes:
        if self.pre:
            return self.pre + qid.encode("ascii") + self.post
        fields = {
            "host": self.hostname,
            "ip": ip,
            "id": qid,
            "sender": sender.decode("utf-8", "replace"),
            "rcpt": rcpt.decode("utf-8", "replace"),
        }
        return self.template.render(fields)
