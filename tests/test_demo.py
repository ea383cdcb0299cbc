"""`fastmta demo` (the README's main job) and the command line's exit statuses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fastmta.examples import SPOOL
from fastmta.intake.pickup import read_pickup

ROOT = Path(__file__).resolve().parents[1]


def fastmta(*args: str, cwd: Path | str | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastmta", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


def example_recipients() -> int:
    with open(SPOOL / "recipients.csv", encoding="utf-8") as f:
        rows = sum(1 for _ in f) - 1
    return rows + sum(len(read_pickup(p).recipients) for p in SPOOL.glob("*.eml"))


def test_demo_delivers_the_shipped_example_from_any_directory(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    for run in range(2):  # a second demo starts afresh: nothing is appended to the first's record
        out = fastmta("demo", "--quiet", "--dir", str(work), cwd="/")
        assert out.returncode == 0, out.stderr[-2000:]
        summary = json.loads((work / "summary.json").read_text())
        expected = example_recipients()
        assert expected > 10_000
        assert summary["recipients"] == summary["delivered"] == expected, (run, summary)
        assert summary["unfinished"] == 0 and summary["rejected"] == []
        records = [json.loads(line) for line in (work / "accounting.jsonl").read_text().splitlines()]
        assert len(records) == expected
        assert {r["status"] for r in records} == {"delivered"}
        assert str(work / "summary.json") in out.stdout
    # The package's copy is never written to: the run happened in the copy.
    assert not (SPOOL / ".fastmta").exists()


def test_configuration_errors_exit_2_as_help_says(tmp_path: Path) -> None:
    bad = tmp_path / "fastmta.toml"
    bad.write_text("[queue]\nretry_intial = 60\n")  # misspelt key
    out = fastmta("send", str(SPOOL), "--sink", "--config", str(bad), "--quiet")
    assert out.returncode == 2, out.stderr
    assert "retry_intial" in out.stderr and "configuration error" in out.stderr

    out = fastmta("send", str(SPOOL), "--sink", "--quiet", "--accounting", str(ROOT / "README.md" / "acct.jsonl"))
    assert out.returncode == 2, out.stderr
    assert "--accounting" in out.stderr

    out = fastmta("send", str(tmp_path / "missing"), "--sink")
    assert out.returncode == 2 and "not a directory" in out.stderr

    out = fastmta("send", str(SPOOL), "--no-such-option")
    assert out.returncode == 2
    assert "exit status" in fastmta("send", "--help").stdout.lower()


def test_ctrl_c_during_send_with_the_builtin_sink_drains_into_it(tmp_path: Path) -> None:
    # A terminal's Ctrl-C signals the whole foreground process group: the
    # built-in sink must outlive the engine's drain, or every transaction in
    # flight turns into a false "connection refused" deferral.
    import os
    import signal
    import time

    summary = tmp_path / "s.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastmta", "send", str(SPOOL), "--sink", "--quiet", "--summary-json", str(summary)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    time.sleep(2.5)  # the sink is up and delivery under way (the example takes a few seconds)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    s = json.loads(summary.read_text())
    assert s["delivered"] > 0, err
    assert s["deferrals"] == 0, err[-2000:]
    assert "connection refused" not in err
    assert proc.returncode in (0, 1)  # 1 when the interrupt left recipients queued


def test_a_relay_host_that_does_not_resolve_is_a_configuration_error(tmp_path: Path) -> None:
    # Before: every recipient hard-bounced (550 5.4.4) and the run exited 0.
    from dnsserver import DNSServer

    zone = "relay  A  127.0.0.1\n"
    with DNSServer({"example.test": zone}) as ns:
        config = tmp_path / "fastmta.toml"
        config.write_text(f'[dns]\nnameservers = ["{ns.nameserver}"]\n')
        acct = tmp_path / "acct.jsonl"
        out = fastmta("send", str(SPOOL), "--relay", "rleay.example.test:2525", "--config", str(config),
                      "--quiet", "--accounting", str(acct), "--queue-dir", str(tmp_path / "q"))
        assert out.returncode == 2, out.stderr
        assert "--relay" in out.stderr and "rleay.example.test" in out.stderr
        assert not acct.exists() or acct.read_text() == ""  # nobody bounced
        assert ns.count("rleay.example.test", "A") >= 1  # asked our loopback server, nothing else
