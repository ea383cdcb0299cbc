"""The rejected input of one queue, kept beside it across runs (``QUEUE/rejects.jsonl``).

A rejected row (a bad address, a template that does not render, a repeated
recipient) is marked done in the queue's input progress, so no later run
reads it again: that is what makes a rerun exactly-once. The report of it
must then outlive the run that made it. Kept only in memory and written at
exit, it vanished with a crash (kill -9, a second Ctrl-C, the OOM killer),
and the rerun, which never meets that row again, reported nothing and exited
0: bad input silently dropped. So each reject is appended here, and flushed
to the OS, *before* the row is marked done (a process crash cannot lose it;
the queue's own journal orders the rest). A run that has written its report
(summary, ``--rejects``) appends a mark; the next run reports, besides its
own, the rejects after the last mark: those of a run that ended before it
could report them. (An input that cannot be read at all is rejected, and
reported, on every run anyway: it is never marked done.)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from fastmta.intake.items import Reject

__all__ = ["RejectLog"]

_REPORTED = {"reported": True}


class RejectLog:
    """Appends rejects to *path*; :meth:`all`: this run's and those no run reported, in order, each once."""

    def __init__(self, path: Path, note: Callable[[str], None]) -> None:
        self.path = path
        self._note = note
        self._seen: dict[tuple[Any, ...], dict[str, Any]] = {}
        self._file: IO[str] | None = None
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                for number, line in enumerate(f, 1):
                    try:
                        record = json.loads(line)
                        if record == _REPORTED:
                            self._seen.clear()  # those before were in a finished run's report
                            continue
                        key = (record["file"], record["line"], record["reason"])
                    except (ValueError, KeyError, TypeError):
                        note(f"{path}:{number}: not a reject record (damaged?): left out of the report")
                        continue
                    self._seen.setdefault(key, record)
        except FileNotFoundError:
            pass
        except OSError as exc:
            note(f"{path}: cannot read the rejects of earlier runs: {exc.strerror or exc}")
        self._earlier = len(self._seen)
        try:
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the run, closed by close()
        except OSError as exc:
            note(f"{path}: cannot keep rejects beside the queue: {exc.strerror or exc} (they are reported at the end "
                 "only; a crash before then loses the report)")

    @property
    def earlier(self) -> int:
        """Rejects of earlier runs that no run reported (it ended first)."""
        return self._earlier

    @staticmethod
    def mark_reported(path: Path) -> None:
        """The run's report is written: its rejects need not be reported again (best effort: unmarked,
        they are reported once more, never lost)."""
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(_REPORTED) + "\n")
        except OSError:
            pass

    def add(self, reject: Reject) -> None:
        record = reject.as_dict()
        key = (record["file"], record["line"], record["reason"])
        if key in self._seen:
            return  # the same file refused again (an unreadable file is tried, and reported, on every run)
        self._seen[key] = record
        if self._file is not None:
            try:
                self._file.write(json.dumps(record) + "\n")
                self._file.flush()
            except OSError as exc:
                self._note(f"{self.path}: cannot write a reject: {exc.strerror or exc} (reported at the end only)")
                self._close_file()

    def all(self) -> list[dict[str, Any]]:
        return list(self._seen.values())

    def close(self) -> None:
        if self._file is not None:
            try:
                os.fsync(self._file.fileno())
            except OSError:
                pass
            self._close_file()

    def _close_file(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
