"""The short wait for a MAIL pipelined behind the end of DATA (``[smtp.timeouts] mail_after_data``).

It exists for servers that drop such commands (chasquid; test_client_interop.py
has that case). These are the servers it must leave alone: one that answers
MAIL only after it has taken the whole message (CHUNKING puts MAIL, RCPT and
``BDAT LAST`` in one write; a private Postfix with a slow end-of-message
check), and one that is slow at a later MAIL after it has answered MAILs
behind the dot before.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from postfix_private import HOLD_SETTING, private_postfix
from scripted import StoringSMTP
from test_send import fastmta

Run = Callable[[Coroutine[Any, Any, Any]], Any]


class _SlowPolicy:
    """A Postfix policy service (SMTPD_POLICY_README's protocol) that takes *delay* s at END-OF-MESSAGE."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as lines:
            state = b""
            for line in lines:
                if line.strip():
                    key, _, value = line.strip().partition(b"=")
                    if key == b"protocol_state":
                        state = value
                    continue
                if state == b"END-OF-MESSAGE":
                    time.sleep(self.delay)
                conn.sendall(b"action=DUNNO\n\n")

    def close(self) -> None:
        self.sock.close()


@pytest.mark.interop
def test_a_server_answering_mail_after_the_whole_chunked_message_gets_each_message_once(tmp_path: Path) -> None:
    # Found by an attack on the wait: over BDAT, Postfix answered MAIL after its 3 s end-of-message
    # check; the 1 s wait cut the session, and the message Postfix had already taken went again
    # (4 messages arrived 7 times, each on record as delivered once).
    spool = tmp_path / "spool"
    spool.mkdir()
    for i in range(3):
        (spool / f"m{i}.eml").write_bytes(b"X-Sender: s@sender.example\r\nX-Receiver: r%d@rcv.example\r\n"
                                          b"From: s@sender.example\r\nSubject: m%d\r\n\r\nhello\r\n" % (i, i))
    policy = _SlowPolicy(2.0)
    try:
        with private_postfix(None, hold=True, main_cf={
            "mydestination": "rcv.example", "smtpd_reject_unlisted_recipient": "no",
            "local_transport": "discard:delivered", "smtpd_policy_service_timeout": "60s",
            "smtpd_end_of_data_restrictions": f"check_policy_service inet:127.0.0.1:{policy.port}, {HOLD_SETTING}",
        }) as pf:
            cfg = tmp_path / "fastmta.toml"
            cfg.write_text(f'[routing.static]\n"*" = ["{pf.host}:{pf.port}"]\n[smtp]\ntls = "never"\n'
                           '[smtp.timeouts]\nmail_after_data = 0.5\n[sites."*"]\nmax_connections = 1\n'
                           '[queue]\nretry_initial = 300\n')
            acct = tmp_path / "acct.jsonl"
            out = fastmta("send", str(spool), "--config", str(cfg), "--queue-dir", str(tmp_path / "q"),
                          "--accounting", str(acct), "--quiet", timeout=120)
            assert out.returncode == 0, out.stderr
            held = [name for _d, _s, files in os.walk(Path(pf.queue_dir) / "hold") for name in files]
            subjects = sorted(
                re.search(rb"Subject: (\S+)", subprocess.run(
                    ["/usr/sbin/postcat", "-c", str(pf.config_dir), "-h", "-q", qid],
                    capture_output=True, timeout=30, check=True).stdout)[1].decode()  # type: ignore[index]
                for qid in held)
            log = pf.log_text()
    finally:
        policy.close()
    assert " BDAT " in log or "bdat=" in log, "the session did not use CHUNKING: the case is not exercised"
    assert subjects == ["m0", "m1", "m2"]  # each once
    assert [json.loads(line)["status"] for line in acct.read_text().splitlines()] == ["delivered"] * 3


class SlowAtThirdMail(StoringSMTP):
    """PIPELINING, no CHUNKING; answers everything at once but the third MAIL, which takes 1.5 s."""

    greeting = b"220 slow.test ESMTP\r\n"
    connections: list[int]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.connections.append(1)
        self.mails = 0
        super().connection_made(transport)

    def command(self, verb: bytes) -> bytes | None:
        if verb == b"MAIL":
            self.mails += 1
            if self.mails == 3:
                self.held = True
                asyncio.get_running_loop().call_later(1.5, self._resume)
                return None
            return b"250 2.1.0 ok\r\n"
        return super().command(verb)

    def _resume(self) -> None:
        self.held = False
        if not self.t.is_closing():
            self.t.write(b"250 2.1.0 ok (late)\r\n")
            self.answer()


def test_a_slow_mail_after_mails_were_answered_behind_the_dot_keeps_its_connection(run: Run) -> None:
    # Found by an attack on the wait: a fast server answers the end of DATA and the MAIL behind it in
    # one read, so the wait never saw MAIL answered on its own and stayed on for the whole connection:
    # a later MAIL slower than it was cut (two connections, the site's pipelining gone).
    from fastmta.delivery.config import config_from_dict
    from fastmta.delivery.engine import Engine, Status

    async def main() -> tuple[list[Status], int, int]:
        stored: list[bytes] = []
        connections: list[int] = []
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: type("P", (SlowAtThirdMail,), {"stored": stored, "connections": connections})(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            cfg = config_from_dict({"routing": {"static": {"*": [f"127.0.0.1:{port}"]}},
                                    "smtp": {"tls": "never", "timeouts": {"mail_after_data": 0.5}},
                                    "sites": {"*": {"max_connections": 1, "adaptive": {"enabled": False}}}})
            async with Engine(cfg) as engine:
                ids = [await engine.submit(b"Subject: s\r\n\r\nhi\r\n", "s@a.test", [f"r{i}@x.test"]) for i in range(5)]
                outcomes = [o for i in ids for o in await asyncio.wait_for(engine.result(i), 30)]
        return [o.status for o in outcomes], len(stored), len(connections)

    statuses, stored, connections = run(main())
    assert statuses == [Status.DELIVERED] * 5 and stored == 5
    assert connections == 1
