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


cdef Py_ssize_t _body_feed(BodyState* st, const unsigned char* src, Py_ssize_t n,
                           unsigned char* out) noexcept nogil:
    """Canonicalize src[0:n] into out; return bytes written. out has _body_cap room."""
    cdef Py_ssize_t i = 0, o = 0, k
    cdef unsigned char c
    cdef bint relaxed = st.relaxed
    if st.prev_cr and n > 0:
        st.prev_cr = False
        if src[0] == 10:
            i = 1
    while i < n:
        c = src[i]
        i += 1
        if c == 13 or c == 10:
            # A line end (CRLF, lone CR or lone LF): held back until content follows.
            st.pending_crlf += 1
            st.pending_wsp = False  # trailing WSP of a line is dropped (relaxed)
            if c == 13:
                if i < n:
                    if src[i] == 10:
                        i += 1
                else:
                    st.prev_cr = True
        elif relaxed and (c == 32 or c == 9):
            st.pending_wsp = True
        else:
            if st.pending_crlf:
                for k in range(st.pending_crlf):
                    out[o] = 13
                    out[o + 1] = 10
                    o += 2
                st.pending_crlf = 0
            if st.pending_wsp:
                out[o] = 32
                o += 1
                st.pending_wsp = False
            out[o] = c
            o += 1
            st.any_content = True
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
