"""Tags read from headers of mail injected over SMTP or by pickup (``[serve] meta_headers``).

HTTP callers give a message its meta (``job``, ``pool``...) in the request; SMTP and pickup clients
can only write headers. PowerMTA reads ``X-Job`` (``process-x-job``) and ``X-Virtual-MTA``; KumoMTA's
policies read a tenant or campaign header. ``meta_headers = {"X-Job" = "job", "X-Virtual-MTA" =
"pool"}`` makes the first such header of a message its meta key, so SMTP-injected mail gets a
campaign (its KPIs, the reputation guard's brakes, ``fastmta queue suspend campaign:ID``) and an
egress pool. The header is then taken out (``strip_meta_headers``), unless a DKIM signature of the
client's covers it: removing it would break that signature.

A value is what the HTTP API takes as a meta value: one line, at most 256 characters, no control
character; anything else refuses the message (the client is told which header).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from fastmta.errors import InputError

__all__ = ["MetaHeaders"]

_MAX_VALUE = 256
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_LINE_END = re.compile(rb"\r?\n")
_SPACES = re.compile(" {2,}")
_H_TAG = re.compile(rb"(?:^|;)\s*h\s*=\s*([^;]*)", re.I)


def _header_end(content: bytes) -> int:
    """The length of the header section: up to the empty line (CRLF or LF), the whole message without one."""
    if content.startswith((b"\r\n", b"\n")):
        return 0
    ends = [i + 1 for i in (content.find(b"\n\r\n"), content.find(b"\n\n")) if i >= 0]
    return min(ends) if ends else len(content)


def _lines(head: bytes) -> list[bytes]:
    """*head*'s lines, each with its LF (the last without one if the message has no body)."""
    lines = [line + b"\n" for line in head.split(b"\n")]
    last = lines.pop()
    if last != b"\n":
        lines.append(last[:-1])
    return lines


class MetaHeaders:
    """Reads (and takes out) the configured headers; *mapping*: header name -> meta key."""

    def __init__(self, mapping: Mapping[str, str], *, strip: bool = True) -> None:
        self._keys = {name.lower().encode("ascii"): key for name, key in mapping.items()}
        self._strip = strip

    def take(self, content: bytes) -> tuple[bytes, dict[str, str]]:
        """(*content* without the headers read, unless signed; meta key -> value)."""
        if not self._keys:
            return content, {}
        end = _header_end(content)  # the body is never split: an 18 MB message costs what its header does
        fields: list[tuple[bytes, bytes]] = []  # (lowercase name, the whole field: its lines as they are)
        for line in _lines(content[:end]):  # CRLF, or LF in a pickup file; a bare CR stays in its line
            if line[:1] in (b" ", b"\t") and fields:
                fields[-1] = (fields[-1][0], fields[-1][1] + line)
            else:
                fields.append((line.split(b":", 1)[0].strip().lower(), line))
        if not any(name in self._keys for name, _ in fields):
            return content, {}
        meta: dict[str, str] = {}
        for name, field in fields:
            key = self._keys.get(name)
            if key is None or key in meta:
                continue
            # Unfolded (line ends out, tabs as spaces) before the check: a bare CR or a NUL is refused, not
            # taken for spacing as bytes.split() would.
            raw = _LINE_END.sub(b"", field.split(b":", 1)[1]).replace(b"\t", b" ") if b":" in field else b""
            value = _SPACES.sub(" ", raw.decode("utf-8", "replace")).strip()
            if not value or len(value) > _MAX_VALUE or _CONTROL.search(value) or "\ufffd" in value:
                header = field.split(b":", 1)[0].decode("ascii", "replace").strip()
                raise InputError(f"message: header {header}: not a tag (1-{_MAX_VALUE} characters of UTF-8 on one line)")
            meta[key] = value
        if not self._strip:
            return content, meta
        signed = {h.strip().lower() for name, field in fields if name == b"dkim-signature"
                  for m in _H_TAG.finditer(b"".join(field.split(b":", 1)[1].split()))
                  for h in m.group(1).split(b":")}
        kept = [field for name, field in fields if name not in self._keys or name in signed]
        return b"".join(kept) + content[end:], meta
