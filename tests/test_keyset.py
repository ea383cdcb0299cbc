"""KeySet: the compact set of 64-bit row keys (taken rows, suppressed addresses) against a Python set."""

from __future__ import annotations

import random

import pytest

from fastmta.keyset import KeySet


def test_keyset_is_a_set_through_many_merges() -> None:
    rng = random.Random(18)
    keys = KeySet()
    model: set[int] = set()
    for _ in range(60_000):  # many merges: 4,096 recent keys, then a quarter of the array
        k = rng.getrandbits(64)
        keys.add(k)
        model.add(k)
        if rng.random() < 0.05:  # a repeat is not added twice
            keys.add(k)
    assert len(keys) == len(model)
    probes = rng.sample(sorted(model), 2000) + [rng.getrandbits(64) for _ in range(2000)]
    assert [p in keys for p in probes] == [p in model for p in probes]
    assert "not a key" not in keys


def test_bytes_and_chunks_hold_every_key_sorted_and_load_back() -> None:
    rng = random.Random(7)
    model = {rng.getrandbits(64) for _ in range(10_000)}
    keys = KeySet(model)
    data = keys.to_bytes()
    assert len(data) == 8 * len(model)
    decoded = [int.from_bytes(data[i : i + 8], "little") for i in range(0, len(data), 8)]
    assert decoded == sorted(model)
    pieces = list(keys.chunks(3000))
    assert [len(p) // 8 for p in pieces] == [3000, 3000, 3000, 1000] and b"".join(pieces) == data
    again = KeySet()
    for piece in pieces:  # as recovery reads several TakenRecords of one input
        again.update_from_bytes(piece)
    assert len(again) == len(model) and all(k in again for k in model)
    assert list(KeySet().chunks(5)) == [] and KeySet().to_bytes() == b""


def test_merges_in_place_keep_the_array_sorted_whatever_the_order_of_arrival(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs below, above and between the keys already merged, with the recent set capped small (many merges)."""
    import fastmta.keyset as ks

    monkeypatch.setattr(ks, "_MIN_MERGE", 16)
    monkeypatch.setattr(ks, "_MAX_RECENT", 64)
    rng = random.Random(5)
    batches = [
        list(range(1000, 2000, 3)),  # a first run
        list(range(0, 500, 7)),  # all below it
        list(range(5000, 6000, 5)),  # all above
        list(range(1001, 2000, 3)),  # interleaved one by one
        [rng.getrandbits(64) for _ in range(3000)],  # anywhere
        [2**64 - 1, 0, 1],  # the extremes
    ]
    keys = KeySet()
    model: set[int] = set()
    for batch in batches:
        for k in batch:
            keys.add(k)
            model.add(k)
        assert len(keys._recent) <= 64
    data = keys.to_bytes()
    assert [int.from_bytes(data[i : i + 8], "little") for i in range(0, len(data), 8)] == sorted(model)
    assert all(k in keys for k in model) and 3 not in keys


def test_a_lookup_from_another_thread_during_merges_never_misses_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """serve's pickup reader checks the queue's taken keys on a worker thread while the loop adds to them."""
    import sys
    import threading

    import fastmta.keyset as ks

    monkeypatch.setattr(ks, "_MIN_MERGE", 8)
    monkeypatch.setattr(ks, "_MAX_RECENT", 16)
    rng = random.Random(11)
    old = [rng.getrandbits(64) for _ in range(2000)]
    keys = KeySet(old)
    misses: list[int] = []
    stop = threading.Event()

    def look() -> None:
        while not stop.is_set():
            for k in old[::37]:
                if k not in keys:
                    misses.append(k)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: inside the merges
    reader = threading.Thread(target=look)
    reader.start()
    try:
        for _ in range(20_000):  # ~1,250 merges, each rearranging the array in place
            keys.add(rng.getrandbits(64))
    finally:
        stop.set()
        reader.join(30)
        sys.setswitchinterval(interval)
    assert not misses, f"{len(misses)} lookups missed a key that was in the set all along"
