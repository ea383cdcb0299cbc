"""`fastmta load` (first version): real servers on loopback, bounded failures."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

from fastmta.load.driver import run_load
from fastmta.load.spec import LoadSpec
from fastmta.load.workload import make_message
from scripted import ScriptedSMTP
from servers import free_port, postfix_smtp_sink

Run = Callable[[Coroutine[Any, Any, Any]], Any]


def test_make_message_has_the_requested_size() -> None:
    for size in (600, 2048, 20_000):
        msg = make_message(size)
        assert abs(len(msg) - size) <= 2
        assert msg.endswith(b"\r\n") and b"\r\n\r\n" in msg
        assert max(len(line) for line in msg.split(b"\r\n")) <= 998


def test_load_against_postfix_smtp_sink(run: Run) -> None:
    with postfix_smtp_sink() as sink:
        spec = LoadSpec(sink.host, sink.port, messages=600, connections=4, size=2048, recipients=3, domains=5, timeout=60)
        r = run(run_load(spec))
    assert r.complete and not r.timed_out
    assert r.messages_accepted == 600 and r.recipients_accepted == 1800
    assert r.replies == {"250": 1800}
    assert r.connections_opened == 4  # connections are reused, not reopened per message
    assert r.messages_per_s > 0 and r.cpu_us_per_message > 0
    # Closed loop: every message timed end to end and per phase, every session once.
    assert r.histograms["message"].count == r.histograms["envelope"].count == r.histograms["end_of_data"].count == 600
    assert r.histograms["connect"].count == 4 and r.histograms["queue"].count == 0


def test_messages_per_connection_limit_opens_new_connections(run: Run) -> None:
    with postfix_smtp_sink() as sink:
        r = run(run_load(LoadSpec(sink.host, sink.port, messages=100, connections=2, messages_per_connection=10, timeout=60)))
    # 10 connections carry 10 messages each; a worker that connects just as the
    # last messages are claimed by the other may open one more and send nothing.
    assert r.complete and 10 <= r.connections_opened <= 11


def test_server_down_gives_a_report_not_a_hang(run: Run) -> None:
    t0 = time.monotonic()
    r = run(run_load(LoadSpec("127.0.0.1", free_port(), messages=50, connections=3, timeout=20)))
    assert time.monotonic() - t0 < 10
    assert not r.complete and r.messages_accepted == 0
    assert r.connect_failures == 9  # 3 workers x 3 consecutive failures each
    assert any("refused" in reason.lower() for reason in r.errors), r.errors


class Tarpit(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(b"220 slow\r\n")  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        pass  # never answers


def test_tarpit_is_bounded_by_the_timeouts(run: Run) -> None:
    async def main() -> Any:
        server = await asyncio.get_running_loop().create_server(Tarpit, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            return await run_load(LoadSpec("127.0.0.1", port, messages=10, connections=2, timeout=1.0, reply_timeout=0.3))

    t0 = time.monotonic()
    r = run(main())
    assert time.monotonic() - t0 < 8
    assert not r.complete and r.messages_accepted == 0
    assert any("timeout" in reason for reason in r.errors), r.errors


class Garbage(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(b"220 ok\r\n")  # type: ignore[attr-defined]
        self.t = transport

    def data_received(self, data: bytes) -> None:
        self.t.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")  # type: ignore[attr-defined]


def test_garbage_replies_are_reported_as_protocol_errors(run: Run) -> None:
    async def main() -> Any:
        server = await asyncio.get_running_loop().create_server(Garbage, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            return await run_load(LoadSpec("127.0.0.1", port, messages=5, connections=1, timeout=10, reply_timeout=2))

    r = run(main())
    assert not r.complete and r.messages_accepted == 0
    assert any("protocol error" in reason for reason in r.errors), r.errors


class FourTwentyOne(ScriptedSMTP):
    """Accepts two messages per connection, then says 421 and hangs up."""

    n = 0

    def message_done(self) -> bytes:
        self.n += 1
        return b"250 ok\r\n"

    def command(self, verb: bytes) -> bytes | None:
        if self.n >= 2 and verb == b"MAIL":
            self.t.write(b"421 4.7.0 too many messages, closing\r\n")
            return None
        return super().command(verb)


def test_421_mid_run_reconnects_and_reports(run: Run) -> None:
    async def main() -> Any:
        server = await asyncio.get_running_loop().create_server(FourTwentyOne, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            return await run_load(LoadSpec("127.0.0.1", port, messages=20, connections=1, depth=1, timeout=20))

    r = run(main())
    assert r.messages_attempted == 20
    # Every third transaction meets the 421; the worker reconnects and carries on.
    assert r.messages_accepted + r.messages_failed == 20 and r.messages_failed > 0
    assert r.replies.get("421", 0) == r.messages_failed
    assert r.connections_opened >= 7


def test_cli_json_against_smtp_sink() -> None:
    with postfix_smtp_sink() as sink:
        out = subprocess.run(
            [sys.executable, "-m", "fastmta", "load", f"{sink.host}:{sink.port}", "--messages", "300",
             "--connections", "3", "--json", "--timeout", "60"],
            capture_output=True, text=True, timeout=120,
        )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["messages_accepted"] == 300 and data["complete"] is True
    assert data["messages_per_s"] > 0 and data["cpu_us_per_message"] > 0


def test_cli_exit_code_when_server_is_down() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fastmta", "load", f"127.0.0.1:{free_port()}", "--messages", "10", "--timeout", "20"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 1
    assert "0 accepted" in out.stdout and "refused" in out.stdout.lower()


def test_load_help_documents_every_option() -> None:
    out = subprocess.run([sys.executable, "-m", "fastmta", "load", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for option in ("--messages", "--connections", "--size", "--recipients", "--domains", "--json", "--timeout",
                   "--sink", "--depth", "--per-connection", "--no-pipelining", "--bdat", "--starttls", "--source"):
        assert option in out.stdout


def test_envelope_phase_ends_at_the_354_read_not_after_the_content_write(run: Run) -> None:
    # The 354 releases the content, which is written inside the same read
    # callback (with the callbacks of finished messages). The envelope phase
    # must end when the 354 was read; the write belongs to end_of_data.
    from time import perf_counter

    from fastmta.load.measure import _Msg, _TimedConnection
    from fastmta.smtp.connection import Timeouts
    from fastmta.smtp.protocol import Body, ClientProtocol, Transaction

    class SlowTransport(asyncio.Transport):
        def __init__(self) -> None:
            super().__init__()
            self.writes: list[bytes] = []

        def write(self, data: bytes) -> None:  # type: ignore[override]
            self.writes.append(bytes(data))
            time.sleep(0.05)  # a big body going out

        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return default

        def is_closing(self) -> bool:
            return False

        def close(self) -> None:
            pass

        def abort(self) -> None:
            pass

    async def main() -> tuple[float, float, list[bytes]]:
        loop = asyncio.get_running_loop()
        conn = _TimedConnection(ClientProtocol("c.test"), Timeouts.uniform(10), loop, None, None)
        transport = SlowTransport()
        conn.connection_made(transport)
        conn.data_received(b"220 mx\r\n")
        conn.data_received(b"250-mx\r\n250 PIPELINING\r\n")
        msg = _Msg(0, perf_counter(), perf_counter())
        done: list[object] = []
        conn.send_timed(Transaction("s@a.test", ["r@b.test"], Body(b"Subject: x\r\n\r\nhi\r\n"), msg), msg, done.append)
        await asyncio.sleep(0)  # the envelope goes out
        t_read = perf_counter()
        conn.data_received(b"250 ok\r\n250 ok\r\n354 go\r\n")
        conn.close()
        return msg.t_env - t_read, perf_counter() - t_read, transport.writes

    envelope_end, total, writes = run(main())
    assert writes[-1].endswith(b"hi\r\n.\r\n")  # the content was written inside that read
    assert total >= 0.05
    assert 0 <= envelope_end < 0.02
