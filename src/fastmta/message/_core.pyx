# cython: language_level=3
"""The compiled hot path. bytes in, bytes out; imports nothing from fastmta.

Every public function here has a pure-Python twin in ``_core_ref.py`` with
the same name and signature. The twin is the test oracle and the fallback
(``FASTMTA_NO_EXTENSIONS=1``); ``fastmta.message.core`` picks one of the two.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.stdlib cimport malloc, free
from libc.string cimport memchr, memcpy

#: Inputs this large are worked on without the GIL (see ``_crlf``).
cdef enum:
    _NOGIL_BYTES = 16384


cdef inline Py_ssize_t _next(const unsigned char* src, Py_ssize_t i, Py_ssize_t n, int c) noexcept nogil:
    """Index of the first *c* in src[i:n], or n."""
    cdef const void* hit = memchr(src + i, c, n - i)
    return n if hit == NULL else <const unsigned char*>hit - src


cdef Py_ssize_t _crlf_into(const unsigned char* src, Py_ssize_t n, unsigned char* out,
                           bint stuff, bint terminate) noexcept nogil:
    """The work of ``_crlf``: src[0:n] into out (room for 2n + 8); return bytes written.

    Line by line: memchr finds the next CR and the next LF (each searched
    again only once passed, so the whole input is scanned once per byte
    value) and memcpy copies the line between. A byte loop was 3-4x slower
    on 100 KB HTML.
    """
    cdef Py_ssize_t i = 0, o = 0, end, run
    cdef Py_ssize_t next_cr = _next(src, 0, n, 13), next_lf = _next(src, 0, n, 10)
    cdef bint at_line_start = True
    while i < n:
        if stuff and at_line_start and src[i] == 46:  # '.' opening a line
            out[o] = 46
            o += 1
        end = next_cr if next_cr < next_lf else next_lf
        run = end - i
        if run:
            memcpy(out + o, src + i, run)
            o += run
            i = end
            at_line_start = False
        if i == n:
            break
        # CRLF, lone CR or lone LF: all become CRLF
        out[o] = 13
        out[o + 1] = 10
        o += 2
        if src[i] == 13 and i + 1 < n and src[i + 1] == 10:
            i += 1
        i += 1
        at_line_start = True
        if next_cr < i:
            next_cr = _next(src, i, n, 13)
        if next_lf < i:
            next_lf = _next(src, i, n, 10)
    if not at_line_start:
        out[o] = 13
        out[o + 1] = 10
        o += 2
    if terminate:
        out[o] = 46
        out[o + 1] = 13
        out[o + 2] = 10
        o += 3
    return o


cdef bytes _crlf(bytes data, bint stuff, bint terminate):
    """CRLF-normalize *data* (lone CR and lone LF become CRLF, a final CRLF is
    added to non-empty data), optionally dot-stuffing and appending ``.\\r\\n``.

    One pass into one preallocated buffer: the worst case is every byte a
    lone CR/LF growing to CRLF or a stuffed dot, so < 2n plus the tail.
    """
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef const unsigned char* src = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef unsigned char* out = <unsigned char*>malloc(2 * n + 8)
    if out == NULL:
        raise MemoryError()
    cdef Py_ssize_t o
    try:
        if n >= _NOGIL_BYTES:
            # A large message is encoded without the GIL (fastmta send does
            # it on a signing thread); a small one keeps it, so the event loop
            # never waits to get the GIL back from a thread for µs of work.
            with nogil:
                o = _crlf_into(src, n, out, stuff, terminate)
        else:
            o = _crlf_into(src, n, out, stuff, terminate)
        return PyBytes_FromStringAndSize(<char*>out, o)
    finally:
        free(out)


def to_wire(bytes data not None):
    """Return *data* as an SMTP DATA payload, terminator included.

    Line endings are normalized to CRLF (a lone CR or a lone LF becomes CRLF),
    lines starting with '.' are dot-stuffed (RFC 5321 4.5.2), a final CRLF is
    added when missing and the ``.\\r\\n`` terminator is appended.
    """
    return _crlf(data, True, True)


def normalize_crlf(bytes data not None):
    """Return *data* with every line ending as CRLF and a final CRLF.

    This is the BDAT (CHUNKING) form of a message: no dot-stuffing, no
    terminator. An empty message stays empty.
    """
    return _crlf(data, False, False)


include "_core_dkim.pxi"
include "_core_render.pxi"
