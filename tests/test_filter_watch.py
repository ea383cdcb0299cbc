"""Don't blame the messenger: "user unknown" from a filter is a suspected filter, not a bad address.

Unit tests of the statistics (baseline, threshold, minimum sample, onset),
of the holding of undecided verdicts and of the appliance fingerprints; then
a scenario over real sockets: the engine against a sink whose B2B appliance
refuses ~11% of existing mailboxes at end of DATA with "550 5.1.1 user
unknown" and truly unknown addresses at RCPT, beside a normal domain.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from fastmta.cli.sinkproc import embedded_sink
from fastmta.delivery.accounting import AccountingLog
from fastmta.delivery.batch import Delivery
from fastmta.delivery.config import config_from_dict
from fastmta.delivery.engine import Engine
from fastmta.delivery.filter_watch import FilterPolicy, FilterStats, FilterWatch, Kind
from fastmta.feedback.appliances import identify, identify_server
from fastmta.feedback.classification import BounceType, Category
from fastmta.feedback.classify import classify
from fastmta.queue.records import Message, Recipient
from fastmta.sink import SinkServer
from fastmta.sink.config import FaultConfig, ListenerConfig, PhaseFault, SinkConfig
from fastmta.smtp.protocol import Body
from fastmta.smtp.reply import Reply

Run = Callable[[Coroutine[Any, Any, Any]], Any]

A, U, F, X = Kind.ACCEPTED, Kind.UNKNOWN, Kind.FILTERED, Kind.OTHER


def feed(stats: FilterStats, domain: str, kinds: list[Kind], site: str | None = None, appliance: str | None = None) -> None:
    for kind in kinds:
        stats.count(domain, site or f"mx.{domain}", kind, appliance)


def background(stats: FilterStats, n: int = 1000, unknown_every: int = 50) -> None:
    """The rest of the run: *n* verdicts over many ordinary domains, 1 in *unknown_every* 'unknown' (2%)."""
    for i in range(n):
        stats.count(f"d{i % 40}.example", f"mx{i % 40}", U if i % unknown_every == 7 else A)


# ------------------------------------------------------------------ statistics


def test_baseline_is_the_rest_of_the_run() -> None:
    stats = FilterStats()
    background(stats, 1000)  # 20 of 1000 unknown
    feed(stats, "b2b.example", [U] * 10 + [A] * 90)
    fig = stats.domains["b2b.example"]
    assert stats.baseline(fig) == pytest.approx(20 / 1000)  # the domain itself is left out
    assert stats.baseline(stats.domains["d0.example"]) == pytest.approx(30 / 1075, rel=0.05)


def test_a_domain_far_above_the_baseline_is_a_suspected_filter() -> None:
    stats = FilterStats()
    background(stats)
    feed(stats, "b2b.example", ([U] + [A] * 8) * 4)  # 4 of 36: 11%, 5.5x the 2% baseline
    found = stats.suspicion("b2b.example", "mx.b2b.example")
    assert found is not None and found[0] == "share"
    assert "4 of 36" in found[1] and "2.0% in the rest of the run" in found[1]
    assert stats.suspicion("d1.example", "mx1") is None  # the others are the baseline


def test_threshold_is_three_times_the_baseline_and_at_least_five_percent() -> None:
    # 2% baseline: threshold 6%. 5 of 100 (5%) is below, 6 of 100 at it.
    for unknown, flagged in ((5, False), (6, True)):
        stats = FilterStats()
        background(stats)
        feed(stats, "x.example", [U] * unknown + [A] * (100 - unknown))
        assert (stats.suspicion("x.example", "mx.x.example") is not None) is flagged, unknown
    # A clean run (baseline 0%): the 5% floor decides. 4 of 100 is not a filter, 5 of 100 is.
    for unknown, flagged in ((4, False), (5, True)):
        stats = FilterStats()
        feed(stats, "clean.example", [A] * 200)
        feed(stats, "x.example", [U] * unknown + [A] * (100 - unknown))
        assert (stats.suspicion("x.example", "mx.x.example") is not None) is flagged, unknown
    # A dirty run (10% baseline): 20% at one domain is only 2x, not a filter.
    stats = FilterStats()
    background(stats, unknown_every=10)
    feed(stats, "x.example", [U] * 20 + [A] * 80)
    assert stats.suspicion("x.example", "mx.x.example") is None


def test_too_few_verdicts_say_nothing_and_keep_the_verdicts_undecided() -> None:
    stats = FilterStats()
    background(stats)
    feed(stats, "small.example", [U, U, U, U, A])  # 80%, but only 5 verdicts
    assert stats.suspicion("small.example", "mx.small.example") is None
    assert stats.undecided("small.example", "mx.small.example")
    feed(stats, "small.example", [A] * 15)  # 20 verdicts: judged (4 of 20 = 20% > 6%)
    assert not stats.undecided("small.example", "mx.small.example")
    assert stats.suspicion("small.example", "mx.small.example") is not None


def test_a_few_bad_addresses_at_the_head_of_a_domain_are_not_a_filter() -> None:
    # 3 of a domain's first 20 verdicts (15%) are noise, not evidence: a share signal needs 4 "unknown".
    stats = FilterStats()
    background(stats)
    feed(stats, "normal.example", [U, U, U] + [A] * 17)
    assert not stats.undecided("normal.example", "mx.normal.example")
    assert stats.suspicion("normal.example", "mx.normal.example") is None


def test_a_site_gathers_small_domains_behind_one_appliance() -> None:
    stats = FilterStats()
    background(stats)
    for i in range(12):  # 12 domains of 5 recipients each, one shared gateway site
        feed(stats, f"corp{i}.example", [U, A, A, A, A], site="gw.filter.example")
    assert stats.domains["corp0.example"].attempts == 5
    found = stats.suspicion("corp0.example", "gw.filter.example")
    assert found is not None and "at this site" in found[1]


def test_the_whole_run_has_nothing_to_be_compared_with() -> None:
    # Everything to one smarthost: a dirty list is not a filter.
    stats = FilterStats()
    feed(stats, "x.example", ([U] + [A] * 4) * 40, site="smarthost")
    assert stats.baseline(stats.sites["smarthost"]) is None
    assert stats.suspicion("x.example", "smarthost") is None


def test_rejections_that_start_after_a_run_of_acceptances() -> None:
    stats = FilterStats()
    background(stats)
    feed(stats, "b2b.example", [A] * 60)
    feed(stats, "b2b.example", [U])
    assert stats.undecided("b2b.example", "mx.b2b.example")  # the onset window is open
    assert stats.suspicion("b2b.example", "mx.b2b.example") is None
    feed(stats, "b2b.example", [U, A, U, U])  # 4 of the 5 since: the filter switched on
    found = stats.suspicion("b2b.example", "mx.b2b.example")
    assert found is not None and found[0] == "onset"
    assert "the first 'unknown' came after 60 acceptances, then 4 of 5 verdicts were 'unknown'" in found[1]
    assert not stats.undecided("b2b.example", "mx.b2b.example")
    feed(stats, "b2b.example", [A] * 500)  # sticky: the overall share is long below the threshold
    assert stats.suspicion("b2b.example", "mx.b2b.example") is not None


def test_bad_addresses_spread_through_a_list_are_no_onset() -> None:
    stats = FilterStats()
    background(stats)
    feed(stats, "list.example", [A] * 30 + [U] + [A] * 9 + [U] + [A] * 10)  # 2 in the window of 20
    assert not stats.undecided("list.example", "mx.list.example")  # window closed: dismissed
    assert stats.suspicion("list.example", "mx.list.example") is None
    # Only the first "unknown" can open the window: later runs and bursts are the share test's.
    feed(stats, "list.example", [A] * 40 + [U, U, U, U] + [A] * 2000)
    assert stats.domains["list.example"].onset is None


def test_no_onset_when_the_first_unknown_comes_early() -> None:
    stats = FilterStats()
    background(stats)
    feed(stats, "x.example", [A] * 5 + [U] * 4 + [A] * 200)
    assert stats.domains["x.example"].onset is None


def test_an_appliance_fingerprint_lowers_the_bar() -> None:
    # 4 of 16 (25%) is judged at an appliance (10 verdicts, 2x the baseline), not elsewhere (20, 3x).
    plain, corp = FilterStats(), FilterStats()
    for stats, appliance in ((plain, None), (corp, "Proofpoint")):
        background(stats, unknown_every=25)  # 4% baseline: 2x = 8%, 3x = 12%
        feed(stats, "x.example", [U, A, A, A] * 4, appliance=appliance)
    assert plain.suspicion("x.example", "mx.x.example") is None
    assert corp.suspicion("x.example", "mx.x.example") is not None
    # 9% over 100 verdicts: above 2x of 4% but not 3x.
    plain, corp = FilterStats(), FilterStats()
    for stats, appliance in ((plain, None), (corp, "Mimecast")):
        background(stats, unknown_every=25)
        feed(stats, "x.example", [U] * 9 + [A] * 91, appliance=appliance)
    assert plain.suspicion("x.example", "mx.x.example") is None
    assert corp.suspicion("x.example", "mx.x.example") is not None


def test_filtered_and_other_refusals_count_as_verdicts_not_as_unknown() -> None:
    stats = FilterStats()
    feed(stats, "x.example", [A, F, X, A])
    fig = stats.domains["x.example"]
    assert (fig.attempts, fig.unknown, fig.filtered, fig.streak) == (4, 0, 1, 2)


# ---------------------------------------------------------------- fingerprints


@pytest.mark.parametrize(("text", "name"), [
    ("mx0a-00123401.pphosted.com", "Proofpoint"),
    ("220 mx0b-001.pphosted.com ESMTP mfa-m0001234", "Proofpoint"),
    ("eu-smtp-inbound-1.mimecast.com", "Mimecast"),
    ("550 Invalid Recipient - https://community.mimecast.com/docs/DOC-1369#550", "Mimecast"),
    ("d123456a.ess.barracudanetworks.com", "Barracuda"),
    ("550 cuda_nsu 5.1.1 <a@b.example>: Recipient address rejected: User unknown", "Barracuda"),
    ("mx1.hc123-45.eu.iphmx.com", "Cisco Secure Email (IronPort)"),
    ("550 #5.1.0 Address rejected a@b.example", "Cisco Secure Email (IronPort)"),
    ("cluster1.eu.messagelabs.com", "Symantec MessageLabs"),
    ("in.hes.trendmicro.com", "Trend Micro"),
    ("220 mx-01-eu-central-1.prod.hydra.sophos.com ESMTP", "Sophos"),
    ("220 mail.corp.example ESMTP FortiMail", "FortiMail"),
    ("corp-example.mail.protection.outlook.com", "Microsoft EOP"),
    ("550 5.4.1 Recipient address rejected: Access denied. AS(201806281)", "Microsoft EOP"),
])
def test_appliances_are_recognised(text: str, name: str) -> None:
    assert identify(text) == name


@pytest.mark.parametrize("text", [
    "220 mx.google.com ESMTP x1-20020a - gsmtp",
    "outlook-com.olc.protection.outlook.com",  # consumer Outlook.com: not a company's filter
    "Sorry, no mailbox here by that name. (#5.1.1)",  # qmail, not IronPort
    "mx.notpphosted.com.example",
    "xpphosted.com",
    "550 5.1.1 user unknown",
])
def test_ordinary_servers_are_not_appliances(text: str) -> None:
    assert identify(text) is None


def test_a_server_is_known_by_its_mx_greeting_or_ehlo() -> None:
    greeting = Reply(220, ("mx1.corp.example ESMTP Proofpoint gateway ready",), None)
    ehlo = Reply(250, ("mx1.corp.example Hello", "PIPELINING", "SIZE 1000"), None)
    assert identify_server("mx1.corp.example", greeting, ehlo) == "Proofpoint"
    assert identify_server("mx1.corp.example", None, Reply(250, ("gw.messagelabs.com Hi",), None)) == (
        "Symantec MessageLabs")
    assert identify_server("mx1.corp.example.", None, ehlo) is None


# ------------------------------------------------------------ holding verdicts


def _watch_fixture() -> tuple[FilterWatch, list[tuple[str, str, str | None]], list[int]]:
    released: list[tuple[str, str, str | None]] = []
    unfinished = [100]

    def release(msg: Message, rcpt: Recipient, reply: Reply, delivery: Delivery, c: Any) -> None:
        released.append((rcpt.address, c.bounce.value, c.reason or None))
        unfinished[0] -= 1

    return FilterWatch(release=release, unfinished=lambda: unfinished[0]), released, unfinished


def _msg(address: str) -> tuple[Message, Recipient]:
    rcpt = Recipient(address, address.rpartition("@")[2])
    return Message("m-" + address, "s@sender.example", Body(b"Subject: x\r\n\r\nx\r\n"), [rcpt]), rcpt


UNKNOWN = Reply(550, ("5.1.1 <x>: Recipient address rejected: User unknown in local recipient table",), "5.1.1")


def test_undecided_unknowns_are_held_until_the_domain_can_tell() -> None:
    async def main() -> None:
        watch, released, _ = _watch_fixture()
        site = Delivery("mx.b2b.example", "mx.b2b.example", "127.0.0.1", None)
        other = Delivery("mx.other.example", "mx.other.example", "127.0.0.1", None)
        c = classify(UNKNOWN, "rcpt")
        assert c.bounce is BounceType.HARD
        for i in range(200):  # the rest of the run: 2% unknown
            watch.stats.count("other.example", other.site, U if i % 50 == 0 else A)
        msg, rcpt = _msg("a@b2b.example")
        assert watch.review(msg, rcpt, UNKNOWN, "rcpt", site, c) is None  # 1 verdict: held
        assert watch.held == 1 and released == []
        more = [_msg(f"{x}@b2b.example") for x in "bde"]
        for m, r in more:
            assert watch.review(m, r, UNKNOWN, "rcpt", site, c) is None
        for _ in range(15):
            watch.accepted("b2b.example", site)
        assert watch.held == 4
        watch.accepted("b2b.example", site)  # the 20th verdict: 4 of 20 = 20% against 2%
        assert watch.held == 0
        assert [(a, b) for a, b, _ in released] == [(f"{x}@b2b.example", "suspected_filter") for x in "abde"]
        assert "4 of 20 verdicts at this domain" in (released[0][2] or "")
        # The domain is decided now: the next unknown is judged at once.
        msg3, rcpt3 = _msg("c@b2b.example")
        judged = watch.review(msg3, rcpt3, UNKNOWN, "rcpt", site, c)
        assert judged is not None and judged.bounce is BounceType.SUSPECTED_FILTER
        assert judged.category is Category.CONTENT_FILTERED and not judged.is_hard_bounce
        [report] = watch.report()
        assert report["domain"] == "b2b.example" and report["suspected"] == 5 and report["signals"] == ["share"]

    asyncio.run(main())


def test_held_verdicts_are_released_when_nothing_else_is_unfinished() -> None:
    async def main() -> None:
        watch, released, unfinished = _watch_fixture()
        site = Delivery("mx.x.example", "mx.x.example", "127.0.0.1", None)
        c = classify(UNKNOWN, "rcpt")
        msg, rcpt = _msg("a@x.example")
        unfinished[0] = 2
        assert watch.review(msg, rcpt, UNKNOWN, "rcpt", site, c) is None
        assert released == []
        unfinished[0] = 1  # the other recipient finished: only the held one is left
        watch.settle()
        assert released == [("a@x.example", "hard", None)]  # no evidence: the server's word stands

    asyncio.run(main())


def test_held_verdicts_wait_at_most_max_hold() -> None:
    async def main() -> None:
        released: list[str] = []
        watch = FilterWatch(FilterPolicy(max_hold=0.05), release=lambda m, r, *_: released.append(r.address),
                            unfinished=lambda: 100)
        site = Delivery("mx.x.example", "mx.x.example", "127.0.0.1", None)
        msg, rcpt = _msg("a@x.example")
        assert watch.review(msg, rcpt, UNKNOWN, "rcpt", site, classify(UNKNOWN, "rcpt")) is None
        await asyncio.sleep(0.2)
        assert released == ["a@x.example"] and watch.held == 0

    asyncio.run(main())


def test_unknown_after_end_of_data_is_a_filter_at_once() -> None:
    async def main() -> None:
        watch, released, _ = _watch_fixture()
        site = Delivery("mx.x.example", "mx1.x.example", "127.0.0.1", None, appliance="Barracuda")
        reply = Reply(550, ("5.1.1 user unknown",), "5.1.1")
        c = classify(reply, "eod")
        assert c.bounce is BounceType.HARD  # what the classifier alone says
        msg, rcpt = _msg("a@x.example")
        judged = watch.review(msg, rcpt, reply, "eod", site, c)
        assert judged is not None and judged.bounce is BounceType.SUSPECTED_FILTER
        assert judged.reason.startswith("suspected filter (phase): '550 5.1.1' came after the end of DATA")
        assert judged.reason.endswith("appliance: Barracuda")
        [report] = watch.report()
        assert report["signals"] == ["appliance", "phase"] and report["appliance"] == "Barracuda"
        # Not an address error at all: left alone, counted as a verdict.
        policy = Reply(550, ("5.7.1 Message rejected as spam by Content Filtering",), "5.7.1")
        assert watch.review(msg, rcpt, policy, "eod", site, classify(policy, "eod")) == classify(policy, "eod")
        assert released == []

    asyncio.run(main())


# ------------------------------------------------- the sink's blaming appliance


def test_sink_appliance_can_verify_at_rcpt_and_filter_existing_mailboxes(run: Run) -> None:
    import aiosmtplib

    from test_sink_support import sink

    async def main() -> None:
        faults = FaultConfig(unknown_recipients=("gone-*@*",), unknown_at="rcpt", filtered_share=1.0)
        async with (
            sink(ListenerConfig(profile="appliance"), faults=faults) as (server, [(host, port)]),
            aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=10) as smtp,
        ):
            # The truly unknown one at RCPT (not at the end of data as the profile would)...
            with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
                await smtp.sendmail("a@s.example", ["gone-1@b2b.example"], b"Subject: t\r\n\r\nx\r\n")
            assert [(e.code, e.message) for e in refused.value.recipients] == [(550, "5.1.1 user unknown")]
            # ...and an existing one accepted at RCPT, refused with the same words after the content.
            with pytest.raises(aiosmtplib.SMTPDataError) as info:
                await smtp.sendmail("a@s.example", ["ann@b2b.example"], b"Subject: t\r\n\r\nx\r\n")
            assert (info.value.code, info.value.message) == (550, "5.1.1 user unknown")
        assert server.stats.faults["unknown_recipient"] == 1 and server.stats.faults["filtered"] == 1

    run(main())


def test_sink_filtered_share_picks_the_same_addresses_every_time() -> None:
    import argparse

    from fastmta.cli.sink import add_arguments, config_from_args
    from fastmta.sink.faults import FaultEngine
    from fastmta.sink.profiles import APPLIANCE
    from fastmta.sink.stats import SinkStats

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--filtered-share", "0.11", "--unknown-at", "rcpt"])
    faults = config_from_args(args).faults
    assert (faults.filtered_share, faults.unknown_at, faults.active) == (0.11, "rcpt", True)
    with pytest.raises(SystemExit):
        parser.parse_args(["--filtered-share", "1.5"])
    with pytest.raises(ValueError, match="between 0 and 1"):
        FaultConfig(filtered_share=-0.1)
    with pytest.raises(ValueError, match="unknown_at"):
        FaultConfig(unknown_at="mail")  # type: ignore[arg-type]

    def refused(seed: int) -> set[int]:
        engine = FaultEngine(faults, APPLIANCE, "mx", random.Random(seed), SinkStats(), lambda: 0.0)
        return {i for i in range(2000) if engine.end_of_data("1.2.3.4", b"s@x", [f"u{i}@b2b.example".encode()], "q")}

    first = refused(1)
    assert first == refused(2)  # by address, not by chance
    assert 0.09 <= len(first) / 2000 <= 0.13


# -------------------------------------------------------- scenario: real sockets


def _config(routes: dict[str, list[str]]) -> Any:
    return config_from_dict({
        "routing": {"static": routes},
        "queue": {"retry_initial": 0.2, "retry_jitter": 0.0, "retry_max": 1.0},
        "smtp": {"tls": "never"},
        "sites": {"*": {"adaptive": {"enabled": False}, "max_connections": 4}},
    })


def test_scenario_a_b2b_appliance_that_blames_the_mailbox(run_uvloop: Run, tmp_path: Path) -> None:
    """300 recipients at a B2B domain behind an appliance that refuses ~11% of the existing
    mailboxes at end of DATA ("550 5.1.1 user unknown") and 9 truly unknown ones at RCPT;
    300 at a normal domain with 6 unknown ones; 200 at a domain whose filter refuses 15% at
    RCPT. One message per recipient, as a campaign sends them."""
    appliance = FaultConfig(unknown_recipients=("gone-*@*",), unknown_at="rcpt", filtered_share=0.11)
    normal = FaultConfig(unknown_recipients=("gone-*@*",))
    rcpt_filter = FaultConfig(replies=(PhaseFault("rcpt", 0.15, 550, "5.1.1 user unknown"),))
    config = SinkConfig(listeners=(
        ListenerConfig(profile="appliance", faults=appliance, hostname="mx0a-00012301.pphosted.com"),
        ListenerConfig(faults=normal),
        ListenerConfig(profile="default", faults=rcpt_filter, hostname="gw.corp-filter.test"),
    ), seed=7)
    rng = random.Random(5)
    b2b = [f"gone-{i}@b2b.example" for i in range(9)] + [f"user{i}@b2b.example" for i in range(291)]
    plain = [f"gone-{i}@normal.example" for i in range(6)] + [f"user{i}@normal.example" for i in range(294)]
    other = [f"user{i}@rcptfilter.example" for i in range(200)]
    recipients = b2b + plain + other
    rng.shuffle(recipients)
    acct_path = tmp_path / "acct.jsonl"

    async def main() -> tuple[dict[str, Any], list[dict[str, Any]], SinkServer]:
        async with SinkServer(config) as sink:
            (h1, p1), (h2, p2), (h3, p3) = sink.addresses
            cfg = _config({"b2b.example": [f"{h1}:{p1}"], "normal.example": [f"{h2}:{p2}"],
                           "rcptfilter.example": [f"{h3}:{p3}"]})
            accounting = AccountingLog(acct_path)
            async with Engine(cfg, accounting=accounting) as engine:
                ids = [await engine.submit(b"Subject: offer\r\n\r\nhello\r\n", "news@sender.example", [r])
                       for r in recipients]
                for i in ids:
                    await asyncio.wait_for(engine.result(i), 60)
                report = engine.filters.report()
                counts = dict(engine.counts)
            accounting.close()
            return {"counts": counts}, report, sink

    out, report, sink = run_uvloop(main())
    records = [json.loads(line) for line in acct_path.read_text().splitlines()]
    assert len(records) == len(recipients)  # one final record each, held ones included
    by = {r["recipient"]: r for r in records}
    filtered = sink.stats.faults["filtered"]
    assert 0.07 * 291 <= filtered <= 0.15 * 291, filtered

    def kinds(domain: str) -> Counter[tuple[str, str | None]]:
        return Counter((r["status"], r["bounce_type"]) for a, r in by.items() if a.endswith("@" + domain))

    # B2B: the appliance's end-of-DATA "unknown" are suspected filter bounces, the RCPT ones hard.
    assert kinds("b2b.example") == Counter({
        ("delivered", None): 291 - filtered, ("bounced", "suspected_filter"): filtered, ("bounced", "hard"): 9,
    })
    assert all(by[f"gone-{i}@b2b.example"]["bounce_type"] == "hard" for i in range(9))
    suspected = [r for r in records if r["bounce_type"] == "suspected_filter" and "@b2b." in r["recipient"]]
    assert all(r["code"] == 550 and r["enhanced"] == "5.1.1" and r["category"] == "content_filtered"
               for r in suspected)
    assert all("after the end of DATA" in r["bounce_reason"] and "Proofpoint" in r["bounce_reason"]
               for r in suspected)
    # The normal domain is untouched: its unknown ones are hard, the rest delivered.
    assert kinds("normal.example") == Counter({("delivered", None): 294, ("bounced", "hard"): 6})
    # A filter refusing 15% at RCPT: far above the ~2.5% elsewhere, held as unconfirmed too.
    rf = kinds("rcptfilter.example")
    refused = rf[("bounced", "suspected_filter")] + rf[("bounced", "hard")]
    assert refused == sink.stats.faults["rcpt"] and 20 <= refused <= 45
    assert rf[("bounced", "suspected_filter")] >= 0.8 * refused, rf
    # The summary's report names the domains.
    named = {r["domain"]: r for r in report}
    assert set(named) == {"b2b.example", "rcptfilter.example"}
    assert named["b2b.example"]["suspected"] == filtered and named["b2b.example"]["hard_unknown"] == 9
    assert named["b2b.example"]["appliance"] == "Proofpoint"
    assert named["b2b.example"]["signals"] == ["appliance", "phase"]
    assert named["rcptfilter.example"]["signals"] == ["share"]
    assert out["counts"]["bounced"] == filtered + 15 + refused
    print(f"\nscenario: b2b.example {filtered} suspected filter (of 291 existing, "
          f"{filtered / 291:.1%}), 9 hard; normal.example 6 hard, 294 delivered; "
          f"rcptfilter.example {rf[('bounced', 'suspected_filter')]} suspected + {rf[('bounced', 'hard')]} hard "
          f"of {refused} refused at RCPT")


def test_send_summary_names_the_suspected_filter_domain(tmp_path: Path) -> None:
    """`fastmta send` with a campaign to a B2B domain behind the appliance and a normal domain:
    the summary (printed and JSON) names the domain, the accounting says suspected_filter."""
    from test_send import fastmta, small_campaign

    spool = tmp_path / "spool"
    # The truly unknown addresses are spread through the list, as in a real one: six of them bunched
    # together right after 20+ acceptances would look like a filter starting to refuse (the onset
    # signal), and be held as suspected rather than hard (the safe side: never suppressed).
    b2b = [f"user{i}@b2b.example" for i in range(194)]
    for i in range(6):
        b2b.insert(i * 33 + 5, f"gone-{i}@b2b.example")
    plain = [f"gone-{i}@normal.example" for i in range(3)] + [f"user{i}@normal.example" for i in range(97)]
    small_campaign(spool, [f"{a},Ann,Lee,u{i},2026-01-05" for i, a in enumerate(b2b + plain)])
    appliance = ["--profile", "appliance", "--hostname", "mx0a-00012301.pphosted.com",
                 "--unknown-recipient", "gone-*@*", "--unknown-at", "rcpt", "--filtered-share", "0.11",
                 "--stats-json", str(tmp_path / "appliance.json")]
    with embedded_sink(appliance) as (h1, p1), embedded_sink(["--unknown-recipient", "gone-*@*"]) as (h2, p2):
        cfg = tmp_path / "fastmta.toml"
        cfg.write_text(f'[routing.static]\n"b2b.example" = ["{h1}:{p1}"]\n"*" = ["{h2}:{p2}"]\n'
                       '[smtp]\ntls = "never"\n[sites."*".adaptive]\nenabled = false\n')
        out = fastmta("send", str(spool), "--config", str(cfg), "--accounting", str(tmp_path / "acct.jsonl"),
                      "--summary-json", str(tmp_path / "summary.json"), "--queue-dir", str(tmp_path / "q"), "--quiet")
    assert out.returncode == 0, out.stderr[-2000:]
    filtered = json.loads((tmp_path / "appliance.json").read_text())["faults"]["filtered"]
    assert filtered > 0
    records = [json.loads(line) for line in (tmp_path / "acct.jsonl").read_text().splitlines()]
    kinds = Counter((r["recipient"].rpartition("@")[2], r["bounce_type"]) for r in records if r["status"] == "bounced")
    assert kinds == Counter({("b2b.example", "suspected_filter"): filtered, ("b2b.example", "hard"): 6,
                             ("normal.example", "hard"): 3})
    summary = json.loads((tmp_path / "summary.json").read_text())
    [report] = summary["suspected_filters"]
    assert (report["domain"], report["suspected"], report["hard_unknown"]) == ("b2b.example", filtered, 6)
    assert report["appliance"] == "Proofpoint" and "phase" in report["signals"]
    assert summary["bounced"] == filtered + 9 and summary["delivered"] == 300 - filtered - 9
    text = " ".join(out.stdout.split())  # rich may wrap the line
    assert f"suspected filter b2b.example: {filtered} 'user unknown' held as unconfirmed" in text
    assert "normal.example" not in text
    print(out.stdout)
