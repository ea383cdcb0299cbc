"""The public delivery engine: ``async with Engine(config) as engine: await engine.submit(...)``.

Data flow (see DESIGN.md): ``submit`` validates and accepts a message; its
recipients are routed by domain (cached DNS, static routes), grouped by site
and cut into batches of at most ``max_recipients_per_transaction``; each
batch goes to the ready queue of its (egress source, site), whose connections
pipeline it to an MX host. Every reply becomes an :class:`Outcome`:
delivered and bounced are final, a transient failure is deferred to the due
queue with exponential backoff and jitter, and a recipient whose next try
would fall after the message's queue lifetime is expired.

Backpressure: ``submit`` waits while ``max_queued_recipients`` recipients
are unfinished, so a producer faster than the receivers cannot grow memory
without bound.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import os
import random
import ssl
import time
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import msgspec

from fastmta.delivery.accounting import AccountingLog
from fastmta.delivery.config import Config, SiteConfig
from fastmta.delivery.pool import Batch, Delivery, HostHealth, SiteLimits, SiteQueue, Source
from fastmta.delivery.routing import Route, RouteFailure, Router
from fastmta.delivery.throttle import SourceLimits, ThrottleEvent, Throttles, limits_for
from fastmta.delivery.warmup import WarmupState
from fastmta.errors import FastMTAError, InputError
from fastmta.feedback.classify import Classification, Classifier, default_classifier
from fastmta.feedback.classify import Outcome as ReplyOutcome
from fastmta.queue.records import Message, Outcome, Recipient, Status, new_message_id, split_address
from fastmta.queue.scheduler import DueQueue, RetryPolicy
from fastmta.queue.spool import Spool, SpoolError
from fastmta.smtp.connection import Timeouts
from fastmta.smtp.protocol import Body, TLSPolicy
from fastmta.smtp.reply import Reply

log = logging.getLogger("fastmta.delivery.engine")

__all__ = ["Engine", "EngineClosed", "Outcome", "Status"]


class EngineClosed(FastMTAError):
    """The engine was closed before a message reached a final state for every recipient."""


class _Tracker:
    __slots__ = ("future", "message", "outcomes", "remaining")

    def __init__(self, message: Message, future: asyncio.Future[list[Outcome]]) -> None:
        self.message = message
        self.remaining = len(message.recipients)
        self.outcomes: list[Outcome] = []
        self.future = future


class Engine:
    """Delivers messages over SMTP. Use as an async context manager."""

    def __init__(
        self,
        config: Config | None = None,
        *,
        router: Router | None = None,
        accounting: AccountingLog | None = None,
        rng: random.Random | None = None,
        classifier: Classifier | None = None,
        spool: Spool | None = None,
    ) -> None:
        self.config = config or Config()
        self._router_given = router
        self._router: Router | None = router
        self.accounting = accounting
        self._rng = rng or random.Random()
        self.classifier = classifier or default_classifier()
        #: When set, accepted messages and every recipient state change are
        #: journaled, and unfinished work found in it is resumed at start.
        self.spool = spool
        self.recovered = 0  # recipients resumed from the spool at start
        q = self.config.queue
        self.retry = RetryPolicy(q.retry_initial, q.retry_factor, q.retry_max, q.retry_jitter, q.max_lifetime)
        self._sources = [Source(s.name, s.address, s.ehlo_name, s.weight) for s in self.config.sources] or [
            Source("default", None, "localhost")
        ]
        self._source_cum = list(itertools.accumulate(s.weight for s in self._sources))
        smtp = self.config.smtp
        self._timeouts = Timeouts(**{f: getattr(smtp.timeouts, f) for f in Timeouts.__dataclass_fields__})
        self._tls = TLSPolicy(smtp.tls)
        self._tls_context = _tls_context(smtp.tls_verify)
        self.throttle_events: deque[ThrottleEvent] = deque(maxlen=200)
        self.throttles = Throttles(
            sites=self.config.sites,
            sources={s.name: SourceLimits(rate=s.rate, warmup=s.warmup) for s in self.config.sources},
            default=SiteConfig(),
            on_event=self._on_throttle_event,
        )
        self._queues: dict[tuple[str, str], SiteQueue] = {}
        self._limits_cache: dict[str, SiteLimits] = {}
        self._trackers: dict[str, _Tracker] = {}
        self._finished: OrderedDict[str, list[Outcome]] = OrderedDict()
        self._subscribers: list[asyncio.Queue[Outcome | None]] = []
        self._capacity_waiters: deque[asyncio.Future[None]] = deque()
        self._unfinished = 0  # recipients accepted and not final
        self._queued_bytes = 0  # memory held by the bodies of unfinished messages (estimate)
        self._submits = 0
        self._idle: asyncio.Event | None = None
        self._due: DueQueue[tuple[Message, list[Recipient]]] | None = None
        self._health: HostHealth | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        # domain -> work waiting for its route (one lookup task per domain)
        self._lookups: dict[
            str, list[tuple[Message, dict[str, list[Recipient]], dict[str, Route | RouteFailure] | None]]
        ] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._closing = False
        self._accepting = True
        #: The error that made the engine stop keeping its record (journal or
        #: accounting failed, e.g. a full disk); None while all is well.
        self.fatal: BaseException | None = None
        self._started = False
        self.counts: Counter[str] = Counter()  # by status
        self.site_counts: dict[str, Counter[str]] = {}
        self.started_at = 0.0

    # --- lifecycle ------------------------------------------------------------

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        if self._started:
            return
        loop = asyncio.get_running_loop()
        if self._router is None:
            self._router = Router(self.config, rng=self._rng)
        self._due = DueQueue(self._on_due, loop)
        self._health = HostHealth(self.config.queue.host_down_time, loop.time)
        self._idle = asyncio.Event()
        self._idle.set()
        if self.accounting is not None:
            self._flusher = asyncio.ensure_future(self._flush_loop())
        self._started = True
        self.started_at = time.time()
        self.throttles.wall_offset = time.time() - loop.time()
        if self.spool is not None:
            self.throttles.saved_warmups = _load_warmups(self.spool.directory / WARMUP_FILE)
            self._resume(self.spool)

    def _resume(self, spool: Spool) -> None:
        """Queue what the spool says is unfinished: deferred recipients keep their schedule."""
        loop = asyncio.get_running_loop()
        now_wall, now_loop = time.time(), loop.time()
        for rec in spool.take_recovered():
            if rec.body is None:
                log.error("message %s has no stored body (campaign reference); it cannot be resumed", rec.id)
                continue
            try:
                body = spool.read_body(rec.body)
            except SpoolError as exc:
                log.error("message %s: %s", rec.id, exc)
                continue
            rcpts: list[Recipient] = []
            due_now: list[Recipient] = []
            later: dict[float, list[Recipient]] = {}
            for rr in rec.recipients:
                domain = rr.address.rpartition("@")[2].lower().rstrip(".")
                r = Recipient(rr.address, domain, rr.attempts, rr.status, None, rr.index)
                rcpts.append(r)
                if rr.status is None or rr.next_attempt <= now_wall:
                    due_now.append(r)  # never tried, in flight at the crash, or due
                else:
                    later.setdefault(rr.next_attempt, []).append(r)
            msg = Message(rec.id, rec.sender, Body(body), rcpts, queued_at=rec.queued_at, meta=rec.meta)
            msg.deadline = now_loop + self.retry.max_lifetime - max(0.0, now_wall - rec.queued_at)
            self._trackers[msg.id] = _Tracker(msg, loop.create_future())
            self._unfinished += len(rcpts)
            self._queued_bytes += _memory_cost(msg.body)
            self.recovered += len(rcpts)
            if due_now:
                self._route(msg, due_now)
            assert self._due is not None
            for when, group in later.items():
                self._due.push(now_loop + (when - now_wall), (msg, group))
        if self._unfinished and self._idle is not None:
            self._idle.clear()

    async def close(self, timeout: float = 30.0) -> None:
        """Stop accepting; finish transactions in flight (bounded by *timeout*); close.

        Recipients not final by then (waiting for a retry, or not yet sent)
        are counted in :attr:`unfinished`, and their messages' result
        awaitables raise :class:`EngineClosed`.
        """
        if not self._started or self._closing:
            return
        self._closing = True
        self.stop_accepting()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
            for task in pending:
                task.cancel()  # e.g. a DNS lookup still running: its recipients stay unfinished
        await asyncio.gather(*(q.close(timeout) for q in self._queues.values()))
        if self._due is not None:
            self._due.pop_all()
        for tracker in self._trackers.values():
            if not tracker.future.done():
                tracker.future.set_exception(
                    EngineClosed(f"message {tracker.message.id}: {tracker.remaining} recipient(s) not final at shutdown")
                )
                tracker.future.exception()  # retrieved: nobody may be waiting
        for sub in self._subscribers:
            sub.put_nowait(None)
        if self._flusher is not None:
            self._flusher.cancel()
        if self.accounting is not None:
            self.accounting.flush()
        if self.spool is not None:
            await self.spool.sync()  # every state change so far is durable
            _save_warmups(self.spool.directory / WARMUP_FILE, self.throttles.warmup_states())
        if self._router is not None and self._router_given is None:
            await self._router.aclose()

    def stop_accepting(self) -> None:
        """Take no new messages; submits waiting for room fail with EngineClosed.

        Delivery of what was accepted goes on (``close()`` ends it). For a
        Ctrl-C: stop the input at once, even when the queue is full.
        """
        self._accepting = False
        for waiter in self._capacity_waiters:
            if not waiter.done():
                waiter.set_result(None)  # they re-check _accepting and raise

    @property
    def unfinished(self) -> int:
        """Recipients accepted but not yet delivered, bounced or expired."""
        return self._unfinished

    # --- submitting -------------------------------------------------------------

    async def submit(
        self,
        message: bytes | Body,
        sender: str,
        recipients: Sequence[str],
        *,
        meta: dict[str, Any] | None = None,
        message_id: str | None = None,
    ) -> str:
        """Accept *message* for *recipients*; return its id. Waits while the queue is full.

        Raises InputError (naming the address) for a malformed sender or
        recipient; nothing is accepted then.
        """
        if not self._started:
            raise RuntimeError("Engine not started: use `async with Engine(...)`")
        if self._closing or not self._accepting:
            raise EngineClosed(
                f"engine stopped: {self.fatal}" if self.fatal else "engine is closing; no new messages"
            )
        if not recipients:
            raise InputError("a message needs at least one recipient")
        if sender:
            split_address(sender, "sender")
        rcpts = [Recipient(*split_address(r), index=i) for i, r in enumerate(recipients)]
        body = message if isinstance(message, Body) else Body(message)
        cost = _memory_cost(body)
        await self._reserve(len(rcpts), cost)
        loop = asyncio.get_running_loop()
        msg = Message(message_id or new_message_id(), sender, body, rcpts, meta=meta or {})
        if msg.id in self._trackers:
            self._release(len(rcpts), cost)
            raise InputError(f"message id {msg.id!r} is already in the queue")
        if self.spool is not None:
            try:
                # Durable before we say "accepted" (group commit: concurrent
                # submits share one fsync).
                await self.spool.add_message(msg.id, sender, list(recipients), body.raw, meta=meta or None)
            except BaseException:
                self._release(len(rcpts), cost)
                raise
        msg.deadline = loop.time() + self.retry.max_lifetime
        self._trackers[msg.id] = _Tracker(msg, loop.create_future())
        self._route(msg, rcpts)
        self._submits += 1
        if self._submits % 64 == 0:
            # submit() does not otherwise yield while the queue has room; let
            # delivery run between submits so a producer in a tight loop does
            # not queue everything before the first message goes out.
            await asyncio.sleep(0)
        return msg.id

    def result(self, message_id: str) -> asyncio.Future[list[Outcome]]:
        """An awaitable of the final outcome of every recipient of *message_id*."""
        tracker = self._trackers.get(message_id)
        if tracker is not None:
            return tracker.future
        outcomes = self._finished.get(message_id)
        if outcomes is None:
            raise KeyError(f"unknown message {message_id} (or finished too long ago to be remembered)")
        fut: asyncio.Future[list[Outcome]] = asyncio.get_running_loop().create_future()
        fut.set_result(outcomes)
        return fut

    async def outcomes(self) -> AsyncIterator[Outcome]:
        """Every outcome from now on (deferrals too), until the engine closes."""
        queue: asyncio.Queue[Outcome | None] = asyncio.Queue()
        self._subscribers.append(queue)
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                yield item
        finally:
            self._subscribers.remove(queue)

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait until every accepted recipient is final; False on timeout."""
        assert self._idle is not None
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return self.fatal is None

    # --- routing and queueing ---------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _pick_source(self) -> Source:
        if len(self._sources) == 1:
            return self._sources[0]
        x = self._rng.random() * self._source_cum[-1]
        return self._sources[bisect.bisect_right(self._source_cum, x)]

    def _route(self, msg: Message, rcpts: list[Recipient]) -> None:
        by_domain: dict[str, list[Recipient]] = {}
        for r in rcpts:
            by_domain.setdefault(r.domain, []).append(r)
        self._route_groups(msg, by_domain, None)

    def _route_groups(
        self, msg: Message, by_domain: dict[str, list[Recipient]], known: dict[str, Route | RouteFailure] | None
    ) -> None:
        """Queue the recipients now when every domain's route is known or cached.

        Otherwise wait for that domain's lookup. One lookup task per domain,
        however many messages wait for it: a burst of submits to a new domain
        costs one coroutine, not one per message (the router is single-flight
        too, but a task per message would still cost more than the delivery).
        """
        assert self._router is not None
        routes: list[Route | RouteFailure] = []
        for domain in by_domain:
            route = known.get(domain) if known else None
            if route is None:
                route = self._router.route_cached(domain)
            if route is None:
                waiting = self._lookups.get(domain)
                if waiting is None:
                    self._lookups[domain] = [(msg, by_domain, known)]
                    self._spawn(self._lookup(domain))
                else:
                    waiting.append((msg, by_domain, known))
                return
            routes.append(route)
        self._enqueue(msg, by_domain, routes)

    async def _lookup(self, domain: str) -> None:
        assert self._router is not None
        try:
            result = await self._router.route(domain)
        except Exception as exc:  # a resolver bug must not lose the recipients
            log.exception("routing %s failed", domain)
            result = RouteFailure(domain, Reply.local(451, "4.4.3", f"routing error: {exc}"), True, 0.0)
        for msg, by_domain, known in self._lookups.pop(domain, []):
            self._route_groups(msg, by_domain, {**(known or {}), domain: result})

    def _enqueue(self, msg: Message, by_domain: dict[str, list[Recipient]], routes: Sequence[Route | RouteFailure]) -> None:
        source = self._pick_source()
        by_site: dict[str, tuple[Route, list[Recipient]]] = {}
        for group, route in zip(by_domain.values(), routes):
            if isinstance(route, RouteFailure):
                self._record_group(msg, group, route.reply, Delivery(f"domain:{route.domain}", None, None, None))
                continue
            entry = by_site.get(route.site)
            if entry is None:
                by_site[route.site] = (route, list(group))
            else:
                entry[1].extend(group)
        if self._closing:
            return
        for site, (route, group) in by_site.items():
            queue = self._queue_for(self._warm_source(source, site, len(group)), site)
            step = queue.limits.max_recipients_per_transaction
            for i in range(0, len(group), step):
                queue.put(Batch(msg, group[i : i + step], route, queue.source.name))

    def _warm_source(self, source: Source, site: str, n: int) -> Source:
        """*source*, unless it is warming up at *site*, over today's quota, and may overflow.

        Then the first other source that may send now (warm, or within its own
        quota) takes the mail; with none, it waits for *source*'s next quota.
        """
        if len(self._sources) == 1:
            return source
        now = asyncio.get_running_loop().time()
        decision = self.throttles.get(source.name, site, now).warmup_check(now, n)
        if decision is None or decision.allowed or not decision.overflow:
            return source
        for other in self._sources:
            if other is source:
                continue
            d = self.throttles.get(other.name, site, now).warmup_check(now, n)
            if d is None or d.allowed:
                return other
        return source

    def _queue_for(self, source: Source, site: str) -> SiteQueue:
        key = (source.name, site)
        queue = self._queues.get(key)
        if queue is None:
            assert self._health is not None
            now = asyncio.get_running_loop().time()
            queue = SiteQueue(
                source, site, self._limits_for(site), throttle=self.throttles.get(source.name, site, now),
                classifier=self.classifier, timeouts=self._timeouts, health=self._health,
                on_result=self._on_result, on_expired=self._on_expired, tls=self._tls, tls_context=self._tls_context,
            )
            self._queues[key] = queue
        return queue

    def _limits_for(self, site: str) -> SiteLimits:
        limits = self._limits_cache.get(site)
        if limits is None:
            _, cfg = limits_for(site, self.config.sites, default=SiteConfig())
            # Provider defaults are throttle limits only; the rest comes from SiteConfig's defaults.
            extra = cfg if isinstance(cfg, SiteConfig) else SiteConfig()
            limits = SiteLimits(
                cfg.max_connections, cfg.max_messages_per_connection,
                extra.max_recipients_per_transaction, extra.idle_timeout, extra.pipeline_depth,
            )
            self._limits_cache[site] = limits
        return limits

    def _on_throttle_event(self, event: ThrottleEvent) -> None:
        self.throttle_events.append(event)
        log.info("throttle %s", event)

    def _on_due(self, item: tuple[Message, list[Recipient]]) -> None:
        if not self._closing:
            self._route(*item)

    # --- outcomes ---------------------------------------------------------------

    def _on_result(
        self, batch: Batch, classified: list[tuple[Reply, str, Classification | None]], delivery: Delivery
    ) -> None:
        msg = batch.message
        deferred: list[tuple[Recipient, Classification]] = []
        paced: list[Recipient] = []
        for rcpt, (reply, phase, c) in zip(batch.recipients, classified):
            c = self._record(msg, rcpt, reply, phase, delivery, c)
            if c is None:
                continue
            if (
                c.site_paced
                and rcpt.attempts <= _PACED_TRIES
                and not self._closing
                and asyncio.get_running_loop().time() < msg.deadline
                and self._queue_paces(batch.source, delivery.site)
            ):
                # "Slow down" from the site: the throttle has cut its rate; the
                # recipient waits for the site's pace in the ready queue rather
                # than taking an exponential backoff of its own.
                self._emit(msg, rcpt, Status.DEFERRED, reply, delivery, classification=c)
                paced.append(rcpt)
            else:
                deferred.append((rcpt, c))
        if paced:
            queue = self._queues.get((batch.source, delivery.site))
            if queue is not None:
                queue.put(Batch(msg, paced, batch.route, batch.source), front=True)
            else:  # pragma: no cover - the queue that sent it always exists
                self._route(msg, paced)
        if deferred:
            self._defer(msg, deferred, delivery)

    def _queue_paces(self, source: str, site: str) -> bool:
        """Does that queue's throttle slow down on its own (adaptive)? Only then may a
        "slow down" reply wait in the ready queue; a static one would resend at once."""
        queue = self._queues.get((source, site))
        return queue is not None and queue.throttle.adaptive.enabled

    def _on_expired(self, batch: Batch, why: Reply | None) -> None:
        """*batch* outlived its queue lifetime in a ready queue; *why*: the site's last refusal."""
        for rcpt in batch.recipients:
            reply = why or rcpt.last_reply or Reply.local(451, "4.4.7", "message expired in queue before an attempt")
            self._emit(batch.message, rcpt, Status.EXPIRED, reply, None)

    def _record_group(self, msg: Message, rcpts: list[Recipient], reply: Reply, delivery: Delivery | None) -> None:
        deferred: list[tuple[Recipient, Classification]] = []
        c0 = self.classifier.classify(reply, "connect")
        for r in rcpts:
            c = self._record(msg, r, reply, "connect", delivery, c0)
            if c is not None:
                deferred.append((r, c))
        if deferred:
            self._defer(msg, deferred, delivery)

    def _record(
        self, msg: Message, rcpt: Recipient, reply: Reply, phase: str, delivery: Delivery | None,
        c: Classification | None,
    ) -> Classification | None:
        """Record one attempt; returns the classification when the recipient must be deferred."""
        rcpt.attempts += 1
        rcpt.last_reply = reply
        if reply.code // 100 == 2:
            self._emit(msg, rcpt, Status.DELIVERED, reply, delivery)
            return None
        if c is None:
            c = self.classifier.classify(reply, phase)
        if c.outcome is ReplyOutcome.TRANSIENT:
            return c
        # Permanent by the classifier (which may also read a 4xx as final, e.g.
        # a policy block worded as temporary): bounced, hard or soft.
        self._emit(msg, rcpt, Status.BOUNCED, reply, delivery, classification=c)
        return None

    def _defer(self, msg: Message, rcpts: list[tuple[Recipient, Classification]], delivery: Delivery | None) -> None:
        """Schedule the next attempt of *rcpts* together (they stay one transaction).

        The delay is reason-aware: a rule's hint (greylisting: retry after
        several minutes; mailbox full: hours) is a floor under the exponential
        schedule, and ``queue.retry_max`` caps both.
        """
        assert self._due is not None
        now = asyncio.get_running_loop().time()
        delay = self.retry.delay(max(r.attempts for r, _ in rcpts), self._rng)
        hinted = [c.retry_after for _, c in rcpts if c.retry_after is not None]
        if hinted:
            floor = max(hinted) * (1.0 + self._rng.uniform(0, self.retry.jitter))
            delay = min(max(delay, floor), self.retry.maximum)
        if now + delay > msg.deadline or self._closing:
            for r, c in rcpts:
                # Closing: not final, counted as unfinished, reported as deferred.
                status = Status.DEFERRED if self._closing else Status.EXPIRED
                self._emit(msg, r, status, r.last_reply or _NO_REPLY, delivery, classification=c)
            return
        for r, c in rcpts:
            self._emit(msg, r, Status.DEFERRED, r.last_reply or _NO_REPLY, delivery,
                       next_attempt=time.time() + delay, classification=c)
        self._due.push(now + delay, (msg, [r for r, _ in rcpts]))

    def _emit(
        self, msg: Message, rcpt: Recipient, status: Status, reply: Reply, delivery: Delivery | None,
        next_attempt: float | None = None, classification: Classification | None = None,
    ) -> None:
        rcpt.status = status
        outcome = Outcome(
            msg.id, rcpt.address, status, reply, rcpt.attempts, msg.queued_at, time.time(),
            delivery.site if delivery else None, delivery.mx_host if delivery else None,
            delivery.mx_ip if delivery else None, delivery.source_ip if delivery else None,
            next_attempt, msg.meta or None,
            classification.category.value if classification else None,
            classification.bounce.value if classification else None,
            msg.sender, len(msg.body.raw),
        )
        self.counts[status.value] += 1
        if delivery is not None:
            site_counter = self.site_counts.get(delivery.site)
            if site_counter is None:
                site_counter = self.site_counts[delivery.site] = Counter()
            site_counter[status.value] += 1
        if self.fatal is None:
            try:
                self._keep_record(outcome, msg, rcpt, status, next_attempt)
            except (OSError, SpoolError) as exc:
                self._fail_fatal(exc)
        for sub in self._subscribers:
            sub.put_nowait(outcome)
        if status.is_final:
            tracker = self._trackers.get(msg.id)
            if tracker is not None:
                tracker.outcomes.append(outcome)
                tracker.remaining -= 1
                if tracker.remaining == 0:
                    del self._trackers[msg.id]
                    # Remembered for a while: a caller may ask for the result of
                    # a message that finished before it got round to asking.
                    self._finished[msg.id] = tracker.outcomes
                    if len(self._finished) > _FINISHED_KEPT:
                        self._finished.popitem(last=False)
                    if not tracker.future.done():
                        tracker.future.set_result(tracker.outcomes)
                    self._release(1, _memory_cost(msg.body))
                    return
            self._release(1)

    def _keep_record(
        self, outcome: Outcome, msg: Message, rcpt: Recipient, status: Status, next_attempt: float | None
    ) -> None:
        """The accounting line, then the journal record: in that order."""
        if self.accounting is not None:
            self.accounting.write(outcome)
            if self.spool is not None:
                # Hand the line to the OS before the spool can journal this
                # state: a process killed afterwards then never has a journaled
                # outcome without its accounting line (the spool's writer thread
                # may write the record any moment after record() below).
                self.accounting.flush()
        if self.spool is not None:
            wall_next = next_attempt if next_attempt is not None else time.time()
            try:
                self.spool.record(msg.id, rcpt.index, status, attempts=rcpt.attempts, next_attempt=wall_next)
            except KeyError:
                pass  # not journaled (finished already, or never added): nothing to remember

    def _fail_fatal(self, exc: BaseException) -> None:
        """The durable record (journal or accounting) failed: nothing more can be promised.

        Delivering on without recording would lose track of what was sent, so
        the engine stops taking work and wakes everyone waiting on it; the
        spool keeps what it had committed, and a restart resumes from there.
        """
        if self.fatal is None:
            self.fatal = exc
            log.critical("cannot keep the delivery record any more: %s", exc)
            self._accepting = False
            for waiter in self._capacity_waiters:
                if not waiter.done():
                    waiter.set_exception(EngineClosed(f"delivery record failed: {exc}"))
            if self._idle is not None:
                self._idle.set()
            for queue in self._queues.values():
                queue.halt()

    # --- backpressure -----------------------------------------------------------

    async def _reserve(self, n: int, size: int) -> None:
        """Wait for room for *n* recipients and *size* bytes of message in memory.

        Both bounds matter: recipients bound the per-recipient records, bytes
        bound the bodies (a backlog of 20 KB messages is ten times the memory
        of one of 2 KB messages). A message larger than a limit is still
        accepted when the queue is empty.
        """
        q = self.config.queue
        loop = asyncio.get_running_loop()
        while self._unfinished and (
            self._unfinished + n > q.max_queued_recipients or self._queued_bytes + size > q.max_queued_bytes
        ):
            waiter: asyncio.Future[None] = loop.create_future()
            self._capacity_waiters.append(waiter)
            await waiter
            if not self._accepting:
                raise EngineClosed("engine stopped taking messages")
        self._unfinished += n
        self._queued_bytes += size
        assert self._idle is not None
        self._idle.clear()

    def _release(self, n: int, size: int = 0) -> None:
        self._unfinished -= n
        self._queued_bytes -= size
        if self._unfinished == 0 and self._idle is not None:
            self._idle.set()
        # Wake every waiter: each re-checks the room in its loop, and a waiter
        # cancelled before it ran cannot swallow the only wake-up.
        while self._capacity_waiters:
            waiter = self._capacity_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    async def _flush_loop(self) -> None:
        assert self.accounting is not None
        while True:
            await asyncio.sleep(0.25)
            self.accounting.flush()

    # --- introspection ------------------------------------------------------------

    def queue_stats(self) -> list[dict[str, Any]]:
        """Per (source, site): ready batches, open connections, most seen, transactions."""
        now = asyncio.get_running_loop().time()
        out = []
        for (src, site), q in self._queues.items():
            status = q.throttle.status(now)
            out.append({
                "source": src, "site": site, "ready": len(q.ready), "connections": q.connections,
                "max_connections_seen": q.max_seen_connections, "connections_opened": q.connections_opened,
                "transactions": q.transactions, "window": status.window, "rate": status.rate,
                "suspended_for": max(0.0, status.suspended_until - now) if status.suspended_until else 0.0,
            })
        return out


_NO_REPLY = Reply.local(451, "4.4.0", "no reply recorded")

#: Times a recipient may wait for a site's pace after "slow down" replies before
#: it takes the normal retry schedule (a site that keeps refusing is not paced, it is down).
_PACED_TRIES = 10

#: Finished messages whose outcomes ``result()`` still returns.
_FINISHED_KEPT = 10_000

#: Warm-up progress, kept beside the spool's journal: a warm-up spans weeks of runs.
WARMUP_FILE = "warmup.json"


class _SavedWarmup(msgspec.Struct, frozen=True):
    source: str
    site: str
    state: WarmupState


def _load_warmups(path: Path) -> dict[tuple[str, str], WarmupState]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    try:
        saved = msgspec.json.decode(data, type=list[_SavedWarmup])
    except msgspec.DecodeError as exc:
        # Losing warm-up progress only makes sending slower, never unsafe: warn and start over.
        log.warning("%s: unreadable warm-up state (%s); warm-up starts again", path, exc)
        return {}
    return {(w.source, w.site): w.state for w in saved}


def _save_warmups(path: Path, states: dict[tuple[str, str], WarmupState]) -> None:
    if not states:
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(msgspec.json.encode([_SavedWarmup(src, site, st) for (src, site), st in sorted(states.items())]))
    os.replace(tmp, path)


def _memory_cost(body: Body) -> int:
    # The raw bytes plus the wire form cached at the first attempt.
    return 2 * len(body.raw) + 512




def _tls_context(verify: bool) -> ssl.SSLContext:
    """Opportunistic TLS between MTAs does not verify certificates by default
    (Postfix's ``may`` level): an unverified encrypted channel beats plain text,
    and most MX certificates would not match anyway."""
    ctx = ssl.create_default_context()
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx
