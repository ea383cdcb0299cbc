"""IP warm-up: a daily volume schedule per (egress source, site).

A new source address has no reputation; providers accept a little mail from
it and more as it proves itself. So each (source, site) may send
``schedule[step]`` messages per day, and the step advances only after a
*proving day*: one that used a fair share of its quota (``min_fill``, so a
quiet day proves nothing) with clean KPIs: deferral and bounce rates (every
permanent failure), the hard-bounce rate (bad addresses; suspected filter
bounces not among them) and the complaint rate under the thresholds. A bad
day holds the step by default rather than stepping back: the adaptive
throttle already slows the sending down within the day, and a step back
would punish a single unlucky day twice; ``step_back = true`` steps back
one step on a day over a threshold (a quiet day only holds).

The throttle counts deliveries, deferrals and bounces as replies come in;
hard bounces (after the filter watch's review) and complaints come from the
reputation guard (:mod:`fastmta.delivery.brakes`), a complaint on the day it
arrives. The last verdict, with its figures, is kept (``verdict``) and
persisted, so an operator sees why a source holds.

Pure: ``now`` is passed in. Days are ``day_length`` seconds long starting at
``day_offset`` on the caller's clock (with a wall clock, offset 0 puts the
boundary at UTC midnight). Outcomes that arrive after the boundary count
for the new day; with retries that is the day they happened anyway.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated

import msgspec

__all__ = ["DEFAULT_SCHEDULE", "Warmup", "WarmupConfig", "WarmupDecision", "WarmupState"]

Rate = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]

#: Messages per day per (source, site) at each step: roughly doubling, as
#: the providers' sender guidelines and warm-up services suggest.
DEFAULT_SCHEDULE = (50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000)


class WarmupConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """``warmup``: the schedule for new sources (set on a source or a site pattern)."""

    #: Messages per day at each step; after the last step the source is warm (no quota).
    schedule: list[Annotated[int, msgspec.Meta(ge=1)]] = msgspec.field(
        default_factory=lambda: list(DEFAULT_SCHEDULE)
    )
    #: A day with more deferrals (transient failures / outcomes) than this holds the step.
    max_deferral_rate: Rate = 0.10
    #: A day with more bounces (permanent failures / outcomes) than this holds the step.
    max_bounce_rate: Rate = 0.05
    #: A day with more hard bounces (bad addresses / outcomes) than this holds the step (Amazon SES asks < 2%).
    max_hard_bounce_rate: Rate = 0.02
    #: A day with more complaints (per delivery) than this holds the step (Gmail asks < 0.1%).
    max_complaint_rate: Rate = 0.001
    #: On a day over a threshold, step back one step instead of holding.
    step_back: bool = False
    #: A day must have sent this share of its quota to count as a proving day.
    min_fill: Rate = 0.5
    #: Over quota, may the scheduler send through an already warm source instead of waiting?
    overflow: bool = False
    day_length: Annotated[float, msgspec.Meta(gt=0)] = 86400.0
    day_offset: float = 0.0

    def __post_init__(self) -> None:
        if not self.schedule:
            raise ValueError("warmup schedule is empty")
        if any(b < a for a, b in zip(self.schedule, self.schedule[1:])):
            raise ValueError(f"warmup schedule must not decrease: {self.schedule}")


@dataclass(frozen=True, slots=True)
class WarmupDecision:
    """May ``n`` more messages go today? If not, when, and may they overflow?"""

    allowed: bool
    #: Messages left in today's quota (None: warm, no quota).
    remaining: int | None
    #: When refused: the start of the next day, when a new quota opens.
    opens_at: float | None = None
    #: When refused: the configuration allows sending through a warm source instead.
    overflow: bool = False


@dataclass(frozen=True, slots=True)
class WarmupState:
    """What to persist across restarts (a warm-up spans weeks)."""

    step: int
    day: int
    sent: int = 0
    delivered: int = 0
    deferred: int = 0
    bounced: int = 0
    hard: int = 0
    complaints: int = 0
    #: The last day's verdict: why the step advanced, held or stepped back (a note: not compared).
    verdict: str = field(default="", compare=False)


#: (old quota, new quota, reason, at). Quotas are None once warm.
WarmupListener = Callable[[int | None, int | None, str, float], None]


class Warmup:
    """The warm-up state of one (source, site)."""

    def __init__(
        self,
        config: WarmupConfig,
        now: float,
        *,
        state: WarmupState | None = None,
        on_change: WarmupListener | None = None,
    ) -> None:
        self.config = config
        self.on_change = on_change
        s = state if state is not None else WarmupState(step=0, day=self.day_of(now))
        self.step = s.step
        self.day = s.day
        self.sent = s.sent
        self.delivered = s.delivered
        self.deferred = s.deferred
        self.bounced = s.bounced
        self.hard = s.hard
        self.complaints = s.complaints
        self.verdict = s.verdict

    # --- queries ----------------------------------------------------------------

    def day_of(self, now: float) -> int:
        return math.floor((now - self.config.day_offset) / self.config.day_length)

    def day_start(self, day: int) -> float:
        return self.config.day_offset + day * self.config.day_length

    @property
    def warm(self) -> bool:
        return self.step >= len(self.config.schedule)

    @property
    def quota(self) -> int | None:
        """Today's quota (None once warm)."""
        return None if self.warm else self.config.schedule[self.step]

    def check(self, now: float, n: int = 1) -> WarmupDecision:
        """May ``n`` messages go now? Rolls the day over first if it ended."""
        self._roll(now)
        quota = self.quota
        if quota is None:
            return WarmupDecision(True, None)
        left = max(0, quota - self.sent)
        # A batch larger than what is left still goes when nothing was sent
        # today, so that a quota below the batch size never blocks forever.
        if n <= left or (self.sent == 0 and left > 0):
            return WarmupDecision(True, left)
        return WarmupDecision(False, left, self.day_start(self.day + 1), self.config.overflow)

    # --- accounting -------------------------------------------------------------

    def take(self, now: float, n: int = 1) -> None:
        """Count ``n`` messages sent (call when the transaction starts)."""
        self._roll(now)
        self.sent += n

    def record(
        self, now: float, *, delivered: int = 0, deferred: int = 0, bounced: int = 0, hard: int = 0,
        complaints: int = 0,
    ) -> None:
        """Count outcomes (per recipient) for today's rates; *hard* and *complaints* come from the guard."""
        self._roll(now)
        self.delivered += delivered
        self.deferred += deferred
        self.bounced += bounced
        self.hard += hard
        self.complaints += complaints

    def state(self) -> WarmupState:
        return WarmupState(self.step, self.day, self.sent, self.delivered, self.deferred, self.bounced, self.hard,
                           self.complaints, self.verdict)

    def describe(self) -> dict[str, object]:
        """For ``fastmta queue summary``: the step, today's figures and the last verdict (why it holds)."""
        return {"step": self.step, "steps": len(self.config.schedule), "quota": self.quota, "warm": self.warm,
                "today": {"sent": self.sent, "delivered": self.delivered, "deferred": self.deferred,
                          "bounced": self.bounced, "hard": self.hard, "complaints": self.complaints},
                "verdict": self.verdict or None}

    # --- day boundary -----------------------------------------------------------

    def _roll(self, now: float) -> None:
        today = self.day_of(now)
        if today <= self.day:
            return
        # Judge only the last day we sent on: idle days in between prove nothing.
        if self.sent > 0 and not self.warm:
            self._judge(self.day_start(today))
        self.day = today
        self.sent = self.delivered = self.deferred = self.bounced = self.hard = self.complaints = 0

    def _judge(self, at: float) -> None:
        cfg = self.config
        quota = self.config.schedule[self.step]
        outcomes = self.delivered + self.deferred + self.bounced
        deferral = self.deferred / outcomes if outcomes else 0.0
        bounce = self.bounced / outcomes if outcomes else 0.0
        hard = self.hard / outcomes if outcomes else 0.0
        complaint = self.complaints / self.delivered if self.delivered else (1.0 if self.complaints else 0.0)
        stats = (f"sent {self.sent}/{quota}, deferred {deferral:.1%}, bounced {bounce:.1%}, hard {hard:.1%}, "
                 f"complaints {complaint:.2%}")
        bad = None
        if self.sent < cfg.min_fill * quota:
            reason = f"warm-up held: {stats}: under {cfg.min_fill:.0%} of the quota proves nothing"
        elif deferral > cfg.max_deferral_rate:
            bad = f"deferrals over {cfg.max_deferral_rate:.1%}"
        elif bounce > cfg.max_bounce_rate:
            bad = f"bounces over {cfg.max_bounce_rate:.1%}"
        elif hard > cfg.max_hard_bounce_rate:
            bad = f"hard bounces over {cfg.max_hard_bounce_rate:.1%}"
        elif complaint > cfg.max_complaint_rate:
            bad = f"complaints over {cfg.max_complaint_rate:.2%}"
        else:
            self.step += 1
            new = self.quota
            to = "warm, no quota" if new is None else f"{new}/day"
            self._emit(quota, new, f"warm-up advanced to {to}: {stats}", at)
            return
        if bad is not None and cfg.step_back and self.step > 0:
            self.step -= 1
            self._emit(quota, self.quota, f"warm-up stepped back to {self.quota}/day: {stats}: {bad}", at)
            return
        if bad is not None:
            reason = f"warm-up held: {stats}: {bad}"
        self._emit(quota, quota, reason, at)

    def _emit(self, old: int | None, new: int | None, reason: str, at: float) -> None:
        self.verdict = reason
        if self.on_change is not None:
            self.on_change(old, new, reason, at)
