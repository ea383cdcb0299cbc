# DKIM canonicalization (RFC 6376 3.4), included by _core.pyx.
# Twins in _core_ref.py: canonicalize_body, BodyCanonicalizer,
# canonicalize_header, split_header_fields.

cdef struct BodyState:
    bint relaxed
    bint prev_cr        # last byte was CR: a following LF belongs to it
    bint pending_wsp    # relaxed: a WSP run seen, not yet written
    bint any_content    # something other than line ends was written
    Py_ssize_t pending_crlf  # line ends held back: trailing empty lines are dropped


cdef inline Py_ssize_t _body_cap(BodyState* st, Py_ssize_t n):
    # Each input byte writes at most 2 (SP + byte), held-back line ends are
    # flushed at most once, finish adds one CRLF.
    return 2 * n + 2 * st.pending_crlf + 4


# Byte classes for the body scan: 0 content, 1 WSP (SP, HTAB), 2 CR, 3 LF.
cdef unsigned char _BODYCLASS[256]


cdef void _init_body_table() noexcept:
    cdef int c
    for c in range(256):
        _BODYCLASS[c] = 0
    _BODYCLASS[32] = 1
    _BODYCLASS[9] = 1
    _BODYCLASS[13] = 2
    _BODYCLASS[10] = 3


_init_body_table()


cdef Py_ssize_t _body_feed(BodyState* st, const unsigned char* src, Py_ssize_t n,
                           unsigned char* out) noexcept nogil:
    """Canonicalize src[0:n] into out; return bytes written. out has _body_cap room."""
    cdef Py_ssize_t i = 0, o = 0, k
    cdef unsigned char c, cls
    # The state lives in locals for the loop: writes through `out` (a char
    # pointer, which may alias anything) would otherwise force the compiler
    # to reload it from memory after every byte.
    cdef Py_ssize_t pending_crlf = st.pending_crlf
    cdef bint pending_wsp = st.pending_wsp
    cdef bint any_content = st.any_content
    # In simple mode WSP is plain content: class 1 counts as content.
    cdef unsigned char limit = 0 if st.relaxed else 1
    if st.prev_cr and n > 0:
        st.prev_cr = False
        if src[0] == 10:
            i = 1
    while i < n:
        c = src[i]
        cls = _BODYCLASS[c]
        if cls <= limit:
            # A run of content: flush what was held back, then copy the run.
            if pending_crlf:
                for k in range(pending_crlf):
                    out[o] = 13
                    out[o + 1] = 10
                    o += 2
                pending_crlf = 0
            if pending_wsp:
                out[o] = 32
                o += 1
                pending_wsp = False
            # Byte by byte: runs between spaces are short, a memcpy call
            # per word costs more than it saves.
            out[o] = c
            o += 1
            i += 1
            while i < n:
                c = src[i]
                if _BODYCLASS[c] > limit:
                    break
                out[o] = c
                o += 1
                i += 1
            any_content = True
        elif cls == 1:
            pending_wsp = True
            i += 1
            while i < n and _BODYCLASS[src[i]] == 1:
                i += 1
        else:
            # A line end (CRLF, lone CR or lone LF): held back until content follows.
            i += 1
            pending_crlf += 1
            pending_wsp = False  # trailing WSP of a line is dropped (relaxed)
            if c == 13:
                if i < n:
                    if src[i] == 10:
                        i += 1
                else:
                    st.prev_cr = True
    st.pending_crlf = pending_crlf
    st.pending_wsp = pending_wsp
    st.any_content = any_content
    return o


cdef Py_ssize_t _body_finish(BodyState* st, unsigned char* out) noexcept nogil:
    """Write the final line end (if any) and reset the state."""
    cdef Py_ssize_t o = 0
    if st.any_content or not st.relaxed:
        out[0] = 13
        out[1] = 10
        o = 2
    st.prev_cr = False
    st.pending_wsp = False
    st.any_content = False
    st.pending_crlf = 0
    return o


def canonicalize_body(bytes data not None, bint relaxed):
    """The canonical body of RFC 6376 3.4.3 (simple) or 3.4.4 (relaxed).

    Lone CR and lone LF count as line ends, because that is how ``to_wire``
    transmits them: the hash covers what the receiver will see.
    """
    cdef BodyState st
    st.relaxed = relaxed
    st.prev_cr = False
    st.pending_wsp = False
    st.any_content = False
    st.pending_crlf = 0
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef const unsigned char* src = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef unsigned char* out = <unsigned char*>malloc(_body_cap(&st, n))
    if out == NULL:
        raise MemoryError()
    cdef Py_ssize_t o
    try:
        with nogil:
            o = _body_feed(&st, src, n, out)
            o += _body_finish(&st, out + o)
        return PyBytes_FromStringAndSize(<char*>out, o)
    finally:
        free(out)


cdef class BodyCanonicalizer:
    """Incremental ``canonicalize_body``: feed chunks, hash what comes out.

    The output of all ``feed`` calls followed by ``finish`` equals
    ``canonicalize_body`` of the concatenated input, wherever the chunks split
    (a CRLF split across two chunks, a WSP run, held-back empty lines).
    """

    cdef BodyState st

    def __init__(self, bint relaxed):
        self.st.relaxed = relaxed
        self.st.prev_cr = False
        self.st.pending_wsp = False
        self.st.any_content = False
        self.st.pending_crlf = 0

    def feed(self, bytes data not None):
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        cdef unsigned char* out = <unsigned char*>malloc(_body_cap(&self.st, n))
        if out == NULL:
            raise MemoryError()
        cdef Py_ssize_t o
        try:
            o = _body_feed(&self.st, <const unsigned char*>PyBytes_AS_STRING(data), n, out)
            return PyBytes_FromStringAndSize(<char*>out, o)
        finally:
            free(out)

    def finish(self):
        cdef unsigned char out[4]
        cdef Py_ssize_t o = _body_finish(&self.st, out)
        return PyBytes_FromStringAndSize(<char*>out, o)


def canonicalize_header(bytes field not None, bint relaxed):
    """One header field (name, colon, value, folding, ending) in canonical form.

    simple: the field exactly as given, ending in CRLF. relaxed (RFC 6376
    3.4.2): lower-case name, unfolded, WSP runs become one SP, no WSP around
    the colon or at the end, ending in CRLF.
    """
    return _canon_header(field, relaxed)


cdef bytes _canon_header(bytes field, bint relaxed):
    cdef Py_ssize_t n = PyBytes_GET_SIZE(field)
    cdef const unsigned char* src = <const unsigned char*>PyBytes_AS_STRING(field)
    # Drop one line ending: CRLF, LF or CR.
    if n >= 2 and src[n - 2] == 13 and src[n - 1] == 10:
        n -= 2
    elif n >= 1 and (src[n - 1] == 10 or src[n - 1] == 13):
        n -= 1
    if not relaxed:
        return field[:n] + b"\r\n"
    cdef unsigned char* out = <unsigned char*>malloc(n + 2)
    if out == NULL:
        raise MemoryError()
    cdef Py_ssize_t i = 0, o = 0, colon = -1
    cdef unsigned char c
    cdef bint wsp = False, started = False
    try:
        # Name: up to the first colon, lower-cased, trailing WSP dropped.
        while i < n and src[i] != 58:
            c = src[i]
            if 65 <= c <= 90:
                c += 32
            out[o] = c
            o += 1
            i += 1
        while o > 0 and (out[o - 1] == 32 or out[o - 1] == 9):
            o -= 1
        if i < n:
            out[o] = 58
            o += 1
            i += 1
            # Value: unfolded (CR/LF removed), WSP runs -> one SP, no WSP at either end.
            while i < n:
                c = src[i]
                i += 1
                if c == 13 or c == 10:
                    continue
                if c == 32 or c == 9:
                    wsp = True
                    continue
                if wsp and started:
                    out[o] = 32
                    o += 1
                wsp = False
                started = True
                out[o] = c
                o += 1
        out[o] = 13
        out[o + 1] = 10
        o += 2
        return PyBytes_FromStringAndSize(<char*>out, o)
    finally:
        free(out)


def split_header_fields(bytes message not None):
    """Split the header block into fields (continuation lines included).

    Returns the fields, each with its own line ending, and the offset where
    the body starts (after the empty line; ``len(message)`` if there is none).
    Only CRLF and lone LF end lines here, so a stray CR inside a value stays.
    """
    cdef Py_ssize_t n = PyBytes_GET_SIZE(message)
    cdef const unsigned char* src = <const unsigned char*>PyBytes_AS_STRING(message)
    cdef list fields = []
    cdef Py_ssize_t pos = 0, end, start = -1
    while pos < n:
        end = pos
        while end < n and src[end] != 10:
            end += 1
        if end < n:
            end += 1
        # An empty line ("\r\n" or "\n") ends the header block.
        if (end - pos == 1 and src[pos] == 10) or (end - pos == 2 and src[pos] == 13 and src[pos + 1] == 10):
            if start >= 0:
                fields.append(message[start:pos])
            return fields, end
        if not (start >= 0 and (src[pos] == 32 or src[pos] == 9)):
            if start >= 0:
                fields.append(message[start:pos])
            start = pos
        pos = end
    if start >= 0:
        fields.append(message[start:n])
    return fields, n


def find_header_fields(bytes message not None, tuple names not None):
    """Where the fields named *names* (lower case) are, in a header section of plain lines only.

    Returns ``(end, spans)``: *end* is the offset just past the blank line that
    ends the section, *spans* the flat ``[start, end, start, end...]`` offsets
    of each matching field, continuation lines included. Returns None unless
    every line is ``name:value`` (name of printable ASCII, no colon) or a
    continuation of one, with no CR but in a CRLF, and a blank line ends the
    section: the caller then takes a line-by-line parser that names the fault.
    """
    cdef Py_ssize_t n = PyBytes_GET_SIZE(message)
    cdef const unsigned char* src = <const unsigned char*>PyBytes_AS_STRING(message)
    cdef const unsigned char* nl
    cdef const unsigned char* want
    cdef Py_ssize_t pos = 0, end, stop, i, k, length, open_at = -1
    cdef list spans = []
    cdef bytes name
    cdef bint same
    while pos < n:
        nl = <const unsigned char*>memchr(src + pos, 10, n - pos)
        if nl == NULL:
            return None  # no blank line
        end = nl - src + 1
        stop = end - 1
        if stop > pos and src[stop - 1] == 13:
            stop -= 1
        if memchr(src + pos, 13, stop - pos) != NULL:
            return None  # a CR that is not part of a CRLF
        if stop == pos:  # the blank line
            if pos == 0:
                return None
            if open_at >= 0:
                spans.append(open_at)
                spans.append(pos)
            return end, spans
        if src[pos] == 32 or src[pos] == 9:
            if pos == 0:
                return None
            pos = end
            continue
        i = pos
        while i < stop and src[i] != 58:
            if src[i] < 33 or src[i] > 126:
                return None
            i += 1
        if i == stop or i == pos:
            return None
        if open_at >= 0:
            spans.append(open_at)
            spans.append(pos)
            open_at = -1
        length = i - pos
        for name in names:
            if PyBytes_GET_SIZE(name) != length:
                continue
            want = <const unsigned char*>PyBytes_AS_STRING(name)
            same = True
            for k in range(length):
                if (src[pos + k] | 32 if 65 <= src[pos + k] <= 90 else src[pos + k]) != want[k]:
                    same = False
                    break
            if same:
                open_at = pos
                break
        pos = end
    return None


def index_header_fields(list fields not None):
    """Map each lower-case field name (WSP before the colon dropped) to its fields, in order."""
    cdef dict index = {}
    cdef bytes f, name
    cdef Py_ssize_t n, i, end
    cdef const unsigned char* s
    cdef list bucket
    cdef char buf[64]
    for f in fields:
        n = PyBytes_GET_SIZE(f)
        s = <const unsigned char*>PyBytes_AS_STRING(f)
        end = 0
        while end < n and s[end] != 58:
            end += 1
        while end > 0 and (s[end - 1] == 32 or s[end - 1] == 9):
            end -= 1
        if end <= 64:
            for i in range(end):
                buf[i] = <char>(s[i] + 32 if 65 <= s[i] <= 90 else s[i])
            name = PyBytes_FromStringAndSize(buf, end)
        else:
            name = f[:end].lower()
        bucket = index.get(name)
        if bucket is None:
            index[name] = [f]
        else:
            bucket.append(f)
    return index


def select_headers(dict by_name not None, tuple names not None, oversign not None, bint relaxed):
    """The h= names and the canonical header data for signed-header list *names*.

    Every instance of a listed field is signed, bottom-up (RFC 6376 5.4.2),
    one h= entry each; a name in *oversign* gets one entry more, which signs
    the null string and so forbids adding another such field later.
    """
    cdef list h = []
    cdef list data = []
    cdef bytes name
    cdef list instances
    cdef Py_ssize_t i
    for name in names:
        instances = by_name.get(name)
        if instances:
            for i in range(len(instances) - 1, -1, -1):
                data.append(_canon_header(instances[i], relaxed))
                h.append(name)
        if name in oversign:
            h.append(name)
    return b"".join(data), h
