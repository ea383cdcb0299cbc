"""Helpers for the sink tests: a raw SMTP client on a real socket, sink start-up.

The raw client is deliberately dumb (it writes exactly the bytes it is
given) so tests can pipeline, split writes at awkward places, and send
garbage. Replies are parsed with fastmta's ReplyParser, which has its own
tests. No tests live here.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastmta.sink import SinkServer
from fastmta.sink.config import FaultConfig, ListenerConfig, SinkConfig
from fastmta.smtp.reply import Reply, ReplyParser

TIMEOUT = 10.0


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.parser = ReplyParser()
        self.pending: list[Reply] = []

    @classmethod
    async def connect(cls, address: tuple[str, int], greeting: bool = True) -> RawClient:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(*address), TIMEOUT)
        client = cls(reader, writer)
        if greeting:
            g = await client.replies(1)
            assert g[0].code == 220, g
        return client

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def replies(self, n: int, timeout: float = TIMEOUT) -> list[Reply]:
        """The next *n* replies; fails if they do not come within *timeout*."""

        async def collect() -> list[Reply]:
            while len(self.pending) < n:
                data = await self.reader.read(65536)
                if not data:
                    raise ConnectionError(f"server closed after {self.pending!r}")
                self.pending += self.parser.feed(data)
            out, self.pending = self.pending[:n], self.pending[n:]
            return out

        return await asyncio.wait_for(collect(), timeout)

    async def cmd(self, line: bytes) -> Reply:
        await self.send(line + b"\r\n")
        return (await self.replies(1))[0]

    async def closed_by_server(self, timeout: float = TIMEOUT) -> bool:
        """True when the server closes the connection (EOF) within *timeout*."""

        async def until_eof() -> bool:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    return True
                self.pending += self.parser.feed(data)

        try:
            return await asyncio.wait_for(until_eof(), timeout)
        except (ConnectionError, OSError):
            return True

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


@asynccontextmanager
async def sink(
    *listeners: ListenerConfig,
    faults: FaultConfig | None = None,
    **options: Any,
) -> AsyncIterator[tuple[SinkServer, list[tuple[str, int]]]]:
    """An in-process sink on loopback port 0."""
    config = SinkConfig(
        listeners=listeners or (ListenerConfig("127.0.0.1", 0),),
        faults=faults or FaultConfig(),
        **options,
    )
    server = SinkServer(config)
    addresses = await server.start()
    try:
        yield server, addresses
    finally:
        await server.close()


async def wait_for(predicate: Any, timeout: float = TIMEOUT) -> None:
    """Poll *predicate* (counters updated by the server) until true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


def stuff(content: bytes) -> bytes:
    """Reference dot-stuffing (RFC 5321 4.5.2) of CRLF content + terminator."""
    lines = content.split(b"\r\n")
    stuffed = b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)
    if not content.endswith(b"\r\n") and content:
        stuffed += b"\r\n"
    return stuffed + b".\r\n"


def read_capture(path: Path) -> tuple[str, list[str], bytes]:
    """(sender, recipients, content) of a pickup-format capture file."""
    data = path.read_bytes()
    sender = ""
    rcpts: list[str] = []
    pos = 0
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            break
        line = data[pos:end]
        if line.startswith(b"X-Sender: "):
            sender = line[10:].decode()
        elif line.startswith(b"X-Receiver: "):
            rcpts.append(line[12:].decode())
        else:
            break
        pos = end + 2
    return sender, rcpts, data[pos:]


def captures(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix == ".eml")


_LISTENING = re.compile(r"^listening on (\[[^\]]+\]|[^:]+):(\d+)$")


@dataclass
class SinkProcess:
    proc: subprocess.Popen[str]
    addresses: list[tuple[str, int]]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = TIMEOUT) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)


def start_sink_process(*args: str, listeners: int = 1) -> SinkProcess:
    """``python -m fastmta sink ARGS`` reading back its ``listening on`` lines."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastmta", "sink", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # No PYTHONUNBUFFERED: the sink itself must flush the line.
        env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"},
    )
    assert proc.stdout is not None
    addresses: list[tuple[str, int]] = []
    deadline = time.monotonic() + 20
    while len(addresses) < listeners and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            err = proc.stderr.read() if proc.stderr else ""
            proc.kill()
            raise AssertionError(f"sink exited before listening: {err}")
        m = _LISTENING.match(line.strip())
        assert m, f"unexpected output line {line!r}"
        addresses.append((m.group(1).strip("[]"), int(m.group(2))))
    if len(addresses) < listeners:
        proc.kill()
        raise AssertionError("sink did not report its listeners in time")
    return SinkProcess(proc, addresses)
