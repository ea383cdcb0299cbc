"""Header checks: RFC 5322 form, the fields every message needs, display names, one-click unsubscribe.

* lines over 998 octets (RFC 5322 2.1.1: a receiver may cut or refuse them),
  field names outside printable ASCII, lines that are neither a field nor a
  continuation, whitespace before the colon (obsolete syntax);
* 8-bit bytes in a header: legal only with SMTPUTF8 (RFC 6532) at every
  hop; encoded-words (RFC 2047) are the portable form;
* exactly one From, Date and Message-ID (Gmail rejects bulk mail without a
  Message-ID), at most one of Sender, Reply-To, To, Cc, Subject, ...
  (RFC 5322 3.6), a Date that parses, a Message-ID of the form ``<x@y>``;
* display names that show an email address other than the sender's, or
  another organization's domain (``"paypal.com" <x@evil.example>``);
* RFC 8058 one-click unsubscribe: a List-Unsubscribe with an https URI,
  ``List-Unsubscribe-Post: List-Unsubscribe=One-Click``, both under a DKIM
  signature (an error for campaigns: Gmail and Yahoo require it of bulk mail).
"""

from __future__ import annotations

import re
from email.message import EmailMessage
from email.utils import parsedate_to_datetime

from fastmta.check.dnsquery import aligned
from fastmta.check.links import shown_domain
from fastmta.check.report import Report
from fastmta.check.sample import Sample

__all__ = ["check_headers", "dkim_signed_headers"]

_NAME = re.compile(rb"^[!-9;-~]+$")
_MESSAGE_ID = re.compile(r"^\s*<[^<>@\s]+@[^<>@\s]+>\s*$")
_EMAIL_IN_TEXT = re.compile(r"[\w.+-]+@(?:[\w-]+\.)+[\w-]{2,}", re.U)
_H_TAG = re.compile(rb";\s*h\s*=([^;]*)", re.I)
_ONCE = (b"from", b"date", b"message-id")  # required, once
_AT_MOST_ONCE = (b"sender", b"reply-to", b"to", b"cc", b"bcc", b"subject", b"in-reply-to", b"references")
_LONG = 998


def _head_lines(message: bytes) -> list[bytes]:
    """The header section's lines (CRLF removed), up to the empty line."""
    end = message.find(b"\r\n\r\n")
    return (message[:end] if end >= 0 else message).split(b"\r\n")


def _form(sample: Sample, report: Report) -> None:
    lines = _head_lines(sample.message)
    problems = 0
    for number, line in enumerate(lines, 1):
        if line[:1] in (b" ", b"\t"):
            if number == 1:
                report.error("headers", "the message starts with a continuation line", "line 1", "rfc5322")
                problems += 1
            continue
        name, colon, _value = line.partition(b":")
        shown = name[:40].decode("ascii", "replace")
        if not colon:
            report.error("headers", f"line {number} is not a header field: {line[:60].decode('utf-8', 'replace')!r}",
                         f"header line {number}", "rfc5322")
            problems += 1
        elif name != name.rstrip(b" \t") and _NAME.match(name.rstrip(b" \t")):
            report.warning("headers", f"whitespace before the colon in {shown.strip()!r} (obsolete syntax)",
                           f"header {shown.strip()}", "rfc5322")
        elif not _NAME.match(name):
            report.error("headers", f"invalid header field name {shown!r}", f"header line {number}", "rfc5322")
            problems += 1
    for fields in sample.header_fields().values():
        for field in fields:
            if not field.isascii():
                label = field.split(b":", 1)[0].strip().decode("ascii", "replace")
                report.warning("headers", f"8-bit bytes in {label}: needs SMTPUTF8 (RFC 6532) at every hop; "
                               "encode them as RFC 2047 encoded-words", f"header {label}", "rfc5322")
                break
    long_lines = [n for n, line in enumerate(sample.message.split(b"\r\n"), 1) if len(line) > _LONG]
    if long_lines:
        head_lines = len(lines)
        first = long_lines[0]
        where = f"header line {first}" if first <= head_lines else f"body line {first - head_lines - 1}"
        report.error("headers" if first <= head_lines else "content",
                     f"{len(long_lines)} line(s) over {_LONG} octets (RFC 5322 2.1.1); the first at {where}",
                     where, "rfc5322")
        problems += 1
    if not problems:
        report.ok("headers", "header section is well-formed RFC 5322; no line over 998 octets", "", "rfc5322")


def _counts(sample: Sample, report: Report) -> None:
    fields = sample.header_fields()
    for name in _ONCE:
        n = len(fields.get(name, []))
        label = name.decode().title().replace("Id", "ID")
        if n == 0:
            report.error("headers", f"no {label} field (required: RFC 5322 3.6{'; Gmail rejects bulk mail without one' if name == b'message-id' else ''})",
                         f"header {label}", "rfc5322")
        elif n > 1:
            report.error("headers", f"{n} {label} fields; RFC 5322 allows one", f"header {label}", "rfc5322")
    for name in _AT_MOST_ONCE:
        n = len(fields.get(name, []))
        if n > 1:
            label = name.decode().title()
            report.error("headers", f"{n} {label} fields; RFC 5322 allows one", f"header {label}", "rfc5322")
    if not fields.get(b"subject"):
        report.warning("headers", "no Subject", "header Subject")
    dates = fields.get(b"date", [])
    if len(dates) == 1:
        value = dates[0].split(b":", 1)[1].decode("utf-8", "replace").strip()
        try:
            parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            report.error("headers", f"Date does not parse as an RFC 5322 date: {value!r}", "header Date", "rfc5322")
    ids = fields.get(b"message-id", [])
    if len(ids) == 1:
        value = ids[0].split(b":", 1)[1].decode("utf-8", "replace").replace("\r\n", "")
        if not _MESSAGE_ID.match(value):
            report.error("headers", f"Message-ID is not of the form <id@domain>: {value.strip()!r}",
                         "header Message-ID", "rfc5322")
    if fields.get(b"content-type") and not fields.get(b"mime-version"):
        report.warning("headers", "Content-Type without MIME-Version: 1.0", "header MIME-Version", "rfc5322")


def _display_names(msg: EmailMessage, report: Report) -> None:
    for name in ("From", "Sender", "Reply-To"):
        try:
            headers = msg.get_all(name, [])
            parsed = [getattr(header, "addresses", ()) for header in headers]
        except Exception as exc:  # the email package's parser can fail on hostile input: report, go on
            report.error("headers", f"{name} cannot be parsed: {exc}", f"header {name}", "rfc5322")
            continue
        for addresses in parsed:
            if name == "From" and len(addresses) > 1 and msg.get("Sender") is None:
                report.error("headers", "From holds several mailboxes and there is no Sender (RFC 5322 3.6.2)",
                             "header From", "rfc5322")
            for address in addresses:
                display, addr = address.display_name or "", (address.addr_spec or "").lower()
                domain = addr.rpartition("@")[2]
                shown = [e.lower() for e in _EMAIL_IN_TEXT.findall(display)]
                if any(e != addr for e in shown):
                    report.error("headers", f"the display name {display!r} shows an address other than the "
                                 f"sender's {addr!r} (a lookalike)", f"header {name}")
                    continue
                if shown:
                    continue
                domain_shown = shown_domain(display)
                if domain_shown and domain and not aligned(domain_shown, domain):
                    report.warning("headers", f"the display name {display!r} names the domain {domain_shown}, "
                                   f"but the address is at {domain} (a lookalike)", f"header {name}")


def dkim_signed_headers(sample: Sample) -> list[set[bytes]]:
    """The h= list of each DKIM-Signature, lower-case names."""
    signed = []
    for field in sample.header_fields().get(b"dkim-signature", []):
        m = _H_TAG.search(field)
        if m:
            names = re.sub(rb"\s+", b"", m.group(1)).lower().split(b":")
            signed.append({n for n in names if n})
    return signed


def _one_click(sample: Sample, report: Report) -> None:
    fields = sample.header_fields()
    flag = report.error if sample.campaign else report.warning
    lu = fields.get(b"list-unsubscribe", [])
    lup = fields.get(b"list-unsubscribe-post", [])
    if not lu:
        hint = "configure [unsubscribe] base_url, or give the template a List-Unsubscribe" if sample.campaign else \
            "bulk mail must carry one"
        flag("unsubscribe", f"no List-Unsubscribe header: one-click unsubscribe (RFC 8058) is missing; {hint}",
             "header List-Unsubscribe", "unsubscribe")
        return
    value = b" ".join(f.split(b":", 1)[1] for f in lu).decode("utf-8", "replace")
    uris = re.findall(r"<([^>]*)>", value)
    problems = 0
    https = [u.strip() for u in uris if u.strip().lower().startswith("https://")]
    if not https:
        flag("unsubscribe", "List-Unsubscribe has no https URI: one-click needs one (RFC 8058 3.1)",
             "header List-Unsubscribe", "unsubscribe")
        problems += 1
    post = [f.split(b":", 1)[1].strip() for f in lup]
    if not post:
        flag("unsubscribe", "no List-Unsubscribe-Post: List-Unsubscribe=One-Click (RFC 8058)",
             "header List-Unsubscribe-Post", "unsubscribe")
        problems += 1
    elif post != [b"List-Unsubscribe=One-Click"]:
        flag("unsubscribe", f"List-Unsubscribe-Post is {post[0].decode('utf-8', 'replace')!r}, "
             "not 'List-Unsubscribe=One-Click'", "header List-Unsubscribe-Post", "unsubscribe")
        problems += 1
    signed = dkim_signed_headers(sample)
    needed = {b"list-unsubscribe", b"list-unsubscribe-post"} if post else {b"list-unsubscribe"}
    if signed and not any(needed <= s for s in signed):
        flag("unsubscribe", "the one-click headers are not covered by a DKIM signature (RFC 8058 4)",
             "header DKIM-Signature", "unsubscribe")
        problems += 1
    if not problems:
        report.ok("unsubscribe", f"one-click unsubscribe: List-Unsubscribe <{https[0][:100]}> with "
                  "List-Unsubscribe-Post" + (", DKIM-signed" if signed else ""), "header List-Unsubscribe",
                  "unsubscribe")


def check_headers(sample: Sample, msg: EmailMessage, report: Report) -> None:
    """Every header check on *sample* (*msg*: the same message parsed by the email package)."""
    _form(sample, report)
    _counts(sample, report)
    _display_names(msg, report)
    _one_click(sample, report)
