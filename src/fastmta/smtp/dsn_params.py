"""The DSN extension's envelope parameters (RFC 3461): what a client asks to be told, and how it is kept.

A client that hands mail to ``fastmta serve`` may say, per recipient, which
notices it wants (``NOTIFY=NEVER`` or any of ``SUCCESS,FAILURE,DELAY``) and
the address as it first gave it (``ORCPT=rfc822;...``), and per message how
much of it a failure notice returns (``RET=FULL|HDRS``) and an id of its own
to find it by (``ENVID=...``). Postfix, Exim and Sendmail relay these; a
sending backend uses ``NOTIFY=NEVER`` for mail whose bounces it reads from
its own logs, and ``ENVID`` to match a notice to what it sent.

They travel with the message in its meta, under :data:`DSN_META` (journaled
with it, so a restart keeps them), as one dict: ``{"ret": "FULL", "envid":
"...", "notify": {address: "SUCCESS,FAILURE"}, "orcpt": {address:
"rfc822;..."}}``, each part present only when given. Values are kept decoded
(xtext undone) and were checked to be printable US-ASCII: a notice prints
them in header fields, where a CR or LF would be a header of the client's.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, NamedTuple

__all__ = [
    "DSN_META",
    "DsnSyntaxError",
    "EnvelopeDsn",
    "address_field",
    "dsn_fields",
    "dsn_of",
    "envelope_dsn",
    "notify_of",
    "orcpt_of",
    "orcpt_text",
    "parse_envid",
    "parse_notify",
    "parse_orcpt",
    "parse_ret",
    "xtext_decode",
    "xtext_encode",
]

#: The meta key the DSN parameters of a message are kept under.
DSN_META = "dsn"

#: RFC 3461 4.4 and 4.2: the longest ENVID and ORCPT values, as sent (xtext). Longer ones are taken
#: (Postfix takes them, and relays them: refused, its client bounced the message) up to _MAX_TAKEN,
#: but not passed on to a next hop, which may hold to the RFC.
_MAX_ENVID = 100
_MAX_ORCPT = 500
_MAX_TAKEN = 1000
_NOTIFY_WORDS = frozenset({"SUCCESS", "FAILURE", "DELAY"})
# xtext (RFC 3461 4): "!" to "~" but "+" and "=", or "+" and two upper-case hex digits.
# Lower-case hex digits are taken too: be liberal in what is accepted, it changes nothing decoded.
_XTEXT = re.compile(rb"(?:[!-*,-<>-~]|\+[0-9A-Fa-f]{2})*")
_HEX = re.compile(rb"\+([0-9A-Fa-f]{2})")
# RFC 6533's utf-8-addr-xtext: UTF-8 as it is, "\x{HEX}" for what may not be written so.
_UTF8_HEX = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")
_ADDR_TYPE = re.compile(rb"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")


class DsnSyntaxError(ValueError):
    """A DSN parameter that is not what RFC 3461 allows; the message is the reply text (without the code)."""


def xtext_decode(value: bytes, name: str) -> str:
    """*value* (xtext) decoded; no control characters, or :class:`DsnSyntaxError`.

    RFC 3461 asks for printable US-ASCII, but Postfix writes the UTF-8 of an
    internationalized address as xtext (``ORCPT=rfc822;g+C3+B6n@...``) and
    relays it: refused, the recipient bounced. So UTF-8 is taken; what is
    refused is what could do harm where the value is printed again (a CR or LF
    ends the header field a notice prints it in).
    """
    if not _XTEXT.fullmatch(value):
        raise DsnSyntaxError(f"Bad {name} parameter syntax")
    out = _HEX.sub(lambda m: bytes((int(m.group(1), 16),)), value)
    if any(b < 0x20 or b == 0x7F for b in out):
        raise DsnSyntaxError(f"Bad {name} parameter syntax: a control character")
    return out.decode("utf-8", "replace")


def xtext_encode(text: str) -> str:
    """*text* as xtext (for a next hop that takes DSN parameters): its UTF-8, byte by byte."""
    return "".join(chr(b) if 0x21 <= b <= 0x7E and b not in b"+=" else f"+{b:02X}" for b in text.encode())


def parse_notify(value: bytes | None) -> str:
    """``NOTIFY=`` -> "NEVER" or the words asked for, comma-separated, in the RFC's order."""
    words = value.upper().split(b",") if value else []
    names = {w.decode("ascii", "replace") for w in words}
    # A word twice ("FAILURE,FAILURE") is taken, as Postfix takes it: the grammar does not forbid it.
    if not words or (names != {"NEVER"} and not names <= _NOTIFY_WORDS):
        raise DsnSyntaxError("Bad NOTIFY parameter syntax")
    return "NEVER" if names == {"NEVER"} else ",".join(w for w in ("SUCCESS", "FAILURE", "DELAY") if w in names)


def parse_orcpt(value: bytes | None) -> str:
    """``ORCPT=addr-type;xtext`` -> "addr-type;address" (decoded)."""
    addr_type, semi, address = (value or b"").partition(b";")
    if not semi or not address or len(value or b"") > _MAX_TAKEN or not _ADDR_TYPE.fullmatch(addr_type):
        raise DsnSyntaxError("Bad ORCPT parameter syntax")
    kind = addr_type.decode("ascii").lower()
    if kind != "utf-8":
        return f"{kind};{xtext_decode(address, 'ORCPT')}"
    # An SMTPUTF8 client's (RFC 6533 3): refused with 501 it would keep the whole message back.
    try:
        text = _UTF8_HEX.sub(lambda m: chr(int(m.group(1), 16)), address.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, OverflowError):
        raise DsnSyntaxError("Bad ORCPT parameter syntax") from None
    if not text.isprintable():
        raise DsnSyntaxError("Bad ORCPT parameter syntax: not printable")
    return f"utf-8;{text}"


def parse_ret(value: bytes | None) -> str:
    ret = (value or b"").upper()
    if ret not in (b"FULL", b"HDRS"):
        raise DsnSyntaxError("Bad RET parameter syntax")
    return ret.decode("ascii")


def parse_envid(value: bytes | None) -> str:
    if not value or len(value) > _MAX_TAKEN:
        raise DsnSyntaxError("Bad ENVID parameter syntax")
    return xtext_decode(value, "ENVID")


def dsn_of(meta: dict[str, Any] | None) -> dict[str, Any] | None:
    """The DSN parameters kept in *meta*, if any were given."""
    dsn = meta.get(DSN_META) if meta else None
    return dsn if isinstance(dsn, dict) else None


def notify_of(meta: dict[str, Any] | None, recipient: str) -> str | None:
    """What *recipient*'s client asked to be told (None: not said, the MTA's default: failures and delays)."""
    dsn = dsn_of(meta)
    notify = dsn.get("notify") if dsn else None
    return notify.get(recipient) if isinstance(notify, dict) else None


def orcpt_of(meta: dict[str, Any] | None, recipient: str) -> str | None:
    dsn = dsn_of(meta)
    orcpt = dsn.get("orcpt") if dsn else None
    return orcpt.get(recipient) if isinstance(orcpt, dict) else None


def dsn_fields(dsn: Any, recipient: str) -> dict[str, str]:
    """What an accounting record says of *dsn* (the meta value) for *recipient*: the message's ``envid``
    and the recipient's ``orcpt`` (PowerMTA's envId and orcpt), not the whole message's parameters
    on every recipient's line."""
    if not isinstance(dsn, dict):
        return {}
    out = {}
    if isinstance(dsn.get("envid"), str):
        out["envid"] = dsn["envid"]
    orcpt = dsn.get("orcpt")
    if isinstance(orcpt, dict) and isinstance(orcpt.get(recipient), str):
        out["orcpt"] = orcpt[recipient]
    return out


class EnvelopeDsn(NamedTuple):
    """The DSN parameters of one transaction, as written on the wire to a server that offers DSN."""

    mail: bytes  # after MAIL FROM's path: b" RET=FULL ENVID=..." (or b"")
    rcpts: tuple[bytes, ...]  # after each RCPT TO's path, in the transaction's order


def envelope_dsn(meta: dict[str, Any] | None, recipients: Sequence[str]) -> EnvelopeDsn | None:
    """What a transaction of *recipients* passes on of the DSN parameters kept in *meta* (Postfix relays
    them too): the next hop then reports, or keeps quiet, as the client asked. None: nothing to pass."""
    dsn = dsn_of(meta)
    if not dsn:
        return None
    mail = b""
    if dsn.get("ret") in ("FULL", "HDRS"):
        mail += b" RET=" + dsn["ret"].encode()
    envid = xtext_encode(dsn["envid"]) if isinstance(dsn.get("envid"), str) else ""
    if 0 < len(envid) <= _MAX_ENVID:
        mail += b" ENVID=" + envid.encode()
    rcpts = []
    for rcpt in recipients:
        params = b""
        notify = notify_of(meta, rcpt)
        if isinstance(notify, str):
            params += b" NOTIFY=" + notify.encode()
        orcpt = orcpt_of(meta, rcpt)
        wire = _orcpt_wire(orcpt) if isinstance(orcpt, str) else b""
        if 0 < len(wire) <= _MAX_ORCPT:  # escaped longer than RFC 3461 allows: a strict hop would refuse it (501)
            params += b" ORCPT=" + wire
        rcpts.append(params)
    if not mail and not any(rcpts):
        return None
    return EnvelopeDsn(mail, tuple(rcpts))


def _orcpt_wire(value: str) -> bytes:
    """ "type;address" as ORCPT's value: xtext, or for "utf-8" RFC 6533's utf-8-addr-xtext (ASCII only, so it
    goes to a server without SMTPUTF8 too)."""
    kind, _, address = value.partition(";")
    if kind != "utf-8":
        return f"{kind};{xtext_encode(address)}".encode()
    return orcpt_text(value).encode()


def orcpt_text(value: str) -> str:
    """ "type;address" as a notice's Original-Recipient field prints it (RFC 3464 2.3.1): as it is, but an
    address that is not ASCII in RFC 6533's ASCII form (a message/delivery-status part is ASCII)."""
    kind, _, address = value.partition(";")
    return value if kind != "utf-8" and address.isascii() else "utf-8;" + _utf8_addr_xtext(address)


def address_field(address: str) -> str:
    """An address as a notice's Final-Recipient prints it: ``rfc822; a@b``, or for a UTF-8 one
    ``utf-8; j\\x{F6}@b`` (RFC 6533 3), so the part stays ASCII."""
    return f"rfc822; {address}" if address.isascii() else "utf-8; " + _utf8_addr_xtext(address)


def _utf8_addr_xtext(address: str) -> str:
    """RFC 6533's utf-8-addr-xtext: ASCII only, ``\\x{HEX}`` for the rest."""
    return "".join(c if " " < c <= "~" and c not in "+=\\" else f"\\x{{{ord(c):X}}}" for c in address)
