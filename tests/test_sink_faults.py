"""Every sink fault and every provider profile, exercised by real clients.

aiosmtplib where a normal sender's view is the point (which exception, which
code), the raw client where the bytes and the timing are.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiosmtplib
import pytest

from fastmta.sink.config import FaultConfig, ListenerConfig, PhaseFault, RateLimit
from test_sink_support import RawClient, captures, sink, wait_for

MSG = b"Subject: t\r\n\r\nhello\r\n"


async def _transaction(c: RawClient, rcpts: list[bytes], sender: bytes = b"a@example.com") -> list[int]:
    await c.send(b"MAIL FROM:<" + sender + b">\r\n" + b"".join(b"RCPT TO:<" + r + b">\r\n" for r in rcpts))
    return [r.code for r in await c.replies(1 + len(rcpts))]


# ------------------------------------------------------------ per-phase replies


@pytest.mark.parametrize(
    ("phase", "code", "expected_exc"),
    [
        ("ehlo", 554, aiosmtplib.SMTPHeloError),
        ("mail", 451, aiosmtplib.SMTPSenderRefused),
        ("rcpt", 550, aiosmtplib.SMTPRecipientsRefused),
        ("data", 554, aiosmtplib.SMTPDataError),
        ("eod", 552, aiosmtplib.SMTPDataError),
    ],
)
def test_phase_fault_seen_by_aiosmtplib(run, phase: str, code: int, expected_exc: type[Exception]) -> None:
    async def main() -> None:
        faults = FaultConfig(replies=(PhaseFault(phase, 1.0, code),))  # type: ignore[arg-type]
        async with sink(faults=faults) as (server, [(host, port)]):
            smtp = aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=10)
            await smtp.connect()
            with pytest.raises(expected_exc) as info:
                await smtp.sendmail("a@example.com", ["b@example.org"], MSG)
            err = info.value
            codes = (
                [e.code for e in err.recipients]  # type: ignore[attr-defined]
                if isinstance(err, aiosmtplib.SMTPRecipientsRefused)
                else [err.code]  # type: ignore[attr-defined]
            )
            assert codes == [code]
            smtp.close()
            await wait_for(lambda: server.stats.active_connections == 0)
        assert server.stats.messages == 0
        assert server.stats.faults[phase] >= 1
        assert server.stats.replies[code] >= 1

    run(main())


def test_phase_fault_with_own_text(run) -> None:
    async def main() -> None:
        faults = FaultConfig(replies=(PhaseFault("rcpt", 1.0, 452, "4.2.2 Mailbox full"),))
        async with sink(faults=faults) as (_, [addr]):
            c = await RawClient.connect(addr)
            await c.cmd(b"EHLO x")
            assert (await c.cmd(b"MAIL FROM:<a@example.com>")).code == 250
            r = await c.cmd(b"RCPT TO:<b@example.org>")
            assert (r.code, r.enhanced, r.text) == (452, "4.2.2", "Mailbox full")
            await c.close()

    run(main())


def test_connect_421_hangs_up(run) -> None:
    async def main() -> None:
        faults = FaultConfig(replies=(PhaseFault("connect", 1.0, 421),))
        async with sink(faults=faults) as (server, [(host, port)]):
            smtp = aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=10)
            with pytest.raises(aiosmtplib.SMTPConnectError) as info:
                await smtp.connect()
            assert "421" in str(info.value)
            c = await RawClient.connect((host, port), greeting=False)
            [r] = await c.replies(1)
            assert r.code == 421
            assert await c.closed_by_server()
            await wait_for(lambda: server.stats.active_connections == 0)
        assert server.stats.faults["connect"] == 2

    run(main())


def test_connect_554_refuses_every_command_but_quit(run) -> None:
    async def main() -> None:
        faults = FaultConfig(replies=(PhaseFault("connect", 1.0, 554, "5.7.1 No SMTP service here"),))
        async with sink(faults=faults) as (_, [addr]):
            c = await RawClient.connect(addr, greeting=False)
            [r] = await c.replies(1)
            assert (r.code, r.text) == (554, "No SMTP service here")
            assert (await c.cmd(b"EHLO x")).code == 503
            assert (await c.cmd(b"MAIL FROM:<a@example.com>")).code == 503
            assert (await c.cmd(b"QUIT")).code == 221
            assert await c.closed_by_server()

    run(main())


def test_rcpt_421_disconnects_mid_transaction(run) -> None:
    async def main() -> None:
        faults = FaultConfig(replies=(PhaseFault("rcpt", 1.0, 421),))
        async with sink(faults=faults) as (server, [addr]):
            c = await RawClient.connect(addr)
            await c.cmd(b"EHLO x")
            # Pipelined: the RCPT after the 421 is never answered.
            await c.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nRCPT TO:<c@example.org>\r\n")
            replies = await c.replies(2)
            assert [r.code for r in replies] == [250, 421]
            assert await c.closed_by_server()
            assert c.pending == []
            await wait_for(lambda: server.stats.active_connections == 0)
        assert server.stats.recipients == 0

    run(main())


def test_probabilities_and_seed_reproducibility(run) -> None:
    rcpts = [b"r%d@example.org" % i for i in range(60)]

    async def codes_with(seed: int) -> list[int]:
        faults = FaultConfig(replies=(PhaseFault("rcpt", 0.3, 450), PhaseFault("rcpt", 0.2, 550)))
        async with sink(faults=faults, seed=seed, max_errors=1000) as (server, [addr]):
            c = await RawClient.connect(addr)
            await c.cmd(b"EHLO x")
            codes = (await _transaction(c, rcpts))[1:]
            await c.close()
            assert server.stats.recipients == codes.count(250)
            assert server.stats.faults["rcpt"] == len(codes) - codes.count(250)
            return codes

    async def main() -> None:
        first = await codes_with(7)
        again = await codes_with(7)
        other = await codes_with(8)
        assert first == again
        assert first != other
        # Both faults fire and most recipients still pass at these rates.
        assert {250, 450, 550} <= set(first)
        assert 20 < first.count(250) < 55

    run(main())


# ------------------------------------------------------------------- tarpit


def test_delays_keep_pipelined_replies_in_order(run) -> None:
    async def main() -> None:
        faults = FaultConfig(delays=(("rcpt", 0.15), ("connect", 0.2)))
        async with sink(faults=faults) as (server, [addr]):
            t0 = time.monotonic()
            c = await RawClient.connect(addr)
            assert time.monotonic() - t0 >= 0.19
            await c.cmd(b"EHLO x")
            t1 = time.monotonic()
            await c.send(
                b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n"
                b"RCPT TO:<bad address>\r\nRCPT TO:<c@example.org>\r\nDATA\r\n"
            )
            replies = await c.replies(5)
            elapsed = time.monotonic() - t1
            assert [r.code for r in replies] == [250, 250, 501, 250, 354]
            assert elapsed >= 0.29  # two delayed RCPT replies, one after the other
            await c.send(b"hi\r\n.\r\n")
            assert (await c.replies(1))[0].code == 250
            await c.close()
        assert server.stats.messages == 1

    run(main())


# ------------------------------------------------------- caps and rate limits


def test_max_connections_per_ip(run) -> None:
    async def main() -> None:
        faults = FaultConfig(max_connections_per_ip=2)
        async with sink(ListenerConfig(profile="outlook"), faults=faults) as (server, [addr]):
            a = await RawClient.connect(addr)
            b = await RawClient.connect(addr)
            c = await RawClient.connect(addr, greeting=False)
            [r] = await c.replies(1)
            assert (r.code, r.enhanced) == (421, "4.3.2")
            assert "maximum number of concurrent server connections" in r.text
            assert await c.closed_by_server()
            await a.cmd(b"QUIT")
            assert await a.closed_by_server()
            await wait_for(lambda: server.stats.active_connections == 1)
            d = await RawClient.connect(addr)  # a slot is free again
            assert (await d.cmd(b"EHLO x")).code == 250
            await b.close()
            await d.close()
        assert server.stats.faults["max_connections"] == 1
        assert server.stats.max_concurrent_connections == 3

    run(main())


@pytest.mark.parametrize(
    ("profile", "code", "enhanced", "marker", "disconnects"),
    [
        ("default", 450, "4.7.1", "rate limit", False),
        ("gmail", 421, "4.7.28", "unusual rate", True),
        ("yahoo", 421, "4.7.0", "[TSS04]", True),
        ("outlook", 451, "4.7.650", "(S775)", False),
    ],
)
def test_rate_limit_with_provider_text(
    run, profile: str, code: int, enhanced: str, marker: str, disconnects: bool
) -> None:
    async def main() -> None:
        faults = FaultConfig(rate_limit=RateLimit(rate=5.0, burst=2.0))
        async with sink(ListenerConfig(profile=profile), faults=faults) as (server, [addr]):
            c = await RawClient.connect(addr)
            await c.cmd(b"EHLO x")
            for _ in range(2):  # the burst
                assert (await c.cmd(b"MAIL FROM:<a@example.com>")).code == 250
                assert (await c.cmd(b"RSET")).code == 250
            r = await c.cmd(b"MAIL FROM:<a@example.com>")
            assert (r.code, r.enhanced) == (code, enhanced)
            assert marker in r.text
            assert "127.0.0.1" in r.text or profile == "default"
            if disconnects:
                assert await c.closed_by_server()
                c = await RawClient.connect(addr)
                await c.cmd(b"EHLO x")
            await asyncio.sleep(0.25)  # > 1 token at 5/s
            assert (await c.cmd(b"MAIL FROM:<a@example.com>")).code == 250
            await c.close()
        assert server.stats.faults["rate_limit"] == 1
        assert server.stats.transactions == 3

    run(main())


# ------------------------------------------------- greylisting, unknown users


def test_greylisting_first_try_per_triple(run) -> None:
    async def main() -> None:
        faults = FaultConfig(greylist=True, greylist_seconds=0.2)
        async with sink(faults=faults) as (server, [addr]):
            c = await RawClient.connect(addr)
            await c.cmd(b"EHLO x")
            codes = await _transaction(c, [b"b@example.org", b"c@example.org"])
            assert codes == [250, 450, 450]
            assert (await c.cmd(b"RSET")).code == 250
            # Too early: still greylisted.
            assert await _transaction(c, [b"b@example.org"]) == [250, 450]
            assert (await c.cmd(b"RSET")).code == 250
            await asyncio.sleep(0.25)
            # Retried late enough: passes; a new sender is a new triple.
            assert await _transaction(c, [b"B@example.org", b"c@example.org"]) == [250, 250, 250]
            assert (await c.cmd(b"RSET")).code == 250
            assert await _transaction(c, [b"b@example.org"], sender=b"other@example.com") == [250, 450]
            r = await c.cmd(b"RCPT TO:<x@example.org>")
            assert (r.code, r.enhanced) == (450, "4.7.1")
            await c.close()
        assert server.stats.faults["greylist"] == 5

    run(main())


def test_unknown_recipients_by_pattern(run) -> None:
    async def main() -> None:
        faults = FaultConfig(unknown_recipients=("nobody*@*", "*@gone.example"))
        async with sink(ListenerConfig(profile="gmail"), faults=faults) as (server, [addr]):
            c = await RawClient.connect(addr)
            await c.cmd(b"EHLO x")
            await c.send(
                b"MAIL FROM:<a@example.com>\r\nRCPT TO:<NoBody7@example.org>\r\n"
                b"RCPT TO:<someone@gone.example>\r\nRCPT TO:<real@example.org>\r\n"
            )
            replies = await c.replies(4)
            assert [r.code for r in replies] == [250, 550, 550, 250]
            assert replies[1].enhanced == "5.1.1"
            assert "does not exist" in replies[1].text and "gsmtp" in replies[1].text
            await c.close()
        assert server.stats.faults["unknown_recipient"] == 2

    run(main())


def test_appliance_rejects_user_unknown_after_content_scan(run, tmp_path: Path) -> None:
    async def main() -> None:
        faults = FaultConfig(unknown_recipients=("nobody*@*",))
        async with sink(ListenerConfig(profile="appliance"), faults=faults, capture_dir=tmp_path) as (
            server,
            [(host, port)],
        ):
            async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=10) as smtp:
                # Every recipient is accepted at RCPT time...
                with pytest.raises(aiosmtplib.SMTPDataError) as info:
                    await smtp.sendmail("a@example.com", ["real@b2b.example", "nobody@b2b.example"], MSG)
                # ...and the whole message refused after the content was read.
                assert (info.value.code, info.value.message) == (550, "5.1.1 user unknown")
                errors, _ = await smtp.sendmail("a@example.com", ["real@b2b.example"], MSG)
                assert errors == {}
            await wait_for(lambda: server.stats.active_connections == 0)
        assert server.stats.recipients == 3
        assert server.stats.messages == 1 and server.stats.rejected_messages == 1
        assert len(captures(tmp_path)) == 1

    run(main())


# ----------------------------------------------------------------- profiles


@pytest.mark.parametrize(
    ("profile", "greeting_marker", "ok_marker"),
    [
        ("default", "ESMTP fastmta sink", "Ok: queued as"),
        ("gmail", "gsmtp", "gsmtp"),
        ("yahoo", "yahoodns.net", "ok dirdel"),
        ("outlook", "Microsoft ESMTP MAIL Service", "Queued mail for delivery"),
        ("appliance", "Mail Gateway", "Message accepted for delivery"),
    ],
)
def test_profile_texts_seen_by_aiosmtplib(run, profile: str, greeting_marker: str, ok_marker: str) -> None:
    async def main() -> None:
        async with sink(ListenerConfig(profile=profile)) as (server, [(host, port)]):
            smtp = aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=10)
            greeting = await smtp.connect()
            assert greeting.code == 220 and greeting_marker in greeting.message
            errors, reply = await smtp.sendmail("a@example.com", ["b@example.org"], MSG)
            assert errors == {} and ok_marker in reply
            await smtp.quit()
            await wait_for(lambda: server.stats.active_connections == 0)
        assert server.stats.messages == 1

    run(main())


def test_each_listener_has_its_own_profile(run) -> None:
    async def main() -> None:
        listeners = (ListenerConfig(profile="gmail"), ListenerConfig(profile="yahoo"))
        faults = FaultConfig(rate_limit=RateLimit(rate=0.001, burst=1.0))
        async with sink(*listeners, faults=faults) as (server, [gmail, yahoo]):
            for addr, marker in ((gmail, "4.7.28"), (yahoo, "[TSS04]")):
                c = await RawClient.connect(addr)
                await c.cmd(b"EHLO x")
                assert (await c.cmd(b"MAIL FROM:<a@example.com>")).code == 250
                await c.cmd(b"RSET")
                r = await c.cmd(b"MAIL FROM:<a@example.com>")
                assert r.code == 421 and marker in " ".join(r.lines)
                await c.close()
            # Each listener keeps its own bucket: both allowed one message.
            assert server.stats.transactions == 2
            assert [lst["profile"] for lst in server.stats_dict()["listeners"]] == ["gmail", "yahoo"]

    run(main())
