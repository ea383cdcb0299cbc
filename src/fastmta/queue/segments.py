"""The spool's body segments: where message bodies are appended, read back and freed.

``data/NNNNNNNN.dat`` files hold framed message bodies, appended and never
rewritten. Bodies live apart from the journal so that the journal stays
small (recovery reads all of it) and bodies are never read at recovery,
only when a recovered message is sent again.

A segment is closed past ``segment_size`` and deleted once no unfinished
message has its body in it (and that is on disk), so space comes back a
segment at a time without rewriting anything. After a restart new bodies go
to a fresh segment: the last one may have been torn by the crash.

Threads: :meth:`BodySegments.write` runs in the spool's writer thread and
only touches the write descriptors; everything else runs on the loop thread.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from fastmta.queue.disk import Disk, write_all
from fastmta.queue.journal import HEADER_SIZE, check_frame, frame, repair_frame
from fastmta.queue.journal_records import BodyRef
from fastmta.queue.spool_errors import BodyDamaged, SpoolError

__all__ = ["BodySegments"]

# Every part of the spool logs as the spool (the logger its documentation names).
log = logging.getLogger("fastmta.queue.spool")

_MAX_READ_FDS = 64  # segments kept open for reading bodies back


class BodySegments:
    """The ``data`` directory of a spool: body segments and their reference counts."""

    def __init__(self, directory: Path, segment_size: int, disk: Disk) -> None:
        self.directory = directory
        self.segment_size = segment_size
        self._disk = disk
        self._live: dict[int, int] = {}  # segment -> unfinished messages with a body in it
        self.active = 1  # the segment new bodies go to
        self._tail = 0  # logical end of the active segment, including bodies not yet written
        self._write_fds: dict[int, int] = {}  # writer thread only
        self._read_fds: dict[int, int] = {}  # loop thread: for read()

    def path(self, seg: int) -> Path:
        return self.directory / f"{seg:08d}.dat"

    def on_disk(self) -> set[int]:
        segs: set[int] = set()
        for name in os.listdir(self.directory):
            stem, dot, ext = name.partition(".")
            if dot and ext == "dat" and stem.isdigit():
                segs.add(int(stem))
        return segs

    # --- loop thread: placing, holding and releasing bodies ----------------------------

    def place(self, body: bytes) -> BodyRef:
        """Reserve room for *body*'s frame (written there by :meth:`write`): its reference.

        The body's message holds the segment until :meth:`release`. The frame
        itself (a CRC-32 and a copy: ~44 µs at 100 KB) is made by the writer
        thread, not here on the event loop.
        """
        ref = self.next_ref(len(body))
        if ref.seg != self.active:
            self.active = ref.seg  # rotate: the writer closes the old one after its last write
            self._tail = 0
        self._tail += HEADER_SIZE + len(body)
        self.hold(ref.seg)
        return ref

    def next_ref(self, length: int) -> BodyRef:
        """The reference :meth:`place` would give a body of *length* bytes now (nothing reserved)."""
        if self._tail and self._tail + HEADER_SIZE + length > self.segment_size:
            return BodyRef(self.active + 1, 0, length)
        return BodyRef(self.active, self._tail, length)

    def hold(self, seg: int) -> None:
        """One more unfinished message has its body in *seg*."""
        self._live[seg] = self._live.get(seg, 0) + 1

    def resume(self, on_disk: set[int]) -> None:
        """After recovery: delete segments no message holds, and start a fresh one."""
        # Bodies of finished messages whose deletion a crash interrupted.
        for seg in on_disk:
            if seg not in self._live:
                self._unlink(seg)
        self.active = max(on_disk, default=0) + 1  # never append to a segment a crash may have torn

    def release(self, segs: list[int]) -> None:
        """Messages holding *segs* (one entry per message) are final and that is on disk."""
        for seg in segs:
            n = self._live.get(seg, 0) - 1
            if n > 0:
                self._live[seg] = n
                continue
            self._live.pop(seg, None)
            if seg != self.active:
                self._unlink(seg)

    def _unlink(self, seg: int) -> None:
        # No directory fsync: if the unlink is lost in a crash, open() deletes
        # the unreferenced segment again.
        fd = self._read_fds.pop(seg, None)
        if fd is not None:
            os.close(fd)
        try:
            os.unlink(self.path(seg))
            self._disk.stats.segments_deleted += 1
        except FileNotFoundError:
            pass

    def read(self, ref: BodyRef, message_id: str | None = None) -> bytes:
        """The body stored at *ref* (after its add committed).

        Raises BodyDamaged (naming *message_id*) if its frame or checksum
        fails or its segment is gone: it can never be read. Other I/O errors
        raise SpoolError.
        """
        whose = f"body of message {message_id}" if message_id is not None else "body"
        fd = self._read_fds.get(ref.seg)
        if fd is None:
            try:
                fd = os.open(self.path(ref.seg), os.O_RDONLY)
            except FileNotFoundError:
                raise BodyDamaged(f"{whose}: body segment {self.path(ref.seg)} is missing", message_id) from None
            except OSError as exc:
                raise SpoolError(f"{whose}: body segment {ref.seg}: {exc.strerror}") from None
            if len(self._read_fds) >= _MAX_READ_FDS:
                os.close(self._read_fds.pop(next(iter(self._read_fds))))
            self._read_fds[ref.seg] = fd
        data = os.pread(fd, HEADER_SIZE + ref.size, ref.off)
        payload = check_frame(data, ref.size)
        if payload is None and (fixed := repair_frame(data, ref.size)) is not None:
            # One flipped bit, put right and confirmed by the checksum (fastmta.queue.journal).
            payload, where = fixed
            log.warning(
                "%s at %s offset %d: repaired one flipped bit in its frame's %s, confirmed by the checksum",
                whose, self.path(ref.seg), ref.off, where,
            )
        if payload is None:
            what = "is damaged (checksum fails)" if len(data) == HEADER_SIZE + ref.size else "is cut short"
            raise BodyDamaged(f"{whose} at {self.path(ref.seg)} offset {ref.off} {what}", message_id)
        return payload

    def disk_usage(self) -> int:
        total = 0
        for seg in self.on_disk():
            try:
                total += self.path(seg).stat().st_size
            except FileNotFoundError:
                pass
        return total

    def close_readers(self) -> None:
        for fd in self._read_fds.values():
            os.close(fd)
        self._read_fds.clear()

    # --- writer thread ---------------------------------------------------------------------

    def write(self, data: list[tuple[int, bytes]], active: int) -> None:
        """Append bodies (segment, body), framed, in order, and fsync every segment written.

        Segments before *active* (the loop's active segment when the batch was
        taken) get no more bodies: their descriptors are closed.
        """
        touched: list[int] = []
        i = 0
        while i < len(data):
            seg = data[i][0]
            j = i
            while j < len(data) and data[j][0] == seg:
                j += 1
            fd = self._write_fds.get(seg)
            if fd is None:
                fd = os.open(self.path(seg), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o660)
                self._write_fds[seg] = fd
                self._disk.fsync_dir(self.directory)  # the new file's name must survive a crash too
            chunk = b"".join([frame(d) for _, d in data[i:j]])
            write_all(fd, chunk)
            self._disk.stats.data_bytes_written += len(chunk)
            if seg not in touched:
                touched.append(seg)
            i = j
        for seg in touched:
            self._disk.fsync(self._write_fds[seg])
        for seg in [s for s in self._write_fds if s < active]:
            os.close(self._write_fds.pop(seg))

    def drop_idle_active(self) -> None:
        """At close: the active segment, when no unfinished message has its body there, goes too.

        Only the active one can be left (the others go when their last message
        is final): without this, a finished run would leave up to a segment of
        sent bodies behind. Call after :meth:`close_writers`.
        """
        if self._live.get(self.active, 0) == 0 and self.path(self.active).exists():
            self._unlink(self.active)

    def close_writers(self) -> None:
        for fd in self._write_fds.values():
            os.close(fd)
        self._write_fds.clear()
