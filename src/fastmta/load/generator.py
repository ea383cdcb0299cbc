"""Load generation: drive an SMTP server closed-loop or open-loop and measure latency per phase.

Two ways to offer load:

* **Closed loop** (no ``rate``): C connections, each keeping ``depth``
  transactions in flight so that with PIPELINING the next envelope rides with
  the previous message's content (one round trip per message). Throughput is
  whatever the server (or the client) sustains.
* **Open loop** (``rate`` messages/s, optionally ramped up from 0 over
  ``ramp`` seconds): message *i* is *due* at a fixed, precomputed time. Due
  messages wait for a free slot on one of the C connections. Every latency is
  measured from the message's **intended** send time, not from when a
  connection got around to it, so a stalled server shows up as a latency
  spike for every message it delayed instead of disappearing from the
  figures (the "coordinated omission" HdrHistogram's author describes).

Either runs for a count (``messages``) or a duration (``duration``), or both
(whichever ends first).

What is measured (microseconds, in :class:`~fastmta.load.histogram.Histogram`\\ s):

=============  ===============================================================
``queue``      open loop: intended send time -> handed to a connection
``connect``    TCP connect (``connection_made``)
``greeting``   connected -> the server's greeting was read
``ehlo``       greeting -> session ready (EHLO, and STARTTLS + EHLO if used)
``envelope``   handed to the connection -> the 354 to DATA (MAIL, RCPTs, DATA)
``end_of_data`` 354 -> the reply to the final dot (BDAT: hand-over -> reply)
``message``    intended send time (closed loop: hand-over) -> final outcome
=============  ===============================================================

The connection only reports a transaction's final result, so the phase
boundaries inside a session are observed from outside: ``_TimedConnection``
overrides the public ``asyncio.Protocol`` callbacks of
:class:`~fastmta.smtp.connection.SMTPConnection`, stamps the clock when the TCP
connection is made, and after each read looks at which reply the protocol now
waits for (``ClientProtocol.waiting_for``). When that becomes END_OF_DATA, the
oldest unfinished transaction has just had its 354. Replies are FIFO on one
connection, so the oldest unfinished transaction is the one concerned. With
pipelining and ``depth`` > 1, a transaction's "envelope" includes the time it
waited behind the previous message on the same connection: that is when its
envelope could be written.

Everything is bounded: an overall timeout, per-reply timeouts, and a cap on
consecutive connection failures per connection slot, so a server that is
down, refuses, tarpits or answers garbage yields a report, never a hang.

``run_load`` runs in the current event loop; ``run_load_processes`` spreads
the load over N processes (messages, connections and rate divided between
them, one common start time) and merges their histograms and time series.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import multiprocessing
import os
import queue as queue_mod
import random
import re
import ssl
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from time import perf_counter
from typing import Any

from fastmta.errors import ConfigError, ConnectError
from fastmta.load.histogram import Histogram
from fastmta.smtp.connection import ResultCallback, SessionRefused, SMTPConnection, Timeouts
from fastmta.smtp.protocol import Body, ClientProtocol, Phase, TLSPolicy, Transaction, TransactionResult

PHASES = ("queue", "connect", "greeting", "ehlo", "envelope", "end_of_data", "message")
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
MAX_SIZE = 64 << 20
BODY_POOL = 64  # distinct bodies drawn from a size distribution (wire forms cached per body)


# --- workload -------------------------------------------------------------------


_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmg]?)i?b?", re.I)


def parse_bytes(text: str) -> int:
    """'2048', '2k', '1.5M' -> bytes (k = 1024)."""
    m = _SIZE_RE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"not a size: {text!r} (examples: 2048, 2k, 1.5m)")
    n = float(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]
    if not 1 <= n <= MAX_SIZE:
        raise ValueError(f"size {text!r} is outside 1 byte .. 64 MiB")
    return int(n)


@dataclass(frozen=True, slots=True)
class SizeDistribution:
    """Message sizes: fixed, or drawn from a distribution.

    Text forms (``parse``): ``2048`` / ``2k`` (fixed), ``uniform:1k:20k``,
    ``lognormal:4k:1.0`` (median, sigma of the underlying normal; real mail
    sizes are roughly log-normal), ``choice:2k@80,20k@15,200k@5`` (weighted).
    """

    kind: str
    values: tuple[int, ...]
    params: tuple[float, ...] = ()

    @classmethod
    def fixed(cls, size: int) -> SizeDistribution:
        return cls("fixed", (size,))

    @classmethod
    def parse(cls, text: str) -> SizeDistribution:
        kind, _, rest = text.partition(":")
        kind = kind.strip().lower()
        try:
            if not rest:
                return cls.fixed(parse_bytes(text))
            args = rest.split(":")
            if kind == "uniform" and len(args) == 2:
                lo, hi = parse_bytes(args[0]), parse_bytes(args[1])
                if lo > hi:
                    raise ValueError("uniform: the low bound is above the high bound")
                return cls("uniform", (lo, hi))
            if kind == "lognormal" and len(args) == 2:
                sigma = float(args[1])
                if not 0 <= sigma <= 5:
                    raise ValueError("lognormal: sigma must be within 0..5")
                return cls("lognormal", (parse_bytes(args[0]),), (sigma,))
            if kind == "choice" and len(args) == 1:
                sizes: list[int] = []
                weights: list[float] = []
                for item in args[0].split(","):
                    size, _, weight = item.partition("@")
                    sizes.append(parse_bytes(size))
                    weights.append(float(weight) if weight else 1.0)
                if any(w <= 0 for w in weights):
                    raise ValueError("choice: weights must be positive")
                return cls("choice", tuple(sizes), tuple(weights))
        except ValueError as exc:
            raise ValueError(f"bad size {text!r}: {exc}") from None
        raise ValueError(
            f"bad size {text!r}: use N, uniform:LOW:HIGH, lognormal:MEDIAN:SIGMA or choice:SIZE@WEIGHT,..."
        )

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return self.values[0]
        if self.kind == "uniform":
            return rng.randint(self.values[0], self.values[1])
        if self.kind == "lognormal":
            return max(1, min(MAX_SIZE, int(rng.lognormvariate(math.log(self.values[0]), self.params[0]))))
        return rng.choices(self.values, weights=self.params)[0]

    def __str__(self) -> str:
        if self.kind == "fixed":
            return str(self.values[0])
        if self.kind == "uniform":
            return f"uniform:{self.values[0]}:{self.values[1]}"
        if self.kind == "lognormal":
            return f"lognormal:{self.values[0]}:{self.params[0]:g}"
        return "choice:" + ",".join(f"{s}@{w:g}" for s, w in zip(self.values, self.params))


@dataclass(frozen=True, slots=True)
class DkimOptions:
    """Sign every message with this key (``load_signing_key``; algorithm from the key type)."""

    key_path: str
    domain: str
    selector: str


def make_message(size: int, sender: str = "load@fastmta.test", rcpt: str = "rcpt@load.test") -> bytes:
    """A plausible RFC 5322 message of about *size* bytes (at least its headers)."""
    head = (
        f"From: Load Test <{sender}>\r\n"
        f"To: <{rcpt}>\r\n"
        f"Subject: fastmta load test\r\n"
        f"Date: {email.utils.formatdate(localtime=False)}\r\n"
        f"Message-ID: {email.utils.make_msgid(domain='fastmta.test')}\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
    ).encode()
    line = b"The quick brown fox jumps over the lazy dog; 0123456789 abcdefghijklmnopq\r\n"  # 76 + CRLF
    body = bytearray()
    while len(head) + len(body) + len(line) <= size:
        body += line
    rest = size - len(head) - len(body)
    if rest > 2:
        body += b"x" * (rest - 2) + b"\r\n"
    return head + bytes(body)


_FIRST_NAMES = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Radia", "Dennis", "Zoë", "José")
_LAST_NAMES = ("Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson", "Perlman", "Ritchie")
_PARAGRAPH = (
    "This week: the release notes, three articles from the community and an invitation to the "
    "next meetup. Thank you for reading; reply to this message if you have questions. "
)


def _template_for(size: int, sender: str) -> dict[str, Any]:
    """A newsletter-like campaign template (text + HTML, merge fields) of about *size* bytes."""
    # Headers and MIME structure take ~900 bytes; the rest is split between
    # the two parts, the HTML one a little larger, as in real newsletters.
    room = max(0, size - 900)
    text_fill = (_PARAGRAPH * (room * 2 // 5 // len(_PARAGRAPH) + 1))[: room * 2 // 5]
    html_fill = (_PARAGRAPH * (room * 3 // 5 // len(_PARAGRAPH) + 1))[: room * 3 // 5 // 2]
    return {
        "headers": {
            "From": f"fastmta News <{sender}>",
            "To": "{{ first_name }} {{ last_name }} <{{ email }}>",
            "Subject": "Your weekly digest, {{ first_name }}",
            "List-Unsubscribe": "<https://news.fastmta.test/u?id={{ id | urlencode }}>",
        },
        "text": "Hello {{ first_name }},\n\n" + "\n".join(
            text_fill[i : i + 72] for i in range(0, len(text_fill), 72)
        ) + "\n\nUnsubscribe: https://news.fastmta.test/u?id={{ id }}\n",
        "html": (
            "<html><body><h1>Hello {{ first_name }}</h1>\n<p>"
            + "</p>\n<p>".join(html_fill[i : i + 160] for i in range(0, len(html_fill), 160))
            + '</p>\n<p><a href="https://news.fastmta.test/u?id={{ id | urlencode }}">Unsubscribe</a></p>'
            "</body></html>\n"
        ),
    }


class Workload:
    """Builds transaction *i*: its recipients and its body.

    The common case (fixed bodies) costs a list index per message: the
    bodies are built once, and ``Body`` caches their wire forms. Templated
    bodies and DKIM signing are per message, on purpose: they put the
    compiled core's render and sign cost on every message, as a campaign does.
    """

    def __init__(self, spec: LoadSpec) -> None:
        self.sender = spec.sender
        self.n_rcpt = spec.recipients
        rng = random.Random(spec.seed)
        pool_size = min(max(spec.messages or 0, 1_000) * spec.recipients, 100_000)
        self.addresses = [f"r{i}@d{i % spec.domains}.load.test" for i in range(pool_size)]
        dist = spec.size if isinstance(spec.size, SizeDistribution) else SizeDistribution.fixed(spec.size)
        # A pool of sizes drawn once and cycled: the distribution is kept while
        # the per-message cost stays one index (and one cached wire form).
        sizes = [dist.sample(rng) for _ in range(1 if dist.kind == "fixed" else BODY_POOL)]
        self.sizes = sizes
        self.signer = None
        if spec.dkim is not None:
            self.signer = _load_signer(spec.dkim)
        self.campaigns = None
        if spec.template:
            from fastmta.message.mime import compile_campaign

            compiled = {s: compile_campaign(_template_for(s, spec.sender), source="load template") for s in set(sizes)}
            self.campaigns = [compiled[s] for s in sizes]
        self.bodies = [Body(make_message(s, spec.sender)) for s in sizes]
        if self.campaigns is None and self.signer is None:
            for body in self.bodies:
                _ = body.data_wire, body.bdat_wire  # encode once, before the clock starts

    def recipients(self, index: int) -> list[str]:
        pool = self.addresses
        start = (index * self.n_rcpt) % len(pool)
        rcpts = pool[start : start + self.n_rcpt]
        if len(rcpts) < self.n_rcpt:
            rcpts = rcpts + pool[: self.n_rcpt - len(rcpts)]
        return rcpts

    def transaction(self, index: int, tag: object) -> Transaction:
        rcpts = self.recipients(index)
        k = index % len(self.bodies)
        if self.campaigns is None and self.signer is None:
            return Transaction(self.sender, rcpts, self.bodies[k], tag)
        if self.campaigns is not None:
            first = rcpts[0]
            raw = self.campaigns[k].render(
                {
                    "email": first,
                    "first_name": _FIRST_NAMES[index % len(_FIRST_NAMES)],
                    "last_name": _LAST_NAMES[index % len(_LAST_NAMES)],
                    "id": f"u{index}",
                },
                recipient_id=first,
            )
        else:
            raw = self.bodies[k].raw
        if self.signer is not None:
            raw = self.signer.sign(raw)
        return Transaction(self.sender, rcpts, Body(raw), tag)

    def describe(self) -> str:
        return ("templated" if self.campaigns is not None else "fixed") + (", DKIM-signed" if self.signer else "")


def _load_signer(opts: DkimOptions) -> Any:
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from fastmta.message.dkim import DkimKeyConfig, DkimSigner, load_signing_key

    try:
        with open(opts.key_path, "rb") as f:
            key = load_pem_private_key(f.read(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"DKIM key {opts.key_path}: {exc}") from None
    ed = isinstance(key, ed25519.Ed25519PrivateKey)
    cfg = DkimKeyConfig(domain=opts.domain, selector=opts.selector, key_path=opts.key_path,
                        algorithm="ed25519-sha256" if ed else "rsa-sha256")
    return DkimSigner([load_signing_key(cfg, source="fastmta load")])


# --- the specification and the report ---------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadSpec:
    host: str
    port: int
    messages: int | None = 10_000  # None: no count limit (needs duration)
    connections: int = 10
    size: int | SizeDistribution = 2048
    recipients: int = 1
    domains: int = 1
    timeout: float | None = None  # None: see effective_timeout()
    depth: int = 2  # transactions in flight per connection
    messages_per_connection: int = 0  # 0: reuse the connection without limit
    pipelining: bool = True
    use_bdat: bool = False
    tls: TLSPolicy = TLSPolicy.NEVER
    helo_name: str = "load.fastmta.test"
    sender: str = "load@fastmta.test"
    source_address: str | None = None
    reply_timeout: float = 30.0
    max_connect_failures: int = 3
    duration: float | None = None  # seconds of offered load
    rate: float | None = None  # open loop: messages/s; None: closed loop
    ramp: float = 0.0  # open loop: seconds to ramp from 0 to rate
    template: bool = False
    dkim: DkimOptions | None = None
    seed: int = 1
    interval: float = 1.0  # time-series resolution, seconds
    start_at: float | None = None  # wall-clock start (time.time()), so that worker processes start together

    @property
    def open_loop(self) -> bool:
        return self.rate is not None

    def effective_timeout(self) -> float:
        if self.timeout is not None:
            return self.timeout
        grace = self.reply_timeout + 5.0  # the last message's reply may take a full reply timeout
        if self.duration is not None:
            return self.duration + grace
        if self.rate is not None and self.messages is not None:
            # Open loop for a count: the schedule itself lasts messages / rate (+ half the ramp).
            return self.messages / self.rate + self.ramp / 2 + grace
        return 300.0

    def check(self) -> None:
        problems = []
        if self.messages is None and self.duration is None:
            problems.append("give a message count or a duration")
        if self.messages is not None and self.messages < 0:
            problems.append("messages must be >= 0")
        if self.duration is not None and self.duration <= 0:
            problems.append("duration must be > 0")
        if self.connections < 1 or self.recipients < 1 or self.domains < 1 or self.depth < 1:
            problems.append("connections, recipients, domains and depth must be >= 1")
        if self.rate is not None and self.rate <= 0:
            problems.append("rate must be > 0")
        if self.ramp < 0 or (self.ramp and self.rate is None):
            problems.append("ramp needs a rate and must be >= 0")
        if self.interval <= 0:
            problems.append("interval must be > 0")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(slots=True)
class Interval:
    """One time-series slot: counts by when they happened, and the message latencies completed in it."""

    sent: int = 0
    completed: int = 0
    accepted: int = 0
    failed: int = 0
    latency: Histogram = field(default_factory=Histogram)

    def merge(self, other: Interval) -> None:
        self.sent += other.sent
        self.completed += other.completed
        self.accepted += other.accepted
        self.failed += other.failed
        self.latency.merge(other.latency)


@dataclass(slots=True)
class LoadResult:
    """The report. ``messages_per_s`` counts messages accepted by the server.

    ``as_dict()`` is the documented JSON form (see ``fastmta.load.schema``);
    the histograms and the time series stay available as objects.
    """

    target: str
    messages_requested: int | None
    mode: str = "closed"
    workers: int = 1
    connections: int = 0
    duration_s: float | None = None
    rate_target: float | None = None
    ramp_s: float = 0.0
    messages_attempted: int = 0
    messages_accepted: int = 0
    recipients_accepted: int = 0
    recipients_refused: int = 0
    messages_failed: int = 0
    messages_unsent: int = 0  # due (open loop) or requested but never handed to a connection
    connections_opened: int = 0
    connect_failures: int = 0
    replies: dict[str, int] = field(default_factory=dict)  # final decisive reply per recipient, by code
    errors: dict[str, int] = field(default_factory=dict)  # session-level failures by reason
    errors_by_code: dict[str, int] = field(default_factory=dict)  # failed messages by their decisive reply code
    elapsed_s: float = 0.0
    cpu_s: float = 0.0
    messages_per_s: float = 0.0
    cpu_us_per_message: float = 0.0
    rate_achieved: float | None = None  # open loop: completions per second inside the rate window
    rate_window_s: float = 0.0
    completed_in_window: int = 0
    timed_out: bool = False
    complete: bool = False
    interval_s: float = 1.0
    workload: dict[str, Any] = field(default_factory=dict)
    histograms: dict[str, Histogram] = field(default_factory=lambda: {p: Histogram() for p in PHASES})
    series: list[Interval] = field(default_factory=list)

    @property
    def reply_classes(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for code, n in self.replies.items():
            out[f"{code[0]}xx"] += n
        return dict(out)

    def latency_ms(self, phase: str) -> dict[str, float]:
        h = self.histograms[phase]
        p = h.percentiles(PERCENTILES)
        return {
            "count": h.count,
            "min": h.min / 1e3,
            "mean": round(h.mean / 1e3, 3),
            "max": h.max / 1e3,
            **{_pname(q): p[q] / 1e3 for q in PERCENTILES},
        }

    def as_dict(self) -> dict[str, Any]:
        """The JSON report (schema: ``fastmta.load.schema.SCHEMA``)."""
        out: dict[str, Any] = {"schema": "fastmta-load/1"}
        for name in (
            "target", "mode", "workers", "connections", "messages_requested", "duration_s", "rate_target",
            "ramp_s", "rate_achieved", "rate_window_s", "messages_attempted", "messages_accepted",
            "messages_failed", "messages_unsent", "recipients_accepted", "recipients_refused",
            "connections_opened", "connect_failures", "replies", "errors", "errors_by_code", "elapsed_s",
            "cpu_s", "messages_per_s", "cpu_us_per_message", "timed_out", "complete", "workload",
        ):
            out[name] = getattr(self, name)
        out["reply_classes"] = self.reply_classes
        out["latency_ms"] = {phase: self.latency_ms(phase) for phase in PHASES}
        points = []
        for k, iv in enumerate(self.series):
            p = iv.latency.percentiles((50.0, 99.0))
            points.append({
                "t": round(k * self.interval_s, 6), "sent": iv.sent, "completed": iv.completed,
                "accepted": iv.accepted, "failed": iv.failed, "p50_ms": p[50.0] / 1e3, "p99_ms": p[99.0] / 1e3,
                "max_ms": iv.latency.max / 1e3,
            })
        out["series"] = {"interval_s": self.interval_s, "points": points}
        return out

    def derive(self) -> None:
        """Recompute the figures that follow from the counts."""
        e = self.elapsed_s
        self.messages_per_s = self.messages_accepted / e if e > 0 else 0.0
        self.cpu_us_per_message = self.cpu_s * 1e6 / self.messages_attempted if self.messages_attempted else 0.0
        if self.rate_target is not None:
            self.rate_achieved = self.completed_in_window / self.rate_window_s if self.rate_window_s > 0 else 0.0
        everything_sent = (
            self.messages_unsent == 0
            and (self.messages_requested is None or self.messages_attempted >= self.messages_requested)
            and (self.messages_attempted > 0 or self.messages_requested == 0)
        )
        self.complete = not self.timed_out and everything_sent and self.messages_failed == 0


def _pname(q: float) -> str:
    return "p" + f"{q:g}".replace(".", "_")


def merge_results(results: list[LoadResult]) -> LoadResult:
    """One report from several processes' reports (same target, same start time)."""
    if not results:
        raise ValueError("nothing to merge")
    first = results[0]
    out = replace(first, histograms={p: Histogram() for p in PHASES}, series=[], replies={}, errors={},
                  errors_by_code={}, workload=dict(first.workload))
    out.workers = len(results)
    for name in ("messages_attempted", "messages_accepted", "recipients_accepted", "recipients_refused",
                 "messages_failed", "messages_unsent", "connections_opened", "connect_failures",
                 "completed_in_window", "connections"):
        setattr(out, name, sum(getattr(r, name) for r in results))
    requested = [r.messages_requested for r in results]
    out.messages_requested = None if any(n is None for n in requested) else sum(n or 0 for n in requested)
    if first.rate_target is not None:
        out.rate_target = sum(r.rate_target or 0.0 for r in results)
    out.cpu_s = sum(r.cpu_s for r in results)
    out.elapsed_s = max(r.elapsed_s for r in results)
    out.timed_out = any(r.timed_out for r in results)
    for name in ("replies", "errors", "errors_by_code"):
        total: Counter[str] = Counter()
        for r in results:
            total.update(getattr(r, name))
        setattr(out, name, dict(total))
    for r in results:
        for phase, h in r.histograms.items():
            out.histograms[phase].merge(h)
        while len(out.series) < len(r.series):
            out.series.append(Interval())
        for k, iv in enumerate(r.series):
            out.series[k].merge(iv)
    out.derive()
    return out


@dataclass(frozen=True, slots=True)
class Progress:
    """What the live display shows; sent every ``progress_interval`` seconds."""

    elapsed_s: float
    sent: int
    completed: int
    accepted: int
    failed: int
    requested: int | None
    sent_per_s: float  # over the last full interval
    reply_classes: dict[str, int]
    p50_ms: float  # message latency over the last full interval
    p99_ms: float
    connect_failures: int
    # The last full interval's latencies, so that worker processes' views can be merged.
    latency: Histogram | None = None

    @staticmethod
    def merge(parts: list[Progress]) -> Progress:
        h = Histogram.merged(p.latency for p in parts if p.latency is not None)
        classes: Counter[str] = Counter()
        for p in parts:
            classes.update(p.reply_classes)
        reqs = [p.requested for p in parts]
        pct = h.percentiles((50.0, 99.0))
        return Progress(
            elapsed_s=max(p.elapsed_s for p in parts), sent=sum(p.sent for p in parts),
            completed=sum(p.completed for p in parts), accepted=sum(p.accepted for p in parts),
            failed=sum(p.failed for p in parts),
            requested=None if any(r is None for r in reqs) else sum(r or 0 for r in reqs),
            sent_per_s=sum(p.sent_per_s for p in parts), reply_classes=dict(classes),
            p50_ms=pct[50.0] / 1e3, p99_ms=pct[99.0] / 1e3,
            connect_failures=sum(p.connect_failures for p in parts), latency=h,
        )


# --- measuring -----------------------------------------------------------------


class _Msg:
    """Per-message timestamps (perf_counter seconds), carried as the transaction's tag."""

    __slots__ = ("done", "index", "intended", "t_env", "t_send")

    def __init__(self, index: int, intended: float, t_send: float) -> None:
        self.index = index
        self.intended = intended
        self.t_send = t_send
        self.t_env = 0.0
        self.done = False


class _TimedConnection(SMTPConnection):
    """An SMTPConnection that stamps session and transaction phase boundaries.

    Only public ``asyncio.Protocol`` callbacks and ``ClientProtocol.waiting_for``
    are used; see the module docstring for why this identifies the 354.
    """

    def __init__(
        self,
        protocol: ClientProtocol,
        timeouts: Timeouts,
        loop: asyncio.AbstractEventLoop,
        tls_context: ssl.SSLContext | None,
        server_hostname: str | None,
    ) -> None:
        super().__init__(protocol, timeouts, loop, tls_context, server_hostname)
        self.t_connected = 0.0
        self.t_greeting = 0.0
        self.timed: deque[_Msg] = deque()  # sent on this connection, oldest first

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t_connected = perf_counter()
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        # The time of the read, taken first: the completion callbacks and the
        # write of the content run inside super().data_received(), and are
        # not part of the wait for the 354.
        now = perf_counter()
        super().data_received(data)
        waiting = self.protocol.waiting_for
        if not self.t_greeting and waiting is not Phase.GREETING:
            self.t_greeting = now
        timed = self.timed
        while timed and timed[0].done:
            timed.popleft()
        if timed and waiting is Phase.END_OF_DATA and not timed[0].t_env:
            timed[0].t_env = now

    def send_timed(self, transaction: Transaction, msg: _Msg, on_done: ResultCallback) -> None:
        self.timed.append(msg)
        self.send_with_callback(transaction, on_done)


def _decisive_code(res: TransactionResult) -> int:
    if res.error is not None and res.final_reply is None:
        return res.error.code
    for reply in (res.mail_reply, *res.rcpt_replies, res.data_reply, res.final_reply):
        if reply is not None and not reply.is_positive:
            return reply.code
    return res.final_reply.code if res.final_reply is not None else 451


class _Recorder:
    """Counts outcomes and records latencies; everything a report needs."""

    def __init__(self, spec: LoadSpec, t0: float, window: tuple[float, float]) -> None:
        self.spec = spec
        self.t0 = t0
        self.inv_interval = 1.0 / spec.interval
        self.window_start, self.window_end = window
        self.result = LoadResult(
            target=f"{spec.host}:{spec.port}", messages_requested=spec.messages,
            mode="open" if spec.open_loop else "closed", connections=spec.connections,
            duration_s=spec.duration, rate_target=spec.rate, ramp_s=spec.ramp, interval_s=spec.interval,
        )
        self.replies: Counter[int] = Counter()
        self.errors: Counter[str] = Counter()
        self.by_code: Counter[int] = Counter()
        h = self.result.histograms
        self.h_queue, self.h_env, self.h_eod = h["queue"], h["envelope"], h["end_of_data"]
        self.series = self.result.series

    def interval(self, now: float) -> Interval:
        k = int((now - self.t0) * self.inv_interval)
        series = self.series
        if k >= len(series):
            series.extend(Interval() for _ in range(k + 1 - len(series)))
        return series[k if k >= 0 else 0]

    def sent(self, msg: _Msg) -> None:
        self.interval(msg.t_send).sent += 1
        if self.spec.open_loop:
            self.h_queue.record(int((msg.t_send - msg.intended) * 1e6))

    def session(self, t_open: float, conn: _TimedConnection, t_ready: float) -> None:
        h = self.result.histograms
        self.result.connections_opened += 1
        if conn.t_connected:
            h["connect"].record(int((conn.t_connected - t_open) * 1e6))
            if conn.t_greeting:
                h["greeting"].record(int((conn.t_greeting - conn.t_connected) * 1e6))
                h["ehlo"].record(int((t_ready - conn.t_greeting) * 1e6))

    def connect_failed(self, reason: str) -> None:
        self.result.connect_failures += 1
        self.errors[reason] += 1

    def record(self, res: TransactionResult, now: float) -> None:
        r = self.result
        r.messages_attempted += 1
        msg: _Msg = res.transaction.tag  # type: ignore[assignment]
        if res.error is not None and res.final_reply is None:
            self.errors[str(res.error)] += 1
        accepted = 0
        replies = self.replies
        for reply in res.recipient_replies():
            replies[reply.code] += 1
            if 200 <= reply.code < 300:
                accepted += 1
        r.recipients_accepted += accepted
        r.recipients_refused += len(res.transaction.recipients) - accepted
        iv = self.interval(now)
        iv.completed += 1
        if accepted:
            r.messages_accepted += 1
            iv.accepted += 1
        else:
            r.messages_failed += 1
            iv.failed += 1
            self.by_code[_decisive_code(res)] += 1
        iv.latency.record(int((now - msg.intended) * 1e6))
        if msg.t_env:
            self.h_env.record(int((msg.t_env - msg.t_send) * 1e6))
            if res.final_reply is not None:
                self.h_eod.record(int((now - msg.t_env) * 1e6))
        elif res.final_reply is not None:  # BDAT: no 354 to split at
            self.h_eod.record(int((now - msg.t_send) * 1e6))
        if self.window_start <= now <= self.window_end:
            r.completed_in_window += 1

    def finish(self, started: float, cpu_started: float) -> LoadResult:
        r = self.result
        r.elapsed_s = perf_counter() - started
        r.cpu_s = time.process_time() - cpu_started
        r.replies = {str(k): v for k, v in sorted(self.replies.items())}
        r.errors = dict(self.errors)
        r.errors_by_code = {str(k): v for k, v in sorted(self.by_code.items())}
        r.histograms["message"] = Histogram.merged(iv.latency for iv in r.series)
        r.rate_window_s = max(0.0, self.window_end - self.window_start) if self.spec.open_loop else 0.0
        r.derive()
        return r

    def progress(self, now: float, cpu_started: float) -> Progress:
        r = self.result
        k = int((now - self.t0) * self.inv_interval) - 1  # the last full interval
        last = self.series[k] if 0 <= k < len(self.series) else None
        if last is None and self.series:
            last = self.series[-1]
        pct = last.latency.percentiles((50.0, 99.0)) if last is not None else {50.0: 0, 99.0: 0}
        classes: Counter[str] = Counter()
        for code, n in self.replies.items():
            classes[f"{code // 100}xx"] += n
        return Progress(
            elapsed_s=now - self.t0, sent=sum(iv.sent for iv in self.series), completed=r.messages_attempted,
            accepted=r.messages_accepted, failed=r.messages_failed, requested=self.spec.messages,
            sent_per_s=(last.sent * self.inv_interval) if last is not None else 0.0, reply_classes=dict(classes),
            p50_ms=pct[50.0] / 1e3, p99_ms=pct[99.0] / 1e3, connect_failures=r.connect_failures,
            latency=last.latency if last is not None else None,
        )


# --- offering load ---------------------------------------------------------------


class _Source:
    """Hands out message indexes: at once (closed loop) or when due (open loop)."""

    def __init__(self, spec: LoadSpec, t0: float, loop: asyncio.AbstractEventLoop) -> None:
        self.spec = spec
        self.t0 = t0
        self.loop = loop
        self.limit = spec.messages if spec.messages is not None else 1 << 62
        self.stop_at = t0 + spec.duration if spec.duration is not None else math.inf
        self.next = 0  # next index to hand out
        self.released = 0  # open loop: indexes below this are due
        self.finished = False  # nothing more will be released
        self.hungry: deque[_Driver] = deque()  # connections with a free slot, waiting for a due message
        self.work = asyncio.Event()
        rate = spec.rate or 1.0
        self.rate = rate
        self.ramp = spec.ramp
        self.ramp_messages = rate * spec.ramp / 2  # messages due during the linear ramp 0 -> rate

    def offset(self, i: int) -> float:
        """Seconds after t0 at which message *i* is due (open loop)."""
        if i < self.ramp_messages:
            # Rate grows linearly over the ramp: due count n(t) = rate t^2 / (2 ramp).
            return math.sqrt(2 * self.ramp * i / self.rate)
        return self.ramp + (i - self.ramp_messages) / self.rate

    def claim(self, now: float) -> int:
        """The next index to send now, or -1."""
        i = self.next
        if self.spec.rate is not None:
            if i < self.released:
                self.next = i + 1
                return i
            return -1
        if self.finished:
            return -1
        if i >= self.limit or now >= self.stop_at:
            self.finish()
            return -1
        self.next = i + 1
        return i

    def intended(self, i: int, now: float) -> float:
        return self.t0 + self.offset(i) if self.spec.rate is not None else now

    @property
    def exhausted(self) -> bool:
        if self.spec.rate is not None:
            return self.finished and self.next >= self.released
        return self.finished or self.next >= self.limit or perf_counter() >= self.stop_at

    @property
    def unsent(self) -> int:
        if self.spec.rate is not None:
            return self.released - self.next
        return max(0, self.limit - self.next) if self.spec.messages is not None and self.spec.duration is None else 0

    def finish(self) -> None:
        if not self.finished:
            self.finished = True
            self.work.set()
            self.loop.call_soon(self.wake)  # not from inside a claim: drivers must not re-enter

    def wake(self) -> None:
        """Give due messages to waiting connections, one each in turn."""
        hungry = self.hungry
        while hungry and (self.next < self.released or self.finished):
            driver = hungry.popleft()
            driver.waiting = False
            driver.top_up(1)
        if self.next < self.released:
            self.work.set()  # more due than free slots: wake workers that have no connection yet

    async def wait_for_work(self) -> None:
        while not (self.next < self.released or self.finished or self.spec.rate is None):
            self.work.clear()
            await self.work.wait()

    async def schedule(self) -> None:
        """Open loop: release messages at their due times until the count or the duration ends."""
        i = 0
        while i < self.limit:
            due = self.t0 + self.offset(i)
            if due >= self.stop_at:
                break
            now = perf_counter()
            if due > now:
                # At least 1 ms: uvloop's timers count whole milliseconds, so a
                # shorter sleep returns at once and the scheduler would spin.
                # Messages due within that millisecond go out together.
                await asyncio.sleep(max(due - now, 0.001))
                now = perf_counter()
            while i < self.limit:
                due = self.t0 + self.offset(i)
                if due > now or due >= self.stop_at:
                    break
                i += 1
            self.released = i
            self.wake()
        self.finish()


class _Driver:
    """One connection's share of the work: keep ``depth`` transactions in flight.

    Driven by future callbacks rather than one await per message: the next
    transaction is queued from the completion callback, in the same loop
    iteration that read the reply, so it rides in the same write.
    """

    def __init__(self, conn: _TimedConnection, source: _Source, recorder: _Recorder, workload: Workload) -> None:
        self.conn = conn
        self.source = source
        self.recorder = recorder
        self.workload = workload
        self.depth = source.spec.depth
        self.limit = source.spec.messages_per_connection or 1 << 62
        self.inflight = 0
        self.sent = 0
        self.waiting = False
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def top_up(self, max_new: int = 1 << 30) -> None:
        conn = self.conn
        source = self.source
        taken = 0
        while self.inflight < self.depth and self.sent < self.limit and taken < max_new and conn.is_usable:
            now = perf_counter()
            i = source.claim(now)
            if i < 0:
                break
            msg = _Msg(i, source.intended(i, now), now)
            self.recorder.sent(msg)
            conn.send_timed(self.workload.transaction(i, msg), msg, self.finished)
            self.inflight += 1
            self.sent += 1
            taken += 1
        can_send = conn.is_usable and self.sent < self.limit
        if self.inflight == 0 and (not can_send or source.exhausted):
            if not self.done.done():
                self.done.set_result(None)
        elif can_send and self.inflight < self.depth and not source.exhausted and not self.waiting:
            self.waiting = True
            source.hungry.append(self)

    def finished(self, result: TransactionResult) -> None:
        self.inflight -= 1
        msg: _Msg = result.transaction.tag  # type: ignore[assignment]
        msg.done = True
        self.recorder.record(result, perf_counter())
        self.top_up()


async def run_load(
    spec: LoadSpec,
    progress: Callable[[Progress], None] | None = None,
    progress_interval: float = 0.5,
) -> LoadResult:
    """Run the load described by *spec*; always returns a report within its timeout (+ a few seconds)."""
    spec.check()
    workload = Workload(spec)
    timeouts = Timeouts.uniform(spec.reply_timeout)
    loop = asyncio.get_running_loop()
    if spec.start_at is not None:
        await asyncio.sleep(max(0.0, spec.start_at - time.time()))
    started = perf_counter()
    cpu_started = time.process_time()
    source = _Source(spec, started, loop)
    if spec.open_loop:
        # The rate is judged after the ramp, up to the last due time.
        last_due = source.offset(spec.messages - 1) + 1 / source.rate if spec.messages is not None else math.inf
        end = min(spec.duration if spec.duration is not None else math.inf, last_due)
        window = (started + spec.ramp, started + max(end, spec.ramp))
    else:
        window = (started, started)
    recorder = _Recorder(spec, started, window)
    recorder.result.workload = {
        "size": str(spec.size), "recipients": spec.recipients, "domains": spec.domains, "depth": spec.depth,
        "messages_per_connection": spec.messages_per_connection, "pipelining": spec.pipelining,
        "bdat": spec.use_bdat, "starttls": spec.tls.value, "body": workload.describe(),
    }
    connections: set[_TimedConnection] = set()
    # Built once: loading the CA store takes tens of milliseconds, which would
    # otherwise be charged to every connection's "connect" phase.
    tls_context = _insecure_tls() if spec.tls is not TLSPolicy.NEVER else None

    async def worker() -> None:
        failures = 0
        while True:
            await source.wait_for_work()
            if source.exhausted:
                return
            t_open = perf_counter()
            try:
                conn = await _TimedConnection.open(
                    spec.host, spec.port, helo_name=spec.helo_name, source_address=spec.source_address,
                    timeouts=timeouts, pipelining=spec.pipelining, use_bdat=spec.use_bdat, tls=spec.tls,
                    tls_context=tls_context,
                )
            except ConnectError as exc:
                recorder.connect_failed(str(exc.reply) if isinstance(exc, SessionRefused) else str(exc))
                failures += 1
                if failures >= spec.max_connect_failures:
                    return
                await asyncio.sleep(min(0.05 * 2**failures, 1.0))
                continue
            assert isinstance(conn, _TimedConnection)
            recorder.session(t_open, conn, perf_counter())
            failures = 0
            connections.add(conn)
            driver = _Driver(conn, source, recorder, workload)
            driver.top_up()
            try:
                await driver.done
            finally:
                connections.discard(conn)
                await conn.quit()

    async def reporter() -> None:
        assert progress is not None
        while True:
            await asyncio.sleep(progress_interval)
            progress(recorder.progress(perf_counter(), cpu_started))

    reporter_task = asyncio.ensure_future(reporter()) if progress is not None else None
    scheduler = asyncio.ensure_future(source.schedule()) if spec.open_loop else None
    n_workers = spec.connections if spec.messages is None else min(spec.connections, max(spec.messages, 1))
    workers = [asyncio.ensure_future(worker()) for _ in range(n_workers)]
    try:
        done, pending = await asyncio.wait(workers, timeout=max(0.0, spec.effective_timeout()))
        if pending:
            recorder.result.timed_out = True
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=5.0)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                exc = task.exception()
                recorder.errors[f"{type(exc).__name__}: {exc}"] += 1
    finally:
        for extra in (reporter_task, scheduler):
            if extra is not None:
                extra.cancel()
        for conn in list(connections):
            conn.close()  # whatever is still open after the grace period: in-flight messages fail
    await asyncio.sleep(0)  # let the aborted transactions' callbacks record their outcome
    recorder.result.messages_unsent = source.unsent
    return recorder.finish(started, cpu_started)


def _insecure_tls() -> ssl.SSLContext:
    """Load tests talk to test servers with self-signed certificates: encrypt, do not verify."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


# --- several processes -------------------------------------------------------------


def split_spec(spec: LoadSpec, workers: int) -> list[LoadSpec]:
    """Divide messages, connections and rate between *workers* processes."""
    if workers < 1:
        raise ValueError("workers must be >= 1")
    if spec.connections < workers:
        raise ValueError(f"--workers {workers} needs at least {workers} connections (one per process)")

    def share(total: int, k: int) -> int:
        return total // workers + (1 if k < total % workers else 0)

    return [
        replace(
            spec,
            messages=share(spec.messages, k) if spec.messages is not None else None,
            connections=share(spec.connections, k),
            rate=spec.rate / workers if spec.rate is not None else None,
            seed=spec.seed + k,
        )
        for k in range(workers)
    ]


def _child(spec: LoadSpec, wid: int, out: Any, go: Any, start: Any, progress_interval: float) -> None:
    """Process entry point: wait for the common start, run, send the report back."""
    import uvloop

    out.put(("ready", wid, None))
    if not go.wait(60):
        out.put(("error", wid, "no start signal from the parent"))
        return
    spec = replace(spec, start_at=start.value)

    def report(p: Progress) -> None:
        out.put(("progress", wid, p))

    try:
        result = uvloop.run(run_load(spec, report, progress_interval))
    except BaseException as exc:  # the parent must hear about any failure, not wait for it
        out.put(("error", wid, f"{type(exc).__name__}: {exc}"))
        return
    out.put(("result", wid, result))


def run_load_processes(
    spec: LoadSpec,
    workers: int,
    progress: Callable[[Progress], None] | None = None,
    progress_interval: float = 0.5,
) -> LoadResult:
    """Run *spec* spread over *workers* processes; merge their reports.

    Processes are spawned (not forked: no inherited event loop), wait until
    all are ready, then start at one common wall-clock time so that their
    open-loop schedules and time series line up.
    """
    spec.check()
    parts = split_spec(spec, workers)
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    go = ctx.Event()
    start = ctx.Value("d", 0.0)
    procs = [
        ctx.Process(target=_child, args=(part, k, out, go, start, progress_interval), daemon=True)
        for k, part in enumerate(parts)
    ]
    for p in procs:
        p.start()
    results: dict[int, LoadResult] = {}
    errors: list[str] = []
    latest: dict[int, Progress] = {}
    ready = 0
    deadline = time.monotonic() + 60.0
    try:
        while ready < workers and time.monotonic() < deadline:
            try:
                kind, wid, payload = out.get(timeout=0.5)
            except queue_mod.Empty:
                if not any(p.is_alive() for p in procs):
                    break
                continue
            if kind == "ready":
                ready += 1
            elif kind == "error":
                errors.append(f"worker {wid}: {payload}")
        start.value = time.time() + 0.05
        go.set()
        deadline = time.monotonic() + spec.effective_timeout() + 15.0
        while len(results) + len(errors) < workers and time.monotonic() < deadline:
            try:
                kind, wid, payload = out.get(timeout=0.5)
            except queue_mod.Empty:
                if not any(p.is_alive() for p in procs) and out.empty():
                    break
                continue
            if kind == "progress":
                latest[wid] = payload
                if progress is not None and len(latest) == workers:
                    progress(Progress.merge(list(latest.values())))
            elif kind == "result":
                results[wid] = payload
            elif kind == "error":
                errors.append(f"worker {wid}: {payload}")
    finally:
        for p in procs:
            p.join(timeout=2.0)
            if p.is_alive():
                p.terminate()
                p.join(timeout=2.0)
    if not results:
        empty = LoadResult(target=f"{spec.host}:{spec.port}", messages_requested=spec.messages, workers=workers,
                           timed_out=True, errors={e: 1 for e in errors or ["no worker process reported"]})
        empty.derive()
        return empty
    merged = merge_results([results[k] for k in sorted(results)])
    merged.workers = workers
    if len(results) < workers:
        merged.timed_out = True
        merged.errors.update({e: 1 for e in errors} or {f"{workers - len(results)} worker process(es) did not report": 1})
        merged.derive()
    elif errors:
        merged.errors.update({e: 1 for e in errors})
    return merged


def default_workers() -> int:
    return max(1, (os.cpu_count() or 2) - 1)
