"""Don't blame the messenger: "user unknown" that is likely a filter's verdict, not the mailbox's.

Corporate spam appliances refuse mail for mailboxes that exist with "550
5.1.1 user unknown", often only after scanning the content. Taken at their
word, they push a B2B campaign's hard-bounce rate past 10% and get good
addresses suppressed. A "user unknown" is therefore recorded as bounce type
``suspected_filter`` (soft, never suppressed; category ``content_filtered``,
with the reason in the accounting record) instead of ``hard`` when one of
these signals says the server is a filter rather than the mailbox's keeper:

* **phase**: it answered the end of DATA (or DATA) of a transaction whose
  RCPT the same server had accepted: the address was good enough a moment
  earlier, so what changed its mind was the content;
* **share**: at the recipient's domain, or at its site (the MX host set,
  which catches many small domains behind one appliance), at least
  ``min_attempts`` verdicts were counted and the share of "unknown" among
  them is at least ``ratio`` times the baseline — the share in the rest of
  the run — and at least ``min_share``. A domain or site that is (nearly)
  the whole run has nothing to be compared with, and is not judged so;
* **onset**: the domain's (or site's) first "unknown" came after a run of
  ``onset_run`` or more acceptances, and within the next ``onset_window``
  verdicts at least ``onset_min`` were "unknown", a share of at least
  ``onset_share`` (and ``ratio`` times the baseline): a filter that started
  refusing the campaign, not a list with bad addresses, which are spread
  through it.

An appliance fingerprint (:mod:`fastmta.feedback.appliances`: the MX name,
the greeting or EHLO banner, or the reply text names Proofpoint, Mimecast,
Barracuda, ...) corroborates: at a recognised appliance the share test
needs ``appliance_min_attempts`` verdicts and ``appliance_ratio`` times the
baseline. The vendor is named in the reason and the report.

Counted are the servers' final verdicts on recipients (accepted, or refused
permanently) at RCPT, DATA and end of DATA; "unknown" are the hard
``invalid_recipient`` verdicts at RCPT (those after DATA are the phase
signal's). An "unknown" at RCPT whose domain and site both have too few
verdicts yet, or whose onset window is open, is *held*: not recorded until
the figures can tell, when every other unfinished recipient is held too
(the engine is idle), after ``max_hold`` seconds, or at shutdown — then
judged with what is known (no evidence: the server's word stands, hard).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from fastmta.delivery.batch import Delivery
from fastmta.feedback.appliances import identify
from fastmta.feedback.classification import BounceType, Category, Classification
from fastmta.queue.records import Message, Recipient
from fastmta.smtp.reply import Reply

__all__ = ["FilterPolicy", "FilterStats", "FilterWatch", "Kind"]


@dataclass(frozen=True, slots=True)
class FilterPolicy:
    """When a receiving domain or site is taken for a filter (see the module's doc)."""

    min_attempts: int = 20
    ratio: float = 3.0
    min_share: float = 0.05
    #: Fewest "unknown" verdicts that can make a share signal (as onset_min): 3 bad addresses
    #: among a domain's first 20 verdicts are 15%, and noise, not a filter.
    min_unknown: int = 4
    onset_run: int = 20
    onset_window: int = 20
    onset_min: int = 4
    onset_share: float = 0.3
    appliance_min_attempts: int = 10
    appliance_ratio: float = 2.0
    #: Longest a held "unknown" waits for its domain's figures (seconds).
    max_hold: float = 60.0


class Kind(Enum):
    """A server's verdict on one recipient, as the statistics count it."""

    ACCEPTED = "accepted"
    UNKNOWN = "unknown"  # "user unknown" at RCPT: a verdict on the mailbox, if the server is honest
    FILTERED = "filtered"  # "user unknown" after DATA, from a server that accepted the RCPT
    OTHER = "other"  # any other permanent refusal


class _Figures:
    """Counts for one domain or site."""

    __slots__ = ("appliance", "attempts", "episode", "episode_unknown", "filtered", "onset", "run", "streak",
                 "unknown")

    def __init__(self) -> None:
        self.attempts = 0
        self.unknown = 0
        self.filtered = 0
        self.streak = 0  # acceptances since the last "unknown" (or since the start)
        self.episode = 0  # verdicts since the onset window opened; 0: not open
        self.episode_unknown = 0
        self.run = 0  # acceptances before the onset window opened
        self.onset: str | None = None  # why it is taken for a filter that started refusing
        self.appliance: str | None = None


class FilterStats:
    """Verdicts per receiving domain and per site within a run, and what they say about the receiver."""

    def __init__(self, policy: FilterPolicy | None = None) -> None:
        self.policy = policy or FilterPolicy()
        self.domains: dict[str, _Figures] = {}
        self.sites: dict[str, _Figures] = {}
        self.attempts = 0  # the whole run
        self.unknown = 0

    def count(self, domain: str, site: str, kind: Kind, appliance: str | None = None) -> bool:
        """Count one verdict; True when it settled a question held verdicts may wait on."""
        self.attempts += 1
        if kind is Kind.UNKNOWN:
            self.unknown += 1
        fig = self.domains.get(domain)
        if fig is None:
            fig = self.domains[domain] = _Figures()
        settled = self._update(fig, kind, appliance)
        fig = self.sites.get(site)
        if fig is None:
            fig = self.sites[site] = _Figures()
        return self._update(fig, kind, appliance) or settled

    def baseline(self, fig: _Figures) -> float | None:
        """The share of "unknown" in the rest of the run; None while that is too small to say."""
        others = self.attempts - fig.attempts
        if others < self.policy.min_attempts:
            return None
        return (self.unknown - fig.unknown) / others

    def undecided(self, domain: str, site: str) -> bool:
        """Too early to judge an "unknown" there: too few verdicts at both, or an onset window open."""
        d, s = self.domains.get(domain), self.sites.get(site)
        if (d is not None and d.episode) or (s is not None and s.episode):
            return True
        return not ((d is not None and self._sampled(d)) or (s is not None and self._sampled(s)))

    def suspicion(self, domain: str, site: str) -> tuple[str, str] | None:
        """(signal, reason) when the domain or its site is taken for a filter; None otherwise."""
        for scope, fig in (("domain", self.domains.get(domain)), ("site", self.sites.get(site))):
            if fig is None:
                continue
            if fig.onset is not None:
                return "onset", f"at this {scope}, {fig.onset}"
            why = self._above_baseline(fig, scope)
            if why is not None:
                return "share", why
        return None

    # --- internals ---------------------------------------------------------------

    def _need(self, fig: _Figures) -> int:
        p = self.policy
        return p.appliance_min_attempts if fig.appliance is not None else p.min_attempts

    def _sampled(self, fig: _Figures) -> bool:
        return fig.attempts >= self._need(fig)

    def _above_baseline(self, fig: _Figures, scope: str) -> str | None:
        p = self.policy
        if fig.unknown < p.min_unknown or not self._sampled(fig):
            return None
        base = self.baseline(fig)
        if base is None:
            return None  # (nearly) the whole run: nothing to compare with
        ratio = p.appliance_ratio if fig.appliance is not None else p.ratio
        share = fig.unknown / fig.attempts
        if share < max(ratio * base, p.min_share):
            return None
        return (f"{fig.unknown} of {fig.attempts} verdicts at this {scope} were 'unknown' ({share:.1%}), "
                f"against {base:.1%} in the rest of the run (threshold: {ratio:g}x that, at least {p.min_share:.0%})")

    def _update(self, fig: _Figures, kind: Kind, appliance: str | None) -> bool:
        p = self.policy
        was_sampled = fig.attempts >= (p.appliance_min_attempts if fig.appliance is not None else p.min_attempts)
        if appliance is not None and fig.appliance is None:
            fig.appliance = appliance
        fig.attempts += 1
        if kind is Kind.ACCEPTED and not fig.episode:  # the common case, kept short
            fig.streak += 1
            return not was_sampled and self._sampled(fig)
        was_open = fig.episode > 0
        unknown = kind is Kind.UNKNOWN
        if fig.episode:
            fig.episode += 1
            fig.episode_unknown += unknown
        elif unknown and not fig.unknown and fig.streak >= p.onset_run:
            # The first "unknown" here, after a run of acceptances: watch what follows.
            fig.run, fig.episode, fig.episode_unknown = fig.streak, 1, 1
        if unknown:
            fig.unknown += 1
            fig.streak = 0
        elif kind is Kind.ACCEPTED:
            fig.streak += 1
        elif kind is Kind.FILTERED:
            fig.filtered += 1
        if fig.episode:
            share = fig.episode_unknown / fig.episode
            base = self.baseline(fig) or 0.0
            if fig.episode_unknown >= p.onset_min and share >= max(p.onset_share, p.ratio * base):
                fig.onset = (f"the first 'unknown' came after {fig.run} acceptances, then {fig.episode_unknown} "
                             f"of {fig.episode} verdicts were 'unknown'")
                fig.episode = 0
            elif fig.episode >= p.onset_window:
                fig.episode = 0  # spread like bad addresses are: not an onset
        return (not was_sampled and self._sampled(fig)) or (was_open and not fig.episode)


#: Where a held verdict goes when it is judged: (message, recipient, reply, delivery, classification).
Release = Callable[[Message, Recipient, Reply, Delivery, Classification], None]

#: Classifier phases in which a server answered for a recipient (not DNS, not the connection).
_SERVER_PHASES = frozenset({"rcpt", "data", "eod"})


@dataclass(slots=True, eq=False)  # compared by identity
class _Held:
    msg: Message
    rcpt: Recipient
    reply: Reply
    delivery: Delivery
    classification: Classification
    since: float


@dataclass(slots=True)
class _DomainReport:
    site: str
    suspected: int = 0
    hard: int = 0
    signals: set[str] = field(default_factory=set)
    appliance: str | None = None
    reason: str = ""


class FilterWatch:
    """The engine's side: counts verdicts, re-types suspected ones, holds the undecided.

    ``release`` records a held verdict once judged; ``unfinished`` is the
    engine's count of recipients not yet final (held ones included).
    """

    def __init__(
        self, policy: FilterPolicy | None = None, *, release: Release, unfinished: Callable[[], int]
    ) -> None:
        self.stats = FilterStats(policy)
        self._release = release
        self._unfinished = unfinished
        self._held: list[_Held] = []
        self._timer: asyncio.TimerHandle | None = None
        self._domains: dict[str, _DomainReport] = {}

    @property
    def held(self) -> int:
        """Verdicts waiting for their domain's figures."""
        return len(self._held)

    def accepted(self, domain: str, delivery: Delivery | None) -> None:
        """A server took responsibility for a recipient at *domain*."""
        if delivery is not None:
            self._count(domain, delivery.site, Kind.ACCEPTED, delivery.appliance)

    def review(
        self, msg: Message, rcpt: Recipient, reply: Reply, phase: str, delivery: Delivery | None, c: Classification
    ) -> Classification | None:
        """A permanent refusal of *rcpt*: the classification to record now (perhaps re-typed as
        a suspected filter's), or None when the verdict is held (recorded later by ``release``)."""
        if delivery is None or phase not in _SERVER_PHASES:
            return c  # no server answered for this recipient (DNS, a refused connection)
        domain, site = rcpt.domain, delivery.site
        unknown = c.category is Category.INVALID_RECIPIENT and c.bounce is BounceType.HARD
        appliance = delivery.appliance or (identify(" ".join(reply.lines)) if unknown else None)
        if not unknown:
            self._count(domain, site, Kind.OTHER, appliance)
            return c
        if phase != "rcpt":
            self._count(domain, site, Kind.FILTERED, appliance)
            why = (f"'{reply.code} {reply.enhanced or ''}' came after the end of DATA from a server that had "
                   f"accepted the RCPT: a verdict on the content, not the mailbox")
            return self._suspect(c, domain, site, "phase", why, appliance)
        self._count(domain, site, Kind.UNKNOWN, appliance)
        judged = self._judge(c, domain, site, appliance, may_hold=True)
        if judged is None:
            self._hold(_Held(msg, rcpt, reply, delivery, c, asyncio.get_running_loop().time()))
        return judged

    def settle(self) -> None:
        """Recipients finished: once only held ones are left unfinished, judge them now."""
        if self._held and self._unfinished() <= len(self._held):
            self.release_all()

    def release_all(self) -> None:
        """Judge and record every held verdict with what is known (idle, or shutting down)."""
        held, self._held = self._held, []
        self._cancel_timer()
        for h in held:
            self._out(h)

    def report(self) -> list[dict[str, Any]]:
        """Per receiving domain with suspected filter verdicts: counts, signals, appliance, reason."""
        out: list[dict[str, Any]] = []
        for domain, r in sorted(self._domains.items(), key=lambda kv: (-kv[1].suspected, kv[0])):
            if not r.suspected:
                continue
            fig = self.stats.domains[domain]
            out.append({
                "domain": domain, "site": r.site, "suspected": r.suspected, "hard_unknown": r.hard,
                "verdicts": fig.attempts, "unknown_at_rcpt": fig.unknown, "unknown_after_data": fig.filtered,
                "signals": sorted(r.signals), "appliance": r.appliance, "reason": r.reason,
            })
        return out

    # --- internals ---------------------------------------------------------------

    def _count(self, domain: str, site: str, kind: Kind, appliance: str | None) -> None:
        if self.stats.count(domain, site, kind, appliance) and self._held:
            ready = [h for h in self._held if not self.stats.undecided(h.rcpt.domain, h.delivery.site)]
            if ready:
                self._held = [h for h in self._held if h not in ready]
                if not self._held:
                    self._cancel_timer()
                for h in ready:
                    self._out(h)

    def _judge(
        self, c: Classification, domain: str, site: str, appliance: str | None, *, may_hold: bool
    ) -> Classification | None:
        found = self.stats.suspicion(domain, site)
        if found is not None:
            return self._suspect(c, domain, site, found[0], found[1], appliance)
        if may_hold and self.stats.undecided(domain, site):
            return None
        self._domain(domain, site).hard += 1
        return c

    def _suspect(
        self, c: Classification, domain: str, site: str, signal: str, why: str, appliance: str | None
    ) -> Classification:
        fig = self.stats.domains.get(domain)
        appliance = appliance or (fig.appliance if fig is not None else None)
        reason = f"suspected filter ({signal}): {why}" + (f"; appliance: {appliance}" if appliance else "")
        r = self._domain(domain, site)
        r.suspected += 1
        r.signals.add(signal)
        if appliance is not None:
            r.signals.add("appliance")
            r.appliance = appliance
        r.reason = reason
        return dataclasses.replace(
            c, category=Category.CONTENT_FILTERED, bounce=BounceType.SUSPECTED_FILTER,
            rule=f"{c.rule}+suspected-filter", reason=reason,
        )

    def _domain(self, domain: str, site: str) -> _DomainReport:
        r = self._domains.get(domain)
        if r is None:
            r = self._domains[domain] = _DomainReport(site)
        return r

    def _out(self, h: _Held) -> None:
        c = self._judge(h.classification, h.rcpt.domain, h.delivery.site, h.delivery.appliance, may_hold=False)
        assert c is not None
        self._release(h.msg, h.rcpt, h.reply, h.delivery, c)

    def _hold(self, h: _Held) -> None:
        self._held.append(h)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.stats.policy.max_hold, self._expire)
        self.settle()

    def _expire(self) -> None:
        self._timer = None
        now = asyncio.get_running_loop().time()
        max_hold = self.stats.policy.max_hold
        due = [h for h in self._held if now - h.since >= max_hold * 0.999]
        self._held = [h for h in self._held if h not in due]
        if self._held:
            self._timer = asyncio.get_running_loop().call_later(
                max(0.0, self._held[0].since + max_hold - now), self._expire
            )
        for h in due:
            self._out(h)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
