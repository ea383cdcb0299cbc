# Template rendering and transfer encodings, included by _core.pyx.
# Twins in _core_ref.py: escape, render, is_7bit_safe, quoted_printable.

MODE_TEXT = 0
MODE_HTML = 1
MODE_URL_COMPONENT = 2
MODE_URL = 3
MODE_HEADER = 4

# Per byte: 1 = RFC 3986 unreserved, 2 = reserved or '%' (a whole URL keeps them).
cdef unsigned char _URLCLASS[256]
cdef const char* _HEX = b"0123456789ABCDEF"


cdef void _init_tables() noexcept:
    cdef int c
    for c in range(256):
        _URLCLASS[c] = 0
    for c in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~":
        _URLCLASS[c] = 1
    for c in b":/?#[]@!$&'()*+,;=%":
        _URLCLASS[c] = 2


_init_tables()


cdef inline Py_ssize_t _escaped_len(const unsigned char* s, Py_ssize_t n, int mode) noexcept nogil:
    cdef Py_ssize_t i, size = 0
    cdef unsigned char c
    if mode == 0 or mode == 4:
        return n
    for i in range(n):
        c = s[i]
        if mode == 1:
            if c == 38 or c == 34 or c == 39:  # & " '
                size += 5
            elif c == 60 or c == 62:  # < >
                size += 4
            else:
                size += 1
        elif mode == 2:
            size += 1 if _URLCLASS[c] == 1 else 3
        else:
            if c == 38 or c == 39:
                size += 5
            elif _URLCLASS[c]:
                size += 1
            else:
                size += 3
    return size


cdef inline Py_ssize_t _escape_into(const unsigned char* s, Py_ssize_t n, int mode,
                                    unsigned char* out) noexcept nogil:
    cdef Py_ssize_t i, o = 0
    cdef unsigned char c
    if mode == 0:
        memcpy(out, s, n)
        return n
    for i in range(n):
        c = s[i]
        if mode == 1:
            if c == 38:
                memcpy(out + o, b"&amp;", 5)
                o += 5
            elif c == 60:
                memcpy(out + o, b"&lt;", 4)
                o += 4
            elif c == 62:
                memcpy(out + o, b"&gt;", 4)
                o += 4
            elif c == 34:
                memcpy(out + o, b"&#34;", 5)
                o += 5
            elif c == 39:
                memcpy(out + o, b"&#39;", 5)
                o += 5
            else:
                out[o] = c
                o += 1
        elif mode == 4:
            # Every control character but TAB becomes a space: CR, LF and NUL
            # could start a header, and the others (VT, FF, ...) are not allowed
            # in a field body (RFC 5322) and are read as whitespace by some DKIM
            # verifiers and not by others.
            out[o] = 32 if ((c < 32 and c != 9) or c == 127) else c
            o += 1
        elif mode == 3 and c == 38:
            memcpy(out + o, b"&amp;", 5)
            o += 5
        elif mode == 3 and c == 39:
            memcpy(out + o, b"&#39;", 5)
            o += 5
        elif _URLCLASS[c] == 1 or (mode == 3 and _URLCLASS[c] == 2):
            out[o] = c
            o += 1
        else:
            out[o] = 37  # '%'
            out[o + 1] = _HEX[c >> 4]
            out[o + 2] = _HEX[c & 15]
            o += 3
    return o


cdef inline int _check_mode(int mode) except -1:
    if mode < 0 or mode > 4:
        raise ValueError(f"unknown escaping mode {mode}")
    return 0


def escape(str value not None, int mode):
    """One merge value as UTF-8 bytes, escaped for the context *mode*."""
    _check_mode(mode)
    cdef Py_ssize_t n
    cdef const unsigned char* s = <const unsigned char*>PyUnicode_AsUTF8AndSize(value, &n)
    cdef Py_ssize_t size = _escaped_len(s, n, mode)
    cdef bytes result = PyBytes_FromStringAndSize(NULL, size)
    _escape_into(s, n, mode, <unsigned char*>PyBytes_AS_STRING(result))
    return result


def render(literals, bytes modes not None, values):
    """``literals[0] + escape(values[0], modes[0]) + literals[1] + ...``.

    ``len(literals) == len(values) + 1 == len(modes) + 1``; literals are the
    campaign's pre-encoded UTF-8 segments, values the recipient's strings.
    Two passes over small values (measure, then write) so the result is
    built in place with no intermediate strings.
    """
    cdef Py_ssize_t nvals = len(values)
    if len(literals) != nvals + 1 or PyBytes_GET_SIZE(modes) != nvals:
        raise ValueError("render: need one more literal than values, one mode per value")
    cdef const unsigned char* m = <const unsigned char*>PyBytes_AS_STRING(modes)
    cdef Py_ssize_t i, total = 0, o = 0, n
    cdef object lit, val
    cdef const unsigned char* s
    # Keep the UTF-8 pointers of the values (owned by the str objects, which
    # `values` keeps alive) between the two passes.
    cdef const unsigned char** ptrs = <const unsigned char**>malloc((nvals + 1) * sizeof(void*))
    cdef Py_ssize_t* lens = <Py_ssize_t*>malloc((nvals + 1) * sizeof(Py_ssize_t))
    if ptrs == NULL or lens == NULL:
        free(ptrs)
        free(lens)
        raise MemoryError()
    cdef bytes result
    cdef unsigned char* out
    try:
        for i in range(nvals + 1):
            lit = literals[i]
            if type(lit) is not bytes:
                raise TypeError("render: literals must be bytes")
            total += PyBytes_GET_SIZE(lit)
        for i in range(nvals):
            _check_mode(m[i])
            val = values[i]
            if type(val) is not str:
                raise TypeError(f"merge values must be str, not {type(val).__name__}")
            ptrs[i] = <const unsigned char*>PyUnicode_AsUTF8AndSize(val, &n)
            lens[i] = n
            total += _escaped_len(ptrs[i], n, m[i])
        result = PyBytes_FromStringAndSize(NULL, total)
        out = <unsigned char*>PyBytes_AS_STRING(result)
        for i in range(nvals + 1):
            lit = literals[i]
            n = PyBytes_GET_SIZE(lit)
            memcpy(out + o, PyBytes_AS_STRING(lit), n)
            o += n
            if i < nvals:
                o += _escape_into(ptrs[i], lens[i], m[i], out + o)
        return result
    finally:
        free(ptrs)
        free(lens)


def is_7bit_safe(bytes data not None, Py_ssize_t max_line):
    """True when *data* can go as 7bit: ASCII without NUL, every line <= max_line octets.

    Line ends are any of CRLF, CR, LF (to_wire sends all three as CRLF).
    ``bytes.isascii`` checks a word at a time and memchr finds NULs and line
    ends: 164 -> 31 µs on a 100 KB HTML part (a byte loop before).
    """
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef const unsigned char* s = <const unsigned char*>PyBytes_AS_STRING(data)
    if not data.isascii() or memchr(s, 0, n) != NULL:
        return False
    cdef Py_ssize_t start = 0, end
    cdef Py_ssize_t next_cr = _next(s, 0, n, 13), next_lf = _next(s, 0, n, 10)
    while True:
        end = next_cr if next_cr < next_lf else next_lf
        if end - start > max_line:
            return False
        if end >= n:
            return True
        start = end + 1  # a CRLF's LF then ends an empty line: its length 0 is fine
        if next_cr < start:
            next_cr = _next(s, start, n, 13)
        if next_lf < start:
            next_lf = _next(s, start, n, 10)


def quoted_printable(bytes data not None):
    """RFC 2045 6.7 quoted-printable of a text body; CRLF line ends, every line <= 76.

    Line ends (CRLF, CR or LF) stay hard line breaks; a final line end is
    added when missing; empty input stays empty.
    """
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    if n == 0:
        return b""
    cdef const unsigned char* s = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef unsigned char* out = <unsigned char*>malloc(4 * n + 16)
    if out == NULL:
        raise MemoryError()
    cdef Py_ssize_t i = 0, o = 0, cur = 0, toklen
    cdef unsigned char c
    cdef bint literal, last
    try:
        while i < n:
            c = s[i]
            if c == 13 or c == 10:
                out[o] = 13
                out[o + 1] = 10
                o += 2
                cur = 0
                i += 1
                if c == 13 and i < n and s[i] == 10:
                    i += 1
                continue
            if 33 <= c <= 126 and c != 61 and cur < 75 and not ((c == 46 or c == 45) and cur == 0):
                # Fast path: a plain printable byte that fits on the line.
                out[o] = c
                o += 1
                cur += 1
                i += 1
                continue
            i += 1
            last = i == n or s[i] == 13 or s[i] == 10
            if c == 32 or c == 9:
                literal = not last
            else:
                literal = 33 <= c <= 126 and c != 61
            toklen = 1 if literal else 3
            if cur + toklen > 75:  # 75 + the "=" soft break = 76
                out[o] = 61
                out[o + 1] = 13
                out[o + 2] = 10
                o += 3
                cur = 0
            if literal and (c == 46 or c == 45) and cur == 0:
                # A line-initial '.' is encoded so that no relay can mangle
                # dot-stuffing, and a '-': a soft break must never put a text's
                # "--boundary" at the start of a line (it would end the part).
                literal = False
                toklen = 3
            if literal:
                out[o] = c
                o += 1
            else:
                out[o] = 61
                out[o + 1] = _HEX[c >> 4]
                out[o + 2] = _HEX[c & 15]
                o += 3
            cur += toklen
        if cur > 0 or not (s[n - 1] == 13 or s[n - 1] == 10):
            out[o] = 13
            out[o + 1] = 10
            o += 2
        return PyBytes_FromStringAndSize(<char*>out, o)
    finally:
        free(out)
