"""Per-(egress source, site) ready queues and the connections that drain them.

A :class:`SiteQueue` holds the batches ready to go to one site from one egress source, and runs up to
``max_connections`` connection tasks for it. Each task connects to the site's first usable MX host (the
next one when it refuses or times out; failing hosts are marked down for all sites in :class:`HostHealth`),
then pipelines batches over it until it has carried ``max_messages_per_connection`` messages or sat idle
``idle_timeout`` seconds.

Why tasks own connections (not a free-list of idle connections per host): the connection count
per site is then the number of tasks, which is what receivers limit and the throttle steers; and a
site that tarpits only blocks its own tasks, so no other site can be starved by it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
from collections import deque
from collections.abc import Callable, Iterator

from fastmta.delivery.batch import CLASSIFY_PHASE, Batch, Delivery, HostHealth, SiteLimits, Source, one_at_a_time
from fastmta.delivery.budget import SHORTAGE_PAUSE, ConnectionBudget, warn_shortage
from fastmta.delivery.dane import connection_options as dane_options
from fastmta.delivery.eai import EnvelopePlan, envelope_for
from fastmta.delivery.routing import Route, RouteHost
from fastmta.delivery.throttle import SiteThrottle
from fastmta.errors import ConnectError, LocalShortage, Scope
from fastmta.feedback.appliances import identify_server
from fastmta.feedback.classification import Classification
from fastmta.feedback.classify import Classifier
from fastmta.smtp.connection import SessionRefused, SMTPConnection, Timeouts
from fastmta.smtp.dsn_params import DSN_META, envelope_dsn
from fastmta.smtp.protocol import Credentials, Phase, TLSPolicy, Transaction, TransactionResult
from fastmta.smtp.reply import Reply

log = logging.getLogger("fastmta.delivery.pool")


_NO_REPLY = Reply.local(451, "4.4.0", "no reply received")
#: A transaction on its way: its batch, throttle ticket, result, and how its
#: envelope was fitted to a server without SMTPUTF8 (None: sent as it is).
_InFlight = tuple["Batch", int, asyncio.Future[TransactionResult], EnvelopePlan | None]


#: (batch, per recipient: (reply, classifier phase, classification or None when delivered), delivery)
ResultCallback = Callable[[Batch, "list[tuple[Reply, str, Classification | None]]", Delivery], None]
#: Sees every batch put on a ready queue while an operator holds work back: returns what may go on
#: (None: all of it held). See :mod:`fastmta.delivery.control`.
Gate = Callable[["SiteQueue", Batch], "Batch | None"]


class SiteQueue:
    """The ready queue and connections for one (egress source, site), steered by its throttle.

    The throttle (:class:`fastmta.delivery.throttle.SiteThrottle`) decides how many connections
    may be open (``connection_wait``) and when the next transaction may start (``message_wait``);
    every connection result and reply is fed back to it. A wait with an end is honoured by a
    timer; an open-ended one (``inf``) is asked again at the next result or closed connection.
    ``login(host, port)``: a relay's credentials (``[routing.auth]``), set by the dispatcher.
    """

    def __init__(
        self,
        source: Source,
        site: str,
        limits: SiteLimits,
        *,
        throttle: SiteThrottle,
        classifier: Classifier,
        timeouts: Timeouts,
        health: HostHealth,
        on_result: ResultCallback,
        on_expired: Callable[[Batch, Reply | None], None],
        tls: TLSPolicy = TLSPolicy.OPPORTUNISTIC,
        tls_context: ssl.SSLContext | None = None,
        budget: ConnectionBudget | None = None,
    ) -> None:
        self.budget = budget  # connections open at once over every site (None: no such cap)
        self.source = source
        self.site = site
        self.limits = self.configured = limits  # .limits: then as the site taught them (one_at_a_time...)
        self.throttle = throttle
        self.classifier = classifier
        self.timeouts = timeouts
        self.health = health
        self.on_result = on_result
        self.on_expired = on_expired
        self.tls = tls
        self.tls_context = tls_context
        self.login: Callable[[str, int], Credentials | None] = lambda host, port: None
        self.ready: deque[Batch] = deque()
        #: Batches set aside while the site holds mail back (see :meth:`put`), with how many recipients
        #: each took off the read-ahead (``on_park``).
        self.parked: deque[tuple[Batch, int]] = deque()
        self.allowance = 2 * limits.max_connections * limits.pipeline_depth  # ready batches worth keeping
        self.on_park: Callable[[int], None] | None = None
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle: deque[asyncio.Future[None]] = deque()  # connections waiting for work or for the throttle
        self._open_timer: asyncio.TimerHandle | None = None
        # Batches whose sender domain the site holds (a provider's procedure), and their release.
        self._held: deque[Batch] = deque()
        self._release_timer: asyncio.TimerHandle | None = None
        self._connect_failures = 0  # consecutive failed connection attempts
        self._connecting: set[asyncio.Task[None] | None] = set()  # the tasks making a connection attempt
        self._hold_until = 0.0  # no new connection before this (loop time)
        self.connections = 0  # currently open
        self.max_seen_connections = self.connections_opened = self.transactions = 0
        self._closing = False
        self.gate: Gate | None = None  # operator holds (None: none, the usual case: one test per batch put)
        self.sending: dict[int, Batch] = {}  # batches in an open transaction, by id(): an operator can't recall
        self.last_route: Route | None = None  # the route the last connection was opened for

    # --- feeding --------------------------------------------------------------

    def put(self, batch: Batch, *, front: bool = False) -> None:
        """Queue *batch* (*front*: a retry, before the rest).

        While a limit holds the site's mail back (its rate, a warm-up quota, a
        suspension, a pause after refused connections), batches beyond two
        rounds of its connections (``allowance``) are *parked*: their untried
        recipients stop counting as the engine's read-ahead (``on_park``).
        Otherwise a campaign's Gmail half at 10 a second fills the read-ahead and every
        other site waits (measured: 600 recipients took 49 s behind 600 at 10/s).
        Parked batches still count against the memory bounds, and go back in order.
        "Held" is what the throttle's own ``message_wait`` last found (no extra look
        at shared limits); the adaptive rate parks nothing: a backlog waiting for its
        connections is the read-ahead, and stays bounded by it.
        """
        if self.gate is not None:
            kept = self.gate(self, batch)
            if kept is None:
                return
            batch = kept
        if front:
            self.ready.appendleft(batch)
        elif self.parked or len(self.ready) >= self.allowance:
            held = self._held_back()
            if self.parked or held:
                # In order behind those parked already; taken off the read-ahead only while held.
                n = batch.untried if held else 0
                self.parked.append((batch, n))
                if n and self.on_park is not None:
                    self.on_park(-n)
            else:
                self.ready.append(batch)
        else:
            self.ready.append(batch)
        self._kick()

    def waiting(self) -> Iterator[Batch]:
        """Every batch not yet taken by a connection: the ready ones, then those parked."""
        yield from self.ready
        yield from (batch for batch, _ in self.parked)

    def _held_back(self) -> bool:
        """Does a limit hold the site's mail back now (see :meth:`put`)?"""
        now = self._loop.time()
        return self.throttle.held_until > now or self._hold_until > now

    def repark(self) -> None:
        """Park what is ready beyond the allowance while the site is held: when the limit shows, and after
        an operator's change unparked it all (else it stayed read-ahead until the site's next timer)."""
        if len(self.ready) > self.allowance and self._held_back():
            self._park_excess()

    def _park_excess(self) -> None:
        """The site was just found held with more ready than its allowance (put before the limit showed,
        e.g. a rate's burst): the newest go back to the front of the parked, off the read-ahead."""
        gone = 0
        while len(self.ready) > self.allowance:
            batch = self.ready.pop()
            n = batch.untried
            self.parked.appendleft((batch, n))
            gone += n
        if gone and self.on_park is not None:
            self.on_park(-gone)

    def unpark(self, *, refill: bool = False) -> None:
        """Parked batches back onto the ready queue: all, or (*refill*) up to ``allowance``. An operator's
        change (a hold, a bounce, a reroute) unparks all first, so it sees one queue, then :meth:`repark`s."""
        back = 0
        while self.parked and (not refill or len(self.ready) < self.allowance):
            batch, n = self.parked.popleft()
            self.ready.append(batch)
            back += n
        if back and self.on_park is not None:
            self.on_park(back)

    def _kick(self) -> None:
        """Something changed (work arrived, a result, a closed connection): wake a waiting connection,
        or open another if the throttle allows."""
        if self.parked and len(self.ready) < self.allowance:
            self.unpark(refill=True)
        if self._closing or not self.ready:
            return
        while self._idle:
            waiter = self._idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        if len(self._tasks) >= len(self.ready):
            return  # enough connections for the work at hand
        now = self._loop.time()
        if now < self._hold_until:
            return  # pausing after refused connections; the timer kicks again
        pace = self.throttle.message_wait(now)
        if pace > 0:
            self.repark()
        if pace > 0 and (self.connections or pace > self.limits.idle_timeout):
            # The message rate (or a suspension, a warm-up quota) is what holds
            # us back: another connection would only idle, growing the window
            # would probe the receiver's connection limit for nothing, and a
            # connection opened now would be closed again unused. Come back
            # when the pace allows (an open-ended wait ends with a result).
            if pace != math.inf and self._open_timer is None and not self.connections:
                self._open_timer = self._loop.call_later(pace, self._timer_kick)
            return
        wait = self.throttle.connection_wait(len(self._tasks), now)
        if wait <= 0:
            if self.budget is not None and not self.budget.take(self._kick):
                return  # every connection the machine allows is open: kicked again when one closes
            task = asyncio.ensure_future(self._connection_task())
            self._tasks.add(task)
            task.add_done_callback(self._task_done)
        elif wait != math.inf and self._open_timer is None:
            self._open_timer = self._loop.call_later(wait, self._timer_kick)

    def _timer_kick(self) -> None:
        self._open_timer = None
        self._kick()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._kick()

    @property
    def busy(self) -> bool:
        return bool(self.ready) or bool(self._tasks) or bool(self._held) or bool(self.parked)

    @property
    def sender_held(self) -> deque[Batch]:
        """Batches set aside while the site holds their sender's domain (a provider procedure)."""
        return self._held

    @sender_held.setter
    def sender_held(self, batches: deque[Batch]) -> None:
        self._held = batches

    @property
    def reconnect_at(self) -> float:
        """No new connection before this loop time (a pause after refused connections)."""
        return self._hold_until

    def retry_now(self) -> None:
        """An operator says "try now": forget the pause after refused connections and the hosts marked
        down, end the throttle's suspension (its probe goes at once; the adaptive rate stays)."""
        now = self._loop.time()
        self._hold_until = 0.0
        self._connect_failures = 0
        if self._open_timer is not None:
            self._open_timer.cancel()
            self._open_timer = None
        if self.last_route is not None:
            for host, address in self.last_route.targets():
                self.health.mark_up(self.source.address, address, host.port)
        if self.throttle.suspended_until is not None and self.throttle.suspended_until > now:
            self.throttle.suspended_until = now  # its end: the next look starts the probe
        self._kick()

    def halt(self) -> None:
        """Start nothing new (the engine can no longer keep its record)."""
        self._closing = True
        for waiter in self._idle:
            if not waiter.done():
                waiter.set_result(None)

    async def close(self, timeout: float) -> None:
        """Stop opening connections; let open ones finish their transactions, then QUIT."""
        self.halt()
        if self._open_timer is not None:
            self._open_timer.cancel()
            self._open_timer = None
        if self._release_timer is not None:
            self._release_timer.cancel()
            self._release_timer = None
        if not self.ready and not self.parked and not self._held:  # nothing to carry: no wait for a greeting
            for task in filter(None, list(self._connecting)):  # (a tarpit's held the exit for 30 s)
                task.cancel()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)

    # --- connections ----------------------------------------------------------

    async def _connection_task(self) -> None:
        """One connection's life. The next connection is opened by ``_kick`` (from
        ``_task_done``), so every connection passes the throttle's window, its
        connection rate and any pause, reconnects included."""
        try:
            await self._connection()
        finally:
            if self.budget is not None:
                self.budget.give()

    async def _connection(self) -> None:
        try:
            if not self.ready or self._closing:
                return
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
                self.throttle.connection_closed()
        except Exception:  # a bug; never lose the batches
            log.exception("connection task for %s failed", self.site)
            try:
                self._fail_ready(Reply.local(451, "4.3.0", "internal error in connection task"), None)
            except Exception:
                log.exception("could not defer the ready queue of %s", self.site)

    async def _connect(self, route: Route) -> tuple[SMTPConnection | None, str | None]:
        """Open a connection to the first usable host of *route*; on failure defer the queue."""
        src = self.source.address
        self.last_route = route
        candidates = [(h, a) for h, a in route.targets() if not self.health.is_down(src, a, h.port)]
        if not candidates:
            # Every host is marked down: try them anyway rather than wait idle,
            # in preference order (a host may be back before its mark expires).
            candidates = route.targets()
        ticket = self.throttle.connection_started(self._loop.time())
        self._connecting.add(task := asyncio.current_task())
        conn: SMTPConnection | None = None
        try:
            conn, host = await self._try_hosts(candidates, ticket)
            return conn, host
        finally:
            self._connecting.discard(task)
            if conn is None:
                self.throttle.connection_closed()  # its lease (cluster) goes back

    async def _try_hosts(
        self, candidates: list[tuple[RouteHost, str]], ticket: int
    ) -> tuple[SMTPConnection | None, str | None]:
        last: Reply | None = None
        last_host: tuple[str, str] | None = None
        src = self.source.address
        tries: deque[tuple[RouteHost, str, TLSPolicy, Credentials | None]] = deque()
        # A relay's login never goes in clear by the "TLS broken" memory (one broken handshake would give it).
        for h, a in candidates:
            login = self.login(h.name, h.port)
            broken = self.tls is TLSPolicy.OPPORTUNISTIC and login is None and self.health.tls_broken(src, a, h.port)
            # DANE: TLS required whatever the site's policy, never in clear after a failed handshake.
            tries.append((h, a, TLSPolicy.REQUIRED if h.dane else TLSPolicy.NEVER if broken else self.tls, login))
        while tries:
            host, address, tls, login = tries.popleft()
            context, name, check = dane_options(host.dane, self.tls_context, host.name)
            try:
                conn = await SMTPConnection.open(
                    address, host.port, helo_name=self.source.ehlo_name, source_address=src, timeouts=self.timeouts,
                    tls=tls, tls_context=context, server_hostname=name, credentials=login, tls_check=check)
            except SessionRefused as exc:
                last, last_host = exc.reply, (host.name, address)
                if tls is TLSPolicy.OPPORTUNISTIC and exc.reply.enhanced == "4.7.5" and login is None:
                    # A failed STARTTLS handshake: opportunistic TLS goes on in clear, at once and for a while
                    # (RFC 7435, Postfix's "may"); before, every try was deferred until the mail expired.
                    log.warning("%s %s: %s; sending in clear", host.name, address, exc.reply)
                    self.health.mark_tls_broken(src, address, host.port)
                    tries.appendleft((host, address, TLSPolicy.NEVER, None))
                    continue
                unmet_tls = tls is TLSPolicy.REQUIRED and (exc.reply.enhanced or "")[1:3] == ".7"  # 4.7.5, 5.7.10
                if exc.reply.code != 421 and not unmet_tls:
                    # A 421 at the greeting: "too many connections from you", the pace is wrong; a host without
                    # the TLS a site requires (MTA-STS) is not down for others: no move to the backup MX for that.
                    self.health.mark_down(src, address, host.port)
                continue
            except LocalShortage as exc:
                # This machine ran out (of file descriptors, most often), not the host: nothing is
                # marked down, the throttle is not cut, no recipient is charged an attempt. Before,
                # 24 descriptors for 300 connections made 70,783 deferrals blamed on the receivers.
                warn_shortage(self.site, exc)
                self._expire_overdue(Reply.local(451, "4.3.0", str(exc)))
                self._schedule_reconnect(SHORTAGE_PAUSE)  # a connection closing elsewhere frees one
                return None, None
            except ConnectError as exc:
                last, last_host = Reply.local(451, "4.4.1", str(exc)), (host.name, address)
                self.health.mark_down(src, address, host.port)
                continue
            self.health.mark_up(src, address, host.port)
            self.throttle.connection_result(ticket, None, self._loop.time())
            self._connect_failures = 0
            self._hold_until = 0.0
            return conn, host.name
        if last is None:
            return None, None
        c = self.classifier.classify(last, "connect")
        self.throttle.connection_result(ticket, c, self._loop.time(), reason=str(last))
        if self._loop.time() >= self._hold_until:
            # Whatever happens next, the next connection waits a growing pause:
            # never a reconnect loop against a host that keeps refusing.
            # Attempts that were in parallel with this one count once.
            self._connect_failures += 1
            self._schedule_reconnect(min(2.0 ** (self._connect_failures - 1), 60.0))
        if self.connections or len(self._connecting) > 1:
            return None, None  # another connection of this queue is up (or coming): it carries the work
        self._expire_overdue(last)
        paced = last.code == 421 or c.site_paced
        if paced and self._connect_failures < _PATIENCE:
            # Refused for our pace ("too many connections", rate limits): the
            # throttle has cut its window; the batches stay ready a while
            # rather than every message going into a long retry schedule.
            return None, None
        # No host would talk to us (or kept refusing us): defer what is ready,
        # which records the attempt and enforces each message's lifetime.
        reply = last
        if reply.is_permanent:
            # A 5xx greeting from every MX is still a session-level refusal;
            # the recipients may be fine tomorrow (RFC 5321 4.5.4.1 lets a
            # client treat connection-level 5xx as transient). Said so, the server's words quoted:
            # its 5.x.y code beside our 451 read as a contradiction in the accounting log.
            enhanced = "4" + reply.enhanced[1:] if reply.enhanced else "4.0.0"
            reply = Reply.local(451, enhanced, f"no host would take the session ({reply}): tried again later")
        self._fail_ready(reply, last_host)
        return None, None

    def _expire_overdue(self, why: Reply) -> None:
        """Expire ready batches past their lifetime without a connection to try them on."""
        now = self._loop.time()
        if any(b.message.deadline < now for b in self.ready):
            keep: deque[Batch] = deque()
            for batch in self.ready:
                if batch.message.deadline < now:
                    self.on_expired(batch, why)
                else:
                    keep.append(batch)
            self.ready = keep
            self.unpark(refill=True)

    def _schedule_reconnect(self, delay: float) -> None:
        self._hold_until = self._loop.time() + delay
        if self._open_timer is not None:
            self._open_timer.cancel()
        self._open_timer = self._loop.call_later(delay, self._timer_kick)

    async def _carry(self, conn: SMTPConnection, mx_host: str | None) -> bool:
        """Use *conn* until it is done; True when the task should open another connection."""
        peer_ip = conn.peer[0] if conn.peer else None
        appliance = identify_server(mx_host, conn.greeting, conn.ehlo_reply)
        delivery = Delivery(self.site, mx_host, peer_ip, conn.local[0] if conn.local else None, appliance,
                            self.source.name, conn.tls_session(), "DSN" in conn.extensions.keywords)
        inflight: deque[_InFlight] = deque()
        try:
            keep_going = await self._send_batches(conn, delivery, inflight)
        except asyncio.CancelledError:
            # Shutdown ran out of time (a tarpit): drop the connection, which
            # fails what is in flight at once (transient, so not final: counted
            # as unfinished) instead of waiting for replies that may never come.
            conn.close()
            for batch, ticket, fut, plan in inflight:
                if fut.done():
                    self._result(batch, ticket, fut.result(), delivery, plan)
                else:
                    self.sending.pop(id(batch), None)
            raise
        for batch, ticket, fut, plan in inflight:
            self._result(batch, ticket, await fut, delivery, plan)
        await conn.quit()
        return keep_going

    async def _send_batches(
        self,
        conn: SMTPConnection,
        delivery: Delivery,
        inflight: deque[_InFlight],
    ) -> bool:
        """Pipeline ready batches over *conn* as the throttle allows.

        Returns when the connection has carried its share, sat idle, or the throttle holds back
        for longer than an idle connection should stay open (a suspension, a warm-up quota); True
        means "more work, open a new connection".
        """
        limits = self.limits
        sent = answered = requeued = 0
        while True:
            while (
                self.ready
                and not self._closing  # shutting down: finish what is in flight, start nothing new
                and len(inflight) < self.limits.pipeline_depth  # may drop to 1 (one_at_a_time)
                and sent < limits.max_messages_per_connection
                and conn.is_usable
            ):
                batch = self.ready[0]
                now = self._loop.time()
                if now > batch.message.deadline:
                    # Past its queue lifetime while waiting here (a suspension, a
                    # slow site): expire it now, not after one more attempt.
                    self.ready.popleft()
                    if self.parked:
                        self.unpark(refill=True)
                    self.on_expired(batch, None)
                    continue
                if self.throttle.sender_holds and self._hold(batch, now):
                    continue
                n = len(batch.recipients)
                wait = self.throttle.message_wait(now, n, batch.message.sender)
                if wait > 0:
                    self.repark()
                    if inflight:
                        break  # results will come and may change the answer
                    if wait > limits.idle_timeout:
                        return False  # do not hold a connection through a suspension
                    await self._sleep_or_kick(wait)
                    continue
                self.ready.popleft()
                if self.parked:
                    self.unpark(refill=True)
                ticket = self.throttle.message_started(now, n, batch.message.sender)
                message = batch.message
                rcpts = [r.address for r in batch.recipients]
                plan, sender, sent_to, asked_for = envelope_for(message.sender, rcpts, message.body,
                                                                conn.extensions.smtputf8)
                if plan is not None and not plan.recipients:  # nothing this server can take: no transaction
                    self._result(batch, ticket, None, delivery, plan)
                    continue
                dsn = envelope_dsn(message.meta, asked_for) if DSN_META in message.meta else None
                fut = conn.send(Transaction(sender, sent_to, message.body, batch, dsn))
                inflight.append((batch, ticket, fut, plan))
                self.sending[id(batch)] = batch
                sent += 1
            if inflight:
                batch, ticket, fut, plan = inflight[0]
                result = await fut
                inflight.popleft()
                self.transactions += 1
                if result.mail_reply is None and answered and not self._closing and not self.throttle.probing:
                    # Never answered, behind one that was: the server hung up (or fell silent) and never saw
                    # it. Again at once, first, on a new connection (before: the retry schedule, 60 s+).
                    self.limits = one_at_a_time(self.limits, self.site, *result.recipient_results()[0],
                                                result.behind_dot)
                    self.sending.pop(id(batch), None)
                    self.ready.insert(requeued, batch)
                    requeued += 1
                    continue
                answered += 1
                if self._result(batch, ticket, result, delivery, plan):
                    sent = limits.max_messages_per_connection  # its session is done: a new connection next
                continue
            if sent >= limits.max_messages_per_connection:
                return bool(self.ready)
            if not conn.is_usable or self._closing:
                return False
            if not await self._sleep_or_kick(limits.idle_timeout):
                return False  # idle: close

    async def _sleep_or_kick(self, seconds: float) -> bool:
        """Wait until kicked (work, a result elsewhere) or *seconds* pass; True if kicked."""
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._idle.append(waiter)
        try:
            await asyncio.wait_for(waiter, seconds if seconds != math.inf else None)
            return True
        except TimeoutError:
            return False
        finally:
            if waiter in self._idle:
                self._idle.remove(waiter)

    def _result(
        self, batch: Batch, ticket: int, result: TransactionResult | None, delivery: Delivery,
        plan: EnvelopePlan | None = None,
    ) -> bool:
        """Classify each recipient's reply once, feed the throttle, hand everything to the engine.
        True: the server said this session takes no more (a messages-per-connection limit)."""
        self.sending.pop(id(batch), None)
        now = self._loop.time()
        classified: list[tuple[Reply, str, Classification | None]] = []
        sent = result.recipient_results() if result is not None else []
        if plan is not None:  # put the recipients refused before sending back in their places
            merged: list[tuple[Reply, Phase]] = [(_NO_REPLY, Phase.RCPT)] * len(batch.recipients)
            for index, reply in plan.refused.items():
                merged[index] = (reply, Phase.RCPT)
            for (index, _), outcome in zip(plan.recipients, sent):
                merged[index] = outcome
            sent = merged
        if sent:
            self.limits = one_at_a_time(self.limits, self.site, *sent[0], result is not None and result.behind_dot)
        session_done = False
        for reply, phase in sent:
            ph = CLASSIFY_PHASE[phase]
            if reply.code // 100 == 2:
                classified.append((reply, ph, None))
                self.throttle.message_result(ticket, None, now)
            else:
                c = self.classifier.classify(reply, ph)
                classified.append((reply, ph, c))
                self.throttle.message_result(ticket, c, now, reason=str(reply), sender=batch.message.sender)
                session_done = session_done or c.scope is Scope.SESSION
        self.on_result(batch, classified, delivery)
        self._kick()
        return session_done

    def _hold(self, batch: Batch, now: float) -> bool:
        """Set the head *batch* aside while the site holds its sender's domain (see ``throttle.sender_wait``)."""
        wait = self.throttle.sender_wait(batch.message.sender, now)
        if wait <= 0:
            return False
        self.ready.popleft()
        self._held.append(batch)
        if self.parked:
            self.unpark(refill=True)
        timer = self._release_timer
        if timer is None or now + wait < timer.when():
            if timer is not None:
                timer.cancel()
            self._release_timer = self._loop.call_later(wait, self._release)
        return True

    def _release(self) -> None:
        """Held batches go back to the front of the queue; those still held are set aside again when taken."""
        self._release_timer = None
        held, self._held = self._held, deque()
        self.ready.extendleft(reversed(held))
        self._kick()

    def _fail_ready(self, reply: Reply, host: tuple[str, str] | None) -> None:
        mx_host, mx_ip = host or (None, None)
        delivery = Delivery(self.site, mx_host, mx_ip, self.source.address, source=self.source.name)
        c = self.classifier.classify(reply, "connect")
        # A snapshot: the engine may put batches back into this very queue.
        self.unpark()  # the parked ones too: the site cannot be reached
        batches = list(self.ready)
        self.ready.clear()
        for batch in batches:
            self.on_result(batch, [(reply, "connect", c)] * len(batch.recipients), delivery)


#: Connection refusals for our pace (421) tolerated before the ready batches
#: are deferred (the pauses between them grow: 1 + 2 + 4 + 8 s).
_PATIENCE = 5
