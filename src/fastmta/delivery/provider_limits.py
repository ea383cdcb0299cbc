"""Limits shared by every site one ``[sites]`` pattern or built-in provider matches.

A site is a set of MX hosts, so each Microsoft 365 tenant (``tenant-com.mail.protection.outlook.com``)
is a site of its own, with its own throttle: a B2B list over a thousand tenants could open five
connections to each, thousands to Microsoft from one address, and a throttle reply slowed only the
one tenant that sent it. ``provider_max_connections`` and ``provider_rate`` cap all of them together,
per egress source, as KumoMTA's ``provider_connection_limit`` / ``provider_max_message_rate`` and
PowerMTA's ``mx-rollup`` do: the sites keep their own adaptive throttles inside the shared cap.

The group is what :func:`limits_for` says the limits came from: the configured pattern, else the
provider's name.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

from fastmta.delivery.limits import ThrottleConfig
from fastmta.delivery.ratelimit import Gcra, parse_rate

__all__ = ["GRANT_TIME", "POLL", "Lease", "ProviderLimits", "SharedConnections"]


class Lease(Protocol):
    """A cap on connections kept elsewhere: may one more open (0.0) or when to ask again (the throttle's
    ``lease``: a shared cap here, a cluster's through Redis)."""

    def wait(self, now: float) -> float: ...

    def started(self) -> None: ...

    def closed(self) -> None: ...


#: How often a site held by a full shared cap asks again (a connection closing at another site of the
#: group does not wake it; the cluster's leases poll the same way).
POLL = 0.25


#: How long a "go" counts against the cap before its connection starts (it starts in the loop's next
#: turn; one that never does, refused by the machine's connection budget, stops counting after this).
GRANT_TIME = 1.0


class SharedConnections:
    """At most *cap* connections open at once from one source to all the sites of one group.

    A "go" is counted at once: the sites' queues ask in the same turn of the loop, and their connections
    start (``started``) only in the next: counting those alone let six sites open 18 under a cap of 4.
    """

    __slots__ = ("_grants", "cap", "open")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.open = 0
        self._grants: deque[float] = deque()  # when each "go" not yet started was given

    def wait(self, now: float) -> float:
        grants = self._grants
        while grants and grants[0] < now - GRANT_TIME:
            grants.popleft()
        if self.open + len(grants) >= self.cap:
            return POLL
        grants.append(now)
        return 0.0

    def started(self) -> None:
        if self._grants:
            self._grants.popleft()
        self.open += 1

    def closed(self) -> None:
        self.open = max(0, self.open - 1)


class _BothLeases:
    """This node's shared cap, then the cluster's lease (asked only when the first allows: asking the
    cluster may take a lease)."""

    __slots__ = ("cluster", "local")

    def __init__(self, local: SharedConnections, cluster: Lease) -> None:
        self.local, self.cluster = local, cluster

    def wait(self, now: float) -> float:
        return self.local.wait(now) or self.cluster.wait(now)

    def started(self) -> None:
        self.local.started()
        self.cluster.started()

    def closed(self) -> None:
        self.local.closed()
        self.cluster.closed()


class ProviderLimits:
    """The shared connection caps and rates, by (source, group)."""

    def __init__(self) -> None:
        self._connections: dict[tuple[str, str], SharedConnections] = {}
        self._rates: dict[tuple[str, str], list[Gcra]] = {}

    def lease(self, source: str, group: str, cfg: ThrottleConfig, other: Lease | None) -> Lease | None:
        """*other* (a cluster's lease, or None) joined with the group's connection cap, if it has one."""
        if cfg.provider_max_connections is None:
            return other
        shared = self._connections.get((source, group))
        if shared is None:
            shared = self._connections[(source, group)] = SharedConnections(cfg.provider_max_connections)
        return shared if other is None else _BothLeases(shared, other)

    def limiters(self, source: str, group: str, cfg: ThrottleConfig) -> list[Gcra]:
        """The group's message rates for *source* (one limiter each, shared by the group's sites)."""
        if not cfg.provider_rate:
            return []
        rates = self._rates.get((source, group))
        if rates is None:
            rates = self._rates[(source, group)] = [Gcra.from_spec(parse_rate(s)) for s in cfg.provider_rate]
        return rates

    def open_connections(self, source: str, group: str) -> int:
        shared = self._connections.get((source, group))
        return shared.open if shared is not None else 0
