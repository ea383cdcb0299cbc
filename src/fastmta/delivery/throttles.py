"""All the throttles of an engine: one :class:`~fastmta.delivery.throttle.SiteThrottle` per (egress source, site).

The registry apart from the controller: it picks each site's limits (the
configuration's patterns, then the provider table, then the defaults), shares
each source's own rate limits among its sites, hands in a cluster's shared
limits and leases, and keeps the warm-up states to persist.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

from fastmta.delivery.limits import PROVIDERS, Provider, SourceLimits, ThrottleConfig, limits_for
from fastmta.delivery.procedures import PROCEDURES, Procedures, SenderHolds
from fastmta.delivery.ratelimit import Gcra, parse_rate
from fastmta.delivery.throttle import ClusterHooks, Limiter, SiteThrottle, ThrottleEvent
from fastmta.delivery.warmup import WarmupState

__all__ = ["Throttles"]


class Throttles:
    """All the throttles of an engine: one per (source, site), per-source limiters shared."""

    def __init__(
        self,
        *,
        sites: Mapping[str, ThrottleConfig] | None = None,
        sources: Mapping[str, SourceLimits] | None = None,
        default: ThrottleConfig | None = None,
        providers: Sequence[Provider] = PROVIDERS,
        on_event: Callable[[ThrottleEvent], None] | None = None,
        procedures: Procedures | None = PROCEDURES,
    ) -> None:
        self.sites = dict(sites or {})
        self.sources = dict(sources or {})
        self.default = default
        self.providers = providers
        self.on_event = on_event
        #: Provider procedures the throttles obey (None: none; a site may opt out: ``adaptive.procedures``).
        self.procedures = procedures
        #: Sender domains held per site, shared by the site's throttles of every source.
        self.sender_holds: dict[str, SenderHolds] = {}
        self._throttles: dict[tuple[str, str], SiteThrottle] = {}
        self._source_limiters: dict[str, list[Gcra]] = {}
        #: Shared limits and connection leases of a cluster (fastmta.delivery.cluster); None: one node.
        self.cluster: ClusterHooks | None = None
        #: Wall time minus the ``now`` clock's time (warm-up counts calendar days).
        self.wall_offset = 0.0
        #: Warm-up states saved by an earlier run, by (source, site); used as throttles are made.
        self.saved_warmups: dict[tuple[str, str], WarmupState] = {}

    def get(self, source: str, site: str, now: float) -> SiteThrottle:
        key = (source, site)
        throttle = self._throttles.get(key)
        if throttle is None:
            origin, cfg = limits_for(site, self.sites, providers=self.providers, default=self.default)
            src = self.sources.get(source, SourceLimits())
            shared = self._source_limiters.get(source)
            if shared is None:
                shared = self._source_limiters[source] = [Gcra.from_spec(parse_rate(s)) for s in src.rate]
            cluster = self.cluster
            dials = cluster.shared_state(source, site) if cluster is not None and cfg.adaptive.enabled else None
            limiters: Sequence[Limiter] = shared if cluster is None else [*shared, *cluster.limiters(source, site, origin)]
            throttle = SiteThrottle(
                source, site, cfg, now, source_limiters=limiters, warmup=src.warmup,
                warmup_state=self.saved_warmups.get(key), wall_offset=self.wall_offset, on_event=self.on_event,
                procedures=self.procedures, sender_holds=self.sender_holds.setdefault(site, SenderHolds()),
                lease=cluster.lease(site) if cluster else None, sender_limiters=cluster.sender_limiters if cluster else None,
                shared=dials,
            )
            self._throttles[key] = throttle
        return throttle

    def __iter__(self) -> Iterator[SiteThrottle]:
        return iter(self._throttles.values())

    def warmup_states(self) -> dict[tuple[str, str], WarmupState]:
        """Every warm-up's state to persist: the saved ones, updated by this run's."""
        states = dict(self.saved_warmups)
        for (source, site), t in self._throttles.items():
            if t.warmup is not None:
                states[(source, site)] = t.warmup.state()
        return states
