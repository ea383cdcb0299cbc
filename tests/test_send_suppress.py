"""`fastmta send --suppressions DB`: the list kept by `fastmta suppress` (or fastmta serve) is checked at intake."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fastmta.cli.sinkproc import embedded_sink
from test_send import small_campaign

pytestmark = pytest.mark.interop


def fastmta(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fastmta", *args], capture_output=True, text=True, timeout=300)


def test_suppressed_recipients_of_a_campaign_are_recorded_and_never_sent(tmp_path: Path) -> None:
    db = tmp_path / "suppression.db"
    addresses = [f"user{i}@d{i % 3}.example" for i in range(12)]
    rows = [f"{a},F{i},L,u{i},2026-01-01" for i, a in enumerate(addresses)]
    assert fastmta("suppress", "--db", str(db), "add", "user3@d0.example").returncode == 0
    assert fastmta("suppress", "--db", str(db), "add", "user4@d1.example", "--scope", "list",
                   "--value", "other-list").returncode == 0  # another list: does not apply
    spool = tmp_path / "spool"
    small_campaign(spool, rows)
    capture = tmp_path / "capture"
    with embedded_sink(["--capture", str(capture)]) as (host, port):
        r = fastmta("send", str(spool), "--relay", f"{host}:{port}", "--quiet", "--suppressions", str(db),
                    "--accounting", str(tmp_path / "acct.jsonl"), "--summary-json", str(tmp_path / "s.json"))
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["suppressed"] == 1 and summary["delivered"] == len(addresses) - 1
    records = [json.loads(x) for x in (tmp_path / "acct.jsonl").read_text().splitlines()]
    sup = [x for x in records if x["status"] == "suppressed"]
    assert [x["recipient"] for x in sup] == ["user3@d0.example"]
    assert sup[0]["code"] == 550 and "global" in sup[0]["text"]
    received = sorted(p.read_bytes().split(b"X-Receiver: ")[1].split(b"\r\n")[0].decode() for p in capture.glob("*.eml"))
    assert received == sorted(a for a in addresses if a != "user3@d0.example")


def test_a_missing_suppression_database_is_a_usage_error(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    r = fastmta("send", str(spool), "--sink", "--quiet", "--suppressions", str(tmp_path / "nope.db"))
    assert r.returncode == 2 and "nope.db: no such file" in r.stderr
