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

One flipped bit is repaired, not skipped (:func:`repair_payload`), and so is
a damaged frame marker or length field where the checksum confirms the frame
(it covers the length and the payload, not the marker): the most
common damage (a bit rotting on disk or in memory) would otherwise lose the
record, and losing an input's progress record means sending the whole input
again. A repair is only taken when the checksum confirms it: CRC-32 tells
every one-bit error apart from every other in records far larger than
:data:`MAX_REPAIR`, so a one-bit error is always put right. Damage of more
bits that happens to look like one flipped bit is the risk: about 8n/2**32
for a record of n bytes (1e-4 at the 64 KiB bound, 1e-6 for a typical
record), and the result must still decode as a record of its kind. Each
repair is reported (:attr:`ScanReport.repaired`), so the caller still warns.
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
MAX_REPAIR = 64 << 10  # a flipped bit is searched for in payloads up to this size
_LENGTH_TRIES = 8  # where a frame with a damaged length may end: the next markers (and the end of the file)
_CHUNK = 1 << 20

__all__ = [
    "HEADER_SIZE",
    "MAGIC",
    "MAX_PAYLOAD",
    "MAX_REPAIR",
    "ScanReport",
    "check_frame",
    "frame",
    "repair_frame",
    "repair_payload",
    "scan",
]


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


def _crc_of(payload: bytes | bytearray, n: int) -> int:
    return zlib.crc32(payload, zlib.crc32(n.to_bytes(4, "little")))


def _crc_table() -> list[int]:
    table = []
    for byte in range(256):
        c = byte
        for _ in range(8):
            c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc_table()
_LAST_BYTE_BITS = [_CRC_TABLE[1 << b] for b in range(8)]  # the effect of bit b of the last byte


def repair_payload(payload: bytes, crc: int) -> bytes | None:
    """*payload* as its checksum *crc* confirms it, undoing one flipped bit if needed; None if it cannot.

    The damage may be in the checksum field only (one bit of the syndrome
    set: the payload is whole), or one bit of the payload, found from the
    syndrome: CRC-32 is linear, so flipping bit *b* of byte *i* changes the
    checksum by a value that depends only on *b* and the distance to the end.
    """
    n = len(payload)
    syndrome = _crc_of(payload, n) ^ crc
    if syndrome == 0 or syndrome.bit_count() == 1:
        return payload
    if n > MAX_REPAIR:
        return None
    regs = _LAST_BYTE_BITS
    table = _CRC_TABLE
    for i in range(n - 1, -1, -1):
        if syndrome in regs:
            fixed = bytearray(payload)
            fixed[i] ^= 1 << regs.index(syndrome)
            return bytes(fixed) if _crc_of(fixed, n) == crc else None
        regs = [table[r & 0xFF] ^ (r >> 8) for r in regs]  # one byte further from the end
    return None


def repair_frame(data: bytes, expected_length: int | None = None) -> tuple[bytes, str] | None:
    """The payload of the single frame *data* with one flipped bit undone, and where it was; else None.

    For a frame whose place and size are known from elsewhere (a body, by
    its reference): the bit may be in the marker, the length, the checksum
    or the payload.
    """
    if len(data) < HEADER_SIZE:
        return None
    magic, n, crc = HEADER.unpack_from(data, 0)
    true_n = len(data) - HEADER_SIZE
    if expected_length is not None and true_n != expected_length:
        return None
    payload = data[HEADER_SIZE:]
    if magic != MAGIC:
        ok = n == true_n and _crc_of(payload, n) == crc  # the marker is outside the checksum
        return (payload, "marker") if ok else None
    if n != true_n:
        return (payload, "length") if _crc_of(payload, true_n) == crc else None
    fixed = repair_payload(payload, crc)
    if fixed is None:
        return None
    return fixed, "payload" if fixed is not payload else "checksum"


@dataclass(slots=True)
class ScanReport:
    """What a scan found: good frames and the damage it stepped over."""

    frames: int = 0
    bytes_scanned: int = 0
    good_end: int = 0  # file offset just after the last good frame
    damaged_regions: list[tuple[int, int]] = field(default_factory=list)  # (offset, length) skipped
    torn_tail: int = 0  # bytes after the last good frame (a crash mid-append): included in damaged_regions
    #: (offset, where) of each frame read after undoing one flipped bit (its marker, length, checksum or payload).
    repaired: list[tuple[int, str]] = field(default_factory=list)

    @property
    def skipped_bytes(self) -> int:
        return sum(n for _, n in self.damaged_regions)

    @property
    def damaged(self) -> bool:
        return bool(self.damaged_regions or self.repaired)

    @property
    def middle_damage(self) -> int:
        """Damaged regions followed by good frames (not just a torn tail)."""
        return len(self.damaged_regions) - (1 if self.torn_tail else 0)


def _repair_at(buf: bytes, pos: int, n: int, crc: int, eof: bool) -> tuple[bytes, int, str] | None:
    """The frame at *pos* (its marker good) with one flipped bit undone: (payload, end, where), or None.

    A damaged length is tried first: the frame then ends at the next marker
    (or the end of the file), and the checksum, which covers the true
    length, confirms it; otherwise one bit of the payload or the checksum.
    """
    start = pos + HEADER_SIZE
    limit = min(len(buf), start + MAX_REPAIR)
    nxt = buf.find(MAGIC, start, limit)
    for _ in range(_LENGTH_TRIES):  # the marker may occur inside the payload: try the next ones too
        end = nxt if nxt >= 0 else len(buf) if eof and len(buf) <= limit else -1
        if end < 0:
            break
        if end - start != n and _crc_of(buf[start:end], end - start) == crc:
            return buf[start:end], end, "length"
        if nxt < 0:
            break
        nxt = buf.find(MAGIC, nxt + 1, limit)
    if n > MAX_REPAIR or len(buf) < start + n:
        return None
    payload = buf[start : start + n]
    fixed = repair_payload(payload, crc)
    if fixed is None:
        return None
    return fixed, start + n, "payload" if fixed is not payload else "checksum"


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
        # A damaged marker is taken only where a frame must begin (right after a good one): the
        # checksum, which covers the length and the payload, says whether a frame is there.
        # (Up to a chunk: a damaged length there must not make it read far ahead.)
        ok = n <= MAX_PAYLOAD if magic == MAGIC else bad_from < 0 and n <= _CHUNK
        if ok and avail < HEADER_SIZE + n:
            if not eof:
                buf = buf[pos:] + read(max(_CHUNK, HEADER_SIZE + n - avail))
                base += pos
                pos = 0
                continue
            ok = False  # runs past the end: a torn frame, or a damaged length in the middle
        payload: bytes | None = None
        if ok:
            end = pos + HEADER_SIZE + n
            payload = buf[pos + HEADER_SIZE : end]
            if zlib.crc32(payload, zlib.crc32(n.to_bytes(4, "little"))) != crc:
                payload = None
            elif magic != MAGIC:
                report.repaired.append((base + pos, "marker"))
        if payload is None and magic == MAGIC:
            if not eof and avail < HEADER_SIZE + MAX_REPAIR and buf.find(MAGIC, pos + HEADER_SIZE) < 0:
                # Where this frame ends (the next marker, or the end of the file) is not read yet.
                buf = buf[pos:] + read(_CHUNK)
                base += pos
                pos = 0
                continue
            fixed = _repair_at(buf, pos, n, crc, eof)
            if fixed is not None:
                payload, end, where = fixed
                report.repaired.append((base + pos, where))
        if payload is not None:
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
