"""Degraded mode: what a node does while Redis is unreachable.

One :class:`Health` per node. The first failed Redis call marks the cluster
*degraded*: every shared limit then falls back to a local GCRA at
``rate / nodes_hint`` (each of the known live nodes takes its share, so the
cluster stays at or under the shared limit), leases to ``cap // nodes_hint``
local connections, and delivery goes on. Nothing durable lives in Redis
(each node's journal is its own), so nothing is lost or sent twice because
it is gone. A probe (``PING``, every ``retry`` seconds) ends the state when
Redis answers again: the shared limits are taken from Redis again (the
local fallbacks are dropped; their debt is not carried over).

The state is exported for the metrics and the operator: :attr:`Health.degraded`,
:attr:`Health.since` (wall time), :attr:`Health.episodes` and the last error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger("fastmta.delivery.cluster")

__all__ = ["Health"]


class Health:
    """Is Redis reachable? Flipped by failed calls, restored by a probe loop."""

    def __init__(self, ping: Callable[[], Awaitable[object]], retry: float, nodes_hint: int) -> None:
        self._ping = ping
        self.retry = retry
        self.nodes_hint = nodes_hint
        self.degraded = False
        #: Wall time the current degraded episode began (None: healthy).
        self.since: float | None = None
        self.episodes = 0
        self.last_error = ""
        self._probe: asyncio.Task[None] | None = None
        #: Called with the new state (True: degraded) on every change.
        self.listeners: list[Callable[[bool], None]] = []

    def failed(self, exc: BaseException) -> None:
        """A Redis call failed: enter degraded mode (once) and start probing."""
        self.last_error = f"{type(exc).__name__}: {exc}"
        if self.degraded:
            return
        self.degraded, self.since = True, time.time()
        self.episodes += 1
        log.warning("cluster: Redis unreachable (%s): degraded mode, limits / %d nodes locally",
                    self.last_error, self.nodes_hint)
        for listener in self.listeners:
            listener(True)
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(self._probe_loop())

    def _recovered(self) -> None:
        if not self.degraded:
            return
        took = time.time() - (self.since or time.time())
        self.degraded, self.since = False, None
        log.warning("cluster: Redis reachable again after %.1fs: shared limits re-joined", took)
        for listener in self.listeners:
            listener(False)

    async def _probe_loop(self) -> None:
        while self.degraded:
            await asyncio.sleep(self.retry)
            try:
                await self._ping()
            except Exception as exc:  # any failure: still degraded
                self.last_error = f"{type(exc).__name__}: {exc}"
                continue
            self._recovered()

    def state(self) -> dict[str, object]:
        """For the metrics and ``fastmta status``."""
        return {"degraded": self.degraded, "since": self.since, "episodes": self.episodes,
                "last_error": self.last_error, "nodes_hint": self.nodes_hint}

    async def aclose(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
