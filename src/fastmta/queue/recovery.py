"""Replaying the spool journal into the live state it describes, and what recovery returns.

Two users: opening a spool (every unfinished message comes back, as a
:class:`RecoveredMessage`, with a :class:`RecoveryReport` of what was read,
skipped and lost) and compaction (the live state is written back as a short
journal by :func:`live_frames`).

Replay never fails on bad data: damaged or torn frames are stepped over by
the scanner (:mod:`fastmta.queue.journal`), records that do not decode are
counted, and state records for messages no longer in the journal (compacted
away as finished) are counted as orphans and ignored.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from fastmta.queue.journal import ScanReport, frame, scan
from fastmta.queue.journal_records import (
    DEFERRED_CODE,
    AddRecord,
    BodyRef,
    DropRecord,
    InputRecord,
    InputState,
    SourceRef,
    StateRecord,
    record_decoder,
    record_encoder,
)
from fastmta.queue.records import Status

__all__ = [
    "LiveState",
    "PendingMessage",
    "RecoveredMessage",
    "RecoveredRecipient",
    "RecoveryReport",
    "live_frames",
    "replay",
    "replay_at_open",
]


# --- what recovery returns ------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class RecoveredRecipient:
    index: int  # position in the message's recipient list (the index for record())
    address: str
    status: Status | None  # None: never tried (or in flight at the crash); DEFERRED otherwise
    attempts: int
    next_attempt: float  # wall clock; 0.0 = as soon as possible


@dataclass(slots=True)
class RecoveredMessage:
    id: str
    sender: str
    queued_at: float  # wall clock of the original add (queue lifetime counts from it)
    recipients: list[RecoveredRecipient]  # unfinished ones only
    total_recipients: int
    body: BodyRef | None  # read it with Spool.read_body()
    source: SourceRef | None  # or re-render it from this input row
    meta: dict[str, Any]


@dataclass(slots=True)
class RecoveryReport:
    records: int = 0  # good records read
    messages: int = 0  # unfinished messages returned
    recipients: int = 0  # unfinished recipients returned
    deferred: int = 0  # of which with a deferred state (keep their schedule)
    inputs: int = 0
    journal_bytes: int = 0
    skipped_bytes: int = 0  # damaged bytes stepped over
    damaged_regions: list[tuple[int, int]] = field(default_factory=list)  # (offset, length)
    torn_tail_bytes: int = 0  # part of skipped_bytes: the end of the journal (a crash mid-write)
    undecodable: int = 0  # frames whose checksum matched but whose content did not decode
    orphan_records: int = 0  # state records for messages not in the journal (already compacted away)
    missing_bodies: list[str] = field(default_factory=list)  # message ids whose body segment is gone
    rewritten: bool = False  # the journal was rewritten (compacted) at open
    seconds: float = 0.0

    @property
    def damaged(self) -> bool:
        return bool(self.skipped_bytes or self.undecodable or self.missing_bodies)

    def __str__(self) -> str:
        text = (
            f"{self.records} records, {self.messages} unfinished messages "
            f"({self.recipients} recipients, {self.deferred} deferred) in {self.seconds:.2f}s"
        )
        if self.skipped_bytes:
            text += (
                f"; skipped {self.skipped_bytes} damaged bytes in {len(self.damaged_regions)} region(s)"
                f" (torn tail {self.torn_tail_bytes} bytes)"
            )
        if self.undecodable:
            text += f"; {self.undecodable} undecodable records"
        if self.missing_bodies:
            text += f"; {len(self.missing_bodies)} message(s) lost their body"
        return text


# --- replay ----------------------------------------------------------------------------


class PendingMessage:
    """An unfinished message during replay: its Add record and its recipients' latest states."""

    __slots__ = ("add", "remaining", "states")

    def __init__(self, add: AddRecord) -> None:
        self.add = add
        self.states: list[StateRecord | None] | None = None  # allocated on the first state record
        self.remaining = len(add.rcpts)


class LiveState:
    """The live state of a journal prefix: unfinished messages and inputs."""

    __slots__ = ("inputs", "msgs", "orphans", "scan", "undecodable")

    def __init__(self) -> None:
        self.msgs: dict[str, PendingMessage] = {}
        self.inputs: dict[int, InputState] = {}
        self.scan = ScanReport()
        self.undecodable = 0
        self.orphans = 0


def replay(path: Path, stop: int | None = None) -> LiveState:
    """Replay the journal at *path* (up to *stop*) into live state.

    Memory is bounded by the unfinished work (plus one read chunk): a message
    is dropped as soon as its last recipient is final.
    """
    st = LiveState()
    msgs = st.msgs
    inputs = st.inputs
    decode = record_decoder.decode
    with open(path, "rb", buffering=0) as f:
        for _off, payload in scan(f, st.scan, 0, stop):
            try:
                rec = decode(payload)
            except (msgspec.DecodeError, msgspec.ValidationError):
                st.undecodable += 1
                continue
            # Most common first: a journal is mostly state records, then adds.
            if isinstance(rec, StateRecord):
                m = msgs.get(rec.id)
                if m is None or not 0 <= rec.idx < len(m.add.rcpts):
                    st.orphans += 1
                    continue
                states = m.states
                if states is None:
                    if rec.status != DEFERRED_CODE and m.remaining == 1 and len(m.add.rcpts) == 1:
                        del msgs[rec.id]  # the common campaign case: one recipient, now final
                        continue
                    states = m.states = [None] * len(m.add.rcpts)
                prev = states[rec.idx]
                if prev is not None and prev.status != DEFERRED_CODE:
                    continue  # already final: a duplicate
                states[rec.idx] = rec
                if rec.status != DEFERRED_CODE:
                    m.remaining -= 1
                    if m.remaining <= 0:
                        del msgs[rec.id]
            elif isinstance(rec, AddRecord):
                if rec.id not in msgs:
                    msgs[rec.id] = PendingMessage(rec)
                    src = rec.src
                    if src is not None:
                        inp = inputs.get(src.input)
                        if inp is not None and inp.row <= src.row:
                            inp.row = src.row + 1
            elif isinstance(rec, InputRecord):
                old = inputs.get(rec.iid)
                row = rec.row
                if old is not None and old.fingerprint == rec.fp:
                    row = max(row, old.row)  # progress only moves forward
                inputs[rec.iid] = InputState(rec.iid, rec.key, rec.fp, row, rec.done)
            elif isinstance(rec, DropRecord):
                msgs.pop(rec.id, None)
            else:  # ForgetRecord
                inputs.pop(rec.iid, None)
    return st


def replay_at_open(path: Path, segments_on_disk: set[int]) -> tuple[LiveState, RecoveryReport]:
    """Replay the whole journal (if there is one) and report what was read, skipped and lost.

    A message whose body segment is not in *segments_on_disk* cannot be sent
    again: it is dropped from the state and named in the report.
    """
    st = replay(path) if path.exists() else LiveState()
    report = RecoveryReport(
        records=st.scan.frames,
        journal_bytes=st.scan.bytes_scanned,
        skipped_bytes=st.scan.skipped_bytes,
        damaged_regions=list(st.scan.damaged_regions),
        torn_tail_bytes=st.scan.torn_tail,
        undecodable=st.undecodable,
        orphan_records=st.orphans,
    )
    for mid, m in list(st.msgs.items()):
        if m.add.body is not None and m.add.body.seg not in segments_on_disk:
            report.missing_bodies.append(mid)
            del st.msgs[mid]
    return st, report


def live_frames(st: LiveState) -> Iterable[bytes]:
    """The records that reproduce *st*: inputs still needed, then each live message."""
    referenced = {m.add.src.input for m in st.msgs.values() if m.add.src is not None}
    latest: dict[str, int] = {}
    for inp in st.inputs.values():
        if latest.get(inp.key, -1) < inp.id:
            latest[inp.key] = inp.id
    keep = referenced | set(latest.values())
    enc = record_encoder.encode
    for inp in st.inputs.values():
        if inp.id in keep:
            yield frame(enc(inp.record()))
    for m in st.msgs.values():
        yield frame(enc(m.add))
        if m.states is not None:
            for s in m.states:
                if s is not None:
                    yield frame(enc(s))
