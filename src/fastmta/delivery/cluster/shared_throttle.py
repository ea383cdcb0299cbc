"""Shared throttle state: the adaptive window and rate of an (egress IP, site), one for the whole cluster.

Without it every node runs its own AIMD controller
(:mod:`fastmta.delivery.throttle`): a ``421 4.7.28`` answered to one node
slows that node only, the others keep hammering the same IP's reputation,
and slow start and Gmail's procedure (a ten-minute pause, a probe, one
connection, +1 per clean round) run once per node. Here the dials of each
(egress IP or source name, site) live in one Redis hash::

    {prefix}throttle:{ip}|{site}        window, rate, suspended_until (epoch ms, Redis's clock),
                                        gen (cuts so far), ver (writes so far), updated_by, why, kind
    {prefix}throttle-owner:{ip}|{site}  the node that may raise them (a lease: SET NX PX, renewed)
    {prefix}throttle                    the pub/sub channel every write is published on

Who writes what:

* **Cuts** (a throttle reply halved a dial, a suspension began) may come
  from any node. :data:`CUT_LUA` applies one only if the hash's ``gen`` is
  still the one the node had seen when it cut: N nodes reacting to the same
  burst of 421s all saw the same ``gen``, the first one cuts, the others are
  refused and take the state that won (de-duplicated: one cut per event,
  not one per node). A refused cut that would have suspended for longer
  than the winner's state does is sent again on top of it (it is news).
* **Raises** (slow start, additive increase, the resume after a suspension)
  come from the owner only: :data:`RAISE_LUA` writes them only while the
  node holds the owner lease and has seen the latest cut. A node that is
  not the owner does not grow its dials at all (``owner_wait`` > 0), and
  at the end of a suspension the cluster shares it does not probe: it waits
  for the owner's probe, whose outcome (resume or a new suspension) it
  adopts; only if none came ``lease_ttl`` after the pause, it probes itself
  (as it does at the end of a suspension of its own, one Redis never heard
  of). The owner renews its lease every ``lease_ttl / 3`` while it has
  traffic for the key; an idle or dead owner's lease lapses and the next
  node that wants to raise takes it over.
* Every write is published; each node runs one subscriber
  (:class:`SharedThrottles`), which hands a newer state of a key it sends to
  to its throttle (:meth:`fastmta.delivery.throttle.SiteThrottle.adopt`):
  applied within milliseconds, never shared again. A throttle made on a node
  reads the hash once (:data:`READ_LUA`), so a new node starts where the
  cluster stands, not at the initial values.

Redis is off the per-message path: a round trip per cut, per raise of the
owner (at most one per round, a second or more), per lease renewal (every
``lease_ttl / 3`` per key) and per throttle made; the rest is push.

The shared values are each node's own dials (three nodes behind one IP at
window 2 open up to six connections): a cap across the cluster is
``max_connections_per_site`` and ``[[cluster.limit]]``'s business.
Remaining suspensions travel as seconds left by Redis's clock, so the nodes'
clocks need not agree. The throttles' ``now`` must be the event loop's clock
(as the engine's is).

Degraded mode (:mod:`fastmta.delivery.cluster.degraded`): while Redis is
unreachable each node keeps its own local throttle, cuts and raises by
itself (``owner_wait`` is 0.0) and shares nothing; when it answers again the
subscriber re-reads every key and adopts what changed meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass
from typing import Any

from fastmta.delivery.cluster.degraded import Health
from fastmta.delivery.throttle import EventKind, SiteThrottle, ThrottleEvent

log = logging.getLogger("fastmta.delivery.cluster")

__all__ = ["CUT_LUA", "OWN_LUA", "RAISE_LUA", "READ_LUA", "DialState", "SharedDial", "SharedThrottles",
           "ThrottleStore"]  # fmt: skip

# Common to the scripts: Redis's clock in ms, and the state of KEYS[1] as JSON (what is published).
_PRELUDE = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function state(key, now)
  local h = redis.call('HMGET', key, 'ver', 'gen', 'window', 'rate', 'suspended_until', 'updated_by', 'why', 'kind')
  local left = 0
  local untl = tonumber(h[5] or 0) or 0
  if untl > now then left = untl - now end
  return cjson.encode({key = key, ver = tonumber(h[1] or 0), gen = tonumber(h[2] or 0),
    window = tonumber(h[3] or 0), rate = tonumber(h[4] or 0), pause_ms = left,
    node = h[6] or '', why = h[7] or '', kind = h[8] or ''})
end
"""

#: KEYS[1]: the state hash. ARGV: gen seen, window, rate, pause (ms, 0: none), node, why, channel, hash TTL (ms).
#: Returns {1 (cut) or 0 (refused: another node cut first), the state}.
CUT_LUA = _PRELUDE + """
local now = now_ms()
local gen = tonumber(redis.call('HGET', KEYS[1], 'gen') or 0)
if gen ~= tonumber(ARGV[1]) then return {0, state(KEYS[1], now)} end
local pause = tonumber(ARGV[4])
local untl = tonumber(redis.call('HGET', KEYS[1], 'suspended_until') or 0)
if pause > 0 and now + pause > untl then untl = now + pause end
redis.call('HSET', KEYS[1], 'gen', gen + 1, 'window', ARGV[2], 'rate', ARGV[3], 'suspended_until', untl,
  'updated_by', ARGV[5], 'why', ARGV[6], 'kind', 'cut')
redis.call('HINCRBY', KEYS[1], 'ver', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[8])
local s = state(KEYS[1], now)
redis.call('PUBLISH', ARGV[7], s)
return {1, s}
"""

#: KEYS[1]: the state hash, KEYS[2]: the owner lease. ARGV: gen seen, window, rate, node, why, kind
#: ("raise" or "resume"), channel, hash TTL (ms), lease TTL (ms). Written (and the lease renewed) only
#: by the owner that saw the latest cut. Returns {1 or 0, the state, the owner ("": none), its ms left}.
RAISE_LUA = _PRELUDE + """
local now = now_ms()
local owner = redis.call('GET', KEYS[2])
local gen = tonumber(redis.call('HGET', KEYS[1], 'gen') or 0)
if owner ~= ARGV[4] or gen ~= tonumber(ARGV[1]) then
  return {0, state(KEYS[1], now), owner or '', redis.call('PTTL', KEYS[2])}
end
redis.call('PEXPIRE', KEYS[2], ARGV[9])
redis.call('HSET', KEYS[1], 'gen', gen, 'window', ARGV[2], 'rate', ARGV[3], 'suspended_until', 0,
  'updated_by', ARGV[4], 'why', ARGV[5], 'kind', ARGV[6])
redis.call('HINCRBY', KEYS[1], 'ver', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[8])
local s = state(KEYS[1], now)
redis.call('PUBLISH', ARGV[7], s)
return {1, s, owner, redis.call('PTTL', KEYS[2])}
"""

#: KEYS[1]: the owner lease. ARGV: node, TTL (ms). Takes it if free, renews it if ours: {owner, ms left}.
OWN_LUA = """
local cur = redis.call('GET', KEYS[1])
if not cur then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  cur = ARGV[1]
elseif cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return {cur, redis.call('PTTL', KEYS[1])}
"""

#: KEYS[1]: the owner lease. ARGV: node. Gives it back if ours (a closing node's successor need not wait).
_DISOWN_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

#: KEYS[1]: the state hash. Returns the state (ver 0: none yet).
READ_LUA = _PRELUDE + "return state(KEYS[1], now_ms())"

#: An idle key's state is forgotten after a day (longer than any provider's pause).
_HASH_TTL_MS = 86_400_000
#: How often a node that is not the owner looks again while it waits (seconds): at most, at least.
_RECHECK_MAX, _RECHECK_MIN = 1.0, 0.05
#: The events that change the shared state (warm-up, sender holds and the local probe's start do not).
_SHARED_KINDS = frozenset({EventKind.WINDOW, EventKind.RATE, EventKind.SUSPEND, EventKind.RESUME})


@dataclass(frozen=True, slots=True)
class DialState:
    """One key's shared state as the scripts return and publish it; ``pause``: seconds of suspension left."""

    key: str
    ver: int
    gen: int
    window: float
    rate: float
    pause: float
    node: str
    why: str
    kind: str  # "cut", "raise", "resume" ("": never written)

    @classmethod
    def decode(cls, raw: bytes | str) -> DialState:
        d = json.loads(raw)
        return cls(str(d["key"]), int(d["ver"]), int(d["gen"]), float(d["window"]), float(d["rate"]),
                   float(d["pause_ms"]) / 1000, str(d["node"]), str(d["why"]), str(d["kind"]))  # fmt: skip


class ThrottleStore:
    """The scripts on one Redis client; ``calls`` counts the round trips."""

    def __init__(self, client: Any, channel: str) -> None:
        self.client = client
        self.channel = channel
        self._cut = client.register_script(CUT_LUA)
        self._raise = client.register_script(RAISE_LUA)
        self._own = client.register_script(OWN_LUA)
        self._disown = client.register_script(_DISOWN_LUA)
        self._read = client.register_script(READ_LUA)
        self.calls = 0

    async def cut(self, key: str, seen: int, window: float, rate: float, pause: float, node: str,
                  why: str) -> tuple[bool, DialState]:  # fmt: skip
        self.calls += 1
        args = [seen, repr(window), repr(rate), int(pause * 1000), node, why, self.channel, _HASH_TTL_MS]
        ok, raw = await self._cut(keys=[key], args=args)
        return bool(ok), DialState.decode(raw)

    async def raise_(self, key: str, owner_key: str, seen: int, window: float, rate: float, node: str, why: str,
                     kind: str, ttl: float) -> tuple[bool, DialState, str, float]:  # fmt: skip
        self.calls += 1
        args = [seen, repr(window), repr(rate), node, why, kind, self.channel, _HASH_TTL_MS, int(ttl * 1000)]
        ok, raw, owner, pttl = await self._raise(keys=[key, owner_key], args=args)
        return bool(ok), DialState.decode(raw), _text(owner), max(0, int(pttl)) / 1000

    async def own(self, owner_key: str, node: str, ttl: float) -> tuple[str, float]:
        """Take the lease if free, renew it if ours: (its owner, seconds left)."""
        self.calls += 1
        owner, pttl = await self._own(keys=[owner_key], args=[node, int(ttl * 1000)])
        return _text(owner), max(0, int(pttl)) / 1000

    async def disown(self, owner_key: str, node: str) -> None:
        self.calls += 1
        await self._disown(keys=[owner_key], args=[node])

    async def read(self, key: str) -> DialState:
        self.calls += 1
        return DialState.decode(await self._read(keys=[key]))


def _text(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


@dataclass(slots=True)
class _Batch:
    """The events of one throttle since the last write (one ``_feed``): written at once, as one change."""

    throttle: SiteThrottle
    seen: int  # the gen the node knew when the first of them happened
    foreign: int  # the number of other nodes' states adopted by then
    cut: bool = False
    resume: bool = False
    why: str = ""


class SharedDial:
    """This node's view of one key's shared dials (:class:`fastmta.delivery.throttle.SharedState`).

    Usually one throttle per key; sources with the same address share one."""

    def __init__(self, hub: SharedThrottles, name: str) -> None:
        self.hub = hub
        self.key = f"{hub.prefix}throttle:{name}"
        self.owner_key = f"{hub.prefix}throttle-owner:{name}"
        self.throttles: list[SiteThrottle] = []
        self.ver = 0  # the newest state known here
        self.gen = 0  # cuts in it (what a cut of ours must have seen)
        self.owner = ""  # "": unknown
        self.owner_until = 0.0  # loop time the known lease ends (ours: renewed before)
        self.active_at = -1e18  # loop time this node last wanted to raise (an idle owner lets the lease lapse)
        self.foreign = 0  # other nodes' states adopted (a cut after one of them may repeat it)
        self.paused_until: float | None = None  # loop time the cluster's suspension ends (None: none)
        self._batch: _Batch | None = None
        self._writing = asyncio.Lock()  # one write at a time: the next one knows the gen the last one made
        self._owning: asyncio.Task[None] | None = None
        self._applying = False

    # --- SharedState ---------------------------------------------------------

    def attach(self, throttle: SiteThrottle) -> None:
        """A throttle of this key was made: it starts from the cluster's state (one read)."""
        self.throttles.append(throttle)
        if not self.hub.health.degraded:
            self.hub.spawn(self._read())

    def owner_wait(self, now: float, probe: bool = False) -> float:
        hub = self.hub
        if hub.health.degraded:
            return 0.0  # alone: the local throttle steers by itself
        self.active_at = now
        if self.owner == hub.node and now < self.owner_until:
            return 0.0
        if probe and (self.paused_until is None or now >= self.paused_until + hub.ttl):
            return 0.0  # a pause of this node's own, or the owner's probe is overdue: probe here
        if now >= self.owner_until and self._owning is None:
            self._owning = hub.spawn(self._own())
        if self._owning is not None:
            return _RECHECK_MIN
        return min(_RECHECK_MAX, max(_RECHECK_MIN, self.owner_until - now))

    def changed(self, throttle: SiteThrottle, event: ThrottleEvent) -> None:
        kind = event.kind
        if self._applying or self.hub.health.degraded or kind not in _SHARED_KINDS:
            return
        b = self._batch
        if b is None:
            b = self._batch = _Batch(throttle, self.gen, self.foreign)
            if self.hub.spawn(self._flush()) is None:  # no event loop (a synchronous caller): nothing shared
                self._batch = None
                return
        b.throttle = throttle
        lower = event.new is not None and event.old is not None and event.new < event.old
        b.cut |= kind is EventKind.SUSPEND or (kind in (EventKind.WINDOW, EventKind.RATE) and lower)
        b.resume |= kind is EventKind.RESUME
        if not b.why:
            b.why = event.reason  # the first one's: it carries the reply (the others add how long, ...)

    # --- writes ----------------------------------------------------------------

    async def _flush(self) -> None:
        async with self._writing:
            b, self._batch = self._batch, None
            if b is None:
                return
            # Only this node's own writes since the events: they are no reason to refuse the next one.
            await self._write(b, b.seen if self.foreign != b.foreign else self.gen, again=True)

    async def _write(self, b: _Batch, seen: int, *, again: bool) -> None:
        """One batch as one write: a cut (any node, de-duplicated by ``gen``), else a raise (the owner only)."""
        hub, t = self.hub, b.throttle
        now = asyncio.get_running_loop().time()
        window, rate = float(t.window), t.rate or 0.0
        pause = max(0.0, (t.suspended_until or now) - now)
        try:
            if b.cut and not b.resume:
                ok, state = await hub.store.cut(self.key, seen, window, rate, pause, hub.node, b.why)
            elif self.owner == hub.node and now < self.owner_until:
                kind = "resume" if b.resume else "raise"
                ok, state, owner, left = await hub.store.raise_(
                    self.key, self.owner_key, seen, window, rate, hub.node, b.why, kind, hub.ttl)
                self._owner(owner, left)
            else:
                return  # the lease lapsed between the raise and now: the new owner raises
        except Exception as exc:  # unreachable, timed out: this node goes on alone (degraded mode)
            hub.health.failed(exc)
            return
        if ok:
            if b.cut and not b.resume:
                hub.cuts += 1
            else:
                hub.raises += 1
            if state.ver > self.ver:  # (another node's newer state may have come in first)
                self._heard(state, now)
            self._apply(state, skip=t)
            return
        hub.refused += 1
        self.receive(state, mine=True)
        if again and b.cut and not b.resume and pause > state.pause + 1.0:
            # The winner's state suspends for less than this node's cut asked: that part is news.
            await self._write(b, self.gen, again=False)

    async def _own(self) -> None:
        hub = self.hub
        try:
            owner, left = await hub.store.own(self.owner_key, hub.node, hub.ttl)
        except Exception as exc:
            hub.health.failed(exc)
            self.owner, self.owner_until = "", asyncio.get_running_loop().time() + hub.health.retry
        else:
            self._owner(owner, left)
        finally:
            self._owning = None

    def _owner(self, owner: str, left: float) -> None:
        if owner == self.hub.node and self.owner != owner:
            log.info("cluster: node %s raises the throttle of %s", owner, self.key)
        self.owner, self.owner_until = owner, asyncio.get_running_loop().time() + left

    async def _read(self) -> None:
        try:
            state = await self.hub.store.read(self.key)
        except Exception as exc:
            self.hub.health.failed(exc)
        else:
            self.receive(state, mine=True)

    # --- reads -------------------------------------------------------------------

    def receive(self, state: DialState, *, mine: bool, reset: bool = False) -> None:
        """A state of this key (published, or a script's answer): adopted if newer than the one known.

        *mine*: adopt it even if this node wrote it (a read after a restart); *reset*: it is Redis's
        state now, whatever is known (a Redis that restarted empty starts counting again)."""
        newer = state.ver > self.ver
        if newer or reset:
            self._heard(state, asyncio.get_running_loop().time())
        if newer and (mine or state.node != self.hub.node):
            if state.node != self.hub.node:
                self.foreign += 1
            self._apply(state)

    def _heard(self, state: DialState, now: float) -> None:
        self.ver, self.gen = state.ver, state.gen
        self.paused_until = now + state.pause if state.pause > 0 else None

    def renew(self, now: float) -> None:
        """The lease of a key this node owns and still sends to is renewed (an idle one lapses)."""
        hub = self.hub
        if self.owner == hub.node and now < self.owner_until and now - self.active_at < hub.ttl and not self._owning:
            self._owning = hub.spawn(self._own())

    def _apply(self, state: DialState, skip: SiteThrottle | None = None) -> None:
        targets = [t for t in self.throttles if t is not skip]
        if not targets or state.ver == 0:
            return
        now = asyncio.get_running_loop().time()
        why = f"cluster: {state.kind} by {state.node}: {state.why}"
        self._applying = True
        try:
            for t in targets:
                t.adopt(state.window, state.rate, state.pause, now, why, state.kind)
        finally:
            self._applying = False
        self.hub.applied += 1


class SharedThrottles:
    """This node's part: the scripts, the :class:`SharedDial` of every key, the subscriber, the lease renewals."""

    def __init__(self, client: Any, *, prefix: str, node: str, ttl: float, health: Health) -> None:
        self.client = client
        self.prefix = prefix
        self.node = node
        self.ttl = ttl
        self.health = health
        self.channel = f"{prefix}throttle"
        self.store = ThrottleStore(client, self.channel)
        self.dials: dict[str, SharedDial] = {}
        #: Remote states applied to this node's throttles; cuts and raises this node wrote; its cuts refused.
        self.applied = self.cuts = self.raises = self.refused = 0
        #: True while the subscriber listens (a message can be missed only while it is False).
        self.subscribed = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._subscriber: asyncio.Task[None] | None = None
        self._renewer: asyncio.Task[None] | None = None

    def dial(self, name: str) -> SharedDial:
        """The shared dials of *name* (``{egress IP or source name}|{site}``)."""
        key = f"{self.prefix}throttle:{name}"
        d = self.dials.get(key)
        if d is None:
            d = self.dials[key] = SharedDial(self, name)
        return d

    @property
    def calls(self) -> int:
        return self.store.calls

    def spawn(self, coro: Any) -> asyncio.Task[None] | None:
        """Fire and forget (the throttle is synchronous); None, and nothing done, outside an event loop."""
        try:
            task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        except RuntimeError:
            coro.close()
            return None
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def state(self) -> dict[str, Any]:
        owned = sum(1 for d in self.dials.values() if d.owner == self.node)
        return {"keys": len(self.dials), "owned": owned, "applied": self.applied, "cuts": self.cuts,
                "raises": self.raises, "refused": self.refused, "subscribed": self.subscribed}

    # --- life ------------------------------------------------------------------

    def start(self) -> None:
        if self._subscriber is None:
            self._subscriber = asyncio.ensure_future(self._subscribe())
            self._renewer = asyncio.ensure_future(self._renew_loop())

    async def _subscribe(self) -> None:
        """Listen on the channel; on a lost connection: degraded, and again after ``retry`` (then re-read).

        Also anew after any other call found Redis unreachable: a connection that hangs (no reset, no
        answer) looks idle to a subscriber, and what was published meanwhile must be read."""
        while True:
            pubsub = self.client.pubsub()
            try:
                episodes = self.health.episodes
                await pubsub.subscribe(self.channel)
                await self._resync()  # what was published while nobody here listened
                self.subscribed = True
                while self.health.episodes == episodes:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is not None and msg.get("type") == "message":
                        self._on_message(msg["data"])
            except Exception as exc:
                self.health.failed(exc)
            finally:
                self.subscribed = False
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(self.health.retry)

    def _on_message(self, data: bytes | str) -> None:
        try:
            state = DialState.decode(data)
        except (ValueError, KeyError, TypeError):
            log.warning("cluster: a throttle state that does not parse: %r", data[:200])
            return
        d = self.dials.get(state.key)
        if d is None:
            return
        try:
            d.receive(state, mine=False)
        except Exception:  # a fault here is no reason to call Redis unreachable (degraded mode)
            log.exception("cluster: the throttle state %r could not be applied", state)

    async def _resync(self) -> None:
        for d in list(self.dials.values()):
            d.receive(await self.store.read(d.key), mine=True, reset=True)

    async def _renew_loop(self) -> None:
        """Renew the leases of the keys this node owns and still sends to (an idle one lapses)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.ttl / 3)
            if self.health.degraded:
                continue
            now = loop.time()
            for d in list(self.dials.values()):
                d.renew(now)

    async def aclose(self) -> None:
        for task in (self._subscriber, self._renewer, *self._tasks):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._subscriber = self._renewer = None
        if self.health.degraded:
            return
        loop = asyncio.get_running_loop()
        for d in self.dials.values():
            if d.owner == self.node and loop.time() < d.owner_until:
                with contextlib.suppress(Exception):
                    await self.store.disown(d.owner_key, self.node)
