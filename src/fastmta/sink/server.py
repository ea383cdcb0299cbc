"""A fast SMTP sink: accepts mail and throws it away (or captures it).

For benchmarks, for the test suite, and for anyone testing a sender. The
model is Postfix's smtp-sink: one event loop, no per-message allocations
beyond what the protocol needs. So:

* ``asyncio.Protocol`` callbacks (uvloop in the CLI), no streams, no tasks
  per connection.
* All complete command lines of one read are answered with one write, in
  order, which is what RFC 2920 pipelining needs and what keeps syscalls
  per message low.
* In discard mode DATA content is neither copied nor unstuffed: only the
  terminator ``CRLF.CRLF`` is searched for (across read boundaries). Only
  that exact sequence ends a message; a bare-LF variant does not, so a
  message can never smuggle a second one past a filter (SMTP smuggling).
* Fault injection lives in :mod:`fastmta.sink.faults`; with no faults
  configured the handlers never call into it.

Embedding::

    server = SinkServer(SinkConfig(listeners=(ListenerConfig("127.0.0.1", 0),)))
    addresses = await server.start()      # [(host, port)], port 0 resolved
    ...                                   # server.stats: live counters
    await server.close()
"""


from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import Callable
from typing import Any, Self

from fastmta.sink.capture import CaptureWriter
from fastmta.sink.config import ListenerConfig, SinkConfig
from fastmta.sink.connection import ConnectionTrace, SinkConnection
from fastmta.sink.listener import ListenerRuntime
from fastmta.sink.profiles import get_profile
from fastmta.sink.protocol import SinkProtocol
from fastmta.sink.replies import R_IDLE, R_SHUTDOWN
from fastmta.sink.stats import SinkStats
from fastmta.smtp.tlscert import make_self_signed, server_context

__all__ = ["SinkServer"]


class SinkServer:
    """The sink: one or more listeners sharing counters, randomness and capture."""

    def __init__(self, config: SinkConfig | None = None) -> None:
        self.config = config if config is not None else SinkConfig()
        self.stats = SinkStats()
        #: One trace per connection when ``config.trace`` is set, in connect order.
        self.traces: list[ConnectionTrace] = []
        #: PEM of the certificate STARTTLS presents (generated unless configured).
        self.certificate_pem: bytes | None = None
        self.addresses: list[tuple[str, int]] = []
        self._servers: list[asyncio.Server] = []
        self.connections: set[SinkConnection] = set()
        self.ssl_context: ssl.SSLContext | None = None
        self.capture = (
            CaptureWriter(self.config.capture_dir, self.config.capture_memory)
            if self.config.capture_dir is not None
            else None
        )
        self._sessions = 0
        self._sweeper: asyncio.TimerHandle | None = None
        #: (bound address, its listener): one listener may bind several sockets.
        self._bound: list[tuple[tuple[str, int], ListenerRuntime]] = []

    #: What each connection is; fastmta serve's injection listener subclasses it.
    protocol_class: type[SinkProtocol] = SinkProtocol

    def make_listener(self, lc: ListenerConfig, rng: random.Random, clock: Callable[[], float]) -> ListenerRuntime:
        """The replies and faults every connection of listener *lc* shares."""
        return ListenerRuntime(lc, self.config, self.ssl_context is not None, rng, self.stats, clock)

    def next_session_id(self) -> str:
        self._sessions += 1
        return f"{self._sessions:06X}"

    async def start(self) -> list[tuple[str, int]]:
        """Bind every listener; return the bound (host, port) pairs in order."""
        cfg = self.config
        loop = asyncio.get_running_loop()
        if cfg.starttls:
            if cfg.tls_cert is not None and cfg.tls_key is not None:
                cert, key = cfg.tls_cert.read_bytes(), cfg.tls_key.read_bytes()
            else:
                made = make_self_signed(cfg.listeners[0].hostname or get_profile(cfg.listeners[0].profile).hostname)
                cert, key = made.cert_pem, made.key_pem
            self.ssl_context = server_context(cert, key)
            self.certificate_pem = cert
        rng = random.Random(cfg.seed)
        try:
            for lc in cfg.listeners:
                listener = self.make_listener(lc, rng, loop.time)
                protocol = self.protocol_class
                server = await loop.create_server(
                    lambda listener=listener, protocol=protocol: protocol(self, listener),  # type: ignore[misc]
                    lc.host,
                    lc.port,
                    backlog=cfg.backlog,
                )
                self._servers.append(server)
                for sock in server.sockets:
                    name = sock.getsockname()
                    address = (str(name[0]), int(name[1]))
                    self.addresses.append(address)
                    self._bound.append((address, listener))
        except BaseException:
            await self.close()
            raise
        self._sweeper = loop.call_later(cfg.idle_timeout, self._sweep)
        return list(self.addresses)

    def _sweep(self) -> None:
        # A connection lives on if, since the last sweep, it completed a command
        # line or sent message content at no less than min_data_rate: a trickle
        # of bytes that completes nothing is idleness (Postfix's per-record
        # deadline has the same intent). Checked every idle_timeout, so an idle
        # or trickling connection is closed after between one and two periods.
        min_bytes = self.config.min_data_rate * self.config.idle_timeout
        for conn in list(self.connections):
            if conn.active or conn.received >= min_bytes:
                conn.active = False
                conn.received = 0
            else:
                conn.shut(R_IDLE)
        self._sweeper = asyncio.get_running_loop().call_later(self.config.idle_timeout, self._sweep)

    def stats_dict(self) -> dict[str, Any]:
        """The counters as ``--stats-json`` writes them."""
        data = self.stats.as_dict()
        data["listeners"] = [
            {"address": f"[{h}]:{p}" if ":" in h else f"{h}:{p}", "profile": lst.profile.name}
            for (h, p), lst in self._bound
        ]
        return data

    async def close(self) -> None:
        """Stop listening, tell connected clients (421) and close them."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            conn.shut(R_SHUTDOWN)
        for server in self._servers:
            await server.wait_closed()
        # Let connection_lost callbacks run so the counters are final.
        for _ in range(100):
            if not self.connections:
                break
            await asyncio.sleep(0.01)
        self._servers.clear()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
