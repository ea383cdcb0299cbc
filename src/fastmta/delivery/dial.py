"""One dial of the adaptive throttle: an AIMD quantity (the connection window or the message rate).

Slow start, multiplicative decrease, a hold near the last good value, probing
above it, and the fixed ramp a provider's procedure asks for. How and why the
dials move, and what a *round* is, are told in :mod:`fastmta.delivery.throttle`,
which owns two of them per (egress source, site).
"""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["Dial"]


class Dial:
    """One AIMD quantity with slow start, hold, probing and a provider's ramp (see :mod:`fastmta.delivery.throttle`)."""

    def __init__(
        self, initial: float, floor: float, ceiling: float, step: Callable[[float], float], integer: bool,
        hold_rounds: int, max_hold_rounds: int,
    ) -> None:  # fmt: skip
        self.min_hold = hold_rounds
        self.max_hold = max(hold_rounds, max_hold_rounds)
        self.hold_len = hold_rounds  # clean rounds to sit at good before probing above it
        self.hold_left = 0
        self.reset_above = 1.1
        self.initial = min(max(initial, floor), ceiling)
        self.value = self.initial
        self.floor = floor
        self.ceiling = ceiling
        self._base_step = step
        self.integer = integer
        self.ssthresh = math.inf  # slow start until the first signal
        self.good = 0.0  # highest value with a clean, limited round (0: unknown)
        self.probe = 0.0  # current step above good; doubles while clean
        self.ramp = 0.0  # a provider procedure's fixed step per clean round (0: off)
        # Round bookkeeping (module notes: "What a round is").
        self.round_seq = 0
        self.round_t0 = -math.inf
        self.limited = False
        self.signalled = False
        self.succeeded = False  # a connection opened (window) or a message taken (rate) in this round
        self.cut_seq = 0
        self.cut_t = -math.inf

    def _q(self, v: float) -> float:
        v = min(max(v, self.floor), self.ceiling)
        # Round a connection count up: after a failed probe from 5 to 6 the
        # hold value 0.9 x 5 must mean "stay at the proven 5", not "drop to 4".
        return float(math.ceil(v - 1e-9)) if self.integer else v

    def new_round(self, seq: int, now: float) -> None:
        self.round_seq, self.round_t0 = seq, now
        self.limited = self.signalled = self.succeeded = False

    def round_over(self, ticket: int, now: float, round_min: float) -> bool:
        return ticket >= self.round_seq and now - self.round_t0 >= round_min

    def grow(self) -> str | None:
        """End of a clean round: the new value's reason, or None if unchanged.

        Clean means limited by this dial, no throttle signal, and something went through: a round of
        greylisted recipients or refused greetings says nothing of the capacity (it grew the rate to
        1e7 a second and the window to its ceiling with no connection ever working)."""
        if not self.limited or self.signalled or not self.succeeded:
            return None
        v = self.value
        if self.probe and v > self.good * self.reset_above:
            # A probe well above good came back clean: the capacity grew, so
            # probe often again. (Just above good proves little: a
            # receiver's burst allowance hides a small excess for a while.)
            self.hold_len = self.min_hold
        self.good = max(self.good, v)
        if self.ramp:
            new, why = v + self.ramp, f"provider procedure: +{self.ramp:g} per clean round"
        elif v < self.ssthresh:
            new, why = min(v * 2, self.ssthresh), "slow start: clean round"
            self.probe = 0.0
        elif v < self.good:
            new, why = min(v + self._base_step(v), self.good), "additive increase: clean round"
        elif self.hold_left > 0:
            # Sit at the last good value for a while: every probe above it
            # costs throttle replies, and a failed probe doubles the wait.
            self.hold_left -= 1
            return None
        else:
            # Above every value proven clean: steps growing by one base step
            # per clean round (0.5, 1, 1.5, ...): gentle at first, where a
            # receiver's burst allowance can make a round look clean, yet a
            # doubled capacity is found in about ten rounds.
            # Capped at 5% of the value: a receiver's burst allowance
            # hides an excess for several rounds, and uncapped growing steps
            # overshoot far past the capacity before the first refusal.
            self.probe = min(self.probe + self._base_step(v), max(self._base_step(v), 0.05 * v))
            new, why = v + self.probe, "probing above the last good value: clean round"
        new = self._q(new)
        if self.integer and new == v and v < self.ceiling:
            new = v + 1
        if new == v:
            return None
        self.value = new
        return why

    def cut(self, decrease: float, hold: float) -> None:
        v = self.value
        if self.good and v > self.good:
            # Throttled while above the best clean value: capacity lies in
            # between, so stay near the proven value instead of halving.
            new = max(v * decrease, hold * self.good)
            if self.ssthresh != math.inf:  # a failed probe (not the end of slow start)
                self.hold_len = min(2 * self.hold_len, self.max_hold)
        elif self.good and v >= hold * self.good:
            # Throttled near the value we believed good: it was a little
            # optimistic (a receiver's burst allowance makes it look clean).
            self.good = hold * v
            new = hold * self.good
        else:
            # Well below a value that used to be clean, or no history: the
            # receiver's capacity dropped; halve and relearn.
            new = v * decrease
            self.good = 0.0
        self.ssthresh = new
        self.probe = 0.0
        self.ramp = 0.0
        self.hold_left = self.hold_len
        q = self._q(new)
        if self.integer and q >= v:
            q = self._q(v - 1)  # a cut always cuts (rounding up must not cancel it)
        self.value = q

    def restart(self, hold: float) -> None:
        """After a suspension: from the initial value, fast back to near the last good one."""
        self.value = self._q(min(self.initial, self.value))
        self.ssthresh = max(self.value, hold * self.good) if self.good else math.inf
        self.probe = 0.0
        self.ramp = 0.0

    def ramp_from(self, value: float, step: float) -> None:
        """A provider's restart: from *value*, *step* more per clean round (no slow start, no hold)."""
        self.value = self._q(value)
        self.ssthresh = self.value
        self.probe = 0.0
        self.hold_left = 0
        self.ramp = step

    def scale(self, factor: float) -> None:
        """A provider asked for a lower rate: cut by *factor*; nothing above it counts as good."""
        self.value = self._q(self.value * factor)
        self.ssthresh = self.value
        self.good = min(self.good, self.value)
        self.probe = 0.0
        self.ramp = 0.0
