"""8-bit message bodies made 7-bit, their meaning kept: for a server without 8BITMIME, and before signing.

RFC 6152 (section 3) forbids sending 8-bit data to a server that did not
offer 8BITMIME: the client converts the message or returns it. Postfix's
client converts by default (``disable_mime_output_conversion = no``), and so
does fastmta, the same way: every MIME leaf part whose body holds 8-bit
octets under an identity encoding (``7bit``, ``8bit``, ``binary`` or none) is
re-encoded, ``text/*`` as quoted-printable (still readable, ~1-3x the 8-bit
octets), anything else as base64; its Content-Transfer-Encoding field is
replaced. Multipart bodies are walked by their boundary and ``message/*``
parts (``message/rfc822``, ``message/global``, ``message/news``) recursively
(RFC 2046 5.2.1: a message part is never encoded itself, its insides are).
Every other byte is kept: header fields, preambles and epilogues (but their
8-bit octets, which no reader shows, become ``?``), and every part that was
7-bit already, so a converted message differs from the original only where it
had to.

Left as they are, 8-bit or not: ``multipart/signed`` and
``multipart/encrypted`` (RFC 1847: a conversion inside breaks the S/MIME or
PGP signature; sendmail leaves them too), other ``message/*`` types (a
delivery report's fields are not a message's), and 8-bit octets in header
fields, the inner headers of a forwarded message included (no encoding is
allowed there; raw UTF-8 in the top-level header needs SMTPUTF8, RFC 6532,
which the client asks for and refuses the message without).

Malformed input still comes out 7-bit, with its decoded meaning kept where
there is one: a part labelled quoted-printable that holds raw 8-bit octets is
decoded (decoders pass such octets through as they are) and encoded again; a
part labelled base64 loses them (decoders skip anything outside the
alphabet); a part whose first line is not a header field has no header
section (as Python's parser reads it). A multipart whose boundary is nowhere
in its body, or nested deeper than MAX_DEPTH, is left as it is (it may not be
encoded whole). A body outside
MIME (no MIME-Version) gets MIME-Version, and, having no Content-Type, says
``text/plain; charset=utf-8`` when its octets are UTF-8 and ``unknown-8bit``
(RFC 1428) when not: what quoted-printable then decodes to is the original's
octets either way.

Signing: a DKIM signature covers the body's octets, so a conversion on the way
breaks it (RFC 6376 5.3). Mail fastmta signs is converted before signing
(:func:`fastmta.message.dkim_policy`), so it never needs a conversion later;
mail signed by someone else and sent to a server without 8BITMIME is
converted anyway, as Postfix does: a broken signature fails DKIM, 8-bit octets
on a 7-bit path may be mangled or refused outright.
"""

from __future__ import annotations

import base64
import binascii
import re
from email.parser import BytesHeaderParser
from email.policy import compat32

from fastmta.message import core

__all__ = ["body_is_8bit", "seven_bit"]

# Deeper nesting than this is left as it is: a hostile message could nest
# multiparts to make the walk recurse (and copy) without end.
MAX_DEPTH = 16
_HEADER_PARSER = BytesHeaderParser(policy=compat32)
# A header field's first line as Python's parser knows one (email.feedparser.headerRE): a name of
# printable ASCII but the colon (even none), the colon; or an mbox "From " line.
_FIELD = re.compile(rb"From |[!-9;-~]*:")
_HIGH = bytes(range(0x80, 0x100))
_HIGH_TO_QUESTION = bytes.maketrans(_HIGH, b"?" * 0x80)
_NEVER_INSIDE = frozenset({"multipart/signed", "multipart/encrypted"})
_MESSAGES = frozenset({"message/rfc822", "message/global", "message/news"})


def body_is_8bit(message: bytes) -> bool:
    """Whether *message* has 8-bit octets after its header section (what a conversion changes)."""
    if message.isascii():
        return False
    data = core.normalize_crlf(message)  # lone CRs end lines too, on the wire
    _fields, start = _split_head(data)
    return not data[start:].isascii()


def seven_bit(message: bytes) -> bytes:
    """*message* (CRLF line ends) with a 7-bit body that decodes to what the original's did.

    Returns *message* itself when its body is 7-bit already.
    """
    if not body_is_8bit(message):
        return message
    return _entity(core.normalize_crlf(message), "text/plain", 0, top=True)


def _split_head(data: bytes) -> tuple[list[bytes], int]:
    """(header fields, where the body starts) as Python's parser reads them: the header section ends
    at the empty line, or before the first line that is neither a field nor a field's continuation."""
    starts: list[int] = []  # where each field begins; a field runs to the next one's start
    pos, n = 0, len(data)
    body = n
    while pos < n:
        end = data.find(b"\r\n", pos)
        end = n if end < 0 else end + 2
        if end - pos == 2 and data[pos:end] == b"\r\n":  # the empty line
            body = end
            break
        if data[pos] in (32, 9):  # a continuation line (of nothing, first: Python keeps it in the header)
            if not starts:
                starts.append(pos)
        elif _FIELD.match(data, pos):
            starts.append(pos)
        else:
            body = pos
            break
        pos = end
    ends = [*starts[1:], pos] if starts else []  # the last field ends where the loop stopped
    # Sliced once each (a field folded over many lines is not copied once a line: that was quadratic).
    return [data[a:b] for a, b in zip(starts, ends, strict=True)], body


def _entity(data: bytes, default_type: str, depth: int, *, top: bool = False) -> bytes:
    fields, start = _split_head(data)
    body = data[start:]
    if body.isascii():
        return data
    head = _HEADER_PARSER.parsebytes(b"".join(fields) + b"\r\n")
    head.set_default_type(default_type)
    ctype = head.get_content_type()
    cte = str(head.get("content-transfer-encoding", "")).strip().lower()
    blank = data[sum(map(len, fields)):start]  # the empty line (none if the body starts without one)
    maintype = ctype.partition("/")[0]
    if ctype in _NEVER_INSIDE or (maintype == "message" and ctype not in _MESSAGES):
        return data
    if maintype in ("multipart", "message"):
        # Never encoded whole (RFC 2045 6.4, RFC 2046 5.2.1): walked inside, or left as it is (too deep,
        # or a multipart whose boundary is nowhere to be found).
        if depth >= MAX_DEPTH:
            return data
        if maintype == "message":
            inner = _entity(body, "text/plain", depth + 1)
            # 8-bit octets left in the inner message's header fields: it stays 8bit (no encoding is allowed)
            relabel = "7bit" if cte in ("8bit", "binary") and inner.isascii() else None
            return _head(fields, relabel) + (blank or b"\r\n") + inner
        boundary = head.get_boundary()
        parts = None if boundary is None else _multipart(body, boundary, ctype == "multipart/digest", depth)
        if parts is None:
            return data
        # Relabelled 7bit only if nothing 8-bit is left inside (a signed part).
        return _head(fields, "7bit" if cte in ("8bit", "binary") and parts.isascii() else None) + blank + parts
    new_body, new_cte = _leaf(body, cte, maintype == "text")
    extra = b""
    if top and "mime-version" not in head:
        extra += b"MIME-Version: 1.0\r\n"
    if "content-type" not in head and maintype == "text":
        charset = "utf-8" if _is_utf8(body) else "unknown-8bit"
        extra += f"Content-Type: text/plain; charset={charset}\r\n".encode()
    return _head(fields, new_cte) + extra + (blank or b"\r\n") + new_body


def _leaf(body: bytes, cte: str, text: bool) -> tuple[bytes, str | None]:
    """(7-bit body, the new Content-Transfer-Encoding or None to keep the field)."""
    if cte == "base64":
        return body.translate(None, _HIGH), None  # decoders skip what is not in the alphabet
    # The CRLF before a boundary belongs to the boundary (RFC 2046 5.1.1): a body
    # without a final line end must come back without one.
    ends_line = body.endswith(b"\r\n")
    name: str | None
    if cte == "quoted-printable":
        body = binascii.a2b_qp(body)  # what it decodes to: raw octets pass through
        name = None if text else "base64"
    else:
        name = "quoted-printable" if text else "base64"
    encoded = core.quoted_printable(body) if text else base64.encodebytes(body).replace(b"\n", b"\r\n")
    if not ends_line and encoded.endswith(b"\r\n"):
        encoded = encoded[:-2]
    return encoded, name


def _multipart(body: bytes, boundary: str, digest: bool, depth: int) -> bytes | None:
    """The multipart *body* with each part converted; None when no delimiter line is found."""
    try:
        mark = boundary.encode("ascii")
    except UnicodeEncodeError:
        return None
    # A delimiter line: "--" boundary, "--" more for the last one, then only
    # white space to the end of the line; the CRLF before it is part of it.
    delimiter = re.compile(rb"(?:^|\r\n)--" + re.escape(mark) + rb"(--)?[ \t]*(?=\r\n|$)")
    matches = list(delimiter.finditer(body))
    if not matches:
        return None
    default = "message/rfc822" if digest else "text/plain"
    out = [_no_high(body[: matches[0].start()])]  # the preamble
    for i, m in enumerate(matches):
        out.append(m[0])
        if m[1] is not None:  # the close delimiter: the rest is the epilogue
            out.append(_no_high(body[m.end():]))
            break
        last = i + 1 == len(matches)  # and no close delimiter: the part runs to the end...
        end = len(body) - 2 * body.endswith(b"\r\n") if last else matches[i + 1].start()
        line_end = min(m.end() + 2, end)  # the delimiter line's CRLF, unless the next delimiter has it
        out.append(body[m.end(): line_end])
        if line_end < end:
            out.append(_entity(body[line_end:end], default, depth + 1))
        if last:
            out.append(body[max(end, line_end):])  # ...but for its last line end (as Python's parser reads it)
    return b"".join(out)


def _head(fields: list[bytes], cte: str | None) -> bytes:
    """The header fields, with Content-Transfer-Encoding *cte* in place of any there (None: as they are)."""
    if cte is None:
        return b"".join(fields)
    kept = [f for f in fields if f.split(b":", 1)[0].strip().lower() != b"content-transfer-encoding"]
    return b"".join(kept) + f"Content-Transfer-Encoding: {cte}\r\n".encode()


def _no_high(data: bytes) -> bytes:
    # Preamble and epilogue: no reader shows them (RFC 2046 5.1.1).
    return data.translate(_HIGH_TO_QUESTION)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
