"""`fastmta serve` bounds its client connections: SMTP in all and per address, HTTP in all, idle and slow.

A flood of connections, a slowloris or a trickled body must not take the
service's file descriptors or keep its API from answering. Real sockets on
loopback against the service as a process; the source addresses 127.0.0.2-4
stand for other clients.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from serveproc import Served, raw_smtp_message, serve_config, serve_log, served
from test_serve_e2e import curl, metrics

pytestmark = pytest.mark.interop

TOKEN = "limits-test-token"


def _config(tmp_path: Path, serve_extra: str, extra_http: str = "", smtp: str = "") -> tuple[Path, Path]:
    data = tmp_path / "data"
    data.mkdir()
    text = serve_config(data, ("127.0.0.1", 9), serve_extra=serve_extra,
                        tokens=[("t", hashlib.sha256(TOKEN.encode()).hexdigest())])
    text = text.replace('[serve.http]\nlisten = "127.0.0.1:0"', f'[serve.http]\nlisten = "127.0.0.1:0"\n{extra_http}')
    text = text.replace('[[serve.smtp]]\nlisten = "127.0.0.1:0"', f'[[serve.smtp]]\nlisten = "127.0.0.1:0"\n{smtp}')
    path = tmp_path / "fastmta.toml"
    path.write_text(text)
    return path, data


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for s in opened:
        s.close()


def _connect(opened: list[socket.socket], address: tuple[str, int], source: str = "127.0.0.1") -> socket.socket:
    s = socket.create_connection(address, timeout=10, source_address=(source, 0))
    opened.append(s)
    return s


def _first_reply(s: socket.socket) -> bytes:
    """The first line the server sends (b"" when it closed without one)."""
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = s.recv(512)
        if not chunk:
            break
        data += chunk
    return data


def _closed_by_peer(s: socket.socket, within: float) -> bool:
    """True once the server closes *s* (EOF or reset) within *within* seconds; what it said is read and dropped."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        s.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            if not s.recv(4096):
                return True
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
    return False


def _refused(svc: Served, via: str, reason: str) -> float:
    return metrics(svc).get(("fastmta_refused_connections_total", (("reason", reason), ("via", via))), 0.0)


def test_smtp_connections_are_capped_per_address_and_in_all(tmp_path: Path, sockets: list[socket.socket]) -> None:
    config, data = _config(tmp_path, "relay_networks = []", smtp="max_connections = 4\nmax_connections_per_ip = 2")
    with served(config, data) as svc:
        first = _connect(sockets, svc.smtp)
        assert _first_reply(first).startswith(b"220 ")
        assert _first_reply(_connect(sockets, svc.smtp)).startswith(b"220 ")
        third = _connect(sockets, svc.smtp)
        # The third from one address: refused before the greeting, and hung up on.
        assert _first_reply(third) == b"421 4.7.0 Error: too many connections from 127.0.0.1\r\n"
        assert _closed_by_peer(third, 10)
        # Other addresses still get in, up to the total of 4.
        assert _first_reply(_connect(sockets, svc.smtp, "127.0.0.2")).startswith(b"220 ")
        assert _first_reply(_connect(sockets, svc.smtp, "127.0.0.3")).startswith(b"220 ")
        fifth = _connect(sockets, svc.smtp, "127.0.0.4")
        assert _first_reply(fifth) == b"421 4.7.0 Error: too many connections, try again later\r\n"
        # A session that ends gives its place back (the refused ones never held one).
        first.sendall(b"QUIT\r\n")
        assert _closed_by_peer(first, 10)
        deadline = time.monotonic() + 10
        greeting = b""
        while time.monotonic() < deadline and not greeting.startswith(b"220 "):
            greeting = _first_reply(_connect(sockets, svc.smtp))
        assert greeting.startswith(b"220 ")
        assert _refused(svc, "smtp", "per_ip") >= 1
        assert _refused(svc, "smtp", "total") >= 1


def test_each_listener_has_its_own_cap(tmp_path: Path, sockets: list[socket.socket]) -> None:
    # Internet traffic filling the port-25 listener (bounces, complaints) must not lock the
    # backends out of the submission listener, as Postfix's per-service process limits.
    config, data = _config(tmp_path, "", smtp="max_connections = 2")
    config.write_text(config.read_text() + '[[serve.smtp]]\nlisten = "127.0.0.1:0"\nmax_connections = 2\n')
    with served(config, data) as svc:
        first, second = (svc.listening["smtp"][i].rsplit(":", 1) for i in (0, 1))
        a, b = (first[0], int(first[1])), (second[0], int(second[1]))
        for source in ("127.0.0.2", "127.0.0.3"):
            assert _first_reply(_connect(sockets, b, source)).startswith(b"220 ")
        assert _first_reply(_connect(sockets, b, "127.0.0.4")).startswith(b"421 4.7.0 ")
        assert _first_reply(_connect(sockets, a)).startswith(b"220 ")


def test_relay_networks_are_exempt_from_the_per_address_cap(tmp_path: Path, sockets: list[socket.socket]) -> None:
    # The service's own backends (loopback here) may pool many connections, as Postfix exempts $mynetworks.
    config, data = _config(tmp_path, "", smtp="max_connections = 10\nmax_connections_per_ip = 1")
    with served(config, data) as svc:
        for _ in range(4):
            assert _first_reply(_connect(sockets, svc.smtp)).startswith(b"220 ")
        assert _refused(svc, "smtp", "per_ip") == 0


def _http_address(svc: Served) -> tuple[str, int]:
    host, port = svc.listening["http"].rsplit(":", 1)
    return host, int(port)


def test_http_idle_slow_headers_and_slow_bodies_are_closed(tmp_path: Path, sockets: list[socket.socket]) -> None:
    config, data = _config(tmp_path, "", "idle_timeout = 1.0\nmin_body_rate = 1000")
    with served(config, data) as svc:
        address = _http_address(svc)
        idle = _connect(sockets, address)
        slowloris = _connect(sockets, address)
        slowloris.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        slow_body = _connect(sockets, address)
        slow_body.sendall(
            b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"
        )
        keepalive = _connect(sockets, address)
        started = time.monotonic()
        answered = 0
        open_ = {"idle": idle, "slowloris": slowloris, "slow body": slow_body}
        closed_at: dict[str, float] = {}
        while time.monotonic() - started < 8 and len(closed_at) < 3:
            # A client that keeps using its connection keeps it.
            keepalive.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            keepalive.settimeout(5)
            assert keepalive.recv(4096).startswith(b"HTTP/1.1 200 "), "an active keep-alive connection was closed"
            answered += 1
            for name, s in open_.items():
                if name in closed_at:
                    continue
                try:
                    s.sendall(b" " if name == "slow body" else b"X-More: a\r\n" if name == "slowloris" else b"")
                except OSError:
                    closed_at[name] = time.monotonic() - started
                    continue
                if _closed_by_peer(s, 0.05):
                    closed_at[name] = time.monotonic() - started
            time.sleep(0.2)
        assert set(closed_at) == {"idle", "slowloris", "slow body"}, closed_at
        # Not before the idle period, and within its 1.25x plus this loop's step and a loaded machine's slack.
        assert all(0.9 <= t <= 4.0 for t in closed_at.values()), closed_at
        assert answered >= 5
        # The trickled body never became a message.
        status, body = curl(f"{svc.http}/v1/messages/none", token=TOKEN)
        assert status == 404, body
        assert _refused(svc, "http", "idle") >= 2
        assert _refused(svc, "http", "slow_body") == 1
    # A body cut off is the client's doing (or the guard's), not a bug to log as an error with a traceback.
    assert "Traceback" not in serve_log(svc)


def test_http_connections_over_the_cap_get_503_and_the_api_recovers(tmp_path: Path, sockets: list[socket.socket]) -> None:
    config, data = _config(tmp_path, "", "max_connections = 3\nidle_timeout = 60")
    with served(config, data) as svc:
        address = _http_address(svc)
        held = [_connect(sockets, address) for _ in range(3)]
        time.sleep(0.2)  # let the service take all three in
        over = _connect(sockets, address)
        assert _first_reply(over).startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
        assert _closed_by_peer(over, 10)
        for s in held:
            s.close()
        deadline = time.monotonic() + 10
        status = 0
        while time.monotonic() < deadline and status != 200:
            status, _ = curl(f"{svc.http}/healthz", token=None)
        assert status == 200
        assert _refused(svc, "http", "max_connections") >= 1


def test_every_refused_message_is_counted_by_way_in_and_reason(tmp_path: Path) -> None:
    # fastmta_rejected_messages_total counted only what reached the engine: a 552, a 554 for a
    # header the listener refuses, an HTTP 400 or 413 went unseen by an operator's alert.
    config, data = _config(tmp_path, "", "max_request_size = 2048", smtp="max_message_size = 2048")
    envelope = b"EHLO client.test\r\nMAIL FROM:<app@sender.example>\r\nRCPT TO:<x@rcv.example>\r\nDATA\r\n"
    with served(config, data) as svc:
        host, port = svc.smtp
        too_big = asyncio.run(raw_smtp_message(host, port, envelope, b"Subject: big\r\n\r\n" + b"x" * 3000 + b"\r\n"))
        assert too_big.startswith(b"552 "), too_big
        bare_cr = asyncio.run(raw_smtp_message(host, port, envelope, b"Subject: a\rBcc: e@vil.test\r\n\r\nx\r\n"))
        assert bare_cr.startswith(b"554 "), bare_cr
        status, body = curl(f"{svc.http}/v1/messages", "-X", "POST", "-H", "Content-Type: application/json",
                            token=TOKEN, data=b'{"sender": "a@sender.example",')
        assert status == 400, body
        status, body = curl(f"{svc.http}/v1/messages", "-X", "POST", "-H", "Content-Type: application/json",
                            token=TOKEN, data=b'{"sender": "' + b"a" * 3000 + b'"}')
        assert status == 413, body
        rejected = {dict(labels)["via"] + "/" + dict(labels)["reason"]: value
                    for (name, labels), value in metrics(svc).items() if name == "fastmta_rejected_messages_total"}
    assert rejected == {"smtp/too_big": 1, "smtp/invalid": 1, "http/invalid": 1, "http/too_big": 1}


def test_clients_nobody_vouches_for_cannot_take_the_memory_of_those_who_relay(tmp_path: Path) -> None:
    # Found by an attack on serve: one memory budget for every client's content in flight. From an address
    # outside relay_networks, DATA to a receive domain (open to anyone) with content that never ends held
    # the whole budget, and every client, the trusted ones too, got 452 for as long as it trickled.
    cfg, data = _config(tmp_path, 'relay_networks = ["127.0.0.1/32"]\nreceive_domains = ["fbl.sender.example"]\n'
                                  f"receiving_memory = {8 * 1024 * 1024}")
    line = b"X-Fill: " + b"a" * 990 + b"\r\n"

    async def main(host: str, port: int) -> bytes:
        holders = []
        try:
            for _ in range(2):  # 2 x 4.1 MB from 127.0.0.2, no final dot: the budget (8 MiB) all but full
                reader, writer = await asyncio.open_connection(host, port, local_addr=("127.0.0.2", 0))
                writer.write(b"EHLO x.example\r\nMAIL FROM:<>\r\nRCPT TO:<u@fbl.sender.example>\r\nDATA\r\n")
                seen = b""
                while b"354 " not in seen:
                    seen += await asyncio.wait_for(reader.read(4096), 10)
                writer.write(line * (4_100_000 // len(line)))
                await writer.drain()
                holders.append(writer)
            await asyncio.sleep(1.0)  # all of it read by the service
            envelope = b"EHLO c.example\r\nMAIL FROM:<a@sender.example>\r\nRCPT TO:<r@dest.example>\r\nDATA\r\n"
            return await raw_smtp_message(host, port, envelope, b"Subject: s\r\n\r\n" + line * 300)  # 300 KB, trusted
        finally:
            for writer in holders:
                writer.close()

    with served(cfg, data) as svc:
        host, port = svc.smtp
        reply = asyncio.run(main(host, port))
        assert reply.startswith(b"250 "), (reply, serve_log(svc)[-2000:])


def test_failed_logins_from_one_address_lock_its_auth_for_a_while(tmp_path: Path) -> None:
    # Found by an attack on serve: every failed AUTH cost a scrypt (32 MiB, ~60 ms) on the shared worker
    # threads, unlimited: 40 clients failing 3 times each took 8 s of CPU and held up other work. Now a
    # failure is answered a second later, and past 10 from one address in 5 minutes its AUTH is refused
    # unchecked; the others' logins go on.
    import aiosmtplib

    from fastmta.serve.auth import hash_password

    data = tmp_path / "data"
    data.mkdir()
    text = serve_config(data, ("127.0.0.1", 9), serve_extra='relay_networks = []', users=[("app1", hash_password("right"))])
    cfg = tmp_path / "fastmta.toml"
    cfg.write_text(text)

    def plain(password: str) -> bytes:
        return base64.b64encode(b"\0app1\0" + password.encode())

    async def attempt(host: str, port: int, source: str, passwords: list[str]) -> list[tuple[int, float]]:
        out = []
        smtp = aiosmtplib.SMTP(hostname=host, port=port, start_tls=True, validate_certs=False, timeout=20,
                               source_address=(source, 0))
        await smtp.connect()
        await smtp.ehlo()  # again, under TLS
        try:
            for password in passwords:
                started = time.monotonic()
                reply = await smtp.execute_command(b"AUTH", b"PLAIN", plain(password))
                out.append((reply.code, time.monotonic() - started))
                if reply.code == 421:
                    break
        finally:
            smtp.close()
        return out

    async def main(host: str, port: int) -> tuple[list[list[tuple[int, float]]], list[tuple[int, float]], list[tuple[int, float]]]:
        failing = await asyncio.gather(*(attempt(host, port, "127.0.0.2", ["wrong"] * 3) for _ in range(4)))
        locked = await attempt(host, port, "127.0.0.2", ["right"])
        other = await attempt(host, port, "127.0.0.3", ["right"])
        return failing, locked, other

    with served(cfg, data) as svc:
        host, port = svc.smtp
        failing, locked, other = asyncio.run(main(host, port))
    answers = [a for session in failing for a in session]
    assert len(answers) == 12 and {code for code, _ in answers} <= {535, 421}, failing
    # Ten checked, each answered a second later; past those (the sessions run side by side) refused at once.
    assert sum(t >= 0.9 for _, t in answers) >= 10 and all(code == 421 for code, t in answers if t < 0.9), failing
    assert locked[0][0] == 421 and locked[0][1] < 0.5, locked  # refused at once, even with the right password
    assert other == [(235, other[0][1])], other  # another address logs in


def test_the_login_guard_counts_an_ipv6_client_by_its_64() -> None:
    # From a review: keyed by the whole address, an attacker rotating through its /64 was never locked.
    from fastmta.serve.auth import LoginGuard

    now = [0.0]
    guard = LoginGuard(limit=3, window=60, clock=lambda: now[0])
    for i in range(3):
        guard.failed(f"2001:db8:1:2::{i + 1}")
    assert guard.refused("2001:db8:1:2::ffff") and not guard.refused("2001:db8:1:3::1")
    assert not guard.refused("192.0.2.1")
    now[0] = 61.0
    assert not guard.refused("2001:db8:1:2::1")  # the window passed
