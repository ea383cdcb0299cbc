"""The adaptive throttle on a fake clock: every number here is the controller's own."""

from __future__ import annotations

import heapq
import math

import msgspec
import pytest

from fastmta.delivery.limits import AdaptiveConfig, SourceLimits, ThrottleConfig, limits_for
from fastmta.delivery.ratelimit import Gcra
from fastmta.delivery.throttle import EventKind, SiteThrottle, ThrottleEvent, Throttles
from fastmta.delivery.warmup import WarmupConfig
from fastmta.feedback.classification import Classification
from fastmta.feedback.classify import default_classifier

CLS = default_classifier()
RATE_421 = CLS.classify_text(
    "4.7.28 [192.0.2.1] Our system has detected an unusual rate of unsolicited mail", code=421, phase="rcpt"
)
TOO_MANY_CONN = CLS.classify_text("4.7.0 mx.example Too many connections from 192.0.2.1", code=421, phase="connect")
MAILBOX_FULL = CLS.classify_text("4.2.2 The email account that you tried to reach is over quota", code=452, phase="rcpt")
GREYLISTED = CLS.classify_text("4.7.1 Greylisting in action, please come back later", code=451, phase="rcpt")
TSS04 = CLS.classify_text(
    "4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or user complaints",
    code=421,
    phase="mail",
)


def test_replies_used_here_classify_as_assumed() -> None:
    assert RATE_421.is_throttle_signal and RATE_421.suspend_for is None
    assert TOO_MANY_CONN.is_throttle_signal
    assert not MAILBOX_FULL.is_throttle_signal and not GREYLISTED.is_throttle_signal
    assert TSS04.suspend_for == 1800.0


def make(**adaptive: float | bool) -> tuple[SiteThrottle, list[ThrottleEvent]]:
    events: list[ThrottleEvent] = []
    cfg = ThrottleConfig(max_connections=10, adaptive=AdaptiveConfig(**adaptive))  # type: ignore[arg-type]
    return SiteThrottle("ip1", "mx.example", cfg, 0.0, on_event=events.append), events


def saturate(th: SiteThrottle, now: float) -> list[int]:
    """Start messages until the throttle says wait (the sender is rate-limited)."""
    tickets = []
    while th.message_wait(now) == 0.0:
        tickets.append(th.message_started(now))
    assert th.message_wait(now) > 0
    return tickets


def clean_round(th: SiteThrottle, now: float) -> float:
    """One round: saturate at *now*, every reply clean one second later."""
    tickets = saturate(th, now)
    now += 1.0
    for t in tickets:
        th.message_result(t, None, now)
    return now


def throttled_round(th: SiteThrottle, now: float, reply: Classification = RATE_421) -> float:
    tickets = saturate(th, now)
    now += 1.0
    for t in tickets:
        th.message_result(t, reply, now)
    return now


# --- slow start -----------------------------------------------------------------


def test_rate_slow_start_doubles_per_clean_round() -> None:
    th, events = make(initial_rate=10.0)
    now, seen = 0.0, [th.rate]
    for _ in range(4):
        now = clean_round(th, now)
        seen.append(th.rate)
    assert seen == [10.0, 20.0, 40.0, 80.0, 160.0]
    assert [e.kind for e in events] == [EventKind.RATE] * 4
    assert events[0].old == 10.0 and events[0].new == 20.0 and "slow start" in events[0].reason


def test_rate_does_not_grow_when_not_limited() -> None:
    # The sender used less than the rate allowed: nothing learned, no growth.
    th, events = make(initial_rate=10.0)
    now = 0.0
    for _ in range(5):
        t = th.message_started(now)
        now += 1.0
        assert th.message_wait(now) == 0.0
        th.message_result(t, None, now)
    assert th.rate == 10.0 and events == []


def test_round_lasts_at_least_round_min() -> None:
    th, _ = make(initial_rate=10.0, round_min=1.0)
    tickets = saturate(th, 0.0)
    th.message_result(tickets[0], None, 0.5)  # replies after half a second: round not over
    assert th.rate == 10.0
    assert th.message_wait(0.5) == 0.0
    later = th.message_started(0.5)
    th.message_result(later, None, 1.0)
    assert th.rate == 20.0


def test_window_slow_start_to_ceiling() -> None:
    th, events = make(initial_connections=2)
    now, seen = 0.0, [th.window]
    for _ in range(4):
        assert th.connection_wait(th.window, now) == math.inf  # window full: limited
        assert th.connection_wait(th.window - 1, now) == 0.0
        t = th.connection_started(now)
        now += 1.0
        th.connection_result(t, None, now)
        seen.append(th.window)
    assert seen == [2, 4, 8, 10, 10]  # ceiling max_connections=10
    assert [(e.old, e.new) for e in events if e.kind is EventKind.WINDOW] == [(2, 4), (4, 8), (8, 10)]


# --- multiplicative decrease, once per round ----------------------------------------


def test_halving_on_throttle_reply() -> None:
    th, events = make(initial_rate=10.0)
    now = throttled_round(th, 0.0)
    assert th.rate == 5.0
    assert events[-1].kind is EventKind.RATE and (events[-1].old, events[-1].new) == (10.0, 5.0)
    assert "throttled" in events[-1].reason and "gmail-rate-flood" in events[-1].reason
    # From slow start: 10 -> 20 -> 40 clean; throttled at 80 -> 40.
    th, _ = make(initial_rate=10.0)
    now = clean_round(th, clean_round(th, clean_round(th, 0.0)))
    assert th.rate == 80.0
    throttled_round(th, now)
    assert th.rate == 40.0


def test_window_halves_on_connect_time_throttle() -> None:
    th, events = make(initial_connections=8)
    t = th.connection_started(0.0)
    th.connection_result(t, TOO_MANY_CONN, 0.1)
    assert th.window == 4
    assert (events[-1].kind, events[-1].old, events[-1].new) == (EventKind.WINDOW, 8, 4)
    assert th.rate == 10.0  # the message rate is another dial


def test_at_most_one_cut_per_round() -> None:
    th, events = make(initial_rate=40.0)
    inflight = saturate(th, 0.0)
    assert len(inflight) == 1  # burst 1
    inflight += [th.message_started(0.0) for _ in range(9)]  # ten in flight at the cut
    for t in inflight:
        th.message_result(t, RATE_421, 0.2)
    assert th.rate == 20.0 and len(events) == 1
    # A message sent after the cut, throttled before round_min passed: receiver lag, no cut.
    t = th.message_started(0.5)
    th.message_result(t, RATE_421, 0.9)
    assert th.rate == 20.0
    # A late reply to a pre-cut message, well after round_min: still no cut.
    th.message_result(inflight[0], RATE_421, 5.0)
    assert th.rate == 20.0 and len(events) == 1
    # A message sent after the cut and throttled after round_min: a second cut.
    t = th.message_started(5.0)
    th.message_result(t, RATE_421, 5.1)
    assert th.rate == 10.0 and len(events) == 2


def test_floors() -> None:
    th, _ = make(initial_rate=1.0, min_rate=0.2, initial_connections=2)
    now = 0.0
    for _ in range(10):
        t = th.message_started(now)
        c = th.connection_started(now)
        now += 2.0
        th.message_result(t, RATE_421, now)
        th.connection_result(c, TOO_MANY_CONN, now)
    assert th.rate == 0.2 and th.window == 1


def test_recipient_transients_do_not_shrink() -> None:
    th, events = make(initial_rate=10.0)
    tickets = saturate(th, 0.0)
    for t in tickets:
        th.message_result(t, MAILBOX_FULL, 1.0)
        th.message_result(t, GREYLISTED, 1.0)
    # Nothing went through: no cut (the site did not ask us to slow down), and no growth either (a round of
    # greylisted recipients says nothing of the capacity: it had grown the rate to 1e7 a second).
    assert th.rate == 10.0 and events == []
    tickets = saturate(th, 1.0)
    for i, t in enumerate(tickets):
        th.message_result(t, GREYLISTED if i % 2 else None, 2.0)  # half of them delivered
    assert th.rate == 20.0  # a clean round as far as the site is concerned
    assert all(e.reason.startswith("slow start") for e in events)


# --- additive recovery and hold near the last good rate ----------------------------


def test_hold_near_last_good_and_additive_recovery() -> None:
    th, events = make(initial_rate=10.0, probe_step=0.02, min_rate_step=0.5, hold_rounds=2)
    now = clean_round(th, 0.0)  # 10 clean -> 20
    now = clean_round(th, now)  # 20 clean -> 40 (good = 20)
    now = throttled_round(th, now)  # 40 throttled: halve to 20 (= max(20, 0.9 * 20))
    assert (th.rate, th.good_rate) == (20.0, 20.0)

    def rounds(k: int) -> list[float]:
        nonlocal now
        out = []
        for _ in range(k):
            now = clean_round(th, now)
            out.append(th.rate)
        return out

    # After the first signal: no more doubling. Hold 2 rounds at good, then
    # probe above it with steps growing by the base step max(0.5, 2%), each
    # step at most 5% of the rate (0.05 * 21.5 = 1.075, not 1.5).
    assert rounds(5) == pytest.approx([20.0, 20.0, 20.5, 21.5, 22.575])
    # Throttled while probing above the last good value (22.575 > good 21.5):
    # hold at 0.9 * 21.5 = 19.35, not half of 22.575.
    now = throttled_round(th, now)
    assert th.rate == pytest.approx(19.35)
    assert th.good_rate == pytest.approx(21.5)
    # Additive steps back up to good; the failed probe doubled the hold to 4 rounds.
    assert rounds(10) == pytest.approx([19.85, 20.35, 20.85, 21.35, 21.5, 21.5, 21.5, 21.5, 21.5, 22.0])
    assert "additive" in events[-2].reason and "probing" in events[-1].reason


def test_throttled_near_good_lowers_good() -> None:
    th, _ = make(initial_rate=10.0)
    now = clean_round(th, clean_round(th, 0.0))  # good 20, rate 40
    now = throttled_round(th, now)  # -> 20
    assert th.good_rate == 20.0
    now = throttled_round(th, now)  # throttled at the good value itself: it was optimistic
    assert th.good_rate == pytest.approx(18.0) and th.rate == pytest.approx(16.2)


# --- suspension and probe --------------------------------------------------------


def test_suspension_then_single_probe_then_resume() -> None:
    th, events = make(initial_rate=10.0, initial_connections=2)
    now = clean_round(th, clean_round(th, clean_round(th, 0.0)))  # rate 80, good 40
    inflight = [th.message_started(now) for _ in range(5)]
    th.message_result(inflight[0], TSS04, now + 0.1)
    assert th.suspended_until == pytest.approx(now + 1800.1)
    kinds = [e.kind for e in events[-2:]]
    assert kinds == [EventKind.RATE, EventKind.SUSPEND] and "yahoo-tss-suspend" in events[-1].reason
    # Nothing goes while suspended; the waits say until when.
    assert th.message_wait(now + 100) == pytest.approx(1700.1)
    assert th.connection_wait(0, now + 100) == pytest.approx(1700.1)
    # Replies to messages in flight at the suspension do not extend it.
    for t in inflight[1:]:
        th.message_result(t, TSS04, now + 1)
    assert th.suspended_until == pytest.approx(now + 1800.1)
    # Time up: one connection, one message.
    now += 1800.1
    assert th.connection_wait(0, now) == 0.0
    assert events[-1].kind is EventKind.PROBE
    assert th.connection_wait(1, now) == math.inf
    c = th.connection_started(now)
    th.connection_result(c, None, now + 0.1)
    assert th.message_wait(now) == 0.0
    probe = th.message_started(now)
    assert th.message_wait(now) == math.inf and th.probing
    th.message_result(probe, None, now + 0.5)
    # Resumed from the start values, not snapped back to 80/s; fast climb to 0.9 * good.
    assert not th.probing and th.rate == 10.0 and th.window == 2
    assert events[-1].kind is EventKind.RESUME
    # Fast climb back: doubling up to 0.9 * good (good 40 -> 36), no further.
    now += 0.5
    rates = []
    for _ in range(3):
        now = clean_round(th, now)
        rates.append(th.rate)
    assert th.good_rate == 40.0
    assert rates == pytest.approx([20.0, 36.0, 36.72])  # then additive: 2% of 36


def test_throttled_probe_suspends_again() -> None:
    th, events = make(initial_rate=10.0, default_suspend=300.0)
    t = th.message_started(0.0)
    th.message_result(t, TSS04, 0.1)
    now = 1800.1
    probe = th.message_started(now)
    th.message_result(probe, RATE_421, now + 1)  # throttled, no rule-given time: the last one
    assert th.suspended_until == pytest.approx(now + 1 + 1800.0)
    assert events[-1].kind is EventKind.SUSPEND and "probe throttled" in events[-1].reason


# --- static limits, providers, config ------------------------------------------


def test_static_and_source_limits_combine() -> None:
    thr = Throttles(
        sites={"mx.example": ThrottleConfig(rate=["2/s"], adaptive=AdaptiveConfig(enabled=False))},
        sources={"ip1": SourceLimits(rate=["3/s"])},
    )
    a = thr.get("ip1", "mx.example", 0.0)
    b = thr.get("ip1", "other.example", 0.0)
    assert thr.get("ip1", "mx.example", 0.0) is a
    assert a.rate is None  # adaptive off
    for th in (a, a, b):  # the source's 3/s is shared by both sites
        assert th.message_wait(0.0) == 0.0
        th.message_started(0.0)
    assert a.message_wait(0.0) > 0  # site burst 2 used
    assert b.message_wait(0.0) == pytest.approx(1 / 3)  # source burst 3 used


def test_connection_rate() -> None:
    th = SiteThrottle("ip1", "s", ThrottleConfig(connection_rate="2/min"), 0.0)
    for _ in range(2):
        assert th.connection_wait(0, 0.0) == 0.0
        th.connection_started(0.0)
    assert th.connection_wait(0, 0.0) == pytest.approx(30.0)


def test_provider_defaults_are_data() -> None:
    site = "alt1.gmail-smtp-in.l.google.com,gmail-smtp-in.l.google.com"
    name, cfg = limits_for(site)
    assert name == "gmail" and (cfg.max_connections, cfg.max_messages_per_connection) == (5, 50)
    assert limits_for("mta5.am0.yahoodns.net")[0] == "yahoo"
    assert limits_for("example-com.mail.protection.outlook.com")[0] == "outlook"
    assert limits_for("mx.unknown.example") == ("default", ThrottleConfig())
    mine = ThrottleConfig(max_connections=2)
    assert limits_for(site, {"*.google.com": mine}) == ("*.google.com", mine)


def test_config_rejects_bad_specs_clearly() -> None:
    with pytest.raises(msgspec.ValidationError, match="unknown unit 'fortnight'"):
        msgspec.convert({"rate": ["5/fortnight"]}, ThrottleConfig)
    with pytest.raises(msgspec.ValidationError, match="connection_rate|bad rate spec"):
        msgspec.convert({"connection_rate": "fast"}, ThrottleConfig)
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.convert({"adaptive": {"intial_rate": 3}}, ThrottleConfig)


# --- warm-up inside the site throttle -------------------------------------------


def test_warmup_quota_makes_mail_wait_for_the_next_day() -> None:
    thr = Throttles(sources={"new": SourceLimits(warmup=WarmupConfig(schedule=[3, 6], overflow=True))})
    th = thr.get("new", "mx.example", 100.0)
    for _ in range(3):
        th.message_result(th.message_started(100.0), None, 101.0)
    now = 200.0
    assert th.message_wait(now) == pytest.approx(86400.0 - now)
    d = th.warmup_check(now)
    assert d is not None and not d.allowed and d.opens_at == 86400.0 and d.overflow
    assert th.message_wait(86400.0) == 0.0  # new day; all delivered: step 2 (6/day)
    status = th.status(86400.0)
    assert status.warmup_quota == 6
    assert th.events[-1].kind is EventKind.WARMUP and "advanced" in th.events[-1].reason


# --- closed loop ------------------------------------------------------------------


class Receiver:
    """A site that accepts *rate* messages/s (token bucket) and throttles beyond."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.t = burst, 0.0

    def accept(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


def simulate(th: SiteThrottle, rx: Receiver, start: float, end: float, rtt: float = 0.05) -> tuple[int, int]:
    """Drive the throttle with unlimited demand; return (delivered, throttled)."""
    pending: list[tuple[float, int, bool]] = []
    delivered = throttled = 0
    now, dt, max_inflight = start, 0.002, 20
    while now < end:
        while pending and pending[0][0] <= now:
            _, ticket, ok = heapq.heappop(pending)
            th.message_result(ticket, None if ok else RATE_421, now)
            delivered += ok
            throttled += not ok
        while len(pending) < max_inflight and th.message_wait(now) == 0.0:
            ticket = th.message_started(now)
            heapq.heappush(pending, (now + rtt, ticket, rx.accept(now)))
        now += dt
    return delivered, throttled


def test_closed_loop_goodput_and_reconvergence() -> None:
    th, events = make(initial_rate=5.0)
    rx = Receiver(rate=20.0, burst=5.0)
    simulate(th, rx, 0.0, 30.0)  # converge
    delivered, throttled = simulate(th, rx, 30.0, 150.0)
    goodput = delivered / 120.0
    print(f"\nR=20/s: goodput {goodput:.2f}/s, {1000 * throttled / delivered:.1f} throttled per 1000, rate {th.rate:.2f}")
    assert goodput >= 0.9 * 20.0
    assert 1000 * throttled / delivered <= 5.0
    # The receiver doubles its capacity: the sender finds it within a minute.
    rx.rate = 40.0
    simulate(th, rx, 150.0, 180.0)
    delivered, throttled = simulate(th, rx, 180.0, 240.0)
    goodput = delivered / 60.0
    print(f"R=40/s: goodput {goodput:.2f}/s, {1000 * throttled / delivered:.1f} throttled per 1000, rate {th.rate:.2f}")
    assert goodput >= 0.9 * 40.0
    assert 1000 * throttled / delivered <= 5.0
    assert all(e.reason for e in events)


def test_gcra_pacer_is_the_rate() -> None:
    g = Gcra(0.1)
    assert g.try_take(0.0) == 0.0 and g.try_take(0.0) == pytest.approx(0.1)


def test_refused_sessions_do_not_grow_the_window() -> None:
    """postscreen dropping every session ("220-" then "521", read as a protocol error, no throttle signal):
    the window went 2 -> 4 -> 8 -> 10 with no connection ever working. A round grows only when something
    went through."""
    th, events = make(initial_connections=2)
    refused = CLS.classify_local("protocol_error", "reply code changed inside a multi-line reply")
    assert not refused.is_throttle_signal
    now = 0.0
    for _ in range(5):
        opened = 0
        while th.connection_wait(opened, now) == 0.0:
            ticket = th.connection_started(now)
            opened += 1
            th.connection_result(ticket, refused, now + 0.5)
            th.connection_closed()
        now += 1.0
    assert th.window == 2 and not [e for e in events if e.kind.value == "window"]
    opened = 0
    while th.connection_wait(opened, now) == 0.0:  # then connections that work: slow start as before
        th.connection_result(th.connection_started(now), None, now + 0.5)
        opened += 1
    th.connection_wait(opened, now + 1.0)
    th.message_result(th.message_started(now + 1.0), None, now + 1.5)
    assert th.window > 2
