"""Provider procedures: the token table, and the throttle obeying it (fake clock, then a real sink).

The acceptance test runs the real engine against a gmail-like sink on an
event loop whose clock the test moves forward: the 10-minute pause Gmail asks
for after ``421 4.7.28`` passes in an instant, while everything else
(connections, rounds of a quarter second) runs in real time on the same clock.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from typing import Any

import pytest

from fastmta.delivery.config import config_from_dict
from fastmta.delivery.engine import Engine, Status
from fastmta.delivery.limits import AdaptiveConfig, ThrottleConfig
from fastmta.delivery.procedures import PROCEDURE_TABLE, PROCEDURES, Action, LimitKey, Procedures, SenderHolds, match
from fastmta.delivery.throttle import EventKind, SiteThrottle, ThrottleEvent, Throttles
from fastmta.feedback.classification import Classification
from fastmta.feedback.classify import default_classifier
from fastmta.sink import FaultConfig, ListenerConfig, PhaseFault, RateLimit, SinkConfig, SinkServer
from fastmta.sink.profiles import GMAIL, OUTLOOK, YAHOO
from fastmta.smtp.reply import Reply

CLS = default_classifier()


def rendered(template: Any, ip: str = "192.0.2.10") -> str:
    """A sink profile's reply as the client logs it: ``str(Reply)``."""
    wire = template.render({"host": "mx.test", "ip": ip, "sender": "a@b.test", "rcpt": "c@d.test", "id": "q1"})
    lines = [line[4:] for line in wire.decode().split("\r\n") if line]
    return str(Reply(template.code, tuple(lines), lines[0].split()[0] if lines[0][:1].isdigit() else None))


def gmail_text(what: str) -> str:
    """Gmail's 4.7.28 wording, over several lines as Gmail sends it, naming *what* is limited."""
    lines = (
        "4.7.28 Gmail has detected an unusual rate of unsolicited mail",
        f"4.7.28 originating from {what}. To protect our users from spam, mail",
        "4.7.28 sent from your domain has been temporarily rate limited. For more",
        "4.7.28 information, go to https://support.google.com/mail/?p=UnsolicitedRateLimitError x1 - gsmtp",
    )
    return str(Reply(421, lines, "4.7.28"))


# --- the token table ----------------------------------------------------------------

GMAIL_PAUSE = Action(pause=600.0, restart_connections=1, ramp_step=1)

CASES: list[tuple[str, str, str, LimitKey, str | None]] = [
    # (reply text, procedure, provider, key, value the text names)
    (rendered(GMAIL.rate_limited), "gmail-unsolicited-rate", "gmail", LimitKey.IP, None),
    (gmail_text("your DKIM domain [news.example.com 15]"), "gmail-unsolicited-rate", "gmail",
     LimitKey.DKIM_DOMAIN, "news.example.com"),
    (gmail_text("your DKIM domain [ 15]"), "gmail-unsolicited-rate", "gmail", LimitKey.DKIM_DOMAIN, None),
    (gmail_text("your SPF domain [bounce.example.com 10]"), "gmail-unsolicited-rate", "gmail",
     LimitKey.SPF_DOMAIN, "bounce.example.com"),
    (gmail_text("your IP Netblock [192.0.2.0/24 15]"), "gmail-unsolicited-rate", "gmail",
     LimitKey.NETBLOCK, "192.0.2.0/24"),
    ("421-4.7.28 Gmail has detected an unusual rate of unsolicited mail containing one of your URL "
     "421-4.7.28 domains. To protect our users from spam, mail with the URL has been temporarily rate limited.",
     "gmail-unsolicited-rate", "gmail", LimitKey.URL_DOMAIN, None),
    # Older Gmail servers say the same with 4.7.0.
    ("421-4.7.0 [192.0.2.10 15] Our system has detected an unusual rate of 421-4.7.0 unsolicited mail "
     "originating from your IP address.", "gmail-unsolicited-rate", "gmail", LimitKey.IP, None),
    (rendered(YAHOO.rate_limited), "yahoo-deferred", "yahoo", LimitKey.IP, None),
    ("421 4.7.0 [TS01] Messages from 192.0.2.10 temporarily deferred due to user complaints - 4.16.55.1",
     "yahoo-deferred", "yahoo", LimitKey.IP, None),
    ("421 4.7.0 [TS02] Messages from 192.0.2.10 temporarily deferred - 4.16.50", "yahoo-deferred", "yahoo",
     LimitKey.IP, None),
    ("421 4.7.1 [TS03] All messages from 192.0.2.10 will be permanently deferred; Retrying will NOT succeed.",
     "yahoo-permanently-deferred", "yahoo", LimitKey.IP, None),
    (rendered(OUTLOOK.rate_limited), "microsoft-ip-reputation-rate", "microsoft", LimitKey.IP, None),
    ("451 4.7.651 The mail server [192.0.2.10] has been temporarily rate limited due to IP reputation. (S3114)",
     "microsoft-ip-reputation-rate", "microsoft", LimitKey.IP, None),
    ("421 RP-001 (SNT0-MC2-F19) Unfortunately, some messages from 192.0.2.10 weren't sent. Please try again. "
     "We have limits for how many messages can be sent per hour and per day.", "microsoft-rp-001", "microsoft",
     LimitKey.IP, None),
    ("421 RP-002 The sending IP exceeded a connection-level rate limit.", "microsoft-rp-connections",
     "microsoft", LimitKey.IP, None),
    ("421 RP-003 The sending IP exceeded a connection limit.", "microsoft-rp-connections", "microsoft",
     LimitKey.IP, None),
    ("451 4.7.500 Server busy. Please try again later from [192.0.2.10]. (S77719)", "microsoft-server-busy",
     "microsoft", LimitKey.IP, None),
    (rendered(OUTLOOK.text_for(550)), "microsoft-netblock-listed", "microsoft", LimitKey.NETBLOCK, None),
    ("421 resimta-po-18v.sys.comcast.net 192.0.2.10 Throttled - try again later. Please see "
     "http://postmaster.comcast.net/smtp-error-codes.php#RL000001", "comcast-throttled", "comcast",
     LimitKey.IP, None),
]  # fmt: skip


@pytest.mark.parametrize(("text", "name", "provider", "key", "value"), CASES)
def test_token_maps_to_action_and_key(text: str, name: str, provider: str, key: LimitKey, value: str | None) -> None:
    m = match(text)
    assert m is not None, text
    assert (m.procedure.name, m.procedure.provider, m.key, m.value) == (name, provider, key, value)
    # Every built-in procedure pauses, restarts with one connection and ramps by one.
    assert m.action.pause > 0 and m.action.restart_connections == 1 and m.action.ramp_step == 1


def test_actions_as_published() -> None:
    by_name = {p.name: p.action for p in PROCEDURES.procedures}
    assert by_name["gmail-unsolicited-rate"] == GMAIL_PAUSE  # >= 10 min, one connection, +1 per clean round
    assert by_name["yahoo-permanently-deferred"].pause >= 4 * 3600  # "retrying will NOT succeed": hours
    assert by_name["yahoo-deferred"].pause >= 1800
    assert by_name["microsoft-rp-001"].pause >= 3600  # an hourly limit: wait for the next hour
    assert by_name["microsoft-ip-reputation-rate"].rate_cut == 0.5
    assert by_name["comcast-throttled"].pause <= 600  # Comcast: retry within minutes


@pytest.mark.parametrize(
    "text",
    [
        rendered(GMAIL.greylisted),  # 4.2.1: one recipient receives too fast, not a site limit
        rendered(GMAIL.unknown_user),
        rendered(GMAIL.too_many_connections),
        "450 4.7.1 <c@d.test>: Recipient address rejected: Greylisted, try again later",
        "452 4.2.2 The email account that you tried to reach is over quota",
        "",
    ],
)
def test_other_replies_have_no_procedure(text: str) -> None:
    assert match(text) is None


def test_table_is_well_formed() -> None:
    names = [e["name"] for e in PROCEDURE_TABLE]
    assert len(names) == len(set(names)) == len(PROCEDURES)
    with pytest.raises(ValueError, match="matches nothing"):
        Procedures([{"name": "x", "provider": "p", "action": {"pause": 1.0}}])
    with pytest.raises(ValueError, match="restart_connections"):
        Action(restart_connections=0)
    with pytest.raises(ValueError, match="rate_cut"):
        Action(rate_cut=1.5)


def test_sender_holds() -> None:
    holds = SenderHolds()
    assert not holds and holds.wait("a@example.com", 0.0) == 0.0
    assert holds.hold("Example.COM", 600.0, 0.0)
    assert not holds.hold("example.com", 900.0, 10.0)  # held: a late reply does not extend it
    assert holds.wait("news@example.com", 100.0) == 500.0
    assert holds.wait("bounce@mail.example.com", 100.0) == 500.0  # a subdomain: held with it
    assert holds.wait("a@other.test", 100.0) == 0.0 and holds.wait("a@notexample.com", 100.0) == 0.0
    assert holds.held(100.0) == {"example.com": 600.0}
    assert holds.wait("news@example.com", 600.0) == 0.0 and holds.held(600.0) == {}
    assert holds.hold("example.com", 1300.0, 700.0)  # released: a new reply holds it again


# --- the throttle obeys (fake clock) --------------------------------------------------

GMAIL_421 = rendered(GMAIL.rate_limited)
GMAIL_421_C = CLS.classify_text(GMAIL_421, phase="mail")


def gmail_throttle(**adaptive: Any) -> tuple[SiteThrottle, list[ThrottleEvent]]:
    events: list[ThrottleEvent] = []
    cfg = ThrottleConfig(max_connections=5, adaptive=AdaptiveConfig(initial_connections=2, **adaptive))
    th = SiteThrottle("ip1", "gmail-smtp-in.l.google.com", cfg, 0.0, on_event=events.append, procedures=PROCEDURES)
    return th, events


def connection_round(th: SiteThrottle, now: float, *, reply: Classification | None = None, text: str = "") -> float:
    """One round: open connections up to the window (more are wanted), one message on each, replies 1 s later."""
    tickets: list[int] = []
    while th.connection_wait(len(tickets), now) == 0.0:
        c = th.connection_started(now)
        th.connection_result(c, None, now)
        tickets.append(c)
    assert th.connection_wait(len(tickets), now) == math.inf  # the window is what holds us back
    sent = [th.message_started(now) for _ in tickets if th.message_wait(now) == 0.0]
    now += 1.0
    for t in sent:
        th.message_result(t, reply, now, reason=text)
    return now


def test_gmail_421_pause_then_one_connection_then_one_more_per_clean_round() -> None:
    th, events = gmail_throttle(initial_rate=100.0)
    now = connection_round(th, 0.0)  # slow start: 2 -> 4 connections
    assert th.window == 4
    inflight = [th.message_started(now) for _ in range(3)]
    th.message_result(inflight[0], GMAIL_421_C, now + 0.1, reason=GMAIL_421)
    t0 = now + 0.1
    # Paused for at least ten minutes: no connection, no message.
    assert th.suspended_until is not None and th.suspended_until - t0 >= 600.0
    suspend = [e for e in events if e.kind is EventKind.SUSPEND][-1]
    assert "gmail-unsolicited-rate" in suspend.reason and "(ip)" in suspend.reason
    for t in inflight[1:]:  # replies to what was in flight do not extend the pause
        th.message_result(t, GMAIL_421_C, t0 + 1, reason=GMAIL_421)
    assert th.suspended_until - t0 == pytest.approx(600.0)
    for later in (1.0, 300.0, 599.9):
        assert th.connection_wait(0, t0 + later) > 0 and th.message_wait(t0 + later) > 0
    # Ten minutes later: one connection, one probe message.
    now = t0 + 600.0
    assert th.connection_wait(0, now) == 0.0 and th.connection_wait(1, now) == math.inf
    c = th.connection_started(now)
    th.connection_result(c, None, now)
    probe = th.message_started(now)
    assert th.message_wait(now) == math.inf
    th.message_result(probe, None, now + 0.2)
    assert not th.probing and th.window == 1
    resume = [e for e in events if e.kind is EventKind.WINDOW][-1]
    assert (resume.old, resume.new) == (4, 1) and "1 connection(s), +1 per clean round" in resume.reason
    # +1 connection per clean round (no slow start), up to max_connections = 5.
    now += 0.2
    windows = []
    for _ in range(6):
        now = connection_round(th, now)
        windows.append(th.window)
    assert windows == [2, 3, 4, 5, 5, 5]


def test_throttled_probe_pauses_again_and_restarts_from_one() -> None:
    th, _ = gmail_throttle()
    t = th.message_started(0.0)
    th.message_result(t, GMAIL_421_C, 0.5, reason=GMAIL_421)
    now = 600.5
    probe = th.message_started(now)
    th.message_result(probe, GMAIL_421_C, now + 1, reason=GMAIL_421)
    assert th.suspended_until == pytest.approx(now + 1 + 600.0)
    now += 601.0
    probe = th.message_started(now)
    th.message_result(probe, None, now + 1)
    assert th.window == 1


def test_a_clean_round_is_one_without_throttle_replies() -> None:
    th, _ = gmail_throttle()
    t = th.message_started(0.0)
    th.message_result(t, GMAIL_421_C, 0.5, reason=GMAIL_421)
    probe = th.message_started(600.5)
    th.message_result(probe, None, 601.0)
    now = connection_round(th, 601.0)
    assert th.window == 2
    # A generic "slow down" during the ramp: the usual cut (one less), and the ramp ends.
    too_many = CLS.classify_text("4.7.0 mx.test Too many connections from 192.0.2.10", code=421, phase="connect")
    c = th.connection_started(now + 2)
    th.connection_result(c, too_many, now + 3, reason="421 4.7.0 mx.test Too many connections from 192.0.2.10")
    assert th.window == 1 and th.suspended_until is None


def test_dkim_domain_limit_holds_that_sender_domain_only() -> None:
    holds = SenderHolds()
    thr = Throttles(sites={"gmail-smtp-in.l.google.com": ThrottleConfig(max_connections=5)})
    thr.sender_holds["gmail-smtp-in.l.google.com"] = holds
    a = thr.get("ip1", "gmail-smtp-in.l.google.com", 0.0)
    b = thr.get("ip2", "gmail-smtp-in.l.google.com", 0.0)
    text = gmail_text("your DKIM domain [example.com 15]")
    c = CLS.classify_text(text, phase="eod")
    window, rate = a.window, a.rate
    t = a.message_started(0.0)
    a.message_result(t, c, 1.0, reason=text, sender="bulk@mail.example.com")
    # Held for >= 10 minutes at the site, for every source; the source itself is not paused.
    assert a.sender_wait("news@example.com", 1.0) == pytest.approx(600.0)
    assert b.sender_wait("bulk@mail.example.com", 1.0) == pytest.approx(600.0)
    assert a.sender_wait("someone@other.test", 1.0) == 0.0
    assert a.suspended_until is None and (a.window, a.rate) == (window, rate)
    assert a.message_wait(1.0) == 0.0
    held = [e for e in a.events if e.kind is EventKind.HOLD]
    assert {e.reason.split(" held")[0] for e in held} == {"mail from mail.example.com", "mail from example.com"}
    assert "dkim_domain example.com" in held[0].reason
    assert a.sender_wait("news@example.com", 601.0) == 0.0
    # A caller that does not say whose mail it was (cannot hold a domain): the source pauses instead.
    t = b.message_started(2.0)
    b.message_result(t, c, 3.0, reason=text)
    assert b.suspended_until == pytest.approx(603.0)


def test_spf_and_url_domains_hold_the_sender_domain() -> None:
    for what, held in (("your SPF domain [bounces.example.org 10]", "bounces.example.org"),
                       ("one of your URL domains", "example.net")):  # fmt: skip
        th, _ = gmail_throttle()
        th.sender_holds = SenderHolds()
        text = gmail_text(what)
        t = th.message_started(0.0)
        th.message_result(t, CLS.classify_text(text, phase="eod"), 1.0, reason=text, sender="x@example.net")
        assert th.sender_wait(f"y@{held}", 1.0) == pytest.approx(600.0)
        assert th.suspended_until is None


def test_procedures_can_be_switched_off_per_site() -> None:
    th, _ = gmail_throttle(procedures=False, initial_rate=10.0)
    t = th.message_started(0.0)
    th.message_result(t, GMAIL_421_C, 1.0, reason=GMAIL_421)
    assert th.suspended_until is None and th.rate == 5.0  # the generic loop: halve


def test_rate_cut_and_pause_for_microsoft() -> None:
    th, _ = gmail_throttle(initial_rate=40.0)
    text = rendered(OUTLOOK.rate_limited)
    t = th.message_started(0.0)
    th.message_result(t, CLS.classify_text(text, phase="mail"), 1.0, reason=text)
    assert th.rate == 20.0 and th.suspended_until == pytest.approx(901.0)


# --- acceptance: the real engine, a gmail-like sink, a fake clock ------------------------


class WarpLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock the test moves forward; timers that fall due then fire at once."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = 0.0

    def time(self) -> float:
        return super().time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


async def wait_until(cond: Any, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, what
        await asyncio.sleep(0.01)


def test_engine_obeys_gmail_421_4_7_28_against_a_real_sink() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, WarpLoop)
        # Gmail-like: a bucket of 60 messages that refills at 1/s, then 421 4.7.28
        # naming our IP address. Each message takes the sink 0.1 s, so a
        # connection carries about 10 per second: the window is what limits us.
        faults = FaultConfig(rate_limit=RateLimit(rate=1.0, burst=60.0), delays=(("eod", 0.1),))
        server = SinkServer(SinkConfig(listeners=(ListenerConfig("127.0.0.1", 0, profile="gmail", faults=faults),),
                                       starttls=False))  # fmt: skip
        host, port = (await server.start())[0]
        address = f"{host}:{port}"
        cfg = config_from_dict({
            "routing": {"static": {"gmail.test": [address]}},
            "smtp": {"tls": "never", "timeouts": {"connect": 5, "greeting": 5, "mail": 5, "rcpt": 5, "data": 5}},
            "queue": {"retry_initial": 0.3, "retry_max": 1.0, "retry_jitter": 0.1, "max_lifetime": 7200},
            "sites": {address: {"max_connections": 5, "idle_timeout": 2.0, "adaptive": {
                "initial_connections": 2, "initial_rate": 500.0, "round_min": 0.25}}},
        })  # fmt: skip
        n = 120
        try:
            async with Engine(cfg) as engine:
                for i in range(n):
                    await engine.submit(b"From: a@sender.test\r\nSubject: t\r\n\r\nhi\r\n", "bulk@sender.test",
                                        [f"user{i}@gmail.test"])  # fmt: skip
                await wait_until(lambda: any(t.site == address for t in engine.throttles), 10, "never routed")
                th = next(t for t in engine.throttles if t.site == address)

                def connections() -> int:
                    return sum(q["connections"] for q in engine.queue_stats() if q["site"] == address)

                # The bucket runs dry: 421 4.7.28, and the site pauses.
                await wait_until(lambda: th.suspended_until is not None, 30, "never throttled")
                suspend = next(e for e in engine.throttle_events if e.kind is EventKind.SUSPEND)
                assert "gmail-unsolicited-rate (ip)" in suspend.reason and "4.7.28" in suspend.reason
                assert suspend.new is not None and suspend.new - suspend.at >= 600.0
                await wait_until(lambda: connections() == 0, 10, "connections kept open through the pause")
                sent_before = server.stats.messages
                await asyncio.sleep(0.5)
                assert server.stats.messages == sent_before and connections() == 0  # nothing goes
                assert engine.counts[Status.DELIVERED.value] < n
                refusals = server.stats.faults["rate_limit"]
                assert refusals > 0
                # Ten minutes pass (on the fake clock): one connection, a probe, then +1 per clean round.
                samples: list[tuple[int, int]] = []

                async def sample() -> None:
                    while True:
                        samples.append((connections(), th.window))
                        await asyncio.sleep(0.005)

                sampler = asyncio.ensure_future(sample())
                loop.advance(600.0)
                assert await engine.drain(60), engine.queue_stats()
                sampler.cancel()
                events = [e for e in engine.throttle_events if e.site == address]
                delivered = engine.counts[Status.DELIVERED.value]
        finally:
            await server.close()
        assert delivered == n and server.stats.messages == n
        assert server.stats.faults["rate_limit"] == refusals, "throttled again after the pause"
        kinds = [e.kind for e in events]
        first = kinds.index(EventKind.SUSPEND)
        probe = kinds.index(EventKind.PROBE, first)
        resume = kinds.index(EventKind.RESUME, probe)
        assert events[probe].at - events[first].at >= 600.0
        # After the probe: the window restarts at 1 and grows by one per clean round to 5.
        after = [e for e in events[probe:] if e.kind is EventKind.WINDOW]
        assert after[0].new == 1 and "1 connection(s), +1 per clean round" in after[0].reason, [str(e) for e in events]
        assert [(e.old, e.new) for e in after[1:]] == [(1, 2), (2, 3), (3, 4), (4, 5)], [str(e) for e in events]
        assert all("provider procedure: +1 per clean round" in e.reason for e in after[1:])
        steps = [e.at for e in after]
        assert all(b - a >= 0.25 - 1e-3 for a, b in itertools.pairwise(steps))  # one step per round (round_min)
        assert resume > probe
        # Never more connections than the window allowed; a single one until the first clean round.
        assert samples and all(c <= max(w, 1) for c, w in samples), samples
        assert max(c for c, _ in samples) == 5

    with asyncio.Runner(loop_factory=WarpLoop) as runner:
        runner.run(scenario())


def test_engine_holds_a_named_sender_domain_without_pausing_the_source() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, WarpLoop)
        # Every MAIL is refused with Gmail's DKIM-domain wording: each sender domain
        # that draws it is held (with the domain the reply names), the source is not paused.
        dkim = ("4.7.28 Gmail has detected an unusual rate of unsolicited mail originating from your DKIM "
                "domain [example.com 15]. Mail sent from your domain has been temporarily rate limited.")  # fmt: skip
        faults = FaultConfig(replies=(PhaseFault("mail", 1.0, 421, dkim),))
        server = SinkServer(SinkConfig(listeners=(ListenerConfig("127.0.0.1", 0, profile="gmail", faults=faults),),
                                       starttls=False))  # fmt: skip
        host, port = (await server.start())[0]
        address = f"{host}:{port}"
        cfg = config_from_dict({
            "routing": {"static": {"gmail.test": [address]}},
            "smtp": {"tls": "never", "timeouts": {"connect": 5, "greeting": 5, "mail": 5, "rcpt": 5, "data": 5}},
            "queue": {"retry_initial": 0.3, "retry_max": 1.0, "retry_jitter": 0.1, "max_lifetime": 7200},
            "sites": {address: {"max_connections": 5, "idle_timeout": 1.0, "adaptive": {
                "initial_connections": 2, "initial_rate": 500.0, "round_min": 0.25}}},
        })  # fmt: skip
        try:
            async with Engine(cfg) as engine:
                for i in range(10):
                    for sender in ("news@mail.example.com", "info@other.test"):
                        await engine.submit(b"Subject: t\r\n\r\nhi\r\n", sender, [f"user{i}@gmail.test"])
                await wait_until(lambda: any(t.site == address for t in engine.throttles), 10, "never routed")
                th = next(t for t in engine.throttles if t.site == address)

                def held() -> set[str]:
                    return set(engine.throttles.sender_holds[address].held(loop.time()))

                def connections() -> int:
                    return sum(q["connections"] for q in engine.queue_stats() if q["site"] == address)

                await wait_until(lambda: held() == {"mail.example.com", "example.com", "other.test"}, 20, "not held")
                await wait_until(lambda: connections() == 0, 10, "connections kept open for held mail")
                refused = server.stats.faults["mail"]
                assert 0 < refused <= 8, refused  # one or two per connection, not a retry storm
                await asyncio.sleep(0.5)
                # Nothing held is tried. (A retry falling due in this half second may open a connection,
                # which sets its batch aside without a MAIL and closes again when idle: a race the test had,
                # seen once in CI.)
                assert server.stats.faults["mail"] == refused
                await wait_until(lambda: connections() == 0, 10, "connections kept open for held mail")
                assert th.suspended_until is None and not th.probing  # the source itself is not paused
                assert engine.counts[Status.DELIVERED.value] == 0
                hold = next(e for e in engine.throttle_events if e.kind is EventKind.HOLD)
                assert hold.new is not None and hold.new - hold.at >= 600.0
                assert "dkim_domain example.com" in hold.reason
                # Ten minutes later the held mail is tried again (and held again: the sink still refuses).
                loop.advance(600.0)
                await wait_until(lambda: server.stats.faults["mail"] > refused, 10, "never released")
                await wait_until(lambda: len(held()) >= 2, 10, "not held again")
                assert server.stats.faults["mail"] <= 2 * refused + 4
        finally:
            await server.close()

    with asyncio.Runner(loop_factory=WarpLoop) as runner:
        runner.run(scenario())
