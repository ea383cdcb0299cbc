# cython: language_level=3
"""The compiled transaction half of the SMTP client: reply parsing and the per-message state machine.

Same classes, names and behaviour as the pure-Python twin ``_client_ref.py``
(``ReplyParser`` there is ``fastmta.smtp.reply.ReplyParser``), which documents the
design; every client protocol test runs against both. What is compiled and
why: at 30,000 messages/s a client spends its time on four replies per
message (parse, match to the command, record) and on writing the next
envelope; in Python that was ~14 us per message, more than the kernel's
share of sending it.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.string cimport memchr

from collections import deque

from fastmta.errors import ProtocolError, Scope
from fastmta.smtp.reply import MAX_LINE, MAX_LINES, Reply
from fastmta.smtp.model import (
    Extensions,
    Phase,
    SessionFailed,
    SessionState,
    TransactionDone,
    TransactionResult,
)

__all__ = ["ProtocolCore", "ReplyParser"]

cdef Py_ssize_t _MAX_LINE = MAX_LINE
cdef Py_ssize_t _MAX_LINES = MAX_LINES
cdef object _tuple_new = tuple.__new__
cdef object _Reply = Reply

cdef object P_GREETING = Phase.GREETING
cdef object P_MAIL = Phase.MAIL
cdef object P_RCPT = Phase.RCPT
cdef object P_DATA = Phase.DATA
cdef object P_END_OF_DATA = Phase.END_OF_DATA
cdef object P_BDAT = Phase.BDAT
cdef object P_RSET = Phase.RSET
cdef object P_QUIT = Phase.QUIT

cdef enum:
    ST_GREETING = 0
    ST_HANDSHAKE = 1
    ST_TLS = 2
    ST_READY = 3
    ST_CLOSING = 4
    ST_CLOSED = 5

assert [int(s) for s in SessionState] == [ST_GREETING, ST_HANDSHAKE, ST_TLS, ST_READY, ST_CLOSING, ST_CLOSED]


# --- replies -------------------------------------------------------------------


cdef inline bint _is_space(unsigned char c):
    # Python's bytes regex \s: space, \t, \n, \r, \f, \v
    return c == 32 or 9 <= c <= 13


cdef object _enhanced_of(int code, const unsigned char* t, Py_ssize_t n):
    """The RFC 3463 code at the start of *t* when its class matches *code*, else None."""
    if n < 5 or t[1] != 46:  # '.'
        return None
    if t[0] != 48 + code // 100 or not (t[0] == 50 or t[0] == 52 or t[0] == 53):  # '2' '4' '5'
        return None
    cdef Py_ssize_t i = 2, start
    start = i
    while i < n and 48 <= t[i] <= 57:
        i += 1
    if i == start or i - start > 3 or i >= n or t[i] != 46:
        return None
    i += 1
    start = i
    while i < n and 48 <= t[i] <= 57:
        i += 1
    if i == start or i - start > 3 or (i < n and not _is_space(t[i])):
        return None
    return (<bytes>t[:i]).decode("ascii")


cdef inline str _decode(const unsigned char* t, Py_ssize_t n):
    # Replies should be ASCII; SMTPUTF8 servers may send UTF-8; anything else
    # is kept visible rather than rejected (same as fastmta.smtp.reply).
    return PyUnicode_DecodeUTF8(<const char*>t, n, "backslashreplace")


cdef class ReplyParser:
    """Feed bytes in, take complete replies out. No I/O, bounded memory."""

    cdef bytes _buf
    cdef int _code  # -1: not inside a multi-line reply
    cdef list _lines
    cdef bytes _first_text

    def __init__(self):
        self._buf = b""
        self._code = -1
        self._lines = []
        self._first_text = b""

    @property
    def pending(self):
        """True when part of a reply (a partial line or continuation) is buffered."""
        return bool(self._buf) or self._code != -1

    @property
    def buffered(self):
        """Bytes of an incomplete line held back."""
        return len(self._buf)

    def feed(self, data):
        """Add *data*; return the replies it completed, in order. Raises ProtocolError on garbage."""
        return self._feed(bytes(data))

    cdef list _feed(self, bytes data):
        cdef bytes buf = self._buf + data if self._buf else data
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(buf)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(buf)
        cdef Py_ssize_t start = 0, end, length
        cdef const unsigned char* nl
        cdef list out = []
        cdef object reply
        try:
            while start < n:
                nl = <const unsigned char*>memchr(p + start, 10, n - start)
                if nl == NULL:
                    break
                end = nl - p
                length = end - start
                if length and p[end - 1] == 13:
                    length -= 1
                reply = self._line(buf, start, length)
                if reply is not None:
                    out.append(reply)
                start = end + 1
            self._buf = buf[start:] if start < n else b""
            if PyBytes_GET_SIZE(self._buf) > _MAX_LINE:
                raise ProtocolError(f"reply line longer than {MAX_LINE} octets", scope=Scope.SESSION)
        except ProtocolError as exc:
            exc.replies = out  # the reference's feed says why: the replies before the garbage stand
            raise
        return out

    cdef object _line(self, bytes buf, Py_ssize_t start, Py_ssize_t n):
        cdef const unsigned char* s = <const unsigned char*>PyBytes_AS_STRING(buf) + start
        cdef int code
        cdef bint final
        cdef unsigned char sep
        cdef object text
        if n > _MAX_LINE:
            raise ProtocolError(f"reply line longer than {MAX_LINE} octets")
        if n < 3 or not (48 <= s[0] <= 57 and 48 <= s[1] <= 57 and 48 <= s[2] <= 57):
            raise ProtocolError(f"not an SMTP reply line: {buf[start:start + min(n, 80)]!r}")
        code = (s[0] - 48) * 100 + (s[1] - 48) * 10 + (s[2] - 48)
        if not 200 <= code <= 599:
            raise ProtocolError(f"reply code out of range: {buf[start:start + min(n, 80)]!r}")
        if n == 3:
            final = True
        else:
            sep = s[3]
            if sep == 45:  # '-'
                final = False
            elif sep == 32 or sep == 44:  # ' ' or ',' (Gmail has been seen ending "550,5.1.1 ...")
                final = True
            else:
                raise ProtocolError(f"bad separator after reply code: {buf[start:start + min(n, 80)]!r}")
        cdef const unsigned char* t = s + 4
        cdef Py_ssize_t tn = n - 4 if n > 4 else 0
        if self._code == -1:
            if final:
                # Fast path: a single-line reply (nearly all of them).
                return _tuple_new(_Reply, (code, (_decode(t, tn),), _enhanced_of(code, t, tn)))
            self._code = code
            self._first_text = buf[start + 4:start + 4 + tn]
        elif code != self._code:
            # postscreen's "220-..." then "521 5.3.2 ...": the last code is the reply's (see reply.py).
            self._code = code
            self._first_text = buf[start + 4:start + 4 + tn]
        if len(self._lines) >= _MAX_LINES:
            raise ProtocolError(f"reply longer than {MAX_LINES} lines")
        self._lines.append(_decode(t, tn))
        if not final:
            return None
        first = self._first_text
        reply = _tuple_new(_Reply, (code, tuple(self._lines),
                                    _enhanced_of(code, <const unsigned char*>PyBytes_AS_STRING(first), len(first))))
        self._code = -1
        self._lines = []
        self._first_text = b""
        return reply


# --- transactions ----------------------------------------------------------------


cdef inline bint _positive(object reply):
    cdef int code = reply[0]
    return 200 <= code < 400


cdef class _Txn:
    cdef public object result
    cdef public bint use_bdat
    cdef public Py_ssize_t rcpt_sent
    cdef public object body  # what goes after DATA: the transaction's, or its 7-bit form (no 8BITMIME)
    cdef public bint behind_dot  # its MAIL went right behind another transaction's end of data

    def __init__(self, result):
        self.result = result
        self.use_bdat = False
        self.rcpt_sent = 0
        self.body = None  # set by _begin
        self.behind_dot = False

    cdef bint any_rcpt_accepted(self):
        for r in self.result.rcpt_replies:
            if r is not None and _positive(r):
                return True
        return False


cdef class ProtocolCore:
    """Transactions over one SMTP session; subclassed by ``ClientProtocol``."""

    cdef public bint allow_pipelining
    cdef public bint allow_bdat
    cdef public bint tls_active
    cdef public int _state
    cdef public bint _quit_requested
    # What the session half may read but not replace: the hot path trusts their types.
    cdef readonly list _events
    cdef readonly object _expect  # deque of (phase, _Txn or None, recipient index)
    cdef readonly object _queue  # deque of _Txn
    cdef readonly object _active  # deque of _Txn
    cdef readonly bytearray _out
    cdef readonly ReplyParser _parser
    # Complete replies taken so far: the connection restarts its reply timer
    # only when this moves, so a peer trickling bytes cannot extend it.
    cdef readonly Py_ssize_t replies_received
    # Replies to a MAIL sent right behind an end of data (RFC 2920): some servers drop such
    # commands; the connection waits less for the first one (SMTPConnection, Timeouts.mail_after_data).
    cdef readonly Py_ssize_t dot_mails_answered
    cdef object _open
    cdef bint _rset_needed
    cdef bint _rset_waiting  # without PIPELINING: an RSET written, its reply not in yet
    cdef Py_ssize_t _unsent  # of _expect, how many (the last) await commands still in _out, not yet written
    cdef list _content_out  # results of the transactions whose content is in _out
    cdef Py_ssize_t _bdat_active
    cdef object _extensions
    # The extension flags the hot path reads, copied out of the Extensions record.
    cdef bint _ext_pipelining
    cdef bint _ext_8bit
    cdef bint _ext_utf8
    cdef bint _ext_chunking
    cdef bint _has_size  # SIZE offered (then " SIZE=n" goes on MAIL)
    cdef bint _ext_dsn  # DSN offered (then a transaction's DSN parameters go on MAIL and RCPT)
    cdef object _size_limit  # its value: a Python int, any size (0: no limit)

    def __cinit__(self, *args, **kwargs):
        # In __cinit__, not __init__: these exist even if a subclass forgets
        # to call __init__, so the hot path never meets a None.
        self._parser = ReplyParser()
        self._out = bytearray()
        self._events = []
        self._expect = deque([(P_GREETING, None, 0)])
        self._content_out = []
        self._queue = deque()
        self._active = deque()
        self._state = ST_GREETING
        self._set_extensions(Extensions())

    def __init__(self, pipelining, use_bdat):
        self.allow_pipelining = pipelining
        self.allow_bdat = use_bdat
        self.tls_active = False
        self._open = None
        self._rset_needed = False
        self._rset_waiting = False
        self._bdat_active = 0
        self._quit_requested = False
        self.dot_mails_answered = 0

    # --- queries ------------------------------------------------------------

    @property
    def awaited_behind_dot(self):
        """Whether the oldest reply awaited is to a MAIL sent right behind an end of data."""
        if not self._expect:
            return False
        phase, txn, _ = self._expect[0]
        return phase is P_MAIL and txn is not None and (<_Txn>txn).behind_dot

    @property
    def extensions(self):
        return self._extensions

    @extensions.setter
    def extensions(self, value):
        self._set_extensions(value)

    @property
    def waiting_for(self):
        """The phase of the oldest reply we wait for (selects the timeout)."""
        return self._expect[0][0] if self._expect else None

    @property
    def is_ready(self):
        return self._state == ST_READY

    @property
    def is_closed(self):
        return self._state == ST_CLOSED

    @property
    def accepts_transactions(self):
        """False once QUIT is queued or the session ended: start_transaction would refuse."""
        return self._state < ST_CLOSING

    @property
    def in_flight(self):
        """Transactions accepted and not yet finished."""
        return len(self._queue) + len(self._active)

    @property
    def pipelining(self):
        return self._pipelining()

    cdef inline bint _pipelining(self):
        return self.allow_pipelining and self._ext_pipelining

    # --- input and output ---------------------------------------------------

    def receive_data(self, data):
        """Feed bytes from the server; return the events they caused (see the reference's)."""
        cdef list replies
        try:
            replies = self._parser._feed(bytes(data))
        except ProtocolError as exc:
            self._take(exc.replies)
            raise
        self._take(replies)
        events = self._events
        self._events = []
        return events

    cdef void _take(self, list replies) except *:
        cdef tuple expected
        cdef object phase, txn
        self.replies_received += len(replies)
        for reply in replies:
            if len(self._expect) <= self._unsent:  # the reference's _take says why
                if reply[0] == 421:
                    self._fail_session(reply, self._expect[0][0] if self._expect else P_QUIT)
                    break
                raise ProtocolError(f"unsolicited reply: {reply}" if not self._expect
                                    else f"reply before its command was sent: {reply}")
            expected = self._expect.popleft()
            phase = expected[0]
            txn = expected[1]
            if reply[0] == 421 and phase is not P_QUIT:
                # 421: the server is closing the channel (RFC 5321 3.8).
                self._fail_session(reply, phase)
                break
            if txn is None:
                self._on_session_reply(reply, phase)
                if phase is P_RSET and self._rset_waiting:
                    self._rset_waiting = False
                    self._pump_c()
            else:
                code = reply[0]
                # The reference's _fits_phase (RFC 5321 4.3.2): DATA takes 354 or a failure, the others no 3yz.
                if (code != 354 and code < 400) if phase is P_DATA else code // 100 == 3:
                    raise ProtocolError(f"reply {code} to {phase.value}: not a reply that command can have")
                self._on_txn_reply(reply, phase, <_Txn?>txn, expected[2])

    def start_transaction(self, transaction):
        """Queue a transaction; its result arrives later as TransactionDone."""
        if self._state >= ST_CLOSING:
            raise ProtocolError("session is closing; no new transactions")
        self._queue.append(_Txn(TransactionResult(transaction, rcpt_replies=[None] * len(transaction.recipients))))
        if self._state == ST_READY:
            self._pump_c()
        events = self._events
        self._events = []
        return events

    def data_to_send(self):
        """Bytes to write now; everything produced since the last call, in one write."""
        if not self._out:
            return b""
        out = bytes(self._out)
        self._out = bytearray()
        self._unsent = 0
        if self._content_out:  # the reference's data_to_send says why
            for result in self._content_out:
                result.content_sent = True
            self._content_out = []
        return out

    # --- for the session half (ClientProtocol) --------------------------------

    def _on_session_reply(self, reply, phase):
        raise NotImplementedError

    def _drain(self):
        events = self._events
        self._events = []
        return events

    def _send(self, line, phase):
        """Write a session command (EHLO, STARTTLS, QUIT, ...) and await its reply."""
        self._out += line
        self._expect.append((phase, None, 0))
        self._unsent += 1

    def _set_extensions(self, extensions):
        self._extensions = extensions
        self._ext_pipelining = extensions.pipelining
        self._ext_8bit = extensions.eightbitmime
        self._ext_utf8 = extensions.smtputf8
        self._ext_chunking = extensions.chunking
        self._has_size = extensions.size is not None
        self._ext_dsn = "DSN" in extensions.keywords
        self._size_limit = extensions.size  # may exceed any C integer ("SIZE 99999999999999999999")

    def _fail_session(self, reply, phase):
        self._state = ST_CLOSED
        self._expect.clear()
        self._unsent = 0
        self._content_out = []
        self._open = None
        pending = list(self._active) + list(self._queue)
        self._active.clear()
        self._bdat_active = 0
        self._queue.clear()
        for txn in pending:
            (<_Txn?>txn).result.error = reply
            (<_Txn?>txn).result.error_phase = phase
            self._events.append(TransactionDone((<_Txn?>txn).result))
        self._events.append(SessionFailed(reply, phase))

    def _pump(self):
        """Write the next queued envelopes if the session allows it now."""
        self._pump_c()

    def _maybe_quit(self):
        self._maybe_quit_c()

    cdef void _pump_c(self) except *:
        while self._queue and self._state == ST_READY and self._open is None:
            if not self._pipelining() and (self._active or self._rset_waiting):
                return  # lock-step: one transaction (or the RSET before it) at a time
            if self._bdat_active:
                return  # a BDAT transaction's outcome decides whether RSET is needed
            if self._rset_needed and not self._pipelining():
                # The reference's reason: the next MAIL waits for RSET's reply (RFC 5321 4.1.4, RFC 2920 3).
                self._rset_needed = False
                self._rset_waiting = True
                self._send(b"RSET\r\n", P_RSET)
                return
            self._begin(<_Txn?>self._queue.popleft())
        self._maybe_quit_c()

    cdef void _maybe_quit_c(self) except *:
        if self._quit_requested and self._state == ST_READY and not self._queue and self._open is None:
            if not self._pipelining() and (self._active or self._rset_waiting):
                return
            self._state = ST_CLOSING
            self._send(b"QUIT\r\n", P_QUIT)

    # --- transactions -------------------------------------------------------

    cdef inline void _expect_txn(self, bytes line, object phase, _Txn txn, Py_ssize_t index) except *:
        self._out += line
        self._expect.append((phase, txn, index))
        self._unsent += 1

    cdef void _begin(self, _Txn txn) except *:
        t = txn.result.transaction
        body = t.body
        cdef bint utf8 = t.needs_smtputf8
        if utf8 and not self._ext_utf8:
            self._finish_local(txn, Reply.local(553, "5.6.7", "non-ASCII address and the server does not offer SMTPUTF8"))
            return
        cdef bint use_bdat = self.allow_bdat and self._ext_chunking
        if not self._ext_8bit and body.eight_bit:
            body = body.seven_bit  # RFC 6152 3: never 8-bit octets to a server that did not offer 8BITMIME
        txn.body = body
        cdef Py_ssize_t size = body.size
        limit = self._size_limit
        if self._has_size and limit and size > limit:
            self._finish_local(txn, Reply.local(552, "5.3.4", f"message size {size} exceeds the server's SIZE limit {limit}"))
            return
        txn.use_bdat = use_bdat
        # Another transaction still awaits its final reply: this MAIL rides behind its end of data
        # (_pump begins one only once no DATA awaits its 354, and never behind a BDAT).
        txn.behind_dot = len(self._active) > 0
        if txn.behind_dot:
            txn.result.behind_dot = True
        self._bdat_active += use_bdat
        if self._rset_needed:
            self._send(b"RSET\r\n", P_RSET)
            self._rset_needed = False
        cdef bytes params = b""
        if self._has_size:
            params = b" SIZE=%d" % size
        if self._ext_8bit and body.eight_bit:
            params += b" BODY=8BITMIME"
        if utf8:
            params += b" SMTPUTF8"
        if self._ext_dsn and t.dsn is not None:  # RFC 3461: only to a server that offers DSN
            params += <bytes>t.dsn.mail
        self._active.append(txn)
        self._expect_txn(b"MAIL FROM:<" + (<str>t.sender).encode() + b">" + params + b"\r\n", P_MAIL, txn, 0)
        cdef Py_ssize_t i
        if self._pipelining():
            for i in range(len(t.recipients)):
                self._send_rcpt(txn, i)
            self._send_data_command(txn)

    cdef void _send_rcpt(self, _Txn txn, Py_ssize_t index) except *:
        t = txn.result.transaction
        rcpt = t.recipients[index]
        if self._ext_dsn and t.dsn is not None:
            self._expect_txn(b"RCPT TO:<" + (<str>rcpt).encode() + b">" + <bytes>t.dsn.rcpts[index] + b"\r\n",
                             P_RCPT, txn, index)
        else:
            self._expect_txn(b"RCPT TO:<" + (<str>rcpt).encode() + b">\r\n", P_RCPT, txn, index)
        txn.rcpt_sent = index + 1

    cdef void _send_data_command(self, _Txn txn) except *:
        if txn.use_bdat:
            payload = txn.body.bdat_wire
            self._expect_txn(b"BDAT %d LAST\r\n" % len(payload), P_BDAT, txn, 0)
            self._out += payload
            self._content_out.append(txn.result)
        else:
            self._expect_txn(b"DATA\r\n", P_DATA, txn, 0)
            self._open = txn

    cdef void _on_txn_reply(self, object reply, object phase, _Txn txn, Py_ssize_t index) except *:
        result = txn.result
        cdef bint positive = _positive(reply)
        if phase is P_MAIL:
            result.mail_reply = reply
            if txn.behind_dot:
                self.dot_mails_answered += 1
            if not self._pipelining():
                if positive:
                    self._send_rcpt(txn, 0)
                else:
                    self._finish(txn)
        elif phase is P_RCPT:
            rcpt_replies = result.rcpt_replies
            rcpt_replies[index] = reply
            mail = result.mail_reply
            if not self._pipelining() and mail is not None and _positive(mail):
                if txn.rcpt_sent < len(rcpt_replies):
                    self._send_rcpt(txn, txn.rcpt_sent)
                elif txn.any_rcpt_accepted():
                    self._send_data_command(txn)
                else:
                    self._rset_needed = True
                    self._finish(txn)
        elif phase is P_DATA:
            result.data_reply = reply
            self._open = None
            if reply[0] == 354:
                # Content, dot and (via _pump) the next envelope: one write.
                if txn.any_rcpt_accepted():
                    self._out += txn.body.data_wire
                    self._content_out.append(result)
                else:
                    self._out += b".\r\n"  # a broken server said 354 with no recipients: end it empty
                self._expect.append((P_END_OF_DATA, txn, 0))
                self._unsent += 1
            else:
                mail = result.mail_reply
                if mail is not None and _positive(mail):
                    self._rset_needed = True
                self._finish(txn)
        else:  # END_OF_DATA or BDAT
            result.final_reply = reply
            if phase is P_BDAT and not positive:
                mail = result.mail_reply
                if mail is not None and _positive(mail):
                    self._rset_needed = True
            self._finish(txn)
        self._pump_c()

    cdef void _finish(self, _Txn txn) except *:
        active = self._active
        if active and active[0] is txn:  # replies come in order: nearly always the oldest
            active.popleft()
            self._bdat_active -= txn.use_bdat
        else:
            for other in active:
                if other is txn:
                    active.remove(txn)
                    self._bdat_active -= txn.use_bdat
                    break
        self._events.append(TransactionDone(txn.result))

    cdef void _finish_local(self, _Txn txn, object reply) except *:
        txn.result.error = reply
        txn.result.error_phase = P_MAIL
        self._events.append(TransactionDone(txn.result))
