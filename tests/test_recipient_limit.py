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
