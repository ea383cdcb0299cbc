"""What a webhook endpoint is (``[[serve.webhooks]]``) and what its sender reports.

Configuration and statistics only: :mod:`fastmta.serve.events` is the outbox
that stores the records and sends them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated
from urllib.parse import urlsplit

import msgspec

__all__ = ["EndpointStats", "WebhookEndpoint"]

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
PositiveSeconds = Annotated[float, msgspec.Meta(gt=0)]
Seconds = Annotated[float, msgspec.Meta(ge=0)]


class WebhookEndpoint(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """``[[serve.webhooks]]``: one HTTP endpoint that receives every record."""

    url: str
    #: The endpoint's name in stats, metrics and logs, and the key of its
    #: cursor; default: the URL without credentials or query.
    name: str | None = None
    #: Sent as ``Authorization: Bearer <token>``.
    token: str | None = None
    #: Extra request headers (e.g. a shared secret under another name).
    headers: dict[str, str] = {}
    #: Only records with one of these ``status`` values; None: every record.
    statuses: list[str] | None = None
    #: Records per request at most.
    batch_size: PositiveInt = 100
    #: A batch that is not full waits this long after its oldest record for more.
    max_batch_delay: Seconds = 1.0
    #: Seconds one request may take in all.
    timeout: PositiveSeconds = 10.0
    #: The first retry's delay; it doubles with every failure up to max_backoff.
    initial_backoff: PositiveSeconds = 1.0
    max_backoff: PositiveSeconds = 300.0

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"webhook url {self.url!r}: an http:// or https:// URL with a host is needed")
        for key, value in self.headers.items():
            if not key or any(c in key + value for c in "\r\n\0") or ":" in key:
                raise ValueError(f"webhook {self.label}: bad header {key!r}")
        if self.token is not None and any(c in self.token for c in "\r\n\0"):
            raise ValueError(f"webhook {self.label}: the token has a control character")
        if self.max_backoff < self.initial_backoff:
            raise ValueError(f"webhook {self.label}: max_backoff is less than initial_backoff")

    @property
    def label(self) -> str:
        """The name, or the URL without what may be secret (user info, query)."""
        if self.name:
            return self.name
        p = urlsplit(self.url)
        host = p.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        return f"{p.scheme}://{host}{f':{p.port}' if p.port else ''}{p.path}"


@dataclass(slots=True)
class EndpointStats:
    """What one endpoint's sender did (``sent`` and ``dropped`` survive restarts)."""

    sent: int = 0  # records acknowledged with a 2xx
    batches: int = 0  # requests answered with a 2xx (this process)
    failed_attempts: int = 0  # requests that failed (this process)
    rejected: int = 0  # of those: answered with a 4xx other than 408/429
    dropped: int = 0  # records deleted by max_rows / max_age before this endpoint took them
    backlog: int = 0  # records after its cursor (an upper bound with a statuses filter)
    last_error: str | None = None
    last_error_at: float | None = None  # wall clock
    last_success_at: float | None = None
