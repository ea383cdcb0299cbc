"""Shared rate limits: GCRA in one Lua script on Redis, spent locally in batches.

The script (:data:`GCRA_LUA`) is the whole algorithm, atomic on the server:
it reads Redis's own clock (``TIME``, microseconds, so every node agrees on
"now" whatever its own clock says), and grants N tokens of a key at once
when they fit under ``burst`` now (else none), and says how long until N
more would.
The state is one integer per key, the theoretical arrival time in µs, with
an expiry so idle keys vanish.

A node never asks Redis per message: a :class:`SharedLimiter` holds the
tokens granted to this node and spends them locally (it is a limiter of the
same shape as :class:`fastmta.delivery.ratelimit.Gcra`, ``wait``/``take``,
so :class:`fastmta.delivery.throttle.SiteThrottle` consults it beside its
own limits). It asks for ``batch`` seconds' worth of tokens at a time, again
before its stock runs out (prefetch at half a batch), and not before Redis
said a full batch could be had; with batches of 0.2 s that is one round trip
per 0.2 s of traffic per key per node (at 100 msgs/s: 0.05 per message).
While Redis is unreachable (:mod:`fastmta.delivery.cluster.degraded`) the
limiter spends what it holds, then falls back to a local GCRA at
``rate / nodes_hint``.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from fastmta.delivery.cluster.degraded import Health
from fastmta.delivery.ratelimit import Gcra, RateSpec

__all__ = ["GCRA_LUA", "GcraStore", "SharedLimiter", "batch_tokens", "default_burst"]

#: KEYS[1]: the limit's key. ARGV: interval (µs, integer), burst, tokens wanted (at most burst).
#: All or nothing: returns {granted now (the count wanted, or 0), µs until that many more could be}.
#: (Partial grants would make nodes that compete for a key ask ever more often for ever fewer tokens.)
GCRA_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or 0)
if tat < now then tat = now end
local room = math.floor((now + burst * interval - tat) / interval)
if want > burst then want = burst end
local n = want
if room < want then n = 0 end
if n > 0 then
  tat = tat + n * interval
  redis.call('SET', KEYS[1], string.format('%d', tat), 'PX', math.floor((tat - now) / 1000) + 1000)
end
local wait = tat + (want - burst) * interval - now
if wait < 0 then wait = 0 end
return {n, math.floor(wait)}
"""

#: How soon to ask again while a refill is on its way (seconds).
_POLL = 0.002


def batch_tokens(spec: RateSpec, batch: float) -> int:
    """Tokens a node takes at once: *batch* seconds' worth, at least 1."""
    return max(1, math.ceil(spec.per_second * batch))


def default_burst(spec: RateSpec, batch: float, nodes: int) -> int:
    """A quota (period of an hour or more) may go at once, like :class:`Gcra`'s default; a
    rate allows one batch per known node back to back, so every node can hold a batch."""
    if spec.burst is not None:
        return spec.burst
    if spec.period >= 3600:
        return spec.limit
    return batch_tokens(spec, batch) * nodes


class GcraStore:
    """The Lua script on one Redis client (EVALSHA, loaded again after a Redis restart)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._script = client.register_script(GCRA_LUA)
        #: Round trips made (for the benchmark: per delivered message).
        self.calls = 0

    async def take(self, key: str, interval_us: int, burst: int, want: int) -> tuple[int, float]:
        """*want* tokens of *key* or none: (granted, seconds until *want* more could be)."""
        self.calls += 1
        granted, wait_us = await self._script(keys=[key], args=[interval_us, burst, want])
        return int(granted), int(wait_us) / 1e6


class SharedLimiter:
    """This node's share of one shared limit: ``wait(now, n)`` / ``take(now, n)`` like :class:`Gcra`.

    ``now`` is the event loop's clock (the pool's); refills run as tasks of
    the running loop.
    """

    def __init__(self, store: GcraStore, key: str, spec: RateSpec, *, batch: float, burst: int,
                 health: Health) -> None:  # fmt: skip
        self.store = store
        self.key = key
        self.spec = spec
        self.interval_us = max(1, round(spec.period * 1e6 / spec.limit))
        self.burst = burst
        self.batch = min(batch_tokens(spec, batch), burst)
        self.health = health
        self.tokens = 0  # granted to this node, not yet spent (negative: a debt, repaid by the next grant)
        nodes = health.nodes_hint
        self.fallback = Gcra(spec.period * nodes / spec.limit, max(1, burst // nodes))
        self._next_at = 0.0  # loop time before which Redis has no full batch for us
        self._pending: asyncio.Task[None] | None = None
        self.granted = 0  # tokens granted by Redis so far

    def wait(self, now: float, n: int = 1) -> float:
        need = min(n, self.burst)
        if self.tokens >= need:
            if self.tokens - need < self.batch / 2:
                self._refill(now, need)
            return 0.0
        if self.health.degraded:
            return self.fallback.wait(now, n)
        self._refill(now, need)
        if self._pending is not None:
            return _POLL
        return max(self._next_at - now, _POLL)

    def take(self, now: float, n: int = 1) -> None:
        if self.health.degraded and self.tokens < min(n, self.burst):
            self.fallback.take(now, n)
            return
        self.tokens -= n
        if self.tokens < self.batch / 2:
            self._refill(now, 1)

    def _refill(self, now: float, need: int) -> None:
        if self._pending is not None or now < self._next_at or self.health.degraded:
            return
        want = min(self.burst, max(self.batch, need - self.tokens))
        self._pending = asyncio.ensure_future(self._fetch(want))

    async def _fetch(self, want: int) -> None:
        try:
            granted, wait = await self.store.take(self.key, self.interval_us, self.burst, want)
        except Exception as exc:  # unreachable, timed out, restarted mid-call: degraded until a probe answers
            self.health.failed(exc)
        else:
            self.tokens += granted
            self.granted += granted
            self._next_at = asyncio.get_running_loop().time() + wait
        finally:
            self._pending = None
