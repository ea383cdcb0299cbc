"""`fastmta send` runs `fastmta check` on each campaign before it starts: errors refuse it unless --force."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fastmta.cli.sinkproc import embedded_sink

pytestmark = pytest.mark.interop


def _campaign(spool: Path, from_header: str) -> None:
    spool.mkdir()
    (spool / "r.csv").write_text("email\na@d1.example\nb@d2.example\n")
    (spool / "c.toml").write_text(
        '[campaign]\nid = "c1"\nsender = "news@sender.example"\nrecipients = "r.csv"\n'
        '[template]\ntext = "hello, unsubscribe: https://sender.example/u"\n[template.headers]\n'
        f'From = "{from_header}"\nTo = "<{{{{ email }}}}>"\nSubject = "news"\n'
        'List-Unsubscribe = "<https://sender.example/u?e={{ email | urlencode }}>"\n'
        'List-Unsubscribe-Post = "List-Unsubscribe=One-Click"\n'
    )


def _send(spool: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    with embedded_sink() as (host, port):
        r = subprocess.run([sys.executable, "-m", "fastmta", "send", str(spool), "--relay", f"{host}:{port}", "--quiet",
                            "--summary-json", str(spool.parent / "s.json"), *extra],
                           capture_output=True, text=True, timeout=120)
    return r, json.loads((spool.parent / "s.json").read_text())


def test_a_campaign_with_check_errors_is_refused_and_forced(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    # A display name that shows another address: a phishing look, an error for `fastmta check`.
    _campaign(spool, '\\"support@bank.example\\" <news@sender.example>')
    r, summary = _send(spool)
    assert r.returncode == 3, r.stderr
    assert summary["delivered"] == 0 and summary["recipients"] == 0
    assert "fastmta check found" in summary["rejected"][0]["reason"]
    assert "display name" in r.stderr
    r, summary = _send(spool, "--force")
    assert r.returncode == 0, r.stderr
    assert summary["delivered"] == 2


def test_a_clean_campaign_goes_without_a_word(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    _campaign(spool, "News <news@sender.example>")
    r, summary = _send(spool)
    assert r.returncode == 0, r.stderr
    assert summary["delivered"] == 2
