"""The durable spool: group commit, recovery (also from torn and damaged journals), compaction, input progress."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from fastmta.queue.journal import ScanReport, scan
from fastmta.queue.journal_records import AddRecord as _Add
from fastmta.queue.journal_records import BodyRef, SourceRef
from fastmta.queue.journal_records import DropRecord as _Drop
from fastmta.queue.journal_records import StateRecord as _State
from fastmta.queue.journal_records import record_decoder as _decoder
from fastmta.queue.records import Status
from fastmta.queue.recovery import RecoveredMessage
from fastmta.queue.spool import Spool
from fastmta.queue.spool_errors import SpoolError, SpoolLocked, SpoolRecoveryWarning

T = TypeVar("T")
Run = Callable[[Coroutine[Any, Any, T]], T]


def _nofsync(fd: int) -> None:
    pass


def _state(spool_or_msgs: Spool | list[RecoveredMessage]) -> dict[str, dict[int, tuple[Status | None, int, float]]]:
    """Recovered messages as {id: {index: (status, attempts, next_attempt)}} (unfinished recipients only)."""
    msgs = spool_or_msgs.take_recovered() if isinstance(spool_or_msgs, Spool) else spool_or_msgs
    return {m.id: {r.index: (r.status, r.attempts, r.next_attempt) for r in m.recipients} for m in msgs}


def _reopen(path: Path, **kw: Any) -> Spool:
    kw.setdefault("fsync", _nofsync)
    return Spool(path, **kw)


# --- round trip ---------------------------------------------------------------------


def test_round_trip(tmp_path: Path, run: Run[None]) -> None:
    async def main() -> None:
        spool = Spool(tmp_path, fsync=_nofsync)
        assert spool.report.records == 0 and spool.take_recovered() == []
        ref = await spool.add_message(
            "m1", "s@a.example", ["a@x.example", "b@y.example"], b"Subject: 1\r\n\r\nhi\r\n", meta={"job": "j"}
        )
        assert isinstance(ref, BodyRef)
        assert spool.read_body(ref) == b"Subject: 1\r\n\r\nhi\r\n"
        await spool.add_message("m2", "", ["c@z.example"], b"two", queued_at=1000.5)
        await spool.add_message("m3", "s@a.example", ["d@z.example"], b"three")
        spool.record("m1", 0, Status.DELIVERED, attempts=1)
        spool.record("m1", 1, Status.DEFERRED, attempts=1, next_attempt=5000.25)
        spool.record("m3", 0, Status.BOUNCED, attempts=1)
        assert not spool.is_live("m3") and spool.unfinished_messages == 2
        await spool.close()

    run(main())
    spool = _reopen(tmp_path)
    msgs = {m.id: m for m in spool.take_recovered()}
    assert set(msgs) == {"m1", "m2"}
    m1, m2 = msgs["m1"], msgs["m2"]
    assert m1.sender == "s@a.example" and m1.meta == {"job": "j"} and m1.total_recipients == 2
    assert [(r.index, r.address, r.status, r.attempts, r.next_attempt) for r in m1.recipients] == [
        (1, "b@y.example", Status.DEFERRED, 1, 5000.25)
    ]
    assert m1.body is not None and spool.read_body(m1.body) == b"Subject: 1\r\n\r\nhi\r\n"
    assert m2.queued_at == 1000.5 and m2.sender == "" and m2.recipients[0].status is None
    assert m2.body is not None and spool.read_body(m2.body) == b"two"
    assert spool.report.messages == 2 and spool.report.recipients == 2 and spool.report.deferred == 1
    assert not spool.report.damaged
    # Recovered messages are live: their recipients can be recorded.
    spool.record("m1", 1, Status.DELIVERED)
    spool.record("m2", 0, Status.EXPIRED)
    spool.close_sync()
    spool = _reopen(tmp_path)
    assert spool.take_recovered() == []
    assert os.listdir(tmp_path / "data") == []  # every body is finished: segments deleted
    spool.close_sync()


def test_a_cancelled_add_is_still_committed_and_the_others_unharmed(tmp_path: Path, run: Run[None]) -> None:
    async def main() -> None:
        spool = Spool(tmp_path, fsync=_nofsync)
        first = asyncio.ensure_future(spool.add_message("m1", "s@a.example", ["a@x.example"], b"one"))
        second = asyncio.ensure_future(spool.add_message("m2", "s@a.example", ["b@x.example"], b"two"))
        await asyncio.sleep(0)  # both queued in the same batch
        first.cancel()
        assert isinstance(await second, BodyRef)  # the shared batch was not cancelled with it
        with pytest.raises(asyncio.CancelledError):
            await first
        await spool.close()

    run(main())
    spool = _reopen(tmp_path)
    assert {m.id for m in spool.take_recovered()} == {"m1", "m2"}  # the cancelled one is on disk too
    spool.close_sync()


def test_sync_api_without_loop(tmp_path: Path) -> None:
    spool = _reopen(tmp_path)
    ref = spool.add_message_sync("m", "s@a.example", ["r@b.example"], b"body")
    assert ref is not None and spool.read_body(ref) == b"body"
    spool.record("m", 0, Status.DEFERRED, attempts=2, next_attempt=77.0)
    spool.close_sync()
    spool = _reopen(tmp_path)
    assert _state(spool) == {"m": {0: (Status.DEFERRED, 2, 77.0)}}
    spool.close_sync()


def test_errors(tmp_path: Path, run: Run[None]) -> None:
    async def main() -> None:
        spool = _reopen(tmp_path)
        with pytest.raises(SpoolLocked):
            Spool(tmp_path)
        with pytest.raises(ValueError):
            await spool.add_message("m", "s@a.example", ["r@b.example"])
        with pytest.raises(ValueError):
            await spool.add_message("m", "s@a.example", [], b"x")
        with pytest.raises(SpoolError):
            await spool.add_message("m", "s@a.example", ["r@b.example"], source=SourceRef(99, 0))
        await spool.add_message("m", "s@a.example", ["r@b.example"], b"x")
        with pytest.raises(SpoolError):
            await spool.add_message("m", "s@a.example", ["r@b.example"], b"x")
        with pytest.raises(KeyError):
            spool.record("nope", 0, Status.DELIVERED)
        spool.record("m", 0, Status.DELIVERED)
        with pytest.raises(KeyError):
            spool.record("m", 0, Status.DELIVERED)  # no longer live
        await spool.close()
        with pytest.raises(SpoolError):
            spool.record("m", 0, Status.DELIVERED)

    run(main())
    Spool(tmp_path, fsync=_nofsync).close_sync()  # the lock was released


def test_duplicate_final_is_ignored_and_remove(tmp_path: Path, run: Run[None]) -> None:
    async def main() -> None:
        spool = _reopen(tmp_path)
        await spool.add_message("m", "s@a.example", ["a@b.example", "c@d.example"], b"x")
        await spool.add_message("gone", "s@a.example", ["a@b.example"], b"y")
        spool.record("m", 0, Status.DELIVERED)
        spool.record("m", 0, Status.BOUNCED)  # ignored: already final
        spool.record("m", 0, Status.DEFERRED)  # ignored too
        spool.remove("gone")
        await spool.close()

    run(main())
    spool = _reopen(tmp_path)
    assert _state(spool) == {"m": {1: (None, 0, 0.0)}}
    spool.close_sync()


def test_body_damage_is_reported(tmp_path: Path) -> None:
    spool = _reopen(tmp_path)
    ref = spool.add_message_sync("m", "s@a.example", ["r@b.example"], b"the body")
    assert ref is not None
    path = tmp_path / "data" / f"{ref.seg:08d}.dat"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(SpoolError, match="damaged"):
        spool.read_body(ref)
    spool.close_sync()


# --- group commit ---------------------------------------------------------------------


class FsyncCounter:
    def __init__(self, delay: float = 0.0) -> None:
        self.calls = 0
        self.delay = delay
        self.threads: set[str] = set()

    def __call__(self, fd: int) -> None:
        self.calls += 1
        self.threads.add(threading.current_thread().name)
        if self.delay:
            time.sleep(self.delay)
        os.fdatasync(fd)


def _journal_ids(path: Path) -> set[str]:
    report = ScanReport()
    with open(path, "rb") as f:
        records = [_decoder.decode(p) for _, p in scan(f, report)]
    return {r.id for r in records if isinstance(r, _Add)}


@pytest.mark.parametrize("interval", [0.0, 0.005])
def test_group_commit_shares_fsyncs(tmp_path: Path, run: Run[None], interval: float) -> None:
    counter = FsyncCounter()

    async def main() -> None:
        spool = Spool(tmp_path, fsync=counter, commit_interval=interval)
        before = counter.calls
        counter.threads.clear()  # opening (on this thread) is not the point
        await asyncio.gather(
            *(spool.add_message(f"m{i}", "s@a.example", ["r@b.example"], b"body %d" % i) for i in range(1000))
        )
        used = counter.calls - before
        # One commit = body segment fsync + journal fsync (+ one directory fsync for a new segment).
        assert used <= 12, used
        assert spool.stats.commits <= 5
        assert counter.threads == {t for t in counter.threads if t.startswith("fastmta-spool")}
        await spool.close()

    run(main())
    spool = _reopen(tmp_path)
    assert len(spool.take_recovered()) == 1000
    spool.close_sync()


def test_add_returns_after_its_fsync_and_loop_keeps_running(tmp_path: Path, run: Run[None]) -> None:
    counter = FsyncCounter(delay=0.05)  # a slow disk

    async def main() -> None:
        spool = Spool(tmp_path, fsync=counter, commit_interval=0.001)
        ticks = 0
        stop = False

        async def ticker() -> None:
            nonlocal ticks
            while not stop:
                ticks += 1
                await asyncio.sleep(0.005)

        t = asyncio.ensure_future(ticker())
        done_at: dict[str, int] = {}

        async def add(i: int) -> None:
            await spool.add_message(f"m{i}", "s@a.example", ["r@b.example"], b"x")
            done_at[f"m{i}"] = counter.calls
            # Durable now: the record is in the journal file (read independently).
            assert f"m{i}" in _journal_ids(tmp_path / "journal")

        await asyncio.gather(*(add(i) for i in range(200)))
        stop = True
        await t
        assert ticks >= 5  # the loop ran while the writer thread sat in fsync
        assert all(n >= 2 for n in done_at.values())
        assert counter.calls <= 12
        await spool.close()

    run(main())


def test_records_are_batched(tmp_path: Path, run: Run[None]) -> None:
    counter = FsyncCounter()

    async def main() -> None:
        spool = Spool(tmp_path, fsync=counter, flush_interval=0.02, flush_records=100_000)
        await spool.add_message("m", "s@a.example", [f"r{i}@b.example" for i in range(5000)], b"x")
        before_commits = spool.stats.commits
        for i in range(5000):
            spool.record("m", i, Status.DEFERRED, attempts=1, next_attempt=float(i))
        await asyncio.sleep(0.1)
        assert spool.stats.commits - before_commits == 1  # 5000 records, one write, one fsync
        for i in range(2500):
            spool.record("m", i, Status.DELIVERED)
        await spool.close()

    run(main())
    spool = _reopen(tmp_path)
    got = _state(spool)["m"]
    assert len(got) == 2500 and got[4999] == (Status.DEFERRED, 1, 4999.0)
    spool.close_sync()


# --- recovery from torn and damaged journals ---------------------------------------------


def _build(path: Path) -> None:
    spool = _reopen(path)
    for i in range(30):
        spool.add_message_sync(
            f"m{i}", "s@a.example", [f"a{i}@x.example", f"b{i}@y.example"], b"body %d" % i, flush=False
        )
    spool.flush_sync()
    for i in range(30):
        if i % 3 == 0:
            spool.record(f"m{i}", 0, Status.DELIVERED, attempts=1)
        if i % 3 == 1:
            spool.record(f"m{i}", 1, Status.DEFERRED, attempts=2, next_attempt=1e9 + i)
        if i % 5 == 0:
            spool.record(f"m{i}", 1, Status.BOUNCED, attempts=1)
    spool.flush_sync()
    spool.record("m29", 0, Status.EXPIRED, attempts=9)  # the last record
    spool.close_sync()


def _frames(journal: bytes) -> list[tuple[int, int, Any]]:
    report = ScanReport()
    out = []
    for off, payload in scan(io.BytesIO(journal), report):  # type: ignore[arg-type]
        out.append((off, off + 12 + len(payload), _decoder.decode(payload)))
    assert not report.damaged
    return out


def _model(records: list[Any]) -> dict[str, dict[int, tuple[Status | None, int, float]]]:
    """A straightforward reference replay: what recovery must return for these records."""
    msgs: dict[str, dict[int, tuple[Status | None, int, float]]] = {}
    for rec in records:
        if isinstance(rec, _Add):
            msgs.setdefault(rec.id, {i: (None, 0, 0.0) for i in range(len(rec.rcpts))})
        elif isinstance(rec, _State) and rec.id in msgs:
            m = msgs[rec.id]
            if rec.idx in m:
                if rec.status == 4:
                    m[rec.idx] = (Status.DEFERRED, rec.attempts, rec.next_at)
                else:
                    del m[rec.idx]
                if not m:
                    del msgs[rec.id]
        elif isinstance(rec, _Drop):
            msgs.pop(rec.id, None)
    return msgs


def _recover_copy(src: Path, dst: Path, journal: bytes) -> tuple[dict[str, Any], Spool, list[warnings.WarningMessage]]:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src / "data", dst / "data")
    (dst / "journal").write_bytes(journal)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spool = _reopen(dst)
    return _state(spool), spool, list(caught)


def test_truncated_at_every_offset_of_the_last_record(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _build(src)
    journal = (src / "journal").read_bytes()
    frames = _frames(journal)
    records = [r for _, _, r in frames]
    full, without_last = _model(records), _model(records[:-1])
    assert full != without_last
    last_start = frames[-1][0]
    for cut in range(last_start, len(journal) + 1):
        got, spool, caught = _recover_copy(src, tmp_path / "dst", journal[:cut])
        if cut == len(journal):
            assert got == full and not caught and not spool.report.damaged
        else:
            assert got == without_last, cut
            assert spool.report.torn_tail_bytes == cut - last_start
            if cut > last_start:
                assert spool.report.rewritten
                assert [w.category for w in caught] == [SpoolRecoveryWarning]
                assert "torn tail" in str(caught[0].message)
        spool.close_sync()
    # After recovery the journal was rewritten clean: a second open has no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spool = _reopen(tmp_path / "dst")
    assert _state(spool) == full
    spool.close_sync()


def test_truncated_at_sampled_offsets_anywhere(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _build(src)
    journal = (src / "journal").read_bytes()
    frames = _frames(journal)
    for cut in range(0, len(journal), 37):
        complete = [r for _, end, r in frames if end <= cut]
        if not complete:  # not one valid record beside stored bodies: it looks reset, refused
            with pytest.raises(SpoolError, match="looks reset"):
                _recover_copy(src, tmp_path / "dst", journal[:cut])
            continue
        got, spool, _ = _recover_copy(src, tmp_path / "dst", journal[:cut])
        assert got == _model(complete), cut
        spool.close_sync()


@pytest.mark.parametrize("bits", [0x10, 0x11], ids=["one bit", "two bits"])
def test_a_flipped_bit_is_repaired_and_two_lose_only_their_record(tmp_path: Path, bits: int) -> None:
    src = tmp_path / "src"
    _build(src)
    journal = (src / "journal").read_bytes()
    frames = _frames(journal)
    records = [r for _, _, r in frames]
    for pos in list(range(0, len(journal), 23)) + [len(journal) - 1]:
        k = next(i for i, (start, end, _) in enumerate(frames) if start <= pos < end)
        damaged = bytearray(journal)
        damaged[pos] ^= bits
        got, spool, caught = _recover_copy(src, tmp_path / "dst", bytes(damaged))
        assert [w.category for w in caught] == [SpoolRecoveryWarning], pos
        at = pos - frames[k][0]
        if bits == 0x10 or at < 8:
            # One bit anywhere, or a marker or length (where the frames begin says what they were):
            # read as written, the checksum confirming it, and the journal rewritten clean.
            where = "marker" if at < 4 else "length" if at < 8 else "checksum" if at < 12 else "payload"
            assert got == _model(records) and spool.report.repaired == [(frames[k][0], where)], pos
            assert "repaired 1 record" in str(caught[0].message) and spool.report.lost == []
            assert spool.report.rewritten
            spool.close_sync()
            got, clean, caught = _recover_copy(src, tmp_path / "dst2", (tmp_path / "dst" / "journal").read_bytes())
            assert got == _model(records) and caught == [] and not clean.report.damaged, pos
            clean.close_sync()
            continue
        assert got == _model(records[:k] + records[k + 1 :]), pos
        assert spool.report.skipped_bytes == frames[k][1] - frames[k][0]
        assert spool.report.records == len(records) - 1
        spool.close_sync()


def test_torn_tail_then_more_work(tmp_path: Path, run: Run[None]) -> None:
    src = tmp_path / "src"
    _build(src)
    journal = (src / "journal").read_bytes()
    (src / "journal").write_bytes(journal[:-5])

    async def main() -> None:
        with pytest.warns(SpoolRecoveryWarning):
            spool = _reopen(src)
        before = _state(spool)
        await spool.add_message("new", "s@a.example", ["r@b.example"], b"new body")
        await spool.close()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            spool = _reopen(src)
        after = _state(spool)
        assert after == {**before, "new": {0: (None, 0, 0.0)}}
        await spool.close()

    run(main())


def test_missing_body_segment_is_reported(tmp_path: Path) -> None:
    spool = _reopen(tmp_path, segment_size=100)
    for i in range(5):
        spool.add_message_sync(f"m{i}", "s@a.example", ["r@b.example"], bytes(80))
    spool.close_sync()
    segs = sorted(os.listdir(tmp_path / "data"))
    assert len(segs) == 5
    os.unlink(tmp_path / "data" / segs[2])
    with pytest.warns(SpoolRecoveryWarning, match="lost their body"):
        spool = _reopen(tmp_path)
    assert spool.report.missing_bodies == ["m2"]
    assert sorted(_state(spool)) == ["m0", "m1", "m3", "m4"]
    spool.close_sync()


def test_deferred_schedules_survive(tmp_path: Path, run: Run[None]) -> None:
    async def main() -> None:
        spool = _reopen(tmp_path)
        await asyncio.gather(
            *(spool.add_message(f"m{i}", "s@a.example", ["a@b.example", "c@d.example"], b"x") for i in range(100))
        )
        for i in range(100):
            spool.record(f"m{i}", 0, Status.DEFERRED, attempts=1, next_attempt=100.0 + i)
            spool.record(f"m{i}", 0, Status.DEFERRED, attempts=2, next_attempt=200.0 + i)  # the latest counts
            spool.record(f"m{i}", 1, Status.DELIVERED, attempts=1)
        await spool.sync()
        await spool.compact()  # and they survive compaction
        await spool.close()

    run(main())
    spool = _reopen(tmp_path)
    assert _state(spool) == {f"m{i}": {0: (Status.DEFERRED, 2, 200.0 + i)} for i in range(100)}
    spool.close_sync()


# --- compaction and disk use ------------------------------------------------------------------


def test_compaction_preserves_live_state_and_shrinks(tmp_path: Path, run: Run[None]) -> None:
    async def main() -> None:
        spool = Spool(tmp_path, fsync=_nofsync, segment_size=4096, auto_compact=False)
        await asyncio.gather(
            *(
                spool.add_message(f"m{i}", "s@a.example", ["a@b.example", "c@d.example"], b"B" * 200)
                for i in range(2000)
            )
        )
        disk_before = spool.disk_usage()
        for i in range(2000):
            if i % 20 or i < 1000:  # the older half finishes entirely: whole segments free up
                spool.record(f"m{i}", 0, Status.DELIVERED)
                spool.record(f"m{i}", 1, Status.BOUNCED)
            else:
                spool.record(f"m{i}", 1, Status.DEFERRED, attempts=3, next_attempt=float(i))
        await spool.sync()
        size_before = spool.journal_size
        # Compaction runs beside new adds; both must survive.
        adds = asyncio.gather(*(spool.add_message(f"n{i}", "s@a.example", ["z@b.example"], b"N") for i in range(300)))
        await asyncio.gather(spool.compact(), adds)
        assert spool.journal_size < size_before / 5
        assert spool.stats.compactions >= 2  # one at open (new spool), one now
        assert spool.disk_usage() < disk_before * 0.6  # bodies of finished messages were deleted
        expected = {f"m{i}": {0: (None, 0, 0.0), 1: (Status.DEFERRED, 3, float(i))} for i in range(1000, 2000, 20)}
        expected.update({f"n{i}": {0: (None, 0, 0.0)} for i in range(300)})
        await spool.close()
        spool = _reopen(tmp_path)
        assert _state(spool) == expected
        assert not spool.report.damaged
        await spool.close()

    run(main())


def test_auto_compaction_bounds_the_journal(tmp_path: Path, run: Run[None]) -> None:
    async def main() -> None:
        spool = Spool(tmp_path, fsync=_nofsync, compact_min_bytes=20_000, compact_ratio=2.0)
        for round_ in range(20):
            ids = [f"r{round_}m{i}" for i in range(200)]
            await asyncio.gather(*(spool.add_message(m, "s@a.example", ["a@b.example"], b"x") for m in ids))
            for m in ids:
                spool.record(m, 0, Status.DELIVERED)
            await spool.sync()
            await asyncio.sleep(0)
        while spool._compacting is not None:
            await asyncio.sleep(0.01)
        assert spool.stats.compactions >= 3
        assert spool.journal_size < 60_000  # 20 rounds wrote ~250 KB of records
        await spool.close()

    run(main())
    spool = _reopen(tmp_path)
    assert spool.take_recovered() == [] and not spool.report.damaged
    spool.close_sync()


def test_interrupted_compaction_leaves_old_journal(tmp_path: Path) -> None:
    spool = _reopen(tmp_path)
    spool.add_message_sync("m", "s@a.example", ["r@b.example"], b"x")
    spool.close_sync()
    (tmp_path / "journal.tmp").write_bytes(b"half a compaction")
    spool = _reopen(tmp_path)
    assert _state(spool) == {"m": {0: (None, 0, 0.0)}}
    assert not (tmp_path / "journal.tmp").exists()
    spool.close_sync()


# --- input progress ---------------------------------------------------------------------------------


def test_input_progress_and_campaign_references(tmp_path: Path, run: Run[None]) -> None:
    async def main() -> None:
        spool = _reopen(tmp_path)
        job = spool.open_input("jobs/a.toml", "mtime=1;size=2")
        assert (job.row, job.done) == (0, False)
        for row in range(10):
            await spool.add_message(
                f"c{row}", "s@a.example", [f"r{row}@b.example"], source=SourceRef(job.id, row, row * 40)
            )
        for row in range(8):
            spool.record(f"c{row}", 0, Status.DELIVERED)
        spool.input_progress("jobs/a.toml", 12)  # rows 10 and 11 were rejects
        spool.open_input("pickup/1.eml", "m1")
        spool.input_done("pickup/1.eml")
        spool.open_input("pickup/2.eml", "m2")
        spool.forget_input("pickup/2.eml")
        await spool.close()

    run(main())
    spool = _reopen(tmp_path)
    job = spool.input("jobs/a.toml")
    assert job is not None and (job.row, job.done, job.fingerprint) == (12, False, "mtime=1;size=2")
    assert spool.input("pickup/1.eml") is not None and spool.input("pickup/1.eml").done  # type: ignore[union-attr]
    assert spool.input("pickup/2.eml") is None
    msgs = spool.take_recovered()
    assert [m.id for m in msgs] == ["c8", "c9"]
    assert msgs[0].source == SourceRef(job.id, 8, 320) and msgs[0].body is None
    assert spool.input_by_id(job.id) is job
    # The file changed: a new input (row 0); the old id still resolves for its messages.
    new = spool.open_input("jobs/a.toml", "mtime=2;size=2")
    assert new.id != job.id and new.row == 0 and spool.input_by_id(job.id) is not None
    spool.close_sync()


def test_add_implies_input_progress_even_without_progress_records(tmp_path: Path) -> None:
    spool = _reopen(tmp_path)
    job = spool.open_input("j", "fp")
    for row in range(5):
        spool.add_message_sync(f"c{row}", "s@a.example", ["r@b.example"], source=SourceRef(job.id, row), flush=False)
    spool.flush_sync()
    for row in range(5):
        spool.record(f"c{row}", 0, Status.DELIVERED)
    spool.close_sync()
    spool = _reopen(tmp_path)
    assert spool.input("j").row == 5  # type: ignore[union-attr]
    assert spool.take_recovered() == []
    spool.close_sync()


@pytest.mark.parametrize("compact", [True, False])
def test_taken_row_keys_survive_compaction_in_several_records(
    tmp_path: Path, run: Run[None], monkeypatch: pytest.MonkeyPatch, compact: bool
) -> None:
    # 7 keys a record here (8,000 in use): 50 taken rows are written as 8 records, and read back as one set.
    import fastmta.queue.compaction
    import fastmta.queue.recovery
    import fastmta.queue.spool
    from fastmta.queue.journal_records import InputTake, TakenRecord

    monkeypatch.setattr(fastmta.queue.compaction, "TAKEN_KEYS_PER_RECORD", 7)
    monkeypatch.setattr(fastmta.queue.recovery, "TAKEN_KEYS_PER_RECORD", 7)
    monkeypatch.setattr(fastmta.queue.spool, "_IDLE_COMPACT_BYTES", 0)  # this small journal is compacted at close
    keys = [(row * 2654435761 + 12345) % 2**64 for row in range(50)]

    async def main() -> None:
        spool = _reopen(tmp_path)
        job = spool.open_input("j", "fp")
        for row, key in enumerate(keys):
            await spool.add_message(f"c{row}", "s@a.example", ["r@b.example"], b"x", take=InputTake(job.id, row, key))
            spool.record(f"c{row}", 0, Status.DELIVERED)
        await spool.sync()
        if compact:
            await spool.compact()  # from the journal
        await spool.close()  # idle compaction, from the in-memory state

    run(main())
    with open(tmp_path / "journal", "rb") as f:
        records = [r for _, p in scan(f, ScanReport()) if isinstance(r := _decoder.decode(p), TakenRecord)]
    assert len(records) == 8 and sum(len(r.keys) for r in records) == 50 * 8
    spool = _reopen(tmp_path)
    taken = spool.input("j").taken  # type: ignore[union-attr]
    assert len(taken) == 50 and all(k in taken for k in keys) and (keys[0] + 1) % 2**64 not in taken
    spool.close_sync()


def test_a_flipped_bit_in_a_full_taken_record_keeps_every_key(tmp_path: Path) -> None:
    # A finished run's journal is its inputs' progress: one bit lost with a
    # record of taken keys made the next run send all those rows again.
    from fastmta.queue.journal import MAX_REPAIR
    from fastmta.queue.journal_records import TAKEN_KEYS_PER_RECORD, InputTake, TakenRecord, record_encoder

    largest = record_encoder.encode(TakenRecord(2**62, bytes(8 * TAKEN_KEYS_PER_RECORD)))
    assert len(largest) <= MAX_REPAIR  # every record of taken keys can be repaired
    keys = [(row * 2654435761 + 12345) % 2**64 for row in range(TAKEN_KEYS_PER_RECORD + 500)]
    spool = _reopen(tmp_path)
    job = spool.open_input("j", "fp")
    for row, key in enumerate(keys):
        spool.add_message_sync(f"c{row}", "s@a.example", ["r@b.example"], b"x", take=InputTake(job.id, row, key),
                               flush=False)
    spool.flush_sync()
    for row in range(len(keys)):
        spool.record(f"c{row}", 0, Status.DELIVERED)
    spool.close_sync()
    spool = _reopen(tmp_path, compact_min_bytes=0)  # compacted at open: the input's state, two records of keys
    assert spool.report.rewritten
    spool.close_sync()
    journal = (tmp_path / "journal").read_bytes()
    with open(tmp_path / "journal", "rb") as f:
        taken = [(off, len(p)) for off, p in scan(f, ScanReport()) if isinstance(_decoder.decode(p), TakenRecord)]
    assert [n > 60000 for _, n in taken] == [True, False]
    off, n = taken[0]
    for pos in (off + 12 + 20, off + 12 + n // 2, off + 12 + n - 1):
        damaged = bytearray(journal)
        damaged[pos] ^= 0x04
        (tmp_path / "journal").write_bytes(bytes(damaged))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            spool = _reopen(tmp_path)
        state = spool.input("j")
        assert state is not None and len(state.taken) == len(keys) and all(k in state.taken for k in keys), pos
        assert spool.report.repaired == [(off, "payload")] and "repaired 1 record" in str(caught[0].message)
        spool.close_sync()


def test_input_progress_survives_compaction(tmp_path: Path, run: Run[None]) -> None:
    async def main() -> None:
        spool = _reopen(tmp_path)
        job = spool.open_input("j", "fp")
        for row in range(50):
            await spool.add_message(f"c{row}", "s@a.example", ["r@b.example"], source=SourceRef(job.id, row))
            spool.record(f"c{row}", 0, Status.DELIVERED)
        await spool.sync()
        await spool.compact()
        await spool.close()

    run(main())
    spool = _reopen(tmp_path)
    assert spool.input("j").row == 50  # type: ignore[union-attr]
    spool.close_sync()


def test_a_message_that_cannot_be_recorded_is_refused_without_a_trace(tmp_path: Path, run: Run[None]) -> None:
    # A lone surrogate (an undecodable file name, a JSON "\ud800") cannot go into the journal. The
    # message is refused, and nothing of it stays: before, its input row was marked taken first,
    # so the file was skipped as sent by the next reading (and deleted by `serve`), never queued.
    from fastmta.errors import InputError
    from fastmta.queue.journal_records import InputTake

    async def main() -> None:
        spool = _reopen(tmp_path)
        job = spool.open_input("pickup", "")
        for meta in ({"file": "bad-\udcff.eml"}, {"x": object()}):
            with pytest.raises(InputError, match="cannot be recorded"):
                await spool.add_message("m1", "s@a.example", ["r@b.example"], b"body one",
                                        meta=meta, take=InputTake(job.id, 0, 11))
        assert 11 not in job.taken and not spool.is_live("m1") and spool.unfinished_messages == 0
        # The same message recorded properly afterwards: same id, same row, its body where it belongs.
        await spool.add_message("m1", "s@a.example", ["r@b.example"], b"body one",
                                meta={"file": "bad-\\xff.eml"}, take=InputTake(job.id, 0, 11))
        await spool.close()

    run(main())
    spool = _reopen(tmp_path)
    [msg] = spool.take_recovered()
    assert msg.id == "m1" and msg.meta == {"file": "bad-\\xff.eml"}
    assert msg.body is not None and spool.read_body(msg.body) == b"body one"
    assert 11 in spool.input("pickup").taken  # type: ignore[union-attr]
    spool.close_sync()


def test_reread_inputs_survives_a_crash_before_the_rows_are_read(tmp_path: Path) -> None:
    # Found by a review: the reset to row 0 was an input record under the same fingerprint, and replay
    # keeps the furthest progress of one fingerprint: after a crash the input went on from row 10 again,
    # and the row whose record was lost (5) was never read.
    from fastmta.intake.progress import resume_from
    from fastmta.queue.journal_records import InputTake

    spool = _reopen(tmp_path)
    job = spool.open_input("campaign:x", "fp")
    for row in [r for r in range(10) if r != 5]:  # row 5's record was lost
        spool.add_message_sync(f"c{row}", "s@a.example", ["r@b.example"], b"x", take=InputTake(job.id, row, row))
        spool.record(f"c{row}", 0, Status.DELIVERED)
    spool.input_progress("campaign:x", 10)
    spool.input_done("campaign:x")
    spool.close_sync()
    spool = _reopen(tmp_path)
    assert resume_from(spool)("campaign:x", "fp") is None  # done: nothing to read
    assert spool.reread_inputs() == 1
    point = resume_from(spool)("campaign:x", "fp")
    assert point is not None and point.row == 0 and 5 not in point.taken and all(r in point.taken for r in (0, 9))
    spool.open_input("campaign:x", "fp")  # the run starts it, reads rows 0..2, and is killed
    spool.input_progress("campaign:x", 3)
    spool.close_sync()
    spool = _reopen(tmp_path)
    point = resume_from(spool)("campaign:x", "fp")
    assert point is not None and point.row == 3 and 5 not in point.taken  # row 5 is still read
    spool.close_sync()
    spool = _reopen(tmp_path)  # killed even before the run started it: from row 0 again
    spool.reread_inputs()
    spool.close_sync()
    spool = _reopen(tmp_path)
    point = resume_from(spool)("campaign:x", "fp")
    assert point is not None and point.row == 0
    spool.close_sync()


def test_a_stuck_before_batch_hook_delays_one_batch_not_every_one(tmp_path: Path, run: Run[None]) -> None:
    # Found by an attack on serve: another process holding the webhook outbox's database locked made
    # every journal batch wait for the outbox's insert (10 s each): SMTP clients waited 15 s for their
    # 250, 5 messages accepted in 15 s. The writer now waits HOOK_WAIT once, then goes on without it.
    from concurrent.futures import Future

    from fastmta.queue import commit

    async def main() -> None:
        spool = Spool(tmp_path / "q")
        never: Future[None] = Future()  # what a stuck hook hands the writer
        spool.before_commit.append(lambda: never)
        took = []
        try:
            for i in range(4):
                started = time.monotonic()
                await spool.add_message(f"m{i}", "s@a.test", ["r@b.test"], b"Subject: x\r\n\r\nhi\r\n")
                took.append(time.monotonic() - started)
        finally:
            never.set_result(None)
            await spool.close()
        assert commit.HOOK_WAIT - 0.2 < took[0] < commit.HOOK_WAIT + 2  # the first batch waited for it
        assert max(took[1:]) < commit.HOOK_WAIT / 2, took  # the others did not

    run(main())
