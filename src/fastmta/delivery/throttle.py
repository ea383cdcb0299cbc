"""Adaptive throttling per (egress source, site): connection window, message rate, suspension.

Pure and clock-injected: every method takes ``now`` (any monotonic seconds,
e.g. ``loop.time()``); nothing here sleeps, schedules or reads a clock, so
the whole controller runs on a fake clock in the tests.

How it steers (a closed loop in the spirit of TCP congestion control, fed
by the receiver's replies rather than by packet loss):

* Two *dials*, each an AIMD controller: the **connection window** (fed by
  the results of opening connections: greeting, EHLO, connect errors) and
  the **message rate** in messages per second (fed by transaction replies).
  A 421 at connect says "fewer connections"; a 4.7.28 on RCPT says "fewer
  messages"; keeping the dials apart means one does not starve the other.
* **Slow start**: a dial starts small and doubles per clean round up to its
  ceiling, until the first throttle signal; after that it grows
  additively. It grows only in rounds where the caller actually wanted
  more than the dial allowed (*limited*), so an idle site does not climb
  to a ceiling it never tested and then burst (RFC 7661's reasoning).
* **Multiplicative decrease** on a throttle-class reply (classification
  ``is_throttle_signal``: transient, site scope), at most once per round.
* **Hold near the last good value**: ``good`` is the highest value that
  completed a clean, limited round. A throttle reply while probing *above*
  ``good`` shows the capacity lies between the two, so the dial falls to
  ``max(value * decrease, hold * good)`` instead of halving far below a
  value just proven; plain halving (and forgetting ``good``) is kept for a
  reply at or below ``good``: the receiver's capacity dropped. Above
  ``good`` the dial probes with steps that grow by one base step per clean
  round, so a raised capacity is found in a few rounds.
* **Suspension** on a reply carrying ``suspend_for`` (Yahoo TSS04, ...):
  nothing goes until the time is up, then a single probe message on a
  single connection; only its clean reply resumes sending, from the
  initial values with a fast climb back to ``hold * good``.
* **Provider procedures** (:mod:`fastmta.delivery.procedures`): a reply a
  provider documents (Gmail's 421 4.7.28, Yahoo's [TSS04], Microsoft's
  4.7.650, ...) is answered as the provider asks: its pause (at least as
  long as any rule-given suspension), then the probe, then the connection
  window restarts at the given count (Gmail: one) and grows by the ramp
  step per clean round (no slow start), up to ``max_connections``. When the
  reply names a sender domain (DKIM, SPF, URL domain) and the caller says
  whose mail drew it, that domain is held at the site for every source
  instead (``sender_wait``); the source's dials stay as they are.

What a *round* is: tickets are numbered in the order connections and
messages start. A round begins at a ticket number and a time; it ends at
the first result of a ticket started at or after its beginning, but not
before ``round_min`` seconds (default 1 s). The first part makes a round
one round-trip of the site, so the decision to grow sees the replies to
what the last step sent; the floor exists because receivers meter per
second or per minute, and on a loopback round-trip of a millisecond the
dials would otherwise double a thousand times before the receiver's meter
has even noticed. A cut starts a new round and ignores signals from
tickets started before it (they were sent at the old, too-high pace): that
is "at most once per round".

Static limits ride along: GCRA rate specs per (source, site) and per
source (shared by all the source's sites), a new-connection rate, and
warm-up quotas (:mod:`fastmta.delivery.warmup`). Every change of a dial, a
suspension, a probe and a warm-up step is a :class:`ThrottleEvent` with its
reason, kept in ``events`` and passed to ``on_event``. The limits themselves
(configured or a provider's defaults) are data: :mod:`fastmta.delivery.limits`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from fastmta.delivery.dial import Dial
from fastmta.delivery.limits import PROVIDERS, Provider, SourceLimits, ThrottleConfig, limits_for
from fastmta.delivery.procedures import PROCEDURES, LimitKey, Match, Procedures, SenderHolds, sender_domain
from fastmta.delivery.provider_limits import Lease, ProviderLimits
from fastmta.delivery.ratelimit import Gcra, parse_rate
from fastmta.delivery.warmup import Warmup, WarmupConfig, WarmupDecision, WarmupState
from fastmta.errors import Scope
from fastmta.feedback.classification import Classification, Outcome

__all__ = ["ClusterHooks", "EventKind", "Lease", "Limiter", "SharedState", "SiteThrottle", "ThrottleEvent",
           "ThrottleStatus", "Throttles"]


# --------------------------------------------------------------------------
# Events


class EventKind(StrEnum):
    WINDOW = "window"  # connection window changed
    RATE = "rate"  # message rate changed
    SUSPEND = "suspend"  # sending suspended
    PROBE = "probe"  # suspension over, one probe allowed
    RESUME = "resume"  # probe succeeded, sending resumed
    WARMUP = "warmup"  # warm-up step advanced or held
    HOLD = "hold"  # a sender domain held at the site (provider procedure)


@dataclass(frozen=True, slots=True)
class ThrottleEvent:
    """One change, for the live display and the log."""

    at: float
    source: str
    site: str
    kind: EventKind
    old: float | None
    new: float | None
    reason: str

    def __str__(self) -> str:
        def fmt(v: float | None) -> str:
            return "-" if v is None else f"{v:.4g}"

        return f"{self.site} via {self.source}: {self.kind} {fmt(self.old)} -> {fmt(self.new)}: {self.reason}"


@dataclass(frozen=True, slots=True)
class ThrottleStatus:
    """A snapshot for the live display."""

    window: int
    rate: float | None  # None: adaptive control off
    suspended_until: float | None
    probing: bool
    warmup_quota: int | None
    warmup_sent: int


# --------------------------------------------------------------------------
# Limits kept elsewhere (fastmta.delivery.cluster: shared through Redis)


class Limiter(Protocol):
    """A rate limit consulted beside the throttle's own: :class:`Gcra`'s ``wait``/``take``."""

    def wait(self, now: float, n: int = 1) -> float: ...

    def take(self, now: float, n: int = 1) -> None: ...


class ClusterHooks(Protocol):
    """What a cluster adds to the throttle of (source name, site) whose limits came from *provider*."""

    def limiters(self, source: str, site: str, provider: str) -> Sequence[Limiter]: ...

    def sender_limiters(self, domain: str) -> Sequence[Limiter]: ...

    def lease(self, site: str) -> Lease | None: ...

    def shared_state(self, source: str, site: str) -> SharedState | None: ...


class SharedState(Protocol):
    """Dials of (source, site) shared by the nodes (:mod:`fastmta.delivery.cluster.shared_throttle`): ``changed``
    hears the throttle's events (cuts go out; raises too, from the owner); ``owner_wait``: 0.0 if this node may
    raise them (or *probe* after a pause), else seconds to ask again. Others' changes come by :meth:`SiteThrottle.adopt`."""

    def attach(self, throttle: SiteThrottle) -> None: ...

    def owner_wait(self, now: float, probe: bool = False) -> float: ...

    def changed(self, throttle: SiteThrottle, event: ThrottleEvent) -> None: ...


# --------------------------------------------------------------------------
# The controller


class SiteThrottle:
    """Throttle state of one (egress source, site). All times are ``now`` arguments.

    The pool's calls, in order:

    * ``connection_wait(open, now)`` before opening a connection; then
      ``t = connection_started(now)`` and, once the greeting and EHLO are
      through or failed, ``connection_result(t, classification_or_None, now)``.
    * ``message_wait(now, n)`` before starting a transaction of ``n``
      recipients; then ``t = message_started(now, n)`` and, per reply,
      ``message_result(t, classification_or_None, now)`` (None: delivered).
      Give the reply text as ``reason`` so a provider's procedure can be
      recognised, and ``sender`` (the envelope sender) only if the caller
      also keeps mail from a held sender domain back (``sender_wait``).

    A wait is 0.0 (go), a number of seconds (ask again then), or ``math.inf``
    (ask again after the next result or closed connection).
    """

    def __init__(
        self,
        source: str,
        site: str,
        config: ThrottleConfig,
        now: float,
        *,
        source_limiters: Sequence[Limiter] = (),
        warmup: WarmupConfig | None = None,
        warmup_state: WarmupState | None = None,
        wall_offset: float = 0.0,
        on_event: Callable[[ThrottleEvent], None] | None = None,
        history: int = 100,
        procedures: Procedures | None = None,
        sender_holds: SenderHolds | None = None,
        lease: Lease | None = None,
        sender_limiters: Callable[[str], Sequence[Limiter]] | None = None,
        shared: SharedState | None = None,
    ) -> None:
        self.source = source
        self.site = site
        self.config = config
        a = self.adaptive = config.adaptive
        self.on_event = on_event
        self.events: deque[ThrottleEvent] = deque(maxlen=history)
        self._window = Dial(
            a.initial_connections if a.enabled else config.max_connections,
            1, config.max_connections, lambda v: 1.0, True, a.hold_rounds, a.max_hold_rounds,
        )  # fmt: skip
        self._rate = Dial(
            a.initial_rate, a.min_rate, a.max_rate if a.max_rate is not None else math.inf,
            lambda v: max(a.min_rate_step, a.probe_step * v), False, a.hold_rounds, a.max_hold_rounds,
        )  # fmt: skip
        self._pacer = Gcra(1.0 / self._rate.value)
        # The first round starts now, with the first ticket.
        self._window.new_round(1, now)
        self._rate.new_round(1, now)
        self._static = [Gcra.from_spec(parse_rate(s)) for s in config.rate]
        self._shared: list[Limiter] = list(source_limiters)
        #: Cluster-wide connection cap and per-sender-domain limits (fastmta.delivery.cluster); None: none.
        self.lease = lease
        self._sender_limiters = sender_limiters
        self._conn_rate = Gcra.from_spec(parse_rate(config.connection_rate)) if config.connection_rate else None
        # Warm-up counts calendar days, so it runs on the wall clock: ``now`` +
        # ``wall_offset`` (the caller's monotonic clock minus wall time). Its
        # state outlives the process (a warm-up spans weeks): see ``Throttles``.
        self._wall = wall_offset
        self.warmup = (
            Warmup(warmup, now + wall_offset, state=warmup_state, on_change=self._warmup_changed)
            if warmup is not None
            else None
        )
        self._seq = 0
        self.suspended_until: float | None = None
        self._suspend_seq = 0
        self._last_suspend = a.default_suspend
        self.probing = False
        self._probe_ticket: int | None = None
        #: Provider procedures obeyed (None: none); sender domains held at the site (shared by its sources).
        self.procedures = procedures if a.procedures else None
        self.sender_holds = sender_holds
        self._procedure: Match | None = None  # the procedure whose pause is running: its restart follows
        #: Until when (loop time) the last message_wait found a limit holding mail back (a rate, warm-up, a
        #: suspension; inf: its probe's reply; 0.0: none), for SiteQueue's parking. Not the adaptive rate:
        #: it grows with the replies, and what waits for it is the read-ahead that keeps it busy.
        self.held_until = 0.0
        self.shared = shared  # dials shared with a cluster's other nodes (None: this node's own)
        if shared is not None:
            shared.attach(self)

    # --- state for callers and the display -------------------------------------

    @property
    def window(self) -> int:
        return int(self._window.value)

    @property
    def rate(self) -> float | None:
        return self._rate.value if self.adaptive.enabled else None

    @property
    def good_rate(self) -> float:
        return self._rate.good

    def status(self, now: float) -> ThrottleStatus:
        self._tick(now)
        w = self.warmup
        return ThrottleStatus(
            self.window, self.rate, self.suspended_until, self.probing,
            w.quota if w else None, w.sent if w else 0,
        )  # fmt: skip

    # --- connections -------------------------------------------------------------

    def connection_wait(self, open_connections: int, now: float) -> float:
        """May one more connection open now (0.0), in some seconds, or after an event (inf)?"""
        self._tick(now)
        if self.suspended_until is not None:
            return self.suspended_until - now
        limit = 1 if self.probing else self.window
        if open_connections >= limit:
            if not self.probing:
                self._window.limited = True
            return math.inf
        wait = self._conn_rate.wait(now) if self._conn_rate is not None else 0.0
        if self.lease is not None and wait <= 0:
            wait = self.lease.wait(now)
        return wait

    def connection_started(self, now: float) -> int:
        self._tick(now)
        if self._conn_rate is not None:
            self._conn_rate.take(now)
        if self.lease is not None:
            self.lease.started()
        return self._ticket()

    def connection_closed(self) -> None:
        """A connection counted by ``connection_started`` closed (or never opened)."""
        if self.lease is not None:
            self.lease.closed()

    def connection_result(self, ticket: int, result: Classification | None, now: float, reason: str = "") -> None:
        """The connection opened (None, or a delivered-class result) or failed with *result*."""
        self._feed(self._window, EventKind.WINDOW, ticket, result, now, reason)

    # --- messages ----------------------------------------------------------------

    def message_wait(self, now: float, n: int = 1, sender: str | None = None) -> float:
        """May a transaction of *n* recipients start now (0.0), in some seconds, or after a result (inf)?
        *sender* (the envelope sender): for limits per sender domain, when there are any."""
        self._tick(now)
        if self.suspended_until is not None:
            self.held_until = self.suspended_until
            return self.suspended_until - now
        if self.probing:
            self.held_until = math.inf if self._probe_ticket is not None else 0.0
            return self.held_until
        wait = 0.0
        for lim in self._limiters(sender):
            wait = max(wait, lim.wait(now, n))
        if self.warmup is not None:
            decision = self.warmup.check(now + self._wall, n)
            if not decision.allowed:
                assert decision.opens_at is not None
                wait = max(wait, decision.opens_at - (now + self._wall))
        self.held_until = now + wait if wait > 0 else 0.0
        if self.adaptive.enabled:
            paced = self._pacer.wait(now, n)
            if paced > 0 and paced >= wait:
                self._rate.limited = True  # the adaptive rate is what holds us back
            wait = max(wait, paced)
        return wait

    def warmup_check(self, now: float, n: int = 1) -> WarmupDecision | None:
        """For the scheduler choosing a source: the warm-up verdict (None: no warm-up)."""
        return self.warmup.check(now + self._wall, n) if self.warmup is not None else None

    def message_started(self, now: float, n: int = 1, sender: str | None = None) -> int:
        self._tick(now)
        for lim in self._limiters(sender):
            lim.take(now, n)
        if self.adaptive.enabled:
            self._pacer.take(now, n)
        if self.warmup is not None:
            self.warmup.take(now + self._wall, n)
        ticket = self._ticket()
        if self.probing:
            self._probe_ticket = ticket
        return ticket

    def message_result(
        self, ticket: int, result: Classification | None, now: float, reason: str = "", sender: str | None = None
    ) -> None:
        """One reply to the transaction *ticket* (call once per recipient or once per transaction).
        *reason*: the reply as text; *sender*: the envelope sender, given only by a caller that honours
        :meth:`sender_wait` (see the class notes)."""
        if self.warmup is not None:
            if result is None or result.outcome is Outcome.DELIVERED:
                self.warmup.record(now + self._wall, delivered=1)
            elif result.outcome is Outcome.TRANSIENT:
                self.warmup.record(now + self._wall, deferred=1)
            else:
                self.warmup.record(now + self._wall, bounced=1)
        self._feed(self._rate, EventKind.RATE, ticket, result, now, reason, sender)

    def sender_wait(self, sender: str, now: float) -> float:
        """Seconds until mail from the envelope *sender* may go to this site (0.0: now): a held domain."""
        holds = self.sender_holds
        return holds.wait(sender, now) if holds else 0.0

    def _limiters(self, sender: str | None) -> Sequence[Limiter]:
        if self._sender_limiters is None or sender is None:
            return (*self._static, *self._shared)
        return (*self._static, *self._shared, *self._sender_limiters(sender_domain(sender)))

    # --- the loop --------------------------------------------------------------

    def _ticket(self) -> int:
        self._seq += 1
        return self._seq

    def _tick(self, now: float) -> None:
        if self.suspended_until is not None and now >= self.suspended_until:
            if self.shared is not None and (wait := self.shared.owner_wait(now, probe=True)) > 0:
                self.suspended_until = now + wait  # the owner probes for the cluster: its outcome is adopted
                return
            self.suspended_until = None
            self.probing, self._probe_ticket = True, None
            self._emit(now, EventKind.PROBE, None, 1, "suspension over: one probe message on one connection")

    def _feed(
        self, dial: Dial, kind: EventKind, ticket: int, result: Classification | None, now: float, reason: str,
        sender: str | None = None,
    ) -> None:  # fmt: skip
        a = self.adaptive
        why = reason or (result.rule if result is not None else "")
        signal = result is not None and result.is_throttle_signal
        suspend = result is not None and result.suspend_for is not None and result.outcome is not Outcome.DELIVERED
        self._tick(now)
        proc = self._procedure_for(result, reason)
        rule_pause = (result.suspend_for or 0.0) if result is not None else 0.0
        if proc is not None and proc.key.is_sender and self._hold_sender(proc, rule_pause, ticket, sender, now, why):
            return
        if (self.probing and ticket == self._probe_ticket) or (self.probing and kind is EventKind.WINDOW):
            if signal or suspend or proc is not None:
                assert result is not None
                pause = result.suspend_for or self._last_suspend
                if proc is not None:
                    self._procedure, pause = proc, max(pause, proc.action.pause)
                self._suspend(pause, now, f"probe throttled: {why}")
            elif kind is EventKind.RATE:
                self._resume(now)
            return
        if proc is not None and a.enabled and ticket > self._suspend_seq and self.suspended_until is None and not self.probing:
            self._obey(proc, rule_pause, now, why)
            return
        if suspend and a.enabled and ticket > self._suspend_seq and self.suspended_until is None and not self.probing:
            assert result is not None and result.suspend_for is not None
            self._cut(self._rate, EventKind.RATE, now, why)
            self._suspend(result.suspend_for, now, why)
            return
        if not a.enabled or self.suspended_until is not None or self.probing:
            return
        if result is None or result.outcome is Outcome.DELIVERED:  # a delivery shows the connections work too
            dial.succeeded = self._window.succeeded = True
        if signal:
            if ticket > dial.cut_seq and now - dial.cut_t >= a.round_min:
                self._cut(dial, kind, now, why)
                return
            if ticket >= dial.round_seq:
                dial.signalled = True
        for d, k in ((self._window, EventKind.WINDOW), (self._rate, EventKind.RATE)):
            if d.round_over(ticket, now, a.round_min):
                old = d.value
                grew = d.grow() if self.shared is None or self.shared.owner_wait(now) <= 0 else None
                if grew is not None:
                    self._changed(d, k, old, now, grew)
                d.new_round(self._seq + 1, now)

    def _cut(self, dial: Dial, kind: EventKind, now: float, why: str) -> None:
        old = dial.value
        dial.cut(self.adaptive.decrease, self.adaptive.hold)
        # Tickets up to now were sent at the old pace: their replies must not cut again.
        dial.cut_seq, dial.cut_t = self._seq, now
        dial.new_round(self._seq + 1, now)
        self._changed(dial, kind, old, now, f"throttled: {why}")

    def _changed(self, dial: Dial, kind: EventKind, old: float, now: float, why: str) -> None:
        if dial is self._rate:
            self._pacer.set_rate(dial.value, now)
        if dial.value != old:
            self._emit(now, kind, old, dial.value, why)

    def _suspend(self, seconds: float, now: float, why: str) -> None:
        self.suspended_until = now + seconds
        self._last_suspend = seconds
        self._suspend_seq = self._seq
        self.probing, self._probe_ticket = False, None
        self._emit(now, EventKind.SUSPEND, None, self.suspended_until, f"suspended for {seconds:g}s: {why}")

    def _resume(self, now: float) -> None:
        self.probing, self._probe_ticket = False, None
        hold = self.adaptive.hold
        proc, self._procedure = self._procedure, None
        for dial, kind in ((self._window, EventKind.WINDOW), (self._rate, EventKind.RATE)):
            old = dial.value
            why = "probe delivered: resuming from the start values"
            start = proc.action.restart_connections if proc is not None else None
            if dial is self._window and start is not None:
                step = proc.action.ramp_step if proc is not None else 1
                dial.ramp_from(start, step)
                why = f"probe delivered: {start} connection(s), +{step} per clean round ({proc})"
            else:
                dial.restart(hold)
            dial.cut_seq = self._seq  # replies from before the suspension are history
            dial.new_round(self._seq + 1, now)
            self._changed(dial, kind, old, now, why)
        self._emit(now, EventKind.RESUME, None, None, "probe delivered: suspension ended")

    def adopt(self, window: float, rate: float, pause: float, now: float, why: str, kind: str) -> None:
        """Another node's change of the shared dials (:class:`SharedState`), taken as it is. *kind* "cut": a
        throttle event (replies in flight cut no more here; a *pause* suspends, obeying the procedure *why*
        names); "raise": the owner's; "resume": the owner's probe went through, which ends a pause here too."""
        for dial, event, value in ((self._window, EventKind.WINDOW, window), (self._rate, EventKind.RATE, rate)):
            old, v = dial.value, min(max(value, dial.floor), dial.ceiling)
            dial.value = float(round(v)) if dial.integer else v
            if kind == "cut":
                dial.ssthresh, dial.cut_seq, dial.cut_t = dial.value, self._seq, now
                dial.new_round(self._seq + 1, now)
            self._changed(dial, event, old, now, why)
        if kind == "cut" and pause > 0:
            self._procedure = self.procedures.match(why) if self.procedures is not None else None
            self._suspend(pause, now, why)
        elif kind == "resume" and (self.suspended_until is not None or self.probing):
            self.suspended_until, self.probing, self._probe_ticket, self._procedure = None, False, None, None
            self._emit(now, EventKind.RESUME, None, None, why)

    # --- provider procedures (fastmta.delivery.procedures) -----------------------

    def _procedure_for(self, result: Classification | None, reply: str) -> Match | None:
        """The provider procedure a site-level refusal asks for (None: none, or not obeyed)."""
        if self.procedures is None or result is None or not reply:
            return None
        if result.outcome is Outcome.DELIVERED or result.scope is not Scope.SITE:
            return None
        return self.procedures.match(reply)

    def _obey(self, proc: Match, rule_pause: float, now: float, why: str) -> None:
        """A limit on this source at this site: cut the rate, pause, and restart as the provider asks."""
        act = proc.action
        why = f"{proc}: {why}"
        if act.rate_cut is not None:
            old = self._rate.value
            self._rate.scale(act.rate_cut)
            self._rate.cut_seq, self._rate.cut_t = self._seq, now
            self._rate.new_round(self._seq + 1, now)
            self._changed(self._rate, EventKind.RATE, old, now, f"throttled: {why}")
        else:
            self._cut(self._rate, EventKind.RATE, now, why)
        self._suspend_seq = self._seq  # replies to what is in flight now do not start it again
        pause = max(act.pause, rule_pause)
        if pause > 0:
            self._procedure = proc
            self._suspend(pause, now, why)
        elif act.restart_connections is not None:
            w = self._window
            old = w.value
            w.ramp_from(min(act.restart_connections, w.value), act.ramp_step)
            w.cut_seq, w.cut_t = self._seq, now
            w.new_round(self._seq + 1, now)
            self._changed(w, EventKind.WINDOW, old, now, f"throttled: {why}")

    def _hold_sender(
        self, proc: Match, rule_pause: float, ticket: int, sender: str | None, now: float, why: str
    ) -> bool:
        """A limit on a sender domain: hold it at the site. False: not possible here (see the class notes)."""
        holds = self.sender_holds
        if holds is None or sender is None or not self.adaptive.enabled:
            return False
        pause = max(proc.action.pause, rule_pause)
        # The envelope domain of the mail that drew the reply is always held (it is what the
        # caller can tell apart); a domain the reply names, besides, covers its subdomains.
        domains = [sender_domain(sender)]
        if proc.value and proc.key is not LimitKey.URL_DOMAIN:
            domains.append(proc.value)
        for domain in dict.fromkeys(d.lower() for d in domains if d):
            if holds.hold(domain, now + pause, now):
                why_held = f"mail from {domain} held for {pause:g}s: {proc}: {why}"
                self._emit(now, EventKind.HOLD, None, now + pause, why_held)
        if self.probing and ticket == self._probe_ticket:
            self._probe_ticket = None  # it told nothing about this source: probe with other mail
        return True

    def _warmup_changed(self, old: int | None, new: int | None, why: str, at: float) -> None:
        self._emit(at, EventKind.WARMUP, old, new, why)

    def _emit(self, at: float, kind: EventKind, old: float | None, new: float | None, why: str) -> None:
        event = ThrottleEvent(at, self.source, self.site, kind, old, new, why)
        self.events.append(event)
        if self.shared is not None:
            self.shared.changed(self, event)
        if self.on_event is not None:
            self.on_event(event)


class Throttles:
    """All the throttles of an engine: one per (source, site), per-source limiters shared."""

    def __init__(
        self,
        *,
        sites: Mapping[str, ThrottleConfig] | None = None,
        sources: Mapping[str, SourceLimits] | None = None,
        default: ThrottleConfig | None = None,
        providers: Sequence[Provider] = PROVIDERS,
        on_event: Callable[[ThrottleEvent], None] | None = None,
        procedures: Procedures | None = PROCEDURES,
    ) -> None:
        self.sites = dict(sites or {})
        self.sources = dict(sources or {})
        self.default = default
        self.providers = providers
        self.on_event = on_event
        #: Provider procedures the throttles obey (None: none; a site may opt out: ``adaptive.procedures``).
        self.procedures = procedures
        #: Sender domains held per site, shared by the site's throttles of every source.
        self.sender_holds: dict[str, SenderHolds] = {}
        self._throttles: dict[tuple[str, str], SiteThrottle] = {}
        self._source_limiters: dict[str, list[Gcra]] = {}
        self.provider = ProviderLimits()  # caps and rates the sites of one pattern or provider share
        #: Shared limits and connection leases of a cluster (fastmta.delivery.cluster); None: one node.
        self.cluster: ClusterHooks | None = None
        #: Wall time minus the ``now`` clock's time (warm-up counts calendar days).
        self.wall_offset = 0.0
        #: Warm-up states saved by an earlier run, by (source, site); used as throttles are made.
        self.saved_warmups: dict[tuple[str, str], WarmupState] = {}

    def get(self, source: str, site: str, now: float) -> SiteThrottle:
        key = (source, site)
        throttle = self._throttles.get(key)
        if throttle is None:
            origin, cfg = limits_for(site, self.sites, providers=self.providers, default=self.default)
            src = self.sources.get(source, SourceLimits())
            shared = self._source_limiters.get(source)
            if shared is None:
                shared = self._source_limiters[source] = [Gcra.from_spec(parse_rate(s)) for s in src.rate]
            cluster = self.cluster
            dials = cluster.shared_state(source, site) if cluster is not None and cfg.adaptive.enabled else None
            limiters: Sequence[Limiter] = [*shared, *self.provider.limiters(source, origin, cfg),
                                           *(cluster.limiters(source, site, origin) if cluster else ())]
            throttle = SiteThrottle(
                source, site, cfg, now, source_limiters=limiters, warmup=src.warmup,
                warmup_state=self.saved_warmups.get(key), wall_offset=self.wall_offset, on_event=self.on_event,
                procedures=self.procedures, sender_holds=self.sender_holds.setdefault(site, SenderHolds()),
                lease=self.provider.lease(source, origin, cfg, cluster.lease(site) if cluster else None),
                sender_limiters=cluster.sender_limiters if cluster else None,
                shared=dials,
            )
            self._throttles[key] = throttle
        return throttle

    def __iter__(self) -> Iterator[SiteThrottle]:
        return iter(self._throttles.values())

    def warmup_states(self) -> dict[tuple[str, str], WarmupState]:
        """Every warm-up's state to persist: the saved ones, updated by this run's."""
        states = dict(self.saved_warmups)
        for (source, site), t in self._throttles.items():
            if t.warmup is not None:
                states[(source, site)] = t.warmup.state()
        return states
