"""Static rate limits: ``"N/s"``-style specs and a GCRA limiter.

Pure: nothing here reads a clock; every call takes ``now`` (seconds on any
monotonic scale). Used by :mod:`fastmta.delivery.throttle` for the configured
per-site and per-source limits, the connection rate, and (with a variable
interval) the adaptive message rate.

Why GCRA (the generic cell rate algorithm, as KumoMTA and redis-cell use)
rather than a token bucket with a refill timer: its whole state is one
number, the *theoretical arrival time*, so a limiter per (source, site) per
spec costs a float, answers "how long until n more may go?" exactly, and
needs no periodic refill.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = ["Gcra", "RateSpec", "RateSpecError", "parse_rate"]


class RateSpecError(ValueError):
    """A rate spec such as ``"100/h"`` could not be parsed.

    A ValueError, so that msgspec Structs that parse specs in
    ``__post_init__`` report it as a validation error naming the key.
    """


_UNITS: dict[str, float] = {
    "s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0,
    "m": 60.0, "min": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hour": 3600.0, "hours": 3600.0,
    "d": 86400.0, "day": 86400.0, "days": 86400.0,
}  # fmt: skip
_SYMBOL = {1.0: "s", 60.0: "min", 3600.0: "h", 86400.0: "day"}
_SPEC = re.compile(r"^\s*([0-9][0-9_,]*)\s*/\s*([0-9]*\.?[0-9]*)\s*([a-z]+)\s*$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class RateSpec:
    """``limit`` events per ``period`` seconds, at most ``burst`` back to back.

    ``burst`` None means ``limit``: the whole period's allowance may go at
    once (KumoMTA's default), which is what a quota such as "10,000/day"
    means. Give a smaller burst to smooth the flow.
    """

    limit: int
    period: float
    burst: int | None = None

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise RateSpecError(f"rate limit must be at least 1, not {self.limit}")
        if not self.period > 0:
            raise RateSpecError(f"rate period must be positive, not {self.period}")
        if self.burst is not None and self.burst < 1:
            raise RateSpecError(f"burst must be at least 1, not {self.burst}")

    @property
    def per_second(self) -> float:
        return self.limit / self.period

    def __str__(self) -> str:
        unit = _SYMBOL.get(self.period)
        per = unit if unit is not None else f"{self.period:g}s"
        return f"{self.limit}/{per}"


def parse_rate(text: str) -> RateSpec:
    """Parse ``"20/s"``, ``"1,000/h"``, ``"50/min"``, ``"10_000/day"``, ``"100/5min"``.

    Units: s/sec/second, m/min/minute, h/hr/hour, d/day (plural too). A
    number before the unit multiplies it (``"100/5min"`` = 100 per 300 s).
    Raises :class:`RateSpecError` with the reason.
    """
    if not isinstance(text, str):
        raise RateSpecError(f"rate spec must be a string like '100/h', not {text!r}")
    m = _SPEC.match(text)
    if m is None:
        raise RateSpecError(f"bad rate spec {text!r}: expected 'N/unit' such as '20/s', '500/min', '1000/h', '10000/day'")
    count_text, mult_text, unit_text = m.groups()
    unit = _UNITS.get(unit_text.lower())
    if unit is None:
        raise RateSpecError(f"bad rate spec {text!r}: unknown unit {unit_text!r} (use s, min, h or day)")
    try:
        mult = float(mult_text) if mult_text else 1.0
    except ValueError:
        raise RateSpecError(f"bad rate spec {text!r}: bad period multiplier {mult_text!r}") from None
    if not mult > 0 or not math.isfinite(mult):
        raise RateSpecError(f"bad rate spec {text!r}: the period must be positive")
    count = int(count_text.replace("_", "").replace(",", ""))
    if count < 1:
        raise RateSpecError(f"bad rate spec {text!r}: the count must be at least 1")
    return RateSpec(count, unit * mult)


class Gcra:
    """GCRA limiter: events spaced ``interval`` apart, up to ``burst`` at once.

    State is the theoretical arrival time ``tat``: when the limiter would be
    idle again if every granted event were spaced exactly. An event of
    weight ``n`` may go at ``now`` when ``max(tat, now) + n * interval`` is
    no more than ``burst * interval`` ahead of ``now``.
    """

    __slots__ = ("_tat", "burst", "interval")

    def __init__(self, interval: float, burst: int = 1) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be positive, not {interval}")
        if burst < 1:
            raise ValueError(f"burst must be at least 1, not {burst}")
        self.interval = interval
        self.burst = burst
        self._tat = -math.inf

    @classmethod
    def from_spec(cls, spec: RateSpec) -> Gcra:
        return cls(spec.period / spec.limit, spec.burst if spec.burst is not None else spec.limit)

    @property
    def rate(self) -> float:
        """Events per second."""
        return 1.0 / self.interval

    def wait(self, now: float, n: int = 1) -> float:
        """Seconds until ``n`` events may go (0.0: now). Does not consume.

        A weight larger than ``burst`` could never fit; it is allowed once
        the limiter is idle (and then pays its full cost), so a big batch is
        delayed, never stuck.
        """
        tat = max(self._tat, now)
        n = min(n, self.burst)
        allow_at = tat + (n - self.burst) * self.interval
        return allow_at - now if allow_at > now else 0.0

    def take(self, now: float, n: int = 1) -> None:
        """Account ``n`` events sent at ``now`` (call after :meth:`wait` said 0)."""
        self._tat = max(self._tat, now) + n * self.interval

    def try_take(self, now: float, n: int = 1) -> float:
        """Take ``n`` if they may go now and return 0.0; else return the wait."""
        delay = self.wait(now, n)
        if delay == 0.0:
            self.take(now, n)
        return delay

    def set_rate(self, per_second: float, now: float) -> None:
        """Change the pace; debt owed at the old pace is capped at the new burst.

        Without the cap, a limiter that crawled at 0.1/s would keep the
        sender idle for seconds after its rate was raised.
        """
        if not per_second > 0:
            raise ValueError(f"rate must be positive, not {per_second}")
        self.interval = 1.0 / per_second
        self._tat = min(self._tat, now + self.burst * self.interval)
