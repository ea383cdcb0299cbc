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

from fastmta.delivery.limits import PROVIDERS, Provider, SourceLimits, ThrottleConfig, limits_for
from fastmta.delivery.ratelimit import Gcra, parse_rate
from fastmta.delivery.warmup import Warmup, WarmupConfig, WarmupDecision, WarmupState
from fastmta.feedback.classification import Classification, Outcome

__all__ = [
    "EventKind",
    "SiteThrottle",
    "ThrottleEvent",
    "ThrottleStatus",
    "Throttles",
]


# --------------------------------------------------------------------------
# Events


class EventKind(StrEnum):
    WINDOW = "window"  # connection window changed
    RATE = "rate"  # message rate changed
    SUSPEND = "suspend"  # sending suspended
    PROBE = "probe"  # suspension over, one probe allowed
    RESUME = "resume"  # probe succeeded, sending resumed
    WARMUP = "warmup"  # warm-up step advanced or held


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
# The controller


class _Dial:
    """One AIMD quantity with slow start, hold and probing (see module notes)."""

    def __init__(
        self, initial: float, floor: float, ceiling: float, step: Callable[[float], float], integer: bool,
        hold_rounds: int, max_hold_rounds: int,
    ) -> None:  # fmt: skip
        self.min_hold = hold_rounds
        self.max_hold = max(hold_rounds, max_hold_rounds)
        self.hold_len = hold_rounds  # clean rounds to sit at good before probing above it
        self.hold_left = 0
        self.reset_above = 1.1
        self.initial = min(max(initial, floor), ceiling)
        self.value = self.initial
        self.floor = floor
        self.ceiling = ceiling
        self._base_step = step
        self.integer = integer
        self.ssthresh = math.inf  # slow start until the first signal
        self.good = 0.0  # highest value with a clean, limited round (0: unknown)
        self.probe = 0.0  # current step above good; doubles while clean
        # Round bookkeeping (module notes: "What a round is").
        self.round_seq = 0
        self.round_t0 = -math.inf
        self.limited = False
        self.signalled = False
        self.cut_seq = 0
        self.cut_t = -math.inf

    def _q(self, v: float) -> float:
        v = min(max(v, self.floor), self.ceiling)
        # Round a connection count up: after a failed probe from 5 to 6 the
        # hold value 0.9 x 5 must mean "stay at the proven 5", not "drop to 4".
        return float(math.ceil(v - 1e-9)) if self.integer else v

    def new_round(self, seq: int, now: float) -> None:
        self.round_seq, self.round_t0 = seq, now
        self.limited = self.signalled = False

    def round_over(self, ticket: int, now: float, round_min: float) -> bool:
        return ticket >= self.round_seq and now - self.round_t0 >= round_min

    def grow(self) -> str | None:
        """End of a clean round: the new value's reason, or None if unchanged."""
        if not self.limited or self.signalled:
            return None
        v = self.value
        if self.probe and v > self.good * self.reset_above:
            # A probe well above good came back clean: the capacity grew, so
            # probe often again. (Just above good proves little: a
            # receiver's burst allowance hides a small excess for a while.)
            self.hold_len = self.min_hold
        self.good = max(self.good, v)
        if v < self.ssthresh:
            new, why = min(v * 2, self.ssthresh), "slow start: clean round"
            self.probe = 0.0
        elif v < self.good:
            new, why = min(v + self._base_step(v), self.good), "additive increase: clean round"
        elif self.hold_left > 0:
            # Sit at the last good value for a while: every probe above it
            # costs throttle replies, and a failed probe doubles the wait.
            self.hold_left -= 1
            return None
        else:
            # Above every value proven clean: steps growing by one base step
            # per clean round (0.5, 1, 1.5, ...): gentle at first, where a
            # receiver's burst allowance can make a round look clean, yet a
            # doubled capacity is found in about ten rounds.
            # Capped at 5% of the value: a receiver's burst allowance
            # hides an excess for several rounds, and uncapped growing steps
            # overshoot far past the capacity before the first refusal.
            self.probe = min(self.probe + self._base_step(v), max(self._base_step(v), 0.05 * v))
            new, why = v + self.probe, "probing above the last good value: clean round"
        new = self._q(new)
        if self.integer and new == v and v < self.ceiling:
            new = v + 1
        if new == v:
            return None
        self.value = new
        return why

    def cut(self, decrease: float, hold: float) -> None:
        v = self.value
        if self.good and v > self.good:
            # Throttled while above the best clean value: capacity lies in
            # between, so stay near the proven value instead of halving.
            new = max(v * decrease, hold * self.good)
            if self.ssthresh != math.inf:  # a failed probe (not the end of slow start)
                self.hold_len = min(2 * self.hold_len, self.max_hold)
        elif self.good and v >= hold * self.good:
            # Throttled near the value we believed good: it was a little
            # optimistic (a receiver's burst allowance makes it look clean).
            self.good = hold * v
            new = hold * self.good
        else:
            # Well below a value that used to be clean, or no history: the
            # receiver's capacity dropped; halve and relearn.
            new = v * decrease
            self.good = 0.0
        self.ssthresh = new
        self.probe = 0.0
        self.hold_left = self.hold_len
        q = self._q(new)
        if self.integer and q >= v:
            q = self._q(v - 1)  # a cut always cuts (rounding up must not cancel it)
        self.value = q

    def restart(self, hold: float) -> None:
        """After a suspension: from the initial value, fast back to near the last good one."""
        self.value = self._q(min(self.initial, self.value))
        self.ssthresh = max(self.value, hold * self.good) if self.good else math.inf
        self.probe = 0.0


class SiteThrottle:
    """Throttle state of one (egress source, site). All times are ``now`` arguments.

    The pool's calls, in order:

    * ``connection_wait(open, now)`` before opening a connection; then
      ``t = connection_started(now)`` and, once the greeting and EHLO are
      through or failed, ``connection_result(t, classification_or_None, now)``.
    * ``message_wait(now, n)`` before starting a transaction of ``n``
      recipients; then ``t = message_started(now, n)`` and, per reply,
      ``message_result(t, classification_or_None, now)`` (None: delivered).

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
        source_limiters: Sequence[Gcra] = (),
        warmup: WarmupConfig | None = None,
        warmup_state: WarmupState | None = None,
        wall_offset: float = 0.0,
        on_event: Callable[[ThrottleEvent], None] | None = None,
        history: int = 100,
    ) -> None:
        self.source = source
        self.site = site
        self.config = config
        a = self.adaptive = config.adaptive
        self.on_event = on_event
        self.events: deque[ThrottleEvent] = deque(maxlen=history)
        self._window = _Dial(
            a.initial_connections if a.enabled else config.max_connections,
            1, config.max_connections, lambda v: 1.0, True, a.hold_rounds, a.max_hold_rounds,
        )  # fmt: skip
        self._rate = _Dial(
            a.initial_rate, a.min_rate, a.max_rate if a.max_rate is not None else math.inf,
            lambda v: max(a.min_rate_step, a.probe_step * v), False, a.hold_rounds, a.max_hold_rounds,
        )  # fmt: skip
        self._pacer = Gcra(1.0 / self._rate.value)
        # The first round starts now, with the first ticket.
        self._window.new_round(1, now)
        self._rate.new_round(1, now)
        self._static = [Gcra.from_spec(parse_rate(s)) for s in config.rate]
        self._shared = list(source_limiters)
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
        if self._conn_rate is not None:
            return self._conn_rate.wait(now)
        return 0.0

    def connection_started(self, now: float) -> int:
        self._tick(now)
        if self._conn_rate is not None:
            self._conn_rate.take(now)
        return self._ticket()

    def connection_result(self, ticket: int, result: Classification | None, now: float, reason: str = "") -> None:
        """The connection opened (None, or a delivered-class result) or failed with *result*."""
        self._feed(self._window, EventKind.WINDOW, ticket, result, now, reason)

    # --- messages ----------------------------------------------------------------

    def message_wait(self, now: float, n: int = 1) -> float:
        """May a transaction of *n* recipients start now (0.0), in some seconds, or after a result (inf)?"""
        self._tick(now)
        if self.suspended_until is not None:
            return self.suspended_until - now
        if self.probing:
            return math.inf if self._probe_ticket is not None else 0.0
        wait = 0.0
        for lim in (*self._static, *self._shared):
            wait = max(wait, lim.wait(now, n))
        if self.warmup is not None:
            decision = self.warmup.check(now + self._wall, n)
            if not decision.allowed:
                assert decision.opens_at is not None
                wait = max(wait, decision.opens_at - (now + self._wall))
        if self.adaptive.enabled:
            paced = self._pacer.wait(now, n)
            if paced > 0 and paced >= wait:
                self._rate.limited = True  # the adaptive rate is what holds us back
            wait = max(wait, paced)
        return wait

    def warmup_check(self, now: float, n: int = 1) -> WarmupDecision | None:
        """For the scheduler choosing a source: the warm-up verdict (None: no warm-up)."""
        return self.warmup.check(now + self._wall, n) if self.warmup is not None else None

    def message_started(self, now: float, n: int = 1) -> int:
        self._tick(now)
        for lim in (*self._static, *self._shared):
            lim.take(now, n)
        if self.adaptive.enabled:
            self._pacer.take(now, n)
        if self.warmup is not None:
            self.warmup.take(now + self._wall, n)
        ticket = self._ticket()
        if self.probing:
            self._probe_ticket = ticket
        return ticket

    def message_result(self, ticket: int, result: Classification | None, now: float, reason: str = "") -> None:
        """One reply to the transaction *ticket* (call once per recipient or once per transaction)."""
        if self.warmup is not None:
            if result is None or result.outcome is Outcome.DELIVERED:
                self.warmup.record(now + self._wall, delivered=1)
            elif result.outcome is Outcome.TRANSIENT:
                self.warmup.record(now + self._wall, deferred=1)
            else:
                self.warmup.record(now + self._wall, bounced=1)
        self._feed(self._rate, EventKind.RATE, ticket, result, now, reason)

    # --- the loop --------------------------------------------------------------

    def _ticket(self) -> int:
        self._seq += 1
        return self._seq

    def _tick(self, now: float) -> None:
        if self.suspended_until is not None and now >= self.suspended_until:
            self.suspended_until = None
            self.probing, self._probe_ticket = True, None
            self._emit(now, EventKind.PROBE, None, 1, "suspension over: one probe message on one connection")

    def _feed(
        self, dial: _Dial, kind: EventKind, ticket: int, result: Classification | None, now: float, reason: str
    ) -> None:
        a = self.adaptive
        why = reason or (result.rule if result is not None else "")
        signal = result is not None and result.is_throttle_signal
        suspend = result is not None and result.suspend_for is not None and result.outcome is not Outcome.DELIVERED
        self._tick(now)
        if (self.probing and ticket == self._probe_ticket) or (self.probing and kind is EventKind.WINDOW):
            if signal or suspend:
                assert result is not None
                self._suspend(result.suspend_for or self._last_suspend, now, f"probe throttled: {why}")
            elif kind is EventKind.RATE:
                self._resume(now)
            return
        if suspend and a.enabled and ticket > self._suspend_seq and self.suspended_until is None and not self.probing:
            assert result is not None and result.suspend_for is not None
            self._cut(self._rate, EventKind.RATE, now, why)
            self._suspend(result.suspend_for, now, why)
            return
        if not a.enabled or self.suspended_until is not None or self.probing:
            return
        if signal:
            if ticket > dial.cut_seq and now - dial.cut_t >= a.round_min:
                self._cut(dial, kind, now, why)
                return
            if ticket >= dial.round_seq:
                dial.signalled = True
        for d, k in ((self._window, EventKind.WINDOW), (self._rate, EventKind.RATE)):
            if d.round_over(ticket, now, a.round_min):
                old = d.value
                grew = d.grow()
                if grew is not None:
                    self._changed(d, k, old, now, grew)
                d.new_round(self._seq + 1, now)

    def _cut(self, dial: _Dial, kind: EventKind, now: float, why: str) -> None:
        old = dial.value
        dial.cut(self.adaptive.decrease, self.adaptive.hold)
        # Tickets up to now were sent at the old pace: their replies must not cut again.
        dial.cut_seq, dial.cut_t = self._seq, now
        dial.new_round(self._seq + 1, now)
        self._changed(dial, kind, old, now, f"throttled: {why}")

    def _changed(self, dial: _Dial, kind: EventKind, old: float, now: float, why: str) -> None:
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
        for dial, kind in ((self._window, EventKind.WINDOW), (self._rate, EventKind.RATE)):
            old = dial.value
            dial.restart(hold)
            dial.cut_seq = self._seq  # replies from before the suspension are history
            dial.new_round(self._seq + 1, now)
            self._changed(dial, kind, old, now, "probe delivered: resuming from the start values")
        self._emit(now, EventKind.RESUME, None, None, "probe delivered: suspension ended")

    def _warmup_changed(self, old: int | None, new: int | None, why: str, at: float) -> None:
        self._emit(at, EventKind.WARMUP, old, new, why)

    def _emit(self, at: float, kind: EventKind, old: float | None, new: float | None, why: str) -> None:
        event = ThrottleEvent(at, self.source, self.site, kind, old, new, why)
        self.events.append(event)
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
    ) -> None:
        self.sites = dict(sites or {})
        self.sources = dict(sources or {})
        self.default = default
        self.providers = providers
        self.on_event = on_event
        self._throttles: dict[tuple[str, str], SiteThrottle] = {}
        self._source_limiters: dict[str, list[Gcra]] = {}
        #: Wall time minus the ``now`` clock's time (warm-up counts calendar days).
        self.wall_offset = 0.0
        #: Warm-up states saved by an earlier run, by (source, site); used as throttles are made.
        self.saved_warmups: dict[tuple[str, str], WarmupState] = {}

    def get(self, source: str, site: str, now: float) -> SiteThrottle:
        key = (source, site)
        throttle = self._throttles.get(key)
        if throttle is None:
            _, cfg = limits_for(site, self.sites, providers=self.providers, default=self.default)
            src = self.sources.get(source, SourceLimits())
            shared = self._source_limiters.get(source)
            if shared is None:
                shared = self._source_limiters[source] = [Gcra.from_spec(parse_rate(s)) for s in src.rate]
            throttle = SiteThrottle(
                source, site, cfg, now, source_limiters=shared, warmup=src.warmup,
                warmup_state=self.saved_warmups.get(key), wall_offset=self.wall_offset, on_event=self.on_event,
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
