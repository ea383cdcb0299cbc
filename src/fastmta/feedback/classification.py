"""What a failed (or successful) attempt means: the classification record and its vocabularies.

The leaf of reply classification: :class:`Classification` is what the
classifier (:mod:`fastmta.feedback.classify`) returns and what retries,
throttle, suppression and accounting read; the enums name the outcomes,
bounce types, categories, SMTP phases and local failures that the rule file
(:mod:`fastmta.feedback.rules`) speaks of. Plain data, no behaviour beyond
parsing a phase's spellings.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from fastmta.errors import Scope

__all__ = ["BounceType", "Category", "Classification", "LocalFailure", "Outcome", "Phase"]


class Outcome(StrEnum):
    DELIVERED = "delivered"
    TRANSIENT = "transient"
    PERMANENT = "permanent"


class BounceType(StrEnum):
    HARD = "hard"  # the address is bad: suppress it
    SOFT = "soft"  # failed (or deferred) for a reason that may pass
    NONE = "none"  # not a bounce at all
    #: "user unknown" that is likely a filter's verdict, not the mailbox's
    #: (after the end of DATA at a server that accepted the RCPT, an appliance's
    #: fingerprint, or a domain whose "unknowns" stand far above the run's
    #: baseline): soft, never suppressed, reported with the reason.
    SUSPECTED_FILTER = "suspected_filter"


class Category(StrEnum):
    """Why an attempt ended as it did (names follow corpora/README.md)."""

    DELIVERED = "delivered"
    INVALID_RECIPIENT = "invalid_recipient"
    INVALID_DOMAIN = "invalid_domain"
    INACTIVE_MAILBOX = "inactive_mailbox"
    MAILBOX_FULL = "mailbox_full"
    MESSAGE_TOO_LARGE = "message_too_large"
    SPAM_OR_VIRUS = "spam_or_virus"
    CONTENT_FILTERED = "content_filtered"
    MESSAGE_FORMAT = "message_format"
    POLICY = "policy"
    REPUTATION_BLOCK = "reputation_block"
    AUTH_FAILURE = "auth_failure"
    RATE_LIMITED = "rate_limited"
    GREYLISTED = "greylisted"
    RELAY_DENIED = "relay_denied"
    SENDER_REJECTED = "sender_rejected"
    REMOTE_SYSTEM = "remote_system"
    NETWORK = "network"
    PROTOCOL_ERROR = "protocol_error"
    EXPIRED = "expired"
    AUTO_REPLY = "auto_reply"
    COMPLAINT = "complaint"
    UNKNOWN = "unknown"


class Phase(StrEnum):
    """The SMTP step a reply answered. ``EOD`` is the reply after the final dot."""

    CONNECT = "connect"
    EHLO = "ehlo"
    HELO = "helo"
    STARTTLS = "starttls"
    AUTH = "auth"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"
    EOD = "eod"
    QUIT = "quit"

    @classmethod
    def parse(cls, value: Phase | str | None) -> Phase | None:
        """Accept our names and the spellings bounces use ("RCPT TO", "end of DATA")."""
        if value is None or isinstance(value, Phase):
            return value
        key = value.strip().lower().replace("_", " ")
        return _PHASE_ALIASES.get(key)


_PHASE_ALIASES: dict[str, Phase] = {p.value: p for p in Phase} | {
    "greeting": Phase.CONNECT,
    "banner": Phase.CONNECT,
    "initial connection": Phase.CONNECT,
    "lhlo": Phase.EHLO,
    "mail from": Phase.MAIL,
    "rcpt to": Phase.RCPT,
    "end of data": Phase.EOD,
    "final data": Phase.EOD,
    "bdat": Phase.EOD,
    "message": Phase.EOD,
    "text": Phase.EOD,
}


class LocalFailure(StrEnum):
    """Failures on our side of the wire; the table in the rules file maps them."""

    DNS_NXDOMAIN = "dns_nxdomain"
    DNS_NULL_MX = "dns_null_mx"
    DNS_NO_MAIL_HOST = "dns_no_mail_host"
    DNS_SERVFAIL = "dns_servfail"
    DNS_TIMEOUT = "dns_timeout"
    CONNECT_REFUSED = "connect_refused"
    CONNECT_TIMEOUT = "connect_timeout"
    CONNECTION_LOST = "connection_lost"
    TLS_FAILED = "tls_failed"
    TIMEOUT = "timeout"
    PROTOCOL_ERROR = "protocol_error"
    MESSAGE_TOO_LARGE = "message_too_large"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class Classification:
    """What one reply (or local failure) means for delivery.

    ``retry_after`` is a hint in seconds for the next attempt (None: use the
    default schedule; meaningless when permanent). ``site_paced``: retry as
    soon as the site's throttle allows rather than on the recipient's own
    timer. ``suspend_for``: suspend the (source, site) for that long.
    ``rule`` names the rule that decided, for logs and debugging; ``reason``
    says why a later review changed the verdict (e.g. a "user unknown" held
    as a suspected filter's), for the accounting record.
    """

    outcome: Outcome
    category: Category
    bounce: BounceType
    scope: Scope
    retry_after: float | None = None
    site_paced: bool = False
    suspend_for: float | None = None
    rule: str = ""
    reason: str = ""

    @property
    def is_throttle_signal(self) -> bool:
        """A transient failure about the whole site/source: slow down."""
        return self.outcome is Outcome.TRANSIENT and self.scope is Scope.SITE

    @property
    def is_recipient_limit(self) -> bool:
        """The server's limit on recipients per transaction (x.5.3, "too many recipients": the only
        built-in rules of this scope and category): said at RCPT while others were accepted, the
        recipients it refused go in another transaction (RFC 5321 4.5.3.1.10), not on a timer."""
        return (self.outcome is Outcome.TRANSIENT and self.scope is Scope.MESSAGE
                and self.category is Category.RATE_LIMITED)

    @property
    def is_hard_bounce(self) -> bool:
        return self.bounce is BounceType.HARD

