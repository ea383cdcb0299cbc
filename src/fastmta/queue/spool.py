"""The durable spool: what is accepted is on disk before we say so, and survives any crash.

Layout of a spool directory::

    lock            flock'd while a process has the spool open (a second opener fails fast)
    journal         append-only log of framed msgpack records (see fastmta.queue.journal)
    journal.tmp     a compaction in progress (deleted at open: the old journal is still whole)
    data/NNNNNNNN.dat   body segments: framed message bodies, appended, never rewritten

Records (msgspec Structs encoded as msgpack arrays, one frame each):

* ``Add``    a message: id, sender, recipients, queued_at, and either a body
  reference (segment, offset, length) or a source reference (input id, row,
  byte offset) from which the caller re-renders it (campaign rows), plus meta.
* ``State``  one recipient's new state: delivered / bounced / expired (final)
  or deferred with attempts and next attempt time (wall clock).
* ``Input``  an input's progress: key (e.g. path), fingerprint (e.g. mtime and
  size), rows taken, done. ``Forget`` drops it; ``Drop`` drops a message.

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
  time). A torn tail or damaged bytes anywhere are skipped (magic marker +
  length + crc32 per record, resynchronized at the next good record), warned
  about (``SpoolRecoveryWarning`` and the ``fastmta.queue.spool`` logger) and
  counted in :class:`RecoveryReport`; then the journal is rewritten clean.
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
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from fastmta.errors import FastMTAError
from fastmta.queue.journal import HEADER_SIZE, ScanReport, check_frame, frame, scan
from fastmta.queue.records import Status

log = logging.getLogger("fastmta.queue.spool")

__all__ = [
    "BodyRef",
    "InputState",
    "RecoveredMessage",
    "RecoveredRecipient",
    "RecoveryReport",
    "SourceRef",
    "Spool",
    "SpoolError",
    "SpoolLocked",
    "SpoolRecoveryWarning",
    "SpoolStats",
]


class SpoolError(FastMTAError):
    """The spool cannot do what was asked (I/O failure, unknown message, damaged body)."""


class SpoolLocked(SpoolError):
    """Another process has this spool open."""


class SpoolRecoveryWarning(UserWarning):
    """Recovery skipped damaged journal bytes or found a message whose body is gone."""


# --- on-disk records -----------------------------------------------------------
# array_like: encoded as msgpack arrays without field names (compact; a record
# is ~40 bytes). gc=False: they hold only strings, numbers and plain
# containers decoded from msgpack, which cannot form reference cycles, and a
# million of them must not make the cycle collector walk them.


class BodyRef(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """Where a body lives: segment number, frame offset in it, payload length."""

    seg: int
    off: int
    size: int


class SourceRef(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """A body that the caller re-renders from an input (a campaign row), not stored."""

    input: int  # InputState.id
    row: int  # row number (as the caller counts them)
    offset: int = -1  # byte offset of the row in the recipients file, if the caller knows it


class _Add(msgspec.Struct, tag=1, array_like=True, gc=False):
    id: str
    sender: str
    rcpts: list[str]
    queued_at: float
    body: BodyRef | None = None
    src: SourceRef | None = None
    meta: dict[str, Any] | None = None


class _State(msgspec.Struct, tag=2, array_like=True, gc=False):
    id: str
    idx: int
    status: int
    attempts: int = 0
    next_at: float = 0.0


class _Input(msgspec.Struct, tag=3, array_like=True, gc=False):
    iid: int
    key: str
    fp: str
    row: int
    done: bool


class _Drop(msgspec.Struct, tag=4, array_like=True, gc=False):
    id: str


class _Forget(msgspec.Struct, tag=5, array_like=True, gc=False):
    iid: int


_Record = _Add | _State | _Input | _Drop | _Forget

_STATUS_CODE = {Status.DELIVERED: 1, Status.BOUNCED: 2, Status.EXPIRED: 3, Status.DEFERRED: 4}
_CODE_STATUS = {v: k for k, v in _STATUS_CODE.items()}
_DEFERRED = 4


# --- public results --------------------------------------------------------------


@dataclass(slots=True)
class InputState:
    """How far an input (pickup file, campaign job) has been taken into work."""

    id: int
    key: str
    fingerprint: str
    row: int = 0  # rows taken so far (the next row to take)
    done: bool = False


@dataclass(slots=True, frozen=True)
class RecoveredRecipient:
    index: int  # position in the message's recipient list (the index for record())
    address: str
    status: Status | None  # None: never tried (or in flight at the crash); DEFERRED otherwise
    attempts: int
    next_attempt: float  # wall clock; 0.0 = as soon as possible


@dataclass(slots=True)
class RecoveredMessage:
    id: str
    sender: str
    queued_at: float  # wall clock of the original add (queue lifetime counts from it)
    recipients: list[RecoveredRecipient]  # unfinished ones only
    total_recipients: int
    body: BodyRef | None  # read it with Spool.read_body()
    source: SourceRef | None  # or re-render it from this input row
    meta: dict[str, Any]


@dataclass(slots=True)
class RecoveryReport:
    records: int = 0  # good records read
    messages: int = 0  # unfinished messages returned
    recipients: int = 0  # unfinished recipients returned
    deferred: int = 0  # of which with a deferred state (keep their schedule)
    inputs: int = 0
    journal_bytes: int = 0
    skipped_bytes: int = 0  # damaged bytes stepped over
    damaged_regions: list[tuple[int, int]] = field(default_factory=list)  # (offset, length)
    torn_tail_bytes: int = 0  # part of skipped_bytes: the end of the journal (a crash mid-write)
    undecodable: int = 0  # frames whose checksum matched but whose content did not decode
    orphan_records: int = 0  # state records for messages not in the journal (already compacted away)
    missing_bodies: list[str] = field(default_factory=list)  # message ids whose body segment is gone
    rewritten: bool = False  # the journal was rewritten (compacted) at open
    seconds: float = 0.0

    @property
    def damaged(self) -> bool:
        return bool(self.skipped_bytes or self.undecodable or self.missing_bodies)

    def __str__(self) -> str:
        text = (
            f"{self.records} records, {self.messages} unfinished messages "
            f"({self.recipients} recipients, {self.deferred} deferred) in {self.seconds:.2f}s"
        )
        if self.skipped_bytes:
            text += (
                f"; skipped {self.skipped_bytes} damaged bytes in {len(self.damaged_regions)} region(s)"
                f" (torn tail {self.torn_tail_bytes} bytes)"
            )
        if self.undecodable:
            text += f"; {self.undecodable} undecodable records"
        if self.missing_bodies:
            text += f"; {len(self.missing_bodies)} message(s) lost their body"
        return text


@dataclass(slots=True)
class SpoolStats:
    fsyncs: int = 0
    commits: int = 0
    records: int = 0  # journal records written
    journal_bytes_written: int = 0
    data_bytes_written: int = 0
    compactions: int = 0
    segments_deleted: int = 0


# --- recovery state (shared by open and by compaction) ----------------------------


class _Msg:
    __slots__ = ("add", "remaining", "states")

    def __init__(self, add: _Add) -> None:
        self.add = add
        self.states: list[_State | None] | None = None  # allocated on the first state record
        self.remaining = len(add.rcpts)


class _Loaded:
    """The live state of a journal prefix: unfinished messages and inputs."""

    __slots__ = ("inputs", "msgs", "orphans", "scan", "undecodable")

    def __init__(self) -> None:
        self.msgs: dict[str, _Msg] = {}
        self.inputs: dict[int, InputState] = {}
        self.scan = ScanReport()
        self.undecodable = 0
        self.orphans = 0


_decoder = msgspec.msgpack.Decoder(_Record)
_encoder = msgspec.msgpack.Encoder()


def _load(path: Path, stop: int | None = None) -> _Loaded:
    """Replay the journal at *path* (up to *stop*) into live state.

    Memory is bounded by the unfinished work (plus one read chunk): a message
    is dropped as soon as its last recipient is final.
    """
    st = _Loaded()
    msgs = st.msgs
    inputs = st.inputs
    decode = _decoder.decode
    with open(path, "rb", buffering=0) as f:
        for _off, payload in scan(f, st.scan, 0, stop):
            try:
                rec = decode(payload)
            except (msgspec.DecodeError, msgspec.ValidationError):
                st.undecodable += 1
                continue
            kind = type(rec)
            if kind is _State:
                m = msgs.get(rec.id)
                if m is None or not 0 <= rec.idx < len(m.add.rcpts):
                    st.orphans += 1
                    continue
                states = m.states
                if states is None:
                    if rec.status != _DEFERRED and m.remaining == 1 and len(m.add.rcpts) == 1:
                        del msgs[rec.id]  # the common campaign case: one recipient, now final
                        continue
                    states = m.states = [None] * len(m.add.rcpts)
                prev = states[rec.idx]
                if prev is not None and prev.status != _DEFERRED:
                    continue  # already final: a duplicate
                states[rec.idx] = rec
                if rec.status != _DEFERRED:
                    m.remaining -= 1
                    if m.remaining <= 0:
                        del msgs[rec.id]
            elif kind is _Add:
                if rec.id not in msgs:
                    msgs[rec.id] = _Msg(rec)
                    src = rec.src
                    if src is not None:
                        inp = inputs.get(src.input)
                        if inp is not None and inp.row <= src.row:
                            inp.row = src.row + 1
            elif kind is _Input:
                old = inputs.get(rec.iid)
                row = rec.row
                if old is not None and old.fingerprint == rec.fp:
                    row = max(row, old.row)  # progress only moves forward
                inputs[rec.iid] = InputState(rec.iid, rec.key, rec.fp, row, rec.done)
            elif kind is _Drop:
                msgs.pop(rec.id, None)
            else:
                inputs.pop(rec.iid, None)
    return st


def _live_frames(st: _Loaded) -> Iterable[bytes]:
    """The records that reproduce *st*: inputs still needed, then each live message."""
    referenced = {m.add.src.input for m in st.msgs.values() if m.add.src is not None}
    latest: dict[str, int] = {}
    for inp in st.inputs.values():
        if latest.get(inp.key, -1) < inp.id:
            latest[inp.key] = inp.id
    keep = referenced | set(latest.values())
    enc = _encoder.encode
    for inp in st.inputs.values():
        if inp.id in keep:
            yield frame(enc(_Input(inp.id, inp.key, inp.fingerprint, inp.row, inp.done)))
    for m in st.msgs.values():
        yield frame(enc(m.add))
        if m.states is not None:
            for s in m.states:
                if s is not None:
                    yield frame(enc(s))


class _Live:
    """The spool's in-memory view of one unfinished message: just enough to count it down."""

    __slots__ = ("done", "remaining", "seg", "src")

    def __init__(self, seg: int, n: int, src: SourceRef | None) -> None:
        self.seg = seg  # body segment, -1 if none
        self.done = bytearray(n)  # 1 = final
        self.remaining = n
        self.src = src


def _writeall(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


_default_fsync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)


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
        """
        self.directory = Path(directory)
        self.commit_interval = commit_interval
        self.flush_interval = flush_interval
        self.flush_records = flush_records
        self.segment_size = segment_size
        self.compact_min_bytes = compact_min_bytes
        self.compact_ratio = compact_ratio
        self.auto_compact = auto_compact
        self._fsync_fn = fsync or _default_fsync
        self.stats = SpoolStats()
        self._journal_path = self.directory / "journal"
        self._tmp_path = self.directory / "journal.tmp"
        self._data_dir = self.directory / "data"

        self._live: dict[str, _Live] = {}
        self._inputs: dict[str, InputState] = {}  # latest state per key
        self._inputs_by_id: dict[int, InputState] = {}
        self._next_input_id = 1
        self._seg_live: dict[int, int] = {}  # segment -> unfinished messages with a body in it
        self._active_seg = 1
        self._data_tail = 0  # logical end of the active segment, including pending data

        # Pending (not yet handed to the writer) work: built on the loop thread.
        self._p_journal: list[bytes] = []
        self._p_data: list[tuple[int, bytes]] = []
        self._p_waiters: list[asyncio.Future[None]] = []
        self._p_finished: list[int] = []  # segments of messages that became final
        self._p_first = 0.0  # loop time of the oldest pending record
        self._p_first_waiter = 0.0

        self._journal_size = 0  # committed bytes
        self._compacted_size = 0
        self._failed: BaseException | None = None
        self._closing = False
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._io_lock: asyncio.Lock | None = None
        self._compacting: asyncio.Task[None] | None = None
        # One writer thread: writes are ordered, and the loop never waits on the disk.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="fastmta-spool")
        self._w_data_fds: dict[int, int] = {}  # writer thread only
        self._r_fds: dict[int, int] = {}  # loop thread: for read_body
        self._recovered: list[RecoveredMessage] = []

        self.directory.mkdir(parents=True, exist_ok=True)
        self._data_dir.mkdir(exist_ok=True)
        self._lock_fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o644)
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

    # --- opening and recovery ---------------------------------------------------

    def _open(self) -> RecoveryReport:
        started = time.perf_counter()
        report = RecoveryReport()
        if self._tmp_path.exists():
            self._tmp_path.unlink()  # a compaction died before its rename: the journal is whole
        st = _load(self._journal_path) if self._journal_path.exists() else _Loaded()
        report.records = st.scan.frames
        report.journal_bytes = st.scan.bytes_scanned
        report.damaged_regions = list(st.scan.damaged_regions)
        report.skipped_bytes = st.scan.skipped_bytes
        report.torn_tail_bytes = st.scan.torn_tail
        report.undecodable = st.undecodable
        report.orphan_records = st.orphans

        segments = self._segments_on_disk()
        for mid, m in list(st.msgs.items()):
            if m.add.body is not None and m.add.body.seg not in segments:
                report.missing_bodies.append(mid)
                del st.msgs[mid]
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
                elif s.status == _DEFERRED:
                    rcpts.append(RecoveredRecipient(i, address, Status.DEFERRED, s.attempts, s.next_at))
                    report.deferred += 1
                else:
                    live.done[i] = 1
                    live.remaining -= 1
            self._live[mid] = live
            if seg >= 0:
                self._seg_live[seg] = self._seg_live.get(seg, 0) + 1
            recovered.append(
                RecoveredMessage(
                    mid, add.sender, add.queued_at, rcpts, len(add.rcpts), add.body, add.src, add.meta or {}
                )
            )
            report.recipients += len(rcpts)
        report.messages = len(recovered)
        report.inputs = len(self._inputs)
        # Bodies of finished messages whose deletion a crash interrupted.
        for seg in segments:
            if seg not in self._seg_live:
                self._unlink_segment(seg)
        self._active_seg = max(segments, default=0) + 1  # never append to a segment a crash may have torn

        size = st.scan.bytes_scanned
        dead_heavy = size > self.compact_min_bytes and report.records > self.compact_ratio * (
            report.messages + report.recipients + report.inputs + 1
        )
        if report.damaged or dead_heavy or not self._journal_path.exists():
            # Rewrite from what we recovered: drops damaged bytes (so the next
            # open does not warn again) and finished records.
            self._rewrite_sync(st)
            report.rewritten = True
        else:
            self._jfd = os.open(self._journal_path, os.O_WRONLY | os.O_APPEND)
            self._journal_size = size
            self._compacted_size = size
        report.seconds = time.perf_counter() - started
        if report.damaged:
            text = f"spool {self.directory}: recovered with damage: {report}"
            log.warning(text)
            warnings.warn(text, SpoolRecoveryWarning, stacklevel=3)
        elif report.records:
            log.info("spool %s: recovered %s", self.directory, report)
        return report

    def _segments_on_disk(self) -> set[int]:
        segs: set[int] = set()
        for name in os.listdir(self._data_dir):
            stem, dot, ext = name.partition(".")
            if dot and ext == "dat" and stem.isdigit():
                segs.add(int(stem))
        return segs

    def _seg_path(self, seg: int) -> Path:
        return self._data_dir / f"{seg:08d}.dat"

    def _fsync(self, fd: int) -> None:
        self.stats.fsyncs += 1
        self._fsync_fn(fd)

    def _fsync_dir(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            self._fsync(fd)
        finally:
            os.close(fd)

    def _write_tmp(self, frames: Iterable[bytes], tail: tuple[int, int] | None = None) -> tuple[int, int]:
        """Write a new journal to journal.tmp; return (fd, size). Not yet renamed."""
        fd = os.open(self._tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        size = 0
        chunk: list[bytes] = []
        chunk_len = 0
        for fr in frames:
            chunk.append(fr)
            chunk_len += len(fr)
            if chunk_len >= 1 << 20:
                _writeall(fd, b"".join(chunk))
                size += chunk_len
                chunk, chunk_len = [], 0
        if chunk:
            _writeall(fd, b"".join(chunk))
            size += chunk_len
        return fd, size

    def _install_tmp(self, fd: int) -> None:
        """Make journal.tmp the journal: fsync it, rename over, fsync the directory."""
        self._fsync(fd)
        os.replace(self._tmp_path, self._journal_path)
        self._fsync_dir(self.directory)

    def _rewrite_sync(self, st: _Loaded) -> None:
        fd, size = self._write_tmp(_live_frames(st))
        self._install_tmp(fd)
        old = getattr(self, "_jfd", None)
        self._jfd = fd
        if old is not None:
            os.close(old)
        self._journal_size = size
        self._compacted_size = size
        self.stats.compactions += 1

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
    ) -> asyncio.Future[None]:
        """Queue a message for the next commit; the future resolves when it is durable.

        Exactly one of *body* (stored in a data segment) and *source* (a row
        of an input opened with :meth:`open_input`; nothing stored) is given.
        Recipient *i* of *recipients* is index *i* for :meth:`record`.
        Needs a running event loop (it is the one the commits run on).
        """
        self._enqueue_add(message_id, sender, recipients, body, source, queued_at, meta)
        return self._waiter()

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
    ) -> BodyRef | None:
        """Store a message; return when it is on disk (fsync'd), with the body's reference.

        If the awaiting task is cancelled, the message is still committed.
        """
        ref = self._enqueue_add(message_id, sender, recipients, body, source, queued_at, meta)
        await asyncio.shield(self._waiter())
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
    ) -> BodyRef | None:
        """The same without an event loop: durable on return if *flush* (else at flush_sync())."""
        ref = self._enqueue_add(message_id, sender, recipients, body, source, queued_at, meta)
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
    ) -> BodyRef | None:
        self._check_open()
        if (body is None) == (source is None):
            raise ValueError("give exactly one of body and source")
        if message_id in self._live:
            raise SpoolError(f"message {message_id} is already in the spool")
        if not recipients:
            raise ValueError("a message needs at least one recipient")
        ref: BodyRef | None = None
        seg = -1
        if body is not None:
            fr = frame(body)
            if self._data_tail and self._data_tail + len(fr) > self.segment_size:
                self._active_seg += 1  # rotate: the writer closes the old one after its last write
                self._data_tail = 0
            seg = self._active_seg
            ref = BodyRef(seg, self._data_tail, len(body))
            self._data_tail += len(fr)
            self._p_data.append((seg, fr))
            self._seg_live[seg] = self._seg_live.get(seg, 0) + 1
        else:
            assert source is not None
            inp = self._inputs_by_id.get(source.input)
            if inp is None:
                raise SpoolError(f"unknown input id {source.input}: use open_input() first")
            if inp.row <= source.row:
                inp.row = source.row + 1  # recovery derives the same from the Add record
        add = _Add(
            message_id,
            sender,
            list(recipients),
            time.time() if queued_at is None else queued_at,
            ref,
            source,
            meta or None,
        )
        self._live[message_id] = _Live(seg, len(recipients), source)
        self._append(_encoder.encode(add))
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
        code = _STATUS_CODE[status]
        if live.done[index]:
            return
        if code != _DEFERRED:
            live.done[index] = 1
            live.remaining -= 1
            if live.remaining == 0:
                del self._live[message_id]
                if live.seg >= 0:
                    self._p_finished.append(live.seg)
        self._append(_encoder.encode(_State(message_id, index, code, attempts, next_attempt)))

    def remove(self, message_id: str) -> None:
        """Drop a message whatever its recipients' states (e.g. cancelled by an operator)."""
        self._check_open()
        live = self._live.pop(message_id)
        if live.seg >= 0:
            self._p_finished.append(live.seg)
        self._append(_encoder.encode(_Drop(message_id)))

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

        A different fingerprint (the file changed: other mtime or size) starts
        a new input with a new id; messages referring to the old id keep it.
        The record is written with the next commit (before any add that uses it).
        """
        self._check_open()
        cur = self._inputs.get(key)
        if cur is not None and cur.fingerprint == fingerprint:
            return cur
        inp = InputState(self._next_input_id, key, fingerprint)
        self._next_input_id += 1
        self._inputs[key] = inp
        self._inputs_by_id[inp.id] = inp
        self._write_input(inp)
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

    def forget_input(self, key: str) -> None:
        """Stop remembering input *key* (e.g. its file was removed after it was done)."""
        inp = self._inputs.pop(key, None)
        if inp is not None:
            self._check_open()
            self._inputs_by_id.pop(inp.id, None)
            self._append(_encoder.encode(_Forget(inp.id)))

    def inputs(self) -> list[InputState]:
        return list(self._inputs.values())

    def _input(self, key: str) -> InputState:
        self._check_open()
        inp = self._inputs.get(key)
        if inp is None:
            raise KeyError(f"unknown input {key!r}: use open_input() first")
        return inp

    def _write_input(self, inp: InputState) -> None:
        self._append(_encoder.encode(_Input(inp.id, inp.key, inp.fingerprint, inp.row, inp.done)))

    # --- bodies --------------------------------------------------------------------------

    def read_body(self, ref: BodyRef) -> bytes:
        """The body stored at *ref* (after its add committed). Raises SpoolError if damaged."""
        fd = self._r_fds.get(ref.seg)
        if fd is None:
            try:
                fd = os.open(self._seg_path(ref.seg), os.O_RDONLY)
            except OSError as exc:
                raise SpoolError(f"body segment {ref.seg}: {exc.strerror}") from None
            if len(self._r_fds) >= 64:
                os.close(self._r_fds.pop(next(iter(self._r_fds))))
            self._r_fds[ref.seg] = fd
        data = os.pread(fd, HEADER_SIZE + ref.size, ref.off)
        payload = check_frame(data, ref.size)
        if payload is None:
            raise SpoolError(f"body at segment {ref.seg} offset {ref.off} is damaged or missing")
        return payload

    # --- committing ------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._failed is not None:
            raise SpoolError(f"spool {self.directory} failed: {self._failed}") from self._failed
        if self._closing or self._closed:
            raise SpoolError(f"spool {self.directory} is closed")

    def _append(self, payload: bytes) -> None:
        if not self._p_journal:
            self._p_first = self._now()
            self._kick()
        self._p_journal.append(frame(payload))
        if len(self._p_journal) == self.flush_records:
            self._kick()

    def _now(self) -> float:
        return self._loop.time() if self._loop is not None else time.monotonic()

    def _ensure_task(self) -> bool:
        """Start the committer on the running loop, if there is one."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False  # used without a loop: flush_sync() writes
        if self._task is not None and self._loop is loop and not self._task.done():
            return True
        if self._task is not None and not self._task.done():
            raise SpoolError("the spool is already committing on another event loop")
        self._loop = loop
        self._wake = asyncio.Event()
        self._io_lock = asyncio.Lock()
        self._task = loop.create_task(self._committer())
        return True

    def _kick(self) -> None:
        if self._ensure_task():
            assert self._wake is not None
            self._wake.set()

    def _waiter(self) -> asyncio.Future[None]:
        if not self._ensure_task():
            raise SpoolError("add_message needs a running event loop (or use flush_sync)")
        assert self._loop is not None
        fut: asyncio.Future[None] = self._loop.create_future()
        if not self._p_waiters:
            self._p_first_waiter = self._loop.time()
            self._kick()
        self._p_waiters.append(fut)
        return fut

    async def sync(self) -> None:
        """Return when everything recorded so far is on disk."""
        self._check_open()
        if self._p_journal or self._p_data:
            await asyncio.shield(self._waiter())
        elif self._io_lock is not None:
            async with self._io_lock:  # a batch in flight
                pass

    async def _committer(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None and self._io_lock is not None
        while True:
            if not (self._p_journal or self._p_data or self._p_waiters):
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            now = loop.time()
            if self._closing or len(self._p_journal) >= self.flush_records:
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
            active = self._active_seg
            try:
                async with self._io_lock:
                    await loop.run_in_executor(self._executor, self._write_batch, journal, data, active)
            except BaseException as exc:
                # The logical offsets no longer match the files: refuse further work.
                self._failed = exc
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
                self._release_segments(finished)
            if (
                self.auto_compact
                and self._compacting is None
                and self._journal_size > max(self.compact_min_bytes, self.compact_ratio * self._compacted_size)
            ):
                self._compacting = loop.create_task(self._compact_task())

    def _write_batch(self, journal: list[bytes], data: list[tuple[int, bytes]], active: int) -> None:
        """Writer thread: bodies first (fsync), then the journal records (fsync)."""
        if data:
            touched: list[int] = []
            i = 0
            while i < len(data):
                seg = data[i][0]
                j = i
                while j < len(data) and data[j][0] == seg:
                    j += 1
                fd = self._w_data_fds.get(seg)
                if fd is None:
                    fd = os.open(self._seg_path(seg), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                    self._w_data_fds[seg] = fd
                    self._fsync_dir(self._data_dir)  # the new file's name must survive a crash too
                chunk = b"".join(d for _, d in data[i:j])
                _writeall(fd, chunk)
                self.stats.data_bytes_written += len(chunk)
                if seg not in touched:
                    touched.append(seg)
                i = j
            for seg in touched:
                self._fsync(self._w_data_fds[seg])
            for seg in [s for s in self._w_data_fds if s < active]:
                os.close(self._w_data_fds.pop(seg))
        if journal:
            blob = b"".join(journal)
            _writeall(self._jfd, blob)
            self._fsync(self._jfd)
            self._journal_size += len(blob)
            self.stats.records += len(journal)
            self.stats.journal_bytes_written += len(blob)
        self.stats.commits += 1

    def _release_segments(self, segs: list[int]) -> None:
        for seg in segs:
            n = self._seg_live.get(seg, 0) - 1
            if n > 0:
                self._seg_live[seg] = n
                continue
            self._seg_live.pop(seg, None)
            if seg != self._active_seg:
                self._unlink_segment(seg)

    def _unlink_segment(self, seg: int) -> None:
        # No directory fsync: if the unlink is lost in a crash, open() deletes
        # the unreferenced segment again.
        fd = self._r_fds.pop(seg, None)
        if fd is not None:
            os.close(fd)
        try:
            os.unlink(self._seg_path(seg))
            self.stats.segments_deleted += 1
        except FileNotFoundError:
            pass

    def flush_sync(self) -> None:
        """Write and fsync pending records now, on this thread (only when no loop is committing)."""
        if self._task is not None and not self._task.done():
            raise SpoolError("flush_sync() while the committer runs: use await sync()")
        if self._failed is not None:
            raise SpoolError(f"spool {self.directory} failed: {self._failed}")
        journal, data, finished = self._p_journal, self._p_data, self._p_finished
        self._p_journal, self._p_data, self._p_finished = [], [], []
        if journal or data:
            self._write_batch(journal, data, self._active_seg)
        if finished:
            self._release_segments(finished)

    # --- compaction ----------------------------------------------------------------------------

    async def compact(self) -> None:
        """Rewrite the journal with only the live state (runs beside normal commits)."""
        self._check_open()
        self._ensure_task()
        if self._compacting is not None:
            await asyncio.shield(self._compacting)
        assert self._loop is not None
        self._compacting = self._loop.create_task(self._compact_task())
        await asyncio.shield(self._compacting)

    async def _compact_task(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._io_lock is not None
        try:
            # Phase 1, beside commits: replay the committed prefix and write its live state.
            async with self._io_lock:
                stop = self._journal_size  # a frame boundary: batches are written whole
            fd, size = await loop.run_in_executor(None, self._compact_prefix, stop)
            # Phase 2, between commits: append what was committed meanwhile, swap files.
            try:
                async with self._io_lock:
                    await loop.run_in_executor(self._executor, self._compact_swap, fd, size, stop)
            except BaseException:
                os.close(fd)
                raise
        except Exception as exc:
            log.error("spool %s: compaction failed (the old journal stays): %s", self.directory, exc)
        finally:
            self._compacting = None

    def _compact_prefix(self, stop: int) -> tuple[int, int]:
        st = _load(self._journal_path, stop)
        if st.scan.damaged:
            log.warning("spool %s: compaction skipped damaged journal bytes: %s", self.directory, st.scan)
        return self._write_tmp(_live_frames(st))

    def _compact_swap(self, fd: int, size: int, stop: int) -> None:
        # Records after `stop` are copied verbatim: replaying them on top of the
        # compacted prefix gives the same state (states of messages compacted
        # away as finished cannot occur; recovery ignores them anyway).
        end = self._journal_size
        if end > stop:
            with open(self._journal_path, "rb") as src:
                src.seek(stop)
                left = end - stop
                while left:
                    chunk = src.read(min(left, 1 << 20))
                    if not chunk:
                        raise SpoolError("journal shorter than committed size")
                    _writeall(fd, chunk)
                    left -= len(chunk)
            size += end - stop
        self._install_tmp(fd)
        old = self._jfd
        self._jfd = fd
        os.close(old)
        self._journal_size = size
        self._compacted_size = size
        self.stats.compactions += 1

    # --- closing ------------------------------------------------------------------------------------

    async def close(self) -> None:
        """Write what is pending, wait for a running compaction, release the spool."""
        if self._closed or self._closing:
            return
        if self._compacting is not None:
            try:
                await asyncio.shield(self._compacting)
            except Exception as exc:
                log.debug("spool %s: compaction ended with %s", self.directory, exc)
        self._closing = True
        if self._task is not None:
            assert self._wake is not None
            self._wake.set()
            await self._task
        else:
            self.flush_sync()
        self._finish_close()

    def close_sync(self) -> None:
        """Close without an event loop (pending records are written first)."""
        if self._closed:
            return
        self.flush_sync()
        self._closing = True
        self._finish_close()

    def _finish_close(self) -> None:
        self._closed = True
        self._executor.shutdown(wait=True)
        for fd in self._w_data_fds.values():
            os.close(fd)
        self._w_data_fds.clear()
        os.close(self._jfd)
        self._release()

    def _release(self) -> None:
        for fd in self._r_fds.values():
            os.close(fd)
        self._r_fds.clear()
        os.close(self._lock_fd)  # releases the flock

    @property
    def journal_size(self) -> int:
        return self._journal_size

    def disk_usage(self) -> int:
        """Bytes used by the journal and the body segments."""
        total = self._journal_size
        for seg in self._segments_on_disk():
            try:
                total += self._seg_path(seg).stat().st_size
            except FileNotFoundError:
                pass
        return total

    def __repr__(self) -> str:
        return f"<Spool {self.directory} live={len(self._live)} journal={self._journal_size}B>"
