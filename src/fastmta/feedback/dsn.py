"""Bounce (DSN) parsing: a returned message -> one record per failed recipient.

Standard bounces carry an RFC 3464 ``message/delivery-status`` part: one
block of per-recipient fields (Final-Recipient, Action, Status,
Diagnostic-Code, Remote-MTA). Many MTAs (qmail, older Exim, Exchange
variants, webmail providers) send only prose; for those a fallback scans the
text for the usual "<address>: reason" / "address ... said: 550 ..." shapes.
Each record can be classified with :mod:`fastmta.feedback.classify`.
"""

from __future__ import annotations

import email
import email.policy
import email.utils
import re
from dataclasses import dataclass
from email.message import Message

from fastmta.feedback.classification import Classification, Outcome
from fastmta.feedback.classify import Classifier, default_classifier

__all__ = ["DSNRecipient", "classify_dsn", "parse_dsn"]


@dataclass(frozen=True, slots=True)
class DSNRecipient:
    """What a bounce says about one recipient."""

    recipient: str
    action: str | None  # failed, delayed, delivered, relayed, expanded
    status: str | None  # RFC 3463 code from the Status field
    diagnostic: str  # Diagnostic-Code text (or the prose found for it)
    remote_mta: str | None = None
    reply_code: int | None = None
    standard: bool = True  # False when found by the prose fallback


_ADDR_TYPE = re.compile(r"^\s*[\w-]+\s*;\s*", re.ASCII)
_STATUS = re.compile(r"([245]\.\d{1,3}\.\d{1,3})")
_DIAG_CODE = re.compile(r"^\s*([245]\d\d)\b")
_EMAIL = re.compile(r"<?([A-Za-z0-9._%+=/'!#$&*^`{|}~-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,})>?")


def _field_blocks(payload: str) -> list[dict[str, str]]:
    """Split delivery-status text into header blocks; continuation lines unfolded."""
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    last: str | None = None
    for raw in payload.replace("\r\n", "\n").split("\n"):
        if not raw.strip():
            if current:
                blocks.append(current)
            current, last = {}, None
            continue
        if raw[:1] in (" ", "\t") and last is not None:
            current[last] += " " + raw.strip()
            continue
        name, sep, value = raw.partition(":")
        if not sep:
            continue
        last = name.strip().lower()
        current[last] = value.strip()
    if current:
        blocks.append(current)
    return blocks


def _strip_type(value: str) -> str:
    # "rfc822; bob@example.com", "smtp; 550 5.1.1 ...", "dns; mx.example.com"
    return _ADDR_TYPE.sub("", value, count=1).strip().strip("<>")


def _status_text(part: Message) -> str:
    payload = part.get_payload()
    if isinstance(payload, list):  # the email package parses it as header blocks
        return "\n\n".join(m.as_string() for m in payload if isinstance(m, Message))
    if isinstance(payload, str):
        return payload
    return ""


def _from_delivery_status(part: Message) -> list[DSNRecipient]:
    out: list[DSNRecipient] = []
    for block in _field_blocks(_status_text(part)):
        rcpt = block.get("final-recipient") or block.get("original-recipient")
        if not rcpt:
            continue  # the per-message block
        diag = _strip_type(block.get("diagnostic-code", ""))
        m = _STATUS.search(block.get("status", ""))
        code_m = _DIAG_CODE.match(diag)
        out.append(
            DSNRecipient(
                recipient=_strip_type(rcpt).lower(),
                action=(block.get("action") or "").strip().lower() or None,
                status=m.group(1) if m else None,
                diagnostic=diag,
                remote_mta=_strip_type(block["remote-mta"]) if "remote-mta" in block else None,
                reply_code=int(code_m.group(1)) if code_m else None,
            )
        )
    return out


def _text_parts(msg: Message) -> list[str]:
    texts = []
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype in ("text/plain", "text/html") or (not part.is_multipart() and part is msg):
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes):
                charset = part.get_content_charset() or "utf-8"
                try:
                    texts.append(payload.decode(charset, "replace"))
                except LookupError:
                    texts.append(payload.decode("utf-8", "replace"))
        if ctype in ("message/rfc822", "text/rfc822-headers"):
            break  # the returned original follows: its addresses are not recipients
    return texts


def _from_prose(msg: Message) -> list[DSNRecipient]:
    """Fallback: "<addr>:" followed by the reason on the next lines (qmail, Exim, Postfix prose)."""
    own = {a.lower() for _, a in email.utils.getaddresses([str(msg.get("From", "")), str(msg.get("To", ""))])}
    found: dict[str, list[str]] = {}
    order: list[str] = []
    for text in _text_parts(msg):
        lines = text.replace("\r\n", "\n").split("\n")
        for i, line in enumerate(lines):
            m = _EMAIL.search(line)
            if m is None:
                continue
            addr = m.group(1).lower()
            if addr in own or addr.startswith(("mailer-daemon@", "postmaster@")):
                continue
            context = " ".join(s.strip() for s in lines[i : i + 4] if s.strip())
            if not re.search(r"\b[245]\d\d\b|#?[45]\.\d{1,3}\.\d|unknown|not found|no such|no mailbox|does not exist|invalid|unavailable|rejected|full|quota|failed|denied", context, re.I):
                continue
            if addr not in found:
                order.append(addr)
                found[addr] = [context]
    out = []
    for addr in order:
        diag = found[addr][0]
        st = _STATUS.search(diag)
        code = re.search(r"\b([245]\d\d)\b", diag)
        out.append(DSNRecipient(addr, None, st.group(1) if st else None, diag, None, int(code.group(1)) if code else None, False))
    return out


def parse_dsn(raw: bytes | str | Message) -> list[DSNRecipient]:
    """Per-recipient results of a bounce message; standard DSN fields first, prose as a fallback."""
    if isinstance(raw, Message):
        msg = raw
    elif isinstance(raw, bytes):
        msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    else:
        msg = email.message_from_string(raw, policy=email.policy.compat32)
    out: list[DSNRecipient] = []
    for part in msg.walk():
        if part.get_content_type() in ("message/delivery-status", "message/global-delivery-status"):
            out.extend(_from_delivery_status(part))
    return out or _from_prose(msg)


def classify_dsn(rcpt: DSNRecipient, classifier: Classifier | None = None) -> Classification:
    """Classify one DSN recipient: Status and Action are trusted over the prose."""
    cl = classifier or default_classifier()
    outcome = {"failed": Outcome.PERMANENT, "delayed": Outcome.TRANSIENT, "delivered": Outcome.DELIVERED}.get(
        rcpt.action or ""
    )
    return cl.classify_text(rcpt.diagnostic, code=rcpt.reply_code, enhanced=rcpt.status, outcome=outcome)
