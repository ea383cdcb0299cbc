"""The engine's room (fastmta.delivery.room): bounds, and submits woken one at a time, in order."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from fastmta.delivery.config import QueueConfig
from fastmta.delivery.room import Room


def room(**bounds: int) -> Room:
    return Room(QueueConfig(**bounds))


def test_bounds_and_an_empty_queue_always_fits() -> None:
    r = room(max_queued_recipients=10, max_queued_bytes=1000, max_untried_recipients=5)
    assert r.fits(50, 10**6)  # empty: anything, or a message over a bound would wait for ever
    r.unfinished, r.untried, r.bytes = 4, 4, 500
    assert r.fits(1, 500)
    assert not r.fits(2, 0)  # untried 4 + 2 > 5
    assert not r.fits(1, 501)  # bytes
    r.untried = 0  # all deferred: the read-ahead is empty, only the queue's own bounds apply
    assert r.fits(6, 0) and not r.fits(7, 0)


class CountingLoop:
    """The running loop, counting the waits take() starts (a waiter woken to find no room waits again)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.waits = 0

    def create_future(self) -> asyncio.Future[None]:
        self.waits += 1
        return self.loop.create_future()


async def _waiting(r: Room, names: list[str], taken: list[str], loop: CountingLoop | None = None,
                   ) -> list[asyncio.Task[None]]:
    counting = loop or CountingLoop()

    async def submit(name: str) -> None:
        await r.take(counting, 1, 0)  # type: ignore[arg-type]
        r.untried += 1  # accepted, as the engine counts it
        taken.append(name)

    tasks = [asyncio.create_task(submit(n)) for n in names]
    for _ in range(5):
        await asyncio.sleep(0)
    return tasks


def test_a_release_wakes_one_waiter_and_the_order_is_kept() -> None:
    asyncio.run(_wakes_one_in_order())


async def _wakes_one_in_order() -> None:
    r = room(max_untried_recipients=3)
    r.unfinished = r.untried = 3  # full
    taken: list[str] = []
    loop = CountingLoop()
    tasks = await _waiting(r, ["a", "b", "c", "d"], taken, loop)
    assert taken == [] and loop.waits == 4
    r.untried -= 1  # a recipient was tried...
    r.give_back(1)  # ...and became final
    for _ in range(5):
        await asyncio.sleep(0)
    assert taken == ["a"]
    assert loop.waits == 4  # the others were not woken to find no room (and wait again)
    r.untried -= 2
    r.give_back(2)
    for _ in range(10):
        await asyncio.sleep(0)
    assert taken == ["a", "b", "c"]  # the first woken took its room, then woke the next while room was left
    r.fail_waiters(RuntimeError("stop"))
    with pytest.raises(RuntimeError, match="stop"):
        await tasks[3]


def test_a_waiter_cancelled_after_its_wake_up_passes_it_on() -> None:
    asyncio.run(_cancelled_passes_it_on())


async def _cancelled_passes_it_on() -> None:
    r = room(max_untried_recipients=2)
    r.unfinished = r.untried = 2
    taken: list[str] = []
    tasks = await _waiting(r, ["a", "b"], taken)
    r.untried -= 1
    r.give_back(1)  # wakes "a"...
    tasks[0].cancel()  # ...which is cancelled before it runs
    for _ in range(10):
        await asyncio.sleep(0)
    assert tasks[0].cancelled()
    assert taken == ["b"]  # the room went to the next in line, not lost with "a"
    await tasks[1]


def test_a_submit_woken_just_before_the_engine_stops_is_not_taken() -> None:
    from fastmta.delivery.config import config_from_dict
    from fastmta.delivery.engine import Engine, EngineClosed

    async def main() -> None:
        engine = Engine(config_from_dict({"queue": {"max_queued_recipients": 2}}))
        await engine.start()
        try:
            room = engine._room
            room.unfinished = 2  # full
            waiting = asyncio.create_task(engine._reserve(1, 0))
            for _ in range(3):
                await asyncio.sleep(0)
            room.give_back(1)  # room for it: woken...
            engine.stop_accepting()  # ...and the engine stops before it runs
            with pytest.raises(EngineClosed):
                await waiting
            assert room.unfinished == 1  # nothing taken for it
        finally:
            await engine.close()

    asyncio.run(main())


def test_a_submit_with_a_room_timeout_is_refused_in_time_and_never_taken_later(tmp_path: Path) -> None:
    # Found by an attack on serve: with the queue full, an SMTP client waited 600 s, was told 421 by
    # the listener's idle sweep, and its message was still queued and delivered once room came: a
    # second copy when it retried. With room_timeout the submit is refused, and nothing is journaled.
    from fastmta.delivery.config import config_from_dict
    from fastmta.delivery.engine import Engine, QueueFull
    from fastmta.queue.spool import Spool

    async def main() -> None:
        spool = Spool(tmp_path / "q")
        engine = Engine(config_from_dict({"queue": {"max_queued_recipients": 2}}), spool=spool)
        await engine.start()
        try:
            room = engine._room
            room.unfinished = 2  # full
            with pytest.raises(QueueFull):
                await engine.submit(b"Subject: x\r\n\r\nx\r\n", "a@b.example", ["c@d.example"], room_timeout=0.2)
            room.give_back(2)  # room now: the refused one is not taken behind its client's back
            for _ in range(5):
                await asyncio.sleep(0)
            assert room.unfinished == 0 and engine.unfinished == 0
        finally:
            await engine.close()
            await spool.close()
        reopened = Spool(tmp_path / "q")  # and nothing on disk to be delivered after a restart
        try:
            assert reopened.take_recovered() == [] and reopened.unfinished_messages == 0
        finally:
            reopened.close_sync()

    asyncio.run(main())
