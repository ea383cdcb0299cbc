"""A sink connection's transport side: bytes in, framed; replies out, batched.

This is the hot path: every byte of every message passes through
:meth:`SinkConnection.data_received`, so it is written for speed first
(plain attributes, precomputed replies, one write per read) and calls into
fault injection only when faults are configured. What it does:

* splits the input into command lines and message content (DATA up to the
  exact ``CRLF.CRLF``, searched for across read boundaries; BDAT by count),
  counting content without copying it unless capture is on;
* answers all complete command lines of one read with one write, in order
  (RFC 2920 pipelining), holding replies back for a tarpit delay;
* the connection lifecycle: greeting, back-pressure, shutdown, the
  STARTTLS transport upgrade.

What a command line means, and whether a message is accepted, is the SMTP
dialogue of :class:`fastmta.sink.protocol.SinkProtocol`, the subclass the
server instantiates; it overrides the three hooks at the end of this class.
The split is by job (framing and output here, interpretation there), not a
cost on the hot path: CPython 3.11+ caches slot and method lookups per
type, so a slot or method of a base class is reached as fast as one of the
class itself.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from fastmta.sink.capture import CaptureWriter, unstuff
from fastmta.sink.config import SinkConfig
from fastmta.sink.listener import ListenerRuntime
from fastmta.sink.replies import R_TOO_LONG, R_TOO_MANY_ERRORS
from fastmta.sink.stats import IPStats, SinkStats

#: What the input currently is: command lines, DATA content, a BDAT chunk,
#: or the rest of an over-long command line being skipped.
MODE_CMD, MODE_DATA, MODE_BDAT, MODE_SKIP = 0, 1, 2, 3
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


class SinkHost(Protocol):
    """What a connection needs of the server that accepted it (``SinkServer``).

    A structural type rather than an import keeps the imports one way:
    ``server`` builds connections, connections never import ``server``.
    """

    config: SinkConfig
    stats: SinkStats
    traces: list[ConnectionTrace]
    # The base type: SinkProtocol's module imports this one, not the reverse.
    connections: set[SinkConnection]
    capture: CaptureWriter | None
    ssl_context: ssl.SSLContext | None

    def next_session_id(self) -> str: ...


class SinkConnection(asyncio.Protocol):
    """The transport side of one sink connection; see :class:`SinkProtocol`.

    It holds the whole per-connection state, the dialogue's too: one
    ``__slots__`` list, so every attribute is a slot of the same object.
    """

    __slots__ = (
        "_bdat_last",
        "_bdat_left",
        "_bdat_refusal",
        "_bdat_used",
        "_buf",
        "_capture_held",
        "_capture_overflow",
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
        "received",
    )

    def __init__(self, server: SinkHost, listener: ListenerRuntime) -> None:
        self._server = server
        self._l = listener
        self._stats = server.stats
        self._codes = server.stats.replies
        self._faults = listener.faults
        self._transport: asyncio.Transport | None = None
        self._buf = b""
        self._mode = MODE_CMD
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
        # Capture mode: octets of this message held in _chunks, counted
        # against the server-wide budget; set when the budget ran out.
        self._capture_held = 0
        self._capture_overflow = False
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
        #: Progress, judged by the idle sweeper once a period (cheaper than a
        #: timer per read): ``active`` is set by every *complete* command line
        #: (and by a tarpit's release), ``received`` counts the octets read.
        #: Mere bytes do not count as progress, or a client trickling one byte
        #: every few seconds would hold the connection forever (slowloris); see
        #: ``SinkServer._sweep``.
        self.active = True
        self.received = 0
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
        self._release_capture()

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
        self.received += len(data)
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
            if mode == MODE_CMD:
                nl = data.find(b"\n", pos)
                if nl < 0:
                    if n - pos >= max_line:
                        self._error(R_TOO_LONG, 500)
                        self._mode = MODE_SKIP
                        pos = n
                    else:
                        self._buf = data[pos:]
                    break
                self.active = True  # a complete line: progress
                if nl - pos >= max_line:  # the line with its LF is longer than allowed
                    self._error(R_TOO_LONG, 500)
                else:
                    self._command(data[pos:nl])
                pos = nl + 1
            elif mode == MODE_DATA:
                pos = self._data(data, pos)
            elif mode == MODE_BDAT:
                pos = self._bdat(data, pos)
            else:  # MODE_SKIP: the rest of an over-long line
                nl = data.find(b"\n", pos)
                if nl < 0:
                    break
                pos = nl + 1
                self._mode = MODE_CMD
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

    # ------------------------------------------------------------- content
    # Message content is framed here, next to the loop that feeds it, and
    # counted without being looked at; the dialogue only sees its end.

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
            if self._chunks is not None:
                if self._size > self._server.config.max_message_size + 3:
                    self._release_capture()  # too big: stop keeping it, keep counting
                else:
                    self._keep(data[pos:] if pos else data)
            self._tail = data[-4:] if n - pos >= 4 else (tail + data[pos:])[-4:]
            if self._max_data_line and not self._long_line:
                self._scan_lines(data, pos, n)
            return n
        if self._max_data_line and not self._long_line:
            self._scan_lines(data, pos, end)
        self._size += end - pos
        if self._chunks is not None:
            self._keep(data[pos:end])
        chunks = self._chunks
        self._mode = MODE_CMD
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

    def _bdat(self, data: bytes, pos: int) -> int:
        take = min(self._bdat_left, len(data) - pos)
        end = pos + take
        if self._bdat_refusal is None:
            self._size += take
            if self._max_data_line and not self._long_line:
                self._scan_lines(data, pos, end)
            if self._chunks is not None:
                if self._size > self._server.config.max_message_size:
                    self._release_capture()
                else:
                    self._keep(data[pos:end])
        self._bdat_left -= take
        if self._bdat_left == 0:
            self._mode = MODE_CMD
            self._bdat_done()
        return end

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

    def _reset_transaction(self) -> None:
        # Here, not in the dialogue: the STARTTLS restart below needs it too.
        self._sender = None
        self._rcpts = []
        self._utf8 = False
        self._bdat_used = False
        self._release_capture()
        self._size = 0

    # ------------------------------------------------------------- capture
    # Only in capture mode. Content held for capture counts against one
    # budget for the whole server (SinkConfig.capture_memory): 20 clients
    # streaming 40 MB each must not take 800 MB. Past the budget the message
    # is not kept and is refused with a 4xx at its end: the client retries,
    # nothing is lost.

    def _budget(self) -> CaptureWriter | None:
        """The memory budget this connection's content counts against (one for the server here)."""
        return self._server.capture

    def _keep(self, piece: bytes) -> None:
        capture = self._budget()
        if capture is not None and capture.reserve(len(piece)) and self._chunks is not None:
            self._chunks.append(piece)
            self._capture_held += len(piece)
        else:
            self._release_capture()
            self._capture_overflow = True

    def _release_capture(self) -> None:
        self._chunks = None
        if self._capture_held:
            capture = self._budget()
            if capture is not None:
                capture.release(self._capture_held)
            self._capture_held = 0

    # ------------------------------------------------------------ STARTTLS

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

    # ------------------------------------------------- hooks of the dialogue
    # Overridden by SinkProtocol. Declared here so the framing above can call
    # them and type-check without importing the module that subclasses this.

    def _command(self, line: bytes) -> None:
        """Answer one command line (without its LF)."""
        raise NotImplementedError

    def _bdat_done(self) -> None:
        """A BDAT chunk has been read in full: answer it."""
        raise NotImplementedError

    def _finish_message(self, size: int, content: bytes | None) -> None:
        """End of data (DATA dot or BDAT LAST): accept or refuse the message."""
        raise NotImplementedError
