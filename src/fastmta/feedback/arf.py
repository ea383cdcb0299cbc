"""Complaint (feedback-loop) reports: RFC 5965 ARF, and the older formats still sent.

An ARF report is a ``multipart/report; report-type=feedback-report`` with a
human-readable part, a ``message/feedback-report`` part of fields
(Feedback-Type, User-Agent, Version, Original-Mail-From, Original-Rcpt-To,
Arrival-Date, Source-IP, Reported-Domain, Reported-URI, Removal-Recipient,
...) and the reported message (``message/rfc822``) or its header
(``text/rfc822-headers``). :func:`parse_arf` returns a :class:`Complaint`
with those fields, the reported message's Message-ID and ``X-Fastmta-Ref``
trace header, and the recipients it concerns: Original-Rcpt-To; else
Removal-Recipient; else the reported message's own recipient headers.

Older formats, one row of :data:`_LEGACY` each: Microsoft's JMRP (Hotmail /
Outlook.com: the complained message attached, its recipient in
``X-HmXmrOriginalRecipient``), AOL's SCOMP, Apple Mail's one-click
unsubscribe (``X-Apple-Unsubscribe``), and Amazon SES complaint
notifications (JSON).
"""

from __future__ import annotations

import email
import email.policy
import email.utils
import re
from dataclasses import dataclass
from email.message import Message

from fastmta.feedback.dsn_codes import is_address
from fastmta.feedback.ses import ses_notification

__all__ = ["FEEDBACK_TYPES", "Complaint", "parse_arf"]

#: RFC 5965 (+ RFC 6591 auth-failure, RFC 6650 not-spam) feedback types; others are kept as written.
FEEDBACK_TYPES = frozenset({"abuse", "fraud", "virus", "other", "not-spam", "opt-out", "auth-failure"})
TRACE_HEADER = "X-Fastmta-Ref"


@dataclass(frozen=True, slots=True)
class Complaint:
    """What a complaint report says."""

    feedback_type: str  # abuse, fraud, virus, other, not-spam, opt-out, auth-failure, ...
    recipients: tuple[str, ...]  # whom it concerns (see the module notes); may be empty
    original_rcpt_to: tuple[str, ...] = ()
    original_mail_from: str | None = None
    user_agent: str | None = None
    version: str | None = None
    arrival_date: str | None = None  # Arrival-Date (or the older Received-Date)
    source_ip: str | None = None
    reported_domains: tuple[str, ...] = ()
    reported_uris: tuple[str, ...] = ()
    removal_recipients: tuple[str, ...] = ()
    message_id: str | None = None  # of the reported message
    fastmta_ref: str | None = None  # its X-Fastmta-Ref header, when it carried one
    reporter: str | None = None  # From of the report
    source: str = "arf"  # arf, or the older format's name (hotmail-jmrp, aol-scomp, apple-unsubscribe, amazonses)


@dataclass(frozen=True, slots=True)
class _Legacy:
    name: str
    sender: str  # regex on the report's From
    subject: str  # regex on its Subject ("" = any)
    recipient_header: str | None  # header of the attached message naming the recipient
    feedback_type: str


_LEGACY = (
    _Legacy("hotmail-jmrp", r"@(?:hotmail|msn|live|outlook)\.com\b", r"complaint about message", "X-HmXmrOriginalRecipient", "abuse"),
    _Legacy("aol-scomp", r"scomp@aol\.net", r"", None, "abuse"),
)
_LEGACY_COMPILED = tuple((row, re.compile(row.sender, re.I), re.compile(row.subject, re.I)) for row in _LEGACY)
_HEADERS_TYPES = ("text/rfc822-headers", "text/rfc822-header", "message/rfc822-headers", "text/rfc822")
_IP = re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b|\b[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{0,4}){2,7}\b")


def _message(raw: bytes | str | Message) -> Message:
    if isinstance(raw, Message):
        return raw
    if isinstance(raw, bytes):
        return email.message_from_bytes(raw, policy=email.policy.compat32)
    return email.message_from_string(raw, policy=email.policy.compat32)


def _report_fields(part: Message) -> list[tuple[str, str]]:
    """The fields of a message/feedback-report part, in order, repeats kept."""
    payload = part.get_payload()
    if isinstance(payload, list):
        return [(k.lower(), " ".join(str(v).split())) for m in payload if isinstance(m, Message) for k, v in m.items()]
    if isinstance(payload, str):
        fields: list[tuple[str, str]] = []
        for line in payload.replace("\r\n", "\n").split("\n"):
            if line[:1] in (" ", "\t") and fields:
                k, v = fields[-1]
                fields[-1] = (k, f"{v} {line.strip()}")
            elif ":" in line:
                k, _, v = line.partition(":")
                fields.append((k.strip().lower(), v.strip()))
        return fields
    return []


def _addr(value: str) -> str | None:
    addr = email.utils.parseaddr(value)[1] or value.strip().strip("<>")
    addr = addr.strip().lower()
    return addr if is_address(addr) else None


def _addrs(values: list[str]) -> tuple[str, ...]:
    out: list[str] = []
    for v in values:
        for part in v.split(","):
            a = _addr(part)
            if a and a not in out:
                out.append(a)
    return tuple(out)


def _reported_message(msg: Message) -> Message | None:
    """The reported message (or its header): the first message/rfc822 or rfc822-headers part of the report."""
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype in ("message/rfc822", "message/global"):
            inner = part.get_payload()
            if isinstance(inner, list) and inner and isinstance(inner[0], Message):
                return inner[0]
        if ctype in _HEADERS_TYPES:
            text = part.get_payload(decode=True)
            if isinstance(text, bytes):
                return email.message_from_bytes(text.lstrip(), policy=email.policy.compat32)
    return None


def _recipients_of(original: Message | None, header: str | None = None) -> tuple[str, ...]:
    if original is None:
        return ()
    names = [header] if header else []
    for name in [*names, "To", "Cc"]:
        found = _addrs([str(v) for v in original.get_all(name) or []])
        if found:
            return found
    return ()


def _trace(original: Message | None) -> tuple[str | None, str | None]:
    if original is None:
        return None, None
    mid = original.get("Message-ID")
    ref = original.get(TRACE_HEADER)
    return (" ".join(str(mid).split()) or None if mid else None, " ".join(str(ref).split()) or None if ref else None)


def _first(fields: list[tuple[str, str]], *names: str) -> str | None:
    for name in names:
        for k, v in fields:
            if k == name and v:
                return v
    return None


def _all(fields: list[tuple[str, str]], name: str) -> list[str]:
    return [v for k, v in fields if k == name and v]


def _from_arf(msg: Message, part: Message) -> Complaint:
    fields = _report_fields(part)
    original = _reported_message(msg)
    rcpt_to = _addrs(_all(fields, "original-rcpt-to"))
    removal = _addrs(_all(fields, "removal-recipient"))
    mid, ref = _trace(original)
    mail_from = _first(fields, "original-mail-from")
    return Complaint(
        feedback_type=(_first(fields, "feedback-type") or "other").lower(),
        # Microsoft's JMRP in ARF form names the recipient only in its own header of the returned message.
        recipients=rcpt_to or removal or _recipients_of(original, "X-HmXmrOriginalRecipient"),
        original_rcpt_to=rcpt_to,
        original_mail_from=(_addr(mail_from) or mail_from.strip("<> ")) if mail_from else None,
        user_agent=_first(fields, "user-agent"),
        version=_first(fields, "version"),
        arrival_date=_first(fields, "arrival-date", "received-date"),
        source_ip=_first(fields, "source-ip"),
        reported_domains=tuple(dict.fromkeys(d.lower() for d in _all(fields, "reported-domain"))),
        reported_uris=tuple(_all(fields, "reported-uri")),
        removal_recipients=removal,
        message_id=mid or _first(fields, "message-id"),
        fastmta_ref=ref,
        reporter=_addr(str(msg.get("From", ""))),
        source="arf",
    )


def _from_ses(doc: dict[str, object], msg: Message) -> Complaint | None:
    complaint = doc.get("complaint")
    mail = doc.get("mail")
    if not isinstance(complaint, dict):
        return None
    rcpts = _addrs([str(r.get("emailAddress", "")) for r in complaint.get("complainedRecipients") or [] if isinstance(r, dict)])
    mail_from = mail.get("source") if isinstance(mail, dict) else None
    ref = None
    if isinstance(mail, dict):
        for h in mail.get("headers") or []:
            if isinstance(h, dict) and str(h.get("name", "")).lower() == TRACE_HEADER.lower():
                ref = str(h.get("value"))
    return Complaint(
        # SES leaves the type out when the mailbox provider's report had none; every SES complaint is a spam-button report.
        feedback_type=str(complaint.get("complaintFeedbackType") or "abuse").lower(),
        recipients=rcpts,
        original_mail_from=str(mail_from) if mail_from else None,
        user_agent=str(complaint["userAgent"]) if complaint.get("userAgent") else None,
        arrival_date=str(complaint["arrivalDate"]) if complaint.get("arrivalDate") else None,
        message_id=str(mail["messageId"]) if isinstance(mail, dict) and mail.get("messageId") else None,
        fastmta_ref=ref,
        reporter=_addr(str(msg.get("From", ""))),
        source="amazonses",
    )


def _text_of(msg: Message) -> str:
    texts = []
    for part in msg.walk():
        if part.get_content_maintype() == "text":
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes):
                texts.append(payload.decode(part.get_content_charset() or "utf-8", "replace"))
        if part.get_content_type() == "message/rfc822":
            break
    return "\n".join(texts)


def _from_legacy(msg: Message) -> Complaint | None:
    sender = str(msg.get("From", ""))
    subject = str(msg.get("Subject", ""))
    reporter = _addr(sender)
    if msg.get("X-Apple-Unsubscribe", "").strip().lower() == "true":
        return Complaint("opt-out", _addrs([sender]), reporter=reporter, source="apple-unsubscribe")
    for row, sender_re, subject_re in _LEGACY_COMPILED:
        if not sender_re.search(sender) or (row.subject and not subject_re.search(subject)):
            continue
        original = _reported_message(msg)
        if original is None:
            continue
        mid, ref = _trace(original)
        ip = _IP.search(subject)
        return Complaint(
            row.feedback_type,
            _recipients_of(original, row.recipient_header),
            source_ip=ip.group(0) if ip else None,
            message_id=mid,
            fastmta_ref=ref,
            reporter=reporter,
            source=row.name,
        )
    return None


def parse_arf(raw: bytes | str | Message) -> Complaint | None:
    """The complaint in *raw* (ARF or an older format); None when it is not a complaint report."""
    try:
        return _parse(_message(raw), 0)
    except (LookupError, ValueError, TypeError, AttributeError, IndexError):  # malformed: not a report we can read
        return None


def _parse(msg: Message, depth: int) -> Complaint | None:
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype == "message/feedback-report":
            return _from_arf(msg, part)
        if ctype == "message/rfc822":
            break  # a feedback-report inside the reported message is not this report's
    legacy = _from_legacy(msg)
    if legacy is not None:
        return legacy
    doc = ses_notification(_text_of(msg))
    if doc is not None and (doc.get("notificationType") or doc.get("eventType")) == "Complaint":
        return _from_ses(doc, msg)
    inner = _reported_message(msg)  # a report forwarded as an attachment
    if inner is not None and inner.get_content_type() == "multipart/report" and depth < 3:
        return _parse(inner, depth + 1)
    return None
