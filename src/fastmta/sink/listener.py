"""What every connection of one listener shares: its replies and its fault engine.

Built once per listener when the server binds it (``SinkServer.start``), so
a connection reads prepared bytes instead of rendering its profile's
templates, and finds ``faults`` set to ``None`` when no fault is configured,
which is the one test that keeps fault injection off the hot path.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from fastmta.sink.config import ListenerConfig, SinkConfig
from fastmta.sink.faults import FaultEngine
from fastmta.sink.profiles import ProviderProfile, ReplyTemplate, get_profile
from fastmta.sink.replies import CompiledReply
from fastmta.sink.stats import SinkStats


class ListenerRuntime:
    """Per-listener constants: replies of its profile, its fault engine."""

    __slots__ = (
        "config",
        "data_go",
        "ehlo",
        "ehlo_tls",
        "faults",
        "greeting",
        "helo",
        "hostname",
        "mail_ok",
        "profile",
        "queued",
        "quit",
        "rcpt_ok",
    )

    def __init__(
        self,
        config: ListenerConfig,
        sink: SinkConfig,
        tls: bool,
        rng: random.Random,
        stats: SinkStats,
        clock: Callable[[], float],
    ) -> None:
        self.config = config
        profile: ProviderProfile = get_profile(config.profile)
        self.profile = profile
        self.hostname = hostname = config.hostname or profile.hostname
        faults = config.faults if config.faults is not None else sink.faults
        self.faults = FaultEngine(faults, profile, hostname, rng, stats, clock) if faults.active else None
        self.greeting = CompiledReply(profile.greeting, hostname)
        self.mail_ok = CompiledReply(profile.mail_ok, hostname)
        self.rcpt_ok = CompiledReply(profile.rcpt_ok, hostname)
        self.data_go = CompiledReply(profile.data_go, hostname)
        self.queued = CompiledReply(profile.queued, hostname)
        self.quit = CompiledReply(profile.quit, hostname)
        keywords = [
            "PIPELINING",
            f"SIZE {sink.max_message_size}",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "CHUNKING",
        ]
        # Two EHLO replies: STARTTLS is offered only before TLS is active
        # (RFC 3207 4.2), and only when the server has a certificate.
        plain = ReplyTemplate(250, (profile.ehlo_first_line, *keywords, *(["STARTTLS"] if tls else [])))
        secured = ReplyTemplate(250, (profile.ehlo_first_line, *keywords))
        self.ehlo = CompiledReply(plain, hostname)
        self.ehlo_tls = CompiledReply(secured, hostname)
        self.helo = f"250 {hostname}\r\n".encode("ascii")
