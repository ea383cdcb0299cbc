"""Queue control (engine.control) against real sinks on loopback.

Everything sent is counted where it arrives (the sink); every record where it
is written (the accounting file, the spool's journal after a restart). Each
wait is bounded, so a regression fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from fastmta.delivery.accounting import AccountingLog, csv_row
from fastmta.delivery.config import Config, config_from_dict
from fastmta.delivery.control import HISTORY_KEPT, SUSPEND_FILE, parse_target
from fastmta.delivery.engine import Engine
from fastmta.errors import InputError
from fastmta.queue.journal_records import DEFERRED_CODE, STATUS_CODE
from fastmta.queue.records import Outcome, Status
from fastmta.queue.spool import Spool
from fastmta.sink import SinkServer
from fastmta.sink.config import FaultConfig, ListenerConfig, PhaseFault, SinkConfig
from fastmta.smtp.reply import Reply

Run = Callable[[Coroutine[Any, Any, Any]], Any]

BODY = b"From: a@sender.test\r\nTo: x@y.test\r\nSubject: queue control\r\n\r\nhello\r\n"
SENDER = "sender@sender.test"
DEFER = PhaseFault("rcpt", 1.0, 451, "4.3.0 Temporary failure")


async def start_sink(faults: FaultConfig | None = None) -> tuple[SinkServer, str]:
    sink = SinkServer(SinkConfig(listeners=(ListenerConfig(host="127.0.0.1", port=0, faults=faults),),
                                 starttls=False))
    host, port = (await sink.start())[0]
    return sink, f"{host}:{port}"  # also the site's name: a static route names its site by its hosts


def config(routes: dict[str, str], *, adaptive: bool = False, site: dict[str, Any] | None = None,
           **queue: Any) -> Config:
    return config_from_dict({
        "routing": {"static": {domain: [address] for domain, address in routes.items()}},
        "queue": {"retry_initial": 30.0, "retry_max": 30.0, "retry_jitter": 0.0, "host_down_time": 30, **queue},
        "smtp": {"tls": "never", "timeouts": {"connect": 5, "greeting": 5, "ehlo": 5, "mail": 5, "rcpt": 5,
                                              "data": 5, "end_of_data": 5, "quit": 2}},
        "sites": {"*": {"adaptive": {"enabled": adaptive, "round_min": 0.05}, **(site or {})}},
    })


async def until(check: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.02)


def row(summary: list[dict[str, Any]], site: str) -> dict[str, Any]:
    return next(r for r in summary if r["kind"] == "site" and r["site"] == site)


async def submit_all(engine: Engine, rcpts: list[str], meta: dict[str, Any] | None = None) -> list[str]:
    return [await engine.submit(BODY, SENDER, [r], meta=meta) for r in rcpts]


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----------------------------------------------------------------- targets


def test_targets_parse() -> None:
    assert parse_target("site:MX.Example.com.") == ("site", "mx.example.com")
    assert parse_target("campaign:Spring-Sale") == ("campaign", "Spring-Sale")
    assert parse_target("127.0.0.1:2525") == ("any", "127.0.0.1:2525")  # a static route's site, not a prefix
    assert parse_target(" gmail.com ") == ("any", "gmail.com")
    assert parse_target("campaign:spring sale") == ("campaign", "spring sale")
    assert parse_target("localhost:2525") == ("any", "localhost:2525")  # host:port
    for bad in ("", "  ", "site:", "a b", "x\ny"):
        with pytest.raises(ValueError):
            parse_target(bad)
    # A kind fastmta does not know is refused: taken as a bare word it was a rule that held nothing.
    for unknown in ("source:ip1", "Pool:marketing", "vmta:x"):
        with pytest.raises(ValueError, match="kind"):
            parse_target(unknown)


def test_deleted_is_a_final_status_the_journal_and_the_csv_know() -> None:
    assert Status.DELETED.is_final and STATUS_CODE[Status.DELETED] == 5 != DEFERRED_CODE
    assert len(set(STATUS_CODE.values())) == len(STATUS_CODE)
    for status in (Status.DELETED, Status.LOST):
        o = Outcome("m1", "a@b.test", status, Reply.local(550, "5.0.0", "deleted by the operator"), 0, 1.0, 2.0)
        cells = csv_row(o)
        assert cells[0] == "b" and status.value in cells


# ----------------------------------------------------------------- inspection


def test_summary_show_and_why_at_a_deferring_site(run: Run) -> None:
    async def main() -> None:
        bad, bad_site = await start_sink(FaultConfig(replies=(DEFER,)))
        good, good_site = await start_sink()
        cfg = config({"defer.test": bad_site, "ok.test": good_site}, adaptive=True)
        try:
            async with Engine(cfg) as engine:
                ids = await submit_all(engine, [f"u{i}@defer.test" for i in range(5)])
                await submit_all(engine, [f"v{i}@ok.test" for i in range(3)])
                await until(lambda: engine.counts["deferred"] >= 5 and engine.counts["delivered"] >= 3)
                rows = engine.control.summary()
                r = row(rows, bad_site)
                assert (r["scheduled"], r["ready"], r["in_flight"], r["held"]) == (5, 0, 0, 0)
                assert r["source"] == "default" and not r["suspended"]
                assert r["oldest_age"] is not None and 0 <= r["oldest_age"] < 30
                # What the site said, as PowerMTA's queue view shows its last error: the commonest reply.
                assert r["top_reply"]["recipients"] == 5 and "4.3.0 Temporary failure" in r["top_reply"]["reply"]
                assert row(rows, good_site)["top_reply"] is None
                t = r["throttle"]
                assert t["window"] >= 1 and t["rate"] is not None
                # Why the throttle is where it is: the cut names the reply that caused it.
                assert t["last_throttle"] is not None and "4.3.0 Temporary failure" in t["last_throttle"]["reason"]
                assert row(rows, good_site)["scheduled"] == 0
                total = rows[-1]
                assert total["kind"] == "total" and total["scheduled"] == 5 and total["unfinished"] == 5
                assert total["other"] == 0 and total["suspensions"] == []
                json.dumps(rows)  # plain data all the way down

                shown = engine.control.show(ids[0])
                assert shown["sender"] == SENDER and shown["size"] == len(BODY) and shown["final"] is False
                (rc,) = shown["recipients"]
                assert rc["status"] == "deferred" and rc["state"] == "scheduled" and rc["attempts"] == 1
                assert rc["last_reply"]["code"] == 451
                assert 20 < rc["next_attempt"] - time.time() <= 30
                with pytest.raises(KeyError):
                    engine.control.show("no-such-id")

                why = engine.control.why("U0@defer.test")  # any case
                (w,) = why["recipients"]
                assert w["message_id"] == ids[0] and w["site"] == bad_site
                (h,) = w["history"]
                assert h["reply"]["code"] == 451 and h["phase"] == "rcpt" and h["category"] == "remote_system"
                assert h["site"] == bad_site and h["outcome"] == "transient"
                (thr,) = w["throttles"]
                assert thr["source"] == "default" and thr["window"] == t["window"]
                assert w["reason"].startswith("scheduled: next attempt") and "4.3.0" in w["reason"]
                assert engine.control.why(ids[1])["recipients"][0]["address"] == "u1@defer.test"
                with pytest.raises(KeyError):
                    engine.control.why("nobody@defer.test")
                json.dumps(why)
                await engine.close(timeout=2)
        finally:
            await bad.close()
            await good.close()

    run(main())


def test_history_keeps_only_the_last_failures(run: Run) -> None:
    async def main() -> None:
        bad, site = await start_sink(FaultConfig(replies=(DEFER,)))
        try:
            async with Engine(config({"d.test": site}, retry_initial=0.02, retry_max=0.02)) as engine:
                await submit_all(engine, ["x@d.test"])
                await until(lambda: engine.counts["deferred"] >= HISTORY_KEPT + 3)
                (w,) = engine.control.why("x@d.test")["recipients"]
                assert w["attempts"] >= HISTORY_KEPT + 3
                assert len(w["history"]) == HISTORY_KEPT
                times = [h["time"] for h in w["history"]]
                assert times == sorted(times)
                await engine.close(timeout=2)
        finally:
            await bad.close()

    run(main())


# ----------------------------------------------------------------- suspend / resume


def test_suspended_site_holds_its_mail_past_the_lifetime_then_delivers_it(run: Run) -> None:
    async def main() -> None:
        sink, site = await start_sink()
        other, other_site = await start_sink()
        cfg = config({"held.test": site, "free.test": other_site}, max_lifetime=1.0)
        try:
            async with Engine(cfg) as engine:
                out = engine.control.suspend(f"site:{site}")
                assert out["suspended"] and out["held"] == 0
                await submit_all(engine, [f"h{i}@held.test" for i in range(4)])
                await submit_all(engine, ["f@free.test"])
                await until(lambda: other.stats.messages == 1)
                await asyncio.sleep(1.5)  # past the queue lifetime of 1 s
                assert sink.stats.messages == 0 and engine.unfinished == 4
                r = row(engine.control.summary(), site)
                assert r["held"] == 4 and r["suspended"] and r["suspended_by"] == [f"site:{site}"]
                w = engine.control.why("h0@held.test")["recipients"][0]
                assert w["state"] == "held" and w["held_by"] == f"site:{site}" and "held by the operator" in w["reason"]
                assert engine.control.suspend(site)["held"] == 0  # a bare word is a rule of its own
                assert engine.control.resume(f"site:{site}")["released"] == 4
                assert engine.control.resume(f"site:{site}")["resumed"] is False
                await asyncio.sleep(0.2)
                assert sink.stats.messages == 0  # the bare word's rule holds them now
                assert [(r["rule"], r["held"]) for r in engine.control.rules()] == [(site, 4)]
                assert engine.control.resume(site)["released"] == 4
                assert await engine.drain(10)
                assert engine.counts["delivered"] == 5 and engine.counts["expired"] == 0
                assert sink.stats.messages == 4
        finally:
            await sink.close()
            await other.close()

    run(main())


def test_suspend_sweeps_the_ready_queue_and_lets_in_flight_finish(run: Run) -> None:
    async def main() -> None:
        sink, site = await start_sink(FaultConfig(delays=(("eod", 0.2),)))
        cfg = config({"slow.test": site}, site={"max_connections": 1, "pipeline_depth": 1})
        try:
            async with Engine(cfg) as engine:
                await submit_all(engine, [f"s{i}@slow.test" for i in range(10)])
                await until(lambda: sink.stats.messages >= 1)
                out = engine.control.suspend("slow.test")  # a bare word: the domain
                assert out["held"] >= 5 and out["in_flight"] <= 1
                await until(lambda: engine.unfinished == engine.control.summary()[-1]["held"], what="in flight ends")
                sent = sink.stats.messages
                await asyncio.sleep(0.5)
                assert sink.stats.messages == sent < 10
                assert engine.control.resume("slow.test")["released"] == 10 - sent
                assert await engine.drain(20)
                assert sink.stats.messages == 10 and engine.counts["delivered"] == 10
        finally:
            await sink.close()

    run(main())


def test_suspended_campaign_is_held_and_others_flow(run: Run) -> None:
    async def main() -> None:
        sink, site = await start_sink()
        try:
            async with Engine(config({"c.test": site})) as engine:
                assert engine.control.suspend("campaign:spring")["target"] == "campaign:spring"
                await submit_all(engine, [f"a{i}@c.test" for i in range(3)], meta={"job": "spring"})
                await submit_all(engine, [f"b{i}@c.test" for i in range(2)], meta={"job": "autumn"})
                await until(lambda: sink.stats.messages == 2)
                await asyncio.sleep(0.3)
                assert sink.stats.messages == 2 and engine.unfinished == 3
                (w,) = engine.control.why("a1@c.test")["recipients"]
                assert w["suspended_by"] == ["campaign:spring"]
                assert engine.control.resume("campaign:spring")["released"] == 3
                assert await engine.drain(10)
                assert sink.stats.messages == 5
        finally:
            await sink.close()

    run(main())


def test_a_kept_rule_of_an_unknown_kind_can_still_be_resumed(run: Run, tmp_path: Path) -> None:
    """Before unknown kinds were refused, `suspend source:ip1` was kept as a bare word: it must not be stuck."""
    async def main() -> None:
        (tmp_path / "q").mkdir(mode=0o700)
        (tmp_path / "q" / SUSPEND_FILE).write_text('[{"kind": "any", "value": "source:ip1", "since": 1.0}]')
        spool = Spool(tmp_path / "q")
        async with Engine(config({}), spool=spool) as engine:
            assert [r["rule"] for r in engine.control.rules()] == ["source:ip1"]
            with pytest.raises(ValueError, match="unknown kind"):
                engine.control.suspend("source:ip2")
            assert engine.control.resume("source:ip1")["resumed"] is True
            assert engine.control.rules() == []
        await spool.close()

    run(main())


def test_suspension_persists_across_restarts_and_delete_is_final(run: Run, tmp_path: Path) -> None:
    async def main() -> None:
        sink, site = await start_sink()
        cfg = config({"p.test": site})
        acct = tmp_path / "acct.jsonl"
        try:
            spool = Spool(tmp_path / "q")
            async with Engine(cfg, spool=spool) as engine:
                engine.control.suspend("domain:p.test")
                ids = await submit_all(engine, ["a@p.test", "b@p.test"])
                await asyncio.sleep(0.2)
                assert engine.control.summary()[-1]["held"] == 2
            await spool.close()
            saved = json.loads((tmp_path / "q" / SUSPEND_FILE).read_text())
            assert [(r["kind"], r["value"]) for r in saved] == [("domain", "p.test")]

            spool = Spool(tmp_path / "q")
            with AccountingLog(acct) as log:
                async with Engine(cfg, spool=spool, accounting=log) as engine:
                    assert engine.recovered == 2
                    await asyncio.sleep(0.3)
                    assert sink.stats.messages == 0  # held again at once, not sent
                    assert [r["rule"] for r in engine.control.rules()] == ["domain:p.test"]
                    assert engine.control.summary()[-1]["held"] == 2
                    out = engine.control.delete(ids[0])
                    assert (out["recipients"], out["status"], out["in_flight"]) == (1, "deleted", 0)
                    out = engine.control.delete("campaign:none")
                    assert out["recipients"] == 0
                    out = engine.control.delete("domain:p.test")
                    assert out["recipients"] == 1 and out["messages"] == 1
                    assert await engine.drain(2) and engine.unfinished == 0
                    assert engine.control.summary()[-1]["held"] == 0
                    with pytest.raises(KeyError):
                        engine.control.delete(f"message:{ids[0]}")
            await spool.close()
            got = records(acct)
            assert sorted(r["recipient"] for r in got) == ["a@p.test", "b@p.test"]
            assert {r["status"] for r in got} == {"deleted"}
            assert {(r["code"], r["category"], r["bounce_type"]) for r in got} == {(550, "admin", "none")}

            spool = Spool(tmp_path / "q")
            async with Engine(cfg, spool=spool) as engine:
                assert engine.recovered == 0  # deleted is final in the journal
            await spool.close()
            assert sink.stats.messages == 0
        finally:
            await sink.close()

    run(main())


# ----------------------------------------------------------------- retry / bounce


def test_retry_moves_scheduled_mail_to_now(run: Run) -> None:
    async def main() -> None:
        # Greylisting: the first try of each triple is deferred, any retry accepted.
        sink, site = await start_sink(FaultConfig(greylist=True))
        try:
            async with Engine(config({"g.test": site, "h.test": site})) as engine:
                ids = await submit_all(engine, ["a@g.test", "b@g.test", "c@h.test"])
                await until(lambda: engine.counts["deferred"] == 3)
                assert row(engine.control.summary(), site)["scheduled"] == 3
                out = engine.control.retry(ids[2])
                assert out["retried"] == 1 and out["cleared"] == []
                await until(lambda: engine.counts["delivered"] == 1)
                out = engine.control.retry(f"site:{site}")
                assert out["retried"] == 2 and out["cleared"] == [{"source": "default", "site": site}]
                assert await engine.drain(10)
                outcomes = [o for i in ids for o in await engine.result(i)]
                assert [o.attempts for o in outcomes] == [2, 2, 2]
                assert engine.control.retry(f"site:{site}")["retried"] == 0
        finally:
            await sink.close()

    run(main())


def test_retry_a_campaign_moves_only_its_scheduled_mail(run: Run) -> None:
    async def main() -> None:
        sink, site = await start_sink(FaultConfig(greylist=True))
        try:
            async with Engine(config({"g.test": site})) as engine:
                spring = await submit_all(engine, ["a@g.test", "b@g.test"], meta={"job": "spring"})
                other = await submit_all(engine, ["c@g.test"], meta={"job": "autumn"})
                await until(lambda: engine.counts["deferred"] == 3)
                out = engine.control.retry("campaign:spring")
                assert (out["target"], out["retried"], out["messages"], out["cleared"]) == ("campaign:spring", 2, 2, [])
                await until(lambda: engine.counts["delivered"] == 2)
                assert [o.status.value for i in spring for o in await engine.result(i)] == ["delivered"] * 2
                assert row(engine.control.summary(), site)["scheduled"] == 1  # autumn's still waits
                assert engine.control.retry("campaign:spring")["retried"] == 0
                assert engine.control.retry("campaign:autumn")["retried"] == 1
                assert await engine.drain(10)
                assert [o.status.value for o in await engine.result(other[0])] == ["delivered"]
        finally:
            await sink.close()

    run(main())


def test_bounce_writes_one_record_each_and_is_final_after_restart(run: Run, tmp_path: Path) -> None:
    async def main() -> None:
        sink, site = await start_sink(FaultConfig(replies=(DEFER,)))
        cfg = config({"b.test": site, "k.test": site})
        acct = tmp_path / "acct.jsonl"
        try:
            spool = Spool(tmp_path / "q")
            with AccountingLog(acct) as log:
                async with Engine(cfg, spool=spool, accounting=log) as engine:
                    two = await engine.submit(BODY, SENDER, ["a@b.test", "b@b.test", "c@k.test"])
                    one = await engine.submit(BODY, SENDER, ["d@b.test"])
                    await until(lambda: engine.counts["deferred"] == 4)
                    out = engine.control.bounce("domain:b.test", reason="list\r\nclosed")
                    assert (out["recipients"], out["messages"], out["status"]) == (3, 2, "bounced")
                    assert engine.unfinished == 1 and (await engine.result(one))[0].status is Status.BOUNCED
                    out = engine.control.bounce(two)  # the bare id: what is left of it
                    assert out["recipients"] == 1
                    assert await engine.drain(2)
            await spool.close()
            got = records(acct)
            finals = [r for r in got if r["status"] != "deferred"]
            assert Counter(r["recipient"] for r in finals) == Counter(["a@b.test", "b@b.test", "c@k.test", "d@b.test"])
            assert {r["status"] for r in finals} == {"bounced"}
            by = {r["recipient"]: r for r in finals}
            assert by["a@b.test"]["text"] == "bounced by the operator: list closed"
            assert by["c@k.test"]["text"] == "bounced by the operator"
            assert by["a@b.test"]["code"] == 550 and by["a@b.test"]["enhanced"] == "5.0.0"
            assert by["a@b.test"]["category"] == "admin" and by["a@b.test"]["attempts"] == 1
            spool = Spool(tmp_path / "q")
            assert spool.take_recovered() == []
            await spool.close()
        finally:
            await sink.close()

    run(main())


def test_in_flight_recipients_are_not_recalled(run: Run) -> None:
    async def main() -> None:
        sink, site = await start_sink(FaultConfig(delays=(("eod", 0.5),)))
        try:
            async with Engine(config({"f.test": site})) as engine:
                (mid,) = await submit_all(engine, ["a@f.test"])
                await until(lambda: engine.control.summary()[-1]["in_flight"] == 1)
                out = engine.control.delete(mid)
                assert (out["recipients"], out["in_flight"]) == (0, 1)
                assert (await asyncio.wait_for(engine.result(mid), 10))[0].status is Status.DELIVERED
                assert sink.stats.messages == 1
        finally:
            await sink.close()

    run(main())


def test_a_message_s_own_lifetime_expires_it_sooner(run: Run) -> None:
    """meta max_lifetime (HTTP meta, [campaign] max_lifetime): a one-time code is worthless in an hour,
    not in five days. At most the queue's own max_lifetime; anything but a number of seconds is refused."""
    async def main() -> None:
        sink, site = await start_sink(FaultConfig(replies=(DEFER,)))
        try:
            async with Engine(config({"d.test": site}, max_lifetime=3600)) as engine:
                short = await engine.submit(BODY, SENDER, ["otp@d.test"], meta={"max_lifetime": "0.5"})
                long = await engine.submit(BODY, SENDER, ["news@d.test"], meta={"max_lifetime": 86400})
                plain = await engine.submit(BODY, SENDER, ["plain@d.test"])
                for bad in ("soon", "0", "-5", "nan", "inf", True):
                    with pytest.raises(InputError, match="meta.max_lifetime"):
                        await engine.submit(BODY, SENDER, ["x@d.test"], meta={"max_lifetime": bad})
                outcomes = await asyncio.wait_for(engine.result(short), 10)
                assert [o.status for o in outcomes] == [Status.EXPIRED]
                assert outcomes[0].time - outcomes[0].queued_at < 5
                assert engine.unfinished == 2  # the others wait for their retry
                long_msg, plain_msg = engine._ledger.message(long), engine._ledger.message(plain)
                assert long_msg is not None and plain_msg is not None
                assert abs(long_msg.deadline - plain_msg.deadline) < 1.0  # capped at the queue's 3600
        finally:
            await sink.close()

    run(main())


def test_a_suspension_for_a_time_survives_a_restart_and_ends_at_its_time(run: Run, tmp_path: Path) -> None:
    async def main() -> None:
        sink, site = await start_sink()
        cfg = config({"p.test": site})
        try:
            spool = Spool(tmp_path / "q")
            async with Engine(cfg, spool=spool) as engine:
                out = engine.control.suspend("domain:p.test", duration=1.0, reason="maintenance\r\nwindow")
                assert out["rules"][0]["reason"] == "maintenance window"  # one printable line
                until_ = out["rules"][0]["until"]
                again = engine.control.suspend("domain:p.test", reason="still down")  # a reason alone
                assert (again["rules"][0]["until"], again["rules"][0]["reason"]) == (until_, "still down")
                again = engine.control.suspend("domain:p.test")  # neither: both kept
                assert (again["rules"][0]["until"], again["rules"][0]["reason"]) == (until_, "still down")
                with pytest.raises(ValueError, match="duration"):
                    engine.control.suspend("domain:q.test", duration=0)
                await submit_all(engine, ["a@p.test"])
            await spool.close()
            saved = json.loads((tmp_path / "q" / SUSPEND_FILE).read_text())
            assert saved[0]["until"] is not None and saved[0]["reason"] == "still down"
            await asyncio.sleep(1.1)  # its time runs out while the engine is stopped
            spool = Spool(tmp_path / "q")
            async with Engine(cfg, spool=spool) as engine:
                await until(lambda: engine.counts.get("delivered", 0) == 1, what="released at start")
                assert engine.control.rules() == []
            await spool.close()
            assert json.loads((tmp_path / "q" / SUSPEND_FILE).read_text()) == []
        finally:
            await sink.close()

    run(main())


def test_summary_counts_unfinished_recipients_by_age_as_qshape(run: Run) -> None:
    async def main() -> None:
        sink, site = await start_sink(FaultConfig(replies=(DEFER,)))
        try:
            async with Engine(config({"d.test": site})) as engine:
                ids = await submit_all(engine, ["new@d.test", "hour@d.test", "days@d.test"])
                await until(lambda: engine.counts["deferred"] == 3)
                for mid, age in zip(ids, (0, 3600, 3 * 86400), strict=True):
                    msg = engine._ledger.message(mid)
                    assert msg is not None
                    msg.queued_at -= age
                rows = engine.control.summary()
                # 5 10 20 40 80 160 320 640 1280 1280+ minutes: now, an hour (under 80), three days (over 1280)
                assert row(rows, site)["ages"] == [1, 0, 0, 0, 1, 0, 0, 0, 0, 1]
                assert rows[-1]["kind"] == "total" and rows[-1]["ages"] == [1, 0, 0, 0, 1, 0, 0, 0, 0, 1]
        finally:
            await sink.close()

    run(main())


def test_tries_at_a_site_s_pace_do_not_grow_the_backoff(run: Run) -> None:
    """A site answering "slow down" to a recipient: its tries at the site's pace (10, each counted as an
    attempt) are not failures of the exponential backoff. Found by an attack with Postfix's anvil:
    recipients waited 3 to 4 hours while the site kept taking mail."""
    from fastmta.delivery.batch import Delivery
    from fastmta.feedback.classify import default_classifier
    from fastmta.queue.records import Message, Recipient
    from fastmta.smtp.protocol import Body

    async def main() -> None:
        slow = default_classifier().classify_text("450 4.7.1 Error: too much mail from 192.0.2.7", phase="rcpt")
        block = default_classifier().classify_text("450 4.7.1 <x@d.test>: Recipient address rejected: policy",
                                                   phase="rcpt")
        assert slow.site_paced and not block.site_paced
        async with Engine(config({}, retry_initial=60, retry_max=14400)) as engine:
            loop = asyncio.get_running_loop()
            waits = {}
            for name, c in (("paced", slow), ("other", block)):
                rcpt = Recipient(f"{name}@d.test", "d.test", attempts=11)
                msg = Message(f"m-{name}", SENDER, Body(BODY), [rcpt], meta={})
                msg.deadline = loop.time() + 86400
                engine._defer(msg, [(rcpt, c)], Delivery("d.test", None, None, None))
                waits[name] = max(when for when, (m, _) in engine._due.entries() if m is msg) - loop.time()
            assert waits["paced"] < 200, waits  # 60 s and the rule's hint, not 4 h
            assert waits["other"] > 3600, waits  # eleven real failures keep their backoff
            await engine.drain(0.1)

    run(main())


def test_a_refused_greeting_takes_the_retry_schedule_not_the_site_s_pace(run: Run) -> None:
    """A site refusing every session at its greeting (a block list: "554 5.7.1 ... listed"): its recipients
    are not retried at the site's pace (a deferral record a minute each, 2,000 for 200 recipients in 500 s,
    found by an attack with Postfix's reject_rbl_client at connect) but on the retry schedule."""
    async def main() -> None:
        refuse = PhaseFault("connect", 1.0, 554, "5.7.1 Service unavailable; client host [127.0.0.1] listed")
        sink, site = await start_sink(FaultConfig(replies=(refuse,)))
        try:
            async with Engine(config({"d.test": site}, adaptive=True)) as engine:
                await submit_all(engine, [f"r{i}@d.test" for i in range(5)])
                await asyncio.sleep(3.0)
                assert engine.counts.get("deferred", 0) == 5  # one record each, then the schedule
                assert row(engine.control.summary(), site)["scheduled"] == 5
        finally:
            await sink.close()

    run(main())
