"""Durable writes to the spool's files, and the counts of what they did (SpoolStats).

A write is durable only once its file is fsync'd, and a newly created or
renamed file only once its *directory* is fsync'd too (the name is data of
the directory). Every fsync the spool makes goes through :class:`Disk`, so
it is counted and tests can inject a cheap one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Disk", "SpoolStats", "default_fsync", "write_all"]


@dataclass(slots=True)
class SpoolStats:
    """What the spool did to its disk since it was opened."""

    fsyncs: int = 0
    commits: int = 0
    records: int = 0  # journal records written
    journal_bytes_written: int = 0
    data_bytes_written: int = 0
    compactions: int = 0
    segments_deleted: int = 0


# fdatasync where there is one: the data and the size are what must survive,
# not the modification time.
default_fsync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)


def write_all(fd: int, data: bytes) -> None:
    """Write all of *data* (os.write may write less than asked)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class Disk:
    """The spool's fsyncs (of files and of directories), counted in *stats*."""

    __slots__ = ("_fsync_fn", "stats")

    def __init__(self, fsync: Callable[[int], None], stats: SpoolStats) -> None:
        self._fsync_fn = fsync
        self.stats = stats

    def fsync(self, fd: int) -> None:
        self.stats.fsyncs += 1
        self._fsync_fn(fd)

    def fsync_dir(self, path: Path) -> None:
        """Make the names in directory *path* (a file created or renamed there) durable."""
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            self.fsync(fd)
        finally:
            os.close(fd)
