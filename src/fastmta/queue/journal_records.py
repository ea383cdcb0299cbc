"""What the spool journal records, and how a record is encoded.

Each record is a msgspec Struct encoded as a msgpack array, one frame each
(framing: :mod:`fastmta.queue.journal`):

* :class:`AddRecord`    a message: id, sender, recipients, queued_at, and
  either a body reference (segment, offset, length) or a source reference
  (input id, row, byte offset) from which the caller re-renders it (campaign
  rows), plus meta.
* :class:`StateRecord`  one recipient's new state: delivered / bounced /
  expired (final) or deferred with attempts and next attempt time (wall clock).
* :class:`InputRecord`  an input's progress: key (e.g. path), fingerprint
  (e.g. mtime and size), rows taken, done. :class:`ForgetRecord` drops it;
  :class:`DropRecord` drops a message.

:class:`InputState` is the live form of an input's records: what the spool
keeps in memory and writes back as an :class:`InputRecord`.

This module is the leaf the spool's other modules share: it imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from fastmta.queue.records import Status

__all__ = [
    "DEFERRED_CODE",
    "STATUS_CODE",
    "AddRecord",
    "BodyRef",
    "DropRecord",
    "ForgetRecord",
    "InputRecord",
    "InputState",
    "JournalRecord",
    "SourceRef",
    "StateRecord",
    "record_decoder",
    "record_encoder",
]

# array_like: encoded as msgpack arrays without field names (compact; a record
# is ~40 bytes). gc=False: they hold only strings, numbers and plain
# containers decoded from msgpack, which cannot form reference cycles, and a
# million of them must not make the cycle collector walk them.


class BodyRef(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """Where a body lives: segment number, frame offset in it, payload length."""

    seg: int
    off: int
    size: int


class SourceRef(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """A body that the caller re-renders from an input (a campaign row), not stored."""

    input: int  # InputState.id
    row: int  # row number (as the caller counts them)
    offset: int = -1  # byte offset of the row in the recipients file, if the caller knows it


# The tags are the on-disk record kinds: never renumber them.


class AddRecord(msgspec.Struct, tag=1, array_like=True, gc=False):
    """A message was accepted."""

    id: str
    sender: str
    rcpts: list[str]
    queued_at: float
    body: BodyRef | None = None
    src: SourceRef | None = None
    meta: dict[str, Any] | None = None


class StateRecord(msgspec.Struct, tag=2, array_like=True, gc=False):
    """Recipient *idx* of message *id* reached *status* (a code of STATUS_CODE)."""

    id: str
    idx: int
    status: int
    attempts: int = 0
    next_at: float = 0.0


class InputRecord(msgspec.Struct, tag=3, array_like=True, gc=False):
    """Input *iid* (its key and fingerprint) has *row* rows taken, and is *done* or not."""

    iid: int
    key: str
    fp: str
    row: int
    done: bool


class DropRecord(msgspec.Struct, tag=4, array_like=True, gc=False):
    """Message *id* is gone, whatever its recipients' states."""

    id: str


class ForgetRecord(msgspec.Struct, tag=5, array_like=True, gc=False):
    """Input *iid* is no longer remembered."""

    iid: int


JournalRecord = AddRecord | StateRecord | InputRecord | DropRecord | ForgetRecord

# Statuses are stored as small integers: part of the on-disk format, never renumber.
STATUS_CODE = {Status.DELIVERED: 1, Status.BOUNCED: 2, Status.EXPIRED: 3, Status.DEFERRED: 4}
DEFERRED_CODE = STATUS_CODE[Status.DEFERRED]  # the only status that is not final

record_decoder = msgspec.msgpack.Decoder(JournalRecord)
record_encoder = msgspec.msgpack.Encoder()


@dataclass(slots=True)
class InputState:
    """How far an input (pickup file, campaign job) has been taken into work."""

    id: int
    key: str
    fingerprint: str
    row: int = 0  # rows taken so far (the next row to take)
    done: bool = False

    def record(self) -> InputRecord:
        """The journal record that restores this state."""
        return InputRecord(self.id, self.key, self.fingerprint, self.row, self.done)
