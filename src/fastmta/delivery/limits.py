"""Throttle limits as configured: the records, the mailbox-provider defaults, and which apply to a site.

Data only: :class:`ThrottleConfig` (per site pattern: connection ceiling,
static rates, how the adaptive dials move), :class:`SourceLimits` (per egress
source: shared rates, warm-up) and the provider table used when the operator
configured nothing for a site. :func:`limits_for` picks the limits of one
site; the controller that enforces them is :mod:`fastmta.delivery.throttle`.
Kept apart from it so configuration loading (:mod:`fastmta.delivery.config`)
needs none of the controller's machinery.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import msgspec

from fastmta.delivery.ratelimit import parse_rate
from fastmta.delivery.warmup import WarmupConfig

__all__ = [
    "PROVIDERS",
    "AdaptiveConfig",
    "Provider",
    "SourceLimits",
    "ThrottleConfig",
    "limits_for",
]

# Constrained types: msgspec rejects a bad value while decoding the config file, naming the key.
PosFloat = Annotated[float, msgspec.Meta(gt=0)]
PosInt = Annotated[int, msgspec.Meta(ge=1)]
Fraction = Annotated[float, msgspec.Meta(gt=0, lt=1)]


# --------------------------------------------------------------------------
# Configuration (data; the provider table below is data too)


class AdaptiveConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """How the dials move. The defaults suit an unknown receiver."""

    #: False: no adaptive control; only the static limits apply.
    enabled: bool = True
    #: Slow start begins with this many connections...
    initial_connections: PosInt = 2
    #: ... and this many messages per second.
    initial_rate: PosFloat = 10.0
    #: Floor of the message rate (the connection floor is 1).
    min_rate: PosFloat = 0.2
    #: Ceiling of the message rate; None: only limited by demand and static limits.
    max_rate: PosFloat | None = None
    #: Multiplicative decrease on a throttle signal.
    decrease: Fraction = 0.5
    #: After a cut, climb fast back to this share of the last good value.
    hold: Fraction = 0.9
    #: Additive step per clean round, as a share of the rate (the window steps by 1).
    probe_step: Fraction = 0.02
    #: Smallest additive step of the rate, messages/s.
    min_rate_step: PosFloat = 0.5
    #: Clean rounds spent at the last good value before probing above it;
    #: doubled after each failed probe up to max_hold_rounds, reset by a
    #: successful one. Longer: fewer throttle replies, slower discovery of
    #: a raised capacity.
    hold_rounds: Annotated[int, msgspec.Meta(ge=0)] = 8
    max_hold_rounds: Annotated[int, msgspec.Meta(ge=0)] = 32
    #: A round lasts at least this long (seconds); see :mod:`fastmta.delivery.throttle`.
    round_min: PosFloat = 1.0
    #: Suspension length when a probe is throttled without a rule-given time.
    default_suspend: PosFloat = 300.0
    #: Obey the providers' published procedures for their throttle replies
    #: (Gmail 4.7.28: pause >= 10 min, one connection, +1 per clean round;
    #: the table: :mod:`fastmta.delivery.procedures`).
    procedures: bool = True


class ThrottleConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """Limits for one site pattern (applied per egress source)."""

    #: Ceiling of the connection window.
    max_connections: PosInt = 10
    #: The pool retires a connection after this many messages.
    max_messages_per_connection: PosInt = 100
    #: Static message rates per (source, site), e.g. ["20/s", "50000/day"] (GCRA).
    rate: list[str] = []
    #: New connections per (source, site), e.g. "30/min".
    connection_rate: str | None = None
    adaptive: AdaptiveConfig = msgspec.field(default_factory=AdaptiveConfig)
    #: Connections open at once per source to every site this entry matches, together (a provider's
    #: tenants, each a site of its own; fastmta.delivery.provider_limits). None: no shared cap.
    provider_max_connections: PosInt | None = None
    #: Message rates per source shared by every site this entry matches, e.g. ["300/s"].
    provider_rate: list[str] = []

    def __post_init__(self) -> None:
        for spec in (*self.rate, *self.provider_rate):
            parse_rate(spec)  # raises with the reason
        if self.connection_rate is not None:
            parse_rate(self.connection_rate)
        a = self.adaptive
        if a.max_rate is not None and a.max_rate < a.min_rate:
            raise ValueError(f"adaptive.max_rate ({a.max_rate}) is below adaptive.min_rate ({a.min_rate})")


class SourceLimits(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """Limits for one egress source, across all sites."""

    #: Static message rates for the source as a whole, e.g. ["100/s"].
    rate: list[str] = []
    #: Warm-up schedule for a new source address (applied per site); None: warm.
    warmup: WarmupConfig | None = None

    def __post_init__(self) -> None:
        for spec in self.rate:
            parse_rate(spec)


class Provider(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """A mailbox provider: MX host patterns and its default limits."""

    name: str
    #: fnmatch patterns matched against the site name and each of its MX hosts.
    match: list[str]
    limits: ThrottleConfig


# --------------------------------------------------------------------------
# Provider defaults, and which limits apply to a site


# Conservative defaults from the providers' published guidance and common
# practice: few connections, a modest start, short connections where the
# provider is known to count per connection. Tune here, not in code.
_PROVIDER_TABLE: list[dict[str, Any]] = [
    {"name": "gmail", "match": ["*.google.com", "*.googlemail.com"],
     "limits": {"max_connections": 5, "max_messages_per_connection": 50,
                "adaptive": {"initial_connections": 2, "initial_rate": 5.0}}},
    {"name": "yahoo", "match": ["*.yahoodns.net", "*.yahoo.com", "*.aol.com"],
     "limits": {"max_connections": 5, "max_messages_per_connection": 20,
                "adaptive": {"initial_connections": 1, "initial_rate": 2.0, "default_suspend": 1800.0}}},
    {"name": "outlook", "match": ["*.protection.outlook.com", "*.outlook.com", "*.hotmail.com"],
     "limits": {"max_connections": 5, "max_messages_per_connection": 20,
                "adaptive": {"initial_connections": 2, "initial_rate": 2.0}}},
    {"name": "apple", "match": ["*.mail.icloud.com", "*.me.com"],
     "limits": {"max_connections": 4, "max_messages_per_connection": 20,
                "adaptive": {"initial_connections": 1, "initial_rate": 2.0}}},
]  # fmt: skip

PROVIDERS: tuple[Provider, ...] = tuple(msgspec.convert(_PROVIDER_TABLE, list[Provider]))


def _matches(site: str, pattern: str) -> bool:
    # A site name is the sorted, comma-joined MX host list (routing.site_name).
    return fnmatch.fnmatch(site, pattern) or any(fnmatch.fnmatch(h, pattern) for h in site.split(","))


def limits_for(
    site: str,
    configured: Mapping[str, ThrottleConfig] | None = None,
    *,
    providers: Sequence[Provider] = PROVIDERS,
    default: ThrottleConfig | None = None,
) -> tuple[str, ThrottleConfig]:
    """The limits for *site* and where they came from.

    The first matching configured pattern (in order) wins, then the first
    matching provider, then *default*. Returns (pattern or provider name or
    "default", limits).
    """
    for pattern, cfg in (configured or {}).items():
        if _matches(site, pattern):
            return pattern, cfg
    for provider in providers:
        if any(_matches(site, p) for p in provider.match):
            return provider.name, provider.limits
    return "default", default if default is not None else ThrottleConfig()
