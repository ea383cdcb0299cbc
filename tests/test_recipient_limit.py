"""A receiver that takes fewer recipients per transaction than we send: the rest go again at once.

Postfix's ``smtpd_recipient_limit`` (and sendmail's, Exchange's, many B2B
gateways') answers ``452 4.5.3 Error: too many recipients`` to every RCPT past
the limit. RFC 5321 4.5.3.1.10: the client should send those in another
transaction; it is not a deferral worth a retry timer. A private Postfix on
loopback (nobody here wrote it) with a limit of 5 receives a 23-recipient
message from ``fastmta send``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from fastmta.cli.sinkproc import embedded_sink
from postfix_private import private_postfix
from test_send import fastmta

pytestmark = pytest.mark.interop

RECIPIENTS = [f"user{i:02d}@rcv.example" for i in range(23)]


def test_recipients_over_the_servers_limit_go_again_in_new_transactions(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    head = "X-Sender: news@sender.example\r\n" + "".join(f"X-Receiver: {r}\r\n" for r in RECIPIENTS)
    (spool / "m.eml").write_bytes(
        (head + "From: news@sender.example\r\nTo: list@sender.example\r\nSubject: hi\r\n\r\nhello\r\n").encode())
    with private_postfix(None, main_cf={
        "mydestination": "rcv.example",
        "smtpd_reject_unlisted_recipient": "no",
        "local_transport": "discard:delivered",
        "smtpd_recipient_limit": "5",
    }) as pf:
        cfg = tmp_path / "fastmta.toml"
        # The retry timer is long, so only an immediate new transaction finishes within the bound.
        cfg.write_text(f'[routing.static]\n"*" = ["{pf.host}:{pf.port}"]\n[smtp]\ntls = "never"\n'
                       '[queue]\nretry_initial = 300\n')
        acct = tmp_path / "acct.jsonl"
        started = time.monotonic()
        out = fastmta("send", str(spool), "--config", str(cfg), "--queue-dir", str(tmp_path / "q"),
                      "--accounting", str(acct), "--quiet", timeout=90)
        took = time.monotonic() - started
        log = pf.log_text()
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in acct.read_text().splitlines()]
    delivered = [r["recipient"] for r in records if r["status"] == "delivered"]
    assert sorted(delivered) == RECIPIENTS
    # Each recipient reached Postfix exactly once, in 5 transactions of one session: all 23 were
    # offered, 5 taken; the 18 others then went as 5 + 5 + 5 + 3 (smtpd's summary: 5 MAILs, 41 RCPTs),
    # not all again to be cut again (23 + 18 + 13 + 8 + 3 = 65 RCPTs).
    assert " mail=5 rcpt=41 " in log, log[-3000:]
    for r in RECIPIENTS:
        assert log.count(f"to=<{r}>") == 1, r
    # What the receiver refused is on record as deferred (not bounced), with its reply.
    refused = [r for r in records if r["status"] == "deferred"]
    assert len(refused) == 18 and all((r["code"], r["enhanced"]) == (452, "4.5.3") for r in refused)
    # Not counted as attempts: the server never judged them.
    assert {r["attempts"] for r in records if r["status"] == "delivered"} == {1}
    assert not [r for r in records if r["status"] == "bounced"]
    assert took < 60, f"took {took:.0f} s: the rest waited for a retry timer"


def test_a_server_that_takes_one_recipient_at_a_time_gets_them_all_now(tmp_path: Path) -> None:
    # A limit of 1 and 50 recipients: 50 transactions. Counted as attempts, the refusals used up the
    # cap on immediate resends after 10 and the rest waited hours (retry_max) for the next try.
    spool = tmp_path / "spool"
    spool.mkdir()
    rcpts = [f"user{i:02d}@rcv.example" for i in range(50)]
    head = "X-Sender: news@sender.example\r\n" + "".join(f"X-Receiver: {r}\r\n" for r in rcpts)
    (spool / "m.eml").write_bytes((head + "From: news@sender.example\r\nSubject: hi\r\n\r\nhello\r\n").encode())
    acct = tmp_path / "acct.jsonl"
    with embedded_sink(["--no-starttls", "--max-recipients", "1"]) as (host, port):
        cfg = tmp_path / "fastmta.toml"
        cfg.write_text(f'[routing.static]\n"*" = ["{host}:{port}"]\n[smtp]\ntls = "never"\n'
                       '[queue]\nretry_initial = 300\n')
        out = fastmta("send", str(spool), "--config", str(cfg), "--queue-dir", str(tmp_path / "q"),
                      "--accounting", str(acct), "--quiet", timeout=90)
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in acct.read_text().splitlines()]
    delivered = [r for r in records if r["status"] == "delivered"]
    assert sorted(r["recipient"] for r in delivered) == rcpts
    assert {r["attempts"] for r in delivered} == {1}
    assert sum(r["status"] == "deferred" for r in records) == 49  # each refused once, then sent alone


def test_a_server_refusing_the_whole_transaction_over_its_limit_gets_it_in_smaller_ones(run_uvloop: Any) -> None:
    # Found by an interoperability attack against Exim (recipients_max = 20, recipients_max_reject):
    # RCPT 21+ get "552 too many recipients", then the whole transaction "554 Too many recipients" at
    # DATA. Every recipient was deferred and the same 25-recipient transaction retried until all
    # expired. Those it accepted at RCPT tell its limit: all go again now in transactions of 20, not
    # counted as attempts, and the site's later messages are split at 20 from the start.
    import asyncio

    from aiosmtpd.smtp import SMTP, Envelope, Session

    from fastmta.delivery.config import config_from_dict
    from fastmta.delivery.engine import Engine, Status

    class EximRejectsOverLimit:
        def __init__(self) -> None:
            self.delivered: list[list[str]] = []
            self.refused = 0

        async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                              options: list[str]) -> str:
            session.too_many = False  # type: ignore[attr-defined]
            envelope.mail_from = address
            return "250 OK"

        async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                              options: list[str]) -> str:
            if len(envelope.rcpt_tos) >= 20:
                session.too_many = True  # type: ignore[attr-defined]
                return "552 too many recipients"
            envelope.rcpt_tos.append(address)
            return "250 Accepted"

        async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
            if getattr(session, "too_many", False):
                self.refused += 1
                return "554 Too many recipients"
            self.delivered.append(list(envelope.rcpt_tos))
            return "250 OK id=1"

    async def main() -> tuple[EximRejectsOverLimit, list[Any]]:
        handler = EximRejectsOverLimit()
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: SMTP(handler), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        cfg = config_from_dict({"routing": {"static": {"*": [f"127.0.0.1:{port}"]}}, "smtp": {"tls": "never"},
                                "queue": {"retry_initial": 300}, "sites": {"*": {"adaptive": {"enabled": False}}}})
        outcomes = []
        async with server, Engine(cfg) as engine:
            for m in range(2):
                mid = await engine.submit(b"Subject: x\r\n\r\nhi\r\n", "s@a.test", [f"u{m}-{i:02d}@x.test" for i in range(25)])
                outcomes += await asyncio.wait_for(engine.result(mid), 20)
        return handler, outcomes

    handler, outcomes = run_uvloop(main())
    assert [o.status for o in outcomes] == [Status.DELIVERED] * 50 and {o.attempts for o in outcomes} == {1}
    assert [len(d) for d in handler.delivered] == [20, 5, 20, 5]  # each recipient once
    assert handler.refused == 1  # the second message was split before it was sent


def test_a_recipient_rate_limit_is_not_learned_as_a_transaction_size(run_uvloop: Any) -> None:
    # Found by an attack on the learning above: Postfix's smtpd_client_recipient_rate_limit says
    # "450 4.7.1 Error: too many recipients from <ip>" once a client's budget for the period is
    # spent. That is a rate, not a size: the site kept 3 recipients a transaction for good.
    import asyncio

    from aiosmtpd.smtp import SMTP, Envelope, Session

    from fastmta.delivery.config import config_from_dict
    from fastmta.delivery.engine import Engine

    class RecipientRate:
        def __init__(self) -> None:
            self.budget = 3

        async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                              options: list[str]) -> str:
            if self.budget <= 0:
                return "450 4.7.1 Error: too many recipients from 127.0.0.1"
            self.budget -= 1
            envelope.rcpt_tos.append(address)
            return "250 2.1.5 Ok"

        async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
            return "250 2.0.0 Ok"

    async def main() -> int:
        handler = RecipientRate()
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: SMTP(handler), "127.0.0.1", 0)
        cfg = config_from_dict({"routing": {"static": {"*": [f"127.0.0.1:{server.sockets[0].getsockname()[1]}"]}},
                                "smtp": {"tls": "never"}, "queue": {"retry_initial": 300},
                                "sites": {"*": {"adaptive": {"enabled": False}}}})
        async with server, Engine(cfg) as engine:
            mid = await engine.submit(b"Subject: x\r\n\r\nhi\r\n", "s@a.test", [f"a{i}@x.test" for i in range(10)])
            for _ in range(100):  # bounded: 10 s, until the 3 are delivered and the rest deferred
                if sum(engine.counts.values()) >= 10:
                    break
                await asyncio.sleep(0.1)
            assert engine.counts["delivered"] == 3
            del mid
            [queue] = engine._dispatch.queues.values()
            return queue.limits.max_recipients_per_transaction

    assert run_uvloop(main()) == 50  # the default: a rate says nothing of a transaction's size


def test_each_deferred_recipient_waits_as_long_as_its_own_reason_asks(run_uvloop: Any) -> None:
    # One transaction, two reasons: a full mailbox (its rule: try again in 4 hours) and greylisting (7
    # minutes). Scheduled together, the greylisted recipients waited the full mailbox's 4 hours.
    import asyncio

    from aiosmtpd.smtp import SMTP, Envelope, Session

    from fastmta.delivery.config import config_from_dict
    from fastmta.delivery.engine import Engine

    class Mixed:
        async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                              options: list[str]) -> str:
            if address.startswith("full"):
                return "452 4.2.2 Mailbox full"
            return "451 4.7.1 Greylisted, please try again later"

    async def main() -> dict[str, float]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: SMTP(Mixed()), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        cfg = config_from_dict({"routing": {"static": {"*": [f"127.0.0.1:{port}"]}}, "smtp": {"tls": "never"},
                                "queue": {"retry_initial": 60, "retry_jitter": 0.0, "retry_max": 14400},
                                "sites": {"*": {"adaptive": {"enabled": False}}}})
        async with server, Engine(cfg) as engine:
            await engine.submit(b"Subject: x\r\n\r\nhi\r\n", "s@a.test", ["grey1@x.test", "full@x.test", "grey2@x.test"])
            deadline = loop.time() + 20
            while engine.counts.get("deferred", 0) < 3 and loop.time() < deadline:
                await asyncio.sleep(0.05)
            assert engine._due is not None
            return {r.address: when - loop.time() for when, (_, rcpts) in engine._due.entries() for r in rcpts}

    waits = run_uvloop(main())
    assert set(waits) == {"grey1@x.test", "full@x.test", "grey2@x.test"}
    assert waits["grey1@x.test"] < 900 and waits["grey2@x.test"] < 900, waits  # greylisting's ~7 minutes
    assert waits["full@x.test"] > 3600, waits  # a full mailbox's hours
