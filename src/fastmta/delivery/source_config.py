"""``[[sources]]``: the egress sources (a local address, an EHLO name) and the pools they send for.

Kept apart from :mod:`fastmta.delivery.config` (its size), which re-exports :class:`SourceConfig`.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Sequence
from typing import Annotated

import msgspec

from fastmta.delivery.warmup import WarmupConfig

__all__ = ["DEFAULT_POOL", "SourceConfig", "default_ehlo_name", "source_pools"]

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]

_HOST_LABELS = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def default_ehlo_name() -> str:
    """The machine's host name, as Postfix's ``myhostname`` defaults (``localdomain`` added to a name
    without a dot): not "localhost", which receivers checking HELO refuse (Postfix's
    ``reject_non_fqdn_helo_hostname`` answered 504 to every message). No DNS lookup is made for it.
    Set ``ehlo_name`` to the source address's PTR name (``fastmta check`` compares them)."""
    name = socket.gethostname().strip().rstrip(".")
    if not _HOST_LABELS.fullmatch(name) or name.lower().startswith("localhost"):
        name = "localhost"
    return name if "." in name else f"{name}.localdomain"


DEFAULT_POOL = "default"
_POOL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def source_pools(sources: Sequence[SourceConfig]) -> dict[str, list[str]]:
    """Pool name -> the names of its sources, in configuration order (a source without ``pools`` is in
    the default pool; with no source at all, the default pool is the one built-in source)."""
    pools: dict[str, list[str]] = {}
    for s in sources:
        for pool in s.pools or [DEFAULT_POOL]:
            pools.setdefault(pool, []).append(s.name)
    return pools or {DEFAULT_POOL: ["default"]}


class SourceConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """``[[sources]]``: an egress source (local address + EHLO name)."""

    name: str
    #: Local IP address to bind; omitted: the OS chooses.
    address: str | None = None
    ehlo_name: str = msgspec.field(default_factory=default_ehlo_name)
    #: Share of messages given to this source (weighted random per message).
    weight: PositiveInt = 1
    #: Static message rates for this source across all sites, e.g. ["100/s"].
    rate: list[str] = []
    #: Warm-up schedule for a new address (per site); omitted: already warm.
    warmup: WarmupConfig | None = None
    #: The egress pools this source sends for (PowerMTA's virtual-mta-pool, KumoMTA's egress_pool);
    #: omitted: the "default" pool, which sends mail that names no pool.
    pools: list[str] = []

    def __post_init__(self) -> None:
        for pool in self.pools:
            if not _POOL_NAME.fullmatch(pool):
                raise ValueError(f"source {self.name!r}: pool name {pool!r}: 1-64 characters of A-Z a-z 0-9 _ . -")
        if self.address is not None:
            try:
                ipaddress.ip_address(self.address)
            except ValueError:
                raise ValueError(f"source {self.name!r}: address {self.address!r} is not an IP address") from None
        if not self.ehlo_name or any(c <= " " or c == "\x7f" for c in self.ehlo_name):
            raise ValueError(f"source {self.name!r}: invalid ehlo_name {self.ehlo_name!r}")
