"""Configuration records of the sink and the parsers of their CLI spellings.

Everything here is plain data: the server (:mod:`fastmta.sink.server`) reads it,
the CLI builds it from strings with the ``parse_*`` functions, and library
users (benchmarks, tests, ``fastmta load --sink``) build it directly.
Parse errors raise ``ValueError`` whose text names the bad value and shows
the expected form, so argparse can print it as is.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fastmta.sink.profiles import PROFILES, ReplyTemplate, get_profile

Phase = Literal["connect", "ehlo", "mail", "rcpt", "data", "eod"]
PHASES: tuple[Phase, ...] = ("connect", "ehlo", "mail", "rcpt", "data", "eod")


@dataclass(frozen=True, slots=True)
class PhaseFault:
    """With *probability*, answer *phase* with a failure instead of success.

    ``text`` None means "the profile's wording for this code". A 421 always
    closes the connection after it is sent, as RFC 5321 says it must.
    """

    phase: Phase
    probability: float
    code: int
    text: str | None = None

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(
                f"unknown phase {self.phase!r}; choose one of: {', '.join(PHASES)}"
            )
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(
                f"probability must be between 0 and 1, not {self.probability}"
            )
        if not 400 <= self.code <= 599:
            raise ValueError(f"a fault reply must be 4xx or 5xx, not {self.code}")
        if self.text is not None and any(c in self.text for c in "\r\n\0"):
            raise ValueError("fault reply text may not contain CR, LF or NUL")

    def template(self) -> ReplyTemplate | None:
        return None if self.text is None else ReplyTemplate(self.code, (self.text,))


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A token bucket: *rate* messages per second, bursts of up to *burst*."""

    rate: float
    burst: float

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.burst < 1:
            raise ValueError(
                "rate limit needs a positive rate and a burst of at least 1"
            )


@dataclass(frozen=True, slots=True)
class ThrottleRule:
    """Answer every MAIL from clients in *network* (an address or ``ADDR/LEN``) with the
    profile's rate-limit reply (gmail: 421 4.7.28), for *seconds* from each such address's
    first MAIL (0: for the whole run); other clients are not affected."""

    network: str
    seconds: float = 0.0

    def __post_init__(self) -> None:
        try:
            ipaddress.ip_network(self.network, strict=False)
        except ValueError:
            raise ValueError(f"bad client network {self.network!r}: expected ADDR or ADDR/LEN") from None
        if not 0.0 <= self.seconds <= 10 * 365 * 86400:
            raise ValueError(f"throttle seconds must be 0 (always) or positive, not {self.seconds}")


@dataclass(frozen=True, slots=True)
class FaultConfig:
    """What goes wrong, and how often. The default: nothing."""

    replies: tuple[PhaseFault, ...] = ()
    delays: tuple[tuple[Phase, float], ...] = ()
    max_connections_per_ip: int = 0
    rate_limit: RateLimit | None = None
    #: Transactions (MAIL) per second of all clients together (GCRA on the sink's clock, one per
    #: listener: each listener is one site); beyond it MAIL gets the profile's rate-limit reply.
    site_rate_limit: RateLimit | None = None
    #: Clients that get the rate-limit reply whatever the rate (one source address throttled, the others not).
    throttle: tuple[ThrottleRule, ...] = ()
    greylist: bool = False
    #: A greylisted triple is accepted once it retries at least this late.
    greylist_seconds: float = 0.0
    #: Glob patterns (fnmatch, case-insensitive) of recipients that do not exist.
    unknown_recipients: tuple[str, ...] = ()
    #: Where those are refused: "rcpt", or "eod" (after the content, the whole
    #: message); None: where the profile does it (the appliance: at end of data).
    unknown_at: Literal["rcpt", "eod"] | None = None
    #: A content filter that blames the mailbox: this share (0..1) of the
    #: recipients that *do* exist is refused at end of data with the profile's
    #: unknown-user reply. Chosen by a hash of the address, so the same
    #: addresses every time, however the messages are batched or retried.
    filtered_share: float = 0.0

    def __post_init__(self) -> None:
        if self.unknown_at not in (None, "rcpt", "eod"):
            raise ValueError(f"unknown_at must be 'rcpt' or 'eod', not {self.unknown_at!r}")
        if not 0.0 <= self.filtered_share <= 1.0:
            raise ValueError(f"filtered share must be between 0 and 1, not {self.filtered_share}")

    @property
    def active(self) -> bool:
        """False when nothing is configured, so the server skips fault logic entirely."""
        return bool(
            self.replies
            or self.delays
            or self.max_connections_per_ip
            or self.rate_limit is not None
            or self.site_rate_limit is not None
            or self.throttle
            or self.greylist
            or self.unknown_recipients
            or self.filtered_share
        )


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """One listening address and the provider it pretends to be."""

    host: str = "127.0.0.1"
    port: int = 0
    profile: str = "default"
    #: None: use the server-wide :attr:`SinkConfig.faults`.
    faults: FaultConfig | None = None
    hostname: str | None = None

    def __post_init__(self) -> None:
        get_profile(self.profile)
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port out of range: {self.port}")
        # The host name goes into the greeting and EHLO reply verbatim: it
        # must be one printable ASCII word, so it can never break a reply line.
        if self.hostname is not None and not (
            self.hostname.isascii()
            and self.hostname.isprintable()
            and self.hostname
            and " " not in self.hostname
            and len(self.hostname) <= 255
        ):
            raise ValueError(
                f"bad host name {self.hostname!r}: one printable ASCII word expected"
            )


@dataclass(frozen=True, slots=True)
class SinkConfig:
    """The whole sink. Limits follow Postfix's smtpd defaults where they exist."""

    listeners: tuple[ListenerConfig, ...] = (ListenerConfig(),)
    faults: FaultConfig = field(default_factory=FaultConfig)
    #: Largest message accepted (SIZE advertises it; bigger is 552 5.3.4).
    max_message_size: int = 50 * 1024 * 1024
    #: Recipients per transaction; more get 452 4.5.3 (RFC 5321 4.5.3.1.8).
    max_recipients: int = 1000
    #: Longest command line including CRLF (RFC 5321 says 512; Postfix allows 2048).
    max_line_length: int = 2048
    #: Longest DATA/BDAT text line with its CRLF; longer fails the message with
    #: 554 5.6.0. 0: no check (Postfix's smtpd accepts any length, so do we
    #: by default); 1000 is RFC 5321's limit, for testing a sender's wrapping.
    max_data_line: int = 0
    #: Protocol errors per connection before 421 and disconnect.
    max_errors: int = 20
    #: Close connections that make no progress for this long (checked between
    #: 1x and 2x of it): no complete command line, and message content slower
    #: than ``min_data_rate``. Bytes alone do not reset it (slowloris).
    idle_timeout: float = 300.0
    #: Octets per second that message content must average over an idle period.
    min_data_rate: float = 256.0
    #: Write each message to its own file here (pickup format) instead of discarding it.
    capture_dir: Path | None = None
    #: Octets of unfinished messages held in memory for capture, all connections
    #: together; a message that would pass it is refused 452 4.3.1 (retried).
    capture_memory: int = 256 * 1024 * 1024
    seed: int | None = None
    starttls: bool = True
    #: PEM files; both None: a self-signed certificate is generated at start.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: Keep every read of every connection in :attr:`SinkServer.traces` (for tests).
    trace: bool = False
    backlog: int = 1024

    def __post_init__(self) -> None:
        if not self.listeners:
            raise ValueError("at least one listener is needed")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("give both a TLS certificate and its key, or neither")
        for name in (
            "max_message_size",
            "max_recipients",
            "max_line_length",
            "max_errors",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_data_line < 0:
            raise ValueError("max_data_line must be 0 (no check) or positive")
        if self.max_line_length < 512:
            raise ValueError(
                "max_line_length below RFC 5321's 512 octets would refuse valid commands"
            )


# ----------------------------------------------------------------- parsers


def parse_listen(spec: str) -> ListenerConfig:
    """``ADDR:PORT[=PROFILE]``, ``[IPv6]:PORT[=PROFILE]`` or ``:PORT`` (127.0.0.1)."""
    addr, _, profile = spec.partition("=")
    profile = profile or "default"
    if profile.lower() not in PROFILES:
        raise ValueError(
            f"unknown profile {profile!r} in {spec!r}; choose one of: {', '.join(PROFILES)}"
        )
    if addr.startswith("["):
        host, sep, port_s = addr[1:].partition("]:")
        if not sep:
            raise ValueError(f"bad listen address {spec!r}: expected [IPv6]:PORT")
    else:
        host, sep, port_s = addr.rpartition(":")
        if not sep:
            raise ValueError(
                f"bad listen address {spec!r}: expected ADDR:PORT[=PROFILE]"
            )
    host = host or "127.0.0.1"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ValueError(
                f"bad listen address {spec!r}: {host!r} is not an IP address"
            ) from None
    if not port_s.isdigit():
        raise ValueError(f"bad port in {spec!r}: {port_s!r}")
    return ListenerConfig(host=host, port=int(port_s), profile=profile.lower())


def parse_fault(spec: str) -> PhaseFault:
    """``PHASE:PROBABILITY:CODE[ TEXT]``, e.g. ``rcpt:0.1:450`` or ``eod:0.05:554 5.7.1 spam``."""
    parts = spec.split(":", 2)
    if len(parts) != 3:
        raise ValueError(f"bad fault {spec!r}: expected PHASE:PROBABILITY:CODE[ TEXT]")
    phase, prob_s, reply_s = parts
    try:
        prob = float(prob_s)
    except ValueError:
        raise ValueError(f"bad probability {prob_s!r} in fault {spec!r}") from None
    code_s, _, text = reply_s.strip().partition(" ")
    if not (len(code_s) == 3 and code_s.isdigit()):
        raise ValueError(f"bad reply code {code_s!r} in fault {spec!r}")
    if phase not in PHASES:
        raise ValueError(
            f"unknown phase {phase!r} in fault {spec!r}; choose one of: {', '.join(PHASES)}"
        )
    return PhaseFault(phase, prob, int(code_s), text.strip() or None)


def parse_delay(spec: str) -> tuple[Phase, float]:
    """``PHASE:SECONDS``, e.g. ``connect:2`` or ``rcpt:0.25``."""
    phase, sep, secs = spec.partition(":")
    if not sep or phase not in PHASES:
        raise ValueError(
            f"bad delay {spec!r}: expected PHASE:SECONDS with PHASE one of {', '.join(PHASES)}"
        )
    try:
        seconds = float(secs)
    except ValueError:
        raise ValueError(f"bad seconds {secs!r} in delay {spec!r}") from None
    if not 0 <= seconds <= 3600:
        raise ValueError(f"delay must be between 0 and 3600 seconds, not {seconds}")
    return phase, seconds


def parse_throttle(spec: str) -> ThrottleRule:
    """``ADDR[/LEN][=SECONDS]``, e.g. ``127.0.0.2``, ``10.0.0.0/24=30`` or ``::1=5``."""
    network, sep, secs = spec.partition("=")
    seconds = 0.0
    if sep:
        try:
            seconds = float(secs)
        except ValueError:
            raise ValueError(f"bad seconds {secs!r} in {spec!r}: expected ADDR[/LEN][=SECONDS]") from None
    return ThrottleRule(network.strip().strip("[]"), seconds)


_UNITS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_rate(spec: str) -> RateLimit:
    """``N/s``, ``N/m`` or ``N/h``, optionally ``:BURST`` (default: N, at least 1)."""
    rate_s, _, burst_s = spec.partition(":")
    count_s, sep, unit = rate_s.partition("/")
    if not sep or unit not in _UNITS:
        raise ValueError(
            f"bad rate {spec!r}: expected N/s, N/m or N/h (optionally :BURST)"
        )
    try:
        count = float(count_s)
        burst = float(burst_s) if burst_s else max(1.0, count)
    except ValueError:
        raise ValueError(f"bad number in rate {spec!r}") from None
    return RateLimit(rate=count / _UNITS[unit], burst=burst)
