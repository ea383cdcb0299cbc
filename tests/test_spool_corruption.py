"""Corruption never means silent loss: damaged records and bodies name the messages lost,
a journal that looks reset beside stored bodies is refused, a newer format is refused untouched."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import shutil
import warnings
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest

from fastmta.queue.journal import MAGIC, ScanReport, frame, scan
from fastmta.queue.journal_records import (
    JOURNAL_VERSION,
    AddRecord,
    HeaderRecord,
    PrefixEnd,
    StateRecord,
    record_decoder,
    record_encoder,
)
from fastmta.queue.records import Status
from fastmta.queue.recovery import LostMessage
from fastmta.queue.spool import Spool
from fastmta.queue.spool_errors import BodyDamaged, JournalReset, SpoolError, SpoolFormatError, SpoolRecoveryWarning

T = TypeVar("T")
Run = Callable[[Coroutine[Any, Any, T]], T]


def _nofsync(fd: int) -> None:
    pass


def _open(path: Path, **kw: Any) -> tuple[Spool, list[str]]:
    """Open quietly; return the spool and the texts of the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spool = Spool(path, fsync=_nofsync, **kw)
    return spool, [str(w.message) for w in caught if w.category is SpoolRecoveryWarning]


def _frames(journal: bytes) -> list[tuple[int, int, Any]]:
    """(start, end, record) of every frame of an undamaged journal."""
    report = ScanReport()
    out = [
        (off, off + 12 + len(p), record_decoder.decode(p))
        for off, p in scan(io.BytesIO(journal), report)  # type: ignore[arg-type]
    ]
    assert not report.damaged
    return out


META = {"job": "jobs/a.toml", "row": 0}


@pytest.fixture
def built(tmp_path: Path) -> Path:
    """m0..m4, two recipients each: m1 finished, m3 with one deferred recipient, the others untried."""
    src = tmp_path / "src"
    spool = Spool(src, fsync=_nofsync)
    for i in range(5):
        meta = {**META, "row": i}
        spool.add_message_sync(
            f"m{i}", "s@a.example", [f"a{i}@x.example", f"b{i}@y.example"], b"body %d" % i, meta=meta, flush=False
        )
    spool.flush_sync()
    spool.record("m1", 0, Status.DELIVERED)
    spool.record("m1", 1, Status.BOUNCED)
    spool.record("m3", 1, Status.DEFERRED, attempts=1, next_attempt=5.0)
    spool.close_sync()
    return src


def _copy(src: Path, dst: Path, journal: bytes | None) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src / "data", dst / "data")
    if journal is not None:
        (dst / "journal").write_bytes(journal)
    return dst


@pytest.fixture(autouse=True)
def _quiet_logger() -> Any:
    # Hundreds of opens with damage: keep the (asserted-on) warnings, not the log noise.
    logger = logging.getLogger("fastmta.queue.spool")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)


# --- damaged journal records: the lost message is named --------------------------------


def test_a_flipped_bit_anywhere_in_an_add_record_is_repaired(built: Path, tmp_path: Path) -> None:
    journal = (built / "journal").read_bytes()
    adds = [(a, b, r) for a, b, r in _frames(journal) if isinstance(r, AddRecord)]
    assert [r.id for _, _, r in adds] == ["m0", "m1", "m2", "m3", "m4"]
    for start, end, rec in adds:
        for pos in range(start, end):
            damaged = bytearray(journal)
            damaged[pos] ^= 1 << (pos % 8)
            spool, texts = _open(_copy(built, tmp_path / "dst", bytes(damaged)))
            recovered = {m.id: m for m in spool.take_recovered()}
            assert set(recovered) == {"m0", "m2", "m3", "m4"}, pos
            if rec.id != "m1":
                m = recovered[rec.id]
                assert ([r.address for r in m.recipients], m.meta) == (rec.rcpts, rec.meta), pos
                assert m.body is not None and spool.read_body(m.body, m.id) == b"body %d" % int(rec.id[1])
            assert spool.report.lost == [] and [o for o, _ in spool.report.repaired] == [start], pos
            assert len(texts) == 1 and "repaired 1 record(s) (one flipped bit" in texts[0] and "LOST" not in texts[0]
            spool.close_sync()


def _beyond_id(start: int, end: int) -> range:
    """Positions of an Add record's payload after its message id (fixarray, tag, "mN")."""
    return range(start + 12 + 5, end)


def test_two_flipped_bits_in_an_add_record_name_the_lost_message(built: Path, tmp_path: Path) -> None:
    journal = (built / "journal").read_bytes()
    adds = [(a, b, r) for a, b, r in _frames(journal) if isinstance(r, AddRecord)]
    for start, end, rec in adds:
        for pos in _beyond_id(start, end):
            damaged = bytearray(journal)
            damaged[pos] ^= 0x41
            spool, texts = _open(_copy(built, tmp_path / "dst", bytes(damaged)))
            recovered = {m.id for m in spool.take_recovered()}
            assert rec.id not in recovered, pos
            lost = spool.report.lost
            if rec.id == "m1":  # finished: losing its record loses nothing (or, read in part, may have)
                assert [(m.id, m.recipients) for m in lost] in ([], [("m1", [])]), pos
            else:
                assert [(m.id, m.offset) for m in lost] == [(rec.id, start)], pos
                assert "damaged" in lost[0].reason
                assert len(texts) == 1 and f"LOST 1 message(s): {rec.id}" in texts[0], pos
            assert recovered == {"m0", "m2", "m3", "m4"} - {rec.id}, pos
            spool.close_sync()


def test_damage_in_the_last_record_is_damage_not_a_torn_write(built: Path, tmp_path: Path) -> None:
    journal = (built / "journal").read_bytes()
    [(start, end)] = [(a, b) for a, b, r in _frames(journal) if isinstance(r, AddRecord) and r.id == "m4"]
    journal = journal[:end]  # m4's Add is the last record, complete (its add was acknowledged)
    for pos in _beyond_id(start, end):
        damaged = bytearray(journal)
        damaged[pos] ^= 0x90
        spool, _ = _open(_copy(built, tmp_path / "dst", bytes(damaged)))
        assert [m.id for m in spool.report.lost] == ["m4"], pos
        spool.close_sync()
    # Cut short instead (a crash in the middle of the append): never acknowledged, not a loss.
    for cut in range(start + 1, end, 7):
        spool, texts = _open(_copy(built, tmp_path / "dst", journal[:cut]))
        assert spool.report.torn_tail_bytes == cut - start and spool.report.lost == [], cut
        assert "LOST" not in texts[0]
        spool.close_sync()


def test_an_unreadable_add_record_is_reported_with_its_offset(built: Path, tmp_path: Path) -> None:
    journal = (built / "journal").read_bytes()
    frames = {r.id: (a, b) for a, b, r in _frames(journal) if isinstance(r, AddRecord)}
    # m0's record garbled beyond reading: an unknown message lost, at that offset.
    start, end = frames["m0"]
    damaged = bytearray(journal)
    damaged[start + 12 : end] = b"\xff" * (end - start - 12)
    spool, texts = _open(_copy(built, tmp_path / "dst", bytes(damaged)))
    assert {m.id for m in spool.take_recovered()} == {"m2", "m3", "m4"}
    [lost] = spool.report.lost
    assert (lost.id, lost.recipients, lost.offset) == (None, [], start)
    assert f"offset {start}" in lost.reason
    assert f"unknown message at journal offset {start}" in texts[0]
    spool.close_sync()
    # m3's record zeroed: its later state record still names it.
    start, end = frames["m3"]
    damaged = bytearray(journal)
    damaged[start + 12 : end] = bytes(end - start - 12)
    spool, texts = _open(_copy(built, tmp_path / "dst", bytes(damaged)))
    assert {m.id for m in spool.take_recovered()} == {"m0", "m2", "m4"}
    [lost] = spool.report.lost
    assert (lost.id, lost.offset) == ("m3", start)
    assert "LOST 1 message(s): m3" in texts[0]
    spool.close_sync()


def test_a_damaged_state_record_loses_nothing(built: Path, tmp_path: Path) -> None:
    journal = (built / "journal").read_bytes()
    [start] = [a for a, _, r in _frames(journal) if isinstance(r, StateRecord) and r.id == "m3"]
    damaged = bytearray(journal)
    damaged[start + 20] ^= 0x04
    spool, texts = _open(_copy(built, tmp_path / "dst", bytes(damaged)))  # one bit: repaired
    msgs = {m.id: m for m in spool.take_recovered()}
    assert [(r.status, r.attempts, r.next_attempt) for r in msgs["m3"].recipients] == [
        (None, 0, 0.0),
        (Status.DEFERRED, 1, 5.0),
    ]
    assert spool.report.repaired == [(start, "payload")] and spool.report.damaged_records == []
    spool.close_sync()
    damaged[start + 21] ^= 0x04  # and a second one
    spool, texts = _open(_copy(built, tmp_path / "dst", bytes(damaged)))
    msgs = {m.id: m for m in spool.take_recovered()}
    assert set(msgs) == {"m0", "m2", "m3", "m4"}
    assert [r.status for r in msgs["m3"].recipients] == [None, None]  # the deferred one is simply tried again
    assert spool.report.lost == []
    # (The last record, ending in zero bytes (its next attempt time): read as an append a crash cut short.)
    assert spool.report.skipped_bytes > 0 and spool.report.lost_progress == []
    assert len(texts) == 1 and "LOST" not in texts[0]
    spool.close_sync()


def test_a_missing_body_segment_names_the_message_recipients_and_meta(tmp_path: Path) -> None:
    spool = Spool(tmp_path, fsync=_nofsync, segment_size=100)
    for i in range(3):
        spool.add_message_sync(
            f"m{i}", "s@a.example", [f"r{i}@b.example", f"q{i}@b.example"], bytes(80), meta={"job": "j", "row": i}
        )
    spool.record("m1", 0, Status.DELIVERED)
    spool.close_sync()
    segs = sorted(os.listdir(tmp_path / "data"))
    os.unlink(tmp_path / "data" / segs[1])
    spool, _ = _open(tmp_path)
    assert spool.report.lost == [
        LostMessage("m1", ["q1@b.example"], {"job": "j", "row": 1}, f"its body segment {int(segs[1][:8])} is missing")
    ]
    spool.close_sync()


# --- damaged bodies: reading one raises BodyDamaged, and the message can be given up ------


def test_a_flipped_bit_in_a_body_raises_body_damaged_naming_the_message(tmp_path: Path, run: Run[None]) -> None:
    spool = Spool(tmp_path, fsync=_nofsync)
    ref = spool.add_message_sync("m", "s@a.example", ["a@b.example", "c@d.example"], b"the body", meta=META)
    spool.add_message_sync("ok", "s@a.example", ["e@f.example"], b"fine")
    spool.close_sync()
    assert ref is not None
    path = tmp_path / "data" / f"{ref.seg:08d}.dat"
    data = bytearray(path.read_bytes())
    data[ref.off + 12 + 3] ^= 0x03  # two bits (one is repaired: below)
    path.write_bytes(bytes(data))

    async def main() -> None:
        spool, _ = _open(tmp_path)
        msgs = {m.id: m for m in spool.take_recovered()}
        rec = msgs["m"]
        assert rec.body is not None
        with pytest.raises(BodyDamaged, match="message m") as caught:
            spool.read_body(rec.body, rec.id)
        assert caught.value.message_id == "m" and isinstance(caught.value, SpoolError)
        assert msgs["ok"].body is not None and spool.read_body(msgs["ok"].body, "ok") == b"fine"
        lost = spool.mark_lost(rec, str(caught.value))
        assert lost == LostMessage("m", ["a@b.example", "c@d.example"], META, str(caught.value))
        assert spool.report.lost == [lost] and not spool.is_live("m")
        await spool.close()

    run(main())
    spool, _ = _open(tmp_path)
    assert [m.id for m in spool.take_recovered()] == ["ok"]  # given up, not queued for ever
    spool.close_sync()


def test_a_flipped_bit_in_a_body_is_repaired(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spool = Spool(tmp_path, fsync=_nofsync)
    ref = spool.add_message_sync("m", "s@a.example", ["a@b.example"], b"the body")
    assert ref is not None
    path = tmp_path / "data" / f"{ref.seg:08d}.dat"
    clean = path.read_bytes()
    for pos, where in [(0, "marker"), (5, "length"), (10, "checksum"), (12 + 4, "payload")]:
        data = bytearray(clean)
        data[ref.off + pos] ^= 0x20
        path.write_bytes(bytes(data))
        with caplog.at_level(logging.WARNING, "fastmta.queue.spool"):
            caplog.clear()
            assert spool.read_body(ref, "m") == b"the body", where
        assert f"body of message m at {path} offset {ref.off}: repaired one flipped bit in its frame's {where}" in (
            caplog.text
        )
    spool.close_sync()


def test_a_body_cut_short_or_gone_raises_body_damaged(tmp_path: Path) -> None:
    spool = Spool(tmp_path, fsync=_nofsync)
    ref = spool.add_message_sync("m", "s@a.example", ["a@b.example"], b"the body")
    assert ref is not None
    path = tmp_path / "data" / f"{ref.seg:08d}.dat"
    os.truncate(path, path.stat().st_size - 2)
    with pytest.raises(BodyDamaged, match="cut short"):
        spool.read_body(ref, "m")
    spool.close_sync()
    spool = Spool(tmp_path, fsync=_nofsync)  # (the truncated segment is still there)
    [rec] = spool.take_recovered()
    os.unlink(path)
    assert rec.body is not None
    with pytest.raises(BodyDamaged, match="missing") as caught:
        spool.read_body(rec.body)
    assert caught.value.message_id is None
    spool.close_sync()


# --- a journal that looks reset beside stored bodies -----------------------------------------


@pytest.mark.parametrize("journal", [b"", None, b"\x00" * 500], ids=["empty", "missing", "no-valid-record"])
def test_a_reset_journal_beside_bodies_is_refused(built: Path, tmp_path: Path, journal: bytes | None) -> None:
    dst = _copy(built, tmp_path / "dst", journal)
    segs = sorted(os.listdir(dst / "data"))
    nbytes = sum((dst / "data" / s).stat().st_size for s in segs)
    with pytest.raises(JournalReset) as caught:
        Spool(dst, fsync=_nofsync)
    text = str(caught.value)
    assert isinstance(caught.value, SpoolError)
    assert str(dst / "journal") in text and f"{len(segs)} body segment(s) ({nbytes} bytes)" in text
    # Nothing was touched: the bodies are there for whoever restores the journal.
    assert sorted(os.listdir(dst / "data")) == segs
    if journal is None:
        assert not (dst / "journal").exists()
    else:
        assert (dst / "journal").read_bytes() == journal
    # Told to accept the reset: it opens, warns, and says what it discarded.
    spool, texts = _open(dst, accept_reset=True)
    assert spool.take_recovered() == []
    assert len(texts) == 1 and "journal reset accepted" in texts[0]
    assert spool.report.reset and [m.id for m in spool.report.lost] == [None]
    spool.close_sync()
    spool, texts = _open(dst)  # from now on a normal spool
    assert texts == [] and os.listdir(dst / "data") == []
    spool.close_sync()


def test_new_and_finished_spools_open_without_complaint(tmp_path: Path, run: Run[None]) -> None:
    spool, texts = _open(tmp_path)  # new: no journal, no data
    assert texts == [] and spool.report.version == JOURNAL_VERSION

    async def main() -> None:
        for i in range(3):
            await spool.add_message(f"m{i}", "s@a.example", ["r@b.example"], b"x")
            spool.record(f"m{i}", 0, Status.DELIVERED)
        await spool.sync()
        await spool.compact()  # nothing live: the journal is its header
        await spool.close()

    run(main())
    assert [type(r) for _, _, r in _frames((tmp_path / "journal").read_bytes())] == [HeaderRecord, PrefixEnd]
    assert os.listdir(tmp_path / "data") == []  # every message final: no body outlives the run
    spool, texts = _open(tmp_path)
    assert texts == [] and spool.take_recovered() == [] and not spool.report.damaged
    spool.close_sync()


# --- format version ----------------------------------------------------------------------------


def _refused_untouched(src: Path, dst: Path, journal: bytes, match: str) -> None:
    _copy(src, dst, journal)
    data_before = {n: (dst / "data" / n).read_bytes() for n in os.listdir(dst / "data")}
    with pytest.raises(SpoolFormatError, match=match):
        Spool(dst, fsync=_nofsync)
    assert (dst / "journal").read_bytes() == journal  # byte for byte
    assert {n: (dst / "data" / n).read_bytes() for n in os.listdir(dst / "data")} == data_before
    assert not (dst / "journal.tmp").exists()
    with pytest.raises(SpoolFormatError):  # again (the lock was released), and even accepting a reset
        Spool(dst, fsync=_nofsync, accept_reset=True)
    assert (dst / "journal").read_bytes() == journal


def test_a_newer_journal_is_refused_and_left_untouched(built: Path, tmp_path: Path) -> None:
    journal = (built / "journal").read_bytes()
    frames = _frames(journal)
    assert isinstance(frames[0][2], HeaderRecord) and frames[0][2].version == JOURNAL_VERSION
    body = journal[frames[0][1] :]
    newer = frame(record_encoder.encode(HeaderRecord(JOURNAL_VERSION + 1))) + body
    _refused_untouched(built, tmp_path / "v2", newer, f"written by a newer fastmta: version {JOURNAL_VERSION + 1}")
    # A newer header of another shape, and the same with damage that would otherwise make a rewrite.
    other = frame(msgspec.msgpack.encode([0, 7, {"created": 1.0}])) + body
    _refused_untouched(built, tmp_path / "v7", other, "written by a newer fastmta: version 7")
    damaged = bytearray(other)
    damaged[-3] ^= 0x01
    _refused_untouched(built, tmp_path / "v7d", bytes(damaged), "version 7")


def test_an_unknown_record_kind_is_refused_and_left_untouched(built: Path, tmp_path: Path) -> None:
    journal = (built / "journal").read_bytes()
    unknown = journal + frame(msgspec.msgpack.encode([42, "m0", 1]))
    _refused_untouched(built, tmp_path / "tag", unknown, "kind this fastmta does not know \\(tag 42\\)")
    # A known kind with a field this version does not have.
    add = msgspec.msgpack.decode(record_encoder.encode(AddRecord("x", "s", ["r"], 1.0)))
    extra = journal + frame(msgspec.msgpack.encode([*add, None, None, None, None, "new field"]))
    _refused_untouched(built, tmp_path / "field", extra, "AddRecord this fastmta cannot read")
    # Without a header (an older journal), the same holds.
    headerless = journal[_frames(journal)[0][1] :] + frame(msgspec.msgpack.encode([42]))
    _refused_untouched(built, tmp_path / "old", headerless, "tag 42")


def test_a_journal_without_header_is_version_1_and_gains_one_on_rewrite(
    built: Path, tmp_path: Path, run: Run[None]
) -> None:
    journal = (built / "journal").read_bytes()
    headerless = journal[_frames(journal)[0][1] :]  # as written before the header existed
    dst = _copy(built, tmp_path / "dst", headerless)
    spool, texts = _open(dst)
    assert texts == [] and spool.report.version == 1 and not spool.report.rewritten
    assert {m.id for m in spool.take_recovered()} == {"m0", "m2", "m3", "m4"}
    assert (dst / "journal").read_bytes() == headerless  # not rewritten just to add it

    async def main() -> None:
        await spool.compact()
        await spool.close()

    run(main())
    first = _frames((dst / "journal").read_bytes())[0][2]
    assert first == HeaderRecord(JOURNAL_VERSION)
    spool, texts = _open(dst)
    assert texts == [] and {m.id for m in spool.take_recovered()} == {"m0", "m2", "m3", "m4"}
    spool.close_sync()


def test_compaction_keeps_the_header(tmp_path: Path, run: Run[None]) -> None:
    async def main() -> None:
        spool = Spool(tmp_path, fsync=_nofsync)
        await asyncio.gather(*(spool.add_message(f"m{i}", "s@a.example", ["r@b.example"], b"x") for i in range(50)))
        for i in range(0, 50, 2):
            spool.record(f"m{i}", 0, Status.DELIVERED)
        await spool.sync()
        await spool.compact()
        await spool.add_message("late", "s@a.example", ["r@b.example"], b"x")
        await spool.close()

    run(main())
    frames = _frames((tmp_path / "journal").read_bytes())
    assert frames[0][2] == HeaderRecord(JOURNAL_VERSION)
    assert [type(r) for _, _, r in frames].count(HeaderRecord) == 1


# --- damaged input progress: refused, not resent -------------------------------------------


@pytest.fixture
def taken(tmp_path: Path) -> Path:
    """A finished run of inputs "campaign:x" and "campaign:y" (6 rows each), compacted: each one's
    InputRecord and a TakenRecord of its rows (x's first)."""
    from fastmta.queue.journal_records import InputTake

    src = tmp_path / "taken"
    spool = Spool(src, fsync=_nofsync)
    for name in "xy":
        job = spool.open_input(f"campaign:{name}", "fp1")
        for row in range(6):
            take = InputTake(job.id, row, ord(name) * 1000 + row)
            mid = f"{name}{row}"
            spool.add_message_sync(mid, "s@a.example", [f"r{row}@b.example"], b"x", take=take, flush=False)
        spool.flush_sync()
        for row in range(6):
            spool.record(f"{name}{row}", 0, Status.DELIVERED)
        spool.input_progress(f"campaign:{name}", 6)
    spool.close_sync()
    spool = Spool(src, fsync=_nofsync, compact_min_bytes=0)  # compacted at open: just the input's records
    assert spool.report.rewritten
    spool.close_sync()
    return src


def _record_of(journal: bytes, kind: type) -> tuple[int, int]:
    """Where the first record of *kind* is."""
    return next((a, b) for a, b, r in _frames(journal) if isinstance(r, kind))


@pytest.mark.parametrize(("what", "damage"), [("InputRecord", "zeroed"), ("InputRecord", "two bits"),
                                               ("TakenRecord", "zeroed"), ("TakenRecord", "two bits")])
def test_input_progress_damaged_beyond_repair_is_refused_untouched(
    taken: Path, tmp_path: Path, what: str, damage: str
) -> None:
    # Before: the run after such damage read the input again and sent every row a second time, exit 0.
    from fastmta.queue.journal_records import InputRecord, TakenRecord
    from fastmta.queue.spool_errors import ProgressDamaged

    journal = (taken / "journal").read_bytes()
    start, end = _record_of(journal, InputRecord if what == "InputRecord" else TakenRecord)
    damaged = bytearray(journal)
    if damage == "zeroed":
        damaged[start + 12 : end] = bytes(end - start - 12)
    else:
        damaged[end - 2] ^= 0x11
    dst = _copy(taken, tmp_path / "dst", bytes(damaged))
    with pytest.raises(ProgressDamaged, match="taken from the inputs") as caught:
        _open(dst)
    if damage == "two bits" and what == "TakenRecord":  # readable enough to say whose rows they were
        assert "rows taken by input 'campaign:x'" in str(caught.value)
    assert (dst / "journal").read_bytes() == bytes(damaged)  # untouched: restore it, or accept below
    # Opened accepting it: the loss is reported, and what is still recorded is kept.
    spool, texts = _open(dst, accept_lost_progress=True)
    assert spool.report.lost_progress and "input progress lost" in texts[0]
    state = spool.input("campaign:x")
    if what == "TakenRecord":
        assert state is not None and state.done is False and len(state.taken) == 0
    else:
        assert state is None  # its record, and with it whose rows its TakenRecord holds: all read again
    # Nothing else is reset: an input whose own record stands goes on from where it was.
    other = spool.input("campaign:y")
    assert other is not None and (other.row, other.done, len(other.taken)) == (6, False, 6)
    spool.close_sync()
    spool, texts = _open(dst)  # accepted once: the journal is rewritten clean
    assert texts == []
    spool.close_sync()


def test_an_input_record_that_still_says_whose_it_was_is_rebuilt(taken: Path, tmp_path: Path) -> None:
    # Its id and key confirmed, its rows taken intact in their own record: nothing is lost but where
    # reading had got to, so the input is read again from its first row, skipping the rows taken.
    # (Unconfirmed, a key may be another input's: refused, as any other lost input record.)
    from fastmta.queue.journal_records import InputRecord

    journal = (taken / "journal").read_bytes()
    start, end = _record_of(journal, InputRecord)
    damaged = bytearray(journal)
    damaged[start + 4] ^= 0x40  # its length: no longer where it ends
    damaged[end - 2] ^= 0x01  # and one bit of its fingerprint: two faults, beyond the scanner's repair,
    dst = _copy(taken, tmp_path / "dst", bytes(damaged))  # but its checksum still confirms what it was
    spool, texts = _open(dst)
    state = spool.input("campaign:x")
    assert state is not None and (state.row, state.done, state.fingerprint) == (0, False, "")
    assert len(state.taken) == 6 and all(ord("x") * 1000 + row in state.taken for row in range(6))
    assert spool.report.rebuilt == ["campaign:x"] and spool.report.lost_progress == []
    assert "'campaign:x' rebuilt from a damaged record" in texts[0]
    spool.close_sync()
    spool, texts = _open(dst)  # and written back so
    state = spool.input("campaign:x")
    assert texts == [] and state is not None and len(state.taken) == 6 and state.fingerprint == ""
    spool.close_sync()


def test_damage_elsewhere_in_a_journal_with_inputs_is_not_refused(taken: Path, tmp_path: Path) -> None:
    from fastmta.queue.journal_records import InputTake

    spool = Spool(taken, fsync=_nofsync)
    job = spool.input("campaign:x")
    assert job is not None
    spool.add_message_sync("late", "s@a.example", ["r@b.example"], b"x", take=InputTake(job.id, 6, 1006))
    spool.add_message_sync("later", "s@a.example", ["r@b.example"], b"x", take=InputTake(job.id, 7, 1007))
    spool.close_sync()
    journal = (taken / "journal").read_bytes()
    _, end = _record_of(journal, AddRecord)
    damaged = bytearray(journal)
    damaged[end - 3] ^= 0x11  # the Add record of a queued message: one message lost, named
    spool, texts = _open(_copy(taken, tmp_path / "dst", bytes(damaged)))
    assert [m.id for m in spool.report.lost] == ["late"] and spool.report.lost_progress == []
    assert "LOST 1 message(s): late" in texts[0] and "input progress" not in texts[0]
    spool.close_sync()


def test_a_zeroed_block_names_every_record_it_may_have_held(built: Path, tmp_path: Path) -> None:
    # Before: zeroing from m0's record into m2's reported m0 (by its id) and m1 (its later
    # records), and said nothing of m2: its recipients were lost without a word.
    journal = (built / "journal").read_bytes()
    frames = {r.id: (a, b) for a, b, r in _frames(journal) if isinstance(r, AddRecord)}
    damaged = bytearray(journal)
    a, b = frames["m0"][0] + 20, frames["m2"][0] + 30
    damaged[a:b] = bytes(b - a)
    spool, texts = _open(_copy(built, tmp_path / "dst", bytes(damaged)))
    assert {m.id for m in spool.take_recovered()} == {"m3", "m4"}
    lost = spool.report.lost
    assert [m.id for m in lost if m.id is not None] == ["m0", "m1"]
    [block] = [m for m in lost if m.id is None]
    assert block.offset == frames["m0"][1] and "unreadable bytes" in block.reason and "Add record" in block.reason
    assert "LOST 3 message(s)" in texts[0]
    spool.close_sync()


def test_a_crash_is_never_taken_for_lost_progress(taken: Path, tmp_path: Path) -> None:
    # Found by a review: a torn tail beside a message that names an input compaction had dropped (the
    # old version of an edited input, as compaction before this check left it) was refused as lost
    # progress; so was a last append whose end a power loss left zeroed, its first bytes still
    # reading as an input's record. Neither was ever acknowledged: a crash, not damage.
    from fastmta.queue.journal_records import InputRecord, InputTake

    journal = (taken / "journal").read_bytes()
    orphan = AddRecord("old", "s@a.example", ["r@b.example"], 1.0, take=InputTake(99, 0, 12345))
    progress = frame(record_encoder.encode(InputRecord(1, "campaign:x", "fp1", 7, True)))
    base = journal + frame(record_encoder.encode(orphan))
    for cut in range(1, len(progress)):
        for tail in (progress[:cut], progress[:cut] + bytes(len(progress) - cut)):  # cut short, or zeroed
            spool, _ = _open(_copy(taken, tmp_path / "dst", base + tail))
            assert spool.report.lost_progress == [] and spool.report.lost == [], cut
            assert "old" in {m.id for m in spool.take_recovered()}
            spool.close_sync()


def test_a_journal_cut_short_inside_its_rewritten_part_is_refused(taken: Path, tmp_path: Path) -> None:
    # Found by a fault-injection attack: a finished queue's journal cut inside its inputs' records was
    # read as a crash's torn tail ("torn tail 144 bytes"), and the next run sent whole inputs again,
    # exit 0. A rewrite is installed whole (renamed over), so no crash ends a journal inside it.
    from fastmta.queue.spool_errors import ProgressDamaged

    journal = (taken / "journal").read_bytes()
    frames = _frames(journal)
    assert isinstance(frames[-1][2], PrefixEnd)
    # (From inside the header on: a journal is created whole, so not even one whole frame is no crash.)
    for cut in sorted({a for a, _, _ in frames[1:]} | set(range(1, len(journal) - 1, 97)) | {5, 14}):
        dst = _copy(taken, tmp_path / "dst", journal[:cut])
        with pytest.raises(ProgressDamaged, match="cut short"):
            _open(dst)
        assert (dst / "journal").read_bytes() == journal[:cut], cut
    spool, texts = _open(dst, accept_lost_progress=True)
    assert "cut short" in texts[0] and [m.id for m in spool.report.lost] == [None]
    spool.close_sync()
    spool, texts = _open(_copy(taken, tmp_path / "whole", journal))  # and whole, it opens without a word
    assert texts == [] and spool.input("campaign:x") is not None
    spool.close_sync()


def test_a_crash_tail_after_a_format_2_queue_of_inputs_is_not_lost_progress(tmp_path: Path) -> None:
    # Found by a review: a finished queue compacted by format-2 code (a header and its inputs' records,
    # no PrefixEnd, no message) counted every damaged region as among the inputs' records, the tail
    # an unacknowledged append left behind (garbage of its full length) too: refused.
    from fastmta.queue.journal import HEADER
    from fastmta.queue.journal_records import InputRecord, TakenRecord

    enc = record_encoder.encode
    old = b"".join(frame(enc(r)) for r in (HeaderRecord(2), InputRecord(1, "campaign:x", "fp", 6, True),
                                           TakenRecord(1, bytes(range(48)))))
    payload = bytes(range(1, 40))
    tail = HEADER.pack(MAGIC, len(payload), 12345) + payload  # its header written, its payload not (stale bytes)
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "journal").write_bytes(old + tail)
    spool, _ = _open(tmp_path / "q")
    assert spool.report.lost_progress == [] and spool.input("campaign:x") is not None
    spool.close_sync()


def test_rows_taken_before_a_damaged_first_input_record_stay_taken(tmp_path: Path) -> None:
    # Found by a fault-injection attack: a run's first record of an input damaged, a later one intact:
    # the rows its messages took in between were dropped with the orphan records, and the next run
    # sent them again (9,000 recipients, exit 0).
    from fastmta.queue.journal_records import InputRecord, InputTake

    spool = Spool(tmp_path / "q", fsync=_nofsync)
    job = spool.open_input("pickup:files", "fp")
    for row in range(20):
        spool.add_message_sync(f"p{row}", "s@a.example", ["r@b.example"], b"x", take=InputTake(job.id, row, 500 + row))
        spool.record(f"p{row}", 0, Status.DELIVERED)
    spool.input_progress("pickup:files", 20)  # its second record
    spool.close_sync()
    journal = (tmp_path / "q" / "journal").read_bytes()
    start, end = _record_of(journal, InputRecord)  # the first
    damaged = bytearray(journal)
    damaged[start + 12 : end] = bytes(end - start - 12)
    (tmp_path / "q" / "journal").write_bytes(bytes(damaged))
    spool, _ = _open(tmp_path / "q")
    state = spool.input("pickup:files")
    assert state is not None and all(500 + row in state.taken for row in range(20))
    assert spool.report.lost_progress == []
    spool.close_sync()
