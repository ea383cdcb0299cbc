"""DKIM canonicalization, escaping and transfer encodings: compiled core == reference, reference == RFC."""

from __future__ import annotations

import quopri

import dkim.canonicalization as dkimcanon
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastmta.message import _core_ref, core

pytestmark = pytest.mark.core

# Bodies made of the pieces canonicalization cares about: WSP runs, lone CR
# and LF, blank lines at the end, 8-bit bytes, very long lines.
pieces = st.sampled_from(
    [b" ", b"\t", b"  \t ", b"\r", b"\n", b"\r\n", b"\r\n\r\n", b"a", b"xyz", b".", b"=", b"\xe9", b"\x00", b"\xff" * 3]
)
bodies = (
    st.binary(max_size=200)
    | st.lists(pieces, max_size=80).map(b"".join)
    | st.builds(lambda n, tail: b"w" * n + tail, st.integers(0, 2500), st.sampled_from([b"", b" \r\n", b"\r\n\r\n"]))
)


@settings(max_examples=300)
@given(bodies, st.booleans())
def test_body_compiled_equals_reference(body: bytes, relaxed: bool) -> None:
    assert core.canonicalize_body(body, relaxed) == _core_ref.canonicalize_body(body, relaxed)


@settings(max_examples=200)
@given(bodies, st.booleans(), st.lists(st.integers(0, 300), max_size=6))
def test_body_incremental_equals_one_shot(body: bytes, relaxed: bool, cuts: list[int]) -> None:
    canon = core.BodyCanonicalizer(relaxed)
    points = sorted({min(c, len(body)) for c in cuts})
    out = []
    prev = 0
    for p in [*points, len(body)]:
        out.append(canon.feed(body[prev:p]))
        prev = p
    out.append(canon.finish())
    assert b"".join(out) == _core_ref.canonicalize_body(body, relaxed)
    # finish() resets: the object is reusable for the next message.
    assert canon.feed(b"x") + canon.finish() == _core_ref.canonicalize_body(b"x", relaxed)


@settings(max_examples=200)
@given(st.lists(pieces, max_size=60).map(b"".join), st.booleans())
def test_body_matches_dkimpy_on_crlf_text(raw: bytes, relaxed: bool) -> None:
    # dkimpy canonicalizes CRLF text; give it the CRLF form to_wire would send.
    body = core.normalize_crlf(raw)
    cls = dkimcanon.Relaxed if relaxed else dkimcanon.Simple
    assert core.canonicalize_body(body, relaxed) == cls.canonicalize_body(body)


@pytest.mark.parametrize(
    ("body", "relaxed", "canon"),
    [
        (b"", False, b"\r\n"),
        (b"", True, b""),
        (b"\r\n\r\n", False, b"\r\n"),
        (b"\r\n\r\n", True, b""),
        (b" C \r\nD \t E\r\n\r\n\r\n", True, b" C\r\nD E\r\n"),  # RFC 6376 3.4.5
        (b" C \r\nD \t E\r\n\r\n\r\n", False, b" C \r\nD \t E\r\n"),
        (b"a\rb\nc", True, b"a\r\nb\r\nc\r\n"),
    ],
)
def test_body_examples(body: bytes, relaxed: bool, canon: bytes) -> None:
    assert core.canonicalize_body(body, relaxed) == canon
    assert _core_ref.canonicalize_body(body, relaxed) == canon


header_fields = st.builds(
    lambda name, sp, value, folds: name + sp + b":" + b"\r\n".join([value, *folds]) + b"\r\n",
    st.sampled_from([b"Subject", b"FROM", b"x-Weird", b"To "]),
    st.sampled_from([b"", b" ", b"\t "]),
    # WSP is SP and HTAB only (RFC 5234); dkimpy also strips VT/FF, so leave those out.
    st.lists(st.sampled_from([b" ", b"\t", b"a", b"Z", b":", b"=?", b"\xc3\xa9", b"\x7f"]), max_size=20).map(b"".join),
    st.lists(st.sampled_from([b" folded", b"\t\tmore  text ", b"  "]), max_size=3),
)


@settings(max_examples=300)
@given(header_fields | st.binary(max_size=80), st.booleans())
def test_header_compiled_equals_reference(field: bytes, relaxed: bool) -> None:
    assert core.canonicalize_header(field, relaxed) == _core_ref.canonicalize_header(field, relaxed)


@settings(max_examples=200)
@given(header_fields)
def test_header_relaxed_matches_dkimpy(field: bytes) -> None:
    name, _, value = field.partition(b":")
    [(cname, cvalue)] = dkimcanon.Relaxed.canonicalize_headers([(name, value)])
    assert core.canonicalize_header(field, True) == cname + b":" + cvalue


def test_header_relaxed_example() -> None:
    # RFC 6376 3.4.5
    assert core.canonicalize_header(b"A: X\r\n", True) == b"a:X\r\n"
    assert core.canonicalize_header(b"B : Y\t\r\n\tZ  \r\n", True) == b"b:Y Z\r\n"


messages = st.lists(
    st.sampled_from(
        [b"From: a\r\n", b"To: b\n", b" folded\r\n", b"\tfolded\n", b"Subject: x\ry\r\n", b"\r\n", b"\n", b"body", b"X:"]
    ),
    max_size=20,
).map(b"".join)


@settings(max_examples=300)
@given(messages | st.binary(max_size=100))
def test_split_compiled_equals_reference(message: bytes) -> None:
    fields, offset = core.split_header_fields(message)
    assert (fields, offset) == _core_ref.split_header_fields(message)
    # Nothing is lost: the fields and the rest are the message.
    assert b"".join(fields) + message[len(b"".join(fields)) : offset] + message[offset:] == message


@settings(max_examples=200)
@given(messages | st.binary(max_size=100))
def test_index_compiled_equals_reference(message: bytes) -> None:
    fields, _ = core.split_header_fields(message)
    fields += [b"X-" + b"Long" * 40 + b": v\r\n"]
    assert core.index_header_fields(fields) == _core_ref.index_header_fields(fields)


def test_split_duplicate_and_folded_headers() -> None:
    msg = b"Received: a\r\n  b\r\nReceived: c\r\nSubject: s\r\n\r\nbody\r\n"
    fields, offset = core.split_header_fields(msg)
    assert fields == [b"Received: a\r\n  b\r\n", b"Received: c\r\n", b"Subject: s\r\n"]
    assert msg[offset:] == b"body\r\n"
    assert core.index_header_fields(fields) == {
        b"received": [b"Received: a\r\n  b\r\n", b"Received: c\r\n"],
        b"subject": [b"Subject: s\r\n"],
    }


# ---------------------------------------------------------------- escaping


@settings(max_examples=300)
@given(st.lists(st.text(max_size=30), max_size=8), st.data())
def test_render_compiled_equals_reference(values: list[str], data: st.DataObject) -> None:
    literals = data.draw(st.lists(st.binary(max_size=20), min_size=len(values) + 1, max_size=len(values) + 1))
    modes = bytes(data.draw(st.lists(st.integers(0, 4), min_size=len(values), max_size=len(values))))
    assert core.render(literals, modes, values) == _core_ref.render(literals, modes, values)
    for v, m in zip(values, modes):
        assert core.escape(v, m) == _core_ref.escape(v, m)


@settings(max_examples=200)
@given(st.text(max_size=60))
def test_escape_semantics(value: str) -> None:
    import html
    import urllib.parse

    import markupsafe

    assert core.escape(value, core.MODE_HTML) == str(markupsafe.escape(value)).encode()
    assert html.unescape(core.escape(value, core.MODE_HTML).decode()) == value
    comp = core.escape(value, core.MODE_URL_COMPONENT).decode()
    assert urllib.parse.unquote(comp) == value and all(c.isalnum() or c in "-._~%" for c in comp)
    hdr = core.escape(value, core.MODE_HEADER)
    assert not {0, 10, 13} & set(hdr)
    url = core.escape(value, core.MODE_URL).decode()
    assert not set(url) & set(" \"'<>\r\n\0")


def test_render_rejects_bad_arguments() -> None:
    for impl in (core, _core_ref):
        with pytest.raises(ValueError):
            impl.render([b"a"], b"\x00", ["x"])
        with pytest.raises(TypeError):
            impl.render([b"a", b"b"], b"\x00", [3])  # type: ignore[list-item]


# ---------------------------------------------------------------- transfer encodings


@settings(max_examples=300)
@given(bodies)
def test_qp_compiled_equals_reference_and_decodes(body: bytes) -> None:
    qp = core.quoted_printable(body)
    assert qp == _core_ref.quoted_printable(body)
    assert all(len(line) <= 76 for line in qp.split(b"\r\n"))
    assert qp.isascii() and b"\r\n." not in b"\r\n" + qp
    # What a reader decodes is the CRLF form of the input.
    assert quopri.decodestring(qp) == core.normalize_crlf(body)


@settings(max_examples=300)
@given(bodies, st.integers(1, 1000))
def test_7bit_compiled_equals_reference(body: bytes, limit: int) -> None:
    assert core.is_7bit_safe(body, limit) == _core_ref.is_7bit_safe(body, limit)


@settings(max_examples=200)
@given(messages, st.lists(st.sampled_from([b"from", b"to", b"subject", b"x", b"received"]), max_size=5, unique=True), st.booleans())
def test_select_headers_compiled_equals_reference(message: bytes, names: list[bytes], relaxed: bool) -> None:
    fields, _ = core.split_header_fields(b"From: a\r\nX: 1\r\nx: 2\r\n" + message)
    index = core.index_header_fields(fields)
    oversign = frozenset({b"from", b"x"})
    got = core.select_headers(index, tuple(names), oversign, relaxed)
    assert got == _core_ref.select_headers(index, tuple(names), oversign, relaxed)
    # Every instance signed bottom-up, oversigned names listed once more.
    assert got[1] == [n for n in names for _ in range(len(index.get(n, [])) + (n in oversign))]


def test_select_headers_bottom_up() -> None:
    fields, _ = core.split_header_fields(b"To: a\r\nFrom: f\r\nTo: b\r\n\r\n")
    data, h = core.select_headers(core.index_header_fields(fields), (b"from", b"to"), frozenset({b"from"}), True)
    assert h == [b"from", b"from", b"to", b"to"]
    assert data == b"from:f\r\nto:b\r\nto:a\r\n"
