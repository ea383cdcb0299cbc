"""Opening `fastmta send`'s durable queue, and what each refusal tells the operator to do."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from fastmta.cli import UsageError
from fastmta.queue.spool import Spool
from fastmta.queue.spool_errors import JournalReset, ProgressDamaged, SpoolError, SpoolLocked, SpoolRecoveryWarning

__all__ = ["QUEUE_REFUSED", "QueueRefused", "add_queue_arguments", "open_queue"]

QUEUE_REFUSED = "cannot open the queue: "  # how a refusal's text begins (the summary's "fatal")

# What the command line offers for each refusal that an operator may choose to accept.
_HINTS: dict[type[SpoolError], str] = {
    JournalReset: " (restore the journal, or run with --accept-journal-reset)",
    ProgressDamaged: " [--accept-lost-progress]",
}


def add_queue_arguments(p: argparse.ArgumentParser) -> None:
    """`fastmta send`'s options about its queue."""
    p.add_argument("--queue-dir", type=Path, metavar="DIR",
                   help="durable queue (journal + bodies); a rerun resumes from it "
                        "(default: SPOOL/.fastmta; with --sink a temporary one)")
    p.add_argument("--accept-journal-reset", action="store_true",
                   help="open a queue whose journal is missing or empty beside stored bodies (they are lost, "
                        "and reported); without it such a queue is refused")
    p.add_argument("--accept-lost-progress", action="store_true",
                   help="open a queue whose record of which input rows were taken is damaged beyond repair: the "
                        "rows no longer recorded as taken are sent again if their input is read again (an input "
                        "whose own record is lost: all of it); without it such a queue is refused, untouched")
    p.add_argument("--reread-inputs", action="store_true",
                   help="read every input again from its first row, sending only the rows not recorded as taken "
                        "(after a damaged queue lost messages: their rows are sent)")


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
        raise QueueRefused(f"{QUEUE_REFUSED}{exc}{hint}") from None
