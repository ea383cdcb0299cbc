"""``fastmta sink`` as a user runs it: a subprocess, its output, its signals, its files."""

from __future__ import annotations

import json
import signal
import smtplib
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from fastmta.cli import build_parser
from fastmta.sink.profiles import PROFILES
from test_sink_support import TIMEOUT, captures, read_capture, start_sink_process


def _sink_parser():  # type: ignore[no-untyped-def]
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices["sink"]  # type: ignore[attr-defined]


def test_help_documents_every_option_and_profile() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fastmta", "sink", "--help"], capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for action in _sink_parser()._actions:
        for option in action.option_strings:
            assert option in text, option
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings} has no help text"
    for profile in PROFILES.values():
        assert profile.name in text and profile.description in text
    for phase in ("connect", "ehlo", "mail", "rcpt", "data", "eod"):
        assert phase in text


def test_sigterm_writes_stats_and_exits_cleanly(tmp_path: Path) -> None:
    stats_file = tmp_path / "stats.json"
    proc = start_sink_process(
        "--listen", "127.0.0.1:0", "--listen", "127.0.0.1:0=gmail", "--stats-json", str(stats_file),
        listeners=2,
    )  # fmt: skip
    try:
        (h1, p1), (h2, p2) = proc.addresses
        assert p1 != p2 and p1 > 0 and p2 > 0
        with smtplib.SMTP(h1, p1, timeout=TIMEOUT) as s:
            s.sendmail("a@example.com", ["b@example.org", "c@example.org"], b"Subject: 1\r\n\r\nx\r\n")
        with smtplib.SMTP(h2, p2, timeout=TIMEOUT) as s:
            code, banner = s.ehlo()
            assert b"at your service" in banner
            refused = s.sendmail("a@example.com", ["d@example.org"], b"Subject: 2\r\n\r\nyy\r\n")
            assert refused == {}
    finally:
        code = proc.stop(signal.SIGTERM)
    assert code == 0, proc.proc.stderr.read() if proc.proc.stderr else ""
    stats = json.loads(stats_file.read_text())
    assert stats["messages"] == 2 and stats["recipients"] == 3 and stats["transactions"] == 2
    assert stats["connections"] == 2 and stats["active_connections"] == 0
    assert stats["max_concurrent_connections"] == 1
    assert stats["replies"]["354"] == 2 and stats["replies"]["221"] == 2
    assert stats["per_ip"]["127.0.0.1"]["messages"] == 2
    assert stats["bytes"] == len(b"Subject: 1\r\n\r\nx\r\n") + len(b"Subject: 2\r\n\r\nyy\r\n")
    assert [lst["profile"] for lst in stats["listeners"]] == ["default", "gmail"]


def test_sigint_also_writes_stats(tmp_path: Path) -> None:
    stats_file = tmp_path / "s.json"
    proc = start_sink_process("--stats-json", str(stats_file))
    assert proc.addresses[0][0] == "127.0.0.1"  # the default address
    assert proc.stop(signal.SIGINT) == 0
    assert json.loads(stats_file.read_text())["connections"] == 0


def test_capture_starttls_and_faults_from_the_command_line(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    capture = tmp_path / "mail"
    proc = start_sink_process(
        "--capture", str(capture), "--tls-cert-out", str(cert), "--seed", "1",
        "--fault", "rcpt:1.0:452 4.2.2 Mailbox full", "--unknown-recipient", "nobody*@*",
        "--max-size", "10000",
    )  # fmt: skip
    try:
        [(host, port)] = proc.addresses
        ctx = ssl.create_default_context(cafile=str(cert))
        with smtplib.SMTP(host, port, timeout=TIMEOUT) as s:
            s.ehlo()
            assert s.has_extn("size") and s.esmtp_features["size"] == "10000"
            s.starttls(context=ctx)
            s.ehlo()
            code, _ = s.mail("a@example.com")
            assert code == 250
            assert s.rcpt("nobody@example.org") == (550, b"5.1.1 <nobody@example.org>: Recipient address rejected: User unknown in local recipient table")
            assert s.rcpt("b@example.org") == (452, b"4.2.2 Mailbox full")
    finally:
        assert proc.stop() == 0
    assert captures(capture) == []


def test_capture_files_are_pickup_format(tmp_path: Path) -> None:
    capture = tmp_path / "mail"
    proc = start_sink_process("--capture", str(capture), "--no-starttls")
    try:
        [(host, port)] = proc.addresses
        with smtplib.SMTP(host, port, timeout=TIMEOUT) as s:
            s.ehlo()
            assert not s.has_extn("starttls")
            s.sendmail("", ["x@example.org", "y@example.org"], b"Subject: bounce\r\n\r\n.dot\r\n")
    finally:
        assert proc.stop() == 0
    [path] = captures(capture)
    assert path.read_bytes() == (
        b"X-Sender: <>\r\nX-Receiver: x@example.org\r\nX-Receiver: y@example.org\r\n"
        b"Subject: bounce\r\n\r\n.dot\r\n"
    )
    assert read_capture(path)[1] == ["x@example.org", "y@example.org"]
    assert path.stat().st_mode & 0o777 == 0o600  # captured mail is nobody else's to read


def test_the_open_file_limit_is_raised_to_the_hard_limit() -> None:
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"hard limit {hard}: nothing to raise")

    def low_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    proc = subprocess.Popen(
        [sys.executable, "-m", "fastmta", "sink", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=low_soft_limit,
    )
    try:
        assert proc.stdout is not None and "listening on" in proc.stdout.readline()
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
        soft_now = line.split()[3]
        assert soft_now == (str(hard) if hard != resource.RLIM_INFINITY else "unlimited") or int(soft_now) > 256
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--listen", "nowhere"], "expected ADDR:PORT"),
        (["--listen", "127.0.0.1:0=hotmale"], "unknown profile 'hotmale'"),
        (["--fault", "rcpt:2:450"], "probability must be between 0 and 1"),
        (["--fault", "quit:0.5:450"], "unknown phase 'quit'"),
        (["--delay", "rcpt:soon"], "bad seconds 'soon'"),
        (["--rate-limit", "20/fortnight"], "expected N/s, N/m or N/h"),
        (["--profile", "aol"], "unknown profile 'aol'"),
        (["--max-line-length", "100"], "max_line_length below RFC 5321's 512"),
        (["--hostname", "mx.example\r\n250 injected"], "bad host name"),
        (["--hostname", "two words"], "bad host name"),
        (["--stats-json", "/nonexistent-dir/stats.json"], "directory /nonexistent-dir does not exist"),
    ],
)
def test_bad_arguments_are_named(args: list[str], message: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fastmta", "sink", *args], capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    assert out.returncode == 2
    assert message in out.stderr, out.stderr
    assert "listening on" not in out.stdout


def test_ipv6_listener_is_printed_in_brackets() -> None:
    proc = start_sink_process("--listen", "[::1]:0")
    try:
        [(host, port)] = proc.addresses
        assert host == "::1"
        with smtplib.SMTP(host, port, timeout=TIMEOUT) as s:
            assert s.noop()[0] == 250
    finally:
        assert proc.stop() == 0
