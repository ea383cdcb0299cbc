"""Pure-Python reference for every function in ``_core.pyx``.

Same names, same signatures, same output. Written for obviousness, not speed:
this is the oracle the compiled code is tested against, and the fallback when
the extension is not built or ``FASTMTA_NO_EXTENSIONS=1`` is set.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence

# Escaping modes of a template slot (``render``); the numbers are part of the
# interface between template.py and both core implementations.
MODE_TEXT = 0  # inserted as is (text parts, ``raw``)
MODE_HTML = 1  # HTML-escaped, same entities as markupsafe/Jinja2
MODE_URL_COMPONENT = 2  # everything but RFC 3986 unreserved is %-encoded
MODE_URL = 3  # a whole URL: unsafe bytes %-encoded, then HTML-escaped for the attribute
MODE_HEADER = 4  # control characters but TAB become a space: a value can never start a new header

# C0 controls except TAB, and DEL: not allowed in a header field body (RFC 5322).
_HEADER_CONTROLS = {c: " " for c in [*range(9), *range(10, 32), 127]}

_HTML_ENTITIES = {
    "&": "&amp;",
    "<": "&lt;",
    ">": "&gt;",
    '"': "&#34;",
    "'": "&#39;",
}
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Characters a whole URL keeps: unreserved, RFC 3986 reserved, and '%' (already encoded).
_URL_KEEP = _UNRESERVED | frozenset(b":/?#[]@!$&'()*+,;=%")


def normalize_crlf(data: bytes) -> bytes:
    """Every line ending becomes CRLF (lone CR and lone LF too); final CRLF added."""
    if not data:
        return b""
    text = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if not text.endswith(b"\r\n"):
        text += b"\r\n"
    return text


def to_wire(data: bytes) -> bytes:
    """CRLF-normalize, dot-stuff (RFC 5321 4.5.2) and terminate with ``.\\r\\n``."""
    text = normalize_crlf(data)
    if text.startswith(b"."):
        text = b"." + text
    text = text.replace(b"\r\n.", b"\r\n..")
    return text + b".\r\n"


# --------------------------------------------------------------------------
# DKIM canonicalization (RFC 6376 3.4)
# --------------------------------------------------------------------------


def _lines(data: bytes) -> list[bytes]:
    """Split on CRLF, lone CR and lone LF alike (to_wire sends all three as CRLF)."""
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")


def canonicalize_body(data: bytes, relaxed: bool) -> bytes:
    """The canonical body of RFC 6376 3.4.3 (simple) or 3.4.4 (relaxed).

    Lone CR and lone LF count as line ends, because that is how ``to_wire``
    transmits them: the hash covers what the receiver will see.
    """
    lines = _lines(data)
    if relaxed:
        lines = [re.sub(rb"[ \t]+", b" ", line).rstrip(b" ") for line in lines]
    while lines and lines[-1] == b"":
        lines.pop()
    if not lines:
        return b"" if relaxed else b"\r\n"
    return b"\r\n".join(lines) + b"\r\n"


class BodyCanonicalizer:
    """Incremental ``canonicalize_body``: feed chunks, hash what comes out.

    The output of all ``feed`` calls followed by ``finish`` equals
    ``canonicalize_body`` of the concatenated input, wherever the chunks split.
    The reference simply buffers; the compiled twin streams.
    """

    def __init__(self, relaxed: bool) -> None:
        self._relaxed = relaxed
        self._buf: list[bytes] = []

    def feed(self, data: bytes) -> bytes:
        self._buf.append(data)
        return b""

    def finish(self) -> bytes:
        out = canonicalize_body(b"".join(self._buf), self._relaxed)
        self._buf = []
        return out


def canonicalize_header(field: bytes, relaxed: bool) -> bytes:
    """One header field (name, colon, value, folding, ending) in canonical form.

    simple: the field exactly as given, ending in CRLF. relaxed (RFC 6376
    3.4.2): lower-case name, unfolded, WSP runs become one SP, no WSP around
    the colon or at the end, ending in CRLF.
    """
    if field.endswith(b"\r\n"):
        field = field[:-2]
    elif field.endswith((b"\n", b"\r")):
        field = field[:-1]
    if not relaxed:
        return field + b"\r\n"
    name, sep, value = field.partition(b":")
    name = name.rstrip(b" \t").lower()
    value = value.replace(b"\r", b"").replace(b"\n", b"")
    value = re.sub(rb"[ \t]+", b" ", value).strip(b" ")
    return name + sep + value + b"\r\n"


def split_header_fields(message: bytes) -> tuple[list[bytes], int]:
    """Split the header block into fields (continuation lines included).

    Returns the fields, each with its own line ending, and the offset where
    the body starts (after the empty line; ``len(message)`` if there is none).
    Only CRLF and lone LF end lines here, so a stray CR inside a value stays.
    """
    fields: list[bytes] = []
    pos = 0
    n = len(message)
    while pos < n:
        end = message.find(b"\n", pos)
        end = n if end < 0 else end + 1
        line = message[pos:end]
        if line in (b"\r\n", b"\n"):
            return fields, end
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1] += line
        else:
            fields.append(line)
        pos = end
    return fields, n


def find_header_fields(message: bytes, names: tuple[bytes, ...]) -> tuple[int, list[int]] | None:
    """Where the fields named *names* (lower case) are, in a header section of plain lines only.

    Returns ``(end, spans)``: *end* is the offset just past the blank line that
    ends the section, *spans* the flat ``[start, end, start, end...]`` offsets
    of each matching field, continuation lines included. Returns None unless
    every line is ``name:value`` (name of printable ASCII, no colon) or a
    continuation of one, with no CR but in a CRLF, and a blank line ends the
    section: the caller then takes a line-by-line parser that names the fault.
    """
    spans: list[int] = []
    pos = 0
    open_at = -1
    while pos < len(message):
        nl = message.find(b"\n", pos)
        if nl < 0:
            return None
        end = nl + 1
        line = message[pos:nl]
        if line.endswith(b"\r"):
            line = line[:-1]
        if b"\r" in line:
            return None
        if not line:
            if pos == 0:
                return None
            if open_at >= 0:
                spans += [open_at, pos]
            return end, spans
        if line[:1] in (b" ", b"\t"):
            if pos == 0:
                return None
            pos = end
            continue
        name, colon, _ = line.partition(b":")
        if not colon or not name or any(c < 33 or c > 126 for c in name):
            return None
        if open_at >= 0:
            spans += [open_at, pos]
            open_at = -1
        if name.lower() in names:
            open_at = pos
        pos = end
    return None


def index_header_fields(fields: list[bytes]) -> dict[bytes, list[bytes]]:
    """Map each lower-case field name (WSP before the colon dropped) to its fields, in order."""
    index: dict[bytes, list[bytes]] = {}
    for f in fields:
        index.setdefault(f.split(b":", 1)[0].rstrip(b" \t").lower(), []).append(f)
    return index


def select_headers(
    by_name: dict[bytes, list[bytes]], names: tuple[bytes, ...], oversign: Collection[bytes], relaxed: bool
) -> tuple[bytes, list[bytes]]:
    """The h= names and the canonical header data for signed-header list *names*.

    Every instance of a listed field is signed, bottom-up (RFC 6376 5.4.2),
    one h= entry each; a name in *oversign* gets one entry more, which signs
    the null string and so forbids adding another such field later.
    """
    h: list[bytes] = []
    data: list[bytes] = []
    for name in names:
        for field in reversed(by_name.get(name, [])):
            data.append(canonicalize_header(field, relaxed))
            h.append(name)
        if name in oversign:
            h.append(name)
    return b"".join(data), h


# --------------------------------------------------------------------------
# Template rendering
# --------------------------------------------------------------------------


def escape(value: str, mode: int) -> bytes:
    """One merge value as UTF-8 bytes, escaped for the context *mode*."""
    if mode == MODE_TEXT:
        return value.encode("utf-8", "surrogatepass")
    if mode == MODE_HTML:
        return "".join(_HTML_ENTITIES.get(c, c) for c in value).encode("utf-8", "surrogatepass")
    if mode == MODE_HEADER:
        return value.translate(_HEADER_CONTROLS).encode("utf-8", "surrogatepass")
    keep = _UNRESERVED if mode == MODE_URL_COMPONENT else _URL_KEEP
    out = bytearray()
    for b in value.encode("utf-8", "surrogatepass"):
        if b in keep:
            if mode == MODE_URL and b == 0x26:  # '&' in an attribute
                out += b"&amp;"
            elif mode == MODE_URL and b == 0x27:  # "'" may close the attribute
                out += b"&#39;"
            else:
                out.append(b)
        else:
            out += b"%%%02X" % b
    return bytes(out)


def render(literals: Sequence[bytes], modes: bytes, values: Sequence[str]) -> bytes:
    """``literals[0] + escape(values[0], modes[0]) + literals[1] + ...``.

    ``len(literals) == len(values) + 1 == len(modes) + 1``; literals are the
    campaign's pre-encoded UTF-8 segments, values the recipient's strings.
    """
    if len(literals) != len(values) + 1 or len(modes) != len(values):
        raise ValueError("render: need one more literal than values, one mode per value")
    out = [literals[0]]
    for value, mode, literal in zip(values, modes, literals[1:]):
        if not isinstance(value, str):
            raise TypeError(f"merge values must be str, not {type(value).__name__}")
        out.append(escape(value, mode))
        out.append(literal)
    return b"".join(out)


# --------------------------------------------------------------------------
# Transfer encodings
# --------------------------------------------------------------------------


def is_7bit_safe(data: bytes, max_line: int) -> bool:
    """True when *data* can go as 7bit: ASCII without NUL, every line <= max_line octets.

    Line ends are any of CRLF, CR, LF (to_wire sends all three as CRLF).
    """
    if not data.isascii() or b"\0" in data:
        return False
    return all(len(line) <= max_line for line in _lines(data))


def _qp_line(line: bytes) -> list[bytes]:
    """One logical line, quoted-printable, cut into physical lines of <= 76 octets."""
    tokens: list[bytes] = []
    for i, b in enumerate(line):
        trailing_ws = b in (0x20, 0x09) and i == len(line) - 1
        if (33 <= b <= 126 and b != 0x3D) or (b in (0x20, 0x09) and not trailing_ws):
            tokens.append(bytes((b,)))
        else:
            tokens.append(b"=%02X" % b)
    # A line-initial '.' is encoded so that no relay can mangle dot-stuffing, and a '-': a soft
    # break must never put a text's "--boundary" at the start of a line (it would end the part).
    if tokens[:1] == [b"."]:
        tokens[0] = b"=2E"
    elif tokens[:1] == [b"-"]:
        tokens[0] = b"=2D"
    out: list[bytes] = []
    cur = b""
    for tok in tokens:
        if len(cur) + len(tok) > 75:  # 75 + the "=" soft break = 76
            out.append(cur + b"=")
            cur = b""
            if tok == b".":
                tok = b"=2E"
            elif tok == b"-":
                tok = b"=2D"
        cur += tok
    out.append(cur)
    return out


def quoted_printable(data: bytes) -> bytes:
    """RFC 2045 6.7 quoted-printable of a text body; CRLF line ends, every line <= 76.

    Line ends (CRLF, CR or LF) stay hard line breaks; a final line end is
    added when missing; empty input stays empty.
    """
    if not data:
        return b""
    lines = _lines(data)
    if lines[-1] == b"":
        lines.pop()
    out: list[bytes] = []
    for line in lines:
        out.extend(_qp_line(line))
    return b"\r\n".join(out) + b"\r\n"
