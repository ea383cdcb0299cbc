"""The spool: a directory of durable messages, recipient states and input progress.

What is accepted is on disk before we say so, and survives any crash. This
module holds :class:`Spool`, which opens, locks and recovers a spool
directory and is the one object callers use; the work is done by its parts:

* :mod:`~fastmta.queue.journal_records`  what the journal records, and their encoding
* :mod:`~fastmta.queue.recovery`  replaying the journal into live state, and what recovery returns
* :mod:`~fastmta.queue.segments`  the body segments (``data/``)
* :mod:`~fastmta.queue.journal_file`  appending to the journal, and replacing it atomically
* :mod:`~fastmta.queue.commit`  group commit: batching records and bodies into few fsyncs
* :mod:`~fastmta.queue.compaction`  rewriting the journal with live state only, beside the commits

Layout of a spool directory::

    lock            flock'd while a process has the spool open (a second opener fails fast)
    journal         append-only log of framed msgpack records (see fastmta.queue.journal)
    journal.tmp     a compaction in progress (deleted at open: the old journal is still whole)
    data/NNNNNNNN.dat   body segments: framed message bodies, appended, never rewritten

Why this shape (Postfix keeps one file per message and renames it between
queue directories; KumoMTA keeps a key-value store per message): one journal
shared by all messages turns N small synchronous writes into one append and
one fsync per *group* of submits, which is what lets submit() be durable at
tens of thousands of messages per second. Bodies go to separate segments so
the journal stays small (recovery reads all of it) and bodies are never read
at recovery, only when a recovered message is sent again.

Guarantees:

* ``await add_message()`` returns only after the body (data segment) and the
  ``Add`` record (journal) are written and fsync'd; the body is fsync'd
  *before* the journal, so a journal record never points at a body that is
  not on disk. Concurrent adds share one fsync (group commit, window
  ``commit_interval``).
* ``record()`` does not wait: state records are written in batches (every
  ``flush_records`` records or ``flush_interval`` seconds, or with the next
  add). A crash loses at most that window: those recipients are returned by
  recovery and tried again (the in-flight window), never lost.
* Recovery returns every message with a recipient that has no final record,
  with that recipient's last state (deferred: attempts and next attempt
  time). Damage is handled as :mod:`~fastmta.queue.recovery` says: one
  flipped bit repaired, other damaged bytes and a torn tail skipped, each
  warned about (``SpoolRecoveryWarning``, the ``fastmta.queue.spool`` logger)
  and counted in the RecoveryReport; the journal is then rewritten clean. A
  message whose record or body cannot be read is named in ``report.lost`` (or,
  at sending, :meth:`Spool.read_body` raises ``BodyDamaged``: :meth:`Spool.mark_lost`).
* Refused and left untouched: a journal of a newer format; one missing or
  empty beside stored bodies (``JournalReset``) unless ``accept_reset``; one
  damaged beyond repair where it said which input rows were taken
  (``ProgressDamaged``) unless ``accept_lost_progress``: a lost message record
  is one message, a lost progress record a whole input sent again.
* A body segment is deleted once every message in it is final and that is on
  disk; the journal is compacted (rewritten with live state only, atomically:
  write, fsync, rename, fsync directory) when it has grown ``compact_ratio``
  times past its size after the last compaction.

The spool is used from one thread (the event loop's); file writes and fsyncs
run in a dedicated writer thread so the loop never blocks on the disk.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fastmta.queue.commit import GroupCommit
from fastmta.queue.compaction import compact_idle, compact_journal, compaction_due
from fastmta.queue.disk import Disk, SpoolStats, default_fsync
from fastmta.queue.journal_file import JournalFile
from fastmta.queue.journal_records import (
    DEFERRED_CODE,
    STATUS_CODE,
    AddRecord,
    BodyRef,
    DropRecord,
    ForgetRecord,
    InputState,
    InputTake,
    SourceRef,
    StateRecord,
    encode_record,
    record_encoder,
)
from fastmta.queue.records import Status
from fastmta.queue.recovery import (
    LostMessage,
    RecoveredMessage,
    RecoveredRecipient,
    RecoveryReport,
    live_frames,
    replay_at_open,
)
from fastmta.queue.segments import BodySegments
from fastmta.queue.spool_errors import SpoolError, SpoolLocked, SpoolRecoveryWarning

log = logging.getLogger("fastmta.queue.spool")

__all__ = ["Spool"]


#: At close with nothing unfinished, a journal over this size is compacted to its input records.
_IDLE_COMPACT_BYTES = 64 * 1024


class _Live:
    """The spool's in-memory view of one unfinished message: just enough to count it down."""

    __slots__ = ("done", "remaining", "seg", "src")

    def __init__(self, seg: int, n: int, src: SourceRef | None) -> None:
        self.seg = seg  # body segment, -1 if none
        self.done = bytearray(n)  # 1 = final
        self.remaining = n
        self.src = src


class Spool:
    """A spool directory: durable messages, recipient states and input progress.

    Constructing it opens (creating if needed) and recovers the spool: see
    :attr:`report` and :meth:`take_recovered`. That is CPU work of about a
    second per million records; call it in a thread if the loop is busy.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        commit_interval: float = 0.002,
        flush_interval: float = 0.05,
        flush_records: int = 8192,
        segment_size: int = 64 << 20,
        compact_min_bytes: int = 16 << 20,
        compact_ratio: float = 4.0,
        auto_compact: bool = True,
        fsync: Callable[[int], None] | None = None,
        accept_reset: bool = False,
        accept_lost_progress: bool = False,
    ) -> None:
        """
        commit_interval: how long the first waiting add may wait for others to
            join its commit (seconds). 0 still groups: adds arriving while an
            fsync is in progress share the next one.
        flush_interval / flush_records: when un-awaited state records are written.
        segment_size: a body segment is closed past this size (bodies are deleted
            a segment at a time, so smaller segments free space sooner).
        compact_min_bytes / compact_ratio: compact when the journal exceeds both
            this size and ratio x its size after the last compaction.
        fsync: called with a file descriptor to make it durable (default
            os.fdatasync); tests inject a counter or a no-op.
        accept_reset: open even if the journal is missing, empty or without a
            valid record while ``data/`` holds bodies (SpoolError otherwise):
            warn, report it, and delete those bodies.
        accept_lost_progress: open even if a record of which input rows were
            taken is damaged beyond repair (ProgressDamaged otherwise): those
            rows may be read, and sent, again.
        """
        self.directory = Path(directory)
        self.compact_min_bytes = compact_min_bytes
        self.compact_ratio = compact_ratio
        self.auto_compact = auto_compact
        self._accept_reset = accept_reset
        self._accept_lost_progress = accept_lost_progress
        self.stats = SpoolStats()
        disk = Disk(fsync or default_fsync, self.stats)
        self._journal = JournalFile(self.directory, disk)
        self._segments = BodySegments(self.directory / "data", segment_size, disk)
        self._commits = GroupCommit(
            self.directory,
            self._journal,
            self._segments,
            self.stats,
            self._after_batch,
            commit_interval=commit_interval,
            flush_interval=flush_interval,
            flush_records=flush_records,
        )
        self.before_commit = self._commits.before_batch  # hooks run on the loop before each batch is written

        self._live: dict[str, _Live] = {}
        self._inputs: dict[str, InputState] = {}  # latest state per key
        self._inputs_by_id: dict[int, InputState] = {}
        self._next_input_id = 1
        self._closed = False
        self._compacting: asyncio.Task[None] | None = None
        self._recovered: list[RecoveredMessage] = []

        # Queued mail is never world-readable, whatever the process umask
        # (files at most 0660, directories 0770); the command line's default
        # umask 077 makes them 0600/0700, as Postfix keeps its queue.
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o770)
        self._segments.directory.mkdir(exist_ok=True, mode=0o770)
        self._lock_fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o660)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._lock_fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise SpoolLocked(f"{self.directory}: spool is in use by another process") from None
            raise
        try:
            self.report = self._open()
        except BaseException:
            self._release()
            raise

    # The settings live with the part that uses them; read-only here.

    # --- opening and recovery ---------------------------------------------------

    def _open(self) -> RecoveryReport:
        started = time.perf_counter()
        self._journal.discard_tmp()  # a compaction died before its rename: the journal is whole
        segments = self._segments.on_disk()
        st, report = replay_at_open(
            self._journal.path, segments, self._segments.disk_usage, self._accept_reset, self._accept_lost_progress
        )
        # Open state: inputs, per-message counters, segment reference counts.
        for inp in st.inputs.values():
            self._inputs_by_id[inp.id] = inp
            cur = self._inputs.get(inp.key)
            if cur is None or cur.id < inp.id:
                self._inputs[inp.key] = inp
            self._next_input_id = max(self._next_input_id, inp.id + 1)
        recovered = self._recovered
        for mid, m in st.msgs.items():
            add = m.add
            seg = add.body.seg if add.body is not None else -1
            live = _Live(seg, len(add.rcpts), add.src)
            rcpts: list[RecoveredRecipient] = []
            for i, address in enumerate(add.rcpts):
                s = m.states[i] if m.states is not None else None
                if s is None:
                    rcpts.append(RecoveredRecipient(i, address, None, 0, 0.0))
                elif s.status == DEFERRED_CODE:
                    rcpts.append(RecoveredRecipient(i, address, Status.DEFERRED, s.attempts, s.next_at))
                    report.deferred += 1
                else:
                    live.done[i] = 1
                    live.remaining -= 1
            self._live[mid] = live
            if seg >= 0:
                self._segments.hold(seg)
            recovered.append(
                RecoveredMessage(
                    mid, add.sender, add.queued_at, rcpts, len(add.rcpts), add.body, add.src, add.meta or {}
                )
            )
            report.recipients += len(rcpts)
        report.messages = len(recovered)
        report.inputs = len(self._inputs)
        self._segments.resume(segments)

        size = st.scan.bytes_scanned
        dead_heavy = size > self.compact_min_bytes and report.records > self.compact_ratio * (
            report.messages + report.recipients + report.inputs + 1
        )
        if report.damaged or dead_heavy or not self._journal.path.exists():
            # Rewrite from what we recovered: drops damaged bytes (so the next
            # open does not warn again) and finished records.
            self._journal.rewrite(live_frames(st))
            report.rewritten = True
        else:
            self._journal.open_append(size)
        report.seconds = time.perf_counter() - started
        if report.damaged:
            text = f"spool {self.directory}: recovered with damage: {report}"
            log.warning(text)
            warnings.warn(text, SpoolRecoveryWarning, stacklevel=3)
        elif report.records:
            log.info("spool %s: recovered %s", self.directory, report)
        return report

    def recovered_ids(self) -> set[str]:
        """The ids of the unfinished messages found at open, until :meth:`take_recovered` takes them."""
        return {m.id for m in self._recovered}

    def take_recovered(self) -> list[RecoveredMessage]:
        """The unfinished messages found at open (once; later calls return [])."""
        out, self._recovered = self._recovered, []
        return out

    # --- adding messages ----------------------------------------------------------

    def add_message_nowait(
        self,
        message_id: str,
        sender: str,
        recipients: Sequence[str],
        body: bytes | None = None,
        *,
        source: SourceRef | None = None,
        queued_at: float | None = None,
        meta: dict[str, Any] | None = None,
        take: InputTake | None = None,
    ) -> asyncio.Future[None]:
        """Queue a message for the next commit; the future resolves when it is durable.

        Exactly one of *body* (stored in a data segment) and *source* (a row
        of an input opened with :meth:`open_input`; nothing stored) is given.
        Recipient *i* of *recipients* is index *i* for :meth:`record`.
        *take* names the input row the message was made from: its row is
        taken in the same record that accepts the message (see InputTake).
        Needs a running event loop (it is the one the commits run on).
        """
        self._enqueue_add(message_id, sender, recipients, body, source, queued_at, meta, take)
        return self._commits.waiter()

    async def add_message(
        self,
        message_id: str,
        sender: str,
        recipients: Sequence[str],
        body: bytes | None = None,
        *,
        source: SourceRef | None = None,
        queued_at: float | None = None,
        meta: dict[str, Any] | None = None,
        take: InputTake | None = None,
    ) -> BodyRef | None:
        """Store a message; return when it is on disk (fsync'd), with the body's reference.

        If the awaiting task is cancelled, the message is still committed (only its own waiter is cancelled).
        """
        ref = self._enqueue_add(message_id, sender, recipients, body, source, queued_at, meta, take)
        await self._commits.waiter()
        return ref

    def add_message_sync(
        self,
        message_id: str,
        sender: str,
        recipients: Sequence[str],
        body: bytes | None = None,
        *,
        source: SourceRef | None = None,
        queued_at: float | None = None,
        meta: dict[str, Any] | None = None,
        flush: bool = True,
        take: InputTake | None = None,
    ) -> BodyRef | None:
        """The same without an event loop: durable on return if *flush* (else at flush_sync())."""
        ref = self._enqueue_add(message_id, sender, recipients, body, source, queued_at, meta, take)
        if flush:
            self.flush_sync()
        return ref

    def _enqueue_add(
        self,
        message_id: str,
        sender: str,
        recipients: Sequence[str],
        body: bytes | None,
        source: SourceRef | None,
        queued_at: float | None,
        meta: dict[str, Any] | None,
        take: InputTake | None = None,
    ) -> BodyRef | None:
        self._check_open()
        if (body is None) == (source is None):
            raise ValueError("give exactly one of body and source")
        if message_id in self._live:
            raise SpoolError(f"message {message_id} is already in the spool")
        if not recipients:
            raise ValueError("a message needs at least one recipient")
        inp = None
        if source is not None:
            inp = self._inputs_by_id.get(source.input)
            if inp is None:
                raise SpoolError(f"unknown input id {source.input}: use open_input() first")
        taken_from = None
        if take is not None:
            taken_from = self._inputs_by_id.get(take.input)
            if taken_from is None:
                raise SpoolError(f"unknown input id {take.input}: use open_input() first")
        ref = self._segments.next_ref(len(body)) if body is not None else None
        when = time.time() if queued_at is None else queued_at
        add = AddRecord(message_id, sender, list(recipients), when, ref, source, meta or None, take)
        record = encode_record(add, f"message {message_id}")  # before anything changes
        seg = -1
        if body is not None:
            seg = self._segments.place(body).seg  # at *ref*: nothing was placed since next_ref()
            self._commits.append_body(seg, body)
        if inp is not None and source is not None and inp.row <= source.row:
            inp.row = source.row + 1  # recovery derives the same from the Add record
        if taken_from is not None and take is not None:
            # Every taken row in memory (8 bytes a row): an identical pickup file later in the run is
            # recognised, a service reading an edited campaign skips the rows it took, and the compaction
            # at close writes the keys from memory (without them, an edited campaign was resent whole).
            taken_from.taken.add(take.key)
        self._live[message_id] = _Live(seg, len(recipients), source)
        self._commits.append(record)
        return ref

    # --- recipient states -----------------------------------------------------------

    def record(
        self,
        message_id: str,
        index: int,
        status: Status,
        *,
        attempts: int = 0,
        next_attempt: float = 0.0,
    ) -> None:
        """Note recipient *index* of *message_id* reached *status* (batched; does not wait).

        ``next_attempt`` (wall clock) matters for DEFERRED. A final status for
        a recipient already final is ignored. Raises KeyError for a message
        that is not live (unknown, or all its recipients final already).
        """
        self._check_open()
        live = self._live[message_id]
        code = STATUS_CODE[status]
        if live.done[index]:
            return
        if code != DEFERRED_CODE:
            live.done[index] = 1
            live.remaining -= 1
            if live.remaining == 0:
                del self._live[message_id]
                if live.seg >= 0:
                    self._commits.release_after_commit(live.seg)
        self._commits.append(record_encoder.encode(StateRecord(message_id, index, code, attempts, next_attempt)))

    def remove(self, message_id: str) -> None:
        """Drop a message whatever its recipients' states (e.g. cancelled by an operator)."""
        self._check_open()
        live = self._live.pop(message_id)
        if live.seg >= 0:
            self._commits.release_after_commit(live.seg)
        self._commits.append(record_encoder.encode(DropRecord(message_id)))

    def is_live(self, message_id: str) -> bool:
        return message_id in self._live

    @property
    def unfinished_messages(self) -> int:
        return len(self._live)

    # --- input progress ----------------------------------------------------------------

    def input(self, key: str) -> InputState | None:
        """The latest state of input *key* (a copy is not made: do not mutate)."""
        return self._inputs.get(key)

    def input_by_id(self, input_id: int) -> InputState | None:
        """Resolve a SourceRef's input id (also for an input since replaced by a newer fingerprint)."""
        return self._inputs_by_id.get(input_id)

    def open_input(self, key: str, fingerprint: str = "") -> InputState:
        """The state of input *key* as of *fingerprint*, created (row 0) if new.

        A different fingerprint (the input's content changed) starts a new
        input with a new id, row 0; messages referring to the old id keep it.
        The rows the earlier versions took stay taken: the new state shares
        their keys (see InputTake). The record is written with the next commit
        (before any add that uses it).
        """
        self._check_open()
        cur = self._inputs.get(key)
        if cur is not None and cur.fingerprint == fingerprint:
            return cur
        inp = InputState(self._next_input_id, key, fingerprint)
        record = encode_record(inp.record(), f"input {key!r}")  # before anything changes
        if cur is not None:
            inp.taken = cur.taken
        self._next_input_id += 1
        self._inputs[key] = inp
        self._inputs_by_id[inp.id] = inp
        self._commits.append(record)
        return inp

    def input_progress(self, key: str, row: int) -> None:
        """Rows before *row* of input *key* are taken into work (batched; ``await sync()`` to wait)."""
        inp = self._input(key)
        if row > inp.row:
            inp.row = row
            self._write_input(inp)

    def input_done(self, key: str) -> None:
        """Input *key* is completely taken into work (batched; ``await sync()`` to wait)."""
        inp = self._input(key)
        if not inp.done:
            inp.done = True
            self._write_input(inp)

    def reread_inputs(self) -> int:
        """Every input is read again from its first row, skipping the rows recorded as taken: the rows whose
        record a damaged journal lost are read, and sent. Each starts again under no fingerprint (rows taken
        kept), which no input matches, until a run opens it under its own: a crash before that reads it from
        row 0 again (progress only moves forward under one fingerprint). Returns how many inputs."""
        keys = list(self._inputs)
        for key in keys:
            self.open_input(key, "")
        return len(keys)

    def forget_input(self, key: str) -> None:
        """Stop remembering input *key* (e.g. its file was removed after it was done)."""
        inp = self._inputs.pop(key, None)
        if inp is not None:
            self._check_open()
            self._inputs_by_id.pop(inp.id, None)
            self._commits.append(record_encoder.encode(ForgetRecord(inp.id)))

    def inputs(self) -> list[InputState]:
        return list(self._inputs.values())

    def _input(self, key: str) -> InputState:
        self._check_open()
        inp = self._inputs.get(key)
        if inp is None:
            raise KeyError(f"unknown input {key!r}: use open_input() first")
        return inp

    def _write_input(self, inp: InputState) -> None:
        self._commits.append(record_encoder.encode(inp.record()))

    # --- bodies --------------------------------------------------------------------------

    def read_body(self, ref: BodyRef, message_id: str | None = None) -> bytes:
        """The body stored at *ref* (after its add committed); BodyDamaged if it cannot be read back."""
        return self._segments.read(ref, message_id)

    def mark_lost(self, message: RecoveredMessage, reason: str) -> LostMessage:
        """Give up *message* (e.g. its body raised BodyDamaged): drop it, and name it in report.lost."""
        if message.id in self._live:
            self.remove(message.id)
        lost = LostMessage(message.id, [r.address for r in message.recipients], message.meta, reason)
        self.report.lost.append(lost)
        log.error("spool %s: message %s is lost: %s", self.directory, message.id, reason)
        return lost

    # --- committing ------------------------------------------------------------------------

    def _check_open(self) -> None:
        failed = self._commits.failed
        if failed is not None:
            raise SpoolError(f"spool {self.directory} failed: {failed}") from failed
        if self._commits.closing or self._closed:
            raise SpoolError(f"spool {self.directory} is closed")

    async def sync(self) -> None:
        """Return when everything recorded so far is on disk."""
        self._check_open()
        await self._commits.sync()

    def flush_sync(self) -> None:
        """Write and fsync pending records now, on this thread (only when no loop is committing)."""
        self._commits.flush_sync()

    # --- compaction ----------------------------------------------------------------------------

    async def compact(self) -> None:
        """Rewrite the journal with only the live state (runs beside normal commits)."""
        self._check_open()
        self._commits.ensure_task()
        if self._compacting is not None:
            await asyncio.shield(self._compacting)
        await asyncio.shield(self._start_compaction())

    def _after_batch(self) -> None:
        # Called by the committer after each batch: the journal only grows there.
        if (
            self.auto_compact
            and self._compacting is None
            and compaction_due(self._journal, self.compact_min_bytes, self.compact_ratio)
        ):
            self._start_compaction()

    def _start_compaction(self) -> asyncio.Task[None]:
        loop = self._commits.loop
        assert loop is not None
        self._compacting = task = loop.create_task(self._compact_task())
        return task

    async def _compact_task(self) -> None:
        try:
            await compact_journal(self._journal, self._commits)
        except Exception as exc:
            log.error("spool %s: compaction failed (the old journal stays): %s", self.directory, exc)
        finally:
            self._compacting = None

    # --- closing ------------------------------------------------------------------------------------

    async def close(self) -> None:
        """Write what is pending, wait for a running compaction, release the spool."""
        if self._closed or self._commits.closing:
            return
        if self._compacting is not None:
            try:
                await asyncio.shield(self._compacting)
            except Exception as exc:
                log.debug("spool %s: compaction ended with %s", self.directory, exc)
        if not self._live and self._journal.size > _IDLE_COMPACT_BYTES:
            # Everything is final: what the run leaves on disk is the input records
            # (what was taken, for exactly-once on the next run), not its history.
            try:
                await compact_idle(self._journal, self._commits, self._inputs.values())
            except Exception as exc:  # a full disk: the journal stays as it is, still correct
                log.warning("spool %s: final compaction failed: %s", self.directory, exc)
        await self._commits.close()
        self._finish_close()

    def close_sync(self) -> None:
        """Close without an event loop (pending records are written first)."""
        if self._closed:
            return
        self._commits.flush_sync()
        self._commits.closing = True
        self._finish_close()

    def _finish_close(self) -> None:
        self._closed = True
        self._commits.shutdown()
        self._segments.close_writers()
        self._segments.drop_idle_active()
        self._journal.close()
        self._release()

    def _release(self) -> None:
        self._segments.close_readers()
        os.close(self._lock_fd)  # releases the flock

    @property
    def journal_size(self) -> int:
        return self._journal.size

    def disk_usage(self) -> int:
        """Bytes used by the journal and the body segments."""
        return self._journal.size + self._segments.disk_usage()

    def __repr__(self) -> str:
        return f"<Spool {self.directory} live={len(self._live)} journal={self._journal.size}B>"

