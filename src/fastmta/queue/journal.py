"""Record framing for append-only logs (the spool journal and its body segments).

Every record on disk is one *frame*::

    magic (4 bytes) | length (u32 LE) | crc32 (u32 LE) | payload (length bytes)

The checksum covers the length field and the payload, so a flipped bit in
either is caught (a bad length that still lands inside the file would
otherwise make us read a wrong-sized payload that might pass a payload-only
check by luck — unlikely, but the length costs nothing to include).

Why a magic marker per frame: after a crash the tail of a log may be torn
(a frame half written), and a disk or a bug may damage bytes in the middle.
A length-prefixed log alone cannot skip a damaged length field: everything
after it is lost. With a marker, the reader searches forward for the next
marker whose frame checks out and carries on, so valid records after a
damaged region survive. A marker that happens to occur inside a payload is
harmless: the checksum rejects the false frame (1 in 2**32 chance otherwise).

The reader never raises on bad data; it reports what it skipped in a
:class:`ScanReport` and leaves the policy (warn, rewrite) to the caller.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

MAGIC = b"\xf5jR\x1e"  # not ASCII text, not a msgpack prefix we emit first
HEADER = struct.Struct("<4sII")
HEADER_SIZE = HEADER.size
MAX_PAYLOAD = 256 << 20  # a larger length field is damage, not data
_CHUNK = 1 << 20

__all__ = ["HEADER_SIZE", "MAGIC", "MAX_PAYLOAD", "ScanReport", "check_frame", "frame", "scan"]


def frame(payload: bytes) -> bytes:
    """One framed record (header + payload), ready to append."""
    n = len(payload)
    crc = zlib.crc32(payload, zlib.crc32(n.to_bytes(4, "little")))
    return HEADER.pack(MAGIC, n, crc) + payload


def check_frame(data: bytes, expected_length: int | None = None) -> bytes | None:
    """The payload of the single frame *data*, or None if it does not check out."""
    if len(data) < HEADER_SIZE:
        return None
    magic, n, crc = HEADER.unpack_from(data, 0)
    if magic != MAGIC or len(data) != HEADER_SIZE + n or (expected_length is not None and n != expected_length):
        return None
    payload = data[HEADER_SIZE:]
    if zlib.crc32(payload, zlib.crc32(n.to_bytes(4, "little"))) != crc:
        return None
    return payload


@dataclass(slots=True)
class ScanReport:
    """What a scan found: good frames and the damage it stepped over."""

    frames: int = 0
    bytes_scanned: int = 0
    good_end: int = 0  # file offset just after the last good frame
    damaged_regions: list[tuple[int, int]] = field(default_factory=list)  # (offset, length) skipped
    torn_tail: int = 0  # bytes after the last good frame (a crash mid-append): included in damaged_regions

    @property
    def skipped_bytes(self) -> int:
        return sum(n for _, n in self.damaged_regions)

    @property
    def damaged(self) -> bool:
        return bool(self.damaged_regions)

    @property
    def middle_damage(self) -> int:
        """Damaged regions followed by good frames (not just a torn tail)."""
        return len(self.damaged_regions) - (1 if self.torn_tail else 0)


def scan(f: BinaryIO, report: ScanReport, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, bytes]]:
    """Yield (offset, payload) for every good frame of *f* in [start, stop).

    Reads in chunks, so memory stays at about one chunk plus one frame
    whatever the file size. Damaged bytes are skipped by searching for the
    next magic marker; each skipped run is recorded in *report*.
    """
    f.seek(start)
    buf = b""
    base = start  # file offset of buf[0]
    pos = 0
    eof = False
    bad_from = -1  # file offset where the current damaged run began, or -1
    remaining = None if stop is None else stop - start

    def read(n: int) -> bytes:
        nonlocal remaining, eof
        if remaining is not None:
            n = min(n, remaining)
        data = f.read(n) if n > 0 else b""
        if remaining is not None:
            remaining -= len(data)
        if not data:
            eof = True
        return data

    while True:
        avail = len(buf) - pos
        if avail < HEADER_SIZE and not eof:
            buf = buf[pos:] + read(_CHUNK)
            base += pos
            pos = 0
            continue
        if avail < HEADER_SIZE:
            break
        magic, n, crc = HEADER.unpack_from(buf, pos)
        ok = magic == MAGIC and n <= MAX_PAYLOAD
        if ok and avail < HEADER_SIZE + n:
            if not eof:
                buf = buf[pos:] + read(max(_CHUNK, HEADER_SIZE + n - avail))
                base += pos
                pos = 0
                continue
            ok = False  # runs past the end: a torn frame, or a damaged length in the middle
        if ok:
            end = pos + HEADER_SIZE + n
            payload = buf[pos + HEADER_SIZE : end]
            ok = zlib.crc32(payload, zlib.crc32(n.to_bytes(4, "little"))) == crc
            if ok:
                if bad_from >= 0:
                    report.damaged_regions.append((bad_from, base + pos - bad_from))
                    bad_from = -1
                report.frames += 1
                yield base + pos, payload
                pos = end
                report.good_end = base + pos
                continue
        # Damage at pos: remember where it began and look for the next marker.
        if bad_from < 0:
            bad_from = base + pos
        nxt = buf.find(MAGIC, pos + 1)
        if nxt >= 0:
            pos = nxt
            continue
        if eof:
            pos = len(buf)
            break
        # No marker in this chunk: keep the last few bytes (a marker may straddle chunks).
        keep = max(pos + 1, len(buf) - (len(MAGIC) - 1))
        buf = buf[keep:] + read(_CHUNK)
        base += keep
        pos = 0
    end_offset = base + len(buf)
    if bad_from < 0 and pos < len(buf):
        bad_from = base + pos  # a few stray bytes, too short for a header
    if bad_from >= 0:
        report.damaged_regions.append((bad_from, end_offset - bad_from))
        report.torn_tail = end_offset - bad_from
    report.bytes_scanned = end_offset - start
