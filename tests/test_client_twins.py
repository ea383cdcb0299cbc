"""The compiled reply parser against its pure-Python twin, on arbitrary bytes.

The rest of the client protocol is checked against both twins by running
tests/test_protocol.py twice (the second time with FASTMTA_NO_EXTENSIONS=1);
the parser is the part that sees arbitrary bytes from the network, so here it
also gets a differential test: same input, cut at the same places, the same
replies or the same refusal.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastmta.errors import ProtocolError
from fastmta.smtp import _client, _client_ref

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
        for a, b in itertools.pairwise(bounds):
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


def test_compiled_protocol_and_its_twin_give_identical_traces() -> None:
    # 3,000 random sessions (random capabilities, transactions, replies cut at
    # random places, QUIT, STARTTLS completion, aborts) through ClientProtocol
    # on the compiled core and on the pure-Python twin: same bytes written,
    # same events, same errors, same state after every step.
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("protocol_scenarios.py")
    traces = []
    for no_ext in ("", "1"):
        env = {k: v for k, v in os.environ.items() if k != "FASTMTA_NO_EXTENSIONS"}
        if no_ext:
            env["FASTMTA_NO_EXTENSIONS"] = no_ext
        out = subprocess.run([sys.executable, str(script), "0", "3000"], env=env, capture_output=True, timeout=300)
        assert out.returncode == 0, out.stderr.decode()
        traces.append(json.loads(out.stdout))
    compiled, reference = traces
    assert len(compiled) == len(reference) == 3000
    for seed, (a, b) in enumerate(zip(compiled, reference)):
        assert a == b, f"session {seed} differs"
    # The sessions must reach the interesting places, or the comparison says little.
    flat = json.dumps(compiled)
    for what in ('"done"', '"ready"', '"failed"', '"closed"', '"starttls"', "BDAT", "RSET", "SMTPUTF8", "QUIT",
                 "BODY=8BITMIME", "SIZE=", "HELO client.test", "552", "ProtocolError"):
        assert what in flat, what
