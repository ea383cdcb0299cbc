"""Operator suspensions (``fastmta queue suspend``): the rules and the file that keeps them.

``suspended.json`` beside the spool's journal, written whole (fsynced, renamed into place, the rename
fsynced): a restart holds again what an operator held back, and an unreadable file stops the start
(going on would send it).
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

from fastmta.queue.spool_errors import SpoolError

__all__ = ["SUSPEND_FILE", "Rule", "load_rules", "rule_key", "save_rules"]

#: Operator suspensions, beside the spool's journal.
SUSPEND_FILE = "suspended.json"


def rule_key(kind: str, value: str) -> str:
    return value if kind == "any" else f"{kind}:{value}"


class Rule(msgspec.Struct, frozen=True):
    """One operator suspension: *kind* site / domain / campaign / any (a bare word), since *since* (wall);
    until *until* (wall; None: until resumed), and why (*reason*, the operator's words)."""

    kind: str
    value: str
    since: float
    until: float | None = None
    reason: str = ""

    @property
    def key(self) -> str:
        return rule_key(self.kind, self.value)


def load_rules(directory: Path) -> list[Rule]:
    path = directory / SUSPEND_FILE
    if not path.exists():
        return []
    try:
        return msgspec.json.decode(path.read_bytes(), type=list[Rule])
    except msgspec.DecodeError as exc:
        # Starting without them would send what an operator held back: refuse.
        raise SpoolError(f"{path}: unreadable queue suspensions ({exc}); fix or remove the file") from None


def save_rules(directory: Path, rules: list[Rule]) -> None:
    path = directory / SUSPEND_FILE
    tmp = path.with_suffix(".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, msgspec.json.encode(rules))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)  # the rename itself durable
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise SpoolError(f"{path}: cannot keep the queue suspensions: {exc}") from exc
