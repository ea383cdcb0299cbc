"""Mail for the receive domains (bounces, complaints, unsubscribes), kept durably for the feedback processor.

``DATA_DIR/inbound/ID.eml``: the message as it came, after ``X-Fastmta-Envelope-From`` and
``-To`` fields that keep its envelope. A message is accepted in two steps (see
``Service._inject``): its part for the receive domains is written here as ``ID.eml.staged``
(durable, not yet read), its relayed part is queued, then the staged file is renamed into place.
A message refused in between leaves nothing behind; one queued leaves its part here, read once.
Blocking functions: the service runs them in a thread.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from fastmta.queue.records import split_address

__all__ = ["STAGED", "prune_kept", "publish_inbound", "settle_inbound", "stage_inbound", "write_durably"]

log = logging.getLogger("fastmta.serve")

#: The suffix of a staged file: written, its message not yet accepted.
STAGED = ".staged"


def stage_inbound(inbound: Path, message_id: str, content: bytes, sender: str, recipients: list[str]) -> Path:
    """*content* (for *recipients*, from *sender*) written durably as ``ID.eml.staged``; its path.

    Raises InputError for an address that is not one, OSError when it cannot be written."""
    if sender:
        split_address(sender, "sender")
    for r in recipients:
        split_address(r)
    envelope = f"X-Fastmta-Envelope-From: <{sender}>\r\n" + "".join(f"X-Fastmta-Envelope-To: <{r}>\r\n" for r in recipients)
    staged = inbound / f"{message_id}.eml{STAGED}"
    write_durably(staged, envelope.encode("utf-8") + content)
    return staged


def publish_inbound(staged: Path) -> Path | None:
    """*staged* renamed to where it is read; its new path. A rename in one directory: when even that
    fails, it stays staged (logged) and :func:`settle_inbound` puts it in place at the next start."""
    path = staged.with_name(staged.name.removesuffix(STAGED))
    try:
        _rename_durably(staged, path)
    except OSError as exc:
        log.error("inbound message %s kept as %s (read at the next start): %s", path.name, staged, exc)
        return None
    return path


def settle_inbound(inbound: Path) -> None:
    """At start: staged mail (its message may have been queued, the client answered or not) is put
    where it is read (read twice at worst, when the client sends it again: a report counted once
    more, never lost); a half-written file, never acknowledged, goes."""
    for staged in sorted(inbound.glob(f"*.eml{STAGED}")):
        log.warning("inbound message %s staged before a stop: read now", staged.name)
        _rename_durably(staged, staged.with_name(staged.name.removesuffix(STAGED)))
    for partial in inbound.glob(".*.tmp"):
        partial.unlink(missing_ok=True)


def write_durably(path: Path, data: bytes) -> None:
    """*data* at *path*, whole or not at all, on disk when this returns (a temporary file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    _rename_durably(tmp, path)


def _rename_durably(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def prune_kept(directory: Path, max_age: float, max_bytes: int) -> int:
    """Remove what the feedback processor kept for the operator (``inbound/unrecognized``) past *max_age*
    seconds, then the oldest until the rest is under *max_bytes*; how many went. Anyone may mail the
    receive domains: kept without end, 50 MB messages nobody reads filled the disk until the service
    was not ready for anyone."""
    try:
        entries = [(e.stat().st_mtime, e.stat().st_size, Path(e.path)) for e in os.scandir(directory) if e.is_file()]
    except FileNotFoundError:
        return 0
    entries.sort()
    now, total, gone = time.time(), sum(size for _, size, _ in entries), 0
    for mtime, size, path in entries:
        if now - mtime <= max_age and total <= max_bytes:
            break
        try:
            path.unlink()
        except OSError as exc:
            log.error("cannot remove %s: %s", path, exc)
            continue
        total -= size
        gone += 1
    if gone:
        log.warning("%s: removed %d message(s) kept past %g day(s) or over %d bytes", directory, gone,
                    max_age / 86400, max_bytes)
    return gone
