"""The sink's site-wide rate limit (all clients together) and its throttle rules (one client address).

Real sinks on loopback (in process, and ``fastmta sink`` as a child), real
clients (aiosmtplib, smtplib) bound to their own source addresses
127.0.0.2-4, as the nodes of a cluster would be. Every loop is bounded in
count and time.
"""

from __future__ import annotations

import asyncio
import json
import signal
import smtplib
import time
from pathlib import Path

import aiosmtplib
import pytest

from fastmta.sink.config import FaultConfig, ListenerConfig, RateLimit, ThrottleRule, parse_throttle
from fastmta.sink.faults import FaultEngine
from fastmta.sink.profiles import GMAIL
from fastmta.sink.stats import SinkStats
from test_sink_support import TIMEOUT, sink, start_sink_process

MSG = b"Subject: t\r\n\r\nhello\r\n"
SOURCES = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


class Sender:
    """One client connection from a source address; reconnects after the server hangs up (a 421)."""

    def __init__(self, address: tuple[str, int], source: str) -> None:
        self.address = address
        self.source = source
        self.smtp: aiosmtplib.SMTP | None = None
        self.sent = 0
        self.refused: list[tuple[int, str]] = []

    async def send_one(self) -> bool:
        if self.smtp is None or not self.smtp.is_connected:
            self.smtp = aiosmtplib.SMTP(hostname=self.address[0], port=self.address[1], start_tls=False,
                                        source_address=(self.source, 0), timeout=TIMEOUT)  # fmt: skip
            await self.smtp.connect()
        try:
            await self.smtp.sendmail("a@example.com", ["b@example.org"], MSG)
        except aiosmtplib.SMTPSenderRefused as e:
            self.refused.append((e.code, e.message))
            if e.code == 421:
                self.smtp.close()
            else:
                await self.smtp.rset()
            return False
        self.sent += 1
        return True

    async def run(self, seconds: float, max_messages: int = 100_000) -> None:
        end = time.monotonic() + seconds
        for _ in range(max_messages):
            if time.monotonic() >= end:
                break
            if not await self.send_one():
                await asyncio.sleep(0.005)  # refused: do not spin
        await self.close()

    async def close(self) -> None:
        if self.smtp is not None and self.smtp.is_connected:
            try:
                await self.smtp.quit()
            except aiosmtplib.SMTPException:
                self.smtp.close()


# ------------------------------------------------------------------ parsing


def test_parse_throttle() -> None:
    assert parse_throttle("127.0.0.2") == ThrottleRule("127.0.0.2", 0.0)
    assert parse_throttle("10.0.0.0/24=30") == ThrottleRule("10.0.0.0/24", 30.0)
    assert parse_throttle("[::1]=1.5") == ThrottleRule("::1", 1.5)
    for bad, why in [("mx.example", "bad client network"), ("127.0.0.2=soon", "bad seconds"),
                     ("127.0.0.2=-1", "must be 0"), ("127.0.0.2=nan", "must be 0")]:  # fmt: skip
        with pytest.raises(ValueError, match=why):
            parse_throttle(bad)


def test_site_limit_is_a_gcra_on_the_sink_clock() -> None:
    """10/s, burst 3, on a hand-driven clock: three at once, then one per 0.1 s, whoever asks."""
    now = [100.0]
    stats = SinkStats()
    engine = FaultEngine(FaultConfig(site_rate_limit=RateLimit(rate=10.0, burst=3.0)), GMAIL, "mx", None,  # type: ignore[arg-type]
                         stats, lambda: now[0])  # fmt: skip
    ips = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    first = [engine.mail(ips[i % 3], b"a@x.test", "Q") for i in range(5)]
    assert [r is None for r in first] == [True, True, True, False, False]
    refusal = first[3]
    assert refusal is not None and refusal.code == 421 and b"4.7.28" in refusal.wire and refusal.close
    now[0] += 0.1
    assert engine.mail("127.0.0.9", b"a@x.test", "Q") is None  # one more token, for anybody
    assert engine.mail("127.0.0.2", b"a@x.test", "Q") is not None
    now[0] += 1.0
    assert [engine.mail(ips[0], b"a@x.test", "Q") is None for _ in range(4)] == [True, True, True, False]
    assert stats.faults["site_rate_limit"] == 4 and stats.throttled == 4


# ------------------------------------------------------------- real clients


@pytest.mark.parametrize(("profile", "code", "enhanced"), [("default", 450, "4.7.1"), ("gmail", 421, "4.7.28")])
def test_site_limit_holds_the_accepted_rate_of_all_clients_together(run, profile: str, code: int,
                                                                    enhanced: str) -> None:  # fmt: skip
    rate, burst, seconds = 100.0, 5.0, 2.0

    async def main() -> None:
        faults = FaultConfig(site_rate_limit=RateLimit(rate=rate, burst=burst))
        async with sink(ListenerConfig(profile=profile), faults=faults, starttls=False) as (server, [addr]):
            senders = [Sender(addr, src) for src in SOURCES for _ in range(3)]  # 9 clients, 3 addresses
            t0 = time.monotonic()
            await asyncio.wait_for(asyncio.gather(*(s.run(seconds) for s in senders)), seconds + 20)
            took = time.monotonic() - t0
            stats = server.stats
            accepted = stats.messages
            refused = [r for s in senders for r in s.refused]
            # Never more than the rate over the window plus the burst, all addresses together ...
            assert accepted <= rate * took + burst + 1, (accepted, took)
            # ... and the clients offered more than that, so the sink held them at about the rate.
            assert accepted >= rate * seconds * 0.8, (accepted, took)
            assert refused and {c for c, _ in refused} == {code}
            assert all(m.startswith(enhanced) for _, m in refused)
            assert accepted == sum(s.sent for s in senders)
            # Every address got a share: the limit is the site's, not one client's.
            assert all(stats.per_ip[src].messages > 0 for src in SOURCES)
            # Counted, for "throttle replies per 1,000 delivered".
            assert stats.faults["site_rate_limit"] == len(refused) == stats.throttled
            doc = server.stats_dict()
            assert doc["throttled"] == len(refused)
            assert doc["throttled_per_1000_messages"] == pytest.approx(len(refused) * 1000 / accepted)

    run(main())


def test_throttle_rule_answers_4728_to_one_source_address_only(run) -> None:
    """The cluster test's sink: the node on 127.0.0.2 is rate limited (gmail 421 4.7.28), .3 and .4 are not."""

    async def main() -> None:
        faults = FaultConfig(throttle=(ThrottleRule("127.0.0.2"),))
        async with sink(ListenerConfig(profile="gmail"), faults=faults, starttls=False) as (server, [addr]):
            senders = {src: Sender(addr, src) for src in SOURCES}
            for _ in range(5):
                for s in senders.values():
                    await s.send_one()
            for s in senders.values():
                await s.close()
        throttled = senders["127.0.0.2"]
        assert throttled.sent == 0 and len(throttled.refused) == 5
        assert all(code == 421 and m.startswith("4.7.28 [127.0.0.2]") for code, m in throttled.refused)
        assert all(senders[src].sent == 5 and not senders[src].refused for src in ("127.0.0.3", "127.0.0.4"))
        assert server.stats.faults["throttle_ip"] == 5 and server.stats.messages == 10
        assert server.stats.per_ip["127.0.0.2"].connections == 5  # a 421 closes: it reconnected each time

    run(main())


def test_throttle_rule_for_a_while_then_the_address_passes(run) -> None:
    async def main() -> None:
        faults = FaultConfig(throttle=(ThrottleRule("127.0.0.0/30", 0.4),))  # .0-.3: .2 and .3, not .4
        async with sink(ListenerConfig(profile="gmail"), faults=faults, starttls=False) as (server, [addr]):
            a, b = Sender(addr, "127.0.0.2"), Sender(addr, "127.0.0.4")
            assert not await a.send_one() and await b.send_one()
            await asyncio.sleep(0.15)
            assert not await a.send_one()  # within 0.4 s of its first MAIL
            await asyncio.sleep(0.35)
            assert await a.send_one() and await a.send_one()  # the window is over
            c = Sender(addr, "127.0.0.3")  # its own window starts at its own first MAIL
            assert not await c.send_one()
            for s in (a, b, c):
                await s.close()
        assert server.stats.faults["throttle_ip"] == 3 and server.stats.messages == 3

    run(main())


def test_cli_site_limit_and_throttle_ip_in_the_stats(tmp_path: Path) -> None:
    stats_file = tmp_path / "stats.json"
    proc = start_sink_process(
        "--listen", "127.0.0.1:0", "--profile", "gmail", "--no-starttls", "--stats-json", str(stats_file),
        "--site-rate-limit", "2/s:3", "--throttle-ip", "127.0.0.4",
    )  # fmt: skip
    codes: dict[str, list[int]] = {"127.0.0.3": [], "127.0.0.4": []}
    try:
        host, port = proc.addresses[0]
        for src, codes_of in codes.items():
            for _ in range(6):
                s = smtplib.SMTP(host, port, timeout=TIMEOUT, source_address=(src, 0))
                try:
                    s.sendmail("a@example.com", ["b@example.org"], MSG)
                    codes_of.append(250)
                except smtplib.SMTPSenderRefused as e:
                    codes_of.append(e.smtp_code)
                    assert b"4.7.28" in e.smtp_error
                finally:
                    s.close()
    finally:
        assert proc.stop(signal.SIGTERM) == 0
    assert codes["127.0.0.4"] == [421] * 6  # the throttled address: always
    assert codes["127.0.0.3"][:3] == [250] * 3 and 421 in codes["127.0.0.3"]  # the burst, then the site's rate
    doc = json.loads(stats_file.read_text())
    accepted = codes["127.0.0.3"].count(250)
    assert doc["messages"] == accepted
    assert doc["faults"]["throttle_ip"] == 6 and doc["faults"]["site_rate_limit"] == 6 - accepted
    assert doc["throttled"] == 12 - accepted
    assert doc["throttled_per_1000_messages"] == pytest.approx((12 - accepted) * 1000 / accepted)
