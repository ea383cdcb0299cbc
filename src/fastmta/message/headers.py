"""One header field as wire bytes: RFC 2047 encoded-words for non-ASCII, folded lines.

The value arrives already free of CR, LF and NUL (``core.escape`` with
``MODE_HEADER`` replaces them); this module replaces them again anyway,
because a header line is the one place where one stray LF starts a new
header, and the check costs nothing next to the guarantee.

Folding keeps every space of the value: a fold replaces one separating space
with CRLF + space, which unfolding (RFC 5322 2.2.3) turns back into that
space. Lines aim at 78 octets and never exceed 998 (RFC 5322 2.1.1).
"""

from __future__ import annotations

import base64
import re
import secrets
import time
from datetime import UTC, datetime
from email.utils import format_datetime

from fastmta.errors import InputError

SOFT_LIMIT = 78
# An ASCII word longer than this is cut into encoded-words so no line can
# pass 998 octets, whatever the header name.
LONG_WORD = 900
LONG_SPACES = 40  # a longer run of spaces is encoded: folding cannot split it
_EW_PREFIX = "=?utf-8?b?"
_EW_MAX_BYTES = 45  # 45 bytes -> 60 base64 chars -> a 72-char encoded-word (limit 75)
# Control characters but TAB become spaces: CR/LF/NUL could start a header,
# and the rest are not allowed in a field body (RFC 5322); kept the same as
# the template's header escaping (``_core`` MODE_HEADER).
_UNSAFE = str.maketrans({c: " " for c in [*range(9), *range(10, 32), 127]})


def _encoded_words(text: str) -> list[str]:
    """*text* as RFC 2047 B encoded-words, never splitting a character."""
    data = text.encode("utf-8")
    n = len(data)
    words: list[str] = []
    i = 0
    while i < n:
        j = min(i + _EW_MAX_BYTES, n)
        while j < n and (data[j] & 0xC0) == 0x80:  # back off a UTF-8 continuation byte
            j -= 1
        words.append(_EW_PREFIX + base64.b64encode(data[i:j]).decode("ascii") + "?=")
        i = j
    return words or [_EW_PREFIX + "?="]


def encode_phrase(text: str) -> str:
    """*text* entirely as encoded-words: safe as an address display name whatever it holds."""
    return " ".join(_encoded_words(text))


def _needs_encoding(word: str, keep_encoded_words: bool = False) -> bool:
    # Non-ASCII, control characters (TAB included: only spaces separate
    # words here), something a reader would take for an encoded-word, or too
    # long for a line.
    if keep_encoded_words and "@" in word and word.isprintable() and len(word) <= LONG_WORD:
        # An address in an address header (display names arrive already
        # encoded, and '@' is a special there): an encoded-word is not allowed
        # in an addr-spec (RFC 2047 5), so UTF-8 stays raw (RFC 6532) and the
        # message is sent with SMTPUTF8.
        return False
    return (
        not word.isascii()
        or not word.isprintable()
        or (not keep_encoded_words and word.startswith("=?") and word.endswith("?="))
        or len(word) > LONG_WORD
    )


def _pieces(value: str, keep_encoded_words: bool = False) -> list[str]:
    """*value* as unbreakable pieces: words, encoded-words and space runs.

    Concatenating the pieces (after decoding) gives the value back: runs of
    words that need encoding become one encoded text including the spaces
    between them, because decoders drop whitespace between encoded-words.
    A space run too long for a line is encoded together with its
    neighbouring words, so every encoded-word stays whitespace-delimited.
    """
    tokens = re.findall(r" +|[^ ]+", value)
    enc = [(t[0] == " " and len(t) > LONG_SPACES) or (t[0] != " " and _needs_encoding(t, keep_encoded_words)) for t in tokens]
    for i, t in enumerate(tokens):
        if t[0] == " " and enc[i]:
            if i > 0:
                enc[i - 1] = True
            if i + 1 < len(tokens):
                enc[i + 1] = True
    pieces: list[str] = []
    i = 0
    while i < len(tokens):
        if not enc[i]:
            pieces.append(tokens[i])
            i += 1
            continue
        j = i + 1
        # Extend over space runs that lead to another token needing encoding.
        while j < len(tokens) and (enc[j] or (j + 1 < len(tokens) and tokens[j][0] == " " and enc[j + 1])):
            j += 1
        words = _encoded_words("".join(tokens[i:j]))
        for k, w in enumerate(words):
            if k:
                pieces.append(" ")  # dropped by decoders between encoded-words
            pieces.append(w)
        i = j
    return pieces


def format_header(name: str, value: str, *, keep_encoded_words: bool = False) -> bytes:
    """``Name: value`` + CRLF, encoded and folded for the wire.

    *keep_encoded_words*: words shaped like encoded-words are ours (address
    headers, whose display names ``template`` already encoded) and stay as
    they are instead of being encoded again.
    """
    value = value.translate(_UNSAFE)
    if (
        value.isascii()
        and len(name) + 2 + len(value) <= SOFT_LIMIT
        and value.isprintable()
        and (keep_encoded_words or "=?" not in value)
    ):
        return f"{name}: {value}\r\n".encode("ascii")
    lines = [f"{name}: "]
    length = len(lines[0])
    for piece in _pieces(value, keep_encoded_words):
        # Fold only before a space run (the fold goes in front of its first
        # space), and only when the line has more than its indentation.
        if piece[0] == " " and length + len(piece) > SOFT_LIMIT and lines[-1].strip():
            lines.append(piece)
            length = len(piece)
        else:
            lines[-1] += piece
            length += len(piece)
    # UTF-8 only where an address keeps it raw (RFC 6532); every other piece is ASCII.
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


_BARE_CR = re.compile(rb"\r(?!\n)")
_FIELD_START = re.compile(rb"[!-9;-~]{1,998}[ \t]*:")  # a field name (RFC 5322 ftext), then a colon
_END_OF_HEADERS = re.compile(rb"\r?\n\r?\n")


def header_section_error(message: bytes) -> str | None:
    """Why *message*'s header section is unsafe to send, or None.

    A bare CR inside a header line (``Subject: a\\rBcc: x@y``) becomes a line
    break when the wire normalises line ends, and the rest of the line a header
    of its own: rejected at intake, never "cleaned". (Bare LFs are ordinary
    Unix line ends, normalised to CRLF; NUL is refused where bytes come in.)
    A first line that starts with a space or a tab continues no header of the
    message: it would continue the one put before it (serve's Received, a
    DKIM-Signature), and a client would write into our trace: rejected too.
    Runs on every submit: the common case is two finds and two counts, in C.
    """
    if message[:1] in (b" ", b"\t"):
        return "the first line is a folded continuation of no header: it would continue the header put before it"
    if message[:1] not in (b"\r", b"\n") and _FIELD_START.match(message) is None:
        return "not an RFC 5322 message: the first line is no header field (a message starts with its header section)"
    crlf = message.find(b"\r\n\r\n")
    limit = crlf if crlf >= 0 else len(message)
    lf = message.find(b"\n\n", 0, limit)  # only before the CRLF blank line: never the whole body
    end = lf if lf >= 0 else limit
    head = message[:end]
    if head.count(b"\r") == head.count(b"\r\n"):
        return None  # every CR starts a CRLF: nothing can split a header line
    end_match = _END_OF_HEADERS.search(message)
    head = message[: end_match.start()] if end_match is not None else message
    bad = _BARE_CR.search(head)
    if bad is None:
        return None
    line = head.count(b"\n", 0, bad.start()) + 1
    return f"bare CR (without LF) in header line {line}: it would start a new header on the wire"


_DATE_FIELD = re.compile(rb"(?im)^date[ \t]*:")
_MESSAGE_ID_FIELD = re.compile(rb"(?im)^message-id[ \t]*:")
_DKIM_FIELD = re.compile(rb"(?im)^dkim-signature[ \t]*:")
#: A host name as the right side of a Message-ID: letters, digits and hyphens in dot-separated labels.
HOST_NAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")


def with_missing_fields(message: bytes, domain: str) -> bytes:
    """*message* with a ``Date`` and a ``Message-ID`` (at *domain*) put on top when its header section has
    none, as Postfix's cleanup adds them to mail submitted locally and PowerMTA to what it is given:
    Gmail refuses mail without a Message-ID (550 5.7.1), and ``fastmta check`` calls a missing Date an
    error. A message signed by its sender (DKIM-Signature) is left as it is: the signature may cover
    the fields' absence. A *domain* that is no host name (an address literal) gives ``localhost``.
    """
    crlf = message.find(b"\r\n\r\n")
    lf = message.find(b"\n\n")
    ends = [i for i in (crlf, lf) if i >= 0]
    head = message[: min(ends)] if ends else message
    date = _DATE_FIELD.search(head) is None
    message_id = _MESSAGE_ID_FIELD.search(head) is None
    if not (date or message_id) or _DKIM_FIELD.search(head) is not None:
        return message
    first = message.find(b"\n")  # the message's own line ends (CRLF when it has none)
    nl = b"\r\n" if first < 0 or message[first - 1 : first] == b"\r" else b"\n"
    added = b""
    if date:
        added += b"Date: " + format_datetime(datetime.now(UTC)).encode("ascii") + nl
    if message_id:
        host = domain if HOST_NAME.fullmatch(domain) else "localhost"
        added += f"Message-ID: <{time.time_ns():x}.{secrets.token_hex(6)}@{host}>".encode("ascii") + nl
    # At the end of the header section, as Postfix's cleanup puts them: the trace fields (Received) stay
    # on top (RFC 5321 4.4).
    if message[:1] in (b"\r", b"\n"):
        at = 0
    elif ends:
        at = min(ends) + (2 if min(ends) == crlf else 1)
    else:  # a header section and no body
        at = len(message)
        if not message.endswith(b"\n"):
            added = nl + added
    return message[:at] + added + message[at:]


_MBOX_FROM = re.compile(rb"From (?![ \t]*:)[^\r\n]*\r?\n")  # not "From :" (a From field, obsolete spacing)


def without_mbox_start(message: bytes) -> bytes:
    """*message* without what mail programs leave before its header section: a UTF-8 byte order mark,
    an mbox ``From sender date`` line (Postfix's cleanup drops it too); refused as no header field, they
    bounced mail its sender meant well."""
    if message[:3] == b"\xef\xbb\xbf":
        message = message[3:]
    if message[:5] == b"From ":
        found = _MBOX_FROM.match(message)
        if found is not None:
            message = message[found.end():]
    return message


def checked_content(message: bytes) -> bytes:
    """*message* as intake takes it (:func:`without_mbox_start`), or InputError naming what makes it unsafe
    to send: a header section that could smuggle a header (:func:`header_section_error`), a NUL (SMTP's
    DATA cannot carry one, RFC 5321 4.1.4)."""
    if message[:1] in (b"F", b"\xef"):
        message = without_mbox_start(message)
    unsafe = header_section_error(message)
    if unsafe is not None:
        raise InputError(f"message: {unsafe}")
    nul = message.find(b"\x00")
    if nul >= 0:
        raise InputError(f"message: a NUL byte at offset {nul}")
    return message
