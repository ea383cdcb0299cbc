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

This module holds the engine's life cycle, accepting messages (with the
backpressure) and the decision each reply leads to (final, paced, retried
or expired). It leaves the routing and queueing of recipients to
:mod:`fastmta.delivery.dispatch` and the bookkeeping of outcomes (counts,
accounting, journal, result awaitables) to :mod:`fastmta.delivery.ledger`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastmta.delivery.accounting import AccountingLog
from fastmta.delivery.batch import Batch, Delivery, by_retry_hint, fewer_recipients, lifetime_of, recipient_limit
from fastmta.delivery.brakes import Guard
from fastmta.delivery.cluster import Cluster
from fastmta.delivery.config import Config, SiteConfig
from fastmta.delivery.control import QueueControl
from fastmta.delivery.dispatch import Dispatcher
from fastmta.delivery.filter_watch import FilterWatch
from fastmta.delivery.ledger import Ledger
from fastmta.delivery.limits import SourceLimits
from fastmta.delivery.room import Room
from fastmta.delivery.routing import Router
from fastmta.delivery.screen import Screen
from fastmta.delivery.throttle import ThrottleEvent, Throttles
from fastmta.delivery.warmup_store import WARMUP_FILE, load_warmups, save_warmups
from fastmta.errors import FastMTAError, InputError
from fastmta.feedback.classification import Classification
from fastmta.feedback.classification import Outcome as ReplyOutcome
from fastmta.feedback.classify import Classifier
from fastmta.feedback.suppression import SqliteSuppressionStore
from fastmta.message.headers import checked_content
from fastmta.queue.journal_records import InputTake
from fastmta.queue.records import Message, Outcome, Recipient, Status, new_message_id, once_each, split_address
from fastmta.queue.recovery import LostMessage
from fastmta.queue.scheduler import DueQueue, RetryPolicy
from fastmta.queue.spool import Spool
from fastmta.queue.spool_errors import BodyDamaged, SpoolError
from fastmta.smtp.protocol import Body
from fastmta.smtp.reply import Reply

log = logging.getLogger("fastmta.delivery.engine")

__all__ = ["Engine", "EngineClosed", "Outcome", "QueueFull", "Status"]


class EngineClosed(FastMTAError):
    """The engine was closed before a message reached a final state for every recipient."""


class QueueFull(EngineClosed):
    """No room came within a submit's ``room_timeout``: not accepted (nothing journaled); try again later."""


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
        self.accounting = accounting
        self._rng = rng or random.Random()
        self.classifier = classifier or self.config.classify.classifier()  # [classify] rules, else built-in
        self.dkim = self.config.dkim_policy()  # [[dkim]]: signs every message but campaigns' (they have their keys)
        self.screen: Screen | None = None  # the suppression check at intake (set_suppression)
        self.spool = spool  # if set: accepted messages and every state change journaled, unfinished work resumed
        self.recovered = 0  # recipients resumed from the spool at start
        self.unresumed = 0  # recipients of messages the spool could not read at start (left in it; not final)
        self.lost: list[LostMessage] = []  # messages the spool could not recover (accounted as lost)
        q = self.config.queue
        self.retry = RetryPolicy(q.retry_initial, q.retry_factor, q.retry_max, q.retry_jitter, q.max_lifetime)
        self.throttle_events: deque[ThrottleEvent] = deque(maxlen=200)
        self.throttles = Throttles(
            sites=self.config.sites,
            sources={s.name: SourceLimits(rate=s.rate, warmup=s.warmup) for s in self.config.sources},
            default=SiteConfig(),
            on_event=self._on_throttle_event,
        )
        #: [cluster]: limits and connection leases shared with other nodes through Redis (None: one node).
        cl = self.config.cluster
        self.cluster = Cluster(cl, sources={s.name: s.address for s in self.config.sources}) if cl.active else None
        self.throttles.cluster = self.cluster
        # Routing and the site queues are the dispatcher's; what a reply means for
        # the recipient stays here (_on_result, _on_expired, _record_group).
        # ``closing``: once close() began, newly routed work is left unfinished.
        self._dispatch = Dispatcher(
            self.config, router=router, throttles=self.throttles, classifier=self.classifier, rng=self._rng,
            spawn=self._spawn, closing=lambda: self._closing, on_unroutable=self._record_group,
            on_result=self._on_result, on_expired=self._on_expired, on_park=self._on_park,
        )
        # Every state change goes on record through the ledger (accounting line, then journal).
        self._ledger = Ledger(accounting, spool, on_fatal=self._fail_fatal)
        #: "User unknown" that is likely a filter's verdict: re-typed, or held until its domain's figures tell.
        self.filters = FilterWatch(release=lambda m, r, reply, d, c: self._emit(m, r, Status.BOUNCED, reply, d,
                                   classification=c), unfinished=lambda: self._room.unfinished)
        #: Queue inspection and operator actions (suspend, retry, bounce, delete, why): fastmta.delivery.control.
        self.control = QueueControl(dispatch=self._dispatch, ledger=self._ledger, emit=self._emit, spool=spool,
                                    due=lambda: self._due, unfinished=lambda: self._room.unfinished,
                                    closing=lambda: self._closing)
        #: KPIs, campaign brakes and source rotation ([guard]): fastmta.delivery.brakes. Its events: guard.on_event.
        self.guard = Guard(self.config.guard, control=self.control, dispatch=self._dispatch, throttles=self.throttles,
                           sources=[(s.name, s.address) for s in self.config.sources])
        self._ledger.listeners.append(self.guard.on_outcome)
        self._room = Room(self.config.queue)  # what the queue holds against its bounds; submits wait there
        self._submits = 0
        self._idle: asyncio.Event | None = None
        self._due: DueQueue[tuple[Message, list[Recipient]]] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # kept: get_running_loop() costs a getpid() (3.11)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._flusher: asyncio.Task[None] | None = None
        self._closing = False
        self._accepting = True
        self._started = False
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
        self.control.start()  # the operator's suspensions, before anything is routed
        loop = self._loop = asyncio.get_running_loop()
        self._dispatch.start(self.spool.directory if self.spool is not None else None)
        if self.cluster is not None:
            await self.cluster.start()  # Redis unreachable: degraded mode, not an error
        self._due = DueQueue(self._on_due, loop)
        self._idle = asyncio.Event()
        self._idle.set()
        if self.accounting is not None:
            self._flusher = asyncio.ensure_future(self._flush_loop())
        self._started = True
        self.started_at = time.time()
        self.throttles.wall_offset = time.time() - loop.time()
        if self.spool is not None:
            self.throttles.saved_warmups = load_warmups(self.spool.directory / WARMUP_FILE)
            self._resume(self.spool)

    def _resume(self, spool: Spool) -> None:
        """Queue what the spool says is unfinished: deferred recipients keep their schedule."""
        loop = asyncio.get_running_loop()
        now_wall, now_loop = time.time(), loop.time()
        for rec in spool.take_recovered():
            try:
                if rec.body is None:
                    raise SpoolError("no stored body (a campaign reference)")
                body = spool.read_body(rec.body, rec.id)
            except BodyDamaged as exc:
                # Never silently queued for ever nor dropped: accounted as lost.
                spool.mark_lost(rec, str(exc))
                continue
            except (SpoolError, OSError) as exc:  # an I/O error: not lost, not sent, counted as not final
                self.unresumed += len(rec.recipients)
                log.error("message %s cannot be read now (left in the queue for the next start): %s", rec.id, exc)
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
            msg.deadline = now_loop + lifetime_of(rec.meta, self.retry.max_lifetime) - max(0.0, now_wall - rec.queued_at)
            self._ledger.track(msg)
            self._room.unfinished += len(rcpts)
            self._room.untried += sum(r.status is None for r in rcpts)
            self._room.bytes += _memory_cost(msg.body)
            self.recovered += len(rcpts)
            if due_now:
                self._dispatch.route(msg, due_now)
            assert self._due is not None
            for when, group in later.items():
                self._due.push(now_loop + (when - now_wall), (msg, group))
        if self._room.unfinished and self._idle is not None:
            self._idle.clear()
        for lost in spool.report.lost:
            self._account_lost(lost)

    def _account_lost(self, lost: LostMessage) -> None:
        """One accounting record (status ``lost``) per recipient of a message the queue could not recover."""
        self.lost.append(lost)
        log.error("lost: message %s (%s): %s", lost.id or "unknown", ", ".join(lost.recipients) or "recipients unknown",
                  lost.reason)
        if self.accounting is None:
            return
        now = time.time()
        reply = Reply.local(554, "4.3.0", f"lost by the queue: {lost.reason}")
        for recipient in lost.recipients or [""]:
            self.accounting.write(Outcome(
                lost.id or "unknown", recipient, Status.LOST, reply, 0, now, now, meta=lost.meta or None,
            ))

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
        await asyncio.gather(*(q.close(timeout) for q in self._dispatch.queues.values()))
        if self.cluster is not None:
            await self.cluster.aclose()  # its connection leases go back
        if self._due is not None:
            self._due.pop_all()
        self.filters.release_all()
        self._ledger.close(EngineClosed)
        if self._flusher is not None:
            self._flusher.cancel()
        self._ledger.flush_accounting()
        if self.spool is not None:
            try:
                await self.spool.sync()  # every state change so far is durable
            except SpoolError as exc:
                self._ledger.fail(exc)  # resumable: the journal keeps what it had committed
            else:
                save_warmups(self.spool.directory / WARMUP_FILE, self.throttles.warmup_states())
        await self._dispatch.aclose()

    def refuse_waiting(self, why: str) -> None:
        """Submits waiting for room fail with :class:`EngineClosed` now (*why*); new ones are still taken
        (a service going down refuses its clients itself, and queues its own notices while it drains)."""
        self._room.fail_waiters(EngineClosed(why))

    def stop_accepting(self) -> None:
        """Take no new messages; submits waiting for room fail with EngineClosed.

        Delivery of what was accepted goes on (``close()`` ends it). For a
        Ctrl-C: stop the input at once, even when the queue is full.
        """
        self._accepting = False
        self._room.fail_waiters(EngineClosed("engine stopped taking messages"))

    @property
    def unfinished(self) -> int:
        """Recipients accepted but not yet delivered, bounced or expired."""
        return self._room.unfinished

    @property
    def fatal(self) -> BaseException | None:
        """The error that made the engine stop keeping its record (journal or
        accounting failed, e.g. a full disk); None while all is well."""
        return self._ledger.fatal

    @property
    def counts(self) -> Counter[str]:
        """Outcomes so far, by status (deferrals too)."""
        return self._ledger.counts

    @property
    def site_counts(self) -> dict[str, Counter[str]]:
        """Outcomes so far, by site, then by status."""
        return self._ledger.site_counts

    # --- submitting -------------------------------------------------------------

    async def submit(
        self,
        message: bytes | Body,
        sender: str,
        recipients: Sequence[str],
        *,
        meta: dict[str, Any] | None = None,
        message_id: str | None = None,
        take: InputTake | None = None,
        room_timeout: float | None = None,
    ) -> str:
        """Accept *message* for *recipients*; return its id. Waits while the queue is full: at most
        *room_timeout* seconds (None: as long as it takes), then raises :class:`QueueFull`.

        A service answering clients needs the bound: a client whose wait outlived its
        own timeout (or the listener's) was told to try again, and the message must
        not then be accepted behind its back, to be delivered twice when it retries.

        Raises InputError (naming the address) for a malformed sender or
        recipient, or a header section that could smuggle a header (a bare
        CR); TypeError for a ``str`` message or a single string of recipients.
        Nothing is accepted then.
        """
        # Checked here, not later in a connection task where a wrong type
        # would kill the task and leave the message's result unresolved.
        if isinstance(message, str) or not isinstance(message, (bytes, bytearray, memoryview, Body)):
            raise TypeError(
                f"message must be bytes (the RFC 5322 message, e.g. text.encode()) or a Body, "
                f"not {type(message).__name__}"
            )
        if isinstance(recipients, (str, bytes)):
            raise TypeError("recipients must be a list of addresses, not one string (it would be split into characters)")
        if not isinstance(sender, str) or not all(isinstance(r, str) for r in recipients):
            raise TypeError("sender and recipients must be str addresses")
        if not self._started:
            raise RuntimeError("Engine not started: use `async with Engine(...)`")
        if self._closing or not self._accepting:
            raise EngineClosed(f"engine stopped: {self.fatal}" if self.fatal else "engine is closing; no new messages")
        if not recipients:
            raise InputError("a message needs at least one recipient")
        self._dispatch.check_meta(meta)  # a pool no source is in, a max_lifetime that is no number: refused
        if sender:
            sender = split_address(sender, "sender")[0]
        rcpts = [Recipient(*split_address(r), index=i) for i, r in enumerate(once_each(recipients))]
        recipients = [r.address for r in rcpts]  # as split_address gives them (a trailing dot dropped)
        body = message if isinstance(message, Body) else Body(bytes(message))
        if (raw := checked_content(body.raw)) is not body.raw:  # where every intake meets
            body = Body(raw)
        if self.screen is not None:  # the suppression list: before anything is queued
            message_id = message_id or new_message_id()
            recipients = self.screen.admit(message_id, sender, recipients, body.raw, meta)
            if not recipients:
                return message_id  # every recipient suppressed: each has its record, nothing is queued
            rcpts = [Recipient(*split_address(r), index=i) for i, r in enumerate(recipients)]
            recipients = [r.address for r in rcpts]
        if not self.dkim.empty and not (meta and "job" in meta and body.raw[:15].lower() == b"dkim-signature:"):
            # Before the journal: a resumed message is not signed again. A campaign signed with its own keys
            # is left alone; one without keys (an HTTP campaign) is signed like any other message.
            body = Body(self.dkim.sign(body.raw))
        cost = _memory_cost(body)
        await self._reserve(len(rcpts), cost, room_timeout)
        loop = self._loop
        assert loop is not None
        msg = Message(message_id or new_message_id(), sender, body, rcpts, meta=meta or {})
        if self._ledger.tracks(msg.id):
            self._release(len(rcpts), cost)
            raise InputError(f"message id {msg.id!r} is already in the queue")
        if self.spool is not None:
            try:
                # Durable before we say "accepted" (group commit: concurrent
                # submits share one fsync).
                # *take*: the input row this message consumes, in the same
                # journal record: a crash cannot keep one without the other.
                await self.spool.add_message(msg.id, sender, list(recipients), body.raw, meta=meta or None, take=take)
            except SpoolError as exc:
                # The queue cannot be written (a full or read-only disk): not
                # accepted, and nothing more will be. One stop for everyone,
                # reported once (engine.fatal), not an exception per submit.
                self._release(len(rcpts), cost)
                self._ledger.fail(exc)
                raise EngineClosed(f"engine stopped: {self.fatal}") from exc
            except BaseException:
                self._release(len(rcpts), cost)
                raise
        msg.deadline = loop.time() + lifetime_of(meta, self.retry.max_lifetime)
        self._ledger.track(msg)
        self._room.untried += len(rcpts)
        self._dispatch.route(msg, rcpts)
        self._submits += 1
        if self._submits % 64 == 0:
            # submit() does not otherwise yield while the queue has room; let
            # delivery run between submits so a producer in a tight loop does
            # not queue everything before the first message goes out.
            await asyncio.sleep(0)
        return msg.id

    def result(self, message_id: str) -> asyncio.Future[list[Outcome]]:
        """An awaitable of the final outcome of every recipient of *message_id*."""
        return self._ledger.result(message_id)

    def outcomes(self) -> AsyncIterator[Outcome]:
        """Every outcome from now on (deferrals too), until the engine closes."""
        return self._ledger.outcomes()

    def set_suppression(self, store: SqliteSuppressionStore | None) -> None:
        """Check every submitted recipient against *store*; suppressed ones are recorded, never queued."""
        self.screen = Screen(store, self._ledger.note) if store is not None else None

    def message(self, message_id: str) -> Message | None:
        """A queued message (None once final): e.g. for a listener that returns its headers in a DSN."""
        return self._ledger.message(message_id)

    def add_listener(self, listener: Callable[[Outcome], None]) -> None:
        """Call *listener* with every outcome, synchronously, once it is on record.

        For what must see every outcome (an event outbox, metrics); it must be
        quick and must not raise (it runs inside the delivery path).
        """
        self._ledger.listeners.append(listener)

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait until every accepted recipient is final; False on timeout."""
        assert self._idle is not None
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return self.fatal is None

    # --- callbacks: lookup tasks, throttle events, retries falling due --------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_throttle_event(self, event: ThrottleEvent) -> None:
        self.throttle_events.append(event)
        log.info("throttle %s", event)

    def _on_due(self, item: tuple[Message, list[Recipient]]) -> None:
        if not self._closing:
            self._dispatch.route(*item)

    # --- outcomes ---------------------------------------------------------------

    def _on_result(
        self, batch: Batch, classified: list[tuple[Reply, str, Classification | None]], delivery: Delivery
    ) -> None:
        msg = batch.message
        deferred: list[tuple[Recipient, Classification]] = []
        paced, over = [], []  # over: refused as "too many recipients" (batch.recipient_limit)
        took, whole = recipient_limit(classified)  # the server's recipients per transaction, if it said
        queue = self._dispatch.queues.get((batch.source, delivery.site))
        if took and queue is not None:
            queue.limits = fewer_recipients(queue.limits, delivery.site, took)
        again = not self._closing and asyncio.get_running_loop().time() < msg.deadline  # may go again now
        # Only an adaptive throttle slows down on its own; a static one would resend a "slow down" at once.
        paces = again and queue is not None and queue.throttle.adaptive.enabled
        for rcpt, (reply, phase, c) in zip(batch.recipients, classified):
            c = self._record(msg, rcpt, reply, phase, delivery, c)
            if c is None:
                continue
            if again and took and (phase == "rcpt" or whole) and c.is_recipient_limit:
                # RFC 5321 4.5.3.1.10: the rest go in further transactions, now; the server never
                # judged them, so no attempt is counted (nor a retry schedule nor a cap to reach).
                rcpt.attempts -= 1
                over.append(rcpt)
            elif paces and c.site_paced and phase != "connect" and rcpt.attempts <= _PACED_TRIES:
                # "Slow down" to a transaction: the recipient waits for the site's pace in the ready queue, not
                # a backoff of its own. (A refused greeting is no pace: it took a record a minute before.)
                paced.append(rcpt)
            else:
                deferred.append((rcpt, c))
                continue
            self._emit(msg, rcpt, Status.DEFERRED, reply, delivery, classification=c)
        # Back to the front of the queue, in order: the paced, then the rest of a transaction the
        # server cut short, in transactions of the size it took (not all again, to be cut again).
        groups = [paced] if paced else []
        groups += [over[i : i + took] for i in range(0, len(over), took or 1)]
        for group in reversed(groups):
            if queue is not None:
                queue.put(Batch(msg, group, batch.route, batch.source), front=True)
            else:  # pragma: no cover - the queue that sent it always exists
                self._dispatch.route(msg, group)
        for same_hint in by_retry_hint(deferred):  # each reason its own wait: not a full mailbox's 4 h for all
            self._defer(msg, same_hint, delivery)

    def _on_expired(self, batch: Batch, why: Reply | None) -> None:
        """*batch* outlived its queue lifetime in a ready queue; *why*: the site's last refusal."""
        where = Delivery(batch.route.site, None, None, None)  # the site it waited for (the accounting's "site")
        for rcpt in batch.recipients:
            reply = why or rcpt.last_reply or Reply.local(451, "4.4.7", "message expired in queue before an attempt")
            self._emit(batch.message, rcpt, Status.EXPIRED, reply, where)

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
            self.filters.accepted(rcpt.domain, delivery)
            self._emit(msg, rcpt, Status.DELIVERED, reply, delivery)
            return None
        if c is None:
            c = self.classifier.classify(reply, phase)
        self.control.note(rcpt, reply, phase, c, delivery)  # the recipient's attempt history
        if c.outcome is ReplyOutcome.TRANSIENT:
            return c
        # Permanent by the classifier (which may also read a 4xx as final, e.g.
        # a policy block worded as temporary): bounced, hard or soft; a "user
        # unknown" a filter likely said is re-typed, or held until it can tell.
        c = self.filters.review(msg, rcpt, reply, phase, delivery, c)
        if c is not None:
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
        # Tries at a site's pace (its "slow down") are not failures of the backoff: 10 made it 4 hours.
        delay = self.retry.delay(max(r.attempts - _PACED_TRIES * c.site_paced for r, c in rcpts), self._rng)
        hinted = [c.retry_after for _, c in rcpts if c.retry_after is not None]
        if hinted:
            floor = max(hinted) * (1.0 + self._rng.uniform(0, self.retry.jitter))
            delay = min(max(delay, floor), self.retry.maximum)
        if now + delay > msg.deadline and not self._closing:
            # The next retry would land past the queue lifetime: the last try
            # happens at the deadline instead of one retry interval early.
            # Just before it, by a margin, so the site's ready queue does not
            # expire it on arrival; past that margin nothing is left to try.
            margin = min(1.0, self.retry.max_lifetime / 20)
            remaining = msg.deadline - now
            delay = remaining - margin if remaining > 2 * margin else -1.0
        if delay < 0 or self._closing:
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
        first = rcpt.status is None
        finished = self._ledger.record(msg, rcpt, status, reply, delivery, next_attempt, classification)
        self._room.untried -= first
        if status.is_final:
            # A final recipient frees its place; the last one of a message frees its body too.
            self._release(1, _memory_cost(msg.body) if finished else 0)
        elif first:
            self._room.wake_next()  # a deferral makes room in the read-ahead, not in the queue

    def _fail_fatal(self, exc: BaseException) -> None:
        """The durable record (journal or accounting) failed: nothing more can be promised.

        Delivering on without recording would lose track of what was sent, so
        the engine stops taking work and wakes everyone waiting on it; the
        spool keeps what it had committed, and a restart resumes from there.
        """
        log.critical("cannot keep the delivery record any more: %s", exc)
        self._accepting = False
        self._room.fail_waiters(EngineClosed(f"delivery record failed: {exc}"))
        if self._idle is not None:
            self._idle.set()
        for queue in self._dispatch.queues.values():
            queue.halt()

    # --- backpressure -----------------------------------------------------------

    async def _reserve(self, n: int, size: int, timeout: float | None = None) -> None:
        """Wait (at most *timeout* s) for room for *n* recipients and *size* bytes in memory (fastmta.delivery.room)."""
        assert self._loop is not None and self._idle is not None
        if timeout is None or self._room.fits(n, size):  # no task for wait_for when there is room
            await self._room.take(self._loop, n, size)
        else:
            try:
                await asyncio.wait_for(self._room.take(self._loop, n, size), timeout)
            except TimeoutError:
                raise QueueFull(f"the queue has had no room for {timeout:g} s; try again later") from None
        if not self._accepting:  # stopped while this submit waited (woken just before): not taken
            self._room.give_back(n, size)
            raise EngineClosed("engine stopped taking messages")
        self._idle.clear()

    def _on_park(self, delta: int) -> None:
        """Untried recipients parked at a site a limit holds back (< 0), or back in its ready queue (> 0)."""
        self._room.untried += delta
        if delta < 0:
            self._room.wake_next()  # read-ahead room: the first waiting submit looks again

    def _release(self, n: int, size: int = 0) -> None:
        self._room.give_back(n, size)
        self.filters.settle()  # only held verdicts left unfinished: judge them now
        if self._room.unfinished == 0 and self._idle is not None:
            self._idle.set()

    async def _flush_loop(self) -> None:
        assert self.accounting is not None
        while True:
            await asyncio.sleep(0.25)
            self._ledger.flush_accounting()

    # --- introspection ------------------------------------------------------------

    def queue_stats(self) -> list[dict[str, Any]]:
        """Per (source, site): ready batches, open connections, most seen, transactions."""
        return self._dispatch.queue_stats(asyncio.get_running_loop().time())


_NO_REPLY = Reply.local(451, "4.4.0", "no reply recorded")

#: Times a recipient may wait for a site's pace after "slow down" replies before
#: it takes the normal retry schedule (a site that keeps refusing is not paced, it is down).
_PACED_TRIES = 10


def _memory_cost(body: Body) -> int:
    # The raw bytes plus the wire form cached at the first attempt.
    return 2 * len(body.raw) + 512
