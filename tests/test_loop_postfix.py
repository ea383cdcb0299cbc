"""The whole loop with a receiving MTA nobody here wrote: send -> Postfix bounces -> DSN -> suppression -> skip.

A private Postfix instance on loopback is the recipients' mail server for
rcv.example: it accepts every message from fastmta (250 at end of data), then
fails local delivery for some recipients, so **Postfix itself** writes the
RFC 3464 bounces and mails them to each message's envelope sender: fastmta's
signed return path on bounces.sender.example, which Postfix relays to
`fastmta serve`'s SMTP listener. A greylisted recipient is deferred by Postfix
(4xx, retried), never bounced. Then a second campaign to the same list is
dropped in the pickup directory: the bounced recipients are skipped.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from postfix_private import private_postfix
from serveproc import serve_config, served

pytestmark = pytest.mark.interop

SECRET = b"fedcba9876543210fedcba9876543210"
GOOD = [f"good{i}@rcv.example" for i in range(6)]
BAD = [f"bad{i}@rcv.example" for i in range(3)]
GREY = ["grey0@rcv.example"]


def _campaign(pickup: Path, cid: str, rows: list[str]) -> None:
    job = pickup / f".{cid}.toml.tmp"
    (pickup / f"{cid}.csv").write_text("email,name\n" + "".join(f"{r},N{i}\n" for i, r in enumerate(rows)))
    job.write_text(
        f'[campaign]\nid = "{cid}"\nsender = "news@sender.example"\nrecipients = "{cid}.csv"\n\n'
        '[template]\ntext = "Hello {{ name }}"\n\n[template.headers]\n'
        'From = "News <news@sender.example>"\nTo = "<{{ email }}>"\nSubject = "news"\n'
        'List-Unsubscribe = "<https://sender.example/u?e={{ email | urlencode }}>"\n'
        'List-Unsubscribe-Post = "List-Unsubscribe=One-Click"\n'
    )
    job.rename(pickup / f"{cid}.toml")


def test_postfix_bounces_come_back_suppress_and_the_next_campaign_skips_them(tmp_path: Path) -> None:
    data, pickup = tmp_path / "data", tmp_path / "pickup"
    pickup.mkdir()
    secret = tmp_path / "rp.secret"
    secret.write_bytes(SECRET)
    transport = {r: "error:5.1.1 mailbox unavailable" for r in BAD}
    transport.update({r: "retry:4.2.1 greylisted, try again later" for r in GREY})
    transport["rcv.example"] = "discard:delivered"
    with private_postfix(None, main_cf={
        "mydestination": "rcv.example",
        "smtpd_reject_unlisted_recipient": "no",
        "transport_maps": "texthash:$config_directory/transport",
        "bounce_queue_lifetime": "1d",
    }, maps={"transport": transport}) as pf:
        extra = (f'[return_path]\ndomain = "bounces.sender.example"\nsecret_file = "{secret}"\n'
                 f'[routing.static]\n"*" = ["{pf.host}:{pf.port}"]\n'
                 '[queue]\nretry_initial = 1.0\n')
        cfg = tmp_path / "fastmta.toml"
        cfg.write_text(serve_config(data, None, extra=extra, http=False) +
                       f'[serve.pickup]\ndirectory = "{pickup}"\nsettle = 0\ninterval = 0.2\n')
        with served(cfg, data) as svc:
            host, port = svc.smtp
            # Postfix's bounces go to the return path's domain: relayed to fastmta's listener.
            pf.postconf({"relayhost": f"[{host}]:{port}", "default_transport": "smtp"})
            _campaign(pickup, "first", GOOD + BAD + GREY)
            records = svc.wait_accounting(
                lambda rs: sum(r["status"] == "oob_bounce" for r in rs) >= len(BAD)
                and sum(r["status"] == "delivered" for r in rs) >= len(GOOD + BAD + GREY), timeout=90)
            bounces = [r for r in records if r["status"] == "oob_bounce"]
            assert sorted(r["recipient"] for r in bounces) == sorted(BAD), pf.log_tail()
            assert all(r["verified"] and r["campaign"] == "first" and r["bounce_type"] == "hard" for r in bounces)
            assert all(r.get("suppressed") == "global" for r in bounces)
            # Postfix took every message (250): the bounces were its own, after acceptance.
            first = {r["recipient"] for r in records if r["status"] == "delivered"}
            assert first == set(GOOD + BAD + GREY)

            _campaign(pickup, "second", GOOD + BAD + GREY)
            records = svc.wait_accounting(
                lambda rs: sum(r["status"] == "suppressed" for r in rs) >= len(BAD)
                and sum(r["status"] == "delivered" for r in rs) >= 2 * len(GOOD + GREY) + len(BAD), timeout=60)
            time.sleep(1.0)  # anything (wrongly) sent to the bounced addresses would have arrived by now
            records = svc.accounting()
            log = pf.log_text()
    second = [r for r in records if r.get("job") == "second"]
    assert sorted(r["recipient"] for r in second if r["status"] == "suppressed") == sorted(BAD)
    assert {r["recipient"] for r in second if r["status"] == "delivered"} == set(GOOD + GREY)
    # Counted at the receiver: each bad address reached Postfix exactly once (the first campaign).
    for r in BAD:
        assert log.count(f"to=<{r}>") == 1, r
    # The greylisted recipient was deferred by Postfix, never bounced, never suppressed.
    assert "grey0@rcv.example" not in {r["recipient"] for r in records if r["status"] in ("oob_bounce", "suppressed")}
