"""Opening `fastmta send`'s durable queue, and what each refusal tells the operator to do."""

from __future__ import annotations

import warnings
from pathlib import Path

from fastmta.cli import UsageError
from fastmta.queue.spool import Spool
from fastmta.queue.spool_errors import JournalReset, ProgressDamaged, SpoolError, SpoolLocked, SpoolRecoveryWarning

__all__ = ["QueueRefused", "open_queue"]

# What the command line offers for each refusal that an operator may choose to accept.
_HINTS: dict[type[SpoolError], str] = {
    JournalReset: " (restore the journal, or run with --accept-journal-reset)",
    ProgressDamaged: " (or run with --accept-lost-progress)",
}


class QueueRefused(Exception):
    """The queue cannot be opened: nothing was taken, the same command works once the cause is fixed."""


def open_queue(queue_dir: Path, accept_reset: bool, accept_lost_progress: bool) -> Spool:
    """The queue in *queue_dir*. UsageError if another process has it open; QueueRefused (with the
    operator's choices) for a read-only or full disk, a queue of a newer fastmta, a damaged one."""
    try:
        with warnings.catch_warnings():
            # The run says what recovery found itself (the spool's report), in its own words.
            warnings.simplefilter("ignore", SpoolRecoveryWarning)
            return Spool(queue_dir, accept_reset=accept_reset, accept_lost_progress=accept_lost_progress)
    except SpoolLocked:
        raise UsageError(f"{queue_dir} is in use by another fastmta process") from None
    except (OSError, SpoolError) as exc:
        hint = next((text for kind, text in _HINTS.items() if isinstance(exc, kind)), "")
        raise QueueRefused(f"cannot open the queue: {exc}{hint}") from None
