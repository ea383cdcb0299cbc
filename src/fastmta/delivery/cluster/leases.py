"""Connection leases: a cap on concurrent connections to a site across the cluster.

Each open connection holds a *lease*, a member of the site's sorted set in
Redis scored by its expiry (Redis's clock, ms). :data:`ACQUIRE_LUA` prunes the
expired, counts, and adds when there is room, in one atomic step; a node
renews its leases every ``ttl / 3`` while it uses them (re-adding them, so
a Redis that restarted empty learns them again) and removes one when a
connection closes. A node that crashes stops renewing: its leases expire
after ``ttl`` and the connections it held are free again.

A :class:`LeaseGate` is this node's view of one site's set, shared by its
(source, site) throttles; ``wait``/``started``/``closed`` are what
:class:`fastmta.delivery.throttle.SiteThrottle` calls around a connection.
While Redis is unreachable the node keeps to ``cap // nodes_hint``
connections by itself (its leases are registered again on re-joining).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from typing import Any

from fastmta.delivery.cluster.degraded import Health

__all__ = ["ACQUIRE_LUA", "RENEW_LUA", "LeaseGate", "LeaseStore"]

#: KEYS[1]: the site's lease set. ARGV: member, cap, ttl (ms). Returns 1 (held) or 0 (no room).
ACQUIRE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return 1
"""

#: KEYS[1]: the site's lease set. ARGV: ttl (ms), members... Renews (re-adds) them; returns the set's size.
RENEW_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], now + ttl, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return redis.call('ZCARD', KEYS[1])
"""

_POLL = 0.002  # while an acquisition is on its way
_FULL_RETRY = 0.05  # after "no room": ask again this much later


class LeaseStore:
    """The two scripts on one Redis client."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._acquire = client.register_script(ACQUIRE_LUA)
        self._renew = client.register_script(RENEW_LUA)
        self.calls = 0

    async def acquire(self, key: str, member: str, cap: int, ttl: float) -> bool:
        self.calls += 1
        return bool(await self._acquire(keys=[key], args=[member, cap, int(ttl * 1000)]))

    async def renew(self, key: str, members: list[str], ttl: float) -> int:
        self.calls += 1
        return int(await self._renew(keys=[key], args=[int(ttl * 1000), *members]))

    async def release(self, key: str, member: str) -> None:
        self.calls += 1
        await self.client.zrem(key, member)


class LeaseGate:
    """This node's leases at one site (shared by its sources), ``cap`` across the cluster."""

    def __init__(self, store: LeaseStore, key: str, node: str, cap: int, ttl: float, health: Health) -> None:
        self.store = store
        self.key = key
        self.node = node
        self.cap = cap
        self.ttl = ttl
        self.health = health
        self.in_use: list[str] = []
        self.spare: list[str] = []
        self._ids = itertools.count(1)
        self._pending: asyncio.Task[None] | None = None
        self._retry_at = 0.0
        self._renewer: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def local_cap(self) -> int:
        return max(1, self.cap // self.health.nodes_hint)

    def wait(self, now: float) -> float:
        """May this node open one more connection to the site now (0.0), or when to ask again."""
        if self.spare:
            return 0.0
        if self.health.degraded:
            return 0.0 if len(self.in_use) < self.local_cap else 0.25
        if self._pending is None and now >= self._retry_at:
            self._pending = asyncio.ensure_future(self._acquire())
        return _POLL if self._pending is not None else max(_POLL, self._retry_at - now)

    def started(self) -> None:
        """A connection opens (``wait`` said 0.0): it takes a lease."""
        member = self.spare.pop() if self.spare else f"{self.node}:{next(self._ids)}"
        self.in_use.append(member)
        self._ensure_renewer()

    def closed(self) -> None:
        """A connection closed: its lease goes back at once."""
        if not self.in_use:
            return
        member = self.in_use.pop()
        if not self.health.degraded:
            self._spawn(self._release(member))

    async def _acquire(self) -> None:
        member = f"{self.node}:{next(self._ids)}"
        try:
            if await self.store.acquire(self.key, member, self.cap, self.ttl):
                self.spare.append(member)
                self._ensure_renewer()
            else:
                self._retry_at = asyncio.get_running_loop().time() + _FULL_RETRY
        except Exception as exc:
            self.health.failed(exc)
        finally:
            self._pending = None

    async def _release(self, member: str) -> None:
        try:
            await self.store.release(self.key, member)
        except Exception as exc:  # it expires by itself
            self.health.failed(exc)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _ensure_renewer(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.ensure_future(self._renew_loop())

    async def _renew_loop(self) -> None:
        """Renew what is held every ttl/3; give back spares that stayed unused a whole period."""
        idle_spares: set[str] = set()
        while self.in_use or self.spare:
            await asyncio.sleep(self.ttl / 3)
            for member in [m for m in self.spare if m in idle_spares]:
                self.spare.remove(member)
                if not self.health.degraded:
                    self._spawn(self._release(member))
            idle_spares = set(self.spare)
            held = self.in_use + self.spare
            if held and not self.health.degraded:
                try:
                    await self.store.renew(self.key, held, self.ttl)
                except Exception as exc:
                    self.health.failed(exc)

    async def aclose(self) -> None:
        for task in (self._renewer, self._pending, *self._tasks):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        held, self.in_use, self.spare = self.in_use + self.spare, [], []
        if held and not self.health.degraded:
            with contextlib.suppress(Exception):
                await self.store.client.zrem(self.key, *held)
