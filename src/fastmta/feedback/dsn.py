"""Bounce (DSN) parsing: a returned message -> one record per recipient it reports on.

Readers, in the order they are believed:

1. RFC 3464 ``message/delivery-status`` parts (:mod:`~fastmta.feedback.dsn_fields`),
   also when the fields are written as text (broken MIME, a forwarded or
   pasted report);
2. Amazon SES JSON notifications (:mod:`~fastmta.feedback.ses`);
3. prose, by MTA family (:mod:`~fastmta.feedback.dsn_prose`, rows in
   :mod:`~fastmta.feedback.dsn_formats`): qmail, Exim, Postfix, Sendmail,
   Gmail, Exchange / Office 365, Lotus Notes / Domino, OpenSMTPD and others;
4. the ``X-Failed-Recipients`` header; last, a cautious generic scan.

The prose prevails over nothing else, but fills what the fields lack: a
reason where a delivery-status block has no Diagnostic-Code, an address
where its Final-Recipient is a pipe or a source route. A forwarded bounce
(attached as ``message/rfc822`` or quoted with ``>``) is read through; the
returned original message inside a bounce never is. Reply and status codes
come only from the text that belongs to a recipient, as whole tokens
(:mod:`~fastmta.feedback.dsn_codes`): never out of an IP address, a version
or a date. A failure record never carries a 2.x.x status or a 2xx reply
code; those stay with success notifications (``Action: delivered``).
Each record can be classified with :func:`classify_dsn`.
"""

from __future__ import annotations

import dataclasses
import email
import email.policy
import email.utils
import re
from collections.abc import Iterator
from email.message import Message

from fastmta.feedback.classification import Classification, Outcome
from fastmta.feedback.classify import Classifier, default_classifier
from fastmta.feedback.dsn_codes import ADDRESS, codes_in, is_address
from fastmta.feedback.dsn_fields import STATUS_TYPES, from_part, from_text
from fastmta.feedback.dsn_formats import FORMATS
from fastmta.feedback.dsn_prose import COMMON_END, Found, compile_formats, html_to_text, read_prose, to_records, unquote
from fastmta.feedback.dsn_record import SUCCESS_ACTIONS, DSNRecipient, make_recipient, refined_status
from fastmta.feedback.ses import ses_notification

__all__ = ["DSNRecipient", "classify_dsn", "parse_dsn"]

_FORMATS = compile_formats(FORMATS)
_ORIGINAL_TYPES = ("message/rfc822", "text/rfc822-headers", "message/rfc822-headers", "message/global", "message/global-headers")
_MBOX_FROM = re.compile(rb"\n\n(?=From \S+ +(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun) (?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) )")
_REPORT_FROM = re.compile(r"mailer-daemon|postmaster|mail delivery|mail administrator|mailadmin|bounce", re.IGNORECASE)
_REPORT_SUBJECT = re.compile(
    r"undeliver|returned mail|delivery status notification|failure notice|delivery fail|mail delivery|non[- ]?delivery"
    r"|could not be delivered|returning message|delivery report|delayed mail|warning:|mail system error|error sending",
    re.IGNORECASE,
)
_END = tuple(re.compile(p, re.IGNORECASE) for p in COMMON_END)
_GENERIC_FAILURE = re.compile(
    r"\b[45]\d\d\b|#?[45]\.\d{1,3}\.\d|unknown|not found|no such|no mailbox|does not exist|invalid|unavailable|rejected"
    r"|full|quota|failed|denied|disabled|not accepted|refused",
    re.IGNORECASE,
)
_GENERIC_DELAY = re.compile(r"has been delayed|will (?:continue to )?(?:be )?retr|THIS IS A WARNING|not yet been delivered", re.IGNORECASE)
_HEADERISH = re.compile(r"^\s*(?:From|To|Cc|Reply-To|Sender|Return-Path|Errors-To|Message-I[dD]|Subject|Date)\s*:", re.IGNORECASE)
_OCTAL_UTF8 = re.compile(r"\\3[0-7]{2}(?:\\2[0-7]{2})+")
_GENERATED = re.compile(r"\((?:ultimately )?(?:generated|expanded) from:? <?(" + ADDRESS.pattern + r")>?\)")
_DAEMONS = ("mailer-daemon@", "postmaster@", "mail-daemon@", "mailerdaemon@")
#: A recipient's own reason saying its message was given up: OpenSMTPD (6.x) reports the expiry of an
#: envelope it has dropped in a notice that says "Action: delayed" and "kept in the queue".
_NULLMAILER = re.compile(r"^This is the nullmailer delivery system", re.MULTILINE)
_EXPIRED = re.compile(r"\b(?:envelope|message|delivery time) (?:has )?expired\b", re.IGNORECASE)


# ---------------------------------------------------------------------------
# The message's own parts (the report) versus what it returns or forwards


def _own_parts(msg: Message) -> Iterator[Message]:
    """Leaf parts of the report itself: not inside a returned (or forwarded) message."""
    if msg.is_multipart() and msg.get_content_type() not in STATUS_TYPES:
        payload = msg.get_payload()
        if not isinstance(payload, list):
            return
        if msg.get_content_type() == "multipart/alternative":
            plain = [p for p in payload if isinstance(p, Message) and p.get_content_type() == "text/plain"]
            if plain:
                payload = plain
        for sub in payload:
            if isinstance(sub, Message) and sub.get_content_type() not in _ORIGINAL_TYPES:
                yield from _own_parts(sub)
        return
    body = msg.get_payload()
    if msg.get_content_maintype() == "multipart" and isinstance(body, str):
        repaired = _repair_multipart(body)
        if repaired is not None:
            yield from _own_parts(repaired)
            return
    yield msg


_BOUNDARY_LINE = re.compile(r"^--(?=\S*[^\s-])(\S{1,200}?)\s*$", re.MULTILINE)  # not a rule of dashes


def _repair_multipart(body: str) -> Message | None:
    """A multipart whose boundary parameter got lost (a header line not folded): parse it by the first boundary line."""
    m = _BOUNDARY_LINE.search(body)
    if m is None or m.group(1).endswith("--"):
        return None
    boundary = m.group(1).replace('"', "")
    fixed = email.message_from_string(
        f'Content-Type: multipart/mixed; boundary="{boundary}"\n\n' + body[m.start() :], policy=email.policy.compat32
    )
    return fixed if fixed.is_multipart() else None


def _attached(msg: Message) -> list[Message]:
    """Messages attached to the report (message/rfc822), outermost first."""
    out: list[Message] = []
    if not msg.is_multipart():
        return out
    for sub in msg.get_payload():
        if not isinstance(sub, Message):
            continue
        if sub.get_content_type() in ("message/rfc822", "message/global"):
            inner = sub.get_payload()
            if isinstance(inner, list) and inner and isinstance(inner[0], Message):
                out.append(inner[0])
        elif sub.is_multipart():
            out.extend(_attached(sub))
    return out


def _decoded(part: Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        raw = part.get_payload()
        return raw if isinstance(raw, str) else ""
    charset = (part.get_content_charset() or "utf-8").strip().strip('"').lower()
    for cs in (charset, "utf-8", "latin-1"):
        try:
            return payload.decode(cs)
        except (LookupError, UnicodeDecodeError):
            continue
    return payload.decode("utf-8", "replace")


def _report_text(parts: list[Message]) -> str:
    plain: list[str] = []
    markup: list[str] = []
    for part in parts:
        ctype = part.get_content_type()
        if ctype in STATUS_TYPES:
            continue
        if ctype == "text/html":
            markup.append(html_to_text(_decoded(part)))
        elif ctype.startswith(("text/", "multipart/")) or ctype == "application/json":  # multipart: its boundaries lost
            plain.append(_decoded(part))
    text = "\n".join(plain) if any(t.strip() for t in plain) else "\n".join(markup)
    return unquote(text.replace("\r\n", "\n").replace("\r", "\n"))


def _octal_utf8(text: str) -> str:
    """Exim writes the octets of a non-ASCII address as octal escapes ("r\\303\\274b@..."): read back.

    Only a UTF-8 lead byte's escape followed by its continuation bytes' is
    read, so a backslash and digits in other text stay as they are.
    """
    if "\\" not in text:
        return text

    def one(m: re.Match[str]) -> str:
        try:
            return bytes(int(o, 8) for o in m.group(0).split("\\")[1:]).decode("utf-8")
        except UnicodeDecodeError:
            return m.group(0)

    return _OCTAL_UTF8.sub(one, text)


def _header_addresses(msg: Message, *names: str) -> list[str]:
    values = [_octal_utf8(str(v)) for name in names for v in (msg.get_all(name) or [])]
    return [a.lower() for _, a in email.utils.getaddresses(values) if is_address(a)]


def _looks_like_report(msg: Message) -> bool:
    if msg.get_content_type() == "multipart/report":
        return True
    if _REPORT_FROM.search(str(msg.get("From", ""))):
        return True
    return bool(_REPORT_SUBJECT.search(str(msg.get("Subject", ""))))


# ---------------------------------------------------------------------------
# Reading one message


def _section_end(lines: list[str]) -> int:
    for i, line in enumerate(lines):
        if any(p.search(line) for p in _END):
            return i
    return len(lines)


def _with_diagnostic(rec: DSNRecipient, text: str) -> DSNRecipient:
    code, enh = codes_in(text, "2" if rec.success else "45")
    return dataclasses.replace(
        rec,
        diagnostic=" ".join(text.split()),
        reply_code=rec.reply_code if rec.reply_code is not None else code,
        status=refined_status(rec.status, enh),
    )


def _merge_fields_and_prose(recs: list[DSNRecipient], prose: list[Found], xfr: list[str]) -> list[DSNRecipient]:
    by_addr = {f.address: f for f in prose if f.address}
    known = {r.recipient for r in recs}
    spare = [a for a in [*(f.address for f in prose if f.address), *xfr] if a not in known]
    out: list[DSNRecipient] = []
    for rec in recs:
        if not is_address(rec.recipient) and spare:
            rec = dataclasses.replace(rec, recipient=spare.pop(0))
        found = by_addr.get(rec.recipient) or (by_addr.get(rec.original_recipient) if rec.original_recipient else None)
        if found is not None and not rec.diagnostic and found.diag:
            rec = _with_diagnostic(rec, " ".join(found.diag))
        out.append(rec)
    return out


def _resolve(
    found: list[Found], generated: list[str | None], xfr: list[str], full_text: str,
) -> list[str | None]:
    """Addresses for the recipients prose named otherwise (a local part, a pipe): the address each was
    "generated from" (*generated*), X-Failed-Recipients, or the original's headers."""
    used = {f.address for f in found if f.address}
    spare = [a for a in xfr if a not in used]
    out: list[str | None] = []
    for f, origin in zip(found, generated):
        if f.address:
            out.append(f.address)
        elif origin is not None:
            out.append(origin)
        elif spare:
            out.append(spare.pop(0))
        else:
            local = f.hint.strip().lower()
            match = next((m.group(0).lower() for m in ADDRESS.finditer(full_text) if m.group(0).lower().split("@")[0] == local), None)
            out.append(match)
    return out


def _generic(text: str, own: set[str], delayed: bool) -> list[DSNRecipient]:
    """Last resort: an address near failure words, not one of the report's own (From, To, ...) nor a daemon's."""
    lines = text.split("\n")
    lines = lines[: _section_end(lines)]
    found: dict[str, str] = {}
    for i, line in enumerate(lines):
        if _HEADERISH.match(line) or "@" not in line:
            continue
        m = ADDRESS.search(line)
        if m is None:
            continue
        addr = m.group(0).lower().strip("'")
        if not is_address(addr) or addr in own or addr.startswith(_DAEMONS) or addr in found:
            continue
        context = " ".join(s.strip() for s in lines[i : i + 4] if s.strip())
        if _GENERIC_FAILURE.search(context):
            found[addr] = context
    return [
        make_recipient(a, action="delayed" if delayed else "failed", status=None, diagnostic=d, standard=False, source="generic")
        for a, d in found.items()
    ]


def _ses_records(doc: dict[str, object]) -> list[DSNRecipient]:
    kind = doc.get("notificationType") or doc.get("eventType")
    body = doc.get("bounce") if kind == "Bounce" else doc.get("delivery") if kind == "Delivery" else None
    if not isinstance(body, dict):
        return []
    out: list[DSNRecipient] = []
    reporting = str(body.get("reportingMTA") or "") or None
    if kind == "Delivery":
        for addr in body.get("recipients") or []:
            if isinstance(addr, str):
                diag = str(body.get("smtpResponse") or "")
                out.append(make_recipient(addr, action="delivered", status=None, diagnostic=diag, standard=False, source="amazonses", reporting_mta=reporting))
        return out
    default = "delayed" if body.get("bounceType") == "Transient" else "failed"
    for r in body.get("bouncedRecipients") or []:
        if not isinstance(r, dict) or not isinstance(r.get("emailAddress"), str):
            continue
        action = str(r.get("action") or default)
        out.append(
            make_recipient(
                email.utils.parseaddr(r["emailAddress"])[1] or r["emailAddress"],
                action=default if action in SUCCESS_ACTIONS else action,  # a bounce notification is never a delivery
                status=str(r["status"]) if r.get("status") else None,
                diagnostic=re.sub(r"^\s*[\w-]+;\s*", "", str(r.get("diagnosticCode") or "")),
                standard=False,
                source="amazonses",
                reporting_mta=reporting,
            )
        )
    return out


def _parse_message(msg: Message, depth: int = 0) -> list[DSNRecipient]:
    parts = list(_own_parts(msg))
    fields: list[DSNRecipient] = []
    for part in parts:
        if part.get_content_type() in STATUS_TYPES:
            fields.extend(from_part(part))
    text = _octal_utf8(_report_text(parts))
    if not fields:
        fields = from_text(text)
    xfr = _header_addresses(msg, "X-Failed-Recipients")
    if not fields:
        doc = ses_notification(text)
        if doc is not None:
            return _ses_records(doc)
    prose = read_prose(text, _FORMATS)
    if fields:
        if _NULLMAILER.search(text):
            # nullmailer writes a notice only when it gives a message up (its queue lifetime), yet after a
            # 4xx says "Action: delayed", "a final DSN will be generated": none comes. A failure.
            fields = [dataclasses.replace(r, action="failed", status="4.4.7") if r.action == "delayed" else r
                      for r in fields]
        return _merge_fields_and_prose(fields, prose[2] if prose else [], xfr)
    if prose is not None:
        family, delayed, found = prose
        if found:
            full = text + "\n" + "\n".join(m.as_string() for m in _attached(msg))
            # Exim names the address that failed, then "(generated from X)": X is the one we sent to,
            # forwarded there, kept as the original recipient (what a return path is verified against).
            originals = [g.group(1).lower() if (g := _GENERATED.search(" ".join(f.diag))) else None for f in found]
            return to_records(family, delayed, found, _resolve(found, originals, xfr, full), originals)
        return []  # a family's success notice
    delayed = bool(_GENERIC_DELAY.search(text))
    if xfr:
        lines = text.split("\n")
        diag = " ".join(s.strip() for s in lines[: _section_end(lines)] if s.strip())
        return [
            make_recipient(a, action="delayed" if delayed else "failed", status=None, diagnostic=diag, standard=False, source="x-failed-recipients")
            for a in dict.fromkeys(xfr)
        ]
    if depth < 3:
        for inner in _attached(msg):
            if _looks_like_report(inner):
                recs = _parse_message(inner, depth + 1)
                if recs:
                    return recs
    if not _looks_like_report(msg):
        return []
    own = set(_header_addresses(msg, "From", "To", "Cc", "Reply-To", "Return-Path", "Sender"))
    return _generic(text, own, delayed)


def _messages(raw: bytes | str) -> Iterator[Message]:
    data = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else raw
    chunks = _MBOX_FROM.split(data) if b"\n\nFrom " in data else [data]
    for chunk in chunks:
        if chunk.strip():
            yield email.message_from_bytes(chunk, policy=email.policy.compat32)


def parse_dsn(raw: bytes | str | Message) -> list[DSNRecipient]:
    """Per-recipient results of a bounce message (or of an mbox of them); [] when it is not one."""
    msgs = [raw] if isinstance(raw, Message) else list(_messages(raw))
    out: list[DSNRecipient] = []
    seen: set[str] = set()
    for msg in msgs:
        try:
            recs = _parse_message(msg)
        except (LookupError, ValueError, TypeError, AttributeError, IndexError):  # a malformed message is not a bounce
            recs = []
        for rec in recs:
            if rec.action == "delayed" and _EXPIRED.search(rec.diagnostic):
                rec = dataclasses.replace(rec, action="failed")  # a warning about mail no longer queued: final
            if rec.recipient not in seen:
                seen.add(rec.recipient)
                out.append(rec)
    return out


def classify_dsn(rcpt: DSNRecipient, classifier: Classifier | None = None) -> Classification:
    """Classify one DSN recipient: Status and Action are trusted over the prose."""
    cl = classifier or default_classifier()
    if rcpt.success:
        outcome: Outcome | None = Outcome.DELIVERED
    else:
        outcome = {"failed": Outcome.PERMANENT, "undeliverable": Outcome.PERMANENT, "delayed": Outcome.TRANSIENT}.get(rcpt.action or "")
    return cl.classify_text(rcpt.diagnostic, code=rcpt.reply_code, enhanced=rcpt.status, outcome=outcome)
