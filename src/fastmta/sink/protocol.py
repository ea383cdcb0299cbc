"""The sink's SMTP dialogue: what each command means and what it is answered.

:class:`SinkProtocol` is the ``asyncio.Protocol`` the server creates per
connection. Its base, :class:`fastmta.sink.connection.SinkConnection`,
frames the input and writes the replies; this class interprets: it checks
each command's syntax and sequence (RFC 5321, 1870, 3030, 3207, 6152,
6531), keeps the transaction (sender, recipients), switches the input to
DATA or BDAT content, and accepts or refuses each message at its end.

Handlers run once per command of every message, so they stay on the fast
path: a handler is found by one dict lookup on the verb, appends a
precomputed reply, and calls into fault injection only when faults are
configured.
"""

from __future__ import annotations

from typing import Any, ClassVar

from fastmta.sink.connection import MODE_BDAT, MODE_DATA, SinkConnection
from fastmta.sink.replies import (
    R_BAD_BODY,
    R_BAD_CHARS,
    R_BAD_PARAM,
    R_BAD_RCPT,
    R_BAD_SENDER,
    R_BAD_SIZE,
    R_CAPTURE_FULL,
    R_EXPN,
    R_HELO_FIRST,
    R_HELP,
    R_MIXED,
    R_NEED_MAIL,
    R_NEED_RCPT,
    R_NEED_UTF8,
    R_NESTED,
    R_NO_TLS,
    R_OK,
    R_SESSION_REFUSED,
    R_STARTTLS,
    R_SYN_BDAT,
    R_SYN_DATA,
    R_SYN_EHLO,
    R_SYN_MAIL,
    R_SYN_NOARG,
    R_SYN_RCPT,
    R_TLS_AGAIN,
    R_TOO_BIG,
    R_TOO_MANY_RCPTS,
    R_UNKNOWN,
    R_VRFY,
    format_reply,
)
from fastmta.sink.syntax import PathError, is_valid_mailbox, split_param, split_path


class SinkProtocol(SinkConnection):
    """One SMTP server connection. Not for direct use: see :class:`SinkServer`."""

    # The state is in the base's slots; an empty list keeps instances
    # without a __dict__ (and attribute access on the slot fast path).
    __slots__ = ()
    #: verb -> handler; a class attribute so a subclass (fastmta serve's
    #: injection listener) can add or replace commands. Set below the class.
    _handlers: ClassVar[dict[bytes, Any]]

    # ------------------------------------------------------------ commands

    def _command(self, line: bytes) -> None:
        """Answer one command line (without its LF): check it, find its handler."""
        if line[-1:] == b"\r":
            line = line[:-1]
        if b"\r" in line or b"\0" in line:
            self._error(R_BAD_CHARS, 500)
            return
        verb = line[:4].upper()
        if self._trace is not None and self._trace.commands:
            self._trace.commands[-1].append(verb.decode("ascii", "replace"))
        if self._refused and verb != b"QUIT":
            self._error(R_SESSION_REFUSED, 503)
            return
        handler = self._handlers.get(verb)
        if handler is None or (len(line) > 4 and line[4] != 0x20 and verb != b"STAR"):
            self._error(R_UNKNOWN, 500)
            return
        handler(self, line)

    def _ehlo(self, line: bytes) -> None:
        arg = line[5:].strip()
        if not arg:
            self._error(R_SYN_EHLO, 501)
            return
        self._reset_transaction()
        is_ehlo = line[:1] in b"Ee"
        listener = self._l
        if is_ehlo:
            reply = listener.ehlo_tls if self._tls else listener.ehlo
            wire = reply.static or reply.make(self._qid, self._ip)
        else:
            wire = listener.helo
        faults = self._faults
        if faults is not None:
            refusal = faults.ehlo(self._ip, self._qid)
            if refusal is not None:
                self._answer("ehlo", refusal.wire, refusal.code, refusal.close)
                return
            self._greeted = True
            self._esmtp = is_ehlo
            self._answer("ehlo", wire, 250, False)
            return
        self._greeted = True
        self._esmtp = is_ehlo
        self._out.append(wire)
        self._codes[250] += 1

    def _mail(self, line: bytes) -> None:
        if line[:10].upper() != b"MAIL FROM:":
            self._error(R_SYN_MAIL, 501)
            return
        if not self._greeted:
            self._error(R_HELO_FIRST, 503)
            return
        if self._sender is not None:
            self._error(R_NESTED, 503)
            return
        try:
            addr, params = split_path(line[10:])
        except PathError as e:
            self._error(format_reply(501, e.enhanced, e.text), 501)
            return
        utf8 = False
        if params:
            if not self._esmtp:
                self._error(R_BAD_PARAM, 555)
                return
            for param in params:
                key, value = split_param(param)
                if key == b"SIZE":
                    if value is None or not value.isdigit() or len(value) > 20:
                        self._error(R_BAD_SIZE, 501)
                        return
                    if int(value) > self._server.config.max_message_size:
                        self._send(R_TOO_BIG, 552)
                        return
                elif key == b"BODY":
                    if value is None or value.upper() not in (b"7BIT", b"8BITMIME"):
                        self._error(R_BAD_BODY, 501)
                        return
                elif key == b"SMTPUTF8" and value is None:
                    utf8 = True
                else:
                    self._error(R_BAD_PARAM, 555)
                    return
        if addr and not is_valid_mailbox(addr, utf8):
            if not utf8 and not addr.isascii():
                self._error(R_NEED_UTF8, 553)
            else:
                self._error(R_BAD_SENDER, 501)
            return
        faults = self._faults
        if faults is not None:
            refusal = faults.mail(self._ip, addr, self._qid)
            if refusal is not None:
                self._answer("mail", refusal.wire, refusal.code, refusal.close)
                return
        self._sender = addr
        self._utf8 = utf8
        self._rcpts = []
        self._stats.transactions += 1
        self._ipstats.transactions += 1
        ok = self._l.mail_ok
        wire = ok.static or ok.make(self._qid, self._ip, addr)
        if faults is not None:
            self._answer("mail", wire, 250, False)
            return
        self._out.append(wire)
        self._codes[250] += 1

    def _rcpt(self, line: bytes) -> None:
        if line[:8].upper() != b"RCPT TO:":
            self._error(R_SYN_RCPT, 501)
            return
        if self._sender is None:
            self._error(R_NEED_MAIL, 503)
            return
        if len(self._rcpts) >= self._server.config.max_recipients:
            self._send(R_TOO_MANY_RCPTS, 452)
            return
        try:
            addr, params = split_path(line[8:])
        except PathError as e:
            self._error(format_reply(501, e.enhanced, e.text), 501)
            return
        if params:
            # NOTIFY/ORCPT belong to DSN, which is not advertised.
            self._error(R_BAD_PARAM, 555)
            return
        if not is_valid_mailbox(addr, self._utf8) and addr.lower() != b"postmaster":
            if not self._utf8 and not addr.isascii():
                self._error(R_NEED_UTF8, 553)
            else:
                self._error(R_BAD_RCPT, 501)
            return
        faults = self._faults
        if faults is not None:
            refusal = faults.rcpt(self._ip, self._sender, addr, self._qid)
            if refusal is not None:
                self._answer("rcpt", refusal.wire, refusal.code, refusal.close)
                return
        self._rcpts.append(addr)
        self._stats.recipients += 1
        self._ipstats.recipients += 1
        ok = self._l.rcpt_ok
        wire = ok.static or ok.make(self._qid, self._ip, self._sender, addr)
        if faults is not None:
            self._answer("rcpt", wire, 250, False)
            return
        self._out.append(wire)
        self._codes[250] += 1

    # -------------------------------------------- message content, its end
    # DATA and BDAT switch the input to content (framed by the base class),
    # which comes back here through _bdat_done and _finish_message.

    def _data_cmd(self, line: bytes) -> None:
        if len(line) > 4 and line[4:].strip():
            self._error(R_SYN_DATA, 501)
            return
        if self._sender is None:
            self._error(R_NEED_MAIL, 503)
            return
        if not self._rcpts:
            self._error(R_NEED_RCPT, 554)
            return
        if self._bdat_used:
            self._error(R_MIXED, 503)
            return
        faults = self._faults
        go = self._l.data_go
        wire = go.static or go.make(self._qid, self._ip)
        if faults is not None:
            refusal = faults.data(self._ip, self._sender, self._qid)
            if refusal is not None:
                self._answer("data", refusal.wire, refusal.code, refusal.close)
                return
            self._answer("data", wire, 354, False)
        else:
            self._out.append(wire)
            self._codes[354] += 1
        self._mode = MODE_DATA
        self._size = 0
        # The CRLF that ended the DATA line counts as the start of the
        # terminator, so an empty message (".\r\n" at once) is recognized.
        self._tail = b"\r\n"
        self._start_capture()
        self._line_len = 0
        self._long_line = False

    def _start_capture(self) -> None:
        self._release_capture()
        self._capture_overflow = False
        if self._server.capture is not None:
            self._chunks = []

    def _bdat_cmd(self, line: bytes) -> None:
        parts = line.split()
        if (
            len(parts) not in (2, 3)
            or not parts[1].isdigit()
            or len(parts[1]) > 20
            or (len(parts) == 3 and parts[2].upper() != b"LAST")
        ):
            # Without a size the chunk cannot be skipped: the session is lost.
            self._error(R_SYN_BDAT, 501)
            return
        size = int(parts[1])
        refusal: bytes | None = None
        if self._sender is None:
            refusal = R_NEED_MAIL
        elif not self._rcpts:
            refusal = R_NEED_RCPT
        elif not self._bdat_used:
            self._bdat_used = True
            self._size = 0
            self._start_capture()
            self._line_len = 0
            self._long_line = False
        self._bdat_left = size
        self._bdat_last = len(parts) == 3
        self._bdat_refusal = refusal
        if size == 0:
            self._bdat_done()
        else:
            self._mode = MODE_BDAT

    def _bdat_done(self) -> None:
        """A BDAT chunk has been read in full: answer it, or end the message."""
        refusal = self._bdat_refusal
        if refusal is not None:
            # RFC 3030: the chunk was read (it had to be) and is refused.
            self._error(refusal, int(refusal[:3]))
            return
        if not self._bdat_last:
            self._send(f"250 2.0.0 {self._size} octets received\r\n".encode("ascii"), 250)
            return
        chunks = self._chunks
        self._finish_message(self._size, b"".join(chunks) if chunks is not None else None)

    def _finish_message(self, size: int, content: bytes | None) -> None:
        """End of data (DATA dot or BDAT LAST): accept or refuse the message."""
        sender = self._sender if self._sender is not None else b""
        rcpts = self._rcpts
        self._reset_transaction()
        self._messages += 1
        qid = f"{self._qid}{self._messages:04X}"
        if size > self._server.config.max_message_size:
            self._stats.rejected_messages += 1
            self._send(R_TOO_BIG, 552)
            return
        if self._long_line:
            self._stats.rejected_messages += 1
            self._send(
                format_reply(554, "5.6.0", f"Error: message has a line longer than {self._max_data_line} octets"), 554
            )
            return
        faults = self._faults
        if faults is not None:
            refusal = faults.end_of_data(self._ip, sender, rcpts, qid)
            if refusal is not None:
                self._stats.rejected_messages += 1
                self._answer("eod", refusal.wire, refusal.code, refusal.close)
                return
        capture = self._server.capture
        if capture is not None:
            if content is None or self._capture_overflow:
                # Over the capture budget: not kept, so not accepted (a 4xx the client retries).
                self._capture_overflow = False
                self._stats.rejected_messages += 1
                self._send(R_CAPTURE_FULL, 452)
                return
            try:
                capture.write(qid, sender, rcpts, content)
            except OSError as exc:  # disk full, read-only: say so, keep serving
                self._stats.rejected_messages += 1
                self._send(format_reply(451, "4.3.0", f"Error: capture failed: {exc.strerror or exc}"), 451)
                return
        stats = self._stats
        stats.messages += 1
        stats.bytes += size
        ipstats = self._ipstats
        ipstats.messages += 1
        ipstats.bytes += size
        queued = self._l.queued
        wire = queued.static or queued.make(qid, self._ip, sender)
        if faults is not None:
            self._answer("eod", wire, 250, False)
            return
        self._out.append(wire)
        self._codes[250] += 1

    # ------------------------------------------------------ other commands

    def _rset(self, line: bytes) -> None:
        if len(line) > 4 and line[4:].strip():
            self._error(R_SYN_NOARG, 501)
            return
        self._reset_transaction()
        self._send(R_OK, 250)

    def _noop(self, line: bytes) -> None:
        self._send(R_OK, 250)

    def _quit(self, line: bytes) -> None:
        q = self._l.quit
        self._send(q.static or q.make(self._qid, self._ip), 221)
        self._closing = True

    def _vrfy(self, line: bytes) -> None:
        self._send(R_VRFY, 252)

    def _help(self, line: bytes) -> None:
        self._send(R_HELP, 214)

    def _expn(self, line: bytes) -> None:
        self._error(R_EXPN, 502)

    def _starttls(self, line: bytes) -> None:
        if line.upper() != b"STARTTLS":
            self._error(R_UNKNOWN, 500)
            return
        if self._tls:
            self._error(R_TLS_AGAIN, 503)
            return
        if self._server.ssl_context is None:
            self._error(R_NO_TLS, 502)
            return
        self._send(R_STARTTLS, 220)
        # Hold the rest of the input: the base class's _flush writes the 220,
        # stops reading and starts the handshake (SinkConnection._start_tls).
        self._held = True
        self._tls_pending = 1


# Keyed on the first four octets of the line (so STARTTLS is b"STAR"): one
# dict lookup per command, and a plain function called as handler(self, line).
_HANDLERS: dict[bytes, Any] = {
    b"MAIL": SinkProtocol._mail,
    b"RCPT": SinkProtocol._rcpt,
    b"DATA": SinkProtocol._data_cmd,
    b"BDAT": SinkProtocol._bdat_cmd,
    b"EHLO": SinkProtocol._ehlo,
    b"HELO": SinkProtocol._ehlo,
    b"RSET": SinkProtocol._rset,
    b"NOOP": SinkProtocol._noop,
    b"QUIT": SinkProtocol._quit,
    b"VRFY": SinkProtocol._vrfy,
    b"HELP": SinkProtocol._help,
    b"EXPN": SinkProtocol._expn,
    b"STAR": SinkProtocol._starttls,
}
SinkProtocol._handlers = _HANDLERS
