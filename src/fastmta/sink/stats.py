"""Counters of the sink: plain int attributes, because they are bumped on
every command of every message and an attribute increment is the cheapest
thing Python can do. ``as_dict()`` is what ``--stats-json`` writes.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

#: The faults that are a rate-limit reply (the profile's ``rate_limited``): a sender's throttle signal.
THROTTLE_FAULTS = ("rate_limit", "site_rate_limit", "throttle_ip")


class IPStats:
    """What one client address did."""

    __slots__ = ("bytes", "connections", "messages", "recipients", "rejections", "transactions")

    def __init__(self) -> None:
        self.connections = 0
        self.transactions = 0
        self.messages = 0
        self.recipients = 0
        self.bytes = 0
        #: 4xx/5xx replies sent to this address (faults and refusals).
        self.rejections = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class SinkStats:
    """Live counters of a running sink (read them any time)."""

    __slots__ = (
        "active_connections",
        "bytes",
        "connections",
        "faults",
        "max_concurrent_connections",
        "messages",
        "per_ip",
        "recipients",
        "rejected_messages",
        "replies",
        "tls_sessions",
        "transactions",
    )

    def __init__(self) -> None:
        self.connections = 0
        self.active_connections = 0
        self.max_concurrent_connections = 0
        #: MAIL FROM commands accepted.
        self.transactions = 0
        #: Messages accepted at end of data (DATA or BDAT LAST).
        self.messages = 0
        #: RCPT TO commands accepted.
        self.recipients = 0
        #: Message octets accepted, as received: DATA content still dot-stuffed
        #: (unstuffing costs a copy the discard path avoids) without the final
        #: ".CRLF"; BDAT chunks as sent.
        self.bytes = 0
        #: Messages whose content arrived but were refused at end of data.
        self.rejected_messages = 0
        self.tls_sessions = 0
        self.replies: defaultdict[int, int] = defaultdict(int)
        #: Injected faults by phase ("rcpt", "ratelimit", "greylist", ...).
        self.faults: defaultdict[str, int] = defaultdict(int)
        self.per_ip: dict[str, IPStats] = {}

    def ip(self, address: str) -> IPStats:
        s = self.per_ip.get(address)
        if s is None:
            s = self.per_ip[address] = IPStats()
        return s

    @property
    def throttled(self) -> int:
        """Rate-limit replies sent (:data:`THROTTLE_FAULTS`: per client, site-wide, by client address)."""
        return sum(self.faults.get(kind, 0) for kind in THROTTLE_FAULTS)

    def throttled_per_1000(self) -> float | None:
        """Rate-limit replies per 1,000 messages accepted (None before the first message)."""
        return self.throttled * 1000 / self.messages if self.messages else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "connections": self.connections,
            "active_connections": self.active_connections,
            "max_concurrent_connections": self.max_concurrent_connections,
            "transactions": self.transactions,
            "messages": self.messages,
            "recipients": self.recipients,
            "bytes": self.bytes,
            "rejected_messages": self.rejected_messages,
            "tls_sessions": self.tls_sessions,
            # JSON object keys are strings; sorted so files diff cleanly.
            "replies": {str(code): n for code, n in sorted(self.replies.items())},
            "faults": dict(sorted(self.faults.items())),
            "throttled": self.throttled,
            "throttled_per_1000_messages": self.throttled_per_1000(),
            "per_ip": {ip: s.as_dict() for ip, s in sorted(self.per_ip.items())},
        }


def write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    """Write *data* so a reader never sees half a file (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
