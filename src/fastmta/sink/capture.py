"""Writing captured messages in the pickup format.

Each message becomes one file: ``X-Sender:`` and one ``X-Receiver:`` per
recipient, then the message exactly as received (after dot-unstuffing), so
the capture directory can be fed back to a pickup injector and sent again.
Files appear atomically (written under a dot-name, then renamed) so a
pickup process watching the directory never reads half a message.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


def unstuff(raw: bytes) -> bytes:
    """Undo SMTP dot-stuffing (RFC 5321 4.5.2) of DATA content without its terminator.

    Only a dot at the start of a line is removed; ``bytes.replace`` does not
    rescan what it produced, so ``....`` becomes ``...``, as it must.
    """
    if b"\r\n." not in raw and not raw.startswith(b"."):
        return raw
    return (b"\r\n" + raw).replace(b"\r\n..", b"\r\n.")[2:]


def envelope_headers(sender: bytes, recipients: Sequence[bytes]) -> bytes:
    """``X-Sender``/``X-Receiver`` lines; the null sender is written ``<>``.

    Addresses were validated by the server and never contain CR, LF or NUL,
    so they cannot add header lines of their own.
    """
    lines = [b"X-Sender: " + (sender or b"<>") + b"\r\n"]
    lines += [b"X-Receiver: " + r + b"\r\n" for r in recipients]
    return b"".join(lines)


class CaptureWriter:
    """Names files ``<sequence>-<queue id>.eml`` in one directory, and budgets the memory of captures in progress.

    Files are created with *file_mode* (default 0600: captured mail is
    nobody else's to read); a directory it creates gets 0700.
    """

    __slots__ = ("_count", "_prefix", "directory", "file_mode", "held", "memory_limit")

    def __init__(
        self, directory: Path | None, memory_limit: int = 256 * 1024 * 1024, file_mode: int = 0o600
    ) -> None:
        # directory None: the memory budget alone, for a server that takes the
        # content itself (fastmta serve's SMTP listener journals it instead).
        self.directory = directory
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._count = 0
        # Several sinks may share a directory: the pid keeps their names apart.
        self._prefix = f"{os.getpid()}"
        self.memory_limit = memory_limit
        self.file_mode = file_mode
        #: Octets of unfinished messages held for capture, over all connections.
        self.held = 0

    def reserve(self, n: int) -> bool:
        """Take *n* octets of the budget; False (nothing taken) when it would run over."""
        if self.held + n > self.memory_limit:
            return False
        self.held += n
        return True

    def release(self, n: int) -> None:
        self.held -= n

    def write(self, queue_id: str, sender: bytes, recipients: Sequence[bytes], content: bytes) -> Path:
        """Write one message; on failure (disk full, read-only) nothing is left behind and OSError is raised."""
        if self.directory is None:
            raise OSError("this capture keeps no files")
        self._count += 1
        name = f"{self._prefix}-{self._count:08d}-{queue_id}.eml"
        final = self.directory / name
        tmp = self.directory / f".{name}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, self.file_mode)
            with open(fd, "wb") as f:
                f.write(envelope_headers(sender, recipients))
                f.write(content)
            os.replace(tmp, final)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        return final
