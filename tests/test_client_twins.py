"""The compiled reply parser against its pure-Python twin, on arbitrary bytes.

The rest of the client protocol is checked against both twins by running
tests/test_protocol.py twice (the second time with FASTMTA_NO_EXTENSIONS=1);
the parser is the part that sees arbitrary bytes from the network, so here it
also gets a differential test: same input, cut at the same places, the same
replies or the same refusal.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastmta import _client, _client_ref
from fastmta.errors import ProtocolError

REPLYISH = st.lists(
    st.one_of(
        st.sampled_from([
            b"250 2.1.0 Ok\r\n", b"250-first\r\n", b"250 last\r\n", b"550 5.1.1 <x@y>: unknown\r\n",
            b"451 4.7.1 Greylisted\r\n", b"354 go ahead\r\n", b"250,2.0.0 gmail comma\r\n", b"220\r\n",
            b"421-4.7.0 closing\n", b"550 5.1.1\r\n", b"250 2.0.0x\r\n", b"450 4.2.1 \xc3\xa9t\xe9\r\n",
            b"250-2.1.5 a\r\n250 2.1.5 b\r\n", b"\r\n", b"2", b"50 ", b"\r", b"\n",
        ]),
        st.binary(max_size=40),
    ),
    max_size=30,
)


def _run(parser_cls: type, data: bytes, cuts: list[int]) -> tuple[list[tuple[object, ...]], str | None, bool]:
    parser = parser_cls()
    replies: list[tuple[object, ...]] = []
    bounds = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    try:
        for a, b in zip(bounds, bounds[1:]):
            replies += [(r.code, r.lines, r.enhanced) for r in parser.feed(data[a:b])]
    except ProtocolError as exc:
        return replies, str(exc), True
    return replies, None, parser.pending


@settings(max_examples=600, deadline=None)
@given(REPLYISH, st.lists(st.integers(min_value=0, max_value=2000), max_size=8))
def test_compiled_parser_equals_the_python_parser(pieces: list[bytes], cuts: list[int]) -> None:
    data = b"".join(pieces)
    assert _run(_client.ReplyParser, data, cuts) == _run(_client_ref.ReplyParser, data, cuts)


@pytest.mark.parametrize("parser_cls", [_client.ReplyParser, _client_ref.ReplyParser])
def test_enhanced_codes_edge_cases(parser_cls: type) -> None:
    cases = {
        b"250 2.1.0 Ok": "2.1.0",
        b"250 2.1.0": "2.1.0",
        b"250 2.1.0\tTab": "2.1.0",
        b"250 2.1.0x": None,  # not followed by a space or the end
        b"250 2.1000.0 no": None,  # more than three digits
        b"250 5.1.1 wrong class": None,
        b"550 5.123.456 big": "5.123.456",
        b"550 3.1.1 bad class": None,
        b"550 5..1 empty": None,
    }
    for line, enhanced in cases.items():
        [reply] = parser_cls().feed(line + b"\r\n")
        assert reply.enhanced == enhanced, line
