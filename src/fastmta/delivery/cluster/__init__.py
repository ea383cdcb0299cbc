"""Several fastmta nodes as one sender: shared limits and connection leases on Redis (or Valkey).

Each node keeps its own durable journal; what is shared is what a provider
sees as one sender. :mod:`.config` (``[cluster]``), :mod:`.gcra` (shared GCRA
limits taken in batches), :mod:`.leases` (cluster-wide connection caps),
:mod:`.shared_throttle` (one adaptive throttle state per (egress IP, site)),
:mod:`.degraded` (what happens while Redis is unreachable), :mod:`.node`
(:class:`Cluster`, which the engine attaches to its throttles).
"""

from fastmta.delivery.cluster.config import ClusterConfig, ClusterLimit
from fastmta.delivery.cluster.node import Cluster

__all__ = ["Cluster", "ClusterConfig", "ClusterLimit"]
