"""The exception tree.

Every delivery error says how far it reaches (``scope``) and whether trying
again later can help (``transient``), so the code that handles it (retry,
next MX, throttle, bounce) never has to guess from the exception type alone.
"""

from __future__ import annotations

from enum import Enum
from typing import Any


class Scope(str, Enum):
    """How much of the work an error concerns."""

    RECIPIENT = "recipient"  # this recipient only (e.g. 550 5.1.1 on RCPT)
    MESSAGE = "message"  # every recipient of this transaction (e.g. 552 at end of data)
    SESSION = "session"  # this connection (e.g. 421, protocol garbage, timeout)
    SITE = "site"  # every connection to this site/source (throttle signals)


class FastMTAError(Exception):
    """Base class of every error fastmta raises on purpose."""


class DamagedFile(FastMTAError):
    """A state file (a SQLite database of the service's) cannot be read: it is damaged. Names the file."""


class ConfigError(FastMTAError):
    """A configuration value is missing, malformed or inconsistent.

    The message names the file and the field.
    """


class InputError(FastMTAError):
    """Bad input (a message, address, template or recipient row).

    Carries where it came from so reports can name file and line.
    """

    def __init__(self, reason: str, *, source: str | None = None, line: int | None = None) -> None:
        where = source or ""
        if line is not None:
            where = f"{where}:{line}" if where else f"line {line}"
        super().__init__(f"{where}: {reason}" if where else reason)
        self.reason = reason
        self.source = source
        self.line = line


class DeliveryError(FastMTAError):
    """A delivery attempt failed; ``scope`` and ``transient`` say what it means."""

    scope: Scope = Scope.SESSION
    transient: bool = True

    def __init__(self, message: str, *, scope: Scope | None = None, transient: bool | None = None) -> None:
        super().__init__(message)
        if scope is not None:
            self.scope = scope
        if transient is not None:
            self.transient = transient


class ProtocolError(DeliveryError):
    """The peer broke the SMTP protocol (garbage, oversized reply, bad sequence)."""

    #: Replies a reply parser completed in the same read before the garbage: still the server's word.
    replies: list[Any] = []  # noqa: RUF012 - never mutated: each raise sets its own list


class SMTPTimeout(DeliveryError):
    """A protocol phase exceeded its timeout; the connection is unusable."""

    def __init__(self, phase: str, seconds: float) -> None:
        super().__init__(f"timeout after {seconds:g}s waiting for {phase} reply")
        self.phase = phase
        self.seconds = seconds


class ConnectError(DeliveryError):
    """The TCP (or TLS) connection could not be established or was lost."""


class LocalShortage(ConnectError):
    """A connection could not be made for want of something on *this* machine: file descriptors
    (EMFILE, ENFILE), socket buffers or memory. Not the receiver's fault: its host is not marked
    down, its throttle not cut, and no recipient is charged an attempt; the connection is tried
    again once something is freed."""
