"""The delivery ledger: every recipient outcome counted, kept on record, streamed and gathered per message.

Each state change the engine decides (delivered, bounced, deferred,
expired) becomes an :class:`~fastmta.queue.records.Outcome` here, and this
module does the bookkeeping: counts by status and by site, the accounting
line and the spool's journal record (in that order), every subscriber of
:meth:`Ledger.outcomes`, and each message's result awaitable, completed when
its last recipient is final and remembered a while after. When the record
cannot be kept (a full disk), the ledger says so once (``on_fatal``): the
engine must stop taking work, since delivering on unrecorded would lose
track of what was sent.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable

from fastmta.delivery.accounting import AccountingLog
from fastmta.delivery.batch import Delivery
from fastmta.feedback.classification import Classification
from fastmta.queue.records import Message, Outcome, Recipient, Status
from fastmta.queue.spool import Spool
from fastmta.queue.spool_errors import SpoolError
from fastmta.smtp.reply import Reply

__all__ = ["Ledger"]

#: Finished messages whose outcomes ``result()`` still returns.
_FINISHED_KEPT = 10_000


class _Tracker:
    """One message's outcomes, gathered until its last recipient is final."""

    __slots__ = ("future", "message", "outcomes", "remaining")

    def __init__(self, message: Message) -> None:
        self.message = message
        self.remaining = len(message.recipients)
        self.outcomes: list[Outcome] = []
        #: Made when somebody asks for the result (Ledger.result), not per message: most are never awaited.
        self.future: asyncio.Future[list[Outcome]] | None = None


class Ledger:
    """Outcomes of an engine's recipients, and the awaitables of its messages' results."""

    def __init__(
        self, accounting: AccountingLog | None, spool: Spool | None, on_fatal: Callable[[BaseException], None]
    ) -> None:
        self.accounting = accounting
        self.spool = spool
        self._on_fatal = on_fatal
        #: The error that stopped the record (journal or accounting failed,
        #: e.g. a full disk); None while all is well.
        self.fatal: BaseException | None = None
        #: The accounting log failed (its disk is full): no more lines, but the journal still takes
        #: every state, or recipients delivered after the failure were sent again by the next run.
        self._accounting_failed = False
        self.counts: Counter[str] = Counter()  # by status
        self.site_counts: dict[str, Counter[str]] = {}
        self._trackers: dict[str, _Tracker] = {}
        self._finished: OrderedDict[str, list[Outcome]] = OrderedDict()
        self._subscribers: list[asyncio.Queue[Outcome | None]] = []
        self._closed: Callable[[str], BaseException] | None = None  # close()'s error maker, once closed
        #: Called synchronously with every outcome, after it is on record
        #: (accounting, journal): event outboxes and metrics, which must not
        #: miss one the way a slow async subscriber could.
        self.listeners: list[Callable[[Outcome], None]] = []
        if accounting is not None and spool is not None:
            # Accounting lines reach the OS before the journal records of the
            # same outcomes: once per commit batch, not one write(2) per outcome.
            spool.before_commit.append(self._flush_accounting)

    def track(self, msg: Message) -> None:
        """Gather the outcomes of *msg* (accepted, or resumed from the spool) until all are final."""
        self._trackers[msg.id] = _Tracker(msg)

    def message(self, message_id: str) -> Message | None:
        """The message *message_id* while any recipient of it is not final (listeners still see it at its last)."""
        tracker = self._trackers.get(message_id)
        return tracker.message if tracker is not None else None

    def tracks(self, message_id: str) -> bool:
        """Is *message_id* a message with recipients not yet final?"""
        return message_id in self._trackers

    def result(self, message_id: str) -> asyncio.Future[list[Outcome]]:
        """An awaitable of the final outcome of every recipient of *message_id*."""
        tracker = self._trackers.get(message_id)
        if tracker is not None:
            if tracker.future is None:
                tracker.future = asyncio.get_running_loop().create_future()
                if self._closed is not None:  # asked after the engine stopped: it will never finish
                    tracker.future.set_exception(self._not_final(tracker))
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

    def close(self, closed: Callable[[str], BaseException]) -> None:
        """The engine stops: every result still pending fails with *closed*; subscribers' streams end."""
        self._closed = closed
        for tracker in self._trackers.values():
            if tracker.future is not None and not tracker.future.done():
                tracker.future.set_exception(self._not_final(tracker))
                tracker.future.exception()  # retrieved: nobody may be waiting
        for sub in self._subscribers:
            sub.put_nowait(None)

    def _not_final(self, tracker: _Tracker) -> BaseException:
        assert self._closed is not None
        return self._closed(f"message {tracker.message.id}: {tracker.remaining} recipient(s) not final at shutdown")

    def fail(self, exc: BaseException) -> None:
        """The record cannot be kept any more (first failure only is kept and reported)."""
        if self.fatal is None:
            self.fatal = exc
            self._on_fatal(exc)

    def record(
        self, msg: Message, rcpt: Recipient, status: Status, reply: Reply, delivery: Delivery | None,
        next_attempt: float | None = None, classification: Classification | None = None,
    ) -> bool:
        """Record *rcpt*'s new *status*; True when that made every recipient of *msg* final."""
        rcpt.status = status
        tls = delivery.tls if delivery and delivery.tls else (None, None)
        outcome = Outcome(
            msg.id, rcpt.address, status, reply, rcpt.attempts, msg.queued_at, time.time(),
            delivery.site if delivery else None, delivery.mx_host if delivery else None,
            delivery.mx_ip if delivery else None, delivery.source_ip if delivery else None,
            next_attempt, msg.meta or None,
            classification.category.value if classification else None,
            classification.bounce.value if classification else None,
            msg.sender, len(msg.body.raw), (classification.reason or None) if classification else None,
            delivery.source if delivery else None, tls[0], tls[1], delivery.dsn if delivery else False,
        )
        self.counts[status.value] += 1
        if delivery is not None:
            site_counter = self.site_counts.get(delivery.site)
            if site_counter is None:
                site_counter = self.site_counts[delivery.site] = Counter()
            site_counter[status.value] += 1
        try:
            # After the queue itself failed nothing more is journaled; the accounting line is still due
            # (a delivery in flight then is real) or counted as missing.
            self._keep_record(outcome, msg, rcpt, status, next_attempt,
                              journal=self.fatal is None or self._accounting_failed)
        except (OSError, SpoolError) as exc:
            self.fail(exc)
        for listener in self.listeners:
            listener(outcome)
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
                    if tracker.future is not None and not tracker.future.done():
                        tracker.future.set_result(tracker.outcomes)
                    return True
        return False

    def note(self, outcome: Outcome) -> None:
        """An outcome of a recipient that was never queued (suppressed at intake): counted, on record, announced."""
        self.counts[outcome.status.value] += 1
        if self.accounting is not None and self.fatal is None:
            try:
                self.accounting.write(outcome)
            except OSError as exc:
                self._accounting_failed = True
                self.fail(exc)
        elif self.accounting is not None:
            self.accounting.unwritten += 1  # not on record there: counted in the report
        for listener in self.listeners:
            listener(outcome)
        for sub in self._subscribers:
            sub.put_nowait(outcome)

    def flush_accounting(self) -> OSError | None:
        """Flush the accounting log now (its timer, the engine's close): a failure (a full disk) is the
        engine's fatal, reported with the lines it may have lost, and returned, not raised."""
        if self.accounting is None or self._accounting_failed:
            return None
        try:
            self.accounting.flush()
        except OSError as exc:
            self._accounting_failed = True
            self.fail(exc)
            return exc
        return None

    def _flush_accounting(self) -> None:
        """The spool is about to hand a batch to its writer: the accounting lines of its outcomes go first.

        A process killed afterwards then never has a journaled outcome without
        its accounting line. A failure (a full disk) stops the engine, and is
        reported with the lines it may have lost; the batch is still journaled
        (see GroupCommit._run_hooks): delivered recipients are never sent again.
        """
        assert self.accounting is not None
        failure = self.flush_accounting()
        if failure is not None:
            raise failure

    def _keep_record(
        self, outcome: Outcome, msg: Message, rcpt: Recipient, status: Status, next_attempt: float | None,
        *, journal: bool,
    ) -> None:
        """The accounting line, then the journal record (see _flush_accounting for the order on disk)."""
        if self.accounting is not None and not self._accounting_failed:
            try:
                self.accounting.write(outcome)  # may flush a full batch
            except OSError as exc:
                self._accounting_failed = True
                self.fail(exc)
        elif self.accounting is not None:
            self.accounting.unwritten += 1  # the log failed before: this line is missing from it too
        if journal and self.spool is not None:
            wall_next = next_attempt if next_attempt is not None else time.time()
            try:
                self.spool.record(msg.id, rcpt.index, status, attempts=rcpt.attempts, next_attempt=wall_next)
            except KeyError:
                pass  # not journaled (finished already, or never added): nothing to remember
