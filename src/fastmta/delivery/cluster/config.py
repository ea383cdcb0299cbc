"""``[cluster]``: what several fastmta nodes share through Redis (or Valkey), and how.

Data only (msgspec Structs, unknown keys rejected), loaded as part of
:class:`fastmta.delivery.config.Config`. An empty ``redis`` (the default)
means a single node: nothing here is used and redis-py is never imported.

Example::

    [cluster]
    redis = "redis://10.0.0.5:6379/0"
    node = "mta-1"                 # default: hostname:pid
    batch = 0.2                    # seconds' worth of tokens taken from Redis at once
    max_connections_per_site = 20  # across the whole cluster (connection leases)
    nodes_hint = 3                 # live nodes assumed when Redis is unreachable
    share_throttle = true          # one adaptive window/rate per (egress IP, site) for all nodes (default)
    throttle_scope = "ip_site"     # or "site": one per site, whatever the egress address

    [[cluster.limit]]
    scope = "ip_site"              # per (egress IP, site)
    match = "*.google.com"
    rate = "100/s"
    burst = 20

    [[cluster.limit]]
    scope = "provider"             # per provider (limits_for's name: gmail, yahoo, ...)
    match = "gmail"
    rate = "5000/min"
"""

from __future__ import annotations

import os
import socket
from typing import Annotated, Literal

import msgspec

from fastmta.delivery.ratelimit import RateSpec, parse_rate

__all__ = ["ClusterConfig", "ClusterLimit", "Scope"]

#: ``ip_site``: per (egress IP, site); ``site``: per site, all egress IPs of all nodes together;
#: ``provider``: per provider name; ``sender_domain``: per envelope sender domain.
Scope = Literal["ip_site", "site", "provider", "sender_domain"]
_Pos = Annotated[float, msgspec.Meta(gt=0)]


class ClusterLimit(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """One shared GCRA limit: ``rate`` per key of ``scope``, for the keys ``match`` (fnmatch) picks."""

    scope: Scope = "ip_site"
    #: fnmatch pattern on the site (or one of its MX hosts), the provider name, or the sender domain.
    match: str = "*"
    rate: str
    #: Events that may go back to back (default: ``batch`` seconds' worth times ``nodes_hint``, at least 1).
    burst: Annotated[int, msgspec.Meta(ge=1)] | None = None

    def __post_init__(self) -> None:
        parse_rate(self.rate)

    @property
    def spec(self) -> RateSpec:
        return parse_rate(self.rate)


class ClusterConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """``[cluster]``; ``redis = ""`` (the default): one node, nothing shared."""

    redis: str = ""
    #: This node's name in leases and logs; "" = hostname:pid.
    node: str = ""
    #: Prefix of every key this cluster writes (several clusters may share one Redis).
    prefix: str = "fastmta:"
    limit: list[ClusterLimit] = []
    #: Seconds' worth of tokens a node takes from Redis at once (Redis off the per-message path).
    batch: _Pos = 0.2
    #: Concurrent connections to one site across the cluster (connection leases); None: no cap.
    max_connections_per_site: Annotated[int, msgspec.Meta(ge=1)] | None = None
    #: A lease not renewed for this long is void (a crashed node's connections are freed after it;
    #: the owner of a shared throttle that went idle or died is replaced after it).
    lease_ttl: _Pos = 30.0
    #: Share the adaptive throttle state per (egress IP, site) through Redis: a throttle reply to one
    #: node slows them all, and one elected node raises it (:mod:`.shared_throttle`). False: per node.
    share_throttle: bool = True
    #: What one shared throttle covers. ``ip_site``: each (egress IP, site), as most receivers count
    #: (Gmail's 4.7.28 names the IP). ``site``: the site for every egress address of the cluster
    #: together, where the receiver throttles the sender as a whole (its domain, a /24, one NAT):
    #: a throttle reply to any node's address then slows every node.
    throttle_scope: Literal["ip_site", "site"] = "ip_site"
    #: Live nodes assumed while Redis is unreachable: each takes limit / nodes_hint locally.
    nodes_hint: Annotated[int, msgspec.Meta(ge=1)] = 1
    #: Timeout of one Redis call, and how often an unreachable Redis is tried again (seconds).
    timeout: _Pos = 0.5
    retry: _Pos = 1.0
    #: Share the suppression list through Redis ({prefix}suppression; fastmta.feedback.suppression_redis).
    suppression: bool = False

    @property
    def active(self) -> bool:
        return bool(self.redis)

    def node_name(self) -> str:
        return self.node or f"{socket.gethostname()}:{os.getpid()}"
