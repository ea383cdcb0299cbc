"""``fastmta sink``: a fast discarding SMTP server with fault injection.

The public names are re-exported here, so ``from fastmta.sink import SinkServer``
is all a test of a sender needs. The server (``server``) drives one
``protocol.SinkProtocol`` per connection (the SMTP dialogue, on top of
``connection``'s framing and output); what it answers is configured in
``config`` and ``profiles``, prepared per listener in ``listener`` and
``replies``, injected by ``faults``, counted in ``stats``.
"""

from fastmta.sink.config import (
    FaultConfig,
    ListenerConfig,
    PhaseFault,
    RateLimit,
    SinkConfig,
    ThrottleRule,
    parse_delay,
    parse_fault,
    parse_listen,
    parse_rate,
    parse_throttle,
)
from fastmta.sink.connection import ConnectionTrace
from fastmta.sink.profiles import PROFILES
from fastmta.sink.server import SinkServer
from fastmta.sink.stats import SinkStats

__all__ = [
    "PROFILES",
    "ConnectionTrace",
    "FaultConfig",
    "ListenerConfig",
    "PhaseFault",
    "RateLimit",
    "SinkConfig",
    "SinkServer",
    "SinkStats",
    "ThrottleRule",
    "parse_delay",
    "parse_fault",
    "parse_listen",
    "parse_rate",
    "parse_throttle",
]
