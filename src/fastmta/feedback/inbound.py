"""What came back: one received message (to a bounce, FBL or unsubscribe address) -> the events it carries.

Sans-IO: bytes and the envelope in, :class:`InboundEvent` records out; the
service decides what to do with them (suppressions, accounting records,
webhooks). In the order they are believed:

1. an **ARF complaint** (RFC 5965, and the older formats :mod:`arf` reads):
   one ``complaint`` per recipient it concerns;
2. a **DSN** (RFC 3464 and the common non-standard formats :mod:`dsn` reads):
   one ``oob_bounce`` per failed recipient, ``oob_delay`` for a delay
   warning (never a bounce), ``oob_delivered`` for a success notice;
3. an **auto-reply** (RFC 3834 ``Auto-Submitted: auto-replied``, and what
   vacation programs write instead: ``X-Autoreply``, ``Precedence:
   auto_reply``, "Out of office" subjects): ``auto_reply``, never a bounce;
4. a **mailto: unsubscribe** (``mailto:u@domain?subject=TOKEN``, see :mod:`fastmta.message.unsubscribe`):
   ``unsubscribe``, whatever the body says;
5. anything else: ``unrecognized`` (kept and reported, acted on by nobody).

Every event says whether it was **verified**: its recipient and campaign
come from one of our signed return paths (VERP) or trace headers, which an
outsider cannot forge. Only verified events may suppress an address;
otherwise anyone could unsubscribe anybody by mailing us a fake bounce.
"""

from __future__ import annotations

import email
import email.policy
import email.utils
import re
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message

from fastmta.feedback.arf import Complaint, parse_arf
from fastmta.feedback.classify import Classifier
from fastmta.feedback.dsn import classify_dsn, parse_dsn
from fastmta.message.returnpath import TRACE_HEADER, ReturnPath

__all__ = ["InboundEvent", "read_inbound"]

_AUTO_SUBJECT = re.compile(
    r"^(?:auto(?:matic)?[ -]?(?:reply|response|antwort)|out of (?:the )?office|abwesenheit|absence|"
    r"r[ée]ponse automatique|vacation|on leave|away from)", re.IGNORECASE,
)
_TRACE = re.compile(rb"^" + TRACE_HEADER.encode() + rb":[ \t]*([A-Za-z0-9._-]{1,80})", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True, slots=True)
class InboundEvent:
    """One thing a received message says about one recipient of ours."""

    kind: str  # oob_bounce, oob_delay, oob_delivered, complaint, unsubscribe, auto_reply, unrecognized
    recipient: str  # whom it concerns ("" when it cannot tell)
    campaign: str | None = None  # the campaign (or message) ref, when verified
    verified: bool = False
    dsn_status: str | None = None  # RFC 3463 code, bounces only
    diagnostic: str = ""
    category: str | None = None
    bounce_type: str | None = None
    feedback_type: str | None = None  # complaints: abuse, fraud, ...
    sender_domain: str | None = None  # complaints: the domain the complaint is about (the message's From)
    list_tag: str | None = None  # unsubscribes
    reporter: str | None = None  # who sent the report
    envelope_from: str = ""
    envelope_to: str = ""

    def as_record(self) -> dict[str, object]:
        always = ("recipient", "verified")
        return {k: getattr(self, k) for k in self.__slots__ if k in always or getattr(self, k) not in (None, "")}


def _parse(raw: bytes) -> Message:
    return email.message_from_bytes(raw, policy=email.policy.compat32)


def _is_auto_reply(msg: Message) -> bool:
    auto = (msg.get("Auto-Submitted") or "").strip().lower()
    if auto.startswith("auto-replied"):
        return True
    if msg.get("X-Autoreply") or msg.get("X-Autorespond") or msg.get("X-Autoresponder"):
        return True
    if (msg.get("Precedence") or "").strip().lower() == "auto_reply":
        return True
    subject = str(msg.get("Subject") or "").strip()
    return bool(_AUTO_SUBJECT.match(subject))


def _from_domain(msg: Message | None) -> str | None:
    if msg is None:
        return None
    _, addr = email.utils.parseaddr(str(msg.get("From") or ""))
    return addr.rpartition("@")[2].lower().rstrip(".") or None


def _reported_message(msg: Message) -> Message | None:
    """The message a report returns or quotes (its message/rfc822 or headers part)."""
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype in ("message/rfc822", "message/global"):
            payload = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                return payload[0]
        if ctype in ("text/rfc822-headers", "message/rfc822-headers"):
            data = part.get_payload(decode=True)
            if isinstance(data, bytes):
                return _parse(data)
    return None


def read_inbound(
    raw: bytes,
    envelope_from: str,
    envelope_to: list[str],
    *,
    return_path: ReturnPath | None,
    classifier: Classifier | None = None,
    unsubscribe: Callable[[str, str], tuple[str, str] | None] | None = None,
) -> list[InboundEvent]:
    """The events *raw* carries; *unsubscribe(rcpt_to, subject)* verifies a mailto: unsubscribe into (list tag, recipient)."""
    env = {"envelope_from": envelope_from, "envelope_to": envelope_to[0] if envelope_to else ""}

    def verify(recipient: str, hints: list[str]) -> str | None:
        if return_path is None or not recipient:
            return None
        for hint in hints:
            ref = return_path.verify(hint, recipient)
            if ref is not None:
                return ref
        return None

    msg = _parse(raw)
    # 4. mailto: unsubscribe (``mailto:u@DOMAIN?subject=TOKEN``): decided by the address, not the content.
    if unsubscribe is not None:
        for to in envelope_to:
            local = to.rpartition("@")[0].lower()
            if local != "u" and not local.startswith("u-"):
                continue
            found = unsubscribe(to, str(msg.get("Subject") or ""))
            if found is not None:
                list_tag, rcpt = found
                return [InboundEvent("unsubscribe", rcpt, list_tag, True, list_tag=list_tag, **env)]
            return [InboundEvent("unsubscribe", "", None, False, diagnostic="token not genuine", **env)]

    traces = [m.group(1).decode("ascii") for m in _TRACE.finditer(raw)]
    hints = [*envelope_to, *traces]

    # 1. Complaints.
    complaint: Complaint | None = None
    try:
        complaint = parse_arf(msg)
    except Exception:  # a malformed report is "unrecognized", never a crash of the service
        complaint = None
    if complaint is not None:
        reported = _reported_message(msg)
        domain = _from_domain(reported)
        extra = [complaint.fastmta_ref] if complaint.fastmta_ref else []
        out = []
        for rcpt in complaint.recipients or ("",):
            ref = verify(rcpt, extra + hints)
            out.append(InboundEvent(
                "complaint", rcpt, ref, ref is not None, feedback_type=complaint.feedback_type,
                sender_domain=domain, reporter=complaint.reporter, **env,
            ))
        return out

    # 3 before 2 unless it is a report: a vacation reply quoting "unavailable" is not a
    # bounce; an RFC 3464 report carries Auto-Submitted: auto-replied too, and is one.
    if msg.get_content_type() != "multipart/report" and _is_auto_reply(msg):
        _, sender = email.utils.parseaddr(str(msg.get("From") or ""))
        return [InboundEvent("auto_reply", sender.lower(), None, False, diagnostic=str(msg.get("Subject") or "")[:200],
                             **env)]

    # 2. Bounces (DSNs).
    try:
        records = parse_dsn(msg)
    except Exception:
        records = []
    if records:
        out = []
        for rec in records:
            ref = verify(rec.recipient, hints)
            if rec.success:
                out.append(InboundEvent("oob_delivered", rec.recipient, ref, ref is not None, dsn_status=rec.status,
                                        **env))
                continue
            c = classify_dsn(rec, classifier)
            delayed = rec.action == "delayed" or (rec.status_class == 4 and rec.action != "failed")
            kind = "oob_delay" if delayed else "oob_bounce"
            out.append(InboundEvent(
                kind, rec.recipient, ref, ref is not None, dsn_status=rec.status, diagnostic=rec.diagnostic[:500],
                category=c.category.value, bounce_type=c.bounce.value if kind == "oob_bounce" else "none",
                reporter=rec.reporting_mta, **env,
            ))
        return out

    return [InboundEvent("unrecognized", "", None, False, diagnostic=str(msg.get("Subject") or "")[:200], **env)]
