"""Per-(egress source, site) ready queues and the connections that drain them.

A :class:`SiteQueue` holds the batches ready to go to one site from one
egress source, and runs up to ``max_connections`` connection tasks for it.
Each task connects to the site's first usable MX host (falling over to the
next host or address when one refuses or times out, and marking a failing
host down for a while, shared by all sites through :class:`HostHealth`),
then keeps pulling batches and pipelining them over that connection until it
has carried ``max_messages_per_connection`` messages or sat idle for
``idle_timeout`` seconds.

Why tasks own connections (rather than a free-list of idle connections per
host that any sender borrows): the connection count per site is then simply
the number of tasks, which is what receivers limit and what the throttle
will steer; and a site that tarpits only ever blocks its own tasks, so no
other site can be starved by it (fairness by construction).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from fastmta.connection import SessionRefused, SMTPConnection, Timeouts
from fastmta.errors import ConnectError
from fastmta.message import Message, Recipient
from fastmta.protocol import TLSPolicy, Transaction, TransactionResult
from fastmta.reply import Reply
from fastmta.routing import Route

log = logging.getLogger("fastmta.pool")


@dataclass(frozen=True, slots=True)
class Source:
    """An egress source: the local address to bind and the name to say in EHLO."""

    name: str
    address: str | None  # None: let the OS choose
    ehlo_name: str
    weight: int = 1


@dataclass(frozen=True, slots=True)
class SiteLimits:
    max_connections: int = 10
    max_messages_per_connection: int = 100
    max_recipients_per_transaction: int = 50
    idle_timeout: float = 30.0
    pipeline_depth: int = 2  # transactions in flight per connection


@dataclass(slots=True)
class Batch:
    """Recipients of one message going to one site: one SMTP transaction."""

    message: Message
    recipients: list[Recipient]
    route: Route


@dataclass(frozen=True, slots=True)
class Delivery:
    """Where a transaction went (for accounting)."""

    site: str
    mx_host: str | None
    mx_ip: str | None
    source_ip: str | None


ResultCallback = Callable[[Batch, TransactionResult, Delivery], None]


class HostHealth:
    """Remembers hosts that failed to connect, so that others are tried first."""

    def __init__(self, down_time: float, clock: Callable[[], float]) -> None:
        self.down_time = down_time
        self._clock = clock
        self._down_until: dict[tuple[str | None, str, int], float] = {}

    def is_down(self, source: str | None, address: str, port: int) -> bool:
        until = self._down_until.get((source, address, port))
        if until is None:
            return False
        if until <= self._clock():
            del self._down_until[(source, address, port)]
            return False
        return True

    def mark_down(self, source: str | None, address: str, port: int) -> None:
        self._down_until[(source, address, port)] = self._clock() + self.down_time

    def mark_up(self, source: str | None, address: str, port: int) -> None:
        self._down_until.pop((source, address, port), None)


class SiteQueue:
    """The ready queue and connections for one (egress source, site)."""

    def __init__(
        self,
        source: Source,
        site: str,
        limits: SiteLimits,
        *,
        timeouts: Timeouts,
        health: HostHealth,
        on_result: ResultCallback,
        tls: TLSPolicy = TLSPolicy.OPPORTUNISTIC,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.source = source
        self.site = site
        self.limits = limits
        self.timeouts = timeouts
        self.health = health
        self.on_result = on_result
        self.tls = tls
        self.tls_context = tls_context
        self.ready: deque[Batch] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle: deque[asyncio.Future[None]] = deque()  # connections waiting for work
        self.connections = 0  # currently open
        self.max_seen_connections = 0
        self.connections_opened = 0
        self.transactions = 0
        self._closing = False

    # --- feeding --------------------------------------------------------------

    def put(self, batch: Batch) -> None:
        self.ready.append(batch)
        while self._idle:
            waiter = self._idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        # Open another connection only when none is idle and the limit allows.
        if len(self._tasks) < self.limits.max_connections and not self._closing:
            if len(self._tasks) < len(self.ready):
                task = asyncio.ensure_future(self._connection_task())
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    @property
    def busy(self) -> bool:
        return bool(self.ready) or bool(self._tasks)

    async def close(self, timeout: float) -> None:
        """Stop opening connections; let open ones finish their transactions, then QUIT."""
        self._closing = True
        for waiter in self._idle:
            if not waiter.done():
                waiter.set_result(None)
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)

    # --- connections ----------------------------------------------------------

    async def _connection_task(self) -> None:
        try:
            while self.ready and not self._closing:
                conn, host = await self._connect(self.ready[0].route)
                if conn is None:
                    return
                self.connections += 1
                self.connections_opened += 1
                self.max_seen_connections = max(self.max_seen_connections, self.connections)
                try:
                    await self._carry(conn, host)
                finally:
                    self.connections -= 1
        except Exception:  # pragma: no cover - a bug; never lose the batches
            log.exception("connection task for %s failed", self.site)
            self._fail_ready(Reply.local(451, "4.3.0", "internal error in connection task"), None)

    async def _connect(self, route: Route) -> tuple[SMTPConnection | None, str | None]:
        """Open a connection to the first usable host of *route*; on failure defer the queue."""
        last: Reply | None = None
        last_host: tuple[str, str] | None = None
        src = self.source.address
        candidates = [(h, a) for h, a in route.targets() if not self.health.is_down(src, a, h.port)]
        if not candidates:
            # Every host is marked down: try them anyway rather than wait idle,
            # in preference order (a host may be back before its mark expires).
            candidates = route.targets()
        for host, address in candidates:
            try:
                conn = await SMTPConnection.open(
                    address,
                    host.port,
                    helo_name=self.source.ehlo_name,
                    source_address=src,
                    timeouts=self.timeouts,
                    tls=self.tls,
                    tls_context=self.tls_context,
                    server_hostname=host.name,
                )
            except SessionRefused as exc:
                last, last_host = exc.reply, (host.name, address)
                self.health.mark_down(src, address, host.port)
                continue
            except ConnectError as exc:
                last, last_host = Reply.local(451, "4.4.1", str(exc)), (host.name, address)
                self.health.mark_down(src, address, host.port)
                continue
            self.health.mark_up(src, address, host.port)
            return conn, host.name
        # No host would talk to us. If another connection of this queue is up,
        # it will carry the work; otherwise the ready batches are deferred.
        if self.connections == 0 and last is not None:
            reply = last
            if reply.is_permanent:
                # A 5xx greeting from every MX is still a session-level refusal;
                # the recipients may be fine tomorrow (RFC 5321 4.5.4.1 lets a
                # client treat connection-level 5xx as transient).
                reply = Reply(451, reply.lines, reply.enhanced and "4" + reply.enhanced[1:])
            self._fail_ready(reply, last_host)
        return None, None

    async def _carry(self, conn: SMTPConnection, mx_host: str | None) -> None:
        peer_ip = conn.peer[0] if conn.peer else None
        delivery = Delivery(self.site, mx_host, peer_ip, conn.local[0] if conn.local else None)
        inflight: deque[tuple[Batch, asyncio.Future[TransactionResult]]] = deque()
        try:
            await self._send_batches(conn, delivery, inflight)
        except asyncio.CancelledError:
            # Shutdown ran out of time (a tarpit): drop the connection, which
            # fails what is in flight at once (transient, so not final: counted
            # as unfinished) instead of waiting for replies that may never come.
            conn.close()
            for batch, fut in inflight:
                if fut.done():
                    self.on_result(batch, fut.result(), delivery)
            raise
        for batch, fut in inflight:
            self.on_result(batch, await fut, delivery)
        await conn.quit()

    async def _send_batches(
        self,
        conn: SMTPConnection,
        delivery: Delivery,
        inflight: deque[tuple[Batch, asyncio.Future[TransactionResult]]],
    ) -> None:
        """Pipeline ready batches over *conn* until its message limit, idle timeout or shutdown."""
        limits = self.limits
        sent = 0
        while True:
            while (
                self.ready
                and not self._closing  # shutting down: finish what is in flight, start nothing new
                and len(inflight) < limits.pipeline_depth
                and sent < limits.max_messages_per_connection
                and conn.is_usable
            ):
                batch = self.ready.popleft()
                rcpts = [r.address for r in batch.recipients]
                fut = conn.send(Transaction(batch.message.sender, rcpts, batch.message.body, batch))
                inflight.append((batch, fut))
                sent += 1
            if inflight:
                batch, fut = inflight[0]
                result = await fut
                inflight.popleft()
                self.transactions += 1
                self.on_result(batch, result, delivery)
                continue
            if sent >= limits.max_messages_per_connection or not conn.is_usable or self._closing:
                return
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._idle.append(waiter)
            try:
                await asyncio.wait_for(waiter, limits.idle_timeout)
            except (TimeoutError, asyncio.TimeoutError):
                return
            finally:
                if waiter in self._idle:
                    self._idle.remove(waiter)

    def _fail_ready(self, reply: Reply, host: tuple[str, str] | None) -> None:
        delivery = Delivery(self.site, host[0] if host else None, host[1] if host else None, self.source.address)
        while self.ready:
            batch = self.ready.popleft()
            rcpts = [r.address for r in batch.recipients]
            tx = Transaction(batch.message.sender, rcpts, batch.message.body, batch)
            self.on_result(batch, TransactionResult(tx, rcpt_replies=[None] * len(rcpts), error=reply), delivery)
