"""What the spool raises, and the warning it gives when recovery finds damage."""

from __future__ import annotations

from fastmta.errors import FastMTAError

__all__ = ["SpoolError", "SpoolLocked", "SpoolRecoveryWarning"]


class SpoolError(FastMTAError):
    """The spool cannot do what was asked (I/O failure, unknown message, damaged body)."""


class SpoolLocked(SpoolError):
    """Another process has this spool open."""


class SpoolRecoveryWarning(UserWarning):
    """Recovery skipped damaged journal bytes or found a message whose body is gone."""
