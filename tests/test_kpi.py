"""Live KPIs (fastmta.delivery.kpi) and the guard's brakes on them (fastmta.delivery.brakes), on a fake clock.

The figures each outcome counts in, the sliding windows and their bounded
memory, late records (complaints, unsubscribes, out-of-band bounces), the
campaign brake (hard bounces, complaints, blocks at several providers) with
its re-arming after a resume, source rotation with its probe, and the
dispatcher's steering away from a source out of rotation.
"""

from __future__ import annotations

import random
from typing import Any, cast

import msgspec
import pytest

from fastmta.delivery.brakes import Guard
from fastmta.delivery.config import config_from_dict
from fastmta.delivery.dispatch import Dispatcher
from fastmta.delivery.guard_config import GuardConfig
from fastmta.delivery.kpi import Kpis, Series, provider_of
from fastmta.delivery.limits import SourceLimits
from fastmta.delivery.throttle import Throttles
from fastmta.errors import ConfigError
from fastmta.queue.records import Outcome, Status
from fastmta.smtp.reply import Reply

T0 = 1_800_000_000.0  # a wall-clock time on a minute boundary
OK = Reply(250, ("2.0.0 ok",), "2.0.0")
UNKNOWN = Reply(550, ("5.1.1 <gone@x.example>: user unknown",), "5.1.1")
BLOCK = Reply(554, ("5.7.1 Service unavailable; client host [192.0.2.1] blocked using zen.spamhaus.org",), "5.7.1")
LATER = Reply(451, ("4.7.0 try later",), "4.7.0")


def outcome(status: Status, *, t: float = T0, attempts: int = 1, bounce: str | None = None,
            category: str | None = None, job: str | None = "c1", site: str | None = "mx.b2b.example",
            ip: str | None = "192.0.2.1", sender: str = "news@sender.example", reply: Reply | None = None,
            rcpt: str = "a@b2b.example") -> Outcome:
    reply = reply or {Status.DELIVERED: OK, Status.DEFERRED: LATER}.get(status, UNKNOWN)
    return Outcome("m1", rcpt, status, reply, attempts, t - 5, t, site, "mx", "127.0.0.1", ip, None,
                   {"job": job} if job else None, category, bounce, sender, 100, None)


# ------------------------------------------------------------------------- KPIs


def test_each_outcome_counts_in_its_figures() -> None:
    k = Kpis()
    k.on_outcome(outcome(Status.DELIVERED))
    k.on_outcome(outcome(Status.BOUNCED, bounce="hard", category="invalid_recipient"))
    k.on_outcome(outcome(Status.BOUNCED, bounce="suspected_filter", category="content_filtered"))
    k.on_outcome(outcome(Status.DEFERRED, bounce="soft", category="rate_limited"))
    k.on_outcome(outcome(Status.DELIVERED, attempts=2))  # the deferred one, later: not sent twice
    k.on_outcome(outcome(Status.BOUNCED, bounce="soft", category="reputation_block", reply=BLOCK))
    k.on_outcome(outcome(Status.SUPPRESSED, attempts=0, bounce="none", category="suppressed"))  # never sent
    c = k.figures(k.campaigns["c1"])
    assert {f: c[f] for f in ("sent", "delivered", "hard", "suspected_filter", "soft", "deferred", "throttled",
                              "blocked")} == {"sent": 5, "delivered": 2, "hard": 1, "suspected_filter": 1, "soft": 1,
                                              "deferred": 1, "throttled": 1, "blocked": 1}
    # The hard-bounce rate leaves the suspected filter bounce out; deferrals are per attempt.
    assert c["hard_bounce_rate"] == 0.2 and c["suspected_filter_rate"] == 0.2 and c["deferral_rate"] == round(1 / 6, 5)
    # The same outcomes per (source, provider) and per sender domain.
    assert set(k.sources) == {("192.0.2.1", "mx.b2b.example")}  # no names given: the IP and set(k.senders) == {"sender.example"}
    assert k.figures(k.senders["sender.example"])["sent"] == 5


def test_providers_group_their_sites_and_sources_are_named() -> None:
    assert provider_of("gmail-smtp-in.l.google.com,alt1.gmail-smtp-in.l.google.com") == "gmail"
    assert provider_of("mta5.am0.yahoodns.net") == "yahoo"
    assert provider_of("mx.b2b.example") == "mx.b2b.example"
    k = Kpis(source_of={"192.0.2.1": "ip1", "192.0.2.2": "ip2"}.get)
    k.on_outcome(outcome(Status.DELIVERED, site="alt1.gmail-smtp-in.l.google.com"))
    k.on_outcome(outcome(Status.DELIVERED, site="gmail-smtp-in.l.google.com", ip="192.0.2.2"))
    assert set(k.sources) == {("ip1", "gmail"), ("ip2", "gmail")}


def test_sliding_windows_forget_the_old_and_memory_is_bounded() -> None:
    s = Series()
    for minute in range(0, 3 * 24 * 60, 7):  # three days, one outcome every 7 minutes
        s.add(T0 + minute * 60, (0,))
    now = T0 + 3 * 24 * 3600
    assert s.window("1h", now)["sent"] in (8, 9)  # 60 / 7
    assert s.window("24h", now)["sent"] in range(204, 208)  # 1440 / 7, ten-minute buckets
    assert s.window("total", now)["sent"] == len(range(0, 3 * 24 * 60, 7))
    assert len(s.buckets[0]) <= 60 and len(s.buckets[1]) <= 144
    # A late record inside the window lands in its own bucket; one older than the window only in the totals.
    s.add(now - 120, (1,))
    s.add(now - 7200, (1,))
    assert s.window("1h", now)["delivered"] == 1 and s.window("24h", now)["delivered"] == 2
    assert s.window("total", now)["delivered"] == 2


def test_idle_keys_are_forgotten_after_a_day() -> None:
    now = [T0]
    k = Kpis(clock=lambda: now[0])
    k.on_outcome(outcome(Status.DELIVERED, job="old"))
    now[0] += 86400 + 60
    k.on_outcome(outcome(Status.DELIVERED, job="new", t=now[0]))
    snap = k.snapshot()
    assert [c["campaign"] for c in snap["campaigns"]] == ["new"]
    assert snap["windows"] == ["1h", "24h", "total"] and snap["campaigns"][0]["1h"]["delivered"] == 1
    msgspec.json.encode(snap)  # JSON-able


def test_records_of_what_came_back() -> None:
    k = Kpis()
    for _ in range(3):
        k.on_outcome(outcome(Status.DELIVERED))
    assert k.note_record({"status": "complaint", "campaign": "c1", "verified": True, "feedback_type": "abuse",
                          "sender_domain": "sender.example", "time": T0})
    assert k.note_record({"status": "unsubscribe", "campaign": "c1", "recipient": "a@b2b.example"})
    assert k.note_record({"status": "oob_bounce", "campaign": "c1", "verified": True, "bounce_type": "hard"})
    # Forged (unverified) reports, a not-spam report and other kinds count nowhere.
    assert not k.note_record({"status": "complaint", "campaign": "c1", "verified": False})
    assert not k.note_record({"status": "complaint", "campaign": "c1", "feedback_type": "not-spam"})
    assert not k.note_record({"status": "auto_reply", "campaign": "c1"})
    c = k.figures(k.campaigns["c1"])
    assert (c["complaints"], c["unsubscribes"], c["hard"]) == (1, 1, 1)
    assert c["complaint_rate"] == round(1 / 3, 5) and k.figures(k.senders["sender.example"])["complaints"] == 1


# ------------------------------------------------------------------------- brakes


class FakeControl:
    guard_summary: Any = None

    def __init__(self) -> None:
        self.suspended: set[str] = set()

    def suspend(self, target: str) -> dict[str, Any]:
        self.suspended.add(target)
        return {"held": 7, "scheduled": 1}

    def resume(self, target: str) -> dict[str, Any]:
        self.suspended.discard(target)
        return {"target": target, "resumed": True, "released": 8}

    def is_suspended(self, key: str) -> bool:
        return key in self.suspended


class FakeDispatch:
    source_filter: Any = None

    def __init__(self) -> None:
        self.rerouted: list[tuple[str, list[bool]]] = []

    def reroute(self, source: str, sites: Any) -> int:
        self.rerouted.append((source, [sites("mx.b2b.example"), sites("gmail-smtp-in.l.google.com")]))
        return 0


def guard(clock: list[float] | None = None, sources: tuple[tuple[str, str | None], ...] = (), **cfg: Any,
          ) -> tuple[Guard, FakeControl, FakeDispatch, list[dict[str, Any]]]:
    control, dispatch = FakeControl(), FakeDispatch()
    now = clock or [T0]
    g = Guard(msgspec.convert(cfg, GuardConfig), control=cast(Any, control), dispatch=cast(Any, dispatch),
              throttles=Throttles(), sources=sources, clock=lambda: now[0])
    events: list[dict[str, Any]] = []
    g.on_event = events.append
    return g, control, dispatch, events


def campaign(g: Guard, n: int, hard_every: int = 0, suspected_every: int = 0, job: str = "c1") -> None:
    for i in range(n):
        if hard_every and i % hard_every == hard_every - 1:
            g.on_outcome(outcome(Status.BOUNCED, bounce="hard", category="invalid_recipient", job=job,
                                 rcpt=f"gone{i}@b2b.example"))
        elif suspected_every and i % suspected_every == suspected_every - 1:
            g.on_outcome(outcome(Status.BOUNCED, bounce="suspected_filter", category="content_filtered", job=job))
        else:
            g.on_outcome(outcome(Status.DELIVERED, job=job))


def test_the_hard_bounce_brake_pauses_the_campaign_with_figures_and_reasons() -> None:
    g, control, _, events = guard(min_attempts=100)
    campaign(g, 99, hard_every=10)  # 10%, but under min_attempts
    assert not events
    campaign(g, 1)
    [e] = events
    assert control.suspended == {"campaign:c1"} and g.paused == ["c1"]
    assert e["status"] == "campaign_paused" and e["campaign"] == "c1" and e["held"] == 8
    assert e["figures"]["sent"] == 100 and e["figures"]["hard"] == 9 and e["figures"]["hard_bounce_rate"] == 0.09
    assert "hard-bounce rate 9.0% over 5.0% after 100 attempts" in e["reason"]
    # Addresses are taken out of the reply, so one reason gathers every recipient it was given to.
    assert e["top_reasons"] == [{"reply": "550 5.1.1 <>: user unknown", "category": "invalid_recipient",
                                 "count": 9}]
    campaign(g, 50, hard_every=2)  # in flight when it was paused: no second event
    assert len(events) == 1 and g.summary()["paused"][0]["campaign"] == "c1"


def test_suspected_filter_bounces_do_not_count_as_hard() -> None:
    g, control, _, events = guard(min_attempts=100)
    campaign(g, 400, hard_every=50, suspected_every=8)  # 2% hard, ~12% suspected filter
    assert not events and not control.suspended
    fig = g.kpis.figures(g.kpis.campaigns["c1"])
    assert fig["hard_bounce_rate"] == 0.02 and fig["suspected_filter"] > 40


def test_a_resumed_campaign_is_paused_again_only_on_new_figures() -> None:
    g, control, _, events = guard(min_attempts=100)
    campaign(g, 100, hard_every=10)
    assert len(events) == 1
    control.resume("campaign:c1")  # fastmta queue resume campaign:c1
    campaign(g, 99, hard_every=10)  # bad again, but not yet another min_attempts since the resume
    assert len(events) == 1 and not control.suspended
    campaign(g, 1)
    assert len(events) == 2 and events[1]["resumes"] == 1 and control.suspended == {"campaign:c1"}
    control.resume("campaign:c1")
    campaign(g, 300, hard_every=50)  # clean since the resume: goes on
    assert len(events) == 2 and not control.suspended


def test_override_exempts_a_campaign() -> None:
    g, control, _, events = guard(min_attempts=100)
    campaign(g, 100, hard_every=10)
    assert g.override("c1")["released"] == 8 and not control.suspended
    campaign(g, 500, hard_every=5)
    assert len(events) == 1 and g.summary()["exempt"] == ["c1"]


def test_the_complaint_brake() -> None:
    g, _, _, events = guard(min_attempts=100)
    campaign(g, 1000)
    for i in range(3):  # 0.3% of 1000 deliveries is the line: three complaints are on it, not over
        g.note_record({"status": "complaint", "campaign": "c1", "verified": True, "recipient": f"u{i}@x.example"})
    assert not events
    g.note_record({"status": "complaint", "campaign": "c1", "verified": True, "recipient": "u9@x.example"})
    [e] = events
    assert "complaint rate 0.40% over 0.30%" in e["reason"] and e["figures"]["complaints"] == 4


def test_reputation_replies_at_two_providers_pause() -> None:
    g, _, _, events = guard()
    for site in ("mx.b2b.example", "gmail-smtp-in.l.google.com"):
        for _ in range(2):
            g.on_outcome(outcome(Status.BOUNCED, bounce="soft", category="reputation_block", reply=BLOCK, site=site))
    assert not events  # two each: under block_min_replies
    g.on_outcome(outcome(Status.BOUNCED, bounce="soft", category="reputation_block", reply=BLOCK,
                         site="mx.b2b.example"))
    assert not events  # one provider is not enough
    g.on_outcome(outcome(Status.BOUNCED, bounce="soft", category="reputation_block", reply=BLOCK,
                         site="alt1.gmail-smtp-in.l.google.com"))
    [e] = events
    assert e["blocked_providers"] == {"mx.b2b.example": 3, "gmail": 3}
    assert "at 2 providers: gmail, mx.b2b.example" in e["reason"]


def test_disabled_brakes_keep_the_kpis_only() -> None:
    g, control, dispatch, events = guard(enabled=False, min_attempts=100, sources=(("a", "192.0.2.1"),
                                                                                    ("b", "192.0.2.2")))
    campaign(g, 200, hard_every=2)
    assert not events and not control.suspended and dispatch.source_filter is None
    assert g.kpis.figures(g.kpis.campaigns["c1"])["hard"] == 100


def test_config_section() -> None:
    assert config_from_dict({}).guard == GuardConfig()
    assert config_from_dict({"guard": {"min_attempts": 50}}).guard.min_attempts == 50
    with pytest.raises(ConfigError, match="guard.max_hard_bounce"):
        config_from_dict({"guard": {"max_hard_bounce": 0.1}})


# ------------------------------------------------------------------------- source rotation


def test_a_source_drawing_reputation_blocks_leaves_the_rotation_and_is_probed() -> None:
    now = [T0]
    sources = (("ip1", "192.0.2.1"), ("ip2", "192.0.2.2"))
    g, _, dispatch, events = guard(now, sources, probe_after=3600.0)
    assert dispatch.source_filter == g.source_allowed
    gmail = "gmail-smtp-in.l.google.com"
    for _ in range(20):
        g.on_outcome(outcome(Status.DELIVERED, site=gmail))
    for _ in range(4):
        g.on_outcome(outcome(Status.BOUNCED, bounce="soft", category="reputation_block", reply=BLOCK, site=gmail))
    assert not events  # 4 blocks: under source_min_blocks
    g.on_outcome(outcome(Status.BOUNCED, bounce="soft", category="reputation_block", reply=BLOCK, site=gmail))
    [e] = events
    assert (e["status"], e["source"], e["provider"]) == ("source_out_of_rotation", "ip1", "gmail")
    assert dispatch.rerouted == [("ip1", [False, True])]  # its gmail queues only
    # Out for gmail (every gmail site), still in for the rest; ip2 is untouched.
    assert not g.source_allowed("ip1", "alt2.gmail-smtp-in.l.google.com")
    assert g.source_allowed("ip1", "mx.b2b.example") and g.source_allowed("ip2", gmail)
    # The probe: one transaction after an hour, then nothing until its verdict.
    now[0] += 3600
    assert g.source_allowed("ip1", gmail) and not g.source_allowed("ip1", gmail)
    g.on_outcome(outcome(Status.BOUNCED, bounce="soft", category="reputation_block", reply=BLOCK, site=gmail,
                         t=now[0]))
    assert not g.source_allowed("ip1", gmail)
    now[0] += 3600
    assert not g.source_allowed("ip1", gmail)  # refused again: twice as long now
    now[0] += 3600
    assert g.source_allowed("ip1", gmail)
    g.on_outcome(outcome(Status.DELIVERED, site=gmail, t=now[0]))
    assert events[-1]["status"] == "source_restored" and g.source_allowed("ip1", gmail)
    assert g.summary()["sources_out"] == []


def test_the_last_source_at_a_provider_stays() -> None:
    g, _, _, events = guard(sources=(("ip1", "192.0.2.1"), ("ip2", "192.0.2.2")))
    for ip in ("192.0.2.1", "192.0.2.2"):
        for _ in range(6):
            g.on_outcome(outcome(Status.BOUNCED, bounce="soft", category="reputation_block", reply=BLOCK, ip=ip))
    assert [e["source"] for e in events] == ["ip1"]  # ip2 is all that is left at mx.b2b.example
    assert g.source_allowed("ip2", "mx.b2b.example")


def test_the_dispatcher_steers_around_a_source_out_of_rotation() -> None:
    cfg = config_from_dict({"sources": [{"name": "ip1"}, {"name": "ip2", "weight": 3}, {"name": "ip3"}]})
    d = Dispatcher(cfg, router=None, throttles=Throttles(), classifier=cast(Any, None), rng=random.Random(1),
                   spawn=lambda c: None, closing=lambda: False, on_unroutable=lambda *a: None,
                   on_result=lambda *a: None, on_expired=lambda *a: None)
    ip1, pool = d._sources[0], d._sources  # one pool, the default: every source
    assert d._steer(ip1, "mx.example", pool) is ip1  # no filter
    d.source_filter = lambda name, site: name != "ip1" or site != "mx.example"
    picked = {d._steer(ip1, "mx.example", pool).name for _ in range(50)}
    assert picked == {"ip2", "ip3"} and d._steer(ip1, "other.example", pool) is ip1
    assert d._steer(ip1, "mx.example", pool[:1] + pool[2:]).name == "ip3"  # only within its pool
    d.source_filter = lambda name, site: False  # nobody left: the source it was
    assert d._steer(ip1, "mx.example", pool) is ip1


def test_hard_bounces_reach_the_warmup_of_their_source() -> None:
    from fastmta.delivery.warmup import WarmupConfig

    control, dispatch = FakeControl(), FakeDispatch()
    throttles = Throttles(sources={"ip1": SourceLimits(warmup=WarmupConfig(schedule=[50, 100]))})
    g = Guard(GuardConfig(), control=cast(Any, control), dispatch=cast(Any, dispatch), throttles=throttles,
              sources=[("ip1", "192.0.2.1")], clock=lambda: T0)
    g.on_outcome(outcome(Status.BOUNCED, bounce="hard", category="invalid_recipient"))
    g.on_outcome(outcome(Status.BOUNCED, bounce="suspected_filter", category="content_filtered"))
    w = throttles.get("ip1", "mx.b2b.example", 0.0).warmup
    assert w is not None and w.hard == 1
