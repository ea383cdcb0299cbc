"""The spool under real crashes (SIGKILL of a writing process) and at scale (recovery time of a large journal)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

from fastmta.queue.journal import frame
from fastmta.queue.journal_records import AddRecord as _Add
from fastmta.queue.journal_records import InputRecord as _Input
from fastmta.queue.journal_records import SourceRef
from fastmta.queue.journal_records import StateRecord as _State
from fastmta.queue.journal_records import record_encoder as _encoder
from fastmta.queue.records import Status
from fastmta.queue.spool import Spool

# The child adds messages as fast as it can (50 concurrent adds, real fsync,
# frequent auto-compaction) and prints a line only *after* the awaited call
# returned: "A id" = add durable, "S id" = its recipient states are durable.
CHILD = r"""
import asyncio, sys
from fastmta.queue.records import Status
from fastmta.queue.spool import Spool

async def main() -> None:
    spool = Spool(sys.argv[1], commit_interval=0.001, flush_interval=0.003, compact_min_bytes=30_000, compact_ratio=1.5)
    prefix = sys.argv[2]
    print("R", len(spool.take_recovered()), flush=True)

    async def one(i: int) -> None:
        mid = f"{prefix}-{i}"
        await spool.add_message(mid, "s@a.example", [f"a{i}@x.example", f"b{i}@x.example", f"c{i}@x.example"], b"x" * (i % 700))
        print("A", mid, flush=True)
        spool.record(mid, 0, Status.DELIVERED, attempts=1)
        spool.record(mid, 1, Status.DEFERRED, attempts=1, next_attempt=1000.0 + i)
        if i % 2:
            spool.record(mid, 2, Status.BOUNCED, attempts=1)
        await spool.sync()
        print("S", mid, flush=True)

    tasks: set[asyncio.Task[None]] = set()
    i = 0
    while True:
        t = asyncio.ensure_future(one(i))
        tasks.add(t)
        t.add_done_callback(tasks.discard)
        i += 1
        if len(tasks) >= 50:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)

asyncio.run(main())
"""


def test_sigkill_while_writing_recovers_consistently(tmp_path: Path) -> None:
    rng = random.Random(6)
    added: set[str] = set()
    synced: set[str] = set()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for run in range(5):
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(tmp_path), f"r{run}"],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert proc.stdout is not None
        target = rng.randrange(200, 1500)
        seen = 0
        for line in proc.stdout:
            kind, _, mid = line.strip().partition(" ")
            if kind == "A":
                added.add(mid)
                seen += 1
                if seen >= target:
                    break
            elif kind == "S":
                synced.add(mid)
        time.sleep(rng.random() * 0.02)  # land anywhere: mid-write, mid-fsync, mid-compaction
        os.kill(proc.pid, signal.SIGKILL)
        for line in proc.stdout:  # lines printed before the kill still count
            kind, _, mid = line.strip().partition(" ")
            if mid and line.endswith("\n"):
                (added if kind == "A" else synced if kind == "S" else set()).add(mid)
            else:
                print("odd line", repr(line))
        proc.wait()
        assert proc.returncode == -signal.SIGKILL

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a torn tail is expected here
            spool = Spool(tmp_path)
        msgs = {m.id: m for m in spool.take_recovered()}
        # Every completed add is there (recipient b is never final, so none may be missing).
        assert added <= set(msgs), sorted(added - set(msgs))[:5]
        assert spool.report.undecodable == 0
        assert spool.report.skipped_bytes == spool.report.torn_tail_bytes  # only a torn tail, no damage
        for mid in added:
            m = msgs[mid]
            i = int(mid.rsplit("-", 1)[1])
            assert m.body is not None and spool.read_body(m.body) == b"x" * (i % 700)
            rcpts = {r.index: r for r in m.recipients}
            if mid in synced:
                # Finished recipients are never returned; the deferred one keeps its schedule.
                assert 0 not in rcpts
                assert (rcpts[1].status, rcpts[1].next_attempt) == (Status.DEFERRED, 1000.0 + i)
                assert (2 in rcpts) == (i % 2 == 0)
        for mid in msgs:
            # Nothing invented: the rest are adds that completed just as the kill came.
            assert mid in added or any(mid.startswith(f"r{k}-") for k in range(run + 1)), mid
        assert len(added) > 0 and len(synced) > 0
        spool.close_sync()


def _write_journal(path: Path, n_messages: int) -> int:
    """A campaign-shaped journal: per recipient one Add (by source reference) and one State."""
    enc = _encoder.encode
    records = 0
    with open(path / "journal", "wb") as f:
        f.write(frame(enc(_Input(1, "/spool/jobs/campaign.toml", "1700000000:12345", 0, False))))
        chunk: list[bytes] = []
        for i in range(n_messages):
            mid = f"18c2f4a1b2c3{i:010x}"
            chunk.append(
                frame(
                    enc(
                        _Add(
                            mid,
                            "bounces@news.example.com",
                            [f"user{i}@example.org"],
                            1.7e9,
                            None,
                            SourceRef(1, i, i * 60),
                            {"job": "welcome"},
                        )
                    )
                )
            )
            if i % 50 == 0:
                chunk.append(frame(enc(_State(mid, 0, 4, 1, 1.7e9 + 600))))  # deferred: stays live
            else:
                chunk.append(frame(enc(_State(mid, 0, 1, 1))))
            if len(chunk) >= 10000:
                f.write(b"".join(chunk))
                records += len(chunk)
                chunk = []
        f.write(b"".join(chunk))
        records += len(chunk) + 1
    return records


def test_recovery_of_a_large_journal_is_fast(tmp_path: Path) -> None:
    # 1,000,000 records with FASTMTA_SPOOL_BIG=1; 200,000 in the normal suite (keeps it fast).
    n = 500_000 if os.environ.get("FASTMTA_SPOOL_BIG") else 100_000
    (tmp_path / "data").mkdir()
    records = _write_journal(tmp_path, n)
    started = time.perf_counter()
    spool = Spool(tmp_path, fsync=lambda fd: None, compact_min_bytes=1 << 40)
    elapsed = time.perf_counter() - started
    msgs = spool.take_recovered()
    assert spool.report.records == records
    assert len(msgs) == n // 50
    assert spool.input("/spool/jobs/campaign.toml").row == n  # type: ignore[union-attr]
    print(f"\nrecovered {records} records in {elapsed:.2f}s ({records / elapsed:,.0f} records/s)")
    assert elapsed < 10 * records / 1_000_000 + 1  # generous: loaded CI machines
    spool.close_sync()
