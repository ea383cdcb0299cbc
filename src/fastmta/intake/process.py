"""The spool reader in a process of its own: parsing, rendering and signing on the other core.

``fastmta send`` is one event loop: it reads the spool, renders and signs
campaign messages, journals them and delivers them, all on one core, and
reading a campaign is ~40% of that core's work. Postfix splits the same
path into processes (pickup and cleanup apart from the queue manager and
the SMTP clients); fastmta splits it in two: a forked child iterates the
:class:`~fastmta.intake.reader.SpoolReader` and streams its events through
a pipe, the parent journals and delivers them.

Why a fork and not a fresh interpreter: the reader needs the queue's
snapshot of what was taken before (up to 8 bytes a row), its return-path
and unsubscribe secrets and the DKIM keys; a fork has them, with nothing
to serialize and no second start-up.

Nothing durable happens in the child. It only reads files and writes
events; the parent takes each one exactly as it took the reader's own
(journaled before counted). So whatever becomes of the child, nothing is
lost or sent twice:

* the parent stops early (Ctrl-C, SIGTERM, a paused campaign): it kills
  the child, which leaves both signals to it;
* the parent dies: the child gets SIGKILL (``PR_SET_PDEATHSIG``), or a
  broken pipe at its next write;
* the child fails (an exception, a signal, the OOM killer): the parent
  raises :class:`IntakeError`, never mistakes it for the end of the spool.
  What the child had not handed over is read again by the next run.

Back-pressure is the pipe's: the child blocks writing once the parent has
a few batches unread, so the read-ahead stays a few hundred KB.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import os
import pickle
import signal
import stat
import struct
import sys
import threading
import time
import traceback
import warnings
from collections.abc import AsyncIterator, Iterable
from typing import Any

from fastmta.intake.items import Event, SpoolItem

__all__ = ["IntakeError", "IntakeProcess", "can_fork"]

#: Frame header: the length of the pickled batch that follows.
_HEADER = struct.Struct("<I")
#: A batch is sent when it has this many events or this many bytes of
#: message: large enough that a frame's costs are shared, small enough that
#: the parent starts sending while the child renders the next ones.
_BATCH_EVENTS = 64
_BATCH_BYTES = 256 * 1024
#: ... or when its first event has waited this long (seconds).
_BATCH_SECONDS = 0.1
#: The pipe's capacity (Linux F_SETPIPE_SZ): batches the child writes ahead.
_PIPE_BYTES = 1024 * 1024
_EVENTS, _END, _ERROR = "events", "end", "error"
#: Signals the parent handles for both processes (it stops, then kills the child).
_PARENTS_SIGNALS = {signal.SIGINT, signal.SIGTERM}
#: How long close() waits for a killed child before leaving it to the system.
_REAP_WAIT = 10.0


class IntakeError(Exception):
    """The intake process failed or ended before the end of the spool (what it did not hand over is read again)."""


def can_fork() -> bool:
    """Is a forked intake process possible here (POSIX)?"""
    return hasattr(os, "fork")


class IntakeProcess:
    """Iterates *events* (a not yet started iterator, e.g. ``iter(SpoolReader(...))``) in a forked child."""

    def __init__(self, events: Iterable[Event]) -> None:
        self._events = events
        self.pid: int | None = None
        self._stream: asyncio.StreamReader | None = None
        self._transport: asyncio.ReadTransport | None = None
        #: The child's resource usage once reaped (its CPU counts in this process's children's times).
        self.rusage: Any = None
        self.status: int | None = None

    async def start(self) -> None:
        """Fork the child; the parent keeps the pipe's read end."""
        rfd, wfd = os.pipe()
        with contextlib.suppress(OSError, AttributeError):
            import fcntl

            fcntl.fcntl(wfd, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
        # Flushed now, or the child would inherit and print again what is buffered.
        sys.stdout.flush()
        sys.stderr.flush()
        # What exists now (modules, configuration, the queue's recovered state) lives as long as the run:
        # out of the collector's sight, its pages stay shared instead of being copied into the child (and
        # into the parent) by the first collection that walks them.
        gc.freeze()
        parent = os.getpid()
        # Held back across the fork: the child ignores them, but only once it has said so, and a
        # Ctrl-C in between would kill it. The parent gets its own as soon as the fork returns.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _PARENTS_SIGNALS)
        try:
            with warnings.catch_warnings():
                # Python 3.12 warns about forking a process with threads (the queue's writer, an idle
                # executor worker). The child touches none of their state: it reads files, computes and
                # writes to its pipe, then leaves with os._exit; the lock it could meet (the import
                # lock, the malloc arenas) is reset by the fork itself.
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
        except OSError:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            os.close(rfd)
            os.close(wfd)
            raise
        if pid == 0:  # pragma: no cover (the child: its work is checked through the parent)
            os.close(rfd)
            _child(self._events, wfd, parent, mask)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(wfd)
        self.pid = pid
        loop = asyncio.get_running_loop()
        self._stream = asyncio.StreamReader(limit=_BATCH_BYTES * 4, loop=loop)
        protocol = asyncio.StreamReaderProtocol(self._stream, loop=loop)
        transport, _ = await loop.connect_read_pipe(lambda: protocol, os.fdopen(rfd, "rb", buffering=0))
        self._transport = transport

    async def events(self) -> AsyncIterator[Event]:
        """The reader's events, in its order; IntakeError if the child fails before the end."""
        stream = self._stream
        assert stream is not None, "start() first"
        while True:
            try:
                head = await stream.readexactly(_HEADER.size)
                kind, payload = pickle.loads(await stream.readexactly(_HEADER.unpack(head)[0]))
            except asyncio.IncompleteReadError:
                how = await self._reap()
                raise IntakeError(f"the intake process ended before the end of the spool ({how})") from None
            except (pickle.UnpicklingError, ValueError, TypeError, EOFError) as exc:  # a damaged frame
                self.kill()
                how = await self._reap()
                raise IntakeError(f"unreadable data from the intake process ({exc}); it was stopped ({how})") from None
            if kind == _ERROR:
                await self._reap()
                raise IntakeError(f"the intake process failed:\n{payload}")
            for event in payload:
                yield event
            if kind == _END:
                await self._reap()
                return

    def kill(self) -> None:
        """Stop the child now (it holds nothing durable): its pipe ends, ``events()`` raises IntakeError."""
        if self.pid is not None and self.status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    async def close(self) -> None:
        """Stop the child if it still runs, and reap it."""
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        self.kill()
        await self._reap()

    async def _reap(self) -> str:
        """Wait for the child to end (it has ended, or is ending); how it ended, in words.

        Polled, not a blocking wait: a child stuck in the kernel (a hung network file system) does
        not die at once even from SIGKILL, and the event loop must go on meanwhile (a second
        Ctrl-C). After ~10 s it is left to the system (it dies with this process at the latest).
        """
        deadline = time.monotonic() + _REAP_WAIT
        while self.status is None and self.pid is not None:
            try:
                pid, status, rusage = os.wait4(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped by someone else (a child watcher): how it ended is unknown
                self.status = -1
                break
            if pid:
                self.status, self.rusage = status, rusage
                break
            if time.monotonic() > deadline:
                return "it did not end when told to"
            await asyncio.sleep(0.005)
        status = self.status or 0
        if status == -1:
            return "its exit status is unknown"
        if os.WIFSIGNALED(status):
            return f"killed by signal {os.WTERMSIG(status)}"
        return f"exit status {os.waitstatus_to_exitcode(status)}"


class _Batcher:  # pragma: no cover (runs in the child)
    """The child's pending batch, sent when full, or by a timer once it is old: never held for long.

    Size alone is not enough: a campaign run again after a crash skips the
    rows taken before without yielding anything, and a batch begun just
    before a long stretch of them would wait for the end of it while the
    parent had nothing to send. A thread sends such a batch after
    ``_BATCH_SECONDS``; the lock keeps its frames whole between the two.
    """

    def __init__(self, wfd: int) -> None:
        self.wfd = wfd
        self.batch: list[Event] = []
        self.size = 0
        self.since = 0.0  # when the pending batch got its first event (monotonic)
        self.lock = threading.Lock()
        self.failed: BaseException | None = None  # the timer's write failed (the parent is gone)
        self._done = threading.Event()
        self._timer = threading.Thread(target=self._run, name="fastmta-intake-flush", daemon=True)
        self._timer.start()

    def add(self, event: Event) -> None:
        with self.lock:
            if self.failed is not None:
                raise self.failed
            if not self.batch:
                self.since = time.monotonic()
            self.batch.append(event)
            if isinstance(event, SpoolItem):
                self.size += len(event.content)
            if len(self.batch) >= _BATCH_EVENTS or self.size >= _BATCH_BYTES:
                self._send_locked(_EVENTS)

    def finish(self, kind: str, payload: Any = None) -> None:
        """Send what is pending, then a last frame of *kind* (its payload: the pending events for _END)."""
        self._done.set()
        with self.lock:
            if kind == _END and self.failed is not None:
                raise self.failed  # the timer lost a batch: never an END the parent would take for the whole spool
            if kind == _END:
                self._send_locked(_END)
                return
            if self.batch:
                self._send_locked(_EVENTS)  # read before the failure: the parent takes them
            _send(self.wfd, kind, payload)

    def _send_locked(self, kind: str) -> None:
        batch, self.batch, self.size = self.batch, [], 0
        _send(self.wfd, kind, batch)

    def _run(self) -> None:
        while not self._done.wait(_BATCH_SECONDS):
            with self.lock:
                if self.batch and self.failed is None and time.monotonic() - self.since >= _BATCH_SECONDS:
                    try:
                        self._send_locked(_EVENTS)
                    except BaseException as exc:  # handed to the reading thread, which raises it
                        self.failed = exc
                        return


def _child(events: Iterable[Event], wfd: int, parent: int, mask: set[int | signal.Signals]) -> None:  # pragma: no cover (runs in the child)
    """Iterate *events*, writing them in batches to *wfd*; never returns."""
    status = 0
    batcher: _Batcher | None = None
    try:
        # The parent's signal set-up is not this process's: Ctrl-C, and a
        # SIGTERM sent to the whole group (a service manager stopping it),
        # are the parent's to handle: it stops taking input and kills this
        # child. Nor may a signal wake the parent's loop through an inherited fd.
        with contextlib.suppress(ValueError):
            signal.set_wakeup_fd(-1)
        for signum in _PARENTS_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        _die_with_parent(parent)
        _let_go_of_inherited_files(wfd)
        batcher = _Batcher(wfd)
        for event in events:
            batcher.add(event)
        batcher.finish(_END)
    except BrokenPipeError:
        status = 1  # the parent stopped reading: it is gone or stopping
    except BaseException:  # reported to the parent, which raises it
        status = 1
        report = traceback.format_exc()
        if batcher is not None:
            with contextlib.suppress(Exception):
                batcher.finish(_ERROR, report)
        else:
            with contextlib.suppress(Exception):
                _send(wfd, _ERROR, report)
    finally:
        # No atexit, no flushing of buffers inherited from the parent.
        os._exit(status)


def _send(wfd: int, kind: str, payload: Any) -> None:  # pragma: no cover (runs in the child)
    data = pickle.dumps((kind, payload), protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        view = view[os.write(wfd, view):]


def _let_go_of_inherited_files(wfd: int) -> None:  # pragma: no cover (runs in the child)
    """Point every inherited descriptor but stdio, the pipe and devices at /dev/null.

    A forked child shares its parent's open files: the queue's flock'd lock
    file among them, so a ``fastmta send`` restarted right after a ``kill -9``
    found its queue "in use" until this child had died too (the crash test
    caught it). Descriptors are replaced, not closed: a number the parent's
    objects still name is never reused for a file this process opens.
    Character devices (/dev/urandom kept open by a crypto library) stay.
    """
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return  # not Linux: the parent's lock outlives it only until it dies with the parent
    null = os.open(os.devnull, os.O_RDWR)
    for fd in fds:
        if fd <= 2 or fd in (wfd, null):
            continue
        try:
            if stat.S_ISCHR(os.fstat(fd).st_mode):
                continue
            os.dup2(null, fd, inheritable=False)
        except OSError:
            continue  # the listing's own descriptor, gone already
    os.close(null)


def _die_with_parent(parent: int) -> None:  # pragma: no cover (runs in the child)
    """SIGKILL when the parent dies (Linux), so a killed ``fastmta send`` leaves no reader behind."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            pr_set_pdeathsig = 1
            libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)
