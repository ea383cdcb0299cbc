"""The private Postfix instance of tests/postfix_private.py: it starts, relays to a `fastmta sink`, holds and releases.

Postfix's master must run as root; elsewhere these tests are skipped.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from postfix_private import private_postfix, proc_alive
from serveproc import capture_sink, captured
from servers import find_postfix_tool

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(os.geteuid() != 0, reason="a private Postfix instance needs root"),
]


def _send(target: str, rcpt: str, subject: str) -> None:
    src = subprocess.run(
        [find_postfix_tool("smtp-source"), "-m", "1", "-l", "300", "-S", subject, "-f", "app@sender.example",
         "-t", rcpt, target],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )
    assert src.returncode == 0, src.stderr


def _wait(pred, timeout: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def test_private_instance_relays_holds_releases_and_stops(tmp_path: Path) -> None:
    capture = tmp_path / "capture"
    with capture_sink(capture) as sink, private_postfix(sink, check=True) as pf:
        # Its own directories, never the system's; the listener is proved to be ours by the token.
        assert pf.config_dir.is_relative_to(pf.root) and pf.queue_dir.is_relative_to(pf.root)
        with socket.create_connection(pf.address, timeout=5) as s:
            assert pf.token.encode() in s.recv(512)
        master = pf.master_pid
        assert master is not None and master in pf.processes()

        _send(pf.target, "rcpt@dest.example", "first")
        assert _wait(lambda: len(captured(capture)) == 1), pf.log_tail()
        first = captured(capture)[0]
        assert b"Subject: first" in first and pf.token.encode() in first  # its Received: header
        assert pf.wait_queue_empty(10)
        assert _wait(lambda: pf.sent_count() == 1)

        pf.hold()
        _send(pf.target, "rcpt@dest.example", "second")
        assert _wait(lambda: pf.queue_counts()["hold"] == 1), (pf.queue_counts(), pf.log_tail())
        time.sleep(0.5)
        assert len(captured(capture)) == 1  # held: accepted, not delivered

        pf.release()
        assert _wait(lambda: len(captured(capture)) == 2), (pf.queue_counts(), pf.log_tail())
        assert b"Subject: second" in b"".join(captured(capture))
        assert pf.wait_queue_empty(10)
        root = pf.root
    assert not proc_alive(master)
    assert not root.exists()


def test_main_cf_overrides_and_maps_make_a_receiving_mta_that_rejects(tmp_path: Path) -> None:
    """A local domain whose users come from a map file: unknown ones are rejected at RCPT, known ones taken."""
    with private_postfix(None, main_cf={
        "mydestination": "rcv.example",
        "local_recipient_maps": "texthash:$config_directory/users",
        "local_transport": "discard:",
    }, maps={"users": {"known": "x"}}) as pf, socket.create_connection(pf.address, timeout=10) as s:
        f = s.makefile("rb")

        def cmd(line: str) -> bytes:
            s.sendall(line.encode() + b"\r\n")
            reply = f.readline()
            while reply[3:4] == b"-":
                reply = f.readline()
            return reply

        assert pf.token.encode() in f.readline()
        assert cmd("EHLO client.example").startswith(b"250")
        assert cmd("MAIL FROM:<a@sender.example>").startswith(b"250")
        assert cmd("RCPT TO:<nobody@rcv.example>").startswith(b"550")
        assert cmd("RCPT TO:<known@rcv.example>").startswith(b"250")
        cmd("QUIT")
