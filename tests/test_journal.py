"""Record framing: torn tails and damaged bytes are skipped, never fatal, and valid records after them survive."""

from __future__ import annotations

import io
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from fastmta.queue.journal import HEADER_SIZE, MAGIC, ScanReport, check_frame, frame, repair_frame, scan


def _log(payloads: list[bytes]) -> tuple[bytes, list[int]]:
    offsets = []
    out = bytearray()
    for p in payloads:
        offsets.append(len(out))
        out += frame(p)
    return bytes(out), offsets


def _scan(data: bytes, **kw: int) -> tuple[list[tuple[int, bytes]], ScanReport]:
    report = ScanReport()
    return list(scan(io.BytesIO(data), report, **kw)), report  # type: ignore[arg-type]


def test_round_trip_and_offsets() -> None:
    payloads = [b"", b"a", b"x" * 70000, MAGIC * 3, bytes(range(256))]
    data, offsets = _log(payloads)
    got, report = _scan(data)
    assert [p for _, p in got] == payloads
    assert [o for o, _ in got] == offsets
    assert report.frames == 5 and not report.damaged and report.good_end == len(data)


def test_check_frame() -> None:
    fr = frame(b"hello")
    assert check_frame(fr) == b"hello"
    assert check_frame(fr, 5) == b"hello"
    assert check_frame(fr, 4) is None
    assert check_frame(fr[:-1]) is None
    bad = bytearray(fr)
    bad[-1] ^= 1
    assert check_frame(bytes(bad)) is None
    assert repair_frame(bytes(bad), 5) == (b"hello", "payload")
    for pos, where in [(1, "marker"), (5, "length"), (9, "checksum"), (13, "payload")]:
        bad = bytearray(fr)
        bad[pos] ^= 0x40
        assert check_frame(bytes(bad)) is None and repair_frame(bytes(bad)) == (b"hello", where), pos
    bad[14] ^= 0x01  # a second bit
    assert repair_frame(bytes(bad)) is None
    assert repair_frame(fr, 4) is None and repair_frame(fr[:-1] + b"?") is None


def test_truncated_at_every_offset_of_last_record() -> None:
    payloads = [b"record-%d" % i * (i + 1) for i in range(20)]
    data, offsets = _log(payloads)
    last = offsets[-1]
    for cut in range(last, len(data)):
        got, report = _scan(data[:cut])
        assert [p for _, p in got] == payloads[:-1], cut
        assert report.torn_tail == cut - last
        assert report.good_end == last
        assert report.middle_damage == 0


def _where(pos: int, start: int) -> str:
    """The part of the frame beginning at *start* that holds byte *pos*."""
    return ["marker", "length", "checksum"][(pos - start) // 4] if pos - start < HEADER_SIZE else "payload"


def test_one_flipped_bit_anywhere_is_repaired() -> None:
    # The most common damage: a record with one wrong bit is read as it was
    # written (the checksum confirms it), not lost, and the repair is reported.
    payloads = [b"payload %d " % i * 5 for i in range(50)]
    data, offsets = _log(payloads)
    ends = offsets[1:] + [len(data)]
    for pos in range(0, len(data), 7):
        k = next(i for i, end in enumerate(ends) if pos < end)
        for bit in (0x01, 0x80):
            damaged = bytearray(data)
            damaged[pos] ^= bit
            got, report = _scan(bytes(damaged))
            assert [p for _, p in got] == payloads, (pos, bit)
            assert report.repaired == [(offsets[k], _where(pos, offsets[k]))], (pos, bit)
            assert report.damaged_regions == [] and report.damaged, (pos, bit)


def test_two_flipped_bits_lose_only_their_record() -> None:
    payloads = [b"payload %d " % i * 5 for i in range(50)]
    data, offsets = _log(payloads)
    ends = offsets[1:] + [len(data)]
    for pos in range(0, len(data), 5):
        k = next(i for i, end in enumerate(ends) if pos < end)
        damaged = bytearray(data)
        damaged[pos] ^= 0x81
        got, report = _scan(bytes(damaged))
        if _where(pos, offsets[k]) in ("marker", "length"):
            # A damaged length is put right by where the next frame begins, a marker by where
            # the last one ended: both confirmed by the checksum (which covers the true length).
            assert [p for _, p in got] == payloads, pos
            assert report.repaired == [(offsets[k], _where(pos, offsets[k]))]
            continue
        assert [p for _, p in got] == payloads[:k] + payloads[k + 1 :], pos
        assert report.damaged_regions == [(offsets[k], ends[k] - offsets[k])], pos
        assert report.repaired == [], pos


def test_a_repair_needs_the_checksum_to_confirm_it() -> None:
    payloads = [b"a" * 10, b"b" * 10, b"c" * 10]
    data, offsets = _log(payloads)
    # A wrong length with the payload damaged too: two faults, not repaired.
    damaged = bytearray(data)
    damaged[offsets[1] + 4] ^= 0x02
    damaged[offsets[1] + HEADER_SIZE] ^= 0x01
    got, report = _scan(bytes(damaged))
    assert [p for _, p in got] == [payloads[0], payloads[2]] and report.repaired == []
    # A torn last frame is not "repaired" to the end of the file: its checksum covers its full length.
    for cut in range(offsets[2] + 1, len(data)):
        got, report = _scan(data[:cut])
        assert [p for _, p in got] == payloads[:2] and report.repaired == [] and report.torn_tail, cut
    # A damaged marker is taken only where a frame must begin, not anywhere in a damaged region.
    junk = bytes(b ^ 0x01 for b in MAGIC) + b"x" * 30
    fake = bytearray(frame(b"fake"))
    fake[0] ^= 0x02
    got, report = _scan(frame(b"first") + junk + bytes(fake) + frame(b"last"))
    assert [p for _, p in got] == [b"first", b"last"] and report.repaired == []


def test_huge_length_in_the_middle_is_repaired() -> None:
    payloads = [b"a" * 10, b"b" * 10, b"c" * 10]
    data, offsets = _log(payloads)
    damaged = bytearray(data)
    damaged[offsets[1] + 4 : offsets[1] + 8] = (0xFFFFFFF0).to_bytes(4, "little")
    got, report = _scan(bytes(damaged))
    assert [p for _, p in got] == payloads
    assert report.repaired == [(offsets[1], "length")] and report.middle_damage == 0 and report.torn_tail == 0


def test_length_past_end_in_the_middle_is_repaired() -> None:
    payloads = [b"a" * 10, b"b" * 10, b"c" * 10]
    data, offsets = _log(payloads)
    damaged = bytearray(data)
    damaged[offsets[1] + 4 : offsets[1] + 8] = (1000).to_bytes(4, "little")
    got, report = _scan(bytes(damaged))
    assert [p for _, p in got] == payloads and report.repaired == [(offsets[1], "length")]
    # ... and in the last frame (it ends at the end of the file).
    damaged = bytearray(data)
    damaged[offsets[2] + 4 : offsets[2] + 8] = (1000).to_bytes(4, "little")
    got, report = _scan(bytes(damaged))
    assert [p for _, p in got] == payloads and report.repaired == [(offsets[2], "length")]


def test_damaged_length_and_marker_resync() -> None:
    payloads = [b"a" * 10, b"b" * 10, b"c" * 10]
    data, offsets = _log(payloads)
    damaged = bytearray(data)
    damaged[offsets[1] : offsets[1] + 8] = b"\x00" * 8
    got, report = _scan(bytes(damaged))
    assert [p for _, p in got] == [payloads[0], payloads[2]]
    assert report.middle_damage == 1 and report.torn_tail == 0 and report.repaired == []


def test_garbage_longer_than_a_chunk_and_marker_across_chunks() -> None:
    rng = random.Random(1)
    junk = bytes(rng.getrandbits(8) for _ in range(3 << 20)).replace(MAGIC, b"")
    a, b = frame(b"first"), frame(b"second")
    data = a + junk + b
    got, report = _scan(data)
    assert [p for _, p in got] == [b"first", b"second"]
    assert report.damaged_regions == [(len(a), len(junk))]
    for shift in range(1, 8):  # put the second frame's marker across the 1 MiB read boundary
        data = a + junk[: (1 << 20) - len(a) - shift] + b
        got, _ = _scan(data)
        assert [p for _, p in got] == [b"first", b"second"], shift


def test_stop_bounds_the_scan() -> None:
    payloads = [b"x" * i for i in range(10)]
    data, offsets = _log(payloads)
    got, report = _scan(data, stop=offsets[5])
    assert [p for _, p in got] == payloads[:5]
    assert not report.damaged


@settings(max_examples=200, deadline=None)
@given(
    payloads=st.lists(st.binary(max_size=60), min_size=1, max_size=30),
    damage=st.lists(st.tuples(st.integers(min_value=0), st.integers(min_value=1, max_value=255)), max_size=4),
    cut=st.integers(min_value=0),
)
def test_random_damage_never_crashes_and_keeps_untouched_records(
    payloads: list[bytes], damage: list[tuple[int, int]], cut: int
) -> None:
    data, offsets = _log(payloads)
    buf = bytearray(data)
    touched = set()
    for pos, xor in damage:
        pos %= len(buf)
        buf[pos] ^= xor
        touched.add(pos)
    cut = len(buf) - cut % (len(buf) + 1)
    got, report = _scan(bytes(buf[:cut]))
    ends = offsets[1:] + [len(data)]
    intact = [
        (o, p)
        for o, p, e in zip(offsets, payloads, ends, strict=True)
        if e <= cut and not any(o <= t < e for t in touched)
    ]
    # Every untouched, complete record is found (a record can only be hidden
    # by a false frame if damage forged a matching crc: not with these sizes).
    assert set(intact) <= set(got)
    assert all(check_frame(frame(p)) == p for _, p in got)
    assert report.frames == len(got)
    assert HEADER_SIZE == 12


def test_a_damaged_length_is_repaired_when_the_payload_holds_the_marker() -> None:
    # Found by a review: the frame was taken to end at the first marker, which was inside its payload.
    payloads = [b"a" * 10, b"x" + MAGIC + b"y" * 20 + MAGIC + b"z", b"c" * 10]
    data, offsets = _log(payloads)
    for last in (False, True):
        base = data if not last else data[: offsets[2]]
        expect = payloads if not last else payloads[:2]
        damaged = bytearray(base)
        damaged[offsets[1] + 4] ^= 0x40
        got, report = _scan(bytes(damaged))
        assert [p for _, p in got] == expect and report.repaired == [(offsets[1], "length")], last


def test_a_damaged_marker_is_repaired_where_a_frame_must_begin() -> None:
    # The marker is outside the checksum: where a frame must begin (right after a good one, or at
    # the start), a frame whose length and payload check out is taken whatever its marker says.
    payloads = [b"a" * 10, b"b" * 10, b"c" * 10]
    data, offsets = _log(payloads)
    for k in range(3):
        for marker in (b"\x00\x00\x00\x00", bytes(b ^ 0x81 for b in MAGIC)):
            damaged = bytearray(data)
            damaged[offsets[k] : offsets[k] + 4] = marker
            got, report = _scan(bytes(damaged))
            assert [p for _, p in got] == payloads and report.repaired == [(offsets[k], "marker")], (k, marker)
    bad = bytearray(frame(b"hello"))
    bad[0:4] = bytes(4)
    assert repair_frame(bytes(bad)) == (b"hello", "marker")
