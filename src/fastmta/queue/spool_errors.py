"""What the spool raises, and the warning it gives when recovery finds damage."""

from __future__ import annotations

from fastmta.errors import FastMTAError

__all__ = [
    "BodyDamaged",
    "JournalReset",
    "ProgressDamaged",
    "SpoolError",
    "SpoolFormatError",
    "SpoolLocked",
    "SpoolRecoveryWarning",
]


class SpoolError(FastMTAError):
    """The spool cannot do what was asked (I/O failure, unknown message, damaged body)."""


class SpoolLocked(SpoolError):
    """Another process has this spool open."""


class SpoolFormatError(SpoolError):
    """The journal is in a format this fastmta does not understand (a newer version wrote it).

    Opening refuses it and leaves the journal untouched, byte for byte: a
    rewrite would drop the records it cannot read.
    """


class JournalReset(SpoolError):
    """The journal is missing, empty or without a valid record while ``data/`` holds bodies.

    Starting over would lose those messages (or send them again): opening
    refuses unless told to accept the reset (``Spool(..., accept_reset=True)``).
    """


class ProgressDamaged(SpoolError):
    """The journal's record of which input rows were taken is damaged beyond repair.

    Reading those inputs again would send rows a second time (a whole input,
    if its only record is gone): opening refuses, and leaves the journal
    untouched, unless told to accept it (``Spool(..., accept_lost_progress=True)``).
    """


class BodyDamaged(SpoolError):
    """A stored body cannot be read back: its frame or checksum fails, or its segment is gone.

    The message cannot be sent again: give it up (``Spool.mark_lost``) and
    account for it as lost, rather than keep it queued for ever.
    """

    def __init__(self, text: str, message_id: str | None = None) -> None:
        super().__init__(text)
        self.message_id = message_id  # None when the caller did not say whose body it was


class SpoolRecoveryWarning(UserWarning):
    """Recovery skipped damaged journal bytes or found a message whose body is gone."""
