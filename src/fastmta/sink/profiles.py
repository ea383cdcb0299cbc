"""Provider profiles for the sink: what a mailbox provider *says*.

A profile is only wording and one behaviour switch: the reply texts a
provider uses for success, rate limiting, connection caps, greylisting and
unknown users, and whether unknown recipients are refused at RCPT time or
only after the message was scanned (a B2B filtering appliance). *When* a
fault happens is decided by :mod:`fastmta.sink.faults` from the fault
configuration; the profile only decides how it reads, so a throttle or a
bounce classifier can be tested against realistic text.

Texts are templates: ``{host}`` (the listener's host name), ``{ip}`` (the
client's address), ``{sender}``, ``{rcpt}`` and ``{id}`` (a queue id) are
filled in when the reply is sent. Substituted values come from validated
envelope addresses, which can never hold CR, LF or NUL.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

_FIELD_NAMES = ("host", "ip", "sender", "rcpt", "id")


@dataclass(frozen=True, slots=True)
class ReplyTemplate:
    """One SMTP reply, possibly multi-line, with ``{field}`` placeholders."""

    code: int
    lines: tuple[str, ...]

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"reply code out of range: {self.code}")
        for line in self.lines:
            if any(c in line for c in "\r\n\0"):
                raise ValueError(f"reply text may not contain CR, LF or NUL: {line!r}")

    @property
    def dynamic(self) -> bool:
        """True when rendering depends on the connection (has placeholders)."""
        return any("{" in line for line in self.lines)

    def render(self, fields: Mapping[str, str] | None = None) -> bytes:
        """The reply on the wire: ``code-text`` lines, the last ``code text``."""
        lines = self.lines or ("",)
        if fields is not None and self.dynamic:
            lines = tuple(_fill(line, fields) for line in lines)
        out = []
        last = len(lines) - 1
        for i, line in enumerate(lines):
            sep = " " if i == last else "-"
            out.append(f"{self.code}{sep}{line}".rstrip(" ") + "\r\n")
        return "".join(out).encode("utf-8")


def _fill(line: str, fields: Mapping[str, str]) -> str:
    try:
        return line.format_map(_Fields(fields))
    except (ValueError, IndexError, KeyError, AttributeError):
        # A user's fault text with a stray brace is sent as written.
        return line


class _Fields(dict[str, str]):
    """format_map helper: an unknown ``{name}`` stays visible instead of raising."""

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def reply(code: int, *lines: str) -> ReplyTemplate:
    return ReplyTemplate(code, tuple(lines))


#: Fallback texts for a fault given only as a code (``--fault rcpt:0.1:451``).
GENERIC_TEXTS: dict[int, str] = {
    421: "4.7.0 {host} Service not available, closing transmission channel",
    450: "4.2.0 Requested mail action not taken: mailbox unavailable",
    451: "4.3.0 Requested action aborted: local error in processing",
    452: "4.3.1 Requested action not taken: insufficient system storage",
    550: "5.7.1 Requested action not taken: policy rejection",
    551: "5.1.6 User not local",
    552: "5.3.4 Requested mail action aborted: exceeded storage allocation",
    553: "5.1.3 Requested action not taken: mailbox name not allowed",
    554: "5.7.1 Transaction failed",
}


@dataclass(frozen=True, slots=True)
class ProviderProfile:
    """How one kind of receiving server words its replies."""

    name: str
    description: str
    hostname: str
    greeting: ReplyTemplate
    ehlo_first_line: str
    mail_ok: ReplyTemplate
    rcpt_ok: ReplyTemplate
    data_go: ReplyTemplate
    queued: ReplyTemplate
    quit: ReplyTemplate
    rate_limited: ReplyTemplate
    too_many_connections: ReplyTemplate
    greylisted: ReplyTemplate
    unknown_user: ReplyTemplate
    #: A B2B filtering appliance accepts every recipient, scans the content,
    #: and only then refuses the whole message with "550 5.1.1 user unknown".
    unknown_at_end_of_data: bool = False
    #: Texts this provider uses for a fault given only as a code.
    texts_by_code: Mapping[int, str] = field(default_factory=dict)

    def text_for(self, code: int) -> ReplyTemplate:
        """The reply this provider would send for a bare code."""
        text = self.texts_by_code.get(code) or GENERIC_TEXTS.get(code)
        if text is None:
            klass = code // 100
            text = f"{klass}.0.0 Requested action not taken" if klass in (4, 5) else "2.0.0 Ok"
        return ReplyTemplate(code, tuple(text.split("\n")))


DEFAULT = ProviderProfile(
    name="default",
    description="plain Postfix-like replies",
    hostname="sink.fastmta.test",
    greeting=reply(220, "{host} ESMTP fastmta sink"),
    ehlo_first_line="{host}",
    mail_ok=reply(250, "2.1.0 Ok"),
    rcpt_ok=reply(250, "2.1.5 Ok"),
    data_go=reply(354, "End data with <CR><LF>.<CR><LF>"),
    queued=reply(250, "2.0.0 Ok: queued as {id}"),
    quit=reply(221, "2.0.0 Bye"),
    rate_limited=reply(450, "4.7.1 <{sender}>: Sender rate limit exceeded, try again later"),
    too_many_connections=reply(421, "4.7.0 {host} Error: too many connections from {ip}"),
    greylisted=reply(450, "4.7.1 <{rcpt}>: Recipient address rejected: Greylisted, try again later"),
    unknown_user=reply(550, "5.1.1 <{rcpt}>: Recipient address rejected: User unknown in local recipient table"),
)

GMAIL = ProviderProfile(
    name="gmail",
    description="gmail-like: '- gsmtp' texts, 421 4.7.28 rate limiting, 450 4.2.1 busy recipients",
    hostname="mx.google.com",
    greeting=reply(220, "{host} ESMTP {id} - gsmtp"),
    ehlo_first_line="{host} at your service, [{ip}]",
    mail_ok=reply(250, "2.1.0 OK {id} - gsmtp"),
    rcpt_ok=reply(250, "2.1.5 OK {id} - gsmtp"),
    data_go=reply(354, " Go ahead {id} - gsmtp"),
    queued=reply(250, "2.0.0 OK {id} - gsmtp"),
    quit=reply(221, "2.0.0 closing connection {id} - gsmtp"),
    rate_limited=reply(
        421,
        "4.7.28 [{ip}] Our system has detected an unusual rate of",
        "4.7.28 unsolicited mail originating from your IP address. To protect our",
        "4.7.28 users from spam, mail sent from your IP address has been temporarily",
        "4.7.28 rate limited. For more information, go to",
        "4.7.28  https://support.google.com/mail/?p=UnsolicitedRateLimitError {id} - gsmtp",
    ),
    too_many_connections=reply(421, "4.7.0 Try again later, closing connection. (EHLO) {id} - gsmtp"),
    greylisted=reply(
        450,
        "4.7.1 The user you are trying to contact is receiving mail at a rate that",
        "4.7.1 prevents additional messages from being delivered. Please resend your",
        "4.7.1 message at a later time. {id} - gsmtp",
    ),
    unknown_user=reply(
        550,
        "5.1.1 The email account that you tried to reach does not exist. Please try",
        "5.1.1 double-checking the recipient's email address for typos or",
        "5.1.1 unnecessary spaces. For more information, go to",
        "5.1.1  https://support.google.com/mail/?p=NoSuchUser {id} - gsmtp",
    ),
    texts_by_code={
        421: "4.7.0 Try again later, closing connection. {id} - gsmtp",
        450: "4.2.1 The user you are trying to contact is receiving mail at a rate that\n"
        "4.2.1 prevents additional messages from being delivered. Please resend your\n"
        "4.2.1 message at a later time. {id} - gsmtp",
        451: "4.3.0 Mail server temporarily rejected message. {id} - gsmtp",
        452: "4.2.2 The email account that you tried to reach is over quota. {id} - gsmtp",
        550: "5.7.1 Our system has detected that this message is likely unsolicited mail. {id} - gsmtp",
        552: "5.2.3 Your message exceeded Google's message size limits. {id} - gsmtp",
    },
)

YAHOO = ProviderProfile(
    name="yahoo",
    description="yahoo-like: [TSS04] deferrals for unexpected volume or user complaints",
    hostname="mta7.am0.yahoodns.net",
    greeting=reply(220, "{host} ESMTP ready"),
    ehlo_first_line="{host}",
    mail_ok=reply(250, "sender <{sender}> ok"),
    rcpt_ok=reply(250, "recipient <{rcpt}> ok"),
    data_go=reply(354, "go ahead"),
    queued=reply(250, "ok dirdel"),
    quit=reply(221, "Service Closing transmission"),
    rate_limited=reply(
        421,
        "4.7.0 [TSS04] Messages from {ip} temporarily deferred due to unexpected volume "
        "or user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes",
    ),
    too_many_connections=reply(
        421,
        "4.7.0 [TSS04] Messages from {ip} temporarily deferred due to unexpected volume "
        "or user complaints - 4.16.56.1; see https://postmaster.yahooinc.com/error-codes",
    ),
    greylisted=reply(450, "4.7.1 [TS02] Messages from {ip} temporarily deferred - 4.16.50; try again later"),
    unknown_user=reply(550, "5.1.1 <{rcpt}>: delivery error: dd This user doesn't have an account"),
    texts_by_code={
        421: "4.7.0 [TSS04] Messages from {ip} temporarily deferred due to unexpected volume "
        "or user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes",
        451: "4.3.2 Internal error, please try again later",
        452: "4.2.2 <{rcpt}> Mailbox over quota",
        554: "5.7.9 Message not accepted for policy reasons. See https://postmaster.yahooinc.com/error-codes",
    },
)

OUTLOOK = ProviderProfile(
    name="outlook",
    description="outlook-like: 451 4.7.650 (S775) IP-reputation throttling, S3150 block-list rejects",
    hostname="mx1.hotmail.protection.outlook.test",
    greeting=reply(220, "{host} Microsoft ESMTP MAIL Service ready"),
    ehlo_first_line="{host} Hello [{ip}]",
    mail_ok=reply(250, "2.1.0 Sender OK"),
    rcpt_ok=reply(250, "2.1.5 Recipient OK"),
    data_go=reply(354, "Start mail input; end with <CRLF>.<CRLF>"),
    queued=reply(250, "2.6.0 <{id}@{host}> [InternalId={id}] Queued mail for delivery"),
    quit=reply(221, "2.0.0 Service closing transmission channel"),
    rate_limited=reply(
        451,
        "4.7.650 The mail server [{ip}] has been temporarily rate limited due to IP reputation. "
        "For e-mail delivery information, see https://aka.ms/postmaster (S775)",
    ),
    too_many_connections=reply(
        421,
        "4.3.2 The maximum number of concurrent server connections has exceeded a limit, "
        "closing transmission channel",
    ),
    greylisted=reply(450, "4.7.1 Server busy. Please try again later from [{ip}]. (S77714)"),
    unknown_user=reply(
        550, "5.1.1 RESOLVER.ADR.RecipientNotFound; Recipient <{rcpt}> not found by SMTP address lookup"
    ),
    texts_by_code={
        421: "4.7.66 Service not available, closing transmission channel (S3114)",
        451: "4.7.650 The mail server [{ip}] has been temporarily rate limited due to IP reputation. "
        "For e-mail delivery information, see https://aka.ms/postmaster (S775)",
        550: "5.7.1 Unfortunately, messages from [{ip}] weren't sent. Please contact your Internet "
        "service provider since part of their network is on our block list (S3150).",
        554: "5.7.1 Service unavailable; Client host [{ip}] blocked using Spamhaus (S3140)",
    },
)

APPLIANCE = ProviderProfile(
    name="appliance",
    description="B2B spam appliance: accepts every RCPT, then rejects with '550 5.1.1 user unknown' after scanning",
    hostname="mx1.b2b-filter.test",
    greeting=reply(220, "{host} ESMTP Mail Gateway"),
    ehlo_first_line="{host} Hello [{ip}]",
    mail_ok=reply(250, "2.1.0 Sender ok"),
    rcpt_ok=reply(250, "2.1.5 Recipient ok"),
    data_go=reply(354, "Enter mail, end with \".\" on a line by itself"),
    queued=reply(250, "2.0.0 {id} Message accepted for delivery"),
    quit=reply(221, "2.0.0 {host} closing connection"),
    rate_limited=reply(421, "4.7.0 {host} Too much mail from {ip}, closing connection"),
    too_many_connections=reply(421, "4.7.0 {host} Too many concurrent SMTP connections; please try again later"),
    greylisted=reply(450, "4.7.1 Greylisted, please try again later"),
    unknown_user=reply(550, "5.1.1 user unknown"),
    unknown_at_end_of_data=True,
    texts_by_code={
        550: "5.7.1 Message rejected as spam by Content Filtering",
        554: "5.7.1 Message blocked by content filter",
    },
)

PROFILES: dict[str, ProviderProfile] = {p.name: p for p in (DEFAULT, GMAIL, YAHOO, OUTLOOK, APPLIANCE)}


def get_profile(name: str) -> ProviderProfile:
    """The profile called *name*; the error lists the names that exist."""
    try:
        return PROFILES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; choose one of: {', '.join(PROFILES)}") from None
