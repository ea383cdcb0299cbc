"""Limits on the HTTP API's connections: how many, how long one may wait to send a request, how slow a body.

The API listener may face the internet (RFC 8058 one-click unsubscribes come
from the mailbox providers), and aiohttp alone bounds none of this: a client
may open a connection and never finish its request headers (slowloris), hold
an idle keep-alive connection for ever, or trickle a request body one byte at
a time, and enough of them exhaust the process's file descriptors, which the
queue, the SMTP listeners and the admin socket need too. nginx's answer is
the model: ``client_header_timeout`` and ``keepalive_timeout`` (a complete
request must arrive within a deadline of the connection opening or the last
response), ``client_body_timeout``, and a connection cap
(``worker_connections``). Here:

* at most ``max_connections`` open at once; one more gets ``503`` and is
  closed before aiohttp sees it;
* a connection with no request being handled for ``idle_timeout`` seconds
  (from when it opened, or its last response went out) is closed: that is
  both the header deadline and the keep-alive deadline;
* while a handler reads a request body, the body must arrive at an average
  of at least ``min_body_rate`` octets a second over each ``idle_timeout``
  period, or the connection is closed (the handler sees it cancelled).

It serves the runner's ``web.Server`` on its own ``asyncio.Server`` (what
``web.TCPSite`` does, plus the cap in the protocol factory), marks handlers
busy with a middleware, and checks everything from one timer, a few times an
idle period (no timer per connection or per read: the hot path is untouched).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import cast

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger("fastmta.serve.http")

__all__ = ["HttpGuard"]

_BUSY_503 = (
    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\nContent-Type: text/plain\r\n"
    b"Connection: close\r\nContent-Length: 22\r\n\r\ntoo many connections\r\n"
)


class _Watch:
    """What the guard knows of one connection."""

    __slots__ = ("mark_bytes", "mark_time", "request", "running", "waiting_since")

    def __init__(self, now: float) -> None:
        self.waiting_since = now  # no handler running since then
        self.running = 0
        self.request: web.BaseRequest | None = None
        self.mark_time = now  # the body's progress was last judged then, at mark_bytes read
        self.mark_bytes = 0


class _Refuse(asyncio.Protocol):
    """Over the cap: say 503 and hang up, without parsing anything."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio's classes: a cast, not an isinstance check.
        cast(asyncio.Transport, transport).write(_BUSY_503)
        transport.close()


class HttpGuard:
    """One HTTP listener's limits; see the module docstring."""

    def __init__(
        self, *, max_connections: int, idle_timeout: float, min_body_rate: float,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.min_body_rate = min_body_rate
        self.on_refused = on_refused
        self._watch: dict[RequestHandler, _Watch] = {}
        self._web: web.Server | None = None
        self._server: asyncio.Server | None = None
        self._timer: asyncio.TimerHandle | None = None

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        watch = self._watch_for(request.protocol, loop.time())
        watch.running += 1
        watch.request = request
        watch.mark_time, watch.mark_bytes = loop.time(), request.content.total_bytes
        try:
            return await handler(request)
        finally:
            watch.running -= 1
            watch.request = None
            watch.waiting_since = loop.time()

    async def start(self, runner: web.AppRunner, host: str, port: int) -> tuple[str, int]:
        """Serve *runner* (set up, with :attr:`middleware` among its app's) on HOST:PORT; the bound address."""
        assert runner.server is not None
        self._web = runner.server
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, host, port, reuse_address=False)
        self._timer = loop.call_later(self._period, self._sweep)
        name = self._server.sockets[0].getsockname()
        return str(name[0]), int(name[1])

    def close(self) -> None:
        """Stop listening and checking (the runner's cleanup closes the open connections)."""
        if self._server is not None:
            self._server.close()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    @property
    def _period(self) -> float:
        # Four checks an idle period: a connection is closed between 1x and 1.25x of it.
        return max(self.idle_timeout / 4, 0.05)

    def _protocol(self) -> asyncio.Protocol:
        assert self._web is not None
        if len(self._web.connections) >= self.max_connections:
            self._refused("max_connections")
            return _Refuse()
        handler = self._web()
        if len(self._watch) > 2 * self.max_connections:  # closed ones pile up between sweeps (a flood)
            self._watch = {h: w for h, w in self._watch.items() if h.transport is not None}
        self._watch[handler] = _Watch(asyncio.get_running_loop().time())  # its header deadline runs from now
        return handler

    def _watch_for(self, handler: RequestHandler, now: float) -> _Watch:
        watch = self._watch.get(handler)
        if watch is None:
            watch = self._watch[handler] = _Watch(now)
        return watch

    def _sweep(self) -> None:
        assert self._web is not None
        now = asyncio.get_running_loop().time()
        open_now = self._web.connections
        self._watch = {h: self._watch_for(h, now) for h in open_now}  # the closed ones are forgotten
        for handler, watch in self._watch.items():
            if handler.transport is None:
                continue  # closed already (by us, and still flushing its response): not again
            if not watch.running:
                if now - watch.waiting_since >= self.idle_timeout:
                    self._close(handler, "idle")
                continue
            request = watch.request
            if request is None or request.content.is_eof() or now - watch.mark_time < self.idle_timeout:
                continue
            read = request.content.total_bytes
            if read - watch.mark_bytes < self.min_body_rate * (now - watch.mark_time):
                self._close(handler, "slow_body")
            else:
                watch.mark_time, watch.mark_bytes = now, read
        self._timer = asyncio.get_running_loop().call_later(self._period, self._sweep)

    def _close(self, handler: RequestHandler, reason: str) -> None:
        transport = handler.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        log.info("HTTP connection from %s closed: %s", peer[0] if peer else "?", reason.replace("_", " "))
        self._refused(reason)
        handler.force_close()

    def _refused(self, reason: str) -> None:
        if self.on_refused is not None:
            self.on_refused(reason)
