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

__all__ = ["GRANT_TIME", "POLL", "Lease", "ProviderLimits", "SharedConnections", "SharedRates"]


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
    """At most *cap* connections open at once from one source to all the sites of one group (None: no
    cap, only counted: a reload may set one, and the group's busy sites hold this same object).

    A "go" is counted at once: the sites' queues ask in the same turn of the loop, and their connections
    start (``started``) only in the next: counting those alone let six sites open 18 under a cap of 4.
    """

    __slots__ = ("_grants", "cap", "open")

    def __init__(self, cap: int | None) -> None:
        self.cap = cap
        self.open = 0
        self._grants: deque[float] = deque()  # when each "go" not yet started was given

    def wait(self, now: float) -> float:
        if self.cap is None:
            return 0.0
        grants = self._grants
        while grants and grants[0] < now - GRANT_TIME:
            grants.popleft()
        if self.open + len(grants) >= self.cap:
            return POLL
        grants.append(now)
        return 0.0

    def ungrant(self) -> None:
        """Take back the last "go": its connection will not start (the cluster's lease said no)."""
        if self._grants:
            self._grants.pop()

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
        wait = self.local.wait(now)
        if wait > 0:
            return wait
        wait = self.cluster.wait(now)
        if wait > 0:
            self.local.ungrant()  # not starting after all: the group's other sites may use it
        return wait

    def started(self) -> None:
        self.local.started()
        self.cluster.started()

    def closed(self) -> None:
        self.local.closed()
        self.cluster.closed()


class SharedRates:
    """The group's message rates for one source: a limiter the group's sites share, its rates replaced
    in place when a reload changes them (the busy sites' throttles hold this object)."""

    __slots__ = ("gcras", "specs")

    def __init__(self, specs: list[str]) -> None:
        self.specs: list[str] = []
        self.gcras: list[Gcra] = []
        self.set(specs)

    def set(self, specs: list[str]) -> None:
        if specs != self.specs:
            self.specs, self.gcras = list(specs), [Gcra.from_spec(parse_rate(spec)) for spec in specs]

    def wait(self, now: float, n: int = 1) -> float:
        if not self.gcras:
            return 0.0  # the usual case, asked for every message: no generator
        return max(g.wait(now, n) for g in self.gcras)

    def take(self, now: float, n: int = 1) -> None:
        for g in self.gcras:
            g.take(now, n)


class ProviderLimits:
    """The shared connection caps and rates, by (source, group). Made for every group a throttle asks
    about, configured or not, so that a reload can set, change or lift them for busy sites too."""

    def __init__(self) -> None:
        self._connections: dict[tuple[str, str], SharedConnections] = {}
        self._rates: dict[tuple[str, str], SharedRates] = {}

    def lease(self, source: str, group: str, cfg: ThrottleConfig, other: Lease | None) -> Lease:
        """The group's connection cap for *source*, joined with *other* (a cluster's lease) if any."""
        shared = self._connections.get((source, group))
        if shared is None:
            shared = self._connections[(source, group)] = SharedConnections(cfg.provider_max_connections)
        shared.cap = cfg.provider_max_connections  # a site made after a reload brings the group's new cap
        return shared if other is None else _BothLeases(shared, other)

    def limiters(self, source: str, group: str, cfg: ThrottleConfig) -> list[SharedRates]:
        """The group's message rates for *source*, shared by the group's sites."""
        rates = self._rates.get((source, group))
        if rates is None:
            rates = self._rates[(source, group)] = SharedRates(cfg.provider_rate)
        rates.set(cfg.provider_rate)
        return [rates]

    def retune(self, source: str, group: str, cfg: ThrottleConfig) -> None:
        """A reload's limits for the group (SIGHUP): the next connection and message go by them."""
        shared = self._connections.get((source, group))
        if shared is not None:
            shared.cap = cfg.provider_max_connections
        rates = self._rates.get((source, group))
        if rates is not None:
            rates.set(cfg.provider_rate)

    def open_connections(self, source: str, group: str) -> int:
        shared = self._connections.get((source, group))
        return shared.open if shared is not None else 0
