"""The spool's journal file: appending committed batches, and replacing it atomically.

``journal`` is append-only; it is only ever replaced whole, by a rewrite
(at open, or by compaction) written to ``journal.tmp`` and then installed:
fsync the new file, rename it over the old one, fsync the directory. A crash
at any point leaves either the old journal or the new one, never a mix; a
``journal.tmp`` found at open is a rewrite that died before its rename.

Threads: after open, appends and the final swap of a compaction run in the
spool's writer thread (one at a time); :meth:`JournalFile.write_tmp` may run
in another thread beside them, as it touches only ``journal.tmp``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from fastmta.queue.disk import Disk, write_all
from fastmta.queue.spool_errors import SpoolError

__all__ = ["JournalFile"]

_WRITE_CHUNK = 1 << 20  # a rewrite is written in pieces of about this size
_COPY_CHUNK = 1 << 20


class JournalFile:
    """The ``journal`` of a spool directory and its committed size."""

    def __init__(self, directory: Path, disk: Disk) -> None:
        self.directory = directory
        self.path = directory / "journal"
        self.tmp_path = directory / "journal.tmp"
        self._disk = disk
        self._fd: int | None = None  # for appending; set by open_append() or a rewrite
        self.size = 0  # committed bytes
        self.compacted_size = 0  # size after the last rewrite (or as found at open)

    def discard_tmp(self) -> None:
        """Delete a rewrite that died before its rename (the journal is whole)."""
        if self.tmp_path.exists():
            self.tmp_path.unlink()

    def open_append(self, size: int) -> None:
        """Append to the journal as found at open: *size* bytes, all replayed."""
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self.size = size
        self.compacted_size = size

    def append(self, blob: bytes) -> None:
        """Append framed records and fsync them (writer thread)."""
        fd = self._fd
        assert fd is not None, "the journal is not open"
        write_all(fd, blob)
        self._disk.fsync(fd)
        self.size += len(blob)

    # --- rewriting ----------------------------------------------------------------------

    def write_tmp(self, frames: Iterable[bytes]) -> tuple[int, int]:
        """Write a new journal to journal.tmp; return (fd, size). Not yet installed."""
        fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o660)
        size = 0
        chunk: list[bytes] = []
        chunk_len = 0
        for fr in frames:
            chunk.append(fr)
            chunk_len += len(fr)
            if chunk_len >= _WRITE_CHUNK:
                write_all(fd, b"".join(chunk))
                size += chunk_len
                chunk, chunk_len = [], 0
        if chunk:
            write_all(fd, b"".join(chunk))
            size += chunk_len
        return fd, size

    def rewrite(self, frames: Iterable[bytes]) -> None:
        """Replace the journal by *frames* (at open: nothing is appending meanwhile)."""
        fd, size = self.write_tmp(frames)
        self._install_tmp(fd, size)

    def install_compacted(self, fd: int, size: int, stop: int) -> None:
        """Install journal.tmp (*fd*, *size*), written from the first *stop* bytes, as the journal.

        Runs between commits (writer thread). Records committed after *stop*
        are copied over verbatim first: replaying them on top of the compacted
        prefix gives the same state (states of messages compacted away as
        finished cannot occur; recovery ignores them anyway).
        """
        end = self.size
        if end > stop:
            with open(self.path, "rb") as src:
                src.seek(stop)
                left = end - stop
                while left:
                    chunk = src.read(min(left, _COPY_CHUNK))
                    if not chunk:
                        raise SpoolError("journal shorter than committed size")
                    write_all(fd, chunk)
                    left -= len(chunk)
            size += end - stop
        self._install_tmp(fd, size)

    def _install_tmp(self, fd: int, size: int) -> None:
        """Make journal.tmp the journal: fsync it, rename over, fsync the directory; append to it."""
        self._disk.fsync(fd)
        os.replace(self.tmp_path, self.path)
        self._disk.fsync_dir(self.directory)
        old = self._fd
        self._fd = fd
        if old is not None:
            os.close(old)
        self.size = size
        self.compacted_size = size
        self._disk.stats.compactions += 1

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
