"""Reading what damaged journal bytes held, so that a message lost with them is named.

The scanner (:mod:`fastmta.queue.journal`) repairs a frame with one flipped
bit, and steps over every other frame whose checksum fails: replay never
sees those. Often much of such a record is still readable: this module
reads it back *for the report only* (a damaged record is never replayed:
any of its values may be the wrong one), so recovery can say which message
an unreadable ``Add`` record belonged to, its recipients and meta, instead
of losing it silently.

Each damaged region is split at the frame markers inside it (a region may
span several frames), and each piece is read four ways, most exact first:

1. confirmed by its checksum: the damage is in the frame header only, or is
   one flipped bit (which the scanner repairs where it meets a whole frame,
   not inside a region it could not resynchronise in);
2. as a whole record of its kind, unconfirmed (a value changed without
   breaking the encoding);
3. as plain msgpack, recognised by its shape (an Add is
   ``[tag, id: str, sender: str, rcpts: list, ...]``);
4. by its first bytes: the record kind (tag) and the message id that follows
   it, when the damage is further on.

A piece at the very end of the journal that cannot be read whole is a torn
write (a crash in the middle of an append: cut short, or blocks left zeroed):
its add was never acknowledged, so it is not a loss.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import msgspec

from fastmta.queue.journal import HEADER, HEADER_SIZE, MAGIC, repair_payload
from fastmta.queue.journal_records import RECORD_TAGS, AddRecord, InputRecord, record_decoder

__all__ = ["Salvaged", "salvage_regions"]

_INPUT_TAG = 3
_INPUT_TAGS = (_INPUT_TAG, 5, 6)  # InputRecord, ForgetRecord, TakenRecord: [tag, iid, ...]
_MAX_REGION = 64 << 20  # bytes of one damaged region read back (the rest is counted as unreadable)


@dataclass(slots=True)
class Salvaged:
    """What one damaged frame was, as far as it can be read."""

    offset: int  # journal offset of the damaged frame
    kind: str  # a record kind of RECORD_TAGS ("AddRecord", ...), "unknown", or "torn" (never acknowledged)
    id: str | None = None  # the message id, if the record names one and it is readable
    rcpts: list[str] | None = None  # an Add's recipients, if readable
    meta: dict[str, Any] | None = None
    exact: bool = False  # the record decoded whole
    verified: bool = False  # and its checksum confirms it (after undoing one flipped bit)
    iid: int | None = None  # the input an InputRecord or TakenRecord was about, if readable
    key: str | None = None  # an InputRecord's input key, if readable
    size: int = 0  # of "unknown": the bytes that could not be read as a record
    several: bool = False  # of "unknown": the bytes may have held several records (their markers damaged)


def salvage_regions(path: Path, regions: list[tuple[int, int]], torn_tail: int) -> list[Salvaged]:
    """Read the damaged *regions* (offset, length) of the journal at *path* back, piece by piece."""
    out: list[Salvaged] = []
    if not regions:
        return out
    with open(path, "rb") as f:
        for k, (off, length) in enumerate(regions):
            f.seek(off)
            data = f.read(min(length, _MAX_REGION))
            at_end = bool(torn_tail) and k == len(regions) - 1
            out.extend(_salvage_region(data, off, at_end))
    return out


def _pieces(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(position, bytes) of each candidate frame: the region split at its frame markers."""
    starts = [0]
    pos = data.find(MAGIC, 1)
    while pos >= 0:
        starts.append(pos)
        pos = data.find(MAGIC, pos + 1)
    starts.append(len(data))
    for a, b in pairwise(starts):
        yield a, data[a:b]


def _salvage_region(data: bytes, base: int, at_end: bool) -> Iterator[Salvaged]:
    pieces = list(_pieces(data))
    for k, (pos, piece) in enumerate(pieces):
        last = at_end and k == len(pieces) - 1
        found = _salvage_piece(piece, base + pos, last)
        magic, n, _crc = HEADER.unpack_from(piece, 0) if len(piece) >= HEADER_SIZE else (b"", 0, 0)
        end = HEADER_SIZE + n
        if found.kind == "unknown" and magic != MAGIC:
            found.several = True  # no marker: where its records began and ended is unknown
        yield found
        if found.kind != "torn" and magic == MAGIC and end < len(piece) and not last:
            # Bytes past the end of this frame and before the next marker:
            # frames whose markers were damaged too (a zeroed block spans
            # several). What they held is unknown, but they were records.
            yield Salvaged(base + pos + end, "unknown", size=len(piece) - end, several=True)


def _salvage_piece(piece: bytes, offset: int, at_end: bool) -> Salvaged:
    if len(piece) < HEADER_SIZE:
        # A few bytes of a header: at the end, an append that never finished.
        return Salvaged(offset, "torn" if at_end else "unknown", size=len(piece))
    _magic, n, crc = HEADER.unpack_from(piece, 0)  # the marker may be the damaged part
    body = piece[HEADER_SIZE:]
    candidates = [body[:n], body] if n < len(body) else [body]
    for payload in candidates:
        fixed = repair_payload(payload, crc)
        if fixed is not None:
            found = _whole(fixed, offset, verified=True)
            if found is not None:
                return found
    if at_end and (len(body) != n or body.endswith(b"\0")):
        # Unconfirmed at the very end: an append that never finished (cut
        # short, or ending in blocks a crash left zeroed, whose first bytes may
        # still read as a record), never acknowledged. A frame of its full
        # length that does not end in zeros was written whole: it is damage,
        # like anywhere else (a one-bit error was repaired by the scanner).
        return Salvaged(offset, "torn")
    for payload in candidates:
        found = _whole(payload, offset) or _by_shape(payload, offset)
        if found is not None:
            return found
    for payload in candidates:
        found = _by_prefix(payload, offset)
        if found is not None:
            return found
    return Salvaged(offset, "unknown", size=len(piece))


def _whole(payload: bytes, offset: int, verified: bool = False) -> Salvaged | None:
    try:
        rec = record_decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if isinstance(rec, AddRecord):
        return Salvaged(offset, "AddRecord", rec.id, list(rec.rcpts), rec.meta, True, verified)
    return Salvaged(
        offset, type(rec).__name__, getattr(rec, "id", None), exact=True, verified=verified,
        iid=getattr(rec, "iid", None), key=rec.key if isinstance(rec, InputRecord) else None,
    )


def _by_shape(payload: bytes, offset: int) -> Salvaged | None:
    try:
        obj = msgspec.msgpack.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if not isinstance(obj, list) or len(obj) < 2:
        return None
    if obj[0] in _INPUT_TAGS and isinstance(obj[1], int):  # [tag, iid, (key: str, ...)]
        key = obj[2] if obj[0] == _INPUT_TAG and len(obj) > 2 and isinstance(obj[2], str) else None
        return Salvaged(offset, RECORD_TAGS[obj[0]], iid=obj[1], key=key)
    if not isinstance(obj[1], str):
        return None
    if len(obj) >= 4 and isinstance(obj[2], str) and isinstance(obj[3], list):
        rcpts = [r for r in obj[3] if isinstance(r, str)]
        meta = obj[7] if len(obj) > 7 and isinstance(obj[7], dict) else None
        return Salvaged(offset, "AddRecord", obj[1], rcpts, meta)
    tag = obj[0]
    kind = RECORD_TAGS.get(tag, "unknown") if isinstance(tag, int) else "unknown"
    return Salvaged(offset, kind, obj[1])


def _by_prefix(payload: bytes, offset: int) -> Salvaged | None:
    """The kind and the id from the first bytes: fixarray, tag, then the id string."""
    if len(payload) < 3 or not 0x90 <= payload[0] <= 0x9F or payload[1] > 0x7F:
        return None
    kind = RECORD_TAGS.get(payload[1], "unknown")
    if payload[1] in _INPUT_TAGS:
        return Salvaged(offset, kind, iid=_uint(payload, 2))
    head = payload[2]
    if 0xA0 <= head <= 0xBF:
        start, size = 3, head & 0x1F
    elif head == 0xD9 and len(payload) >= 4:
        start, size = 4, payload[3]
    elif head == 0xDA and len(payload) >= 5:
        start, size = 5, int.from_bytes(payload[3:5], "big")
    else:
        return Salvaged(offset, kind) if kind != "unknown" else None
    raw = payload[start : start + size]
    try:
        mid = raw.decode() if len(raw) == size else None
    except UnicodeDecodeError:
        mid = None
    if mid is not None and not mid.isprintable():
        mid = None
    if kind == "unknown" and mid is None:
        return None
    return Salvaged(offset, kind, mid)


def _uint(payload: bytes, at: int) -> int | None:
    """The msgpack unsigned integer at *at*, if it is one and whole."""
    head = payload[at] if at < len(payload) else 0xC1
    if head <= 0x7F:
        return head
    size = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}.get(head)
    if size is None or len(payload) < at + 1 + size:
        return None
    return int.from_bytes(payload[at + 1 : at + 1 + size], "big")
