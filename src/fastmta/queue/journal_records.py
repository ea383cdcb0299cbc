"""What the spool journal records, and how a record is encoded.

Each record is a msgspec Struct encoded as a msgpack array, one frame each
(framing: :mod:`fastmta.queue.journal`):

* :class:`HeaderRecord`  the journal's format version (first record of a journal).
* :class:`AddRecord`    a message: id, sender, recipients, queued_at, and
  either a body reference (segment, offset, length) or a source reference
  (input id, row, byte offset) from which the caller re-renders it (campaign
  rows), plus meta.
* :class:`StateRecord`  one recipient's new state: delivered / bounced / deleted /
  expired (final) or deferred with attempts and next attempt time (wall clock).
* :class:`InputRecord`  an input's progress: key (what identifies it), fingerprint
  (its content), rows taken, done. :class:`ForgetRecord` drops it;
  :class:`DropRecord` drops a message. :class:`TakenRecord` keeps the keys of
  an input's rows taken by messages that compaction removed. :class:`PrefixEnd`
  ends what a rewrite wrote.

:class:`InputState` is the live form of an input's records: what the spool
keeps in memory and writes back as an :class:`InputRecord`.

This module is the leaf the spool's other modules share: it imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, get_args

import msgspec

from fastmta.errors import InputError
from fastmta.keyset import KeySet
from fastmta.queue.records import Status

__all__ = [
    "DEFERRED_CODE",
    "JOURNAL_VERSION",
    "RECORD_TAGS",
    "STATUS_CODE",
    "TAKEN_KEYS_PER_RECORD",
    "AddRecord",
    "BodyRef",
    "DropRecord",
    "ForgetRecord",
    "HeaderRecord",
    "InputRecord",
    "InputState",
    "InputTake",
    "JournalRecord",
    "PrefixEnd",
    "SourceRef",
    "StateRecord",
    "TakenRecord",
    "encode_record",
    "record_decoder",
    "record_encoder",
]

# array_like: encoded as msgpack arrays without field names (compact; a record
# is ~40 bytes). forbid_unknown_fields: a record with more fields than this
# code knows (a newer format) fails to decode, and the journal is refused,
# rather than read without them and rewritten without them. gc=False: they hold only strings, numbers and plain
# containers decoded from msgpack, which cannot form reference cycles, and a
# million of them must not make the cycle collector walk them.


class BodyRef(msgspec.Struct, array_like=True, forbid_unknown_fields=True, frozen=True, gc=False):
    """Where a body lives: segment number, frame offset in it, payload length."""

    seg: int
    off: int
    size: int


class SourceRef(msgspec.Struct, array_like=True, forbid_unknown_fields=True, frozen=True, gc=False):
    """A body that the caller re-renders from an input (a campaign row), not stored."""

    input: int  # InputState.id
    row: int  # row number (as the caller counts them)
    offset: int = -1  # byte offset of the row in the recipients file, if the caller knows it


# The tags are the on-disk record kinds: never renumber them.


class InputTake(msgspec.Struct, array_like=True, forbid_unknown_fields=True, frozen=True, gc=False):
    """The input row a message was made from: accepting the message consumes it.

    Carried by the message's own :class:`AddRecord`, so "accepted" and "its
    input row is taken" are one journal fact: no crash can separate them.
    *key* identifies the row whatever its position (a campaign: its id and
    recipient; a pickup file: its content), so an edited input is not resent.
    """

    input: int  # InputState.id
    row: int
    key: int  # a 64-bit row key (fastmta.keyset.row_key)


class AddRecord(msgspec.Struct, tag=1, array_like=True, forbid_unknown_fields=True, gc=False):
    """A message was accepted."""

    id: str
    sender: str
    rcpts: list[str]
    queued_at: float
    body: BodyRef | None = None
    src: SourceRef | None = None
    meta: dict[str, Any] | None = None
    take: InputTake | None = None  # added after format 1's first records: absent means None


class StateRecord(msgspec.Struct, tag=2, array_like=True, forbid_unknown_fields=True, gc=False):
    """Recipient *idx* of message *id* reached *status* (a code of STATUS_CODE)."""

    id: str
    idx: int
    status: int
    attempts: int = 0
    next_at: float = 0.0


class InputRecord(msgspec.Struct, tag=3, array_like=True, forbid_unknown_fields=True, gc=False):
    """Input *iid* (its key and fingerprint) has *row* rows taken, and is *done* or not."""

    iid: int
    key: str
    fp: str
    row: int
    done: bool


class DropRecord(msgspec.Struct, tag=4, array_like=True, forbid_unknown_fields=True, gc=False):
    """Message *id* is gone, whatever its recipients' states."""

    id: str


class ForgetRecord(msgspec.Struct, tag=5, array_like=True, forbid_unknown_fields=True, gc=False):
    """Input *iid* is no longer remembered."""

    iid: int


#: Keys per TakenRecord: an input of a million rows is written as several, which recovery adds up.
#: 8,000 keys (64,000 bytes) keep each within the size a flipped bit is repaired in
#: (fastmta.queue.journal.MAX_REPAIR): one bit lost in a larger record lost the whole input's
#: progress, and the next run sent every row again.
TAKEN_KEYS_PER_RECORD = 8000


class TakenRecord(msgspec.Struct, tag=6, array_like=True, forbid_unknown_fields=True, gc=False):
    """Row keys of input *iid* already taken (packed u64, little-endian): written at compaction.

    Finished messages leave the journal at compaction, and with them the
    :class:`InputTake` that said their rows were taken; this keeps those keys.
    """

    iid: int
    keys: bytes


class PrefixEnd(msgspec.Struct, tag=7, array_like=True, forbid_unknown_fields=True, gc=False):
    """The end of what a rewrite (at open, or compaction) wrote: every record after it was appended.

    A rewrite is installed whole (written aside, fsync'd, renamed over), so
    no crash leaves a journal that ends before this record: one that does
    was cut short (a copy, a damaged file system), and lost what followed.
    """


class HeaderRecord(msgspec.Struct, tag=0, array_like=True, forbid_unknown_fields=True, gc=False):
    """The journal's format *version*: the first record of every journal this code writes.

    A journal without one (written before it existed) is version 1. A
    version above :data:`JOURNAL_VERSION`, or a record kind this code does
    not know, makes opening refuse the journal (and leave it untouched).
    """

    version: int


#: The journal format this code writes and understands. Bump it for any
#: change an older fastmta would misread (a new record kind, a new field).
#: 1: the records before headers existed. 2: AddRecord.take and TakenRecord
#: (an input row consumed in the same record that accepts its message).
#: 3: PrefixEnd after every rewrite (a journal cut short inside it is told
#: from a crash). Older versions are read and upgraded on the next rewrite.
JOURNAL_VERSION = 3

JournalRecord = (
    HeaderRecord | AddRecord | StateRecord | InputRecord | DropRecord | ForgetRecord | TakenRecord | PrefixEnd
)
#: The record kinds (msgpack tag -> name) this code reads.
RECORD_TAGS = {int(t.__struct_config__.tag): t.__name__ for t in get_args(JournalRecord)}

# Statuses are stored as small integers: part of the on-disk format, never renumber.
# Every code but DEFERRED's is final, which is all recovery reads from it, so a
# new final status (DELETED) needs no format change: older code reads it as final.
STATUS_CODE = {Status.DELIVERED: 1, Status.BOUNCED: 2, Status.EXPIRED: 3, Status.DEFERRED: 4, Status.DELETED: 5}
DEFERRED_CODE = STATUS_CODE[Status.DEFERRED]  # the only status that is not final

record_decoder = msgspec.msgpack.Decoder(JournalRecord)
record_encoder = msgspec.msgpack.Encoder()


def encode_record(record: JournalRecord, what: str) -> bytes:
    """*record* for the journal, encoded before the spool changes anything: what cannot be recorded (a lone
    surrogate) refuses *what* without a trace (a row marked taken first was skipped as sent, never queued)."""
    try:
        return record_encoder.encode(record)
    except (ValueError, TypeError, OverflowError, msgspec.EncodeError) as exc:
        raise InputError(f"{what}: cannot be recorded: {exc}") from None


@dataclass(slots=True)
class InputState:
    """How far an input (pickup file, campaign job) has been taken into work."""

    id: int
    key: str
    fingerprint: str
    row: int = 0  # rows taken so far (the next row to take)
    done: bool = False
    #: Keys of every row taken (by InputTake), whatever the row's position.
    taken: KeySet = field(default_factory=KeySet)

    def record(self) -> InputRecord:
        """The journal record that restores this state."""
        return InputRecord(self.id, self.key, self.fingerprint, self.row, self.done)
