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

import dataclasses
import email
import email.policy
import email.utils
import re
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message

from fastmta.feedback.arf import Complaint, parse_arf
from fastmta.feedback.classify import Classifier, default_classifier
from fastmta.feedback.dsn import classify_dsn, parse_dsn
from fastmta.feedback.dsn_record import DSNRecipient
from fastmta.message.returnpath import RCPT_HEADER, TRACE_HEADER, ReturnPath
from fastmta.smtp.dsn_params import DsnSyntaxError, xtext_decode

__all__ = ["InboundEvent", "read_inbound"]

_AUTO_SUBJECT = re.compile(
    r"^(?:auto(?:matic)?[ -]?(?:reply|response|antwort)|out of (?:the )?office|abwesenheit|absence|"
    r"r[ée]ponse automatique|vacation|on leave|away from)", re.IGNORECASE,
)
_TRACE = re.compile(rb"^" + TRACE_HEADER.encode() + rb":[ \t]*([A-Za-z0-9._-]{1,80})", re.IGNORECASE | re.MULTILINE)
_XTEXT_HEX = re.compile(r"\+[0-9A-Fa-f]{2}")
_SEALED = re.compile(rb"^" + RCPT_HEADER.encode() + rb":[ \t]*([A-Za-z0-9_-]{22,600})", re.IGNORECASE | re.MULTILINE)


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


def _second_guesses(final: str, original: str | None) -> list[str]:
    """Addresses a report's recipient may stand for when its Final-Recipient is not ours: its
    Original-Recipient, then either as xtext decoded (a bounce that left the ORCPT's encoding on)."""
    names = [original] if original else []
    names += [_xtext_decoded(n) for n in (original, final) if n and _XTEXT_HEX.search(n)]
    return [n for i, n in enumerate(names) if n != final and n not in names[:i]]


def _xtext_decoded(name: str) -> str:
    try:
        return xtext_decode(name.encode("utf-8"), "address").lower()
    except (DsnSyntaxError, UnicodeEncodeError):
        return name


def _parse(raw: bytes) -> Message:
    return email.message_from_bytes(raw, policy=email.policy.compat32)


def _header(msg: Message, name: str) -> str:
    """A header as text ("" when absent): compat32 gives a Header object for a non-ASCII one."""
    return str(msg.get(name) or "").strip()


def _is_auto_reply(msg: Message) -> bool:
    auto = _header(msg, "Auto-Submitted").lower()
    if auto.startswith("auto-replied"):
        return True
    if auto.startswith("auto-generated") and msg.get("X-Auto-Response-Suppress"):
        return True  # Outlook and Exchange mark their out-of-office replies so, in every language
    if msg.get("X-Autoreply") or msg.get("X-Autorespond") or msg.get("X-Autoresponder"):
        return True
    if _header(msg, "Precedence").lower() == "auto_reply":
        return True
    return bool(_AUTO_SUBJECT.match(_header(msg, "Subject")))


#: Who writes bounces: a reply from them is a bounce even when it says Auto-Submitted: auto-replied
#: (Exim's bounces do; so do mail.ru's, GMX's, Google Groups').
_MAILER = re.compile(r"^(?:mailer[-_]?daemon|mail[-_]?daemon|postmaster|mail[-_]?delivery[-_]?(?:system|subsystem)?)@",
                     re.IGNORECASE)


def _from_a_mailer(msg: Message, records: list[DSNRecipient]) -> bool:
    """Does an auto-reply-looking message come from mail software reporting a failure?"""
    if msg.get("X-Failed-Recipients") or any(r.source != "generic" for r in records):
        return True
    _, sender = email.utils.parseaddr(_header(msg, "From"))
    return bool(_MAILER.match(sender))


def _returned_recipients(msg: Message) -> list[str]:
    """The addresses the message a bounce returns was sent to (its To and Cc), and X-Failed-Recipients."""
    found = [a for _, a in email.utils.getaddresses([_header(msg, "X-Failed-Recipients")])]
    returned = _reported_message(msg)
    if returned is not None:
        found += [a for _, a in email.utils.getaddresses([_header(returned, "To"), _header(returned, "Cc")])]
    return list(dict.fromkeys(a.strip().lower() for a in found if "@" in a))


def _bounce_text(msg: Message) -> str:
    """The first lines of a bounce's own text part (its prose), for the classifier."""
    for part in msg.walk():
        if part.get_content_type() == "text/plain":
            data = part.get_payload(decode=True)
            if isinstance(data, bytes):
                return " ".join(data.decode("utf-8", "replace").split())[:500]
        if part.get_content_type() in ("message/rfc822", "message/global"):
            break  # the returned message's text is not the bounce's
    return _header(msg, "Subject")[:200]


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
        # Whom the quoted message was for, from its sealed trace: a loop that redacts the recipient
        # (Yahoo's, AOL's: "[redacted]") leaves nothing else to go by.
        sealed = [r for m in _SEALED.finditer(raw) if return_path is not None
                  and (r := return_path.unseal(m.group(1).decode("ascii"))) is not None]
        out = []
        for rcpt in complaint.recipients or ("",):
            ref = verify(rcpt, extra + hints)
            for named in sealed if ref is None else ():
                ref = verify(named, extra + hints)  # the mac still decides: a seal names, it does not prove
                if ref is not None:
                    rcpt = named
                    break
            out.append(InboundEvent(
                "complaint", rcpt, ref, ref is not None, feedback_type=complaint.feedback_type,
                sender_domain=domain, reporter=complaint.reporter, **env,
            ))
        return out

    # 2. Bounces (DSNs), and 3. auto-replies: a vacation reply quoting "unavailable" is not a
    # bounce, but an RFC 3464 report, or a bounce from mail software (Exim's), carries
    # Auto-Submitted: auto-replied too, and is one.
    try:
        records = parse_dsn(msg)
    except Exception:
        records = []
    if msg.get_content_type() != "multipart/report" and _is_auto_reply(msg) and not (
            records and _from_a_mailer(msg, records)):
        _, sender = email.utils.parseaddr(_header(msg, "From"))
        return [InboundEvent("auto_reply", sender.lower(), None, False, diagnostic=_header(msg, "Subject")[:200],
                             **env)]
    if records:
        out = []
        for rec in records:
            ref = verify(rec.recipient, hints)
            if ref is None:
                # Forwarded or alias-expanded at the receiver: Final-Recipient is the address the
                # mail went on to, Original-Recipient (RFC 3464 2.3.1) the one we sent to. Exim
                # writes the latter as the ORCPT's xtext, undecoded ("a+2Bnews@..." for
                # "a+news@..."): decoded only as a second guess, which the signed return path
                # confirms or not, since "+2B" may as well be part of a real address.
                for named in _second_guesses(rec.recipient, rec.original_recipient):
                    ref = verify(named, hints)
                    if ref is not None:
                        rec = dataclasses.replace(rec, recipient=named)
                        break
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

    # A bounce that names nobody in its own text: the returned message says whom it was for, and
    # only our signed return path can confirm that (so nothing else is believed).
    if _from_a_mailer(msg, []) or msg.get_content_type() == "multipart/report":
        for rcpt in _returned_recipients(msg):
            ref = verify(rcpt, hints)
            if ref is not None:
                text = _bounce_text(msg)
                c = (classifier or default_classifier()).classify_text(text)
                return [InboundEvent("oob_bounce", rcpt, ref, True, diagnostic=text, category=c.category.value,
                                     bounce_type=c.bounce.value, **env)]

    return [InboundEvent("unrecognized", "", None, False, diagnostic=_header(msg, "Subject")[:200], **env)]
