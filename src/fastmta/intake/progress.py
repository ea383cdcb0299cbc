"""Which rows of each input are durably taken, so a rerun (or the next scan of a pickup directory) starts after them.

Shared by ``fastmta send`` and ``fastmta serve``'s pickup watcher: both
take inputs exactly once, by content (see :mod:`fastmta.intake.reader`).
"""

from __future__ import annotations

from collections import deque

from fastmta.intake.items import SpoolItem
from fastmta.intake.reader import Resume, ResumePoint
from fastmta.queue.journal_records import InputTake
from fastmta.queue.spool import Spool

__all__ = ["InputProgress", "resume_from"]


#: Rows between two progress records of an input.
_PROGRESS_EVERY = 64


class InputProgress:
    """Which rows of each input are durably taken, so a rerun starts after them.

    Submits run concurrently (they share group commits), so rows finish out
    of order; an input's recorded progress is the first row not yet taken.
    """

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self._pending: dict[str, deque[int]] = {}
        self._taken: dict[str, set[int]] = {}
        self._ended: set[str] = set()
        self._failed: set[str] = set()  # inputs rejected as a whole: never "done"
        self._ids: dict[str, int] = {}

    def start(self, key: str, fingerprint: str) -> None:
        self._failed.discard(key)  # a watcher scans again: this time it may go through
        self._ids[key] = self.spool.open_input(key, fingerprint).id
        self._pending[key] = deque()
        self._taken[key] = set()

    def take(self, item: SpoolItem) -> InputTake | None:
        """What the message made from *item* consumes: recorded with the message itself."""
        if not item.take_key:
            return None
        return InputTake(self._ids[item.key], item.row, item.take_key)

    def failed(self, key: str) -> None:
        """The input could not be used at all (or not to its end): a rerun tries it again."""
        self._failed.add(key)

    def issued(self, key: str, row: int) -> None:
        self._pending[key].append(row)

    def taken(self, key: str, row: int) -> None:
        """*row* is in the spool (or rejected): it must not be read again."""
        pending, taken = self._pending[key], self._taken[key]
        taken.add(row)
        last: int | None = None
        while pending and pending[0] in taken:
            last = pending.popleft()
            taken.discard(last)
        if last is not None:
            # The next row to read: the first one still in flight, or the one
            # after the last taken when nothing is in flight any more. Recorded
            # every _PROGRESS_EVERY rows, not every row (a journal record of ~110
            # bytes each): a rerun after a crash reads those few rows again and
            # skips them by their taken keys, which are the exactly-once record.
            row = pending[0] if pending else last + 1
            state = self.spool.input(key)  # its row: the progress last recorded
            if not pending or state is None or row - state.row >= _PROGRESS_EVERY:
                self.spool.input_progress(key, row)
        self._maybe_done(key)

    def end(self, key: str) -> None:
        self._ended.add(key)
        self._maybe_done(key)

    def _maybe_done(self, key: str) -> None:
        if key in self._ended and not self._pending[key]:
            if key not in self._failed:
                self.spool.input_done(key)
            self._ended.discard(key)


def resume_from(spool: Spool) -> Resume:
    def resume(key: str, fp: str) -> ResumePoint | None:
        state = spool.input(key)
        if state is None:
            return ResumePoint()
        if state.fingerprint != fp:
            return ResumePoint(0, state.taken)  # edited: every row again, but those taken are skipped
        return None if state.done else ResumePoint(state.row, state.taken)

    return resume
