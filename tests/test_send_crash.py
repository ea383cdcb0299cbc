"""Nothing accepted is lost: `fastmta send` SIGKILLed again and again, then resumed to the end.

Counted where it happens: every copy that reached the sink is a file in its
capture directory; the accounting file is what an operator reads.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from fastmta.cli.sinkproc import embedded_sink
from fastmta.intake.pickup import read_pickup
from postfix_private import proc_stat

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "src" / "fastmta" / "examples" / "spool"

RECIPIENTS = int(os.environ.get("FASTMTA_CRASH_RECIPIENTS", "20000"))
KILLS = int(os.environ.get("FASTMTA_CRASH_KILLS", "20"))
# What a kill may send twice: transactions in flight (10 connections x 2 in
# the pipeline) plus the states delivered but not yet journaled (the spool
# writes state records in batches, every 50 ms).
IN_FLIGHT_WINDOW = 10 * 2 + 400


def make_campaign(spool: Path, n: int) -> list[str]:
    spool.mkdir()
    for name in ("welcome.txt", "welcome.html", "dkim-test-ed25519.key.pem"):
        shutil.copy(EXAMPLE / name, spool / name)
    toml = (EXAMPLE / "welcome.toml").read_text().replace('recipients = "recipients.csv"', 'recipients = "r.csv"')
    (spool / "welcome.toml").write_text(toml)
    rcpts = [f"user{i}@d{i % 97}.example" for i in range(n)]
    with open(spool / "r.csv", "w") as f:
        f.write("email,first_name,last_name,id,signup\n")
        for i, r in enumerate(rcpts):
            f.write(f"{r},First{i},Last,u{i},2026-01-{1 + i % 28:02d}\n")
    # A pickup file too: pickup inputs are resumed as well.
    (spool / "note.eml").write_bytes(
        b"X-Sender: ops@fastmta.example\r\nX-Receiver: pickup@p.example\r\nFrom: ops@fastmta.example\r\n\r\nhi\r\n"
    )
    return rcpts + ["pickup@p.example"]


def send_cmd(spool: Path, queue: Path, acct: Path, host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "fastmta", "send", str(spool), "--relay", f"{host}:{port}", "--quiet",
            "--queue-dir", str(queue), "--accounting", str(acct)]


def test_sigkill_at_random_moments_loses_nothing(tmp_path: Path, world_writable_dir: Path) -> None:
    spool, queue, acct = tmp_path / "spool", tmp_path / "queue", tmp_path / "acct.jsonl"
    expected = make_campaign(spool, RECIPIENTS)
    capture = world_writable_dir
    rng = random.Random(20261122)
    kills = 0
    with embedded_sink(["--capture", str(capture)]) as (host, port):
        cmd = send_cmd(spool, queue, acct, host, port)
        deadline = time.monotonic() + 600
        while kills < KILLS and time.monotonic() < deadline:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(rng.uniform(0.4, 1.6))
            if proc.poll() is not None:
                _, err = proc.communicate()
                assert proc.returncode == 0, err.decode()[-2000:]
                break  # finished before we could kill it
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            assert proc.stderr is not None
            proc.stderr.close()
            kills += 1
        # The last run goes to the end on its own.
        final = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert final.returncode == 0, final.stderr[-3000:]

    copies: Counter[str] = Counter()
    for f in capture.glob("*.eml"):
        for r in read_pickup(f).recipients:
            copies[r] += 1
    missing = set(expected) - set(copies)
    assert not missing, f"{len(missing)} recipients never arrived, e.g. {sorted(missing)[:5]}"
    assert set(copies) == set(expected)
    duplicates = sum(n - 1 for n in copies.values())
    assert duplicates <= max(kills, 1) * IN_FLIGHT_WINDOW, (duplicates, kills)

    delivered: Counter[str] = Counter()
    for line in acct.read_text().splitlines():
        rec = json.loads(line)
        if rec["status"] == "delivered":
            delivered[rec["recipient"]] += 1
        else:
            assert rec["status"] == "deferred", rec  # nothing bounced or expired here
    # Every recipient is accounted as delivered, and never more often than the sink got it.
    assert set(delivered) == set(expected)
    assert all(delivered[r] <= copies[r] for r in expected)
    assert kills >= min(KILLS, 5), f"only {kills} kills happened: the runs finished too fast to test anything"
    print(f"\n{kills} SIGKILLs, {len(expected)} recipients, {duplicates} duplicates at the sink")


def test_rerun_after_completion_sends_nothing(tmp_path: Path) -> None:
    spool, queue, acct = tmp_path / "spool", tmp_path / "queue", tmp_path / "acct.jsonl"
    make_campaign(spool, 50)
    with embedded_sink() as (host, port):
        cmd = send_cmd(spool, queue, acct, host, port)
        first = subprocess.run(cmd + ["--summary-json", str(tmp_path / "s1.json")], capture_output=True, timeout=120)
        assert first.returncode == 0, first.stderr
        second = subprocess.run(cmd + ["--summary-json", str(tmp_path / "s2.json")], capture_output=True, timeout=120)
        assert second.returncode == 0, second.stderr
    s1 = json.loads((tmp_path / "s1.json").read_text())
    s2 = json.loads((tmp_path / "s2.json").read_text())
    assert s1["delivered"] == 51
    # Read in an intake process (the default), whose memory is reported beside the sender's own.
    assert s1["intake_peak_rss_bytes"] > 10_000_000 and s1["peak_rss_bytes"] > 10_000_000
    assert s2["delivered"] == 0 and s2["inputs_already_done"] == 2 and s2["resumed_recipients"] == 0
    assert len(acct.read_text().splitlines()) == 51


def test_a_finished_queue_whose_input_progress_is_damaged_is_refused_not_sent_again(tmp_path: Path) -> None:
    # Found by a fault-injection attack: one damaged record of what a finished campaign had taken, and
    # the next run read it again and sent every row a second time, exit 0. One flipped bit is repaired
    # now (tests/test_spool_corruption.py); damage beyond that is refused, the queue left as it is.
    from fastmta.queue.journal import ScanReport, scan
    from fastmta.queue.journal_records import InputRecord, record_decoder
    from fastmta.queue.spool import Spool

    spool, queue, acct = tmp_path / "spool", tmp_path / "queue", tmp_path / "acct.jsonl"
    make_campaign(spool, 300)
    with embedded_sink() as (host, port):
        cmd = send_cmd(spool, queue, acct, host, port)
        first = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert first.returncode == 0, first.stderr[-2000:]
        Spool(queue, compact_min_bytes=0).close_sync()  # compacted, as a larger run's queue is at its end
        journal = queue / "journal"
        with open(journal, "rb") as f:
            [(off, n)] = [
                (o, len(p)) for o, p in scan(f, ScanReport())
                if isinstance(r := record_decoder.decode(p), InputRecord) and r.key.startswith("campaign:")
            ]
        damaged = bytearray(journal.read_bytes())
        damaged[off + 12 : off + 12 + n] = bytes(n)  # a zeroed block: beyond repair
        journal.write_bytes(bytes(damaged))
        sent = len(acct.read_text().splitlines())
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert second.returncode == 1, second.stderr[-2000:]
        assert "taken from the inputs" in second.stderr and "--accept-lost-progress" in second.stderr
        assert journal.read_bytes() == bytes(damaged) and len(acct.read_text().splitlines()) == sent
        # The operator's choice, said in the help: the campaign is read, and sent, again.
        third = subprocess.run(cmd + ["--accept-lost-progress", "--summary-json", str(tmp_path / "s.json")],
                               capture_output=True, text=True, timeout=300)
    # Exit 1: the unreadable record might have been a message's (its bytes do not say), reported as such.
    assert third.returncode == 1, third.stderr[-2000:]
    assert "input progress lost" in third.stderr and "could not be recovered" in third.stderr
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["delivered"] == 300 and [lost["message_id"] for lost in summary["lost"]] == [None]


def test_a_run_with_nothing_to_do_compacts_without_a_false_warning(tmp_path: Path) -> None:
    # Found by a fault-injection attack: on a finished queue whose journal is over 64 KB (the row keys
    # of a large campaign), a run with nothing to do warned "final compaction failed: the committer
    # has not started", and the journal was never compacted.
    spool, queue, acct = tmp_path / "spool", tmp_path / "queue", tmp_path / "acct.jsonl"
    make_campaign(spool, 12_000)
    with embedded_sink() as (host, port):
        cmd = send_cmd(spool, queue, acct, host, port)
        first = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert first.returncode == 0, first.stderr[-2000:]
        journal = queue / "journal"
        assert journal.exists() and journal.stat().st_size > 64 * 1024  # the row keys alone
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "compaction failed" not in second.stderr, second.stderr[-2000:]


def _kill_after_commits(cmd: list[str], commits: int) -> int:
    """Run *cmd* with the spool told to SIGKILL itself right after its Nth durable commit; its exit status."""
    env = {**os.environ, "FASTMTA_FAULT_KILL_AFTER_COMMITS": str(commits)}
    return subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300).returncode


# Per kill: transactions in flight (10 connections x 2 in the pipeline, 50
# recipients each for a pickup) plus recipient states delivered but not yet
# journaled (written every 50 ms). Input taken twice would be far more: a
# whole pickup file (100,000) or every campaign row read again.
AIMED_WINDOW = 10 * 2 * 50 + 2000


def _copies(capture: Path) -> Counter[str]:
    copies: Counter[str] = Counter()
    for f in capture.glob("*.eml"):
        for r in read_pickup(f).recipients:
            copies[r] += 1
    return copies


def test_sigkill_right_after_a_big_pickup_file_is_durable_takes_it_once(tmp_path: Path, world_writable_dir: Path) -> None:
    # Before: the record that the file was taken followed in a later batch;
    # a kill in between read the whole file again as a new message (3 of 3).
    spool, queue, acct = tmp_path / "spool", tmp_path / "queue", tmp_path / "acct.jsonl"
    spool.mkdir()
    rcpts = [f"u{i}@p{i % 13}.example" for i in range(100_000)]
    (spool / "big.eml").write_bytes(
        b"X-Sender: ops@fastmta.example\r\n"
        + b"".join(b"X-Receiver: " + r.encode() + b"\r\n" for r in rcpts)
        + b"From: ops@fastmta.example\r\nSubject: big\r\n\r\nhello\r\n"
    )
    kills = 0
    with embedded_sink(["--capture", str(world_writable_dir)]) as (host, port):
        cmd = send_cmd(spool, queue, acct, host, port)
        for commits in (1, 1, 2, 3, 5):  # the first kill lands right after the file's message is durable
            if _kill_after_commits(cmd, commits) == -signal.SIGKILL:
                kills += 1
        final = subprocess.run(cmd + ["--summary-json", str(tmp_path / "s.json")], capture_output=True, text=True,
                               timeout=600)
        assert final.returncode == 0, final.stderr[-3000:]
    copies = _copies(world_writable_dir)
    assert set(copies) == set(rcpts), f"{len(set(rcpts) - set(copies))} missing"
    duplicates = sum(n - 1 for n in copies.values())
    assert kills >= 3
    assert duplicates <= kills * AIMED_WINDOW, (duplicates, kills)
    assert max(copies.values()) <= 1 + kills  # never a whole second copy of the file


def test_sigkill_right_after_campaign_commits_takes_each_row_once(tmp_path: Path, world_writable_dir: Path) -> None:
    spool, queue, acct = tmp_path / "spool", tmp_path / "queue", tmp_path / "acct.jsonl"
    expected = make_campaign(spool, 5000)
    rng = random.Random(7)
    kills = 0
    with embedded_sink(["--capture", str(world_writable_dir)]) as (host, port):
        cmd = send_cmd(spool, queue, acct, host, port)
        for _ in range(12):  # each run dies right after one of its first commits
            if _kill_after_commits(cmd, rng.randint(1, 12)) == -signal.SIGKILL:
                kills += 1
        final = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert final.returncode == 0, final.stderr[-3000:]
    copies = _copies(world_writable_dir)
    assert set(copies) == set(expected)
    duplicates = sum(n - 1 for n in copies.values())
    assert kills >= 6
    # Only what was in flight at the receiver at each kill: 20 transactions of
    # one recipient, plus states not yet journaled.
    assert duplicates <= kills * (10 * 2 + 400), (duplicates, kills)
    # Sharper: a resent in-flight message is the same message (same
    # Message-ID, rendered once); a row read twice is a new one. Never.
    rendered: dict[str, set[bytes]] = {}
    for f in world_writable_dir.glob("*.eml"):
        msg = read_pickup(f)
        mid = next((line for line in msg.content.split(b"\r\n") if line.lower().startswith(b"message-id:")), None)
        if mid is None:
            continue  # the pickup file (counted above)
        for r in msg.recipients:
            rendered.setdefault(r, set()).add(mid)
    read_twice = {r: ids for r, ids in rendered.items() if len(ids) > 1}
    assert not read_twice, f"{len(read_twice)} rows were taken twice, e.g. {sorted(read_twice)[:3]}"


def test_a_damaged_queued_body_is_reported_lost_not_silently_kept(tmp_path: Path) -> None:
    # Before: damage in an undelivered message's body lost it while
    # the run exited 0 with "not final 0" (the message stayed queued for ever).
    from fastmta.queue.spool import Spool

    spool, queue, acct = tmp_path / "spool", tmp_path / "queue", tmp_path / "acct.jsonl"
    make_campaign(spool, 3000)
    with embedded_sink() as (host, port):
        cmd = send_cmd(spool, queue, acct, host, port)
        assert _kill_after_commits(cmd, 3) == -signal.SIGKILL  # leaves accepted, unfinished messages
        s = Spool(queue)
        victim = next(m for m in s.take_recovered() if m.body is not None)
        assert victim.body is not None
        s.close_sync()
        segment = queue / "data" / f"{victim.body.seg:08d}.dat"
        data = bytearray(segment.read_bytes())
        data[victim.body.off + victim.body.size // 2] ^= 0x11  # two bits, inside the body (one is repaired)
        segment.write_bytes(bytes(data))
        out = subprocess.run(cmd + ["--summary-json", str(tmp_path / "s.json")], capture_output=True, text=True,
                             timeout=600)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "could not be recovered" in out.stderr
    summary = json.loads((tmp_path / "s.json").read_text())
    [lost] = summary["lost"]
    assert lost["message_id"] == victim.id and lost["recipients"] == [r.address for r in victim.recipients]
    records = [json.loads(line) for line in acct.read_text().splitlines()]
    assert [r["recipient"] for r in records if r["status"] == "lost"] == lost["recipients"]
    assert summary["unfinished"] == 0  # nothing left queued for ever


def test_rows_whose_records_a_damaged_queue_lost_are_sent_by_reread_inputs(
    tmp_path: Path, world_writable_dir: Path
) -> None:
    # Found by a fault-injection attack: a campaign message whose Add record was damaged beyond repair
    # was reported lost, and nothing could send its row again: the row was taken as far as the input's
    # progress said. `--reread-inputs` reads every input from its first row and sends only the rows not
    # recorded as taken: exactly those.
    from fastmta.queue.journal import ScanReport, scan
    from fastmta.queue.journal_records import AddRecord, record_decoder
    from fastmta.queue.spool import Spool

    spool, queue, acct = tmp_path / "spool", tmp_path / "queue", tmp_path / "acct.jsonl"
    expected = make_campaign(spool, 2000)
    with embedded_sink(["--capture", str(world_writable_dir)]) as (host, port):
        cmd = send_cmd(spool, queue, acct, host, port)
        journal = queue / "journal"
        kills = 0
        while kills < 5:  # until a kill leaves unsent rows behind the input's recorded progress
            kills += 1
            assert _kill_after_commits(cmd, 3) == -signal.SIGKILL
            s = Spool(queue)
            arrived = set(_copies(world_writable_dir))
            victims = {  # campaign rows not sent yet (not in flight at the kill either)
                m.id for m in s.take_recovered()
                if m.meta.get("job") and not {r.address for r in m.recipients} & arrived
            }
            with open(journal, "rb") as f:
                adds = [(o, len(p), r) for o, p in scan(f, ScanReport())
                        if isinstance(r := record_decoder.decode(p), AddRecord) and r.id in victims]
            # Before the input's recorded progress: a rerun reads on from there, not again from them.
            frames = [(o, n, r) for o, n, r in adds if r.take is not None
                      and r.take.row < s.input_by_id(r.take.input).row][:3]  # type: ignore[union-attr]
            s.close_sync()
            if len(frames) == 3:
                break
        assert len(frames) == 3, len(adds)
        damaged = bytearray(journal.read_bytes())
        for off, n, _ in frames:
            damaged[off + 12 + n // 2] ^= 0x41  # two bits: beyond repair
        journal.write_bytes(bytes(damaged))
        lost_rcpts = {r for _, _, rec in frames for r in rec.rcpts}
        second = subprocess.run(cmd + ["--summary-json", str(tmp_path / "s2.json")], capture_output=True,
                                text=True, timeout=600)
        assert second.returncode == 1 and "--reread-inputs" in second.stderr, second.stderr[-3000:]
        assert len(json.loads((tmp_path / "s2.json").read_text())["lost"]) == 3
        assert not lost_rcpts & set(_copies(world_writable_dir))  # never sent
        third = subprocess.run(cmd + ["--reread-inputs", "--summary-json", str(tmp_path / "s3.json")],
                               capture_output=True, text=True, timeout=600)
        assert third.returncode == 0, third.stderr[-3000:]
    assert json.loads((tmp_path / "s3.json").read_text())["delivered"] == 3  # those rows, and no other
    copies = _copies(world_writable_dir)
    assert set(copies) == set(expected)
    assert sum(n - 1 for n in copies.values()) <= kills * IN_FLIGHT_WINDOW  # the kills' in-flight windows


def _children(pid: int) -> list[int]:
    """The processes whose parent is *pid* (its intake process)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = proc_stat(int(entry.name))
            if st is not None and int(st[1]) == pid:
                found.append(int(entry.name))
    return found


def test_a_killed_intake_process_stops_the_reading_and_the_rerun_sends_the_rest_once(
    tmp_path: Path, world_writable_dir: Path
) -> None:
    """The reading process dies mid-campaign: what it handed over is delivered, the run says so and exits 1,
    and the next run reads the rest: every recipient exactly once (the sending process never crashed)."""
    spool, queue, acct = tmp_path / "spool", tmp_path / "queue", tmp_path / "acct.jsonl"
    expected = make_campaign(spool, 8000)
    config = tmp_path / "c.toml"
    # A small queue: the sending side takes rows slowly, so the reader is still at work when it is killed.
    config.write_text('[queue]\nmax_queued_recipients = 50\n[smtp]\ntls = "never"\n')
    with embedded_sink(["--capture", str(world_writable_dir)]) as (host, port):
        cmd = send_cmd(spool, queue, acct, host, port) + ["--config", str(config)]
        proc = subprocess.Popen(cmd + ["--summary-json", str(tmp_path / "s1.json")], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        killed = None
        while killed is None and time.monotonic() < deadline and proc.poll() is None:
            children = _children(proc.pid)
            if children and len(list(world_writable_dir.glob("*.eml"))) >= 100:
                os.kill(children[0], signal.SIGKILL)
                killed = children[0]
            time.sleep(0.02)
        _, err = proc.communicate(timeout=120)
        assert killed is not None, "the run ended before its intake process could be killed"
        assert proc.returncode == 1, err[-2000:]
        assert "stopped reading the spool" in err and "killed by signal 9" in err
        first = json.loads((tmp_path / "s1.json").read_text())
        assert first["intake_error"] and first["unfinished"] == 0
        assert 100 <= first["delivered"] < len(expected)
        final = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert final.returncode == 0, final.stderr[-3000:]
    copies = _copies(world_writable_dir)
    assert set(copies) == set(expected)
    assert max(copies.values()) == 1, [r for r, n in copies.items() if n > 1][:5]


def test_rows_rejected_before_a_crash_are_still_reported_by_the_rerun(tmp_path: Path) -> None:
    # A rejected row is marked done in the queue, so no later run reads it again; its report lived only
    # in memory until exit. Killed after the rows were rejected, the rerun reported nothing and exited 0
    # (found by a fault-injection attack): bad input silently dropped.
    spool, queue, acct = tmp_path / "spool", tmp_path / "queue", tmp_path / "acct.jsonl"
    make_campaign(spool, 3000)
    lines = (spool / "r.csv").read_text().splitlines()
    lines[1 + 3] = "not-an-address,Bad,Row,u3,2026-01-01"
    lines[1 + 5] = lines[1 + 2]  # the same recipient again
    lines[1 + 7] = "also bad@@x,Bad,Row,u7,2026-01-01"
    (spool / "r.csv").write_text("\n".join(lines) + "\n")
    rejects = tmp_path / "rejects.jsonl"
    with embedded_sink() as (host, port):
        cmd = send_cmd(spool, queue, acct, host, port) + ["--rejects", str(rejects)]
        assert _kill_after_commits(cmd, 3) == -signal.SIGKILL
        final = subprocess.run(cmd + ["--summary-json", str(tmp_path / "s.json")], capture_output=True, text=True,
                               timeout=300)
        reported = [json.loads(line) for line in rejects.read_text().splitlines()]
        again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert final.returncode == 3, final.stderr[-3000:]
    assert sorted((Path(r["file"]).name, r["line"]) for r in reported) == [("r.csv", 5), ("r.csv", 7), ("r.csv", 9)]
    assert json.loads((tmp_path / "s.json").read_text())["rejected"] == reported
    # Reported once: the run after the one that reported them has nothing to say.
    assert again.returncode == 0 and rejects.read_text() == ""
    delivered = {json.loads(line)["recipient"] for line in acct.read_text().splitlines()
                 if json.loads(line)["status"] == "delivered"}
    assert len(delivered) == 3000 - 3 + 1  # every good row (and the pickup file), none of the bad


def test_a_queued_message_that_cannot_be_read_now_is_not_final_and_waits(tmp_path: Path) -> None:
    # Found by reading the resume path: an I/O error reading a queued message's body (not damage: an
    # EIO, an EACCES) stopped the start with a traceback (a read's OSError), or was logged and skipped
    # (an open's), the run ending with exit 0 and nothing "not final" while the message sat in the
    # queue. It is now counted as not final (exit 1), and the next run sends it.
    import asyncio

    from fastmta.cli.sinkproc import embedded_sink
    from fastmta.queue.spool import Spool
    from test_send import fastmta

    queue = tmp_path / "q"

    async def add() -> None:
        spool = Spool(queue)
        await spool.add_message("m1", "s@a.test", ["r@b.test"], b"Subject: x\r\n\r\nhi\r\n")
        await spool.close()

    asyncio.run(add())
    [segment] = [p for p in (queue / "data").iterdir() if p.is_file()]
    saved = segment.read_bytes()
    segment.unlink()
    segment.mkdir()  # reading it fails with EISDIR (as root, a mode cannot make it fail)
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    with embedded_sink(["--no-starttls"]) as (host, port):
        cfg = tmp_path / "fastmta.toml"
        cfg.write_text(f'[routing.static]\n"*" = ["{host}:{port}"]\n[smtp]\ntls = "never"\n')
        acct = tmp_path / "acct.jsonl"
        args = ("send", str(spool_dir), "--config", str(cfg), "--queue-dir", str(queue), "--accounting", str(acct))
        first = fastmta(*args, timeout=60)
        assert first.returncode == 1, first.stderr
        assert "1 recipient(s) did not reach a final state" in first.stderr
        assert "message m1 cannot be read now" in first.stderr
        segment.rmdir()
        segment.write_bytes(saved)
        second = fastmta(*args, timeout=60)
    assert second.returncode == 0, second.stderr
    assert [json.loads(line)["status"] for line in acct.read_text().splitlines()] == ["delivered"]
