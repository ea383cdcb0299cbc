"""Compaction: rewriting the journal with only its live state, beside the commits.

The journal only grows: every state record stays, though a finished message
needs none of its records any more. Compaction replays the journal and
writes back just what is live (inputs still needed, unfinished messages and
their recipients' latest states), then swaps the files atomically
(:mod:`fastmta.queue.journal_file`).

It must not stop the commits for the time a replay takes (about a second per
million records), so it runs in two phases:

1. beside commits, in a worker thread: replay the prefix committed so far
   and write its live state to ``journal.tmp``;
2. between commits, in the writer thread: append what was committed
   meanwhile, verbatim, and install the new file.

It is due when the journal has grown ``ratio`` times past its size after the
last compaction (and past a minimum size, so small spools are left alone).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable, Iterator
from functools import partial

from fastmta.queue.commit import GroupCommit
from fastmta.queue.journal import frame
from fastmta.queue.journal_file import JournalFile
from fastmta.queue.journal_records import (
    JOURNAL_VERSION,
    TAKEN_KEYS_PER_RECORD,
    HeaderRecord,
    InputState,
    TakenRecord,
    record_encoder,
)
from fastmta.queue.recovery import PREFIX_END, live_frames, replay

__all__ = ["compact_idle", "compact_journal", "compaction_due"]

# Every part of the spool logs as the spool (the logger its documentation names).
log = logging.getLogger("fastmta.queue.spool")


def compaction_due(journal: JournalFile, min_bytes: int, ratio: float) -> bool:
    return journal.size > max(min_bytes, ratio * journal.compacted_size)


def _write_live_prefix(journal: JournalFile, stop: int) -> tuple[int, int]:
    """Phase 1: the live state of the first *stop* bytes, written to journal.tmp: (fd, size)."""
    st = replay(journal.path, stop)
    if st.scan.damaged:
        log.warning("spool %s: compaction skipped damaged journal bytes: %s", journal.directory, st.scan)
    return journal.write_tmp(live_frames(st))


async def compact_journal(journal: JournalFile, commits: GroupCommit) -> None:
    """Compact *journal* while *commits* go on (which must be running on this loop)."""
    loop = asyncio.get_running_loop()
    # Phase 1, beside commits: replay the committed prefix and write its live state.
    async with commits.batch_lock:
        stop = journal.size  # a frame boundary: batches are written whole
    fd, size = await loop.run_in_executor(None, _write_live_prefix, journal, stop)
    # Phase 2, between commits: append what was committed meanwhile, swap files.
    try:
        async with commits.batch_lock:
            await commits.in_writer_thread(partial(journal.install_compacted, fd, size, stop))
    except BaseException:
        os.close(fd)
        raise


def idle_frames(inputs: Iterable[InputState]) -> Iterator[bytes]:
    """The journal of a spool with nothing unfinished: its header and each input's state (what exactly-once needs)."""
    enc = record_encoder.encode
    yield frame(enc(HeaderRecord(JOURNAL_VERSION)))
    for inp in inputs:
        yield frame(enc(inp.record()))
        if len(inp.taken):
            yield from (frame(enc(TakenRecord(inp.id, keys))) for keys in inp.taken.chunks(TAKEN_KEYS_PER_RECORD))
    yield PREFIX_END


async def compact_idle(journal: JournalFile, commits: GroupCommit, inputs: Iterable[InputState]) -> None:
    """Compact the journal of a spool with nothing unfinished (at close), from the in-memory input states.

    Why not :func:`compact_journal`: with no message live, the live state is
    exactly the spool's input states, which it holds in memory; replaying the
    whole run's journal to find that out cost a few percent of a ``fastmta
    send`` run. Everything pending is written first, and the batch lock is held
    throughout, so no record can land between the snapshot and the swap.
    """
    # A run with nothing to do never started the committer: "the committer has not started" was
    # logged as a failed compaction, and a finished queue's journal was never compacted again.
    commits.ensure_task()
    await commits.sync()
    async with commits.batch_lock:
        frames = list(idle_frames(inputs))
        stop = journal.size

        def rewrite() -> None:
            fd, size = journal.write_tmp(frames)
            try:
                journal.install_compacted(fd, size, stop)
            except BaseException:
                os.close(fd)
                raise

        await commits.in_writer_thread(rewrite)
