"""RFC 3464 delivery-status fields: from a ``message/delivery-status`` part, or written as text.

A delivery-status body is a per-message block (Reporting-MTA, Arrival-Date,
...) and one block per recipient (Final-Recipient, Original-Recipient,
Action, Status, Diagnostic-Code, Remote-MTA, Last-Attempt-Date), separated by
blank lines. The same fields also turn up outside such a part: in the text
of a report whose MIME structure is broken, quoted in a forwarded bounce, or
pasted into a plain-text notice (Amazon WorkMail's "Technical report").
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import quopri
import re
from email.message import Message

from fastmta.feedback.dsn_codes import is_address
from fastmta.feedback.dsn_record import DSNRecipient, make_recipient, status_field

__all__ = ["STATUS_TYPES", "field_blocks", "from_blocks", "from_part", "from_text"]

STATUS_TYPES = ("message/delivery-status", "message/global-delivery-status")
_ADDR_TYPE = re.compile(r"^\s*[\w.-]+\s*;\s*", re.ASCII)
_ROUTE = re.compile(r"^@[^:]+:")
_FIELD = re.compile(r"^([A-Za-z][A-Za-z0-9-]*)[ \t]*:(.*)$")
_RCPT_KEYS = ("final-recipient", "original-recipient")


def field_blocks(text: str) -> list[dict[str, str]]:
    """Header-like blocks of *text* (split at blank lines; folded lines joined; first value of a name wins)."""
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    last: str | None = None
    for raw in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if not raw.strip():
            if current:
                blocks.append(current)
            current, last = {}, None
            continue
        if raw[:1] in (" ", "\t"):
            if last is not None:
                current[last] += " " + raw.strip()
            continue
        m = _FIELD.match(raw)
        if m is None:
            last = None
            continue
        name = m.group(1).lower()
        if name in current:
            if name in _RCPT_KEYS:  # a block without a blank line before it: a new recipient
                blocks.append(current)
                current = {}
            else:
                last = None
                continue
        current[name] = m.group(2).strip()
        last = name
    if current:
        blocks.append(current)
    return blocks


def _strip_type(value: str) -> str:
    # "rfc822; bob@example.com", "smtp; 550 5.1.1 ...", "dns; mx.example.com"
    return _ADDR_TYPE.sub("", value, count=1).strip()


def _address(value: str | None) -> str | None:
    if not value:
        return None
    addr = _strip_type(value).strip().strip("<>").strip()
    return addr or None


def _utf8(value: object) -> str:
    """Text the email package decoded as ASCII, with the UTF-8 it met kept (RFC 6533's fields are UTF-8)."""
    text = str(value)
    try:
        return text.encode("ascii", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # already decoded beyond ASCII
        return text


def _body(part: Message) -> str:
    """A non-multipart part's body, its transfer encoding undone, as UTF-8 text."""
    data = part.get_payload(decode=True)  # bytes: base64 and quoted-printable undone, 8-bit kept
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else ""


def _part_text(part: Message) -> str:
    payload = part.get_payload()
    if not isinstance(payload, list):
        return _body(part)
    # The email package parsed it as header blocks: each block's fields, and what it left as the
    # block's body. message/global-delivery-status (RFC 6533) is parsed as one message whose body
    # holds the per-recipient blocks, and a base64 part as a "message" of no fields: taking only
    # the fields lost every recipient's Status there.
    blocks = []
    for m in payload:
        if isinstance(m, Message):
            # raw_items: items() turns a field holding 8-bit octets (Haraka writes a UTF-8
            # Final-Recipient into a plain delivery-status part) into a Header that prints U+FFFD.
            text = "\n".join(f"{k}: {_utf8(v)}" for k, v in m.raw_items())
            body = _body(m) if not m.is_multipart() else ""
            if body.strip():
                text = f"{text}\n\n{body}" if text else body
            blocks.append(text)
    text = "\n\n".join(blocks)
    cte = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
    try:
        if cte == "base64":
            return base64.b64decode(text).decode("utf-8", "replace")
        if cte == "quoted-printable":
            return quopri.decodestring(text.encode("utf-8")).decode("utf-8", "replace")
    except (binascii.Error, ValueError):
        pass
    return text


def from_blocks(blocks: list[dict[str, str]], *, source: str) -> list[DSNRecipient]:
    """Records of the per-recipient blocks in *blocks* (a block naming neither recipient is skipped)."""
    out: list[DSNRecipient] = []
    seen: dict[str, int] = {}
    reporting: str | None = None
    for block in blocks:
        if "reporting-mta" in block and reporting is None:
            reporting = _strip_type(block["reporting-mta"]) or None
        final = _address(block.get("final-recipient"))
        original = _address(block.get("original-recipient"))
        if final is None and original is None:
            continue
        if "action" not in block and "status" not in block and "diagnostic-code" not in block and source != "rfc3464":
            # Fields quoted in prose need more than an address to be a report. A delivery-status
            # part that names a recipient and nothing else (Haraka's, for recipients refused at
            # RCPT; RFC 3464 2.3 requires Action and Status) still reports it: a failure of
            # unknown cause, which no rule reads as a hard bounce.
            continue
        rcpt = final or original or ""
        if not is_address(rcpt):
            if original and is_address(original):
                rcpt = original
            elif _ROUTE.match(rcpt) and is_address(_ROUTE.sub("", rcpt)):
                rcpt = _ROUTE.sub("", rcpt)
        rec = make_recipient(
            rcpt,
            action=block.get("action"),
            status=status_field(block.get("status")),
            diagnostic=_strip_type(block.get("diagnostic-code", "")),
            standard=True,
            source=source,
            remote_mta=_strip_type(block["remote-mta"]) or None if "remote-mta" in block else None,
            original_recipient=original,
            last_attempt=block.get("last-attempt-date") or None,
            reporting_mta=reporting,
        )
        key = rec.recipient
        if key in seen:  # the same recipient twice: keep the block that says more
            old = out[seen[key]]
            if (old.status is None and rec.status is not None) or (not old.diagnostic and rec.diagnostic):
                out[seen[key]] = rec
            continue
        seen[key] = len(out)
        out.append(rec)
    return _unborrowed(out)


_BRACKETED = re.compile(r"<([^<>\s]+@[^<>\s]+)>")


def _unborrowed(recs: list[DSNRecipient]) -> list[DSNRecipient]:
    """Records whose reason names, in angle brackets, another recipient of the report and not their own
    lose that reason: it is the other's. nullmailer stops at the first refused RCPT and copies that one
    reply (and its 5.1.1) into the block of every recipient of the message, those never tried too:
    believed, each was a hard bounce of an address nobody had refused. The failure stays, its cause
    unknown (the status's class only): never a reason to suppress.
    """
    if len(recs) < 2:
        return recs
    names = {r.recipient for r in recs} | {r.original_recipient for r in recs if r.original_recipient}
    out = []
    for rec in recs:
        named = {m.lower() for m in _BRACKETED.findall(rec.diagnostic)}
        own = {rec.recipient, rec.original_recipient}
        other = sorted(named & names)
        if other and not named & own:
            cls = str(rec.status_class or 5)
            rec = dataclasses.replace(rec, status=f"{cls}.0.0", reply_code=None,
                                      diagnostic=f"no reason of its own (the report repeats that of {other[0]})")
        out.append(rec)
    return out


def from_part(part: Message) -> list[DSNRecipient]:
    """Records of one ``message/delivery-status`` (or global) part."""
    return from_blocks(field_blocks(_part_text(part)), source="rfc3464")


def from_text(text: str) -> list[DSNRecipient]:
    """Records of delivery-status fields written in plain text (broken MIME, forwarded or pasted reports)."""
    if "recipient" not in text.lower():
        return []
    return from_blocks(field_blocks(text), source="rfc3464-text")
