"""Replaying the spool journal into the live state it describes, and what recovery returns.

Two users: opening a spool (every unfinished message comes back, as a
:class:`RecoveredMessage`, with a :class:`RecoveryReport` of what was read,
skipped and lost) and compaction (the live state is written back as a short
journal by :func:`live_frames`).

Replay never fails on damaged bytes: a frame with one flipped bit is
repaired by the scanner (:mod:`fastmta.queue.journal`), other damaged or torn
frames are stepped over, and state records for messages
no longer in the journal (compacted away as finished) are counted as orphans
and ignored. What a damaged frame held is read back for the report
(:mod:`fastmta.queue.salvage`): a message lost with it is named in
:attr:`RecoveryReport.lost`, never dropped silently.

What replay refuses (:class:`~fastmta.queue.spool_errors.SpoolFormatError`)
is a record whose checksum is good but that this code cannot read: a format
version above :data:`~fastmta.queue.journal_records.JOURNAL_VERSION`, a
record kind it does not know, or fields it does not expect. That is not
damage but a newer fastmta's journal, and skipping it would lose what it says.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from fastmta.keyset import KeySet
from fastmta.queue.journal import HEADER_SIZE, ScanReport, frame, scan
from fastmta.queue.journal_records import (
    DEFERRED_CODE,
    JOURNAL_VERSION,
    RECORD_TAGS,
    TAKEN_KEYS_PER_RECORD,
    AddRecord,
    BodyRef,
    DropRecord,
    HeaderRecord,
    InputRecord,
    InputState,
    PrefixEnd,
    SourceRef,
    StateRecord,
    TakenRecord,
    record_decoder,
    record_encoder,
)
from fastmta.queue.records import Status
from fastmta.queue.salvage import Salvaged, salvage_regions
from fastmta.queue.spool_errors import JournalReset, ProgressDamaged, SpoolFormatError

__all__ = [
    "PREFIX_END",
    "LiveState",
    "LostMessage",
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
class LostMessage:
    """A message the spool had accepted and can no longer send: report it, account for it.

    *id* is None when the damaged bytes do not say which message it was (then
    *recipients* is empty, and one entry may stand for several messages).
    *recipients* are the ones not final yet (all of them if unknown).
    """

    id: str | None
    recipients: list[str]
    meta: dict[str, Any]  # the Add record's meta (names the input or job), {} if unreadable
    reason: str
    offset: int | None = None  # journal offset of the damaged record, if that is the cause


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
    undecodable: int = 0  # always 0 now: a good frame that does not decode refuses the open (SpoolFormatError)
    orphan_records: int = 0  # state records for messages not in the journal (already compacted away)
    missing_bodies: list[str] = field(default_factory=list)  # message ids whose body segment is gone
    lost: list[LostMessage] = field(default_factory=list)  # accepted messages that cannot be sent
    damaged_records: list[tuple[int, str]] = field(default_factory=list)  # (offset, record kind) skipped
    #: (offset, where) of records read after undoing one flipped bit, confirmed by their checksum.
    repaired: list[tuple[int, str]] = field(default_factory=list)
    #: Damaged records that said which input rows were taken (or may have): reading those inputs
    #: again would send rows a second time. Opening refuses (ProgressDamaged) unless told to accept.
    lost_progress: list[str] = field(default_factory=list)
    rebuilt: list[str] = field(default_factory=list)  # keys of inputs rebuilt from a damaged record's readable id
    version: int = 1  # the journal's format version (1 if it has no header)
    reset: str = ""  # the journal looked reset beside stored bodies, and the open was told to accept it
    rewritten: bool = False  # the journal was rewritten (compacted) at open
    seconds: float = 0.0

    @property
    def damaged(self) -> bool:
        return bool(
            self.skipped_bytes or self.repaired or self.undecodable or self.missing_bodies or self.lost or self.reset
        )

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
        if self.repaired:
            where = ", ".join(f"{what} at offset {off}" for off, what in self.repaired[:5])
            more = f" and {len(self.repaired) - 5} more" if len(self.repaired) > 5 else ""
            text += (
                f"; repaired {len(self.repaired)} record(s) (one flipped bit, or a damaged marker or length),"
                f" confirmed by their checksum ({where}{more})"
            )
        if self.undecodable:
            text += f"; {self.undecodable} undecodable records"
        if self.missing_bodies:
            text += f"; {len(self.missing_bodies)} message(s) lost their body"
        if self.reset:
            text += f"; {self.reset}"
        if self.rebuilt:
            text += f"; input(s) {', '.join(map(repr, self.rebuilt[:5]))} rebuilt from a damaged record: read again"
            text += " from the first row, skipping the rows recorded as taken"
        if self.lost_progress:
            text += f"; input progress lost (rows it said were taken may be sent again): {_some(self.lost_progress)}"
        if self.lost:
            names = ", ".join(m.id or f"unknown message at journal offset {m.offset}" for m in self.lost[:5])
            more = f" and {len(self.lost) - 5} more" if len(self.lost) > 5 else ""
            text += f"; LOST {len(self.lost)} message(s): {names}{more}"
        return text


# --- replay ----------------------------------------------------------------------------

#: The frame that ends every rewrite (see PrefixEnd).
PREFIX_END = frame(record_encoder.encode(PrefixEnd()))


class PendingMessage:
    """An unfinished message during replay: its Add record and its recipients' latest states."""

    __slots__ = ("add", "remaining", "states")

    def __init__(self, add: AddRecord) -> None:
        self.add = add
        self.states: list[StateRecord | None] | None = None  # allocated on the first state record
        self.remaining = len(add.rcpts)


class LiveState:
    """The live state of a journal prefix: unfinished messages and inputs."""

    __slots__ = (
        "by_key", "inputs", "msgs", "orphan_keys", "orphan_taken", "orphans", "prefix_ended", "prefix_regions", "scan",
        "strays", "undecodable", "version",
    )  # fmt: skip

    def __init__(self) -> None:
        self.msgs: dict[str, PendingMessage] = {}
        self.inputs: dict[int, InputState] = {}
        self.by_key: dict[str, InputState] = {}  # the latest state of each input key
        self.scan = ScanReport()
        self.undecodable = 0
        self.orphans = 0
        self.version = 1  # no header: written before the journal had one
        # After damage: ids of orphan records -> their final recipient indices
        # (None: dropped). They name messages whose Add record was damaged.
        self.strays: dict[str, set[int] | None] = {}
        # Rows taken (by a TakenRecord or a message's InputTake) of inputs without a record of their
        # own, by input id: after damage, the input's record may be the lost one (see _progress_damage).
        self.orphan_keys: dict[int, KeySet] = {}
        self.orphan_taken: set[int] = set()  # ids of those named by a TakenRecord (never legitimately orphan)
        # Damaged regions before the first message record: the inputs' records of a compacted journal
        # (the only place TakenRecords are ever written). -1: no message record seen yet.
        self.prefix_regions = -1
        self.prefix_ended = False  # a PrefixEnd was read (format 3: every whole journal has one)


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
        for off, payload in scan(f, st.scan, 0, stop):
            try:
                rec = decode(payload)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                repaired = st.scan.repaired
                if repaired and repaired[-1][0] == off:
                    # A "repair" that reads as no record: more than one bit was
                    # damaged after all. Damage, like any other.
                    repaired.pop()
                    st.scan.damaged_regions.append((off, HEADER_SIZE + len(payload)))
                    st.scan.frames -= 1
                    continue
                raise _unreadable(path, off, payload, exc) from None
            # Most common first: a journal is mostly state records, then adds.
            if isinstance(rec, StateRecord):
                m = msgs.get(rec.id)
                if m is None or not 0 <= rec.idx < len(m.add.rcpts):
                    st.orphans += 1
                    if m is None and st.scan.damaged_regions:
                        _stray(st, rec)
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
                if st.prefix_regions < 0:
                    st.prefix_regions = len(st.scan.damaged_regions)
                if rec.id not in msgs:
                    msgs[rec.id] = PendingMessage(rec)
                    src = rec.src
                    if src is not None:
                        inp = inputs.get(src.input)
                        if inp is not None and inp.row <= src.row:
                            inp.row = src.row + 1
                # Taken even if the message is already gone (a duplicate Add
                # of a finished one): the row must never be read again.
                take = rec.take
                if take is not None:
                    inp = inputs.get(take.input)
                    if inp is None:
                        st.orphan_keys.setdefault(take.input, KeySet()).add(take.key)
                    else:
                        inp.taken.add(take.key)
            elif isinstance(rec, InputRecord):
                old = inputs.get(rec.iid)
                row = rec.row
                if old is not None and old.fingerprint == rec.fp:
                    row = max(row, old.row)  # progress only moves forward
                # Every state of one input key shares one set of taken keys:
                # an edited input (new fingerprint, new id) keeps what its
                # earlier versions took.
                same_key = old if old is not None else st.by_key.get(rec.key)
                state = InputState(rec.iid, rec.key, rec.fp, row, rec.done)
                if same_key is not None:
                    state.taken = same_key.taken
                if st.orphan_keys and (early := st.orphan_keys.pop(rec.iid, None)) is not None:
                    # Rows it took before this record, after its first one was damaged: still its own.
                    state.taken.update_from_bytes(early.to_bytes())
                    st.orphan_taken.discard(rec.iid)
                inputs[rec.iid] = state
                st.by_key[rec.key] = state
            elif isinstance(rec, DropRecord):
                if msgs.pop(rec.id, None) is None and st.scan.damaged_regions:
                    st.strays[rec.id] = None
            elif isinstance(rec, TakenRecord):
                inp = inputs.get(rec.iid)
                if inp is None:
                    st.orphan_keys.setdefault(rec.iid, KeySet()).update_from_bytes(rec.keys)
                    st.orphan_taken.add(rec.iid)
                else:
                    inp.taken.update_from_bytes(rec.keys)
            elif isinstance(rec, PrefixEnd):
                st.prefix_ended = True
                if st.prefix_regions < 0:
                    st.prefix_regions = len(st.scan.damaged_regions)
            elif isinstance(rec, HeaderRecord):
                if rec.version > JOURNAL_VERSION:
                    raise _newer(path, rec.version)
                st.version = rec.version
            else:  # ForgetRecord
                gone = inputs.pop(rec.iid, None)
                if gone is not None and st.by_key.get(gone.key) is gone:
                    del st.by_key[gone.key]
    return st


def _stray(st: LiveState, rec: StateRecord) -> None:
    """A state record, after damage, for a message replay does not know: maybe its Add was damaged."""
    finals = st.strays.get(rec.id, set())
    if finals is None:
        return  # dropped already
    if rec.status != DEFERRED_CODE:
        finals.add(rec.idx)
    st.strays[rec.id] = finals


def _newer(path: Path, version: int) -> SpoolFormatError:
    return SpoolFormatError(
        f"{path}: written by a newer fastmta: version {version} (this one reads up to version"
        f" {JOURNAL_VERSION}); left untouched: open it with that fastmta"
    )


def _unreadable(path: Path, off: int, payload: bytes, exc: Exception) -> SpoolFormatError:
    """The error for a record whose checksum is good but that does not decode: a newer format."""
    obj: Any
    try:
        obj = msgspec.msgpack.decode(payload)
    except msgspec.DecodeError:
        obj = None
    items = obj if isinstance(obj, list) else []
    tag = items[0] if items else None
    if tag == 0 and len(items) > 1 and isinstance(items[1], int) and items[1] > JOURNAL_VERSION:
        return _newer(path, items[1])  # a header of another shape, from a newer version
    if isinstance(tag, int) and tag not in RECORD_TAGS:
        what = f"a record of a kind this fastmta does not know (tag {tag})"
    elif isinstance(tag, int):
        what = f"a {RECORD_TAGS[tag]} this fastmta cannot read ({exc})"
    else:
        what = f"a record this fastmta cannot read ({exc})"
    return SpoolFormatError(
        f"{path}: {what} at offset {off}, its checksum good: written by a newer fastmta?"
        " Left untouched: open it with the fastmta that wrote it"
    )


def replay_at_open(
    path: Path,
    segments_on_disk: set[int],
    segment_bytes: Callable[[], int] | None = None,
    accept_reset: bool = False,
    accept_lost_progress: bool = False,
) -> tuple[LiveState, RecoveryReport]:
    """Replay the whole journal (if there is one) and report what was read, skipped and lost.

    A message whose body segment is not in *segments_on_disk* cannot be sent
    again: it is dropped from the state and named in the report, as is every
    message whose Add record was damaged (as far as the damaged bytes say).

    A journal that is missing, empty or without one valid record while body
    segments hold data (*segment_bytes*: their total size) looks reset:
    starting over would lose those messages, or send them again. That raises
    JournalReset (a SpoolError), unless *accept_reset*: then it is noted in
    the report (and the bodies are deleted as unreferenced). Raises
    SpoolFormatError for a journal of a newer format.

    Damage beyond repair to a record of what an input had taken (or bytes
    that may have been one) raises ProgressDamaged, unless
    *accept_lost_progress*: a message lost is one message, but an input's
    progress lost means its rows are read, and sent, again. Each error
    leaves the journal untouched.
    """
    exists = path.exists()
    st = replay(path) if exists else LiveState()
    report = RecoveryReport(
        records=st.scan.frames,
        journal_bytes=st.scan.bytes_scanned,
        skipped_bytes=st.scan.skipped_bytes,
        damaged_regions=list(st.scan.damaged_regions),
        repaired=list(st.scan.repaired),
        torn_tail_bytes=st.scan.torn_tail,
        undecodable=st.undecodable,
        orphan_records=st.orphans,
        # An empty or missing journal is started afresh in this code's format.
        version=st.version if st.scan.frames else JOURNAL_VERSION,
    )
    if st.scan.frames == 0 and segments_on_disk and segment_bytes is not None:
        _check_reset(path, exists, st, report, len(segments_on_disk), segment_bytes(), accept_reset)
    for mid, m in list(st.msgs.items()):
        body = m.add.body
        if body is not None and body.seg not in segments_on_disk:
            report.missing_bodies.append(mid)
            report.lost.append(
                LostMessage(mid, _unfinished(m), m.add.meta or {}, f"its body segment {body.seg} is missing")
            )
            del st.msgs[mid]
    if st.scan.damaged_regions and exists:
        _damaged_records(path, st, report)
    if exists and not st.scan.frames and not report.reset:
        _cut_short(st, report)  # a journal is created whole (renamed into place): none without a frame
    elif st.version >= 3 and st.scan.frames and not st.prefix_ended and not st.scan.middle_damage:
        _cut_short(st, report)  # (with damage in the middle, the PrefixEnd may be what was damaged)
    if report.lost_progress and not accept_lost_progress:
        # Accepted, nothing is reset: an input whose own record stands goes on from where it says (its
        # lost rows taken matter only if it is read again, edited); one whose record is lost is read as
        # new. (`fastmta send --reread-inputs` reads every input again, for the rows of lost messages.)
        raise ProgressDamaged(
            f"{path}: damaged beyond repair where it recorded what was taken from the inputs:"
            f" {_some(report.lost_progress)}. Reading the inputs now could send rows already sent a second"
            " time. Left untouched: restore the queue directory, or accept the lost progress (the rows no"
            " longer recorded as taken are sent again if their input is read again)"
        )
    return st, report


def _cut_short(st: LiveState, report: RecoveryReport) -> None:
    """The journal ends inside what its last rewrite wrote whole: cut short, not a crash. Say what is lost."""
    at = st.scan.good_end
    why = f"the journal is cut short at offset {at}, inside what its last rewrite wrote whole (not a crash)"
    report.lost.append(LostMessage(None, [], {}, f"{why}: the messages recorded after it are lost", at))
    # What inputs there were may be among what is lost (a cut right after the header): always refused.
    report.lost_progress.append(f"{why}: the inputs and rows taken recorded after it are lost")


def _some(items: list[str], n: int = 5) -> str:
    """The first *n* of *items*, and how many more."""
    more = f"; and {len(items) - n} more" if len(items) > n else ""
    return "; ".join(items[:n]) + more


def _unfinished(m: PendingMessage) -> list[str]:
    states = m.states
    if states is None:
        return list(m.add.rcpts)
    return [r for r, s in zip(m.add.rcpts, states, strict=True) if s is None or s.status == DEFERRED_CODE]


def _check_reset(
    path: Path, exists: bool, st: LiveState, report: RecoveryReport, segs: int, nbytes: int, accept: bool
) -> None:
    if not nbytes:
        return  # empty segment files hold no body
    size = st.scan.bytes_scanned
    what = "missing" if not exists else "empty" if not size else f"{size} bytes without one valid record"
    text = (
        f"the journal {path} is {what}, but {path.parent / 'data'} holds {segs} body segment(s)"
        f" ({nbytes} bytes) of messages it no longer names"
    )
    if not accept:
        raise JournalReset(
            f"{text}: it looks reset, and starting over would lose or resend those messages."
            " Restore the journal, or open the spool accepting the reset (the bodies are then deleted)"
        )
    report.reset = f"journal reset accepted: {text}"
    report.lost.append(
        LostMessage(None, [], {}, f"journal reset accepted: {segs} body segment(s), {nbytes} bytes, deleted unread")
    )


def _damaged_records(path: Path, st: LiveState, report: RecoveryReport) -> None:
    """Name the messages lost with damaged records: as far as the bytes say, and by their later records."""
    strays = st.strays
    unknown: list[int] = []
    named: set[str] = set()
    salvaged = [sv for sv in salvage_regions(path, st.scan.damaged_regions, st.scan.torn_tail) if sv.kind != "torn"]
    _progress_damage(st, salvaged, report)  # torn: an append a crash cut short, never acknowledged
    for sv in salvaged:
        report.damaged_records.append((sv.offset, sv.kind))
        if sv.kind == "unknown" and sv.several:
            # Not paired with the messages later records name (below): it may
            # have held any number of records, of those messages or others.
            why = (
                f"{sv.size} unreadable bytes at journal offset {sv.offset} (records whose frame markers are"
                " damaged too): the message of any Add record among them is lost"
            )
            report.lost.append(LostMessage(None, [], {}, why, sv.offset))
            continue
        if sv.kind == "unknown" and sv.id is None:
            unknown.append(sv.offset)
            continue
        if sv.kind != "AddRecord" and not (sv.kind == "unknown" and sv.id in strays):
            continue  # a state (retried), an input's progress, a drop (sent again): nothing lost
        mid = sv.id
        if mid is not None and mid in st.msgs:
            continue
        if mid is not None:
            named.add(mid)
            if mid in strays and strays[mid] is None:
                continue  # dropped later
        finals = (strays.get(mid) or set()) if mid is not None else set()
        rcpts = [r for i, r in enumerate(sv.rcpts or []) if i not in finals]
        if sv.rcpts and not rcpts:
            continue  # every recipient final already: nothing left to lose
        how = (
            "its checksum confirms what is reported"
            if sv.verified
            else "read whole, unconfirmed: values may be wrong"
            if sv.exact
            else "read in part: values may be wrong"
        )
        why = f"its Add record at journal offset {sv.offset} is damaged ({how})"
        report.lost.append(LostMessage(mid, rcpts, sv.meta or {}, why, sv.offset))
    # Later records of messages whose Add record did not say who it was.
    left = [mid for mid, finals in strays.items() if finals is not None and mid not in named]
    first = unknown[0] if unknown else None
    for mid in left:
        where = "" if first is None else f" at journal offset {first}"
        final = sorted(strays[mid] or ())
        done = f"; recipient(s) #{', #'.join(map(str, final))} final already" if final else ""
        why = f"its Add record is damaged and unreadable{where} (later records name it{done})"
        report.lost.append(LostMessage(mid, [], {}, why, first))
    for off in unknown[len(left) :]:  # each of the others may be one of the messages just named
        why = f"an unreadable damaged record at journal offset {off}: if it was an Add record, its message is lost"
        report.lost.append(LostMessage(None, [], {}, why, off))


def _progress_damage(st: LiveState, salvaged: list[Salvaged], report: RecoveryReport) -> None:
    """Note the damaged records that lost rows an input had taken (reading it again would resend them).

    Not every damaged input record loses anything: progress records are
    written again and again, and the rows taken are kept by the messages'
    own records and by TakenRecords, which are only ever written among the
    inputs' records at the head of a compacted journal. What is lost: a
    TakenRecord (damaged, or unreadable bytes among the inputs' records),
    or an input's only record, when something says it had taken rows. If the
    damaged record still says which input it was (its id and key, confirmed
    by its checksum), the input is rebuilt from the rows it is still known to
    have taken: read again from its first row, nothing is sent twice.
    """
    regions = st.scan.damaged_regions
    in_prefix = len(regions) if st.prefix_regions < 0 else st.prefix_regions
    in_prefix = min(in_prefix, len(regions) - (1 if st.scan.torn_tail else 0))  # a crash's tail is no part of it
    prefix_end = regions[in_prefix - 1][0] + regions[in_prefix - 1][1] if in_prefix else -1
    lost = report.lost_progress
    for sv in salvaged:
        if sv.kind == "TakenRecord":
            inp = st.inputs.get(sv.iid) if sv.iid is not None else None
            lost.append(f"rows taken by input {_input_name(inp.key if inp else None, sv.iid)} (offset {sv.offset})")
        elif sv.kind == "InputRecord" and (sv.iid is None or sv.iid not in st.inputs):
            if sv.verified and sv.iid is not None and sv.key is not None:  # an unconfirmed key may be wrong
                _rebuild_input(st, sv.iid, sv.key)
                report.rebuilt.append(sv.key)
            elif sv.iid in st.orphan_keys or (sv.iid is None and st.orphan_keys) or sv.iid in st.orphan_taken:
                lost.append(f"the record of input {_input_name(None, sv.iid)} (offset {sv.offset})")
        elif sv.kind == "unknown" and sv.offset < prefix_end and (st.inputs or st.orphan_keys):
            lost.append(f"unreadable bytes among the inputs' records (offset {sv.offset}): maybe rows taken")
        elif sv.kind == "unknown" and st.orphan_keys.keys() - st.inputs.keys():
            # Rows taken by an input without a record of its own: these bytes may have been it.
            ids = ", ".join(f"#{i}" for i in sorted(st.orphan_keys.keys() - st.inputs.keys())[:5])
            lost.append(f"unreadable bytes at offset {sv.offset}: maybe the record of input {ids}, rows taken by it")
    for iid in sorted(st.orphan_taken - st.inputs.keys()):
        lost.append(f"the record of input #{iid}, whose rows taken are kept but not whose they are")


def _input_name(key: str | None, iid: int | None) -> str:
    return repr(key) if key else f"#{iid}" if iid is not None else "(unreadable)"


def _rebuild_input(st: LiveState, iid: int, key: str) -> None:
    """Input *iid* (*key*) from the rows it is still known to have taken: read again from row 0, those skipped."""
    keys = st.orphan_keys.pop(iid, KeySet())
    st.orphan_taken.discard(iid)
    same = st.by_key.get(key)
    if same is not None:  # another version of it stands: the versions of one key share their rows taken
        same.taken.update_from_bytes(keys.to_bytes())
        return
    state = InputState(iid, key, "", 0, False)  # no fingerprint: every row is read, the taken ones skipped
    state.taken = keys
    st.inputs[iid] = state
    st.by_key[key] = state


def live_frames(st: LiveState) -> Iterable[bytes]:
    """The records that reproduce *st*: inputs still needed, then each live message."""
    # Every input a live message refers to keeps its record (an input's
    # record is written before any record that refers to it, so one missing
    # is damage: see _progress_damage).
    referenced = {m.add.src.input for m in st.msgs.values() if m.add.src is not None}
    referenced |= {m.add.take.input for m in st.msgs.values() if m.add.take is not None}
    latest: dict[str, int] = {}
    for inp in st.inputs.values():
        if latest.get(inp.key, -1) < inp.id:
            latest[inp.key] = inp.id
    keep = referenced | set(latest.values())
    enc = record_encoder.encode
    yield frame(enc(HeaderRecord(JOURNAL_VERSION)))
    for inp in st.inputs.values():
        if inp.id in keep:
            yield frame(enc(inp.record()))
            if inp.id == latest.get(inp.key) and len(inp.taken):
                yield from (frame(enc(TakenRecord(inp.id, keys))) for keys in inp.taken.chunks(TAKEN_KEYS_PER_RECORD))
    for m in st.msgs.values():
        yield frame(enc(m.add))
        if m.states is not None:
            for s in m.states:
                if s is not None:
                    yield frame(enc(s))
    yield PREFIX_END
