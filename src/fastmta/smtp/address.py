"""The mailbox grammar of RFC 5321 4.1.2, with RFC 6531's UTF-8 extension.

One grammar for every place an address is judged: what intake accepts
(``fastmta.queue.records.split_address``: pickup files, campaign rows,
``submit()``) and what the sink's ``RCPT TO`` accepts. An address that passes
here can be written inside ``<...>`` on a command line as it is.
"""

from __future__ import annotations

import re

_ATEXT = rb"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
_QUOTED = rb'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
_LABEL = rb"[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?"
_LITERAL = rb"\[[\x21-\x5a\x5e-\x7e]+\]"

_ASCII_MAILBOX = re.compile(
    rb"(?:[" + _ATEXT + rb"]+(?:\.[" + _ATEXT + rb"]+)*|" + _QUOTED + rb")"
    rb"@(?:" + _LABEL + rb"(?:\." + _LABEL + rb")*|" + _LITERAL + rb")"
)
# RFC 6531: with SMTPUTF8, UTF-8 is allowed in atoms, quoted strings and labels.
_U = rb"\x80-\xff"
_UTF8_LABEL = rb"[A-Za-z0-9" + _U + rb"](?:[A-Za-z0-9\-" + _U + rb"]*[A-Za-z0-9" + _U + rb"])?"
_UTF8_MAILBOX = re.compile(
    rb"(?:[" + _ATEXT + _U + rb"]+(?:\.[" + _ATEXT + _U + rb"]+)*|"
    rb'"(?:[\x20\x21\x23-\x5b\x5d-\x7e' + _U + rb"]|\\[\x20-\x7e])*\")"
    rb"@(?:" + _UTF8_LABEL + rb"(?:\." + _UTF8_LABEL + rb")*|" + _LITERAL + rb")"
)

# What intake accepts besides the strict grammar: dots anywhere in an unquoted
# local part ("a..b@", "a.@"), which RFC 5321 forbids but mobile carriers
# (docomo, ezweb) handed out for years; receivers take them, and refusing them
# at intake would drop real recipients. Still no spaces, specials or controls.
_LENIENT_MAILBOX = re.compile(
    rb"(?:[" + _ATEXT + _U + rb".]+|"
    rb'"(?:[\x20\x21\x23-\x5b\x5d-\x7e' + _U + rb"]|\\[\x20-\x7e])*\")"
    rb"@(?:" + _UTF8_LABEL + rb"(?:\." + _UTF8_LABEL + rb")*|" + _LITERAL + rb")"
)


def is_valid_mailbox(addr: bytes, utf8: bool) -> bool:
    """A syntactically valid ``local@domain`` (UTF-8 allowed only with SMTPUTF8)."""
    if addr.isascii():
        return _ASCII_MAILBOX.fullmatch(addr) is not None
    if not utf8 or _UTF8_MAILBOX.fullmatch(addr) is None:
        return False
    try:
        addr.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def mailbox_error(address: str) -> str | None:
    """Why *address* is not a ``local@domain`` mailbox, or None when it is one.

    UTF-8 (EAI, RFC 6531) is allowed: whether the receiver can take it is
    decided per connection, not at intake.
    """
    try:
        raw = address.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate: an undecodable byte kept by surrogateescape (the lenient grammar took
        # b"\xff@x" for UTF-8, and the message then failed where it was recorded), or a JSON "\ud800".
        return "is not valid UTF-8"
    if is_valid_mailbox(raw, utf8=True) or _LENIENT_MAILBOX.fullmatch(raw) is not None:
        return None
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return "has no local part or no domain"
    if any(c.isspace() for c in local) and not (local.startswith('"') and local.endswith('"')):
        return "has white space in its local part (quote it: \"john doe\"@example.com)"
    return "is not a valid mailbox (RFC 5321 local@domain)"
