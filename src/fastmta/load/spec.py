"""What a load run is asked to do: ``LoadSpec`` and the option values it is built from.

The command line (and tests, and benchmarks) describe a run with a
:class:`LoadSpec`: the target, how many messages or for how long, closed or
open loop, connections and pipelining depth, and the shape of the messages
(a :class:`SizeDistribution`, recipients, domains, templating, DKIM). This
module only holds and checks that description; building the messages is
:mod:`fastmta.load.workload`'s job and running it :mod:`fastmta.load.driver`'s.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

from fastmta.smtp.protocol import TLSPolicy

MAX_SIZE = 64 << 20  # the largest message a size option may ask for, or a lognormal draw yield


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

