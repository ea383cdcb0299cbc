"""Shared rate limits: GCRA in one Lua script on Redis, spent locally in batches.

The script (:data:`GCRA_LUA`) is the whole algorithm, atomic on the server:
it reads Redis's own clock (``TIME``, microseconds, so every node agrees on
"now" whatever its own clock says), and grants N tokens of a key at once.
The state is one integer per key, the theoretical arrival time in µs, with
an expiry so idle keys vanish.

Two ways to ask, one script. ``take``: the N tokens now, or none and how
long until N would fit under ``burst``. ``reserve`` (what the nodes use):
the N tokens *from a moment* up to ``horizon`` ahead, the moment at which
the GCRA would have granted them; the key's state is exactly that of a
grant made then, so the limit holds over any window all the same. A
reservation is never refused while the queue ahead is shorter than the
horizon, so nodes that compete for a key are served in the order they
asked, a batch each, one round trip per batch: no request is wasted on a
refusal, and no node starves because another keeps winning the race for a
refilled batch (which is what all-or-nothing grants polled by several nodes
did: measured, ~0.2 round trips per token with two nodes at 200/s and 10
tokens a batch, and a node starved to a few per cent of the key with three).

A node never asks Redis per message: a :class:`SharedLimiter` holds the
tokens granted to this node and spends them locally (it is a limiter of the
same shape as :class:`fastmta.delivery.ratelimit.Gcra`, ``wait``/``take``,
so :class:`fastmta.delivery.throttle.SiteThrottle` consults it beside its
own limits). It reserves ``batch`` seconds' worth of tokens at a time, again
once its stock falls under half a batch, and never while a reservation is
still ahead of it; with batches of 0.2 s that is one round trip per 0.2 s of
traffic per key per node (at 100 msgs/s: 0.05 per message), however many
nodes share the key. While Redis is unreachable
(:mod:`fastmta.delivery.cluster.degraded`) the limiter spends what it holds
(a reservation not yet due is dropped), then falls back to a local GCRA at
``rate / nodes_hint``.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from fastmta.delivery.cluster.degraded import Health
from fastmta.delivery.ratelimit import Gcra, RateSpec

__all__ = ["GCRA_LUA", "GcraStore", "SharedLimiter", "batch_tokens", "default_burst"]

#: KEYS[1]: the limit's key. ARGV: interval (µs, integer), burst, tokens wanted (at most burst), horizon (µs;
#: 0: now or never). The wanted tokens are granted if the GCRA would grant them within the horizon, as of
#: the moment it would (the key's state then is that of a grant made at that moment), else none.
#: Returns {granted (the count wanted, or 0), µs until the granted tokens are due (0: now),
#: µs until as many more could be granted within the horizon}.
GCRA_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local horizon = tonumber(ARGV[4] or 0)
if want > burst then want = burst end
local tat = tonumber(redis.call('GET', KEYS[1]) or 0)
if tat < now then tat = now end
local due = tat + (want - burst) * interval - now
if due < 0 then due = 0 end
local n = 0
if due <= horizon then
  n = want
  tat = tat + want * interval
  redis.call('SET', KEYS[1], string.format('%d', tat), 'PX', math.floor((tat - now) / 1000) + 1000)
else
  due = 0
end
local nxt = tat + (want - burst) * interval - now - horizon
if nxt < 0 then nxt = 0 end
return {n, math.floor(due), math.floor(nxt)}
"""

#: How soon to ask again while a refill is on its way (seconds).
_POLL = 0.002
#: How far ahead a node may reserve by default: this many batches (every node one queued), at least 1 s.
_HORIZON_BATCHES = 8


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

    async def _call(self, key: str, interval_us: int, burst: int, want: int, horizon_us: int) -> tuple[int, int, int]:
        self.calls += 1
        granted, due_us, next_us = await self._script(keys=[key], args=[interval_us, burst, want, horizon_us])
        return int(granted), int(due_us), int(next_us)

    async def take(self, key: str, interval_us: int, burst: int, want: int) -> tuple[int, float]:
        """*want* tokens of *key* now or none: (granted, seconds until *want* more could be)."""
        granted, _, next_us = await self._call(key, interval_us, burst, want, 0)
        return granted, next_us / 1e6

    async def reserve(self, key: str, interval_us: int, burst: int, want: int,
                      horizon_us: int) -> tuple[int, float, float]:  # fmt: skip
        """*want* tokens of *key* due within *horizon_us*, or none: (granted, seconds until they are due,
        seconds until as many more could be reserved)."""
        granted, due_us, next_us = await self._call(key, interval_us, burst, want, horizon_us)
        return granted, due_us / 1e6, next_us / 1e6


class SharedLimiter:
    """This node's share of one shared limit: ``wait(now, n)`` / ``take(now, n)`` like :class:`Gcra`.

    ``now`` is the event loop's clock (the pool's); refills run as tasks of
    the running loop. ``horizon``: how far ahead (seconds) a reservation may
    be due (default: 8 batches, at least 1 s: room for 8 nodes queued for
    the key without a refusal).
    """

    def __init__(self, store: GcraStore, key: str, spec: RateSpec, *, batch: float, burst: int,
                 health: Health, horizon: float | None = None) -> None:  # fmt: skip
        self.store = store
        self.key = key
        self.spec = spec
        self.interval_us = max(1, round(spec.period * 1e6 / spec.limit))
        self.burst = burst
        self.batch = min(batch_tokens(spec, batch), burst)
        if horizon is None:
            horizon = max(1.0, _HORIZON_BATCHES * self.batch * self.interval_us / 1e6)
        self.horizon_us = round(horizon * 1e6)
        self.health = health
        self.tokens = 0  # granted to this node, not yet spent (negative: a debt, repaid by the next grant)
        self.fallback = self._local()
        self._episode = health.episodes  # the degraded episode the fallback was made for
        self._next_at = 0.0  # loop time before which this node does not ask Redis again
        self._reserved = 0  # granted by Redis, due at _due (loop time): not spendable before
        self._due = 0.0
        self._last = (0.0, 0)  # (loop time, count) of the last batch that became spendable
        self._pending: asyncio.Task[None] | None = None
        self.granted = 0  # tokens granted by Redis so far

    def _local(self) -> Gcra:
        nodes = self.health.nodes_hint
        return Gcra(self.spec.period * nodes / self.spec.limit, max(1, self.burst // nodes))

    def _degraded(self) -> bool:
        """Redis unreachable? On entering an episode: a reservation not yet due is dropped, and the
        local fallback starts as if it had granted this node's last batch (no fresh burst on top)."""
        health = self.health
        if not health.degraded:
            return False
        if self._episode != health.episodes:
            self._episode = health.episodes
            self._reserved = 0
            self.fallback = self._local()
            at, count = self._last
            if count:
                self.fallback.take(at, count)
        return True

    def _settle(self, now: float) -> None:
        """A reservation that is due joins the stock."""
        if not self._degraded() and now >= self._due:
            self.tokens += self._reserved
            self._last = (self._due, self._reserved)
            self._reserved = 0

    def wait(self, now: float, n: int = 1) -> float:
        if self._reserved:
            self._settle(now)
        need = min(n, self.burst)
        if self.tokens >= need:
            if self.tokens - need < self.batch / 2:
                self._refill(now, need)
            return 0.0
        if self._degraded():
            return self.fallback.wait(now, n)
        if self._reserved:
            return max(self._due - now, _POLL)
        self._refill(now, need)
        if self._pending is not None:
            return _POLL
        return max(self._next_at - now, _POLL)

    def take(self, now: float, n: int = 1) -> None:
        if self._reserved:
            self._settle(now)
        if self.tokens < min(n, self.burst) and self._degraded():
            self.fallback.take(now, n)
            return
        self.tokens -= n
        if self.tokens < self.batch / 2:
            self._refill(now, 1)

    def _refill(self, now: float, need: int) -> None:
        if self._pending is not None or self._reserved or now < self._next_at or self.health.degraded:
            return
        want = min(self.burst, max(self.batch, need - self.tokens))
        self._pending = asyncio.ensure_future(self._fetch(want))

    async def _fetch(self, want: int) -> None:
        try:
            granted, due, wait = await self.store.reserve(self.key, self.interval_us, self.burst, want,
                                                          self.horizon_us)  # fmt: skip
        except Exception as exc:  # unreachable, timed out, restarted mid-call: degraded until a probe answers
            self.health.failed(exc)
        else:
            # Redis's "now" was before the reply reached us: due times land a little late, never early.
            now = asyncio.get_running_loop().time()
            self.granted += granted
            if not granted:
                self._next_at = now + wait
            elif due > 0:
                self._reserved, self._due = granted, now + due
                self._next_at = now + due
            else:
                self.tokens += granted
                self._last = (now, granted)
        finally:
            self._pending = None
