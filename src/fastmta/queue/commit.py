"""Group commit: pending journal records and bodies, written and fsync'd in batches.

Why batches: one journal shared by all messages turns N small synchronous
writes into one append and one fsync per *group* of submits, which is what
lets an awaited add be durable at tens of thousands of messages per second.

What waits how long:

* An awaited add (a *waiter*) waits at most ``commit_interval`` for others
  to join its batch. 0 still groups: adds arriving while an fsync is in
  progress share the next one.
* Un-awaited records (recipient states, input progress) are written every
  ``flush_records`` records or ``flush_interval`` seconds, or with the next
  awaited add. A crash loses at most that window.

Each batch is written by the spool's single writer thread, bodies first
(fsync) and then the journal records (fsync), so a journal record never
points at a body that is not on disk; the event loop never blocks on the
disk. Without a running loop, :meth:`GroupCommit.flush_sync` writes on the
calling thread instead.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from fastmta.queue.disk import SpoolStats
from fastmta.queue.journal import frame
from fastmta.queue.journal_file import JournalFile
from fastmta.queue.segments import BodySegments
from fastmta.queue.spool_errors import SpoolError

__all__ = ["COMMIT_TIMINGS", "CommitTimings", "GroupCommit"]

# Every part of the spool logs as the spool (the logger its documentation names).
log = logging.getLogger("fastmta.queue.spool")

#: How long the writer waits for what a before-batch hook started (a stuck hook must not stop the
#: journal: a locked events database held every batch, and every SMTP client's 250, for 15 s)...
HOOK_WAIT = 2.0
#: ... and once it has waited in vain, how long it does not wait for that hook again (logged).
HOOK_SKIP = 30.0
#: Test-only fault injection (tests/test_send_crash.py): SIGKILL this process
#: right after the Nth batch commit is durable. Unset in any real run.
_KILL_AFTER_COMMITS = int(os.environ.get("FASTMTA_FAULT_KILL_AFTER_COMMITS", "0") or 0)

T = TypeVar("T")


class CommitTimings:
    """How long batches took to write and fsync: a histogram for the metrics.

    The writer thread adds to it (a bisect and three additions per batch, no
    lock); a reader on another thread may see a batch in one field and not
    yet in another, which a scrape tolerates. Buckets are cumulative only
    when read: ``buckets[i]`` counts batches in (bounds[i-1], bounds[i]], the
    last one those above every bound.
    """

    __slots__ = ("bounds", "buckets", "count", "sum")

    #: Seconds: a fast SSD fsyncs in well under a millisecond, a busy disk in tens.
    DEFAULT_BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

    def __init__(self, bounds: tuple[float, ...] = DEFAULT_BOUNDS) -> None:
        self.bounds = bounds
        self.buckets = [0] * (len(bounds) + 1)
        self.count = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.buckets[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds
        self.count += 1


#: Every spool of the process adds to this one (a process serves one spool;
#: the metrics read it without reaching into the spool).
COMMIT_TIMINGS = CommitTimings()


class GroupCommit:
    """The pending work of one spool, and the committer task that writes it.

    Used from the event loop's thread, except for :meth:`_write_batch`, which
    runs in the writer thread. *after_batch* is called on the loop after each
    batch the committer wrote (the spool starts a compaction from there).
    """

    def __init__(
        self,
        directory: Path,
        journal: JournalFile,
        segments: BodySegments,
        stats: SpoolStats,
        after_batch: Callable[[], None],
        *,
        commit_interval: float,
        flush_interval: float,
        flush_records: int,
    ) -> None:
        self.directory = directory  # for messages
        self.commit_interval = commit_interval
        self.flush_interval = flush_interval
        self.flush_records = flush_records
        self._journal = journal
        self._segments = segments
        self._stats = stats
        self._after_batch = after_batch
        #: Called on the loop thread just before a batch goes to the writer
        #: (the engine flushes its accounting log there: lines before states).
        #: A hook may return a future of work it started on another thread (the
        #: webhook outbox storing its events): the writer waits for it, at most
        #: HOOK_WAIT seconds, before it writes the batch.
        self.before_batch: list[Callable[[], Future[None] | None]] = []
        self._hook_skip_until: dict[int, float] = {}  # writer thread: hook index -> monotonic time

        # Pending (not yet handed to the writer) work: built on the loop thread.
        self._p_journal: list[bytes] = []
        self._p_data: list[tuple[int, bytes]] = []
        self._p_waiters: list[asyncio.Future[None]] = []
        self._p_finished: list[int] = []  # segments of messages that became final
        self._p_first = 0.0  # loop time of the oldest pending record
        self._p_first_waiter = 0.0

        self.failed: BaseException | None = None  # a write failed: no more work is taken
        self.closing = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._thread = 0  # the committer loop's thread
        self._wake: asyncio.Event | None = None
        self._io_lock: asyncio.Lock | None = None  # held while a batch is written
        # One writer thread: writes are ordered, and the loop never waits on the disk.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="fastmta-spool")
        self.timings = COMMIT_TIMINGS  # write + fsync time per batch

    # --- taking work (loop thread) -------------------------------------------------------

    def append(self, payload: bytes) -> None:
        """Queue one encoded journal record for the next batch."""
        if not self._p_journal:
            self._p_first = self._now()
            self._kick()
        self._p_journal.append(frame(payload))
        if len(self._p_journal) == self.flush_records:
            self._kick()

    def append_body(self, seg: int, body: bytes) -> None:
        """Queue a body for segment *seg* (placed by BodySegments.place; the writer frames it)."""
        self._p_data.append((seg, body))

    def release_after_commit(self, seg: int) -> None:
        """A message with its body in *seg* became final: release it once that is on disk."""
        self._p_finished.append(seg)

    def waiter(self) -> asyncio.Future[None]:
        """A future that resolves when everything queued so far is on disk."""
        if not self.ensure_task():
            raise SpoolError("add_message needs a running event loop (or use flush_sync)")
        assert self.loop is not None
        fut: asyncio.Future[None] = self.loop.create_future()
        if not self._p_waiters:
            self._p_first_waiter = self.loop.time()
            self._kick()
        self._p_waiters.append(fut)
        return fut

    async def sync(self) -> None:
        """Return when everything queued so far is on disk."""
        if self._p_journal or self._p_data:
            await asyncio.shield(self.waiter())
        elif self._io_lock is not None:
            async with self._io_lock:  # a batch in flight
                pass

    def _now(self) -> float:
        return self.loop.time() if self.loop is not None else time.monotonic()

    def _kick(self) -> None:
        if self.ensure_task():
            assert self._wake is not None
            self._wake.set()

    # --- the committer task ----------------------------------------------------------------

    def ensure_task(self) -> bool:
        """Start the committer on the running loop, if there is one."""
        task = self._task
        if task is not None and self._thread == threading.get_ident() and not task.done():
            assert self.loop is not None
            if self.loop.is_running():
                # The committer's own loop, running on this thread: the only loop that can be
                # running here. Python 3.11's get_running_loop() makes a getpid() system call
                # (its fork check), and this runs for every record.
                return True
        loop = asyncio._get_running_loop()  # None without a loop (no exception to raise and catch)
        if loop is None:
            return False  # used without a loop: flush_sync() writes
        if task is not None and self.loop is loop and not task.done():
            return True
        if self._task is not None and not self._task.done():
            raise SpoolError("the spool is already committing on another event loop")
        self.loop = loop
        self._thread = threading.get_ident()
        self._wake = asyncio.Event()
        self._io_lock = asyncio.Lock()
        self._task = loop.create_task(self._committer())
        return True

    async def _committer(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None and self._io_lock is not None
        while True:
            if not (self._p_journal or self._p_data or self._p_waiters):
                if self.closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            now = loop.time()
            if self.closing or len(self._p_journal) >= self.flush_records:
                deadline = now
            else:
                deadline = self._p_first + self.flush_interval
                if self._p_waiters:
                    deadline = min(deadline, self._p_first_waiter + self.commit_interval)
            if deadline > now:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), deadline - now)
                except TimeoutError:
                    pass
                continue
            journal, data, waiters, finished = self._p_journal, self._p_data, self._p_waiters, self._p_finished
            self._p_journal, self._p_data, self._p_waiters, self._p_finished = [], [], [], []
            active = self._segments.active
            before = self._run_hooks()
            try:
                async with self._io_lock:
                    await loop.run_in_executor(self._executor, self._write_batch, journal, data, active, before)
            except BaseException as exc:
                # The logical offsets no longer match the files: refuse further work.
                self.failed = exc
                err = SpoolError(f"spool {self.directory}: write failed: {exc}")
                for w in waiters:
                    if not w.done():
                        w.set_exception(err)
                for w in self._p_waiters:
                    if not w.done():
                        w.set_exception(err)
                log.error("spool %s: write failed: %s", self.directory, exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return
            for w in waiters:
                if not w.done():
                    w.set_result(None)
            if finished:
                self._segments.release(finished)
            self._after_batch()

    def _run_hooks(self) -> list[tuple[int, Future[None]]]:
        """What must be written before each batch (the accounting lines of its outcomes, their events).

        A hook that fails (the accounting log's disk is full) does not stop the
        batch: its owner reports the failure and stops taking work, but the
        batch holds the states of recipients already delivered, and dropped, they
        were sent again by the next run (a fault-injection attack counted ~300 of
        8,000). A missing accounting line is a gap in a report, named as such; a
        second delivery cannot be taken back.
        """
        before: list[tuple[int, Future[None]]] = []
        for i, hook in enumerate(self.before_batch):
            try:
                work = hook()
            except Exception as exc:
                log.error("spool %s: before the batch: %s (the batch is written all the same)", self.directory, exc)
                continue
            if work is not None:
                before.append((i, work))
        return before

    def _write_batch(
        self, journal: list[bytes], data: list[tuple[int, bytes]], active: int,
        before: list[tuple[int, Future[None]]] | None = None,
    ) -> None:
        """Writer thread: bodies (fsync), what the hooks started, then the journal records (fsync)."""
        started = time.perf_counter()
        if data:
            self._segments.write(data, active)
        now = time.monotonic()
        for i, work in before or ():  # after the bodies: their fsync and the hooks' writes overlap
            if now < self._hook_skip_until.get(i, 0.0):
                continue  # it was stuck: not waited for a while (its writes still happen, later)
            try:
                work.result(HOOK_WAIT)
            except TimeoutError:
                self._hook_skip_until[i] = now + HOOK_SKIP
                log.error("spool %s: what must be written before the batch (%s) took over %g s: the journal goes on "
                          "without waiting for it for %g s (a crash then may lose those records)",
                          self.directory, getattr(self.before_batch[i], "__qualname__", "a hook"), HOOK_WAIT, HOOK_SKIP)
            except Exception as exc:  # a hook's own failure is its owner's to report, as above
                log.error("spool %s: before the batch: %s (the batch is written all the same)", self.directory,
                          str(exc) or repr(exc))
        if journal:
            blob = b"".join(journal)
            self._journal.append(blob)
            self._stats.records += len(journal)
            self._stats.journal_bytes_written += len(blob)
        self._stats.commits += 1
        self.timings.observe(time.perf_counter() - started)
        if _KILL_AFTER_COMMITS and self._stats.commits >= _KILL_AFTER_COMMITS:
            # Fault injection for the crash tests: die at the worst moment,
            # right after a batch is durable and before anyone is told.
            os.kill(os.getpid(), signal.SIGKILL)

    def flush_sync(self) -> None:
        """Write and fsync pending records now, on this thread (only when no loop is committing)."""
        if self._task is not None and not self._task.done():
            raise SpoolError("flush_sync() while the committer runs: use await sync()")
        if self.failed is not None:
            raise SpoolError(f"spool {self.directory} failed: {self.failed}")
        journal, data, finished = self._p_journal, self._p_data, self._p_finished
        self._p_journal, self._p_data, self._p_finished = [], [], []
        if journal or data:
            self._write_batch(journal, data, self._segments.active, self._run_hooks())
        if finished:
            self._segments.release(finished)

    # --- between batches (for compaction) ---------------------------------------------------

    @property
    def batch_lock(self) -> asyncio.Lock:
        """Held while a batch is written: hold it to see the journal between batches."""
        assert self._io_lock is not None, "the committer has not started"
        return self._io_lock

    async def in_writer_thread(self, work: Callable[[], T]) -> T:
        """Run *work* in the writer thread (ordered with the batches' writes)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, work)

    # --- closing ------------------------------------------------------------------------------

    async def close(self) -> None:
        """Write what is pending and stop the committer (or flush here if it never ran)."""
        self.closing = True
        if self._task is not None:
            assert self._wake is not None
            self._wake.set()
            await self._task
        else:
            self.flush_sync()

    def shutdown(self) -> None:
        """Stop the writer thread (after the last batch)."""
        self._executor.shutdown(wait=True)
