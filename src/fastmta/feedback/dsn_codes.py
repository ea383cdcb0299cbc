"""Reply codes, enhanced status codes and addresses read out of bounce text, safely.

Bounce prose is full of dotted numbers that are not status codes: IPv4
addresses (``192.0.2.222`` holds ``2.0.2`` and ``222``), versions
(``Exim 4.72``, ``version 4.8.5.36``), dates and times (``2014.11.23.08.42``,
``23:34:45``), message ids (``<4.2.2@host>``), port and size numbers. A code
is therefore accepted only as a whole token: nothing word-like, dotted,
routed or numeric may touch it on either side, and a bare reply code (no
enhanced code beside it) only where replies are written — at the start of a
line, after a colon, a quote or a bracket that opens a reply, after
``<<<``/``said``/``returned`` — never before a unit ("222 bytes").
"""

from __future__ import annotations

import re

__all__ = [
    "ADDRESS",
    "codes_in",
    "enhanced_in",
    "is_address",
    "reply_code_in",
]

# RFC 3463 class.subject.detail: subject and detail up to three digits.
_ENH = re.compile(r"#?([245])\.(\d{1,3})\.(\d{1,3})")
# A reply code and the enhanced code that follows it ("550 5.1.1", "550-5.7.26", "550,5.1.1", "#550 5.1.1").
_CODE_ENH = re.compile(r"#?([245]\d\d)(?:[ \-,]+|\s*:\s*)#?([245])\.(\d{1,3})\.(\d{1,3})")
_CODE = re.compile(r"#?([245]\d\d)")
_UNITS = re.compile(
    r"\s*(?:bytes?|[kmg]b\b|kbytes|octets|seconds?|secs?|minutes?|mins?|hours?|days?|ms\b|lines?|attempts?|times|"
    r"messages?|recipients?|more\b|%)",
    re.IGNORECASE,
)
# What may stand right before a bare reply code inside a line.
_LEADS = (":", "'", '"', "(", "said", "returned", "reason", "error", "code", "response", "reply", "status",
          # the SMTP step a reply answered (chasquid "MAIL+RCPT 550 ...", "DATA closing 554 ...")
          "rcpt", "data", "closing")
# Names of numbers that are not replies ("Size: 222", "Port: 465").
_QUANTITIES = frozenset({"size", "bytes", "length", "port", "lines", "count", "number", "attempts", "id", "pid", "uid"})
# Characters that, touching a number, make it part of something else: a word,
# an IP address or version (.), a route or URL (/ @ = $), a range (-), a tag (#).
_GLUE = frozenset("._@/=$#-+")

_LOCAL = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]"
# Starts only where a run of local-part characters starts, and never backtracks into it: linear on any input.
ADDRESS = re.compile(rf"(?<!{_LOCAL}){_LOCAL}++@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{{2,63}}(?![A-Za-z0-9-])")
_ADDRESS_FULL = re.compile(rf"^{_LOCAL}+@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{{2,63}}$")


# An internationalised mailbox (RFC 6531/6533: a "utf-8;" Final-Recipient): UTF-8 local part, U-labels.
_ADDRESS_UTF8 = re.compile(r"^[^\s@<>()\[\]\",;:\\]+@(?:[^\W_](?:[\w-]*[^\W_])?\.)+(?:[^\W\d_]{2,63}|xn--[a-z0-9-]{2,59})$",
                           re.IGNORECASE)


def is_address(value: str) -> bool:
    """True for a plain ``local@domain.tld`` mailbox (no route, no pipe, no X.400), non-ASCII (EAI) too."""
    if not (_ADDRESS_FULL.match(value) if value.isascii() else _ADDRESS_UTF8.match(value)):
        return False
    local = value.rsplit("@", 1)[0]
    return not (local.startswith(".") or local.endswith(".") or ".." in local)


def _before_ok(text: str, start: int, *, allow: str = "") -> bool:
    if start == 0:
        return True
    c = text[start - 1]
    if c in allow:
        return True
    return not (c.isalnum() or c in _GLUE or c in ":[](")


def _after_ok(text: str, end: int) -> bool:
    if end >= len(text):
        return True
    c = text[end]
    if c.isalnum() or c in "_@-+=/":
        return False
    # "5.1.1." ends a sentence; "5.1.1.3" or "2.0.2.222" is something else.
    return not (c == "." and end + 1 < len(text) and text[end + 1].isalnum())


def _colon_reply_ok(text: str, i: int) -> bool:
    """A number after the colon at *i* is a reply only when a word (not a number, hex or quantity) leads to it.

    ``said: 550``, ``ERROR_CODE :550``, ``host x [192.0.2.1]: 550`` — yes;
    ``23:34:45``, ``2001:db8::222``, ``Size (in bytes): 222`` — no.
    """
    if i < 0 or text[i] != ":":
        return False
    j = i - 1
    while j >= 0 and text[j] == " ":
        j -= 1
    if j < 0:
        return True
    if text[j] == "]":  # "host mx.example.net [192.0.2.1]: 550 ..."
        return True
    k = j
    while k >= 0 and (text[k].isalpha() or text[k] == "_"):
        k -= 1
    word = text[k + 1 : j + 1]
    if word.lower() in _QUANTITIES:
        return False
    if word.lower() == "to" and text[: k + 1].rstrip().lower().endswith("rcpt"):
        return True  # "did not like our RCPT TO: 550 ..." (dma)
    return len(word) >= 3 and not all(ch in "abcdefABCDEF" for ch in word)


def enhanced_in(text: str, classes: str = "245") -> str | None:
    """The first enhanced status code (``5.1.1``, ``#4.4.1``) in *text* whose class is in *classes*."""
    for m in _ENH.finditer(text):
        start = m.start()
        if m.group(1) not in classes:
            continue
        if text[start] == "#":
            if not _before_ok(text, start, allow="(:"):
                continue
        elif not _before_ok(text, start, allow=":(["):
            continue
        if not _after_ok(text, m.end()):
            continue
        return f"{m.group(1)}.{int(m.group(2))}.{int(m.group(3))}"
    return None


def _code_ok(text: str, m: re.Match[str]) -> bool:
    start, end = m.start(), m.end()
    if end < len(text) and (text[end].isalnum() or text[end] in "._@/=+"):
        return False
    if start > 0:
        c = text[start - 1]
        if c.isalnum() or c in _GLUE or c in "[]":
            return False
    if _UNITS.match(text, end):
        return False
    # A bare code must lead its line (after spacing, quoting or "<<<") or follow a colon, "said"/"returned", a quote, "(".
    line_start = text.rfind("\n", 0, start) + 1
    lead = text[line_start:start]
    if lead.rstrip().endswith(":"):
        return _colon_reply_ok(text, line_start + len(lead.rstrip()) - 1)
    return not lead.strip(" \t>|*<'\"(") or lead.rstrip().lower().endswith(_LEADS)


def reply_code_in(text: str, classes: str = "45") -> int | None:
    """The first SMTP reply code in *text* whose class is in *classes* (see the module notes)."""
    pair = _pair(text, classes)
    if pair is not None:
        return pair[0]
    for m in _CODE.finditer(text):
        if m.group(1)[0] in classes and _code_ok(text, m):
            return int(m.group(1))
    return None


def _pair(text: str, classes: str) -> tuple[int, str] | None:
    for m in _CODE_ENH.finditer(text):
        if m.group(1)[0] not in classes or m.group(2) not in classes:
            continue
        start = m.start()
        if start > 0:
            c = text[start - 1]
            if c == ":" and not _colon_reply_ok(text, start - 1):
                continue
            if c.isalnum() or c in _GLUE:
                continue
        if not _after_ok(text, m.end()):
            continue
        return int(m.group(1)), f"{m.group(2)}.{int(m.group(3))}.{int(m.group(4))}"
    return None


def codes_in(text: str, classes: str = "45") -> tuple[int | None, str | None]:
    """(reply code, enhanced status code) found in a diagnostic text; a pair written together wins."""
    pair = _pair(text, classes)
    if pair is not None:
        return pair
    return reply_code_in(text, classes), enhanced_in(text, classes)
