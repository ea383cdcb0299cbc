"""The reputation guard end to end (issue 16): campaign brakes, warm-up on clean KPIs, sunset.

Acceptance 1: a campaign with 8% truly unknown addresses, sent to a sink
playing a B2B spam appliance (it also refuses ~11% of the *existing*
mailboxes with "user unknown" after the content: suspected filter bounces),
is paused by the hard-bounce brake before 1,000 attempts; the filter's share
does not count as hard; resuming delivers the rest; no recipient is lost or
expired while paused (every recipient has exactly one final accounting
record). Shown with the real ``fastmta send`` process (pause, exit 1, run
again with ``--resume-campaign``), and inside one running engine (pause,
``engine.control.resume`` as ``fastmta queue resume`` does, re-arming,
override) with a queue lifetime shorter than the pause.

Acceptance 3: on a fake clock, a source's warm-up advances on clean days and
holds on a day with 4% hard bounces (fed by the guard from the outcomes);
``fastmta queue summary`` shows the step and why it holds.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import msgspec

from fastmta.cli.sinkproc import embedded_sink
from fastmta.delivery.accounting import AccountingLog
from fastmta.delivery.config import config_from_dict
from fastmta.delivery.engine import Engine
from fastmta.delivery.limits import SourceLimits, ThrottleConfig
from fastmta.delivery.throttle import Throttles
from fastmta.delivery.warmup import WarmupConfig, WarmupState
from fastmta.delivery.warmup_store import WARMUP_FILE
from fastmta.errors import Scope
from fastmta.feedback.classification import BounceType, Category, Classification, Outcome
from fastmta.intake.campaign import Campaign
from fastmta.intake.items import Reject, SpoolItem, Sunset
from fastmta.queue.records import Outcome as DeliveryOutcome
from fastmta.queue.records import Status
from fastmta.queue.spool import Spool
from fastmta.sink import SinkServer
from fastmta.sink.config import FaultConfig, ListenerConfig, SinkConfig
from fastmta.smtp.reply import Reply
from test_send import EXAMPLE, fastmta

Run = Callable[[Coroutine[Any, Any, Any]], Any]
APPLIANCE_HOST = "mx0a-00012301.pphosted.com"
FINAL = {"delivered", "bounced", "expired", "suppressed", "sunset", "deleted", "lost"}


def b2b_list(n: int) -> list[str]:
    """*n* recipients over ten B2B domains; 8% (2 in 25) truly unknown, spread through the list and over the
    domains as in a real one (bunched at one domain, they would rightly look like that domain's filter)."""
    return [f"{'gone' if i % 25 in (7, 19) else 'user'}-{i}@corp{i // 25 % 10}.example" for i in range(n)]


def write_campaign(spool: Path, rows: list[str], campaign: str = "", header: str = "email") -> None:
    """The example campaign with *rows* (columns *header*; the template's names are added to each row)."""
    spool.mkdir()
    for name in ("welcome.txt", "welcome.html", "dkim-test-ed25519.key.pem"):
        shutil.copy(EXAMPLE / name, spool / name)
    toml = (EXAMPLE / "welcome.toml").read_text().replace('recipients = "recipients.csv"', 'recipients = "r.csv"')
    toml = toml.replace('address_field = "email"\n', 'address_field = "email"\n' + campaign)
    (spool / "welcome.toml").write_text(toml)
    (spool / "r.csv").write_text(header + ",first_name,last_name,id,signup\n"
                                 + "".join(r + ",Ann,Lee,u1,2026-01-05\n" for r in rows))


def finals(path: Path) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r.get("recipient") and r["status"] in FINAL:
            out.setdefault(r["recipient"], []).append(r)
    return out


# ------------------------------------------------------------- acceptance 1: fastmta send


def test_send_pauses_a_campaign_with_8_percent_unknown_and_resume_delivers_the_rest(tmp_path: Path) -> None:
    recipients = b2b_list(1000)
    spool, queue, acct = tmp_path / "spool", tmp_path / "q", tmp_path / "acct.jsonl"
    write_campaign(spool, recipients)
    sink_args = ["--profile", "appliance", "--hostname", APPLIANCE_HOST, "--unknown-recipient", "gone-*@*",
                 "--unknown-at", "rcpt", "--filtered-share", "0.11"]
    with embedded_sink(sink_args) as (host, port):
        cfg = tmp_path / "fastmta.toml"
        cfg.write_text(f'[routing.static]\n"*" = ["{host}:{port}"]\n[smtp]\ntls = "never"\n'
                       '[sites."*".adaptive]\nenabled = false\n')
        common = ["--config", str(cfg), "--accounting", str(acct), "--queue-dir", str(queue), "--quiet"]
        first = fastmta("send", str(spool), *common, "--summary-json", str(tmp_path / "s1.json"))
        s1 = json.loads((tmp_path / "s1.json").read_text())
        done1 = finals(acct)
        second = fastmta("send", str(spool), *common, "--summary-json", str(tmp_path / "s2.json"),
                         "--resume-campaign", "welcome-2026-11")
    # Run 1: paused by the brake before 1,000 attempts, the rest kept in the queue; exit 1, named.
    assert first.returncode == 1, first.stderr[-2000:]
    assert "campaign welcome-2026-11 is paused by the reputation guard" in first.stderr
    [paused] = [e for e in s1["guard"]["events"] if e["status"] == "campaign_paused"]
    fig = paused["figures"]
    assert paused["campaign"] == "welcome-2026-11" and 500 <= fig["sent"] < 1000
    assert fig["hard_bounce_rate"] > 0.05 and "hard-bounce rate" in paused["reason"]
    # The appliance's refusals of existing mailboxes are counted apart, not as hard.
    assert fig["suspected_filter"] > 0 and fig["hard"] <= 0.1 * fig["sent"]
    assert paused["top_reasons"][0]["category"] == "invalid_recipient"
    assert s1["paused"] == [{"campaign": "welcome-2026-11", "held": s1["paused"][0]["held"]}]
    assert s1["paused"][0]["held"] > 0 and s1["unfinished"] > 0 and s1["expired"] == 0
    assert len(done1) < 1000 and all(len(v) == 1 for v in done1.values())
    # The pause is on record in the accounting file too.
    assert any(json.loads(line)["status"] == "campaign_paused" for line in acct.read_text().splitlines())
    # Run 2 (--resume-campaign): the rest goes; every recipient has exactly one final record, none expired.
    assert second.returncode == 0, second.stderr[-2000:]
    s2 = json.loads((tmp_path / "s2.json").read_text())
    assert s2["paused"] == [] and s2["unfinished"] == 0
    done = finals(acct)
    assert sorted(done) == sorted(recipients) and all(len(v) == 1 for v in done.values())
    kinds = Counter((v[0]["status"], v[0]["bounce_type"]) for v in done.values())
    assert kinds[("bounced", "hard")] == 80 and not any(s == "expired" for s, _ in kinds)
    assert kinds[("delivered", None)] + kinds[("bounced", "suspected_filter")] == 920
    assert all(v[0]["bounce_type"] == "hard" for a, v in done.items() if a.startswith("gone-"))
    print(f"\nguard: paused after {fig['sent']} attempts (hard {fig['hard_bounce_rate']:.1%}, suspected filter "
          f"{fig['suspected_filter']}), {s1['paused'][0]['held']} held; resumed: {dict(kinds)}")


# ------------------------------------------------------------- acceptance 1: one running engine


def engine_config(host: str, port: int, **guard: Any) -> Any:
    return config_from_dict({
        "routing": {"static": {"*": [f"{host}:{port}"]}},
        "queue": {"retry_initial": 0.2, "retry_jitter": 0.0, "retry_max": 0.5, "max_lifetime": 3.0},
        "smtp": {"tls": "never"},
        "sites": {"*": {"adaptive": {"enabled": False}, "max_connections": 4}},
        "guard": guard,
    })


def appliance_sink(filtered: float = 0.11) -> SinkConfig:
    faults = FaultConfig(unknown_recipients=("gone-*@*",), unknown_at="rcpt", filtered_share=filtered)
    return SinkConfig(listeners=(ListenerConfig(profile="appliance", faults=faults, hostname=APPLIANCE_HOST),), seed=7)


async def submit_all(engine: Engine, recipients: list[str], job: str) -> list[str]:
    return [await engine.submit(b"Subject: offer\r\n\r\nhello\r\n", "news@sender.example", [r], meta={"job": job})
            for r in recipients]


async def until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


def test_engine_pause_resume_rearm_override_nothing_expires(run_uvloop: Run, tmp_path: Path) -> None:
    """400 recipients, 8% unknown, min_attempts 100, a queue lifetime of 3 s: paused, held 3.5 s (longer than
    the lifetime), resumed (counted afresh: paused again after another 100 bad attempts), overridden."""
    recipients = b2b_list(400)
    acct_path = tmp_path / "acct.jsonl"

    async def main() -> tuple[list[dict[str, Any]], dict[str, int]]:
        async with SinkServer(appliance_sink()) as sink:
            (host, port), = sink.addresses
            accounting = AccountingLog(acct_path)
            async with Engine(engine_config(host, port, min_attempts=100), accounting=accounting) as engine:
                events: list[dict[str, Any]] = []
                engine.guard.on_event = events.append
                await submit_all(engine, recipients, "spring")
                await until(lambda: bool(events))
                await until(lambda: engine.unfinished == engine.control.held_waiting() + engine.filters.held)
                assert engine.guard.paused == ["spring"] and engine.control.is_suspended("campaign:spring")
                summary = engine.control.summary()[-1]
                assert summary["guard"]["paused"][0]["campaign"] == "spring" and summary["held"] > 0
                await asyncio.sleep(3.5)  # longer than the queue lifetime: held mail must not expire
                assert engine.control.resume("campaign:spring")["released"] > 0  # fastmta queue resume
                await until(lambda: len(events) == 2 or not engine.unfinished)
                if len(events) == 2:  # still bad after the resume: paused again on the new figures only
                    assert events[1]["resumes"] == 1 and events[1]["figures"]["sent"] >= 100
                    engine.guard.override("spring")
                assert await engine.drain(30)
                counts = dict(engine.counts)
            accounting.close()
            return events, counts

    events, counts = run_uvloop(main())
    first = events[0]
    assert first["figures"]["sent"] < 400 and first["figures"]["hard_bounce_rate"] > 0.05
    assert counts.get("expired", 0) == 0
    done = finals(acct_path)
    assert sorted(done) == sorted(recipients) and all(len(v) == 1 for v in done.values())
    assert {v[0]["status"] for v in done.values()} <= {"delivered", "bounced"}
    assert sum(v[0]["bounce_type"] == "hard" for v in done.values()) == 32
    print(f"\nengine: paused after {first['figures']['sent']} attempts; {len(events)} pause(s) in all, "
          f"{sum(v[0]['status'] == 'delivered' for v in done.values())} delivered")


def test_the_filter_share_alone_does_not_trip_the_brake(run_uvloop: Run) -> None:
    """11% of existing mailboxes refused by the appliance after the content and 2% truly unknown: not paused."""
    recipients = [f"{'gone' if i % 50 == 9 else 'user'}-{i}@corp{i // 50 % 10}.example" for i in range(600)]

    async def main() -> tuple[list[dict[str, Any]], dict[str, Any]]:
        async with SinkServer(appliance_sink()) as sink:
            (host, port), = sink.addresses
            async with Engine(engine_config(host, port, min_attempts=100)) as engine:
                events: list[dict[str, Any]] = []
                engine.guard.on_event = events.append
                await submit_all(engine, recipients, "autumn")
                assert await engine.drain(60)
                return events, engine.guard.summary()

    events, summary = run_uvloop(main())
    assert events == [] and summary["paused"] == []
    [c] = summary["kpis"]["campaigns"]
    total = c["total"]
    assert total["sent"] == 600 and total["hard"] == 12 and total["suspected_filter"] >= 40
    assert total["hard_bounce_rate"] == 0.02 and total["suspected_filter_rate"] > 0.05


# ------------------------------------------------------------- acceptance 3: warm-up on clean KPIs

DAY = 86400.0
DELIVERED = None
PERMANENT = Classification(Outcome.PERMANENT, Category.INVALID_RECIPIENT, BounceType.HARD, Scope.RECIPIENT)


def test_warmup_advances_on_clean_days_and_holds_on_a_day_with_4_percent_bounces() -> None:
    """A source warming up at one site, on a fake clock: the throttle counts the sends and replies, the
    guard (an engine listener) the hard bounces; each day is judged when the next one starts."""
    from fastmta.delivery.brakes import Guard
    from test_kpi import FakeControl, FakeDispatch

    clock = [0.0]
    throttles = Throttles(sources={"ip1": SourceLimits(warmup=WarmupConfig(schedule=[50, 100, 200, 500]))},
                          default=msgspec.convert({"adaptive": {"enabled": False}}, ThrottleConfig))
    guard = Guard(config_from_dict({}).guard, control=FakeControl(), dispatch=FakeDispatch(),  # type: ignore[arg-type]
                  throttles=throttles, sources=[("ip1", "192.0.2.1")], clock=lambda: clock[0])
    site = "mx.example"
    th = throttles.get("ip1", site, 0.0)
    assert th.warmup is not None
    unknown = Reply(550, ("5.1.1 user unknown",), "5.1.1")

    def day(n: int, hard: int) -> None:
        t = n * DAY + 60
        clock[0] = t
        th.warmup_check(t)  # the day starts: yesterday is judged
        quota = th.warmup.quota if th.warmup else None
        assert quota is not None
        for i in range(quota):
            assert th.message_wait(t) == 0.0
            ticket = th.message_started(t)
            bad = i < hard
            th.message_result(ticket, PERMANENT if bad else DELIVERED, t)
            guard.on_outcome(DeliveryOutcome(
                f"m{n}-{i}", f"u{i}@example", Status.BOUNCED if bad else Status.DELIVERED, unknown if bad else
                Reply(250, ("ok",), "2.0.0"), 1, t, t, site, "mx", "127.0.0.1", "192.0.2.1",
                category="invalid_recipient" if bad else None, bounce="hard" if bad else None))
        assert th.message_wait(t) > 0  # the day's quota is used up

    day(0, hard=0)
    day(1, hard=0)
    th.warmup_check(2 * DAY + 60)
    assert th.warmup.step == 2 and "advanced to 200/day" in th.warmup.verdict
    day(2, hard=8)  # 8 of 200: 4% hard bounces (under the 5% of all bounces, over the 2% of hard ones)
    th.warmup_check(3 * DAY + 60)
    assert th.warmup.step == 2 and th.warmup.quota == 200
    assert "warm-up held" in th.warmup.verdict and "hard bounces over 2.0%" in th.warmup.verdict
    assert "hard 4.0%" in th.warmup.verdict
    day(3, hard=0)  # a clean day after the bad one advances
    th.warmup_check(4 * DAY + 60)
    assert th.warmup.step == 3 and th.warmup.quota == 500
    kinds = [e.reason.split(":")[0] for e in th.events if e.kind == "warmup"]
    assert kinds == ["warm-up advanced to 100/day", "warm-up advanced to 200/day", "warm-up held",
                     "warm-up advanced to 500/day"]


def test_warmup_steps_back_on_a_bad_day_when_configured() -> None:
    from fastmta.delivery.warmup import Warmup

    w = Warmup(msgspec.convert({"schedule": [50, 100, 200], "step_back": True}, WarmupConfig), 0.0)
    for n, hard in ((0, 0), (1, 0), (2, 12)):
        t = n * DAY + 10
        w.check(t)
        w.take(t, w.quota or 0)
        w.record(t, delivered=(w.quota or 0) - hard, bounced=hard, hard=hard)
    w.check(3 * DAY)
    assert w.quota == 100 and "stepped back to 100/day" in w.verdict and "bounces over 5.0%" in w.verdict
    w.take(3 * DAY + 10, 100)
    w.record(3 * DAY + 10, delivered=100, complaints=1)  # 1% complaints: over 0.1%
    w.check(4 * DAY)
    assert w.quota == 50 and "complaints over 0.10%" in w.verdict


def test_queue_summary_shows_the_warmup_step_and_why_it_holds(run_uvloop: Run, tmp_path: Path) -> None:
    queue = tmp_path / "q"

    async def main() -> dict[str, Any]:
        async with SinkServer(SinkConfig(listeners=(ListenerConfig(),))) as sink:
            (host, port), = sink.addresses
            cfg = config_from_dict({
                "routing": {"static": {"*": [f"{host}:{port}"]}}, "smtp": {"tls": "never"},
                "sources": [{"name": "ip1", "address": "127.0.0.1", "warmup": {"schedule": [50, 100]}}],
                "sites": {"*": {"adaptive": {"enabled": False}}},
            })
            site = f"{host}:{port}"
            spool = await asyncio.to_thread(Spool, queue)
            held = "warm-up held: sent 50/50, deferred 0.0%, bounced 4.0%, hard 4.0%, complaints 0.00%: hard bounces over 2.0%"
            today = int(__import__("time").time() // DAY)
            state = [{"source": "ip1", "site": site, "state": msgspec.to_builtins(
                WarmupState(step=0, day=today, verdict=held))}]
            (queue / WARMUP_FILE).write_bytes(msgspec.json.encode(state))
            async with Engine(cfg, spool=spool) as engine:
                await engine.submit(b"Subject: x\r\n\r\nhi\r\n", "a@sender.example", ["b@x.example"])
                assert await engine.drain(10)
                rows = engine.control.summary()
            await spool.close()
            [row] = [r for r in rows if r["kind"] == "site"]
            return dict(row["throttle"]["warmup"])

    warm = run_uvloop(main())
    assert warm["step"] == 0 and warm["quota"] == 50 and warm["steps"] == 2 and warm["today"]["sent"] == 1
    assert warm["verdict"].startswith("warm-up held") and "hard bounces over 2.0%" in warm["verdict"]


# ------------------------------------------------------------- a campaign's own lifetime


def test_a_campaign_s_max_lifetime_expires_its_deferred_mail_sooner(tmp_path: Path) -> None:
    """[campaign] max_lifetime: an offer that ends tonight is not retried for five days."""
    write_campaign(tmp_path / "s", ["a@x.example", "b@y.example"], "max_lifetime = 2\n")
    assert [i.meta for i in Campaign.load(tmp_path / "s" / "welcome.toml").items() if isinstance(i, SpoolItem)] == [
        {"job": "welcome-2026-11", "max_lifetime": 2.0}] * 2
    acct = tmp_path / "a.jsonl"
    with embedded_sink(["--no-starttls", "--fault", "rcpt:1.0:451 4.3.0 try later"]) as (host, port):
        started = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "fastmta", "send", str(tmp_path / "s"), "--relay", f"{host}:{port}",
                              "--quiet", "--queue-dir", str(tmp_path / "q"), "--accounting", str(acct)],
                             capture_output=True, text=True, timeout=120)
        took = time.monotonic() - started
    assert out.returncode == 0, out.stderr[-2000:]
    final = finals(acct)
    assert {r: [x["status"] for x in v] for r, v in final.items()} == {"a@x.example": ["expired"], "b@y.example": ["expired"]}
    assert took < 30, took  # not the queue's five days, nor its first retry at 60 s


# ------------------------------------------------------------- sunset


def test_sunset_skips_inactive_recipients_or_sends_them_every_kth_campaign(tmp_path: Path) -> None:
    rows = ["a@x.example,2026-01-10", "b@x.example,2025-01-01", "c@x.example,", "d@x.example,someday",
            "e@x.example,2025-12-20T08:00:00+00:00"]
    write_campaign(tmp_path / "s", rows, 'sunset_days = 30\n', header="email,last_engaged")
    c = Campaign.load(tmp_path / "s" / "welcome.toml")
    c.today = datetime.date(2026, 1, 20)
    items = list(c.items())
    sent = [i.recipients[0] for i in items if isinstance(i, SpoolItem)]
    sunset = [i for i in items if isinstance(i, Sunset)]
    rejected = [i for i in items if isinstance(i, Reject) and not isinstance(i, Sunset)]
    assert sent == ["a@x.example", "c@x.example"]  # engaged lately, or nothing known
    assert [(s.recipient, s.last_engaged) for s in sunset] == [("b@x.example", "2025-01-01"),
                                                                ("e@x.example", "2025-12-20")]
    assert "inactive since 2025-01-01 (over 30 days)" in sunset[0].reason
    assert [r.line for r in rejected] == [5] and "not an ISO date" in rejected[0].reason
    record = sunset[0].as_record(1.0)
    assert record["status"] == "sunset" and record["campaign"] == "welcome-2026-11"
    # sunset_every: each inactive recipient is sent in about one campaign in k, the same on every run.
    write_campaign(tmp_path / "k", [f"u{i}@x.example,2024-01-01" for i in range(300)],
                   'sunset_days = 30\nsunset_every = 3\n', header="email,last_engaged")
    k = Campaign.load(tmp_path / "k" / "welcome.toml")
    picked = [i.recipients[0] for i in k.items() if isinstance(i, SpoolItem)]
    assert 60 <= len(picked) <= 140 and picked == [i.recipients[0] for i in k.items() if isinstance(i, SpoolItem)]


def test_send_records_sunset_recipients(tmp_path: Path) -> None:
    spool, acct = tmp_path / "spool", tmp_path / "acct.jsonl"
    old = (datetime.date.today() - datetime.timedelta(days=400)).isoformat()
    write_campaign(spool, [f"a@x.example,{datetime.date.today().isoformat()}", f"b@x.example,{old}"],
                   'sunset_days = 180\nengagement_field = "seen"\n', header="email,seen")
    out = fastmta("send", str(spool), "--sink", "--accounting", str(acct), "--summary-json",
                  str(tmp_path / "s.json"), "--quiet")
    assert out.returncode == 0, out.stderr[-2000:]
    s = json.loads((tmp_path / "s.json").read_text())
    assert (s["delivered"], s["sunset"], s["rejected"]) == (1, 1, [])
    done = finals(acct)
    assert done["b@x.example"][0]["status"] == "sunset" and done["a@x.example"][0]["status"] == "delivered"
    [c] = s["guard"]["campaigns"]
    assert (c["campaign"], c["sent"], c["delivered"]) == ("welcome-2026-11", 1, 1)
