"""Pure-Python reference for every function in ``_core.pyx``.

Same names, same signatures, same output. Written for obviousness, not speed:
this is the oracle the compiled code is tested against, and the fallback when
the extension is not built or ``FASTMTA_NO_EXTENSIONS=1`` is set.
"""

from __future__ import annotations


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
