"""A compact set of 64-bit keys: which input rows are taken, which addresses are suppressed.

A leaf shared by the queue (row keys in the journal), intake (campaign rows)
and feedback (the suppression filter).

A campaign of a million recipients needs "was this recipient already sent?"
for each row, kept for the life of the job and written into the journal at
compaction. A Python ``set`` of a million ints costs ~60 MB; this keeps a
sorted ``array('Q')`` (8 bytes a key, binary search) plus a small set of
recent additions, merged into the array when the set grows past a quarter of
it (so merging stays amortised O(n log n) and mostly runs in C).
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator

__all__ = ["KeySet", "row_key"]

_MIN_MERGE = 4096


def row_key(*parts: str) -> int:
    """A stable 64-bit key for an input row (e.g. campaign id and recipient): blake2b, not Python's salted hash."""
    digest = hashlib.blake2b("\x00".join(parts).encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class KeySet:
    __slots__ = ("_recent", "_sorted")

    def __init__(self, keys: Iterable[int] = ()) -> None:
        self._sorted = array("Q")
        self._recent: set[int] = set(keys)
        self._maybe_merge()

    def add(self, key: int) -> None:
        if key not in self:
            self._recent.add(key)
            self._maybe_merge()

    def update(self, keys: Iterable[int]) -> None:
        for key in keys:
            self.add(key)

    def __contains__(self, key: object) -> bool:
        if key in self._recent:
            return True
        arr = self._sorted
        if not arr or not isinstance(key, int):
            return False
        i = bisect_left(arr, key)
        return i < len(arr) and arr[i] == key

    def __len__(self) -> int:
        return len(self._sorted) + len(self._recent)

    def _maybe_merge(self) -> None:
        if len(self._recent) > max(_MIN_MERGE, len(self._sorted) // 4):
            self._merge()

    def _merge(self) -> None:
        """Merge the recent keys into the sorted array.

        Only the recent keys are sorted as Python ints; the array is copied
        in slices between their insertion points. ``sorted()`` of the whole
        array made a list of every key (~45 MB at a million), and a million-row
        campaign's RSS carried those peaks.
        """
        if not self._recent:
            return
        old, out = self._sorted, array("Q")
        prev = 0
        for key in sorted(self._recent):
            i = bisect_left(old, key, prev)
            out.extend(old[prev:i])
            out.append(key)
            prev = i
        out.extend(old[prev:])
        self._sorted, self._recent = out, set()

    def to_bytes(self) -> bytes:
        """Every key, packed little-endian 8 bytes each (sorted), for the journal."""
        return b"".join(self.chunks(len(self) or 1))

    def chunks(self, max_keys: int) -> Iterator[bytes]:
        """``to_bytes`` in pieces of at most *max_keys* keys: a journal record each, no full-size copy."""
        self._merge()
        arr = self._sorted
        for start in range(0, len(arr), max_keys):
            piece = arr[start : start + max_keys]
            if sys.byteorder != "little":  # pragma: no cover
                piece.byteswap()
            yield piece.tobytes()

    def update_from_bytes(self, data: bytes) -> None:
        keys = array("Q")
        keys.frombytes(data[: len(data) - len(data) % 8])
        if sys.byteorder != "little":  # pragma: no cover
            keys.byteswap()
        self.update(keys)
