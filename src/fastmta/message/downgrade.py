"""8-bit message bodies made 7-bit, their meaning kept: for a server without 8BITMIME, and before signing.

RFC 6152 (section 3) forbids sending 8-bit data to a server that did not
offer 8BITMIME: the client converts the message or returns it. Postfix's
client converts by default (``disable_mime_output_conversion = no``), and so
does fastmta, the same way: every MIME leaf part whose body holds 8-bit
octets under an identity encoding (``7bit``, ``8bit``, ``binary`` or none) is
re-encoded, ``text/*`` as quoted-printable (still readable, ~1-3x the 8-bit
octets), anything else as base64; its Content-Transfer-Encoding field is
replaced. Multipart bodies are walked by their boundary and ``message/*``
parts recursively (RFC 2046 5.2.1: a message part is never encoded itself,
its insides are). Every other byte is kept: header fields, preambles and
epilogues (but their 8-bit octets, which no reader shows, become ``?``), and
every part that was 7-bit already, so a converted message differs from the
original only where it had to.

Malformed input still comes out 7-bit, with its decoded meaning kept where
there is one: a part labelled quoted-printable that holds raw 8-bit octets
gets them escaped (``=E9``: decoders passed them through as they are); a part
labelled base64 loses them (decoders skip anything outside the alphabet); a
multipart without a boundary it can find is encoded as text. A body outside
MIME (no MIME-Version) gets MIME-Version, and, having no Content-Type, says
``text/plain; charset=utf-8`` when its octets are UTF-8 and ``unknown-8bit``
(RFC 1428) when not: what quoted-printable then decodes to is the original's
octets either way.

Not converted: 8-bit octets in header fields. Raw UTF-8 there needs SMTPUTF8
(RFC 6532), which the client asks for (and refuses the message without);
this module never touches a header value.

Signing: a DKIM signature covers the body's octets, so a conversion on the way
breaks it (RFC 6376 5.3). Mail fastmta signs is converted before signing
(:func:`fastmta.message.dkim_policy`), so it never needs a conversion later;
mail signed by someone else and sent to a server without 8BITMIME is
converted anyway, as Postfix does: a broken signature fails DKIM, 8-bit octets
on a 7-bit path may be mangled or refused outright.
"""

from __future__ import annotations

import base64
import re
from email.parser import BytesHeaderParser
from email.policy import compat32

from fastmta.message import core

__all__ = ["body_is_8bit", "seven_bit"]

# Deeper nesting than this is read as one leaf (a hostile message could nest
# thousands of multiparts to make the walk recurse without end).
MAX_DEPTH = 32
_IDENTITY = frozenset({"", "7bit", "8bit", "binary"})
_HIGH = re.compile(rb"[\x80-\xff]")
_HEADER_PARSER = BytesHeaderParser(policy=compat32)


def body_is_8bit(message: bytes) -> bool:
    """Whether *message* has 8-bit octets after its header section (what a conversion changes)."""
    if message.isascii():
        return False
    _fields, start = core.split_header_fields(message)
    return not message[start:].isascii()


def seven_bit(message: bytes) -> bytes:
    """*message* (CRLF line ends) with a 7-bit body that decodes to what the original's did.

    Returns *message* itself when its body is 7-bit already.
    """
    if not body_is_8bit(message):
        return message
    return _entity(core.normalize_crlf(message), "text/plain", 0, top=True)


def _entity(data: bytes, default_type: str, depth: int, *, top: bool = False) -> bytes:
    fields, start = core.split_header_fields(data)
    body = data[start:]
    if body.isascii():
        return data
    head = _HEADER_PARSER.parsebytes(data[:start])
    head.set_default_type(default_type)
    ctype = head.get_content_type()
    cte = str(head.get("content-transfer-encoding", "")).strip().lower()
    blank = data[sum(map(len, fields)):start]  # the empty line (none if the data ends in the headers)
    maintype = ctype.partition("/")[0]
    if depth < MAX_DEPTH:
        if maintype == "multipart":
            boundary = head.get_boundary()
            parts = None if boundary is None else _multipart(body, boundary, ctype == "multipart/digest", depth)
            if parts is not None:
                return _head(fields, "7bit" if cte in ("8bit", "binary") else None) + blank + parts
        elif maintype == "message":
            inner = _entity(body, "text/plain", depth + 1)
            if inner.isascii():
                return _head(fields, "7bit" if cte in ("8bit", "binary") else None) + blank + inner
    new_body, new_cte = _leaf(body, cte, maintype == "text" or maintype == "multipart")
    extra = b""
    if top and "mime-version" not in head:
        extra += b"MIME-Version: 1.0\r\n"
    if "content-type" not in head and maintype == "text":
        charset = "utf-8" if _is_utf8(body) else "unknown-8bit"
        extra += f"Content-Type: text/plain; charset={charset}\r\n".encode()
    return _head(fields, new_cte) + extra + (blank or b"\r\n") + new_body


def _leaf(body: bytes, cte: str, text: bool) -> tuple[bytes, str | None]:
    """(7-bit body, the new Content-Transfer-Encoding or None to keep the field)."""
    if cte == "quoted-printable":
        return _HIGH.sub(lambda m: b"=%02X" % m[0][0], body), None
    if cte == "base64":
        return _HIGH.sub(b"", body), None
    # The CRLF before a boundary belongs to the boundary (RFC 2046 5.1.1): a body
    # without a final line end must come back without one.
    ends_line = body.endswith(b"\r\n")
    if text:
        encoded, name = core.quoted_printable(body), "quoted-printable"
    else:
        encoded, name = base64.encodebytes(body).replace(b"\n", b"\r\n"), "base64"
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
        end = matches[i + 1].start() if i + 1 < len(matches) else len(body)
        content = body[m.end() + 2: end]  # after the delimiter line's CRLF
        out.append(body[m.end(): m.end() + 2])
        out.append(_entity(content, default, depth + 1))
    return b"".join(out)


def _head(fields: list[bytes], cte: str | None) -> bytes:
    """The header fields, with Content-Transfer-Encoding *cte* in place of any there (None: as they are)."""
    if cte is None:
        return b"".join(fields)
    kept = [f for f in fields if f.split(b":", 1)[0].strip().lower() != b"content-transfer-encoding"]
    return b"".join(kept) + f"Content-Transfer-Encoding: {cte}\r\n".encode()


def _no_high(data: bytes) -> bytes:
    # Preamble and epilogue: no reader shows them (RFC 2046 5.1.1).
    return data if data.isascii() else _HIGH.sub(b"?", data)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
