"""InputProgress: rows taken out of order, progress recorded every few rows, never past a row in flight."""

from __future__ import annotations

from pathlib import Path

from fastmta.intake.progress import _PROGRESS_EVERY, InputProgress, resume_from
from fastmta.queue.spool import Spool

KEY = "campaign:spring"


def _records(spool: Spool) -> int:
    return spool._commits._stats.records + len(spool._commits._p_journal)


def test_progress_is_recorded_every_few_rows_and_never_past_a_row_in_flight(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "q")
    tracker = InputProgress(spool)
    tracker.start(KEY, "fp")
    before = _records(spool)
    rows = 1000
    for row in range(rows + 1):
        tracker.issued(KEY, row)
    for row in range(1, rows + 1):  # row 0 stays in flight: nothing may be recorded past it
        tracker.taken(KEY, row)
    state = spool.input(KEY)
    assert state is not None and state.row == 0
    assert _records(spool) == before
    tracker.taken(KEY, 0)  # now every row is taken, nothing in flight: recorded exactly
    assert state.row == rows + 1
    for row in range(rows + 1, 3 * rows):  # in order, a few always in flight
        tracker.issued(KEY, row)
        if row - 3 > rows:
            tracker.taken(KEY, row - 3)
            assert row - 3 - _PROGRESS_EVERY < state.row <= row - 2  # lags by less than _PROGRESS_EVERY rows
    written = _records(spool) - before
    assert written <= 2 + (2 * rows) // _PROGRESS_EVERY  # not one record a row
    spool.flush_sync()
    spool.close_sync()
    reopened = Spool(tmp_path / "q")
    point = resume_from(reopened)(KEY, "fp")
    assert point is not None and state.row - _PROGRESS_EVERY < point.row <= state.row
    reopened.close_sync()
