"""The sink's SMTP server state machine: one ``asyncio.Protocol`` per connection.

Kept apart from :mod:`fastmta.sink.server` (which binds listeners and owns the
shared state) because this is the hot path: every byte of every message
passes through :meth:`SinkProtocol.data_received`, so it is written for
speed first (plain attributes, precomputed replies, one write per read) and
calls into fault injection only when faults are configured.
"""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from fastmta.sink.capture import CaptureWriter, unstuff
from fastmta.sink.config import ListenerConfig, SinkConfig
from fastmta.sink.faults import FaultEngine
from fastmta.sink.profiles import ProviderProfile, ReplyTemplate, get_profile
from fastmta.sink.stats import IPStats, SinkStats
from fastmta.sink.syntax import PathError, is_valid_mailbox, split_param, split_path

_CMD, _DATA, _BDAT, _SKIP = 0, 1, 2, 3
_TERMINATOR = b"\r\n.\r\n"
#: Per connection, traces keep at most this many octets of reads (tests only).
_TRACE_LIMIT = 1 << 20


@dataclass(slots=True)
class ConnectionTrace:
    """Every read of one connection, as the server saw it (``SinkConfig.trace``).

    ``reads[i]`` is the data of the i-th ``data_received`` call and
    ``commands[i]`` the command verbs parsed from it, so a test can show
    from the server side that a pipelining client put MAIL, RCPT and DATA
    in one segment.
    """

    peer: tuple[str, int]
    reads: list[bytes] = field(default_factory=list)
    commands: list[list[str]] = field(default_factory=list)
    recorded: int = 0


class _Compiled:
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


class ListenerRuntime:
    """Per-listener constants: replies of its profile, its fault engine."""

    __slots__ = (
        "config",
        "data_go",
        "ehlo",
        "ehlo_tls",
        "faults",
        "greeting",
        "helo",
        "hostname",
        "mail_ok",
        "profile",
        "queued",
        "quit",
        "rcpt_ok",
    )

    def __init__(
        self,
        config: ListenerConfig,
        sink: SinkConfig,
        tls: bool,
        rng: random.Random,
        stats: SinkStats,
        clock: Callable[[], float],
    ) -> None:
        self.config = config
        profile: ProviderProfile = get_profile(config.profile)
        self.profile = profile
        self.hostname = hostname = config.hostname or profile.hostname
        faults = config.faults if config.faults is not None else sink.faults
        self.faults = FaultEngine(faults, profile, hostname, rng, stats, clock) if faults.active else None
        self.greeting = _Compiled(profile.greeting, hostname)
        self.mail_ok = _Compiled(profile.mail_ok, hostname)
        self.rcpt_ok = _Compiled(profile.rcpt_ok, hostname)
        self.data_go = _Compiled(profile.data_go, hostname)
        self.queued = _Compiled(profile.queued, hostname)
        self.quit = _Compiled(profile.quit, hostname)
        keywords = [
            "PIPELINING",
            f"SIZE {sink.max_message_size}",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "CHUNKING",
        ]
        plain = ReplyTemplate(250, (profile.ehlo_first_line, *keywords, *(["STARTTLS"] if tls else [])))
        secured = ReplyTemplate(250, (profile.ehlo_first_line, *keywords))
        self.ehlo = _Compiled(plain, hostname)
        self.ehlo_tls = _Compiled(secured, hostname)
        self.helo = f"250 {hostname}\r\n".encode("ascii")


def _reply(code: int, enhanced: str, text: str) -> bytes:
    return f"{code} {enhanced} {text}\r\n".encode("ascii")


# Fixed protocol replies (not provider-specific: every MTA words these alike).
R_OK = _reply(250, "2.0.0", "Ok")
R_VRFY = _reply(252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery")
R_HELP = _reply(214, "2.0.0", "See RFC 5321")
R_STARTTLS = _reply(220, "2.0.0", "Ready to start TLS")
R_UNKNOWN = _reply(500, "5.5.2", "Error: command not recognized")
R_BAD_CHARS = _reply(500, "5.5.2", "Error: bare CR or NUL in command line")
R_TOO_LONG = _reply(500, "5.5.2", "Error: line too long")
R_EXPN = _reply(502, "5.5.1", "Error: command not implemented")
R_HELO_FIRST = _reply(503, "5.5.1", "Error: send HELO/EHLO first")
R_NESTED = _reply(503, "5.5.1", "Error: nested MAIL command")
R_NEED_MAIL = _reply(503, "5.5.1", "Error: need MAIL command")
R_NEED_RCPT = _reply(554, "5.5.1", "Error: no valid recipients")
R_MIXED = _reply(503, "5.5.1", "Error: DATA and BDAT cannot be mixed in one transaction")
R_TLS_AGAIN = _reply(503, "5.5.1", "Error: TLS already active")
R_NO_TLS = _reply(502, "5.5.1", "Error: STARTTLS not available")
R_SESSION_REFUSED = _reply(503, "5.5.1", "Error: session refused, send QUIT")
R_TOO_MANY_RCPTS = _reply(452, "4.5.3", "Error: too many recipients")
R_TOO_BIG = _reply(552, "5.3.4", "Error: message size exceeds fixed limit")
R_TOO_MANY_ERRORS = _reply(421, "4.7.0", "Error: too many errors, closing connection")
R_SHUTDOWN = _reply(421, "4.3.2", "Service shutting down, closing transmission channel")
R_IDLE = _reply(421, "4.4.2", "Error: timeout exceeded, closing connection")
R_SYN_EHLO = _reply(501, "5.5.4", "Syntax: EHLO hostname")
R_SYN_MAIL = _reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
R_SYN_RCPT = _reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
R_SYN_DATA = _reply(501, "5.5.4", "Syntax: DATA (no parameters)")
R_SYN_BDAT = _reply(501, "5.5.4", "Syntax: BDAT size [LAST]")
R_SYN_NOARG = _reply(501, "5.5.4", "Syntax: no parameters allowed")
R_BAD_SENDER = _reply(501, "5.1.7", "Bad sender address syntax")
R_BAD_RCPT = _reply(501, "5.1.3", "Bad recipient address syntax")
R_NEED_UTF8 = _reply(553, "5.6.7", "Non-ASCII address needs the SMTPUTF8 parameter")
R_BAD_PARAM = _reply(555, "5.5.4", "Unsupported MAIL/RCPT parameter")
R_BAD_BODY = _reply(501, "5.5.4", "Syntax: BODY=7BIT or BODY=8BITMIME")
R_BAD_SIZE = _reply(501, "5.5.4", "Syntax: SIZE=<number>")


class SinkHost(Protocol):
    """What a connection needs of the server that accepted it (``SinkServer``).

    A structural type rather than an import keeps the imports one way:
    ``server`` builds connections, connections never import ``server``.
    """

    config: SinkConfig
    stats: SinkStats
    traces: list[ConnectionTrace]
    connections: set[SinkProtocol]
    capture: CaptureWriter | None
    ssl_context: ssl.SSLContext | None

    def next_session_id(self) -> str: ...


class SinkProtocol(asyncio.Protocol):
    """One SMTP server connection. Not for direct use: see :class:`SinkServer`."""

    __slots__ = (
        "_bdat_last",
        "_bdat_left",
        "_bdat_refusal",
        "_bdat_used",
        "_buf",
        "_chunks",
        "_closing",
        "_codes",
        "_errors",
        "_esmtp",
        "_faults",
        "_greeted",
        "_held",
        "_ip",
        "_ipstats",
        "_l",
        "_line_len",
        "_long_line",
        "_max_data_line",
        "_max_line",
        "_messages",
        "_mode",
        "_out",
        "_qid",
        "_rcpts",
        "_refused",
        "_sender",
        "_server",
        "_size",
        "_stats",
        "_tail",
        "_tls",
        "_tls_pending",
        "_trace",
        "_transport",
        "_utf8",
        "_write_paused",
        "active",
    )

    def __init__(self, server: SinkHost, listener: ListenerRuntime) -> None:
        self._server = server
        self._l = listener
        self._stats = server.stats
        self._codes = server.stats.replies
        self._faults = listener.faults
        self._transport: asyncio.Transport | None = None
        self._buf = b""
        self._mode = _CMD
        self._out: list[bytes] = []
        self._greeted = False
        self._esmtp = False
        self._tls = False
        self._sender: bytes | None = None
        self._rcpts: list[bytes] = []
        self._utf8 = False
        self._size = 0
        self._tail = b""
        self._chunks: list[bytes] | None = None
        self._bdat_left = 0
        self._bdat_last = False
        self._bdat_refusal: bytes | None = None
        self._bdat_used = False
        self._errors = 0
        self._closing = False
        self._held = False
        #: 0: plain text; 1: STARTTLS accepted, 220 not yet written; 2: handshaking.
        self._tls_pending = 0
        self._write_paused = False
        self._refused = False
        self._ip = ""
        self._ipstats: IPStats = IPStats()
        self._qid = ""
        self._messages = 0
        #: Set on every read; the idle sweeper clears it and closes connections
        #: that stay silent a whole period (cheaper than a timer per read).
        self.active = True
        self._trace: ConnectionTrace | None = None
        self._max_line = server.config.max_line_length
        self._max_data_line = server.config.max_data_line
        self._line_len = 0
        self._long_line = False

    # ------------------------------------------------------------ lifecycle

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # create_server only makes stream transports; a cast, not an isinstance
        # check, because this runs once per connection.
        self._transport = transport = cast(asyncio.Transport, transport)
        server = self._server
        stats = self._stats
        peer = transport.get_extra_info("peername") or ("", 0)
        self._ip = ip = str(peer[0])
        self._qid = server.next_session_id()
        stats.connections += 1
        stats.active_connections += 1
        stats.max_concurrent_connections = max(stats.max_concurrent_connections, stats.active_connections)
        self._ipstats = stats.ip(ip)
        self._ipstats.connections += 1
        server.connections.add(self)
        if server.config.trace:
            self._trace = ConnectionTrace((ip, int(peer[1])))
            server.traces.append(self._trace)
        greeting = self._l.greeting
        wire = greeting.static or greeting.make(self._qid, ip)
        faults = self._faults
        if faults is None:
            self._codes[220] += 1
            transport.write(wire)
            return
        refusal = faults.connect(ip, self._qid)
        if refusal is not None:
            # 421: say why and hang up. 554: RFC 5321 3.1 says refuse every
            # command but QUIT and let the client end the session.
            self._refused = refusal.code != 421
            self._answer("connect", refusal.wire, refusal.code, refusal.close)
        else:
            self._answer("connect", wire, 220, False)
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stats.active_connections -= 1
        self._server.connections.discard(self)
        if self._faults is not None:
            self._faults.disconnect(self._ip)
        self._transport = None
        self._closing = True

    def pause_writing(self) -> None:
        # A client that pipelines but does not read its replies: stop reading
        # until it catches up, so our write buffer stays bounded.
        self._write_paused = True
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._transport is not None and not self._held:
            self._transport.resume_reading()

    def shut(self, reply: bytes) -> None:
        """Say *reply* (a 421) and close, whatever state the session is in."""
        if self._transport is None or self._closing:
            return
        self._send(reply, int(reply[:3]))
        self._closing = True
        self._held = False
        self._tls_pending = 0
        self._flush()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    # --------------------------------------------------------------- input

    def data_received(self, data: bytes) -> None:
        self.active = True
        trace = self._trace
        if trace is not None and trace.recorded < _TRACE_LIMIT:
            trace.reads.append(data)
            trace.commands.append([])
            trace.recorded += len(data)
        if self._held or self._closing:
            if self._closing or self._tls_pending == 1:
                return
            # Held by a tarpit delay, or (TLS handshake under way) decrypted
            # data the client sent right after its Finished: keep it in order.
            self._buf += data
            return
        if self._buf:
            data = self._buf + data
            self._buf = b""
        self._process(data)

    def _process(self, data: bytes) -> None:
        pos = 0
        n = len(data)
        max_line = self._max_line
        while pos < n:
            mode = self._mode
            if mode == _CMD:
                nl = data.find(b"\n", pos)
                if nl < 0:
                    if n - pos >= max_line:
                        self._error(R_TOO_LONG, 500)
                        self._mode = _SKIP
                        pos = n
                    else:
                        self._buf = data[pos:]
                    break
                if nl - pos >= max_line:  # the line with its LF is longer than allowed
                    self._error(R_TOO_LONG, 500)
                else:
                    self._command(data[pos:nl])
                pos = nl + 1
            elif mode == _DATA:
                pos = self._data(data, pos)
            elif mode == _BDAT:
                pos = self._bdat(data, pos)
            else:  # _SKIP: the rest of an over-long line
                nl = data.find(b"\n", pos)
                if nl < 0:
                    break
                pos = nl + 1
                self._mode = _CMD
            if self._held or self._closing:
                if self._tls_pending or self._closing:
                    break  # pipelined after STARTTLS or QUIT: discarded
                self._buf = data[pos:]
                break
        self._flush()

    def _flush(self) -> None:
        out = self._out
        if out:
            transport = self._transport
            if transport is not None:
                transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()
        if self._closing and not self._held and self._transport is not None:
            self._transport.close()
        elif self._tls_pending == 1 and self._transport is not None:
            # Stop reading now: plaintext the client pipelined after STARTTLS
            # (RFC 3207 section 6: an injection attempt) must never reach us;
            # start_tls resumes reading under TLS.
            self._transport.pause_reading()
            self._tls_pending = 2
            asyncio.get_running_loop().create_task(self._start_tls())

    # ------------------------------------------------------------- replies

    def _send(self, wire: bytes, code: int) -> None:
        self._out.append(wire)
        self._codes[code] += 1
        if code >= 400:
            self._ipstats.rejections += 1

    def _error(self, wire: bytes, code: int) -> None:
        """A protocol error: too many of them and the client is shown out."""
        self._send(wire, code)
        self._errors += 1
        if self._errors >= self._server.config.max_errors:
            self._send(R_TOO_MANY_ERRORS, 421)
            self._closing = True

    def _answer(self, phase: Any, wire: bytes, code: int, close: bool) -> None:
        """Send a reply of a fault-injected phase, after its delay if one is set."""
        assert self._faults is not None
        delay = self._faults.delay(phase)
        if delay > 0:
            # Tarpit: hold this reply and everything after it. Replies already
            # due go out now, so order is kept; reading pauses meanwhile.
            self._held = True
            self._flush()
            if self._transport is not None:
                self._transport.pause_reading()
            asyncio.get_running_loop().call_later(delay, self._release, wire, code, close)
            return
        self._send(wire, code)
        if close:
            self._closing = True

    def _release(self, wire: bytes, code: int, close: bool) -> None:
        self._held = False
        self.active = True  # a tarpit is not idleness
        if self._transport is None or self._closing:
            return  # closed meanwhile (idle sweep, shutdown, client gone)
        self._send(wire, code)
        if close:
            self._closing = True
            self._flush()
            return
        if not self._write_paused:
            self._transport.resume_reading()
        data, self._buf = self._buf, b""
        self._process(data)

    # ------------------------------------------------------------ commands

    def _command(self, line: bytes) -> None:
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
        handler = _HANDLERS.get(verb)
        if handler is None or (len(line) > 4 and line[4] != 0x20 and verb != b"STAR"):
            self._error(R_UNKNOWN, 500)
            return
        handler(self, line)

    def _reset_transaction(self) -> None:
        self._sender = None
        self._rcpts = []
        self._utf8 = False
        self._bdat_used = False
        self._chunks = None
        self._size = 0

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
            self._error(_reply(501, e.enhanced, e.text), 501)
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
            self._error(_reply(501, e.enhanced, e.text), 501)
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
        self._mode = _DATA
        self._size = 0
        # The CRLF that ended the DATA line counts as the start of the
        # terminator, so an empty message (".\r\n" at once) is recognized.
        self._tail = b"\r\n"
        self._chunks = [] if self._server.capture is not None else None
        self._line_len = 0
        self._long_line = False

    def _data(self, data: bytes, pos: int) -> int:
        """Consume message content from data[pos:]; return where it stopped."""
        n = len(data)
        tail = self._tail
        end = -1
        if tail:
            i = (tail + data[pos : pos + 4]).find(_TERMINATOR)
            if i >= 0:
                end = pos + i + 5 - len(tail)
        if end < 0:
            i = data.find(_TERMINATOR, pos)
            if i >= 0:
                end = i + 5
        if end < 0:
            self._size += n - pos
            chunks = self._chunks
            if chunks is not None:
                chunks.append(data[pos:] if pos else data)
                if self._size > self._server.config.max_message_size + 3:
                    self._chunks = None  # too big: stop keeping it, keep counting
            self._tail = data[-4:] if n - pos >= 4 else (tail + data[pos:])[-4:]
            if self._max_data_line and not self._long_line:
                self._scan_lines(data, pos, n)
            return n
        if self._max_data_line and not self._long_line:
            self._scan_lines(data, pos, end)
        self._size += end - pos
        chunks = self._chunks
        if chunks is not None:
            chunks.append(data[pos:end])
        self._mode = _CMD
        self._tail = b""
        size = self._size - 3  # without ".\r\n"
        content = unstuff(b"".join(chunks)[:size]) if chunks is not None else None
        self._finish_message(size, content)
        return end

    def _scan_lines(self, data: bytes, start: int, end: int) -> None:
        """Note whether data[start:end] holds a text line over the limit.

        Only runs when ``max_data_line`` is set: it visits every line, which
        the discard path otherwise never does.
        """
        limit = self._max_data_line
        run = self._line_len
        pos = start
        while True:
            nl = data.find(b"\n", pos, end)
            if nl < 0:
                run += end - pos
                if run > limit:
                    self._long_line = True
                break
            if run + nl - pos + 1 > limit:
                self._long_line = True
                break
            run = 0
            pos = nl + 1
        self._line_len = run

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
            self._chunks = [] if self._server.capture is not None else None
            self._line_len = 0
            self._long_line = False
        self._bdat_left = size
        self._bdat_last = len(parts) == 3
        self._bdat_refusal = refusal
        if size == 0:
            self._bdat_done()
        else:
            self._mode = _BDAT

    def _bdat(self, data: bytes, pos: int) -> int:
        take = min(self._bdat_left, len(data) - pos)
        end = pos + take
        if self._bdat_refusal is None:
            self._size += take
            if self._max_data_line and not self._long_line:
                self._scan_lines(data, pos, end)
            chunks = self._chunks
            if chunks is not None:
                chunks.append(data[pos:end])
                if self._size > self._server.config.max_message_size:
                    self._chunks = None
        self._bdat_left -= take
        if self._bdat_left == 0:
            self._mode = _CMD
            self._bdat_done()
        return end

    def _bdat_done(self) -> None:
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
                _reply(554, "5.6.0", f"Error: message has a line longer than {self._max_data_line} octets"), 554
            )
            return
        faults = self._faults
        if faults is not None:
            refusal = faults.end_of_data(self._ip, sender, rcpts, qid)
            if refusal is not None:
                self._stats.rejected_messages += 1
                self._answer("eod", refusal.wire, refusal.code, refusal.close)
                return
        stats = self._stats
        stats.messages += 1
        stats.bytes += size
        ipstats = self._ipstats
        ipstats.messages += 1
        ipstats.bytes += size
        capture = self._server.capture
        if capture is not None and content is not None:
            capture.write(qid, sender, rcpts, content)
        queued = self._l.queued
        wire = queued.static or queued.make(qid, self._ip, sender)
        if faults is not None:
            self._answer("eod", wire, 250, False)
            return
        self._out.append(wire)
        self._codes[250] += 1

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
        self._held = True
        self._tls_pending = 1

    async def _start_tls(self) -> None:
        transport = self._transport
        ctx = self._server.ssl_context
        if transport is None or ctx is None:
            return
        loop = asyncio.get_running_loop()
        try:
            new = await loop.start_tls(transport, self, ctx, server_side=True, ssl_handshake_timeout=30)
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError):
            transport.abort()
            return
        if new is None:
            transport.abort()
            return
        self._transport = new
        self._tls = True
        self._tls_pending = 0
        self._held = False
        self._stats.tls_sessions += 1
        # RFC 3207 4.2: the session starts over; the client must EHLO again.
        self._greeted = False
        self._esmtp = False
        self._reset_transaction()
        data, self._buf = self._buf, b""
        if data:
            self._process(data)


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


