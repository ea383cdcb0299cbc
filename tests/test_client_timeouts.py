"""Per-phase reply timeouts hold whatever the peer does (real sockets on loopback).

Runs on the compiled client core and on its pure-Python twin (marker ``core``):
the reply count that restarts the timer lives in both.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from fastmta.smtp.connection import SessionRefused, SMTPConnection, Timeouts
from fastmta.smtp.protocol import Body, Transaction
from scripted import ScriptedSMTP

pytestmark = pytest.mark.core
Run = Callable[[Coroutine[Any, Any, Any]], Any]
MESSAGE = b"From: a@a.test\r\nTo: b@b.test\r\nSubject: t\r\n\r\nhello\r\n"


class NeverQueues(ScriptedSMTP):
    """Takes the message, never answers its end of data."""

    def message_done(self) -> bytes:
        return b""


class Trickler(ScriptedSMTP):
    """Sends every reply one byte at a time, *gap* seconds apart (a slowloris server)."""

    gap = 0.2

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.greeting_sent = False
        super().connection_made(transport)

    def send(self, out: bytes) -> None:
        loop = asyncio.get_running_loop()
        for i in range(len(out)):
            loop.call_later(self.gap * (i + 1), self._write_byte, out[i : i + 1])

    def _write_byte(self, b: bytes) -> None:
        if not self.t.is_closing():
            self.t.write(b)


async def _server(factory: Callable[[], asyncio.Protocol]) -> tuple[asyncio.Server, int]:
    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_a_phase_timeout_shorter_than_the_first_armed_one_is_enforced(run: Run) -> None:
    # end_of_data (1 s) is far shorter than the greeting's (20 s), which armed the first timer.
    timeouts = Timeouts(connect=5, greeting=20, ehlo=20, mail=20, rcpt=20, data=20, end_of_data=1, rset=20, quit=5)

    async def main() -> tuple[float, str]:
        server, port = await _server(NeverQueues)
        async with server:
            conn = await SMTPConnection.open("127.0.0.1", port, helo_name="c.test", timeouts=timeouts)
            t0 = time.monotonic()
            result = await conn.send(Transaction("a@a.test", ["b@b.test"], Body(MESSAGE)))
            elapsed = time.monotonic() - t0
            conn.close()
            assert result.error is not None
            return elapsed, result.error.text

    elapsed, text = run(main())
    assert 0.9 < elapsed < 5, elapsed
    assert "timeout after 1s" in text and "end_of_data" in text


def test_a_trickled_reply_cannot_extend_its_deadline(run: Run) -> None:
    # The EHLO reply arrives one byte every 0.2 s (~8 s in all); it must be done within 1 s.
    async def main() -> tuple[float, str]:
        Trickler.gap = 0.2
        server, port = await _server(Trickler)
        async with server:
            t0 = time.monotonic()
            with pytest.raises(SessionRefused) as info:
                await SMTPConnection.open("127.0.0.1", port, helo_name="c.test", timeouts=Timeouts.uniform(1))
            return time.monotonic() - t0, str(info.value)

    elapsed, text = run(main())
    # The greeting itself trickles too (20 bytes, 4 s): it fails there, at 1 s.
    assert elapsed < 3, elapsed
    assert "timeout after 1s" in text


def test_replies_that_complete_in_time_restart_the_deadline(run: Run) -> None:
    # Every reply takes ~0.6 s to trickle in, under the 1.5 s timeout: a slow but
    # conforming server, which must not be timed out however long the session.
    async def main() -> str | None:
        Trickler.gap = 0.03
        server, port = await _server(Trickler)
        async with server:
            conn = await SMTPConnection.open("127.0.0.1", port, helo_name="c.test", timeouts=Timeouts.uniform(1.5))
            result = await conn.send(Transaction("a@a.test", ["b@b.test"], Body(MESSAGE)))
            await conn.quit()
            return result.error.text if result.error else None

    assert run(main()) is None
