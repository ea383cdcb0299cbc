"""The client against servers nobody here wrote: aiosmtpd and Postfix's smtp-sink.

Plus a bare scripted server to look at what arrives on the wire.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import time
import warnings
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, cast

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from fastmta.errors import ConnectError
from fastmta.message import core
from fastmta.smtp.connection import SessionRefused, SMTPConnection, Timeouts
from fastmta.smtp.protocol import Body, TLSPolicy, Transaction, TransactionResult
from scripted import ScriptedSMTP, StoringSMTP
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
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
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


class _WriteLog:
    """A transport stand-in that logs each write() and passes everything on."""

    def __init__(self, transport: asyncio.BaseTransport, writes: list[bytes]) -> None:
        self._transport = transport
        self._writes = writes

    def write(self, data: bytes) -> None:
        self._writes.append(bytes(data))
        self._transport.write(data)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def test_callback_queues_the_next_message_into_the_same_write(run: Run) -> None:
    # send_with_callback: the result arrives inside the read that completed it,
    # and a transaction queued from the callback goes out in the same write as
    # the content that read released (two in flight, as fastmta load runs).
    writes: list[bytes] = []

    class Logged(SMTPConnection):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self._transport = _WriteLog(transport, writes)  # type: ignore[assignment]

    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(ScriptedSMTP, "127.0.0.1", 0)
        async with server:
            conn = await Logged.open("127.0.0.1", server.sockets[0].getsockname()[1], helo_name="c.test", timeouts=QUICK)
            body = Body(b"Subject: x\r\n\r\nhi\r\n")
            delivered: list[int] = []
            all_done = loop.create_future()
            queued = 2

            def on_done(result: TransactionResult) -> None:
                nonlocal queued
                delivered.append(len(result.delivered))
                if queued < 5:
                    queued += 1
                    conn.send_with_callback(Transaction("s@a.test", ["a@x.test"], body), on_done)
                elif len(delivered) == 5:
                    all_done.set_result(None)

            writes.clear()
            for _ in range(2):
                conn.send_with_callback(Transaction("s@a.test", ["a@x.test"], body), on_done)
            await asyncio.wait_for(all_done, 10)
            await conn.quit()
        return delivered

    delivered = run(main())
    assert delivered == [1] * 5
    envelope = b"MAIL FROM:<s@a.test>\r\nRCPT TO:<a@x.test>\r\nDATA\r\n"
    content = b"Subject: x\r\n\r\nhi\r\n.\r\n"
    # Every write after the first: the content a 354 released, then the
    # envelope of the message queued by the callback of the one completed in
    # the same read. One write per message.
    assert writes == [envelope] + [content + envelope] * 4 + [content, b"QUIT\r\n"]


def test_callback_refusals_on_the_spot_do_not_recurse(run: Run) -> None:
    # A server whose SIZE limit refuses every message locally: each refusal's
    # callback queues the next message. Reported soon rather than from inside
    # send_with_callback, 5,000 of them finish without a RecursionError.
    class Small(ScriptedSMTP):
        ehlo = b"250-small\r\n250-PIPELINING\r\n250 SIZE 10\r\n"

    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Small, "127.0.0.1", 0)
        async with server:
            conn = await SMTPConnection.open("127.0.0.1", server.sockets[0].getsockname()[1], helo_name="c.test", timeouts=QUICK)
            codes: list[int] = []
            finished = loop.create_future()
            big = Body(b"x" * 100)

            def on_done(result: TransactionResult) -> None:
                assert result.error is not None
                codes.append(result.error.code)
                if len(codes) < 5000:
                    conn.send_with_callback(Transaction("s@a.test", ["a@x.test"], big), on_done)
                else:
                    finished.set_result(None)

            conn.send_with_callback(Transaction("s@a.test", ["a@x.test"], big), on_done)
            await asyncio.wait_for(finished, 30)
            await conn.quit()
        return codes

    codes = run(main())
    assert codes == [552] * 5000


def test_callback_on_a_closed_connection_is_called_later_with_the_failure(run: Run) -> None:
    async def main() -> tuple[bool, int]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(ScriptedSMTP, "127.0.0.1", 0)
        async with server:
            conn = await SMTPConnection.open("127.0.0.1", server.sockets[0].getsockname()[1], helo_name="c.test", timeouts=QUICK)
            conn.close()
            got: list[TransactionResult] = []
            conn.send_with_callback(Transaction("s@a.test", ["a@x.test"], Body(b"x\r\n")), got.append)
            called_inside = bool(got)
            await asyncio.sleep(0)
            assert got and got[0].error is not None
            return called_inside, got[0].error.code

    called_inside, code = run(main())
    assert not called_inside and code == 451


async def _greet_and_read_first_envelope(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Greeting, EHLO with PIPELINING, then read one pipelined MAIL/RCPT/DATA group."""
    writer.write(b"220 mx ESMTP\r\n")
    await reader.readline()
    writer.write(b"250-mx\r\n250 PIPELINING\r\n")
    for _ in range(3):
        await reader.readline()


async def _batching_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers message 1's end of data together with message 2's envelope (550 RCPT, 554 DATA)."""
    await _greet_and_read_first_envelope(reader, writer)
    writer.write(b"250 ok\r\n250 ok\r\n354 go\r\n")
    while await reader.readline() not in (b".\r\n", b""):
        pass
    for _ in range(3):
        await reader.readline()
    writer.write(b"250 2.0.0 first queued\r\n250 ok\r\n550 5.1.1 no such user\r\n554 5.5.1 no valid recipients\r\n")
    await reader.read()
    writer.close()


def test_callback_that_closes_the_connection_keeps_the_real_results_of_the_same_read(run: Run) -> None:
    # Both results arrive in one read; the first one's callback closes the
    # connection. The second must still get the server's 550, not a made-up
    # "connection closed" (451: it would be retried instead of bounced).
    async def main() -> dict[object, list[str]]:
        server = await asyncio.start_server(_batching_server, "127.0.0.1", 0)
        async with server:
            conn = await SMTPConnection.open("127.0.0.1", server.sockets[0].getsockname()[1], helo_name="c.test", timeouts=QUICK)
            body = Body(b"Subject: x\r\n\r\nhi\r\n")
            got: dict[object, list[str]] = {}
            both = asyncio.get_running_loop().create_future()

            def on_done(result: TransactionResult) -> None:
                got[result.transaction.tag] = [str(r) for r in result.recipient_replies()]
                if result.transaction.tag == 1:
                    conn.close()
                if len(got) == 2:
                    both.set_result(None)

            conn.send_with_callback(Transaction("s@a.test", ["ok@b.test"], body, 1), on_done)
            conn.send_with_callback(Transaction("s@a.test", ["nouser@b.test"], body, 2), on_done)
            await asyncio.wait_for(both, 10)
        return got

    got = run(main())
    assert got == {1: ["250 2.0.0 first queued"], 2: ["550 5.1.1 no such user"]}


def test_sending_from_a_callback_after_421_or_quit_reports_the_failure_later(run: Run) -> None:
    # The read carrying the 421 completes message 1; its callback queues
    # message 2 on the same (now dead) connection. Message 2 must be reported,
    # soon and with the failure, not raise or be forgotten. Likewise after QUIT.
    async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _greet_and_read_first_envelope(reader, writer)
        writer.write(b"421 4.3.2 shutting down\r\n")
        await reader.read()
        writer.close()

    async def main() -> tuple[list[tuple[object, int]], list[object], int, int]:
        loop = asyncio.get_running_loop()
        errors: list[object] = []
        # Only our connection's reports count (the stream server's own tasks may log their cancellation).
        loop.set_exception_handler(
            lambda _loop, ctx: errors.append(ctx.get("exception")) if isinstance(ctx.get("protocol"), SMTPConnection) else None
        )
        server = await asyncio.start_server(closing, "127.0.0.1", 0)
        async with server:
            conn = await SMTPConnection.open("127.0.0.1", server.sockets[0].getsockname()[1], helo_name="c.test", timeouts=QUICK)
            body = Body(b"Subject: x\r\n\r\nhi\r\n")
            got: list[tuple[object, int]] = []
            second = loop.create_future()

            def on_done(result: TransactionResult) -> None:
                assert result.error is not None
                got.append((result.transaction.tag, result.error.code))
                if result.transaction.tag == 1:
                    conn.send_with_callback(Transaction("s@a.test", ["r@b.test"], body, 2), on_done)
                else:
                    second.set_result(None)

            conn.send_with_callback(Transaction("s@a.test", ["r@b.test"], body, 1), on_done)
            await asyncio.wait_for(second, 10)
            leftover = len(conn._waiters)
            # After QUIT: both entry points report instead of raising.
            conn2 = await SMTPConnection.open("127.0.0.1", server.sockets[0].getsockname()[1], helo_name="c.test", timeouts=QUICK)
            conn2.protocol.quit()
            fut = conn2.send(Transaction("s@a.test", ["r@b.test"], body, 3))
            late: list[TransactionResult] = []
            conn2.send_with_callback(Transaction("s@a.test", ["r@b.test"], body, 4), late.append)
            result3 = await asyncio.wait_for(fut, 10)
            await asyncio.sleep(0)
            assert result3.error is not None and late and late[0].error is not None
            conn2.close()
        return got, errors, leftover, result3.error.code

    got, errors, leftover, code3 = run(main())
    assert got == [(1, 421), (2, 421)]
    assert errors == [] and leftover == 0 and code3 == 451


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


class ResetOnStartTLS(asyncio.Protocol):
    """Offers STARTTLS, says 220 to it, then resets the connection (RST) before any handshake."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.write(b"220 reset.test ESMTP\r\n")  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if data.upper().startswith(b"EHLO"):
            self.transport.write(b"250-reset.test\r\n250 STARTTLS\r\n")  # type: ignore[attr-defined]
        elif data.upper().startswith(b"STARTTLS"):
            self.transport.write(b"220 2.0.0 go ahead\r\n")  # type: ignore[attr-defined]
            asyncio.get_running_loop().call_later(0.05, self._reset)

    def _reset(self) -> None:
        sock = self.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()


def test_a_reset_during_the_tls_handshake_is_a_clean_failure(run: Run) -> None:
    # Found by an interoperability attack: the polite QUIT after the failure was written to a transport
    # already closed; under uvloop that raised ("Task exception was never retrieved") and the rest of
    # the teardown, the waiters' results among it, was skipped.
    async def main() -> None:
        loop = asyncio.get_running_loop()
        unhandled: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
        server = await loop.create_server(ResetOnStartTLS, "127.0.0.1", 0)
        async with server:
            with pytest.raises((SessionRefused, ConnectError, OSError)):
                await SMTPConnection.open("127.0.0.1", server.sockets[0].getsockname()[1], timeouts=QUICK,
                                          tls=TLSPolicy.OPPORTUNISTIC, tls_context=ssl.create_default_context())
            await asyncio.sleep(0.2)  # let any orphaned task fail
        import gc

        gc.collect()  # "never retrieved" is reported when the failed task is collected
        await asyncio.sleep(0)
        assert unhandled == []

    run(main())


def test_opportunistic_tls_goes_on_in_clear_when_the_handshake_fails(run: Run, tmp_path: Path) -> None:
    # Found by an interoperability attack: a server offering STARTTLS whose handshake cannot succeed
    # (here it speaks only TLS 1.0, which the client refuses) had every try deferred until the mail
    # expired. Opportunistic TLS now reconnects at once in clear, as Postfix's "may" does (RFC 7435),
    # and the host is spoken to in clear for a while (one failed handshake, not one a message).
    from fastmta.delivery.config import config_from_dict
    from fastmta.delivery.engine import Engine, Status

    cert, key = make_cert(tmp_path)
    old_tls = server_context(cert, key)
    with warnings.catch_warnings():  # TLS 1.0 is deprecated: that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        old_tls.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        old_tls.maximum_version = ssl.TLSVersion.TLSv1

    async def main() -> None:
        handler = Collect()
        server, port = await aiosmtpd_server(handler, tls_context=old_tls)
        async with server:
            cfg = config_from_dict({"routing": {"static": {"*": [f"127.0.0.1:{port}"]}},
                                    "smtp": {"tls": "opportunistic"}, "queue": {"max_lifetime": 20}})
            async with Engine(cfg) as engine:
                ids = [await engine.submit(TRICKY, "s@a.test", [f"r{i}@x.test"]) for i in range(3)]
                outcomes = [o for i in ids for o in await asyncio.wait_for(engine.result(i), 15)]
                in_clear = engine._dispatch._health is not None and engine._dispatch._health.tls_broken(
                    None, "127.0.0.1", port)
        assert [o.status for o in outcomes] == [Status.DELIVERED] * 3
        assert sorted(r for m in handler.messages for r in m[1]) == ["r0@x.test", "r1@x.test", "r2@x.test"]
        assert in_clear  # remembered: the next connection does not try the handshake again

    run(main())


class RefusesPipeliningAfterData(StoringSMTP):
    """Haraka's rule since 2024 (GHSA-rp4q-8m6x-c43c): it advertises PIPELINING but answers 503 to any
    command that arrives in the same read as the end of DATA. Stores what it accepts in ``stored``."""

    greeting = b"220 haraka.test ESMTP\r\n"
    drop = False  # chasquid's way instead: such commands are dropped, never answered

    def message_done(self) -> bytes:
        rest, self.buffer = self.buffer, b""
        refused = 0 if self.drop else len(rest.split(b"\r\n")) - 1
        return b"250 2.0.0 stored\r\n" + b"503 5.5.1 Bad sequence of commands - pipelined after end of DATA\r\n" * refused


def test_a_server_refusing_commands_pipelined_after_data_gets_every_message(run: Run) -> None:
    # Found by an interoperability attack against Haraka 3.3: the next envelope, sent in the same write
    # as the end of DATA (RFC 2920 allows it), got 503 and half the recipients were bounced for good
    # (chasquid drops such commands instead). Now the 503 is retried, and the site gets one transaction
    # at a time.
    from fastmta.delivery.config import config_from_dict
    from fastmta.delivery.engine import Engine, Status

    async def main() -> None:
        stored: list[bytes] = []
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: type("P", (RefusesPipeliningAfterData,), {"stored": stored})(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            cfg = config_from_dict({"routing": {"static": {"*": [f"127.0.0.1:{port}"]}}, "smtp": {"tls": "never"},
                                    "sites": {"*": {"max_connections": 1, "adaptive": {"enabled": False}}},
                                    "queue": {"retry_initial": 0.5, "retry_max": 2, "retry_jitter": 0.0, "max_lifetime": 60}})
            async with Engine(cfg) as engine:
                ids = [await engine.submit(TRICKY, "s@a.test", [f"r{i}@x.test"]) for i in range(8)]
                outcomes = [o for i in ids for o in await asyncio.wait_for(engine.result(i), 30)]
        assert [o.status for o in outcomes] == [Status.DELIVERED] * 8
        assert len(stored) == 8  # each once

    run(main())


def test_a_server_dropping_commands_pipelined_after_data_costs_seconds_not_minutes(run: Run) -> None:
    # Found by an interoperability attack against chasquid: commands that arrive with the end of DATA
    # are dropped, never answered; the client waited for the MAIL reply until chasquid's own timeout
    # closed the session (60 s; against a server that keeps waiting, smtp.timeouts.mail, 300 s), once
    # a site. The reply to the first MAIL sent after a transaction has its own, shorter timeout.
    from fastmta.delivery.config import config_from_dict
    from fastmta.delivery.engine import Engine, Status

    async def main() -> float:
        stored: list[bytes] = []
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: type("P", (RefusesPipeliningAfterData,), {"stored": stored, "drop": True})(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            cfg = config_from_dict({"routing": {"static": {"*": [f"127.0.0.1:{port}"]}},
                                    "smtp": {"tls": "never", "timeouts": {"mail_after_data": 1.0}},
                                    "sites": {"*": {"max_connections": 1, "adaptive": {"enabled": False}}},
                                    "queue": {"retry_initial": 120, "max_lifetime": 600}})
            started = time.monotonic()
            async with Engine(cfg) as engine:
                ids = [await engine.submit(TRICKY, "s@a.test", [f"r{i}@x.test"]) for i in range(8)]
                outcomes = [o for i in ids for o in await asyncio.wait_for(engine.result(i), 30)]
            took = time.monotonic() - started
        assert [o.status for o in outcomes] == [Status.DELIVERED] * 8
        assert len(stored) == 8  # each once
        return took

    took = run(main())
    assert took < 10, f"took {took:.1f} s"


class MessagesPerConnection(StoringSMTP):
    """Takes ``limit`` messages a connection, then refuses MAIL: Exim's smtp_accept_max_per_connection
    ("421 ... too many messages in this connection", and hangs up) or OpenSMTPD's max-mails ("452 4.5.3
    Too many recipients: Too many messages sent", and stays open). Class attributes are set per test."""

    greeting = b"220 limits.test ESMTP\r\n"
    ehlo = b"250-limits.test\r\n250 PIPELINING\r\n"
    limit = 3
    exim = True
    hangup = False  # or: answer the limit's last message, and hang up on whatever was pipelined behind it
    refused_on_one_connection: list[int]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.taken, self.refused, self.no_mail = 0, 0, False
        self.refused_on_one_connection.append(0)
        super().connection_made(transport)

    def message_done(self) -> bytes:
        self.taken += 1
        if self.hangup and self.taken >= self.limit:
            self.hang_up(b"250 2.0.0 queued\r\n")
            return b""
        return b"250 2.0.0 queued\r\n"

    def command(self, verb: bytes) -> bytes | None:
        if verb == b"MAIL" and self.taken >= self.limit:
            self.refused += 1
            self.refused_on_one_connection[-1] = self.refused
            if self.exim:
                self.hang_up(b"421 limits.test too many messages in this connection\r\n")
                return None
            self.no_mail = True
            return b"452 4.5.3 Too many recipients: Too many messages sent\r\n"
        if verb in (b"RCPT", b"DATA") and self.no_mail:
            return b"503 5.5.1 Error: need MAIL command\r\n"
        self.no_mail = self.no_mail and verb != b"MAIL"
        return super().command(verb)


@pytest.mark.parametrize("exim", [True, False], ids=["exim-421", "opensmtpd-452"])
def test_a_messages_per_connection_limit_means_a_new_connection_not_a_slower_site(run: Run, exim: bool) -> None:
    # Found by an interoperability attack: read as a rate limit, each refusal halved the site's rate
    # (Exim, a limit of 3: 120 messages took over 280 s and 21 expired), and OpenSMTPD's refusal left
    # the connection open to be refused again (20 refused MAILs on one session).
    from fastmta.delivery.config import config_from_dict
    from fastmta.delivery.engine import Engine, Status

    async def main() -> None:
        stored: list[bytes] = []
        refusals: list[int] = []
        attrs = {"stored": stored, "refused_on_one_connection": refusals, "exim": exim}
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: type("P", (MessagesPerConnection,), attrs)(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        started = time.monotonic()
        async with server:
            cfg = config_from_dict({"routing": {"static": {"*": [f"127.0.0.1:{port}"]}}, "smtp": {"tls": "never"},
                                    "sites": {"*": {"max_connections": 1}},  # adaptive throttle on (the default)
                                    "queue": {"retry_initial": 0.2, "retry_max": 1, "retry_jitter": 0.0,
                                              "max_lifetime": 120}})
            async with Engine(cfg) as engine:
                ids = [await engine.submit(TRICKY, "s@a.test", [f"r{i}@x.test"]) for i in range(30)]
                outcomes = [o for i in ids for o in await asyncio.wait_for(engine.result(i), 90)]
                cuts = [e for e in engine.throttle_events
                        if e.old is not None and e.new is not None and e.new < e.old and e.kind in ("rate", "window")]
        assert [o.status for o in outcomes] == [Status.DELIVERED] * 30
        assert len(stored) == 30
        assert cuts == []  # not a rate limit: nothing slowed down
        assert max(refusals) <= 2  # the session is left once it says it is done (pipelined: at most 2)
        assert time.monotonic() - started < 30  # no rate halved ten times over

    run(main())


def test_a_message_pipelined_behind_the_last_one_a_server_takes_goes_again_at_once(run: Run) -> None:
    # Found by an interoperability attack: a server that answers a message's end of data and hangs up
    # (a limit of messages a connection, said by closing) never answered the MAIL pipelined behind it;
    # that message went into the retry schedule (60 s, then 120 s) though the server never saw it.
    from fastmta.delivery.config import config_from_dict
    from fastmta.delivery.engine import Engine, Status

    async def main() -> None:
        stored: list[bytes] = []
        attrs = {"stored": stored, "refused_on_one_connection": [], "hangup": True, "limit": 2}
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: type("P", (MessagesPerConnection,), attrs)(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            cfg = config_from_dict({"routing": {"static": {"*": [f"127.0.0.1:{port}"]}}, "smtp": {"tls": "never"},
                                    "sites": {"*": {"max_connections": 1, "adaptive": {"enabled": False}}}})
            async with Engine(cfg) as engine:
                ids = [await engine.submit(TRICKY, "s@a.test", [f"r{i}@x.test"]) for i in range(20)]
                outcomes = [o for i in ids for o in await asyncio.wait_for(engine.result(i), 30)]
        assert [(o.status, o.attempts) for o in outcomes] == [(Status.DELIVERED, 1)] * 20  # none deferred
        assert len(stored) == 20

    run(main())


def test_a_session_every_host_refuses_is_deferred_in_words_that_agree(run: Run) -> None:
    # Found by an interoperability attack: TLS required, a server without STARTTLS: the deferral said
    # "451 5.7.10 STARTTLS required" (enhanced 4.7.10): a transient code beside a permanent text.
    from fastmta.delivery.config import config_from_dict
    from fastmta.delivery.engine import Engine, Status

    async def main() -> None:
        server, port = await aiosmtpd_server(Collect())
        async with server:
            cfg = config_from_dict({"routing": {"static": {"*": [f"127.0.0.1:{port}"]}}, "smtp": {"tls": "required"},
                                    "queue": {"max_lifetime": 2, "retry_initial": 0.3, "retry_jitter": 0.0}})
            async with Engine(cfg) as engine:
                mid = await engine.submit(TRICKY, "s@a.test", ["r@x.test"])
                [outcome] = await asyncio.wait_for(engine.result(mid), 30)
        assert outcome.status is Status.EXPIRED
        reply = outcome.reply
        assert reply.code == 451 and reply.enhanced == "4.7.10" and reply.lines[0].startswith("4.7.10 ")
        assert "530 5.7.10 STARTTLS required but not offered by the server" in reply.lines[0]  # its words, quoted
        assert outcome.site == f"127.0.0.1:{port}"

    run(main())


def test_mail_expired_waiting_for_a_site_that_says_421_names_the_site(run: Run) -> None:
    # Found by an interoperability attack: mail that expired while every connection got 421 (the
    # batches held ready for the site's pace) was accounted with no site at all.
    from fastmta.cli.sinkproc import embedded_sink
    from fastmta.delivery.config import config_from_dict
    from fastmta.delivery.engine import Engine, Status

    async def main(host: str, port: int) -> None:
        cfg = config_from_dict({"routing": {"static": {"*": [f"{host}:{port}"]}}, "smtp": {"tls": "never"},
                                "queue": {"max_lifetime": 2, "retry_initial": 0.3, "retry_jitter": 0.0}})
        async with Engine(cfg) as engine:
            mid = await engine.submit(TRICKY, "s@a.test", ["r@x.test"])
            [outcome] = await asyncio.wait_for(engine.result(mid), 30)
        assert outcome.status is Status.EXPIRED and outcome.reply.code == 421
        assert outcome.site == f"{host}:{port}"

    with embedded_sink(["--fault", "connect:1:421", "--no-starttls"]) as (host, port):
        run(main(host, port))


@pytest.mark.parametrize("verify", [False, True])
def test_the_engines_tls_context_verifies_only_when_asked(run: Run, tmp_path: Path, verify: bool) -> None:
    # Opportunistic TLS that does not verify (the default, Postfix's "may") loads no trust store and
    # still encrypts to a self-signed server; tls_verify = true refuses that certificate (a transient
    # 4.7.5, the mail deferred, nothing sent in clear under "required").
    from fastmta.delivery.config import config_from_dict
    from fastmta.delivery.engine import Engine, Status

    cert, key = make_cert(tmp_path)
    over_tls: list[bool] = []

    class Recording(Collect):
        async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
            over_tls.append(session.ssl is not None)
            return await super().handle_DATA(server, session, envelope)

    async def main() -> None:
        handler = Recording()
        server, port = await aiosmtpd_server(handler, tls_context=server_context(cert, key))
        async with server:
            cfg = config_from_dict({"routing": {"static": {"*": [f"127.0.0.1:{port}"]}},
                                    "smtp": {"tls": "required" if verify else "opportunistic", "tls_verify": verify},
                                    "queue": {"max_lifetime": 3}})
            async with Engine(cfg) as engine:
                ctx = engine._dispatch._tls_context
                mid = await engine.submit(TRICKY, "s@a.test", ["r@x.test"])
                outcome, = await asyncio.wait_for(engine.result(mid), 15)
        if verify:
            assert ctx.verify_mode is ssl.CERT_REQUIRED and ctx.check_hostname
            assert outcome.status is not Status.DELIVERED and outcome.reply.enhanced == "4.7.5"
            assert handler.messages == []
        else:
            assert ctx.verify_mode is ssl.CERT_NONE and ctx.cert_store_stats()["x509_ca"] == 0
            assert outcome.status is Status.DELIVERED and over_tls == [True]

    run(main())


def test_a_tls_session_ended_by_a_421_frees_the_servers_connection_at_once(run: Run, tmp_path: Path) -> None:
    # Found by an interoperability attack against Exim: after its 421 "too many messages in this
    # connection" it neither closes nor answers a TLS close_notify, and the client's TLS layer waited
    # 30 s for one, the TCP connection open: each such session held one of Exim's per-host slots, new
    # connections were refused, and 50 of 300 messages expired. The client now drops it after 2 s.
    cert, key = make_cert(tmp_path)

    class ExitsWith421(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.t = cast(asyncio.Transport, transport)
            self.buf = b""
            self.t.write(b"220 exim.test ESMTP\r\n")

        def data_received(self, data: bytes) -> None:
            self.buf += data
            while b"\r\n" in self.buf:
                line, self.buf = self.buf.split(b"\r\n", 1)
                verb = line[:4].upper()
                if verb == b"EHLO":
                    self.t.write(b"250-exim.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n")
                elif verb == b"STAR":
                    self.t.write(b"220 go ahead\r\n")
                    self.upgrading = asyncio.ensure_future(self.upgrade())
                    return
                elif verb == b"MAIL":
                    self.t.write(b"421 exim.test too many messages in this connection\r\n")
                    self.t.pause_reading()  # as Exim: no close, no close_notify answered
                    return

        async def upgrade(self) -> None:
            loop = asyncio.get_running_loop()
            self.t = cast(asyncio.Transport, await loop.start_tls(self.t, self, server_context(cert, key),
                                                                   server_side=True))

    async def main() -> tuple[TransactionResult, float]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(ExitsWith421, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            conn = await SMTPConnection.open("127.0.0.1", port, helo_name="client.test", timeouts=QUICK,
                                             tls=TLSPolicy.REQUIRED, tls_context=client_context_trusting(cert),
                                             server_hostname="localhost")
            result = await conn.send(Transaction("s@a.test", ["r@x.test"], Body(b"Subject: x\r\n\r\nhi\r\n")))
            failed_at = time.monotonic()
            for _ in range(150):  # bounded: 15 s
                if conn._transport is None:  # the client's socket is closed (connection_lost came)
                    return result, time.monotonic() - failed_at
                await asyncio.sleep(0.1)
        return result, float("inf")

    result, freed_after = run(main())
    assert result.error is not None and result.error.code == 421
    assert freed_after < 5.0, f"the server's connection stayed open {freed_after:.1f}s after its 421"
