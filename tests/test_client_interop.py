"""The client against servers nobody here wrote: aiosmtpd and Postfix's smtp-sink.

Plus a bare scripted server to look at what arrives on the wire.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from fastmta import core
from fastmta.connection import SessionRefused, SMTPConnection, Timeouts
from fastmta.errors import ConnectError
from fastmta.protocol import Body, TLSPolicy, Transaction
from scripted import ScriptedSMTP
from servers import free_port, postfix_smtp_sink
from tlsutil import client_context_trusting, make_cert, server_context

pytestmark = pytest.mark.interop
Run = Callable[[Coroutine[Any, Any, Any]], Any]

TRICKY = (
    b"From: a@a.test\r\nTo: b@b.test\r\nSubject: tricky\r\n\r\n"
    b".leading dot\r\n..two dots\r\n.\r\nlone dot above\r\n"
    b"caf\xc3\xa9 8-bit \xff\xfe\r\nbare LF\nbare CR\rend without newline"
)
QUICK = Timeouts.uniform(10)


class Collect:
    """aiosmtpd handler: keep what arrives, refuse recipients starting with 'bad'."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]) -> str:
        if address.startswith("bad"):
            return "550 5.1.1 <%s>: Recipient address rejected: User unknown" % address
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.content, bytes)
        self.messages.append((str(envelope.mail_from), list(envelope.rcpt_tos), envelope.content))
        return "250 2.0.0 OK queued"


async def aiosmtpd_server(handler: Collect, **kw: Any) -> tuple[asyncio.AbstractServer, int]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(handler, loop=loop, **kw), "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_delivers_to_aiosmtpd_byte_for_byte(run: Run) -> None:
    async def main() -> None:
        handler = Collect()
        server, port = await aiosmtpd_server(handler, enable_SMTPUTF8=True)
        async with server:
            conn = await SMTPConnection.open("127.0.0.1", port, helo_name="client.test", timeouts=QUICK)
            body = Body(TRICKY)
            r1 = await conn.send(Transaction("s@a.test", ["one@x.test", "bad1@x.test", "two@y.test"], body))
            r2 = await conn.send(Transaction("s@a.test", ["jos\u00e9@x.test"], body))
            await conn.quit()
        assert r1.delivered == ["one@x.test", "two@y.test"]
        assert r1.recipient_replies()[1].code == 550 and r1.recipient_replies()[1].enhanced == "5.1.1"
        assert r2.delivered == ["jos\u00e9@x.test"]
        assert [m[1] for m in handler.messages] == [["one@x.test", "two@y.test"], ["jos\u00e9@x.test"]]
        for _, _, content in handler.messages:
            # aiosmtpd hands over the unstuffed content, CRLF line endings kept.
            assert content == core.normalize_crlf(TRICKY)

    run(main())


def test_starttls_with_aiosmtpd(run: Run, tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path)

    async def main() -> None:
        handler = Collect()
        server, port = await aiosmtpd_server(handler, tls_context=server_context(cert, key), require_starttls=True)
        async with server:
            conn = await SMTPConnection.open(
                "127.0.0.1", port, helo_name="client.test", timeouts=QUICK,
                tls=TLSPolicy.REQUIRED, tls_context=client_context_trusting(cert), server_hostname="localhost",
            )
            assert conn.protocol.tls_active
            r = await conn.send(Transaction("s@a.test", ["one@x.test"], Body(TRICKY)))
            await conn.quit()
        assert r.delivered == ["one@x.test"]
        assert handler.messages[0][2] == core.normalize_crlf(TRICKY)

    run(main())


def test_tls_verification_failure_is_a_clear_transient_error(run: Run, tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path)

    async def main() -> None:
        handler = Collect()
        server, port = await aiosmtpd_server(handler, tls_context=server_context(cert, key))
        async with server:
            with pytest.raises(SessionRefused) as info:
                await SMTPConnection.open(
                    "127.0.0.1", port, helo_name="client.test", timeouts=QUICK,
                    tls=TLSPolicy.REQUIRED, tls_context=ssl.create_default_context(),
                )
        assert info.value.reply.enhanced == "4.7.5" and "TLS" in str(info.value)

    run(main())


def test_delivers_to_postfix_smtp_sink_byte_for_byte(run: Run, world_writable_dir: Path) -> None:
    dump = world_writable_dir

    async def main(port: int) -> list[Any]:
        conn = await SMTPConnection.open("127.0.0.1", port, helo_name="client.test", timeouts=QUICK)
        assert conn.extensions.pipelining
        body = Body(TRICKY)
        futures = [conn.send(Transaction("s@a.test", [f"r{i}@x.test", f"q{i}@y.test"], body)) for i in range(20)]
        results = [await f for f in futures]
        await conn.quit()
        return results

    with postfix_smtp_sink("-d", str(dump) + "/%H%M%S.") as sink:
        results = run(main(sink.port))
    assert [len(r.delivered) for r in results] == [2] * 20, [str(r.error or r.final_reply) for r in results]
    files = sorted(dump.iterdir())
    assert len(files) == 20
    expected = core.normalize_crlf(TRICKY).replace(b"\r\n", b"\n")
    for f in files:
        data = f.read_bytes()
        # smtp-sink writes its own X- headers and a Received: line, then the
        # unstuffed message with LF endings, then one empty line.
        _, _, message = data.partition(b"(UTC)\n")
        assert message == expected + b"\n", f.name


class RecordingServer(ScriptedSMTP):
    """A scripted server that records each read: the server's view of pipelining."""

    greeting = b"220 rec.test ESMTP\r\n"
    queued = b"250 2.0.0 queued\r\n"

    def __init__(self, reads: list[bytes], pipelining: bool = True) -> None:
        self.reads = reads
        self.ehlo = b"250-rec.test\r\n250 PIPELINING\r\n" if pipelining else b"250 rec.test\r\n"

    def data_received(self, data: bytes) -> None:
        self.reads.append(data)
        super().data_received(data)


def test_server_sees_envelope_and_data_in_one_read(run: Run) -> None:
    async def main() -> list[bytes]:
        reads: list[bytes] = []
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: RecordingServer(reads), "127.0.0.1", 0)
        async with server:
            conn = await SMTPConnection.open("127.0.0.1", server.sockets[0].getsockname()[1], helo_name="c.test", timeouts=QUICK)
            body = Body(b"Subject: x\r\n\r\nhi\r\n")
            futs = [conn.send(Transaction("s@a.test", ["a@x.test", "b@x.test", "c@x.test"], body)) for _ in range(3)]
            # QUIT asked for now rides behind the last message's content.
            await conn.quit()
            for f in futs:
                assert len((await f).delivered) == 3
        return reads

    reads = run(main())
    envelope = b"MAIL FROM:<s@a.test>\r\nRCPT TO:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nRCPT TO:<c@x.test>\r\nDATA\r\n"
    assert reads[1] == envelope  # the first envelope: one segment
    # Then content + dot + the next envelope, in one segment each time.
    assert reads[2] == b"Subject: x\r\n\r\nhi\r\n.\r\n" + envelope
    assert reads[3] == b"Subject: x\r\n\r\nhi\r\n.\r\n" + envelope
    assert reads[4] == b"Subject: x\r\n\r\nhi\r\n.\r\nQUIT\r\n"


def test_lock_step_against_a_server_without_pipelining(run: Run) -> None:
    async def main() -> list[bytes]:
        reads: list[bytes] = []
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: RecordingServer(reads, pipelining=False), "127.0.0.1", 0)
        async with server:
            conn = await SMTPConnection.open("127.0.0.1", server.sockets[0].getsockname()[1], helo_name="c.test", timeouts=QUICK)
            r = await conn.send(Transaction("s@a.test", ["a@x.test", "b@x.test"], Body(b"x\r\n")))
            assert len(r.delivered) == 2
            await conn.quit()
        return reads

    reads = run(main())
    assert reads[1:5] == [b"MAIL FROM:<s@a.test>\r\n", b"RCPT TO:<a@x.test>\r\n", b"RCPT TO:<b@x.test>\r\n", b"DATA\r\n"]


class Silent(asyncio.Protocol):
    """Greets, then never answers: a tarpit."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(b"220 tarpit\r\n")  # type: ignore[attr-defined]


def test_phase_timeout_is_enforced(run: Run) -> None:
    async def main() -> float:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Silent, "127.0.0.1", 0)
        async with server:
            t0 = time.monotonic()
            with pytest.raises(SessionRefused) as info:
                await SMTPConnection.open("127.0.0.1", server.sockets[0].getsockname()[1], timeouts=Timeouts.uniform(0.3))
            assert "timeout" in str(info.value) and "ehlo" in str(info.value)
            assert info.value.transient
            return time.monotonic() - t0

    assert 0.25 < run(main()) < 3.0


def test_connection_refused_is_a_connect_error(run: Run) -> None:
    async def main() -> None:
        with pytest.raises(ConnectError) as info:
            await SMTPConnection.open("127.0.0.1", free_port(), timeouts=Timeouts.uniform(2))
        assert info.value.transient

    run(main())


class Refuser(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(b"554 5.7.1 go away\r\n")  # type: ignore[attr-defined]


def test_greeting_554_is_a_permanent_session_refusal(run: Run) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Refuser, "127.0.0.1", 0)
        async with server:
            with pytest.raises(SessionRefused) as info:
                await SMTPConnection.open("127.0.0.1", server.sockets[0].getsockname()[1], timeouts=QUICK)
        assert info.value.reply.code == 554 and not info.value.transient

    run(main())
