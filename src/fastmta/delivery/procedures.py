"""Provider procedures: what a mailbox provider's throttle reply asks for, and whom it is about.

The adaptive controller (:mod:`fastmta.delivery.throttle`) treats every
"slow down" alike: halve a dial, climb back. Some providers say more. Gmail's
guidance for ``421 4.7.28`` is a procedure: stop for at least ten minutes,
come back with a single connection, add connections one at a time while the
replies stay clean. And its reply names *what* is limited: the sending IP,
its netblock, the DKIM signing domain, the SPF (envelope) domain, a domain
in the message's links. Yahoo's ``[TSxx]`` codes, Microsoft's ``4.7.650`` /
``RP-00x`` / ``S3150`` and Comcast's ``RL0000xx`` carry like meanings.

This module is that knowledge as data: :data:`PROCEDURE_TABLE` maps reply
tokens (enhanced codes, text patterns) to an :class:`Action` (pause, restart
connections, ramp step, rate cut) and to the :class:`LimitKey` the limit
applies to, either fixed or "as the text names it" (:data:`KEY_TABLE`).
:func:`match` reads one reply; :class:`SenderHolds` keeps the sender-domain
pauses of one site. The texts were written from the providers' published
error pages; tune the numbers here, not in the controller.

How each key is applied (see :class:`fastmta.delivery.throttle.SiteThrottle`):

* ``ip``: the (egress source, site) throttle pauses, then restarts its
  connection window at ``restart_connections`` and ramps it.
* ``netblock``: as ``ip`` for the source that drew the reply (other
  sources in the same network are not told; the throttle does not know
  the sources' addresses).
* ``dkim_domain`` / ``spf_domain``: the sender domain (named in the reply,
  else the envelope sender's) is held at the site for every source; the
  source's dials are left alone, its other senders' mail keeps flowing.
* ``url_domain``: the links are not looked at; the sender domain of the
  message that drew the reply stands in for the campaign that carries them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

__all__ = [
    "KEY_TABLE",
    "PROCEDURES",
    "PROCEDURE_TABLE",
    "Action",
    "LimitKey",
    "Match",
    "Procedure",
    "Procedures",
    "SenderHolds",
    "match",
    "sender_domain",
]


class LimitKey(StrEnum):
    """What a provider says it limits."""

    IP = "ip"  # this egress address at this site
    NETBLOCK = "netblock"  # the address's network at this site
    DKIM_DOMAIN = "dkim_domain"  # the DKIM signing domain (d=)
    SPF_DOMAIN = "spf_domain"  # the envelope sender's domain (MAIL FROM)
    URL_DOMAIN = "url_domain"  # a domain in the message's links

    @property
    def is_sender(self) -> bool:
        """Applied to a sender domain at the site rather than to the (source, site) dials."""
        return self in (LimitKey.DKIM_DOMAIN, LimitKey.SPF_DOMAIN, LimitKey.URL_DOMAIN)


@dataclass(frozen=True, slots=True)
class Action:
    """What to do. All fields are floors or replacements of the controller's own reaction."""

    #: Send nothing under the key for at least this long (seconds; 0: no pause).
    pause: float = 0.0
    #: After the pause (or at once, without one), the connection window starts
    #: here and grows by ``ramp_step`` per clean round up to the site's
    #: ``max_connections``. None: the controller's usual restart.
    restart_connections: int | None = None
    ramp_step: int = 1
    #: Multiply the message rate by this at once; None: the usual decrease.
    rate_cut: float | None = None

    def __post_init__(self) -> None:
        if self.pause < 0:
            raise ValueError(f"pause must not be negative, not {self.pause}")
        if self.restart_connections is not None and self.restart_connections < 1:
            raise ValueError(f"restart_connections must be at least 1, not {self.restart_connections}")
        if self.ramp_step < 1:
            raise ValueError(f"ramp_step must be at least 1, not {self.ramp_step}")
        if self.rate_cut is not None and not 0 < self.rate_cut < 1:
            raise ValueError(f"rate_cut must lie between 0 and 1, not {self.rate_cut}")


@dataclass(frozen=True, slots=True)
class Procedure:
    """One provider rule: reply tokens -> action, and the key the limit applies to."""

    name: str
    provider: str
    #: Enhanced status codes ("4.7.28") that select this procedure, anywhere in the reply.
    codes: frozenset[str]
    #: Patterns searched (case-insensitively) in the reply's prose; any one selects it.
    text: tuple[re.Pattern[str], ...]
    action: Action
    #: None: as the reply names it (:data:`KEY_TABLE`), else ``ip``.
    key: LimitKey | None
    #: What the provider says, in our words (for the event log and the reader).
    note: str = ""


@dataclass(frozen=True, slots=True)
class Match:
    """What one reply asks for."""

    procedure: Procedure
    key: LimitKey
    #: The limited thing as the reply names it ("example.com", "192.0.2.0/24"), if it does.
    value: str | None = None

    @property
    def action(self) -> Action:
        return self.procedure.action

    def __str__(self) -> str:
        what = f"{self.key} {self.value}" if self.value else str(self.key)
        return f"{self.procedure.provider} {self.procedure.name} ({what})"


# --------------------------------------------------------------------------
# The tables (data; tune here)

#: Gmail's guidance for 4.7.28: a pause of at least 10 minutes, then one
#: connection, then one more per clean round.
_GMAIL = {"pause": 600.0, "restart_connections": 1, "ramp_step": 1}

PROCEDURE_TABLE: list[dict[str, Any]] = [
    # Gmail: 421 4.7.28 (older servers: 421 4.7.0) "unusual rate of unsolicited
    # mail originating from your IP address / IP netblock / DKIM domain / SPF
    # domain", or "containing one of your URL domains". The key is in the text.
    {"name": "gmail-unsolicited-rate", "provider": "gmail", "codes": ["4.7.28"],
     "text": [r"unusual rate of (unsolicited )?mail"], "action": _GMAIL, "key": None,
     "note": "rate limited for unsolicited mail: pause >= 10 min, then one connection, +1 per clean round"},
    # Yahoo/AOL: TSS04 "temporarily deferred due to unexpected volume or user
    # complaints", TS01 (unknown, cold IP) and TS02 (complaints) defer the IP.
    {"name": "yahoo-deferred", "provider": "yahoo", "codes": [],
     "text": [r"\[?\bTSS0[4-8]\b", r"\[?\bTSS1[01]\b", r"\[?\bTS0[12]\b"],
     "action": {"pause": 1800.0, "restart_connections": 1, "ramp_step": 1}, "key": "ip",
     "note": "IP deferred for volume or complaints: back off, come back slowly"},
    # Yahoo TS03 / TSS09: "all messages from <ip> will be permanently deferred;
    # retrying will NOT succeed": hours, not minutes.
    {"name": "yahoo-permanently-deferred", "provider": "yahoo", "codes": [],
     "text": [r"\bTS03\b", r"\bTSS09\b"],
     "action": {"pause": 14400.0, "restart_connections": 1, "ramp_step": 1}, "key": "ip",
     "note": "IP permanently deferred until its reputation recovers: retry only after hours"},
    # Microsoft (Outlook.com, Microsoft 365): 451 4.7.650/651/652 "temporarily
    # rate limited due to IP reputation" (S775, S3114).
    {"name": "microsoft-ip-reputation-rate", "provider": "microsoft",
     "codes": ["4.7.650", "4.7.651", "4.7.652"],
     "text": [r"rate limited due to IP reputation"],
     "action": {"pause": 900.0, "restart_connections": 1, "ramp_step": 1, "rate_cut": 0.5}, "key": "ip",
     "note": "IP rate limited for its reputation: slow down well below the last rate"},
    # Microsoft RP-001: more messages than the hourly/daily limit of the IP.
    {"name": "microsoft-rp-001", "provider": "microsoft", "codes": [], "text": [r"\bRP-001\b"],
     "action": {"pause": 3600.0, "restart_connections": 1, "ramp_step": 1, "rate_cut": 0.5}, "key": "ip",
     "note": "IP over its hourly/daily message limit: wait for the next hour, send slower"},
    # Microsoft RP-002 (connection rate) / RP-003 (concurrent connections).
    {"name": "microsoft-rp-connections", "provider": "microsoft", "codes": [], "text": [r"\bRP-00[23]\b"],
     "action": {"pause": 60.0, "restart_connections": 1, "ramp_step": 1}, "key": "ip",
     "note": "IP over its connection limits: fewer connections, opened one at a time"},
    # Microsoft 4.7.500-506 "Server busy / access denied, please try again later":
    # throttling of an IP without history.
    {"name": "microsoft-server-busy", "provider": "microsoft",
     "codes": ["4.7.500", "4.7.501", "4.7.502", "4.7.503", "4.7.504", "4.7.505", "4.7.506"], "text": [],
     "action": {"pause": 300.0, "restart_connections": 1, "ramp_step": 1, "rate_cut": 0.5}, "key": "ip",
     "note": "IP throttled (little history): pause, then ramp slowly"},
    # Microsoft S3150: "part of their network is on our block list".
    {"name": "microsoft-netblock-listed", "provider": "microsoft", "codes": [],
     "text": [r"\bS3150\b", r"part of their network is on our block ?list"],
     "action": {"pause": 3600.0, "restart_connections": 1, "ramp_step": 1}, "key": "netblock",
     "note": "the IP's network is block-listed: stop hammering, retry after an hour"},
    # Comcast RL0000xx "Throttled - try again later": the IP's volume limit;
    # Comcast lets a throttled sender retry within minutes.
    {"name": "comcast-throttled", "provider": "comcast", "codes": [], "text": [r"\bRL0000\d\d\b"],
     "action": {"pause": 300.0, "restart_connections": 1, "ramp_step": 1, "rate_cut": 0.5}, "key": "ip",
     "note": "IP throttled for volume: retry after minutes at a lower pace"},
]  # fmt: skip

#: Which key a reply names, tried in order; the group, if any, is its value.
#: Gmail writes e.g. "originating from your DKIM domain [example.com 15]" (the
#: number is internal; the domain is sometimes left blank: "[ 15]").
KEY_TABLE: list[tuple[str, LimitKey]] = [
    (r"from your DKIM domain(?:\s*\[([^\]\s]*))?", LimitKey.DKIM_DOMAIN),
    (r"from your SPF domain(?:\s*\[([^\]\s]*))?", LimitKey.SPF_DOMAIN),
    (r"\bnet ?block(?:\s*\[([^\]\s]*))?", LimitKey.NETBLOCK),
    (r"one of your URL domains|\bURL domain", LimitKey.URL_DOMAIN),
    (r"from your IP address", LimitKey.IP),
]


class Procedures:
    """A compiled table: :meth:`match` finds the procedure a reply asks for."""

    def __init__(self, table: Iterable[Mapping[str, Any]], keys: Iterable[tuple[str, LimitKey]] = KEY_TABLE) -> None:
        procs = []
        for entry in table:
            key = entry.get("key")
            procs.append(
                Procedure(
                    name=str(entry["name"]),
                    provider=str(entry["provider"]),
                    codes=frozenset(entry.get("codes", ())),
                    text=tuple(re.compile(p, re.IGNORECASE) for p in entry.get("text", ())),
                    action=Action(**entry.get("action", {})),
                    key=LimitKey(key) if key is not None else None,
                    note=str(entry.get("note", "")),
                )
            )
            if not procs[-1].codes and not procs[-1].text:
                raise ValueError(f"procedure {entry['name']!r} matches nothing: give codes or text")
        self.procedures: tuple[Procedure, ...] = tuple(procs)
        self._keys = tuple((re.compile(p, re.IGNORECASE), k) for p, k in keys)
        # One pass to tell whether any procedure could apply (most replies: none).
        self._codes = frozenset(c for p in self.procedures for c in p.codes)
        patterns = [r.pattern for p in self.procedures for r in p.text]
        self._any = re.compile("|".join(f"(?:{a})" for a in patterns), re.IGNORECASE) if patterns else None

    def __len__(self) -> int:
        return len(self.procedures)

    def match(self, text: str) -> Match | None:
        """The procedure *text* (an SMTP reply, as ``str(reply)`` or a DSN's diagnostic) asks for."""
        if not text or not self.procedures:
            return None
        codes = set(_ENHANCED.findall(text))
        prose = _prose(text)
        if self._codes.isdisjoint(codes) and (self._any is None or self._any.search(prose) is None):
            return None
        for proc in self.procedures:
            if (proc.codes and not proc.codes.isdisjoint(codes)) or any(r.search(prose) for r in proc.text):
                if proc.key is not None:
                    return Match(proc, proc.key)
                for pattern, key in self._keys:
                    m = pattern.search(prose)
                    if m is not None:
                        value = m.group(1) if m.groups() else None
                        return Match(proc, key, value if value and "." in value else None)
                return Match(proc, LimitKey.IP)
        return None


_ENHANCED = re.compile(r"(?<![\d.])([245]\.\d{1,3}\.\d{1,3})(?![\d.])")
# Line joins of a multi-line reply: " / 4.7.28 " (str(Reply)), "421-4.7.28 " (logs, DSNs).
_JOIN = re.compile(r"\s*(?:/\s*)?\b[245]\d\d[- ](?=[245]\.\d)|\s*/\s*(?=[245]\.\d{1,3}\.\d{1,3}\s)")
_LEADING_CODE = re.compile(r"(?:^|\s)[245]\.\d{1,3}\.\d{1,3}\s+")


def _prose(text: str) -> str:
    """The reply's words with the per-line codes taken out, so a phrase split over lines matches."""
    return " ".join(_LEADING_CODE.sub(" ", _JOIN.sub(" ", text)).split())


#: The built-in table, compiled.
PROCEDURES = Procedures(PROCEDURE_TABLE)


def match(text: str) -> Match | None:
    """:meth:`Procedures.match` of the built-in table."""
    return PROCEDURES.match(text)


# --------------------------------------------------------------------------
# Sender-domain holds (keys dkim_domain, spf_domain, url_domain)


def sender_domain(address: str) -> str:
    """The domain of an envelope address, lower case ("" for the null sender)."""
    return address.rpartition("@")[2].strip().rstrip(".").lower()


class SenderHolds:
    """Sender domains held at one site: the provider limited mail signed or sent by them.

    Shared by the throttles of every egress source for the site: a DKIM or
    SPF domain's limit does not depend on the address the mail comes from.
    A hold on ``example.com`` also holds its subdomains (an envelope domain
    like ``bounce.example.com`` signed with ``d=example.com``).
    """

    __slots__ = ("_until",)

    def __init__(self) -> None:
        self._until: dict[str, float] = {}

    def __bool__(self) -> bool:
        return bool(self._until)

    def hold(self, domain: str, until: float, now: float) -> bool:
        """Hold *domain* until *until*; False if it was already held (in-flight replies do not extend it)."""
        domain = domain.strip().rstrip(".").lower()
        if not domain or self.until(domain, now) > now:
            return False
        self._until[domain] = until
        return True

    def until(self, domain: str, now: float) -> float:
        """When *domain* (or a parent domain held) is released; ``now`` or earlier: not held."""
        if not self._until:
            return now
        latest = now
        d = domain.lower()
        while d:
            t = self._until.get(d)
            if t is not None:
                if t <= now:
                    del self._until[d]
                else:
                    latest = max(latest, t)
            d = d.partition(".")[2]
        return latest

    def wait(self, sender: str, now: float) -> float:
        """Seconds until mail from the envelope *sender* may go to the site (0.0: now)."""
        if not self._until:
            return 0.0
        return self.until(sender_domain(sender), now) - now

    def held(self, now: float) -> dict[str, float]:
        """The domains held now and until when (for the display)."""
        return {d: t for d, t in self._until.items() if t > now}
