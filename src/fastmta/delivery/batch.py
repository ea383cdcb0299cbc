"""What the site queues carry and share: batches, egress sources, per-site limits, where a
transaction went, and which hosts failed to connect (:mod:`fastmta.delivery.pool` runs them)."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from fastmta.delivery.routing import Route
from fastmta.queue.records import Message, Recipient
from fastmta.smtp.protocol import Phase
from fastmta.smtp.reply import Reply

if TYPE_CHECKING:
    from fastmta.feedback.classification import Classification
    from fastmta.smtp.protocol import Credentials

__all__ = [
    "CLASSIFY_PHASE", "Batch", "Delivery", "HostHealth", "SiteLimits", "Source", "fewer_recipients", "login_for",
    "one_at_a_time", "recipient_limit",
]

#: protocol phase -> the classifier's name for it
CLASSIFY_PHASE: dict[Phase, str] = {
    Phase.GREETING: "connect", Phase.EHLO: "ehlo", Phase.HELO: "helo", Phase.STARTTLS: "starttls",
    Phase.MAIL: "mail", Phase.RCPT: "rcpt", Phase.DATA: "data", Phase.END_OF_DATA: "eod",
    Phase.BDAT: "eod", Phase.RSET: "mail", Phase.QUIT: "quit", Phase.AUTH: "connect",
}

log = logging.getLogger("fastmta.delivery.pool")


@dataclass(frozen=True, slots=True)
class Source:
    """An egress source: the local address to bind and the name to say in EHLO."""

    name: str
    address: str | None  # None: let the OS choose
    ehlo_name: str
    weight: int = 1


@dataclass(frozen=True, slots=True)
class SiteLimits:
    max_connections: int = 10
    max_messages_per_connection: int = 100
    max_recipients_per_transaction: int = 50
    idle_timeout: float = 30.0
    pipeline_depth: int = 2  # transactions in flight per connection


def by_retry_hint(deferred: list[tuple[Recipient, Classification]]) -> list[list[tuple[Recipient, Classification]]]:
    """The deferred recipients of one transaction, grouped by their rules' retry hints (in first-seen order):
    each group is scheduled on its own. Together, one full mailbox (a 4-hour hint) held the greylisted
    recipients beside it (7 minutes) for 4 hours."""
    groups: dict[float | None, list[tuple[Recipient, Classification]]] = {}
    for rc in deferred:
        groups.setdefault(rc[1].retry_after, []).append(rc)
    return list(groups.values())


def lifetime_of(meta: dict[str, Any] | None, default: float, *, strict: bool = False) -> float:
    """How long a message may stay queued: its meta's ``max_lifetime`` (seconds; a one-time password's
    minutes, KumoMTA's per-message expiry, PowerMTA's bounce-after), at most *default* (``[queue]
    max_lifetime``: the operator's ceiling). One that is not a positive number: ValueError if *strict*
    (at intake), else *default* (a queued message is never stranded by its meta)."""
    value = meta.get("max_lifetime") if meta else None
    if value is None:
        return default
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if not (0 < seconds < math.inf) or isinstance(value, bool):
        if not strict:
            return default
        raise ValueError(f"meta.max_lifetime: {value!r} is not a number of seconds above 0")
    return min(seconds, default)


def retuned(configured: SiteLimits, learned: SiteLimits, new: SiteLimits) -> SiteLimits:
    """*new* configured limits for a site running on *learned* ones (a SIGHUP while it is busy): what
    the site taught (one transaction in flight, fewer recipients) stays where it is lower than *new*."""
    return SiteLimits(
        new.max_connections, new.max_messages_per_connection,
        min(new.max_recipients_per_transaction, learned.max_recipients_per_transaction)
        if learned.max_recipients_per_transaction < configured.max_recipients_per_transaction
        else new.max_recipients_per_transaction,
        new.idle_timeout,
        min(new.pipeline_depth, learned.pipeline_depth)
        if learned.pipeline_depth < configured.pipeline_depth else new.pipeline_depth,
    )


def one_at_a_time(limits: SiteLimits, site: str, reply: Reply, phase: Phase, behind_dot: bool) -> SiteLimits:
    """*limits*, with one transaction in flight per connection if MAIL got *reply* as out of sequence.

    RFC 2920 lets a client send the next envelope right behind the end of DATA, and so does
    fastmta (one write a message); Haraka (since 2024) refuses such commands with 503, chasquid
    drops them unanswered until its timeout closes the session (a connection lost waiting for
    MAIL's reply). Learned for the site for the rest of the run (Postfix's client, which does not
    pipeline after the dot, never meets it); the refused message is retried (rule
    "out-of-sequence"), not bounced. Only a MAIL that went *behind_dot* tells: a connection reset
    or a timeout waiting for the first MAIL of a session, or a 503 to it (AUTH first, HELO first),
    says nothing of pipelining (one RST made every later message of a site cost two round trips).
    """
    lost = reply.code == 451 and reply.enhanced in ("4.4.1", "4.4.2")
    if (phase is not Phase.MAIL or not behind_dot or not (reply.code in (500, 503) or lost)
            or limits.pipeline_depth == 1):
        return limits
    log.warning("%s refused MAIL out of sequence (%s): one transaction at a time from now on", site, reply)
    return replace(limits, pipeline_depth=1)


_RATE_WORDS = re.compile(r"\b(?:from|rate|per|hour|minute|day|ip|client|later)\b", re.IGNORECASE)


def login_for(table: Mapping[tuple[str, int | None], Credentials], host: str, port: int) -> Credentials | None:
    """The login ``[routing.auth]`` gives for *host*:*port* (a key without a port: any port)."""
    return table.get((host, port)) or table.get((host, None)) if table else None


def recipient_limit(classified: Sequence[tuple[Reply, str, Classification | None]]) -> tuple[int, bool]:
    """(how many recipients a transaction may carry, as this one's replies show, 0: not shown; whether
    every recipient goes again, not only those refused at RCPT).

    "Too many recipients" (452, or 552 as RFC 5321 4.5.3.1.10 says to read it) at RCPT while others
    were accepted: those went, the refused go again now in transactions of the size it took. Exim
    with ``recipients_max_reject`` then refuses the whole transaction ("554 Too many recipients" at
    DATA): the recipients it accepted at RCPT tell its limit, and all of them go again (before, the
    same transaction was retried until every recipient expired).

    Only a limit per transaction counts (x.5.3, or the words without a code and without a word of
    rate): Postfix's ``smtpd_client_recipient_rate_limit`` says "450 4.7.1 Error: too many
    recipients from <ip>", a budget per client and period that refills, not a size; resent at
    once, those would only be refused again: they wait for their retry.
    """
    if not any(ph == "rcpt" and c is not None and c.is_recipient_limit
               and (r.enhanced[2:] == "5.3" if r.enhanced else not _RATE_WORDS.search(r.text))
               for r, ph, c in classified):
        return 0, False
    took = sum(reply.code // 100 == 2 for reply, _, _ in classified)
    if took:
        return took, False
    accepted = sum(ph != "rcpt" for _, ph, _ in classified)
    return accepted, accepted > 0


def fewer_recipients(limits: SiteLimits, site: str, took: int) -> SiteLimits:
    """*limits* with the site's recipients per transaction cut to *took*, the limit its server showed
    (:func:`recipient_limit`), for the messages queued from now on: each would otherwise meet it,
    and Exim's rejecting one, costing a refused transaction each."""
    if not 0 < took < limits.max_recipients_per_transaction:
        return limits
    log.warning("%s takes %d recipients a transaction: no more from now on", site, took)
    return replace(limits, max_recipients_per_transaction=took)


@dataclass(slots=True)
class Batch:
    """Recipients of one message going to one site: one SMTP transaction."""

    message: Message
    recipients: list[Recipient]
    route: Route
    source: str = ""  # name of the egress source whose queue holds it

    @property
    def untried(self) -> int:
        """Recipients never tried: what parking the batch takes off the engine's read-ahead."""
        return sum(r.status is None for r in self.recipients)


@dataclass(frozen=True, slots=True)
class Delivery:
    """Where a transaction went (for accounting)."""

    site: str
    mx_host: str | None
    mx_ip: str | None
    source_ip: str | None
    #: The filtering appliance the host names itself as (MX name, greeting, EHLO), if any.
    appliance: str | None = None
    source: str | None = None  # the egress source's name
    tls: tuple[str, str] | None = None  # the session's (TLS version, cipher), if it had TLS
    dsn: bool = False  # the server offered DSN: a transaction's DSN parameters went to it (RFC 3461)


class HostHealth:
    """Remembers hosts that failed to connect, so that others are tried first."""

    #: How long a host whose TLS handshake failed is spoken to in clear (opportunistic TLS only).
    TLS_BROKEN_TIME = 3600.0

    def __init__(self, down_time: float, clock: Callable[[], float]) -> None:
        self.down_time = down_time
        self._clock = clock
        self._down_until: dict[tuple[str | None, str, int], float] = {}
        self._no_tls_until: dict[tuple[str | None, str, int], float] = {}

    def tls_broken(self, source: str | None, address: str, port: int) -> bool:
        """Did this host's STARTTLS handshake fail lately (so opportunistic TLS goes in clear)?"""
        until = self._no_tls_until.get((source, address, port))
        if until is not None and until <= self._clock():
            del self._no_tls_until[(source, address, port)]
            return False
        return until is not None

    def mark_tls_broken(self, source: str | None, address: str, port: int) -> None:
        self._no_tls_until[(source, address, port)] = self._clock() + self.TLS_BROKEN_TIME

    def is_down(self, source: str | None, address: str, port: int) -> bool:
        until = self._down_until.get((source, address, port))
        if until is None:
            return False
        if until <= self._clock():
            del self._down_until[(source, address, port)]
            return False
        return True

    def mark_down(self, source: str | None, address: str, port: int) -> None:
        self._down_until[(source, address, port)] = self._clock() + self.down_time

    def mark_up(self, source: str | None, address: str, port: int) -> None:
        self._down_until.pop((source, address, port), None)
