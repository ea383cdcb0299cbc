"""`fastmta serve` as a process: SMTP injection by clients nobody here wrote, relay control, durability.

Clients: Postfix's smtp-source, swaks (STARTTLS + AUTH), aiosmtplib.
Receivers: `fastmta sink` children that capture what they accept.
Every service and sink binds port 0 and is stopped by PID.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import aiosmtplib
import pytest

from fastmta.serve.auth import hash_password
from serveproc import capture_sink, captured, raw_smtp_message, serve_config, serve_log, served, start_serve, stop_serve
from servers import find_postfix_tool

pytestmark = pytest.mark.interop

MSG = (
    "From: app@sender.example\r\nTo: {rcpt}\r\nSubject: test {i}\r\nMessage-ID: <m{i}@sender.example>\r\n\r\n"
    "body {i}\r\n"
)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fastmta.toml"
    path.write_text(text)
    return path


def _swaks(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["swaks", "--timeout", "10", *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def test_smtp_source_injects_and_every_message_is_delivered_once(tmp_path: Path) -> None:
    capture = tmp_path / "capture"
    data = tmp_path / "data"
    with capture_sink(capture) as sink:
        cfg = _write(tmp_path, serve_config(data, sink))
        with served(cfg, data) as svc:
            host, port = svc.smtp
            n = 300
            # 10 sessions, 30 messages each, pipelined (-P?) no: smtp-source's -s sessions in parallel.
            src = subprocess.run(
                [find_postfix_tool("smtp-source"), "-s", "10", "-m", str(n), "-l", "2048", "-f", "app@sender.example",
                 "-t", "rcpt@dest.example", "-c", f"{host}:{port}"],
                capture_output=True, text=True, timeout=120,
            )
            assert src.returncode == 0, src.stderr
            records = svc.wait_accounting(lambda r: sum(x["status"] == "delivered" for x in r) >= n, timeout=60)
        assert sum(r["status"] == "delivered" for r in records) == n
        assert all(r.get("via") == "smtp" for r in records)
    msgs = captured(capture)
    assert len(msgs) == n
    # fastmta's Received: header is on every message, once.
    assert all(len(re.findall(rb"\r\n\tby mta\.test\.example \(fastmta\) with E?SMTP id ", m)) == 1 for m in msgs)


def test_open_relay_refused_and_auth_over_tls_relays(tmp_path: Path) -> None:
    capture = tmp_path / "capture"
    data = tmp_path / "data"
    with capture_sink(capture) as sink:
        cfg = _write(tmp_path, serve_config(
            data, sink, serve_extra='relay_networks = []\nreceive_domains = ["bounces.sender.example"]',
            users=[("app1", hash_password("s3cret pass"))],
        ))
        with served(cfg, data) as svc:
            host, port = svc.smtp
            server = ["--server", host, "--port", str(port)]
            # Not trusted, not authenticated: relaying anywhere is refused at RCPT.
            r = _swaks(*server, "--from", "x@evil.example", "--to", "victim@elsewhere.example")
            assert "550 5.7.1" in r.stdout and "Relay access denied" in r.stdout, r.stdout
            # AUTH is not offered or accepted in the clear.
            r = _swaks(*server, "--from", "app@sender.example", "--to", "a@dest.example",
                       "--auth", "PLAIN", "--auth-user", "app1", "--auth-password", "s3cret pass")
            assert r.returncode != 0
            assert "AUTH" not in r.stdout.split("STARTTLS")[0].split("EHLO")[-1]
            # Wrong password under TLS: 535, nothing relayed.
            r = _swaks(*server, "--tls", "--from", "app@sender.example", "--to", "a@dest.example",
                       "--auth", "LOGIN", "--auth-user", "app1", "--auth-password", "wrong")
            assert "535 5.7.8" in r.stdout, r.stdout
            # STARTTLS + AUTH PLAIN and LOGIN: relayed.
            for mech, rcpt in (("PLAIN", "p@dest.example"), ("LOGIN", "l@dest.example")):
                r = _swaks(*server, "--tls", "--from", "app@sender.example", "--to", rcpt,
                           "--auth", mech, "--auth-user", "app1", "--auth-password", "s3cret pass")
                assert r.returncode == 0, r.stdout + r.stderr
                assert "235 2.7.0" in r.stdout and "250 2.0.0 Ok: queued as" in r.stdout
            # Anyone may send to the domains the service receives for; it is not relayed.
            r = _swaks(*server, "--from", "", "--to", "b-abc@bounces.sender.example")
            assert r.returncode == 0, r.stdout
            records = svc.wait_accounting(lambda rs: sum(x["status"] == "delivered" for x in rs) >= 2
                                          and any(x["status"] == "unrecognized" for x in rs))
        delivered = sorted(x["recipient"] for x in records if x["status"] == "delivered")
        assert delivered == ["l@dest.example", "p@dest.example"]
        assert {x.get("auth") for x in records if x["status"] == "delivered"} == {"app1"}
        # Taken in (not relayed), read, and, being no report of anything, kept for the operator.
        inbound = list((data / "inbound").rglob("*.eml"))
        assert len(inbound) == 1 and inbound[0].parent.name == "unrecognized"
        assert b"X-Fastmta-Envelope-To: <b-abc@bounces.sender.example>" in inbound[0].read_bytes()
    rcpts = sorted(m.split(b"X-Receiver: ")[1].split(b"\r\n")[0] for m in captured(capture))
    assert rcpts == [b"l@dest.example", b"p@dest.example"]


def test_aiosmtplib_smtputf8_and_bad_input_get_clear_answers(tmp_path: Path) -> None:
    capture = tmp_path / "capture"
    data = tmp_path / "data"
    with capture_sink(capture) as sink:
        cfg = _write(tmp_path, serve_config(data, sink))
        with served(cfg, data) as svc:
            host, port = svc.smtp

            async def go() -> None:
                async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=20) as smtp:
                    # A UTF-8 recipient with SMTPUTF8
                    msg = MSG.format(rcpt="josé@dest.example", i=1).encode()
                    errors, reply = await smtp.sendmail("app@sender.example", ["josé@dest.example"], msg,
                                                        mail_options=["SMTPUTF8"])
                    assert not errors and "queued as" in reply
                    # A header section with a bare CR cannot be accepted: 554, named, nothing queued.
                    # (aiosmtplib would normalise the CR away, so these bytes go on a socket of our own.)
                    # So can no NUL (relayed as it was before an attack on intake found it).
                    cases = [
                        (b"From: a@sender.example\r\nSubject: x\rBcc: evil@x.example\r\n\r\nbody\r\n",
                         b"554 5.6.0 Error: message: bare CR (without LF) in header line 2"),
                        (b"From: a@sender.example\r\nSubject: a\x00b\r\n\r\nbody\r\n",
                         b"554 5.6.0 Error: message: a NUL byte at offset "),  # after the Received: added
                    ]
                    for bad, answer in cases:
                        rest = await raw_smtp_message(host, port, b"EHLO c.example\r\nMAIL FROM:<app@sender.example>"
                                                      b"\r\nRCPT TO:<ok@dest.example>\r\nDATA\r\n", bad)
                        assert rest.startswith(answer), rest
                    # The session goes on. A recipient the engine could not take (found by an attack:
                    # RCPT TO:<postmaster> got 250, then the message was refused for every recipient)
                    # is refused at RCPT, and the others get the message.
                    errors, reply = await smtp.sendmail(
                        "app@sender.example", ["two@dest.example", "postmaster"],
                        MSG.format(rcpt="two@dest.example", i=2).encode()
                    )
                    assert list(errors) == ["postmaster"] and errors["postmaster"][0] == 553, errors

            asyncio.run(go())
            records = svc.wait_accounting(lambda rs: sum(x["status"] == "delivered" for x in rs) >= 2)
        assert sorted(x["recipient"] for x in records if x["status"] == "delivered") == [
            "josé@dest.example", "two@dest.example"]


def test_kill_9_after_250_loses_nothing(tmp_path: Path) -> None:
    """Accepted (250) while the receiver defers everything; SIGKILL; restarted against a working receiver."""
    capture = tmp_path / "capture"
    data = tmp_path / "data"
    n = 60
    retry = "[queue]\nretry_initial = 0.5\nretry_max = 1.0\n"
    with capture_sink(tmp_path / "never", "--fault", "rcpt:1.0:451 4.7.1 try later") as deferring:
        cfg = _write(tmp_path, serve_config(data, deferring, extra=retry))
        svc = start_serve(cfg, data)
        try:
            host, port = svc.smtp

            async def inject() -> list[str]:
                ids = []
                async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=20) as smtp:
                    for i in range(n):
                        rcpt = f"r{i}@d{i % 5}.example"
                        _, reply = await smtp.sendmail("app@sender.example", [rcpt], MSG.format(rcpt=rcpt, i=i).encode())
                        ids.append(reply.rsplit(" ", 1)[-1])
                return ids

            ids = asyncio.run(inject())
            assert len(set(ids)) == n
            svc.wait_accounting(lambda rs: sum(x["status"] == "deferred" for x in rs) >= 1, timeout=20)
        finally:
            stop_serve(svc, sig=signal.SIGKILL)
    assert svc.proc.returncode == -signal.SIGKILL
    assert not list(capture.glob("*.eml")) if capture.exists() else True
    with capture_sink(capture) as sink:
        cfg.write_text(serve_config(data, sink, extra=retry))
        with served(cfg, data) as svc2:
            records = svc2.wait_accounting(lambda rs: sum(x["status"] == "delivered" for x in rs) >= n, timeout=60)
    delivered = [x for x in records if x["status"] == "delivered"]
    assert sorted(x["message_id"] for x in delivered) == sorted(ids), serve_log(svc2)
    msgs = captured(capture)
    assert len(msgs) == n
    assert len({m.split(b"Message-ID: ")[1].split(b"\r\n")[0] for m in msgs}) == n


def test_check_config_names_the_bad_key(tmp_path: Path) -> None:
    cfg = _write(tmp_path, serve_config(tmp_path / "d", ("127.0.0.1", 25), serve_extra="relay_netwrks = []"))
    r = subprocess.run([sys.executable, "-m", "fastmta", "serve", "--config", str(cfg), "--check-config"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "serve.relay_netwrks: unknown key" in r.stderr
    cfg.write_text(serve_config(tmp_path / "d", ("127.0.0.1", 25)))
    r = subprocess.run([sys.executable, "-m", "fastmta", "serve", "--config", str(cfg), "--check-config"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["smtp"] == ["127.0.0.1:0"]


def test_sighup_reloads_accounts_without_dropping_a_session(tmp_path: Path) -> None:
    capture = tmp_path / "capture"
    data = tmp_path / "data"
    with capture_sink(capture) as sink:
        cfg = _write(tmp_path, serve_config(data, sink, serve_extra="relay_networks = []",
                                            users=[("old", hash_password("pw-old"))]))
        with served(cfg, data) as svc:
            host, port = svc.smtp
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE

            async def session() -> tuple[int, int]:
                smtp = aiosmtplib.SMTP(hostname=host, port=port, start_tls=True, tls_context=ctx, timeout=20)
                await smtp.connect()
                await smtp.login("old", "pw-old")
                # The configuration changes under an open, authenticated session.
                cfg.write_text(serve_config(data, sink, serve_extra="relay_networks = []",
                                            users=[("new", hash_password("pw-new"))]))
                svc.proc.send_signal(signal.SIGHUP)
                deadline = time.monotonic() + 10
                while "configuration reloaded" not in serve_log(svc) and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                errors, _ = await smtp.sendmail("a@sender.example", ["x@dest.example"],
                                                MSG.format(rcpt="x@dest.example", i=0).encode())
                await smtp.quit()
                fresh = aiosmtplib.SMTP(hostname=host, port=port, start_tls=True, tls_context=ctx, timeout=20)
                await fresh.connect()
                with pytest.raises(aiosmtplib.SMTPAuthenticationError):
                    await fresh.login("old", "pw-old")
                await fresh.login("new", "pw-new")
                await fresh.quit()
                return len(errors), 0

            assert asyncio.run(session()) == (0, 0)
            svc.wait_accounting(lambda rs: any(x["status"] == "delivered" for x in rs))
            assert "configuration reloaded: users" in serve_log(svc)
            assert "restart needed" not in serve_log(svc)  # nothing else changed (the outbound cap neither)


@pytest.mark.parametrize("damaged", ["suppression.db", "events/events.sqlite", "queue/suspended.json",
                                     "notices/notices.sqlite"])
def test_a_damaged_state_file_stops_the_start_naming_it(tmp_path: Path, damaged: str) -> None:
    # Found by an attack on serve: a damaged SQLite file of the service's stopped its start with a raw
    # traceback that named no file. Each refuses the start, with the file and what to do.
    capture = tmp_path / "capture"
    data = tmp_path / "data"
    with capture_sink(capture) as sink:
        cfg = _write(tmp_path, serve_config(data, sink, serve_extra='[[serve.webhooks]]\nurl = "http://127.0.0.1:9/h"'))
        with served(cfg, data):
            pass
        path = data / damaged
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"garbage" * 100)
        for extra in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            extra.unlink(missing_ok=True)
        r = subprocess.run([sys.executable, "-m", "fastmta", "serve", "--config", str(cfg)],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"cannot start: {path}" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_damaged_input_progress_stops_the_start_until_accepted(tmp_path: Path) -> None:
    # The queue's record of which pickup rows were taken, damaged beyond repair: starting would take
    # them, and send them, again. The start is refused, saying what to do; accepted, it starts.
    from fastmta.queue.journal import ScanReport, scan
    from fastmta.queue.journal_records import InputRecord, InputTake, record_decoder
    from fastmta.queue.records import Status
    from fastmta.queue.spool import Spool

    capture = tmp_path / "capture"
    data = tmp_path / "data"
    queue = data / "queue"
    spool = Spool(queue)
    for name in ("pickup:a", "pickup:b"):
        job = spool.open_input(name, "fp")
        spool.add_message_sync(name, "s@a.example", ["r@b.example"], b"x", take=InputTake(job.id, 0, 7))
        spool.record(name, 0, Status.DELIVERED)
    spool.close_sync()
    Spool(queue, compact_min_bytes=0).close_sync()  # compacted: the inputs' records are all that is left
    journal = queue / "journal"
    with open(journal, "rb") as f:
        off, n = next((o, len(p)) for o, p in scan(f, ScanReport()) if isinstance(record_decoder.decode(p), InputRecord))
    damaged = bytearray(journal.read_bytes())
    damaged[off + 12 : off + 12 + n] = bytes(n)
    journal.write_bytes(bytes(damaged))
    with capture_sink(capture) as sink:
        cfg = _write(tmp_path, serve_config(data, sink))
        r = subprocess.run([sys.executable, "-m", "fastmta", "serve", "--config", str(cfg)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, r.stderr[-2000:]
        assert "taken from the inputs" in r.stderr and "--accept-lost-progress" in r.stderr, r.stderr[-2000:]
        assert journal.read_bytes() == bytes(damaged)
        with served(cfg, data, args=["--accept-lost-progress"]) as svc:
            assert "input progress lost" in serve_log(svc)


def test_outbound_connections_leave_the_listeners_their_descriptors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The engine caps its connections by what the open-files limit leaves free; the service's own
    # listeners take descriptors from the same limit, so their caps come out of it (half at least).
    import fastmta.serve.service as service_module
    from fastmta.serve.config import load_service_config
    from fastmta.serve.service import Service

    cfg = _write(tmp_path, '[serve]\ndata_dir = "d"\n[[serve.smtp]]\nlisten = "127.0.0.1:0"\nmax_connections = 300\n'
                           '[serve.http]\nlisten = "127.0.0.1:0"\nmax_connections = 100\n[smtp]\nmax_connections = 5000\n')
    config = load_service_config(cfg)
    for free, want in [(10_000, 5000), (3000, 2600), (600, 300), (1, 1)]:
        monkeypatch.setattr(service_module, "default_connection_limit", lambda free=free: free)
        service = Service(config)
        assert service._outbound_capped(config.engine).smtp.max_connections == want, free
