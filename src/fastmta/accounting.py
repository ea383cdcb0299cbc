"""The accounting log: one JSON line per recipient outcome, written in batches.

Lines are encoded with msgspec and collected in memory; they reach the file
when the batch is full, on :meth:`flush` (the engine flushes a few times a
second) and on close. A crash can lose at most the unflushed batch of log
lines, never a message: the durable record is the spool journal's job.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO

import msgspec

from fastmta.message import Outcome


class AccountingLog:
    def __init__(self, path: str | Path, batch_lines: int = 512) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[bytes] = open(self.path, "ab")  # noqa: SIM115 - closed in close()
        self._encoder = msgspec.json.Encoder()
        self._pending: list[bytes] = []
        self._batch = batch_lines
        self.lines = 0

    def write(self, outcome: Outcome) -> None:
        self._pending.append(self._encoder.encode(outcome.as_record()))
        self.lines += 1
        if len(self._pending) >= self._batch:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self._file.write(b"\n".join(self._pending) + b"\n")
            self._pending.clear()
            self._file.flush()

    def close(self) -> None:
        self.flush()
        self._file.close()
