"""Pickup files' envelope: the compiled fast path, the line parser, and that the two agree."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastmta.errors import InputError
from fastmta.intake.pickup import PickupMessage, _parse_lines, parse_pickup
from fastmta.message import _core_ref, core

# Also run on the pure-Python twins (scripts/test.sh, second pass).
pytestmark = pytest.mark.core

NAMES = (b"x-sender", b"x-receiver")
PATH = Path("spool/m.eml")


@pytest.mark.parametrize(
    ("head", "found"),
    [
        (b"X-Sender: a@b\r\nSubject: s\r\n\r\nbody", (29, [0, 15])),
        (b"Subject: s\nx-RECEIVER: a@b,\n c@d\n\nbody", (34, [11, 33])),
        (b"A: 1\r\nX-Receiver: a@b\r\n\r\n", (25, [6, 23])),
        (b"X-Sender: a@b\r\n", None),  # no blank line
        (b"\r\nbody", None),  # no header at all
        (b" folded first\r\n\r\n", None),
        (b"Bad Name: x\r\n\r\n", None),
        (b"NoColon\r\n\r\n", None),
        (b": empty name\r\n\r\n", None),
        (b"Subject: a\rb\r\n\r\n", None),  # a CR outside a CRLF
        (b"N\xc3\xa4me: x\r\n\r\n", None),
        (b"X-Sender-Extra: a@b\r\n\r\n", (23, [])),
    ],
)
def test_find_header_fields_examples(head: bytes, found: tuple[int, list[int]] | None) -> None:
    assert core.find_header_fields(head, NAMES) == found
    assert _core_ref.find_header_fields(head, NAMES) == found


_plain = st.sampled_from([b"X-Sender: a@b.example", b"x-receiver: c@d.example, e@f.example", b"Subject: hi",
                          b" folded", b"\tfolded", b"X-Receiver:", b"To: \xc3\xa9@x", b"X-SENDER: <>"])
_faulty = st.sampled_from([b"", b"Bad Name: x", b"NoColon", b"A:\rB: c", b"X-Sender : a@b.example"])
# Mostly plain lines, so that many inputs take the fast path (the agreement
# test is about those), with faults and random bytes mixed in.
_line = st.one_of(_plain, _plain, _plain, _plain, _faulty, st.binary(max_size=12))
_head = st.tuples(st.lists(_line, max_size=8), st.sampled_from([b"\r\n", b"\n"]), st.booleans()).map(
    lambda t: t[1].join(t[0]) + (t[1] + t[1] + b"body\r\n.\r\n" if t[2] else b"")
)
# Well-formed header sections only: what the fast path takes (and each of its envelope checks).
_plain_head = st.tuples(st.lists(_plain, min_size=1, max_size=8), st.sampled_from([b"\r\n", b"\n"])).map(
    lambda t: b"Received: x" + t[1] + t[1].join(t[0]) + t[1] + t[1] + b"body" + t[1]
)


@settings(max_examples=400, deadline=None)
@given(_head)
def test_find_header_fields_compiled_equals_reference(data: bytes) -> None:
    assert core.find_header_fields(data, NAMES) == _core_ref.find_header_fields(data, NAMES)


def _either(data: bytes, fast: bool) -> PickupMessage | tuple[str, int | None]:
    try:
        if fast:
            return parse_pickup(data, PATH)
        # The same checks first, then the line parser for every input.
        with mock.patch("fastmta.intake.pickup.find_header_fields", return_value=None):
            return parse_pickup(data, PATH)
    except InputError as exc:
        return str(exc), exc.line


@settings(max_examples=500, deadline=None)
@given(st.one_of(_head, _plain_head))
def test_the_fast_path_and_the_line_parser_agree(data: bytes) -> None:
    # Every input, whichever path it takes: same message or the same error (file and line).
    assert _either(data, fast=True) == _either(data, fast=False)


def test_the_agreement_test_covers_the_fast_path() -> None:
    # The property above would hold trivially if no input took the fast path.
    assert core.find_header_fields(b"X-Sender: a@b.example\r\nX-Receiver: c@d.example\r\nS: x\r\n\r\n", NAMES)


@pytest.mark.parametrize("nl", [b"\r\n", b"\n"])
@pytest.mark.parametrize("tail", [b"\r\nbody\r\n", b""])  # with a body (fast path), headers only (line parser)
def test_a_folded_receiver_list_loses_no_address(nl: bytes, tail: bytes) -> None:
    data = (b"X-Sender: <a@b.example>" + nl + b"X-Receiver: c@d.example," + nl + b"  e@f.example," + nl +
            b"\tg@h.example" + nl + b"Subject: s" + nl + tail.replace(b"\r\n", nl))
    msg = parse_pickup(data, PATH)
    assert msg.sender == "a@b.example"
    assert msg.recipients == ["c@d.example", "e@f.example", "g@h.example"]
    assert msg.content == b"Subject: s" + nl + tail.replace(b"\r\n", nl)


@pytest.mark.parametrize("tail", [b"\r\nbody\r\n", b""])
def test_a_receiver_given_twice_is_sent_once(tail: bytes) -> None:
    # Two X-Receiver lines for one mailbox (in another case too): two RCPTs, two records before.
    data = b"X-Sender: a@b.example\r\nX-Receiver: c@d.example\r\nX-Receiver: e@f.example, c@D.example\r\nS: x\r\n" + tail
    assert parse_pickup(data, PATH).recipients == ["c@d.example", "e@f.example"]


def test_a_bad_address_on_a_continuation_line_is_reported_with_its_field_line() -> None:
    data = b"Subject: s\r\nX-Receiver: c@d.example,\r\n john doe@x.example\r\n\r\nbody\r\n"
    with pytest.raises(InputError, match="john doe@x.example") as err:
        parse_pickup(data, PATH)
    assert err.value.line == 2
    assert err.value.source == str(PATH)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"X-Receiver: c@d.example\r\nSubject: s\r\n\r\nx", "no X-Sender header"),
        (b"Subject: s\r\n\r\nx", "no X-Sender header"),
        (b"X-Sender: a@b.example\r\nSubject: s\r\n\r\nx", "no X-Receiver header"),
        (b"X-Sender: a@b.example\r\nX-Receiver: c@d.example\r\n\r\nx", "no headers besides the envelope"),
        (b"X-Sender: a@b.example\r\nX-Sender: a@b.example\r\nX-Receiver: c@d.example\r\n\r\nx",
         "more than one X-Sender"),
    ],
)
def test_envelope_faults_are_named(data: bytes, reason: str) -> None:
    with pytest.raises(InputError, match=reason):
        parse_pickup(data, PATH)
    with pytest.raises(InputError, match=reason):
        _parse_lines(data, PATH)


@pytest.mark.parametrize("size", [0, 1, 64 * 1024 - 1, 64 * 1024, 64 * 1024 + 1, 3 * 1024 * 1024 + 17])
def test_pickup_files_are_read_whole_at_any_size(tmp_path: Path, size: int) -> None:
    from fastmta.intake.pickup import read_pickup_bytes

    data = bytes(i % 251 for i in range(size))
    (tmp_path / "m.eml").write_bytes(data)
    assert read_pickup_bytes(tmp_path / "m.eml") == data


def test_a_pickup_file_over_the_limit_is_refused_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fastmta.intake import pickup

    monkeypatch.setattr(pickup, "MAX_PICKUP_BYTES", 100_000)
    (tmp_path / "ok.eml").write_bytes(b"x" * 100_000)
    (tmp_path / "big.eml").write_bytes(b"x" * 100_001)
    assert len(pickup.read_pickup_bytes(tmp_path / "ok.eml")) == 100_000
    with pytest.raises(InputError, match="100001 bytes, over the 100000 byte limit") as err:
        pickup.read_pickup_bytes(tmp_path / "big.eml")
    assert err.value.source == str(tmp_path / "big.eml")
    with pytest.raises(InputError, match="cannot read") as err:
        pickup.read_pickup_bytes(tmp_path / "missing.eml")
    assert err.value.source == str(tmp_path / "missing.eml")


def test_a_line_over_998_characters_is_refused_naming_it() -> None:
    # Found against Exim and OpenSMTPD: such a line went out as it was and came back "500 Line too
    # long" at the end of DATA, a bounce of every recipient of a file already taken. RFC 5322 2.1.1.
    head = b"X-Sender: a@b.example\r\nX-Receiver: c@d.example\r\nSubject: hi\r\n\r\n"
    fits = head + b"y" * 998 + b"\r\n" + b"z" * 998 + b"\n"  # at the limit, CRLF or LF
    assert parse_pickup(fits, "fits.eml").content.endswith(b"z" * 998 + b"\n")
    with pytest.raises(InputError, match="a line of 999 characters") as info:
        parse_pickup(head + b"line\r\n" + b"y" * 999 + b"\r\nz\r\n", "body.eml")
    assert info.value.line == 6
    with pytest.raises(InputError, match="a line of 1209 characters") as info:
        parse_pickup(b"X-Sender: a@b.example\r\nX-Receiver: c@d.example\r\nSubject: " + b"h" * 1200 + b"\r\n\r\nb\n",
                     "header.eml")
    assert info.value.line == 3
    # The envelope's own lines are not sent: a long X-Receiver list is fine.
    many = b",".join(b"u%d@d.example" % i for i in range(200))
    assert len(parse_pickup(b"X-Sender: a@b.example\r\nX-Receiver: " + many + b"\r\nSubject: s\r\n\r\nb\r\n",
                            "env.eml").recipients) == 200
