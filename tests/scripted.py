"""A tiny scripted SMTP server for tests that need a server to misbehave on cue.

It answers like a pipelining sink (one write per read); subclasses change a
reply (``command``), what happens at the end of a message (``message_done``)
or how the answer is sent (``send``).
"""

from __future__ import annotations

import asyncio
from typing import Any


class ScriptedSMTP(asyncio.Protocol):
    greeting = b"220 scripted ESMTP\r\n"
    ehlo = b"250-scripted\r\n250 PIPELINING\r\n"
    queued = b"250 2.0.0 ok\r\n"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t: Any = transport
        self.in_data = False
        self.buf = b""
        self.t.write(self.greeting)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        *lines, self.buf = self.buf.split(b"\r\n")
        out = bytearray()
        for line in lines:
            if self.in_data:
                if line == b".":
                    self.in_data = False
                    out += self.message_done()
                continue
            reply = self.command(line[:4].upper())
            if reply is None:  # hang up after what was answered so far
                self.t.write(bytes(out))
                self.t.close()
                return
            out += reply
        if out:
            self.send(bytes(out))

    def command(self, verb: bytes) -> bytes | None:
        """The reply to a command; None closes the connection."""
        if verb == b"EHLO":
            return self.ehlo
        if verb == b"DATA":
            self.in_data = True
            return b"354 go\r\n"
        if verb == b"QUIT":
            return b"221 bye\r\n"
        return b"250 ok\r\n"

    def message_done(self) -> bytes:
        return self.queued

    def send(self, out: bytes) -> None:
        self.t.write(out)


class StoringSMTP(ScriptedSMTP):
    """A scripted server that keeps each message's content and answers each read in one write.

    ``stored`` (a list a test sets on a subclass) gets every message's content,
    dot-stuffing kept. Subclasses change a command's reply (``command``: None
    answers nothing more now, the server having held its answers or hung up),
    the reply to a message (``message_done``), hold their answers (``held``,
    then :meth:`answer` again) or hang up after what was answered
    (:meth:`hang_up`).
    """

    ehlo = b"250-scripted\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
    queued = b"250 2.0.0 stored\r\n"
    stored: list[bytes]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.buffer, self.held = b"", False
        self.out: list[bytes] = []
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.held:
            self.answer()

    def answer(self) -> None:
        """Answer every whole command and message in the buffer, in one write."""
        while not self.held and not self.t.is_closing():
            if self.in_data:
                end = self.buffer.find(b"\r\n.\r\n")
                if end < 0:
                    break
                content, self.buffer, self.in_data = self.buffer[:end], self.buffer[end + 5 :], False
                self.stored.append(content)
                self.out.append(self.message_done())
                continue
            line, sep, rest = self.buffer.partition(b"\r\n")
            if not sep:
                break
            self.buffer = rest
            reply = self.command(line[:4].upper())
            if reply is None:
                break
            self.out.append(reply)
        if self.out and not self.t.is_closing():
            self.t.write(b"".join(self.out))
        self.out.clear()

    def hang_up(self, last: bytes = b"") -> None:
        """Send what was answered so far and *last*, then close."""
        self.t.write(b"".join(self.out) + last)
        self.out.clear()
        self.t.close()
