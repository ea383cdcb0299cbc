"""CRLF normalization and dot-stuffing: compiled core == reference, and the reference is right."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastmta.message import _core_ref, core

pytestmark = pytest.mark.core


def unstuff(wire: bytes) -> bytes:
    """What an RFC 5321 server recovers from a DATA payload."""
    assert wire.endswith(b".\r\n")
    body = wire[:-3]
    lines = body.split(b"\r\n")
    assert lines[-1] == b""
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines[:-1]) + (
        b"\r\n" if len(lines) > 1 else b""
    )


@pytest.mark.parametrize(
    ("raw", "wire"),
    [
        (b"", b".\r\n"),
        (b"a", b"a\r\n.\r\n"),
        (b"a\nb", b"a\r\nb\r\n.\r\n"),
        (b"a\rb\r\n", b"a\r\nb\r\n.\r\n"),
        (b".\r\n", b"..\r\n.\r\n"),
        (b"x\r\n.y\r\n..z\n", b"x\r\n..y\r\n...z\r\n.\r\n"),
        (b"\r\n\r\n", b"\r\n\r\n.\r\n"),
        (b"8bit \xe9\xff\x00\r\n", b"8bit \xe9\xff\x00\r\n.\r\n"),
    ],
)
def test_to_wire_examples(raw: bytes, wire: bytes) -> None:
    assert core.to_wire(raw) == wire
    assert _core_ref.to_wire(raw) == wire


line_bytes = st.binary(max_size=300) | st.lists(
    st.sampled_from([b".", b"\r", b"\n", b"\r\n", b"..", b"a", b" ", b"\xff", b"\x00"]), max_size=60
).map(b"".join)


@settings(max_examples=500)
@given(line_bytes)
def test_compiled_equals_reference(raw: bytes) -> None:
    assert core.to_wire(raw) == _core_ref.to_wire(raw)
    assert core.normalize_crlf(raw) == _core_ref.normalize_crlf(raw)


@settings(max_examples=300)
@given(line_bytes)
def test_wire_round_trips_through_unstuffing(raw: bytes) -> None:
    wire = core.to_wire(raw)
    # No line of the payload is a lone dot before the terminator.
    assert b"\r\n.\r\n" not in wire[:-3] and not wire[:-3].startswith(b".\r\n")
    assert unstuff(wire) == core.normalize_crlf(raw)
    assert b"\r" not in wire.replace(b"\r\n", b"") and b"\n" not in wire.replace(b"\r\n", b"")
