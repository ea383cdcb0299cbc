"""Parsing the arguments of MAIL FROM and RCPT TO (RFC 5321 4.1.2, RFC 6531).

Pure functions on bytes, so the rules can be tested without a socket. The
server has already refused any command line holding CR or NUL, and a line
cannot hold LF, so nothing accepted here can smuggle a header or a command
into a capture file.
"""

from __future__ import annotations

from fastmta.smtp.address import is_valid_mailbox

__all__ = ["MAX_PATH", "PathError", "is_valid_mailbox", "split_param", "split_path"]

#: RFC 5321 4.5.3.1.3: a path is at most 256 octets including the brackets.
MAX_PATH = 256

class PathError(ValueError):
    """Why a path was refused; ``enhanced`` and ``text`` become the 5xx reply."""

    def __init__(self, enhanced: str, text: str) -> None:
        super().__init__(f"{enhanced} {text}")
        self.enhanced = enhanced
        self.text = text


def split_path(arg: bytes) -> tuple[bytes, list[bytes]]:
    """``<addr> PARAM...`` -> (addr, params). Raises PathError on bad syntax.

    Tolerates spaces after the colon (``MAIL FROM: <a@b>``) as every real
    server does; refuses a missing ``<...>``, which is how broken clients and
    header injection attempts usually look.
    """
    arg = arg.lstrip(b" ")
    if not arg.startswith(b"<"):
        raise PathError("5.5.4", "Syntax: address must be enclosed in <>")
    end = arg.find(b">")
    quote = arg.find(b'"', 1)
    if quote != -1 and (end == -1 or quote < end):
        end = _end_of_quoted_path(arg)
    if end == -1:
        raise PathError("5.5.4", "Syntax: missing '>' after address")
    if end + 1 > MAX_PATH:
        raise PathError("5.5.4", f"Path too long (more than {MAX_PATH} octets)")
    addr = arg[1:end]
    rest = arg[end + 1 :]
    if rest and rest[:1] != b" ":
        raise PathError("5.5.4", "Syntax: parameters must follow the address after a space")
    if addr.startswith(b"@"):
        # An obsolete source route (<@a,@b:user@c>): RFC 5321 says ignore it.
        colon = addr.find(b":")
        if colon == -1:
            raise PathError("5.1.3", "Bad address syntax")
        addr = addr[colon + 1 :]
    return addr, rest.split()


def _end_of_quoted_path(arg: bytes) -> int:
    in_quote = False
    i = 1
    n = len(arg)
    while i < n:
        c = arg[i]
        if in_quote:
            if c == 0x5C:  # backslash escapes the next octet
                i += 1
            elif c == 0x22:
                in_quote = False
        elif c == 0x22:
            in_quote = True
        elif c == 0x3E:
            return i
        i += 1
    return -1


def split_param(param: bytes) -> tuple[bytes, bytes | None]:
    """``KEY=VALUE`` -> (KEY upper-cased, VALUE); ``KEY`` -> (KEY, None)."""
    key, eq, value = param.partition(b"=")
    return key.upper(), (value if eq else None)
