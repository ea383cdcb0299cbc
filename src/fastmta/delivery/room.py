"""The engine's room: what its queue holds against ``[queue]``'s bounds, and the submits waiting for room.

Three bounds, each for a reason:

* recipients (``max_queued_recipients``): the per-recipient records in memory;
* bytes (``max_queued_bytes``): the bodies (a backlog of 20 KB messages is ten
  times the memory of one of 2 KB messages);
* untried recipients (``max_untried_recipients``): the read-ahead. Without it a
  long campaign keeps the whole byte bound of not-yet-tried messages in memory,
  where a few seconds' worth keep every connection busy. Deferred recipients
  are not untried, so a site that is down does not stall the others; nor are
  those *parked* at a site whose limit holds them back (a rate, a warm-up
  quota, a suspension) beyond two rounds of its connections, so a site sending
  at 10 a second does not stall the others either (``SiteQueue.put``). Both
  still count against the other two bounds, which keep the memory bounded.

A message larger than a bound is still taken when the queue is empty. Waiting
submits are woken one at a time, in order: the one woken takes its room and
wakes the next while room is left. (Waking all of them at every release made
``fastmta send``'s few hundred waiting submits wake to find no room: 1.5
futures a message.)
"""

from __future__ import annotations

import asyncio
from collections import deque

from fastmta.delivery.config import QueueConfig

__all__ = ["Room"]


class Room:
    """Counts of what the queue holds; :meth:`take` waits until a message fits."""

    def __init__(self, bounds: QueueConfig) -> None:
        self.bounds = bounds
        self.unfinished = 0  # recipients accepted and not final
        self.untried = 0  # ... of which never tried yet
        self.bytes = 0  # memory held by the bodies of unfinished messages (an estimate)
        self._waiters: deque[asyncio.Future[None]] = deque()

    def fits(self, n: int, size: int) -> bool:
        """Is there room for *n* more recipients and *size* more bytes (always, in an empty queue)?"""
        b = self.bounds
        return not self.unfinished or not (
            self.unfinished + n > b.max_queued_recipients or self.bytes + size > b.max_queued_bytes
            or (self.untried and self.untried + n > b.max_untried_recipients)
        )

    async def take(self, loop: asyncio.AbstractEventLoop, n: int, size: int) -> None:
        """Wait until *n* recipients and *size* bytes fit, and count them in (untried: once accepted, by the caller).

        Raises what :meth:`fail_waiters` gives it (the engine stopped taking messages).
        """
        woken = False
        while not self.fits(n, size):
            waiter: asyncio.Future[None] = loop.create_future()
            if woken:
                self._waiters.appendleft(waiter)  # woken to find no room yet: it keeps its place in line
            else:
                self._waiters.append(waiter)
            woken = True
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self.wake_next()  # woken, then cancelled: the wake-up goes to the next in line
                raise
        self.unfinished += n
        self.bytes += size
        if self._waiters and self.untried + n < self.bounds.max_untried_recipients:
            self.wake_next()  # room may be left for the next in line (these n become untried once accepted)

    def give_back(self, n: int, size: int = 0) -> None:
        """*n* recipients became final (and *size* bytes of body were freed)."""
        self.unfinished -= n
        self.bytes -= size
        self.wake_next()

    def wake_next(self) -> None:
        """Let the first waiting submit look again (it re-checks the room)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def fail_waiters(self, exc: BaseException) -> None:
        """Every waiting submit raises *exc*."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(exc)
