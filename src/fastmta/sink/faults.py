"""Deciding when the sink misbehaves, and how its refusal reads.

One :class:`FaultEngine` per listener (each listener pretends to be one
provider's host, with its own connection counts, rate buckets, site-wide
limit, throttled addresses and greylist),
sharing the server's seeded ``random.Random`` so ``--seed`` replays a run.
The server only calls in here when faults are configured, which keeps the
no-fault path free of it.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import math
import random
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fastmta.sink.config import PHASES, FaultConfig, Phase
from fastmta.sink.profiles import ProviderProfile, ReplyTemplate
from fastmta.sink.stats import SinkStats

#: Greylist entries kept before the table is forgotten (a bound, not a policy).
MAX_GREYLIST = 1_000_000
#: Client addresses remembered by the throttle rules before the table is forgotten (a bound, not a policy).
MAX_THROTTLED = 100_000


@dataclass(frozen=True, slots=True)
class Refusal:
    """A reply that replaces the success reply of a phase."""

    wire: bytes
    code: int
    #: 421 means the server closes the channel (RFC 5321 3.8).
    close: bool


class FaultEngine:
    __slots__ = (
        "_buckets",
        "_clock",
        "_connections",
        "_delays",
        "_faults",
        "_filter_cut",
        "_greylist",
        "_rng",
        "_site_interval",
        "_site_tat",
        "_site_tolerance",
        "_stats",
        "_throttle_rules",
        "_throttled",
        "_unknown",
        "_unknown_at_eod",
        "config",
        "hostname",
        "profile",
    )

    def __init__(
        self,
        config: FaultConfig,
        profile: ProviderProfile,
        hostname: str,
        rng: random.Random,
        stats: SinkStats,
        clock: Callable[[], float],
    ) -> None:
        self.config = config
        self.profile = profile
        self.hostname = hostname
        self._rng = rng
        self._stats = stats
        self._clock = clock
        self._faults: dict[Phase, list[tuple[float, ReplyTemplate]]] = {p: [] for p in PHASES}
        for f in config.replies:
            self._faults[f.phase].append((f.probability, f.template() or profile.text_for(f.code)))
        self._delays: dict[Phase, float] = dict(config.delays)
        self._connections: dict[str, int] = {}
        self._buckets: dict[str, list[float]] = {}
        self._greylist: dict[tuple[bytes, bytes, str], float] = {}
        self._unknown = [re.compile(fnmatch.translate(p), re.IGNORECASE) for p in config.unknown_recipients]
        self._unknown_at_eod = (
            config.unknown_at == "eod" if config.unknown_at is not None else profile.unknown_at_end_of_data
        )
        # filtered_share as a bound on a 32-bit hash of the address.
        self._filter_cut = round(config.filtered_share * 2**32)
        # The site-wide limit: GCRA, one theoretical arrival time for all clients.
        site = config.site_rate_limit
        self._site_interval = 1.0 / site.rate if site is not None else 0.0
        self._site_tolerance = (site.burst - 1.0) * self._site_interval if site is not None else 0.0
        self._site_tat = -math.inf
        self._throttle_rules = [(ipaddress.ip_network(r.network, strict=False), r.seconds) for r in config.throttle]
        # Client address -> (its throttle window in seconds or None: no rule matches, first MAIL time).
        self._throttled: dict[str, tuple[float | None, float]] = {}

    # ------------------------------------------------------------ helpers

    def delay(self, phase: Phase) -> float:
        return self._delays.get(phase, 0.0)

    def _refuse(self, kind: str, template: ReplyTemplate, ip: str, sender: bytes, rcpt: bytes, qid: str) -> Refusal:
        self._stats.faults[kind] += 1
        fields = {
            "host": self.hostname,
            "ip": ip,
            "sender": sender.decode("utf-8", "replace"),
            "rcpt": rcpt.decode("utf-8", "replace"),
            "id": qid,
        }
        return Refusal(template.render(fields), template.code, template.code == 421)

    def _roll(self, phase: Phase, ip: str, sender: bytes, rcpt: bytes, qid: str) -> Refusal | None:
        # One draw per configured fault, in order: the sequence of draws, and
        # so every decision, is fixed by the seed and the order of commands.
        for probability, template in self._faults[phase]:
            if self._rng.random() < probability:
                return self._refuse(phase, template, ip, sender, rcpt, qid)
        return None

    def _is_unknown(self, rcpt: bytes) -> bool:
        text = rcpt.decode("utf-8", "replace")
        return any(p.match(text) for p in self._unknown)

    def _is_filtered(self, rcpt: bytes) -> bool:
        return zlib.crc32(rcpt.lower()) < self._filter_cut

    # ------------------------------------------------------------- phases

    def connect(self, ip: str, qid: str) -> Refusal | None:
        """Called for every connection; :meth:`disconnect` must follow."""
        n = self._connections.get(ip, 0) + 1
        self._connections[ip] = n
        cap = self.config.max_connections_per_ip
        if cap and n > cap:
            return self._refuse("max_connections", self.profile.too_many_connections, ip, b"", b"", qid)
        return self._roll("connect", ip, b"", b"", qid)

    def disconnect(self, ip: str) -> None:
        n = self._connections.get(ip, 0) - 1
        if n > 0:
            self._connections[ip] = n
        else:
            self._connections.pop(ip, None)

    def ehlo(self, ip: str, qid: str) -> Refusal | None:
        return self._roll("ehlo", ip, b"", b"", qid)

    def _throttle_window(self, ip: str, now: float) -> bool:
        """Is *ip* in a throttle rule's network, within its window (from its first MAIL)?"""
        known = self._throttled.get(ip)
        if known is None:
            seconds: float | None = None
            try:
                addr = ipaddress.ip_address(ip.partition("%")[0])
            except ValueError:
                addr = None
            if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
                addr = addr.ipv4_mapped
            for network, secs in self._throttle_rules:
                if addr is not None and addr.version == network.version and addr in network:
                    seconds = secs
                    break
            if len(self._throttled) >= MAX_THROTTLED:
                self._throttled.clear()
            known = self._throttled[ip] = (seconds, now)
        seconds, first = known
        return seconds is not None and (seconds == 0.0 or now - first < seconds)

    def mail(self, ip: str, sender: bytes, qid: str) -> Refusal | None:
        config = self.config
        now = self._clock()
        if self._throttle_rules and self._throttle_window(ip, now):
            return self._refuse("throttle_ip", self.profile.rate_limited, ip, sender, b"", qid)
        limit = config.rate_limit
        bucket: list[float] | None = None
        tokens = 0.0
        if limit is not None:
            bucket = self._buckets.get(ip)
            if bucket is None:
                bucket = self._buckets[ip] = [limit.burst, now]
            tokens = min(limit.burst, bucket[0] + (now - bucket[1]) * limit.rate)
            bucket[1] = now
            if tokens < 1.0:
                bucket[0] = tokens
                return self._refuse("rate_limit", self.profile.rate_limited, ip, sender, b"", qid)
        if config.site_rate_limit is not None:
            tat = max(self._site_tat, now) + self._site_interval
            if tat - now > self._site_tolerance + self._site_interval + 1e-9:
                if bucket is not None:
                    bucket[0] = tokens  # not accepted: the client's own bucket is not charged
                return self._refuse("site_rate_limit", self.profile.rate_limited, ip, sender, b"", qid)
            self._site_tat = tat
        if bucket is not None:
            bucket[0] = tokens - 1.0
        return self._roll("mail", ip, sender, b"", qid)

    def rcpt(self, ip: str, sender: bytes, rcpt: bytes, qid: str) -> Refusal | None:
        if self._unknown and not self._unknown_at_eod and self._is_unknown(rcpt):
            return self._refuse("unknown_recipient", self.profile.unknown_user, ip, sender, rcpt, qid)
        if self.config.greylist:
            key = (sender.lower(), rcpt.lower(), ip)
            now = self._clock()
            first = self._greylist.get(key)
            if first is None:
                if len(self._greylist) >= MAX_GREYLIST:
                    self._greylist.clear()
                self._greylist[key] = now
                return self._refuse("greylist", self.profile.greylisted, ip, sender, rcpt, qid)
            if now - first < self.config.greylist_seconds:
                return self._refuse("greylist", self.profile.greylisted, ip, sender, rcpt, qid)
        return self._roll("rcpt", ip, sender, rcpt, qid)

    def data(self, ip: str, sender: bytes, qid: str) -> Refusal | None:
        return self._roll("data", ip, sender, b"", qid)

    def end_of_data(self, ip: str, sender: bytes, recipients: Sequence[bytes], qid: str) -> Refusal | None:
        if self._unknown and self._unknown_at_eod:
            # The appliance only looks up users after it has scanned the
            # content, so one unknown recipient fails the whole message.
            for rcpt in recipients:
                if self._is_unknown(rcpt):
                    return self._refuse("unknown_recipient", self.profile.unknown_user, ip, sender, rcpt, qid)
        if self._filter_cut:
            # A content filter that words its verdict as an address error: the
            # mailbox exists (its RCPT was accepted), the message is refused.
            for rcpt in recipients:
                if self._is_filtered(rcpt):
                    return self._refuse("filtered", self.profile.unknown_user, ip, sender, rcpt, qid)
        return self._roll("eod", ip, sender, b"", qid)
