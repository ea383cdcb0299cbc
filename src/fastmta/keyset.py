"""A compact set of 64-bit keys: which input rows are taken, which addresses are suppressed.

A leaf shared by the queue (row keys in the journal), intake (campaign rows)
and feedback (the suppression filter).

A campaign of a million recipients needs "was this recipient already sent?"
for each row, kept for the life of the job and written into the journal at
compaction. A Python ``set`` of a million ints costs ~60 MB; this keeps a
sorted ``array('Q')`` (8 bytes a key, binary search) plus a small set of
recent additions, merged into the array when the set grows past a quarter of
it, or past ``_MAX_RECENT`` keys (merging mostly runs in C: the copying of
the array between insertion points).
"""

from __future__ import annotations

import hashlib
import sys
import threading
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator

__all__ = ["KeySet", "row_key"]

_MIN_MERGE = 4096
#: At most this many keys wait in the set of recent additions (~80 bytes each as Python ints in a set,
#: against 8 in the array): a quarter of a million-key array would be 250,000 of them, ~20 MB.
_MAX_RECENT = 1 << 15


def row_key(*parts: str) -> int:
    """A stable 64-bit key for an input row (e.g. campaign id and recipient): blake2b, not Python's salted hash."""
    digest = hashlib.blake2b("\x00".join(parts).encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class KeySet:
    """One writing thread; lookups from any thread (``fastmta serve``'s pickup reader checks the queue's
    taken keys on a worker thread while the event loop adds to them)."""

    __slots__ = ("_limit", "_merges", "_merging", "_recent", "_sorted")

    def __init__(self, keys: Iterable[int] = ()) -> None:
        self._sorted = array("Q")
        self._recent: set[int] = set(keys)
        #: Odd while a merge is rearranging the array in place: a lookup from another thread then
        #: waits for it (on _merging) and looks again; one that saw it change looks again too.
        self._merges = 0
        self._merging = threading.Lock()
        self._limit = _MIN_MERGE  # recent keys beyond which they are merged (set after each merge)
        if len(self._recent) > self._limit:
            self._merge()

    def add(self, key: int) -> None:
        # The writing thread: no merge can be under way, so the array is searched directly (the
        # queue adds one key per accepted message).
        recent = self._recent
        if key in recent:
            return
        arr = self._sorted
        i = bisect_left(arr, key)
        if i < len(arr) and arr[i] == key:
            return
        recent.add(key)
        if len(recent) > self._limit:
            self._merge()

    def update(self, keys: Iterable[int]) -> None:
        for key in keys:
            self.add(key)

    def __contains__(self, key: object) -> bool:
        if key in self._recent:
            return True
        if not isinstance(key, int):
            return False
        while True:
            seen = self._merges
            if seen & 1:  # another thread is merging: wait for the end, look again
                with self._merging:
                    continue
            arr = self._sorted
            i = bisect_left(arr, key)
            found = i < len(arr) and arr[i] == key
            if self._merges == seen:
                # The recent keys are emptied only once the array holds them: looked at last, a key
                # merged meanwhile is found in one or the other.
                return found or key in self._recent

    def __len__(self) -> int:
        return len(self._sorted) + len(self._recent)

    def _merge(self) -> None:
        """Merge the recent keys into the sorted array, in place.

        The array grows by the recent keys, then is filled from its end:
        each run of old keys above the next recent key moves up in one
        ``memmove`` (memoryview slice assignment; it handles the overlap),
        then the key goes below it. No second array: building a merged copy
        held two arrays at once (16 MB at a million keys), and ``sorted()``
        of the whole array a list of every key (~45 MB).
        """
        if not self._recent:
            return
        keys = sorted(self._recent)
        with self._merging:
            self._merges += 1  # odd: lookups elsewhere wait
            try:
                arr = self._sorted
                hi = len(arr)  # old keys still to place: arr[:hi]
                arr.extend(keys)  # the room they need (overwritten below)
                w = len(arr)  # arr[w:] is final
                view = memoryview(arr)
                try:
                    for key in reversed(keys):
                        i = bisect_left(arr, key, 0, hi)
                        if i < hi:
                            view[w - (hi - i) : w] = view[i:hi]
                            w -= hi - i
                            hi = i
                        w -= 1
                        arr[w] = key
                finally:
                    view.release()
                self._recent = set()
            finally:
                self._merges += 1
                self._limit = max(_MIN_MERGE, min(len(self._sorted) // 4, _MAX_RECENT))

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
