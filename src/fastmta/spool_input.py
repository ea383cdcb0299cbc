"""Reading a spool directory: pickup files and campaign jobs, as a stream of work.

The reader yields :class:`SpoolItem` (one message for some recipients) or
:class:`Reject` (input that could not be used, with file, line and reason).
It never stops at bad input and never loads a whole campaign's recipients
into memory: items are produced one at a time as the engine takes them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastmta.errors import InputError
from fastmta.pickup import read_pickup


@dataclass(frozen=True, slots=True)
class SpoolItem:
    content: bytes
    sender: str
    recipients: list[str]
    source: str
    line: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Reject:
    source: str
    line: int | None
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.source, "line": self.line, "reason": self.reason}

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line is not None else self.source
        return f"{where}: {self.reason}"


class SpoolReader:
    """Iterates a spool directory: ``*.eml`` first (sorted), then ``*.toml`` jobs."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def __iter__(self) -> Iterator[SpoolItem | Reject]:
        try:
            entries = sorted(self.directory.iterdir())
        except OSError as exc:
            yield Reject(str(self.directory), None, f"cannot list directory: {exc.strerror or exc}")
            return
        for path in entries:
            if path.name.startswith(".") or not path.is_file():
                continue  # hidden files are being written by someone (see sink capture)
            if path.suffix == ".eml":
                yield from self._pickup(path)
        for path in entries:
            if path.suffix == ".toml" and path.is_file() and not path.name.startswith("."):
                yield from self._campaign(path)

    def _pickup(self, path: Path) -> Iterator[SpoolItem | Reject]:
        try:
            msg = read_pickup(path)
        except InputError as exc:
            yield Reject(str(path), exc.line, exc.reason)
            return
        yield SpoolItem(msg.content, msg.sender, msg.recipients, str(path), meta={"file": path.name})

    def _campaign(self, path: Path) -> Iterator[SpoolItem | Reject]:
        from fastmta.campaign import Campaign

        try:
            campaign = Campaign.load(path)
        except InputError as exc:
            yield Reject(exc.source or str(path), exc.line, exc.reason)
            return
        yield from campaign.items()
