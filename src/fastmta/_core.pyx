# cython: language_level=3
"""The compiled hot path. bytes in, bytes out; imports nothing from fastmta.

Every public function here has a pure-Python twin in ``_core_ref.py`` with
the same name and signature. The twin is the test oracle and the fallback
(``FASTMTA_NO_EXTENSIONS=1``); ``fastmta.core`` picks one of the two.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy


def to_wire(bytes data not None):
    """Return *data* as an SMTP DATA payload, terminator included.

    Line endings are normalized to CRLF (a lone CR or a lone LF becomes CRLF),
    lines starting with '.' are dot-stuffed (RFC 5321 4.5.2), a final CRLF is
    added when missing and the ``.\\r\\n`` terminator is appended.
    """
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef const unsigned char* src = <const unsigned char*>PyBytes_AS_STRING(data)
    # Worst case: every byte is a lone LF/CR that grows to CRLF followed by a
    # stuffed dot, i.e. < 2n, plus final CRLF and terminator.
    cdef Py_ssize_t cap = 2 * n + 8
    cdef unsigned char* out = <unsigned char*>malloc(cap)
    if out == NULL:
        raise MemoryError()
    cdef Py_ssize_t i = 0, o = 0
    cdef unsigned char c
    cdef bint at_line_start = True
    try:
        while i < n:
            c = src[i]
            if at_line_start and c == 46:  # '.'
                out[o] = 46
                o += 1
            if c == 13:  # CR: CRLF or lone CR, both become CRLF
                out[o] = 13
                out[o + 1] = 10
                o += 2
                if i + 1 < n and src[i + 1] == 10:
                    i += 1
                at_line_start = True
            elif c == 10:  # lone LF
                out[o] = 13
                out[o + 1] = 10
                o += 2
                at_line_start = True
            else:
                out[o] = c
                o += 1
                at_line_start = False
            i += 1
        if not at_line_start:
            out[o] = 13
            out[o + 1] = 10
            o += 2
        out[o] = 46
        out[o + 1] = 13
        out[o + 2] = 10
        o += 3
        return PyBytes_FromStringAndSize(<char*>out, o)
    finally:
        free(out)


def normalize_crlf(bytes data not None):
    """Return *data* with every line ending as CRLF and a final CRLF.

    This is the BDAT (CHUNKING) form of a message: no dot-stuffing, no
    terminator. An empty message stays empty.
    """
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef const unsigned char* src = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t cap = 2 * n + 2
    cdef unsigned char* out = <unsigned char*>malloc(cap)
    if out == NULL:
        raise MemoryError()
    cdef Py_ssize_t i = 0, o = 0
    cdef unsigned char c
    cdef bint at_line_start = True
    try:
        while i < n:
            c = src[i]
            if c == 13:
                out[o] = 13
                out[o + 1] = 10
                o += 2
                if i + 1 < n and src[i + 1] == 10:
                    i += 1
                at_line_start = True
            elif c == 10:
                out[o] = 13
                out[o + 1] = 10
                o += 2
                at_line_start = True
            else:
                out[o] = c
                o += 1
                at_line_start = False
            i += 1
        if not at_line_start:
            out[o] = 13
            out[o + 1] = 10
            o += 2
        return PyBytes_FromStringAndSize(<char*>out, o)
    finally:
        free(out)


include "_core_dkim.pxi"
include "_core_render.pxi"
