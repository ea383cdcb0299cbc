"""This node's membership of a cluster: the Redis client, the shared limiters, the lease gates.

:class:`Cluster` is what :class:`fastmta.delivery.throttle.Throttles` consults
(``throttles.cluster``, :class:`fastmta.delivery.throttle.ClusterHooks`): for a
(source, site) throttle, the :class:`SharedLimiter` of every ``[[cluster.limit]]``
that applies (one per key on this node, shared by the throttles the key
covers), the sender-domain limiters, and the site's :class:`LeaseGate` when
``max_connections_per_site`` is set, and (``share_throttle``, the default) the
:class:`SharedDial` that keeps the throttle's adaptive dials the same on every
node. Keys::

    {prefix}gcra:ip_site:{egress IP or source name}|{site}
    {prefix}gcra:site:{site}
    {prefix}gcra:provider:{provider}
    {prefix}gcra:sender_domain:{domain}
    {prefix}leases:{site}
    {prefix}throttle:{egress IP or source name}|{site}   (throttle_scope "site": *|{site})
    {prefix}throttle-owner:...  and the channel {prefix}throttle

The engine starts it (:meth:`start`: one ``PING``, and the throttle-state
subscriber; unreachable at start is degraded mode, not an error) and closes
it (leases given back).
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastmta.delivery.cluster.config import ClusterConfig, ClusterLimit
from fastmta.delivery.cluster.degraded import Health
from fastmta.delivery.cluster.gcra import GcraStore, SharedLimiter, default_burst
from fastmta.delivery.cluster.leases import LeaseGate, LeaseStore
from fastmta.delivery.cluster.shared_throttle import SharedDial, SharedThrottles

log = logging.getLogger("fastmta.delivery.cluster")

__all__ = ["Cluster", "redis_client"]


def redis_client(url: str, timeout: float) -> Any:
    """An asyncio redis-py client that fails fast (no retries: a failure is degraded mode's to handle)."""
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return aioredis.Redis.from_url(
        url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0),
    )


def _site_matches(site: str, pattern: str) -> bool:
    return fnmatch.fnmatch(site, pattern) or any(fnmatch.fnmatch(h, pattern) for h in site.split(","))


class Cluster:
    """Shared limits and leases of one node; ``client``: a redis-py asyncio client (made from the config if None)."""

    def __init__(self, config: ClusterConfig, *, sources: Mapping[str, str | None] | None = None,
                 client: Any = None) -> None:  # fmt: skip
        self.config = config
        self.node = config.node_name()
        self.client = client if client is not None else redis_client(config.redis, config.timeout)
        self.health = Health(self.client.ping, config.retry, config.nodes_hint)
        self.gcra = GcraStore(self.client)
        self.leases = LeaseStore(self.client)
        #: Source name -> egress address (the ``ip_site`` key uses the address: what the provider sees).
        self.sources = dict(sources or {})
        self._limiters: dict[str, SharedLimiter] = {}
        self._gates: dict[str, LeaseGate] = {}
        #: The adaptive throttles' shared state (None: ``share_throttle = false``, each node its own).
        self.throttles = (
            SharedThrottles(self.client, prefix=config.prefix, node=self.node, ttl=config.lease_ttl, health=self.health)
            if config.share_throttle
            else None
        )

    # --- ClusterHooks ----------------------------------------------------------

    def limiters(self, source: str, site: str, provider: str) -> Sequence[SharedLimiter]:
        out = []
        for lim in self.config.limit:
            if lim.scope == "ip_site" and _site_matches(site, lim.match):
                out.append(self._limiter(lim, f"ip_site:{self.sources.get(source) or source}|{site}"))
            elif lim.scope == "site" and _site_matches(site, lim.match):
                out.append(self._limiter(lim, f"site:{site}"))
            elif lim.scope == "provider" and fnmatch.fnmatch(provider, lim.match):
                out.append(self._limiter(lim, f"provider:{provider}"))
        return out

    def sender_limiters(self, domain: str) -> Sequence[SharedLimiter]:
        return [
            self._limiter(lim, f"sender_domain:{domain}")
            for lim in self.config.limit
            if lim.scope == "sender_domain" and fnmatch.fnmatch(domain, lim.match)
        ]

    def lease(self, site: str) -> LeaseGate | None:
        cap = self.config.max_connections_per_site
        if cap is None:
            return None
        gate = self._gates.get(site)
        if gate is None:
            key = f"{self.config.prefix}leases:{site}"
            gate = self._gates[site] = LeaseGate(self.leases, key, self.node, cap, self.config.lease_ttl, self.health)
        return gate

    def shared_state(self, source: str, site: str) -> SharedDial | None:
        """The shared dials of (egress address or source name, site); None: not shared."""
        if self.throttles is None:
            return None
        if self.config.throttle_scope == "site":
            return self.throttles.dial(f"*|{site}")  # "*": every egress address (never an address or name)
        return self.throttles.dial(f"{self.sources.get(source) or source}|{site}")

    def _limiter(self, lim: ClusterLimit, key: str) -> SharedLimiter:
        full = f"{self.config.prefix}gcra:{key}"
        limiter = self._limiters.get(full)
        if limiter is None:
            spec = lim.spec
            burst = lim.burst if lim.burst is not None else default_burst(spec, self.config.batch, self.config.nodes_hint)
            limiter = self._limiters[full] = SharedLimiter(
                self.gcra, full, spec, batch=self.config.batch, burst=burst, health=self.health
            )
        return limiter

    # --- life and state ---------------------------------------------------------

    @property
    def degraded(self) -> bool:
        """True while Redis is unreachable (limits / nodes_hint locally); for the metrics."""
        return self.health.degraded

    @property
    def round_trips(self) -> int:
        """Redis calls made by the limiters, leases and shared throttles so far (pub/sub pushes not counted)."""
        return self.gcra.calls + self.leases.calls + (self.throttles.calls if self.throttles is not None else 0)

    def state(self) -> dict[str, Any]:
        throttles = self.throttles.state() if self.throttles is not None else None
        return {"node": self.node, **self.health.state(), "round_trips": self.round_trips,
                "limiters": len(self._limiters), "lease_sites": len(self._gates), "throttle": throttles}

    async def start(self) -> None:
        try:
            await self.client.ping()
        except Exception as exc:
            self.health.failed(exc)
        else:
            log.info("cluster: node %s joined %s", self.node, self.config.redis)
        if self.throttles is not None:
            self.throttles.start()  # it keeps trying while Redis is unreachable

    async def aclose(self) -> None:
        for gate in self._gates.values():
            await gate.aclose()
        if self.throttles is not None:
            await self.throttles.aclose()  # owner leases given back
        await self.health.aclose()
        try:
            await self.client.aclose()
        except Exception:  # closing a client whose server is gone
            log.debug("cluster: closing the Redis client failed", exc_info=True)
