"""Outbound connections open at once, engine-wide: each is a file descriptor.

PowerMTA has ``max-smtp-out``, Postfix its process limit for ``smtp``: a cap
over every site's connections together. Here it matters for one more reason:
connections share the process's file descriptors with the queue, the
accounting log and the files being read. Without a cap, a low open-files
limit (``ulimit -n``) let connections take them all: pickup files were then
rejected as unreadable ("Too many open files") and connects failed, and were
blamed on the receivers. The cap is what the open-files limit leaves once
the descriptors in use at start and a reserve are set aside (``[smtp]
max_connections`` may set a lower one). Should descriptors run out all the
same (``fastmta serve``'s inbound connections share them), a connect that
fails for want of one is this machine's shortage, not the receiver's fault
(:class:`~fastmta.errors.LocalShortage`): the site queue waits and tries again.

A site queue that finds the budget spent waits its turn: it is called back
(its ``kick``) when a connection elsewhere closes, in the order they asked.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import time
from collections.abc import Callable

from fastmta.errors import LocalShortage

__all__ = ["SHORTAGE_PAUSE", "ConnectionBudget", "default_connection_limit", "warn_shortage"]

log = logging.getLogger("fastmta.delivery.pool")

#: Seconds before a connection refused for want of local resources is tried again.
SHORTAGE_PAUSE = 0.5
_RESERVE_MIN = 16  # descriptors kept for the queue, logs and input files, at least
_shortage_warned = -math.inf  # when the last warning about a shortage was given (monotonic): one a minute


def default_connection_limit() -> int:
    """Connections the open-files limit leaves room for: free descriptors less a reserve (1/8, 16 at least)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:  # no /proc: count what the interpreter and its libraries usually hold
        in_use = 32
    free = soft - in_use
    return max(1, free - max(_RESERVE_MIN, free // 8))


class ConnectionBudget:
    """How many outbound connections may be open (or opening) at once, over every site."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self.peak = 0
        self._waiting: dict[Callable[[], None], None] = {}  # kicks of queues refused, in order (a set)

    def take(self, kick: Callable[[], None]) -> bool:
        """One connection may be opened (True); else *kick* is called once one closes."""
        if self.open < self.limit:
            self.open += 1
            self.peak = max(self.peak, self.open)
            return True
        self._waiting[kick] = None
        return False

    def give(self) -> None:
        """A connection taken closed (or never opened): the first waiting queue may open one."""
        self.open -= 1
        while self._waiting and self.open < self.limit:
            kick = next(iter(self._waiting))
            del self._waiting[kick]
            kick()  # takes one if it still needs it; if not, the next one may


def warn_shortage(site: str, exc: LocalShortage) -> None:
    """Say that this machine, not *site*, is short of something (at most once a minute)."""
    global _shortage_warned
    now = time.monotonic()
    if now - _shortage_warned >= 60.0:
        _shortage_warned = now
        log.warning("%s: %s: this machine is short of file descriptors or memory; the mail waits, the receiver is"
                    " not blamed (raise the open-files limit, `ulimit -n`, or lower [smtp] max_connections)", site, exc)
