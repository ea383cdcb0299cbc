"""The spool reader in a forked process (fastmta.intake.process): same events, failures never mistaken for the end."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fastmta.intake.items import Event, InputSkipped, Reject, SpoolItem
from fastmta.intake.process import IntakeError, IntakeProcess
from fastmta.intake.reader import SpoolReader
from postfix_private import proc_alive

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "src" / "fastmta" / "examples" / "spool"


def collect(events: Any) -> tuple[list[Event], IntakeProcess]:
    """Every event of *events* through an intake process, and the process (reaped)."""

    async def main() -> tuple[list[Event], IntakeProcess]:
        intake = IntakeProcess(iter(events))
        await intake.start()
        try:
            return [e async for e in intake.events()], intake
        finally:
            await intake.close()

    return asyncio.run(main())


def failure(events: Any) -> tuple[list[Event], IntakeError]:
    """The events handed over before the intake process failed, and its error."""

    async def main() -> tuple[list[Event], IntakeError]:
        intake = IntakeProcess(iter(events))
        await intake.start()
        got: list[Event] = []
        try:
            with pytest.raises(IntakeError) as info:
                async for e in intake.events():
                    got.append(e)
                    if len(got) == 1 and isinstance(e, Reject) and e.reason == "kill me":
                        assert intake.pid is not None
                        os.kill(intake.pid, signal.SIGKILL)
            return got, info.value
        finally:
            await intake.close()

    return asyncio.run(main())


def pickup(path: Path, rcpt: str, subject: str) -> None:
    path.write_bytes(f"X-Sender: a@example.com\r\nX-Receiver: {rcpt}\r\nFrom: a@example.com\r\nTo: {rcpt}\r\n"
                     f"Subject: {subject}\r\n\r\nbody\r\n".encode())


def key(e: Event) -> tuple[Any, ...]:
    """What must be equal between the inline and the forked reading (campaign bodies carry a Date and a
    Message-ID of their own, and so does a pickup file without them: those are left out)."""
    if isinstance(e, SpoolItem):
        body = re.sub(rb"\r\nDate: [^\r\n]*\r\nMessage-ID: <[^>]*>\r\n", b"\r\n", e.content) if e.key == "pickup:files" else None
        return ("item", e.sender, tuple(e.recipients), e.source, e.line, e.key, e.row, e.take_key, e.meta, body)
    return (type(e).__name__, *(getattr(e, f.name) for f in dataclasses.fields(e)))


def test_the_forked_reader_yields_what_the_inline_one_does(tmp_path: Path) -> None:
    import shutil

    spool = tmp_path / "spool"
    shutil.copytree(EXAMPLE, spool)
    pickup(spool / "x1.eml", "x@example.net", "one")
    pickup(spool / "x2.eml", "x@example.net", "one")  # the same content: the same message
    (spool / "x3.eml").write_bytes(b"X-Receiver: nobody\r\n\r\n")  # bad: reported with its file
    inline = list(SpoolReader(spool))
    forked, intake = collect(SpoolReader(spool))
    assert [key(e) for e in forked] == [key(e) for e in inline]
    items = [e for e in forked if isinstance(e, SpoolItem)]
    assert len(items) > 10 and any(e.key.startswith("campaign:") for e in items)
    # Signed in the child: every campaign message carries its DKIM signature.
    assert all(b"DKIM-Signature:" in e.content for e in items if e.key.startswith("campaign:"))
    assert [e.source for e in forked if isinstance(e, InputSkipped)] == [str(spool / "x2.eml")]
    assert any(isinstance(e, Reject) and e.source.endswith("x3.eml") for e in forked)
    # Reaped, with its resource usage: its CPU counts in the parent's children's times.
    assert intake.status == 0 and intake.rusage is not None


def test_a_large_stream_arrives_whole_and_in_order() -> None:
    n = 3000
    events = (SpoolItem(os.urandom(200 + i % 900), "a@example.com", [f"r{i}@example.net"], "gen", i, row=i)
              for i in range(n))
    forked, _ = collect(events)
    assert [e.row for e in forked if isinstance(e, SpoolItem)] == list(range(n))


def test_a_batch_before_a_quiet_stretch_is_handed_over_without_waiting_for_it() -> None:
    # A campaign run again skips the rows taken before without yielding anything: the
    # event read just before such a stretch must not wait for its end (or for 63 more).
    quiet = 3.0

    def events() -> Iterator[Event]:
        yield Reject("a.csv", 1, "before the stretch")
        time.sleep(quiet)  # skipping taken rows
        yield Reject("a.csv", 2, "after it")

    async def main() -> list[tuple[str, float]]:
        intake = IntakeProcess(iter(events()))
        started = time.monotonic()
        await intake.start()
        try:
            return [(e.reason, time.monotonic() - started) async for e in intake.events() if isinstance(e, Reject)]
        finally:
            await intake.close()

    got = asyncio.run(main())
    assert [reason for reason, _ in got] == ["before the stretch", "after it"]
    assert got[0][1] < 1.5  # handed over by the child's timer, not at the end of the stretch
    assert got[1][1] >= quiet


def test_a_batch_the_timer_could_not_send_is_never_followed_by_an_end() -> None:
    # Found by a review: the timer thread's failed send lost its batch, and if no event came after,
    # the child still wrote END: the parent would have taken a partial reading for the whole spool.
    import pickle

    from fastmta.intake.process import _END, _Batcher

    r, w = os.pipe()
    try:
        batcher = _Batcher(w)
        batcher.add(Reject("a.eml", 1, "fine"))
        batcher.add(lambda: None)  # type: ignore[arg-type]  # cannot be pickled: the timer's send fails
        time.sleep(0.4)
        with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
            batcher.finish(_END)
        os.set_blocking(r, False)
        with pytest.raises(BlockingIOError):
            os.read(r, 1)  # nothing was written: no END frame
    finally:
        os.close(r)
        os.close(w)


def test_an_exception_in_the_child_is_raised_in_the_parent_after_what_came_before() -> None:
    def events() -> Iterator[Event]:
        yield Reject("a.eml", 1, "first")
        raise RuntimeError("the template engine broke")

    got, error = failure(events())
    assert [e.reason for e in got if isinstance(e, Reject)] == ["first"]
    assert "the template engine broke" in str(error) and "RuntimeError" in str(error)


def test_a_killed_child_is_an_error_not_the_end_of_the_spool() -> None:
    def events() -> Iterator[Event]:
        yield Reject("a.eml", 1, "kill me")
        for i in range(10_000):  # more than a batch: the parent sees the first one while this one waits
            yield Reject("b.eml", i, "later")
            time.sleep(0.001)

    got, error = failure(events())
    assert "ended before the end of the spool" in str(error) and "signal 9" in str(error)
    assert len(got) < 10_000


def test_close_stops_a_child_that_is_still_reading() -> None:
    def events() -> Iterator[Event]:
        for i in range(10**9):
            yield Reject("a.eml", i, "x" * 1000)  # fills the pipe, then blocks

    async def main() -> int:
        intake = IntakeProcess(iter(events()))
        await intake.start()
        agen = intake.events()
        await agen.__anext__()
        await agen.aclose()
        await intake.close()
        assert intake.pid is not None
        return intake.pid

    pid = asyncio.run(main())
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reaped: no zombie left behind


def test_ctrl_c_and_sigterm_are_the_parents_the_child_reads_on() -> None:
    def events() -> Iterator[Event]:
        for i in range(50):
            yield Reject("a.eml", i, "slow")
            time.sleep(0.01)

    async def main() -> list[Event]:
        intake = IntakeProcess(iter(events()))
        await intake.start()
        assert intake.pid is not None
        os.kill(intake.pid, signal.SIGINT)  # as a terminal's Ctrl-C reaches the whole process group
        os.kill(intake.pid, signal.SIGTERM)  # as a service manager stops the whole group
        try:
            return [e async for e in intake.events()]
        finally:
            await intake.close()

    assert len(asyncio.run(main())) == 50


def test_the_child_dies_with_a_killed_parent(tmp_path: Path) -> None:
    script = textwrap.dedent("""
        import asyncio, sys, time
        from fastmta.intake.items import Reject
        from fastmta.intake.process import IntakeProcess

        def events():
            for i in range(10**9):
                yield Reject("a.eml", i, "slow")
                time.sleep(0.01)

        async def main():
            intake = IntakeProcess(iter(events()))
            await intake.start()
            print(intake.pid, flush=True)
            async for _ in intake.events():
                pass

        asyncio.run(main())
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        os.kill(child, 0)  # running
    finally:
        parent.kill()
        parent.wait(timeout=30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not proc_alive(child):
            return
        time.sleep(0.05)
    os.kill(child, signal.SIGKILL)
    raise AssertionError("the intake process outlived its killed parent")


def test_a_copy_of_a_job_is_reported_not_sent_twice(tmp_path: Path) -> None:
    """Two jobs with one campaign id: the second is rejected as a whole, in both modes (the forked reader only
    sees the queue as it was when it started, so it could not tell the first job's rows were taken)."""
    import shutil

    spool = tmp_path / "spool"
    shutil.copytree(EXAMPLE, spool)
    for p in spool.glob("*.eml"):
        p.unlink()
    shutil.copy(spool / "welcome.toml", spool / "welcome2.toml")
    for events in (list(SpoolReader(spool)), collect(SpoolReader(spool))[0]):
        items = [e for e in events if isinstance(e, SpoolItem)]
        rows = [e.take_key for e in items]
        assert len(rows) == len(set(rows)) > 100
        assert {e.source for e in items} == {str(spool / "recipients.csv")}
        rejects = [e for e in events if isinstance(e, Reject)]
        assert [(e.source, e.row) for e in rejects] == [(str(spool / "welcome2.toml"), 0)]
        assert "also the id of welcome.toml" in rejects[0].reason


def test_kill_ends_a_wait_for_a_child_that_has_gone_quiet() -> None:
    """fastmta send kills the child at Ctrl-C: a wait for its next event (a hung file system) ends at once."""

    def events() -> Iterator[Event]:
        yield Reject("a.eml", 1, "first")
        time.sleep(120)  # quiet
        yield Reject("b.eml", 2, "never")

    async def main() -> tuple[float, str]:
        intake = IntakeProcess(iter(events()))
        await intake.start()
        asyncio.get_running_loop().call_later(0.5, intake.kill)
        t0 = time.monotonic()
        try:
            with pytest.raises(IntakeError) as info:
                async for _ in intake.events():
                    pass
            return time.monotonic() - t0, str(info.value)
        finally:
            await intake.close()

    waited, why = asyncio.run(main())
    assert waited < 10 and "signal 9" in why


def test_an_item_pickles_with_every_field() -> None:
    """SpoolItem pickles as its constructor's arguments (faster to load): none may be left out."""
    import pickle

    item = SpoolItem(b"X: y\r\n\r\nz\r\n", "a@example.com", ["b@example.net"], "s.csv", 7, {"job": "j"}, "campaign:j",
                     7, 2**63 + 5)
    assert pickle.loads(pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)) == item
    # Every field is one of the constructor's arguments, in order (a field added later must be added there too).
    assert [f.name for f in dataclasses.fields(SpoolItem)] == list(SpoolItem.__init__.__code__.co_varnames[1:11])
    assert len(item.__reduce__()[1]) == len(dataclasses.fields(SpoolItem))


def test_the_child_does_not_keep_the_parents_lock(tmp_path: Path) -> None:
    """The queue's lock is flock'd on a descriptor the fork copies: released by the parent, it must be free,
    child or no child (a `fastmta send` restarted right after a kill -9 found its queue "in use")."""
    import fcntl

    lock = tmp_path / "lock"

    def events() -> Iterator[Event]:
        for i in range(300):
            yield Reject("a.eml", i, "slow")
            time.sleep(0.01)

    async def main() -> bool:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        intake = IntakeProcess(iter(events()))
        await intake.start()
        try:
            await asyncio.sleep(0.5)  # the child runs (and has let go of what it inherited)
            os.close(fd)  # the parent releases its lock, as a killed parent's does
            other = os.open(lock, os.O_RDWR)
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False
            finally:
                os.close(other)
        finally:
            await intake.close()

    assert asyncio.run(main()), "the intake process still holds the lock its parent released"
