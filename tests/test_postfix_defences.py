"""fastmta sending to a Postfix that defends itself as receivers in the wild do (found by an attack with private
Postfix instances: postscreen, postgrey, anvil, smtpd restrictions). What does not need postgrey or postscreen's
timing runs here against a real private Postfix; the replies of the others are checked as the classifier reads them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastmta.delivery.config import config_from_dict
from fastmta.feedback.classify import default_classifier
from postfix_private import private_postfix
from test_send import fastmta

pytestmark = pytest.mark.interop


def test_a_receiver_refusing_a_non_fqdn_helo_gets_the_machine_s_name(tmp_path: Path) -> None:
    """The default EHLO name was "localhost": Postfix's reject_non_fqdn_helo_hostname answered 504 5.5.2 to
    every message (bounced, one connection each). Now the host name, as Postfix's own myhostname."""
    spool = tmp_path / "spool"
    spool.mkdir()
    for i in range(5):
        (spool / f"m{i}.eml").write_bytes(f"X-Sender: news@sender.example\r\nX-Receiver: u{i}@rcv.example\r\n"
                                          f"From: news@sender.example\r\nSubject: hi\r\n\r\nhello\r\n".encode())
    with private_postfix(None, main_cf={
        "mydestination": "rcv.example",
        "smtpd_reject_unlisted_recipient": "no",
        "local_transport": "discard:delivered",
        "smtpd_helo_required": "yes",
        "smtpd_helo_restrictions": "reject_non_fqdn_helo_hostname",
    }) as pf:
        cfg = tmp_path / "fastmta.toml"
        cfg.write_text(f'[routing.static]\n"*" = ["{pf.host}:{pf.port}"]\n[smtp]\ntls = "never"\n')
        acct = tmp_path / "acct.jsonl"
        out = fastmta("send", str(spool), "--config", str(cfg), "--queue-dir", str(tmp_path / "q"),
                      "--accounting", str(acct), "--quiet", timeout=90)
        log = pf.log_text()
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in acct.read_text().splitlines()]
    assert sorted(r["recipient"] for r in records if r["status"] == "delivered") == [f"u{i}@rcv.example" for i in range(5)]
    assert "Helo command rejected" not in log
    helo = config_from_dict({"sources": [{"name": "a"}]}).sources[0].ehlo_name
    assert "." in helo and helo != "localhost"


@pytest.mark.parametrize(("reply", "category", "scope", "site_paced", "retry_after"), [
    # postscreen after its deep protocol tests: passed, come back on a new connection, at once.
    ("450 4.3.2 Service currently unavailable", "greylisted", "session", False, 10.0),
    # anvil's recipient rate from our address: the site's pace (it kept climbing, 393 deferrals for 1,500).
    ("450 4.7.1 Error: too many recipients from 192.0.2.7", "rate_limited", "site", True, 60.0),
    # smtpd's soft error limit ends a session of refused recipients: not a 30-minute policy hold.
    ("421 4.7.0 mx.example Error: too many errors", "protocol_error", "session", False, 60.0),
    # A per-transaction limit is still that.
    ("452 4.5.3 Error: too many recipients", "rate_limited", "message", False, 60.0),
])
def test_postfix_s_own_deferrals_are_read_for_what_they_ask(
        reply: str, category: str, scope: str, site_paced: bool, retry_after: float) -> None:
    c = default_classifier().classify_text(reply, phase="rcpt")
    assert (c.category.value, c.scope.value, c.site_paced, c.retry_after) == (category, scope, site_paced, retry_after)
